"""Lowering the Pallas MoE path for TPU and GPU on a CPU machine (jax.export).

The MoE block (router, shared experts, routed experts with
gmm_backend="pallas") at the DeepSeekMoE-16B expert shape (d_model 2048,
64 routed experts of hidden 1408, top-6, 2 shared experts, bfloat16, 16,384
tokens) is exported forward + backward for platforms ("tpu",) and ("cuda",)
from ShapeDtypeStructs: tracing and lowering only, nothing is allocated. The
export runs the Pallas -> Mosaic and Pallas -> Triton lowerings, which reject
illegal block shapes and unsupported operations that the interpreter accepts;
the Mosaic and Triton compilers themselves run only on the device. Also: the
kernel benchmark script runs where the GPU machine would run it.
"""

import contextlib
import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsmoe
from dsmoe.model import MoE
from tests.helpers import small_config

# Kernels of one forward+backward: 3 gmm forward (gate, up, down); backward
# d_lhs (gmm with rhs transposed) and d_rhs (tgmm) for each of the three.
EXPECTED = {"tpu": {"dsmoe_gmm_tpu": 6, "dsmoe_tgmm_tpu": 3},
            "cuda": {"dsmoe_gmm_gpu": 6, "dsmoe_tgmm_gpu": 3}}
CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def moe_16b_spec(backend: str):
  sizes = dict(num_routed_experts=64, num_shared_experts=2, top_k=6, expert_hidden=1408,
               gmm_backend=backend)
  cfg = small_config(**{"model.d_model": 2048, "model.num_heads": 16,
                        "model.dtype": "bfloat16"},
                     **{f"model.moe.{k}": v for k, v in sizes.items()})
  return dsmoe.resolve(cfg).model


def gpu_target():
  """An abstract H200 to lower Triton for without a GPU (needed from jax 0.11)."""
  if not hasattr(jax.sharding, "AbstractDevice"):
    return contextlib.nullcontext()
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None,
                                       platform="gpu")
  return jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((1,), ("data",), abstract_device=device))


def export_moe_fwd_bwd(platform: str, backend: str = "pallas", tokens: int = 16384):
  graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(moe_16b_spec(backend),
                                                         rngs=nnx.Rngs(0))))
  x = jax.ShapeDtypeStruct((tokens // 2048, 2048, 2048), jnp.bfloat16)

  def fwd_bwd(state, x_btd):
    def loss(state, x_btd):
      y, aux, _ = nnx.merge(graphdef, state)(x_btd, jnp.zeros(x_btd.shape[:2], jnp.int32))
      return jnp.mean(jnp.square(y.astype(jnp.float32))) + sum(aux.values())
    return jax.value_and_grad(loss, argnums=(0, 1))(state, x_btd)

  # The Triton call has no export-compatibility guarantee (it is compiled for
  # one GPU generation); the check is for serialising, not for lowering.
  unchecked = [jax.export.DisabledSafetyCheck.custom_call(CUSTOM_CALL["cuda"])]
  with gpu_target() if platform == "cuda" else contextlib.nullcontext():
    exported = jax.export.export(jax.jit(fwd_bwd), platforms=[platform],
                                 disabled_checks=unchecked)(state, x)
  return exported.mlir_module()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_moe_block_fwd_bwd_lowers_the_pallas_kernels(platform):
  text = export_moe_fwd_bwd(platform)
  names = re.findall(r'(?:kernel_)?name = "(dsmoe_t?gmm_\w+)"', text)
  assert {n: names.count(n) for n in set(names)} == EXPECTED[platform]
  assert len(re.findall(rf"custom_call @{re.escape(CUSTOM_CALL[platform])}\(", text)) == 9
  assert "ragged_dot" not in text


def test_xla_backend_exports_no_kernel():
  """The oracle of the test above can fail: without "pallas" no kernel appears."""
  text = export_moe_fwd_bwd("tpu", backend="ragged_dot", tokens=2048)
  assert "dsmoe_gmm" not in text and "tpu_custom_call" not in text


@pytest.mark.slow  # ~15 s of CPU: compiles every case in the Pallas interpreter
def test_bench_kernels_runs_without_config_and_data_libraries(tmp_path):
  """scripts/bench_kernels.py (run on a GPU machine that lacks ml_collections,
  grain and TFDS) at the tiny shape, with those libraries made unimportable."""
  root = pathlib.Path(__file__).resolve().parents[1]
  code = ("import runpy, sys\n"
          "for name in ('ml_collections', 'grain', 'tensorflow_datasets'):\n"
          "  sys.modules[name] = None\n"
          f"sys.argv = ['bench_kernels.py', '--shape', 'tiny', '--reps', '1', '--block', '16',"
          f" '--json', {str(tmp_path / 'k.json')!r}]\n"
          f"runpy.run_path({str(root / 'scripts' / 'bench_kernels.py')!r}, run_name='__main__')\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  rows = json.loads((tmp_path / "k.json").read_text())["rows"]
  assert {(r["op"], r["impl"]) for r in rows if r["part"] == "kernel"} == {
      (op, impl) for op in ("fwd", "d_lhs", "d_rhs") for impl in ("pallas", "ragged_dot", "dense")}
  assert len([r for r in rows if r["part"] == "layer"]) == 4
  assert all(np.isfinite(r["ms"]) for r in rows if "ms" in r), rows
  # The kernels agree with ragged_dot at the shape, and the sweep timed each tiling.
  checks = [r for r in rows if r["part"] == "check"]
  assert [r["op"] for r in checks] == ["fwd", "d_lhs", "d_rhs"] and all(r["ok"] for r in checks)
  assert [r["tm"] for r in rows if r["part"] == "sweep"] == [64, 128]
