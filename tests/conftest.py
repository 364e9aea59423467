"""Shared test helpers: the shipped configs and one small-config builder."""

import atexit
import os
import pathlib
import shutil
import tempfile

# One persistent XLA compilation cache for the whole test session, shared with
# the scripts the tests start (they inherit the variable): many tests train
# the same small model in a fresh process, and each would otherwise compile
# the same step again.
# Set before jax is imported; removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="dsmoe-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, True)

import pytest  # noqa: E402  (after the cache variable)

import dsmoe  # noqa: E402
from dsmoe import config as config_lib  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

# tests/multidevice needs 8 (fake CPU) devices, which must be set before jax
# starts: tests/test_parallel.py runs it in a subprocess with DSMOE_MULTIDEVICE=1.
collect_ignore = [] if os.environ.get("DSMOE_MULTIDEVICE") else ["multidevice"]

# configs/tiny.py's structure (dense layer 0, 2 shared + 30 routed experts,
# top-6) at dimensions that train in seconds.
SMALL = {"model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2,
         "model.dense_hidden": 64, "model.moe.fine_grained.ffn_hidden": 64,
         "data.seq_len": 32, "train.batch_size": 4, "train.warmup_steps": 5,
         "train.log_every": 1, "train.eval_batches": 1, "train.peak_flops": 1e9}


def load_config(name: str, arg=None):
  """A shipped config: configs/<name>.py -> get_config(arg)."""
  return dsmoe.load(name, arg)


def small_config(base: str = "tiny", **overrides):
  """`base` (configs/tiny.py) shrunk by SMALL, then `overrides`.

  Keys are dotted paths: ``small_config(**{"train.steps": 30})``. Setting any
  explicit MoE size (``model.moe.num_routed_experts`` ...) turns the paper's
  fine-grained form off, so all four sizes must then be given.
  """
  config = dsmoe.load(base)
  values = {**SMALL, **overrides}
  if any(k.startswith("model.moe.") and k.split(".")[-1] in config_lib.EXPLICIT_SIZES
         for k in overrides):
    values["model.moe.fine_grained.N"] = 0
  for key, value in values.items():
    node = config
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return config


@pytest.fixture
def tiny_config():
  return load_config("tiny")
