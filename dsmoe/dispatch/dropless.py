"""Dropless dispatch: sort (token, slot) pairs by expert, grouped SwiGLU, unsort.

Steps:
  1. layout: the T*K pairs sorted by expert (stable); for the "blocked"
     backend each expert's rows are padded to a multiple of `moe.block_size`;
  2. permute: gather the token rows into that order, x_pd [P, D];
  3. grouped SwiGLU: rows of expert e use expert e's weights
     ("blocked": a loop over single-expert blocks; "ragged_dot": lax.ragged_dot);
  4. combine: gather each pair's row back and sum with the gate weights,
     y_td = sum_k weight_tk * y_pd[row_tk].

No token is ever dropped and every shape is static. Steps 2 and 4 have
gather-only backwards (see permute.py); step 3's "blocked" backward is a
hand-written loop (see gmm_blocked.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsmoe.dispatch import layout as layout_lib
from dsmoe.dispatch.common import DispatchResult, ExpertWeights, no_drops
from dsmoe.dispatch.gmm_blocked import blocked_swiglu
from dsmoe.dispatch.permute import combine, permute

BACKENDS = ("ragged_dot", "blocked")


def auto_backend(platform: str | None = None) -> str:
  """The fastest grouped-matmul backend in XLA on `platform` (default: current).

  TPU lowers lax.ragged_dot to a native grouped matmul; CPU (and GPU without
  a tuned kernel) densify it, so elsewhere the blocked loop wins.
  """
  platform = platform or jax.default_backend()
  return "ragged_dot" if platform == "tpu" else "blocked"


def cast(experts: ExpertWeights, dtype) -> ExpertWeights:
  return ExpertWeights(*(w.astype(dtype) for w in experts))


def ragged_swiglu(x_sd, group_sizes_e, experts: ExpertWeights):
  """SwiGLU where consecutive row groups use consecutive experts (lax.ragged_dot)."""
  g = jax.lax.ragged_dot(x_sd, experts.w_gate_edh, group_sizes_e)  # [S,H]
  u = jax.lax.ragged_dot(x_sd, experts.w_up_edh, group_sizes_e)  # [S,H]
  return jax.lax.ragged_dot(jax.nn.silu(g) * u, experts.w_down_ehd, group_sizes_e)  # [S,D]


def dispatch_with(x_td, idx_tk, weight_tk, experts: ExpertWeights, *, backend: str,
                  block_size: int) -> DispatchResult:
  """The dropless path with an explicit grouped-matmul backend."""
  if backend not in BACKENDS:
    raise ValueError(f"config.model.moe.gmm_backend={backend!r} is not available "
                     f"in XLA; use one of {list(BACKENDS)}")
  num_experts = experts.w_gate_edh.shape[0]
  w = cast(experts, x_td.dtype)
  block = block_size if backend == "blocked" else 1
  lay = layout_lib.blocked_layout(idx_tk, num_experts, block)
  x_pd = permute(x_td, lay.token_p, lay.row_tk, False)  # [P,D]
  if backend == "blocked":
    y_pd = blocked_swiglu(x_pd, w, lay.block_expert_b, lay.num_blocks)  # [P,D]
  else:
    sizes_e = jnp.bincount(idx_tk.reshape(-1), length=num_experts).astype(jnp.int32)
    y_pd = ragged_swiglu(x_pd, sizes_e, w)  # [P,D]
  y_td = combine(y_pd, weight_tk, lay.row_tk, lay.token_p, lay.pair_p, False)  # [T,D]
  return DispatchResult(y_td, no_drops())


def dispatch(x_td, idx_tk, weight_tk, experts: ExpertWeights, *, moe, train) -> DispatchResult:
  del train
  return dispatch_with(x_td, idx_tk, weight_tk, experts, backend=moe.gmm_backend,
                       block_size=moe.block_size)
