"""Validation loss on the fixed evaluation set, of a state or of a checkpoint.

Every evaluation scores rows of :class:`dsmoe.data.evalset.EvalSet` (the
same tokens for every model and seed): during training its first
`train.eval_batches` batches (a fixed subset spread over the documents), at
the end all of it when `train.eval_full_at_end`. The loss is the mean over
the scored tokens; its standard error treats documents as the independent
units (:func:`dsmoe.data.evalset.mean_and_se`).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dsmoe import config as config_lib
from dsmoe import errors
from dsmoe.data.evalset import EvalSet, make_eval_set, mean_and_se
from dsmoe.errors import CheckpointError, WorkdirError
from dsmoe.parallel.mesh import global_batch, make_mesh
from dsmoe.train import checkpoint as checkpoint_lib
from dsmoe.train import optimizer as optimizer_lib
from dsmoe.train import preflight
from dsmoe.train import state as state_lib

DOCUMENTS_FILE = "eval_documents.json"  # per-document results of the final evaluation


def token_nll(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
  """-log p(target) of every position, float32 [B, T]."""
  logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]


def document_sums(params, rest, batch, *, graphdef, num_docs: int):
  """(loss sum, scored tokens) per document [num_docs] of one batch (eval mode)."""
  model = nnx.merge(graphdef, params, rest)
  logits_btv, _ = model(batch["inputs"], batch["segment_ids"], batch["positions"],
                        train=False)
  mask_bt = (batch["segment_ids"] > 0).astype(jnp.float32)
  loss_b = jnp.sum(token_nll(logits_btv, batch["targets"]) * mask_bt, axis=-1)
  loss_d = jax.ops.segment_sum(loss_b, batch["doc"], num_segments=num_docs)
  tokens_d = jax.ops.segment_sum(jnp.sum(mask_bt, -1), batch["doc"], num_segments=num_docs)
  return loss_d, tokens_d


@functools.lru_cache(maxsize=32)
def _jit_document_sums(graphdef, num_docs: int, mesh):
  return jax.jit(functools.partial(document_sums, graphdef=graphdef, num_docs=num_docs),
                 out_shardings=NamedSharding(mesh, P()))  # replicated: every process reads it


def score(graphdef, params, rest, eval_set: EvalSet, mesh, *, batch_size: int,
          num_batches: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(loss sum, tokens) per document over the first `num_batches` batches (all: None).

  `graphdef` may be another model's with the same parameters (the analyses in
  dsmoe.analysis change the MoE this way); each graphdef is compiled once.
  """
  fn = _jit_document_sums(graphdef, eval_set.num_docs, mesh)
  loss_d = np.zeros(eval_set.num_docs)
  tokens_d = np.zeros(eval_set.num_docs)
  for batch in eval_set.batches(batch_size, num_batches, process_index=jax.process_index(),
                                process_count=jax.process_count()):
    with jax.set_mesh(mesh):  # the expert-parallel MoE layers read the ambient mesh
      out = jax.device_get(fn(params, rest, global_batch(batch, mesh)))
    loss_d += out[0]
    tokens_d += out[1]
  return loss_d, tokens_d


def summary(loss_d: np.ndarray, tokens_d: np.ndarray, *, full: bool) -> dict:
  """The logged evaluation record: loss, its standard error, perplexity, sizes."""
  loss, se = mean_and_se(loss_d, tokens_d)
  return {"eval_loss": loss, "eval_loss_se": se,
          "eval_perplexity": float(np.exp(min(loss, 80.0))),
          "eval_tokens": float(np.sum(tokens_d)), "eval_docs": int(np.sum(tokens_d > 0)),
          "eval_full": bool(full)}


def evaluate(config, graphdef, state, mesh, *, full: bool = False,
             eval_set: EvalSet | None = None, documents_path: str | None = None) -> dict:
  """Scores `state` on the whole evaluation set (`full`) or on its first
  `train.eval_batches` batches; `config` is resolved.

  `documents_path`: also write the per-document loss sums and token counts
  there (JSON, process 0), e.g. for paired comparisons of two models.
  """
  eval_set = eval_set if eval_set is not None else make_eval_set(config)
  loss_d, tokens_d = score(graphdef, state["params"], state["rest"], eval_set, mesh,
                           batch_size=config.train.batch_size,
                           num_batches=None if full else config.train.eval_batches)
  fingerprint = eval_set.fingerprint[:16]
  if documents_path and jax.process_index() == 0:
    _write_json(documents_path, {"eval_set": fingerprint, "names": list(eval_set.names),
                                 "loss_sum": loss_d.tolist(), "tokens": tokens_d.tolist()})
  return {**summary(loss_d, tokens_d, full=full), "eval_set": fingerprint}


def evaluate_checkpoint(spec, workdir: str, step: int | None = None, *,
                        full: bool | None = None, output: str | None = None) -> dict:
  """Evaluates checkpoint `step` (default: latest) of `workdir` (without
  checkpoints: the ``train.init_from`` params, see :func:`restore_params`);
  `spec` is resolved (a ConfigDict is resolved here).

  `full` (default: `train.eval_full_at_end`) scores the whole evaluation set.
  Writes the result to `output` (default ``<workdir>/eval_step<N>.json``,
  process 0) and returns it with its "path". The output folder is checked to
  be writable before anything is computed; if the write still fails, the
  error holds the result. Raises CheckpointError when the checkpoint is
  missing or does not match.
  """
  config = config_lib.resolve(spec)
  full = config.train.eval_full_at_end if full is None else full
  workdir = os.path.abspath(workdir)
  out_dir = os.path.dirname(os.path.abspath(output)) if output else workdir
  has_params = (os.path.isdir(os.path.join(workdir, "checkpoints"))
                or bool(config.train.init_from))
  if jax.process_index() == 0 and has_params:  # else restore_params names what is missing
    preflight.check_writable(out_dir, what="output folder", hint="give --output=PATH "
                             "(evaluate.py) to write the result elsewhere")
  mesh = make_mesh(config.mesh)
  graphdef, state, ckpt = restore_params(config, workdir, step, mesh=mesh)
  result = {"step": int(state["step"]), "checkpoint": ckpt,
            **evaluate(config, graphdef, state, mesh, full=full)}
  path = os.path.abspath(output) if output else os.path.join(
      workdir, f"eval_step{result['step']}.json")
  if jax.process_index() == 0:
    _write_json(path, result, what="result")
  result["path"] = path
  return result


def restore_params(config, workdir: str, step: int | None = None, *, mesh=None):
  """(graphdef, state, checkpoint path) of checkpoint `step` (default latest),
  on `mesh` (default: the config's).

  A workdir without checkpoints gives the params of ``train.init_from``
  (step 0, no optimizer state built): the state a training run there would
  start from. `config` is resolved. Raises CheckpointError when there is
  none or it does not match the config.
  """
  workdir = os.path.abspath(workdir)
  mesh = mesh if mesh is not None else make_mesh(config.mesh)
  ckpts = None
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    ckpts = checkpoint_lib.Checkpoints(workdir, read_only=True)
  with errors.closing(ckpts.close if ckpts is not None else lambda: None):
    if step is None and ckpts is not None:
      step = ckpts.latest_step()
    if step is None and config.train.init_from:
      graphdef, state, _ = state_lib.init_or_restore(
          config, optax.identity(), _NoCheckpoints(), mesh, None)
      return graphdef, state, config.train.init_from
    if ckpts is None or step is None:
      raise CheckpointError(f"no checkpoints in {workdir}/checkpoints")
    tx = optimizer_lib.make_optimizer(config.train)
    graphdef, state, _ = state_lib.init_or_restore(config, tx, ckpts, mesh, None, step)
  return graphdef, state, ckpts.path(int(state["step"]))


class _NoCheckpoints:
  """No checkpoint to restore: init_or_restore starts from train.init_from."""

  def latest_step(self):
    return None


def _write_json(path: str, obj: dict, what: str = "") -> None:
  """Writes `obj`; on failure one WorkdirError (holding the result if `what`)."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(obj, f, indent=1)
  except OSError as e:
    held = f"; the {what} was {json.dumps(obj)}" if what else ""
    raise WorkdirError(f"{errors.describe_os_error(e)}{held}") from e
