"""Multi-process start-up: jax.distributed.initialize when asked to."""

from __future__ import annotations

import os

import jax

from dsmoe.errors import ConfigError

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, force: bool = False) -> bool:
  """Calls jax.distributed.initialize if any flag or JAX_* variable is given.

  Flags win over the environment. `force` (no flags) lets JAX auto-detect the
  cluster (Cloud TPU pods, SLURM). On CPU, collectives between processes use
  gloo. Returns True when initialised.
  """
  address = coordinator_address or os.environ.get(ENV[0])
  n = num_processes if num_processes is not None else os.environ.get(ENV[1])
  pid = process_id if process_id is not None else os.environ.get(ENV[2])
  if not (force or address or n is not None or pid is not None):
    return False
  if address or n is not None or pid is not None:
    if not (address and n is not None and pid is not None):
      raise ConfigError("multi-process training needs all three of --coordinator_address, "
                       "--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, "
                       f"JAX_NUM_PROCESSES, JAX_PROCESS_ID); got {address!r}, {n!r}, {pid!r}")
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, ValueError):  # option renamed/removed: JAX's default
    pass
  if address:
    jax.distributed.initialize(coordinator_address=address, num_processes=int(n),
                               process_id=int(pid))
  else:
    jax.distributed.initialize()
  return True
