"""Dispatch implementations vs the dense reference; capacity drops vs numpy.

Oracles: the dense dispatch (every expert on every token) for outputs and
gradients whenever nothing is dropped; for capacity, the set of kept
(token, slot) pairs is computed in numpy here and the dense reference is run
with the dropped pairs' gates set to zero.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsmoe
from dsmoe import dispatch
from dsmoe.dispatch import ExpertWeights, dropless
from dsmoe.model import Transformer
from tests.conftest import load_config

D, H = 16, 8

# (impl, gmm_backend, block_size, blocked strategy); capacity is run with a
# factor that fits all. "loop" is the CPU strategy, "batched" the GPU one.
PATHS = [
    ("dropless", "blocked", 4, "loop"),
    ("dropless", "blocked", 1, "loop"),
    ("dropless", "blocked", 64, "loop"),
    ("dropless", "blocked", 4, "batched"),
    ("dropless", "ragged_dot", 64, "loop"),
    ("capacity", "blocked", 64, "loop"),
    ("capacity", "blocked", 64, "batched"),
    ("auto", "ragged_dot", 8, "loop"),
]


@pytest.fixture(autouse=True)
def full_precision_matmuls():
  """float32 matmuls in full precision (GPUs default to TF32 otherwise)."""
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture
def strategy(request, monkeypatch):
  """Forces the blocked strategy ("loop" / "batched") whatever the platform."""
  monkeypatch.setattr(dropless, "blocked_strategy", lambda platform=None: request.param)
  return request.param


def moe_cfg(impl="dense", backend="ragged_dot", block_size=64, factor=1.25,
            eval_factor=0.0, policy="position"):
  moe = dsmoe.base_config().model.moe
  moe.impl, moe.gmm_backend, moe.block_size = impl, backend, block_size
  moe.capacity_factor, moe.eval_capacity_factor = factor, eval_factor
  moe.drop_policy = policy
  return moe


def make_case(seed, t, e, k, *, mode="random"):
  """x [T,D], idx [T,K] (distinct per token), weights [T,K], expert weights."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(t, D)).astype(np.float32)
  if mode == "random":
    idx = np.stack([rng.permutation(e)[:k] for _ in range(t)])
  elif mode == "few_experts":  # most experts get no token
    idx = np.stack([rng.permutation(k + 1)[:k] for _ in range(t)])
  elif mode == "one_expert":  # every token's first choice is expert 3
    idx = np.stack([np.r_[3, rng.permutation([j for j in range(e) if j != 3])[:k - 1]]
                    for _ in range(t)])
  weight = rng.uniform(0.05, 1.0, size=(t, k)).astype(np.float32)
  experts = ExpertWeights(*(0.4 * rng.normal(size=s).astype(np.float32)
                            for s in ((e, D, H), (e, D, H), (e, H, D))))
  return jnp.asarray(x), jnp.asarray(idx, jnp.int32), jnp.asarray(weight), experts


def value_and_grads(moe, x, idx, weight, experts, *, train=True):
  """Output, dropped fraction and grads of <y, probe> w.r.t. x, weight, experts."""
  fn = dispatch.get(moe.impl)
  probe = jnp.asarray(np.random.default_rng(7).normal(size=x.shape), jnp.float32)

  def loss(x, weight, experts):
    res = fn(x, idx, weight, experts, moe=moe, train=train)
    return jnp.sum(res.y_td * probe), res

  vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  (_, res), grads = vg(x, weight, experts)
  return res, grads


def assert_same(a, b, rtol=2e-4, atol=2e-5):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


@pytest.mark.parametrize("impl,backend,block_size,strategy", PATHS, indirect=["strategy"])
@pytest.mark.parametrize("t,e,k,mode", [(13, 6, 2, "random"), (24, 12, 3, "few_experts"),
                                        (17, 8, 3, "one_expert"), (5, 4, 1, "random")])
def test_matches_dense_when_nothing_dropped(impl, backend, block_size, strategy, t, e, k, mode):
  x, idx, weight, experts = make_case(t + e, t, e, k, mode=mode)
  ref, ref_grads = value_and_grads(moe_cfg("dense"), x, idx, weight, experts)
  moe = moe_cfg(impl, backend, block_size, factor=float(e))  # capacity: C >= T
  res, grads = value_and_grads(moe, x, idx, weight, experts)
  assert float(res.dropped_fraction) == 0.0
  assert_same(res.y_td, ref.y_td)
  assert_same(grads, ref_grads)


def np_kept(idx, weight, e, cap, policy):
  """Expected kept mask [T,K]: per expert, the first `cap` pairs by priority."""
  t, k = idx.shape
  kept = np.zeros((t, k), bool)
  for ex in range(e):
    pairs = [(tt, kk) for tt in range(t) for kk in range(k) if idx[tt, kk] == ex]
    if policy == "score":  # highest gate first; ties: earlier flat position
      pairs.sort(key=lambda p: (-weight[p], p[0] * k + p[1]))
    for p in pairs[:cap]:
      kept[p] = True
  return kept


@pytest.mark.parametrize("strategy", ["loop", "batched"], indirect=True)
@pytest.mark.parametrize("policy", ["position", "score"])
@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_capacity_drops_the_expected_pairs(policy, factor, strategy):
  t, e, k = 12, 4, 2
  rng = np.random.default_rng(3)
  # expert 0 is everyone's first choice: it overflows; the rest is random.
  idx = np.stack([np.r_[0, rng.integers(1, e)] for _ in range(t)]).astype(np.int32)
  weight = rng.permutation(np.linspace(0.1, 0.9, t * k)).reshape(t, k).astype(np.float32)
  x, _, _, experts = make_case(0, t, e, k)
  cap = math.ceil(factor * t * k / e)
  kept = np_kept(idx, weight, e, cap, policy)
  assert 0 < kept.sum() < t * k  # the case really drops something
  moe = moe_cfg("capacity", factor=factor, policy=policy)
  res, grads = value_and_grads(moe, x, jnp.asarray(idx), jnp.asarray(weight), experts)
  np.testing.assert_allclose(float(res.dropped_fraction), 1 - kept.mean(), rtol=1e-6)
  # Oracle: the dense reference with the dropped pairs' gates set to zero.
  masked = jnp.asarray(np.where(kept, weight, 0.0), jnp.float32)
  ref, ref_grads = value_and_grads(moe_cfg("dense"), x, jnp.asarray(idx), masked, experts)
  assert_same(res.y_td, ref.y_td)
  assert_same((grads[0], grads[2]), (ref_grads[0], ref_grads[2]))
  # d/d(weight) of a dropped pair is 0; of a kept pair it is the reference's.
  np.testing.assert_allclose(np.asarray(grads[1])[~kept], 0.0)
  np.testing.assert_allclose(np.asarray(grads[1])[kept], np.asarray(ref_grads[1])[kept],
                             rtol=2e-4, atol=2e-5)


def test_capacity_eval_factor():
  x, idx, weight, experts = make_case(1, 32, 4, 2, mode="one_expert")
  ref, _ = value_and_grads(moe_cfg("dense"), x, idx, weight, experts, train=False)
  never = moe_cfg("capacity", factor=0.25, eval_factor=0.0)
  train_res, _ = value_and_grads(never, x, idx, weight, experts, train=True)
  assert float(train_res.dropped_fraction) > 0
  eval_res, _ = value_and_grads(never, x, idx, weight, experts, train=False)
  assert float(eval_res.dropped_fraction) == 0.0
  assert_same(eval_res.y_td, ref.y_td)
  tight = moe_cfg("capacity", factor=4.0, eval_factor=0.25)
  assert float(value_and_grads(tight, x, idx, weight, experts, train=False)[0]
               .dropped_fraction) > 0


@pytest.mark.parametrize("strategy", ["loop", "batched"], indirect=True)
def test_capacity_buffer_has_no_one_hot(strategy):
  """The compiled capacity dispatch holds no T x E x C array (index-based)."""
  t, e, k = 256, 16, 2
  x, idx, weight, experts = make_case(2, t, e, k)
  moe = moe_cfg("capacity", factor=1.0)
  fn = lambda x: dispatch.get("capacity")(x, idx, weight, experts, moe=moe, train=True).y_td
  cap = math.ceil(t * k / e)
  text = jax.jit(jax.grad(lambda x: fn(x).sum())).lower(x).as_text()
  assert f"{t},{e},{cap}" not in text and f"{t * e * cap}" not in text


@pytest.mark.parametrize("impl", ["dropless", "capacity"])
def test_bfloat16_close_to_float32_reference(impl):
  x, idx, weight, experts = make_case(5, 40, 8, 2)
  ref, ref_grads = value_and_grads(moe_cfg("dense"), x, idx, weight, experts)
  moe = moe_cfg(impl, "blocked", 16, factor=8.0)
  res, grads = value_and_grads(moe, x.astype(jnp.bfloat16), idx, weight, experts)
  assert res.y_td.dtype == jnp.bfloat16
  scale = float(jnp.abs(ref.y_td).max())
  np.testing.assert_allclose(np.asarray(res.y_td, np.float32), ref.y_td, atol=0.03 * scale)
  for g, r in zip(jax.tree.leaves(grads[2]), jax.tree.leaves(ref_grads[2])):
    assert g.dtype == jnp.float32  # master weights stay float32
    np.testing.assert_allclose(g, r, atol=0.03 * float(jnp.abs(r).max()))


def test_blocked_layout_blocks_hold_one_expert():
  """Every used row of a block belongs to that block's expert; padding < B per expert."""
  from dsmoe.dispatch import layout  # pylint: disable=g-import-not-at-top
  _, idx, _, _ = make_case(4, 50, 7, 3, mode="few_experts")
  block = 4
  lay = layout.blocked_layout(idx, 7, block)
  pair_p = np.asarray(lay.pair_p)
  ends = np.asarray(lay.block_end_e)
  starts = np.r_[0, ends[:-1]]
  flat = np.asarray(idx).reshape(-1)
  seen = []
  for e in range(7):
    rows = pair_p[starts[e] * block:ends[e] * block]
    used = rows[rows < flat.size]
    assert np.all(flat[used] == e)
    assert len(rows) - len(used) < block
    seen.extend(used.tolist())
  assert sorted(seen) == list(range(flat.size))  # every pair exactly once
  np.testing.assert_array_equal(pair_p[np.asarray(lay.row_tk).reshape(-1)], np.arange(flat.size))


def test_auto_block_size():
  from dsmoe.dispatch.dropless import auto_block_size  # pylint: disable=g-import-not-at-top
  assert auto_block_size(24576, 64) == 128
  assert auto_block_size(40, 6) == 8
  assert auto_block_size(1000, 8) == 64


def test_auto_resolves_per_platform():
  assert dispatch.resolve_impl("auto") == "dropless"
  assert dispatch.auto_backend("tpu") == "ragged_dot"
  assert dispatch.auto_backend("cpu") == dispatch.auto_backend("gpu") == "blocked"
  assert dropless.blocked_strategy("cpu") == "loop"
  assert dropless.blocked_strategy("gpu") == "batched"
  with pytest.raises(ValueError, match="impl"):
    dispatch.get("nope")


def test_pallas_backend_is_a_config_error():
  cfg = load_config("tiny")
  cfg.model.moe.gmm_backend = "pallas"
  with pytest.raises(ValueError, match="gmm_backend"):
    dsmoe.validate(cfg)


@pytest.mark.parametrize("impl,backend", [("dense", "ragged_dot"), ("capacity", "blocked"),
                                          ("dropless", "blocked"), ("dropless", "ragged_dot"),
                                          ("auto", "ragged_dot")])
def test_tiny_model_forward_and_grad(impl, backend):
  cfg = load_config("tiny")
  cfg.model.moe.impl, cfg.model.moe.gmm_backend = impl, backend
  cfg.model.num_layers = 2
  model = Transformer(dsmoe.resolve(cfg).model, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.model.vocab_size)

  def loss(model):
    logits, aux = model(tokens)
    return jnp.mean(logits), aux

  (value, aux), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
  assert np.isfinite(float(value))
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  assert leaves and all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
  assert aux["moe"]["dropped_fraction"].shape == (1,)
