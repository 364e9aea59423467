"""The workdir lock (dsmoe/train/lock.py) and the preflight checks
(dsmoe/train/preflight.py), in this process: lock files are written here by
hand, so each case (live holder, dead pid, reused pid, other host, damaged
file, racing takeover) is set up exactly."""

import json
import os
import socket
import subprocess
import sys

import pytest

from dsmoe.errors import WorkdirError
from dsmoe.train import lock as lock_lib
from dsmoe.train import loop, preflight
from tests.helpers import small_config


def _write_lock(workdir, **info):
  path = workdir / lock_lib.LOCK_FILE
  path.write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "started": "then",
                              "boot_ticks": None, "token": "x", **info}))
  return path


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_second_lock_is_refused_naming_the_holder(tmp_path):
  with lock_lib.WorkdirLock(tmp_path) as first:
    info = json.loads((tmp_path / "train.lock").read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    with pytest.raises(WorkdirError, match=rf"in use by another trainer: process "
                       rf"{os.getpid()} on host '{socket.gethostname()}'.*train.lock"):
      lock_lib.WorkdirLock(tmp_path).acquire()
    assert first.held
  assert not (tmp_path / "train.lock").exists()  # released on exit


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
  pid = _dead_pid()
  _write_lock(tmp_path, pid=pid)
  with lock_lib.WorkdirLock(tmp_path) as lock:
    assert lock.took_over["pid"] == pid
    assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
  assert not os.listdir(tmp_path)  # neither the lock nor the takeover file is left


def test_reused_pid_is_not_the_holder(tmp_path):
  """The recorded pid runs, but started at another time: another process."""
  ticks = lock_lib._start_ticks(os.getpid())
  if ticks is None:
    pytest.skip("no /proc: process start times are unknown here")
  _write_lock(tmp_path, pid=os.getpid(), boot_ticks=ticks - 1)
  with lock_lib.WorkdirLock(tmp_path) as lock:
    assert lock.took_over is not None


def test_lock_of_another_host_is_refused_with_how_to_clear_it(tmp_path):
  path = _write_lock(tmp_path, pid=_dead_pid(), host="other-host")
  with pytest.raises(WorkdirError, match=r"other-host.*delete the lock file"):
    lock_lib.WorkdirLock(tmp_path).acquire()
  assert path.exists()


def test_unreadable_lock_is_refused_and_kept(tmp_path):
  path = tmp_path / "train.lock"
  path.write_text("{cut")
  with pytest.raises(WorkdirError, match=r"unreadable lock file .*delete that file"):
    lock_lib.WorkdirLock(tmp_path).acquire()
  assert path.read_text() == "{cut"


def test_two_takeovers_of_one_stale_lock_give_one_holder(tmp_path):
  """B read the stale lock, then A took it over: B's takeover must fail and B
  must see A as the live holder."""
  path = _write_lock(tmp_path, pid=_dead_pid())
  stale = path.read_text()
  a, b = lock_lib.WorkdirLock(tmp_path), lock_lib.WorkdirLock(tmp_path)
  a.acquire()
  assert not b._take_over(stale)
  with pytest.raises(WorkdirError, match="in use by another trainer"):
    b.acquire()
  assert json.loads(path.read_text())["token"] == a.info["token"]
  a.release()


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
  lock = lock_lib.WorkdirLock(tmp_path)
  lock.acquire()
  path = _write_lock(tmp_path, token="someone else")
  lock.release()
  assert path.exists()


def test_trainer_holds_the_lock_while_running_and_releases_it_on_failure(tmp_path,
                                                                         monkeypatch):
  seen = []

  def make_loader(config, split="train", **kw):
    seen.append(json.loads((tmp_path / "train.lock").read_text())["pid"])
    raise ValueError("data.text_dir: stop here")
  monkeypatch.setattr(loop, "make_loader", make_loader)
  with pytest.raises(ValueError, match="stop here"):
    loop.train_and_evaluate(small_config(), tmp_path)
  assert seen == [os.getpid()]
  assert not (tmp_path / "train.lock").exists()


def test_disk_space_check_names_the_sizes(tmp_path, monkeypatch):
  import jax
  import numpy as np
  state = {"w": jax.ShapeDtypeStruct((1024, 1024), np.float32)}  # 4 MB
  assert preflight.state_bytes(state) == 4 << 20
  usage = type("Usage", (), {"free": 3 << 20})
  monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage)
  with pytest.raises(WorkdirError, match=r"not enough free disk space in .*needs about "
                     r"4\.2 MB and 3\.0 MB are free"):
    preflight.check_disk_space(str(tmp_path), state)
  usage.free = 5 << 20
  assert preflight.check_disk_space(str(tmp_path), state) == (4 << 20) + (1 << 18)
