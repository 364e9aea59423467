"""SIGTERM / SIGINT: ask the training loop to finish its step, save and exit."""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np


class StopOnSignal:
  """Context manager; ``requested()`` is True once SIGTERM or SIGINT arrived.

  With several processes, ``requested()`` is True on all of them as soon as
  any one got a signal (they must save the same step together).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self._got = None
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    self._got = signal.Signals(signum).name

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc):
    for s, h in self._previous.items():
      signal.signal(s, h)
    return False

  @property
  def signal_name(self) -> str | None:
    return self._got

  def requested(self) -> bool:
    if jax.process_count() == 1:
      return self._got is not None
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array([self._got is not None], np.int32))
    return bool(np.any(flags))
