"""The grain pipeline: documents -> tokens -> packed rows -> per-process batches.

::

    records of the split (TFDS data source, random access)
      [process_index::process_count]     each process reads a disjoint shard
      .shuffle(train.seed)               train only; reshuffled every epoch
      .repeat()                          infinite
      .map(text -> [BOS] tokens EOS)     in data.num_threads threads
      -> PackIterDataset(seq_len)        concatenate, then split into rows
      .batch(train.batch_size // process_count)
      -> thread prefetch of data.prefetch_batches batches

The result is a ``grain.IterDataset``; ``iter()`` gives a
``grain.DatasetIterator`` whose ``get_state()`` is a small dict of ints
(JSON-serialisable) and whose ``set_state()`` resumes with exactly the same
batches.
"""

from __future__ import annotations

import os
from typing import Iterator

import grain
import numpy as np

from dsmoe.config import validate_data
from dsmoe.data import packing
from dsmoe.data import sources
from dsmoe.data import tokenizer as tok_lib
from dsmoe.data.hf_tokenizer import HFTokenizer
from dsmoe.errors import ConfigError, DataError
from dsmoe.spec import Spec

SAMPLE_DOCS = 100_000  # at most this many documents are read to train a tokenizer


def make_tokenizer(config, source: sources.Source | None = None):
  """The tokenizer chosen by `config.data` (SentencePiece is trained once, cached).

  Raises ConfigError, before any training, if its vocabulary does not fit
  ``config.model.vocab_size``.
  """
  d = config.data
  if d.tokenizer == "hf":
    return _hf_tokenizer(d.tokenizer_path, config.model.vocab_size)
  _check_fits(d.tokenizer, 256 if d.tokenizer == "bytes" else d.vocab_size,
              config.model.vocab_size)
  if d.tokenizer == "bytes":
    return tok_lib.ByteTokenizer()
  if d.tokenizer_path:
    return tok_lib.load_sentencepiece(d.tokenizer_path, d.vocab_size)
  source = source or sources.open_source(d)
  return tok_lib.cached_sentencepiece(
      tokenizer_cache_path(d, source), lambda: sample_texts(source, d),
      d.vocab_size, pad_id=d.pad_id, bos_id=d.bos_id, eos_id=d.eos_id,
      sample_bytes=d.tokenizer_sample_bytes)


def _hf_tokenizer(path: str, model_vocab: int):
  """A HuggingFace tokenizer.json (dsmoe.data.hf_tokenizer); it needs an EOS id."""
  tok = HFTokenizer(path)
  _check_fits("hf", tok.vocab_size, model_vocab)
  if tok.eos_id is None:
    raise DataError(f"data.tokenizer_path={path!r}: the tokenizer has no EOS token "
                     "(set eos_token in tokenizer_config.json next to it)")
  return tok


def _check_fits(tokenizer: str, size: int, model_vocab: int) -> None:
  if size > model_vocab:
    raise ConfigError(
        f"model.vocab_size={model_vocab} is smaller than the tokenizer's vocabulary "
        f"({size}, data.tokenizer={tokenizer!r}): raise model.vocab_size, set "
        f"data.vocab_size <= {model_vocab} (SentencePiece needs >= 300), or use "
        "data.tokenizer='bytes' (256 tokens)")


def tokenizer_cache_path(d, source: sources.Source) -> str:
  """<data_dir>/tokenizers/<dataset>/spm_bpe<V>_... .model (one per setting)."""
  folder = source.dataset_id.replace("/", "_")
  name = (f"spm_bpe{d.vocab_size}_sample{d.tokenizer_sample_bytes}_"
          f"ids{d.pad_id}-{d.bos_id}-{d.eos_id}.model")
  return os.path.join(d.data_dir, "tokenizers", folder, name)


def _text_of(source: sources.Source):
  key = source.text_key
  return lambda record: record[key].decode("utf-8", errors="replace")


def sample_texts(source: sources.Source, d) -> Iterator[str]:
  """Documents of the training split in a fixed random order (for tokenizers)."""
  records = source.data_source("train")
  n = len(records)
  rng = np.random.default_rng(0)
  order = rng.permutation(n) if n <= SAMPLE_DOCS else rng.choice(n, SAMPLE_DOCS, replace=False)
  text_of = _text_of(source)
  for i in order:
    yield text_of(records[int(i)])


class Encode:
  """text -> int32 [BOS] tokens EOS (a document of the packed stream)."""

  def __init__(self, tokenizer, add_bos: bool):
    self.tokenizer, self.add_bos = tokenizer, add_bos

  def __call__(self, text: str) -> np.ndarray:
    ids = self.tokenizer.encode(text)
    head = [self.tokenizer.bos_id] if self.add_bos else []
    return np.concatenate([np.asarray(head, np.int32), ids,
                           np.asarray([self.tokenizer.eos_id], np.int32)])


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} must be in [0, "
                     f"process_count={process_count})")
  return process_index, process_count


def _documents(source, split, process_index, process_count) -> grain.MapDataset:
  """This process's shard of the split's texts."""
  records = source.data_source(split)
  docs = grain.MapDataset.source(records)[process_index::process_count]
  if len(docs) == 0:
    raise DataError(f"{source.key}: the {split!r} split of {source.dataset_id!r} "
                     f"has {len(records)} documents, too few for process "
                     f"{process_index} of {process_count}")
  return docs.map(_text_of(source))


def _check_length(docs: grain.MapDataset, encode: Encode, seq_len: int, where: str):
  """Raises DataError if all documents together hold <= seq_len tokens."""
  total = 0
  for i in range(len(docs)):
    total += len(encode(docs[i]))
    if total > seq_len:
      return
  raise DataError(f"{where}: the corpus is shorter than one sequence: its "
                   f"{len(docs)} documents hold {total} tokens, but data.seq_len="
                   f"{seq_len} needs at least {seq_len + 1}; use more text or a "
                   "smaller data.seq_len")


def make_loader(config, split: str = "train", *, process_index=None,
                process_count=None) -> grain.IterDataset:
  """The infinite, resumable batch stream of `split` for this process.

  ``next(iter(loader))`` is a dict of int32 arrays [B_local, data.seq_len]:
  ``inputs``, ``targets``, ``segment_ids`` (1.. = document within the row,
  0 = padding) and ``positions``; B_local = train.batch_size // process_count.
  """
  d, t = config.data, config.train
  if not isinstance(config, Spec):  # a Spec was validated when resolved
    validate_data(d)
  pi, pc = _process(process_index, process_count)
  if t.batch_size % pc:
    raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the "
                     f"number of processes ({pc})")
  if not 0 <= t.seed < 2**32:
    raise ConfigError(f"train.seed={t.seed} must be in [0, 2**32) for the data shuffle")
  source = sources.open_source(d)
  encode = Encode(make_tokenizer(config, source), d.add_bos)
  docs = _documents(source, split, pi, pc)
  _check_length(docs, encode, d.seq_len, f"{source.key} ({split} split)")
  n_docs = len(docs)
  if split == "train":
    docs = docs.shuffle(seed=t.seed)
  docs = docs.repeat(None).map(encode)
  read = grain.ReadOptions(num_threads=d.num_threads, prefetch_buffer_size=d.prefetch_docs)
  ds = packing.PackIterDataset(docs.to_iter_dataset(read), d.seq_len, n_docs)
  ds = ds.batch(t.batch_size // pc, drop_remainder=True)
  if d.prefetch_batches:
    ds = grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=d.prefetch_batches)
  return ds
