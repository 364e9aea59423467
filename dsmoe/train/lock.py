"""One trainer per workdir: the lock file ``<workdir>/train.lock``.

Process 0 of a run creates the file with ``O_CREAT | O_EXCL`` (atomic: of two
trainers starting at once exactly one succeeds) and writes, in one write,
who holds it: ``{"pid", "host", "started", "boot_ticks", "token"}``. It
removes the file when the run ends, whichever way it ends (not after
``kill -9``). The other processes of the same run never touch the lock:
only process 0 writes metrics, and all of them learn process 0's answer
(:func:`dsmoe.train.preflight.together`), so a second run stops on every
process with the same error.

A lock that exists already:

* same host, and that pid runs a process started at the recorded time: the
  workdir is busy; the trainer stops with one line naming the process;
* same host, and no such process (killed, crashed, rebooted): the lock is
  provably stale and is taken over (one line says so);
* another host: nothing here can prove that process gone, so the trainer
  stops and says which file to delete once the other run is known to be
  gone.

Why ``O_EXCL`` and not ``fcntl``/``flock``: the workdir of a TPU pod or
cluster is often NFS or a bucket mounted with gcsfuse. NFSv3 and later
perform an exclusive create atomically on the server; gcsfuse refuses to
create a file that exists in the bucket, and (since gcsfuse 2.8) the upload
of a file that another machine created meanwhile fails with ESTALE, which
reaches this code at ``fsync``. Byte-range locks, in contrast, are not shared
between machines by gcsfuse and need a lock daemon on NFSv3, and they
vanish silently with the process, so they could not say who holds the
workdir. The cost of a plain file is the stale lock after ``kill -9``, which
the pid check above handles on the same host.

Taking over is itself guarded by a second exclusive file
(``train.lock.takeover``), so of two trainers that both found the same
stale lock only one replaces it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

from dsmoe.errors import WorkdirError

LOCK_FILE = "train.lock"
TAKEOVER_TIMEOUT_S = 60.0  # an older takeover file was left by a killed process


def _start_ticks(pid: int) -> int | None:
  """When process `pid` started (clock ticks since boot, Linux), or None."""
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      stat = f.read().decode("ascii", "replace")
    return int(stat.rsplit(")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
  """Whether process `pid` runs on this host (and started at `start_ticks`,
  when both are known: a reused pid is another process)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # exists, owned by another user
  if start_ticks is not None:
    now = _start_ticks(pid)
    if now is not None and now != start_ticks:
      return False
  return True


def describe_holder(info: dict) -> str:
  return (f"process {info.get('pid')} on host {info.get('host')!r}, started "
          f"{info.get('started', '?')}")


class WorkdirLock:
  """``with WorkdirLock(workdir):`` holds ``<workdir>/train.lock``."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self.info = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                 "boot_ticks": _start_ticks(os.getpid()), "token": uuid.uuid4().hex}
    self.held = False
    self.took_over: dict | None = None

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> bool:
    self.release()
    return False

  def _create(self) -> bool:
    """Creates the lock file holding self.info; False if it exists."""
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    try:
      os.write(fd, (json.dumps(self.info) + "\n").encode())
      os.fsync(fd)  # gcsfuse uploads here; a concurrent creator gets ESTALE
    except OSError:
      os.close(fd)
      raw, _ = self._read()
      if raw is not None and (not raw or self.info["token"] in raw):
        os.remove(self.path)  # ours (empty or complete), never another's
      raise
    os.close(fd)
    return True

  def _read(self) -> tuple[str | None, dict | None]:
    """(raw text, parsed info) of the current lock file; (None, None) if gone."""
    try:
      with open(self.path) as f:
        raw = f.read()
    except FileNotFoundError:
      return None, None
    try:
      info = json.loads(raw)
      return raw, info if isinstance(info, dict) else None
    except ValueError:
      return raw, None

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirError naming its holder."""
    for _ in range(5):
      if self._create():
        self.held = True
        return
      raw, info = self._read()
      if raw is None:
        continue  # released meanwhile: try again
      if info is None:
        raise WorkdirError(
            f"workdir {self.workdir} has an unreadable lock file {self.path}; if no "
            "trainer uses this workdir, delete that file and run again")
      if info.get("host") != self.info["host"]:
        raise WorkdirError(
            f"workdir {self.workdir} is in use by {describe_holder(info)} (lock file "
            f"{self.path}); this host cannot check that process: once you know that "
            "run has ended, delete the lock file and run again")
      if pid_alive(int(info.get("pid", -1)), info.get("boot_ticks")):
        raise WorkdirError(
            f"workdir {self.workdir} is in use by another trainer: "
            f"{describe_holder(info)} (lock file {self.path}); wait for it to end, "
            "stop it, or use another --workdir")
      if self._take_over(raw):
        self.held, self.took_over = True, info
        return
    raise WorkdirError(f"could not take the lock {self.path}: other processes keep "
                       "taking it; is another trainer starting on this workdir?")

  def _take_over(self, stale_raw: str) -> bool:
    """Replaces the stale lock whose text is `stale_raw`; False if it changed."""
    mutex = self.path + ".takeover"
    try:
      fd = os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        if time.time() - os.stat(mutex).st_mtime > TAKEOVER_TIMEOUT_S:
          os.remove(mutex)  # left by a process killed while taking over
      except FileNotFoundError:
        pass
      time.sleep(0.05)
      return False
    os.close(fd)
    try:
      raw, _ = self._read()
      if raw != stale_raw:
        return False  # someone else replaced or removed it: start over
      os.remove(self.path)
      return self._create()
    finally:
      os.remove(mutex)

  def release(self) -> None:
    """Removes the lock file if it is still ours."""
    if not self.held:
      return
    self.held = False
    _, info = self._read()
    if info is not None and info.get("token") == self.info["token"]:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
