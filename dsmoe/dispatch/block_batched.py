"""Batched matmuls over single-expert blocks with per-block gathered weights (GPU).

The loop of expert_loop.py runs a handful of small ops per block, which is
cheap on a CPU but costs a kernel launch each on a GPU. Here the permuted rows
x_grd [G, R, D] (every block of R rows belongs to one expert) go through
three batched matmuls with per-block weights w[block_expert_g] gathered once
([G, D, F]; G <= T*K/R + E, so with R >= min(D, F) no larger than the
[T*K, max(D, F)] activations). The weight gather's transpose is a sorted
segment-sum into [E, D, F] (block_expert_g is non-decreasing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsmoe.dispatch.common import ExpertWeights


def block_experts(block_end_e: jax.Array, num_blocks: int) -> jax.Array:
  """block_expert_g [G]: the expert owning each block (unused blocks: E-1)."""
  e = block_end_e.shape[0]
  g = jnp.searchsorted(block_end_e, jnp.arange(num_blocks), side="right")
  return jnp.minimum(g, e - 1).astype(jnp.int32)


def per_block(w: ExpertWeights, block_expert_g: jax.Array) -> ExpertWeights:
  """Each block's expert weights, [G, ...] (a sorted gather)."""
  return ExpertWeights(*(m.at[block_expert_g].get(mode="promise_in_bounds",
                                                  indices_are_sorted=True) for m in w))


def block_swiglu(x_grd: jax.Array, w_g: ExpertWeights) -> jax.Array:
  """SwiGLU of block g with weights w_g[g]: [G, R, D] -> [G, R, D]."""
  g = jnp.einsum("grd,gdf->grf", x_grd, w_g.w_gate_edf)  # [G,R,F]
  u = jnp.einsum("grd,gdf->grf", x_grd, w_g.w_up_edf)  # [G,R,F]
  return jnp.einsum("grf,gfd->grd", jax.nn.silu(g) * u, w_g.w_down_efd)  # [G,R,D]


def swiglu_over_blocks(x_pd: jax.Array, block_end_e: jax.Array, w: ExpertWeights,
                       block: int) -> jax.Array:
  """The permuted rows x_pd [P, D] (blocks of `block` rows, expert e owning
  the blocks before block_end_e[e]) through their experts' SwiGLU: [P, D]."""
  x_grd = x_pd.reshape(-1, block, x_pd.shape[-1])  # [G,R,D]
  w_g = per_block(w, block_experts(block_end_e, x_grd.shape[0]))
  return block_swiglu(x_grd, w_g).reshape(x_pd.shape)  # [P,D]
