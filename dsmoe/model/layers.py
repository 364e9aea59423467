"""Basic layers: RMSNorm, SwiGLU MLP, embedding. Weight names carry shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def normal_init(std: float):
  return jax.nn.initializers.normal(stddev=std)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale, computed in float32."""

  def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.scale_d = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    x32 = x_btd.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * inv * self.scale_d[...].astype(jnp.float32)).astype(x_btd.dtype)


def swiglu(x_td, w_gate_dh, w_up_dh, w_down_hd):
  """down(silu(x @ gate) * (x @ up)); works for any leading dims of x."""
  dtype = x_td.dtype
  g = jnp.einsum("...d,dh->...h", x_td, w_gate_dh.astype(dtype))  # [..., H]
  u = jnp.einsum("...d,dh->...h", x_td, w_up_dh.astype(dtype))  # [..., H]
  return jnp.einsum("...h,hd->...d", jax.nn.silu(g) * u, w_down_hd.astype(dtype))


class MLP(nnx.Module):
  """SwiGLU feed-forward block (also the fused shared experts)."""

  def __init__(self, d_model: int, hidden: int, *, init_std: float, param_dtype,
               rngs: nnx.Rngs):
    init = normal_init(init_std)
    self.w_gate_dh = nnx.Param(init(rngs.params(), (d_model, hidden), param_dtype))
    self.w_up_dh = nnx.Param(init(rngs.params(), (d_model, hidden), param_dtype))
    self.w_down_hd = nnx.Param(init(rngs.params(), (hidden, d_model), param_dtype))

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    return swiglu(x_btd, self.w_gate_dh[...], self.w_up_dh[...], self.w_down_hd[...])


class Embed(nnx.Module):
  """Token embedding table [vocab, d_model]."""

  def __init__(self, vocab: int, d_model: int, *, init_std: float, param_dtype,
               rngs: nnx.Rngs):
    self.table_vd = nnx.Param(normal_init(init_std)(rngs.params(), (vocab, d_model), param_dtype))

  def __call__(self, tokens_bt: jax.Array, dtype) -> jax.Array:
    return jnp.take(self.table_vd[...], tokens_bt, axis=0).astype(dtype)
