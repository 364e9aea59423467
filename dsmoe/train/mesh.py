"""The training mesh (data parallel over every device) and global batches."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh() -> Mesh:
  """One 'data' axis over every device of every process; the state is replicated."""
  return Mesh(np.array(jax.devices()), ("data",))


def global_batch(batch: dict, mesh: Mesh) -> dict:
  """This process's numpy rows -> global jax.Arrays sharded on 'data'."""
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
