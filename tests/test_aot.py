"""The TPU and GPU compile checks (tests/aot) in the AOT environment.

They need libtpu and the CUDA plugin, which the main environment does not
have: `make test` builds `.venv-aot` (`make aot-env`) and this test runs
tests/aot there in one subprocess (DSMOE_AOT=1). Without that environment
the test is skipped with the command that makes it.
"""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

AOT_PYTHON = os.environ.get("DSMOE_AOT_PYTHON", str(ROOT / ".venv-aot" / "bin" / "python"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(AOT_PYTHON),
                    reason=f"no AOT environment at {AOT_PYTHON} (make aot-env)")
def test_tpu_and_gpu_compile_checks(tmp_path):
  env = {**os.environ, "DSMOE_AOT": "1", "PYTHONPATH": str(ROOT),
         "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1",
         "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1", "CUDA_VISIBLE_DEVICES": "-1"}
  res = subprocess.run([AOT_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "--junitxml", str(tmp_path / "aot.xml"), str(ROOT / "tests" / "aot")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  print(res.stdout[-4000:])
  assert res.returncode == 0, res.stdout[-8000:] + res.stderr[-3000:]
  assert " passed" in res.stdout.splitlines()[-1], res.stdout[-2000:]
