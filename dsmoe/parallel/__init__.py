"""Scaling out: the device mesh, sharding rules, expert parallelism.

  mesh.py     the (data, fsdp, expert) mesh, batch sharding, ambient-mesh queries
  rules.py    parameter name -> PartitionSpec (one table)
  expert.py   routed experts inside jax.shard_map (allgather / all_to_all /
              ragged_all_to_all token exchange)
  local.py    one device's experts on the XLA dropless path (the kernel seam)
  hlo.py      the collectives of compiled HLO text, with bytes per step
              (dsmoe.train.plan compiles a train step without allocating it)

docs/SCALING.md explains the choices.
"""

from dsmoe.parallel import expert, local, mesh, rules

__all__ = ["expert", "local", "mesh", "rules"]
