"""Causal multi-head attention with rotary position embeddings (RoPE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsmoe.model.layers import normal_init


def rope(x_bthk: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
  """Rotates pairs (x[..., i], x[..., i + K/2]) by position * theta^(-2i/K)."""
  k = x_bthk.shape[-1]
  freq_f = theta ** (-jnp.arange(0, k, 2, dtype=jnp.float32) / k)  # [K/2]
  ang_btf = positions_bt[..., None].astype(jnp.float32) * freq_f  # [B, T, K/2]
  sin, cos = jnp.sin(ang_btf)[:, :, None, :], jnp.cos(ang_btf)[:, :, None, :]
  x1, x2 = jnp.split(x_bthk.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_bthk.dtype)


class Attention(nnx.Module):
  """Causal MHA. With `segment_ids`, tokens attend only within their document."""

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *, rope_theta: float,
               init_std: float, param_dtype, rngs: nnx.Rngs):
    init = normal_init(init_std)
    self.num_heads, self.head_dim, self.rope_theta = num_heads, head_dim, rope_theta
    self.w_q_dhk = nnx.Param(init(rngs.params(), (d_model, num_heads, head_dim), param_dtype))
    self.w_k_dhk = nnx.Param(init(rngs.params(), (d_model, num_heads, head_dim), param_dtype))
    self.w_v_dhk = nnx.Param(init(rngs.params(), (d_model, num_heads, head_dim), param_dtype))
    self.w_o_hkd = nnx.Param(init(rngs.params(), (num_heads, head_dim, d_model), param_dtype))

  def __call__(self, x_btd: jax.Array, segment_ids_bt: jax.Array | None = None) -> jax.Array:
    dtype = x_btd.dtype
    b, t, _ = x_btd.shape
    pos_bt = jnp.broadcast_to(jnp.arange(t), (b, t))
    q = jnp.einsum("btd,dhk->bthk", x_btd, self.w_q_dhk[...].astype(dtype))  # [B,T,H,K]
    k = jnp.einsum("btd,dhk->bthk", x_btd, self.w_k_dhk[...].astype(dtype))  # [B,T,H,K]
    v = jnp.einsum("btd,dhk->bthk", x_btd, self.w_v_dhk[...].astype(dtype))  # [B,T,H,K]
    q, k = rope(q, pos_bt, self.rope_theta), rope(k, pos_bt, self.rope_theta)
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k).astype(jnp.float32)  # [B,H,T,T]
    logits = logits / jnp.sqrt(jnp.float32(self.head_dim))
    mask_qs = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
    if segment_ids_bt is not None:
      same = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]  # [B,T,T]
      mask_qs = mask_qs & same[:, None]
    logits = jnp.where(mask_qs, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("bhqs,bshk->bqhk", probs, v)  # [B,T,H,K]
    return jnp.einsum("bthk,hkd->btd", out, self.w_o_hkd[...].astype(dtype))
