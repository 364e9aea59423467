"""Grouped matmuls on NVIDIA (and AMD) GPUs (Pallas Triton).

gmm   one program per (column tile, m-tile): loops over the local groups
      whose rows meet its m-tile (metadata.tile_groups; one group unless the
      tile straddles a boundary), and for each one over k, loading only that
      group's rows of lhs (masked loads; other rows read as 0) against the
      group's weights, into one float32 accumulator; then stores the whole
      tile, so rows of no local group come out 0.
tgmm  one program per (local group, k-tile, n-tile) of drhs: loops over the
      group's rows tm at a time (masked at both ends of the range), summing
      lhs[rows]^T @ dout[rows] in float32; an empty group stores zeros.

Triton's grid is static: every m-tile and every local group has a program;
the loops have dynamic trip counts. All arrays stay in global memory (whole
array blocks) and programs load their tiles with pl.ds slices and masks.
Block sides are powers of two >= 16 (tiling.gpu_tiles).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gmm import metadata
from pallas_kernels.gmm.tiling import Tiling, gpu_tiles


def _whole(shape):
  """A block spec of the whole array (the program indexes it itself)."""
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _mask(rows_ok, cols_ok, shape):
  """The [r, c] load/store mask from optional row and column masks (None: all in)."""
  parts = [x for x in (None if rows_ok is None else rows_ok[:, None],
                       None if cols_ok is None else cols_ok[None, :]) if x is not None]
  if not parts:
    return None
  return jnp.broadcast_to(parts[0] & parts[1] if len(parts) == 2 else parts[0], shape)


def _inside(start, size: int, bound: int):
  """Mask of start + [0, size) < bound, or None when every tile fits (static)."""
  if bound % size == 0:
    return None
  return start + jnp.arange(size, dtype=jnp.int32) < bound


def _gmm_kernel(first_ref, count_ref, start_ref, end_ref, lhs_ref, rhs_ref, out_ref, *,
                tm: int, tk: int, tn: int, transpose_rhs: bool):
  ni, ti = pl.program_id(0), pl.program_id(1)
  (m, k), n = lhs_ref.shape, out_ref.shape[1]
  rows = ti * tm + jnp.arange(tm, dtype=jnp.int32)
  cols_ok = _inside(ni * tn, tn, n)
  row_block, col_block = pl.ds(ti * tm, tm), pl.ds(ni * tn, tn)

  def group_step(c, acc):
    g = first_ref[ti] + c
    mine = (rows >= start_ref[g]) & (rows < end_ref[g])  # [tm]: this group's rows

    def k_step(kb, acc):
      ks_ok, k_block = _inside(kb * tk, tk, k), pl.ds(kb * tk, tk)
      x = plgpu.load(lhs_ref.at[row_block, k_block], mask=_mask(mine, ks_ok, (tm, tk)),
                     other=0.0)  # [tm, tk]; other groups' rows read as 0
      if transpose_rhs:  # rhs[g] is [n, k]
        w_mask = _mask(cols_ok, ks_ok, (tn, tk))
        w = plgpu.load(rhs_ref.at[g, col_block, k_block], mask=w_mask,
                       other=None if w_mask is None else 0.0)
        dims = (((1,), (1,)), ((), ()))
      else:
        w_mask = _mask(ks_ok, cols_ok, (tk, tn))
        w = plgpu.load(rhs_ref.at[g, k_block, col_block], mask=w_mask,
                       other=None if w_mask is None else 0.0)
        dims = (((1,), (0,)), ((), ()))
      return acc + jax.lax.dot_general(x, w, dims, precision=_precision(x),
                                       preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(0, pl.cdiv(k, tk), k_step, acc)

  acc = jax.lax.fori_loop(0, count_ref[ti], group_step, jnp.zeros((tm, tn), jnp.float32))
  plgpu.store(out_ref.at[row_block, col_block], acc.astype(out_ref.dtype),
              mask=_mask(_inside(ti * tm, tm, m), cols_ok, (tm, tn)))


def _precision(x):
  """float32 products in full float32 (Triton's default for them is TF32, ~1e-3
  relative error); 16-bit inputs as they are."""
  return jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


def gmm(lhs, rhs, group_sizes, *, group_offset=0, tiling: Tiling = Tiling(),
        preferred_element_type=None, transpose_rhs: bool = False, interpret: bool = False):
  """out[m, n]: lhs rows of local group l times rhs[l]; other rows 0 (as kernel_tpu.gmm)."""
  (m, k), num_local = lhs.shape, rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  tm, tk, tn, warps, stages = gpu_tiles(tiling, m, k, n, lhs.dtype.itemsize)
  ranges = metadata.local_ranges(group_sizes, m, group_offset, num_local)
  tiles = metadata.tile_groups(ranges, m, tm)
  kernel = functools.partial(_gmm_kernel, tm=tm, tk=tk, tn=tn, transpose_rhs=transpose_rhs)
  operands = (tiles.first_j, tiles.count_j, ranges.start_l, ranges.end_l, lhs, rhs)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(pl.cdiv(n, tn), pl.cdiv(m, tm)),
      in_specs=[_whole(x.shape) for x in operands],
      out_specs=_whole((m, n)),
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
      cost_estimate=pl.CostEstimate(
          flops=2 * m * k * n, transcendentals=0,
          bytes_accessed=(m * k + num_local * k * n) * lhs.dtype.itemsize
          + m * n * out_dtype.itemsize),
      interpret=interpret,
      name="dsmoe_gmm_gpu")(*operands)


def _tgmm_kernel(start_ref, end_ref, lhs_ref, dout_ref, out_ref, *, tm: int, tk: int, tn: int):
  ki, ni, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  k, n = lhs_ref.shape[1], dout_ref.shape[1]
  ks_ok, cols_ok = _inside(ki * tk, tk, k), _inside(ni * tn, tn, n)
  k_block, col_block = pl.ds(ki * tk, tk), pl.ds(ni * tn, tn)
  start, end = start_ref[g], end_ref[g]

  def row_step(r, acc):
    mine = start + r * tm + jnp.arange(tm, dtype=jnp.int32) < end  # [tm]
    row_block = pl.ds(start + r * tm, tm)
    x = plgpu.load(lhs_ref.at[row_block, k_block], mask=_mask(mine, ks_ok, (tm, tk)),
                   other=0.0)  # [tm, tk]
    d = plgpu.load(dout_ref.at[row_block, col_block], mask=_mask(mine, cols_ok, (tm, tn)),
                   other=0.0)  # [tm, tn]
    return acc + jax.lax.dot_general(x, d, (((0,), (0,)), ((), ())), precision=_precision(x),
                                     preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, pl.cdiv(end - start, tm), row_step,
                          jnp.zeros((tk, tn), jnp.float32))
  plgpu.store(out_ref.at[g, k_block, col_block], acc.astype(out_ref.dtype),
              mask=_mask(ks_ok, cols_ok, (tk, tn)))


def tgmm(lhs, dout, group_sizes, *, group_offset=0, num_local_groups: int,
         tiling: Tiling = Tiling(), preferred_element_type=None, interpret: bool = False):
  """drhs[L, k, n]: per local group, lhs[rows]^T @ dout[rows] (0 if empty)."""
  (m, k), n = lhs.shape, dout.shape[1]
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  tm, tk, tn, warps, stages = gpu_tiles(tiling, m, k, n, lhs.dtype.itemsize, transposed=True)
  ranges = metadata.local_ranges(group_sizes, m, group_offset, num_local_groups)
  kernel = functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn)
  operands = (ranges.start_l, ranges.end_l, lhs, dout)
  out_shape = (num_local_groups, k, n)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(out_shape, out_dtype),
      grid=(pl.cdiv(k, tk), pl.cdiv(n, tn), num_local_groups),
      in_specs=[_whole(x.shape) for x in operands],
      out_specs=_whole(out_shape),
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
      cost_estimate=pl.CostEstimate(
          flops=2 * m * k * n, transcendentals=0,
          bytes_accessed=(m * k + m * n) * lhs.dtype.itemsize
          + num_local_groups * k * n * out_dtype.itemsize),
      interpret=interpret,
      name="dsmoe_tgmm_gpu")(*operands)
