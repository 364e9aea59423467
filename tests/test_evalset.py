"""The fixed evaluation set (dsmoe.data.evalset) and evaluation on it.

Oracles: documents' token ids cut by hand, standard errors from numpy
formulas, and per-document losses from the model run on one row at a time
with a numpy log-softmax.
"""

import jax
import numpy as np
import pytest
from flax import nnx

import dsmoe
from dsmoe.data import evalset
from dsmoe.model import Transformer
from dsmoe.train import evaluation
from dsmoe.parallel.mesh import make_mesh
from tests.helpers import load_config, small_config

SEQ = 8


def encode(text):
  """A toy tokenizer: one id per character (1..), EOS = 2 appended."""
  return np.asarray([3 + (ord(c) % 50) for c in text] + [2], np.int32)


def texts(n=7, seed=0):
  rng = np.random.default_rng(seed)
  return [(f"doc{i}", "".join(rng.choice(list("abcdefgh"), int(rng.integers(3, 40)))))
          for i in range(n)]


def test_rows_hold_each_document_once_with_caps():
  docs = texts()
  es = evalset.build_eval_set(docs, encode, seq_len=SEQ, max_tokens=60, max_doc_tokens=20)
  expected, left = {}, 60
  for name, text in docs:  # the oracle: cut by hand
    if left <= 0:
      break
    ids = encode(text)
    take = min(len(ids) - 1, 20, left)
    expected[name] = (ids[:take], ids[1:take + 1])
    left -= take
  assert es.names == tuple(expected)
  assert es.tokens == sum(len(t) for _, t in expected.values()) == 60
  for d, (inputs, targets) in enumerate(expected.values()):
    rows = np.flatnonzero(es.doc_r == d)
    # the document's rows (in any order) are its consecutive chunks of SEQ tokens
    for key, ids in [("targets", targets), ("inputs", inputs)]:
      have = sorted(tuple(getattr(es, key)[r][es.segment_ids[r] > 0]) for r in rows)
      assert have == sorted(tuple(ids[i:i + SEQ]) for i in range(0, len(ids), SEQ))
    for r in rows:  # positions restart at each row; padding only at the end
      n = int((es.segment_ids[r] > 0).sum())
      assert list(es.positions[r][:n]) == list(range(n))
      assert not es.segment_ids[r][n:].any()


def test_batches_cover_every_row_once_and_split_between_processes():
  es = evalset.build_eval_set(texts(12), encode, seq_len=SEQ, max_tokens=10**6,
                              max_doc_tokens=10**6)
  whole = list(es.batches(4))
  assert len(whole) == -(-es.num_rows // 4)
  inputs = np.concatenate([b["inputs"] for b in whole])
  assert np.array_equal(inputs[:es.num_rows], es.inputs)
  assert not np.concatenate([b["segment_ids"] for b in whole])[es.num_rows:].any()
  halves = [list(es.batches(4, process_index=p, process_count=2)) for p in range(2)]
  for i, b in enumerate(whole):
    assert np.array_equal(np.concatenate([halves[0][i]["doc"], halves[1][i]["doc"]]), b["doc"])
  assert len(list(es.batches(4, 2))) == 2


def test_mean_and_se_by_hand():
  # Equal document sizes: the ratio is the mean of the document means and the
  # s.e. is their sample std / sqrt(D).
  means = np.array([2.0, 2.5, 3.5, 4.0])
  loss, se = evalset.mean_and_se(means * 10, np.full(4, 10.0))
  assert loss == pytest.approx(means.mean())
  assert se == pytest.approx(means.std(ddof=1) / 2)
  # Unequal sizes, by the formula written out: r = 12/6 = 2;
  # residuals (3-2, 9-8) -> sqrt(2/1 * (1 + 1)) / 6.
  loss, se = evalset.mean_and_se([3.0, 9.0, 0.0], [2.0, 4.0, 0.0])
  assert loss == pytest.approx(2.0)
  assert se == pytest.approx(2.0 / 6)


def test_document_sums_match_the_model_row_by_row():
  config = dsmoe.resolve(small_config())
  model = Transformer(config.model, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  es = evalset.build_eval_set(texts(5), encode, seq_len=SEQ, max_tokens=10**6,
                              max_doc_tokens=25)
  loss_d, tokens_d = evaluation.score(graphdef, params, rest, es, make_mesh(), batch_size=4)
  forward = jax.jit(lambda p, r, *row: nnx.merge(graphdef, p, r)(*row, train=False)[0])
  want_loss, want_tokens = np.zeros(es.num_docs), np.zeros(es.num_docs)
  for r in range(es.num_rows):  # one row at a time, numpy log-softmax
    logits = forward(params, rest, es.inputs[r:r + 1], es.segment_ids[r:r + 1],
                     es.positions[r:r + 1])
    logits = np.asarray(logits[0], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    mask = es.segment_ids[r] > 0
    want_loss[es.doc_r[r]] -= logp[np.arange(SEQ), es.targets[r]][mask].sum()
    want_tokens[es.doc_r[r]] += mask.sum()
  np.testing.assert_allclose(loss_d, want_loss, rtol=2e-5)
  np.testing.assert_array_equal(tokens_d, want_tokens)


@pytest.mark.slow
def test_ablation_eval_set_is_identical_for_every_variant_and_seed(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("evalset") / "tfds")
  sets = []
  for variant, seed in [("gshard", 0), ("deepseekmoe", 7)]:
    c = load_config("ablation", variant)
    c.data.data_dir, c.train.seed = data_dir, seed
    sets.append(evalset.make_eval_set(dsmoe.resolve(c)))
  a, b = sets
  assert a.fingerprint == b.fingerprint
  assert np.array_equal(a.targets, b.targets) and a.names == b.names
  assert a.tokens >= 250_000  # the promised size ...
  assert a.num_docs >= 50  # ... across many held-out files
  counts = np.bincount(a.doc_r, weights=(a.segment_ids > 0).sum(-1))
  assert counts.max() <= c.data.eval_doc_tokens
