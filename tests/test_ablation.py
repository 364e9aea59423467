"""configs/ablation.py variants, the resumable grid runner and its report.

Parameter oracles are written out by hand from the sizes the paper states;
the report's statistics are recomputed here with numpy from the CSV.
"""

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import dsmoe
from dsmoe import run_config
from dsmoe.analysis import ablation, report
from tests.helpers import ROOT, load_config

D, F, LAYERS = 128, 352, 4
FFN = 3 * D * F  # one standard SwiGLU FFN


def counts(variant):
  return dsmoe.count_params(load_config("ablation", variant))


def test_variants_keep_the_papers_parameter_ratios():
  dense = counts("dense")
  assert dense["total"] == dense["activated"]
  # (routed experts N', active K', expert parameters in FFNs total / active)
  moe = {"hash": (16, 1, 16, 1), "switch": (16, 1, 16, 1), "gshard": (16, 2, 16, 2),
         "shared": (15, 1, 16, 2), "m2": (31, 3, 16, 2), "deepseekmoe": (63, 7, 16, 2),
         "ks2": (62, 6, 16, 2), "ks4": (60, 4, 16, 2), "gshard_x1.5": (16, 2, 24, 3)}
  for variant, (n_routed, _, total_ffn, active_ffn) in moe.items():
    got = counts(variant)
    router = 0 if variant == "hash" else D * n_routed
    # each layer: the dense FFN replaced by total_ffn FFNs of experts (+ router)
    assert got["total"] == dense["total"] + LAYERS * ((total_ffn - 1) * FFN + router), variant
    assert got["activated"] == dense["activated"] + LAYERS * ((active_ffn - 1) * FFN + router), \
        variant
  x16 = counts("dense_x16")
  assert x16["total"] == x16["activated"] == dense["total"] + LAYERS * 15 * FFN


def test_flops_per_token_follow_the_activated_parameters():
  flops = {v: dsmoe.flops_per_token(load_config("ablation", v))
           for v in ("dense", "switch", "gshard", "deepseekmoe", "gshard_x1.5", "dense_x16")}
  per_ffn = 6 * LAYERS * FFN
  assert flops["gshard"] - flops["dense"] == pytest.approx(per_ffn + 6 * LAYERS * D * 16)
  assert flops["deepseekmoe"] - flops["dense"] == pytest.approx(per_ffn + 6 * LAYERS * D * 63)
  assert flops["gshard_x1.5"] - flops["gshard"] == pytest.approx(per_ffn)
  assert flops["dense_x16"] - flops["dense"] == pytest.approx(15 * per_ffn)
  assert flops["switch"] - flops["dense"] == pytest.approx(6 * LAYERS * D * 16)


def test_every_variant_resolves_and_uses_sentencepiece_8k():
  for v in ablation_variants():
    c = load_config("ablation", v)
    spec = dsmoe.resolve(c)
    assert (c.data.tokenizer, c.data.vocab_size, spec.model.vocab_size) == ("sentencepiece",
                                                                            8192, 8192)
    assert c.train.eval_full_at_end and c.data.eval_tokens >= 250_000


def ablation_variants():
  from dsmoe.configs import ablation as variants  # pylint: disable=g-import-not-at-top
  return variants.VARIANTS


TINY = ["--config.model.d_model=16", "--config.model.num_layers=1", "--config.model.num_heads=2",
        "--config.model.vocab_size=256", "--config.data.tokenizer=bytes",
        "--config.data.seq_len=16", "--config.train.batch_size=2",
        "--config.train.log_every=1", "--config.train.eval_every=2",
        "--config.train.eval_batches=1", "--config.train.checkpoint_every=2",
        "--config.train.warmup_steps=1", "--config.data.eval_tokens=512",
        "--config.data.eval_doc_tokens=64", "--config.train.peak_flops=1e9"]


def start_script(workdir, *extra):
  """scripts/run_ablation.py on a 2 x 2 grid of TINY runs, started."""
  cmd = [sys.executable, str(ROOT / "scripts" / "run_ablation.py"), f"--workdir={workdir}",
         "--variants=gshard,deepseekmoe", "--seeds=0,1", "--steps=3",
         f"--config.data.data_dir={workdir.parent / 'tfds'}", *TINY, *extra]
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def finish(proc):
  """The finished `proc` as a CompletedProcess (stdout, stderr, returncode)."""
  try:
    stdout, stderr = proc.communicate(timeout=600)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_script(workdir, *extra):
  return finish(start_script(workdir, *extra))


@pytest.mark.slow
def test_runner_writes_results_skips_finished_and_resumes(tmp_path):
  work = tmp_path / "grid"
  first = run_script(work)
  assert first.returncode == 0, first.stderr[-3000:]
  with open(work / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert sorted((r["variant"], r["seed"]) for r in rows) == [
      ("deepseekmoe", "0"), ("deepseekmoe", "1"), ("gshard", "0"), ("gshard", "1")]
  assert {r["steps"] for r in rows} == {"3"} and {r["tokens_seen"] for r in rows} == {"96"}
  assert len({r["eval_set"] for r in rows}) == 1  # every run scored the same tokens
  table = (work / "results.md").read_text()
  for v in ("gshard", "deepseekmoe"):  # mean +- sample std over the two seeds
    losses = np.array([float(r["eval_loss"]) for r in rows if r["variant"] == v])
    assert f"{losses.mean():.4f} +- {losses.std(ddof=1):.4f}" in table
  for png in ("loss_curves.png", "loss_vs_flops.png"):
    assert (work / png).read_bytes()[:4] == b"\x89PNG"

  cell = work / "gshard" / "seed1"
  before = (cell / "run.json").stat().st_mtime_ns
  # The interrupted run below works on a copy of the grid, beside this second run.
  copy = tmp_path / "copy"
  shutil.copytree(work, copy)
  second = start_script(work, "--out", str(tmp_path / "report"))

  # An interrupted run: its last checkpoint and run.json are gone; the grid
  # resumes it from step 2 and ends where the uninterrupted run ended.
  cell_copy = copy / "gshard" / "seed1"
  done = json.loads((cell_copy / "run.json").read_text())
  (cell_copy / "run.json").unlink()
  shutil.rmtree(cell_copy / "checkpoints" / "3")
  config = run_config.from_json(str(cell_copy / "config.json"))
  rows = ablation.run_grid([ablation.Cell("gshard", 1)], str(copy), lambda c: config)
  assert rows[0]["resumed"] and rows[0]["eval_loss"] == done["eval_loss"]

  second = finish(second)
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stdout.count("skipped") == 4
  assert (cell / "run.json").stat().st_mtime_ns == before
  assert (tmp_path / "report" / "raw" / "gshard" / "seed1" / "run.json").exists()


def test_a_workdir_of_another_config_is_refused(tmp_path):
  config = load_config("ablation", "gshard")
  ablation._check_same_config(str(tmp_path), config)  # pylint: disable=protected-access
  ablation._check_same_config(str(tmp_path), config)  # same config: fine
  config.train.steps = 7
  with pytest.raises(ValueError, match="another config.*train.steps: 1000 -> 7"):
    ablation._check_same_config(str(tmp_path), config)  # pylint: disable=protected-access
  assert run_config.from_json(str(tmp_path / "config.json")).train.steps == 1000


def test_bad_variant_or_override_exits_with_one_line(tmp_path):
  bad = run_script(tmp_path / "g", "--variants=gshard,nope")
  assert bad.returncode == 1 and "unknown variant 'nope'" in bad.stderr
  assert "Traceback" not in bad.stderr


def fake_row(variant, seed, loss, docs):
  return {"variant": variant, "seed": seed, "steps": 10, "total_params": 5, "activated_params": 2,
          "flops_per_token": 1e6, "tokens_seen": 100, "eval_loss": loss, "eval_loss_se": 0.1,
          "eval_tokens": 10, "eval_docs": 2, "eval_set": "x", "train_s": 60, "wall_s": 70,
          "resumed": False, "documents": {"loss_sum": docs, "tokens": [4.0, 6.0]},
          "curves": {"step": [1, 2], "loss": [3, 2], "eval_step": [2], "eval_loss": [loss]}}


def test_report_statistics_by_hand(tmp_path):
  rows = [fake_row("gshard", 0, 2.0, [8.0, 12.0]), fake_row("gshard", 1, 2.2, [9.0, 13.0]),
          fake_row("deepseekmoe", 0, 1.9, [7.0, 12.0]),
          fake_row("deepseekmoe", 1, 2.0, [8.0, 12.0])]
  stats = report.aggregate(rows, ["gshard", "deepseekmoe"])
  assert stats["gshard"]["mean"] == pytest.approx(2.1)
  assert stats["gshard"]["std"] == pytest.approx(np.std([2.0, 2.2], ddof=1))
  (comp,) = [c for c in report.comparisons(stats) if c["ordering"] == "Figure 3"]
  assert comp["gap"] == pytest.approx(2.1 - 1.95)
  pooled = np.sqrt((np.var([2.0, 2.2], ddof=1) + np.var([1.9, 2.0], ddof=1)) / 2)
  assert comp["two_std"] == pytest.approx(2 * pooled)
  assert comp["exceeds_noise"] == bool(0.15 > 2 * pooled)
  # paired s.e.: per-document gaps (1.0, 0.5) over tokens (4, 6): r = 0.15,
  # residuals (1 - 0.6, 0.5 - 0.9) -> sqrt(2 * 0.32) / 10
  assert comp["gap_se"] == pytest.approx(np.sqrt(2 * (0.4**2 + 0.4**2)) / 10)
  paths = report.write_report(rows, str(tmp_path), ["gshard", "deepseekmoe"])
  assert pathlib.Path(paths["flops"]).read_bytes()[:4] == b"\x89PNG"


def test_update_doc_replaces_only_the_marked_section(tmp_path):
  doc = tmp_path / "RESULTS.md"
  doc.write_text(f"intro\n{report.BEGIN}\nold table\n{report.END}\noutro\n")
  report.update_doc(str(doc), "| new |\n")
  assert doc.read_text() == f"intro\n{report.BEGIN}\n| new |\n{report.END}\noutro\n"
  (tmp_path / "plain.md").write_text("no markers")
  with pytest.raises(ValueError, match="no '<!-- ablation-results:begin -->'"):
    report.update_doc(str(tmp_path / "plain.md"), "x")


PAPER_2B = {"model.d_model": 1280, "model.num_layers": 9, "model.num_heads": 10,
            "model.head_dim": 128, "model.dense_hidden": 3520,
            "model.moe.fine_grained.ffn_hidden": 3520, "data.seq_len": 2048}


@pytest.mark.parametrize("variant,total,activated,tflops", [
    ("dense", 0.2, 0.2, 2.9), ("hash", 2.0, 0.2, 2.9), ("switch", 2.0, 0.2, 2.9),
    ("gshard", 2.0, 0.3, 4.3), ("deepseekmoe", 2.0, 0.3, 4.3)])
def test_overrides_give_the_papers_2b_table1_sizes(variant, total, activated, tflops):
  """The README's --config.* flags turn the grid into the paper's Table 1 models."""
  c = ablation.variant_config("ablation", variant, 0, PAPER_2B)
  n = dsmoe.count_params(c)
  assert round(n["total"] / 1e9, 1) == total and round(n["activated"] / 1e9, 1) == activated
  assert dsmoe.flops_per_token(c) * 2048 / 1e12 == pytest.approx(tflops, rel=0.05)
