"""Basic layers: RMSNorm, SwiGLU MLP, embedding. Weight names carry shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Up to this hidden size the gate and up projections run as one matmul on
# their weights concatenated per call ([D, 2F]; the parameters stay
# separate): fewer, larger ops, faster on CPU at small hidden sizes; above
# it two matmuls are as fast and the concatenated weights only cost copies.
FUSE_GATE_UP_MAX_HIDDEN = 256


def normal_init(std: float):
  return jax.nn.initializers.normal(stddev=std)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale: statistics in float32, then the scale multiplies in
  the input dtype (the released DeepSeek code's order; the same in float32)."""

  def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.scale_d = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    x32 = x_btd.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * inv).astype(x_btd.dtype) * self.scale_d[...].astype(x_btd.dtype)


def _dot(x, w, dtype):
  """x [..., a] @ w [a, b] in `dtype`, accumulated in float32 (bfloat16 inputs
  with float32 accumulation also take XLA:CPU's fast AVX-512 BF16 kernels)."""
  return jnp.einsum("...a,ab->...b", x, w.astype(dtype),
                    preferred_element_type=jnp.float32).astype(dtype)


def swiglu(x_td, w_gate_df, w_up_df, w_down_fd):
  """down(silu(x @ gate) * (x @ up)); works for any leading dims of x."""
  dtype, f = x_td.dtype, w_gate_df.shape[-1]
  if f <= FUSE_GATE_UP_MAX_HIDDEN:
    gu = _dot(x_td, jnp.concatenate([w_gate_df, w_up_df], axis=-1), dtype)  # [..., 2F]
    g, u = gu[..., :f], gu[..., f:]
  else:
    g, u = _dot(x_td, w_gate_df, dtype), _dot(x_td, w_up_df, dtype)  # [..., F]
  return _dot(jax.nn.silu(g) * u, w_down_fd, dtype)


class MLP(nnx.Module):
  """SwiGLU feed-forward block (also the fused shared experts)."""

  def __init__(self, d_model: int, hidden: int, *, init_std: float, param_dtype,
               rngs: nnx.Rngs):
    init = normal_init(init_std)
    self.w_gate_df = nnx.Param(init(rngs.params(), (d_model, hidden), param_dtype))
    self.w_up_df = nnx.Param(init(rngs.params(), (d_model, hidden), param_dtype))
    self.w_down_fd = nnx.Param(init(rngs.params(), (hidden, d_model), param_dtype))

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    return swiglu(x_btd, self.w_gate_df[...], self.w_up_df[...], self.w_down_fd[...])


class Embed(nnx.Module):
  """Token embedding table [vocab, d_model]."""

  def __init__(self, vocab: int, d_model: int, *, init_std: float, param_dtype,
               rngs: nnx.Rngs):
    self.table_vd = nnx.Param(normal_init(init_std)(rngs.params(), (vocab, d_model), param_dtype))

  def __call__(self, tokens_bt: jax.Array, dtype) -> jax.Array:
    return jnp.take(self.table_vd[...], tokens_bt, axis=0).astype(dtype)
