"""Every expected failure of scripts/train.py and scripts/evaluate.py, run as a
process the way a user meets it: the exit status is not 0, the last line of
the output (stdout and stderr together, in order) is the one ``error: ...``
line naming the key or path, there is no traceback, and nothing in the
workdir was lost or changed (every file compared by hash before and after).

Most cases stop before anything is compiled, so each costs a few seconds;
one small reference run (2 steps) is shared, and the bad-data cases run side
by side. The disk cases mount a small tmpfs (skipped, with the reason, where
mounting is not allowed).
"""

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from dsmoe.train import checkpoint
from tests.helpers import ROOT, script_cmd, script_env, selected_params

RUN = {"train.steps": 2, "train.checkpoint_every": 1}


def _run(cmd, env=None, timeout=300):
  return subprocess.run(cmd, cwd=ROOT, env=script_env(**(env or {})), stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, timeout=timeout)


def _start(cmd):
  """`cmd` started as _run runs it; _finish waits for it."""
  return subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=300):
  try:
    stdout, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout)


def _error(res, *needles, code=1) -> str:
  """The one error line of a failed run; checks status, position, no traceback."""
  out = res.stdout
  assert res.returncode == code, out[-3000:]
  lines = out.rstrip("\n").split("\n")
  assert lines[-1].startswith("error: "), out[-3000:]
  assert sum(line.startswith("error: ") for line in lines) == 1, out[-3000:]
  assert "Traceback" not in out and "Exception ignored" not in out, out[-3000:]
  for needle in needles:
    assert needle in lines[-1], lines[-1]
  return lines[-1]


def _snapshot(folder) -> dict:
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A finished 2-step run with checkpoints 1 and 2."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  res = _run(script_cmd("train.py", workdir, RUN))
  assert res.returncode == 0, res.stdout[-3000:]
  return workdir


@pytest.fixture
def workdir(reference, tmp_path):
  """A copy of the reference run; the test checks it is unchanged after."""
  copy = tmp_path / "run"
  shutil.copytree(reference, copy)
  before = _snapshot(copy)
  yield copy
  assert _snapshot(copy) == before


# ---------------------------------------------------------------- command line


@pytest.mark.parametrize("args,needles", [
    (["--config.train.setps=3"], ["--config.train.setps: unknown config key "
                                  "config.train.setps (did you mean config.train.steps?)"]),
    (["--config.modle.moe.top_k=2"], ["unknown config key config.modle.moe.top_k (did you "
                                      "mean config.model.moe.top_k?)"]),
    (["--config.train.foo=3"], ["unknown config key config.train.foo (the keys are in"]),
    (["--config.train.steps=abc"], ["--config.train.steps=abc", "invalid literal"]),
    (["--config=/nope/cfg.py"], ["--config: config file '/nope/cfg.py' does not exist"]),
    (["--wrokdir=x"], ["unknown flag --wrokdir (did you mean --workdir?)"]),
], ids=["typo_in_key", "typo_in_parent", "unknown_key", "bad_value", "missing_config_file",
        "unknown_flag"])
def test_command_line_mistake_is_one_line(tmp_path, args, needles):
  res = _run(script_cmd("train.py", tmp_path / "run", RUN, *args))
  _error(res, *needles, code=2)
  assert not (tmp_path / "run").exists()


def test_missing_workdir_flag(tmp_path):
  cmd = [c for c in script_cmd("evaluate.py", tmp_path, RUN) if not c.startswith("--workdir")]
  _error(_run(cmd), "--workdir is required", code=2)


# A script run through dsmoe.cli whose main either hits a bug in library code
# (arrays of the wrong shape reach dsmoe.train.step: JAX raises a plain
# ValueError) or raises a deliberate ConfigError.
BUG_OR_MISTAKE = """
import jax.numpy as jnp
from dsmoe import cli
from dsmoe.errors import ConfigError
from dsmoe.train import step

def main(argv):
  if argv[1] == "bug":
    step.cross_entropy(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4)))
  elif argv[1] == "plain":
    raise ValueError("a plain ValueError is a bug, not a mistake of the user")
  raise ConfigError("config.train.steps=-1 is invalid: must be a positive number")

cli.run(main)
"""


def test_a_bug_keeps_its_traceback_and_a_config_error_is_one_line(tmp_path):
  script = tmp_path / "script.py"
  script.write_text(BUG_OR_MISTAKE)
  bug = _run([sys.executable, str(script), "bug"])
  assert bug.returncode == 1, bug.stdout[-3000:]
  assert "Traceback" in bug.stdout and "Incompatible shapes" in bug.stdout, bug.stdout[-3000:]
  assert f"{os.sep}dsmoe{os.sep}train{os.sep}step.py\", line " in bug.stdout  # file and line
  assert not any(line.startswith("error: ") for line in bug.stdout.split("\n"))
  plain = _run([sys.executable, str(script), "plain"])
  assert plain.returncode == 1 and "Traceback" in plain.stdout, plain.stdout[-3000:]
  assert plain.stdout.rstrip("\n").split("\n")[-1] == (
      "ValueError: a plain ValueError is a bug, not a mistake of the user")
  _error(_run([sys.executable, str(script), "mistake"]),
         "error: config.train.steps=-1 is invalid: must be a positive number")


def test_describe_knows_only_user_errors_and_file_system_errors():
  import errno  # pylint: disable=g-import-not-at-top
  from dsmoe import errors  # pylint: disable=g-import-not-at-top
  for cls in (errors.ConfigError, errors.DataError, errors.CheckpointError,
              errors.HFFormatError, errors.WorkdirError):
    assert issubclass(cls, errors.UserError) and issubclass(cls, ValueError)
    assert errors.describe(cls("the key: what to do")) == "the key: what to do"
  assert errors.describe(OSError(errno.ENOENT, "No such file", "/x")) == "/x does not exist"
  for bug in (ValueError("Size of label 'b' for operand 1 (4) does not match"),
              TypeError("x"), FloatingPointError("nan"), KeyError("k")):
    assert errors.describe(bug) is None


def test_invalid_config_value_is_one_line(tmp_path):
  _error(_run(script_cmd("train.py", tmp_path / "run", {**RUN, "train.steps": -1})),
         "config.train.steps=-1 is invalid: must be a positive number")
  assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- data


def _broken_link_dir(tmp_path):
  (tmp_path / "text").mkdir()
  os.symlink(tmp_path / "gone.txt", tmp_path / "text" / "notes.txt")
  return {"data.text_dir": tmp_path / "text"}


def _text_without_validation(tmp_path):
  (tmp_path / "text").mkdir()
  for i in range(20):
    (tmp_path / "text" / f"{i}.txt").write_text(f"document {i} " * 50)
  return {"data.text_dir": tmp_path / "text", "data.validation_percent": 0.0}


def _damaged_validation_shard(tmp_path):
  """A built cache whose validation shard has its bytes scrambled (same size,
  so only reading it can tell)."""
  overrides = {"data.text_dir": tmp_path / "text", "data.validation_percent": 50.0}
  (tmp_path / "text").mkdir()
  for i in range(20):
    (tmp_path / "text" / f"{i}.txt").write_text(f"document {i} " * 50)
  from dsmoe.data.local_text import local_text_builder
  builder = local_text_builder(str(tmp_path / "text"), str(tmp_path / "tfds"),
                               validation_percent=50.0)
  shard = [f for f in os.listdir(builder.data_dir) if "-validation." in f][0]
  path = os.path.join(builder.data_dir, shard)
  raw = bytearray(open(path, "rb").read())
  raw[64:-64] = bytes(len(raw) - 128)
  open(path, "wb").write(bytes(raw))
  return overrides


# case: (make(folder) -> the data overrides, needles of the error line)
BAD_DATA = {
    "missing_text_dir": (lambda t: {"data.text_dir": t / "nope"},
                         ["data.text_dir: directory", "nope", "does not exist"]),
    "empty_text_dir": (lambda t: (t / "empty").mkdir() or {"data.text_dir": t / "empty"},
                       ["is empty"]),
    "only_a_broken_link": (_broken_link_dir, ["skipped (1 unreadable (e.g. 'notes.txt'"]),
    "unprepared_tfds": (lambda t: {"data.tfds_name": "tiny_shakespeare"}, [
        "data.tfds_name='tiny_shakespeare' is not prepared", "download_and_prepare"]),
    "no_validation_split": (_text_without_validation,
                            ["has no split 'validation'", "data.validation_percent"]),
    "damaged_validation_shard": (_damaged_validation_shard, [
        "the 'validation' split of", "cannot be read (Corrupted",
        "delete that folder to build it again"]),
}


@pytest.fixture(scope="module")
def bad_data_runs(request, reference, tmp_path_factory):
  """train.py on a copy of the reference run, for every selected case of
  test_bad_data_stops_before_the_first_step, all started at once:
  {case: (workdir, its snapshot before, the finished run)}."""
  started = {}
  for case in selected_params(request, "test_bad_data_stops_before_the_first_step", "case"):
    folder = tmp_path_factory.mktemp(case)
    workdir = folder / "run"
    shutil.copytree(reference, workdir)
    overrides = {**RUN, "train.steps": 4, "data.tokenizer": "bytes",
                 "data.data_dir": folder / "tfds", **BAD_DATA[case][0](folder)}
    started[case] = (workdir, _snapshot(workdir),
                     _start(script_cmd("train.py", workdir, overrides)))
  return {case: (workdir, before, _finish(proc))
          for case, (workdir, before, proc) in started.items()}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_stops_before_the_first_step(bad_data_runs, case):
  workdir, before, res = bad_data_runs[case]
  _error(res, *BAD_DATA[case][1])
  assert _snapshot(workdir) == before


def test_debug_shows_the_traceback(tmp_path):
  res = _run(script_cmd("train.py", tmp_path / "run", {**RUN, "data.text_dir": tmp_path / "nope"}),
             env={"DSMOE_DEBUG": "1"})
  assert res.returncode == 1 and "Traceback" in res.stdout
  assert res.stdout.rstrip("\n").split("\n")[-1].startswith("error: data.text_dir")


# ---------------------------------------------------------------- workdir


def test_checkpoint_of_another_model_is_one_line(workdir):
  _error(_run(script_cmd("train.py", workdir, {**RUN, "train.steps": 4, "model.d_model": 48})),
         f"checkpoint {workdir}/checkpoints/2 does not match the config",
         "checkpoint shape (", "!= config shape (")


def test_second_trainer_on_a_busy_workdir_is_refused(workdir):
  """Another process holds the workdir (through the library, as a trainer
  does): the trainer stops at once naming it, and changes nothing."""
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom dsmoe.train.lock import WorkdirLock\n"
       f"with WorkdirLock({str(workdir)!r}):\n  print('locked', flush=True)\n"
       "  sys.stdin.read()"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
      text=True)
  try:
    assert holder.stdout.readline() == "locked\n"
    lock_file = (workdir / "train.lock").read_text()
    t0 = time.time()
    _error(_run(script_cmd("train.py", workdir, {**RUN, "train.steps": 4})),
           f"workdir {workdir} is in use by another trainer: process {holder.pid} on host",
           f"lock file {workdir}/train.lock")
    assert time.time() - t0 < 120  # refused at start-up, not after training
    assert (workdir / "train.lock").read_text() == lock_file
  finally:
    holder.communicate("", timeout=60)
  assert not (workdir / "train.lock").exists()


@contextlib.contextmanager
def _tmpfs(path, size):
  path.mkdir()
  res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
  if res.returncode:
    pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def _read_only_copy(reference, tmp_path):
  """A copy of `reference` in a folder nobody may write to: a tmpfs mounted
  read-only (as root), or a folder without write permission (otherwise)."""
  if os.geteuid() != 0:
    copy = tmp_path / "ro" / "run"
    shutil.copytree(reference, copy)
    for p in [copy, *copy.rglob("*")]:
      p.chmod(p.stat().st_mode & 0o555)
    try:
      yield copy
    finally:
      for p in [copy, *copy.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    return
  with _tmpfs(tmp_path / "ro", "20m") as mount:
    shutil.copytree(reference, mount / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    yield mount / "run"


def test_read_only_workdir(reference, tmp_path):
  """train.py refuses at once; evaluate.py refuses before computing, and with
  --output elsewhere writes its result there."""
  with _read_only_copy(reference, tmp_path) as ro:
    before = _snapshot(ro)
    _error(_run(script_cmd("train.py", ro, {**RUN, "train.steps": 4})),
           f"workdir {ro} is not writable (read-only file system", "use another --workdir")
    _error(_run(script_cmd("evaluate.py", ro, RUN)),
           f"output folder {ro} is not writable", "--output=PATH")
    out = tmp_path / "eval.json"
    res = _run(script_cmd("evaluate.py", ro, RUN, f"--output={out}"))
    assert res.returncode == 0, res.stdout[-3000:]
    assert f"written to {out}" in res.stdout and '"step": 2' in out.read_text()
    assert _snapshot(ro) == before


def test_no_room_for_a_checkpoint_stops_before_the_first_step(tmp_path):
  with _tmpfs(tmp_path / "small", "1m") as disk:
    _error(_run(script_cmd("train.py", disk / "run", RUN)),
           f"not enough free disk space in {disk}/run/checkpoints for a checkpoint")
    assert not (disk / "run" / "metrics.jsonl").exists()


def test_disk_full_during_a_save_says_so_once_and_keeps_the_last_checkpoint(tmp_path):
  """3 MB hold the first checkpoint (1.8 MB) but not the second."""
  with _tmpfs(tmp_path / "disk", "3m") as disk:
    run = disk / "run"
    res = _run(script_cmd("train.py", run, RUN))
    _error(res, f"disk full: saving checkpoint {run}/checkpoints/2 failed",
           f"the last good checkpoint {run}/checkpoints/1 is kept")
    text = res.stdout.lower()
    assert text.count("disk full") == 1 and "no space left on device" not in text
    assert checkpoint.Checkpoints(run, read_only=True).all_steps() == [1]
    with open(run / "metrics.jsonl") as f:
      assert [json.loads(line)["step"] for line in f] == [1, 2]
    assert not (run / "train.lock").exists()

