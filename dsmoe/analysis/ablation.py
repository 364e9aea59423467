"""A resumable grid of ablation runs: variants x seeds, one workdir each.

::

    <root>/<variant>/seed<k>/          one training run (dsmoe.train), with
        config.json                    the exact config it trains (checked on resume)
        checkpoints/, metrics.jsonl    the trainer's own files
        run.json                       written when the run has finished: the
                                       row of results.csv plus its loss curves

:func:`run_grid` trains every (variant, seed) whose ``run.json`` is missing:
a finished run is skipped, an interrupted one resumes from its latest
checkpoint (the trainer resumes any workdir). Seeds are the outer loop, so
the first seeds of every variant finish first. :mod:`dsmoe.analysis.report`
turns the ``run.json`` files into results.csv, a markdown table and plots.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Iterable

import ml_collections

from dsmoe import accounting
from dsmoe import config as config_lib
from dsmoe import run_config
from dsmoe.errors import ConfigError, WorkdirError
from dsmoe.train import metrics as metrics_lib
from dsmoe.train.evaluation import DOCUMENTS_FILE

RUN_FILE = "run.json"


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of the grid."""
  variant: str
  seed: int

  def workdir(self, root: str) -> str:
    return os.path.join(root, self.variant, f"seed{self.seed}")


def grid(variants: Iterable[str], seeds: Iterable[int]) -> list[Cell]:
  """Seed-major order: every variant's seed 0, then every variant's seed 1, ..."""
  return [Cell(v, s) for s in seeds for v in variants]


def variant_config(config_file: str, variant: str, seed: int,
                   overrides: dict | None = None) -> ml_collections.ConfigDict:
  """`config_file`'s variant, with `overrides` ({"train.steps": 2000, ...}) and the seed."""
  config = config_lib.load(config_file, variant)
  if overrides:
    config.update_from_flattened_dict(dict(overrides))
  config.train.seed = seed
  config_lib.validate(config)
  return config


def _check_same_config(workdir: str, config) -> None:
  """Refuses to resume a workdir that holds a run of another config."""
  path = os.path.join(workdir, run_config.CONFIG_FILE)
  want = run_config.to_dict(config)
  if not os.path.exists(path):
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(want, f, indent=1, sort_keys=True)
    return
  with open(path) as f:
    diff = run_config.differences(json.load(f), want)
  if diff:
    shown = run_config.describe(diff[:4])
    raise WorkdirError(f"{workdir} holds a run of another config ({shown}); resume "
                     "it with the same flags, or use another --workdir")


def curves(records: list[dict]) -> dict:
  """Loss curves of a metrics.jsonl: training loss per logged interval, the
  fixed-subset evaluation during training, and the final full evaluation."""
  train = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r and not r.get("eval_full")]
  return {"step": [r["step"] for r in train], "loss": [r["loss"] for r in train],
          "eval_step": [r["step"] for r in evals], "eval_loss": [r["eval_loss"] for r in evals]}


def train_seconds(records: list[dict], tokens_per_step: float) -> float:
  """Time spent in training steps, from the logged throughput (resumes included;
  compilation and evaluations excluded)."""
  return float(sum(r["steps_in_interval"] * tokens_per_step / r["tokens_per_s"]
                   for r in records if "loss" in r and r.get("tokens_per_s")))


def run_row(cell: Cell, config, result: dict, workdir: str, wall_s: float,
            resumed: bool) -> dict:
  """The results.csv row of one finished run, plus its curves; the parameter
  counts come from the final state (``result["state"]``) when it is there."""
  spec = config_lib.resolve(config)
  params = result["state"]["params"] if "state" in result else None
  counts = accounting.count_params(spec, params)
  tokens_per_step = spec.train.batch_size * spec.data.seq_len
  records = metrics_lib.read_jsonl(os.path.join(workdir, metrics_lib.METRICS_FILE))
  return {
      "variant": cell.variant, "seed": cell.seed, "steps": spec.train.steps,
      "total_params": counts["total"], "activated_params": counts["activated"],
      "flops_per_token": accounting.flops_per_token(spec, params=params),
      "tokens_seen": spec.train.steps * tokens_per_step,
      "eval_loss": result["eval_loss"], "eval_loss_se": result["eval_loss_se"],
      "eval_tokens": int(result["eval_tokens"]), "eval_docs": result["eval_docs"],
      "eval_full": result["eval_full"], "eval_set": result.get("eval_set", ""),
      "train_s": round(train_seconds(records, tokens_per_step), 1),
      "wall_s": round(wall_s, 1), "resumed": resumed,
      "curves": curves(records), "documents": _documents(workdir),
  }


def _documents(workdir: str) -> dict | None:
  """Per-document results of the final full evaluation (None if not full)."""
  path = os.path.join(workdir, DOCUMENTS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    docs = json.load(f)
  return {"loss_sum": [round(x, 4) for x in docs["loss_sum"]], "tokens": docs["tokens"]}


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def run_cell(cell: Cell, config, root: str) -> dict:
  """Trains (or resumes) one run; writes and returns its run.json content
  ({} when a signal stopped it)."""
  from dsmoe.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  workdir = cell.workdir(root)
  _check_same_config(workdir, config)
  resumed = os.path.isdir(os.path.join(workdir, "checkpoints"))
  spec = config_lib.resolve(config)
  t0 = time.perf_counter()
  result = train_and_evaluate(spec, workdir)
  if result.get("stopped"):
    return {}
  row = run_row(cell, spec, result, workdir, time.perf_counter() - t0, resumed)
  _write_json(os.path.join(workdir, RUN_FILE), row)
  return row


def finished(cell: Cell, root: str) -> dict | None:
  path = os.path.join(cell.workdir(root), RUN_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_grid(cells: list[Cell], root: str, make_config: Callable[[Cell], object], *,
             after_each: Callable[[], None] | None = None, log=print) -> list[dict]:
  """Trains every unfinished cell in order; returns all finished rows.

  A run stopped by a signal ends the grid (its checkpoint is kept, the next
  call resumes it). `after_each` runs after every finished run (e.g. to
  rewrite the tables).
  """
  rows = []
  for i, cell in enumerate(cells):
    row = finished(cell, root)
    if row is not None:
      log(f"[{i + 1}/{len(cells)}] {cell.variant} seed {cell.seed}: done "
          f"(eval loss {row['eval_loss']:.4f}), skipped")
      rows.append(row)
      continue
    log(f"[{i + 1}/{len(cells)}] {cell.variant} seed {cell.seed}: training in "
        f"{cell.workdir(root)}")
    row = run_cell(cell, make_config(cell), root)
    if not row:
      log(f"stopped during {cell.variant} seed {cell.seed}; run again to resume")
      break
    rows.append(row)
    if after_each is not None:
      after_each()
  return rows


def read_rows(root: str) -> list[dict]:
  """Every run.json under `root` (any depth), sorted by variant and seed."""
  rows = []
  for dirpath, _, files in os.walk(root):
    if RUN_FILE in files:
      with open(os.path.join(dirpath, RUN_FILE)) as f:
        rows.append(json.load(f))
  return sorted(rows, key=lambda r: (r["variant"], r["seed"]))
