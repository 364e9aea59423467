"""How routed tokens reach their experts.

Every dispatch computes, for T tokens with K chosen routed experts each,

    y_td = sum_k weight_tk[t, k] * FFN_{idx_tk[t, k]}(x_td[t])      (SwiGLU experts)

from explicit arguments (never a config object):

  x_td       [T, D]  token activations (compute dtype); T = batch * sequence
  idx_tk     [T, K]  int32 chosen routed experts
  weight_tk  [T, K]  float32 gate weights
  experts    ExpertWeights(w_gate_edf [E,D,F], w_up_edf [E,D,F], w_down_efd [E,F,D])
  plan       the resolved ExpertPlan (dsmoe.spec; made by dsmoe.config.resolve)

and returns a DispatchResult (y_td in the compute dtype, and the fraction of
(token, slot) pairs that were dropped: 0 for the dropless paths).

  dense.dispatch(...)           reference: every expert on every token (tests);
  dropless.dispatch(..., plan)  sort by expert, grouped SwiGLU, unsort;
  capacity.dispatch(..., plan, factor)  at most C pairs per expert (drops).

Both sorted dispatches, and the expert-parallel local step
(dsmoe.parallel.local), run the routed experts through one seam,
:func:`grouped.swiglu` ("grouped SwiGLU over an expert-sorted layout"), whose
implementation `plan.grouped` names. :func:`routed_experts` picks the
dispatch of `plan.dispatch`.
"""

from __future__ import annotations

from dsmoe.dispatch import capacity, dense, dropless, grouped
from dsmoe.dispatch.common import DispatchResult, ExpertWeights
from dsmoe.spec import ExpertPlan


def routed_experts(x_td, idx_tk, weight_tk, experts: ExpertWeights, plan: ExpertPlan, *,
                   train: bool) -> DispatchResult:
  """The routed-expert output with the dispatch of `plan`.

  "capacity" uses the training or evaluation capacity factor (`train`); a
  factor of 0 (evaluation by default) drops nothing: the dropless path runs,
  with the same grouped SwiGLU.
  """
  if plan.dispatch == "dense":
    return dense.dispatch(x_td, idx_tk, weight_tk, experts)
  if plan.dispatch == "capacity" and plan.factor(train) > 0:
    return capacity.dispatch(x_td, idx_tk, weight_tk, experts, plan, plan.factor(train))
  return dropless.dispatch(x_td, idx_tk, weight_tk, experts, plan)


__all__ = ["DispatchResult", "ExpertPlan", "ExpertWeights", "capacity", "dense", "dropless",
           "grouped", "routed_experts"]
