"""Dropless dispatch: sort (token, slot) pairs by expert, grouped SwiGLU, unsort.

    dispatch(x_td, idx_tk, weight_tk, experts, *, backend, strategy, block_size)

Steps:
  1. layout: the T*K pairs sorted by expert (stable); for the "blocked"
     backend each expert's rows are padded to a multiple of the block size R;
  2. backend "blocked", strategy "loop" (expert_loop.py): one fused loop over
     the experts that gathers each expert's token rows (as one chunk of up
     to ~1.25x the mean rows per expert, :func:`loop_chunk_sizes`), runs
     its SwiGLU and scatter-adds gate * output into y_td, with a
     hand-written backward loop; no permuted buffer exists; strategy
     "kernel" (cpu_kernel.py): the same computation as a C++ XLA:CPU
     custom call, the experts spread over the cores (float32; other dtypes
     run "loop");
  2'. otherwise: permute the token rows into a buffer x_pd [P, D]; grouped
     SwiGLU (backend "blocked", strategy "batched": batched matmuls with
     per-block gathered weights, block_batched.py; backend "ragged_dot":
     lax.ragged_dot on the unpadded sorted rows; backend "pallas": the
     grouped-matmul kernels of pallas_kernels/gmm on the block-padded rows,
     one kernel per projection, Mosaic on TPU and Triton on GPU, chosen by
     the lowering platform; on CPU they run in the Pallas interpreter, which
     is slow and meant for tests); combine: gather each pair's row back and
     sum with the gate weights (gather-only backwards, permute.py).

"auto" settings are resolved from the platform the computation is traced
for (`jax.default_backend()`): backend "ragged_dot" on TPU (a native grouped
matmul there), "blocked" elsewhere (XLA's ragged_dot densifies on CPU and
GPU); "pallas" only on the platforms in AUTO_PALLAS_PLATFORMS, empty until a
benchmark on that hardware shows the kernels faster (docs/BENCHMARKS.md);
strategy "kernel" on CPU where it builds (else "loop"), "batched"
elsewhere (kernel launches); block size
from the shape (:func:`auto_block_size`; 128 for "pallas").

No token is ever dropped and every shape is static.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp

from dsmoe.dispatch import block_batched
from dsmoe.dispatch import layout as layout_lib
from dsmoe.dispatch.common import DispatchResult, ExpertWeights, cast, no_drops
from dsmoe.dispatch import cpu_kernel
from dsmoe.dispatch import expert_loop
from dsmoe.dispatch.permute import combine, permute
from pallas_kernels import gmm as pallas_gmm

BACKENDS = ("blocked", "ragged_dot", "pallas")
STRATEGIES = ("loop", "kernel", "batched")
# Strategies that run the experts over a blocked layout one expert at a time:
# the fused XLA loop (expert_loop.py) and the C++ CPU kernel (cpu_kernel.py),
# which falls back to the loop where it does not apply (not float32).
LOOP_STRATEGIES = ("loop", "kernel")
# Platforms where "auto" picks the Pallas kernels. Empty: they have not been
# measured on a GPU or TPU yet (docs/BENCHMARKS.md, "Pallas kernels").
AUTO_PALLAS_PLATFORMS: tuple[str, ...] = ()
PALLAS_BLOCK = 128  # rows per block (and kernel row tile) of "pallas" by default


def resolve_backend(backend: str, platform: str | None = None) -> str:
  """"auto" -> the fastest grouped matmul measured on `platform` (default: current)."""
  if backend != "auto":
    return backend
  platform = platform or jax.default_backend()
  if platform in AUTO_PALLAS_PLATFORMS:
    return "pallas"
  return "ragged_dot" if platform == "tpu" else "blocked"


def resolve_strategy(strategy: str, platform: str | None = None) -> str:
  """"auto" -> "kernel" on CPU where the C++ kernel builds, else "loop"; "batched"
  elsewhere.

  "kernel" (cpu_kernel.py) runs each expert's rows with OpenBLAS, the experts
  spread over the cores; float32 only (other dtypes run "loop"). "loop"
  (expert_loop.py) is the same computation in XLA: it moves the least memory
  but runs small ops one at a time. "batched" (block_batched.py) runs a few
  large kernels on a materialised [G, R, D] buffer: meant for GPUs (kernel
  launches).
  """
  platform = platform or jax.default_backend()
  if strategy == "kernel":
    if platform != "cpu":
      raise ValueError(f"config.model.moe.gmm_strategy='kernel' runs on CPU only, not on "
                       f"{platform}; use 'auto'")
    if not cpu_kernel.available():
      raise ValueError("config.model.moe.gmm_strategy='kernel': the CPU kernel is unavailable "
                       f"here ({cpu_kernel.unavailable_reason()}); use 'auto' or 'loop'")
  if strategy != "auto":
    return strategy
  if platform != "cpu":
    return "batched"
  if cpu_kernel.available():
    return "kernel"
  _warn_no_kernel(cpu_kernel.unavailable_reason())
  return "loop"


@functools.cache
def _warn_no_kernel(reason: str) -> None:
  """One log line per reason: "auto" runs the slower XLA loop on this CPU."""
  logging.getLogger(__name__).warning(
      "dsmoe: the CPU expert kernel is unavailable (%s); the routed experts run the "
      "slower XLA loop (gmm_strategy 'loop')", reason)


LOOP_MAX_CHUNK = 1024  # rows: an expert with more rows runs several chunks
LOOP_MAX_BRANCHES = 32  # chunk sizes R, 2R, ..., 32R: one compiled branch each
LOOP_CHUNK_OVER_MEAN = 1.25  # a chunk holds the mean rows per expert + 25%


def loop_target(num_pairs: int, num_experts: int) -> int:
  """The rows one chunk of the loop should hold: a fairly loaded expert's
  (the mean rows per expert + 25%), at most LOOP_MAX_CHUNK."""
  return min(LOOP_MAX_CHUNK, max(1, math.ceil(LOOP_CHUNK_OVER_MEAN * num_pairs / num_experts)))


def auto_block_size(num_pairs: int, num_experts: int, strategy: str) -> int:
  """Rows per block R (each expert's rows are padded to a multiple of R).

  "loop": the smallest power of two >= 8 that splits a chunk of
  :func:`loop_target` rows into at most LOOP_MAX_BRANCHES blocks (the
  mean expert then runs as one chunk; its padding is below R rows). At the
  default shape (T*K = 24576 pairs, 64 experts) that is R = 16 and chunks
  of up to 480 rows (30 sizes). 32 sizes rather than 16 halve the padding
  rows for ~1.5 s more compile time per MoE layer (docs/BENCHMARKS.md, "M12,
  fourth look"). "batched": a power of two >= 8 near the mean rows per
  expert, at most 256 (each block gathers a copy of its expert's weights,
  so larger blocks pay off).
  """
  if strategy in LOOP_STRATEGIES:
    return loop_block_size(loop_target(num_pairs, num_experts))
  per_expert = max(1, num_pairs // num_experts)
  return int(min(256, max(8, 1 << (per_expert.bit_length() - 1))))


def resolve_block_size(block_size: int, num_pairs: int, num_experts: int,
                       strategy: str) -> int:
  """`block_size`, or (0) the one :func:`auto_block_size` picks."""
  return block_size or auto_block_size(num_pairs, num_experts, strategy)


def loop_block_size(chunk_rows: int) -> int:
  """The smallest power of two >= 8 that cuts `chunk_rows` into at most
  LOOP_MAX_BRANCHES blocks."""
  per_branch = math.ceil(min(chunk_rows, LOOP_MAX_CHUNK) / LOOP_MAX_BRANCHES)
  return max(8, 1 << (per_branch - 1).bit_length())


def loop_chunk_sizes(block: int, chunk_rows: int) -> tuple[int, ...]:
  """The chunk sizes R, 2R, ..., L of the fused loop (expert_loop.py): L is
  `chunk_rows` rounded up to a multiple of R, at most LOOP_MAX_BRANCHES * R."""
  blocks = max(1, min(math.ceil(chunk_rows / block), LOOP_MAX_BRANCHES))
  return tuple(block * i for i in range(1, blocks + 1))


def ragged_swiglu(x_pd, group_sizes_e, experts: ExpertWeights):
  """SwiGLU where consecutive row groups use consecutive experts (lax.ragged_dot)."""
  g = jax.lax.ragged_dot(x_pd, experts.w_gate_edf, group_sizes_e)  # [P,F]
  u = jax.lax.ragged_dot(x_pd, experts.w_up_edf, group_sizes_e)  # [P,F]
  return jax.lax.ragged_dot(jax.nn.silu(g) * u, experts.w_down_efd, group_sizes_e)  # [P,D]


def pallas_swiglu(x_pd, group_sizes_e, experts: ExpertWeights, tiling: pallas_gmm.Tiling):
  """SwiGLU where consecutive row groups use consecutive experts (Pallas gmm)."""
  g = pallas_gmm.gmm(x_pd, experts.w_gate_edf, group_sizes_e, tiling=tiling)  # [P,F]
  u = pallas_gmm.gmm(x_pd, experts.w_up_edf, group_sizes_e, tiling=tiling)  # [P,F]
  return pallas_gmm.gmm(jax.nn.silu(g) * u, experts.w_down_efd, group_sizes_e,
                        tiling=tiling)  # [P,D]


def loop_over_layout(x_td, weight_tk, w: ExpertWeights, lay, block: int,
                     expected_pairs: int, strategy: str = "loop"):
  """The fused loop (expert_loop.py; strategy "kernel": the CPU kernel where it
  applies) over the experts of `w` on a blocked layout; chunks sized for
  `expected_pairs` pairs spread over those experts (the weights stay in their
  own dtype: the loop casts them per expert)."""
  num_experts = w.w_gate_edf.shape[0]
  rows = min(loop_target(expected_pairs, num_experts), lay.token_p.shape[0] // block * block)
  return expert_loop.run_layout(x_td, weight_tk, w, lay, loop_chunk_sizes(block, rows),
                                kernel=strategy == "kernel")


def _permuted(x_td, idx_tk, weight_tk, w: ExpertWeights, block: int, backend: str):
  """Permute into x_pd, grouped SwiGLU (blocked/batched or ragged_dot), combine."""
  num_experts = w.w_gate_edf.shape[0]
  lay = layout_lib.blocked_layout(idx_tk, num_experts, block)
  x_pd = permute(x_td, lay.token_p, lay.row_tk, may_drop=False)  # [P,D]
  if backend == "blocked":
    y_pd = block_batched.swiglu_over_blocks(x_pd, lay.block_end_e, w, block)  # [P,D]
  elif backend == "pallas":  # experts' rows padded to whole blocks = kernel row tiles
    blocks_e = jnp.diff(lay.block_end_e, prepend=0)  # [E]
    y_pd = pallas_swiglu(x_pd, blocks_e * block, w, pallas_gmm.Tiling(tm=block))  # [P,D]
  else:
    sizes_e = jnp.bincount(idx_tk.reshape(-1), length=num_experts).astype(jnp.int32)
    y_pd = ragged_swiglu(x_pd, sizes_e, w)  # [P,D]
  return combine(y_pd, weight_tk, lay.row_tk, lay.token_p, lay.pair_p, may_drop=False)


def dispatch(x_td, idx_tk, weight_tk, experts: ExpertWeights, *, backend: str = "auto",
             strategy: str = "auto", block_size: int = 0) -> DispatchResult:
  """y_td = sum_k weight_tk * FFN_{idx_tk}(x_td), nothing dropped.

  backend: "auto", "blocked", "ragged_dot" or "pallas"; strategy ("blocked"
  only): "auto", "loop", "kernel" or "batched"; block_size ("blocked", "pallas"): rows
  per block, 0 to choose from the shape ("pallas": a power of two >= 16).
  """
  backend = resolve_backend(backend)
  if backend not in BACKENDS:
    raise ValueError(f"config.model.moe.gmm_backend={backend!r}: no such grouped "
                     f"matmul; use one of {['auto', *BACKENDS]}")
  w = cast(experts, x_td.dtype)
  if backend == "ragged_dot":
    y_td = _permuted(x_td, idx_tk, weight_tk, w, 1, backend)  # 1: sorted, no padding
  elif backend == "pallas":
    y_td = _permuted(x_td, idx_tk, weight_tk, w, block_size or PALLAS_BLOCK, backend)
  else:
    strategy = resolve_strategy(strategy)
    block = resolve_block_size(block_size, idx_tk.size, w.w_gate_edf.shape[0], strategy)
    if strategy in LOOP_STRATEGIES:  # casts each expert's weights itself
      lay = layout_lib.blocked_layout(idx_tk, w.w_gate_edf.shape[0], block)
      y_td = loop_over_layout(x_td, weight_tk, experts, lay, block, idx_tk.size, strategy)
    else:
      y_td = _permuted(x_td, idx_tk, weight_tk, w, block, backend)
  return DispatchResult(y_td, no_drops())
