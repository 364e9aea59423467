"""Data pipeline. TEMPORARY byte-level loader until M4 lands (see make_loader).

Interface the trainer relies on:

    loader = make_loader(config, split="train", process_index=None, process_count=None)
    it = iter(loader)            # an iterator with get_state() / set_state(state)
    batch = next(it)             # dict of numpy arrays, each [B_local, seq_len]:
                                 #   "inputs" int32, "targets" int32,
                                 #   "segment_ids" int32 (0 = padding, 1.. documents)
    B_local = config.train.batch_size // process_count
"""

from __future__ import annotations

import glob
import os
import sysconfig
import zlib

import numpy as np


def _corpus(config, split: str) -> np.ndarray:
  root = config.data.text_dir or sysconfig.get_paths()["stdlib"]
  files = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
  picked = [f for f in files if (zlib.crc32(f.encode()) % 10 == 0) == (split != "train")]
  picked = picked[: config.data.max_files]
  data = b"\n".join(open(f, "rb").read() for f in picked)
  return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


class _Iterator:
  def __init__(self, tokens, batch, seq_len, seed, process_index, process_count):
    self.tokens, self.batch, self.seq_len = tokens, batch, seq_len
    self.seed, self.pi, self.pc, self.step = seed, process_index, process_count, 0

  def get_state(self):
    return {"step": self.step}

  def set_state(self, state):
    self.step = int(state["step"])

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.step])
    starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, self.batch * self.pc)
    starts = starts[self.pi * self.batch:(self.pi + 1) * self.batch]
    win = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts])
    self.step += 1
    return {"inputs": win[:, :-1], "targets": win[:, 1:],
            "segment_ids": np.ones_like(win[:, 1:])}


class _Loader:
  def __init__(self, config, split, process_index, process_count):
    self.args = (_corpus(config, split), config.train.batch_size // process_count,
                 config.data.seq_len, config.train.seed, process_index, process_count)

  def __iter__(self):
    return _Iterator(*self.args)


def make_loader(config, split: str = "train", *, process_index=None, process_count=None):
  import jax
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  return _Loader(config, split, pi, pc)
