"""Frozen, hashable specs of a resolved config (made by dsmoe.config.resolve).

Modules keep a :class:`ModelSpec` (never a mutable ConfigDict), so an NNX
graphdef can be hashed and passed to `jax.jit` as a static argument. Every
field is a plain Python value; sizes given in the paper's fine-grained form
are already turned into explicit ones, and ``head_dim`` is never 0.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the model and dispatch run without ml_collections
  import ml_collections


# The choices of the settings below, defined once (dsmoe.config validates
# them; the modules dispatch on them).
IMPLS = ("dense", "dropless", "capacity")  # model.moe.impl
GROUPED = ("ragged_dot", "pallas", "batched", "loop", "kernel")  # ExpertPlan.grouped
GMM_BACKENDS = ("auto", "blocked", "ragged_dot", "pallas")  # model.moe.gmm_backend
GMM_STRATEGIES = ("auto", "batched", "loop", "kernel")  # model.moe.gmm_strategy (blocked)
EP_EXCHANGES = ("allgather", "all_to_all", "ragged_all_to_all")  # model.moe.ep_exchange
DROP_POLICIES = ("position", "score")  # model.moe.drop_policy
MESH_AXES = ("data", "fsdp", "expert")  # config.mesh, in mesh order
REMAT_POLICIES = ("none", "full", "save_dots", "save_moe_exchange")  # model.remat


@dataclasses.dataclass(frozen=True)
class ExpertPlan:
  """How the routed experts run: resolved once by dsmoe.config.resolve from
  the `model.moe` settings, the platform the step is lowered for and the
  dtypes (docs/MODEL.md, "Routed-expert implementations").

  dispatch: "dense" (every expert on every token; the reference), "dropless"
  or "capacity" (at most C pairs per expert; the rest dropped).
  grouped: the grouped SwiGLU over the expert-sorted rows (one of GROUPED;
  "" for dense): "ragged_dot" (lax.ragged_dot), "pallas" (pallas_kernels.gmm),
  "batched" (batched matmuls over single-expert blocks), "loop" (the fused
  XLA loop over experts), "kernel" (the C++ XLA:CPU custom call, opt-in).
  block_size: rows per single-expert block; 0 = chosen from the shape.
  capacity_factor: C = factor * pairs / groups, per expert for dispatch
  "capacity" and per destination device for ep_exchange "all_to_all", in
  training; eval_capacity_factor at evaluation (0: nothing dropped).
  ep_exchange: the token exchange under expert parallelism (mesh.expert > 1).
  platform: the platform the plan was resolved for ("cpu", "tpu", "gpu").
  """
  dispatch: str
  grouped: str
  block_size: int
  capacity_factor: float
  eval_capacity_factor: float
  drop_policy: str
  ep_exchange: str
  platform: str

  def factor(self, train: bool) -> float:
    """The capacity factor that applies in training or at evaluation."""
    return self.capacity_factor if train else self.eval_capacity_factor


@dataclasses.dataclass(frozen=True)
class MoESpec:
  """One MoE layer: sizes, router, balance losses and the routed experts' plan."""
  num_routed_experts: int  # N'
  num_shared_experts: int  # K_s
  top_k: int  # K' routed experts per token
  expert_hidden: int  # hidden size of one (routed or shared) expert
  router: str  # "topk" or "hash"
  score_fn: str  # "softmax" (v1/v2) or "sigmoid" (v3)
  norm_topk_prob: bool
  routed_scaling_factor: float
  aux_loss_alpha: float  # a1
  seq_aux: bool
  device_balance_alpha: float  # a2
  num_device_groups: int  # D: the devices of mesh.expert (1 without expert parallelism)
  max_devices_per_token: int  # M of device-limited routing; 0: no limit
  comm_balance_alpha: float  # a3
  plan: ExpertPlan
  # Analysis only, not a config key (dsmoe.analysis.experts, paper Figure 4):
  # the r highest-scoring routed experts of each token are skipped and its
  # top-K are chosen among the others.
  skip_top_experts: int = 0


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The decoder: sizes, layer plan, numerics, and its MoE layers."""
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  head_dim: int
  dense_hidden: int  # hidden size of the dense (non-MoE) FFN layers
  first_k_dense_replace: int
  moe_layer_freq: int
  rope_theta: float
  rms_norm_eps: float
  init_std: float
  dtype: str  # compute dtype
  param_dtype: str  # master-weight dtype
  moe: MoESpec
  remat: str  # one of REMAT_POLICIES
  scan_layers: bool  # MoE layers as one nnx.scan over stacked weights

  def is_moe_layer(self, layer: int) -> bool:
    """Layer plan of the released DeepSeek code."""
    return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

  def replace(self, **changes) -> "ModelSpec":
    """A copy with some fields changed (``moe=`` takes a dict of MoE fields
    too, and its ``plan=`` a dict of ExpertPlan fields)."""
    if isinstance(changes.get("moe"), dict):
      moe = dict(changes["moe"])
      if isinstance(moe.get("plan"), dict):
        moe["plan"] = dataclasses.replace(self.moe.plan, **moe["plan"])
      changes["moe"] = dataclasses.replace(self.moe, **moe)
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Spec:
  """A whole resolved config: the model spec plus frozen data/train/mesh blocks."""
  model: ModelSpec
  data: ml_collections.FrozenConfigDict
  train: ml_collections.FrozenConfigDict
  mesh: ml_collections.FrozenConfigDict
  # The config it was resolved from, as given (what a workdir's config.json
  # records; dsmoe.run_config). Not part of the spec's identity.
  config: ml_collections.FrozenConfigDict | None = dataclasses.field(
      default=None, compare=False, repr=False)
