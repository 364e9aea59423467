"""Generation: KV-cache decoding against uncached decoding, positions, sampling."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsmoe
from dsmoe import generate as gen
from dsmoe.interop import hf
from dsmoe.model import Transformer
from tests.helpers import ASCII_WORDS, ROOT, small_config, write_corpus


@pytest.fixture(scope="module")
def lm():
  spec = dsmoe.resolve(small_config(**{"model.vocab_size": 64, "model.init_std": 0.3}))
  return gen.CausalLM.from_module(Transformer(spec.model, rngs=nnx.Rngs(0)))


def greedy_uncached(lm, prompt, n, width=32):
  """A full forward pass over the whole sequence for every new token (zero
  padded to `width` so it compiles once: causal, the padding is never seen)."""
  seq = list(prompt)
  for _ in range(n):
    buf = np.zeros((1, width), np.int32)
    buf[0, :len(seq)] = seq
    seq.append(int(np.argmax(np.asarray(lm(buf))[0, len(seq) - 1])))
  return seq[len(prompt):]


PROMPTS = [[5, 9, 3], [7, 1, 2, 8, 8, 4, 11], [60]]


def test_cached_decoding_equals_uncached_token_for_token(lm):
  out = gen.generate(lm, PROMPTS, max_new_tokens=10)
  for prompt, tokens in zip(PROMPTS, out.tokens):
    assert tokens == greedy_uncached(lm, prompt, 10)
  assert out.stopped == [False] * 3
  # Enough distinct tokens that a position or cache bug could not go unseen.
  assert len({t for row in out.tokens for t in row}) > 5


def test_lowered_decode_program_is_the_one_generate_runs(lm):
  """lower_generate (what scripts/aot_compile.py --step=decode compiles),
  compiled here and run on real parameters, gives generate's tokens."""
  from dsmoe.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  compiled = gen.lower_generate(lm.spec, make_mesh(), batch=3, prompt_len=7,
                                max_new_tokens=10).compile()
  tokens = np.zeros((3, 16), np.int32)  # prompts padded to 16, as generate pads them
  for row, prompt in zip(tokens, PROMPTS):
    row[:len(prompt)] = prompt
  stop = np.full((gen.MAX_STOP_TOKENS,), -1, np.int32)
  out, end, _ = compiled(lm.params, lm.rest, tokens, np.array([3, 7, 1], np.int32),
                         np.int32(10), stop, np.int32(2**31 - 1), jax.random.key(0))
  want = gen.generate(lm, PROMPTS, max_new_tokens=10).tokens
  assert [np.asarray(out)[i, len(p):int(end[i])].tolist() for i, p in enumerate(PROMPTS)] == want


def test_each_row_continues_right_after_its_own_prompt(lm):
  """A short prompt batched with a long one decodes as it does alone, and the
  first decode step at position L (not the padded length) equals the full
  forward pass; any other position gives other logits."""
  batched = gen.generate(lm, PROMPTS, max_new_tokens=6).tokens
  for prompt, tokens in zip(PROMPTS, batched):
    assert tokens == gen.generate(lm, [prompt], max_new_tokens=6).tokens[0]
  model = lm.module()
  extend = nnx.jit(lambda m, tokens, positions, caches: m.extend(tokens, positions, caches))
  prompt, nxt = PROMPTS[0], 17
  padded = jnp.array([prompt + [0] * 13])  # P = 16 slots, L = 3
  _, caches = extend(model, padded, jnp.arange(16)[None], model.init_cache(1, 32))
  want = np.asarray(lm(np.array([prompt + [nxt]])))[0, -1]

  def step_at(pos):
    return np.asarray(extend(model, jnp.array([[nxt]]), jnp.array([[pos]]), caches)[0])[0, 0]
  np.testing.assert_allclose(step_at(len(prompt)), want, rtol=1e-5, atol=1e-5)
  for wrong in (len(prompt) + 1, 16):
    assert np.abs(step_at(wrong) - want).max() > 1e-3


def test_prefill_logits_equal_the_forward_pass(lm):
  tokens = jnp.array([[3, 1, 4, 1, 5, 9, 2, 6]])
  model = lm.module()
  extend = nnx.jit(lambda m, tokens, positions, caches: m.extend(tokens, positions, caches))
  logits, _ = extend(model, tokens, jnp.arange(8)[None], model.init_cache(1, 16))
  np.testing.assert_allclose(logits, lm(tokens), rtol=1e-5, atol=1e-5)


def test_prefill_with_scanned_layers_equals_the_forward_pass():
  """Decoding runs the stacked MoE layers of model.scan_layers one by one:
  each layer's slice must be used (a decoder that skipped the stacked layers
  or reused one slice would differ)."""
  spec = dsmoe.resolve(small_config(**{"model.vocab_size": 64, "model.init_std": 0.3,
                                       "model.scan_layers": True, "model.num_layers": 3}))
  model = Transformer(spec.model, rngs=nnx.Rngs(1))
  assert len(model.blocks) < spec.model.num_layers  # some layers are stacked
  tokens = jnp.array([[3, 1, 4, 1, 5, 9, 2, 6]])
  extend = nnx.jit(lambda m, tokens, positions, caches: m.extend(tokens, positions, caches))
  logits, caches = extend(model, tokens, jnp.arange(8)[None], model.init_cache(1, 16))
  assert len(caches) == spec.model.num_layers
  want, _ = nnx.jit(lambda m, t: m(t, train=False))(model, tokens)
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


def test_no_recompilation_per_token_or_prompt(lm):
  gen.generate(lm, [[1, 2, 3], [4]], max_new_tokens=3)
  before = gen._generate._cache_size()
  # Other prompts, lengths and token counts in the same buckets (P=16, U=32).
  gen.generate(lm, [[9, 9, 9, 9, 9], [7, 7]], max_new_tokens=12)
  gen.generate(lm, [[1], [2, 3, 4, 5, 6, 7, 8, 9, 10]], max_new_tokens=5,
               sampling=gen.Sampling())
  assert gen._generate._cache_size() == before


def test_stop_tokens_end_a_row(lm):
  free = gen.generate(lm, PROMPTS, max_new_tokens=8).tokens
  stop = free[1][3]  # row 1 stops at its 4th new token (or earlier if repeated)
  out = gen.generate(lm, PROMPTS, max_new_tokens=8, stop_tokens=(stop,))
  for row, tokens, stopped in zip(free, out.tokens, out.stopped):
    if stop in row:
      assert tokens == row[:row.index(stop)] and stopped
    else:
      assert tokens == row and not stopped


def test_num_allowed_keeps_ids_below_it(lm):
  free = gen.generate(lm, PROMPTS, max_new_tokens=8).tokens
  assert max(max(t) for t in free) >= 10
  limited = gen.generate(lm, PROMPTS, max_new_tokens=8, num_allowed=10).tokens
  assert max(max(t) for t in limited) < 10 and all(len(t) == 8 for t in limited)


def test_max_len_caps_prompt_plus_new_tokens(lm):
  out = gen.generate(lm, PROMPTS, max_new_tokens=50, max_len=10)
  assert [len(t) for t in out.tokens] == [3] * 3
  with pytest.raises(ValueError, match="max_len"):
    gen.generate(lm, PROMPTS, max_new_tokens=5, max_len=7)


def _draws(logits, sampling, n=4000):
  keys = jax.random.split(jax.random.key(0), n)
  rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
  return np.asarray(jax.vmap(lambda k, l: gen.sample(l[None], k, sampling)[0])(keys, rows))


def test_sampling_filters_and_temperature():
  logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
  assert gen.sample(jnp.asarray([logits, logits[::-1]]), jax.random.key(0),
                    gen.Sampling()).tolist() == [0, 3]
  top_k = _draws(logits, gen.Sampling(temperature=1.0, top_k=2))
  assert set(top_k) == {0, 1}
  np.testing.assert_allclose(np.mean(top_k == 0), 0.5 / 0.8, atol=0.03)
  # top_p 0.7: tokens 0 (0.5) and 1 (0.3) make the nucleus; 0.5 < 0.7 alone.
  top_p = _draws(logits, gen.Sampling(temperature=1.0, top_p=0.7))
  assert set(top_p) == {0, 1}
  assert set(_draws(logits, gen.Sampling(temperature=1.0, top_p=0.4))) == {0}
  hot = _draws(logits, gen.Sampling(temperature=2.0))
  want = np.exp(logits / 2) / np.exp(logits / 2).sum()
  np.testing.assert_allclose(np.bincount(hot, minlength=4) / len(hot), want, atol=0.03)


def test_sampling_rejects_bad_settings():
  for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
    with pytest.raises(ValueError):
      gen.Sampling(**bad)


def test_generate_script_on_an_hf_folder(tmp_path):
  from tests import hf_checkpoints as hc
  folder, cfg, _ = hc.make(str(tmp_path / "hf"), vocab_size=320)
  hc.write_tokenizer(folder)
  text = hf.load_text_model(folder)
  assert (text.tokenizer.bos_id, text.stop_tokens) == (1, (2,))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
           PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  cmd = [sys.executable, str(ROOT / "scripts/generate.py"), "--hf", folder,
         "--prompt", "the cat", "--prompt", "a mat", "--max_new_tokens", "5"]
  run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert run.returncode == 0, run.stderr
  texts, _ = text.complete(["the cat", "a mat"], max_new_tokens=5)
  lines = run.stdout.split("\n")  # (not splitlines: random text holds \x1d etc.)
  assert lines[0].startswith("the cat" + texts[0]) and lines[2].startswith("a mat" + texts[1])
  bad = subprocess.run(cmd[:2] + ["--hf", str(tmp_path / "nope"), "--prompt", "x"],
                       capture_output=True, text=True, env=env, timeout=300)
  assert bad.returncode == 1 and bad.stderr.strip().startswith("error:")
  assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
  del cfg


def test_text_model_from_init_from_with_the_runs_sentencepiece(tmp_path, lm):
  """A config's own tokenizer (SentencePiece trained on its corpus) and the
  params of train.init_from, without a workdir."""
  from dsmoe import params_io
  write_corpus(tmp_path / "text", n_files=30, words=(20, 80), vocab=ASCII_WORDS)
  config = small_config(**{"model.vocab_size": 64, "model.init_std": 0.3})
  config.model.vocab_size = 320
  config.data.update(dict(text_dir=str(tmp_path / "text"), data_dir=str(tmp_path / "tfds"),
                          vocab_size=300, validation_percent=25.0))
  spec = dsmoe.resolve(config)
  model = gen.CausalLM.from_module(Transformer(spec.model, rngs=nnx.Rngs(1)))
  tree = jax.tree.map(lambda x: params_io.LazyArray(x.shape, np.dtype(x.dtype),
                                                    lambda x=x: np.asarray(x)), model.params)
  params_io.save_streaming(str(tmp_path / "params"), tree)
  config.train.init_from = str(tmp_path / "params")
  text = gen.TextModel.from_run(config)
  assert text.tokenizer.vocab_size == 300 and text.stop_tokens == (2,)
  texts, out = text.complete(["alpha beta", "gamma"], max_new_tokens=6)
  direct = gen.generate(model, [[1, *text.tokenizer.encode(p)] for p in ("alpha beta", "gamma")],
                        max_new_tokens=6, stop_tokens=(2,), num_allowed=300)
  assert out.tokens == direct.tokens and max(max(t) for t in out.tokens) < 300
  assert texts == [text.tokenizer.decode(t) for t in direct.tokens]
