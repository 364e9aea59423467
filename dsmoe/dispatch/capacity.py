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
  3. on CPU ("loop" strategy) the E buffers are the blocks of the blocked
     loop (gmm_blocked.py): per expert, gather its (at most C) token rows by
     index (never a one-hot), SwiGLU, scatter-add gate * output into y_td;
     empty rows have gate 0. Elsewhere ("batched"): index gather into
     x_ecd [E, C, D], batched matmuls over E, gather-back combine.

Returns the dropped fraction = dropped pairs / (T * K).
"""

from __future__ import annotations

from dsmoe.dispatch import dropless
from dsmoe.dispatch import layout as layout_lib
from dsmoe.dispatch.common import DispatchResult, ExpertWeights
from dsmoe.dispatch import gmm_batched
from dsmoe.dispatch.gmm_blocked import blocked_moe
from dsmoe.dispatch.permute import combine, permute


def dispatch_with(x_td, idx_tk, weight_tk, experts: ExpertWeights, *, factor: float,
                  policy: str, strategy: str | None = None) -> DispatchResult:
  """Capacity dispatch with an explicit factor (> 0), drop policy and strategy."""
  t, k = x_td.shape[0], idx_tk.shape[1]
  num_experts = experts.w_gate_edh.shape[0]
  cap = layout_lib.capacity(t, k, num_experts, factor)
  lay = layout_lib.capacity_layout(idx_tk, weight_tk, num_experts, cap, policy)
  w = dropless.cast(experts, x_td.dtype)
  if (strategy or dropless.blocked_strategy()) == "loop":
    weight_ec = dropless.gate_per_row(weight_tk, lay.pair_p).reshape(-1, cap)  # 0: empty
    y_td = blocked_moe(x_td, weight_ec, w, lay.token_p.reshape(-1, cap),
                       lay.block_end_e)  # [T,D]
  else:  # "batched": the [E, C, D] buffer, batched matmuls over E
    x_pd = permute(x_td, lay.token_p, lay.row_tk, True)  # [E*C,D]
    y_ecd = gmm_batched.batched_swiglu(x_pd.reshape(num_experts, cap, -1), w)  # [E,C,D]
    y_td = combine(y_ecd.reshape(x_pd.shape), weight_tk, lay.row_tk, lay.token_p,
                   lay.pair_p, True)  # [T,D]
  return DispatchResult(y_td, lay.dropped / (t * k))


def dispatch(x_td, idx_tk, weight_tk, experts: ExpertWeights, *, moe, train) -> DispatchResult:
  factor = moe.capacity_factor if train else moe.eval_capacity_factor
  if factor <= 0:  # never drop: the dropless path, with the platform's backend
    return dropless.dispatch_with(x_td, idx_tk, weight_tk, experts,
                                  backend=dropless.auto_backend(),
                                  block_size=moe.block_size)  # the configured block
  return dispatch_with(x_td, idx_tk, weight_tk, experts, factor=factor,
                       policy=moe.drop_policy)
