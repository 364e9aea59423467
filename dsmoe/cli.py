"""Running a script: flags, then one clear line for every expected failure.

``dsmoe.cli.run(main)`` replaces ``absl.app.run(main)`` in ``scripts/``. A
bad flag or config key, a missing file, a read-only or full disk, bad data,
a damaged checkpoint... end the process with one last line ``error: ...``
on stderr naming the key or path and what to do, exit status 2 (the flags
cannot be parsed: unknown flag or key, missing config file, unparsable
value) or 1 (anything else), and no traceback. ``--debug`` or
``DSMOE_DEBUG=1`` also prints the traceback. An exception that is not an
expected failure (a bug) keeps its traceback.

While the script runs, reports from background threads (Orbax and
TensorStore log their failed writes and reads there, with tracebacks) are
held back: after an expected failure they are dropped, since the error line
says what happened; after a success or a bug they are printed at the end.
After the error line the process leaves with ``os._exit``, so the
interpreter's shutdown cannot print more (abandoned Orbax coroutines
"Exception ignored in ..."); the script's `main` has closed what it opened
by then.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import threading
import traceback

from absl import app, flags

from dsmoe import errors

flags.DEFINE_boolean("debug", False, "On an error, also print the traceback "
                     "(or set DSMOE_DEBUG=1).")
FLAGS = flags.FLAGS
DEBUG_ENV = "DSMOE_DEBUG"
USAGE_EXIT, ERROR_EXIT = 2, 1


def debug_requested(argv=()) -> bool:
  """--debug on the command line (parsed or not yet) or DSMOE_DEBUG=1."""
  if os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no"):
    return True
  if FLAGS.is_parsed():
    return FLAGS.debug
  return any(a in ("--debug", "--debug=true", "--debug=True", "--debug=1") for a in argv)


def fail(message: str, *, code: int = ERROR_EXIT, exc: BaseException | None = None,
         debug: bool = False) -> None:
  """Prints ``error: message`` as the last line and ends the process."""
  if debug and exc is not None:
    traceback.print_exception(exc)
  message = " ".join(str(message).split("\n"))
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  for handler in logging.getLogger().handlers:
    handler.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  if debug:
    sys.exit(code)
  os._exit(code)  # pylint: disable=protected-access


def run(main) -> None:
  """``absl.app.run(main)`` with the flag and failure handling above."""
  app.run(_guarded(main), flags_parser=_parse_flags)


def _parse_flags(argv):
  try:
    return FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - absl, config_flags and config files raise anything
    fail(usage_message(argv, e), code=USAGE_EXIT, exc=e, debug=debug_requested(argv))


def _guarded(main):
  def guarded_main(argv):
    debug = debug_requested(argv)
    held = None if debug else HeldReports().install()
    try:
      main(argv)
    except SystemExit:
      raise
    except BaseException as e:  # noqa: BLE001
      message = errors.describe(e)
      if message is None:  # a bug: keep its traceback (and what was held)
        if held:
          held.release()
        raise
      fail(message, exc=e, debug=debug)
    if held:
      held.release()
  return guarded_main


# ---------------------------------------------------------------- flags


def flag_value(argv, name: str) -> str | None:
  """The value of --name=V or --name V in `argv` (the last one), else None."""
  value = None
  for i, a in enumerate(argv[1:], 1):
    if a.startswith(f"--{name}="):
      value = a.split("=", 1)[1]
    elif a == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def config_keys(config, prefix: str = "") -> list[str]:
  """Every leaf key of a ConfigDict as a dotted path."""
  out = []
  for k, v in config.items():
    if hasattr(v, "items") and not isinstance(v, str):
      out += config_keys(v, f"{prefix}{k}.")
    else:
      out.append(f"{prefix}{k}")
  return out


def _has_key(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "items") or part not in node:
      return False
    node = node[part]
  return True


def closest_key(key: str, keys: list[str]) -> str | None:
  """The valid key closest to a mistyped one (whole dotted path alike, and the
  last part alike too: a shared prefix alone is no match), or None."""
  leaf = key.rsplit(".", 1)[-1]
  for cand in difflib.get_close_matches(key, keys, n=5, cutoff=0.6):
    if difflib.SequenceMatcher(None, leaf, cand.rsplit(".", 1)[-1]).ratio() >= 0.5:
      return cand
  return None


def config_problem(argv, name: str = "config") -> str | None:
  """What is wrong with --<name> and its --<name>.key overrides, if anything:
  a missing or broken config file, or an unknown key (with the closest one)."""
  value = flag_value(argv, name)
  if value is None:
    return None
  path, _, arg = value.partition(":")
  if not os.path.isfile(path):
    return f"--{name}: config file {path!r} does not exist"
  from dsmoe import config as config_lib  # pylint: disable=g-import-not-at-top
  try:
    config = config_lib.load(path, arg or None)
  except Exception as e:  # noqa: BLE001 - any error in the user's file
    return f"--{name}: cannot load {path}: {type(e).__name__}: {errors.short(e)}"
  keys = config_keys(config)
  for a in argv[1:]:
    m = re.match(rf"--(?:no)?{re.escape(name)}\.([^=\s]+)", a)
    if m and not _has_key(config, m.group(1)):
      key = m.group(1)
      close = closest_key(key, keys)
      hint = (f"did you mean {name}.{close}?" if close else
              f"the keys are in {path} and dsmoe/config.py")
      return f"--{name}.{key}: unknown config key {name}.{key} ({hint})"
  return None


def usage_message(argv, exc: BaseException) -> str:
  """One line for a command-line error raised while parsing `argv`."""
  problem = config_problem(argv)
  if problem:
    return problem
  text = errors.short(exc)
  m = re.search(r"Flag --(\S+) must have a value other than None", text)
  if m:
    return f"--{m.group(1)} is required"
  m = re.search(r"Unknown command line flag '([^']+)'(?:\. Did you mean: (\S+) \?)?", text)
  if m:
    hint = f" (did you mean --{m.group(2)}?)" if m.group(2) else " (see --helpfull)"
    return f"unknown flag --{m.group(1)}{hint}"
  return text


# ------------------------------------------------- background thread reports


class HeldReports:
  """Holds back what background threads report while the script runs.

  Uncaught exceptions of threads (``threading.excepthook``), errors printed
  by C callbacks (``sys.excepthook``), "Exception ignored" reports
  (``sys.unraisablehook``) and ERROR log records of Orbax and TensorStore
  are kept as text; :meth:`release` prints them and restores the hooks.
  """

  LIBRARIES = ("orbax", "tensorstore")
  MAX = 200

  def __init__(self):
    self.texts: list[str] = []
    self._lock = threading.Lock()
    self._saved = None
    self._filter = _HoldFilter(self)

  def _add(self, text: str) -> None:
    with self._lock:
      if len(self.texts) < self.MAX:
        self.texts.append(text)

  def install(self) -> "HeldReports":
    self._saved = (sys.excepthook, threading.excepthook, sys.unraisablehook)
    sys.excepthook = lambda t, v, tb: self._add("".join(traceback.format_exception(t, v, tb)))
    threading.excepthook = lambda a: self._add(
        f"Exception in thread {getattr(a.thread, 'name', '?')}:\n"
        + "".join(traceback.format_exception(a.exc_type, a.exc_value, a.exc_traceback)))
    sys.unraisablehook = lambda u: self._add(
        f"{u.err_msg or 'Exception ignored in'}: {u.object!r}\n"
        + "".join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))
    for handler in logging.getLogger().handlers:
      handler.addFilter(self._filter)
    return self

  def release(self) -> None:
    """Restores the hooks and prints what was held."""
    if self._saved is None:
      return
    sys.excepthook, threading.excepthook, sys.unraisablehook = self._saved
    self._saved = None
    for handler in logging.getLogger().handlers:
      handler.removeFilter(self._filter)
    for text in self.texts:
      print(text.rstrip("\n"), file=sys.stderr)
    self.texts = []


class _HoldFilter(logging.Filter):
  """Holds ERROR records of the libraries in HeldReports.LIBRARIES."""

  def __init__(self, held: HeldReports):
    super().__init__()
    self.held = held

  def filter(self, record: logging.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, "/")
    if record.levelno >= logging.ERROR and any(f"/{lib}/" in path
                                               for lib in HeldReports.LIBRARIES):
      text = logging.Formatter("%(levelname)s %(name)s %(filename)s:%(lineno)d] "
                               "%(message)s").format(record)
      self.held._add(text)  # pylint: disable=protected-access
      return False
    return True
