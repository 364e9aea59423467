"""Orbax checkpoints of the training state and the data-iterator state.

Layout: ``<workdir>/checkpoints/<step>/{state,data}``. "state" is the train
state pytree (dsmoe.train.step), "data" a JSON object: ``{"iterators": [one
data-iterator state per process], "log_interval": the metric sums of the
unfinished logging interval (dsmoe.train.metrics.Interval)}``. Saves are asynchronous; Orbax writes each checkpoint to a
temporary directory and renames it when complete, and deletes an old one
only after a newer one is complete, so the workdir always keeps its last
good checkpoint. Restores check every array's shape and dtype against the
config first and raise one :class:`CheckpointError` naming the checkpoint
and the mismatch. A save that fails (a full disk, ...) raises one
:class:`CheckpointError` too, at the next :meth:`Checkpoints.check`, save or
wait, naming the last good checkpoint, which stays.

The layout's names are dsmoe.params_io's, which reads the params of such a
checkpoint without this module; what a run starts from (this, else
``train.init_from``, else random) is dsmoe.train.state.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from dsmoe import errors
from dsmoe import params_io
from dsmoe.errors import CheckpointError


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def _flat(tree) -> dict[str, object]:
  return {_path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def describe_mismatch(saved_tree, expected_tree) -> str | None:
  """First differences (missing/extra keys, shape, dtype) or None if compatible."""
  saved, expected = _flat(saved_tree), _flat(expected_tree)
  problems = [f"{k}: missing from the checkpoint" for k in expected if k not in saved]
  problems += [f"{k}: in the checkpoint but not in the config's model" for k in saved
               if k not in expected]
  for k, want in expected.items():
    got = saved.get(k)
    if got is None or not hasattr(got, "shape"):
      continue
    if tuple(got.shape) != tuple(want.shape):
      problems.append(f"{k}: checkpoint shape {tuple(got.shape)} != config shape "
                      f"{tuple(want.shape)}")
    elif getattr(got, "dtype", None) is not None and np.dtype(got.dtype) != np.dtype(want.dtype):
      problems.append(f"{k}: checkpoint dtype {got.dtype} != config dtype {want.dtype}")
  if not problems:
    return None
  more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
  return "; ".join(problems[:5]) + more


def _gather_json(obj) -> list:
  """The JSON-able `obj` of every process, in process order (on every process)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  n = multihost_utils.process_allgather(np.array([raw.size], np.int32))
  buf = np.zeros(int(np.max(n)), np.uint8)
  buf[:raw.size] = raw
  allb = multihost_utils.process_allgather(buf)
  return [json.loads(bytes(allb[i, :int(n[i][0])]).decode()) for i in range(len(n))]


class Checkpoints:
  """Save / restore / list checkpoints under ``<workdir>/checkpoints``."""

  def __init__(self, workdir: str, keep: int = 3, *, read_only: bool = False):
    self.directory = params_io.checkpoints_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=True, cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={params_io.STATE: ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})
    self._pending = None  # step of an asynchronous save not yet waited for

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state, log_interval: dict | None = None) -> None:
    """Starts an asynchronous save of `state`, every process's data state and
    the unfinished logging interval.

    Raises CheckpointError if this or the previous save fails (disk full, ...),
    naming the last good checkpoint, which is kept.
    """
    data = {"iterators": _gather_json(data_state), "log_interval": log_interval or {}}
    self.wait()  # a failed previous save is reported as that save's error
    self._pending = step
    try:
      self.manager.save(step, args=ocp.args.Composite(**{
          params_io.STATE: ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data)}),
          force=True)
    except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise anything
      raise self._save_failed(step, e) from e

  def wait(self) -> None:
    """Waits for the asynchronous save; CheckpointError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._save_failed(self._pending, e) from e
    self._pending = None

  def check(self) -> None:
    """Raises CheckpointError at once if an asynchronous save has failed."""
    in_progress = getattr(self.manager, "is_saving_in_progress", None)  # newer Orbax
    if self._pending is not None and in_progress is not None and not in_progress():
      self.wait()

  def _save_failed(self, step: int | None, e: Exception) -> CheckpointError:
    self._pending = None
    where = self.path(step) if step is not None else self.directory
    good = [s for s in self.all_steps() if s != step and os.path.isdir(self.path(s))]
    kept = (f"the last good checkpoint {self.path(max(good))} is kept" if good else
            "there is no earlier checkpoint")
    if errors.is_disk_full(e):
      return CheckpointError(
          f"disk full: saving checkpoint {where} failed, no space left on the device "
          f"of {self.directory}; {kept}. Free some space and run again to resume")
    return CheckpointError(f"saving checkpoint {where} failed: {errors.short(e)}; {kept}")

  def close(self) -> None:
    """Waits for the last save (CheckpointError if it failed), then closes."""
    try:
      self.wait()
    finally:
      self.manager.close()

  def restore(self, abstract_state, step: int | None = None):
    """(state, data) of `step` (default: latest); data as saved by :meth:`save`.

    Raises CheckpointError when the checkpoint is missing, unreadable or its
    arrays do not match `abstract_state` (from the config).
    """
    step = self.latest_step() if step is None else step
    where = self.path(step) if step is not None else self.directory
    if step is None or step not in self.all_steps():
      raise CheckpointError(f"checkpoint {where} does not exist (available steps: "
                            f"{self.all_steps()})")
    try:
      saved = self.manager.item_metadata(step)[params_io.STATE]
    except Exception as e:  # noqa: BLE001 - any unreadable metadata is one error
      raise CheckpointError(f"checkpoint {where} is unreadable (truncated or "
                            f"corrupt?): {errors.short(e)}") from e
    mismatch = describe_mismatch(getattr(saved, "tree", saved), abstract_state)
    if mismatch:
      raise CheckpointError(f"checkpoint {where} does not match the config: {mismatch}")
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**{
          params_io.STATE: ocp.args.StandardRestore(abstract_state),
          "data": ocp.args.JsonRestore()}))
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {where} cannot be restored (truncated or "
                            f"corrupt?): {errors.short(e)}") from e
    return out[params_io.STATE], out["data"]


def data_state_for_this_process(data, where: str):
  """This process's entry of a checkpoint's data-iterator states (same process count)."""
  iterators = data.get("iterators") if isinstance(data, dict) else None
  if not isinstance(iterators, list) or len(iterators) != jax.process_count():
    n = len(iterators) if isinstance(iterators, list) else "?"
    raise CheckpointError(f"checkpoint {where} holds data-iterator states of {n} "
                          f"processes; this run has {jax.process_count()}")
  return iterators[jax.process_index()]

