"""Training metrics: summaries of a step, metrics.jsonl, TensorBoard, MFU.

Only process 0 writes. ``metrics.jsonl`` holds one JSON object per logged
step; on resume from checkpoint step S the lines with step > S are dropped
(atomically) so the log equals the log of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

METRICS_FILE = "metrics.jsonl"


def expert_load_stats(tokens_per_expert_le: np.ndarray) -> dict[str, float]:
  """Per MoE layer: max/mean load and coefficient of variation (std/mean)."""
  out = {}
  for layer, counts in enumerate(np.asarray(tokens_per_expert_le, np.float64)):
    mean = max(counts.mean(), 1e-12)
    out[f"load/moe{layer}/max_over_mean"] = float(counts.max() / mean)
    out[f"load/moe{layer}/cv"] = float(counts.std() / mean)
  return out


def summarize(m: dict, *, step: int, tokens_per_s: float, flops_per_token: float,
              peak_flops_total: float) -> dict:
  """Host metrics of one train step -> the flat dict that gets logged."""
  loss = float(m["loss"])
  out = {"step": step, "loss": loss,
         "perplexity": float(math.exp(min(loss, 80.0))) if math.isfinite(loss) else loss,
         "grad_norm": float(m["grad_norm"]), "learning_rate": float(m["learning_rate"]),
         "tokens_per_s": tokens_per_s,
         "mfu": tokens_per_s * flops_per_token / peak_flops_total if peak_flops_total else 0.0,
         "skipped_steps": int(m["skipped"])}
  out.update({k: float(v) for k, v in m.items() if k.startswith("aux/")})
  if "tokens_per_expert" in m:
    tpe = np.asarray(m["tokens_per_expert"], np.float64)
    out.update(expert_load_stats(tpe))
    out["dropped_fraction"] = float(np.mean(m["dropped_fraction"]))
    out["expert_load"] = (tpe / np.maximum(tpe.sum(-1, keepdims=True), 1)).round(5).tolist()
  return out


def truncate_jsonl(path: str, last_step: int) -> None:
  """Keeps the lines with step <= last_step (write to a temp file, then rename)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [ln for ln in f if ln.strip()]
  keep = []
  for ln in lines:
    try:
      if json.loads(ln)["step"] <= last_step:
        keep.append(ln)
    except (ValueError, KeyError):
      break  # a line cut by a kill: drop it and everything after
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(ln) for ln in f if ln.strip()]


class MetricWriter:
  """metrics.jsonl and TensorBoard event files (scalars) in `workdir`."""

  def __init__(self, workdir: str, *, resume_step: int, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self.tb = None
    if not enabled:
      return
    truncate_jsonl(self.path, resume_step)
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      print("tensorboardX is not installed: no TensorBoard events (pip install tensorboardX)")

  def has_record(self, step: int, key: str) -> bool:
    """Whether metrics.jsonl already holds `key` at `step` (after a resume)."""
    if not os.path.exists(self.path):
      return False
    return any(r.get("step") == step and key in r for r in read_jsonl(self.path))

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, record["step"])
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def measure_peak_flops(n: int = 1024, reps: int = 5) -> float:
  """FLOP/s of a float32 n x n matmul on one device (a stand-in for the peak)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: (x @ x) * (1.0 / n))  # stays finite
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(reps):
    a = f(a)
  a.block_until_ready()
  return 2.0 * n**3 * reps / (time.perf_counter() - t0)
