"""Trainer tests that run scripts/train.py and scripts/evaluate.py as processes:
exact resume after SIGKILL, SIGTERM saves and exits 0, two CPU processes with
jax.distributed (with expert parallelism across them) equal one device,
evaluate.py on a saved run.

Runs that do not depend on each other start together (the two kill cadences,
the two signals, the one-process run beside the two processes), so they
overlap on the cores."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.helpers import ROOT, read_losses, script_cmd, script_env, small_config

STEPS = 16
# Log every 3 steps, save every 4: a resume starts inside a logging interval.
RUN = {"train.steps": STEPS, "train.checkpoint_every": 4, "train.log_every": 3}


def _start(workdir, overrides, *extra, log=None):
  log = open(log or f"{workdir}.log", "w")
  return subprocess.Popen(script_cmd("train.py", workdir, overrides, *extra), cwd=ROOT,
                          env=script_env(), stdout=log, stderr=subprocess.STDOUT)


def _finish(proc, timeout=400):
  try:
    return proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise


def _wait_for_step(workdir, step, proc, timeout=300):
  path = os.path.join(workdir, "metrics.jsonl")
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      return
    if os.path.exists(path):
      with open(path) as f:
        steps = [json.loads(l)["step"] for l in f if l.endswith("\n")]
      if steps and steps[-1] >= step:
        return
    time.sleep(0.02)
  proc.kill()
  raise TimeoutError(f"no step {step} in {path}")


def _train(workdir, overrides=RUN, *extra):
  rc = _finish(_start(workdir, overrides, *extra))
  assert rc == 0, open(f"{workdir}.log").read()[-3000:]


def _params(workdir, step, overrides=RUN):
  from dsmoe import config as config_lib
  from dsmoe.train import checkpoint, loop, optimizer, state as state_lib
  config = config_lib.resolve(small_config(**overrides))
  tx = optimizer.make_optimizer(config.train)
  ckpts = checkpoint.Checkpoints(workdir, read_only=True)
  _, state, _ = state_lib.init_or_restore(config, tx, ckpts, loop.make_mesh(), None, step)
  return jax.device_get(state["params"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of STEPS steps."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  _train(workdir)
  return workdir


def _logged_step(workdir):
  """The last step in workdir/metrics.jsonl (0 before the first)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    steps = [json.loads(l)["step"] for l in f if l.endswith("\n")]
  return steps[-1] if steps else 0


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_exact(reference, tmp_path):
  """Saving every 4 steps, and every step (the kill mostly lands in a save);
  the two runs side by side, each killed as soon as it logs its step."""
  runs = {}
  for every in (4, 1):
    kill_at = random.randint(2, STEPS - 7)  # logged every 3: leaves >= 7 steps to kill in
    print(f"checkpoint_every={every}: killing at step {kill_at}")
    workdir = tmp_path / f"every{every}"
    runs[every] = (workdir, kill_at, _start(workdir, {**RUN, "train.checkpoint_every": every}))
  alive, t0 = set(runs), time.time()
  while alive:
    for every in sorted(alive):
      workdir, kill_at, proc = runs[every]
      if proc.poll() is not None or _logged_step(workdir) >= kill_at:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        alive.discard(every)
    if time.time() - t0 > 300:
      for every in alive:
        runs[every][2].kill()
      raise TimeoutError(f"checkpoint_every={sorted(alive)}: no kill step logged")
    time.sleep(0.02)
  for every, (workdir, _, _) in runs.items():
    assert _logged_step(workdir) < STEPS, f"checkpoint_every={every}: finished before the kill"
  # Both resume from their latest complete checkpoint.
  resumed = {every: _start(workdir, RUN) for every, (workdir, _, _) in runs.items()}
  for every, proc in resumed.items():
    workdir = runs[every][0]
    assert _finish(proc) == 0, open(f"{workdir}.log").read()[-3000:]
  want = _params(reference, STEPS)
  for every, (workdir, _, _) in runs.items():
    assert read_losses(workdir) == read_losses(reference), f"checkpoint_every={every}"
    jax.tree.map(np.testing.assert_array_equal, _params(workdir, STEPS), want)


@pytest.mark.slow
def test_signal_saves_and_exits_0(tmp_path):
  """SIGTERM and SIGINT, one run each, side by side."""
  runs = {}
  for sig in (signal.SIGTERM, signal.SIGINT):
    workdir = tmp_path / sig.name
    runs[sig] = (workdir, _start(workdir, {"train.steps": 100000, "train.checkpoint_every": 1000}))
  for sig, (workdir, proc) in runs.items():
    _wait_for_step(workdir, 2, proc)
    proc.send_signal(sig)
  from dsmoe.train.checkpoint import Checkpoints
  for sig, (workdir, proc) in runs.items():
    assert _finish(proc, timeout=120) == 0, (sig.name, open(f"{workdir}.log").read()[-3000:])
    out = open(f"{workdir}.log").read()
    last = Checkpoints(workdir, read_only=True).latest_step()
    assert last is not None and last >= 2, sig.name
    assert (f"{sig.name}: stopped after step {last}; saved checkpoint "
            f"{workdir}/checkpoints/{last}") in out


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Runs a script with a loader that draws each *global* batch from one seeded
# generator and hands process i its rows, so 1 and 2 processes see the same
# global batches (the real pipeline shards documents per process instead).
SAME_GLOBAL_BATCH = """
import runpy, sys
import numpy as np
from dsmoe.train import evaluation, loop

class It:
  def __init__(self, config, split, pi, pc):
    self.b, self.l = config.train.batch_size, config.data.seq_len
    self.v, self.pi, self.pc, self.step = config.model.vocab_size, pi, pc, 0
    self.seed = 1 + (split != "train")
  def get_state(self): return {"step": self.step}
  def set_state(self, s): self.step = s["step"]
  def __iter__(self): return self
  def __next__(self):
    rows = np.random.default_rng([self.seed, self.step]).integers(
        0, self.v // 8, (self.b, self.l + 1), dtype=np.int32)
    rows = rows[self.pi * self.b // self.pc:(self.pi + 1) * self.b // self.pc]
    self.step += 1
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:] // 2,
            "segment_ids": np.ones_like(rows[:, 1:])}

def make_loader(config, split="train", *, process_index=None, process_count=None):
  import jax
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  return type("L", (), {"__iter__": lambda self: It(config, split, pi, pc)})()

loop.make_loader = evaluation.make_loader = make_loader
script = sys.argv.pop(1)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
"""


def _start_same_batches(tmp_path, workdir, *extra, log, overrides=RUN, devices=1):
  launcher = tmp_path / "same_global_batch.py"
  if not launcher.exists():  # written once: a process started before may be reading it
    launcher.write_text(SAME_GLOBAL_BATCH)
  cmd = script_cmd("train.py", workdir, overrides, *extra)
  cmd.insert(1, str(launcher))
  env = script_env(devices)
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"),
                          stderr=subprocess.STDOUT)


# 32 routed experts over expert=8 devices (4 per process); all_to_all with room
# for every pair (nothing dropped), so the run must equal one device. 6 steps,
# saved at 3 and 6: the processes meet at two saves and log twice.
EP_STEPS = 6
EP = {**RUN, "train.steps": EP_STEPS, "train.checkpoint_every": 3, "train.batch_size": 8, "model.moe.num_routed_experts": 32,
      "model.moe.num_shared_experts": 2, "model.moe.top_k": 6, "model.moe.expert_hidden": 16}
EP_EXCHANGE = {"model.moe.ep_exchange": "all_to_all", "model.moe.capacity_factor": 8.0}


@pytest.mark.slow
def test_two_processes_with_expert_parallelism_equal_one_device(tmp_path):
  """2 processes x 4 CPU devices (gloo), mesh expert=8: each process loads
  its half of every global batch, the token exchange and the gradient
  reductions cross the processes, both write the checkpoints; losses and
  parameters equal a one-device run."""
  one = tmp_path / "one"
  alone = _start_same_batches(tmp_path, one, log=f"{one}.log", overrides=EP)  # beside the two
  two = tmp_path / "two"
  port = _free_port()
  ep_mesh = {**EP, **EP_EXCHANGE, "mesh.data": 1, "mesh.expert": 8}
  procs = [_start_same_batches(tmp_path, two, f"--coordinator_address=127.0.0.1:{port}",
                               "--num_processes=2", f"--process_id={i}", log=f"{two}.{i}.log",
                               overrides=ep_mesh, devices=4)
           for i in range(2)]
  assert _finish(alone) == 0, open(f"{one}.log").read()[-3000:]
  rcs = [_finish(p) for p in procs]
  assert rcs == [0, 0], open(f"{two}.0.log").read()[-3000:] + open(f"{two}.1.log").read()[-3000:]
  assert "8 devices (mesh {'data': 1, 'fsdp': 1, 'expert': 8}), 2 processes" in \
      open(f"{two}.0.log").read()
  got, want = read_losses(two), read_losses(one)
  assert [s for s, _ in got] == [s for s, _ in want] == [3, 6]
  np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               _params(two, EP_STEPS, EP), _params(one, EP_STEPS, EP))


@pytest.mark.slow
def test_evaluate_script_on_a_saved_run(reference):
  """--workdir alone: the run's own config.json gives the config."""
  cmd = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), f"--workdir={reference}",
         f"--step={STEPS}"]
  res = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  with open(reference / f"eval_step{STEPS}.json") as f:
    result = json.load(f)
  with open(reference / "metrics.jsonl") as f:
    final = [json.loads(l) for l in f][-1]
  assert result["step"] == STEPS
  assert result["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-6)
  assert result["eval_perplexity"] == pytest.approx(np.exp(result["eval_loss"]), rel=1e-6)


def test_evaluate_script_without_checkpoints_is_one_error(tmp_path):
  res = subprocess.run(script_cmd("evaluate.py", tmp_path, RUN), cwd=ROOT, env=script_env(),
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 1
  assert f"no checkpoints in {tmp_path}/checkpoints" in res.stderr


def test_truncated_checkpoint_is_one_clear_error(reference, tmp_path):
  """A damaged checkpoint: exit 1, one error naming it, nothing deleted.
  (Run as a process: Orbax's abandoned reads report at interpreter exit.)"""
  import shutil
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  state_dir = workdir / "checkpoints" / str(STEPS) / "state"
  biggest = max((p for p in state_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
  before = sorted(os.listdir(workdir / "checkpoints"))
  res = subprocess.run(script_cmd("train.py", workdir, {**RUN, "train.steps": STEPS + 4}), cwd=ROOT,
                       env=script_env(), capture_output=True, text=True, timeout=300)
  assert res.returncode == 1
  last = res.stderr.rstrip("\n").split("\n")[-1]
  assert last.startswith(f"error: checkpoint {workdir}/checkpoints/{STEPS} cannot be "
                         "restored (truncated or corrupt?): "), res.stderr[-3000:]
  assert "Traceback" not in res.stderr + res.stdout
  assert "Exception ignored" not in res.stderr, res.stderr[-3000:]
  assert "tensorstore_spec" not in last and "'driver'" not in res.stderr  # no spec dump
  assert len(last) < 400, last
  assert sorted(os.listdir(workdir / "checkpoints")) == before
