"""Token rows into the expert-sorted buffer and back, with gather-only backwards.

Autodiff of a gather is a scatter-add, which is slow on CPU and GPU. Both maps
here are permutations (plus padding / dropped rows), so each backward is a
gather by the inverse map instead (see `layout.Layout` for the maps):

  permute:   x_pd[p]   = x_td[token_p[p]]
             dx_td[t]  = sum_k dx_pd[row_tk[t, k]]        (dropped rows: 0)
  unpermute: y_tkd[t,k] = y_pd[row_tk[t, k]]              (dropped rows: 0)
             dy_pd[p]  = dy_tkd.flat[pair_p[p]]           (padding rows: 0)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def permute(x_td, token_p, row_tk, may_drop: bool):
  """x_td [T, D] -> x_pd [P, D] (row p holds token token_p[p])."""
  del row_tk
  return _rows(x_td, token_p, may_miss=False)  # [P,D]


def _permute_fwd(x_td, token_p, row_tk, may_drop):
  return permute(x_td, token_p, row_tk, may_drop), (token_p, row_tk)


def _permute_bwd(may_drop, res, dx_pd):
  token_p, row_tk = res
  dx_tkd = _rows(dx_pd, row_tk, may_miss=may_drop)  # [T,K,D]
  dx_td = jnp.sum(dx_tkd, axis=1, dtype=jnp.float32).astype(dx_pd.dtype)  # [T,D]
  return dx_td, None, None


permute.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def unpermute(y_pd, row_tk, pair_p, may_drop: bool):
  """y_pd [P, D] -> y_tkd [T, K, D] (0 where a pair was dropped)."""
  del pair_p
  return _rows(y_pd, row_tk, may_miss=may_drop)  # [T,K,D]


def _unpermute_fwd(y_pd, row_tk, pair_p, may_drop):
  return unpermute(y_pd, row_tk, pair_p, may_drop), (row_tk, pair_p)


def _unpermute_bwd(may_drop, res, dy_tkd):
  del may_drop
  row_tk, pair_p = res
  dy_sd = dy_tkd.reshape(-1, dy_tkd.shape[-1])  # [S,D]
  return _rows(dy_sd, pair_p, may_miss=True), None, None  # [P,D]; padding -> 0


unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


def combine(y_tkd: jax.Array, weight_tk: jax.Array) -> jax.Array:
  """y_td = sum_k weight_tk * y_tkd, accumulated in float32, in y's dtype."""
  y_td = jnp.einsum("tkd,tk->td", y_tkd, weight_tk.astype(y_tkd.dtype),
                    preferred_element_type=jnp.float32)  # [T,D]
  return y_td.astype(y_tkd.dtype)
