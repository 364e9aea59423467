"""The seam: grouped SwiGLU over an expert-sorted layout.

    swiglu(plan, x_td, weight_tk, experts, lay, block, *, target_rows, may_drop) -> y_td

Every dispatch that sorts pairs by expert (dropless, capacity, and the
expert-parallel local step) builds a layout (layout.py) with
:func:`block_for`'s block size and calls :func:`swiglu`, which computes

    y_td[t] = sum over the layout's rows r of token t: gate_r * FFN_{expert(r)}(x_td[t])

for the experts of `experts` (E_l of them; a layout may hold more groups
after them, e.g. expert parallelism's "elsewhere" group, whose rows add 0).
`plan.grouped` names the implementation (docs/MODEL.md has the table):

  "ragged_dot"  permute x_td into x_pd [P, D] (sorted, unpadded), three
                lax.ragged_dot calls, combine (a native grouped matmul on TPU);
  "pallas"      the same on block-padded rows with pallas_kernels.gmm
                (Mosaic on TPU, Triton on GPU, by the lowering platform; the
                Pallas interpreter on CPU, for tests);
  "batched"     the same with batched matmuls over single-expert blocks of
                R rows with per-block gathered weights (block_batched.py; GPU);
  "loop"        no permuted buffer: one fused XLA loop over the experts
                gathers each expert's rows, runs its SwiGLU and scatter-adds
                gate * output (expert_loop.py; CPU);
  "kernel"      the loop's computation as a C++ XLA:CPU custom call, the
                experts spread over the cores (cpu_kernel.py; opt-in, float32).

`target_rows` is about how many rows a fairly loaded expert holds (it sizes
the loop's chunks); `may_drop` says whether some pairs have no row
(capacity), which the permute/combine backward must allow for.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dsmoe.dispatch import block_batched, cpu_kernel, expert_loop
from dsmoe.dispatch.common import ExpertWeights, cast, gate_per_row
from dsmoe.dispatch.permute import combine, permute
from dsmoe.errors import ConfigError
from dsmoe.spec import ExpertPlan
from pallas_kernels import gmm as pallas_gmm

PALLAS_BLOCK = 128  # rows per block (and kernel row tile) of "pallas" by default
BATCHED_MAX_BLOCK = 256  # "batched": each block gathers a copy of its expert's weights
LOOP_MAX_CHUNK = 1024  # rows: an expert with more rows runs several chunks
LOOP_MAX_BRANCHES = 32  # the loop's chunk sizes R, 2R, ..., 32R: one compiled branch each
LOOP_CHUNK_OVER_MEAN = 1.25  # a chunk holds the mean rows per expert + 25%
LOOP_IMPLS = ("loop", "kernel")  # run one expert at a time over the layout, no buffer


def loop_target(num_pairs: int, num_experts: int) -> int:
  """The rows one chunk of the loop should hold: a fairly loaded expert's
  (the mean rows per expert + 25%), at most LOOP_MAX_CHUNK."""
  return min(LOOP_MAX_CHUNK, max(1, math.ceil(LOOP_CHUNK_OVER_MEAN * num_pairs / num_experts)))


def loop_block_size(chunk_rows: int) -> int:
  """The smallest power of two >= 8 that cuts `chunk_rows` into at most
  LOOP_MAX_BRANCHES blocks: a fairly loaded expert then runs as one chunk
  and its padding is below one block."""
  per_branch = math.ceil(min(chunk_rows, LOOP_MAX_CHUNK) / LOOP_MAX_BRANCHES)
  return max(8, 1 << (per_branch - 1).bit_length())


def loop_chunk_sizes(block: int, chunk_rows: int) -> tuple[int, ...]:
  """The chunk sizes R, 2R, ..., L of the fused loop (expert_loop.py): L is
  `chunk_rows` rounded up to a multiple of R, at most LOOP_MAX_BRANCHES * R."""
  blocks = max(1, min(math.ceil(chunk_rows / block), LOOP_MAX_BRANCHES))
  return tuple(block * i for i in range(1, blocks + 1))


def block_for(plan: ExpertPlan, num_pairs: int, num_experts: int, target_rows: int) -> int:
  """Rows per block R of the layout: 1 for "ragged_dot" (sorted, unpadded);
  else `plan.block_size`, or (0) from the shape: "pallas" PALLAS_BLOCK;
  "loop"/"kernel" :func:`loop_block_size` of `target_rows`; "batched" a power
  of two >= 8 near the mean rows per expert, at most BATCHED_MAX_BLOCK."""
  if plan.grouped == "ragged_dot":
    return 1
  if plan.block_size:
    return plan.block_size
  if plan.grouped == "pallas":
    return PALLAS_BLOCK
  if plan.grouped in LOOP_IMPLS:
    return loop_block_size(target_rows)
  per_expert = max(1, num_pairs // num_experts)
  return int(min(BATCHED_MAX_BLOCK, max(8, 1 << (per_expert.bit_length() - 1))))


def ragged_swiglu(x_pd, group_sizes_e, experts: ExpertWeights):
  """SwiGLU where consecutive row groups use consecutive experts (lax.ragged_dot);
  rows past sum(group_sizes_e) give 0."""
  g = jax.lax.ragged_dot(x_pd, experts.w_gate_edf, group_sizes_e)  # [P,F]
  u = jax.lax.ragged_dot(x_pd, experts.w_up_edf, group_sizes_e)  # [P,F]
  return jax.lax.ragged_dot(jax.nn.silu(g) * u, experts.w_down_efd, group_sizes_e)  # [P,D]


def pallas_swiglu(x_pd, group_sizes_e, experts: ExpertWeights, tiling: pallas_gmm.Tiling):
  """The same with the Pallas grouped matmul (rows past the groups: 0, skipped)."""
  g = pallas_gmm.gmm(x_pd, experts.w_gate_edf, group_sizes_e, tiling=tiling)  # [P,F]
  u = pallas_gmm.gmm(x_pd, experts.w_up_edf, group_sizes_e, tiling=tiling)  # [P,F]
  return pallas_gmm.gmm(jax.nn.silu(g) * u, experts.w_down_efd, group_sizes_e,
                        tiling=tiling)  # [P,D]


def _loop(plan, x_td, weight_tk, experts, lay, block, target_rows):
  """The fused loop or the C++ kernel over the layout (no permuted buffer)."""
  weight_p = gate_per_row(weight_tk, lay.pair_p)  # [P]; 0 for padding rows
  num_experts = experts.w_gate_edf.shape[0]
  rows_e = (lay.count_e[:num_experts] + block - 1) // block * block  # [E_l]
  start_e = lay.start_e[:num_experts]
  if plan.grouped == "kernel":
    if not cpu_kernel.supports(x_td, experts):
      raise ConfigError("config.model.moe.gmm_strategy='kernel' computes in float32; "
                        f"got {x_td.dtype} tokens: use 'loop'")
    if not cpu_kernel.available():
      raise ConfigError("config.model.moe.gmm_strategy='kernel': the CPU kernel is "
                        f"unavailable here ({cpu_kernel.unavailable_reason()}); use 'loop'")
    return cpu_kernel.expert_ffn(x_td, weight_p, experts, lay.token_p, start_e, rows_e)
  rows = min(target_rows, lay.token_p.shape[0] // block * block)
  sizes = loop_chunk_sizes(block, rows)
  return expert_loop.expert_loop(x_td, weight_p, experts, lay.token_p, start_e, rows_e, sizes)


def swiglu(plan: ExpertPlan, x_td, weight_tk, experts: ExpertWeights, lay, block: int, *,
           target_rows: int, may_drop: bool) -> jax.Array:
  """y_td [T, D]: the experts of `experts` on the rows of layout `lay` (blocks
  of `block` rows), each row's output times its gate, summed per token."""
  if plan.grouped in LOOP_IMPLS:  # the loop casts each expert's weights itself
    return _loop(plan, x_td, weight_tk, experts, lay, block, target_rows)
  num_experts = experts.w_gate_edf.shape[0]
  w = cast(experts, x_td.dtype)
  x_pd = permute(x_td, lay.token_p, lay.row_tk, may_drop=may_drop)  # [P,D]
  block_end_e = lay.block_end_e[:num_experts]  # [E_l]; later groups are not computed
  if plan.grouped == "batched":
    y_pd = block_batched.swiglu_over_blocks(x_pd, block_end_e, w, block)  # [P,D]
  else:
    rows_e = jnp.diff(block_end_e, prepend=0) * block  # [E_l] rows of each expert
    if plan.grouped == "pallas":  # experts' rows padded to whole blocks = row tiles
      y_pd = pallas_swiglu(x_pd, rows_e, w, pallas_gmm.Tiling(tm=block))  # [P,D]
    else:
      y_pd = ragged_swiglu(x_pd, rows_e, w)  # [P,D]
  return combine(y_pd, weight_tk, lay.row_tk, lay.token_p, lay.pair_p, may_drop=may_drop)
