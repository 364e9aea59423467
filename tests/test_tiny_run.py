"""30 steps of the real configs/tiny.py (its dimensions and data) lower the loss.

The run is scripts/train.py in a subprocess that starts with the session
(the ``early`` marker, tests/conftest.py), so its minute of training runs
beside the other tests; the test reads its metrics at the end.
"""

import json
import pathlib
import shutil
import sys
import tempfile

import numpy as np
import pytest

from tests.helpers import ROOT, EarlyRun, load_config, script_env

STEPS = 30


def start_tiny_run():
  """scripts/train.py on configs/tiny.py for STEPS steps, its data built
  from the stdlib into a fresh folder (the run's `folder` attribute)."""
  folder = pathlib.Path(tempfile.mkdtemp(prefix="dsmoe-tiny-"))
  cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), f"--config={ROOT}/configs/tiny.py",
         f"--workdir={folder / 'run'}", f"--config.data.data_dir={folder / 'tfds'}",
         f"--config.train.steps={STEPS}", "--config.train.log_every=1",
         f"--config.train.checkpoint_every={STEPS}", "--config.train.eval_batches=2"]
  run = EarlyRun(cmd, cwd=ROOT, env=script_env())
  run.run_folder = folder
  return run


@pytest.mark.slow
@pytest.mark.early(start=start_tiny_run)
def test_tiny_config_30_steps_lower_the_loss(early_run):
  try:
    res = early_run.result(timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    with open(early_run.run_folder / "run" / "metrics.jsonl") as f:
      records = [json.loads(line) for line in f]
  finally:
    shutil.rmtree(early_run.run_folder, ignore_errors=True)
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == STEPS
  # Cross-entropy starts near ln(vocab) for a 0.02-std init and falls clearly.
  vocab = load_config("tiny").model.vocab_size
  assert losses[0] == pytest.approx(np.log(vocab), abs=0.5)
  assert np.mean(losses[-5:]) < losses[0] - 1.0, losses
  final = [r for r in records if "eval_loss" in r][-1]
  assert final["step"] == STEPS and final["eval_loss"] < losses[0] - 1.0
