"""How routed tokens reach their experts.

Every dispatch computes, for T tokens with K chosen routed experts each,

    y_td = sum_k weight_tk[t, k] * FFN_{idx_tk[t, k]}(x_td[t])      (SwiGLU experts)

from explicit arguments (never a config object):

  x_td       [T, D]  token activations (compute dtype); T = batch * sequence
  idx_tk     [T, K]  int32 chosen routed experts
  weight_tk  [T, K]  float32 gate weights
  experts    ExpertWeights(w_gate_edf [E,D,F], w_up_edf [E,D,F], w_down_efd [E,F,D])

and returns a DispatchResult (y_td in the compute dtype, and the fraction of
(token, slot) pairs that were dropped: 0 for the dropless paths).

  dense.dispatch(...)                                  reference: every expert
                                                       on every token (tests);
  dropless.dispatch(..., backend, strategy, block_size)  sort by expert, grouped
                                                       SwiGLU, unsort;
  capacity.dispatch(..., factor, policy, strategy)     Switch/GShard buffers of
                                                       fixed capacity (drops).

:func:`routed_experts` picks one from the settings of `config.model.moe`
(the MoE block passes them as keywords).
"""

from __future__ import annotations

from dsmoe.dispatch import capacity, dense, dropless
from dsmoe.dispatch.common import DispatchResult, ExpertWeights

IMPLS = ("dense", "dropless", "capacity")


def routed_experts(x_td, idx_tk, weight_tk, experts: ExpertWeights, *, impl: str,
                   capacity_factor: float = 0.0, drop_policy: str = "position",
                   backend: str = "auto", strategy: str = "auto",
                   block_size: int = 0) -> DispatchResult:
  """The routed-expert output with dispatch `impl` ("dense", "dropless", "capacity").

  "capacity" with `capacity_factor` 0 (evaluation by default) drops nothing:
  it runs the dropless path with the same `backend`, `strategy` and
  `block_size`.
  """
  if impl == "dense":
    return dense.dispatch(x_td, idx_tk, weight_tk, experts)
  if impl == "capacity" and capacity_factor > 0:
    return capacity.dispatch(x_td, idx_tk, weight_tk, experts, factor=capacity_factor,
                             policy=drop_policy, strategy=strategy)
  if impl not in IMPLS:
    raise ValueError(f"config.model.moe.impl={impl!r}: no such dispatch; "
                     f"expected one of {list(IMPLS)}")
  return dropless.dispatch(x_td, idx_tk, weight_tk, experts, backend=backend,
                           strategy=strategy, block_size=block_size)


__all__ = ["DispatchResult", "ExpertWeights", "IMPLS", "capacity", "dense", "dropless",
           "routed_experts"]
