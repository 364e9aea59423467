"""Plain helpers shared by the test files (fixtures are in conftest.py).

Every test file imports them one way: ``from tests.helpers import ...``
(tests/multidevice has a helpers.py of its own, so a bare ``import helpers``
would be ambiguous there).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np

import dsmoe
from dsmoe import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# configs/tiny.py's structure (dense layer 0, 2 shared + 30 routed experts,
# top-6) at dimensions that train in seconds. A constant learning rate after
# the warmup: the compiled train step then does not depend on train.steps, so
# runs of any length (in this process or in a script) share one compilation
# through the persistent cache (conftest.py). The paper's schedule is tested
# by itself (test_train.py) and in configs/tiny.py's own run (test_tiny_run.py).
SMALL = {"model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2,
         "model.dense_hidden": 64, "model.moe.fine_grained.ffn_hidden": 64,
         "data.seq_len": 32, "train.batch_size": 4, "train.warmup_steps": 5,
         "train.schedule": "constant", "train.log_every": 1, "train.eval_batches": 1,
         "train.peak_flops": 1e9}

# ---------------------------------------------------------------- configs


def load_config(name: str, arg=None):
  """A shipped config: configs/<name>.py -> get_config(arg)."""
  return dsmoe.load(name, arg)


def small_config(base: str = "tiny", **overrides):
  """`base` (configs/tiny.py) shrunk by SMALL, then `overrides`.

  Keys are dotted paths: ``small_config(**{"train.steps": 30})``. Setting any
  explicit MoE size (``model.moe.num_routed_experts`` ...) turns the paper's
  fine-grained form off, so all four sizes must then be given.
  """
  config = dsmoe.load(base)
  values = {**SMALL, **overrides}
  if any(k.startswith("model.moe.") and k.split(".")[-1] in config_lib.EXPLICIT_SIZES
         for k in overrides):
    values["model.moe.fine_grained.N"] = 0
  for key, value in values.items():
    node = config
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return config


def small_spec(**overrides):
  """The resolved spec of ``small_config(**overrides)``."""
  return dsmoe.resolve(small_config(**overrides))


def small_moe_spec(impl=None, *, shared=2, routed=6, top_k=2, hidden=8, d=16, init_std=0.3,
                   **moe):
  """The ModelSpec of a small config with explicit MoE sizes: `routed` experts
  (top-`top_k`) and `shared` ones of hidden `hidden`, d_model `d`; `impl` and
  `moe` set other ``model.moe`` keys (impl None: the config's default)."""
  sizes = dict(num_routed_experts=routed, num_shared_experts=shared, top_k=top_k,
               expert_hidden=hidden, **moe)
  if impl is not None:
    sizes["impl"] = impl
  return small_spec(**{"model.d_model": d, "model.init_std": init_std},
                    **{f"model.moe.{k}": v for k, v in sizes.items()}).model


# ---------------------------------------------------------------- oracles


def np_swiglu(x, wg, wu, wd):
  """SwiGLU FFN written out in numpy: (silu(x wg) * (x wu)) wd."""
  g, u = x @ wg, x @ wu
  return ((g / (1 + np.exp(-g))) * u) @ wd


def read_losses(workdir):
  """[(step, loss)] of the training records in workdir/metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


# ---------------------------------------------------------------- processes


def selected_params(request, test, argname):
  """The `argname` values of the selected cases of `test` (a parametrized
  test of the module asking), in order: for a module fixture that runs the
  processes of all of them at once."""
  prefix = f"{request.node.nodeid}::{test}["
  return [item.callspec.params[argname] for item in request.session.items
          if item.nodeid.startswith(prefix)]


def script_cmd(script, workdir, overrides, *extra, config=f"{ROOT}/configs/tiny.py"):
  """argv of scripts/<script> on `config` shrunk by SMALL, then `overrides`
  (dotted keys, as for small_config), then `extra` flags."""
  flags = [f"--config.{k}={v}" for k, v in {**SMALL, **overrides}.items()]
  return [sys.executable, str(ROOT / "scripts" / script), f"--config={config}",
          f"--workdir={workdir}", *flags, *extra]


def script_env(devices=None, **extra):
  """The environment of a test's script: this one on CPU, unbuffered, without
  DSMOE_DEBUG (which would add tracebacks); `devices` fake CPU devices."""
  env = {k: v for k, v in os.environ.items() if k != "DSMOE_DEBUG"}
  env.update({"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"})
  if devices is not None:  # beside the suite's own flags (conftest.py)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
  env.update(extra)
  return env


class EarlyRun:
  """A command started now, its output going to files, for a test that waits
  for it later (the ``early`` marker, tests/conftest.py)."""

  def __init__(self, cmd, **popen):
    self.folder = pathlib.Path(tempfile.mkdtemp(prefix="dsmoe-early-"))
    self._out = open(self.folder / "stdout", "w+")  # pylint: disable=consider-using-with
    self._err = open(self.folder / "stderr", "w+")  # pylint: disable=consider-using-with
    self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=self._err, text=True, **popen)

  def result(self, timeout) -> subprocess.CompletedProcess:
    """Waits for the command (killing it after `timeout` s) and returns it."""
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      raise
    return subprocess.CompletedProcess(self.proc.args, self.proc.returncode,
                                       (self.folder / "stdout").read_text(),
                                       (self.folder / "stderr").read_text())

  def kill(self):
    """Stops the command if it still runs and removes its output files."""
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
    self._out.close()
    self._err.close()
    shutil.rmtree(self.folder, ignore_errors=True)


# ---------------------------------------------------------------- data

WORDS = ("alpha", "beta", "gamma", "délta", "ε", "zeta\tz", "日本", "x", "  ", "y\n")
# ASCII words the byte-level BPE of tests/hf_checkpoints.py was trained on.
ASCII_WORDS = ("alpha", "beta", "gamma", "the", "cat", "sat", "on", "mat", "x", "y\n")


def text_config(tmp_path, text_dir, **data):
  """A base config reading the text files of `text_dir` (cache in
  tmp_path/cache) with the byte tokenizer, 32-token rows of batch 4, a
  quarter of the files for validation; `data` sets other ``data`` keys."""
  c = config_lib.base_config()
  c.model.vocab_size = 256
  c.data.update(dict(text_dir=str(text_dir), data_dir=str(tmp_path / "cache"),
                     tokenizer="bytes", seq_len=32, validation_percent=25.0))
  c.data.update(data)
  c.train.batch_size = 4
  c.train.seed = 3
  return c


def write_corpus(folder, n_files=24, seed=0, words=(5, 80), vocab=WORDS):
  """`n_files` .txt files (in three subfolders) of `words` (low, high) random
  words of `vocab` (by default some non-ASCII), each ending "end<i>\\n";
  returns {relpath: text}."""
  folder = pathlib.Path(folder)
  rng = np.random.default_rng(seed)
  texts = {}
  for i in range(n_files):
    rel = os.path.join(f"d{i % 3}", f"f{i:03d}.txt")
    n = int(rng.integers(*words))
    texts[rel] = " ".join(rng.choice(list(vocab), n)) + f" end{i}\n"
    os.makedirs(folder / os.path.dirname(rel), exist_ok=True)
    (folder / rel).write_text(texts[rel], encoding="utf-8")
  return texts
