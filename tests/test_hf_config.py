"""config.json (DeepSeekMoE v1) <-> dsmoe config."""

import json

import pytest

import dsmoe
from dsmoe.interop import hf_config
from tests import hf_checkpoints as hc

# The released deepseek-moe-16b-base config.json (its model keys).
RELEASED_16B = {
    "architectures": ["DeepseekForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 100000,
    "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "max_position_embeddings": 4096, "model_type": "deepseek", "moe_intermediate_size": 1408,
    "moe_layer_freq": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 28, "num_key_value_heads": 16, "pretraining_tp": 1,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000, "scoring_func": "softmax",
    "seq_aux": True, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0", "use_cache": True, "vocab_size": 102400,
}


def test_released_16b_config_maps_onto_the_paper_16b_model():
  config = hf_config.to_dsmoe(RELEASED_16B, dtype="bfloat16")
  spec = dsmoe.resolve(config).model
  paper = dsmoe.resolve(dsmoe.load("paper_16b")).model
  for field in ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim",
                "dense_hidden", "first_k_dense_replace", "moe_layer_freq", "rope_theta",
                "rms_norm_eps"):
    assert getattr(spec, field) == getattr(paper, field), field
  for field in ("num_routed_experts", "num_shared_experts", "top_k", "expert_hidden",
                "norm_topk_prob", "score_fn", "routed_scaling_factor", "seq_aux"):
    assert getattr(spec.moe, field) == getattr(paper.moe, field), field
  assert spec.moe.aux_loss_alpha == 0.001 and spec.dtype == spec.param_dtype == "bfloat16"
  counts = dsmoe.count_params(config)
  assert round(counts["total"] / 1e9, 1) == 16.4 and round(counts["activated"] / 1e9, 1) == 2.8


def test_round_trip_gives_the_same_config_json():
  spec = dsmoe.resolve(hf_config.to_dsmoe(RELEASED_16B)).model
  out = hf_config.to_hf(spec, RELEASED_16B, dtype="bfloat16")
  assert json.dumps(out, sort_keys=True) == json.dumps(RELEASED_16B, sort_keys=True)
  null_shared = hc.tiny_config(n_shared_experts=None)
  spec = dsmoe.resolve(hf_config.to_dsmoe(null_shared)).model
  assert spec.moe.num_shared_experts == 0
  assert hf_config.to_hf(spec, null_shared, dtype="float32") == null_shared


def test_export_without_an_original_writes_a_complete_v1_config():
  spec = dsmoe.resolve(hf_config.to_dsmoe(RELEASED_16B)).model
  fresh = hf_config.to_hf(spec, None, dtype="float32")
  again = dsmoe.resolve(hf_config.to_dsmoe(fresh)).model
  assert again == spec
  assert fresh["model_type"] == "deepseek" and fresh["torch_dtype"] == "float32"


def test_missing_optional_keys_take_v1_defaults():
  minimal = {k: RELEASED_16B[k] for k in (
      "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
      "intermediate_size", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")}
  spec = dsmoe.resolve(hf_config.to_dsmoe(minimal)).model
  assert (spec.first_k_dense_replace, spec.moe_layer_freq, spec.moe.num_shared_experts,
          spec.moe.norm_topk_prob, spec.rope_theta) == (0, 1, 0, False, 10000.0)


@pytest.mark.parametrize("key,value,words", [
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling"),
    ("num_key_value_heads", 4, "grouped-query attention"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("attention_bias", True, "attention_bias"),
    ("scoring_func", "sigmoid", "scoring_func"),
    ("hidden_act", "gelu", "hidden_act"),
    ("model_type", "deepseek_v2", "multi-head latent attention"),
    ("n_routed_experts", None, "n_routed_experts"),
    ("quantization_config", {"bits": 4}, "quantization_config"),
    ("topk_method", "greedy", "topk_method"),
])
def test_settings_dsmoe_cannot_represent_give_one_error_naming_the_key(key, value, words):
  with pytest.raises(hf_config.HFConfigError, match=words) as e:
    hf_config.to_dsmoe({**RELEASED_16B, key: value})
  assert key in str(e.value) and "\n" not in str(e.value)


def test_missing_required_key_is_named():
  cfg = dict(RELEASED_16B)
  del cfg["moe_intermediate_size"]
  with pytest.raises(hf_config.HFConfigError, match="moe_intermediate_size is missing"):
    hf_config.to_dsmoe(cfg)


def test_export_refuses_what_v1_cannot_express():
  spec = dsmoe.resolve(hf_config.to_dsmoe(RELEASED_16B)).model
  with pytest.raises(hf_config.HFConfigError, match="score_fn"):
    hf_config.to_hf(spec.replace(moe={"score_fn": "sigmoid"}), None, dtype="float32")
