"""Dropless dispatch: sort (token, slot) pairs by expert, grouped matmul, unsort.

Steps:
  1. flatten the T*K assignments and sort them by expert (stable);
  2. gather the token rows in that order: x_sd [S=T*K, D];
  3. grouped SwiGLU: rows of group e use expert e's weights;
  4. scale each row by its gate and scatter-add back to its token.

No token is ever dropped and every shape is static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsmoe.dispatch.common import DispatchResult, ExpertWeights, no_drops


def sort_by_expert(idx_tk: jax.Array, num_experts: int):
  """Returns (order_s, token_s, group_sizes_e) for the flattened assignments."""
  t, k = idx_tk.shape
  flat_s = idx_tk.reshape(-1)  # [S]
  order_s = jnp.argsort(flat_s, stable=True)  # [S] sorted position -> flat pair
  token_s = order_s // k  # [S] token of each sorted row
  group_sizes_e = jnp.bincount(flat_s, length=num_experts).astype(jnp.int32)  # [E]
  return order_s, token_s, group_sizes_e


def ragged_swiglu(x_sd, group_sizes_e, experts: ExpertWeights):
  """SwiGLU where consecutive row groups use consecutive experts (lax.ragged_dot)."""
  dtype = x_sd.dtype
  g = jax.lax.ragged_dot(x_sd, experts.w_gate_edh.astype(dtype), group_sizes_e)  # [S,H]
  u = jax.lax.ragged_dot(x_sd, experts.w_up_edh.astype(dtype), group_sizes_e)  # [S,H]
  return jax.lax.ragged_dot(jax.nn.silu(g) * u, experts.w_down_ehd.astype(dtype),
                            group_sizes_e)  # [S,D]


def dispatch(x_td, idx_tk, weight_tk, experts: ExpertWeights, *, moe, train) -> DispatchResult:
  del train
  if moe.gmm_backend != "ragged_dot":
    raise ValueError(f"config.model.moe.gmm_backend={moe.gmm_backend!r} is not "
                     "available; use 'ragged_dot'")
  t, _ = x_td.shape
  order_s, token_s, group_sizes_e = sort_by_expert(idx_tk, experts.w_gate_edh.shape[0])
  x_sd = jnp.take(x_td, token_s, axis=0)  # [S,D]
  y_sd = ragged_swiglu(x_sd, group_sizes_e, experts)  # [S,D]
  w_s = jnp.take(weight_tk.reshape(-1), order_s)  # [S]
  y_sd = y_sd.astype(jnp.float32) * w_s[:, None]
  y_td = jax.ops.segment_sum(y_sd, token_s, num_segments=t)  # [T,D]
  return DispatchResult(y_td.astype(x_td.dtype), no_drops())
