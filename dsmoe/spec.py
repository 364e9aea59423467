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


@dataclasses.dataclass(frozen=True)
class MoESpec:
  """One MoE layer: sizes, router, balance losses and dispatch settings."""
  num_routed_experts: int  # N'
  num_shared_experts: int  # K_s
  top_k: int  # K' routed experts per token
  expert_hidden: int  # hidden size of one (routed or shared) expert
  router: str = "topk"  # "topk" or "hash"
  score_fn: str = "softmax"  # "softmax" (v1/v2) or "sigmoid" (v3)
  norm_topk_prob: bool = False
  routed_scaling_factor: float = 1.0
  aux_loss_alpha: float = 0.0  # a1
  seq_aux: bool = True
  device_balance_alpha: float = 0.0  # a2
  num_device_groups: int = 1  # D (the expert-axis devices under EP)
  max_devices_per_token: int = 0  # M of device-limited routing; 0: no limit
  comm_balance_alpha: float = 0.0  # a3
  impl: str = "dropless"  # "dense", "dropless", "capacity"
  gmm_backend: str = "auto"  # "auto", "blocked", "ragged_dot", "pallas"
  gmm_strategy: str = "auto"  # "auto", "loop", "kernel", "batched"
  block_size: int = 0  # 0: chosen from the shape
  capacity_factor: float = 1.25
  eval_capacity_factor: float = 0.0  # 0: never drop at evaluation
  drop_policy: str = "position"  # "position" or "score"
  # Analysis only, not a config key (dsmoe.analysis.experts, paper Figure 4):
  # the r highest-scoring routed experts of each token are skipped and its
  # top-K are chosen among the others.
  skip_top_experts: int = 0
  ep_exchange: str = "auto"  # "auto", "allgather", "all_to_all", "ragged_all_to_all"
  ep_capacity_factor: float = 1.25  # all_to_all rows per destination device (training)


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
  remat: str = "none"  # "none", "full", "save_dots", "save_moe_exchange"
  scan_layers: bool = False  # MoE layers as one nnx.scan over stacked weights

  def is_moe_layer(self, layer: int) -> bool:
    """Layer plan of the released DeepSeek code."""
    return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

  def replace(self, **changes) -> "ModelSpec":
    """A copy with some fields changed (``moe=`` takes a dict of MoE fields too)."""
    if isinstance(changes.get("moe"), dict):
      changes["moe"] = dataclasses.replace(self.moe, **changes["moe"])
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Spec:
  """A whole resolved config: the model spec plus frozen data/train/mesh blocks."""
  model: ModelSpec
  data: ml_collections.FrozenConfigDict
  train: ml_collections.FrozenConfigDict
  mesh: ml_collections.FrozenConfigDict
