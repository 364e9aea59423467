"""How routed tokens reach their experts. Every dispatch has one signature:

    fn(x_td, idx_tk, weight_tk, experts, *, moe, train) -> DispatchResult

  x_td       [T, D]  token activations (compute dtype), T = batch * seq
  idx_tk     [T, K]  int32 chosen routed experts
  weight_tk  [T, K]  float32 gate weights
  experts    ExpertWeights(w_gate_edh [E,D,H], w_up_edh [E,D,H], w_down_ehd [E,H,D])
  moe        the resolved `config.model.moe` ConfigDict
  train      True in training (capacity dispatch may use a different factor at eval)

and returns y_td = sum_k weight_tk * FFN_{idx_tk}(x_td) (compute dtype) plus
the fraction of (token, slot) pairs that were dropped (0 for dropless paths).
"""

from __future__ import annotations

import jax

from dsmoe.dispatch.common import DispatchResult, ExpertWeights
from dsmoe.dispatch import dense, dropless

_REGISTRY = {
    "dense": dense.dispatch,
    "dropless": dropless.dispatch,
}


def resolve_impl(impl: str) -> str:
  """`auto` picks the best path for the current platform."""
  if impl != "auto":
    return impl
  return "dropless"


def get(impl: str):
  name = resolve_impl(impl)
  if name not in _REGISTRY:
    raise ValueError(f"config.model.moe.impl={impl!r}: no such dispatch; "
                     f"available: {sorted(_REGISTRY)} or 'auto'")
  return _REGISTRY[name]


__all__ = ["DispatchResult", "ExpertWeights", "get", "resolve_impl", "jax"]
