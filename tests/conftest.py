"""Session set-up and the shared fixtures; plain helpers are in tests/helpers.py."""

import atexit
import os
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

import jax  # noqa: E402  (after the cache variable)
import pytest  # noqa: E402

from tests.helpers import load_config  # noqa: E402

# tests/multidevice needs 8 (fake CPU) devices, which must be set before jax
# starts: tests/test_parallel.py runs it in a subprocess with DSMOE_MULTIDEVICE=1.
collect_ignore = [] if os.environ.get("DSMOE_MULTIDEVICE") else ["multidevice"]
# tests/aot needs the TPU compiler and the CUDA plugin (the AOT environment,
# `make aot-env`): tests/test_aot.py runs it there with DSMOE_AOT=1.
if not os.environ.get("DSMOE_AOT"):
  collect_ignore.append("aot")


@pytest.fixture
def tiny_config():
  return load_config("tiny")


@pytest.fixture
def full_precision_matmuls():
  """float32 matmuls in full precision (GPUs default to TF32 otherwise); a
  module applies it to every test with
  ``pytestmark = pytest.mark.usefixtures("full_precision_matmuls")``."""
  with jax.default_matmul_precision("highest"):
    yield
