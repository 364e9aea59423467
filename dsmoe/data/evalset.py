"""The fixed held-out evaluation set: the same token rows for every run.

::

    validation split (held out by file; docs/DATA.md)
      -> documents in a fixed random order (numpy seed 0, not train.seed)
      -> each document: [BOS] tokens EOS, at most data.eval_doc_tokens scored
         tokens (so many files contribute, not a few long ones)
      -> until data.eval_tokens tokens are scored (the last document is cut)
      -> each document cut into rows of data.seq_len (its last row padded:
         segment id 0), positions restarting at each row, as in training
      -> rows in a fixed random order (seed 0), so any prefix of the rows is
         a sample spread over the documents: the first train.eval_batches
         batches are the fixed subset scored during training.

Nothing depends on the model, `train.seed` or the process count, so every
variant and seed of an ablation is scored on identical tokens (the
`fingerprint` says so). Each row belongs to one document (`doc_r`), which is
what the standard error is computed over: see :func:`mean_and_se`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from typing import Iterator

import numpy as np

from dsmoe.data import sources
from dsmoe.data.pipeline import Encode, make_tokenizer
from dsmoe.errors import ConfigError, DataError

SEED = 0  # fixed: the set never depends on train.seed


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """Rows [R, L] of int32 (inputs, targets, segment_ids, positions), `doc_r`
  [R] the document of each row, and `names` [D] the documents' names."""
  inputs: np.ndarray
  targets: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  doc_r: np.ndarray
  names: tuple[str, ...]

  @property
  def num_docs(self) -> int:
    return len(self.names)

  @property
  def num_rows(self) -> int:
    return int(self.inputs.shape[0])

  @property
  def tokens(self) -> int:
    """Scored tokens (segment id > 0)."""
    return int(np.sum(self.segment_ids > 0))

  @property
  def fingerprint(self) -> str:
    """sha256 of the rows and document names: equal sets, equal fingerprints."""
    h = hashlib.sha256()
    for a in (self.inputs, self.targets, self.segment_ids, self.positions, self.doc_r):
      h.update(np.ascontiguousarray(a, np.int32).tobytes())
    h.update("\0".join(self.names).encode())
    return h.hexdigest()

  def num_batches(self, batch_size: int) -> int:
    return math.ceil(self.num_rows / batch_size)

  def batches(self, batch_size: int, num_batches: int | None = None, *,
              process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """This process's rows of the first `num_batches` global batches (all: None).

    Each global batch has `batch_size` rows (process p holds rows
    [p B/P, (p+1) B/P)); the last one is padded with empty rows (segment id
    0, document 0), which score nothing. Keys: inputs, targets, segment_ids,
    positions [B/P, L] and doc [B/P].
    """
    if batch_size % process_count:
      raise ConfigError(f"train.batch_size={batch_size} must be divisible by the "
                       f"number of processes ({process_count})")
    total = self.num_batches(batch_size)
    n = total if num_batches is None else min(num_batches, total)
    local = batch_size // process_count
    for i in range(n):
      lo = i * batch_size + process_index * local
      yield {k: _padded(getattr(self, k), lo, local)
             for k in ("inputs", "targets", "segment_ids", "positions")} | {
                 "doc": _padded(self.doc_r, lo, local)}


def _padded(a: np.ndarray, lo: int, n: int) -> np.ndarray:
  part = a[lo:lo + n]
  if len(part) == n:
    return part
  pad = np.zeros((n - len(part),) + a.shape[1:], a.dtype)
  return np.concatenate([part, pad])


def _document_rows(ids: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """Rows scoring targets ids[1:] of one document (inputs ids[:-1])."""
  inputs, targets = ids[:-1], ids[1:]
  n = len(inputs)
  rows = math.ceil(n / seq_len)
  out = {k: np.zeros((rows, seq_len), np.int32)
         for k in ("inputs", "targets", "segment_ids", "positions")}
  flat = {k: v.reshape(-1) for k, v in out.items()}
  flat["inputs"][:n], flat["targets"][:n] = inputs, targets
  flat["segment_ids"][:n] = 1
  flat["positions"][:n] = np.arange(n) % seq_len
  return out


def build_eval_set(texts, encode, *, seq_len: int, max_tokens: int,
                   max_doc_tokens: int) -> EvalSet:
  """The set from (name, text) pairs, taken in the given order (see module doc)."""
  parts, names, scored = [], [], 0
  for name, text in texts:
    if scored >= max_tokens:
      break
    ids = encode(text)
    take = min(len(ids) - 1, max_doc_tokens, max_tokens - scored)
    if take < 1:
      continue
    rows = _document_rows(ids[:take + 1], seq_len)
    rows["doc_r"] = np.full(len(rows["inputs"]), len(names), np.int32)
    parts.append(rows)
    names.append(name)
    scored += take
  if not parts:
    raise DataError("the validation split holds no document of two or more "
                     "tokens: no evaluation set can be built")
  cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  order = np.random.default_rng(SEED).permutation(len(cat["doc_r"]))
  return EvalSet(**{k: v[order] for k, v in cat.items()}, names=tuple(names))


def validation_texts(source: sources.Source) -> Iterator[tuple[str, str]]:
  """(name, text) of the validation documents in a fixed random order."""
  records = source.data_source("validation")
  key = source.text_key
  for i in np.random.default_rng(SEED).permutation(len(records)):
    record = records[int(i)]
    name = record["path"].decode() if "path" in record else f"record {int(i)}"
    yield name, record[key].decode("utf-8", errors="replace")


def make_eval_set(config) -> EvalSet:
  """The evaluation set of `config` (data.eval_tokens, data.eval_doc_tokens,
  data.seq_len, the tokenizer); identical for any model, seed or process."""
  d = config.data
  source = sources.open_source(d)
  encode = Encode(make_tokenizer(config, source), d.add_bos)
  es = build_eval_set(validation_texts(source), encode, seq_len=d.seq_len,
                      max_tokens=d.eval_tokens, max_doc_tokens=d.eval_doc_tokens)
  if es.tokens < d.eval_tokens:
    logging.warning("evaluation set: the validation split of %s holds only %d "
                    "tokens under data.eval_doc_tokens=%d (data.eval_tokens=%d)",
                    source.dataset_id, es.tokens, d.eval_doc_tokens, d.eval_tokens)
  return es


def mean_and_se(loss_sum_d: np.ndarray, tokens_d: np.ndarray) -> tuple[float, float]:
  """Mean loss per token and its standard error, documents as the units.

  Tokens of one document are correlated, so the document (not the token) is
  the independent unit: the mean is the ratio r = sum_i L_i / sum_i n_i of
  per-document loss sums L_i and token counts n_i, and its standard error
  the usual linearised (cluster) estimate
  ``sqrt(D / (D - 1) * sum_i (L_i - r n_i)^2) / sum_i n_i`` over the D
  documents. It measures how much the loss would move on another draw of
  held-out files of the same kind, not the seed-to-seed spread.
  """
  loss_sum_d = np.asarray(loss_sum_d, np.float64)
  tokens_d = np.asarray(tokens_d, np.float64)
  keep = tokens_d > 0
  loss_sum_d, tokens_d = loss_sum_d[keep], tokens_d[keep]
  n = tokens_d.sum()
  if n == 0:
    return float("nan"), float("nan")
  r = loss_sum_d.sum() / n
  d = len(tokens_d)
  if d < 2:
    return float(r), float("nan")
  resid = loss_sum_d - r * tokens_d
  return float(r), float(math.sqrt(d / (d - 1) * np.sum(resid * resid)) / n)
