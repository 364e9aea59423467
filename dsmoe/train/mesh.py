"""The training mesh (data parallel over every device) and global batches.

`config.mesh.data` is -1 (every device) or the device count; the state is
replicated. Expert parallelism (`mesh.expert` > 1) arrives with milestone M6
and is refused by dsmoe.config.validate until then.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(mesh_cfg=None) -> Mesh:
  """One 'data' axis over every device of every process.

  Raises ValueError when `mesh_cfg.data` asks for another number of devices.
  """
  devices = jax.devices()
  want = -1 if mesh_cfg is None else mesh_cfg.data
  if want not in (-1, len(devices)):
    raise ValueError(f"config.mesh.data={want} is invalid: the data axis must span "
                     f"all {len(devices)} devices (set mesh.data=-1)")
  return Mesh(np.array(devices), ("data",))


def global_batch(batch: dict, mesh: Mesh) -> dict:
  """This process's numpy rows -> global jax.Arrays sharded on 'data'."""
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
