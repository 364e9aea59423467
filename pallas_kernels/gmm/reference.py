"""Pure-jnp grouped matmuls: the oracles of the kernels (and their meaning).

    gmm(lhs[m,k], rhs[L,k,n], group_sizes[G]) -> out[m,n]
        out[r] = lhs[r] @ rhs[g(r) - group_offset] for every row r of a local
        group (group_offset <= g(r) < group_offset + L); 0 for every other row
        (rows of other groups and rows past sum(group_sizes));
    tgmm(lhs[m,k], dout[m,n], group_sizes[G]) -> drhs[L,k,n]
        drhs[l] = sum over the rows r of group group_offset + l of
        outer(lhs[r], dout[r]); 0 for an empty group.

Both accumulate in float32. Each is a dense masked matmul per local group:
O(L * m * k * n) work, for tests on small shapes only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _row_masks(group_sizes, m: int, group_offset, num_local: int) -> jax.Array:
  """mask_lm[l, r]: row r belongs to local group l."""
  end_g = jnp.cumsum(group_sizes.astype(jnp.int32))
  start_g = end_g - group_sizes.astype(jnp.int32)
  g = jnp.asarray(group_offset, jnp.int32) + jnp.arange(num_local, dtype=jnp.int32)
  in_range = g < group_sizes.shape[0]
  g = jnp.minimum(g, group_sizes.shape[0] - 1)
  rows = jnp.arange(m, dtype=jnp.int32)
  return (in_range[:, None] & (rows[None, :] >= start_g[g][:, None])
          & (rows[None, :] < end_g[g][:, None]))  # [L, m]


def gmm(lhs, rhs, group_sizes, *, group_offset=0, preferred_element_type=None):
  """out[m, n] (see the module docstring); rhs holds the L local groups."""
  out_dtype = preferred_element_type or lhs.dtype
  mask_lm = _row_masks(group_sizes, lhs.shape[0], group_offset, rhs.shape[0])
  y_lmn = jnp.einsum("mk,lkn->lmn", lhs, rhs, preferred_element_type=jnp.float32,
                     precision=jax.lax.Precision.HIGHEST)  # [L,m,n]
  return jnp.sum(jnp.where(mask_lm[:, :, None], y_lmn, 0.0), axis=0).astype(out_dtype)


def tgmm(lhs, dout, group_sizes, *, group_offset=0, num_local_groups=None,
         preferred_element_type=None):
  """drhs[L, k, n] (see the module docstring)."""
  num_local = num_local_groups or group_sizes.shape[0]
  out_dtype = preferred_element_type or lhs.dtype
  mask_lm = _row_masks(group_sizes, lhs.shape[0], group_offset, num_local)
  lhs_lmk = jnp.where(mask_lm[:, :, None], lhs[None].astype(jnp.float32), 0.0)  # [L,m,k]
  return jnp.einsum("lmk,mn->lkn", lhs_lmk, dout.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST).astype(out_dtype)  # [L,k,n]
