"""Decoder-only transformer with DeepSeekMoE feed-forward layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsmoe.model.attention import Attention, KVCache
from dsmoe.model.layers import MLP, Embed, RMSNorm, normal_init
from dsmoe.model.moe import MoE
from dsmoe.parallel import expert as expert_lib
from dsmoe.parallel.mesh import constrain_batch
from dsmoe.spec import ModelSpec

# model.remat -> what the backward pass keeps of a block (the rest is recomputed).
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep everything
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the block input
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep
    # projections (attention q/k/v/o, MLP, router, experts), recompute the rest
    "save_moe_exchange": jax.checkpoint_policies.save_only_these_names(
        expert_lib.RECEIVED, expert_lib.RETURNED),  # keep only what the expert-
    # parallel exchange moved, so the backward pass repeats no all-to-all
}


class Block(nnx.Module):
  """x + attn(norm(x)); then x + ffn(norm(x)) with ffn a dense MLP or MoE."""

  def __init__(self, spec: ModelSpec, layer: int, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(spec.param_dtype)
    self.attn_norm = RMSNorm(spec.d_model, eps=spec.rms_norm_eps, param_dtype=pdt, rngs=rngs)
    self.attn = Attention(spec.d_model, spec.num_heads, spec.head_dim,
                          rope_theta=spec.rope_theta, init_std=spec.init_std,
                          param_dtype=pdt, rngs=rngs)
    self.ffn_norm = RMSNorm(spec.d_model, eps=spec.rms_norm_eps, param_dtype=pdt, rngs=rngs)
    self.is_moe = spec.is_moe_layer(layer)
    if self.is_moe:
      self.ffn = MoE(spec, rngs=rngs)
    else:
      self.ffn = MLP(spec.d_model, spec.dense_hidden, init_std=spec.init_std,
                     param_dtype=pdt, rngs=rngs)

  def __call__(self, x_btd, tokens_bt, segment_ids_bt, positions_bt, *, train: bool):
    x_btd = x_btd + self.attn(self.attn_norm(x_btd), segment_ids_bt, positions_bt)
    h_btd = self.ffn_norm(x_btd)
    if not self.is_moe:
      return x_btd + self.ffn(h_btd), {}, None
    y_btd, aux, stats = self.ffn(h_btd, tokens_bt, train=train)
    return x_btd + y_btd, aux, stats

  def extend(self, x_btd, tokens_bt, positions_bt, cache: KVCache):
    """The block on new tokens through the KV cache (decoding; MoE in eval mode)."""
    h_btd, cache = self.attn.extend(self.attn_norm(x_btd), positions_bt, cache)
    x_btd = x_btd + h_btd
    h_btd = self.ffn_norm(x_btd)
    if self.is_moe:
      return x_btd + self.ffn(h_btd, tokens_bt, train=False)[0], cache
    return x_btd + self.ffn(h_btd), cache


class Transformer(nnx.Module):
  """Embedding -> blocks -> final RMSNorm -> untied LM head (logits in float32).

  With ``spec.scan_layers`` the MoE layers (all layers from
  ``first_k_dense_replace`` on) are one stacked Block, ``moe_blocks``, whose
  weights have a leading layer axis, run by ``nnx.scan`` (one layer to
  compile instead of L); ``blocks`` keeps the dense first layers. Each block
  runs under ``spec.remat`` (REMAT_POLICIES).

  ``model(tokens_bt, segment_ids_bt=None, positions_bt=None, *, train=True)``
  returns (logits [B,T,V], aux) where aux has
    "losses": {name: sum over MoE layers of the weighted auxiliary loss},
    "moe": {"tokens_per_expert": [L, E], "dropped_fraction": [L]} over the
           L MoE layers (empty without MoE layers).
  `segment_ids_bt` (1.. per packed document, 0 padding) keeps attention
  within documents; `positions_bt` are RoPE positions (default 0..T-1; the
  data pipeline restarts them at each packed document).
  """

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    pdt = jnp.dtype(spec.param_dtype)
    self.embed = Embed(spec.vocab_size, spec.d_model, init_std=spec.init_std,
                       param_dtype=pdt, rngs=rngs)
    num_scanned = spec.num_layers - spec.first_k_dense_replace if spec.scan_layers else 0
    first_scanned = spec.num_layers - num_scanned
    self.blocks = nnx.List([Block(spec, i, rngs=rngs) for i in range(first_scanned)])
    if num_scanned:
      @nnx.split_rngs(splits=num_scanned)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def stacked(rngs):
        return Block(spec, first_scanned, rngs=rngs)
      self.moe_blocks = stacked(rngs)
    self.final_norm = RMSNorm(spec.d_model, eps=spec.rms_norm_eps, param_dtype=pdt, rngs=rngs)
    self.w_head_dv = nnx.Param(normal_init(spec.init_std)(
        rngs.params(), (spec.d_model, spec.vocab_size), pdt))

  def __call__(self, tokens_bt: jax.Array, segment_ids_bt: jax.Array | None = None,
               positions_bt: jax.Array | None = None, *, train: bool = True):
    dtype = jnp.dtype(self.spec.dtype)
    x_btd = constrain_batch(self.embed(tokens_bt, dtype))
    aux_losses: dict[str, jax.Array] = {}
    stats = []
    run = self._block_fn(tokens_bt, segment_ids_bt, positions_bt, train)
    for block in self.blocks:
      x_btd, aux, st = run(block, x_btd)
      for k, v in aux.items():
        aux_losses[k] = aux_losses.get(k, 0.0) + v
      if st is not None:
        stats.append(st)
    moe_stats = jax.tree.map(lambda *xs: jnp.stack(xs), *stats) if stats else {}
    if self.spec.scan_layers:
      x_btd, aux, moe_stats = self._scan(run, x_btd)
      for k, v in aux.items():
        aux_losses[k] = aux_losses.get(k, 0.0) + v
    x_btd = self.final_norm(x_btd)
    logits_btv = jnp.einsum("btd,dv->btv", x_btd, self.w_head_dv[...].astype(dtype))
    return logits_btv.astype(jnp.float32), {"losses": aux_losses, "moe": moe_stats}

  def init_cache(self, batch: int, length: int) -> list[KVCache]:
    """Empty KV caches (one per layer) of `length` positions, in the compute dtype."""
    s = self.spec
    return [KVCache.zeros(batch, length, s.num_heads, s.head_dim, jnp.dtype(s.dtype))
            for _ in range(s.num_layers)]

  def extend(self, tokens_bt: jax.Array, positions_bt: jax.Array, caches: list[KVCache]):
    """Decoding entry: logits [B,T,V] (float32) of new tokens at `positions_bt`
    (their cache slots) and the updated caches; see Attention.extend."""
    dtype = jnp.dtype(self.spec.dtype)
    x_btd = self.embed(tokens_bt, dtype)
    new_caches = []
    for block, cache in zip(self._unstacked_blocks(), caches, strict=True):
      x_btd, cache = block.extend(x_btd, tokens_bt, positions_bt, cache)
      new_caches.append(cache)
    x_btd = self.final_norm(x_btd)
    logits_btv = jnp.einsum("btd,dv->btv", x_btd, self.w_head_dv[...].astype(dtype))
    return logits_btv.astype(jnp.float32), new_caches

  def _unstacked_blocks(self) -> list[Block]:
    """Every layer as its own Block (decoding runs layer by layer): the first
    dense blocks, then, under ``scan_layers``, one slice of ``moe_blocks`` per
    layer."""
    blocks = list(self.blocks)
    if self.spec.num_layers > len(blocks):
      graphdef, state = nnx.split(self.moe_blocks)
      for i in range(self.spec.num_layers - len(blocks)):
        blocks.append(nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)))
    return blocks

  def _block_fn(self, tokens_bt, segment_ids_bt, positions_bt, train: bool):
    """block, x -> (x, aux losses, stats), under the remat policy."""
    def run(block, x_btd):
      x_btd, aux, st = block(x_btd, tokens_bt, segment_ids_bt, positions_bt, train=train)
      return constrain_batch(x_btd), aux, st
    if self.spec.remat == "none":
      return run
    return nnx.remat(run, policy=REMAT_POLICIES[self.spec.remat],
                     prevent_cse=not self.spec.scan_layers)

  def _scan(self, run, x_btd):
    """The stacked MoE layers: (x, {loss: sum over layers}, stats [L, ...])."""
    def body(x_btd, block):
      x_btd, aux, st = run(block, x_btd)
      return x_btd, (aux, st)
    x_btd, (aux_l, stats_l) = nnx.scan(body, in_axes=(nnx.Carry, 0),
                                       out_axes=(nnx.Carry, 0))(x_btd, self.moe_blocks)
    return x_btd, {k: jnp.sum(v) for k, v in aux_l.items()}, stats_l
