"""Blocked MoE in plain XLA: one loop over single-expert blocks of rows.

The layout (layout.py) assigns every kept (token, slot) pair a row of a
virtual buffer of P = NB * B rows, sorted by expert, such that block b (rows
b*B .. b*B+B-1) belongs to expert block_expert_b[b]; token_p [P] and
weight_p [P] give each row's token and gate (0 for padding and dropped rows).

The buffer is never materialised. A loop over the `num_blocks` used blocks
does, per block:

  1. gather its B token rows from x_td (they stay in cache);
  2. SwiGLU with the block's expert, read in place: three [B, D] x [D, H]
     matmuls (no [NB, D, H] weight gather, no one-hot, no densified ragged_dot);
  3. scatter-add gate * output rows into y_td (in place).

This moves no [T*K, D] array through memory, only x_td, y_td and the
[P, H] activations; on a bandwidth-bound CPU that is most of the cost of a
dispatch. The backward (custom_vjp) is a second loop: per block it gathers
dy rows, computes dx rows (scatter-added into dx_td), the gate gradients
<SwiGLU(x), dy> and the three weight gradients of its expert, accumulated
in float32 in place. The forward saves only the gate/up activations g, u.
"""

from __future__ import annotations

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


def _forward(x_td, weight_bs, w: ExpertWeights, token_bs, block_expert_b, num_blocks):
  """Loop over used blocks: y_td[tok] += gate * SwiGLU_e(x_td[tok])."""
  (t, d), (nb, bs) = x_td.shape, token_bs.shape
  h, dt = w.w_gate_edh.shape[-1], x_td.dtype

  def body(b, carry):
    y_td, g_bsh, u_bsh = carry
    e = block_expert_b[b]
    tok_s, gate_s, x_sd = _block_rows(token_bs, weight_bs, x_td, b)
    g_sh = _mm(x_sd, _at(w.w_gate_edh, e), ((1,), (0,))).astype(dt)  # [B,H]
    u_sh = _mm(x_sd, _at(w.w_up_edh, e), ((1,), (0,))).astype(dt)  # [B,H]
    y_sd = _mm(jax.nn.silu(g_sh) * u_sh, _at(w.w_down_ehd, e), ((1,), (0,)))  # [B,D]
    y_td = y_td.at[tok_s].add(y_sd * gate_s[:, None], mode="promise_in_bounds")
    return y_td, _put(g_bsh, g_sh, b), _put(u_bsh, u_sh, b)

  init = (jnp.zeros((t, d), jnp.float32), jnp.zeros((nb, bs, h), dt), jnp.zeros((nb, bs, h), dt))
  return lax.fori_loop(0, num_blocks, body, init)


@jax.custom_vjp
def blocked_moe(x_td, weight_p, w: ExpertWeights, token_p, block_expert_b, num_blocks):
  """y_td = sum over rows p of weight_p[p] * SwiGLU_{expert(p)}(x_td[token_p[p]])."""
  nb = block_expert_b.shape[0]
  y_td, _, _ = _forward(x_td, weight_p.reshape(nb, -1), w, token_p.reshape(nb, -1),
                        block_expert_b, num_blocks)
  return y_td.astype(x_td.dtype)


def _fwd(x_td, weight_p, w, token_p, block_expert_b, num_blocks):
  nb = block_expert_b.shape[0]
  weight_bs, token_bs = weight_p.reshape(nb, -1), token_p.reshape(nb, -1)
  y_td, g_bsh, u_bsh = _forward(x_td, weight_bs, w, token_bs, block_expert_b, num_blocks)
  res = (x_td, weight_bs, w, token_bs, block_expert_b, num_blocks, g_bsh, u_bsh)
  return y_td.astype(x_td.dtype), res


def _bwd(res, dy_td):
  """Per block: da = gate * dy Wd^T; dgate = <SwiGLU, dy Wd^T>; dg, du; dx; dW."""
  x_td, weight_bs, w, token_bs, block_expert_b, num_blocks, g_bsh, u_bsh = res
  dt, f32 = x_td.dtype, jnp.float32
  dy_td = dy_td.astype(dt)

  def body(b, carry):
    dx_td, dgate_bs, dwg, dwu, dwd = carry
    e = block_expert_b[b]
    tok_s, gate_s, x_sd = _block_rows(token_bs, weight_bs, x_td, b)
    dy_sd = dy_td.at[tok_s].get(mode="promise_in_bounds")  # [B,D]
    g_sh, u_sh = _at(g_bsh, b).astype(f32), _at(u_bsh, b).astype(f32)
    sig_sh = jax.nn.sigmoid(g_sh)
    silu_sh = g_sh * sig_sh
    a_sh = silu_sh * u_sh
    da_sh = _mm(dy_sd, _at(w.w_down_ehd, e), ((1,), (1,)))  # [B,H], before the gate
    dgate_bs = _put(dgate_bs, jnp.sum(a_sh * da_sh, axis=-1), b)  # [B]
    da_sh = da_sh * gate_s[:, None]
    dg_sh = (da_sh * u_sh * sig_sh * (1 + g_sh * (1 - sig_sh))).astype(dt)
    du_sh = (da_sh * silu_sh).astype(dt)
    dx_sd = (_mm(dg_sh, _at(w.w_gate_edh, e), ((1,), (1,)))
             + _mm(du_sh, _at(w.w_up_edh, e), ((1,), (1,))))  # [B,D]
    dx_td = dx_td.at[tok_s].add(dx_sd, mode="promise_in_bounds")
    dwg = _put(dwg, _at(dwg, e) + _mm(x_sd, dg_sh, ((0,), (0,))), e)  # [D,H]
    dwu = _put(dwu, _at(dwu, e) + _mm(x_sd, du_sh, ((0,), (0,))), e)  # [D,H]
    aw_sh = (a_sh * gate_s[:, None]).astype(dt)
    dwd = _put(dwd, _at(dwd, e) + _mm(aw_sh, dy_sd, ((0,), (0,))), e)  # [H,D]
    return dx_td, dgate_bs, dwg, dwu, dwd

  init = (jnp.zeros(x_td.shape, f32), jnp.zeros(weight_bs.shape, f32),
          jnp.zeros(w.w_gate_edh.shape, f32), jnp.zeros(w.w_up_edh.shape, f32),
          jnp.zeros(w.w_down_ehd.shape, f32))
  dx_td, dgate_bs, dwg, dwu, dwd = lax.fori_loop(0, num_blocks, body, init)
  dw = ExpertWeights(dwg.astype(w.w_gate_edh.dtype), dwu.astype(w.w_up_edh.dtype),
                     dwd.astype(w.w_down_ehd.dtype))
  return (dx_td.astype(dt), dgate_bs.reshape(-1).astype(weight_bs.dtype), dw,
          None, None, None)


blocked_moe.defvjp(_fwd, _bwd)
