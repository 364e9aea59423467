"""The routed experts of one device: the seam between expert parallelism and
the grouped SwiGLU.

    local_dispatch(x_td, idx_tk, weight_tk, experts, plan, *, first_expert, expected_pairs)

computes sum_k weight * FFN_{idx - first_expert}(x) over the (token, slot)
pairs whose expert is one of this device's E_l experts
[first_expert, first_expert + E_l); every other pair adds 0 and gets a zero
gate gradient. The pairs are laid out by local expert with one extra
"elsewhere" group sorted last, and run through the same seam as the
single-device dispatch (dsmoe.dispatch.grouped.swiglu), which computes only
the local experts' groups:

  * loop / kernel (CPU): the loop visits only the local experts' rows, so
    pairs of other devices cost nothing but their layout entries;
  * ragged_dot, pallas: group sizes of the local experts only; the rows of
    the "elsewhere" group come out as zeros without being computed;
  * batched (GPU): every buffer block is computed, those of the
    "elsewhere" group with zero gates (wasted work under the allgather
    exchange).
"""

from __future__ import annotations

import jax.numpy as jnp

from dsmoe.dispatch import grouped
from dsmoe.dispatch import layout as layout_lib
from dsmoe.dispatch.common import ExpertWeights
from dsmoe.spec import ExpertPlan


def _here(idx_tk, weight_tk, first_expert, num_local: int):
  """Local expert ids (num_local = "elsewhere") and gates (0 elsewhere)."""
  here = (idx_tk >= first_expert) & (idx_tk < first_expert + num_local)
  return (jnp.where(here, idx_tk - first_expert, num_local).astype(jnp.int32),
          jnp.where(here, weight_tk, jnp.zeros_like(weight_tk)))


def local_dispatch(x_td, idx_tk, weight_tk, experts: ExpertWeights, plan: ExpertPlan, *,
                   first_expert, expected_pairs: int | None = None):
  """y_td [T, D]: the local experts' share of sum_k weight * FFN_idx(x).

  `first_expert` (int or traced scalar): global id of local expert 0;
  `expected_pairs`: about how many pairs are local (sizes the automatic
  block and the loop's chunks; default all of them).
  """
  num_local = experts.w_gate_edf.shape[0]
  idx, weight = _here(idx_tk, weight_tk, first_expert, num_local)
  expected = expected_pairs or idx.size
  target = grouped.loop_target(expected, num_local)
  block = grouped.block_for(plan, expected, num_local, target)
  lay = layout_lib.blocked_layout(idx, num_local + 1, block)  # "elsewhere" last
  return grouped.swiglu(plan, x_td, weight, experts, lay, block, target_rows=target,
                        may_drop=False)
