"""Grouped matmuls on TPU (Pallas Mosaic).

gmm   out[m,n]    = lhs[m,k] @ rhs[group(row)]      grid (n-tiles, visits, k-tiles)
tgmm  drhs[L,k,n] = lhs[rows of g]^T @ dout[rows]   grid (k-tiles, n-tiles, visits)

The visit list (metadata.visit_schedule) lives in scalar prefetch (SMEM), so
the block index maps read the m-tile and group of each grid step from it, and
the grid's visit dimension is its dynamic length: only live visits run. A
visit computes the whole tile in float32 (VMEM scratch) and keeps the rows of
its group, [lo, hi): a tile shared by two groups is computed once per group.

gmm: the output block (an m-tile) stays in VMEM while consecutive visits
write their rows into it; the first visit of a tile zeroes the rows no local
group owns. With tk = k (the default) a group's weight block keeps its block
index from one of the group's tiles to the next, so it is fetched once per
group and column tile. tgmm: the float32 accumulator of a group's [tk, tn]
block sums the masked row tiles of that group, and is stored at its last
visit (an empty group's single visit stores zeros). Idle visits (no row to
compute) point their input blocks at the nearest live visit's, so they cost
no DMA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gmm import metadata
from pallas_kernels.gmm.tiling import Tiling, tpu_gmm_tiles, tpu_tgmm_tiles


def _precision(dtype):
  """float32 inputs: full-precision MXU passes; 16-bit inputs: the default one."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _mask_k_tail(x, axis: int, k_left):
  """Zero the entries along `axis` at or past `k_left` (the ragged last k tile).

  The select runs in float32 (older TPUs have no 16-bit vector unit).
  """
  idx = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
  return jnp.where(idx < k_left, x.astype(jnp.float32), 0.0).astype(x.dtype)


def _gmm_kernel(tile_v, group_v, lo_v, hi_v, ftile_v, fgroup_v, lhs_ref, rhs_ref, out_ref,
                acc_ref, *, k: int, tk: int, transpose_rhs: bool):
  del group_v, ftile_v, fgroup_v
  v, ki = pl.program_id(1), pl.program_id(2)
  tiles_k = pl.num_programs(2)
  lo, hi = lo_v[v], hi_v[v]

  @pl.when(ki == 0)
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(hi > lo)
  def _accumulate():
    x, w = lhs_ref[...], rhs_ref[...]
    if k % tk:
      x = _mask_k_tail(x, 1, k - ki * tk)
      w = _mask_k_tail(w, 1 if transpose_rhs else 0, k - ki * tk)
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    acc_ref[...] += jax.lax.dot_general(x, w, dims, precision=_precision(x.dtype),
                                        preferred_element_type=jnp.float32)

  @pl.when(ki == tiles_k - 1)
  def _store():
    tm = acc_ref.shape[0]
    rows = tile_v[v] * tm + jax.lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
    mine = (rows >= lo) & (rows < hi)
    first = (v == 0) | (tile_v[v] != tile_v[jnp.maximum(v - 1, 0)])
    kept = jnp.where(first, 0.0, out_ref[...].astype(jnp.float32))
    out_ref[...] = jnp.where(mine, acc_ref[...], kept).astype(out_ref.dtype)


def gmm(lhs, rhs, group_sizes, *, group_offset=0, tiling: Tiling = Tiling(),
        preferred_element_type=None, transpose_rhs: bool = False, interpret: bool = False):
  """out[m, n]: lhs rows of local group l times rhs[l]; other rows 0.

  rhs is [L, k, n], or [L, n, k] with `transpose_rhs` (the d_lhs product).
  """
  (m, k), num_local = lhs.shape, rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  tm, tk, tn, vmem = tpu_gmm_tiles(tiling, m, k, n, lhs.dtype.itemsize, out_dtype.itemsize)
  tiles_k, tiles_n = pl.cdiv(k, tk), pl.cdiv(n, tn)
  ranges = metadata.local_ranges(group_sizes, m, group_offset, num_local)
  s = metadata.visit_schedule(ranges, m, tm)

  def idle_k(v, ki, lo_v, hi_v):
    """An idle visit keeps the k block of the live visit before it (no DMA)."""
    return jnp.where(hi_v[v] > lo_v[v], ki, tiles_k - 1)

  def lhs_map(ni, v, ki, tile_v, group_v, lo_v, hi_v, ftile_v, fgroup_v):
    return ftile_v[v], idle_k(v, ki, lo_v, hi_v)

  def rhs_map(ni, v, ki, tile_v, group_v, lo_v, hi_v, ftile_v, fgroup_v):
    kk = idle_k(v, ki, lo_v, hi_v)
    return (fgroup_v[v], ni, kk) if transpose_rhs else (fgroup_v[v], kk, ni)

  def out_map(ni, v, ki, tile_v, group_v, lo_v, hi_v, ftile_v, fgroup_v):
    return tile_v[v], ni

  rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  kernel = functools.partial(_gmm_kernel, k=k, tk=tk, transpose_rhs=transpose_rhs)
  call = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=6,
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
          out_specs=pl.BlockSpec((tm, tn), out_map),
          grid=(tiles_n, s.num_visits[0], tiles_k),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary"), vmem_limit_bytes=vmem),
      cost_estimate=pl.CostEstimate(
          flops=2 * m * k * n, transcendentals=0,
          bytes_accessed=(m * k * tiles_n + num_local * k * n) * lhs.dtype.itemsize
          + m * n * out_dtype.itemsize),
      interpret=interpret,
      name="dsmoe_gmm_tpu")
  return call(s.tile_v, s.group_v, s.lo_v, s.hi_v, s.fetch_tile_v, s.fetch_group_v, lhs, rhs)


def _tgmm_kernel(base_ref, tile_v, group_v, lo_v, hi_v, ftile_v, lhs_ref, dout_ref, out_ref,
                 acc_ref):
  del ftile_v
  i = pl.program_id(2)
  last_i = pl.num_programs(2) - 1
  v = base_ref[0] + i
  size_v = group_v.shape[0]
  first = (i == 0) | (group_v[v] != group_v[jnp.maximum(v - 1, 0)])
  last = (i == last_i) | (group_v[v] != group_v[jnp.minimum(v + 1, size_v - 1)])
  lo, hi = lo_v[v], hi_v[v]

  @pl.when(first)
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(hi > lo)
  def _accumulate():
    tm = lhs_ref.shape[0]
    rows = tile_v[v] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    mine = (rows >= lo) & (rows < hi)  # [tm, 1]
    # Mask (in float32), transpose the lhs tile, then one plain MXU product.
    x_kt = jnp.where(mine, lhs_ref[...].astype(jnp.float32), 0.0).T  # [tk, tm]
    d = jnp.where(mine, dout_ref[...].astype(jnp.float32), 0.0)  # [tm, tn]
    acc_ref[...] += jnp.dot(x_kt.astype(lhs_ref.dtype), d.astype(dout_ref.dtype),
                            precision=_precision(lhs_ref.dtype),
                            preferred_element_type=jnp.float32)

  @pl.when(last)
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs, dout, group_sizes, *, group_offset=0, num_local_groups: int,
         tiling: Tiling = Tiling(), preferred_element_type=None, interpret: bool = False):
  """drhs[L, k, n]: per local group, lhs[rows]^T @ dout[rows] (0 if empty)."""
  (m, k), n = lhs.shape, dout.shape[1]
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  tm, tk, tn, vmem = tpu_tgmm_tiles(tiling, m, k, n, lhs.dtype.itemsize, out_dtype.itemsize)
  ranges = metadata.local_ranges(group_sizes, m, group_offset, num_local_groups)
  s = metadata.visit_schedule(ranges, m, tm)

  def lhs_map(ki, ni, i, base, tile_v, group_v, lo_v, hi_v, ftile_v):
    return ftile_v[base[0] + i], ki

  def dout_map(ki, ni, i, base, tile_v, group_v, lo_v, hi_v, ftile_v):
    return ftile_v[base[0] + i], ni

  def out_map(ki, ni, i, base, tile_v, group_v, lo_v, hi_v, ftile_v):
    return group_v[base[0] + i], ki, ni

  call = pl.pallas_call(
      _tgmm_kernel,
      out_shape=jax.ShapeDtypeStruct((num_local_groups, k, n), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=6,
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), dout_map)],
          out_specs=pl.BlockSpec((None, tk, tn), out_map),
          grid=(pl.cdiv(k, tk), pl.cdiv(n, tn), s.num_group_visits[0]),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=vmem),
      cost_estimate=pl.CostEstimate(
          flops=2 * m * k * n, transcendentals=0,
          bytes_accessed=(m * k * pl.cdiv(n, tn) + m * n * pl.cdiv(k, tk)) * lhs.dtype.itemsize
          + num_local_groups * k * n * out_dtype.itemsize),
      interpret=interpret,
      name="dsmoe_tgmm_tpu")
  return call(s.first_group_visit, s.tile_v, s.group_v, s.lo_v, s.hi_v, s.fetch_tile_v,
              lhs, dout)
