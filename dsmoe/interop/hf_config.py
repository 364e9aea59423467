"""A DeepSeekMoE v1 ``config.json`` (HuggingFace) <-> a dsmoe config.

The released checkpoints (deepseek-moe-16b-base / -chat) use the v1
``DeepseekForCausalLM`` code (``model_type: "deepseek"``). Every key of their
config either maps onto a dsmoe key (:data:`MAPPED`), must hold the one value
dsmoe computes (:func:`_check_supported`: e.g. ``rope_scaling: null``), or
only describes the checkpoint (:data:`METADATA_KEYS`, kept for the export).
Any other key is refused: it might change what the model computes.

v1 semantics (docs/MODEL.md): ``n_shared_experts: null`` means no shared
expert; layer i is MoE when ``i >= first_k_dense_replace`` and
``i % moe_layer_freq == 0``; ``norm_topk_prob`` renormalises only when
``num_experts_per_tok > 1``. Missing optional keys take the v1 defaults.
"""

from __future__ import annotations

import json
import os

import ml_collections

from dsmoe import config as config_lib
from dsmoe.errors import ConfigError, HFFormatError
from dsmoe.spec import ModelSpec


class HFConfigError(HFFormatError):
  """A config.json dsmoe cannot represent."""


# (HF key, dsmoe key under config.model, v1 default; REQUIRED: no default)
REQUIRED = object()
MAPPED = (
    ("vocab_size", "vocab_size", REQUIRED),
    ("hidden_size", "d_model", REQUIRED),
    ("num_hidden_layers", "num_layers", REQUIRED),
    ("num_attention_heads", "num_heads", REQUIRED),
    ("intermediate_size", "dense_hidden", REQUIRED),
    ("first_k_dense_replace", "first_k_dense_replace", 0),
    ("moe_layer_freq", "moe_layer_freq", 1),
    ("rope_theta", "rope_theta", 10000.0),
    ("rms_norm_eps", "rms_norm_eps", 1e-6),
    ("n_routed_experts", "moe.num_routed_experts", REQUIRED),
    ("num_experts_per_tok", "moe.top_k", REQUIRED),
    ("moe_intermediate_size", "moe.expert_hidden", REQUIRED),
    ("norm_topk_prob", "moe.norm_topk_prob", False),
    ("aux_loss_alpha", "moe.aux_loss_alpha", 0.001),
    ("seq_aux", "moe.seq_aux", True),
)

# Keys that must hold the value dsmoe computes: (key, allowed values, why).
FIXED = (
    ("scoring_func", ("softmax",), "v1 routers score with a softmax"),
    ("rope_scaling", (None,), "dsmoe implements plain RoPE only (no linear/dynamic scaling)"),
    ("tie_word_embeddings", (False,), "dsmoe has an untied LM head"),
    ("attention_bias", (False,), "dsmoe's attention projections have no bias"),
    ("mlp_bias", (False,), "dsmoe's FFN projections have no bias"),
    ("hidden_act", ("silu",), "dsmoe's FFNs are SwiGLU (silu)"),
    ("attention_dropout", (0, 0.0), "dsmoe has no dropout"),
)

# Keys that do not change what the model computes; kept verbatim for export.
METADATA_KEYS = frozenset({
    "architectures", "auto_map", "model_type", "torch_dtype", "dtype",
    "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id",
    "use_cache", "max_position_embeddings", "initializer_range", "pretraining_tp",
    "_name_or_path", "num_key_value_heads", "n_shared_experts", "head_dim",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "id2label", "label2id", "problem_type", "tokenizer_class", "task_specific_params",
    "finetuning_task", "prefix", "sep_token_id", "decoder_start_token_id",
})

V1_HEAD = {"architectures": ["DeepseekForCausalLM"], "model_type": "deepseek"}


def read(folder: str) -> dict:
  """The config.json of an HF checkpoint folder (clear errors)."""
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise HFConfigError(f"{folder}: no config.json (not a HuggingFace checkpoint folder)")
  try:
    with open(path) as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:
    raise HFConfigError(f"{path}: not a readable JSON file ({e})") from None
  if not isinstance(hf, dict):
    raise HFConfigError(f"{path}: expected a JSON object")
  return hf


def _fail(key: str, value, why: str):
  raise HFConfigError(f"config.json: {key}={value!r} is not supported: {why}")


def _check_supported(hf: dict) -> None:
  known = {k for k, _, _ in MAPPED} | {k for k, _, _ in FIXED} | METADATA_KEYS
  for key in hf:
    if key not in known:
      _fail(key, hf[key], "not a DeepSeekMoE v1 config key dsmoe knows (it might change "
            "what the model computes); remove it if it does not")
  model_type = hf.get("model_type", "deepseek")
  if model_type != "deepseek":
    _fail("model_type", model_type, "dsmoe imports DeepSeekMoE v1 ('deepseek') checkpoints; "
          "DeepSeek-V2/V3 use multi-head latent attention, which dsmoe does not implement")
  for key, allowed, why in FIXED:
    if key in hf and hf[key] not in allowed:
      _fail(key, hf[key], why)
  heads = hf.get("num_attention_heads")
  if hf.get("num_key_value_heads") not in (None, heads):
    _fail("num_key_value_heads", hf["num_key_value_heads"], "grouped-query attention is not "
          f"implemented; it must equal num_attention_heads={heads}")
  if hf.get("n_routed_experts") is None:
    _fail("n_routed_experts", None, "a dense model without MoE layers is not a DeepSeekMoE "
          "model dsmoe builds")
  head_dim = hf.get("head_dim")
  if head_dim is not None and heads and head_dim * heads != hf.get("hidden_size"):
    _fail("head_dim", head_dim, "v1 uses hidden_size // num_attention_heads")


def _set(model: ml_collections.ConfigDict, key: str, value) -> None:
  node = model
  *parents, last = key.split(".")
  for p in parents:
    node = node[p]
  node[last] = value


def to_dsmoe(hf: dict, *, dtype: str = "float32") -> ml_collections.ConfigDict:
  """The dsmoe config (``base_config()`` with the model from `hf`); the model
  computes and keeps its parameters in `dtype`. Raises HFConfigError naming
  the first key dsmoe cannot represent."""
  _check_supported(hf)
  config = config_lib.base_config()
  m = config.model
  for hf_key, key, default in MAPPED:
    value = hf.get(hf_key, default)
    if value is REQUIRED or value is None:
      raise HFConfigError(f"config.json: {hf_key} is missing")
    _set(m, key, float(value) if isinstance(default, float) else value)
  m.moe.num_shared_experts = hf.get("n_shared_experts") or 0
  m.moe.score_fn = "softmax"
  m.moe.routed_scaling_factor = 1.0
  m.head_dim = 0
  m.dtype = m.param_dtype = dtype
  try:
    config_lib.validate(config)
  except ConfigError as e:
    raise HFConfigError(f"config.json gives an invalid dsmoe model: {e}") from None
  return config


def _unsupported_export(model: ModelSpec) -> None:
  moe = model.moe
  rules = (
      (moe.router != "topk", "model.moe.router", moe.router, "v1 has a learned top-k router"),
      (moe.score_fn != "softmax", "model.moe.score_fn", moe.score_fn, "v1 scores with softmax"),
      (moe.routed_scaling_factor != 1.0, "model.moe.routed_scaling_factor",
       moe.routed_scaling_factor, "v1 does not scale the gates"),
      (model.head_dim * model.num_heads != model.d_model, "model.head_dim", model.head_dim,
       "v1 uses d_model // num_heads"),
  )
  for bad, key, value, why in rules:
    if bad:
      raise HFConfigError(f"cannot export {key}={value!r} to a v1 config.json: {why}")


def to_hf(model: ModelSpec, original: dict | None = None, *, dtype: str) -> dict:
  """The v1 config.json of `model` with weights stored in `dtype`.

  Keys of `original` (the config.json a checkpoint was converted from) are
  kept; where dsmoe holds a key's value, the original spelling is kept when
  the values are equal, so a round trip gives the same file.
  """
  _unsupported_export(model)
  out = dict(original) if original is not None else dict(V1_HEAD)
  values = {hf_key: _get(model, key) for hf_key, key, _ in MAPPED}
  values["n_shared_experts"] = model.moe.num_shared_experts or None
  values["scoring_func"] = "softmax"
  if original is None:
    values.update(num_key_value_heads=model.num_heads, tie_word_embeddings=False,
                  hidden_act="silu", rope_scaling=None, attention_bias=False)
  for key, value in values.items():
    same = (key in out and out[key] == value
            and isinstance(out[key], bool) == isinstance(value, bool))
    if not same:  # an equal original value keeps its spelling (10000 vs 10000.0)
      out[key] = value
  dtype_key = "dtype" if "dtype" in out and "torch_dtype" not in out else "torch_dtype"
  out[dtype_key] = dtype
  return out


def _get(model: ModelSpec, key: str):
  node = model
  for part in key.split("."):
    node = getattr(node, part)
  return node
