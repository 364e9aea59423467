"""Expert-specialisation analyses (dsmoe.analysis.experts, scripts/analyze_experts.py).

Oracles: numpy sorts and SwiGLU written here, a numpy copy of the hash
router, and the plain evaluation of the same checkpoint.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsmoe
from dsmoe.analysis import experts
from dsmoe.data import evalset
from dsmoe.model import Transformer
from dsmoe.model.router import gates
from dsmoe.parallel.mesh import make_mesh
from tests.helpers import ROOT, np_swiglu, small_config
from tests.test_evalset import encode, texts

SEQ = 8


def trained_of(config, seed=0, **changes) -> experts.Trained:
  """A randomly initialised model as a `Trained` over a toy evaluation set."""
  spec = dsmoe.resolve(config).model
  model = Transformer(spec, rngs=nnx.Rngs(seed))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  es = evalset.build_eval_set(texts(6), encode, seq_len=SEQ, max_tokens=10**6,
                              max_doc_tokens=30)
  return experts.Trained(spec, nnx.to_pure_dict(params), nnx.to_pure_dict(rest), make_mesh(),
                         es, batch_size=4, **changes)


def test_skip_top_gates_are_the_next_ranks():
  scores = np.random.default_rng(0).random((2, 3, 10)).astype(np.float32)
  idx, weight = gates(scores, 3, norm_topk_prob=False, routed_scaling_factor=1.0, skip_top=2)
  order = np.argsort(-scores, axis=-1)
  np.testing.assert_array_equal(idx, order[..., 2:5])
  np.testing.assert_allclose(weight, np.take_along_axis(scores, order[..., 2:5], -1))


def test_swapped_shared_expert_equals_numpy_top_k_plus_one():
  """No shared expert, top-(K+1): the MoE of the rebuilt model = numpy routing."""
  trained = trained_of(small_config())  # tiny structure: 2 shared + top-6 of 30
  moe = trained.moe
  graphdef, params, rest = experts.rebuild(trained, num_shared_experts=0, top_k=moe.top_k + 1)
  model = nnx.merge(graphdef, params, rest)
  block = model.blocks[1].ffn
  assert block.shared is None and not any("shared" in str(p) for p in
                                          jax.tree_util.tree_leaves_with_path(params))
  x = np.random.default_rng(1).normal(size=(1, 5, trained.spec.d_model)).astype(np.float32)
  y = nnx.jit(lambda m, x: m(x, None, train=False)[0])(block, jnp.asarray(x))
  p = trained.params["blocks"][1]["ffn"]  # the trained weights, read directly
  logits = x[0] @ np.asarray(p["router"]["w_de"])
  s = np.exp(logits - logits.max(-1, keepdims=True))
  s /= s.sum(-1, keepdims=True)
  want = np.zeros_like(x[0])
  for t in range(5):
    for e in np.argsort(-s[t])[:moe.top_k + 1]:
      want[t] += s[t, e] * np_swiglu(x[0, t], *(np.asarray(p[w])[e] for w in
                                                ("w_gate_edf", "w_up_edf", "w_down_efd")))
  np.testing.assert_allclose(np.asarray(y[0]), want, rtol=1e-4, atol=1e-6)


def test_rebuild_refuses_a_change_of_parameter_shapes():
  with pytest.raises(ValueError, match="needs other parameters"):
    experts.rebuild(trained_of(small_config()), num_routed_experts=7)


def test_moe_inputs_are_what_each_moe_layer_sees():
  """With every expert zeroed a MoE block adds nothing, so its input is the
  pre-norm of the block's output."""
  trained = trained_of(small_config(**{"model.num_layers": 3}))
  zero = jax.tree_util.tree_map_with_path(
      lambda path, a: np.zeros_like(a) if any(getattr(k, "key", None) in (
          "w_down_efd", "w_down_fd") and "ffn" in str(path) for k in path) else a,
      trained.params)
  graphdef, _, rest = experts.rebuild(trained)
  batch = next(trained.eval_set.batches(4))

  @jax.jit
  def both(params, batch):
    model = nnx.merge(graphdef, params, rest)
    x = model.embed(batch["inputs"], jnp.float32)
    want = []
    for block in model.blocks:
      x, _, _ = block(x, batch["inputs"], batch["segment_ids"], batch["positions"], train=False)
      if block.is_moe:
        want.append(block.ffn_norm(x))
    return experts.moe_inputs(model, batch), want

  got, want = both(zero, batch)
  assert len(got) == len(want) == 2
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_expert_load_of_the_hash_router_counts_token_ids():
  config = small_config(**{"model.moe.router": "hash", "model.moe.fine_grained.K": 1,
                           "model.moe.fine_grained.m": 1, "model.moe.fine_grained.K_s": 0,
                           "model.moe.fine_grained.N": 8})
  trained = trained_of(config)
  load = experts.expert_load(trained, num_batches=2)
  tokens = []
  for b in trained.eval_set.batches(4, 2):
    tokens.append(b["inputs"][b["segment_ids"] > 0])
  h = np.concatenate(tokens).astype(np.uint64) * 2654435761 % 2**32  # numpy hash router
  h = (h ^ (h >> 16)) % 8
  want = np.bincount(h.astype(int), minlength=8) / len(h)
  assert load.shape == (1, 8)  # one MoE layer (layer 0 is dense in tiny)
  np.testing.assert_allclose(load[0], want, rtol=1e-6)


def test_redundancy_of_copied_and_negated_experts():
  rng = np.random.default_rng(0)
  wg, wu, wd = (rng.normal(size=s).astype(np.float32) for s in ((4, 6, 5), (4, 6, 5), (4, 5, 6)))
  wg[1], wu[1], wd[1] = wg[0], wu[0], wd[0]  # expert 1 copies expert 0
  wg[2], wu[2], wd[2] = wg[0], wu[0], -wd[0]  # expert 2 is its negation
  u = rng.normal(size=(50, 6)).astype(np.float32)
  out = experts._output_similarity(wg, wu, wd, u)  # pylint: disable=protected-access
  y = np.stack([np_swiglu(u, wg[e], wu[e], wd[e]) for e in range(4)])
  y /= np.linalg.norm(y, axis=-1, keepdims=True)
  cos = np.einsum("etd,ftd->ef", y, y) / 50
  off = cos[~np.eye(4, dtype=bool)].reshape(4, 3)
  assert cos[0, 1] == pytest.approx(1.0, abs=1e-5) and cos[0, 2] == pytest.approx(-1.0, abs=1e-5)
  assert out["mean_pairwise_cosine"] == pytest.approx(off.mean(), abs=1e-5)
  assert out["mean_nearest_cosine"] == pytest.approx(off.max(-1).mean(), abs=1e-5)


def test_disabling_or_changing_needs_a_learned_router():
  config = small_config(**{"model.moe.router": "hash", "model.moe.fine_grained.K": 1,
                           "model.moe.fine_grained.m": 1, "model.moe.fine_grained.K_s": 0})
  with pytest.raises(ValueError, match="learned router"):
    experts.disable_top(trained_of(config))


@pytest.mark.slow
def test_analyze_experts_on_a_checkpoint(tmp_path):
  """Disabling 0 experts reproduces the plain evaluation of the checkpoint
  exactly; the script writes every output. The two script runs overlap the
  work in this process (each starts as soon as what it reads exists)."""
  from dsmoe.train import evaluation, train_and_evaluate  # pylint: disable=g-import-not-at-top
  script = [sys.executable, str(ROOT / "scripts" / "analyze_experts.py")]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  missing = subprocess.Popen([*script, f"--workdir={tmp_path / 'nothing'}"], text=True, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  config = small_config(**{"train.steps": 3, "train.checkpoint_every": 3,
                           "data.eval_tokens": 2048, "data.eval_doc_tokens": 256,
                           "data.data_dir": str(tmp_path / "tfds")})
  run = tmp_path / "run"
  train_and_evaluate(config, str(run))  # writes the config.json the script reads
  out = tmp_path / "analysis"
  proc = subprocess.Popen(
      [*script, f"--workdir={run},{run}", "--names=a,b", f"--out={out}", "--eval_batches=2",
       "--redundancy_tokens=64"], text=True, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE)
  plain = evaluation.evaluate_checkpoint(config, str(run), full=True)
  trained = experts.load_trained(config, str(run))
  (zero,) = experts.disable_top(trained, ratios=[0])
  assert zero["loss"] == plain["eval_loss"] and zero["se"] == plain["eval_loss_se"]
  (one,) = experts.disable_top(trained, ratios=[0.25])
  assert one["disabled"] == 8 and one["loss"] != plain["eval_loss"]

  _, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  result = json.loads((out / "experts.json").read_text())
  assert set(result) == {"a", "b"}
  for key in ("baseline", "disable_top", "vary_top_k", "swap_shared", "expert_load",
              "redundancy"):
    assert result["a"][key], key
  assert np.asarray(result["a"]["expert_load"]).shape == (1, 30)  # one MoE layer
  table = (out / "experts.md").read_text()
  base = result["a"]["baseline"]["loss"]
  assert f"| a | {base:.4f} +- " in table and "k=1: " in table
  for png in ("experts.png", "expert_load.png"):
    assert (out / png).read_bytes()[:4] == b"\x89PNG"
  _, stderr = missing.communicate(timeout=600)
  assert missing.returncode == 1 and "config.json" in stderr
  assert "Traceback" not in stderr
