"""Tokenizers: UTF-8 bytes, or SentencePiece BPE trained on the training split.

Both have ``encode(text) -> int32 array``, ``decode(ids) -> str``,
``vocab_size`` and ``pad_id``/``bos_id``/``eos_id``.

* ``bytes``: one token per UTF-8 byte, vocabulary 256. Padding is 0, and
  BOS/EOS are 254/255, two byte values that never occur in UTF-8 text.
* ``sentencepiece``: BPE with ``data.vocab_size`` pieces, special ids from
  ``data.pad_id/bos_id/eos_id`` (unknown: the next free id), byte fallback
  (every text encodes, no unknown pieces), no normalisation, whitespace kept
  and a piece for newline, so ``decode(encode(text)) == text``. It is trained
  on a sample of the training split and cached; see :func:`cached_sentencepiece`.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from typing import Callable, Iterable, Iterator

import numpy as np
import sentencepiece as spm

from dsmoe.errors import DataError

TOKENIZERS = ("sentencepiece", "bytes")
MAX_LINE_BYTES = 4096  # longer training lines are split (SentencePiece's limit)


class ByteTokenizer:
  """UTF-8 bytes as tokens (vocabulary 256; BOS 254 and EOS 255 are not UTF-8)."""

  vocab_size = 256
  pad_id, bos_id, eos_id = 0, 254, 255

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids if int(i) not in (self.bos_id, self.eos_id)]
    return bytes(ids).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A trained SentencePiece model (serialized proto bytes)."""

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id, self.bos_id, self.eos_id = (
        self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id())

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])

  def __getstate__(self):  # picklable for multiprocessing workers
    return {"model_proto": self.model_proto}

  def __setstate__(self, state):
    self.__init__(state["model_proto"])


class _Sample:
  """Lines fed to SentencePiece, and how much text they hold (for errors)."""

  def __init__(self):
    self.lines = self.bytes = self.long_lines = 0

  def describe(self) -> str:
    long = (f"; {self.long_lines} line(s) longer than {MAX_LINE_BYTES} bytes were "
            "split into pieces" if self.long_lines else "")
    size = f"{self.bytes} bytes" if self.bytes < 10240 else f"{self.bytes // 1024} KB"
    return f"{self.lines} lines, {size} of text{long}"


def _pieces(line: str) -> Iterator[str]:
  """`line` in pieces of at most MAX_LINE_BYTES UTF-8 bytes (SentencePiece's
  limit), cut between characters."""
  raw = line.encode("utf-8")
  start = 0
  while start < len(raw):
    end = min(start + MAX_LINE_BYTES, len(raw))
    while end < len(raw) and raw[end] & 0xC0 == 0x80:  # a continuation byte
      end -= 1
    yield raw[start:end].decode("utf-8")
    start = end


def _training_lines(texts: Iterable[str], sample_bytes: int,
                    sample: _Sample | None = None) -> Iterator[str]:
  """Non-empty lines of `texts` (long ones split) until `sample_bytes`."""
  sample = sample or _Sample()
  for text in texts:
    for line in text.split("\n"):
      if not line.strip():
        continue
      if len(line.encode("utf-8")) > MAX_LINE_BYTES:
        sample.long_lines += 1
      for piece in _pieces(line):
        sample.lines += 1
        sample.bytes += len(piece.encode("utf-8")) + 1
        yield piece
    if sample.bytes >= sample_bytes:
      return


def train_sentencepiece(texts: Iterable[str], vocab_size: int, *, pad_id: int = 0,
                        bos_id: int = 1, eos_id: int = 2,
                        sample_bytes: int = 4_000_000) -> SentencePieceTokenizer:
  """Trains a BPE SentencePiece model on the lines of `texts` (in memory)."""
  specials = {pad_id, bos_id, eos_id}
  unk_id = min(i for i in range(4) if i not in specials)
  out, sample = io.BytesIO(), _Sample()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(texts, sample_bytes, sample), model_writer=out,
        model_type="bpe", vocab_size=vocab_size, pad_id=pad_id, bos_id=bos_id,
        eos_id=eos_id, unk_id=unk_id, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        split_digits=True, user_defined_symbols=["\n"], character_coverage=0.9995,
        input_sentence_size=1_000_000, shuffle_input_sentence=True,
        max_sentence_length=MAX_LINE_BYTES * 4, num_threads=os.cpu_count() or 1,
        minloglevel=2)
  except RuntimeError as e:
    reason = " ".join(str(e).split()).rstrip(".")
    raise DataError(
        f"data.vocab_size={vocab_size}: SentencePiece could not train {vocab_size} "
        f"pieces on the training text it was given ({sample.describe()}): {reason}. "
        "Use more training text, a smaller data.vocab_size (>= 300), or "
        "data.tokenizer='bytes'") from None
  return SentencePieceTokenizer(out.getvalue())


def load_sentencepiece(path: str, vocab_size: int, key: str = "data.tokenizer_path"
                       ) -> SentencePieceTokenizer:
  """Loads a SentencePiece model file; its vocabulary must be `vocab_size`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{key}: SentencePiece model {path!r} does not exist")
  with open(path, "rb") as f:
    proto = f.read()
  if not proto:
    raise DataError(f"{key}: {path!r} is empty, not a SentencePiece model")
  try:
    tok = SentencePieceTokenizer(proto)
  except (RuntimeError, OSError) as e:
    raise DataError(f"{key}: {path!r} is not a SentencePiece model ({e})") from None
  if tok.vocab_size == 0:
    raise DataError(f"{key}: {path!r} is not a SentencePiece model (no pieces)")
  if tok.vocab_size != vocab_size:
    raise DataError(f"{key}: SentencePiece model {path!r} has {tok.vocab_size} "
                     f"pieces but data.vocab_size={vocab_size}; set data.vocab_size="
                     f"{tok.vocab_size} or use a matching tokenizer file")
  return tok


def _write_atomic(path: str, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file and a rename."""
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".model")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def cached_sentencepiece(path: str, train_texts: Callable[[], Iterable[str]],
                         vocab_size: int, **train_kwargs) -> SentencePieceTokenizer:
  """Loads the model at `path`, or trains it on `train_texts()` and saves it there.

  A cached file that is empty, unreadable or of another size than its name
  says (a damaged cache) is trained again, with one line in the log.
  """
  if os.path.exists(path):
    try:
      return load_sentencepiece(path, vocab_size, key="cached tokenizer")
    except DataError as e:
      logging.warning("tokenizer: the cached tokenizer is damaged (%s); training it "
                      "again", e)
  logging.info("tokenizer: training SentencePiece BPE (%d pieces) -> %s", vocab_size, path)
  tok = train_sentencepiece(train_texts(), vocab_size, **train_kwargs)
  _write_atomic(path, tok.model_proto)
  return tok
