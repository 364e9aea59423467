"""Balance losses of DeepSeekMoE (docs/MODEL.md). Pure functions.

Notation: N' routed experts, K' chosen per token, T tokens the statistic runs
over, s_{i,t} the router scores (softmax over routed experts).

  f_i = N' / (K' T) * sum_t 1[token t chose expert i]      (no gradient)
  P_i = 1/T * sum_t s_{i,t}                                (gradient flows)
  L_ExpBal = sum_i f_i P_i          (perfect balance: 1; times a1 outside)
  L_DevBal = sum_d f'_d P'_d,  f'_d = mean_{j in E_d} f_j,  P'_d = sum_{j in E_d} P_j
  L_CommBal = sum_d f''_d P'_d, f''_d = D / (M T) * sum_t 1[token t sent to device d]

Every statistic runs over all T tokens it is given: called outside
shard_map on the global batch (as dsmoe.model.moe does), the losses do not
depend on how the batch is split over devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def expert_counts(idx_btk: jax.Array, num_experts: int) -> jax.Array:
  """Number of (token, slot) picks of each expert per sequence: [B, E] float32."""
  b = idx_btk.shape[0]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], idx_btk.shape)
  return jnp.zeros((b, num_experts), jnp.float32).at[rows, idx_btk].add(1.0)


def _f_and_p(scores_bte, idx_btk, per_sequence: bool):
  b, t, e = scores_bte.shape
  k = idx_btk.shape[-1]
  counts_be = jax.lax.stop_gradient(expert_counts(idx_btk, e))
  if per_sequence:
    return counts_be * e / (k * t), jnp.mean(scores_bte, axis=1)  # [B,E], [B,E]
  f_e = jnp.sum(counts_be, axis=0) * e / (k * b * t)
  return f_e[None], jnp.mean(scores_bte, axis=(0, 1))[None]  # [1,E], [1,E]


def expert_balance_loss(scores_bte: jax.Array, idx_btk: jax.Array, *,
                        seq_aux: bool) -> jax.Array:
  """L_ExpBal / a1. seq_aux: per sequence then averaged; else over the batch."""
  f, p = _f_and_p(scores_bte.astype(jnp.float32), idx_btk, seq_aux)
  return jnp.mean(jnp.sum(f * p, axis=-1))


def device_balance_loss(scores_bte: jax.Array, idx_btk: jax.Array, *,
                        num_groups: int) -> jax.Array:
  """L_DevBal / a2 with D = num_groups groups of consecutive experts (batch-level)."""
  f, p = _f_and_p(scores_bte.astype(jnp.float32), idx_btk, per_sequence=False)
  e = f.shape[-1]
  f_dev = f.reshape(num_groups, e // num_groups).mean(axis=-1)  # [D]
  p_dev = p.reshape(num_groups, e // num_groups).sum(axis=-1)  # [D]
  return jnp.sum(f_dev * p_dev)


def comm_balance_loss(scores_bte: jax.Array, idx_btk: jax.Array, *, num_groups: int,
                      max_groups: int) -> jax.Array:
  """L_CommBal / a3 (DeepSeek-V2): D = num_groups devices, M = max_groups per token."""
  b, t, e = scores_bte.shape
  dev_btk = idx_btk // (e // num_groups)
  sent_btd = jnp.any(dev_btk[..., None] == jnp.arange(num_groups), axis=-2)  # [B,T,D]
  f_d = jax.lax.stop_gradient(jnp.sum(sent_btd, axis=(0, 1)).astype(jnp.float32)
                              * num_groups / (max_groups * b * t))  # [D]
  p_d = jnp.mean(scores_bte.astype(jnp.float32), axis=(0, 1)).reshape(
      num_groups, -1).sum(axis=-1)  # [D]
  return jnp.sum(f_d * p_d)
