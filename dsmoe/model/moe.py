"""The DeepSeekMoE block: shared experts + fine-grained routed experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsmoe import dispatch
from dsmoe import parallel
from dsmoe.model import losses
from dsmoe.model.layers import MLP, normal_init
from dsmoe.model.router import Router, Routing, hash_routing
from dsmoe.spec import ModelSpec


class MoE(nnx.Module):
  """h_t = sum_{i<=K_s} FFN_i(u_t) + sum_{i>K_s} g_{i,t} FFN_i(u_t)  (residual outside).

  Steps of one call on u [B, T, D] (docs/MODEL.md has the formulas):
    1. router: scores s [B,T,N'] in float32 (softmax over routed experts only),
       top-K' indices (among the experts of the token's best M devices when
       `max_devices_per_token` = M > 0) and gates g (optionally renormalised,
       then scaled); the hash router instead picks one expert from the token
       id, gate 1;
    2. balance losses from (s, top-K'): expert-level a1 * L_ExpBal (per
       sequence if `seq_aux`), device-level a2 * L_DevBal and communication
       a3 * L_CommBal (D device groups);
    3. shared experts: K_s experts run as one SwiGLU MLP of hidden
       K_s * expert_hidden on every token, unweighted;
    4. routed experts: the resolved plan (`spec.plan`: dispatch and grouped
       SwiGLU, dsmoe.dispatch) computes sum_k g_k FFN_{e_k}(u_t); when the
       ambient mesh has an `expert` axis > 1, inside shard_map with the
       experts split over it (dsmoe.parallel.expert, `spec.plan.ep_exchange`);
    5. routing statistics: (token, slot) picks per expert and the dropped
       fraction.
  Steps 1, 2 and 5 see the global batch (outside shard_map), so losses and
  statistics do not depend on the mesh.
  """

  def __init__(self, model: ModelSpec, *, rngs: nnx.Rngs):
    spec = self.spec = model.moe  # frozen and hashable: part of the graphdef
    pdt = jnp.dtype(model.param_dtype)
    e, d, f = spec.num_routed_experts, model.d_model, spec.expert_hidden
    if spec.router == "topk":
      self.router = Router(d, e, top_k=spec.top_k, score_fn=spec.score_fn,
                           norm_topk_prob=spec.norm_topk_prob,
                           routed_scaling_factor=spec.routed_scaling_factor,
                           init_std=model.init_std, param_dtype=pdt, rngs=rngs,
                           skip_top=spec.skip_top_experts,
                           num_groups=spec.num_device_groups,
                           max_groups=spec.max_devices_per_token)
    else:
      self.router = None
    self.shared = (MLP(d, spec.num_shared_experts * f, init_std=model.init_std,
                       param_dtype=pdt, rngs=rngs)
                   if spec.num_shared_experts > 0 else None)
    init = normal_init(model.init_std)
    self.w_gate_edf = nnx.Param(init(rngs.params(), (e, d, f), pdt))
    self.w_up_edf = nnx.Param(init(rngs.params(), (e, d, f), pdt))
    self.w_down_efd = nnx.Param(init(rngs.params(), (e, f, d), pdt))

  def experts(self) -> dispatch.ExpertWeights:
    return dispatch.ExpertWeights(self.w_gate_edf[...], self.w_up_edf[...], self.w_down_efd[...])

  def route(self, x_btd: jax.Array, tokens_bt: jax.Array) -> Routing:
    if self.router is None:
      return hash_routing(tokens_bt, self.spec.num_routed_experts)
    return self.router(x_btd)

  def aux_losses(self, routing: Routing) -> dict[str, jax.Array]:
    """The weighted balance losses of this layer (none for the hash router)."""
    spec = self.spec
    if routing.scores_bte is None:
      return {}
    out = {}
    if spec.aux_loss_alpha > 0:
      out["expert_balance"] = spec.aux_loss_alpha * losses.expert_balance_loss(
          routing.scores_bte, routing.idx_btk, seq_aux=spec.seq_aux)
    if spec.device_balance_alpha > 0:
      out["device_balance"] = spec.device_balance_alpha * losses.device_balance_loss(
          routing.scores_bte, routing.idx_btk, num_groups=spec.num_device_groups)
    if spec.comm_balance_alpha > 0:
      out["comm_balance"] = spec.comm_balance_alpha * losses.comm_balance_loss(
          routing.scores_bte, routing.idx_btk, num_groups=spec.num_device_groups,
          max_groups=spec.max_devices_per_token)
    return out

  def routed(self, x_td: jax.Array, routing: Routing, *, train: bool) -> dispatch.DispatchResult:
    """Step 4 on the flattened tokens x_td [T, D]."""
    k = routing.idx_btk.shape[-1]
    idx_tk, weight_tk = routing.idx_btk.reshape(-1, k), routing.weight_btk.reshape(-1, k)
    if parallel.mesh.ambient_axis_size("expert") > 1:
      return parallel.expert.routed_experts(x_td, idx_tk, weight_tk, self.experts(),
                                            self.spec.plan, train=train)
    return dispatch.routed_experts(x_td, idx_tk, weight_tk, self.experts(), self.spec.plan,
                                   train=train)

  def __call__(self, x_btd: jax.Array, tokens_bt: jax.Array, *, train: bool = True):
    """(y [B,T,D], {aux loss name: value}, {"tokens_per_expert" [E], "dropped_fraction"})."""
    b, t, d = x_btd.shape
    routing = self.route(x_btd, tokens_bt)  # [B,T,K] indices and gates
    routed = self.routed(x_btd.reshape(b * t, d), routing, train=train)
    y_btd = routed.y_td.reshape(b, t, d)
    if self.shared is not None:
      y_btd = y_btd + self.shared(x_btd)
    stats = {
        "tokens_per_expert": losses.expert_counts(
            routing.idx_btk, self.spec.num_routed_experts).sum(axis=0),  # [E]
        "dropped_fraction": routed.dropped_fraction,
    }
    return y_btd, self.aux_losses(routing), stats
