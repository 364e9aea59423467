"""Expert parallelism: the routed experts inside one `jax.shard_map`.

    routed_experts(x_td, idx_tk, weight_tk, experts, plan, *, train)

runs on the ambient mesh (`jax.set_mesh`). Tokens are split over the batch
axes (data x fsdp x expert); the X devices of the `expert` axis hold E/X
consecutive routed experts each (E_l = E/X; device j: [j E_l, (j+1) E_l)),
their weights also split over `fsdp` on d_model (gathered inside, so the
weight gradient leaves as a reduce-scatter). Each device runs its local
experts with `local.local_dispatch` (the grouped SwiGLU of `plan`). The
token exchange along `expert` (`plan.ep_exchange`, resolved by
dsmoe.config for the platform the step is lowered for):

  "allgather"  all-gather every token and its routing (X T rows), run the
               local experts on the pairs that chose them, psum_scatter the
               partial outputs back. Dropless; any backend, CPU included.
  "all_to_all" per destination device a buffer of C = ceil(f T K / X) rows
               (f = capacity_factor in training, eval_capacity_factor at
               evaluation, 0 = C = T K: never drop); pairs beyond C (in
               `drop_policy` order) are dropped; one all_to_all there, one
               back. Any backend.
  "ragged_all_to_all"  pairs sorted by expert, each device's chunk sent with
               its exact size into a buffer of X T K rows (room for the worst
               case): dropless with no padding on the wire. TPU/GPU only
               (XLA:CPU has no ragged all-to-all).

The gates multiply the expert outputs on the tokens' own device, so the
gradient of the gates and of the router never crosses the network twice.
Routing, balance losses and statistics are computed outside, on the global
batch (see dsmoe.model.moe).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from dsmoe.dispatch import layout as layout_lib
from dsmoe.errors import ConfigError
from dsmoe.dispatch.common import DispatchResult, ExpertWeights
from dsmoe.dispatch.permute import combine, permute
from dsmoe.parallel import mesh as mesh_lib
from dsmoe.parallel import rules
from dsmoe.parallel.local import local_dispatch
from dsmoe.spec import ExpertPlan

AXIS = "expert"
# Names of the exchanged activations (remat policy "save_moe_exchange").
RECEIVED, RETURNED = "moe_received", "moe_returned"


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                      recv_sizes, *, axis_name, platform: str):
  """lax.ragged_all_to_all, with one clear error where XLA lacks it (CPU);
  `platform`: the one the plan was resolved for (the lowering platform)."""
  if platform == "cpu":
    raise ConfigError("config.model.moe.ep_exchange='ragged_all_to_all' needs a TPU or GPU: "
                     "XLA:CPU has no ragged all-to-all; use 'allgather' (dropless) or "
                     "'all_to_all' on CPU")
  return lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, axis_name=axis_name)


class _Local:
  """The local expert computation with its settings bound."""

  def __init__(self, experts: ExpertWeights, num_experts: int, plan: ExpertPlan):
    self.experts, self.num_experts, self.plan = experts, num_experts, plan
    self.num_local = experts.w_gate_edf.shape[0]

  def __call__(self, x_td, idx_tk, weight_tk, first_expert, pairs: int):
    expected = max(1, pairs * self.num_local // self.num_experts)
    return local_dispatch(x_td, idx_tk, weight_tk, self.experts, self.plan,
                          first_expert=first_expert, expected_pairs=expected)

  def rows(self, x_pd, local_p):
    """One pair per row, local expert ids (num_local: empty row), gate 1."""
    ones = jnp.ones(local_p.shape + (1,), jnp.float32)
    return local_dispatch(x_pd, local_p[:, None], ones, self.experts, self.plan,
                          first_expert=0)


def _allgather(x_td, idx_tk, weight_tk, run: _Local, *, train, factor, policy):
  del train, factor, policy
  x_all = checkpoint_name(lax.all_gather(x_td, AXIS, tiled=True), RECEIVED)  # [X*T,D]
  idx_all = checkpoint_name(lax.all_gather(idx_tk, AXIS, tiled=True), RECEIVED)  # [X*T,K]
  w_all = checkpoint_name(lax.all_gather(weight_tk, AXIS, tiled=True), RECEIVED)  # [X*T,K]
  first = lax.axis_index(AXIS) * run.num_local
  y_all = run(x_all, idx_all, w_all, first, idx_all.size)  # [X*T,D] partial sums
  y_td = lax.psum_scatter(y_all, AXIS, scatter_dimension=0, tiled=True)  # [T,D]
  return checkpoint_name(y_td, RETURNED), jnp.zeros((), jnp.float32)


def _all_to_all(x_td, idx_tk, weight_tk, run: _Local, *, train, factor, policy):
  """Buffers of C rows per destination device; capacity_layout with devices as
  the "experts" gives each kept pair its row dev * C + rank."""
  del train  # `factor` is already the training or evaluation one
  t, k = idx_tk.shape
  x_dev = lax.axis_size(AXIS)
  cap = layout_lib.capacity(t, k, x_dev, factor) if factor > 0 else t * k
  dev_tk = idx_tk // run.num_local  # [T,K] destination device
  lay = layout_lib.capacity_layout(dev_tk, weight_tk, x_dev, cap, policy)
  x_pd = permute(x_td, lay.token_p, lay.row_tk, may_drop=True)  # [X*C,D]
  s = t * k
  idx_p = idx_tk.reshape(-1).at[lay.pair_p].get(mode="fill", fill_value=-1)  # [X*C]
  local_p = jnp.where(lay.pair_p < s, idx_p % run.num_local, run.num_local)  # empty: E_l
  x_recv = checkpoint_name(lax.all_to_all(x_pd, AXIS, 0, 0, tiled=True), RECEIVED)
  local_recv = checkpoint_name(lax.all_to_all(local_p, AXIS, 0, 0, tiled=True), RECEIVED)
  y_recv = run.rows(x_recv, local_recv)  # [X*C,D] ungated expert outputs
  y_pd = checkpoint_name(lax.all_to_all(y_recv, AXIS, 0, 0, tiled=True), RETURNED)
  y_td = combine(y_pd, weight_tk, lay.row_tk, lay.token_p, lay.pair_p, may_drop=True)
  return y_td, lay.dropped


def _ragged(x_td, idx_tk, weight_tk, run: _Local, *, train, factor, policy):
  """Sorted by expert (= by device); exact-size chunks into X*T*K-row buffers."""
  del train, factor, policy
  t, k = idx_tk.shape
  x_dev, me = lax.axis_size(AXIS), lax.axis_index(AXIS)
  lay = layout_lib.blocked_layout(idx_tk, run.num_experts, 1)  # sorted by expert
  x_sd = permute(x_td, lay.token_p, lay.row_tk, may_drop=False)  # [S,D]
  local_s = idx_tk.reshape(-1)[lay.pair_p] % run.num_local  # [S] local id at the receiver
  send = jnp.bincount(idx_tk.reshape(-1), length=run.num_experts).reshape(
      x_dev, run.num_local).sum(axis=1).astype(jnp.int32)  # [X] pairs to each device
  in_off = jnp.cumsum(send) - send
  sizes = lax.all_gather(send, AXIS)  # [X src, X dst]
  recv = sizes[:, me]  # [X] from each source
  out_off = (jnp.cumsum(sizes, axis=0) - sizes)[me]  # [X] where my chunk lands on dst
  rows = x_dev * t * k
  platform = run.plan.platform
  x_recv = ragged_all_to_all(x_sd, jnp.zeros((rows, x_sd.shape[1]), x_sd.dtype), in_off,
                             send, out_off, recv, axis_name=AXIS, platform=platform)
  x_recv = checkpoint_name(x_recv, RECEIVED)  # [X*S,D]
  local_recv = checkpoint_name(ragged_all_to_all(
      local_s, jnp.full((rows,), run.num_local, jnp.int32), in_off, send, out_off, recv,
      axis_name=AXIS, platform=platform), RECEIVED)  # [X*S]
  y_recv = run.rows(x_recv, local_recv)  # [X*S,D]
  recv_off = jnp.cumsum(recv) - recv
  back_off = lax.all_to_all(in_off, AXIS, 0, 0, tiled=True)  # my chunk's place at each source
  y_sd = ragged_all_to_all(y_recv, jnp.zeros_like(x_sd), recv_off, recv, back_off, send,
                           axis_name=AXIS, platform=platform)
  y_sd = checkpoint_name(y_sd, RETURNED)
  y_td = combine(y_sd, weight_tk, lay.row_tk, lay.token_p, lay.pair_p, may_drop=False)
  return y_td, jnp.zeros((), jnp.float32)


_EXCHANGE_FNS = {"allgather": _allgather, "all_to_all": _all_to_all, "ragged_all_to_all": _ragged}


def _gather_fsdp(w, spec: P):
  """The local experts' full weights: all-gather the dimensions split over fsdp."""
  for dim, axis in enumerate(spec):
    if axis == "fsdp":
      w = lax.all_gather(w, "fsdp", axis=dim, tiled=True)
  return w


def _body(x_td, idx_tk, weight_tk, experts, *, specs, plan, num_experts, batch, train):
  experts = ExpertWeights(*(_gather_fsdp(w, s) for w, s in zip(experts, specs)))
  run = _Local(experts, num_experts, plan)
  y_td, dropped = _EXCHANGE_FNS[plan.ep_exchange](
      x_td, idx_tk, weight_tk, run, train=train, factor=plan.factor(train),
      policy=plan.drop_policy)
  pairs = idx_tk.size * math.prod(lax.axis_size(a) for a in batch)  # global batch
  dropped_fraction = lax.psum(dropped, batch) / pairs
  return y_td, dropped_fraction


def routed_experts(x_td, idx_tk, weight_tk, experts: ExpertWeights, plan: ExpertPlan, *,
                   train: bool) -> DispatchResult:
  """sum_k weight_tk * FFN_{idx_tk}(x_td) with the experts split over the
  ambient mesh's `expert` axis (see the module docstring)."""
  if plan.dispatch != "dropless":
    raise ConfigError(f"config.model.moe.impl={plan.dispatch!r}: expert parallelism runs "
                      "each device's experts with the dropless path (impl='dropless'); for "
                      "per-device capacity use ep_exchange='all_to_all'")
  mesh = mesh_lib.ambient_mesh()
  sizes = dict(mesh.shape)
  num_experts = experts.w_gate_edf.shape[0]
  specs = tuple(rules.spec_for(name, tuple(w.shape), sizes)
                for name, w in zip(ExpertWeights._fields, experts))
  batch = mesh_lib.batch_axes(mesh)
  body = functools.partial(
      _body, specs=specs, plan=plan, num_experts=num_experts, batch=batch, train=train)
  tok = P(batch)
  y_td, dropped = jax.shard_map(
      body, mesh=mesh, in_specs=(tok, tok, tok, ExpertWeights(*specs)),
      out_specs=(tok, P()), check_vma=False)(x_td, idx_tk, weight_tk, experts)
  return DispatchResult(y_td, dropped)
