"""train_and_evaluate(spec, workdir): one training run, top to bottom.

1. the resolved config (a ConfigDict is resolved and validated here, once,
   before anything is traced);
2. claim the workdir: writable, and locked against a second trainer
   (dsmoe.train.lock; process 0);
3. build the mesh (data x fsdp x expert, dsmoe.parallel), the optimizer, the
   abstract train state (once: dsmoe.train.state.AbstractState, for the
   disk check, the restore, the step's shardings and the FLOP count), the
   data iterator, the checkpoint manager, with the checks of
   dsmoe.train.preflight (training and validation data readable, free disk
   for a checkpoint); restore the latest checkpoint of `workdir` (model, optimizer, step,
   data-iterator state, unfinished logging interval; checked against the
   config) onto the mesh's shardings, or initialise sharded (dsmoe.train.state);
4. loop: global batch -> jitted train_step (donated state) -> non-finite
   check -> metrics averaged over the logging interval (jsonl, TensorBoard,
   tqdm) -> checkpoint every `train.checkpoint_every` steps, each only if
   its parameters give a finite loss and gradient; SIGTERM/SIGINT finish the
   step, save, return;
5. save the final checkpoint, evaluate, plot.

Whichever way the run ends, everything it opened (lock, checkpoint manager,
metrics files) is closed, and errors while closing after a failure never
hide that failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from dsmoe import accounting
from dsmoe import config as config_lib
from dsmoe import errors
from dsmoe import run_config
from dsmoe.data import make_loader
from dsmoe.data.evalset import make_eval_set
from dsmoe.errors import ConfigError
from dsmoe.parallel.mesh import check_model_fits, global_batch, make_mesh
from dsmoe.train import checkpoint as checkpoint_lib
from dsmoe.train import metrics as metrics_lib
from dsmoe.train import optimizer as optimizer_lib
from dsmoe.train import preflight
from dsmoe.train import state as state_lib
from dsmoe.train import step as step_lib
from dsmoe.train.evaluation import DOCUMENTS_FILE, evaluate
from dsmoe.train.signals import StopOnSignal


class NonFiniteError(errors.UserError, FloatingPointError):
  """The loss, gradient or parameters became NaN/inf (train.skip_nonfinite
  off), parameters to be saved give a non-finite loss or gradient, or too
  many steps were skipped (train.max_skipped_fraction). Expected (one
  ``error:`` line, naming the last good checkpoint): the run diverged."""


@dataclasses.dataclass
class Run:
  """What the loop needs besides the state and the data iterator."""
  config: object  # dsmoe.spec.Spec
  workdir: str
  mesh: Mesh
  graphdef: object
  tx: object
  ckpts: checkpoint_lib.Checkpoints
  writer: metrics_lib.MetricWriter
  flops_per_token: float
  interval: metrics_lib.Interval
  eval_set: object  # dsmoe.data.evalset.EvalSet, the same for every evaluation
  shardings: object  # of every state leaf (dsmoe.train.state.AbstractState)
  probe_fn: object = None  # jitted dsmoe.train.step.probe_step (at the first save)

  @property
  def main(self) -> bool:
    return jax.process_index() == 0


def _check_batch(config, mesh: Mesh) -> None:
  t = config.train
  per_device = t.batch_size // t.grad_accum_steps
  if t.batch_size % mesh.size or per_device % mesh.size:
    raise ConfigError(f"config.train.batch_size={t.batch_size} is invalid: with "
                     f"train.grad_accum_steps={t.grad_accum_steps}, each micro-batch "
                     f"({per_device}) must split over the {mesh.size} devices")


def _last_good(run: Run) -> str:
  run.ckpts.wait()
  last = run.ckpts.latest_step()
  return run.ckpts.path(last) if last is not None else "none (no checkpoint yet)"


def _nonfinite(run: Run, step: int, m: dict) -> NonFiniteError:
  parts = [name for name, ok in (("loss", np.isfinite(m["loss"])),
                                 ("gradient", np.isfinite(m["grad_norm"])),
                                 ("updated parameters", m["params_finite"])) if not ok]
  what = " and ".join(parts) or "auxiliary loss"
  return NonFiniteError(
      f"non-finite {what} at step {step} (loss={float(m['loss'])}, "
      f"grad_norm={float(m['grad_norm'])}); stopping without saving. Last good "
      f"checkpoint: {_last_good(run)}. Set train.skip_nonfinite=True to skip such updates.")


def _check_skipped(run: Run, step: int, skipped: int) -> None:
  t = run.config.train
  if skipped > t.max_skipped_fraction * t.steps:
    raise NonFiniteError(
        f"{skipped} non-finite steps skipped by step {step}, more than "
        f"train.max_skipped_fraction={t.max_skipped_fraction} of train.steps={t.steps}: "
        f"the run diverges; stopping without saving. Last good checkpoint: "
        f"{_last_good(run)}. Lower train.learning_rate or raise the limit.")


def _save(run: Run, step: int, state, data_iter, batch) -> None:
  """Saves `state` (step `step`) unless saved already, or unless its
  parameters give a non-finite loss or gradient on the step's batch (a
  diverged model is never saved)."""
  if run.ckpts.latest_step() == step:
    return
  if run.probe_fn is None:
    run.probe_fn = step_lib.jit_probe_step(run.config, run.graphdef, run.mesh)
  out = jax.device_get(run.probe_fn(state["params"], state["rest"], batch))
  if not out["finite"]:
    raise NonFiniteError(
        f"the parameters after step {step} give a non-finite loss or gradient on "
        f"that step's batch (loss={float(out['loss'])}, grad_norm="
        f"{float(out['grad_norm'])}): they diverged; not saving them. Last good "
        f"checkpoint: {_last_good(run)}. Lower train.learning_rate.")
  run.writer.sync()
  run.ckpts.save(step, state, data_iter.get_state(), run.interval.state())


def _train(run: Run, state, data_iter, stop: StopOnSignal):
  """The step loop; returns (state, stopped_by_signal)."""
  t = run.config.train
  train_fn = step_lib.jit_train_step(run.config, run.graphdef, run.tx, run.mesh,
                                     run.shardings)
  peak_total = (t.peak_flops or metrics_lib.measure_peak_flops()) * jax.device_count()
  start = int(state["step"])
  clock, tokens = time.perf_counter(), 0.0
  with tqdm(total=t.steps, initial=start, disable=not run.main, dynamic_ncols=True) as bar:
    for step in range(start + 1, t.steps + 1):
      batch = global_batch(next(data_iter), run.mesh)
      state, m = train_fn(state, batch)
      m = jax.device_get(m)
      if not m["finite"]:
        if not t.skip_nonfinite:
          raise _nonfinite(run, step, m)
        _check_skipped(run, step, int(m["skipped"]))
      run.ckpts.check()  # a failed asynchronous save stops the run now
      tokens += float(m["tokens"])
      run.interval.add(m)
      bar.update(1)
      if step % t.log_every == 0 or step == t.steps:
        now = time.perf_counter()
        record = run.interval.summary(step=step, tokens_per_s=tokens / (now - clock),
                                      flops_per_token=run.flops_per_token,
                                      peak_flops_total=peak_total)
        run.writer.write(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        clock, tokens, run.interval = now, 0.0, metrics_lib.Interval()
      if t.eval_every and step % t.eval_every == 0 and step != t.steps:
        t0 = time.perf_counter()
        run.writer.write({"step": step, **evaluate(run.config, run.graphdef, state, run.mesh,
                                                   eval_set=run.eval_set)})
        clock += time.perf_counter() - t0  # tokens/s counts training time only
      if step % t.checkpoint_every == 0 or step == t.steps:
        _save(run, step, state, data_iter, batch)
      if stop.requested():
        _save(run, step, state, data_iter, batch)
        return state, True
  return state, False


def _finish(run: Run, state, stopped: StopOnSignal | None) -> dict:
  """Prints where the run saved, or evaluates and plots at the end."""
  step = int(state["step"])
  if stopped is not None:
    print(f"{stopped.signal_name}: stopped after step {step}; saved checkpoint "
          f"{run.ckpts.path(step)}", flush=True)
    return {"step": step, "stopped": True}
  full = run.config.train.eval_full_at_end
  result = {"step": step, **evaluate(
      run.config, run.graphdef, state, run.mesh, full=full, eval_set=run.eval_set,
      documents_path=os.path.join(run.workdir, DOCUMENTS_FILE) if full else None)}
  if run.main and not run.writer.has_record(step, "eval_loss"):  # not logged twice
    run.writer.write(result)
  if run.main:
    print(f"step {step}: eval loss {result['eval_loss']:.4f} perplexity "
          f"{result['eval_perplexity']:.2f}; checkpoint {run.ckpts.path(step)}", flush=True)
    _plot(run.workdir)
  return {**result, "stopped": False}


def _plot(workdir: str) -> None:
  try:
    from dsmoe.train import plots
  except ImportError as e:
    print(f"no plot ({e}); pip install matplotlib")
    return
  print(f"plot: {plots.plot_run(workdir)}")


def train_and_evaluate(spec, workdir: str) -> dict:
  """Trains `spec` (a dsmoe.spec.Spec from ``dsmoe.resolve``; a ConfigDict is
  resolved here, once) in `workdir`, resuming from its latest checkpoint.

  Returns {"step", "stopped", "eval_loss", "eval_perplexity", ...} and the
  final state under "state".
  """
  spec = config_lib.resolve(spec)
  workdir = os.path.abspath(workdir)
  with contextlib.ExitStack() as stack:
    preflight.claim_workdir(workdir, stack)
    mesh = make_mesh(spec.mesh)
    check_model_fits(spec, mesh)
    _check_batch(spec, mesh)
    tx = optimizer_lib.make_optimizer(spec.train)
    abstract = state_lib.abstract_state(spec, tx, mesh)  # the one abstract model of this run
    fpt = accounting.flops_per_token(spec, params=abstract.shapes["params"])
    data_iter, eval_set = preflight.open_data(spec, make_loader, make_eval_set)
    ckpts = checkpoint_lib.Checkpoints(workdir, spec.train.keep_checkpoints)
    stack.enter_context(errors.closing(ckpts.close))
    preflight.room_for_checkpoint(ckpts.directory, abstract.shapes)  # after Orbax
    # removed unfinished saves
    graphdef, state, interval = state_lib.init_or_restore(spec, tx, ckpts, mesh, data_iter,
                                                          abstract=abstract)
    start = int(state["step"])
    if jax.process_index() == 0 and spec.config is not None:  # after a restore that fit
      changed = run_config.record(workdir, spec.config, start)
      if changed:
        print(f"{'resuming' if start else 'starting'} with settings that differ from the "
              f"workdir's {run_config.CONFIG_FILE} (kept as config.before_step{start}.json): "
              f"{run_config.describe(changed)}", flush=True)
    writer = metrics_lib.MetricWriter(workdir, resume_step=start,
                                      enabled=jax.process_index() == 0)
    stack.enter_context(errors.closing(writer.close))
    run = Run(spec, workdir, mesh, graphdef, tx, ckpts, writer, fpt,
              metrics_lib.Interval(interval), eval_set, abstract.shardings)
    if run.main:
      print(f"{'resuming from step ' + str(start) if start else 'starting'}: "
            f"workdir {workdir}, {jax.device_count()} devices (mesh {dict(mesh.shape)}), "
            f"{jax.process_count()} processes")
    with StopOnSignal() as stop:
      state, stopped = _train(run, state, data_iter, stop)
    ckpts.wait()
    result = _finish(run, state, stop if stopped else None)
  return {**result, "state": state}
