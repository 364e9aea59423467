"""Reading and writing HF ``*.safetensors`` checkpoints one tensor at a time.

Reading uses the ``safetensors`` library (``safe_open(framework="numpy")``;
bfloat16 arrives as ``ml_dtypes.bfloat16``). Each tensor is read by opening
its shard, copying the tensor out and closing the shard again, so nothing
else of the file stays mapped in memory. Pickle checkpoints (``*.bin``,
``*.pt``) are never read.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Callable, Iterable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from dsmoe.errors import HFFormatError

INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bfloat16", "F64": np.float64}


class SafetensorsError(HFFormatError):
  """A checkpoint folder that cannot be read as safetensors."""


class Reader:
  """The tensors of a folder's ``*.safetensors`` files (with or without an index)."""

  def __init__(self, folder: str):
    self.folder = folder
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
      pickles = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth"))]
      hint = (f"; it holds pickle files ({pickles[0]}), which dsmoe does not read: "
              "save the model with safetensors") if pickles else ""
      raise SafetensorsError(f"{folder}: no *.safetensors files{hint}")
    self.info: dict[str, tuple[str, tuple[int, ...], str]] = {}  # name -> (file, shape, dtype)
    for path in files:
      self._read_header(path)
    self._check_index()

  def _read_header(self, path: str) -> None:
    try:
      with safe_open(path, framework="numpy") as f:
        for name in f.keys():
          s = f.get_slice(name)
          if name in self.info:
            raise SafetensorsError(f"tensor {name} is in both {self.info[name][0]} and {path}")
          self.info[name] = (path, tuple(s.get_shape()), s.get_dtype())
    except (OSError, RuntimeError, ValueError) as e:
      if isinstance(e, SafetensorsError):
        raise
      raise SafetensorsError(f"{path}: not a readable safetensors file ({e})") from None

  def _check_index(self) -> None:
    path = os.path.join(self.folder, INDEX)
    if not os.path.isfile(path):
      return
    try:
      with open(path) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise SafetensorsError(f"{path}: not a readable index ({e!r})") from None
    for name, file in weight_map.items():
      where = self.info.get(name)
      if where is None or os.path.basename(where[0]) != file:
        raise SafetensorsError(f"{path}: tensor {name} should be in {file}, which "
                               f"{'does not hold it' if where else 'is missing'}")

  def names(self) -> set[str]:
    return set(self.info)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.info[name][1]

  def dtype(self, name: str) -> str:
    return self.info[name][2]

  def get(self, name: str) -> np.ndarray:
    """The tensor as a numpy array (its file is opened and closed again)."""
    path = self.info[name][0]
    try:
      with safe_open(path, framework="numpy") as f:
        return f.get_tensor(name)
    except (OSError, RuntimeError, ValueError) as e:
      raise SafetensorsError(f"{path}: cannot read tensor {name} ({e})") from None


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
  """Consecutive tensors grouped into shards of at most `max_shard_bytes`
  (a larger tensor gets a shard of its own)."""
  shards, current, used = [], [], 0
  for name, nbytes in sizes:
    if current and used + nbytes > max_shard_bytes:
      shards.append(current)
      current, used = [], 0
    current.append(name)
    used += nbytes
  if current:
    shards.append(current)
  return shards


def write(folder: str, tensors: list[tuple[str, tuple[int, ...], np.dtype]],
          load: Callable[[Iterable[str]], dict[str, np.ndarray]],
          max_shard_bytes: int) -> list[str]:
  """Writes `tensors` (name, shape, dtype) as shards + index into `folder`.

  `load(names)` returns the arrays of one shard; only one shard is in memory
  at a time. One shard is written as ``model.safetensors`` (no index).
  Returns the written file names.
  """
  sizes = [(n, math.prod(s) * np.dtype(d).itemsize) for n, s, d in tensors]
  shards = plan_shards(sizes, max_shard_bytes)
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map = {}
  for file, shard in zip(names, shards):
    arrays = load(shard)
    save_file({n: arrays[n] for n in shard}, os.path.join(folder, file),
              metadata={"format": "pt"})
    del arrays
    weight_map.update({n: file for n in shard})
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(s for _, s in sizes)}, "weight_map": weight_map}
    with open(os.path.join(folder, INDEX), "w") as f:
      json.dump(index, f, indent=2)
    names.append(INDEX)
  return names
