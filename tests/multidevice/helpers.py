"""Shared pieces of the 8-device tests (run by tests/test_parallel.py)."""

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from dsmoe.parallel import mesh as mesh_lib

MESHES = [dict(data=1, fsdp=1, expert=8), dict(data=2, fsdp=1, expert=4),
          dict(data=1, fsdp=2, expert=4), dict(data=4, fsdp=1, expert=2)]


def mesh_id(m):
  return "x".join(f"{k}{v}" for k, v in m.items() if v > 1)


def make_mesh(**axes):
  return mesh_lib.make_mesh(ml_collections.ConfigDict(dict(dict(data=1, fsdp=1, expert=1),
                                                           **axes)))


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name, platform=None):
  """lax.ragged_all_to_all as its docstring defines it, built from all_gather
  (XLA:CPU has no ragged all-to-all; `platform` is ignored): sender j's chunk for this device,
  operand_j[input_offsets_j[me] : + send_sizes_j[me]], lands at
  output_offsets_j[me] of this device's output."""
  del recv_sizes
  me = lax.axis_index(axis_name)
  ops = lax.all_gather(operand, axis_name)  # [X, N, ...]
  in_off, send, out_off = (lax.all_gather(a, axis_name)
                           for a in (input_offsets, send_sizes, output_offsets))  # [X, X]
  start, size = out_off[:, me], send[:, me]  # [X] per sender
  r = jnp.arange(output.shape[0])
  inside = (r[None] >= start[:, None]) & (r[None] < (start + size)[:, None])  # [X, M]
  src = jnp.argmax(inside, axis=0)
  row = jnp.clip(in_off[src, me] + r - start[src], 0, operand.shape[0] - 1)
  mask = inside.any(axis=0).reshape((-1,) + (1,) * (output.ndim - 1))
  return jnp.where(mask, ops[src, row], output)


def put(tree, mesh):
  """`tree` placed with the sharding rules on `mesh`."""
  from dsmoe.parallel import rules
  return jax.device_put(tree, rules.tree_shardings(tree, mesh))
