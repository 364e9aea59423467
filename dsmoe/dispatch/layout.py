"""Where each (token, slot) pair lives in an expert-sorted row buffer.

Every fast dispatch moves token rows into a buffer x_pd [P, D] whose rows are
grouped by expert, runs the experts on that buffer, and brings the rows back.
A `Layout` holds the integer maps between the two orders (no gradients):

  row_tk     [T, K] buffer row of each pair; P (out of range) if dropped
  token_p    [P]    token of each buffer row (0 for padding rows, whose gate is 0)
  pair_p     [P]    flat pair index s = t*K + k of each row; S = T*K for padding
  block_end_e [E]   expert e owns blocks block_end_e[e-1] .. block_end_e[e]-1
  dropped    []     number of dropped pairs (float32)
  start_e    [E]    first buffer row of expert e
  count_e    [E]    pairs that expert e's rows hold (kept pairs; padding excluded)

Two layouts:
  * `blocked_layout`: sorted by expert, each expert's rows padded to a multiple
    of `block` (R rows), so every block belongs to one expert (dropless;
    block=1 gives the plain sorted order of ragged_dot; with a capacity, the
    kept pairs packed the same way: the CPU loop's capacity layout);
  * `capacity_layout`: E fixed buffers of C rows ([E, C, D] flattened); a pair
    takes row e*C + its rank among the pairs of expert e, if that rank < C.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Layout(NamedTuple):
  row_tk: jax.Array
  token_p: jax.Array
  pair_p: jax.Array
  block_end_e: jax.Array
  dropped: jax.Array
  start_e: jax.Array
  count_e: jax.Array


def num_blocks_bound(num_pairs: int, num_experts: int, block: int) -> int:
  """Static number of blocks that always suffices: sum_e ceil(n_e / block)."""
  return max(1, math.ceil((num_pairs + num_experts * (block - 1)) / block))


def _rows_to_pairs(row_s: jax.Array, num_rows: int, k: int):
  """Inverse map of the pair -> row map: (token_p, pair_p); rows unused get S."""
  s = row_s.shape[0]
  pair_p = jnp.full((num_rows,), s, jnp.int32).at[row_s].set(
      jnp.arange(s, dtype=jnp.int32), mode="drop", unique_indices=True)  # [P]
  token_p = jnp.where(pair_p < s, pair_p // k, 0)  # [P]
  return token_p, pair_p


def _rank_in_expert(expert_s: jax.Array, order_s: jax.Array, num_experts: int):
  """Rank of each pair among its expert's pairs, in the priority `order_s`."""
  s = expert_s.shape[0]
  sizes_e = jnp.bincount(expert_s, length=num_experts).astype(jnp.int32)  # [E]
  start_e = jnp.cumsum(sizes_e) - sizes_e  # [E] first sorted position of e
  sorted_expert = expert_s[order_s]  # [S]
  rank_sorted = jnp.arange(s, dtype=jnp.int32) - start_e[sorted_expert]  # [S]
  rank_s = jnp.zeros((s,), jnp.int32).at[order_s].set(rank_sorted, unique_indices=True)
  return rank_s, sizes_e


def blocked_layout(idx_tk: jax.Array, num_experts: int, block: int, *, cap: int = 0,
                   weight_tk: jax.Array | None = None, policy: str = "position") -> Layout:
  """Layout in which every expert's rows start on a block boundary.

  Dropless (cap = 0), or keeping only each expert's first `cap` pairs in the
  priority order `policy` (capacity dispatch without [E, C] buffers: the
  kept pairs are packed like dropless ones). Steps: 1. rank of each pair
  within its expert (stable sort by expert, or by expert then priority);
  2. kept pairs per expert, padded to a multiple of `block`, and their
  offsets; 3. row = padded offset of the expert + rank (dropped pairs: out
  of range); 4. inverse maps.
  """
  t, k = idx_tk.shape
  expert_s = idx_tk.reshape(-1).astype(jnp.int32)  # [S]
  if cap:
    order_s = priority_order(expert_s, weight_tk.reshape(-1), policy, num_experts)
  else:
    order_s = sort_by_expert(expert_s, num_experts)
  rank_s, sizes_e = _rank_in_expert(expert_s, order_s, num_experts)
  count_e = jnp.minimum(sizes_e, cap) if cap else sizes_e
  blocks_e = (count_e + block - 1) // block  # [E]
  block_end_e = jnp.cumsum(blocks_e)  # [E]
  kept = min(t * k, num_experts * cap) if cap else t * k
  num_rows = num_blocks_bound(kept, num_experts, block) * block
  row_s = (block_end_e - blocks_e)[expert_s] * block + rank_s  # [S]
  dropped = jnp.zeros((), jnp.float32)
  if cap:
    row_s = jnp.where(rank_s < cap, row_s, num_rows)
    dropped = jnp.sum(rank_s >= cap).astype(jnp.float32)
  token_p, pair_p = _rows_to_pairs(row_s, num_rows, k)
  start_e = ((block_end_e - blocks_e) * block).astype(jnp.int32)
  return Layout(row_s.reshape(t, k), token_p, pair_p, block_end_e.astype(jnp.int32),
                dropped, start_e, count_e)


def sort_by_expert(expert_s: jax.Array, num_experts: int) -> jax.Array:
  """The stable argsort of expert ids in [0, num_experts).

  One sort of unique int32 keys expert * S + position (one array to sort
  instead of a stable sort of (id, position) pairs; several times faster on
  XLA:CPU) when they fit in 31 bits, else jnp.argsort(stable=True).
  """
  s = expert_s.shape[0]
  if num_experts * s < 2**31:
    return jnp.sort(expert_s * s + jnp.arange(s, dtype=jnp.int32)) % s
  return jnp.argsort(expert_s, stable=True)


def priority_order(expert_s: jax.Array, weight_s: jax.Array, policy: str,
                   num_experts: int) -> jax.Array:
  """Pairs sorted by expert, then by priority: flat position, or gate weight."""
  if policy == "position":
    return sort_by_expert(expert_s, num_experts)
  if policy == "score":
    by_weight = jnp.argsort(-weight_s, stable=True)  # highest gate first
    return by_weight[sort_by_expert(expert_s[by_weight], num_experts)]
  raise ValueError(f"config.model.moe.drop_policy={policy!r}: expected "
                   "'position' or 'score'")


def capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
  """C = ceil(factor * T * K / E), at least 1 and at most T * K."""
  c = math.ceil(factor * num_tokens * top_k / num_experts)
  return int(min(max(c, 1), num_tokens * top_k))


def capacity_layout(idx_tk: jax.Array, weight_tk: jax.Array, num_experts: int,
                    cap: int, policy: str) -> Layout:
  """Capacity layout: pair -> row e*C + rank if rank < C, else dropped.

  Steps: 1. priority order within each expert (`policy`); 2. rank of each
  pair in it; 3. keep rank < C; 4. inverse maps over the E*C rows.
  """
  t, k = idx_tk.shape
  expert_s = idx_tk.reshape(-1).astype(jnp.int32)  # [S]
  order_s = priority_order(expert_s, weight_tk.reshape(-1), policy, num_experts)
  rank_s, sizes_e = _rank_in_expert(expert_s, order_s, num_experts)
  kept_s = rank_s < cap
  num_rows = num_experts * cap
  row_s = jnp.where(kept_s, expert_s * cap + rank_s, num_rows)  # [S]
  token_p, pair_p = _rows_to_pairs(row_s, num_rows, k)
  dropped = jnp.sum(~kept_s).astype(jnp.float32)
  block_end_e = jnp.arange(1, num_experts + 1, dtype=jnp.int32)  # one block of C each
  start_e = jnp.arange(num_experts, dtype=jnp.int32) * cap
  return Layout(row_s.reshape(t, k), token_p, pair_p, block_end_e, dropped, start_e,
                jnp.minimum(sizes_e, cap))
