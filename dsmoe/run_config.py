"""How a workdir was made: the config its run trained with, and the versions.

    record(workdir, config) -> [(key, before, now), ...]   # the trainer, at start
    from_json(path) -> ConfigDict
    config_for(config, workdir) -> ConfigDict               # scripts: --config or the saved one

The trainer writes ``<workdir>/config.json`` (the whole config, every key,
as ``ConfigDict.to_json`` gives it) and ``<workdir>/version.json`` (the
dsmoe and JAX versions and, from a git checkout, its commit) when a run
starts; a resumed run whose settings changed (a learning rate, the router:
what does not change a shape) rewrites them, keeps the previous config as
``config.before_step<N>.json`` and returns what changed, which the trainer
prints. The evaluation, generation,
analysis and export scripts read ``config.json`` when given ``--workdir``
alone; an explicit ``--config`` wins, and its differences from the saved
one are reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_collections

from dsmoe import config as config_lib
from dsmoe.errors import ConfigError

CONFIG_FILE = "config.json"
VERSION_FILE = "version.json"
SHOWN = 6  # differences named in one line; the rest are counted


def to_dict(config) -> dict:
  """`config` (ConfigDict or FrozenConfigDict) as the JSON tree it is saved as."""
  return json.loads(config.to_json())


def flat(tree: dict, prefix: str = "") -> dict:
  """{"model.d_model": 128, ...} of a nested dict."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def differences(have: dict, want: dict) -> list[tuple[str, object, object]]:
  """(key, value in `have`, value in `want`) for every key whose value differs."""
  a, b = flat(have), flat(want)
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def describe(diff: list[tuple[str, object, object]]) -> str:
  """"train.learning_rate: 0.003 -> 0.001, ..." (the first SHOWN, then a count)."""
  shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:SHOWN])
  return shown + (f" and {len(diff) - SHOWN} more" if len(diff) > SHOWN else "")


def from_json(path: str) -> ml_collections.ConfigDict:
  """The config a run saved to `path` (keys checked against the schema)."""
  with open(path, encoding="utf-8") as f:
    values = flat(json.load(f))
  config = config_lib.base_config()
  try:
    config.update_from_flattened_dict(values)
  except (KeyError, AttributeError, TypeError) as e:
    raise ConfigError(f"{path}: not a dsmoe config of this version ({e})") from None
  return config


def _write(path: str, tree: dict) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(tree, f, indent=1, sort_keys=True)
  os.replace(tmp, path)  # a reader never sees half a file


def versions() -> dict:
  """dsmoe's and JAX's versions, and the commit of the checkout dsmoe runs from
  (None outside a git checkout)."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  try:
    version = metadata.version("dsmoe")
  except metadata.PackageNotFoundError:
    version = None
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    commit = None
  return {"dsmoe": version, "commit": commit, "jax": jax.__version__,
          "python": sys.version.split()[0]}


def record(workdir: str, config, step: int = 0) -> list[tuple[str, object, object]]:
  """Saves `config` and the versions in `workdir` (a run starting or
  resuming at `step`); returns how `config` differs from the config saved
  there before ([] for a new workdir), which is kept as
  ``config.before_step<step>.json``."""
  want = to_dict(config)
  path = os.path.join(workdir, CONFIG_FILE)
  diff, before = [], None
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      before = json.load(f)
    diff = differences(before, want)
  if diff:
    _write(os.path.join(workdir, f"config.before_step{step}.json"), before)
  if diff or before is None:
    _write(path, want)
  version_path, now = os.path.join(workdir, VERSION_FILE), versions()
  if not os.path.exists(version_path) or _read(version_path) != now:
    _write(version_path, now)  # an unchanged resume touches no file
  return diff


def _read(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def config_for(config, workdir: str | None) -> ml_collections.ConfigDict:
  """`config` (a --config flag's value, or None) or the one saved in
  `workdir`; with both, their differences are reported on stderr."""
  path = os.path.join(workdir, CONFIG_FILE) if workdir else None
  saved = path and os.path.exists(path)
  if config is None:
    if not saved:
      where = f"{path} does not exist" if path else "no --workdir"
      raise ConfigError(f"{where}: give --config, the file the run was trained with")
    return from_json(path)
  if saved:
    with open(path, encoding="utf-8") as f:
      diff = differences(json.load(f), to_dict(config))
    if diff:
      print(f"note: --config differs from {path} (the run's own): {describe(diff)}",
            file=sys.stderr, flush=True)
  return config
