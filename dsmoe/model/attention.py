"""Causal multi-head attention with rotary position embeddings (RoPE)."""

from __future__ import annotations

from typing import NamedTuple

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


class KVCache(NamedTuple):
  """Keys and values of one layer for decoding: [B, U, N, H], U = cache length."""
  k_bunh: jax.Array
  v_bunh: jax.Array

  @classmethod
  def zeros(cls, batch: int, length: int, num_heads: int, head_dim: int, dtype) -> "KVCache":
    shape = (batch, length, num_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


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

  def _qkv(self, x_btd: jax.Array, positions_bt: jax.Array):
    """Projections, RoPE applied to q and k: three [B,T,N,H] arrays."""
    dtype = x_btd.dtype
    q = jnp.einsum("btd,dnh->btnh", x_btd, self.w_q_dnh[...].astype(dtype))  # [B,T,N,H]
    k = jnp.einsum("btd,dnh->btnh", x_btd, self.w_k_dnh[...].astype(dtype))  # [B,T,N,H]
    v = jnp.einsum("btd,dnh->btnh", x_btd, self.w_v_dnh[...].astype(dtype))  # [B,T,N,H]
    return rope(q, positions_bt, self.rope_theta), rope(k, positions_bt, self.rope_theta), v

  def _attend(self, q_btnh, k_bunh, v_bunh, mask_btu) -> jax.Array:
    """softmax(q k^T / sqrt(H)) v over the keys where `mask_btu`, then the output projection."""
    dtype = q_btnh.dtype
    logits = jnp.einsum("btnh,bunh->bntu", q_btnh, k_bunh).astype(jnp.float32)  # [B,N,T,U]
    logits = logits / jnp.sqrt(jnp.float32(self.head_dim))
    logits = jnp.where(mask_btu[:, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("bntu,bunh->btnh", probs, v_bunh)  # [B,T,N,H]
    return jnp.einsum("btnh,nhd->btd", out, self.w_o_nhd[...].astype(dtype))  # [B,T,D]

  def __call__(self, x_btd: jax.Array, segment_ids_bt: jax.Array | None = None,
               positions_bt: jax.Array | None = None) -> jax.Array:
    b, t, _ = x_btd.shape
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t), (b, t))
    q, k, v = self._qkv(x_btd, positions_bt)
    mask_btu = jnp.tril(jnp.ones((t, t), dtype=bool))[None]  # [1,T,U] causal
    if segment_ids_bt is not None:
      mask_btu = mask_btu & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])
    return self._attend(q, k, v, mask_btu)

  def extend(self, x_btd: jax.Array, positions_bt: jax.Array,
             cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Attention of T new tokens through a KV cache (prefill: T = prompt, decode: T = 1).

    Token (b, t) has RoPE position ``positions_bt[b, t]``, which is also its
    slot in the cache: its key and value are written there, and it attends to
    the slots ``u <= positions_bt[b, t]`` (earlier tokens of its sequence,
    already written, and itself). Slots beyond a sequence's position are never
    read, so prompts of different lengths can share a batch (right-padded).
    Positions must be < U, the cache length.
    """
    q, k, v = self._qkv(x_btd, positions_bt)
    rows_bt = jnp.arange(x_btd.shape[0])[:, None]
    cache = KVCache(cache.k_bunh.at[rows_bt, positions_bt].set(k.astype(cache.k_bunh.dtype)),
                    cache.v_bunh.at[rows_bt, positions_bt].set(v.astype(cache.v_bunh.dtype)))
    u = cache.k_bunh.shape[1]
    mask_btu = jnp.arange(u)[None, None, :] <= positions_bt[:, :, None]  # [B,T,U]
    dtype = x_btd.dtype
    return self._attend(q, cache.k_bunh.astype(dtype), cache.v_bunh.astype(dtype), mask_btu), cache
