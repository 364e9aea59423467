"""TFDS dataset `local_text`: the text files of one directory, one document each.

Built in the array_record format, which TFDS writes and reads without
TensorFlow. Each directory gets its own builder config whose name holds a
fingerprint of the file list (paths, sizes, mtimes) and the split settings, so
a changed directory is built again into a new folder and an unchanged one is
reused::

    <data_dir>/local_text/<slug>_<fingerprint>/1.0.0/
        local_text-train.array_record-00000-of-00001
        local_text-validation.array_record-00000-of-00001

TFDS builds into a temporary ``incomplete.*`` folder and renames it when
done, so an interrupted build leaves nothing that looks finished. After a
build, ``dsmoe_files.json`` records the size of every file of the folder;
each later open compares them, and a folder with a missing or resized file
(or no record) is deleted and built again. Processes on one host that find
the same dataset unbuilt at once (the processes of a multi-process run, two
runs started together) build it one at a time under a lock file
(``<slug>_<fingerprint>.lock``, fcntl): the first builds, the others then
find it built.

Features: ``text`` (the file's UTF-8 text) and ``path`` (relative path).
The validation split holds the files whose path hash falls in the first
``validation_percent`` percent (:func:`dsmoe.data.corpus.split_of`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil

import tensorflow_datasets as tfds

from dsmoe.data import corpus as corpus_lib
from dsmoe.errors import DataError

VERSION = "1.0.0"


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
  """Which directory and files to read, and the validation share."""
  root: str = ""
  files: tuple[str, ...] = dataclasses.field(default=(), repr=False)
  validation_percent: float = 5.0


class LocalText(tfds.core.GeneratorBasedBuilder):
  """The UTF-8 text files of a directory, split by a hash of their path."""

  VERSION = tfds.core.Version(VERSION)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="UTF-8 text files of a local directory, one example per file.",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "path": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    present = {corpus_lib.split_of(rel, cfg.validation_percent) for rel in cfg.files}
    # TFDS refuses empty splits: a small corpus may have no validation files.
    return {split: self._generate_examples(split) for split in corpus_lib.SPLITS
            if split in present}

  def _generate_examples(self, split: str):
    cfg = self.builder_config
    for rel in cfg.files:
      if corpus_lib.split_of(rel, cfg.validation_percent) != split:
        continue
      text = corpus_lib.read_text(os.path.join(cfg.root, rel))
      if text is not None:
        yield rel, {"text": text, "path": rel}


@contextlib.contextmanager
def _quiet_tfds():
  """Hides TFDS's warnings about custom (per-directory) builder configs and
  about the folder of a build that is not finished yet."""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


MANIFEST = "dsmoe_files.json"  # sizes of the built files, written after a build


def _sizes(folder: str) -> dict[str, int]:
  return {name: os.path.getsize(os.path.join(folder, name))
          for name in sorted(os.listdir(folder))
          if not name.startswith(MANIFEST) and os.path.isfile(os.path.join(folder, name))}


def write_manifest(folder: str) -> None:
  """Records the size of every file of a finished build (temp file + rename)."""
  sizes = _sizes(folder)
  tmp = os.path.join(folder, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"sizes": sizes}, f, indent=1)
  os.replace(tmp, os.path.join(folder, MANIFEST))


def cache_problem(folder: str) -> str | None:
  """Why the built dataset in `folder` cannot be used (a file missing or of
  another size than when built), or None: intact, or not built at all."""
  if not os.path.isdir(folder):
    return None
  try:
    with open(os.path.join(folder, MANIFEST)) as f:
      recorded = json.load(f)["sizes"]
  except FileNotFoundError:
    return f"{MANIFEST} is missing (an interrupted build, or one by an older dsmoe)"
  except (OSError, ValueError, KeyError, TypeError):
    return f"{MANIFEST} is unreadable"
  for name, size in recorded.items():
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      return f"{name} is missing"
    if os.path.getsize(path) != size:
      return f"{name} has {os.path.getsize(path)} bytes, {size} when it was built"
  return None


def local_text_builder(text_dir: str, data_dir: str, *, file_glob: str = "",
                       validation_percent: float = 5.0) -> LocalText:
  """Returns the prepared `local_text` builder of `text_dir`, building it if needed.

  Raises FileNotFoundError/DataError (naming the directory) for a missing
  or empty directory, no matching files, or no UTF-8 text at all. Binary,
  empty and unreadable files are skipped and counted in the log. A cached
  build whose files do not match the sizes recorded when it was built is
  rebuilt (one line in the log says so).
  """
  corpus = corpus_lib.list_corpus(text_dir, file_glob)
  fp = corpus_lib.fingerprint(corpus, corpus.globs, float(validation_percent), VERSION)
  name = f"{corpus.slug}_{fp[:16]}"

  def make(files):
    cfg = LocalTextConfig(name=name, description=f"text files of {corpus.root}",
                          root=corpus.root, files=files,
                          validation_percent=float(validation_percent))
    with _quiet_tfds():
      return LocalText(config=cfg, data_dir=data_dir, file_format="array_record")

  builder = make(corpus.files)
  if _usable(builder):
    return builder
  with _build_lock(os.path.dirname(builder.data_dir) + ".lock"):
    builder = make(corpus.files)  # a builder reads the folder as it is when made
    if _usable(builder):  # another process built it meanwhile
      return builder
    return _build(builder, corpus, make, name, validation_percent)


def _usable(builder: LocalText) -> bool:
  with _quiet_tfds():
    return cache_problem(builder.data_dir) is None and builder.is_prepared()


@contextlib.contextmanager
def _build_lock(path: str):
  """Holds an exclusive lock on the file `path` (created if needed); where
  it cannot be created (a read-only data_dir), the build goes on without it
  and reports its own error."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(path, "a")  # pylint: disable=consider-using-with
  except OSError:
    yield
    return
  with f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _build(builder, corpus, make, name, validation_percent) -> LocalText:
  problem = cache_problem(builder.data_dir)
  if problem is not None:
    logging.warning("local_text: the cached dataset %s is damaged (%s); building it "
                    "again", builder.data_dir, problem)
    shutil.rmtree(os.path.dirname(builder.data_dir))
  sel = corpus_lib.select_text_files(corpus)
  if sel.skipped:
    logging.warning("local_text: skipped %d of %d files in %s: %s; using %d text files",
                    sel.skipped, len(corpus.files) + len(corpus.unreadable), corpus.root,
                    sel.summary(), len(sel.files))
  if all(corpus_lib.split_of(f, validation_percent) != "train" for f in sel.files):
    raise DataError(f"data.validation_percent={validation_percent}: all {len(sel.files)} "
                     f"text files of {corpus.root!r} fall in the validation split; "
                     "add files or lower data.validation_percent")
  builder = make(sel.files)
  logging.info("local_text: building %s (%d files) into %s", name, len(sel.files),
               builder.data_dir)
  tfds.display_progress_bar(False)  # one line in the log instead of bars
  with _quiet_tfds():  # no warnings about the (custom) folder it is building
    builder.download_and_prepare()
  write_manifest(builder.data_dir)
  return builder
