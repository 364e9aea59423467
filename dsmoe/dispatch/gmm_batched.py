"""Blocked grouped SwiGLU as batched matmuls: few large kernels (for GPU).

The loop of gmm_blocked.py runs a handful of small ops per block, which is
cheap on a CPU but costs a kernel launch each on a GPU. Here the permuted rows
x_bsd [NB, B, D] (every block of B rows belongs to one expert) go through
three batched matmuls with per-block weights w[block_expert_b] gathered once
([NB, D, H]; NB <= T*K/B + E, so with B >= min(D, H) no larger than the
[T*K, max(D, H)] activations). The weight gather's transpose is a sorted
segment-sum into [E, D, H] (block_expert_b is non-decreasing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsmoe.dispatch.common import ExpertWeights


def block_experts(block_end_e: jax.Array, num_blocks: int) -> jax.Array:
  """block_expert_b [NB]: the expert owning each block (unused blocks: E-1)."""
  e = block_end_e.shape[0]
  b = jnp.searchsorted(block_end_e, jnp.arange(num_blocks), side="right")
  return jnp.minimum(b, e - 1).astype(jnp.int32)


def per_block(w: ExpertWeights, block_expert_b: jax.Array) -> ExpertWeights:
  """Each block's expert weights, [NB, ...] (a sorted gather)."""
  return ExpertWeights(*(m.at[block_expert_b].get(mode="promise_in_bounds",
                                                  indices_are_sorted=True) for m in w))


def batched_swiglu(x_bsd: jax.Array, w: ExpertWeights) -> jax.Array:
  """SwiGLU of block b with weights w[b]: [NB, B, D] -> [NB, B, D]."""
  g = jnp.einsum("bsd,bdh->bsh", x_bsd, w.w_gate_edh)  # [NB,B,H]
  u = jnp.einsum("bsd,bdh->bsh", x_bsd, w.w_up_edh)  # [NB,B,H]
  return jnp.einsum("bsh,bhd->bsd", jax.nn.silu(g) * u, w.w_down_ehd)  # [NB,B,D]
