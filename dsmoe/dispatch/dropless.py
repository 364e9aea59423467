"""Dropless dispatch: sort (token, slot) pairs by expert, grouped SwiGLU, unsort.

    dispatch(x_td, idx_tk, weight_tk, experts, *, backend, strategy, block_size)

Steps:
  1. layout: the T*K pairs sorted by expert (stable); for the "blocked"
     backend each expert's rows are padded to a multiple of the block size R;
  2. backend "blocked", strategy "loop" (expert_loop.py): one fused loop over
     the single-expert blocks that gathers each block's token rows, runs the
     expert's SwiGLU and scatter-adds gate * output into y_td, with a
     hand-written backward loop; no permuted buffer exists;
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
strategy "loop" on CPU, "batched" elsewhere (kernel launches); block size
from the shape (:func:`auto_block_size`; 128 for "pallas").

No token is ever dropped and every shape is static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsmoe.dispatch import block_batched
from dsmoe.dispatch import layout as layout_lib
from dsmoe.dispatch.common import DispatchResult, ExpertWeights, cast, gate_per_row, no_drops
from dsmoe.dispatch.expert_loop import expert_loop
from dsmoe.dispatch.permute import combine, permute
from pallas_kernels import gmm as pallas_gmm

BACKENDS = ("blocked", "ragged_dot", "pallas")
STRATEGIES = ("loop", "batched")
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
  """"auto" -> "loop" on CPU, "batched" elsewhere.

  "loop" (expert_loop.py) moves the least memory but runs small ops per
  block: best on a CPU. "batched" (block_batched.py) runs a few large kernels
  on a materialised [G, R, D] buffer: meant for GPUs (kernel launches).
  """
  if strategy != "auto":
    return strategy
  platform = platform or jax.default_backend()
  return "loop" if platform == "cpu" else "batched"


def auto_block_size(num_pairs: int, num_experts: int, strategy: str) -> int:
  """Rows per block: a cap (128 for "loop", 256 for "batched"), or less when
  experts get fewer rows (a power of two >= 8 near the mean rows per expert).

  Measured on a 2-core CPU (T*K=24576 rows, 64 experts, D=512, F=256): 128
  beats 64 (smaller matmuls) and 256 (more padding) by ~5-10% in the loop;
  "batched" gathers one weight copy per block, so larger blocks pay off.
  """
  cap = 128 if strategy == "loop" else 256
  per_expert = max(1, num_pairs // num_experts)
  return int(min(cap, max(8, 1 << (per_expert.bit_length() - 1))))


def resolve_block_size(block_size: int, num_pairs: int, num_experts: int,
                       strategy: str) -> int:
  """`block_size`, or (0) the one :func:`auto_block_size` picks."""
  return block_size or auto_block_size(num_pairs, num_experts, strategy)


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


def _loop(x_td, idx_tk, weight_tk, w: ExpertWeights, block: int):
  """Backend "blocked", strategy "loop": layout, then the fused loop."""
  lay = layout_lib.blocked_layout(idx_tk, w.w_gate_edf.shape[0], block)
  weight_gr = gate_per_row(weight_tk, lay.pair_p).reshape(-1, block)  # [G,R]
  return expert_loop(x_td, weight_gr, w, lay.token_p.reshape(-1, block),
                     lay.block_end_e)  # [T,D]


def _permuted(x_td, idx_tk, weight_tk, w: ExpertWeights, block: int, backend: str):
  """Permute into x_pd, grouped SwiGLU (blocked/batched or ragged_dot), combine."""
  num_experts = w.w_gate_edf.shape[0]
  lay = layout_lib.blocked_layout(idx_tk, num_experts, block)
  x_pd = permute(x_td, lay.token_p, lay.row_tk, may_drop=False)  # [P,D]
  if backend == "blocked":
    x_grd = x_pd.reshape(-1, block, x_pd.shape[-1])  # [G,R,D]
    w_g = block_batched.per_block(w, block_batched.block_experts(lay.block_end_e,
                                                                 x_grd.shape[0]))
    y_pd = block_batched.block_swiglu(x_grd, w_g).reshape(x_pd.shape)  # [P,D]
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
  only): "auto", "loop" or "batched"; block_size ("blocked", "pallas"): rows
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
    if strategy == "loop":
      y_td = _loop(x_td, idx_tk, weight_tk, w, block)
    else:
      y_td = _permuted(x_td, idx_tk, weight_tk, w, block, backend)
  return DispatchResult(y_td, no_drops())
