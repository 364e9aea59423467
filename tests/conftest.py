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
# Every program goes into that cache, not only those that took over a second
# to compile: tests build the same small programs again from new closures (the
# same reference, the same small model), which jit's in-memory cache misses.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The programs the tests compile are small and most run a few times: LLVM's
# optimisation passes would cost more compile time than they save (`pytest -q
# tests` on 2 idle cores: 1109 s with them, 1019 s without). The same XLA operations run, so
# what the tests check does not change; training outside the tests keeps
# the default. The TPU and GPU compile checks (tests/aot) run without it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if not os.environ.get("DSMOE_AOT") and TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

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


# Subprocess suites (the 8-device suite, the TPU/GPU compile checks) start
# as soon as the tests are collected and run beside the tests in this
# process, which leave a core idle for about a third of the time; their
# test, run last, waits for the result. A test opts in with
# ``@pytest.mark.early(start=fn)``: `fn()` returns a helpers.EarlyRun.
_EARLY: dict = {}


def pytest_configure(config):
  config.addinivalue_line("markers", "early(start): start=fn starts this test's subprocess "
                          "when the session starts (tests/conftest.py)")


def pytest_collection_modifyitems(items):
  """The tests that wait for an early subprocess run last, so it overlaps
  the whole rest of the session (a stable sort: the rest keeps its order)."""
  items.sort(key=lambda item: item.get_closest_marker("early") is not None)


def pytest_collection_finish(session):
  if session.config.option.collectonly:
    return
  for item in session.items:
    marker = item.get_closest_marker("early")
    skipped = any(m.args and m.args[0] for m in item.iter_markers("skipif"))
    if marker is not None and not skipped:
      _EARLY[item.nodeid] = marker.kwargs["start"]()


@pytest.fixture
def early_run(request):
  """The helpers.EarlyRun this test's ``early`` marker started (or starts now)."""
  run = _EARLY.pop(request.node.nodeid, None)
  if run is None:
    run = request.node.get_closest_marker("early").kwargs["start"]()
  yield run
  run.kill()


def pytest_sessionfinish(session):
  for run in _EARLY.values():  # selected but not run (-x, a failure before them)
    run.kill()
