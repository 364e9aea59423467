"""Router: scores (float32) -> top-k -> gate weights; and the Hash-layer router."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsmoe.model.layers import normal_init
from dsmoe.parallel.mesh import per_token


class Routing(NamedTuple):
  idx_btk: jax.Array  # int32 chosen routed experts
  weight_btk: jax.Array  # float32 gate weights g_{i,t} of the chosen experts
  scores_bte: jax.Array | None  # float32 s_{i,t}; None for the hash router


def device_limited(scores_bte: jax.Array, num_groups: int, max_groups: int) -> jax.Array:
  """DeepSeek-V2 device-limited routing: the scores with every expert outside
  the token's `max_groups` best devices set to -inf.

  The E experts form `num_groups` devices of consecutive experts; a device
  scores by its best expert; the top-M devices stay eligible (ties: lower
  device first).
  """
  b, t, e = scores_bte.shape
  per = e // num_groups
  best_btg = jnp.max(scores_bte.reshape(b, t, num_groups, per), axis=-1)  # [B,T,D]
  _, top_btm = jax.lax.top_k(best_btg, max_groups)  # [B,T,M]
  keep_btg = jnp.any(top_btm[..., None] == jnp.arange(num_groups), axis=-2)  # [B,T,D]
  keep_bte = jnp.repeat(keep_btg, per, axis=-1)  # [B,T,E]
  return jnp.where(keep_bte, scores_bte, -jnp.inf)


def gates(scores_bte: jax.Array, top_k: int, *, norm_topk_prob: bool,
          routed_scaling_factor: float, skip_top: int = 0, num_groups: int = 1,
          max_groups: int = 0) -> tuple[jax.Array, jax.Array]:
  """Top-k of the scores (among the best `max_groups` devices' experts when
  > 0); optional renormalisation, then scaling. The gates are the scores.

  As in the released DeepSeek code, `norm_topk_prob` renormalises only when
  top_k > 1: a top-1 router keeps its raw score as the gate.
  `skip_top` = r > 0 (an analysis, paper Figure 4) passes over the r best
  experts of each token: the top-k are ranks r+1 .. r+k of its scores.
  """
  eligible = (device_limited(scores_bte, num_groups, max_groups) if max_groups > 0
              else scores_bte)
  _, idx_btk = jax.lax.top_k(eligible, skip_top + top_k)
  idx_btk = idx_btk[..., skip_top:]
  weight_btk = jnp.take_along_axis(scores_bte, idx_btk, axis=-1)
  if norm_topk_prob and top_k > 1:
    weight_btk = weight_btk / (jnp.sum(weight_btk, axis=-1, keepdims=True) + 1e-20)
  return idx_btk.astype(jnp.int32), weight_btk * routed_scaling_factor


class Router(nnx.Module):
  """s_{i,t} = softmax_i(u_t . e_i) (or sigmoid) over the routed experts only."""

  def __init__(self, d_model: int, num_experts: int, *, top_k: int, score_fn: str,
               norm_topk_prob: bool, routed_scaling_factor: float, init_std: float,
               param_dtype, rngs: nnx.Rngs, skip_top: int = 0, num_groups: int = 1,
               max_groups: int = 0):
    self.top_k, self.score_fn, self.skip_top = top_k, score_fn, skip_top
    self.norm_topk_prob, self.scaling = norm_topk_prob, routed_scaling_factor
    self.num_groups, self.max_groups = num_groups, max_groups
    self.w_de = nnx.Param(normal_init(init_std)(rngs.params(), (d_model, num_experts), param_dtype))

  def __call__(self, x_btd: jax.Array) -> Routing:
    logits_bte = jnp.einsum("btd,de->bte", x_btd.astype(jnp.float32),
                            self.w_de[...].astype(jnp.float32))  # [B,T,E] f32
    if self.score_fn == "softmax":
      scores = jax.nn.softmax(logits_bte, axis=-1)
    else:
      scores = jax.nn.sigmoid(logits_bte)
    pick = functools.partial(gates, top_k=self.top_k, norm_topk_prob=self.norm_topk_prob,
                             routed_scaling_factor=self.scaling, skip_top=self.skip_top,
                             num_groups=self.num_groups, max_groups=self.max_groups)
    idx, weight = per_token(pick, scores)  # top-k on each device's own tokens
    return Routing(idx, weight, scores)


def hash_expert(tokens_bt: jax.Array, num_experts: int) -> jax.Array:
  """Hash Layer (Roller et al. 2021): a fixed hash of the token id picks the expert."""
  h = tokens_bt.astype(jnp.uint32) * jnp.uint32(2654435761)  # Knuth multiplicative
  h = h ^ (h >> 16)
  return (h % jnp.uint32(num_experts)).astype(jnp.int32)


def hash_routing(tokens_bt: jax.Array, num_experts: int) -> Routing:
  idx = hash_expert(tokens_bt, num_experts)[..., None]
  return Routing(idx, jnp.ones(idx.shape, jnp.float32), None)
