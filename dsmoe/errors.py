"""Expected failures and how each is told to the user: one line.

Every deliberate failure of the library is a :class:`UserError`, whose
message is one line naming the key or path and what to do:

  ConfigError      a config key, flag or setting breaks a rule
  DataError        the data cannot be read, or does not fit the config
  CheckpointError  a checkpoint is missing, unreadable or does not match
  HFFormatError    a HuggingFace checkpoint dsmoe cannot import or export
                   (dsmoe.interop: HFConfigError, SafetensorsError)
  WorkdirError     the workdir is busy, not writable or full

:func:`describe` turns a UserError or an ``OSError`` from the file system
into that line, and returns None for anything else: a bug (a plain
``ValueError``, a shape mismatch in JAX, ...) keeps its traceback.
:mod:`dsmoe.cli` prints the line as ``error: ...``, the last of a script.
``UserError`` is a ``ValueError``, so ``except ValueError`` still catches it.

Messages of TensorStore (under Orbax checkpoints) embed the whole JSON spec
of the array, dozens of lines; :func:`short` keeps the first line and names
the array.
"""

from __future__ import annotations

import contextlib
import errno
import re

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
MAX_CHARS = 1000  # a longer message (from a library) is cut here


class UserError(ValueError):
  """A deliberate failure whose message says what to change (no traceback)."""


class ConfigError(UserError):
  """A config key, command-line flag or setting is invalid."""


class DataError(UserError):
  """The data cannot be read, or does not fit the config."""


class CheckpointError(UserError):
  """A checkpoint is missing, unreadable or does not match the config."""


class HFFormatError(UserError):
  """An HF checkpoint that dsmoe cannot import (names the key or tensor)."""


class WorkdirError(UserError):
  """The workdir cannot be used: another run holds it, or it is not writable."""


def chain(exc: BaseException):
  """`exc` and every exception it was raised from or during (each once)."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__ or exc.__context__


def errno_of(exc: BaseException) -> int | None:
  """The errno of the first OSError in `exc`'s chain, also when TensorStore
  reported it only in its text (``[os_error_code='28']``)."""
  for e in chain(exc):
    if isinstance(e, OSError) and e.errno is not None:
      return e.errno
    m = re.search(r"os_error_code='?(\d+)", str(e))
    if m:
      return int(m.group(1))
    if "No space left on device" in str(e):
      return errno.ENOSPC
  return None


def is_disk_full(exc: BaseException) -> bool:
  return errno_of(exc) in DISK_FULL


def short(exc: BaseException | str) -> str:
  """The first line of a message, without TensorStore's spec and source
  locations, naming the array (``'path': ...``) a TensorStore spec was about."""
  text = str(exc)
  arrays = re.findall(r"'path': '([^']*)'", text)
  first = text.strip().split("\n", 1)[0] if text.strip() else type(exc).__name__
  first = re.split(r"\s*See full TensorStore details", first)[0]
  first = re.sub(r"\s*\[(tensorstore_spec|source locations|os_error_code)=[^\]]*\]", "", first)
  if arrays and arrays[-1].rstrip("/") not in first:
    first = f"{arrays[-1].rstrip('/')}: {first}"
  first = first.rstrip(" .:")
  return first if len(first) <= MAX_CHARS else first[:MAX_CHARS - 3] + "..."


def describe_os_error(exc: OSError) -> str:
  """One line for a file-system error: the path, what happened, what to do."""
  path = exc.filename
  if exc.errno in DISK_FULL:
    where = f" writing {path}" if path is not None else ""
    return (f"disk full: no space left on the device{where}; free some space (or use "
            "another folder) and run again")
  if exc.errno is None or path is None:  # raised with a message of its own
    return short(exc)
  if exc.errno == errno.EROFS:
    return f"cannot write {path}: read-only file system; use a writable folder"
  if exc.errno in (errno.EACCES, errno.EPERM):
    return f"{path}: permission denied; check its owner and mode"
  if exc.errno == errno.ENOENT:
    return f"{path} does not exist"
  return f"{path}: {exc.strerror or short(exc)}"


def describe(exc: BaseException) -> str | None:
  """The one-line message of an expected failure (a UserError, a file-system
  OSError, an interrupt, device memory exhausted); None for anything else."""
  if isinstance(exc, KeyboardInterrupt):
    return "interrupted"
  if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
    return describe_os_error(exc)
  if isinstance(exc, UserError):
    if is_disk_full(exc) and "disk full" not in str(exc):
      return f"disk full: {short(exc)}"
    return short(exc)
  if type(exc).__name__ in ("XlaRuntimeError", "JaxRuntimeError") and \
      "RESOURCE_EXHAUSTED" in str(exc):
    return (f"out of device memory: {short(exc)}; lower train.batch_size or raise "
            "train.grad_accum_steps")
  return None


@contextlib.contextmanager
def closing(close):
  """``with closing(obj.close):`` calls it at the end; after a failure, an
  error of `close` itself is dropped, so it cannot hide the failure."""
  try:
    yield
  except BaseException:
    try:
      close()
    except Exception:  # noqa: BLE001 - the failure being raised says more
      pass
    raise
  close()
