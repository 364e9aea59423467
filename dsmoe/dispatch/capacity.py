"""Capacity dispatch (Switch / GShard): E fixed expert buffers of C rows.

Steps:
  1. capacity C = ceil(factor * T * K / E) with `moe.capacity_factor` in
     training and `moe.eval_capacity_factor` otherwise (0 at evaluation: drop
     nothing, run the dropless path instead, "blocked" off TPU);
  2. layout: each pair's rank among its expert's pairs, in priority order
     (`moe.drop_policy`: "position" = earlier tokens first, then earlier
     slots; "score" = higher gate weight first, as DeepSeek-V2); pairs of
     rank >= C are dropped: they skip the routed experts (the caller still
     adds the residual and the shared experts);
  3. permute: index gather into the buffer x_ecd [E, C, D] (never a one-hot);
  4. SwiGLU of each buffer with its expert: batched matmuls over E;
  5. combine: gather each pair's row back (dropped pairs read 0) and sum
     with the gate weights.

Returns the dropped fraction = dropped pairs / (T * K).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsmoe.dispatch import dropless
from dsmoe.dispatch import layout as layout_lib
from dsmoe.dispatch.common import DispatchResult, ExpertWeights
from dsmoe.dispatch.permute import combine, permute


def batched_swiglu(x_ecd, w: ExpertWeights):
  """SwiGLU of buffer e with expert e: [E, C, D] -> [E, C, D]."""
  g = jnp.einsum("ecd,edh->ech", x_ecd, w.w_gate_edh)  # [E,C,H]
  u = jnp.einsum("ecd,edh->ech", x_ecd, w.w_up_edh)  # [E,C,H]
  return jnp.einsum("ech,ehd->ecd", jax.nn.silu(g) * u, w.w_down_ehd)  # [E,C,D]


def dispatch_with(x_td, idx_tk, weight_tk, experts: ExpertWeights, *, factor: float,
                  policy: str) -> DispatchResult:
  """Capacity dispatch with an explicit factor (> 0) and drop policy."""
  (t, d), k = x_td.shape, idx_tk.shape[1]
  num_experts = experts.w_gate_edh.shape[0]
  cap = layout_lib.capacity(t, k, num_experts, factor)
  lay = layout_lib.capacity_layout(idx_tk, weight_tk, num_experts, cap, policy)
  x_pd = permute(x_td, lay.token_p, lay.row_tk, True)  # [E*C,D]
  y_ecd = batched_swiglu(x_pd.reshape(num_experts, cap, d),
                         dropless.cast(experts, x_td.dtype))  # [E,C,D]
  y_td = combine(y_ecd.reshape(-1, d), weight_tk, lay.row_tk, lay.token_p,
                 lay.pair_p, True)  # [T,D]
  return DispatchResult(y_td, lay.dropped / (t * k))


def dispatch(x_td, idx_tk, weight_tk, experts: ExpertWeights, *, moe, train) -> DispatchResult:
  factor = moe.capacity_factor if train else moe.eval_capacity_factor
  if factor <= 0:  # never drop: the dropless path, with the platform's backend
    return dropless.dispatch_with(x_td, idx_tk, weight_tk, experts,
                                  backend=dropless.auto_backend(),
                                  block_size=moe.block_size)
  return dispatch_with(x_td, idx_tk, weight_tk, experts, factor=factor,
                       policy=moe.drop_policy)
