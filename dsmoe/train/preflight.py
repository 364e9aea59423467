"""Checks made before the first training step, so a run fails in seconds
instead of after hours: the workdir is writable (and locked: dsmoe.train.lock)
and has room for one more checkpoint, and the training and validation data
can be read. With several processes each check runs on every process (or
process 0) and all of them fail together (:func:`together`).

(The config is validated by :func:`dsmoe.config.resolve`, once, and a
checkpoint is checked against it by :meth:`dsmoe.train.checkpoint.Checkpoints.restore`,
both also before the first step.) Each check raises one error naming the
path or key and what to do.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

import jax
import numpy as np

from dsmoe import errors
from dsmoe.errors import WorkdirError
from dsmoe.train import lock as lock_lib

MB = 1 << 20
CHECKPOINT_OVERHEAD_BYTES = MB // 4  # metadata files of a checkpoint (generous)


def check_writable(folder: str, *, what: str = "workdir",
                   hint: str = "use another --workdir") -> None:
  """Creates `folder` if needed and writes (then removes) a small file in it."""
  try:
    os.makedirs(folder, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".dsmoe_write_test_")
    try:
      os.write(fd, b"dsmoe")
    finally:
      os.close(fd)
      os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"{what} {folder} is not writable ({_reason(e)}); {hint}") from e


def _reason(e: OSError) -> str:
  if e.errno in errors.DISK_FULL:
    return "the disk is full"
  if e.errno == errno.EROFS:
    return "read-only file system"
  if e.errno in (errno.EACCES, errno.EPERM):
    return "permission denied"
  return e.strerror or str(e)


def state_bytes(abstract_state) -> int:
  """Bytes of every array of a (ShapeDtypeStruct) train state."""
  return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(abstract_state)))


def check_disk_space(folder: str, abstract_state) -> int:
  """Raises WorkdirError unless `folder` has room for one more checkpoint
  (the state's bytes, uncompressed, plus metadata); returns that size."""
  need = state_bytes(abstract_state) + CHECKPOINT_OVERHEAD_BYTES
  free = shutil.disk_usage(folder).free
  if free < need:
    raise WorkdirError(
        f"not enough free disk space in {folder} for a checkpoint: it needs about "
        f"{need / MB:.1f} MB and {free / MB:.1f} MB are free; free some space or use "
        "another --workdir")
  return need


def claim_workdir(workdir: str, stack) -> None:
  """Process 0 checks that `workdir` is writable and locks it (released when
  the contextlib.ExitStack `stack` closes); every process fails if that fails."""
  def claim():
    if jax.process_index() != 0:
      return
    check_writable(workdir)
    lock = stack.enter_context(lock_lib.WorkdirLock(workdir))
    if lock.took_over:
      print(f"took over the lock of {lock_lib.describe_holder(lock.took_over)}, "
            "which no longer runs", flush=True)
  together(claim, f"claiming workdir {workdir}")


def room_for_checkpoint(folder: str, abstract_state) -> None:
  """:func:`check_disk_space` on process 0 for `abstract_state`."""
  def check():
    if jax.process_index() == 0:
      check_disk_space(folder, abstract_state)
  together(check, "checking free disk space")


def _reading(split: str, config, fn):
  """``fn()``; unexpected errors (of the readers: array_record, grain, TFDS)
  become one DataError naming the split and source."""
  d = config.data
  source = f"data.tfds_name={d.tfds_name!r}" if d.tfds_name else (
      f"data.text_dir={d.text_dir!r}" if d.text_dir else "the default corpus")
  try:
    return fn()
  except (errors.UserError, OSError):
    raise
  except Exception as e:  # noqa: BLE001 - array_record and grain raise anything
    raise errors.DataError(f"{source}: reading the {split!r} split failed: {type(e).__name__}: "
                     f"{errors.short(e)}; if it comes from the cache in data.data_dir="
                     f"{d.data_dir!r}, delete that dataset's folder to rebuild it") from e


def check_train_data(config, train_iter) -> None:
  """Reads one training batch from `train_iter`, then rewinds it."""
  state = train_iter.get_state()
  _reading("train", config, lambda: next(train_iter))
  train_iter.set_state(state)


def open_data(config, make_loader, make_eval_set):
  """(training iterator, evaluation set): ``iter(make_loader(config, "train"))``
  after reading one batch, and the evaluation set built from the validation
  split (dsmoe.data.evalset), so unreadable data fails before the first step."""
  def open_and_check():
    data_iter = iter(make_loader(config, "train"))
    check_train_data(config, data_iter)
    return data_iter, _reading("validation", config, lambda: make_eval_set(config))
  return together(open_and_check, "reading the data")


def together(fn, what: str):
  """Runs ``fn()`` on every process; if it raises on any, all of them raise
  (the failing one its own error), so no process waits forever for another."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  error, out = None, None
  try:
    out = fn()
  except Exception as e:  # noqa: BLE001 - re-raised below
    error = e
  failed = np.asarray(multihost_utils.process_allgather(
      np.array([error is not None], np.int32))).reshape(-1)
  if error is not None:
    raise error
  if failed.any():
    raise WorkdirError(f"{what} failed on process {int(np.argmax(failed))}; its log "
                       "says why")
  return out
