"""Types and small pieces shared by the dispatch implementations."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

class ExpertWeights(NamedTuple):
  """The routed experts' SwiGLU weights, stacked over experts."""
  w_gate_edf: jax.Array  # [E, D, F]
  w_up_edf: jax.Array  # [E, D, F]
  w_down_efd: jax.Array  # [E, F, D]


class DispatchResult(NamedTuple):
  y_td: jax.Array  # [T, D] sum_k gate * FFN_{expert}(x), compute dtype
  dropped_fraction: jax.Array  # scalar float32: dropped (token, slot) pairs / (T*K)


def no_drops() -> jax.Array:
  return jnp.zeros((), jnp.float32)


def cast(experts: ExpertWeights, dtype) -> ExpertWeights:
  """The expert weights in the compute dtype."""
  return ExpertWeights(*(w.astype(dtype) for w in experts))


def gate_per_row(weight_tk: jax.Array, pair_p: jax.Array) -> jax.Array:
  """weight_p [P]: the gate of each buffer row's pair; 0 for padding rows."""
  return weight_tk.reshape(-1).at[pair_p].get(mode="fill", fill_value=0)
