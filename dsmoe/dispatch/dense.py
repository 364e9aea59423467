"""Reference dispatch: every routed expert runs on every token; gates weight them.

O(T * E * H) compute and memory: only for tests and tiny models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsmoe.dispatch.common import DispatchResult, ExpertWeights, no_drops


def dispatch(x_td, idx_tk, weight_tk, experts: ExpertWeights, *, moe, train) -> DispatchResult:
  del moe, train
  dtype = x_td.dtype
  t, e = x_td.shape[0], experts.w_gate_edh.shape[0]
  g = jnp.einsum("td,edh->teh", x_td, experts.w_gate_edh.astype(dtype))  # [T,E,H]
  u = jnp.einsum("td,edh->teh", x_td, experts.w_up_edh.astype(dtype))  # [T,E,H]
  y_ted = jnp.einsum("teh,ehd->ted", jax.nn.silu(g) * u, experts.w_down_ehd.astype(dtype))
  rows = jnp.broadcast_to(jnp.arange(t)[:, None], idx_tk.shape)
  combine_te = jnp.zeros((t, e), jnp.float32).at[rows, idx_tk].add(weight_tk)  # [T,E]
  y_td = jnp.einsum("te,ted->td", combine_te, y_ted.astype(jnp.float32))
  return DispatchResult(y_td.astype(dtype), no_drops())
