"""PNG plots of ablation grids and expert analyses (matplotlib, Agg backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _band(ax, x, ys, label, color):
  """Mean over seeds as a line, min..max over seeds as a band."""
  ys = np.asarray(ys, np.float64)
  ax.plot(x, ys.mean(0), label=f"{label} (n={len(ys)})", color=color, lw=1.2)
  if len(ys) > 1:
    ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=0.2, lw=0)


def _common(runs, xkey, ykey):
  """Steps logged by every seed, and each seed's values there."""
  steps = set(runs[0]["curves"][xkey])
  for r in runs[1:]:
    steps &= set(r["curves"][xkey])
  steps = sorted(steps)
  ys = [[dict(zip(r["curves"][xkey], r["curves"][ykey]))[s] for s in steps] for r in runs]
  return np.array(steps), ys


def _smooth(steps, ys, window: int):
  """Moving means over `window` points (the steps at each window's end)."""
  if len(steps) < window:
    return steps, ys
  kernel = np.ones(window) / window
  return steps[window - 1:], [np.convolve(y, kernel, mode="valid") for y in ys]


def loss_curves(rows: list[dict], order: list[str], path: str) -> str:
  """Training loss and fixed-subset evaluation loss per variant, seed bands."""
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  colors = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")
  for i, v in enumerate(order):
    runs = [r for r in rows if r["variant"] == v]
    tokens_per_step = runs[0]["tokens_seen"] / max(runs[0]["steps"], 1)
    for ax, (xk, yk) in zip(axes, [("step", "loss"), ("eval_step", "eval_loss")]):
      steps, ys = _common(runs, xk, yk)
      if xk == "step":  # a batch holds few documents: smooth over 10 log intervals
        steps, ys = _smooth(steps, ys, 10)
      if len(steps):
        _band(ax, steps * tokens_per_step / 1e6, ys, v, colors(i))
  axes[0].set_title("training cross-entropy (moving mean over 10 log intervals)")
  axes[1].set_title("evaluation loss, fixed subset of the evaluation set")
  for ax in axes:
    ax.set_xlabel("tokens seen (M)")
    ax.set_ylabel("nats / token")
    ax.grid(alpha=0.3)
    lo = [ln.get_ydata()[-1] for ln in ax.get_lines() if len(ln.get_ydata())]
    if lo:  # zoom on the second half of training, where variants separate
      ax.set_ylim(min(lo) - 0.15, max(lo) + 0.6)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def loss_vs_flops(stats: dict[str, dict], path: str) -> str:
  """Final full-set evaluation loss vs training FLOPs per token; bars = seed std."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for v, s in stats.items():
    x = s["flops_per_token"] / 1e6
    ax.errorbar(x, s["mean"], yerr=0 if s["n"] < 2 else s["std"], fmt="o", capsize=4)
    ax.annotate(v, (x, s["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel("training FLOPs per token (M, activated parameters)")
  ax.set_ylabel("final evaluation loss (mean over seeds)")
  ax.set_title("loss vs activated compute (error bars: seed std)")
  ax.grid(alpha=0.3, which="both")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def expert_analyses(results: dict[str, dict], path: str) -> str:
  """Figure 4 / 5 style curves, the shared-expert swap and output redundancy
  of one or more models (results: name -> dsmoe.analysis.experts.analyze)."""
  fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
  ax = axes[0]
  for name, r in results.items():
    if r.get("disable_top"):
      base = r["baseline"]["loss"]
      ax.plot([p["ratio"] for p in r["disable_top"]],
              [p["loss"] - base for p in r["disable_top"]], "o-", label=name)
  ax.set(title="(a) top routed experts disabled", xlabel="ratio of routed experts disabled "
         "(best-scoring first)", ylabel="evaluation loss - loss as trained")
  ax = axes[1]
  for name, r in results.items():
    if r.get("vary_top_k"):
      ax.plot([p["top_k"] for p in r["vary_top_k"]], [p["loss"] for p in r["vary_top_k"]],
              "o-", label=f"{name} (trained top-{r['model']['top_k']})")
  ax.set(title="(b) routed experts activated at evaluation", xlabel="top-k",
         ylabel="evaluation loss")
  ax = axes[2]
  swaps = {n: r["swap_shared"] for n, r in results.items() if r.get("swap_shared")}
  for i, (name, s) in enumerate(swaps.items()):
    ax.bar([2 * i, 2 * i + 0.8], [s["trained"]["loss"], s["swapped"]["loss"]], width=0.7,
           color=["tab:blue", "tab:red"])
    ax.text(2 * i + 0.4, s["swapped"]["loss"], name, ha="center", va="bottom", fontsize=8)
  ax.set(title="(c) blue: as trained; red: shared off, top-k + 1", ylabel="evaluation loss")
  ax.set_xticks([])
  if swaps:
    lo = min(min(s["trained"]["loss"], s["swapped"]["loss"]) for s in swaps.values())
    ax.set_ylim(lo - 0.2, None)
  ax = axes[3]
  width = 0.8 / max(len(results), 1)
  for i, (name, r) in enumerate(results.items()):
    vals = [layer["mean_pairwise_cosine"] for layer in r["redundancy"]]
    ax.bar(np.arange(len(vals)) + i * width, vals, width=width, label=name)
  n_layers = max((len(r["redundancy"]) for r in results.values()), default=0)
  ax.set_xticks(np.arange(n_layers) + width * (len(results) - 1) / 2, range(n_layers))
  ax.set(title="(e) redundancy: mean pairwise cosine of expert outputs",
         xlabel="MoE layer", ylabel="cosine similarity")
  for ax in axes:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def expert_load(results: dict[str, dict], path: str) -> str:
  """(d) one heatmap per model: MoE layer x routed expert, load / uniform load."""
  fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 3.2), squeeze=False)
  for ax, (name, r) in zip(axes[0], results.items()):
    load_le = np.asarray(r["expert_load"])
    im = ax.imshow(load_le * load_le.shape[1], aspect="auto", cmap="viridis", origin="lower",
                   vmin=0)
    ax.set(title=f"(d) {name}: load / uniform (1 = balanced)", xlabel="routed expert",
           ylabel="MoE layer")
    fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path
