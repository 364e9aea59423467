"""Train and eval steps: pure functions of (state, batch), jitted by the loop.

The training state is a plain dict pytree (what Orbax saves):

    {"step": int32 [],            updates done so far
     "skipped": int32 [],         non-finite updates skipped (train.skip_nonfinite):
                                  a non-finite loss, gradient or updated parameter
     "params": {...},             nnx.Param values as a pure dict (float32 master)
     "rest": {...},               any other model variables (pure dict)
     "opt_state": ...}            Optax state over "params"

The model has no dropout (as the paper), so the state holds no RNG; the
initialisation is seeded by ``train.seed``.

The model is rebuilt inside the traced function with ``nnx.merge(graphdef,
params, rest)``; `graphdef` is static (closed over by :func:`jit_train_step`;
it holds the frozen ModelSpec, so it is hashable).

On a mesh (dsmoe.parallel.mesh) every leaf of the state has the sharding of
dsmoe.parallel.rules: :func:`init_sharded` creates it that way (no device
ever holds the whole state), and the jitted steps keep it; they trace and run
under ``jax.set_mesh(mesh)``, which the expert-parallel MoE layers read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsmoe.model import Transformer
from dsmoe.parallel import rules
from dsmoe.spec import Spec
from dsmoe.train import optimizer as optimizer_lib


def init_state(config: Spec, tx: optax.GradientTransformation):
  """(graphdef, state) of a freshly initialised model; `config` is resolved."""
  model = Transformer(config.model, rngs=nnx.Rngs(params=config.train.seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  state = {"step": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32),
           "params": params, "rest": rest, "opt_state": tx.init(params)}
  return graphdef, state


def abstract_state(config: Spec, tx: optax.GradientTransformation):
  """(graphdef, state of ShapeDtypeStructs): shapes without allocating."""
  out = {}

  def build():
    graphdef, state = init_state(config, tx)
    out["graphdef"] = graphdef
    return state
  shapes = jax.eval_shape(build)
  return out["graphdef"], shapes


def state_shardings(config: Spec, tx: optax.GradientTransformation, mesh):
  """(graphdef, NamedShardings of every state leaf on `mesh`)."""
  graphdef, shapes = abstract_state(config, tx)
  return graphdef, rules.tree_shardings(shapes, mesh)


def init_sharded(config: Spec, tx: optax.GradientTransformation, mesh, shardings=None):
  """(graphdef, state) initialised directly into its shardings on `mesh`
  (jit with out_shardings: each device computes only its own pieces).
  `shardings`: those of :func:`state_shardings`, when known already."""
  graphdef = None
  if shardings is None:
    graphdef, shardings = state_shardings(config, tx, mesh)
  out = {}

  def init():
    out["graphdef"], state = init_state(config, tx)
    return state
  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return graphdef or out["graphdef"], state


def cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array):
  """(sum of token NLLs where mask, number of such tokens), both float32."""
  logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  nll_bt = -jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
  mask = mask_bt.astype(jnp.float32)
  return jnp.sum(nll_bt * mask), jnp.sum(mask)


def _forward(graphdef, params, rest, batch, *, train: bool):
  model = nnx.merge(graphdef, params, rest)
  logits_btv, aux = model(batch["inputs"], batch["segment_ids"], batch.get("positions"),
                          train=train)
  ce_sum, n = cross_entropy(logits_btv, batch["targets"], batch["segment_ids"] > 0)
  return ce_sum, n, aux


def _loss_fn(params, graphdef, rest, batch, n_tokens, accum: int):
  """Gradient objective of one micro-batch: its share of the global CE + aux/accum."""
  ce_sum, _, aux = _forward(graphdef, params, rest, batch, train=True)
  aux_total = sum(aux["losses"].values()) if aux["losses"] else 0.0
  objective = ce_sum / n_tokens + aux_total / accum
  return objective, (ce_sum, aux)


def _grads(graphdef, params, rest, batch, accum: int):
  """Gradients and statistics summed over `accum` micro-batches."""
  n_tokens = jnp.maximum(jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32), 1.0)
  grad_fn = jax.value_and_grad(_loss_fn, has_aux=True)
  if accum == 1:
    (_, (ce_sum, aux)), grads = grad_fn(params, graphdef, rest, batch, n_tokens, 1)
    return grads, ce_sum, n_tokens, aux
  # Micro-batch i = rows i, i + accum, ...: every device keeps its own rows
  # (B/devices consecutive rows split evenly), so no batch row moves.
  micro = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)

  def body(carry, mb):
    (_, (ce_sum, aux)), g = grad_fn(params, graphdef, rest, mb, n_tokens, accum)
    return jax.tree.map(jnp.add, carry, (g, ce_sum)), aux
  zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
  (grads, ce_sum), auxs = jax.lax.scan(body, zeros, micro)
  aux = {"losses": jax.tree.map(lambda x: jnp.mean(x, 0), auxs["losses"]),
         "moe": {k: (jnp.sum(v, 0) if k == "tokens_per_expert" else jnp.mean(v, 0))
                 for k, v in auxs["moe"].items()}}
  return grads, ce_sum, n_tokens, aux


def global_norm(tree) -> jax.Array:
  """sqrt of the sum of squares of every leaf (float32), before clipping."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def all_finite(tree) -> jax.Array:
  """True when no leaf of `tree` holds a NaN or an infinity."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _select(ok, new, old):
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def train_step(state, batch, *, graphdef, tx, schedule, accum: int, skip_nonfinite: bool):
  """One update on the global batch; returns (new state, metrics of this step)."""
  params = state["params"]
  grads, ce_sum, n_tokens, aux = _grads(graphdef, params, state["rest"], batch, accum)
  loss = ce_sum / n_tokens
  grad_norm = global_norm(grads)
  aux_losses = aux["losses"]
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  for v in aux_losses.values():
    finite &= jnp.isfinite(v)
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_params = optax.apply_updates(params, updates)
  params_finite = all_finite(new_params)  # an update can overflow finite inputs
  finite &= params_finite
  if skip_nonfinite:
    new_params = _select(finite, new_params, params)
    opt_state = _select(finite, opt_state, state["opt_state"])
  new_state = dict(state, step=state["step"] + 1, params=new_params, opt_state=opt_state,
                   skipped=state["skipped"] + (~finite).astype(jnp.int32))
  metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
             "params_finite": params_finite,
             "skipped": new_state["skipped"],
             "learning_rate": schedule(state["step"]), "tokens": n_tokens,
             **{f"aux/{k}": v for k, v in aux_losses.items()}}
  if aux["moe"]:
    metrics["tokens_per_expert"] = aux["moe"]["tokens_per_expert"]  # [L_moe, E]
    metrics["dropped_fraction"] = aux["moe"]["dropped_fraction"]  # [L_moe]
  return new_state, metrics


def probe_step(params, rest, batch, *, graphdef, accum: int):
  """Loss, gradient norm and whether both (and the aux losses) are finite, of
  `params` on `batch`, without an update: the loop checks that a state it is
  about to save can still train (a diverged model can have finite
  parameters and loss but non-finite gradients)."""
  grads, ce_sum, n_tokens, aux = _grads(graphdef, params, rest, batch, accum)
  loss, grad_norm = ce_sum / n_tokens, global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  for v in aux["losses"].values():
    finite &= jnp.isfinite(v)
  return {"loss": loss, "grad_norm": grad_norm, "finite": finite}


class OnMesh:
  """A jitted function that traces, lowers and runs under ``jax.set_mesh(mesh)``."""

  def __init__(self, jitted, mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args):
    if self.mesh is None:
      return self.jitted(*args)
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    if self.mesh is None:
      return self.jitted.lower(*args)
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)


def jit_train_step(config: Spec, graphdef, tx, mesh=None, shardings=None) -> OnMesh:
  """train_step jitted with the state donated (updated in place); on `mesh`
  the new state keeps the sharding rules' layout (`shardings`: those of
  :func:`state_shardings`, when known already)."""
  t = config.train
  fn = functools.partial(train_step, graphdef=graphdef, tx=tx,
                         schedule=optimizer_lib.make_schedule(t),
                         accum=t.grad_accum_steps, skip_nonfinite=t.skip_nonfinite)
  if mesh is None:
    return OnMesh(jax.jit(fn, donate_argnums=0), None)
  if shardings is None:
    _, shardings = state_shardings(config, tx, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return OnMesh(jax.jit(fn, donate_argnums=0, out_shardings=(shardings, replicated)), mesh)


def jit_probe_step(config: Spec, graphdef, mesh=None) -> OnMesh:
  return OnMesh(jax.jit(functools.partial(probe_step, graphdef=graphdef,
                                          accum=config.train.grad_accum_steps)), mesh)
