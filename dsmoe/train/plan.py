"""Compile the real train step for a mesh without allocating anything.

    compile_train_step(config, mesh) -> jax.stages.Compiled
    state_bytes_per_device(abstract_state) -> {"params": bytes, "opt_state": bytes}

The state and the batch are ShapeDtypeStructs carrying their shardings
(dsmoe.parallel.rules), so `jit(...).lower(...).compile()` sees exactly what
training runs, while nothing the size of the model is ever created.
`dsmoe.aot.plan` (`scripts/aot_compile.py`) compiles it for a TPU slice, GPU
hosts or fake CPU devices and reports its memory, kernels and collectives.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dsmoe import config as config_lib
from dsmoe.parallel import mesh as mesh_lib
from dsmoe.train import optimizer as optimizer_lib
from dsmoe.train import state as state_lib
from dsmoe.train import step as step_lib

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")


def abstract_batch(spec, mesh) -> dict:
  """The global batch as ShapeDtypeStructs split over data x fsdp x expert."""
  shape = (spec.train.batch_size, spec.data.seq_len)
  sharding = mesh_lib.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in BATCH_KEYS}


def compile_train_step(config, mesh, abstract: state_lib.AbstractState | None = None):
  """The compiled train step of `config` on `mesh` (nothing allocated);
  `abstract`: the state of :func:`dsmoe.train.state.abstract_state`, if built."""
  spec = config_lib.resolve(config)
  mesh_lib.check_model_fits(spec, mesh)
  tx = optimizer_lib.make_optimizer(spec.train)
  abstract = abstract or state_lib.abstract_state(spec, tx, mesh)
  fn = step_lib.jit_train_step(spec, abstract.graphdef, tx, mesh, abstract.shardings)
  return fn.lower(abstract.shapes, abstract_batch(spec, mesh)).compile()


def state_bytes_per_device(abstract: state_lib.AbstractState) -> dict[str, int]:
  """Bytes of params and optimizer state one device holds under the rules."""
  out = {}
  for part in ("params", "opt_state"):
    total = 0
    for s in jax.tree.leaves(abstract.shapes[part]):
      shard = s.sharding.shard_shape(s.shape)
      total += jnp.dtype(s.dtype).itemsize * math.prod(shard)
    out[part] = total
  return out
