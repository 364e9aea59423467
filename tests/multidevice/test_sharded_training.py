"""Sharded training on 8 fake CPU devices: the state is born sharded by the
rules, one train step on a mesh equals the single-device step, the compiled
step never moves a whole expert weight tensor, and a checkpoint saved on one
mesh restores onto another with identical values.

Run by tests/test_parallel.py (XLA_FLAGS=--xla_force_host_platform_device_count=8).
"""

import re

import jax
import numpy as np
import pytest

from dsmoe.parallel import hlo, rules
from dsmoe.parallel import mesh as mesh_lib
from dsmoe import params_io
from dsmoe.train import checkpoint, optimizer, plan, step
from dsmoe.train import state as state_lib
from tests.helpers import small_spec
from tests.multidevice.helpers import make_mesh, mesh_id

E, D, F = 16, 24, 40  # distinctive sizes, easy to spot in HLO shapes


def config(**over):
  """The spec of a small config for expert parallelism on a mesh of the test's
  choice (mesh.expert=-1: sized by the mesh it runs on); all_to_all with room
  for every pair (capacity factor 8), so nothing is dropped."""
  values = {"model.d_model": D, "model.num_heads": 2, "model.num_layers": 3,
            "model.moe.num_routed_experts": E, "model.moe.num_shared_experts": 1,
            "model.moe.top_k": 3, "model.moe.expert_hidden": F, "model.moe.seq_aux": False,
            "data.seq_len": 16, "mesh.data": 1, "mesh.expert": -1,
            "train.batch_size": 16, "train.grad_accum_steps": 2, "train.warmup_steps": 1,
            **over}
  if values.get("model.moe.ep_exchange") == "all_to_all":
    values["model.moe.capacity_factor"] = 8.0
  return small_spec(**values)


def batch(spec, seed=0):
  rng = np.random.default_rng(seed)
  b, t = spec.train.batch_size, spec.data.seq_len
  tokens = rng.integers(0, spec.model.vocab_size, (b, t + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((b, t), np.int32),
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}


def test_state_is_born_sharded_by_the_rules():
  spec = config()
  mesh = make_mesh(fsdp=2, expert=4)
  tx = optimizer.make_optimizer(spec.train)
  _, state = step.init_sharded(spec, tx, mesh)
  _, want = step.init_state(spec, tx)
  w = state["params"]["blocks"][1]["ffn"]["w_gate_edf"]
  assert w.sharding.shard_shape(w.shape) == (E // 4, D // 2, F)
  mu = state["opt_state"][1][0].mu["blocks"][1]["ffn"]["w_down_efd"]
  assert mu.sharding.shard_shape(mu.shape) == (E // 4, F, D // 2)
  q = state["params"]["blocks"][0]["attn"]["w_q_dnh"]
  assert q.sharding.shard_shape(q.shape)[0] == D // 2
  for (path, got), ref in zip(jax.tree_util.tree_leaves_with_path(state),
                              jax.tree.leaves(want)):  # the same random draws
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-9,
                               err_msg=jax.tree_util.keystr(path))


def _one_step(spec, mesh=None):
  tx = optimizer.make_optimizer(spec.train)
  graphdef, state = step.init_state(spec, tx)
  data = batch(spec)
  if mesh is not None:
    state = jax.device_put(state, rules.tree_shardings(state, mesh))
    data = mesh_lib.global_batch(data, mesh)
  new, metrics = step.jit_train_step(spec, graphdef, tx, mesh)(state, data)
  return jax.device_get(new), jax.device_get(metrics)


@pytest.mark.parametrize("axes,over", [
    (dict(fsdp=2, expert=4), {"model.moe.ep_exchange": "all_to_all"}),
    (dict(data=4, expert=2), {"model.moe.ep_exchange": "allgather"}),
    (dict(data=2, expert=4), {"model.scan_layers": True, "model.remat": "save_moe_exchange",
                              "model.moe.ep_exchange": "all_to_all"}),
], ids=lambda v: mesh_id(v) if "expert" in v else "-".join(f"{k}={x}" for k, x in v.items()))
def test_train_step_on_a_mesh_equals_one_device(axes, over):
  spec = config(**over)
  want_state, want = _one_step(spec)
  got_state, got = _one_step(spec, make_mesh(**axes))
  for k in ("loss", "grad_norm", "aux/expert_balance"):
    np.testing.assert_allclose(got[k], want[k], rtol=2e-5, err_msg=k)
  np.testing.assert_array_equal(got["tokens_per_expert"], want["tokens_per_expert"])
  assert int(got_state["step"]) == 1
  # Adam's first update is about lr * sign(g) (3e-3 here): atol 1e-5 allows the
  # round-off of gradients near 0, not a wrong update; grad_norm above checks scale.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want_state["params"]),
                          jax.tree.leaves(got_state["params"])):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def _shapes(hlo_type: str):
  return {tuple(int(d) for d in dims.split(",") if d)
          for dims in re.findall(r"\[([0-9,]*)\]", hlo_type)}


@pytest.mark.parametrize("exchange", ["all_to_all", "allgather"])
def test_compiled_step_moves_no_whole_expert_weight(exchange):
  """(fsdp=2, expert=4): expert weights move only as the local [E/4, ...]
  slices (the fsdp all-gather and the gradient's reduce-scatter), never as
  the whole [E, D, F] tensor."""
  spec = config(**{"mesh.data": 1, "mesh.fsdp": 2, "mesh.expert": 4,
                   "model.moe.ep_exchange": exchange})
  colls = hlo.collectives(plan.compile_train_step(spec, make_mesh(fsdp=2, expert=4)).as_text())
  shapes = set().union(*(_shapes(c.shape) for c in colls))
  whole = {(E, D, F), (E, F, D), (E, D // 2, F), (E, F, D // 2)}
  assert not shapes & whole, sorted(shapes & whole)
  local = {(E // 4, D, F), (E // 4, F, D)}
  assert {c.op for c in colls if _shapes(c.shape) & local} >= {"all-gather"}
  assert {c.op for c in colls if _shapes(c.shape) & {(E // 4, D // 2, F), (E // 4, F, D // 2)}}
  exchange_op = "all-to-all" if exchange == "all_to_all" else "reduce-scatter"
  assert any(c.op == exchange_op and "shard_map" in c.source for c in colls)


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  """Saved from expert=8, restored onto data=2 x expert=4: identical values,
  the target mesh's shardings."""
  spec = config(**{"mesh.data": 1, "mesh.expert": 8})
  tx = optimizer.make_optimizer(spec.train)
  src = make_mesh(expert=8)
  ckpts = checkpoint.Checkpoints(str(tmp_path))
  graphdef, state, _ = state_lib.init_or_restore(spec, tx, ckpts, src, None)
  state, _ = step.jit_train_step(spec, graphdef, tx, src)(state, mesh_lib.global_batch(
      batch(spec), src))
  ckpts.save(1, state, {"step": 0})
  ckpts.wait()
  saved = jax.device_get(state)
  dst = make_mesh(data=2, expert=4)
  spec2 = config(**{"mesh.data": 2, "mesh.expert": 4})
  _, restored, _ = state_lib.init_or_restore(spec2, tx, ckpts, dst, None)
  ckpts.close()
  w = restored["params"]["blocks"][1]["ffn"]["w_up_edf"]
  assert w.sharding.mesh.shape == dst.shape
  assert w.sharding.shard_shape(w.shape) == (E // 4, D, F)
  assert int(restored["step"]) == 1
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(saved),
                          jax.tree.leaves(jax.device_get(restored))):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a),
                                  err_msg=jax.tree_util.keystr(path))


def test_init_from_params_land_in_the_meshs_shardings(tmp_path):
  """train.init_from (a params-only checkpoint, e.g. a converted release) on
  fsdp=2 x expert=4: the params equal the saved ones, already split by the
  rules (each device holds E/4 experts, half of d_model), Adam moments zero."""
  spec = config(**{"mesh.data": 1, "mesh.fsdp": 2, "mesh.expert": 4})
  tx = optimizer.make_optimizer(spec.train)
  rng = np.random.default_rng(5)
  _, shapes = step.abstract_state(spec, tx)
  saved = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes["params"])
  params_io.save_streaming(str(tmp_path / "params"), jax.tree.map(
      lambda a: params_io.LazyArray(a.shape, a.dtype, lambda a=a: a), saved))
  spec = config(**{"mesh.data": 1, "mesh.fsdp": 2, "mesh.expert": 4,
                   "train.init_from": str(tmp_path / "params")})
  mesh = make_mesh(fsdp=2, expert=4)
  ckpts = checkpoint.Checkpoints(str(tmp_path / "run"))
  _, state, _ = state_lib.init_or_restore(spec, tx, ckpts, mesh, None)
  ckpts.close()
  w = state["params"]["blocks"][1]["ffn"]["w_up_edf"]
  assert w.sharding.mesh.shape == mesh.shape
  assert w.sharding.shard_shape(w.shape) == (E // 4, D // 2, F)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(saved),
                          jax.tree.leaves(jax.device_get(state["params"]))):
    np.testing.assert_array_equal(np.asarray(b), a, err_msg=jax.tree_util.keystr(path))
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
  assert moments and all(not np.any(np.asarray(x)) for x in moments)
