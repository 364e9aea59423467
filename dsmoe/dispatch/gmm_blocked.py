"""Blocked grouped SwiGLU in plain XLA: a loop over blocks of one expert each.

The rows x_pd [P = NB * B, D] are sorted by expert and padded so that block b
(rows b*B .. b*B+B-1) belongs to expert block_expert_b[b]. A loop over the
`num_blocks` used blocks runs, per block, three ordinary [B, D] x [D, H]
matmuls with that expert's weights, read in place (no [NB, D, H] weight
gather, no one-hot, no densified ragged_dot). Blocks past `num_blocks` are
skipped (the loop bound is dynamic) and stay zero.

The backward is a second loop (custom_vjp): per block it recomputes nothing
(the forward saves the gate and up activations g, u [P, H]), produces
dx for the block and accumulates the three weight gradients of its expert
in float32 in place.
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


def _forward(x_bsd, w: ExpertWeights, block_expert_b, num_blocks):
  """Loop over used blocks: y = (silu(x Wg) * (x Wu)) Wd with expert e_b."""
  nb, bs, d = x_bsd.shape
  h = w.w_gate_edh.shape[-1]
  dt = x_bsd.dtype

  def body(b, carry):
    y_bsd, g_bsh, u_bsh = carry
    e, x_sd = block_expert_b[b], _at(x_bsd, b)
    g_sh = _mm(x_sd, _at(w.w_gate_edh, e), ((1,), (0,))).astype(dt)  # [B,H]
    u_sh = _mm(x_sd, _at(w.w_up_edh, e), ((1,), (0,))).astype(dt)  # [B,H]
    a_sh = jax.nn.silu(g_sh) * u_sh
    y_sd = _mm(a_sh, _at(w.w_down_ehd, e), ((1,), (0,)))  # [B,D]
    return _put(y_bsd, y_sd, b), _put(g_bsh, g_sh, b), _put(u_bsh, u_sh, b)

  init = (jnp.zeros((nb, bs, d), dt), jnp.zeros((nb, bs, h), dt), jnp.zeros((nb, bs, h), dt))
  return lax.fori_loop(0, num_blocks, body, init)


@jax.custom_vjp
def blocked_swiglu(x_pd, w: ExpertWeights, block_expert_b, num_blocks):
  """SwiGLU of each row with its block's expert: [P, D] -> [P, D]."""
  nb = block_expert_b.shape[0]
  x_bsd = x_pd.reshape(nb, -1, x_pd.shape[-1])
  y_bsd, _, _ = _forward(x_bsd, w, block_expert_b, num_blocks)
  return y_bsd.reshape(x_pd.shape)


def _fwd(x_pd, w, block_expert_b, num_blocks):
  nb = block_expert_b.shape[0]
  x_bsd = x_pd.reshape(nb, -1, x_pd.shape[-1])
  y_bsd, g_bsh, u_bsh = _forward(x_bsd, w, block_expert_b, num_blocks)
  return y_bsd.reshape(x_pd.shape), (x_bsd, w, block_expert_b, num_blocks, g_bsh, u_bsh)


def _bwd(res, dy_pd):
  """Per block: da = dy Wd^T; dg, du from the SwiGLU; dx; dW += x^T d*, a^T dy."""
  x_bsd, w, block_expert_b, num_blocks, g_bsh, u_bsh = res
  dt = x_bsd.dtype
  dy_bsd = dy_pd.reshape(x_bsd.shape).astype(dt)

  def body(b, carry):
    dx_bsd, dwg, dwu, dwd = carry
    e, x_sd, dy_sd = block_expert_b[b], _at(x_bsd, b), _at(dy_bsd, b)
    g_sh = _at(g_bsh, b).astype(jnp.float32)
    u_sh = _at(u_bsh, b).astype(jnp.float32)
    sig_sh = jax.nn.sigmoid(g_sh)
    silu_sh = g_sh * sig_sh
    a_sh = (silu_sh * u_sh).astype(dt)
    da_sh = _mm(dy_sd, _at(w.w_down_ehd, e), ((1,), (1,)))  # [B,H]
    dg_sh = (da_sh * u_sh * sig_sh * (1 + g_sh * (1 - sig_sh))).astype(dt)
    du_sh = (da_sh * silu_sh).astype(dt)
    dx_sd = (_mm(dg_sh, _at(w.w_gate_edh, e), ((1,), (1,)))
             + _mm(du_sh, _at(w.w_up_edh, e), ((1,), (1,))))  # [B,D]
    dwg = _put(dwg, _at(dwg, e) + _mm(x_sd, dg_sh, ((0,), (0,))), e)  # [D,H]
    dwu = _put(dwu, _at(dwu, e) + _mm(x_sd, du_sh, ((0,), (0,))), e)  # [D,H]
    dwd = _put(dwd, _at(dwd, e) + _mm(a_sh, dy_sd, ((0,), (0,))), e)  # [H,D]
    return _put(dx_bsd, dx_sd, b), dwg, dwu, dwd

  f32 = jnp.float32
  init = (jnp.zeros_like(x_bsd), jnp.zeros(w.w_gate_edh.shape, f32),
          jnp.zeros(w.w_up_edh.shape, f32), jnp.zeros(w.w_down_ehd.shape, f32))
  dx_bsd, dwg, dwu, dwd = lax.fori_loop(0, num_blocks, body, init)
  dw = ExpertWeights(dwg.astype(w.w_gate_edh.dtype), dwu.astype(w.w_up_edh.dtype),
                     dwd.astype(w.w_down_ehd.dtype))
  return dx_bsd.reshape(dy_pd.shape), dw, None, None


blocked_swiglu.defvjp(_fwd, _bwd)
