"""A converted model in the trainer (train.init_from), evaluator and generator,
and a fine-tuned run exported back to the HF layout."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import dsmoe
from dsmoe import generate as gen
from dsmoe.data.evalset import make_eval_set
from dsmoe.interop import hf
from dsmoe.train import checkpoint as checkpoint_lib
from dsmoe.parallel.mesh import make_mesh
from dsmoe.train import optimizer as optimizer_lib
from dsmoe.train import state as state_lib
from dsmoe.train import train_and_evaluate
from dsmoe.train.evaluation import evaluate_checkpoint
from tests import hf_checkpoints as hc
from tests.helpers import ASCII_WORDS, ROOT, write_corpus


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A converted tiny model with a tokenizer.json, and a text corpus."""
  root = tmp_path_factory.mktemp("hf_ft")
  folder, _, _ = hc.make(str(root / "hf"), seed=7, vocab_size=320)
  hc.write_tokenizer(folder)
  write_corpus(root / "text", n_files=30, words=(20, 80), vocab=ASCII_WORDS)
  return str(root), hf.convert(folder, str(root / "model"))


def ft_config(root, model, **train):
  config = dsmoe.load("configs/hf.py", model)
  config.data.update(dict(text_dir=os.path.join(root, "text"), data_dir=os.path.join(root, "tfds"),
                          seq_len=32, validation_percent=25.0))
  config.train.update(dict(batch_size=4, steps=2, log_every=1, checkpoint_every=2,
                           eval_batches=1, peak_flops=1e9, learning_rate=1e-3,
                           warmup_steps=1, **train))
  return config


def flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_configs_hf_reads_the_model_folder(model_dir):
  root, model = model_dir
  config = ft_config(root, model)
  assert config.train.init_from == os.path.abspath(model)
  assert (config.data.tokenizer, config.data.add_bos) == ("hf", True)
  assert config.model.moe.num_shared_experts == 2 and config.model.param_dtype == "float32"
  with pytest.raises(ValueError, match="configs/hf.py:PATH"):
    dsmoe.load("configs/hf.py")


def test_training_starts_from_the_converted_params(model_dir, tmp_path):
  root, model = model_dir
  config = ft_config(root, model)
  spec = dsmoe.resolve(config)
  tx = optimizer_lib.make_optimizer(spec.train)
  workdir = str(tmp_path / "run")
  ckpts = checkpoint_lib.Checkpoints(workdir)
  _, state, _ = state_lib.init_or_restore(spec, tx, ckpts, make_mesh(spec.mesh), None)
  _, lm = hf.load_hf(model)
  start = flat(state["params"])
  assert start.keys() == flat(lm.params).keys()
  assert all(np.array_equal(start[k], x) for k, x in flat(lm.params).items())
  assert int(state["step"]) == 0
  assert all(not np.any(x) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0)
  ckpts.close()

  result = train_and_evaluate(config, workdir)
  assert result["step"] == 2 and np.isfinite(result["eval_loss"])
  trained = flat(result["state"]["params"])
  moved = max(float(np.abs(trained[k] - start[k]).max()) for k in start)
  assert 0 < moved < 0.01  # two small AdamW steps from the converted params

  # A run with checkpoints resumes from them; init_from no longer applies.
  ckpts = checkpoint_lib.Checkpoints(workdir)
  _, resumed, _ = state_lib.init_or_restore(spec, tx, ckpts, make_mesh(spec.mesh), None)
  ckpts.close()
  assert int(resumed["step"]) == 2
  k = next(iter(trained))
  np.testing.assert_array_equal(flat(resumed["params"])[k], trained[k])

  # The generator reads the run's checkpoint; its export loads back the same model.
  run_lm = gen.CausalLM.from_run(config, workdir)
  tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
  out = hf.export_run(config, workdir, str(tmp_path / "exported"))
  with open(os.path.join(out, "config.json")) as f:
    exported = json.load(f)
  with open(os.path.join(model, "config.json")) as f:
    assert exported == json.load(f)
  assert os.path.isfile(os.path.join(out, "tokenizer.json"))
  _, back = hf.load_hf(out)
  np.testing.assert_array_equal(back(tokens), run_lm(tokens))
  assert np.abs(np.asarray(back(tokens)) - np.asarray(lm(tokens))).max() > 0


def test_evaluator_scores_the_init_from_params(model_dir, tmp_path):
  root, model = model_dir
  config = ft_config(root, model)
  workdir = str(tmp_path / "fresh")
  result = evaluate_checkpoint(config, workdir)
  assert result["step"] == 0 and result["checkpoint"] == os.path.abspath(model)
  # The same loss from load_hf and a numpy cross-entropy on the same rows.
  eval_set = make_eval_set(dsmoe.resolve(config))
  _, lm = hf.load_hf(model)
  nll_sum, tokens = 0.0, 0.0
  for batch in eval_set.batches(config.train.batch_size, config.train.eval_batches,
                                process_index=0, process_count=1):
    logits = np.asarray(lm(batch["inputs"], batch["positions"]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    mask = batch["segment_ids"] > 0
    nll_sum, tokens = nll_sum + nll[mask].sum(), tokens + mask.sum()
  np.testing.assert_allclose(result["eval_loss"], nll_sum / tokens, rtol=1e-5)
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_generate_script_with_configs_hf(model_dir):
  root, model = model_dir
  env = dict(os.environ, JAX_PLATFORMS="cpu",
           PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  run = subprocess.run(
      [sys.executable, str(ROOT / "scripts/generate.py"), f"--config=configs/hf.py:{model}",
       "--prompt", "the mat", "--max_new_tokens", "4"],
      capture_output=True, text=True, env=env, timeout=300, cwd=str(ROOT))
  assert run.returncode == 0, run.stderr
  texts, _ = hf.load_text_model(model).complete(["the mat"], max_new_tokens=4)
  assert run.stdout.split("\n")[0].startswith("the mat" + texts[0])
  del root
