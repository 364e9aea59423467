"""Expert parallelism on 8 fake CPU devices: every token exchange equals the
single-device MoE (outputs, aux losses, statistics, gradients) when nothing
is dropped; the all_to_all capacity drops exactly the pairs a numpy oracle
drops; ragged_all_to_all is one clear error on CPU.

Run by tests/test_parallel.py (XLA_FLAGS=--xla_force_host_platform_device_count=8).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsmoe.dispatch import ExpertWeights
from dsmoe.model import MoE
from dsmoe.parallel import expert as expert_lib
from dsmoe.parallel import mesh as mesh_lib
from tests.helpers import np_swiglu, small_moe_spec
from tests.multidevice.helpers import MESHES, emulated_ragged_all_to_all, make_mesh, mesh_id, put

E, K, D = 16, 3, 16


def moe_spec(expert: int, exchange: str, capacity_factor: float = 1.25):
  """16 routed experts in `expert` device groups; every balance loss on, at
  batch level (needs the global batch), device-limited routing M=2; the
  token exchange and its capacity set in the plan directly (the config
  refuses ragged_all_to_all on CPU, which the caller emulates)."""
  spec = small_moe_spec(shared=1, routed=E, top_k=K, hidden=8, d=D, aux_loss_alpha=0.1,
                        seq_aux=False)
  return spec.replace(moe=dict(
      device_balance_alpha=0.05, num_device_groups=expert, max_devices_per_token=2,
      comm_balance_alpha=0.02, plan=dict(ep_exchange=exchange, capacity_factor=capacity_factor)))


def loss_and_grads(spec, x, tokens, mesh=None):
  graphdef, state = nnx.split(MoE(spec, rngs=nnx.Rngs(0)))

  def f(state, x):
    y, aux, stats = nnx.merge(graphdef, state)(x, tokens)
    return jnp.sum(jnp.sin(y)) + sum(aux.values()), (aux, stats)

  fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
  if mesh is None:
    return jax.device_get(fn(state, x))
  with jax.set_mesh(mesh):
    out = fn(put(state, mesh), jax.device_put(x, mesh_lib.batch_sharding(mesh)))
    return jax.device_get(out)


@pytest.mark.parametrize("exchange", ["allgather", "all_to_all", "ragged_all_to_all"])
@pytest.mark.parametrize("axes", MESHES, ids=mesh_id)
def test_exchange_equals_single_device(axes, exchange, monkeypatch):
  if exchange == "ragged_all_to_all":
    monkeypatch.setattr(expert_lib, "ragged_all_to_all", emulated_ragged_all_to_all)
  # all_to_all capacity factor X: C = T*K rows per destination, nothing dropped.
  spec = moe_spec(axes["expert"], exchange, capacity_factor=float(axes["expert"]))
  x = jax.random.normal(jax.random.key(1), (8, 6, D))
  tokens = jnp.zeros((8, 6), jnp.int32)
  (v0, (aux0, st0)), (gs0, gx0) = loss_and_grads(spec, x, tokens)
  (v1, (aux1, st1)), (gs1, gx1) = loss_and_grads(spec, x, tokens, make_mesh(**axes))
  assert set(aux0) == {"expert_balance", "device_balance", "comm_balance"}
  np.testing.assert_allclose(v1, v0, rtol=2e-5)
  for k in aux0:
    np.testing.assert_allclose(aux1[k], aux0[k], rtol=1e-5, err_msg=k)
  np.testing.assert_array_equal(st1["tokens_per_expert"], st0["tokens_per_expert"])
  assert float(st1["dropped_fraction"]) == 0.0
  np.testing.assert_allclose(gx1, gx0, rtol=1e-4, atol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gs0), jax.tree.leaves(gs1)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def np_capacity_kept(idx, weight, devices, per_device, cap, policy):
  """Per source device (its T/devices tokens), per destination device, the
  first `cap` pairs in priority order are kept (position: flat order t*K+k;
  score: highest gate first)."""
  t_all, k = idx.shape
  t_local = t_all // devices
  kept = np.zeros(idx.shape, bool)
  for src in range(devices):
    rows = range(src * t_local, (src + 1) * t_local)
    pairs = [(t, j) for t in rows for j in range(k)]
    for dst in range(devices):
      mine = [p for p in pairs if idx[p] // per_device == dst]
      if policy == "score":
        mine = sorted(mine, key=lambda p: -weight[p])  # stable: position breaks ties
      for p in mine[:cap]:
        kept[p] = True
  return kept


@pytest.mark.parametrize("policy", ["position", "score"])
def test_all_to_all_capacity_drops_exactly_the_expected_pairs(policy):
  """32 tokens on 8 devices (4 each), top-2 of 16 experts (2 per device),
  factor 1: C = ceil(1 * 4 * 2 / 8) = 1 row per destination device."""
  rng = np.random.default_rng(0)
  t, d, f = 32, 8, 4
  x = rng.normal(size=(t, d)).astype(np.float32)
  idx = np.stack([rng.choice(E, 2, replace=False) for _ in range(t)]).astype(np.int32)
  weight = rng.uniform(0.1, 1.0, size=(t, 2)).astype(np.float32)
  w = [rng.normal(size=s).astype(np.float32) for s in [(E, d, f), (E, d, f), (E, f, d)]]
  kept = np_capacity_kept(idx, weight, 8, E // 8, 1, policy)
  assert 0 < (~kept).sum() < kept.size  # some pairs dropped, some kept
  want = np.zeros((t, d))
  for ti, j in zip(*np.nonzero(kept)):
    e = idx[ti, j]
    want[ti] += weight[ti, j] * np_swiglu(x[ti], w[0][e], w[1][e], w[2][e])
  mesh = make_mesh(expert=8)

  plan = moe_spec(8, "all_to_all").moe.plan
  plan = dataclasses.replace(plan, capacity_factor=1.0, drop_policy=policy)

  def run(x, idx, weight, *w):
    return expert_lib.routed_experts(x, idx, weight, ExpertWeights(*w), plan, train=True)

  tok = mesh_lib.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    args = [jax.device_put(a, tok) for a in (x, idx, weight)]
    args += [jax.device_put(a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        "expert"))) for a in w]
    y, dropped = jax.device_get(jax.jit(run)(*args))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert float(dropped) == pytest.approx((~kept).sum() / kept.size)


def test_ragged_all_to_all_is_one_clear_error_on_cpu():
  spec = moe_spec(8, "ragged_all_to_all")
  x = jnp.ones((8, 6, D))
  with pytest.raises(ValueError, match="XLA:CPU has no ragged all-to-all"):
    loss_and_grads(spec, x, jnp.zeros((8, 6), jnp.int32), make_mesh(expert=8))

