"""Reference dispatch: every routed expert runs on every token; gates weight them.

O(T * E * F) compute and memory: only for tests and tiny models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsmoe.dispatch.common import DispatchResult, ExpertWeights, no_drops


def dispatch(x_td, idx_tk, weight_tk, experts: ExpertWeights) -> DispatchResult:
  """y_td = sum_k weight_tk * FFN_{idx_tk}(x_td), computed for all experts."""
  dtype = x_td.dtype
  t, e = x_td.shape[0], experts.w_gate_edf.shape[0]
  g = jnp.einsum("td,edf->tef", x_td, experts.w_gate_edf.astype(dtype))  # [T,E,F]
  u = jnp.einsum("td,edf->tef", x_td, experts.w_up_edf.astype(dtype))  # [T,E,F]
  y_ted = jnp.einsum("tef,efd->ted", jax.nn.silu(g) * u, experts.w_down_efd.astype(dtype))
  rows = jnp.broadcast_to(jnp.arange(t)[:, None], idx_tk.shape)
  combine_te = jnp.zeros((t, e), jnp.float32).at[rows, idx_tk].add(weight_tk)  # [T,E]
  y_td = jnp.einsum("te,ted->td", combine_te, y_ted.astype(jnp.float32))  # [T,D]
  return DispatchResult(y_td.astype(dtype), no_drops())
