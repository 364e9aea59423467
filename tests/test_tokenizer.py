"""dsmoe.data.tokenizer and the tokenizer choice of dsmoe.data: the byte
tokenizer, SentencePiece training, its cache and its errors.

Oracles: the UTF-8 bytes of the text, round trips, and what the files on
disk hold.
"""

import logging
import os

import numpy as np
import pytest

from dsmoe.data import make_loader, make_tokenizer
from dsmoe.data import tokenizer as tok_lib
from tests.helpers import text_config, write_corpus

TEXT = "def f(x):\n\treturn  x * 2  # dé日本 🙂\n\n    spaces   kept\n"


def test_bytes_tokenizer_round_trip():
  tok = tok_lib.ByteTokenizer()
  ids = tok.encode(TEXT)
  assert ids.dtype == np.int32 and list(ids) == list(TEXT.encode("utf-8"))
  assert tok.decode(ids) == TEXT
  assert tok.eos_id not in ids and tok.bos_id not in ids


def test_sentencepiece_round_trip_small_vocab(tmp_path):
  texts = write_corpus(tmp_path / "text", n_files=40, words=(50, 200))
  tok = tok_lib.train_sentencepiece(list(texts.values()), 320, sample_bytes=10**6)
  assert tok.vocab_size == 320 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  for text in [TEXT, *list(texts.values())[:5]]:
    ids = tok.encode(text)
    assert ids.max() < 320 and tok.decode(ids) == text
  assert len(tok.encode(texts["d0/f000.txt"])) < len(texts["d0/f000.txt"].encode())


def test_sentencepiece_cached_and_reused(tmp_path, monkeypatch):
  write_corpus(tmp_path / "text", n_files=40, words=(50, 200))
  c = text_config(tmp_path, tmp_path / "text", tokenizer="sentencepiece", vocab_size=320)
  c.model.vocab_size = 320
  first = make_tokenizer(c)
  models = [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs if f.endswith(".model")]
  assert len(models) == 1 and not [f for f in models if f.startswith(".tmp")]

  def no_training(*a, **k):
    raise AssertionError("the cached tokenizer should be reused")
  monkeypatch.setattr(tok_lib, "train_sentencepiece", no_training)
  again = make_tokenizer(c)
  assert again.model_proto == first.model_proto


def test_one_long_line_trains_the_tokenizer(tmp_path):
  """A file of one 350 KB line: SentencePiece reads lines of at most 4 KB,
  so the line is split into pieces rather than cut to its first 4 KB (which
  holds too few merges for 4096 pieces)."""
  rng = np.random.default_rng(0)
  words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9)))
           for _ in range(3000)]
  line = " ".join(rng.choice(words, 60000))
  tok = tok_lib.train_sentencepiece([line], 4096)
  assert tok.vocab_size == 4096 and tok.decode(tok.encode(line[:5000])) == line[:5000]
  with pytest.raises(ValueError, match=r"could not train 4096 pieces .*\(1 lines, 4097 "
                     r"bytes of text\).*data.vocab_size"):
    tok_lib.train_sentencepiece([line[:4096]], 4096)  # what the first 4 KB gives


def test_too_little_text_for_the_vocabulary_says_how_much_there_was():
  with pytest.raises(ValueError, match=r"data.vocab_size=1024: .*\(3 lines, 45 bytes of "
                     r"text\).*Vocabulary size too high"):
    tok_lib.train_sentencepiece(["tiny text here\n" * 3], 1024)


def test_damaged_cached_tokenizer_is_trained_again(tmp_path, caplog):
  write_corpus(tmp_path / "text", n_files=40, words=(50, 200))
  c = text_config(tmp_path, tmp_path / "text", tokenizer="sentencepiece", vocab_size=320)
  c.model.vocab_size = 320
  first = make_tokenizer(c)
  [path] = [os.path.join(p, f) for p, _, fs in os.walk(tmp_path / "cache") for f in fs
            if f.endswith(".model")]
  open(path, "wb").close()  # emptied (a full disk, a crash)
  with caplog.at_level(logging.WARNING):
    again = make_tokenizer(c)
  assert "cached tokenizer is damaged" in caplog.text and "is empty" in caplog.text
  assert "vocab_size=0" not in caplog.text
  assert again.model_proto == first.model_proto and os.path.getsize(path) > 0


def test_empty_tokenizer_file_is_named_as_such(tmp_path):
  (tmp_path / "spm.model").write_bytes(b"")
  with pytest.raises(ValueError, match=r"data.tokenizer_path: .*spm.model' is empty, not a "
                     r"SentencePiece model"):
    tok_lib.load_sentencepiece(str(tmp_path / "spm.model"), 320)


def test_tokenizer_file_with_other_vocab_size_is_refused(tmp_path):
  texts = write_corpus(tmp_path / "text", n_files=40, words=(50, 200))
  path = tmp_path / "spm.model"
  path.write_bytes(tok_lib.train_sentencepiece(list(texts.values()), 320).model_proto)
  c = text_config(tmp_path, tmp_path / "text", tokenizer="sentencepiece",
                  vocab_size=400, tokenizer_path=str(path))
  c.model.vocab_size = 400
  with pytest.raises(ValueError, match=r"spm.model.*320 pieces.*data.vocab_size=400"):
    make_tokenizer(c)


def test_tokenizer_larger_than_model_vocab_is_refused(tmp_path):
  write_corpus(tmp_path / "text")
  c = text_config(tmp_path, tmp_path / "text")
  c.model.vocab_size = 200
  with pytest.raises(ValueError, match=r"model.vocab_size=200.*256"):
    make_loader(c, process_index=0, process_count=1)
