"""How routed tokens reach their experts. Every dispatch has one signature:

    fn(x_td, idx_tk, weight_tk, experts, *, moe, train) -> DispatchResult

  x_td       [T, D]  token activations (compute dtype), T = batch * seq
  idx_tk     [T, K]  int32 chosen routed experts
  weight_tk  [T, K]  float32 gate weights
  experts    ExpertWeights(w_gate_edh [E,D,H], w_up_edh [E,D,H], w_down_ehd [E,H,D])
  moe        the resolved `config.model.moe` ConfigDict (or any object with
             the same attributes: gmm_backend, block_size, capacity_factor,
             eval_capacity_factor, drop_policy)
  train      True in training (capacity dispatch may use a different factor at eval)

and returns y_td = sum_k weight_tk * FFN_{idx_tk}(x_td) (compute dtype) plus
the fraction of (token, slot) pairs that were dropped (0 for dropless paths).

Implementations (`moe.impl`):
  dense     reference: every expert on every token (tests, tiny models);
  capacity  Switch/GShard expert buffers of fixed capacity (drops overflow);
  dropless  sort by expert + grouped matmul (`moe.gmm_backend`: "blocked"
            or "ragged_dot"; "pallas" is milestone M3). "blocked" runs as one
            fused loop over single-expert blocks on CPU (gmm_blocked.py) and
            as batched matmuls elsewhere (gmm_batched.py);
  auto      dropless with the best backend for the platform: "ragged_dot" on
            TPU (native grouped matmul), "blocked" elsewhere (XLA's ragged_dot
            densifies on CPU), with a block size chosen from the shape
            (`dropless.auto_block_size`; `moe.block_size` is not used).
"""

from __future__ import annotations

from dsmoe.dispatch import capacity, dense, dropless
from dsmoe.dispatch.common import DispatchResult, ExpertWeights
from dsmoe.dispatch.dropless import auto_backend

_REGISTRY = {
    "dense": dense.dispatch,
    "capacity": capacity.dispatch,
    "dropless": dropless.dispatch,
}


def resolve_impl(impl: str) -> str:
  """`auto` picks the best path for the current platform (always dropless)."""
  return "dropless" if impl == "auto" else impl


def _auto(x_td, idx_tk, weight_tk, experts, *, moe, train) -> DispatchResult:
  del moe, train
  num_pairs, num_experts = idx_tk.size, experts.w_gate_edh.shape[0]
  # The batched strategy gathers weights per block: larger blocks, fewer copies.
  cap = 128 if dropless.blocked_strategy() == "loop" else 256
  return dropless.dispatch_with(
      x_td, idx_tk, weight_tk, experts, backend=dropless.auto_backend(),
      block_size=dropless.auto_block_size(num_pairs, num_experts, cap))


def get(impl: str):
  """The dispatch function of `moe.impl` ("auto" also chooses the backend)."""
  if impl == "auto":
    return _auto
  if impl not in _REGISTRY:
    raise ValueError(f"config.model.moe.impl={impl!r}: no such dispatch; "
                     f"available: {sorted(_REGISTRY)} or 'auto'")
  return _REGISTRY[impl]


__all__ = ["DispatchResult", "ExpertWeights", "auto_backend", "get", "resolve_impl"]
