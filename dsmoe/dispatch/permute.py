"""Token rows into the expert-sorted buffer and back, with gather-only backwards.

Autodiff of a gather is a scatter-add, which is slow on CPU and GPU. Both maps
here are permutations (plus padding / dropped rows), so each backward is a
gather by the inverse map instead (see `layout.Layout` for the maps):

  permute:   x_pd[p]   = x_td[token_p[p]]
             dx_td[t]  = sum_k dx_pd[row_tk[t, k]]        (dropped rows: 0)
  combine:   y_td[t]   = sum_k weight_tk[t, k] * y_pd[row_tk[t, k]]  (dropped: 0)
             dy_pd[p]  = weight[pair_p[p]] * dy_td[token_p[p]]      (padding: 0)
             dweight_tk[t, k] = <y_pd[row_tk[t, k]], dy_td[t]>

`may_drop` (keyword) says whether some pairs have no row (capacity dispatch):
their row index is out of range and reads as 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _rows(a, idx, *, may_miss: bool):
  """a[idx] along axis 0; indices out of range give 0 rows when `may_miss`."""
  if may_miss:
    return a.at[idx].get(mode="fill", fill_value=0)
  return a.at[idx].get(mode="promise_in_bounds")


@functools.cache
def _permute_fn(may_drop: bool):
  @jax.custom_vjp
  def fn(x_td, token_p, row_tk):
    del row_tk
    return _rows(x_td, token_p, may_miss=False)  # [P,D]

  def fwd(x_td, token_p, row_tk):
    return fn(x_td, token_p, row_tk), (token_p, row_tk)

  def bwd(res, dx_pd):
    token_p, row_tk = res
    dx_tkd = _rows(dx_pd, row_tk, may_miss=may_drop)  # [T,K,D]
    dx_td = jnp.sum(dx_tkd, axis=1, dtype=jnp.float32).astype(dx_pd.dtype)  # [T,D]
    return dx_td, None, None

  fn.defvjp(fwd, bwd)
  return fn


def permute(x_td, token_p, row_tk, *, may_drop: bool):
  """x_td [T, D] -> x_pd [P, D] (row p holds token token_p[p])."""
  return _permute_fn(may_drop)(x_td, token_p, row_tk)


@functools.cache
def _combine_fn(may_drop: bool):
  @jax.custom_vjp
  def fn(y_pd, weight_tk, row_tk, token_p, pair_p):
    del token_p, pair_p
    y_tkd = _rows(y_pd, row_tk, may_miss=may_drop)  # [T,K,D]
    y_td = jnp.einsum("tkd,tk->td", y_tkd, weight_tk.astype(y_pd.dtype),
                      preferred_element_type=jnp.float32)  # [T,D]
    return y_td.astype(y_pd.dtype)

  def fwd(y_pd, weight_tk, row_tk, token_p, pair_p):
    return fn(y_pd, weight_tk, row_tk, token_p, pair_p), (y_pd, weight_tk, row_tk, token_p, pair_p)

  def bwd(res, dy_td):
    """dy_pd[p] = w[pair_p] * dy_td[token_p] (padding: 0); dw = <y_pd[row], dy>."""
    y_pd, weight_tk, row_tk, token_p, pair_p = res
    w_p = _rows(weight_tk.reshape(-1), pair_p, may_miss=True)  # [P]; padding -> 0
    dy_pd = _rows(dy_td, token_p, may_miss=False) * w_p[:, None].astype(dy_td.dtype)  # [P,D]
    y_tkd = _rows(y_pd, row_tk, may_miss=may_drop)  # [T,K,D]
    dw_tk = jnp.einsum("tkd,td->tk", y_tkd, dy_td, preferred_element_type=jnp.float32)  # [T,K]
    return dy_pd.astype(y_pd.dtype), dw_tk.astype(weight_tk.dtype), None, None, None

  fn.defvjp(fwd, bwd)
  return fn


def combine(y_pd, weight_tk, row_tk, token_p, pair_p, *, may_drop: bool):
  """y_td = sum_k weight_tk * y_pd[row_tk] (dropped pairs add 0), in y's dtype.

  The gather and the weighted sum fuse into one pass; no [T, K, D] array is
  kept for the backward.
  """
  return _combine_fn(may_drop)(y_pd, weight_tk, row_tk, token_p, pair_p)
