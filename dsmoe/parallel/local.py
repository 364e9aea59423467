"""The routed experts of one device: the seam between expert parallelism and
the grouped matmul.

    local_dispatch(x_td, idx_tk, weight_tk, experts, *, first_expert, ...)

computes sum_k weight * FFN_{idx - first_expert}(x) over the (token, slot)
pairs whose expert is one of this device's E_l experts
[first_expert, first_expert + E_l); every other pair adds 0 and gets a zero
gate gradient. It runs the XLA dropless paths of dsmoe.dispatch.dropless on
a layout with one extra "elsewhere" group sorted last:

  * blocked / loop (CPU): the loop visits only the local experts' blocks, so
    pairs of other devices cost nothing but their layout entries;
  * ragged_dot (TPU): group sizes of the local experts only; the rows of the
    "elsewhere" group come out as zeros without being computed;
  * pallas (pallas_kernels/gmm): the same on block-padded rows; the kernels
    skip rows past the local groups;
  * blocked / batched (GPU): every buffer block is computed, those of the
    "elsewhere" group with zero gates (wasted work under the allgather
    exchange; "pallas" avoids it).
"""

from __future__ import annotations

import jax.numpy as jnp

from dsmoe.dispatch import block_batched
from dsmoe.dispatch import dropless
from dsmoe.dispatch import layout as layout_lib
from dsmoe.dispatch.common import ExpertWeights, cast
from dsmoe.dispatch.permute import combine, permute


def _here(idx_tk, weight_tk, first_expert, num_local: int):
  """Local expert ids (num_local = "elsewhere") and gates (0 elsewhere)."""
  here = (idx_tk >= first_expert) & (idx_tk < first_expert + num_local)
  return (jnp.where(here, idx_tk - first_expert, num_local).astype(jnp.int32),
          jnp.where(here, weight_tk, jnp.zeros_like(weight_tk)))


def _grouped(x_td, idx_tk, weight_tk, w: ExpertWeights, num_local: int, backend: str,
             block: int):
  """ragged_dot (block 1: plain sorted rows) or the Pallas gmm (block-padded)."""
  lay = layout_lib.blocked_layout(idx_tk, num_local + 1, block)  # "elsewhere" last
  x_pd = permute(x_td, lay.token_p, lay.row_tk, may_drop=False)  # [P,D]
  rows_e = jnp.diff(lay.block_end_e[:num_local], prepend=0) * block  # [E_l] local rows
  if backend == "pallas":
    y_pd = dropless.pallas_swiglu(x_pd, rows_e, w, dropless.pallas_gmm.Tiling(tm=block))
  else:
    y_pd = dropless.ragged_swiglu(x_pd, rows_e, w)  # [P,D]; "elsewhere" rows: 0
  return combine(y_pd, weight_tk, lay.row_tk, lay.token_p, lay.pair_p, may_drop=False)


def _blocked(x_td, idx_tk, weight_tk, experts: ExpertWeights, num_local: int, block: int,
             strategy: str, expected_pairs: int):
  lay = layout_lib.blocked_layout(idx_tk, num_local + 1, block)  # "elsewhere" last
  if strategy in dropless.LOOP_STRATEGIES:  # over the experts of `experts`: the local ones
    return dropless.loop_over_layout(x_td, weight_tk, experts, lay, block, expected_pairs,
                                     strategy)
  x_pd = permute(x_td, lay.token_p, lay.row_tk, may_drop=False)  # [P,D]
  y_pd = block_batched.swiglu_over_blocks(x_pd, lay.block_end_e[:num_local],
                                          cast(experts, x_td.dtype), block)  # [P,D]
  return combine(y_pd, weight_tk, lay.row_tk, lay.token_p, lay.pair_p, may_drop=False)


def local_dispatch(x_td, idx_tk, weight_tk, experts: ExpertWeights, *, first_expert,
                   backend: str = "auto", strategy: str = "auto", block_size: int = 0,
                   expected_pairs: int | None = None):
  """y_td [T, D]: the local experts' share of sum_k weight * FFN_idx(x).

  `first_expert` (int or traced scalar): global id of local expert 0;
  `expected_pairs`: about how many pairs are local (sizes the automatic
  block; default all of them).
  """
  num_local = experts.w_gate_edf.shape[0]
  idx, weight = _here(idx_tk, weight_tk, first_expert, num_local)
  backend = dropless.resolve_backend(backend)
  if backend == "ragged_dot":
    return _grouped(x_td, idx, weight, cast(experts, x_td.dtype), num_local, backend, 1)
  if backend == "pallas":
    return _grouped(x_td, idx, weight, cast(experts, x_td.dtype), num_local, backend,
                    block_size or dropless.PALLAS_BLOCK)
  strategy = dropless.resolve_strategy(strategy)
  expected_pairs = expected_pairs or idx.size
  block = dropless.resolve_block_size(block_size, expected_pairs, num_local, strategy)
  return _blocked(x_td, idx, weight, experts, num_local, block, strategy, expected_pairs)
