"""The train state at start-up: restored, started from a params checkpoint, or fresh.

::

    abstract = abstract_state(spec, tx, mesh)   # built once per start, nothing allocated
    graphdef, state, log_interval = init_or_restore(spec, tx, ckpts, mesh, data_iter,
                                                    abstract=abstract)

:class:`AbstractState` is the state's graph definition and its arrays as
ShapeDtypeStructs carrying their shardings on the mesh (dsmoe.parallel.rules):
the one description the loop uses for the free-disk check, as the restore
target, for the initialisation's and the train step's out_shardings, and to
count the model's parameters.

:func:`init_or_restore` is the start-up policy: the latest (or a given)
checkpoint of the workdir (dsmoe.train.checkpoint) if there is one, else the
params of ``train.init_from`` (dsmoe.params_io) with a fresh optimizer
state, else a random initialisation. The state lands in the sharding rules'
layout on the mesh whatever mesh a checkpoint was saved from: Orbax reads
each device's pieces.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from dsmoe import params_io
from dsmoe.errors import CheckpointError
from dsmoe.parallel import rules
from dsmoe.train import checkpoint as checkpoint_lib
from dsmoe.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class AbstractState:
  """(graphdef, train state of ShapeDtypeStructs with their shardings)."""
  graphdef: object
  shapes: dict

  @property
  def shardings(self):
    """The NamedSharding of every leaf (out_shardings of the init and the step)."""
    return jax.tree.map(lambda s: s.sharding, self.shapes)


def abstract_state(spec, tx, mesh) -> AbstractState:
  """The train state of `spec` on `mesh`, traced once, nothing allocated."""
  graphdef, shapes = step_lib.abstract_state(spec, tx)
  return AbstractState(graphdef, rules.with_shardings(shapes, mesh))


def init_or_restore(spec, tx, ckpts, mesh, data_iter, step: int | None = None, *,
                    abstract: AbstractState | None = None):
  """(graphdef, state, log_interval) from checkpoint `step` (default latest) of
  `ckpts`, or a fresh state (log_interval {}): from the params checkpoint
  ``train.init_from`` when set, else random. Restores `data_iter`'s state
  when given. `abstract` (default: built here) is :func:`abstract_state`."""
  abstract = abstract or abstract_state(spec, tx, mesh)
  if step is not None or ckpts.latest_step() is not None:
    state, data = ckpts.restore(abstract.shapes, step)
    if data_iter is not None:
      where = ckpts.path(int(state["step"]))
      data_iter.set_state(checkpoint_lib.data_state_for_this_process(data, where))
    interval = data.get("log_interval", {}) if isinstance(data, dict) else {}
    return abstract.graphdef, state, interval
  if spec.train.init_from:
    return abstract.graphdef, from_params(spec, tx, abstract), {}
  _, state = step_lib.init_sharded(spec, tx, mesh, shardings=abstract.shardings)
  return abstract.graphdef, state, {}


def from_params(spec, tx, abstract: AbstractState):
  """A train state at step 0 whose params come from ``spec.train.init_from``:
  the optimizer state is fresh and the non-parameter variables ("rest") are
  initialised, each in its sharding."""
  path = spec.train.init_from
  if not os.path.isdir(path):
    raise CheckpointError(f"train.init_from={path!r}: no params checkpoint there "
                          "(a folder written by scripts/convert_hf.py, or its params/)")
  path = params_io.params_dir(path)
  params_io.check_matches(path, abstract.shapes["params"])
  params = params_io.restore(path, abstract.shapes["params"])
  shardings = abstract.shardings
  rest = jax.jit(lambda: step_lib.init_state(spec, tx)[1]["rest"],
                 out_shardings=shardings["rest"])()
  opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
  zero = jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=shardings["step"])
  return {"step": zero(), "skipped": zero(), "params": params, "rest": rest,
          "opt_state": opt_state}
