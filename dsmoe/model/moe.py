"""The DeepSeekMoE block: shared experts + fine-grained routed experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dsmoe import dispatch
from dsmoe.model import losses
from dsmoe.model.layers import MLP, normal_init
from dsmoe.model.router import Router, hash_routing


class MoE(nnx.Module):
  """h_t = sum_{i<=K_s} FFN_i(u_t) + sum_{i>K_s} g_{i,t} FFN_i(u_t)  (residual outside).

  Steps of one call on u [B, T, D]:
    1. router: scores s [B,T,N'] in float32 (softmax over routed experts only),
       top-K' indices and gates g (optionally renormalised, then scaled);
       the hash router instead picks one expert from the token id, gate 1;
    2. balance losses from (s, top-K'): expert-level a1 * L_ExpBal (per
       sequence if `seq_aux`) and device-level a2 * L_DevBal (D groups);
    3. shared experts: K_s experts run as one SwiGLU MLP of hidden
       K_s * expert_hidden on every token, unweighted;
    4. routed experts: the configured dispatch (`moe.impl`) computes
       sum_k g_k FFN_{e_k}(u_t);
    5. routing statistics: tokens per expert and the dropped fraction.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    """`cfg` is the resolved model config (see dsmoe.config.resolve)."""
    moe = cfg.moe
    self.moe = moe
    pdt = jnp.dtype(cfg.param_dtype)
    e, d, h = moe.num_routed_experts, cfg.d_model, moe.expert_hidden
    if moe.router == "topk":
      self.router = Router(d, e, top_k=moe.top_k, score_fn=moe.score_fn,
                           norm_topk_prob=moe.norm_topk_prob,
                           routed_scaling_factor=moe.routed_scaling_factor,
                           init_std=cfg.init_std, param_dtype=pdt, rngs=rngs)
    else:
      self.router = None
    self.shared = (MLP(d, moe.num_shared_experts * h, init_std=cfg.init_std,
                       param_dtype=pdt, rngs=rngs)
                   if moe.num_shared_experts > 0 else None)
    init = normal_init(cfg.init_std)
    self.w_gate_edh = nnx.Param(init(rngs.params(), (e, d, h), pdt))
    self.w_up_edh = nnx.Param(init(rngs.params(), (e, d, h), pdt))
    self.w_down_ehd = nnx.Param(init(rngs.params(), (e, h, d), pdt))

  def experts(self) -> dispatch.ExpertWeights:
    return dispatch.ExpertWeights(self.w_gate_edh[...], self.w_up_edh[...], self.w_down_ehd[...])

  def route(self, x_btd: jax.Array, tokens_bt: jax.Array):
    if self.router is None:
      return hash_routing(tokens_bt, self.moe.num_routed_experts)
    return self.router(x_btd)

  def aux_losses(self, routing) -> dict[str, jax.Array]:
    if routing.scores_bte is None:
      return {}
    out = {}
    if self.moe.aux_loss_alpha > 0:
      out["expert_balance"] = self.moe.aux_loss_alpha * losses.expert_balance_loss(
          routing.scores_bte, routing.idx_btk, seq_aux=self.moe.seq_aux)
    if self.moe.device_balance_alpha > 0:
      out["device_balance"] = self.moe.device_balance_alpha * losses.device_balance_loss(
          routing.scores_bte, routing.idx_btk, num_groups=self.moe.num_device_groups)
    return out

  def __call__(self, x_btd: jax.Array, tokens_bt: jax.Array, *, train: bool = True):
    b, t, d = x_btd.shape
    routing = self.route(x_btd, tokens_bt)  # [B,T,K] indices and gates
    fn = dispatch.get(self.moe.impl)
    routed = fn(x_btd.reshape(b * t, d), routing.idx_btk.reshape(b * t, -1),
                routing.weight_btk.reshape(b * t, -1), self.experts(),
                moe=self.moe, train=train)
    y_btd = routed.y_td.reshape(b, t, d)
    if self.shared is not None:
      y_btd = y_btd + self.shared(x_btd)
    load_e = losses.expert_counts(routing.idx_btk, self.moe.num_routed_experts).sum(axis=0)
    stats = {
        "tokens_per_expert": load_e,  # [E] (token, slot) picks per expert
        "max_over_mean_load": jnp.max(load_e) / jnp.mean(load_e),  # 1.0 = balanced
        "dropped_fraction": routed.dropped_fraction,
    }
    return y_btd, self.aux_losses(routing), stats
