"""Validation loss and perplexity, of a state or of a saved checkpoint."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from dsmoe import config as config_lib
from dsmoe import errors
from dsmoe.errors import WorkdirError
from dsmoe.data import make_loader
from dsmoe.train import checkpoint as checkpoint_lib
from dsmoe.train import optimizer as optimizer_lib
from dsmoe.train import preflight
from dsmoe.train import step as step_lib
from dsmoe.train.mesh import global_batch, make_mesh


def evaluate(config, graphdef, state, mesh, *, eval_fn=None) -> dict:
  """Loss and perplexity over the first `train.eval_batches` validation batches.

  `config` is resolved; every process reads its own rows of each global batch.
  """
  eval_fn = eval_fn or step_lib.jit_eval_step(graphdef)
  it = iter(make_loader(config, "validation"))
  ce_sum, n = 0.0, 0.0
  for _ in range(config.train.eval_batches):
    out = jax.device_get(eval_fn(state["params"], state["rest"], global_batch(next(it), mesh)))
    ce_sum, n = ce_sum + float(out["ce_sum"]), n + float(out["tokens"])
  loss = ce_sum / max(n, 1.0)
  return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 80.0))),
          "eval_tokens": n}


def evaluate_checkpoint(config, workdir: str, step: int | None = None, *,
                        output: str | None = None) -> dict:
  """Evaluates checkpoint `step` (default: latest) of `workdir`.

  Writes the result to `output` (default ``<workdir>/eval_step<N>.json``,
  process 0) and returns it with its "path". The output folder is checked to
  be writable before anything is computed; if the write still fails, the
  error holds the result. Raises CheckpointError when the checkpoint is
  missing or does not match.
  """
  config = config_lib.resolve(config)
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise checkpoint_lib.CheckpointError(f"no checkpoints in {workdir}/checkpoints")
  out_dir = os.path.dirname(os.path.abspath(output)) if output else workdir
  if jax.process_index() == 0:
    preflight.check_writable(out_dir, what="output folder", hint="give --output=PATH "
                             "(evaluate.py) to write the result elsewhere")
  ckpts = checkpoint_lib.Checkpoints(workdir, read_only=True)
  tx = optimizer_lib.make_optimizer(config.train)
  mesh = make_mesh(config.mesh)
  with errors.closing(ckpts.close):
    step = ckpts.latest_step() if step is None else step
    if step is None:
      raise checkpoint_lib.CheckpointError(f"no checkpoints in {ckpts.directory}")
    graphdef, state, _ = checkpoint_lib.init_or_restore(config, tx, ckpts, mesh, None, step)
  result = {"step": int(state["step"]), "checkpoint": ckpts.path(int(state["step"])),
            **evaluate(config, graphdef, state, mesh)}
  path = os.path.abspath(output) if output else os.path.join(
      workdir, f"eval_step{result['step']}.json")
  if jax.process_index() == 0:
    _write_result(path, result)
  result["path"] = path
  return result


def _write_result(path: str, result: dict) -> None:
  try:
    with open(path, "w") as f:
      json.dump(result, f, indent=1)
  except OSError as e:
    raise WorkdirError(f"{errors.describe_os_error(e)}; the result was "
                       f"{json.dumps(result)}") from e
