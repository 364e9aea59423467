"""Trainer tests run in this process: schedules, accumulation, loss goes down,
non-finite handling, checkpoint errors. Oracles are hand-computed numbers or
a second computation path (one big batch), never the code under test."""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import dsmoe
from dsmoe import config as config_lib
from dsmoe import flops_per_token
from dsmoe import run_config
from dsmoe.errors import CheckpointError, ConfigError
from dsmoe.train import NonFiniteError, loop, metrics, optimizer, step
from dsmoe.train import state as state_lib
from dsmoe.train.checkpoint import Checkpoints
from tests.helpers import load_config, read_losses, small_config


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


@pytest.mark.parametrize("name", ["paper_2b", "paper_16b"])
def test_paper_schedule_at_its_step_boundaries(name):
  """Warmup over 2000 steps, x0.316 at 80% and again at 90% of the steps."""
  t = load_config(name).train
  lr, steps = t.learning_rate, t.steps
  sched = optimizer.make_schedule(t)
  b1, b2 = int(0.8 * steps), int(0.9 * steps)
  for count, want in [(0, lr / 2000), (1999, lr), (b1 - 1, lr), (b1, lr * 0.316),
                      (b2 - 1, lr * 0.316), (b2, lr * 0.316**2), (steps - 1, lr * 0.316**2)]:
    assert float(sched(count)) == pytest.approx(want, rel=1e-5), (count, want)


def np_adamw(params, grads, *, lr, b1, b2, wd, clip, decay, eps=1e-8):
  """AdamW written out: global-norm clipping over all leaves, bias-corrected
  moments, decoupled weight decay on the leaves named in `decay`."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  for i, g in enumerate(grads, start=1):
    scale = min(1.0, clip / np.sqrt(sum(np.sum(np.square(x, dtype=np.float64))
                                        for x in g.values())))
    for k in p:
      gk = g[k].astype(np.float64) * scale
      m[k] = b1 * m[k] + (1 - b1) * gk
      v2[k] = b2 * v2[k] + (1 - b2) * gk * gk
      step = (m[k] / (1 - b1**i)) / (np.sqrt(v2[k] / (1 - b2**i)) + eps)
      p[k] = p[k] - lr * (step + (wd * p[k] if k in decay else 0.0))
  return p


def test_optimizer_applies_the_paper_adamw():
  """Three updates of the configured optimizer equal AdamW written out with
  the paper's beta1 0.9, beta2 0.95, weight decay 0.1 and clip 1.0 (gradients
  large enough to be clipped); the norm scale (1-D) is not decayed."""
  t = load_config("paper_2b").train
  tx = optimizer.make_optimizer(ml_collections.ConfigDict(
      dict(t.to_dict(), schedule="constant", warmup_steps=0, learning_rate=0.01)))
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 4)).astype(np.float32),
            "scale": np.ones((4,), np.float32)}
  grads = [{"w": rng.normal(size=(3, 4)).astype(np.float32),
            "scale": rng.normal(size=(4,)).astype(np.float32)} for _ in range(3)]
  p, state = jax.tree.map(jnp.asarray, params), tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
  want = np_adamw(params, grads, lr=0.01, b1=0.9, b2=0.95, wd=0.1, clip=1.0, decay={"w"})
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------ gradient accumulation

def _one_step(config, batch):
  """One step of the trainer's jitted train step, on `batch` with the
  positions the loader adds: the program of the trainer's runs of this config
  (which share its compilation)."""
  config = config_lib.resolve(config)
  tx = optimizer.make_optimizer(config.train)
  graphdef, state = step.init_state(config, tx)
  assert not config.train.skip_nonfinite
  rows, length = batch["inputs"].shape
  batch = {"positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)), **batch}
  return step.jit_train_step(config, graphdef, tx)(state, batch)


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


def _step_metrics(loss, tokens, *, finite=True, aux=0.1, tpe=(1, 2), dropped=0.0, lr=0.5):
  return {"loss": loss, "tokens": tokens, "finite": finite, "grad_norm": 2 * loss,
          "aux/expert_balance": aux, "tokens_per_expert": np.array([tpe]),
          "dropped_fraction": np.array([dropped]), "learning_rate": lr, "skipped": 0}


def test_interval_averages_by_hand():
  iv = metrics.Interval()
  iv.add(_step_metrics(4.0, 100, aux=0.1, tpe=(3, 1), dropped=0.2))
  iv.add(_step_metrics(float("nan"), 100, finite=False, tpe=(0, 4)))  # skipped step
  iv = metrics.Interval(json.loads(json.dumps(iv.state())))  # survives a checkpoint
  iv.add(_step_metrics(2.0, 300, aux=0.3, tpe=(2, 2), lr=0.25))
  out = iv.summary(step=3, tokens_per_s=10.0, flops_per_token=2.0, peak_flops_total=40.0)
  assert out["loss"] == pytest.approx((4 * 100 + 2 * 300) / 400)  # token-weighted, finite
  assert out["loss_step"] == 2.0 and out["learning_rate"] == 0.25
  assert out["grad_norm"] == pytest.approx((8 + 4) / 2)
  assert out["aux/expert_balance"] == pytest.approx(0.2)
  assert out["dropped_fraction"] == pytest.approx(0.2 / 3)
  np.testing.assert_allclose(out["expert_load"], [[5 / 12, 7 / 12]], atol=1e-5)
  assert out["load/moe0/max_over_mean"] == pytest.approx(7 / 6)
  assert out["mfu"] == pytest.approx(0.5) and out["steps_in_interval"] == 3


def test_truncate_jsonl_keeps_good_lines_after_a_bad_one(tmp_path):
  good = [{"step": 1, "loss": 3}, {"step": 2, "loss": 2}, {"step": 3, "loss": 1},
          {"step": 3, "eval_loss": 1.5}]
  lines = [json.dumps(r) for r in good]
  path = tmp_path / "m.jsonl"
  path.write_text("\n".join([lines[0], '{"step": 2, "lo', lines[1], "not json", lines[2],
                             '["a list"]', lines[3], '{"step": 9, "loss": 0}']) + "\n")
  assert metrics.truncate_jsonl(str(path), 3) == (1, 3)  # (later, bad)
  assert [json.loads(l) for l in path.read_text().splitlines()] == good
  assert metrics.read_jsonl(str(path)) == good


def test_metric_writer_writes_each_line_in_one_call(tmp_path, monkeypatch, capsys):
  """Resume skips (and reports) a bad line; each record is one os.write."""
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\ngarbage\n')
  calls = []
  real_write = os.write
  monkeypatch.setattr(metrics.os, "write", lambda fd, b: calls.append(b) or real_write(fd, b))
  writer = metrics.MetricWriter(str(tmp_path), resume_step=1, enabled=True)
  writer.write({"step": 2, "loss": 1.0, "name": "x" * 10000})
  writer.close()
  assert "skipped 1 unreadable line(s)" in capsys.readouterr().out
  assert len(calls) == 1 and calls[0].endswith(b"\n") and calls[0].count(b"\n") == 1
  assert [r["step"] for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2]


def test_truncate_jsonl_drops_later_and_cut_lines(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n{"step": 2, "eval_loss": 2}\n'
                  '{"step": 3, "loss": 1}\n{"step": 4, "lo')
  metrics.truncate_jsonl(str(path), 2)
  assert [json.loads(l) for l in path.read_text().splitlines()] == [
      {"step": 1, "loss": 3}, {"step": 2, "loss": 2}, {"step": 2, "eval_loss": 2}]


# ------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def run30(tmp_path_factory):
  """(workdir, result) of 30 steps logging every step, shared: the learning
  rate of the small config is constant after the warmup, so its first steps
  are those of any shorter run (same seed and data)."""
  workdir = tmp_path_factory.mktemp("run30")
  out = loop.train_and_evaluate(small_config(**{"train.steps": 30,
                                                "train.checkpoint_every": 30}), workdir)
  return workdir, out


def test_logged_loss_is_the_mean_of_the_interval(run30, tmp_path):
  """Logging every 5 steps gives the token-weighted mean of the 5 per-step
  losses that a run logging every step reports (same seed and data)."""
  loop.train_and_evaluate(small_config(**{"train.steps": 10, "train.log_every": 5}), tmp_path)
  per_step = metrics.read_jsonl(run30[0] / "metrics.jsonl")
  logged = [r for r in metrics.read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
  assert [r["step"] for r in logged] == [5, 10]
  for rec, lo in zip(logged, (0, 5)):
    window = [r for r in per_step if "loss" in r][lo:lo + 5]
    # every batch is full (no padding): the token weights are equal
    np.testing.assert_allclose(rec["loss"], np.mean([r["loss"] for r in window]), rtol=1e-5)
    assert rec["loss_step"] == pytest.approx(window[-1]["loss"], rel=1e-6)


def test_30_steps_lower_the_loss(run30):
  tmp_path, out = run30
  losses = [l for _, l in read_losses(tmp_path)]
  assert len(losses) == 30 and not out["stopped"]
  assert np.mean(losses[-3:]) < losses[0] - 1.0, losses
  # held-out files (a sample of rows of the evaluation set) are harder than the
  # training batches: a smaller margin
  assert out["eval_loss"] < losses[0] - 0.75
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
  """Wraps the real loader; batch number `bad` (or each of a set) gets
  out-of-vocabulary targets (the gather of a NaN-filled log-probability makes
  the loss NaN)."""

  def __init__(self, real, bad):
    self.real, self.bad = real, {bad} if isinstance(bad, int) else set(bad)

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
        if self.n in bad:
          batch["targets"] = np.full_like(batch["targets"], 10**6)
        return batch

      def get_state(self):  # the count rewinds too (the preflight reads a batch)
        return {"inner": self.it.get_state(), "n": self.n}

      def set_state(self, s):
        self.it.set_state(s["inner"])
        self.n = s["n"]

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
                           "train.skip_nonfinite": True, "train.max_skipped_fraction": 0.2})
  out = loop.train_and_evaluate(config, tmp_path)
  with open(tmp_path / "metrics.jsonl") as f:
    recs = [json.loads(l) for l in f]
  assert [r["skipped_steps"] for r in recs if "loss" in r] == [0, 0, 1, 1, 1]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(out["state"]["params"]))


def test_too_many_skipped_steps_fail_the_run(tmp_path, monkeypatch):
  """train.max_skipped_fraction=0.1 of 10 steps allows 1 skip: the second
  (batch 5) stops the run before step 5's state is saved."""
  monkeypatch.setattr(loop, "make_loader", _PoisonedLoader(loop.make_loader, bad=(3, 5)))
  config = small_config(**{"train.steps": 10, "train.checkpoint_every": 2,
                           "train.skip_nonfinite": True, "train.max_skipped_fraction": 0.1})
  with pytest.raises(NonFiniteError, match=r"2 non-finite steps skipped by step 5, more "
                     r"than train.max_skipped_fraction=0.1 .*checkpoints/4"):
    loop.train_and_evaluate(config, tmp_path)
  assert Checkpoints(tmp_path).all_steps() == [2, 4]
  assert [s for s, _ in read_losses(tmp_path)] == [1, 2, 3, 4]


def test_diverged_parameters_are_never_saved(tmp_path):
  """At learning rate 1e6 the parameters diverge within a few steps. Every
  checkpoint the run leaves must still train: finite loss and gradient on a
  batch (computed here with jax.value_and_grad of the model's cross-entropy)."""
  config = small_config(**{"train.steps": 6, "train.checkpoint_every": 1,
                           "train.learning_rate": 1e6, "train.warmup_steps": 0})
  with pytest.raises(NonFiniteError, match=r"(not saving|stopping without saving)"):
    loop.train_and_evaluate(config, tmp_path)
  steps = Checkpoints(tmp_path).all_steps()
  assert steps and max(steps) < 6
  spec = config_lib.resolve(config)
  tx = optimizer.make_optimizer(spec.train)
  batch = next(iter(loop.make_loader(spec, "validation")))
  loss_and_grads = None  # jitted once: every checkpoint has the same structure
  for s in steps:
    graphdef, state, _ = state_lib.init_or_restore(
        spec, tx, Checkpoints(tmp_path, read_only=True), loop.make_mesh(), None, s)
    if loss_and_grads is None:
      def ce(params, rest, graphdef=graphdef):
        logits, _ = nnx.merge(graphdef, params, rest)(batch["inputs"], batch["segment_ids"])
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits),
                                             batch["targets"][..., None], -1))
      loss_and_grads = jax.jit(jax.value_and_grad(ce))
    loss, grads = loss_and_grads(state["params"], state["rest"])
    assert np.isfinite(float(loss)), s
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads)), s


def test_nonfinite_updated_parameters_are_caught():
  """An optimizer that returns infinite updates (the loss and gradient are
  finite): the step is flagged and, with skip_nonfinite, the old parameters
  are kept."""
  config = config_lib.resolve(small_config())
  inf_tx = optax.GradientTransformation(
      lambda p: optax.EmptyState(),
      lambda g, s, p=None: (jax.tree.map(lambda x: jnp.full_like(x, jnp.inf), g), s))
  graphdef, old = step.init_state(config, inf_tx)
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(0, 256, (4, 32), dtype=np.int32) for k in ("inputs", "targets")}
  batch["segment_ids"] = np.ones((4, 32), np.int32)
  new, m = jax.jit(lambda s, b: step.train_step(
      s, b, graphdef=graphdef, tx=inf_tx, schedule=lambda c: 1.0, accum=1,
      skip_nonfinite=True))(old, batch)
  assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])
  assert not bool(m["finite"]) and not bool(m["params_finite"])
  assert int(new["skipped"]) == 1
  jax.tree.map(np.testing.assert_array_equal, new["params"], old["params"])


# ------------------------------------------------------- checkpoint errors

def test_mismatched_checkpoint_names_the_checkpoint_and_the_shapes(tmp_path):
  loop.train_and_evaluate(small_config(**{"train.steps": 2, "train.checkpoint_every": 2}),
                          tmp_path)
  other = small_config(**{"train.steps": 4, "model.d_model": 48})
  with pytest.raises(CheckpointError, match=r"checkpoints/2 does not match the config: "
                     r".*checkpoint shape \(.*32.*\) != config shape \(.*48.*\)"):
    loop.train_and_evaluate(other, tmp_path)
  assert Checkpoints(tmp_path).all_steps() == [2]  # nothing lost
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["d_model"] == 32 and not list(tmp_path.glob("config.before_*"))


def test_the_workdir_records_its_config_and_reports_a_changed_resume(tmp_path, capsys):
  """config.json holds the run's whole config (it resolves to the same spec)
  and version.json the versions; a resume with another learning rate says
  so, keeps the previous config beside, and records the new one."""
  first = small_config(**{"train.steps": 2, "train.checkpoint_every": 2})
  loop.train_and_evaluate(first, tmp_path)
  saved = run_config.from_json(str(tmp_path / "config.json"))
  assert dsmoe.resolve(saved) == dsmoe.resolve(first)
  assert saved.to_dict() == first.to_dict()
  versions = json.loads((tmp_path / "version.json").read_text())
  assert versions["jax"] == jax.__version__ and "commit" in versions
  capsys.readouterr()
  second = small_config(**{"train.steps": 3, "train.checkpoint_every": 3,
                           "train.learning_rate": 1e-4})
  loop.train_and_evaluate(second, tmp_path)
  out = capsys.readouterr().out
  assert ("resuming with settings that differ from the workdir's config.json (kept as "
          "config.before_step2.json): train.checkpoint_every: 2 -> 3, "
          "train.learning_rate: 0.003 -> 0.0001, train.steps: 2 -> 3") in out
  before = json.loads((tmp_path / "config.before_step2.json").read_text())
  now = json.loads((tmp_path / "config.json").read_text())
  assert before["train"]["learning_rate"] == 3e-3 and now["train"]["learning_rate"] == 1e-4


def test_scripts_take_the_saved_config_or_report_how_theirs_differs(tmp_path, capsys):
  with pytest.raises(ConfigError, match="config.json does not exist: give --config"):
    run_config.config_for(None, str(tmp_path))
  with pytest.raises(ConfigError, match="no --workdir: give --config"):
    run_config.config_for(None, None)
  config = small_config()
  run_config.record(str(tmp_path), config)
  assert run_config.config_for(None, str(tmp_path)).to_dict() == config.to_dict()
  other = small_config(**{"model.d_model": 48})
  assert run_config.config_for(other, str(tmp_path)) is other  # the explicit one wins
  err = capsys.readouterr().err
  assert err.startswith("note: --config differs from ") and "model.d_model: 32 -> 48" in err


def test_missing_checkpoint_step(tmp_path):
  from dsmoe.train.evaluation import evaluate_checkpoint
  loop.train_and_evaluate(small_config(**{"train.steps": 2, "train.checkpoint_every": 2}),
                          tmp_path)
  with pytest.raises(CheckpointError, match=r"checkpoints/7 does not exist"):
    evaluate_checkpoint(small_config(), tmp_path, step=7)
