"""The device mesh, the batch sharding and the ambient-mesh queries.

The mesh has three axes, outermost first (devices that talk most sit on the
innermost axis, which `jax.make_mesh` lays over the fastest links):

  data    pure data parallelism: weights replicated, gradients all-reduced;
  fsdp    data parallelism with weights and optimizer state sharded (FSDP):
          each layer all-gathers its weights, gradients are reduce-scattered;
  expert  expert parallelism: each device holds num_routed_experts / expert
          routed experts and tokens travel to them (dsmoe.parallel.expert);
          for everything else it acts like `data`.

The batch is split over all three (data x fsdp x expert). Code that needs the
mesh (expert parallelism, activation sharding constraints) reads the ambient
mesh that `jax.set_mesh(mesh)` installs around tracing (`step.py` does), never
a global.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dsmoe.errors import ConfigError
from dsmoe.spec import MESH_AXES

AXES = MESH_AXES  # (data, fsdp, expert), the mesh order


def axis_sizes(mesh_cfg, num_devices: int) -> dict[str, int]:
  """{axis: size} with the one -1 filled in; ConfigError if they do not fit."""
  sizes = {a: int(mesh_cfg[a]) if mesh_cfg is not None else (-1 if a == "data" else 1)
           for a in AXES}
  known = math.prod(v for v in sizes.values() if v > 0)
  free = [a for a, v in sizes.items() if v == -1]
  if free:
    if num_devices % known:
      raise ConfigError(f"config.mesh={sizes} is invalid: {num_devices} devices do not "
                       f"split into mesh.{free[0]} x {known}")
    sizes[free[0]] = num_devices // known
  elif known != num_devices:
    raise ConfigError(f"config.mesh={sizes} is invalid: data x fsdp x expert = {known} "
                     f"but there are {num_devices} devices (set one axis to -1)")
  return sizes


def make_mesh(mesh_cfg=None, devices=None) -> Mesh:
  """The (data, fsdp, expert) mesh over `devices` (default: every device of
  every process), built with `jax.make_mesh` (axes in Auto mode: XLA's
  partitioner places what the sharding rules leave open)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = axis_sizes(mesh_cfg, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES,
                       axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def check_model_fits(spec, mesh) -> None:
  """The expert-parallel rules that depend on the built mesh (mesh.expert
  given as -1; dsmoe.config checks them where the size is known)."""
  expert, moe = dict(mesh.shape).get("expert", 1), spec.model.moe
  if expert > 1 and moe.plan.dispatch != "dropless":
    raise ConfigError(f"config.model.moe.impl={moe.plan.dispatch!r} is invalid: expert "
                      "parallelism (mesh.expert > 1) runs each device's experts with the "
                      "dropless path")
  if expert > 1 and moe.num_routed_experts % expert:
    raise ConfigError(f"config.mesh.expert={expert} is invalid: must divide the "
                      f"{moe.num_routed_experts} routed experts")


def batch_axes(mesh) -> tuple[str, ...]:
  """The mesh axes the batch is split over (those of AXES the mesh has)."""
  return tuple(a for a in AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(batch_axes(mesh)))


def global_batch(batch: dict, mesh: Mesh) -> dict:
  """This process's numpy rows -> global jax.Arrays split over data x fsdp x expert."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def ambient_mesh():
  """The abstract mesh installed by `jax.set_mesh`, or None outside one."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh if mesh is not None and mesh.axis_names else None


def ambient_axis_size(name: str) -> int:
  """Size of axis `name` of the ambient mesh (1 without a mesh or that axis)."""
  mesh = ambient_mesh()
  return dict(mesh.shape).get(name, 1) if mesh is not None else 1


def constrain_batch(x):
  """Keeps an activation [B, ...] split over the batch axes of the ambient mesh,
  so XLA gathers the (FSDP-sharded) weights rather than moving activations."""
  mesh = ambient_mesh()
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(batch_axes(mesh))))


def per_token(fn, *args):
  """fn(*args) on each device's own rows when the ambient mesh splits the batch.

  For per-token work whose batch dimension (axis 0 of every argument and
  result) XLA's partitioner would otherwise gather: it all-gathers the whole
  input of a TopK, for instance.
  """
  mesh = ambient_mesh()
  if mesh is None or mesh.size == 1:
    return fn(*args)
  spec = P(batch_axes(mesh))
  return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec)(*args)
