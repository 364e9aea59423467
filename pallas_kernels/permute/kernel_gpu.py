"""Row-gather kernels of the MoE permute / unpermute on GPUs (Pallas Triton).

  gather_rows   grid (row blocks of out, column blocks): loads bp indices,
                then the [bp, bd] rows of x they name (one gather load; rows
                with an out-of-range index read 0), scales them, stores;
  combine_rows  grid (token blocks, column blocks): for each of the K slots
                (a static loop) gathers the [bt, bd] rows of y it names and
                adds them times the gate weight into a float32 tile: the
                gather, the gate scaling and the top-k sum in one pass, no
                [T, K, D] array;
  row_dots      grid (token blocks): walks D in chunks; per chunk loads dy
                once and, for each slot, the gathered rows of y, accumulating
                the K dot products per token in float32.

Meaning: reference.py. Block sides are powers of two >= 16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK_ROWS, BLOCK_COLS, WARPS = 32, 256, 4


def _whole(shape):
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _cols_block(dim: int) -> int:
  return min(BLOCK_COLS, max(16, pl.next_power_of_2(dim)))


def _call(kernel, out_shape, grid, operands, name, interpret):
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid,
      in_specs=[_whole(x.shape) for x in operands], out_specs=_whole(out_shape.shape),
      compiler_params=plgpu.CompilerParams(num_warps=WARPS, num_stages=2),
      interpret=interpret, name=name)(*operands)


def _gather_kernel(idx_ref, scale_ref, x_ref, out_ref, *, bp: int, bd: int):
  i, j = pl.program_id(0), pl.program_id(1)
  (t, d), p = x_ref.shape, idx_ref.shape[0]
  rows = i * bp + jnp.arange(bp, dtype=jnp.int32)
  cols = j * bd + jnp.arange(bd, dtype=jnp.int32)
  live = rows < p
  idx = plgpu.load(idx_ref.at[pl.ds(i * bp, bp)], mask=live, other=0)
  ok = (live & (idx >= 0) & (idx < t))[:, None] & (cols < d)[None, :]
  vals = plgpu.load(x_ref.at[idx[:, None], cols[None, :]], mask=ok, other=0.0)  # [bp, bd]
  if scale_ref is not None:
    scale = plgpu.load(scale_ref.at[pl.ds(i * bp, bp)], mask=live, other=0.0)
    vals = (vals.astype(jnp.float32) * scale[:, None].astype(jnp.float32)).astype(vals.dtype)
  plgpu.store(out_ref.at[pl.ds(i * bp, bp), pl.ds(j * bd, bd)], vals,
              mask=live[:, None] & (cols < d)[None, :])


def gather_rows(x, idx, scale=None, *, interpret: bool = False):
  """out[p] = scale[p] * x[idx[p]] (0 for an out-of-range idx)."""
  (_, d), p = x.shape, idx.shape[0]
  bd = _cols_block(d)
  if scale is None:
    kernel = lambda i, x_ref, o: _gather_kernel(i, None, x_ref, o, bp=BLOCK_ROWS, bd=bd)
    operands = (idx, x)
  else:
    kernel = functools.partial(_gather_kernel, bp=BLOCK_ROWS, bd=bd)
    operands = (idx, scale, x)
  return _call(kernel, jax.ShapeDtypeStruct((p, d), x.dtype),
               (pl.cdiv(p, BLOCK_ROWS), pl.cdiv(d, bd)), operands, "dsmoe_gather_rows_gpu",
               interpret)


def _combine_kernel(idx_ref, w_ref, y_ref, out_ref, *, bt: int, bd: int, k: int):
  """idx_ref, w_ref: the [T, K] maps flattened to [T*K] (1-D gathers per slot)."""
  i, j = pl.program_id(0), pl.program_id(1)
  (p, d), t = y_ref.shape, out_ref.shape[0]
  toks = i * bt + jnp.arange(bt, dtype=jnp.int32)
  cols = j * bd + jnp.arange(bd, dtype=jnp.int32)
  live, cols_ok = toks < t, cols < d
  acc = jnp.zeros((bt, bd), jnp.float32)
  for slot in range(k):  # static: K is small (top-k)
    idx = plgpu.load(idx_ref.at[toks * k + slot], mask=live, other=0)
    w = plgpu.load(w_ref.at[toks * k + slot], mask=live, other=0.0)
    ok = (live & (idx >= 0) & (idx < p))[:, None] & cols_ok[None, :]
    rows = plgpu.load(y_ref.at[idx[:, None], cols[None, :]], mask=ok, other=0.0)
    acc += rows.astype(jnp.float32) * w.astype(jnp.float32)[:, None]
  plgpu.store(out_ref.at[pl.ds(i * bt, bt), pl.ds(j * bd, bd)], acc.astype(out_ref.dtype),
              mask=live[:, None] & cols_ok[None, :])


def combine_rows(y, idx, w, *, interpret: bool = False):
  """out[t] = sum_k w[t, k] * y[idx[t, k]] (out-of-range rows add 0)."""
  (_, d), (t, k) = y.shape, idx.shape
  bd = _cols_block(d)
  kernel = functools.partial(_combine_kernel, bt=BLOCK_ROWS, bd=bd, k=k)
  return _call(kernel, jax.ShapeDtypeStruct((t, d), y.dtype),
               (pl.cdiv(t, BLOCK_ROWS), pl.cdiv(d, bd)), (idx.reshape(-1), w.reshape(-1), y),
               "dsmoe_combine_rows_gpu", interpret)


def _row_dots_kernel(idx_ref, y_ref, dy_ref, out_ref, *, bt: int, bd: int, k: int):
  """idx_ref and out_ref: [T, K] flattened to [T*K]."""
  i = pl.program_id(0)
  (p, d), t = y_ref.shape, dy_ref.shape[0]
  toks = i * bt + jnp.arange(bt, dtype=jnp.int32)
  live = toks < t
  idx = [plgpu.load(idx_ref.at[toks * k + s], mask=live, other=0) for s in range(k)]
  ok = [live & (x >= 0) & (x < p) for x in idx]

  def chunk(c, dots):
    cols = c * bd + jnp.arange(bd, dtype=jnp.int32)
    cols_ok = (cols < d)[None, :]
    dy = plgpu.load(dy_ref.at[toks[:, None], cols[None, :]], mask=live[:, None] & cols_ok,
                    other=0.0).astype(jnp.float32)  # [bt, bd]
    out = []
    for s in range(k):
      rows = plgpu.load(y_ref.at[idx[s][:, None], cols[None, :]],
                        mask=ok[s][:, None] & cols_ok, other=0.0)
      out.append(dots[s] + jnp.sum(rows.astype(jnp.float32) * dy, axis=1))
    return tuple(out)

  dots = jax.lax.fori_loop(0, pl.cdiv(d, bd), chunk,
                           tuple(jnp.zeros((bt,), jnp.float32) for _ in range(k)))
  for s in range(k):
    plgpu.store(out_ref.at[toks * k + s], dots[s], mask=live)


def row_dots(y, idx, dy, *, interpret: bool = False):
  """dw[t, k] = <y[idx[t, k]], dy[t]> in float32 (0 for an out-of-range row)."""
  t, k = idx.shape
  bd = _cols_block(y.shape[1])
  kernel = functools.partial(_row_dots_kernel, bt=BLOCK_ROWS, bd=bd, k=k)
  out = _call(kernel, jax.ShapeDtypeStruct((t * k,), jnp.float32), (pl.cdiv(t, BLOCK_ROWS),),
              (idx.reshape(-1), y, dy), "dsmoe_row_dots_gpu", interpret)
  return out.reshape(t, k)
