"""Decoder-only transformer with DeepSeekMoE feed-forward layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dsmoe.model.attention import Attention
from dsmoe.model.layers import MLP, Embed, RMSNorm, normal_init
from dsmoe.model.moe import MoE


def is_moe_layer(cfg: ml_collections.ConfigDict, layer: int) -> bool:
  """Layer plan of the released DeepSeek code."""
  return layer >= cfg.first_k_dense_replace and layer % cfg.moe_layer_freq == 0


class Block(nnx.Module):
  """x + attn(norm(x)); then x + ffn(norm(x)) with ffn a dense MLP or MoE."""

  def __init__(self, cfg: ml_collections.ConfigDict, layer: int, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
    self.attn = Attention(cfg.d_model, cfg.num_heads, head_dim, rope_theta=cfg.rope_theta,
                          init_std=cfg.init_std, param_dtype=pdt, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
    self.is_moe = is_moe_layer(cfg, layer)
    if self.is_moe:
      self.ffn = MoE(cfg, rngs=rngs)
    else:
      self.ffn = MLP(cfg.d_model, cfg.dense_hidden, init_std=cfg.init_std,
                     param_dtype=pdt, rngs=rngs)

  def __call__(self, x_btd, tokens_bt, segment_ids_bt, *, train: bool):
    x_btd = x_btd + self.attn(self.attn_norm(x_btd), segment_ids_bt)
    h_btd = self.ffn_norm(x_btd)
    if not self.is_moe:
      return x_btd + self.ffn(h_btd), {}, None
    y_btd, aux, stats = self.ffn(h_btd, tokens_bt, train=train)
    return x_btd + y_btd, aux, stats


class Transformer(nnx.Module):
  """Embedding -> blocks -> final RMSNorm -> untied LM head (logits in float32).

  `__call__` returns (logits [B,T,V], aux) where aux has
    "losses": {name: sum over MoE layers of the weighted auxiliary loss},
    "moe": {"tokens_per_expert": [L_moe, E], "max_over_mean_load": [L_moe],
            "dropped_fraction": [L_moe]}.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    """`cfg` is the resolved `config.model` (dsmoe.config.resolve)."""
    pdt = jnp.dtype(cfg.param_dtype)
    self.dtype = jnp.dtype(cfg.dtype)
    self.embed = Embed(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std,
                       param_dtype=pdt, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
    self.w_head_dv = nnx.Param(normal_init(cfg.init_std)(
        rngs.params(), (cfg.d_model, cfg.vocab_size), pdt))

  def __call__(self, tokens_bt: jax.Array, segment_ids_bt: jax.Array | None = None,
               *, train: bool = True):
    x_btd = self.embed(tokens_bt, self.dtype)
    aux_losses: dict[str, jax.Array] = {}
    stats = []
    for block in self.blocks:
      x_btd, aux, st = block(x_btd, tokens_bt, segment_ids_bt, train=train)
      for k, v in aux.items():
        aux_losses[k] = aux_losses.get(k, 0.0) + v
      if st is not None:
        stats.append(st)
    x_btd = self.final_norm(x_btd)
    logits = jnp.einsum("btd,dv->btv", x_btd, self.w_head_dv[...].astype(self.dtype))
    moe_stats = jax.tree.map(lambda *xs: jnp.stack(xs), *stats) if stats else {}
    return logits.astype(jnp.float32), {"losses": aux_losses, "moe": moe_stats}
