"""Parameter and FLOP accounting from shapes alone (nothing is allocated).

Conventions (the paper's):
* total parameters count everything, both embedding tables included
  (input embedding and the untied LM head);
* activated parameters per token count everything a token touches: all
  non-expert weights, the router, the K_s shared experts and K' of the N'
  routed experts of each MoE layer (embeddings included);
* FLOPs per token follow DeepSeek LLM's M = 72 L d^2 + 12 L d l_seq, i.e.
  6 x (activated non-embedding parameters) + 12 x layers x (heads x head_dim)
  x seq_len, for a forward and backward pass; the vocabulary projection is
  not counted.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from dsmoe import config as config_lib
from dsmoe.model import Transformer
from dsmoe.spec import ModelSpec

ROUTED_EXPERT_WEIGHTS = ("w_gate_edf", "w_up_edf", "w_down_efd")


def _abstract(spec: ModelSpec) -> Transformer:
  return nnx.eval_shape(lambda: Transformer(spec, rngs=nnx.Rngs(0)))


def _size(path_leaves) -> int:
  return sum(math.prod(x.shape) for _, x in path_leaves)


def count_params(config, params=None) -> dict[str, int]:
  """{"total", "activated", "embedding"} parameter counts (see module docstring).

  `params`: the model's parameters (arrays or ShapeDtypeStructs, e.g. the
  train state's "params") when at hand; else the model is traced abstractly.
  """
  cfg = config_lib.resolve(config).model
  if params is None:
    params = nnx.state(_abstract(cfg), nnx.Param)
  leaves = list(jax.tree_util.tree_leaves_with_path(params))
  total = _size(leaves)
  routed = _size([(p, x) for p, x in leaves
                  if any(getattr(k, "key", None) in ROUTED_EXPERT_WEIGHTS for k in p)])
  embedding = _size([(p, x) for p, x in leaves
                     if any(getattr(k, "key", None) in ("table_vd", "w_head_dv") for k in p)])
  moe = cfg.moe
  inactive = routed * (moe.num_routed_experts - moe.top_k) // moe.num_routed_experts
  return {"total": total, "activated": total - inactive, "embedding": embedding}


def flops_per_token(config, seq_len: int | None = None, params=None) -> float:
  """Training (forward + backward) FLOPs per token, DeepSeek LLM convention
  (`params` as in :func:`count_params`)."""
  cfg = config_lib.resolve(config)
  counts = count_params(cfg, params)
  seq_len = seq_len or cfg.data.seq_len
  m = cfg.model
  d_attn = m.num_heads * m.head_dim
  non_embedding = counts["activated"] - counts["embedding"]
  return 6.0 * non_embedding + 12.0 * m.num_layers * d_attn * seq_len
