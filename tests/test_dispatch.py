"""Dispatch implementations vs the dense reference; capacity drops vs numpy.

Oracles: the dense dispatch (every expert on every token) for outputs and
gradients whenever nothing is dropped; for capacity, the set of kept
(token, slot) pairs is computed in numpy here and the dense reference is run
with the dropped pairs' gates set to zero.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsmoe
from dsmoe import dispatch
from dsmoe.dispatch import ExpertWeights, capacity, dense, dropless, grouped
from dsmoe.model import Transformer
from dsmoe.spec import ExpertPlan
from tests.helpers import small_config

D, H = 16, 8


def plan(grouped_impl="loop", dispatch_impl="dropless", **fields):
  """An ExpertPlan with the given grouped SwiGLU (and other fields)."""
  base = dict(dispatch=dispatch_impl, grouped=grouped_impl, block_size=0, capacity_factor=1.25,
              eval_capacity_factor=0.0, drop_policy="position", ep_exchange="allgather",
              platform="cpu")
  return ExpertPlan(**{**base, **fields})


# (dispatch, grouped SwiGLU, block size); capacity is run with a factor that fits all.
PATHS = [
    ("dropless", "loop", 4), ("dropless", "loop", 1), ("dropless", "loop", 64),
    ("dropless", "loop", 0),  # block from the shape
    ("dropless", "kernel", 4), ("dropless", "kernel", 1),  # C++ CPU kernel
    ("dropless", "batched", 4), ("dropless", "batched", 0),
    ("dropless", "ragged_dot", 0),
    ("dropless", "pallas", 16),  # CPU: Pallas interpreter
    ("capacity", "loop", 0), ("capacity", "kernel", 0), ("capacity", "batched", 0),
    ("capacity", "ragged_dot", 0), ("capacity", "pallas", 16),
]


# float32 matmuls in full precision (GPUs default to TF32 otherwise).
pytestmark = pytest.mark.usefixtures("full_precision_matmuls")


def path_fn(impl, grouped_impl="loop", factor=0.0, **fields):
  """fn(x, idx, weight, experts) -> DispatchResult of one dispatch and plan."""
  if impl == "dense":
    return dense.dispatch
  p = plan(grouped_impl, impl, **fields)
  if impl == "capacity":
    return lambda x, i, w, e: capacity.dispatch(x, i, w, e, p, factor)
  return lambda x, i, w, e: dropless.dispatch(x, i, w, e, p)


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


def value_and_grads(fn, x, idx, weight, experts):
  """Output, dropped fraction and grads of <y, probe> w.r.t. x, weight, experts."""
  probe = jnp.asarray(np.random.default_rng(7).normal(size=x.shape), jnp.float32)

  def loss(x, weight, experts):
    res = fn(x, idx, weight, experts)
    return jnp.sum(res.y_td * probe), res

  vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  (_, res), grads = vg(x, weight, experts)
  return res, grads


def assert_same(a, b, rtol=2e-4, atol=2e-5):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


@functools.cache
def dense_case(t, e, k, mode):
  """A case's inputs and the dense reference's output and gradients, computed
  once per case for all the paths compared with it."""
  case = make_case(t + e, t, e, k, mode=mode)
  return case, value_and_grads(dense.dispatch, *case)


@pytest.mark.parametrize("impl,grouped_impl,block", PATHS, ids=["-".join(map(str, p)) for p in PATHS])
@pytest.mark.parametrize("t,e,k,mode", [(13, 6, 2, "random"), (24, 12, 3, "few_experts"),
                                        (17, 8, 3, "one_expert"), (5, 4, 1, "random")])
def test_matches_dense_when_nothing_dropped(impl, grouped_impl, block, t, e, k, mode):
  (x, idx, weight, experts), (ref, ref_grads) = dense_case(t, e, k, mode)
  fn = path_fn(impl, grouped_impl, factor=float(e), block_size=block)  # capacity: C >= T
  res, grads = value_and_grads(fn, x, idx, weight, experts)
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


@pytest.mark.parametrize("grouped_impl", ["loop", "batched", "ragged_dot"])
@pytest.mark.parametrize("policy", ["position", "score"])
@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_capacity_drops_the_expected_pairs(policy, factor, grouped_impl):
  t, e, k = 12, 4, 2
  rng = np.random.default_rng(3)
  # expert 0 is everyone's first choice: it overflows; the rest is random.
  idx = np.stack([np.r_[0, rng.integers(1, e)] for _ in range(t)]).astype(np.int32)
  weight = rng.permutation(np.linspace(0.1, 0.9, t * k)).reshape(t, k).astype(np.float32)
  x, _, _, experts = make_case(0, t, e, k)
  cap = math.ceil(factor * t * k / e)
  kept = np_kept(idx, weight, e, cap, policy)
  assert 0 < kept.sum() < t * k  # the case really drops something
  fn = path_fn("capacity", grouped_impl, factor=factor, drop_policy=policy)
  res, grads = value_and_grads(fn, x, jnp.asarray(idx), jnp.asarray(weight), experts)
  np.testing.assert_allclose(float(res.dropped_fraction), 1 - kept.mean(), rtol=1e-6)
  # Oracle: the dense reference with the dropped pairs' gates set to zero.
  masked = jnp.asarray(np.where(kept, weight, 0.0), jnp.float32)
  ref, ref_grads = value_and_grads(dense.dispatch, x, jnp.asarray(idx), masked, experts)
  assert_same(res.y_td, ref.y_td)
  assert_same((grads[0], grads[2]), (ref_grads[0], ref_grads[2]))
  # d/d(weight) of a dropped pair is 0; of a kept pair it is the reference's.
  np.testing.assert_allclose(np.asarray(grads[1])[~kept], 0.0)
  np.testing.assert_allclose(np.asarray(grads[1])[kept], np.asarray(ref_grads[1])[kept],
                             rtol=2e-4, atol=2e-5)


def routed_fn(grouped_impl="loop", *, train, **fields):
  p = plan(grouped_impl, "capacity", capacity_factor=0.25, **fields)
  return lambda x, i, w, e: dispatch.routed_experts(x, i, w, e, p, train=train)


def test_capacity_factor_zero_drops_nothing():
  """At evaluation the plan's eval_capacity_factor (default 0) applies: no drops."""
  x, idx, weight, experts = make_case(1, 32, 4, 2, mode="one_expert")
  ref, _ = value_and_grads(dense.dispatch, x, idx, weight, experts)
  train_res, _ = value_and_grads(routed_fn(train=True), x, idx, weight, experts)
  assert float(train_res.dropped_fraction) > 0
  eval_res, _ = value_and_grads(routed_fn(train=False), x, idx, weight, experts)
  assert float(eval_res.dropped_fraction) == 0.0
  assert_same(eval_res.y_td, ref.y_td)
  half, _ = value_and_grads(routed_fn(train=False, eval_capacity_factor=0.5), x, idx,
                            weight, experts)
  assert float(half.dropped_fraction) > 0  # a factor > 0 at evaluation drops


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("grouped_impl,marker", [("ragged_dot", "ragged_dot"), ("loop", None),
                                                 ("pallas", "pallas_call")])
def test_capacity_runs_the_plans_grouped_swiglu(grouped_impl, marker, train):
  x, idx, weight, experts = make_case(1, 16, 4, 2)
  jaxpr = str(jax.make_jaxpr(routed_fn(grouped_impl, train=train))(x, idx, weight, experts))
  for op in ("ragged_dot", "pallas_call"):
    assert (op in jaxpr) == (op == marker)


@pytest.mark.parametrize("block_size", [8, 32])
def test_block_size_reaches_the_layout(block_size):
  """An explicit block size R gives the [G, R, D] blocks of the batched strategy,
  G = ceil((T*K + E*(R-1)) / R) (the static bound)."""
  x, idx, weight, experts = make_case(1, 40, 4, 2)
  fn = path_fn("dropless", "batched", block_size=block_size)
  jaxpr = str(jax.make_jaxpr(fn)(x, idx, weight, experts))
  g = math.ceil((40 * 2 + 4 * (block_size - 1)) / block_size)
  assert f"f32[{g},{block_size},{D}]" in jaxpr


@pytest.mark.parametrize("impl,fuse_max_hidden", [("dropless", 256), ("capacity", 256),
                                                  ("dropless", 0)])
def test_bfloat16_close_to_float32_reference(impl, fuse_max_hidden, monkeypatch):
  from dsmoe.dispatch import expert_loop  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(expert_loop, "FUSE_GATE_UP_MAX_HIDDEN", fuse_max_hidden)
  x, idx, weight, experts = make_case(5, 40, 8, 2)
  ref, ref_grads = value_and_grads(dense.dispatch, x, idx, weight, experts)
  fn = path_fn(impl, "loop", factor=8.0, block_size=16)
  res, grads = value_and_grads(fn, x.astype(jnp.bfloat16), idx, weight, experts)
  assert res.y_td.dtype == jnp.bfloat16
  scale = float(jnp.abs(ref.y_td).max())
  np.testing.assert_allclose(np.asarray(res.y_td, np.float32), ref.y_td, atol=0.03 * scale)
  for g, r in zip(jax.tree.leaves(grads[2]), jax.tree.leaves(ref_grads[2])):
    assert g.dtype == jnp.float32  # master weights stay float32
    np.testing.assert_allclose(g, r, atol=0.03 * float(jnp.abs(r).max()))


@pytest.mark.parametrize("cap", [0, 5])
def test_blocked_layout_blocks_hold_one_expert(cap):
  """Every used row of a block belongs to that block's expert; padding < B per
  expert; start_e/count_e describe the rows; with a capacity, exactly the
  first `cap` pairs of each expert (flat order) are kept, the rest dropped."""
  from dsmoe.dispatch import layout  # pylint: disable=g-import-not-at-top
  _, idx, weight, _ = make_case(4, 50, 7, 3, mode="few_experts")
  block = 4
  lay = layout.blocked_layout(idx, 7, block, cap=cap, weight_tk=weight)
  pair_p = np.asarray(lay.pair_p)
  ends = np.asarray(lay.block_end_e)
  starts = np.r_[0, ends[:-1]]
  flat = np.asarray(idx).reshape(-1)
  expected = [np.flatnonzero(flat == e)[:cap or None] for e in range(7)]
  seen = []
  for e in range(7):
    rows = pair_p[starts[e] * block:ends[e] * block]
    used = rows[rows < flat.size]
    np.testing.assert_array_equal(used, expected[e])  # kept pairs, in order
    assert len(rows) - len(used) < block
    assert lay.start_e[e] == starts[e] * block and lay.count_e[e] == len(used)
    seen.extend(used.tolist())
  kept = np.sort(np.concatenate(expected))
  assert sorted(seen) == kept.tolist()  # every kept pair exactly once
  row_s = np.asarray(lay.row_tk).reshape(-1)
  np.testing.assert_array_equal(pair_p[row_s[kept]], kept)
  assert np.all(row_s[np.setdiff1d(np.arange(flat.size), kept)] >= pair_p.size)  # dropped
  assert float(lay.dropped) == flat.size - kept.size


@pytest.mark.parametrize("num_experts", [1, 7, 2**22])  # 2**22: keys too wide, stable argsort
def test_sort_by_expert_is_a_stable_argsort(num_experts):
  from dsmoe.dispatch import layout  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(num_experts)
  ids = rng.integers(0, min(num_experts, 9), 1000).astype(np.int32)  # many ties
  ids[::7] = num_experts - 1  # the largest id occurs
  order = jax.jit(layout.sort_by_expert, static_argnums=1)(jnp.asarray(ids), num_experts)
  np.testing.assert_array_equal(order, np.argsort(ids, kind="stable"))


def test_block_for():
  def block(impl, pairs, experts, block_size=0):
    return grouped.block_for(plan(impl, block_size=block_size), pairs, experts,
                             grouped.loop_target(pairs, experts))
  # loop: chunks of ~1.25x the mean rows per expert in <= 32 blocks of R rows
  assert block("loop", 24576, 64) == 16  # 480 rows -> 30 blocks
  assert block("loop", 14336, 63) == 16  # 285 rows -> 18 blocks
  assert block("loop", 8192, 16) == 32  # 640 rows -> 20 blocks
  assert block("loop", 40, 6) == 8
  assert block("loop", 10**6, 8) == 32  # chunk capped at 1024 rows
  assert block("kernel", 24576, 64) == 16
  assert block("batched", 24576, 64) == 256
  assert block("batched", 1000, 8) == 64
  assert block("pallas", 1000, 8) == 128
  assert block("loop", 24576, 64, block_size=32) == 32
  assert block("pallas", 1000, 8, block_size=32) == 32
  assert block("ragged_dot", 1000, 8) == 1


def test_loop_chunk_sizes():
  assert grouped.loop_chunk_sizes(32, 480) == tuple(range(32, 481, 32))
  assert grouped.loop_chunk_sizes(32, 470) == tuple(range(32, 481, 32))  # rounded up
  assert grouped.loop_chunk_sizes(4, 1000) == tuple(range(4, 129, 4))  # at most 32 R
  assert grouped.loop_chunk_sizes(64, 10) == (64,)


@pytest.mark.parametrize("block,chunk_rows,fuse_max_hidden",
                         [(2, 4, 256), (4, 64, 256), (8, 8, 256), (2, 4, 0), (4, 64, 0)])
def test_expert_loop_chunks_match_dense(block, chunk_rows, fuse_max_hidden, monkeypatch):
  """Experts with no rows, with fewer rows than one chunk and with several
  chunks' worth (the first chunk's padded writes are overwritten by later
  chunks) all match the dense reference, values and gradients; with gate
  and up as one fused matmul and as two (fuse_max_hidden 0: hidden above it)."""
  from dsmoe.dispatch import expert_loop, layout  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(expert_loop, "FUSE_GATE_UP_MAX_HIDDEN", fuse_max_hidden)
  t, e, k = 30, 6, 2
  rng = np.random.default_rng(11)
  # expert 0 takes every token (30 rows), experts 4 and 5 none.
  idx = np.stack([np.r_[0, rng.integers(1, 4)] for _ in range(t)]).astype(np.int32)
  x, _, weight, experts = make_case(2, t, e, k)

  def fn(x, i, w, ex):
    lay = layout.blocked_layout(i, e, block)
    y = grouped.swiglu(plan("loop"), x, w, ex, lay, block, target_rows=chunk_rows,
                       may_drop=False)
    return dispatch.DispatchResult(y, jnp.zeros(()))

  ref, ref_grads = value_and_grads(dense.dispatch, x, jnp.asarray(idx), weight, experts)
  res, grads = value_and_grads(fn, x, jnp.asarray(idx), weight, experts)
  assert_same(res.y_td, ref.y_td)
  assert_same(grads, ref_grads)


@pytest.mark.parametrize("impl,backend,strategy", [
    ("dense", "auto", "auto"), ("capacity", "blocked", "loop"),
    ("capacity", "blocked", "batched"), ("dropless", "blocked", "loop"),
    ("capacity", "blocked", "kernel"), ("dropless", "blocked", "kernel"),
    ("dropless", "blocked", "batched"), ("dropless", "ragged_dot", "auto"),
    ("capacity", "ragged_dot", "auto")])
def test_tiny_model_forward_and_grad(impl, backend, strategy):
  cfg = small_config(**{"model.moe.impl": impl, "model.moe.gmm_backend": backend,
                        "model.moe.gmm_strategy": strategy})
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
