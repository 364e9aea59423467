"""Expert-specialisation analyses of a trained model (paper section 4.5).

Every intervention evaluates the *same parameters* under a changed MoE: the
model is rebuilt from ``spec.replace(moe=...)`` (ModelSpec is frozen), its
graphdef merged with the trained parameters (those the new model lacks, the
shared experts when they are disabled, are left out), and the fixed
evaluation set scored as in training (dsmoe.train.evaluation.score):

* :func:`disable_top`    the r highest-scoring routed experts of each token
                         are skipped, its top-K taken from the rest (Figure 4);
* :func:`vary_top_k`     K routed experts activated at evaluation (Figure 5);
* :func:`swap_shared`    no shared expert, one more routed expert instead;
* :func:`expert_load`    fraction of each layer's (token, slot) picks per
                         routed expert, over scored tokens only;
* :func:`redundancy`     how alike the routed experts' outputs are: mean
                         pairwise cosine similarity of FFN_i(u_t) over tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsmoe.data.evalset import EvalSet, mean_and_se
from dsmoe.errors import ConfigError
from dsmoe.model import Transformer
from dsmoe.model.layers import swiglu
from dsmoe.parallel.mesh import make_mesh
from dsmoe.spec import ModelSpec
from dsmoe.train import evaluation


@dataclasses.dataclass
class Trained:
  """A trained model: its spec, parameters (pure dicts), mesh and eval set."""
  spec: ModelSpec
  params: dict
  rest: dict
  mesh: object
  eval_set: EvalSet
  batch_size: int
  num_batches: int | None = None  # evaluation batches per score (None: all)

  @property
  def moe(self):
    return self.spec.moe


def _restrict(tree, template):
  """`tree` with only the keys of `template` (recursively)."""
  if not isinstance(template, dict):
    return tree
  return {k: _restrict(tree[k], v) for k, v in template.items()}


def rebuild(trained: Trained, **moe_changes):
  """(graphdef, params, rest) of the model with MoE fields changed, same weights.

  Raises ConfigError if a kept parameter changes shape (e.g. a changed expert
  count).
  """
  spec = trained.spec.replace(moe=moe_changes)
  abstract = nnx.eval_shape(lambda: Transformer(spec, rngs=nnx.Rngs(0)))
  graphdef, p_abs, r_abs = nnx.split(abstract, nnx.Param, ...)
  p_abs, r_abs = nnx.to_pure_dict(p_abs), nnx.to_pure_dict(r_abs)
  params = _restrict(trained.params, p_abs)
  rest = _restrict(trained.rest, r_abs)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(p_abs)):
    if tuple(a.shape) != tuple(b.shape):
      raise ConfigError(f"{jax.tree_util.keystr(path)}: {a.shape} -> {b.shape}; "
                       f"the change {moe_changes} needs other parameters")
  return graphdef, params, rest


def score(trained: Trained, **moe_changes) -> dict:
  """Evaluation loss and its standard error of the changed model."""
  graphdef, params, rest = rebuild(trained, **moe_changes)
  loss_d, tokens_d = evaluation.score(graphdef, params, rest, trained.eval_set, trained.mesh,
                                      batch_size=trained.batch_size,
                                      num_batches=trained.num_batches)
  loss, se = mean_and_se(loss_d, tokens_d)
  return {"loss": loss, "se": se, "tokens": float(tokens_d.sum())}


def _learned(trained: Trained, what: str) -> None:
  if trained.moe.router != "topk":
    raise ConfigError(f"{what} needs a learned router; this model routes by "
                     f"{trained.moe.router!r}")


RATIOS = (0, 1 / 16, 2 / 16, 3 / 16, 4 / 16)  # of the routed experts, disabled in (a)


def disable_top(trained: Trained, ratios=RATIOS) -> list[dict]:
  """Loss when each token skips its r = round(ratio x N') best routed experts."""
  _learned(trained, "disabling top experts")
  n, k = trained.moe.num_routed_experts, trained.moe.top_k
  out = []
  for ratio in ratios:
    r = int(round(ratio * n))
    if r + k > n:
      continue
    out.append({"ratio": float(ratio), "disabled": r, **score(trained, skip_top_experts=r)})
  return out


def vary_top_k(trained: Trained, ks=None) -> list[dict]:
  """Loss with K routed experts activated at evaluation (trained K: the model's)."""
  _learned(trained, "changing top-k")
  n, k = trained.moe.num_routed_experts, trained.moe.top_k
  ks = ks or sorted({1, *range(max(1, k - 4), min(n, k + 2) + 1)})
  return [{"top_k": int(kk), **score(trained, top_k=int(kk))} for kk in ks if kk <= n]


def swap_shared(trained: Trained) -> dict | None:
  """Shared experts off and one more routed expert on, against the model as
  trained; None for a model without shared experts."""
  moe = trained.moe
  if moe.num_shared_experts == 0:
    return None
  _learned(trained, "activating another routed expert")
  return {"trained": {"shared": moe.num_shared_experts, "top_k": moe.top_k, **score(trained)},
          "swapped": {"shared": 0, "top_k": moe.top_k + 1,
                      **score(trained, num_shared_experts=0, top_k=moe.top_k + 1)}}


def moe_inputs(model: Transformer, batch: dict) -> list[jax.Array]:
  """The input u_t [B, T, D] of every MoE layer (after its pre-norm).

  Walks the blocks as Transformer.__call__ does; the test checks that each
  block's output equals its attention output plus the MoE of this input.
  """
  tokens, seg, pos = batch["inputs"], batch["segment_ids"], batch["positions"]
  x = model.embed(tokens, jnp.dtype(model.spec.dtype))
  out = []
  for block in model.blocks:
    if block.is_moe:
      h = x + block.attn(block.attn_norm(x), seg, pos)
      out.append(block.ffn_norm(h))
    x, _, _ = block(x, tokens, seg, pos, train=False)
  return out


def _batches(trained: Trained, num_batches: int):
  return trained.eval_set.batches(trained.batch_size, num_batches)


def _moe_blocks(model: Transformer) -> list:
  return [b.ffn for b in model.blocks if b.is_moe]


def expert_load(trained: Trained, num_batches: int = 8) -> np.ndarray:
  """[MoE layers, N'] fraction of the (token, slot) picks that go to each
  routed expert, over the scored tokens of the first `num_batches` batches."""
  graphdef, params, rest = rebuild(trained)
  n = trained.moe.num_routed_experts

  @jax.jit
  def counts(params, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    mask = (batch["segment_ids"] > 0).astype(jnp.float32)
    per_layer = []
    for moe, u in zip(_moe_blocks(model), moe_inputs(model, batch)):
      idx_btk = moe.route(u, batch["inputs"]).idx_btk
      per_layer.append(jnp.einsum("btke,bt->e", jax.nn.one_hot(idx_btk, n), mask))
    return jnp.stack(per_layer)

  total = sum(np.asarray(counts(params, rest, b)) for b in _batches(trained, num_batches))
  return total / np.maximum(total.sum(-1, keepdims=True), 1.0)


def redundancy(trained: Trained, max_tokens: int = 2048) -> list[dict]:
  """Per MoE layer: mean pairwise cosine similarity of the routed experts'
  outputs FFN_i(u_t) over up to `max_tokens` scored tokens (every expert on
  every token), and the mean over experts of the similarity to the most
  similar other expert. 0: unrelated outputs; 1: the same direction."""
  graphdef, params, rest = rebuild(trained)
  inputs = jax.jit(lambda p, r, b: moe_inputs(nnx.merge(graphdef, p, r), b))
  tokens_per_batch = trained.batch_size * trained.eval_set.inputs.shape[1]
  us = []
  for b in _batches(trained, max_tokens // tokens_per_batch + 2):
    mask = np.asarray(b["segment_ids"]).reshape(-1) > 0
    us.append([np.asarray(u).reshape(-1, u.shape[-1])[mask] for u in inputs(params, rest, b)])
  model = nnx.merge(graphdef, params, rest)
  out = []
  for layer, moe in enumerate(_moe_blocks(model)):
    u_td = np.concatenate([u[layer] for u in us])[:max_tokens]
    out.append(_output_similarity(moe.w_gate_edf[...], moe.w_up_edf[...], moe.w_down_efd[...],
                                  jnp.asarray(u_td)))
  return out


@jax.jit
def _cosines(w_gate_edf, w_up_edf, w_down_efd, u_td):
  y_etd = jax.vmap(lambda g, up, dn: swiglu(u_td, g, up, dn))(w_gate_edf, w_up_edf, w_down_efd)
  y_etd = y_etd / (jnp.linalg.norm(y_etd, axis=-1, keepdims=True) + 1e-9)
  return jnp.einsum("etd,ftd->ef", y_etd, y_etd) / u_td.shape[0]


def _output_similarity(w_gate_edf, w_up_edf, w_down_efd, u_td) -> dict:
  cos_ee = np.asarray(_cosines(w_gate_edf, w_up_edf, w_down_efd, u_td), np.float64)
  n = cos_ee.shape[0]
  off = cos_ee[~np.eye(n, dtype=bool)].reshape(n, n - 1)
  return {"mean_pairwise_cosine": float(off.mean()),
          "mean_nearest_cosine": float(off.max(-1).mean()), "experts": n,
          "tokens": int(u_td.shape[0])}


def load_trained(config, workdir: str, *, step: int | None = None,
                 num_batches: int | None = None) -> Trained:
  """The latest (or `step`) checkpoint of `workdir`, trained with `config`.

  `num_batches`: evaluation batches per score (None: the whole evaluation set).
  """
  from dsmoe import config as config_lib  # pylint: disable=g-import-not-at-top
  from dsmoe.data.evalset import make_eval_set  # pylint: disable=g-import-not-at-top
  spec = config_lib.resolve(config)
  mesh = make_mesh(spec.mesh)
  _, state, _ = evaluation.restore_params(spec, workdir, step, mesh=mesh)
  return Trained(spec.model, state["params"], state["rest"], mesh,
                 make_eval_set(spec), spec.train.batch_size, num_batches)


def analyze(trained: Trained, *, ratios=None, ks=None, load_batches: int = 8,
            redundancy_tokens: int = 2048) -> dict:
  """All five analyses of one model as a JSON-able dict (absent: not applicable)."""
  moe = trained.moe
  baseline = score(trained)
  out = {"model": {"router": moe.router, "routed": moe.num_routed_experts,
                   "shared": moe.num_shared_experts, "top_k": moe.top_k,
                   "expert_hidden": moe.expert_hidden},
         "eval_tokens_per_score": baseline["tokens"], "baseline": baseline}
  if moe.router == "topk":
    out["disable_top"] = disable_top(trained, ratios or RATIOS)
    out["vary_top_k"] = vary_top_k(trained, ks)
    out["swap_shared"] = swap_shared(trained)
  out["expert_load"] = expert_load(trained, load_batches).round(5).tolist()
  out["redundancy"] = redundancy(trained, redundancy_tokens)
  return out
