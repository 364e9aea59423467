"""Parity of imported v1 checkpoints with PyTorch references (float32).

1. Full-model logits against a small PyTorch implementation of the v1
   DeepSeekMoE decoder written here from the released code's semantics
   (renormalisation only for top_k > 1, null shared experts, the layer plan,
   rotate-half RoPE, RMSNorm in float32).
2. One MoE block against transformers' DeepseekV2Moe configured as v1
   (greedy top-k over softmax scores, routed scaling 1.0; V2 always builds
   shared experts and never renormalises, so only those cases are compared).

torch and transformers are test-only dependencies (the "test" extra).
"""

import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsmoe.interop import hf
from tests import hf_checkpoints as hc

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -r requirements.txt)")
F = torch.nn.functional


def _mlp(w, prefix, x):
  gate = F.linear(x, w[f"{prefix}.gate_proj.weight"])
  return F.linear(F.silu(gate) * F.linear(x, w[f"{prefix}.up_proj.weight"]),
                  w[f"{prefix}.down_proj.weight"])


def _moe(cfg, w, prefix, x):
  b, t, d = x.shape
  flat = x.reshape(-1, d)
  scores = F.linear(flat, w[f"{prefix}.gate.weight"]).softmax(dim=-1)
  k = cfg["num_experts_per_tok"]
  weight, idx = torch.topk(scores, k=k, dim=-1)
  if k > 1 and cfg["norm_topk_prob"]:
    weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
  y = torch.zeros_like(flat)
  for slot in range(k):
    for e in range(cfg["n_routed_experts"]):
      rows = idx[:, slot] == e
      if rows.any():
        y[rows] += weight[rows, slot, None] * _mlp(w, f"{prefix}.experts.{e}", flat[rows])
  y = y.reshape(b, t, d)
  if cfg["n_shared_experts"] is not None:
    y = y + _mlp(w, f"{prefix}.shared_experts", x)
  return y


def _rms(x, weight, eps):
  x32 = x.float()
  return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _attention(cfg, w, prefix, x, cos, sin):
  b, t, d = x.shape
  n = cfg["num_attention_heads"]
  h = d // n

  def heads(name):
    return F.linear(x, w[f"{prefix}.{name}_proj.weight"]).view(b, t, n, h).transpose(1, 2)

  def rotate_half(z):
    return torch.cat([-z[..., h // 2:], z[..., :h // 2]], dim=-1)
  q, k, v = heads("q"), heads("k"), heads("v")
  q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
  scores = q @ k.transpose(2, 3) / math.sqrt(h)
  scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
  out = scores.softmax(dim=-1, dtype=torch.float32) @ v
  return F.linear(out.transpose(1, 2).reshape(b, t, d), w[f"{prefix}.o_proj.weight"])


def v1_logits(cfg, weights, tokens):
  """The v1 decoder in PyTorch, float32."""
  w = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in weights.items()}
  eps, d = cfg["rms_norm_eps"], cfg["hidden_size"]
  h = d // cfg["num_attention_heads"]
  t = tokens.shape[1]
  inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, h, 2).float() / h))
  angles = torch.outer(torch.arange(t).float(), inv_freq)
  cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
  x = w["model.embed_tokens.weight"][torch.from_numpy(tokens)]
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}"
    x = x + _attention(cfg, w, f"{p}.self_attn", _rms(x, w[f"{p}.input_layernorm.weight"], eps),
                       cos, sin)
    u = _rms(x, w[f"{p}.post_attention_layernorm.weight"], eps)
    x = x + (_moe(cfg, w, f"{p}.mlp", u) if hc.is_moe(cfg, i) else _mlp(w, f"{p}.mlp", u))
  x = _rms(x, w["model.norm.weight"], eps)
  return F.linear(x, w["lm_head.weight"]).numpy()


def assert_close(ours, ref, rtol=1e-4):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  scale = np.abs(ref).max()
  err = np.abs(ours - ref).max() / scale
  assert err < rtol, f"max |ours - ref| / max |ref| = {err:.2e} >= {rtol}"


CONFIGS = {
    "raw_top3_shared2_dense1": dict(),
    "renorm_top3_no_shared": dict(norm_topk_prob=True, n_shared_experts=None,
                                  first_k_dense_replace=0),
    "top1_norm_flag_shared1_freq2": dict(num_experts_per_tok=1, norm_topk_prob=True,
                                         n_shared_experts=1, moe_layer_freq=2,
                                         first_k_dense_replace=0),
    "top1_raw_no_shared_dense2": dict(num_experts_per_tok=1, n_shared_experts=None,
                                      first_k_dense_replace=2),
    "renorm_top2_freq2_dense2": dict(num_experts_per_tok=2, norm_topk_prob=True,
                                     moe_layer_freq=2, first_k_dense_replace=2,
                                     num_hidden_layers=5),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_full_model_logits_match_v1_reference(tmp_path, name):
  folder, cfg, weights = hc.make(str(tmp_path / "hf"), seed=3, **CONFIGS[name])
  tokens = np.random.default_rng(0).integers(0, cfg["vocab_size"], (2, 11))
  _, lm = hf.load_hf(folder)
  assert_close(lm(tokens), v1_logits(cfg, weights, tokens))
  moe_layers = [i for i in range(cfg["num_hidden_layers"]) if hc.is_moe(cfg, i)]
  blocks = lm.module().blocks
  assert [i for i, b in enumerate(blocks) if b.is_moe] == moe_layers
  if moe_layers:
    ffn = blocks[moe_layers[0]].ffn
    assert (ffn.shared is None) == (cfg["n_shared_experts"] is None)


def test_bfloat16_checkpoint_loads_in_float32_exactly(tmp_path):
  """bfloat16 weights upcast exactly: the same logits as the reference on them."""
  folder, cfg, weights = hc.make(str(tmp_path / "hf"), seed=4, dtype=ml_dtypes.bfloat16)
  config, lm = hf.load_hf(folder, dtype="float32")
  assert config.model.param_dtype == "float32"
  tokens = np.random.default_rng(1).integers(0, cfg["vocab_size"], (1, 9))
  assert_close(lm(tokens), v1_logits(cfg, weights, tokens))


def test_converted_folder_gives_the_same_logits(tmp_path):
  folder, cfg, weights = hc.make(str(tmp_path / "hf"), seed=5, n_shared_experts=None)
  out = hf.convert(folder, str(tmp_path / "dsmoe"))
  tokens = np.random.default_rng(2).integers(0, cfg["vocab_size"], (2, 6))
  _, lm = hf.load_hf(out)
  assert_close(lm(tokens), v1_logits(cfg, weights, tokens))


@pytest.mark.parametrize("top_k,shared", [(3, 2), (1, 1)])
def test_moe_block_matches_transformers_deepseek_v2_moe(tmp_path, top_k, shared):
  transformers = pytest.importorskip("transformers", reason="transformers is not installed")
  from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2
  d, e, f = 32, 8, 16
  v2_config = transformers.DeepseekV2Config(
      hidden_size=d, n_routed_experts=e, num_experts_per_tok=top_k, moe_intermediate_size=f,
      n_shared_experts=shared, routed_scaling_factor=1.0, topk_method="greedy",
      norm_topk_prob=False, num_attention_heads=4, num_hidden_layers=1, vocab_size=16)
  torch.manual_seed(0)
  block = v2.DeepseekV2Moe(v2_config).float().eval()
  with torch.no_grad():
    for p in block.parameters():
      p.normal_(0.0, 0.3)
  # v1 names of the same weights: V2 fuses [gate; up] of each expert.
  gate_up, down = block.experts.gate_up_proj.detach().numpy(), block.experts.down_proj.detach().numpy()
  layer = {"model.layers.0.mlp.gate.weight": block.gate.weight.detach().numpy()}
  for i in range(e):
    layer[f"model.layers.0.mlp.experts.{i}.gate_proj.weight"] = gate_up[i, :f]
    layer[f"model.layers.0.mlp.experts.{i}.up_proj.weight"] = gate_up[i, f:]
    layer[f"model.layers.0.mlp.experts.{i}.down_proj.weight"] = down[i]
  for x in ("gate", "up", "down"):
    layer[f"model.layers.0.mlp.shared_experts.{x}_proj.weight"] = getattr(
        block.shared_experts, f"{x}_proj").weight.detach().numpy()
  cfg = hc.tiny_config(hidden_size=d, n_routed_experts=e, num_experts_per_tok=top_k,
                       moe_intermediate_size=f, n_shared_experts=shared, num_hidden_layers=1,
                       first_k_dense_replace=0)
  weights = {**hc.random_weights(cfg), **{k: np.ascontiguousarray(v) for k, v in layer.items()}}
  folder = hc.write_checkpoint(str(tmp_path / "hf"), cfg, weights, num_shards=1)
  _, lm = hf.load_hf(folder)
  moe = lm.module().blocks[0].ffn
  x = np.random.default_rng(0).standard_normal((2, 7, d)).astype(np.float32)
  ours = moe(jnp.asarray(x), jnp.zeros((2, 7), jnp.int32), train=False)[0]
  with torch.no_grad():
    ref = block(torch.from_numpy(x)).numpy()
  assert_close(ours, ref)
