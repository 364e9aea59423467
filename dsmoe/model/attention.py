"""Causal multi-head attention with rotary position embeddings (RoPE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsmoe.model.layers import normal_init


def rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
  """Rotates pairs (x[..., i], x[..., i + H/2]) by position * theta^(-2i/H).

  The rotate-half form of the released DeepSeek (and Llama) code.
  """
  h = x_btnh.shape[-1]
  freq = theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)  # [H/2]
  ang = positions_bt[..., None].astype(jnp.float32) * freq  # [B,T,H/2]
  sin, cos = jnp.sin(ang)[:, :, None, :], jnp.cos(ang)[:, :, None, :]
  x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_btnh.dtype)


class Attention(nnx.Module):
  """Causal MHA. With `segment_ids`, tokens attend only within their document;
  `positions` (default 0..T-1) are the RoPE positions of the tokens."""

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *, rope_theta: float,
               init_std: float, param_dtype, rngs: nnx.Rngs):
    init = normal_init(init_std)
    self.num_heads, self.head_dim, self.rope_theta = num_heads, head_dim, rope_theta
    self.w_q_dnh = nnx.Param(init(rngs.params(), (d_model, num_heads, head_dim), param_dtype))
    self.w_k_dnh = nnx.Param(init(rngs.params(), (d_model, num_heads, head_dim), param_dtype))
    self.w_v_dnh = nnx.Param(init(rngs.params(), (d_model, num_heads, head_dim), param_dtype))
    self.w_o_nhd = nnx.Param(init(rngs.params(), (num_heads, head_dim, d_model), param_dtype))

  def __call__(self, x_btd: jax.Array, segment_ids_bt: jax.Array | None = None,
               positions_bt: jax.Array | None = None) -> jax.Array:
    dtype = x_btd.dtype
    b, t, _ = x_btd.shape
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t), (b, t))
    q = jnp.einsum("btd,dnh->btnh", x_btd, self.w_q_dnh[...].astype(dtype))  # [B,T,N,H]
    k = jnp.einsum("btd,dnh->btnh", x_btd, self.w_k_dnh[...].astype(dtype))  # [B,T,N,H]
    v = jnp.einsum("btd,dnh->btnh", x_btd, self.w_v_dnh[...].astype(dtype))  # [B,T,N,H]
    q, k = rope(q, positions_bt, self.rope_theta), rope(k, positions_bt, self.rope_theta)
    logits = jnp.einsum("btnh,bunh->bntu", q, k).astype(jnp.float32)  # [B,N,T,U]
    logits = logits / jnp.sqrt(jnp.float32(self.head_dim))
    mask_tu = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]  # [1,1,T,U] causal
    if segment_ids_bt is not None:
      same_btu = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]  # [B,T,U]
      mask_tu = mask_tu & same_btu[:, None]
    logits = jnp.where(mask_tu, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("bntu,bunh->btnh", probs, v)  # [B,T,N,H]
    return jnp.einsum("btnh,nhd->btd", out, self.w_o_nhd[...].astype(dtype))  # [B,T,D]
