"""Router and gates against a numpy oracle written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsmoe.model.router import Router, hash_expert


def np_route(x, w, top_k, score_fn, norm, scale):
  logits = x.astype(np.float64) @ w.astype(np.float64)
  if score_fn == "softmax":
    e = np.exp(logits - logits.max(-1, keepdims=True))
    s = e / e.sum(-1, keepdims=True)
  else:
    s = 1 / (1 + np.exp(-logits))
  idx = np.argsort(-s, axis=-1, kind="stable")[..., :top_k]
  g = np.take_along_axis(s, idx, axis=-1)
  if norm and top_k > 1:  # the released code's rule
    g = g / g.sum(-1, keepdims=True)
  return s, idx, g * scale


@pytest.mark.parametrize("score_fn,norm,scale", [
    ("softmax", False, 1.0), ("softmax", True, 1.0), ("softmax", False, 2.5),
    ("sigmoid", True, 2.5)])
def test_router_matches_numpy(score_fn, norm, scale):
  d, e, k = 16, 12, 3
  router = Router(d, e, top_k=k, score_fn=score_fn, norm_topk_prob=norm,
                  routed_scaling_factor=scale, init_std=0.5, param_dtype=jnp.float32,
                  rngs=nnx.Rngs(0))
  x = np.asarray(jax.random.normal(jax.random.key(1), (2, 5, d)))
  r = router(jnp.asarray(x))
  s, idx, g = np_route(x, np.asarray(router.w_de[...]), k, score_fn, norm, scale)
  np.testing.assert_allclose(r.scores_bte, s, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(r.idx_btk, idx)
  np.testing.assert_allclose(r.weight_btk, g, rtol=1e-5, atol=1e-6)
  if score_fn == "softmax":
    np.testing.assert_allclose(np.asarray(r.scores_bte).sum(-1), 1.0, rtol=1e-5)
  if not norm and scale == 1.0:  # v1: weights are the raw scores, sum < 1
    assert np.all(np.asarray(r.weight_btk).sum(-1) < 1.0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_norm_topk_prob_renormalises_only_above_top1(top_k):
  """v1: a top-1 router with norm_topk_prob keeps the raw softmax score."""
  router = Router(8, 6, top_k=top_k, score_fn="softmax", norm_topk_prob=True,
                  routed_scaling_factor=1.0, init_std=0.5, param_dtype=jnp.float32,
                  rngs=nnx.Rngs(0))
  r = router(jax.random.normal(jax.random.key(2), (1, 7, 8)))
  scores, weight = np.asarray(r.scores_bte), np.asarray(r.weight_btk)
  picked = np.take_along_axis(scores, np.asarray(r.idx_btk), axis=-1)
  if top_k == 1:
    np.testing.assert_array_equal(weight, picked)
    assert np.all(weight < 0.99)
  else:
    np.testing.assert_allclose(weight.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(weight, picked / picked.sum(-1, keepdims=True), rtol=1e-6)


def test_router_scores_float32_with_bf16_input():
  router = Router(8, 4, top_k=2, score_fn="softmax", norm_topk_prob=False,
                  routed_scaling_factor=1.0, init_std=0.5, param_dtype=jnp.float32,
                  rngs=nnx.Rngs(0))
  r = router(jnp.ones((1, 3, 8), jnp.bfloat16))
  assert r.scores_bte.dtype == jnp.float32 and r.weight_btk.dtype == jnp.float32


def test_hash_router_is_fixed_function_of_token():
  tokens = jnp.array([[5, 7, 5, 1000, 7]])
  a, b = hash_expert(tokens, 16), hash_expert(tokens, 16)
  np.testing.assert_array_equal(a, b)
  assert a[0, 0] == a[0, 2] and a[0, 1] == a[0, 4]
  assert np.all((np.asarray(a) >= 0) & (np.asarray(a) < 16))
  counts = np.bincount(np.asarray(hash_expert(jnp.arange(16000), 16)).ravel(), minlength=16)
  assert counts.min() > 800  # a fixed hash spreads token ids evenly


def np_device_limited(s, top_k, groups, m):
  """V2 device-limited top-k written out: per token, rank the devices by
  their best expert score, keep the best m (ties: lower device), then take
  the top-k experts among the kept devices' experts."""
  e = s.shape[-1]
  per = e // groups
  idx = np.zeros(s.shape[:-1] + (top_k,), np.int64)
  for pos in np.ndindex(s.shape[:-1]):
    best = [max(s[pos][g * per:(g + 1) * per]) for g in range(groups)]
    devices = sorted(range(groups), key=lambda g: (-best[g], g))[:m]
    allowed = [j for j in range(e) if j // per in devices]
    idx[pos] = sorted(allowed, key=lambda j: (-s[pos][j], j))[:top_k]
  return idx


@pytest.mark.parametrize("groups,m,top_k", [(4, 1, 2), (4, 2, 3), (8, 3, 6), (8, 2, 4)])
def test_device_limited_routing_picks_only_from_the_top_m_devices(groups, m, top_k):
  d, e = 16, 32
  router = Router(d, e, top_k=top_k, score_fn="softmax", norm_topk_prob=False,
                  routed_scaling_factor=1.0, init_std=0.5, param_dtype=jnp.float32,
                  rngs=nnx.Rngs(0), num_groups=groups, max_groups=m)
  x = np.asarray(jax.random.normal(jax.random.key(2), (3, 7, d)))
  r = router(jnp.asarray(x))
  s = np.asarray(r.scores_bte, np.float64)
  want = np_device_limited(s, top_k, groups, m)
  np.testing.assert_array_equal(np.asarray(r.idx_btk), want)
  np.testing.assert_allclose(r.weight_btk, np.take_along_axis(s, want, -1), rtol=1e-6)
  devices_used = np.asarray(r.idx_btk) // (e // groups)
  assert max(len(set(row)) for row in devices_used.reshape(-1, top_k)) <= m
  # The limit binds: unrestricted top-k would use more than m devices somewhere.
  free = np.argsort(-s, axis=-1, kind="stable")[..., :top_k] // (e // groups)
  assert max(len(set(row)) for row in free.reshape(-1, top_k)) > m
