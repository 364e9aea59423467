"""Params-only checkpoints: model weights without optimizer state.

A params checkpoint is an Orbax PyTree checkpoint whose tree is the model's
parameters as a pure dict, with the same paths as ``state["params"]`` of the
train state (``blocks/3/ffn/w_gate_edf``). ``scripts/convert_hf.py`` writes
one (``<dir>/params``); ``train.init_from`` starts a training run from one
(step 0, fresh optimizer state: dsmoe.train.state); the evaluator, the
generator and dsmoe.interop read them. The ``params`` subtree of a training
checkpoint (``<workdir>/checkpoints/<step>/state``, written by
dsmoe.train.checkpoint) is read the same way (:func:`run_checkpoint`).

Nothing here depends on training: inference and conversion use this module
alone.

:func:`save_streaming` writes a tree of :class:`LazyArray` one array at a
time: each is materialised, written and dropped before the next, so the
peak host memory is about the largest array, not the model.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from dsmoe.errors import CheckpointError

# A training run's checkpoints: <workdir>/CHECKPOINTS/<step>/STATE (the train
# state pytree, whose PARAMS subtree holds the parameters).
CHECKPOINTS, STATE, PARAMS = "checkpoints", "state", "params"


@dataclasses.dataclass(frozen=True)
class LazyArray:
  """An array made on demand by ``load()`` (shape and dtype known up front)."""
  shape: tuple[int, ...]
  dtype: np.dtype
  load: Callable[[], np.ndarray]

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))


class _StreamingHandler(ocp.type_handlers.NumpyHandler):
  """Writes LazyArrays in sequence, each materialised just before its write.

  Its type string is the numpy handler's, so the checkpoint reads back with
  Orbax's standard handlers (as numpy or jax arrays).
  """

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.SaveArgs()] * len(values)

    async def write_one_by_one():
      for lazy, info, arg in zip(values, infos, args):
        array = np.ascontiguousarray(lazy.load())
        if array.shape != tuple(lazy.shape) or array.dtype != np.dtype(lazy.dtype):
          raise ValueError(f"{info.name}: made {array.shape} {array.dtype}, expected "
                           f"{tuple(lazy.shape)} {np.dtype(lazy.dtype)}")
        await self._background_serialize([array], [info], [arg])
        del array

    return [ocp.future.CommitFutureAwaitingContractedSignals(
        write_one_by_one(), name="dsmoe_streaming_params")]


def save_streaming(path: str, tree) -> None:
  """Writes a pytree of LazyArrays as an Orbax checkpoint at `path` (must not exist)."""
  registry = ocp.type_handlers.create_type_handler_registry(
      (LazyArray, _StreamingHandler()),
      (jax.Array, ocp.type_handlers.ArrayHandler()))
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
  with ocp.Checkpointer(handler) as ckpt:
    ckpt.save(os.path.abspath(path), args=ocp.args.PyTreeSave(tree))


def _key(path) -> str:
  """"blocks/0/attn/w_q_dnh" for a pytree key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _nest(prefix: tuple, tree):
  for key in reversed(prefix):
    tree = {key: tree}
  return tree


def _unnest(prefix: tuple, tree):
  for key in prefix:
    tree = tree[key]
  return tree


def saved_arrays(path: str, prefix: tuple = ()) -> dict[str, tuple[tuple, np.dtype]]:
  """{"blocks/0/attn/w_q_dnh": (shape, dtype)} of the checkpoint at `path`
  (under `prefix`); CheckpointError when there is none."""
  path = os.path.abspath(path)
  try:
    meta = ocp.PyTreeCheckpointer().metadata(path).item_metadata
  except Exception as e:  # noqa: BLE001 - any unreadable metadata is one error
    raise CheckpointError(f"{path} is not a readable params checkpoint: "
                          f"{type(e).__name__}: {e}") from e
  if meta is None:
    raise CheckpointError(f"{path} is not a params checkpoint (no Orbax metadata there)")
  try:
    tree = _unnest(prefix, getattr(meta, "tree", meta))
  except (KeyError, TypeError):
    raise CheckpointError(f"{path} has no {'/'.join(map(str, prefix))} tree") from None
  return {_key(p): (tuple(m.shape), np.dtype(m.dtype))
          for p, m in jax.tree_util.tree_leaves_with_path(tree)}


def check_matches(path: str, abstract, prefix: tuple = ()) -> None:
  """CheckpointError naming the first differences in names or shapes (the
  dtype may differ: restoring casts)."""
  saved = saved_arrays(path, prefix)
  want = {_key(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
  problems = [f"{k}: missing" for k in want if k not in saved]
  problems += [f"{k}: in the checkpoint but not in the model" for k in saved if k not in want]
  problems += [f"{k}: checkpoint shape {saved[k][0]} != model shape {s}"
               for k, s in want.items() if k in saved and saved[k][0] != s]
  if problems:
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    raise CheckpointError(f"params checkpoint {os.path.abspath(path)} does not match "
                          f"the config's model: {'; '.join(problems[:5])}{more}")


def restore(path: str, abstract, prefix: tuple = ()):
  """The arrays of `abstract` (ShapeDtypeStructs, with shardings for jax
  arrays) from the checkpoint at `path`, cast to their dtypes. `abstract` may
  be a subset of the saved tree (the rest is not read)."""
  path = os.path.abspath(path)
  try:
    out = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=_nest(prefix, abstract),
        restore_args=_nest(prefix, ocp.checkpoint_utils.construct_restore_args(abstract)),
        partial_restore=True))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"params checkpoint {path} cannot be restored (truncated "
                          f"or corrupt?): {type(e).__name__}: {e}") from e
  return _unnest(prefix, out)


def restore_numpy(path: str, keys: list[str], prefix: tuple = ()) -> dict[str, np.ndarray]:
  """Some arrays as host numpy arrays in their saved dtype: {"a/b": array}."""
  item, args = {}, {}
  for key in keys:
    *parents, last = [int(k) if k.isdigit() else k for k in key.split("/")]
    node_i, node_a = item, args
    for p in parents:
      node_i, node_a = node_i.setdefault(p, {}), node_a.setdefault(p, {})
    node_i[last], node_a[last] = 0, ocp.RestoreArgs(restore_type=np.ndarray)
  path = os.path.abspath(path)
  try:
    out = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=_nest(prefix, item), restore_args=_nest(prefix, args), partial_restore=True))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"params checkpoint {path} cannot be restored (truncated "
                          f"or corrupt?): {type(e).__name__}: {e}") from e
  flat = {_key(p): x
          for p, x in jax.tree_util.tree_leaves_with_path(_unnest(prefix, out))}
  return {k: flat[k] for k in keys}


def checkpoints_dir(workdir: str) -> str:
  """The folder of a training run's checkpoints."""
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS)


def run_checkpoint(workdir: str, step: int | None = None) -> tuple[str, tuple]:
  """(path, prefix) of the params of a training run's checkpoint `step`
  (default: the latest)."""
  directory = checkpoints_dir(workdir)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, create=False))
  try:
    steps = list(manager.all_steps())
    step = manager.latest_step() if step is None else step
  finally:
    manager.close()
  if step is None or step not in steps:
    raise CheckpointError(f"no checkpoint {'' if step is None else step} in "
                          f"{directory} (available steps: {steps})")
  return os.path.join(directory, str(step), STATE), (PARAMS,)


def params_dir(path: str) -> str:
  """`path` itself, or its ``params`` subfolder (a converted model folder)."""
  sub = os.path.join(path, PARAMS)
  return sub if os.path.isdir(sub) else path
