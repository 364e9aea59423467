"""Pure-jnp row gathers of the MoE permute / unpermute: the kernels' oracles.

    gather_rows(x[T,D], idx[P], scale[P]=None) -> out[P,D]
        out[p] = scale[p] * x[idx[p]]; 0 where idx[p] is out of range;
    combine_rows(y[P,D], idx[T,K], w[T,K]) -> out[T,D]
        out[t] = sum_k w[t,k] * y[idx[t,k]] (float32 sum); out-of-range rows add 0;
    row_dots(y[P,D], idx[T,K], dy[T,D]) -> dw[T,K] (float32)
        dw[t,k] = <y[idx[t,k]], dy[t]>; 0 for an out-of-range row.

These are also the "xla" implementation of pallas_kernels.permute.ops (XLA's
gathers, used on every platform without a kernel).
"""

from __future__ import annotations

import jax.numpy as jnp


def _take(a, idx):
  return a.at[idx].get(mode="fill", fill_value=0)


def gather_rows(x, idx, scale=None):
  out = _take(x, idx)  # [P, D]
  if scale is not None:
    out = (out.astype(jnp.float32) * scale[:, None].astype(jnp.float32)).astype(x.dtype)
  return out


def combine_rows(y, idx, w):
  y_tkd = _take(y, idx)  # [T, K, D]
  out = jnp.einsum("tkd,tk->td", y_tkd.astype(jnp.float32), w.astype(jnp.float32))
  return out.astype(y.dtype)


def row_dots(y, idx, dy):
  y_tkd = _take(y, idx)  # [T, K, D]
  return jnp.einsum("tkd,td->tk", y_tkd.astype(jnp.float32), dy.astype(jnp.float32))
