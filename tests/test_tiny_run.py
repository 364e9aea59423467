"""30 steps of the real configs/tiny.py (its dimensions and data) lower the loss."""

import json

import numpy as np
import pytest

from dsmoe.train import train_and_evaluate
from tests.helpers import load_config


@pytest.mark.slow
def test_tiny_config_30_steps_lower_the_loss(tmp_path):
  config = load_config("tiny")
  config.data.data_dir = str(tmp_path / "tfds")  # built from the stdlib in the test
  config.train.steps, config.train.log_every, config.train.checkpoint_every = 30, 1, 30
  config.train.eval_batches = 2
  result = train_and_evaluate(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
  assert len(losses) == 30
  # Cross-entropy starts near ln(vocab) for a 0.02-std init and falls clearly.
  assert losses[0] == pytest.approx(np.log(config.model.vocab_size), abs=0.5)
  assert np.mean(losses[-5:]) < losses[0] - 1.0, losses
  assert result["eval_loss"] < losses[0] - 1.0
