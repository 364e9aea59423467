"""Types and small pieces shared by the dispatch implementations."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ExpertWeights(NamedTuple):
  w_gate_edh: jax.Array
  w_up_edh: jax.Array
  w_down_ehd: jax.Array


class DispatchResult(NamedTuple):
  y_td: jax.Array
  dropped_fraction: jax.Array  # scalar float32


def no_drops() -> jax.Array:
  return jnp.zeros((), jnp.float32)
