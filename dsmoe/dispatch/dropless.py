"""Dropless dispatch: sort (token, slot) pairs by expert, grouped SwiGLU, unsort.

    dispatch(x_td, idx_tk, weight_tk, experts, plan)

Steps:
  1. layout: the T*K pairs sorted by expert (stable), each expert's rows
     padded to a multiple of the block size R (layout.blocked_layout; R = 1
     for ragged_dot: no padding);
  2. the grouped SwiGLU that `plan.grouped` names, over that layout
     (grouped.swiglu: permute -> grouped matmul -> combine, or the fused
     loop with no permuted buffer).

No token is ever dropped and every shape is static.
"""

from __future__ import annotations

from dsmoe.dispatch import grouped
from dsmoe.dispatch import layout as layout_lib
from dsmoe.dispatch.common import DispatchResult, ExpertWeights, no_drops
from dsmoe.spec import ExpertPlan


def dispatch(x_td, idx_tk, weight_tk, experts: ExpertWeights, plan: ExpertPlan) -> DispatchResult:
  """y_td = sum_k weight_tk * FFN_{idx_tk}(x_td), nothing dropped."""
  num_experts = experts.w_gate_edf.shape[0]
  target = grouped.loop_target(idx_tk.size, num_experts)
  block = grouped.block_for(plan, idx_tk.size, num_experts, target)
  lay = layout_lib.blocked_layout(idx_tk, num_experts, block)
  y_td = grouped.swiglu(plan, x_td, weight_tk, experts, lay, block, target_rows=target,
                        may_drop=False)
  return DispatchResult(y_td, no_drops())
