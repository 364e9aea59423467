"""Capacity dispatch (Switch / GShard): at most C pairs per expert.

    dispatch(x_td, idx_tk, weight_tk, experts, *, factor, policy, strategy)

Steps:
  1. capacity C = ceil(factor * T * K / E) (factor > 0; the caller runs the
     dropless path instead when the factor is 0, as at evaluation);
  2. layout: each pair's rank among its expert's pairs, in priority order
     (`policy`: "position" = earlier tokens first, then earlier slots;
     "score" = higher gate weight first, as DeepSeek-V2); pairs of rank >= C
     are dropped: they skip the routed experts (the caller still adds the
     residual and the shared experts);
  3. strategy "loop" (CPU; expert_loop.py): no [E, C] buffers at all: the
     kept pairs are packed by expert like dropless ones (each expert's
     min(n_e, C) rows padded to a block of R rows, R chosen so that C is at
     most dropless.LOOP_MAX_BRANCHES blocks), and the fused loop runs each
     expert's rows as one chunk: gather its token rows by index (never a
     one-hot), SwiGLU, scatter-add gate * output into y_td. An underfull
     expert costs only its rows, not C. Strategy "batched": index gather
     into x_ecd [E, C, D], batched matmuls over E, gather-back combine.
     "auto": "loop" on CPU, "batched" elsewhere.

Returns the dropped fraction = dropped pairs / (T * K).
"""

from __future__ import annotations

from dsmoe.dispatch import block_batched
from dsmoe.dispatch import layout as layout_lib
from dsmoe.dispatch.common import DispatchResult, ExpertWeights, cast
from dsmoe.dispatch import expert_loop
from dsmoe.dispatch.dropless import (LOOP_STRATEGIES, loop_block_size, loop_chunk_sizes,
                                     resolve_strategy)
from dsmoe.dispatch.permute import combine, permute


def dispatch(x_td, idx_tk, weight_tk, experts: ExpertWeights, *, factor: float,
             policy: str = "position", strategy: str = "auto") -> DispatchResult:
  """Capacity dispatch with capacity factor `factor` > 0 and drop `policy`."""
  if factor <= 0:
    raise ValueError(f"capacity dispatch needs a capacity factor > 0, got {factor}")
  t, k = x_td.shape[0], idx_tk.shape[1]
  num_experts = experts.w_gate_edf.shape[0]
  cap = layout_lib.capacity(t, k, num_experts, factor)
  strategy = resolve_strategy(strategy)
  if strategy in LOOP_STRATEGIES:
    block = loop_block_size(cap)
    lay = layout_lib.blocked_layout(idx_tk, num_experts, block, cap=cap, weight_tk=weight_tk,
                                    policy=policy)  # kept pairs packed, no [E, C] buffers
    sizes = loop_chunk_sizes(block, cap)  # one chunk per expert (C <= 16 R)
    y_td = expert_loop.run_layout(x_td, weight_tk, experts, lay, sizes,
                                  kernel=strategy == "kernel")  # [T,D]
  else:  # "batched": the [E, C, D] buffer, batched matmuls over E
    w = cast(experts, x_td.dtype)
    lay = layout_lib.capacity_layout(idx_tk, weight_tk, num_experts, cap, policy)
    x_pd = permute(x_td, lay.token_p, lay.row_tk, may_drop=True)  # [E*C,D]
    y_ecd = block_batched.block_swiglu(x_pd.reshape(num_experts, cap, -1), w)  # [E,C,D]
    y_td = combine(y_ecd.reshape(x_pd.shape), weight_tk, lay.row_tk, lay.token_p,
                   lay.pair_p, may_drop=True)  # [T,D]
  return DispatchResult(y_td, lay.dropped / (t * k))
