"""Tiny random DeepSeekMoE v1 checkpoints in the HuggingFace layout (for tests).

Written here from the v1 config semantics with numpy and safetensors only,
independently of dsmoe.interop (whose reader they test).
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

TINY = {
    "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek",
    "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
    "moe_intermediate_size": 16, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 4, "n_routed_experts": 8, "n_shared_experts": 2,
    "num_experts_per_tok": 3, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.001,
    "seq_aux": True, "rope_theta": 10000, "rms_norm_eps": 1e-6,
    "rope_scaling": None, "tie_word_embeddings": False, "attention_bias": False,
    "hidden_act": "silu", "max_position_embeddings": 256, "bos_token_id": 1,
    "eos_token_id": 2, "torch_dtype": "float32", "initializer_range": 0.02,
}


def tiny_config(**changes) -> dict:
  cfg = {**TINY, **changes}
  if "num_key_value_heads" not in changes:
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
  return cfg


def is_moe(cfg: dict, i: int) -> bool:
  return (cfg["n_routed_experts"] is not None and i >= cfg["first_k_dense_replace"]
          and i % cfg["moe_layer_freq"] == 0)


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
  """name -> shape of every weight of the v1 model ([out, in] for Linear)."""
  d, v, f = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
  fe, e = cfg["moe_intermediate_size"], cfg["n_routed_experts"]
  shapes = {"model.embed_tokens.weight": (v, d)}
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}"
    for x in "qkvo":
      shapes[f"{p}.self_attn.{x}_proj.weight"] = (d, d)
    shapes[f"{p}.input_layernorm.weight"] = (d,)
    shapes[f"{p}.post_attention_layernorm.weight"] = (d,)
    mlps = []
    if is_moe(cfg, i):
      shapes[f"{p}.mlp.gate.weight"] = (e, d)
      mlps += [(f"{p}.mlp.experts.{j}", fe) for j in range(e)]
      if cfg["n_shared_experts"]:
        mlps.append((f"{p}.mlp.shared_experts", fe * cfg["n_shared_experts"]))
    else:
      mlps.append((f"{p}.mlp", f))
    for name, hidden in mlps:
      shapes[f"{name}.gate_proj.weight"] = (hidden, d)
      shapes[f"{name}.up_proj.weight"] = (hidden, d)
      shapes[f"{name}.down_proj.weight"] = (d, hidden)
  shapes["model.norm.weight"] = (d,)
  shapes["lm_head.weight"] = (v, d)
  return shapes


def random_weights(cfg: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in tensor_shapes(cfg).items():
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
      x = 1.0 + 0.2 * rng.standard_normal(shape)
    elif name.endswith("mlp.gate.weight"):
      x = 0.5 * rng.standard_normal(shape)  # spread router scores
    else:
      x = rng.standard_normal(shape) / np.sqrt(shape[-1])
    out[name] = x.astype(np.float32).astype(dtype)
  return out


def write_checkpoint(folder: str, cfg: dict, weights: dict[str, np.ndarray],
                     num_shards: int = 2) -> str:
  """config.json + `num_shards` safetensors files (+ index when > 1)."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  names = list(weights)
  parts = np.array_split(np.arange(len(names)), num_shards)
  weight_map = {}
  for i, part in enumerate(parts):
    file = (f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" if num_shards > 1
            else "model.safetensors")
    save_file({names[j]: weights[names[j]] for j in part}, os.path.join(folder, file),
              metadata={"format": "pt"})
    weight_map.update({names[j]: file for j in part})
  if num_shards > 1:
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
  return folder


def make(folder: str, seed: int = 0, dtype=np.float32, num_shards: int = 2, **changes):
  """A tiny random checkpoint: (folder, config dict, weights)."""
  cfg = tiny_config(**changes)
  if dtype == ml_dtypes.bfloat16:
    cfg["torch_dtype"] = "bfloat16"
  weights = random_weights(cfg, seed, dtype)
  write_checkpoint(folder, cfg, weights, num_shards)
  return folder, cfg, weights


def write_tokenizer(folder: str) -> None:
  """A small byte-level BPE tokenizer.json (+ tokenizer_config.json: <s>, </s>)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=90, special_tokens=["<pad>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["the cat sat on the mat"] * 20, trainer)
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    f.write('{"bos_token": "<s>", "eos_token": {"content": "</s>"}}')
