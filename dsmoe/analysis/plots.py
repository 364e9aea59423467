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


def loss_curves(rows: list[dict], order: list[str], path: str) -> str:
  """Training loss and fixed-subset evaluation loss per variant, seed bands."""
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  colors = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")
  for i, v in enumerate(order):
    runs = [r for r in rows if r["variant"] == v]
    tokens_per_step = runs[0]["tokens_seen"] / max(runs[0]["steps"], 1)
    for ax, (xk, yk) in zip(axes, [("step", "loss"), ("eval_step", "eval_loss")]):
      steps, ys = _common(runs, xk, yk)
      if len(steps):
        _band(ax, steps * tokens_per_step / 1e6, ys, v, colors(i))
  axes[0].set_title("training cross-entropy (interval means)")
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
