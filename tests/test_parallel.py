"""dsmoe.parallel in this (one-device) process: sharding rules, mesh sizes, the
HLO collective reader; and the 8-device suite (tests/multidevice) and
scripts/aot_compile.py --target=cpu in subprocesses with fake CPU devices."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from tests.helpers import ROOT, EarlyRun, script_env
from dsmoe.parallel import hlo, rules
from dsmoe.parallel.mesh import axis_sizes

SIZES = {"data": 2, "fsdp": 2, "expert": 4}


@pytest.mark.parametrize("name,shape,want", [
    ("w_gate_edf", (16, 64, 32), P("expert", "fsdp")),
    ("w_down_efd", (16, 32, 64), P("expert", None, "fsdp")),
    ("w_up_edf", (3, 16, 64, 32), P(None, "expert", "fsdp")),  # stacked layer axis
    ("w_q_dnh", (64, 4, 16), P("fsdp")),
    ("w_o_nhd", (4, 16, 64), P(None, None, "fsdp")),
    ("table_vd", (501, 64), P()),  # 501 rows do not split over fsdp=2
    ("scale_d", (64,), P()),
    ("count", (), P()),  # optimizer counters
    ("something_new", (64, 64), P()),
])
def test_sharding_rules(name, shape, want):
  assert rules.spec_for(name, shape, SIZES) == want


def test_axes_of_size_one_are_left_out():
  assert rules.spec_for("w_gate_edf", (16, 64, 32), {"data": 8, "fsdp": 1, "expert": 1}) == P()


def test_optimizer_moments_follow_their_parameters():
  params = {"ffn": {"w_gate_edf": jnp.zeros((16, 64, 32))}, "norm": {"scale_d": jnp.zeros(64)}}
  state = jax.eval_shape(optax.adamw(1e-3).init, params)

  class Mesh:  # only its axis sizes are read
    shape = SIZES
  specs = rules.tree_specs(state, Mesh)
  mu = specs[0].mu
  assert mu["ffn"]["w_gate_edf"] == P("expert", "fsdp") and mu["norm"]["scale_d"] == P()
  assert specs[0].count == P()


@pytest.mark.parametrize("cfg,n,want", [
    (dict(data=-1, fsdp=2, expert=4), 16, {"data": 2, "fsdp": 2, "expert": 4}),
    (dict(data=1, fsdp=1, expert=-1), 8, {"data": 1, "fsdp": 1, "expert": 8}),
    (dict(data=2, fsdp=1, expert=4), 8, {"data": 2, "fsdp": 1, "expert": 4}),
])
def test_mesh_axis_sizes(cfg, n, want):
  assert axis_sizes(ml_collections.ConfigDict(cfg), n) == want


@pytest.mark.parametrize("cfg,n,msg", [
    (dict(data=2, fsdp=1, expert=4), 16, "there are 16 devices"),
    (dict(data=-1, fsdp=3, expert=1), 8, "8 devices do not split"),
])
def test_mesh_that_does_not_fit_is_one_error(cfg, n, msg):
  with pytest.raises(ValueError, match=msg):
    axis_sizes(ml_collections.ConfigDict(cfg), n)


HLO = """HloModule test

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]{1,0}) parameter(0)
  %x = f32[8,4]{1,0} get-tuple-element(%p), index=1
  %ag = f32[32,4]{1,0} all-gather(%x), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, metadata={op_name="jit(f)/all_gather"}
  %rs = f32[2,4]{1,0} reduce-scatter(%x), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  %one = f32[8,4]{1,0} all-reduce(%x), channel_id=3, replica_groups={{0},{1}}, to_apply=%add
  ROOT %t = (s32[], f32[8,4]{1,0}) tuple(%i, %x)
}

%cond (p: (s32[], f32[8,4])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[8,4]) -> f32[8,4] {
  %a = f32[8,4]{1,0} parameter(0)
  %w = (s32[], f32[8,4]{1,0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"27"}}
  %a2a = bf16[16,2]{1,0} all-to-all(%b), channel_id=4, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}
  ROOT %r = f32[8,4]{1,0} copy(%a)
}
"""


def test_hlo_collectives_with_loop_counts_bytes_and_groups():
  got = {c.op: c for c in hlo.collectives(HLO)}
  assert set(got) == {"all-gather", "reduce-scatter", "all-to-all"}  # all-reduce: group 1
  ag, rs, a2a = got["all-gather"], got["reduce-scatter"], got["all-to-all"]
  assert (ag.bytes, ag.group_size, ag.count, ag.exact_count) == (32 * 4 * 4, 4, 27, True)
  assert (rs.bytes, rs.group_size, rs.count) == (8 * 4 * 4, 4, 27)  # the operand
  assert (a2a.bytes, a2a.group_size, a2a.count) == (16 * 2 * 2, 4, 1)
  assert ag.source == "jit(f)/all_gather"
  assert hlo.summary(list(got.values()))["all-gather"] == {"count": 27, "bytes": 27 * 512}


def start_multidevice_suite():
  return EarlyRun([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   str(ROOT / "tests" / "multidevice")], cwd=ROOT,
                  env=script_env(8, DSMOE_MULTIDEVICE="1"))


@pytest.mark.slow
@pytest.mark.early(start=start_multidevice_suite)
def test_multidevice_suite(early_run):
  """tests/multidevice in one process with 8 fake CPU devices (started with
  the session: the ``early`` marker, tests/conftest.py)."""
  res = early_run.result(timeout=1500)
  print(res.stdout[-3000:])
  assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]


@pytest.mark.slow
def test_cpu_target_plan(tmp_path):
  """The cpu target's plan of tiny on fsdp=2 x expert=3 (6 fake devices):
  the compiled step's arguments hold this device's share of the state (as
  the rules count it), and the all_to_all exchange appears with its loop
  counts."""
  out = tmp_path / "plan.json"
  res = subprocess.run(
      [sys.executable, str(ROOT / "scripts" / "aot_compile.py"), "--config=configs/tiny.py",
       "--target=cpu", "--mesh=fsdp=2,expert=3", "--config.train.batch_size=12",
       "--config.model.num_layers=2", "--config.model.moe.ep_exchange=all_to_all",
       "--noestimate", f"--json={out}"],
      cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "memory per chip" in res.stdout and "unknown for this target" in res.stdout
  assert "estimated step time: none (not asked for)" in res.stdout
  plan = json.loads(out.read_text())
  assert plan["mesh"] == {"data": 1, "fsdp": 2, "expert": 3} and plan["devices"] == 6
  assert plan["fits"] is None and plan["collectives_exact"]
  state = plan["state"]["params"] + plan["state"]["opt_state"]
  batch = 4 * 12 * 128 * 4 // 6  # four int32 [12, 128] arrays split over 6 devices
  assert state <= plan["memory"]["arguments"] <= state + batch + 1024
  a2a = [c for c in plan["largest_collectives"] if c["op"] == "all-to-all"]
  assert a2a and all(c["group_size"] == 3 for c in a2a)
  assert plan["collectives"]["all-to-all"]["count"] >= 4  # 2 per MoE layer, forward and back


def test_aot_script_rejects_a_bad_mesh_flag():
  res = subprocess.run([sys.executable, str(ROOT / "scripts" / "aot_compile.py"),
                        "--config=configs/tiny.py", "--target=cpu", "--mesh=model=4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert res.returncode == 1
  assert res.stderr.strip().splitlines()[-1].startswith("error: --mesh='model=4' is invalid")


def _np_local_moe(x, idx, weight, w, first, num_local):
  """sum over the pairs whose expert is in [first, first + num_local) of
  gate * SwiGLU_expert(x), written out in numpy."""
  out = np.zeros(x.shape, np.float64)
  for t in range(x.shape[0]):
    for k in range(idx.shape[1]):
      e = int(idx[t, k])
      if first <= e < first + num_local:
        g, u = x[t] @ w[0][e], x[t] @ w[1][e]
        out[t] += weight[t, k] * ((g / (1 + np.exp(-g)) * u) @ w[2][e])
  return out


@pytest.mark.parametrize("grouped_impl", ["loop", "kernel", "batched", "ragged_dot", "pallas"])
def test_local_dispatch_runs_only_this_devices_experts(grouped_impl):
  """Experts 4..7 of 12 are local: pairs of other experts add nothing and
  their gates get no gradient; local ones match numpy, gradients included."""
  from dsmoe.dispatch import ExpertWeights
  from dsmoe.parallel.local import local_dispatch
  from dsmoe.spec import ExpertPlan
  plan = ExpertPlan(dispatch="dropless", grouped=grouped_impl, block_size=16,
                    capacity_factor=1.25, eval_capacity_factor=0.0, drop_policy="position",
                    ep_exchange="allgather", platform="cpu")
  rng = np.random.default_rng(0)
  t, k, d, f, e, first, num_local = 24, 3, 8, 16, 12, 4, 4
  x = rng.normal(size=(t, d)).astype(np.float32)
  idx = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
  weight = rng.uniform(0.1, 1, (t, k)).astype(np.float32)
  w = [rng.normal(size=s).astype(np.float32) * 0.3 for s in [(e, d, f), (e, d, f), (e, f, d)]]
  local = ExpertWeights(*(jnp.asarray(a[first:first + num_local]) for a in w))

  def run(x, weight):
    return local_dispatch(x, jnp.asarray(idx), weight, local, plan, first_expert=first)

  y = jax.jit(run)(jnp.asarray(x), jnp.asarray(weight))
  np.testing.assert_allclose(y, _np_local_moe(x, idx, weight, w, first, num_local),
                             rtol=1e-4, atol=1e-5)
  dy = rng.normal(size=(t, d)).astype(np.float32)
  dgate = jax.grad(lambda g: jnp.sum(run(jnp.asarray(x), g) * dy))(jnp.asarray(weight))
  here = (idx >= first) & (idx < first + num_local)
  assert np.all(np.asarray(dgate)[~here] == 0) and np.any(np.asarray(dgate)[here] != 0)
  want = [[np.dot(_np_local_moe(x[i:i + 1], idx[i:i + 1, j:j + 1], np.ones((1, 1)), w, first,
                                num_local)[0], dy[i]) for j in range(k)] for i in range(t)]
  np.testing.assert_allclose(dgate, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"model.scan_layers": True},
                                       {"model.moe.router": "hash", "model.moe.top_k": 1,
                                        "model.moe.fine_grained.N": 0,
                                        "model.moe.num_routed_experts": 4,
                                        "model.moe.num_shared_experts": 0,
                                        "model.moe.expert_hidden": 16}])
def test_every_parameter_has_a_sharding_rule(overrides):
  """A parameter whose name has no rule would be silently replicated."""
  import dsmoe
  from flax import nnx
  from dsmoe.model import Transformer
  from tests.helpers import small_config
  spec = dsmoe.resolve(small_config(**overrides)).model
  params = nnx.state(nnx.eval_shape(lambda: Transformer(spec, rngs=nnx.Rngs(0))), nnx.Param)
  names = {rules._name(path) for path, _ in  # pylint: disable=protected-access
           jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params))}
  assert names and names <= set(rules.RULES), sorted(names - set(rules.RULES))
