"""Trainer tests run in this process: schedules, accumulation, loss goes down,
non-finite handling, checkpoint errors. Oracles are hand-computed numbers or
a second computation path (one big batch), never the code under test."""

import gc
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from dsmoe import config as config_lib
from dsmoe import flops_per_token
from dsmoe.train import NonFiniteError, loop, metrics, optimizer, step
from dsmoe.train.checkpoint import CheckpointError, Checkpoints

SMALL = {"model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2,
         "model.dense_hidden": 64, "model.moe.fine_grained.ffn_hidden": 64,
         "data.seq_len": 32, "train.batch_size": 4, "train.warmup_steps": 5,
         "train.log_every": 1, "train.eval_batches": 1, "train.peak_flops": 1e9}


def small_config(**overrides):
  """configs/tiny.py with the same structure but tiny dimensions."""
  config = load_config("tiny")
  for key, value in {**SMALL, **overrides}.items():
    node = config
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return config


def read_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


# ---------------------------------------------------------------- schedules

@pytest.mark.parametrize("schedule,count,expected", [
    ("paper_step", 0, 0.1), ("paper_step", 4, 0.5), ("paper_step", 9, 1.0),
    ("paper_step", 10, 1.0), ("paper_step", 79, 1.0), ("paper_step", 80, 0.316),
    ("paper_step", 89, 0.316), ("paper_step", 90, 0.316 * 0.316), ("paper_step", 99, 0.099856),
    ("cosine", 0, 0.1), ("cosine", 10, 1.0), ("cosine", 55, 0.55), ("cosine", 100, 0.1),
    ("constant", 2, 0.3), ("constant", 50, 1.0), ("constant", 99, 1.0),
])
def test_schedule_values(schedule, count, expected):
  train = small_config(**{"train.steps": 100, "train.warmup_steps": 10,
                          "train.learning_rate": 1.0, "train.schedule": schedule}).train
  assert float(optimizer.make_schedule(train)(count)) == pytest.approx(expected, rel=1e-5)


def test_optimizer_hyperparameters_match_the_paper():
  t = config_lib.base_config().train
  assert (t.b1, t.b2, t.weight_decay, t.grad_clip) == (0.9, 0.95, 0.1, 1.0)


# ------------------------------------------------------ gradient accumulation

def _one_step(config, batch):
  config = config_lib.resolve(config)
  tx = optimizer.make_optimizer(config.train)
  graphdef, state = step.init_state(config, tx)
  fn = jax.jit(lambda s, b: step.train_step(
      s, b, graphdef=graphdef, tx=tx, schedule=optimizer.make_schedule(config.train),
      accum=config.train.grad_accum_steps, skip_nonfinite=False))
  return fn(state, batch)


def test_grad_accumulation_equals_the_large_batch():
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, 256, (4, 32), dtype=np.int32),
           "targets": rng.integers(0, 256, (4, 32), dtype=np.int32),
           "segment_ids": np.ones((4, 32), np.int32)}
  batch["segment_ids"][1, 20:] = 0  # padding: uneven token counts per micro-batch
  big_state, big = _one_step(small_config(), batch)
  acc_state, acc = _one_step(small_config(**{"train.grad_accum_steps": 2}), batch)
  np.testing.assert_allclose(acc["loss"], big["loss"], rtol=1e-6)
  np.testing.assert_allclose(acc["grad_norm"], big["grad_norm"], rtol=1e-4)
  np.testing.assert_allclose(acc["aux/expert_balance"], big["aux/expert_balance"], rtol=1e-5)
  np.testing.assert_array_equal(acc["tokens_per_expert"], big["tokens_per_expert"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6),
               acc_state["params"], big_state["params"])


def test_bfloat16_compute_keeps_float32_master_weights():
  rng = np.random.default_rng(1)
  batch = {k: rng.integers(0, 256, (4, 32), dtype=np.int32) for k in ("inputs", "targets")}
  batch["segment_ids"] = np.ones((4, 32), np.int32)
  state, m = _one_step(small_config(**{"model.dtype": "bfloat16"}), batch)
  _, m32 = _one_step(small_config(), batch)
  assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}
  assert float(m["loss"]) == pytest.approx(float(m32["loss"]), rel=2e-2)


def test_padding_is_masked_out_of_the_loss():
  logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))
  ce, n = step.cross_entropy(logits, jnp.array([[0, 1]]), jnp.array([[True, False]]))
  assert float(n) == 1.0 and float(ce) == pytest.approx(math.log(2.0), rel=1e-6)


# ---------------------------------------------------------------- metrics

def test_expert_load_stats_by_hand():
  out = metrics.expert_load_stats(np.array([[1, 1, 2], [3, 3, 3]]))
  assert out["load/moe0/max_over_mean"] == pytest.approx(1.5)
  assert out["load/moe0/cv"] == pytest.approx(math.sqrt(2 / 9) / (4 / 3))
  assert out["load/moe1/max_over_mean"] == 1.0 and out["load/moe1/cv"] == 0.0


def test_truncate_jsonl_drops_later_and_cut_lines(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n{"step": 2, "eval_loss": 2}\n'
                  '{"step": 3, "loss": 1}\n{"step": 4, "lo')
  metrics.truncate_jsonl(str(path), 2)
  assert [json.loads(l) for l in path.read_text().splitlines()] == [
      {"step": 1, "loss": 3}, {"step": 2, "loss": 2}, {"step": 2, "eval_loss": 2}]


# ------------------------------------------------------------ end to end

def test_30_steps_lower_the_loss(tmp_path):
  out = loop.train_and_evaluate(small_config(**{"train.steps": 30,
                                                "train.checkpoint_every": 30}), tmp_path)
  losses = [l for _, l in read_losses(tmp_path)]
  assert len(losses) == 30 and not out["stopped"]
  assert np.mean(losses[-3:]) < losses[0] - 1.0, losses
  assert out["eval_loss"] < losses[0] - 1.0
  rec = json.loads(open(tmp_path / "metrics.jsonl").readline())
  for key in ("step", "loss", "perplexity", "aux/expert_balance", "grad_norm",
              "learning_rate", "tokens_per_s", "mfu", "dropped_fraction",
              "load/moe0/max_over_mean", "load/moe0/cv"):
    assert key in rec, key
  fpt = flops_per_token(small_config())
  assert rec["mfu"] == pytest.approx(rec["tokens_per_s"] * fpt / 1e9, rel=1e-6)
  assert rec["perplexity"] == pytest.approx(math.exp(rec["loss"]), rel=1e-6)
  assert os.listdir(tmp_path / "tensorboard")
  assert (tmp_path / "training.png").stat().st_size > 0
  assert Checkpoints(tmp_path).all_steps() == [30]


class _PoisonedLoader:
  """Wraps the real loader; batch number `bad` gets out-of-vocabulary targets
  (the gather of a NaN-filled log-probability makes the loss NaN)."""

  def __init__(self, real, bad):
    self.real, self.bad = real, bad

  def __call__(self, config, split="train", **kw):
    loader, bad = self.real(config, split, **kw), self.bad
    if split != "train":
      return loader

    class It:
      def __init__(self):
        self.it, self.n = iter(loader), 0

      def __iter__(self):
        return self

      def __next__(self):
        batch, self.n = dict(next(self.it)), self.n + 1
        if self.n == bad:
          batch["targets"] = np.full_like(batch["targets"], 10**6)
        return batch

      def get_state(self):
        return self.it.get_state()

      def set_state(self, s):
        self.it.set_state(s)

    class L:
      def __iter__(self):
        return It()
    return L()


def test_nonfinite_loss_stops_without_a_new_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setattr(loop, "make_loader", _PoisonedLoader(loop.make_loader, bad=7))
  config = small_config(**{"train.steps": 12, "train.checkpoint_every": 5})
  with pytest.raises(NonFiniteError, match=r"step 7 .*checkpoints/5"):
    loop.train_and_evaluate(config, tmp_path)
  assert Checkpoints(tmp_path).all_steps() == [5]
  assert max(s for s, _ in read_losses(tmp_path)) == 6


def test_skip_nonfinite_skips_and_counts(tmp_path, monkeypatch):
  monkeypatch.setattr(loop, "make_loader", _PoisonedLoader(loop.make_loader, bad=3))
  config = small_config(**{"train.steps": 5, "train.checkpoint_every": 5,
                           "train.skip_nonfinite": True})
  out = loop.train_and_evaluate(config, tmp_path)
  with open(tmp_path / "metrics.jsonl") as f:
    recs = [json.loads(l) for l in f]
  assert [r["skipped_steps"] for r in recs if "loss" in r] == [0, 0, 1, 1, 1]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(out["state"]["params"]))


# ------------------------------------------------------- checkpoint errors

def test_mismatched_checkpoint_names_the_checkpoint_and_the_shapes(tmp_path):
  loop.train_and_evaluate(small_config(**{"train.steps": 2, "train.checkpoint_every": 2}),
                          tmp_path)
  other = small_config(**{"train.steps": 4, "model.d_model": 48})
  with pytest.raises(CheckpointError, match=r"checkpoints/2 does not match the config: "
                     r".*checkpoint shape \(.*32.*\) != config shape \(.*48.*\)"):
    loop.train_and_evaluate(other, tmp_path)
  assert Checkpoints(tmp_path).all_steps() == [2]  # nothing lost


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_checkpoint_is_one_clear_error(tmp_path):
  loop.train_and_evaluate(small_config(**{"train.steps": 2, "train.checkpoint_every": 2}),
                          tmp_path)
  state_dir = tmp_path / "checkpoints" / "2" / "state"
  files = sorted((p for p in state_dir.rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
  biggest = files[-1]
  biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
  with pytest.raises(CheckpointError, match=r"checkpoints/2"):
    loop.train_and_evaluate(small_config(**{"train.steps": 4}), tmp_path)
  gc.collect()  # Orbax's abandoned read coroutines warn when collected
  assert Checkpoints(tmp_path).all_steps() == [2]


def test_missing_checkpoint_step(tmp_path):
  from dsmoe.train.evaluation import evaluate_checkpoint
  loop.train_and_evaluate(small_config(**{"train.steps": 2, "train.checkpoint_every": 2}),
                          tmp_path)
  with pytest.raises(CheckpointError, match=r"checkpoints/7 does not exist"):
    evaluate_checkpoint(small_config(), tmp_path, step=7)
