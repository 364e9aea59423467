"""dsmoe.data: local_text split, packing, resumable loader, errors (tokenizers:
tests/test_tokenizer.py).

Corpora are small folders written in tmp_path; oracles are computed here from
the files themselves (with the byte tokenizer a document is its UTF-8 bytes,
and EOS = 255 never occurs in UTF-8, so the packed stream can be cut back
into documents).
"""

import json
import logging
import os
import pathlib
import socket

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from dsmoe.config import base_config, validate_data
from dsmoe.data import make_loader
from dsmoe.data import corpus as corpus_lib
from dsmoe.data import packing
from dsmoe.data.local_text import local_text_builder
from tests.helpers import text_config, write_corpus

EOS = 255  # byte tokenizer


def split_texts(builder, split):
  if split not in builder.info.splits:  # TFDS stores no empty split
    return {}
  return {r["path"].decode(): r["text"].decode() for r in builder.as_data_source(split=split)}


def stream_documents(rows):
  """Cuts a packed byte stream (rows of inputs) at EOS into document texts."""
  stream = np.concatenate([r.reshape(-1) for r in rows])
  cuts = np.flatnonzero(stream == EOS)
  docs, start = [], 0
  for c in cuts:
    docs.append(bytes(stream[start:c].astype(np.uint8)).decode("utf-8"))
    start = c + 1
  return docs


def take(it, n):
  return [next(it) for _ in range(n)]


# ---------------------------------------------------------------- split

def test_split_deterministic_disjoint_covering(tmp_path):
  texts = write_corpus(tmp_path / "text")
  a = local_text_builder(str(tmp_path / "text"), str(tmp_path / "c1"), validation_percent=25)
  b = local_text_builder(str(tmp_path / "text"), str(tmp_path / "c2"), validation_percent=25)
  train, val = split_texts(a, "train"), split_texts(a, "validation")
  assert train == split_texts(b, "train") and val == split_texts(b, "validation")
  assert not set(train) & set(val)
  assert {**train, **val} == texts  # every file once, text unchanged
  assert 0 < len(val) < len(texts)


def test_unchanged_dir_reused_changed_dir_rebuilt(tmp_path):
  write_corpus(tmp_path / "text")
  first = local_text_builder(str(tmp_path / "text"), str(tmp_path / "c"))
  again = local_text_builder(str(tmp_path / "text"), str(tmp_path / "c"))
  assert again.data_dir == first.data_dir
  (tmp_path / "text" / "new.txt").write_text("a new file\n", encoding="utf-8")
  changed = local_text_builder(str(tmp_path / "text"), str(tmp_path / "c"))
  assert changed.data_dir != first.data_dir
  all_paths = set(split_texts(changed, "train")) | set(split_texts(changed, "validation"))
  assert "new.txt" in all_paths


BUILD = """
import sys
from dsmoe.data.local_text import local_text_builder
print(local_text_builder(sys.argv[1], sys.argv[2]).data_dir)
"""


def test_processes_building_one_dataset_at_once_all_get_it(tmp_path):
  """Three processes find the same dataset unbuilt together (as the
  processes of a multi-process run do): one builds it, all of them use it."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  texts = write_corpus(tmp_path / "text", n_files=600, words=(200, 400))
  cmd = [sys.executable, "-c", BUILD, str(tmp_path / "text"), str(tmp_path / "c")]
  procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(3)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
  dirs = {out.strip().splitlines()[-1] for out, _ in outs}
  built = local_text_builder(str(tmp_path / "text"), str(tmp_path / "c"))
  assert dirs == {built.data_dir}
  assert {**split_texts(built, "train"), **split_texts(built, "validation")} == texts


def test_default_corpus_lists_stdlib_python_files():
  corpus = corpus_lib.list_corpus("")
  assert corpus.is_default and "os.py" in corpus.files
  assert all(f.endswith(".py") and "site-packages" not in f for f in corpus.files)


def _truncate_shard(folder):
  shard = next(folder.glob("*-train.array_record-*"))
  shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])


def _delete_shard(folder):
  next(folder.glob("*-validation.array_record-*")).unlink()


def _delete_dataset_info(folder):
  (folder / "dataset_info.json").unlink()


def _delete_manifest(folder):
  (folder / "dsmoe_files.json").unlink()


@pytest.mark.parametrize("damage", [_truncate_shard, _delete_shard, _delete_dataset_info,
                                    _delete_manifest],
                         ids=["truncated_shard", "deleted_shard", "deleted_dataset_info",
                              "deleted_manifest"])
def test_damaged_cache_is_rebuilt_saying_so(tmp_path, caplog, damage):
  texts = write_corpus(tmp_path / "text")
  first = local_text_builder(str(tmp_path / "text"), str(tmp_path / "c"), validation_percent=25)
  damage(pathlib.Path(first.data_dir))
  with caplog.at_level(logging.WARNING):
    again = local_text_builder(str(tmp_path / "text"), str(tmp_path / "c"),
                               validation_percent=25)
  notes = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(notes) == 1 and first.data_dir in notes[0], notes
  assert again.data_dir == first.data_dir
  assert {**split_texts(again, "train"), **split_texts(again, "validation")} == texts
  caplog.clear()
  with caplog.at_level(logging.WARNING):  # intact now: reused without a word
    local_text_builder(str(tmp_path / "text"), str(tmp_path / "c"), validation_percent=25)
  assert "damaged" not in caplog.text


def test_a_folder_of_c_headers_is_a_corpus(tmp_path, caplog):
  """Every regular file holding UTF-8 text, whatever its name; binary files,
  empty files and broken links are skipped and counted; data.file_glob narrows."""
  root = tmp_path / "include"
  (root / "sys").mkdir(parents=True)
  headers = {"a.h": "#define A 1\n", "sys/b.h": "int b(void);\n", "Makefile": "all:\n"}
  for rel, text in headers.items():
    (root / rel).write_text(text, encoding="utf-8")
  (root / "lib.so").write_bytes(b"\x7fELF\x00\x01")
  (root / "empty.h").write_bytes(b"")
  os.symlink(root / "missing.h", root / "dangling.h")
  with caplog.at_level(logging.WARNING):
    builder = local_text_builder(str(root), str(tmp_path / "c"), validation_percent=0)
  assert split_texts(builder, "train") == headers
  assert ("skipped 3 of 6 files" in caplog.text and "1 binary or not UTF-8, 1 empty, "
          "1 unreadable (e.g. 'dangling.h'" in caplog.text), caplog.text
  only_h = local_text_builder(str(root), str(tmp_path / "c"), file_glob="*.h",
                              validation_percent=0)
  assert set(split_texts(only_h, "train")) == {"a.h", "sys/b.h"}


# ---------------------------------------------------------------- packing

def test_pack_iter_dataset_rows_hold_the_concatenated_documents():
  rng = np.random.default_rng(1)
  docs = [np.append(rng.integers(3, 200, int(n)), EOS).astype(np.int32)
          for n in rng.integers(1, 50, 30)]
  seq_len, n_rows = 16, 20
  ds = packing.PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(),
                               seq_len, docs_per_epoch=len(docs))
  rows = take(iter(ds), n_rows)
  stream = np.concatenate(docs)  # oracle: the documents end to end
  inputs = np.stack([r["inputs"] for r in rows])
  targets = np.stack([r["targets"] for r in rows])
  np.testing.assert_array_equal(inputs.reshape(-1), stream[:n_rows * seq_len])
  np.testing.assert_array_equal(targets.reshape(-1), stream[1:n_rows * seq_len + 1])
  doc_of = np.repeat(np.arange(len(docs)), [len(d) for d in docs])[:n_rows * seq_len]
  doc_start = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
  for r, row in enumerate(rows):
    d = doc_of[r * seq_len:(r + 1) * seq_len]
    np.testing.assert_array_equal(row["segment_ids"], d - d[0] + 1)
    pos = np.arange(r * seq_len, (r + 1) * seq_len) - doc_start[d]
    pos = np.where(d == d[0], np.minimum(pos, np.arange(seq_len)), pos)
    np.testing.assert_array_equal(row["positions"], pos)
    assert all(row[k].dtype == np.int32 for k in row)


def test_loader_batches_hold_exactly_the_documents(tmp_path):
  texts = write_corpus(tmp_path / "text")
  c = text_config(tmp_path, tmp_path / "text")
  builder = local_text_builder(str(tmp_path / "text"), c.data.data_dir, validation_percent=25)
  train = sorted(split_texts(builder, "train").values())
  it = iter(make_loader(c, process_index=0, process_count=1))
  batches = take(it, 120)
  b = batches[0]
  assert set(b) == {"inputs", "targets", "segment_ids", "positions"}
  assert all(v.shape == (4, 32) and v.dtype == np.int32 for v in b.values())
  rows = [row for batch in batches for row in batch["inputs"]]
  docs = stream_documents(rows)
  n = len(train)
  assert sorted(docs[:n]) == train  # the first epoch: each document exactly once
  assert sorted(docs[n:2 * n]) == train and docs[n:2 * n] != docs[:n]  # reshuffled
  flat_in = np.concatenate(rows)
  flat_tg = np.concatenate([row for batch in batches for row in batch["targets"]])
  np.testing.assert_array_equal(flat_tg[:-1], flat_in[1:])
  seg = np.concatenate([row for batch in batches for row in batch["segment_ids"]])
  after_eos = np.flatnonzero(flat_in[:-1] == EOS) + 1
  new_seg = np.flatnonzero(np.diff(seg) != 0) + 1
  row_starts = np.arange(0, len(seg), 32)
  assert set(new_seg) - set(row_starts) == set(after_eos) - set(row_starts)
  assert (seg[row_starts] == 1).all()
  assert set(texts) >= set(split_texts(builder, "validation"))


# ---------------------------------------------------------------- resume

@pytest.mark.parametrize("prefetch_batches", [0, 2])
def test_restore_gives_identical_following_batches(tmp_path, prefetch_batches):
  write_corpus(tmp_path / "text")
  c = text_config(tmp_path, tmp_path / "text", prefetch_batches=prefetch_batches)
  it = iter(make_loader(c, process_index=0, process_count=1))
  take(it, 37)  # past the first epoch (about 30 batches)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 40)
  fresh = iter(make_loader(c, process_index=0, process_count=1))
  fresh.set_state(state)
  for want, got in zip(expected, take(fresh, 40)):
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


# ---------------------------------------------------------------- sharding

def test_two_processes_read_disjoint_covering_shards(tmp_path):
  write_corpus(tmp_path / "text")
  c = text_config(tmp_path, tmp_path / "text")
  builder = local_text_builder(str(tmp_path / "text"), c.data.data_dir, validation_percent=25)
  train = set(split_texts(builder, "train").values())
  seen = []
  for pi in range(2):
    it = iter(make_loader(c, process_index=pi, process_count=2))
    batches = take(it, 80)
    assert batches[0]["inputs"].shape == (2, 32)
    seen.append(set(stream_documents([r for b in batches for r in b["inputs"]])))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == train


# ---------------------------------------------------------------- bad input

def assert_nothing_built(data_dir):
  found = [os.path.join(p, f) for p, _, fs in os.walk(data_dir) for f in fs]
  assert not [f for f in found if "incomplete" in f or f.endswith(".array_record-00000-of-00001")]
  assert not [f for f in found if f.endswith(".json")]


def _missing(root):
  return root / "nope"


def _empty(root):
  (root / "text").mkdir()
  return root / "text"


def _no_text_files(root):
  (root / "text").mkdir()
  (root / "text" / "image.png").write_bytes(b"\x89PNG\x00\x01")
  return root / "text"


def _broken_link_only(root):
  (root / "text").mkdir()
  os.symlink(root / "gone.txt", root / "text" / "link.txt")
  return root / "text"


@pytest.mark.parametrize("make_dir,glob,error,pattern", [
    (_missing, "", FileNotFoundError, r"data.text_dir.*nope.*does not exist"),
    (_empty, "", ValueError, r"data.text_dir.*text.*is empty"),
    (_no_text_files, "", ValueError, r"all 1 files in .* skipped \(1 binary or not UTF-8\)"),
    (_no_text_files, "*.txt", ValueError, r"no files matching \*\.txt \(data.file_glob\)"),
    (_broken_link_only, "", ValueError, r"all 1 files .* skipped \(1 unreadable .*link.txt"),
], ids=["missing_directory", "empty_directory", "only_binary", "no_file_matches",
        "only_a_broken_link"])
def test_bad_text_dir(tmp_path, make_dir, glob, error, pattern):
  c = text_config(tmp_path, make_dir(tmp_path), file_glob=glob)
  with pytest.raises(error, match=pattern):
    make_loader(c, process_index=0, process_count=1)
  assert_nothing_built(tmp_path / "cache")


def test_binary_and_non_utf8_files_skipped_and_counted(tmp_path, caplog):
  texts = write_corpus(tmp_path / "text", n_files=8)
  (tmp_path / "text" / "bin.txt").write_bytes(b"abc\x00\x01\x02def")
  (tmp_path / "text" / "latin1.txt").write_bytes("café".encode("latin-1"))
  with caplog.at_level(logging.WARNING):
    builder = local_text_builder(str(tmp_path / "text"), str(tmp_path / "c"))
  assert "skipped 2 of 10 files" in caplog.text
  kept = {**split_texts(builder, "train"), **split_texts(builder, "validation")}
  assert kept == texts


def test_only_binary_files(tmp_path):
  (tmp_path / "text").mkdir()
  (tmp_path / "text" / "a.txt").write_bytes(b"\x00\x01binary")
  (tmp_path / "text" / "b.txt").write_bytes(b"\xff\xfe\xfd not utf-8")
  c = text_config(tmp_path, tmp_path / "text")
  with pytest.raises(ValueError, match=r"all 2 files.*skipped.*not UTF-8"):
    make_loader(c, process_index=0, process_count=1)
  assert_nothing_built(tmp_path / "cache")


def test_corpus_shorter_than_one_sequence(tmp_path):
  (tmp_path / "text").mkdir()
  for i in range(3):
    (tmp_path / "text" / f"{i}.txt").write_text("tiny", encoding="utf-8")
  c = text_config(tmp_path, tmp_path / "text", validation_percent=0.0, seq_len=64)
  with pytest.raises(ValueError, match=r"shorter than one sequence.*15 tokens.*seq_len=64"):
    make_loader(c, process_index=0, process_count=1)


def test_named_dataset_not_prepared_says_how_without_downloading(tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("must not touch the network")
  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  c = text_config(tmp_path, "", tfds_name="tiny_shakespeare")
  with pytest.raises(FileNotFoundError) as err:
    make_loader(c, process_index=0, process_count=1)
  msg = str(err.value)
  for needle in ("tiny_shakespeare", "not prepared", str(tmp_path / "cache"),
                 "download_and_prepare", "array_record", "manual"):
    assert needle in msg
  assert not os.path.exists(tmp_path / "cache" / "tiny_shakespeare")


def test_unknown_named_dataset(tmp_path):
  c = text_config(tmp_path, "", tfds_name="no_such_dataset_xyz")
  with pytest.raises(ValueError, match=r"data.tfds_name='no_such_dataset_xyz'"):
    make_loader(c, process_index=0, process_count=1)


@pytest.mark.parametrize("key,value,match", [
    ("tokenizer", "wordpiece", "data.tokenizer"),
    ("vocab_size", 100, "data.vocab_size"),
    ("eos_id", 0, "must differ"),
    ("validation_percent", 100.0, "data.validation_percent"),
    ("seq_len", 0, "data.seq_len"),
])
def test_validate_data_rules(key, value, match):
  d = base_config().data
  d[key] = value
  with pytest.raises(ValueError, match=match):
    validate_data(d)


# ---------------------------------------------------------------- named datasets

class DsmoeTestLines(tfds.core.GeneratorBasedBuilder):
  """A registered TFDS dataset prepared offline in the test (stands in for lm1b)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"sentence": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 40), "test": self._generate_examples(40, 50)}

  def _generate_examples(self, lo, hi):
    for i in range(lo, hi):
      yield i, {"sentence": f"sentence number {i} é"}


def test_prepared_named_dataset_is_read(tmp_path):
  data_dir = str(tmp_path / "cache")
  DsmoeTestLines(data_dir=data_dir, file_format="array_record").download_and_prepare()
  c = text_config(tmp_path, "", tfds_name="dsmoe_test_lines", text_key="sentence")
  for split, ids in (("train", range(0, 40)), ("validation", range(40, 50))):  # test
    batches = take(iter(make_loader(c, split, process_index=0, process_count=1)), 30)
    docs = set(stream_documents([r for b in batches for r in b["inputs"]]))
    assert docs == {f"sentence number {i} é" for i in ids}
  c.data.text_key = "text"
  with pytest.raises(ValueError, match=r"data.text_key='text'.*\['sentence'\]"):
    make_loader(c, process_index=0, process_count=1)
  c.data.text_key = "sentence"
  builder = tfds.builder("dsmoe_test_lines", data_dir=data_dir)
  shard = str(builder.info.splits["test"].filepaths[0])
  os.remove(shard)
  with pytest.raises(FileNotFoundError, match=rf"incomplete: {shard} is missing"):
    make_loader(c, process_index=0, process_count=1)
