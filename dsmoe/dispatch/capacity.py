"""Capacity dispatch (Switch / GShard): at most C pairs per expert.

    dispatch(x_td, idx_tk, weight_tk, experts, plan, factor)

Steps:
  1. capacity C = ceil(factor * T * K / E) (factor > 0; at evaluation the
     factor is `plan.eval_capacity_factor`, and 0 runs the dropless path);
  2. layout: each pair's rank among its expert's pairs, in priority order
     (`plan.drop_policy`: "position" = earlier tokens first, then earlier
     slots; "score" = higher gate weight first, as DeepSeek-V2); pairs of
     rank >= C are dropped: they skip the routed experts (the caller still
     adds the residual and the shared experts). The kept pairs are packed
     by expert as in the dropless layout (each expert's min(n_e, C) rows
     padded to a block), so an underfull expert costs only its rows, not C;
  3. the grouped SwiGLU that `plan.grouped` names, over those rows.

Returns the dropped fraction = dropped pairs / (T * K).
"""

from __future__ import annotations

from dsmoe.dispatch import grouped
from dsmoe.dispatch import layout as layout_lib
from dsmoe.dispatch.common import DispatchResult, ExpertWeights
from dsmoe.spec import ExpertPlan


def dispatch(x_td, idx_tk, weight_tk, experts: ExpertWeights, plan: ExpertPlan,
             factor: float) -> DispatchResult:
  """Capacity dispatch with capacity factor `factor` > 0."""
  if factor <= 0:
    raise ValueError(f"capacity dispatch needs a capacity factor > 0, got {factor}")
  t, k = idx_tk.shape
  num_experts = experts.w_gate_edf.shape[0]
  cap = layout_lib.capacity(t, k, num_experts, factor)
  kept = min(t * k, num_experts * cap)
  block = grouped.block_for(plan, kept, num_experts, cap)
  lay = layout_lib.blocked_layout(idx_tk, num_experts, block, cap=cap, weight_tk=weight_tk,
                                  policy=plan.drop_policy)
  y_td = grouped.swiglu(plan, x_td, weight_tk, experts, lay, block, target_rows=cap,
                        may_drop=True)
  return DispatchResult(y_td, lay.dropped / (t * k))
