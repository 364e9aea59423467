"""The real TPU and GPU compilers, on this CPU machine: every Pallas kernel and
the tiny model's train step compile for TPU (Mosaic) and GPU (Triton, ptxas).

Run by tests/test_aot.py inside the AOT environment (`make aot-env`:
libtpu and the CUDA plugin; DSMOE_AOT=1). `jax.export` only lowers; these
compile, so a tile the hardware cannot hold fails here, not on a pod (the
negative controls below show the check bites).
"""

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsmoe
from dsmoe import aot
from pallas_kernels import gmm as gmm_lib
from pallas_kernels.gmm import tiling as tiling_lib
from tests.helpers import ROOT, EarlyRun

TPUS = ["tpu:v5e-4", "tpu:v5p-8"]  # two generations (Mosaic)
GPUS = ["cuda:h100x1", "cuda:a100x1"]  # sm90 and sm80 (Triton)
M16B = (98_304, 2048, 1408, 64)  # DeepSeekMoE-16B experts: rows, d_model, hidden, groups
EDGES = [(1000, 200, 300, 7), (96, 136, 72, 3)]  # m, k, n not tile multiples


@functools.cache
def device(name):
  tgt = aot.target(name)
  return tgt, tgt.devices[0]


def compile_for(name, fn, *shapes):
  """fn compiled for one device of target `name` (its kernels tiled for it)."""
  tgt, dev = device(name)
  sharding = jax.sharding.SingleDeviceSharding(dev)
  args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
  with aot.kernel_context(tgt):
    return jax.jit(fn).lower(*args).compile()


def gmm_value_and_grads(*, tiling=None, transpose_rhs=False, group_offset=0, local=None):
  def fn(lhs, rhs, sizes):
    def loss(lhs, rhs):
      out = gmm_lib.gmm(lhs, rhs, sizes, tiling=tiling, transpose_rhs=transpose_rhs,
                        group_offset=group_offset, num_local_groups=local)
      return jnp.sum(out.astype(jnp.float32) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1))(lhs, rhs)  # gmm, gmm^T, tgmm
  return fn


def kernel_calls(compiled):
  return sum(aot.custom_calls(compiled.as_text()).get(k, 0) for k in aot.KERNEL_CALLS)


@pytest.mark.parametrize("name", TPUS + GPUS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gmm_forward_and_backward_compile_at_the_16b_shape(name, dtype):
  if dtype == "float32" and name != TPUS[1] and name != GPUS[0]:
    pytest.skip("float32 at this shape: one TPU and one GPU (each compile takes a while)")
  m, k, n, g = M16B
  dt = jnp.dtype(dtype)
  compiled = compile_for(name, gmm_value_and_grads(), ((m, k), dt), ((g, k, n), dt),
                         ((g,), jnp.int32))
  assert kernel_calls(compiled) == 3  # forward gmm, d_lhs gmm (rhs transposed), d_rhs tgmm


@pytest.mark.parametrize("name", TPUS + GPUS)
@pytest.mark.parametrize("m,k,n,g", EDGES)
def test_gmm_compiles_at_edge_shapes(name, m, k, n, g):
  compiled = compile_for(name, gmm_value_and_grads(), ((m, k), jnp.bfloat16),
                         ((g, k, n), jnp.bfloat16), ((g,), jnp.int32))
  assert kernel_calls(compiled) == 3


@pytest.mark.parametrize("name", TPUS + GPUS)
def test_transposed_rhs_and_local_groups_compile(name):
  """transpose_rhs and an expert-parallel shard's groups (a traced group
  offset, 4 local groups of 16)."""
  m, k, n, g, local = 512, 256, 384, 16, 4
  fn = lambda lhs, rhs, sizes, off: gmm_value_and_grads(  # noqa: E731
      transpose_rhs=True, group_offset=off, local=local)(lhs, rhs, sizes)
  compiled = compile_for(name, fn, ((m, k), jnp.bfloat16), ((local, n, k), jnp.bfloat16),
                         ((g,), jnp.int32), ((), jnp.int32))
  assert kernel_calls(compiled) == 3


@pytest.mark.parametrize("name", TPUS + GPUS)
def test_tgmm_alone_compiles(name):
  m, k, n, g = 1024, 256, 128, 8
  fn = lambda lhs, dout, sizes: gmm_lib.tgmm(lhs, dout, sizes)  # noqa: E731
  compiled = compile_for(name, fn, ((m, k), jnp.bfloat16), ((m, n), jnp.bfloat16),
                         ((g,), jnp.int32))
  assert kernel_calls(compiled) == 1


# Negative controls: tiles that lower (jax.export accepts them) but that the
# chip cannot hold, so only the real compiler refuses them.
TOO_BIG = {"tpu": gmm_lib.Tiling(tm=2048, tk=2048, tn=2048),  # ~73 MiB > a v5p core's VMEM
           "gpu": gmm_lib.Tiling(tm=256, tk=256, tn=256, num_stages=4)}  # > shared memory


@pytest.mark.parametrize("name", [TPUS[1], GPUS[0]])
def test_tiles_the_chip_cannot_hold_fail_to_compile_but_lower(name):
  tgt, _ = device(name)
  fn = lambda lhs, rhs, sizes: gmm_lib.gmm(lhs, rhs, sizes,  # noqa: E731
                                           tiling=TOO_BIG[tgt.platform])
  shapes = [((4096, 2048), jnp.bfloat16), ((4, 2048, 2048), jnp.bfloat16), ((4,), jnp.int32)]
  checks = [jax.export.DisabledSafetyCheck.custom_call(k) for k in aot.KERNEL_CALLS]
  platform = "tpu" if tgt.platform == "tpu" else "cuda"
  exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(
      *[jax.ShapeDtypeStruct(s, d) for s, d in shapes])
  assert exported.mlir_module()  # lowering accepts it
  with pytest.raises(Exception, match="(?i)vmem|shared memory|resource|smem|out of"):
    compile_for(name, fn, *shapes)


def tiny(**moe):
  c = dsmoe.load("tiny")
  c.model.dtype, c.model.num_layers = "bfloat16", 2
  c.model.moe.update(moe)
  return c


@pytest.mark.parametrize("name", ["tpu:v5e-1", "cuda:h100x1"])
def test_tiny_train_step_with_the_pallas_kernels_compiles(name):
  plan = aot.plan(tiny(gmm_backend="pallas"), name, mesh={"data": 1}, estimate=False)
  assert plan["compiled"] and plan["fits"]
  assert plan["plan"]["grouped"] == "pallas"
  assert sum(plan["kernels"].values()) == 9  # 1 MoE layer: 3 gmm forward, 6 backward
  if name.startswith("cuda"):  # XLA:GPU's deviceless compile has no cost analysis
    assert plan["cost_estimate"] == {"flops": 0.0, "bytes": 0.0}


@pytest.mark.parametrize("name,exchange", [("cuda:h100x8", "ragged_all_to_all"),
                                           ("tpu:v5e-8", "all_to_all")])
def test_tiny_train_step_with_expert_parallelism_compiles(name, exchange):
  """8 chips, expert=2 x data=4, the Pallas kernels on each device's experts."""
  moe = {"ep_exchange": exchange, "gmm_backend": "pallas"}
  if exchange == "all_to_all":
    moe["capacity_factor"] = 2.0
  plan = aot.plan(tiny(**moe), name, mesh={"data": 4, "expert": 2}, estimate=False)
  assert plan["compiled"] and plan["fits"]
  assert sum(plan["kernels"].values()) == 9
  op = "ragged-all-to-all" if exchange == "ragged_all_to_all" else "all-to-all"
  assert plan["collectives"].get(op, {}).get("count", 0) > 0, plan["collectives"]


@pytest.mark.parametrize("name", ["tpu:v5e-1", "cuda:h100x1"])
def test_tiny_decode_step_with_the_pallas_kernels_compiles(name):
  """dsmoe.generate's program: the prefill and the decode loop's body each
  run the MoE layer forward (3 gmm calls each)."""
  decode = {"batch": 4, "prompt_len": 20, "max_new_tokens": 24}
  plan = aot.plan(tiny(gmm_backend="pallas"), name, mesh={"data": 1}, step="decode",
                  decode=decode)
  assert plan["compiled"] and plan["fits"] and plan["step"] == "decode"
  assert plan["decode"] == decode
  assert sum(plan["kernels"].values()) == 6
  params = dsmoe.count_params(tiny())["total"]
  assert plan["memory"]["arguments"] >= 4 * params  # float32 parameters, replicated on 1 chip


def test_auto_choices_follow_the_target_not_the_host():
  """Resolved for a TPU slice on this CPU host, "auto" is ragged_dot and
  ragged_all_to_all (what the pod runs), not the CPU loop and allgather."""
  plan = aot.plan(tiny(), "tpu:v5e-8", mesh={"data": 4, "expert": 2}, estimate=False)
  assert plan["plan"] == {"grouped": "ragged_dot", "ep_exchange": "ragged_all_to_all"}
  assert plan["collectives"].get("ragged-all-to-all", {}).get("count", 0) > 0
  assert plan["fits"]


def test_a_tiling_for_one_platform_does_not_break_the_other():
  """tm=24 suits Mosaic (a multiple of 8) but not Triton (powers of two):
  kernel="auto" compiles for TPU, and refuses only when lowered for a GPU."""
  fn = gmm_value_and_grads(tiling=gmm_lib.Tiling(tm=24))
  shapes = [((480, 256), jnp.bfloat16), ((4, 256, 256), jnp.bfloat16), ((4,), jnp.int32)]
  assert kernel_calls(compile_for(TPUS[0], fn, *shapes)) == 3
  with pytest.raises(tiling_lib.TileError, match="powers of two"):
    compile_for(GPUS[0], fn, *shapes)


# tiny's structure at the test dimensions (tests/helpers.py SMALL), in bf16:
# the plan and its estimate (five TPU compiles) take seconds, not minutes.
SMALL_PLAN = ["--config=configs/tiny.py", "--target=tpu:v5e-1", "--mesh=data=1",
              "--config.model.num_layers=2", "--config.model.dtype=bfloat16",
              "--config.model.d_model=32", "--config.model.num_heads=2",
              "--config.model.dense_hidden=64", "--config.model.moe.fine_grained.ffn_hidden=64",
              "--config.data.seq_len=32", "--config.train.batch_size=4"]
SCRIPT_RUNS = {  # name: flags of scripts/aot_compile.py
    "fits": SMALL_PLAN + ["--json={tmp}/plan.json"],
    "too_big": SMALL_PLAN + ["--config.train.batch_size=4096", "--config.data.seq_len=1024"],
    "bad_target": ["--config=configs/tiny.py", "--target=tpu:v9-8"],
}


@pytest.fixture(scope="module", autouse=True)
def script_runs(request, tmp_path_factory):
  """The script runs of the last test, started with the module so that their
  compiles overlap the ones in this process: {name: (EarlyRun, tmp folder)}."""
  wanted = any(item.name == "test_script_reports_a_plan_and_refuses_one_that_does_not_fit"
               for item in request.session.items)
  runs = {}
  for name, flags in SCRIPT_RUNS.items() if wanted else ():
    tmp = tmp_path_factory.mktemp(name)
    cmd = [sys.executable, str(ROOT / "scripts" / "aot_compile.py"),
           *(f.format(tmp=tmp) for f in flags)]
    runs[name] = (EarlyRun(cmd, cwd=ROOT), tmp)
  yield runs
  for run, _ in runs.values():
    run.kill()


def finished(run):
  early, tmp = run
  res = early.result(timeout=900)
  return res.returncode, res.stdout, res.stderr, tmp


def test_script_reports_a_plan_and_refuses_one_that_does_not_fit(script_runs):
  """The tool prints the TPU compiler's plan (and --json); a plan larger than
  the chip's HBM is one error line naming the peak and the HBM, exit 1."""
  rc, stdout, stderr, tmp = finished(script_runs["fits"])
  assert rc == 0, stderr[-3000:]
  assert "memory per chip" in stdout and "fits" in stdout
  plan = json.loads((tmp / "plan.json").read_text())
  assert plan["fits"] and plan["target"] == "tpu:v5e-1" and plan["memory"]["peak"] > 0
  # The estimate from the TPU compiler's counts (tests/test_estimate.py checks
  # the probes on CPU): a positive time, an MFU a tiny model cannot exceed.
  assert plan["estimated_step_s"] > 0 and 0 < plan["estimated_mfu"] < 1, plan["estimate"]
  assert "estimated step time" in stdout and "MFU" in stdout
  rc, stdout, stderr, _ = finished(script_runs["too_big"])
  assert rc == 1, stdout[-2000:] + stderr[-2000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("error: the plan does not fit: peak ") and "HBM of TPU v5 lite" in last
  rc, _, stderr, _ = finished(script_runs["bad_target"])
  assert rc == 1 and stderr.strip().splitlines()[-1].startswith("error: target 'tpu:v9-8'")
