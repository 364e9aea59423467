"""Training metrics: summaries of a step, metrics.jsonl, TensorBoard, MFU.

Only process 0 writes. ``metrics.jsonl`` holds one JSON object per logged
step; on resume from checkpoint step S the lines with step > S are dropped
(atomically) so the log equals the log of an uninterrupted run. Unreadable
lines are skipped and counted, never the good lines after them.
"""

from __future__ import annotations

import errno
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


class Interval:
  """Running sums of the per-step metrics since the last log line.

  The logged ``loss`` is the mean over the interval's tokens (total
  cross-entropy / total tokens of its finite steps), as TensorBoard users
  expect; aux losses, gradient norm and dropped fraction are per-step means,
  expert loads are summed. ``state()`` is JSON and goes into each checkpoint,
  so a resumed run logs what an uninterrupted one would.
  """

  KEYS = ("steps", "finite_steps", "ce_sum", "tokens", "grad_norm_sum", "dropped_sum")

  def __init__(self, state: dict | None = None):
    state = state or {}
    self.sums = {k: float(state.get("sums", {}).get(k, 0.0)) for k in self.KEYS}
    self.aux = dict(state.get("aux", {}))
    tpe = state.get("tokens_per_expert")
    self.tokens_per_expert = None if tpe is None else np.asarray(tpe, np.float64)
    self.last = dict(state.get("last", {}))

  def add(self, m: dict) -> None:
    """Adds one train step's host metrics (dsmoe.train.step.train_step)."""
    s = self.sums
    s["steps"] += 1
    if bool(m["finite"]):
      s["finite_steps"] += 1
      s["ce_sum"] += float(m["loss"]) * float(m["tokens"])
      s["tokens"] += float(m["tokens"])
      s["grad_norm_sum"] += float(m["grad_norm"])
      for k, v in m.items():
        if k.startswith("aux/"):
          self.aux[k] = self.aux.get(k, 0.0) + float(v)
    if "tokens_per_expert" in m:
      tpe = np.asarray(m["tokens_per_expert"], np.float64)
      self.tokens_per_expert = tpe if self.tokens_per_expert is None else self.tokens_per_expert + tpe
      s["dropped_sum"] += float(np.mean(m["dropped_fraction"]))
    self.last = {"loss": float(m["loss"]), "learning_rate": float(m["learning_rate"]),
                 "skipped": int(m["skipped"])}

  def state(self) -> dict:
    tpe = None if self.tokens_per_expert is None else self.tokens_per_expert.tolist()
    return {"sums": dict(self.sums), "aux": dict(self.aux), "tokens_per_expert": tpe,
            "last": dict(self.last)}

  def summary(self, *, step: int, tokens_per_s: float, flops_per_token: float,
              peak_flops_total: float) -> dict:
    """The flat dict that gets logged for the interval ending at `step`."""
    s, n = self.sums, max(self.sums["finite_steps"], 1.0)
    loss = s["ce_sum"] / s["tokens"] if s["tokens"] else float("nan")
    out = {"step": step, "loss": loss, "loss_step": self.last["loss"],
           "perplexity": float(math.exp(min(loss, 80.0))) if math.isfinite(loss) else loss,
           "grad_norm": s["grad_norm_sum"] / n if s["finite_steps"] else float("nan"),
           "learning_rate": self.last["learning_rate"], "tokens_per_s": tokens_per_s,
           "mfu": tokens_per_s * flops_per_token / peak_flops_total if peak_flops_total else 0.0,
           "skipped_steps": self.last["skipped"], "steps_in_interval": int(s["steps"])}
    out.update({k: v / n for k, v in self.aux.items()})
    if self.tokens_per_expert is not None:
      tpe = self.tokens_per_expert
      out.update(expert_load_stats(tpe))
      out["dropped_fraction"] = s["dropped_sum"] / s["steps"]
      out["expert_load"] = (tpe / np.maximum(tpe.sum(-1, keepdims=True), 1)).round(5).tolist()
    return out


def _parse(line: str) -> dict | None:
  """The JSON object of one metrics line with an integer "step", else None."""
  try:
    record = json.loads(line)
  except ValueError:
    return None
  if not isinstance(record, dict) or not isinstance(record.get("step"), int):
    return None
  return record


def truncate_jsonl(path: str, last_step: int) -> tuple[int, int]:
  """Keeps the lines with step <= last_step; returns (lines dropped because
  they came after `last_step`, unreadable lines skipped).

  Unreadable lines (cut by a kill, or damaged) are skipped and counted; the
  good lines around them are all kept. The file is rewritten (temp file,
  fsync, rename) only when something is dropped.
  """
  if not os.path.exists(path):
    return 0, 0
  with open(path, "rb") as f:
    raw = f.read()
  keep, later, bad = [], 0, 0
  for line in raw.decode("utf-8", errors="replace").splitlines():
    if not line.strip():
      continue
    record = _parse(line)
    if record is None:
      bad += 1
    elif record["step"] <= last_step:
      keep.append(line + "\n")
    else:
      later += 1
  if later or bad or (raw and not raw.endswith(b"\n")):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  return later, bad


def read_jsonl(path: str) -> list[dict]:
  """The records of a metrics file; unreadable lines are skipped."""
  with open(path, encoding="utf-8", errors="replace") as f:
    return [r for r in map(_parse, f) if r is not None]


class MetricWriter:
  """metrics.jsonl and TensorBoard event files (scalars) in `workdir`.

  Each record is one line, written with a single ``write`` call on a file
  opened for appending, so a kill leaves at most one cut line at the end
  (skipped on resume) and never mixes two records. :meth:`sync` (called
  with each checkpoint save) and :meth:`close` fsync the file; not every
  line, since on a bucket mounted with gcsfuse each fsync uploads the file.
  """

  def __init__(self, workdir: str, *, resume_step: int, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self.tb = None
    self._fd = None
    if not enabled:
      return
    later, bad = truncate_jsonl(self.path, resume_step)
    if bad:
      print(f"{self.path}: skipped {bad} unreadable line(s); kept every readable "
            f"line up to step {resume_step}", flush=True)
    del later  # lines of steps after the checkpoint: logged again by this run
    self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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
    line = (json.dumps(record) + "\n").encode()
    written = os.write(self._fd, line)
    if written != len(line):  # only on a full disk; the cut line is skipped on resume
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
    if self.tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, record["step"])
      self.tb.flush()

  def sync(self) -> None:
    if self._fd is not None:
      os.fsync(self._fd)

  def close(self) -> None:
    if self._fd is not None:
      fd, self._fd = self._fd, None
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    if self.tb is not None:
      self.tb.close()
      self.tb = None


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
