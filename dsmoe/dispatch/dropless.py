"""Dropless dispatch: sort (token, slot) pairs by expert, grouped SwiGLU, unsort.

Steps:
  1. layout: the T*K pairs sorted by expert (stable); for the "blocked"
     backend each expert's rows are padded to a multiple of `moe.block_size`;
  2. "blocked", strategy "loop" (CPU; gmm_blocked.py): one loop over the
     single-expert blocks that gathers each block's token rows, runs the
     expert's SwiGLU and scatter-adds gate * output into y_td, with a
     hand-written backward loop;
  2'. otherwise: permute the token rows into a buffer x_pd [P, D]; grouped
     SwiGLU ("blocked", strategy "batched" (GPU): batched matmuls with
     per-block weights, gmm_batched.py; "ragged_dot": lax.ragged_dot on the
     unpadded sorted rows); combine: gather each pair's row back and sum with
     the gate weights (gather-only backwards, see permute.py).

No token is ever dropped and every shape is static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsmoe.dispatch import gmm_batched
from dsmoe.dispatch import layout as layout_lib
from dsmoe.dispatch.common import DispatchResult, ExpertWeights, no_drops
from dsmoe.dispatch.gmm_blocked import blocked_moe
from dsmoe.dispatch.permute import combine, permute

BACKENDS = ("ragged_dot", "blocked")


def auto_backend(platform: str | None = None) -> str:
  """The fastest grouped-matmul backend in XLA on `platform` (default: current).

  TPU lowers lax.ragged_dot to a native grouped matmul; CPU (and GPU without
  a tuned kernel) densify it, so elsewhere the blocked loop wins.
  """
  platform = platform or jax.default_backend()
  return "ragged_dot" if platform == "tpu" else "blocked"


def blocked_strategy(platform: str | None = None) -> str:
  """How "blocked" runs: one fused loop on CPU, batched matmuls elsewhere.

  "loop" (gmm_blocked.py) moves the least memory but runs small ops per
  block: best on a CPU. "batched" (gmm_batched.py) runs a few large kernels
  on a materialised [NB, B, D] buffer: meant for GPUs (kernel launches).
  """
  platform = platform or jax.default_backend()
  return "loop" if platform == "cpu" else "batched"


def auto_block_size(num_pairs: int, num_experts: int, cap: int = 128) -> int:
  """Rows per block for "auto": `cap`, or less when experts get fewer rows.

  Measured on a 2-core CPU (T*K=24576 rows, 64 experts, D=512, H=256):
  128 beats 64 (smaller matmuls) and 256 (more padding) by ~5-10%.
  """
  per_expert = max(1, num_pairs // num_experts)
  return int(min(cap, max(8, 1 << (per_expert.bit_length() - 1))))


def gate_per_row(weight_tk, pair_p):
  """weight_p [P]: the gate of each buffer row's pair; 0 for padding rows."""
  return weight_tk.reshape(-1).at[pair_p].get(mode="fill", fill_value=0)


def cast(experts: ExpertWeights, dtype) -> ExpertWeights:
  return ExpertWeights(*(w.astype(dtype) for w in experts))


def ragged_swiglu(x_sd, group_sizes_e, experts: ExpertWeights):
  """SwiGLU where consecutive row groups use consecutive experts (lax.ragged_dot)."""
  g = jax.lax.ragged_dot(x_sd, experts.w_gate_edh, group_sizes_e)  # [S,H]
  u = jax.lax.ragged_dot(x_sd, experts.w_up_edh, group_sizes_e)  # [S,H]
  return jax.lax.ragged_dot(jax.nn.silu(g) * u, experts.w_down_ehd, group_sizes_e)  # [S,D]


def _loop(x_td, idx_tk, weight_tk, w: ExpertWeights, block: int):
  """"blocked" / "loop": layout, then the fused loop (no permuted buffer)."""
  lay = layout_lib.blocked_layout(idx_tk, w.w_gate_edh.shape[0], block)
  weight_bs = gate_per_row(weight_tk, lay.pair_p).reshape(-1, block)  # [NB,B]
  return blocked_moe(x_td, weight_bs, w, lay.token_p.reshape(-1, block),
                     lay.block_end_e)  # [T,D]


def _permuted(x_td, idx_tk, weight_tk, w: ExpertWeights, block: int, backend: str):
  """Permute into x_pd, grouped SwiGLU ("blocked"/"batched" or ragged_dot), combine."""
  num_experts = w.w_gate_edh.shape[0]
  lay = layout_lib.blocked_layout(idx_tk, num_experts, block)
  x_pd = permute(x_td, lay.token_p, lay.row_tk, False)  # [P,D]
  if backend == "blocked":
    x_bsd = x_pd.reshape(-1, block, x_pd.shape[-1])  # [NB,B,D]
    w_b = gmm_batched.per_block(w, gmm_batched.block_experts(lay.block_end_e, x_bsd.shape[0]))
    y_pd = gmm_batched.batched_swiglu(x_bsd, w_b).reshape(x_pd.shape)  # [P,D]
  else:
    sizes_e = jnp.bincount(idx_tk.reshape(-1), length=num_experts).astype(jnp.int32)
    y_pd = ragged_swiglu(x_pd, sizes_e, w)  # [P,D]
  return combine(y_pd, weight_tk, lay.row_tk, lay.token_p, lay.pair_p, False)  # [T,D]


def dispatch_with(x_td, idx_tk, weight_tk, experts: ExpertWeights, *, backend: str,
                  block_size: int, strategy: str | None = None) -> DispatchResult:
  """The dropless path with an explicit backend (and "blocked" strategy)."""
  if backend not in BACKENDS:
    raise ValueError(f"config.model.moe.gmm_backend={backend!r} is not available "
                     f"in XLA; use one of {list(BACKENDS)}")
  w = cast(experts, x_td.dtype)
  if backend == "blocked" and (strategy or blocked_strategy()) == "loop":
    y_td = _loop(x_td, idx_tk, weight_tk, w, block_size)
  else:
    block = block_size if backend == "blocked" else 1  # 1: sorted, no padding
    y_td = _permuted(x_td, idx_tk, weight_tk, w, block, backend)
  return DispatchResult(y_td, no_drops())


def dispatch(x_td, idx_tk, weight_tk, experts: ExpertWeights, *, moe, train) -> DispatchResult:
  del train
  return dispatch_with(x_td, idx_tk, weight_tk, experts, backend=moe.gmm_backend,
                       block_size=moe.block_size)
