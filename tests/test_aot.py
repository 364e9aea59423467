"""The TPU and GPU compile checks (tests/aot) in the AOT environment.

They need libtpu and the CUDA plugin, which the main environment does not
have: `make test` builds `.venv-aot` (`make aot-env`) and this test runs
tests/aot there in one subprocess (DSMOE_AOT=1). Without that environment
the test is skipped with the command that makes it. The subprocess starts
with the session (the ``early`` marker, tests/conftest.py).
"""

import os

import pytest

from tests.helpers import ROOT, EarlyRun

AOT_PYTHON = os.environ.get("DSMOE_AOT_PYTHON", str(ROOT / ".venv-aot" / "bin" / "python"))


def start_compile_checks():
  """pytest on tests/aot in the AOT environment (DSMOE_AOT=1)."""
  # Without the CPU suite's XLA flags (conftest.py): they would slow the GPU compiles.
  xla_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                       if not f.startswith("--xla_backend_optimization_level"))
  env = {**os.environ, "XLA_FLAGS": xla_flags, "DSMOE_AOT": "1", "PYTHONPATH": str(ROOT),
         "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1",
         "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1", "CUDA_VISIBLE_DEVICES": "-1"}
  return EarlyRun([AOT_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   str(ROOT / "tests" / "aot")], cwd=ROOT, env=env)


@pytest.mark.slow
@pytest.mark.early(start=start_compile_checks)
@pytest.mark.skipif(not os.path.exists(AOT_PYTHON),
                    reason=f"no AOT environment at {AOT_PYTHON} (make aot-env)")
def test_tpu_and_gpu_compile_checks(early_run):
  res = early_run.result(timeout=1800)
  print(res.stdout[-4000:])
  assert res.returncode == 0, res.stdout[-8000:] + res.stderr[-3000:]
  assert " passed" in res.stdout.splitlines()[-1], res.stdout[-2000:]
