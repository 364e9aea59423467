"""End-of-run PNG: loss curves and one expert-load heatmap per MoE layer."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dsmoe.train import metrics as metrics_lib  # noqa: E402

PLOT_FILE = "training.png"


def plot_run(workdir: str) -> str:
  """Reads workdir/metrics.jsonl, writes workdir/training.png, returns its path."""
  records = metrics_lib.read_jsonl(os.path.join(workdir, metrics_lib.METRICS_FILE))
  train = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  loads = [r for r in train if "expert_load" in r]
  n_layers = len(loads[-1]["expert_load"]) if loads else 0
  fig, axes = plt.subplots(1, 1 + n_layers, figsize=(5 * (1 + n_layers), 4), squeeze=False)
  ax = axes[0, 0]
  steps = [r["step"] for r in train]
  ax.plot(steps, [r["loss"] for r in train], label="train cross-entropy")
  for key in sorted({k for r in train for k in r if k.startswith("aux/")}):
    ax.plot(steps, [r.get(key, np.nan) for r in train], label=key)
  if evals:
    ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o", label="eval")
  ax.set_xlabel("step")
  ax.set_yscale("log")
  ax.set_title("loss")
  ax.legend(fontsize=8)
  for layer in range(n_layers):
    ax = axes[0, 1 + layer]
    load_se = np.array([r["expert_load"][layer] for r in loads])  # [log steps, E]
    im = ax.imshow(load_se.T, aspect="auto", origin="lower", cmap="viridis",
                   extent=(loads[0]["step"] - 0.5, loads[-1]["step"] + 0.5, -0.5,
                           load_se.shape[1] - 0.5))
    ax.set_title(f"MoE layer {layer}: fraction of tokens per expert")
    ax.set_xlabel("step")
    ax.set_ylabel("routed expert")
    fig.colorbar(im, ax=ax)
  fig.tight_layout()
  path = os.path.join(workdir, PLOT_FILE)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path
