"""Blocked MoE in plain XLA: loops over single-expert blocks of rows (CPU).

The layout (layout.py) assigns every kept (token, slot) pair a row of a
virtual buffer of P = NB * B rows, sorted by expert, such that expert e owns
blocks block_end_e[e-1] .. block_end_e[e]-1 (B rows each); token_bs and
weight_bs [NB, B] give each row's token and gate (0 for padding and dropped
rows).

The buffer is never materialised. A loop over the experts slices expert e's
three weight matrices once; an inner loop over e's blocks (a dynamic count,
so unused blocks cost nothing) does, per block:

  1. gather its B token rows from x_td (they stay in cache);
  2. SwiGLU with the block's expert, read in place: [B, D] x [D, 2H] (gate
     and up fused; the expert's [D, 2H] is built once per expert), then
     [B, H] x [H, D] (no [NB, D, H] weight gather, no one-hot, no densified
     ragged_dot);
  3. scatter-add gate * output rows into y_td (in place).

This moves no [T*K, D] array through memory, only x_td, y_td and the
[P, H] activations; on a bandwidth-bound CPU that is most of the cost of a
dispatch. The backward (custom_vjp) is a second pair of loops: per block it
gathers dy rows, computes dx rows (one [B, 2H] x [2H, D] matmul, which is
faster on CPU than two with a contraction of H; scatter-added into dx_td),
the gate gradients <SwiGLU(x), dy> and the expert's weight gradients, summed
in float32 in the loop carry and written once per expert. The forward saves
only the gate/up activations g, u [NB, B, H].
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


def _block_rows(token_bs, weight_bs, x_td, b):
  """Token ids [B], gates [B] and gathered rows [B, D] of block b."""
  tok_s = _at(token_bs, b)
  return tok_s, _at(weight_bs, b), x_td.at[tok_s].get(mode="promise_in_bounds")


def _expert_blocks(block_end_e, e):
  """The blocks of expert e: [start, end)."""
  end = block_end_e[e]
  return jnp.where(e > 0, block_end_e[jnp.maximum(e - 1, 0)], 0), end


def _forward(x_td, weight_bs, w: ExpertWeights, token_bs, block_end_e):
  """For each expert, for each of its blocks: y_td[tok] += gate * SwiGLU_e(x_td[tok])."""
  (t, d), (nb, bs) = x_td.shape, token_bs.shape
  (num_experts, _, h), dt = w.w_gate_edh.shape, x_td.dtype

  def expert_body(e, carry):
    wgu_df = jnp.concatenate([_at(w.w_gate_edh, e), _at(w.w_up_edh, e)], axis=1)  # [D,2H]
    wd_hd = _at(w.w_down_ehd, e)

    def block_body(b, carry):
      y_td, g_bsh, u_bsh = carry
      tok_s, gate_s, x_sd = _block_rows(token_bs, weight_bs, x_td, b)
      gu_sf = _mm(x_sd, wgu_df, ((1,), (0,))).astype(dt)  # [B,2H]
      g_sh, u_sh = gu_sf[:, :h], gu_sf[:, h:]
      y_sd = _mm(jax.nn.silu(g_sh) * u_sh, wd_hd, ((1,), (0,)))  # [B,D]
      y_td = y_td.at[tok_s].add(y_sd * gate_s[:, None], mode="promise_in_bounds")
      return y_td, _put(g_bsh, g_sh, b), _put(u_bsh, u_sh, b)

    return lax.fori_loop(*_expert_blocks(block_end_e, e), block_body, carry)

  init = (jnp.zeros((t, d), jnp.float32), jnp.zeros((nb, bs, h), dt), jnp.zeros((nb, bs, h), dt))
  return lax.fori_loop(0, num_experts, expert_body, init)


@jax.custom_vjp
def blocked_moe(x_td, weight_bs, w: ExpertWeights, token_bs, block_end_e):
  """y_td = sum over rows of gate * SwiGLU_{expert of the row}(x_td[token]).

  weight_bs, token_bs [NB, B]: gate and token of each row of each block;
  block_end_e [E]: expert e owns blocks block_end_e[e-1] .. block_end_e[e]-1.
  """
  y_td, _, _ = _forward(x_td, weight_bs, w, token_bs, block_end_e)
  return y_td.astype(x_td.dtype)


def _fwd(x_td, weight_bs, w, token_bs, block_end_e):
  y_td, g_bsh, u_bsh = _forward(x_td, weight_bs, w, token_bs, block_end_e)
  return y_td.astype(x_td.dtype), (x_td, weight_bs, w, token_bs, block_end_e, g_bsh, u_bsh)


def _block_grads(b, carry, *, x_td, dy_td, weight_bs, token_bs, g_bsh, u_bsh, w_e):
  """One block's backward: dx rows (scatter-added), gate grads, expert dW."""
  dx_td, dgate_bs, dwgu_df, dwd_hd = carry
  wgu_df, wd_hd = w_e
  dt, f32 = x_td.dtype, jnp.float32
  tok_s, gate_s, x_sd = _block_rows(token_bs, weight_bs, x_td, b)
  dy_sd = dy_td.at[tok_s].get(mode="promise_in_bounds")  # [B,D]
  g_sh, u_sh = _at(g_bsh, b).astype(f32), _at(u_bsh, b).astype(f32)
  sig_sh = jax.nn.sigmoid(g_sh)
  silu_sh = g_sh * sig_sh
  a_sh = silu_sh * u_sh
  da_sh = _mm(dy_sd, wd_hd, ((1,), (1,)))  # [B,H], before the gate
  dgate_bs = _put(dgate_bs, jnp.sum(a_sh * da_sh, axis=-1), b)  # [B]
  da_sh = da_sh * gate_s[:, None]
  dg_sh = da_sh * u_sh * sig_sh * (1 + g_sh * (1 - sig_sh))
  du_sh = da_sh * silu_sh
  dgu_sf = jnp.concatenate([dg_sh, du_sh], axis=1).astype(dt)  # [B,2H]
  dx_sd = _mm(dgu_sf, wgu_df, ((1,), (1,)))  # [B,D]
  dx_td = dx_td.at[tok_s].add(dx_sd, mode="promise_in_bounds")
  dwgu_df = dwgu_df + _mm(x_sd, dgu_sf, ((0,), (0,)))  # [D,2H]
  dwd_hd = dwd_hd + _mm((a_sh * gate_s[:, None]).astype(dt), dy_sd, ((0,), (0,)))  # [H,D]
  return dx_td, dgate_bs, dwgu_df, dwd_hd


def _bwd(res, dy_td):
  """Per expert (weights sliced once), per block: see _block_grads."""
  x_td, weight_bs, w, token_bs, block_end_e, g_bsh, u_bsh = res
  dt, f32 = x_td.dtype, jnp.float32
  block = functools.partial(_block_grads, x_td=x_td, dy_td=dy_td.astype(dt),
                            weight_bs=weight_bs, token_bs=token_bs, g_bsh=g_bsh, u_bsh=u_bsh)

  h = w.w_gate_edh.shape[-1]

  def expert_body(e, carry):
    dx_td, dgate_bs, dwg, dwu, dwd = carry
    w_e = (jnp.concatenate([_at(w.w_gate_edh, e), _at(w.w_up_edh, e)], axis=1),  # [D,2H]
           _at(w.w_down_ehd, e))
    acc = (dx_td, dgate_bs, jnp.zeros(w_e[0].shape, f32), jnp.zeros(w_e[1].shape, f32))
    dx_td, dgate_bs, dwgu_df, dwd_hd = lax.fori_loop(
        *_expert_blocks(block_end_e, e), functools.partial(block, w_e=w_e), acc)
    return (dx_td, dgate_bs, _put(dwg, dwgu_df[:, :h], e), _put(dwu, dwgu_df[:, h:], e),
            _put(dwd, dwd_hd, e))

  init = (jnp.zeros(x_td.shape, f32), jnp.zeros(weight_bs.shape, f32),
          jnp.zeros(w.w_gate_edh.shape, w.w_gate_edh.dtype),
          jnp.zeros(w.w_up_edh.shape, w.w_up_edh.dtype),
          jnp.zeros(w.w_down_ehd.shape, w.w_down_ehd.dtype))
  dx_td, dgate_bs, dwg, dwu, dwd = lax.fori_loop(0, w.w_gate_edh.shape[0], expert_body, init)
  return (dx_td.astype(dt), dgate_bs.astype(weight_bs.dtype), ExpertWeights(dwg, dwu, dwd),
          None, None)


blocked_moe.defvjp(_fwd, _bwd)
