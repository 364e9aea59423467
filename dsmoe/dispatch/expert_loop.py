"""The fused expert loop: gather -> SwiGLU -> gate * scatter-add, per block (CPU).

Not a grouped matmul: one loop does the whole routed-expert computation
without ever building the permuted [T*K, D] buffer.

The layout (layout.py) gives every kept (token, slot) pair a row of a
virtual buffer of P = G * R rows, sorted by expert, such that expert e owns
blocks block_end_e[e-1] .. block_end_e[e]-1 (R rows each); token_gr and
weight_gr [G, R] give each row's token and gate (0 for padding and dropped
rows).

A loop over the experts slices expert e's weights once ([D, 2F]: gate and
up side by side, and [F, D]); an inner loop over e's blocks (a dynamic
count, so unused blocks cost nothing) does, per block:

  1. gather its R token rows from x_td (they stay in cache);
  2. SwiGLU with the expert's weights read in place: [R, D] x [D, 2F], then
     [R, F] x [F, D] (no per-block weight copy, no one-hot, no densified
     ragged_dot);
  3. scatter-add gate * output rows into y_td (in place).

Only x_td, y_td and the [P, F] activations move through memory; on a
bandwidth-bound CPU that is most of the cost of a dispatch. The backward
(custom_vjp) is a second pair of loops: per block it gathers dy rows,
computes dx rows (one [R, 2F] x [2F, D] matmul; scatter-added into dx_td),
the gate gradients <SwiGLU(x), dy> and the expert's weight gradients, summed
in float32 in the loop carry and written once per expert. The forward saves
only the gate/up activations g, u [G, R, F].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from dsmoe.dispatch.common import ExpertWeights


def _at(a, i):
  return lax.dynamic_index_in_dim(a, i, 0, keepdims=False)


def _put(a, v, i):
  return lax.dynamic_update_index_in_dim(a, v.astype(a.dtype), i, 0)


def _mm(a, b, dims):
  """Matmul of 2-D blocks with float32 accumulation; dims: contracting pair."""
  return lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


def _block_rows(token_gr, weight_gr, x_td, g):
  """Token ids [R], gates [R] and gathered rows [R, D] of block g."""
  tok_r = _at(token_gr, g)
  return tok_r, _at(weight_gr, g), x_td.at[tok_r].get(mode="promise_in_bounds")


def _expert_blocks(block_end_e, e):
  """The blocks of expert e: [start, end)."""
  end = block_end_e[e]
  return jnp.where(e > 0, block_end_e[jnp.maximum(e - 1, 0)], 0), end


def _gate_up(w: ExpertWeights, e):
  """Expert e's gate and up projections side by side: [D, 2F]."""
  return jnp.concatenate([_at(w.w_gate_edf, e), _at(w.w_up_edf, e)], axis=1)


def _forward(x_td, weight_gr, w: ExpertWeights, token_gr, block_end_e):
  """For each expert, for each of its blocks: y_td[tok] += gate * SwiGLU_e(x_td[tok])."""
  (t, d), (ng, nr) = x_td.shape, token_gr.shape
  (num_experts, _, f), dt = w.w_gate_edf.shape, x_td.dtype

  def expert_body(e, carry):
    w_gu_df, w_d_fd = _gate_up(w, e), _at(w.w_down_efd, e)  # [D,2F], [F,D]

    def block_body(g, carry):
      y_td, g_grf, u_grf = carry
      tok_r, gate_r, x_rd = _block_rows(token_gr, weight_gr, x_td, g)
      gu_rf = _mm(x_rd, w_gu_df, ((1,), (0,))).astype(dt)  # [R,2F]
      g_rf, u_rf = gu_rf[:, :f], gu_rf[:, f:]
      y_rd = _mm(jax.nn.silu(g_rf) * u_rf, w_d_fd, ((1,), (0,)))  # [R,D]
      y_td = y_td.at[tok_r].add(y_rd * gate_r[:, None], mode="promise_in_bounds")
      return y_td, _put(g_grf, g_rf, g), _put(u_grf, u_rf, g)

    return lax.fori_loop(*_expert_blocks(block_end_e, e), block_body, carry)

  init = (jnp.zeros((t, d), jnp.float32), jnp.zeros((ng, nr, f), dt),
          jnp.zeros((ng, nr, f), dt))
  return lax.fori_loop(0, num_experts, expert_body, init)


@jax.custom_vjp
def expert_loop(x_td, weight_gr, w: ExpertWeights, token_gr, block_end_e):
  """y_td = sum over rows of gate * SwiGLU_{expert of the row}(x_td[token]).

  weight_gr, token_gr [G, R]: gate and token of each row of each block;
  block_end_e [E]: expert e owns blocks block_end_e[e-1] .. block_end_e[e]-1.
  """
  y_td, _, _ = _forward(x_td, weight_gr, w, token_gr, block_end_e)
  return y_td.astype(x_td.dtype)


def _fwd(x_td, weight_gr, w, token_gr, block_end_e):
  y_td, g_grf, u_grf = _forward(x_td, weight_gr, w, token_gr, block_end_e)
  return y_td.astype(x_td.dtype), (x_td, weight_gr, w, token_gr, block_end_e, g_grf, u_grf)


def _block_grads(g, carry, *, x_td, dy_td, weight_gr, token_gr, g_grf, u_grf, w_e):
  """One block's backward: dx rows (scatter-added), gate grads, expert dW."""
  dx_td, dgate_gr, dw_gu_df, dw_d_fd = carry
  w_gu_df, w_d_fd = w_e
  dt, f32 = x_td.dtype, jnp.float32
  tok_r, gate_r, x_rd = _block_rows(token_gr, weight_gr, x_td, g)
  dy_rd = dy_td.at[tok_r].get(mode="promise_in_bounds")  # [R,D]
  g_rf, u_rf = _at(g_grf, g).astype(f32), _at(u_grf, g).astype(f32)
  sig_rf = jax.nn.sigmoid(g_rf)
  silu_rf = g_rf * sig_rf
  a_rf = silu_rf * u_rf
  da_rf = _mm(dy_rd, w_d_fd, ((1,), (1,)))  # [R,F], before the gate
  dgate_gr = _put(dgate_gr, jnp.sum(a_rf * da_rf, axis=-1), g)  # [R]
  da_rf = da_rf * gate_r[:, None]
  dg_rf = da_rf * u_rf * sig_rf * (1 + g_rf * (1 - sig_rf))
  du_rf = da_rf * silu_rf
  dgu_rf = jnp.concatenate([dg_rf, du_rf], axis=1).astype(dt)  # [R,2F]
  dx_rd = _mm(dgu_rf, w_gu_df, ((1,), (1,)))  # [R,D]
  dx_td = dx_td.at[tok_r].add(dx_rd, mode="promise_in_bounds")
  dw_gu_df = dw_gu_df + _mm(x_rd, dgu_rf, ((0,), (0,)))  # [D,2F]
  dw_d_fd = dw_d_fd + _mm((a_rf * gate_r[:, None]).astype(dt), dy_rd, ((0,), (0,)))  # [F,D]
  return dx_td, dgate_gr, dw_gu_df, dw_d_fd


def _bwd(res, dy_td):
  """Per expert (weights sliced once), per block: see _block_grads."""
  x_td, weight_gr, w, token_gr, block_end_e, g_grf, u_grf = res
  dt, f32 = x_td.dtype, jnp.float32
  block = functools.partial(_block_grads, x_td=x_td, dy_td=dy_td.astype(dt),
                            weight_gr=weight_gr, token_gr=token_gr, g_grf=g_grf, u_grf=u_grf)
  f = w.w_gate_edf.shape[-1]

  def expert_body(e, carry):
    dx_td, dgate_gr, dwg, dwu, dwd = carry
    w_e = (_gate_up(w, e), _at(w.w_down_efd, e))  # [D,2F], [F,D]
    acc = (dx_td, dgate_gr, jnp.zeros(w_e[0].shape, f32), jnp.zeros(w_e[1].shape, f32))
    dx_td, dgate_gr, dw_gu_df, dw_d_fd = lax.fori_loop(
        *_expert_blocks(block_end_e, e), functools.partial(block, w_e=w_e), acc)
    return (dx_td, dgate_gr, _put(dwg, dw_gu_df[:, :f], e), _put(dwu, dw_gu_df[:, f:], e),
            _put(dwd, dw_d_fd, e))

  init = (jnp.zeros(x_td.shape, f32), jnp.zeros(weight_gr.shape, f32),
          jnp.zeros(w.w_gate_edf.shape, w.w_gate_edf.dtype),
          jnp.zeros(w.w_up_edf.shape, w.w_up_edf.dtype),
          jnp.zeros(w.w_down_efd.shape, w.w_down_efd.dtype))
  dx_td, dgate_gr, dwg, dwu, dwd = lax.fori_loop(0, w.w_gate_edf.shape[0], expert_body, init)
  return (dx_td.astype(dt), dgate_gr.astype(weight_gr.dtype), ExpertWeights(dwg, dwu, dwd),
          None, None)


expert_loop.defvjp(_fwd, _bwd)
