"""The fused expert loop: gather -> SwiGLU -> gate * scatter-add, per expert (CPU).

The "loop" implementation of the routed experts (grouped.py calls it).

Not a grouped matmul: one loop does the whole routed-expert computation
without ever building the permuted [T*K, D] buffer.

The layout (layout.py) gives every kept (token, slot) pair a row of a
virtual buffer of P rows, grouped by expert: expert e owns the rows
start_e[e] .. start_e[e] + rows_e[e] - 1 (a multiple of the block size R,
padding rows included); token_p and weight_p [P] give each row's token and
gate (0 for padding and dropped rows).

A loop over the experts slices expert e's weights once (gate and up side by
side as one [D, 2F] matrix up to hidden FUSE_GATE_UP_MAX_HIDDEN, two [D, F]
above it; down [F, D]) and runs its rows as few, large chunks
(`sizes` = R, 2R, ..., L): one chunk of `first` rows, first in [R, L], then
(rows - first) / L chunks of L rows. An expert with at most L rows (the
usual case: L is chosen above the mean rows per expert) is ONE chunk, so
its matmuls are as large as they can be and the per-chunk work (a dozen
small ops forward, two dozen backward) is paid once per expert. The first
chunk's size is data-dependent: a lax.switch runs the branch compiled for
it. The branches only compute: they return their rows padded to L (zero
rows), and the in-place updates of the big buffers happen outside the
switch (XLA copies a buffer that a conditional branch updates in place).
Per chunk of n rows:

  1. gather its n token rows from x_td (they stay in cache);
  2. SwiGLU with the expert's weights: [n, D] x [D, 2F] (or two [D, F]),
     then (gate * silu(g) * u) [n, F] x [F, D];
  3. scatter-add the output rows into y_td (in place; the zero rows of a
     padded chunk add 0 to whichever tokens follow it).

Only x_td, y_td and the gate/up activations [P, 2F] move through memory; on a
bandwidth-bound CPU that is most of the cost of a dispatch. The backward
(custom_vjp) is a second loop of the same shape: per chunk it gathers dy
rows, computes dx rows ([n, 2F] x [2F, D], or two [n, F] x [F, D];
scatter-added into dx_td), the gate gradients <SwiGLU(x), dy> and the
expert's weight gradients (float32; summed over chunks, written once per
expert). The forward saves only the gate/up activations ([P, 2F], or two
[P, F]).

Padded writes of a first chunk (gu rows, gate-gradient rows) land on rows
of later chunks or experts, which overwrite them afterwards: both loops
visit the rows in increasing order. The buffers carry L spare rows at the
end so no write is ever clipped.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax

from dsmoe.dispatch.common import ExpertWeights

# Up to this hidden size the loop runs gate and up as one matmul on the
# expert's two weights side by side ([D, 2F]): fewer, larger ops, faster on
# CPU at small hidden sizes; above it, two [D, F] matmuls are as fast and
# need no per-expert copy of the weights, activations and gradients.
FUSE_GATE_UP_MAX_HIDDEN = 256


def _at(a, i):
  return lax.dynamic_index_in_dim(a, i, 0, keepdims=False)


def _put(a, v, i):
  return lax.dynamic_update_index_in_dim(a, v.astype(a.dtype), i, 0)


def _mm(a, b, dims=((1,), (0,))):
  """Matmul of 2-D blocks with float32 accumulation; dims: contracting pair."""
  return lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


def _rows(a, p0, n):
  return lax.dynamic_slice_in_dim(a, p0, n, 0)


def _write(a, v, p0):
  return lax.dynamic_update_slice_in_dim(a, v.astype(a.dtype), p0, 0)


def _pad_rows(a, n):
  """a [m, ...] -> [n, ...] with zero rows appended."""
  return jnp.pad(a, [(0, n - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


def _weights(w: ExpertWeights, e, dtype, fused: bool):
  """Expert e's input projections (:func:`_parts`) and down projection [F, D],
  in the compute dtype (the loop takes the weights in their own dtype, so
  their gradients are float32 sums, written without a rounding step)."""
  return (_parts(_at(w.w_gate_edf, e).astype(dtype), _at(w.w_up_edf, e).astype(dtype), fused),
          _at(w.w_down_efd, e).astype(dtype))


def _parts(g, u, fused: bool):
  """Gate and up halves as the loop computes with them: one array, side by
  side (one [D, 2F] matmul: `fused`, up to hidden FUSE_GATE_UP_MAX_HIDDEN),
  or the two (two [D, F] matmuls: no per-expert copy of the weights, the
  activations or their gradients)."""
  return (jnp.concatenate([g, u], axis=-1),) if fused else (g, u)


def _halves(parts):
  """(gate, up) of :func:`_parts` output (columns of the fused array)."""
  if len(parts) == 2:
    return parts
  f = parts[0].shape[-1] // 2
  return parts[0][..., :f], parts[0][..., f:]


def _stored(dtype):
  """The dtype the saved activations are kept in: 16-bit floats as their
  uint16 bits (XLA:CPU widens a bfloat16 dynamic-update-slice to float32
  over the whole buffer, which costs a pass over it per chunk)."""
  return jnp.uint16 if jnp.dtype(dtype).itemsize == 2 else dtype


def _store(a):
  return lax.bitcast_convert_type(a, _stored(a.dtype)) if _stored(a.dtype) != a.dtype else a


def _load(a, dtype):
  return lax.bitcast_convert_type(a, dtype) if a.dtype != dtype else a


def _split(rows, largest):
  """(first, full): rows = first + full * largest, first in [1, largest]
  (first = 0 iff rows = 0)."""
  full = jnp.maximum(rows - 1, 0) // largest
  return rows - full * largest, full


def _first_chunk(chunk_fn, sizes, first, zeros, *operands):
  """chunk_fn(n, *operands) for n = first (a multiple of sizes[0], <= sizes[-1])."""
  branches = [lambda *ops: zeros] + [functools.partial(chunk_fn, n) for n in sizes]
  return lax.switch(first // sizes[0], branches, *operands)


def _swiglu_rows(n, tok_r, gate_r, w_e, x_td):
  """Rows [:n]: (gate * SwiGLU(x) [n, D] float32, the gate/up parts to save)."""
  dt = x_td.dtype
  x_rd = x_td.at[tok_r[:n]].get(mode="promise_in_bounds")  # [n,D]
  parts = tuple(_mm(x_rd, w).astype(dt) for w in w_e[0])  # [n,2F] or 2 x [n,F]
  g_rf, u_rf = _halves(parts)
  a_rf = jax.nn.silu(g_rf) * u_rf * gate_r[:n, None].astype(dt)
  return _mm(a_rf, w_e[1]), tuple(_store(p) for p in parts)


def _saved(w: ExpertWeights, rows: int, dtype, fused: bool):
  """Zero buffers for the saved gate/up parts: [rows, 2F], or two [rows, F]."""
  f = w.w_gate_edf.shape[-1]
  widths = (2 * f,) if fused else (f, f)
  return tuple(jnp.zeros((rows, width), _stored(dtype)) for width in widths)


def _forward(x_td, weight_p, w: ExpertWeights, token_p, start_e, rows_e, sizes):
  """For each expert, each of its chunks: y_td[tok] += gate * SwiGLU_e(x_td[tok])."""
  (t, d), num_rows, big = x_td.shape, token_p.shape[0], sizes[-1]
  num_experts, dt = w.w_gate_edf.shape[0], x_td.dtype
  fused = w.w_gate_edf.shape[-1] <= FUSE_GATE_UP_MAX_HIDDEN
  token_p, weight_p = _pad_rows(token_p, num_rows + big), _pad_rows(weight_p, num_rows + big)

  def padded(n, tok_r, gate_r, w_e):
    y_rd, parts = _swiglu_rows(n, tok_r, gate_r, w_e, x_td)
    return _pad_rows(y_rd, big), tuple(_pad_rows(p, big) for p in parts)

  def chunk(p0, outputs, carry):
    y_td, saved = carry
    y_rd, parts = outputs
    return (y_td.at[_rows(token_p, p0, big)].add(y_rd, mode="promise_in_bounds"),
            tuple(_write(buf, p, p0) for buf, p in zip(saved, parts)))

  def expert_body(e, carry):
    w_e, start, (first, full) = _weights(w, e, dt, fused), start_e[e], _split(rows_e[e], big)
    zeros = (jnp.zeros((big, d), jnp.float32), _saved(w, big, dt, fused))
    out = _first_chunk(padded, sizes, first, zeros, _rows(token_p, start, big),
                       _rows(weight_p, start, big), w_e)
    carry = chunk(start, out, carry)

    def full_chunk(i, carry):
      p0 = start + first + i * big
      out = _swiglu_rows(big, _rows(token_p, p0, big), _rows(weight_p, p0, big), w_e, x_td)
      return chunk(p0, out, carry)

    return lax.fori_loop(0, full, full_chunk, carry)

  init = (jnp.zeros((t, d), jnp.float32), _saved(w, num_rows + big, dt, fused))
  return lax.fori_loop(0, num_experts, expert_body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def expert_loop(x_td, weight_p, w: ExpertWeights, token_p, start_e, rows_e, sizes):
  """y_td = sum over rows of gate * SwiGLU_{expert of the row}(x_td[token]).

  w: the experts in their own (parameter) dtype, cast per expert to x_td.dtype;
  weight_p, token_p [P]: gate and token of each row; start_e, rows_e [E]:
  expert e's rows start_e[e] .. start_e[e] + rows_e[e] - 1; sizes: the
  chunk sizes (static tuple R, 2R, ..., L; R divides every start_e, rows_e).
  """
  y_td, _ = _forward(x_td, weight_p, w, token_p, start_e, rows_e, sizes)
  return y_td.astype(x_td.dtype)


def _fwd(x_td, weight_p, w, token_p, start_e, rows_e, sizes):
  y_td, saved = _forward(x_td, weight_p, w, token_p, start_e, rows_e, sizes)
  return y_td.astype(x_td.dtype), (x_td, weight_p, w, token_p, start_e, rows_e, saved)


def _grad_rows(n, tok_r, gate_r, saved_r, w_e, x_td, dy_td, fused):
  """Backward of rows [:n]: dx [n, D], dgate [n], the expert's weight
  gradients (of its input parts: [D, 2F] or 2 x [D, F]; and [F, D])."""
  w_in, w_d_fd = w_e
  dt, f32 = x_td.dtype, jnp.float32
  tok_r, gate_r = tok_r[:n], gate_r[:n, None]
  x_rd = x_td.at[tok_r].get(mode="promise_in_bounds")  # [n,D]
  dy_rd = dy_td.at[tok_r].get(mode="promise_in_bounds")  # [n,D]
  g_rf, u_rf = _halves(tuple(_load(p[:n], dt).astype(f32) for p in saved_r))
  sig_rf = jax.nn.sigmoid(g_rf)
  silu_rf = g_rf * sig_rf
  a_rf = silu_rf * u_rf
  da_rf = _mm(dy_rd, w_d_fd, ((1,), (1,)))  # [n,F], before the gate
  dgate_r = jnp.sum(a_rf * da_rf, axis=-1)  # [n]
  da_rf = da_rf * gate_r
  dg_rf = da_rf * u_rf * sig_rf * (1 + g_rf * (1 - sig_rf))
  dparts = tuple(p.astype(dt) for p in _parts(dg_rf, da_rf * silu_rf, fused))  # [n,2F] | 2x[n,F]
  dx_rd = functools.reduce(operator.add,
                           (_mm(dp, w, ((1,), (1,))) for dp, w in zip(dparts, w_in)))  # [n,D]
  dw_in = tuple(_mm(x_rd, dp, ((0,), (0,))) for dp in dparts)  # [D,2F] or 2 x [D,F]
  dw_d = _mm((a_rf * gate_r).astype(dt), dy_rd, ((0,), (0,)))  # [F,D]
  return dx_rd, dgate_r, dw_in, dw_d


def _bwd(sizes, res, dy_td):
  """Per expert (weights sliced once), per chunk: see _grad_rows."""
  x_td, weight_p, w, token_p, start_e, rows_e, saved = res
  dt, f32, big = x_td.dtype, jnp.float32, sizes[-1]
  num_experts, d, f = w.w_gate_edf.shape
  num_rows, fused = token_p.shape[0], len(saved) == 1  # as the forward chose
  token_p, weight_p = _pad_rows(token_p, num_rows + big), _pad_rows(weight_p, num_rows + big)
  grad_rows = functools.partial(_grad_rows, x_td=x_td, dy_td=dy_td.astype(dt), fused=fused)

  def padded(n, *operands):
    dx_rd, dgate_r, dw_in, dw_d = grad_rows(n, *operands)
    return _pad_rows(dx_rd, big), _pad_rows(dgate_r, big), dw_in, dw_d

  def rows_at(p0):
    return (_rows(token_p, p0, big), _rows(weight_p, p0, big),
            tuple(_rows(buf, p0, big) for buf in saved))

  def chunk(p0, dx_rd, dgate_r, carry):
    dx_td, dgate_p = carry
    return (dx_td.at[_rows(token_p, p0, big)].add(dx_rd, mode="promise_in_bounds"),
            _write(dgate_p, dgate_r, p0))

  def expert_body(e, carry):
    dx_td, dgate_p, dwg, dwu, dwd = carry
    w_e, start, (first, full) = _weights(w, e, dt, fused), start_e[e], _split(rows_e[e], big)
    zeros = (jnp.zeros((big, d), f32), jnp.zeros((big,), f32),
             tuple(jnp.zeros(p.shape, f32) for p in w_e[0]), jnp.zeros((f, d), f32))
    dx_rd, dgate_r, dw_in, dw_d = _first_chunk(padded, sizes, first, zeros, *rows_at(start), w_e)
    acc = (*chunk(start, dx_rd, dgate_r, (dx_td, dgate_p)), dw_in, dw_d)

    def full_chunk(i, acc):
      p0 = start + first + i * big
      dx_rd, dgate_r, dw_in, dw_d = grad_rows(big, *rows_at(p0), w_e)
      return (*chunk(p0, dx_rd, dgate_r, acc[:2]),
              tuple(a + b for a, b in zip(acc[2], dw_in)), acc[3] + dw_d)

    dx_td, dgate_p, dw_in, dw_d = lax.fori_loop(0, full, full_chunk, acc)
    dw_g, dw_u = _halves(dw_in)
    return dx_td, dgate_p, _put(dwg, dw_g, e), _put(dwu, dw_u, e), _put(dwd, dw_d, e)

  init = (jnp.zeros(x_td.shape, f32), jnp.zeros((num_rows + big,), f32),
          jnp.zeros(w.w_gate_edf.shape, w.w_gate_edf.dtype),
          jnp.zeros(w.w_up_edf.shape, w.w_up_edf.dtype),
          jnp.zeros(w.w_down_efd.shape, w.w_down_efd.dtype))
  dx_td, dgate_p, dwg, dwu, dwd = lax.fori_loop(0, num_experts, expert_body, init)
  return (dx_td.astype(dt), dgate_p[:num_rows].astype(weight_p.dtype),
          ExpertWeights(dwg, dwu, dwd), None, None, None)


expert_loop.defvjp(_fwd, _bwd)
