"""A directory of text files as a corpus: listing, fingerprint, split, reading.

The default corpus (``data.text_dir = ""``) is the Python standard library
source of the running interpreter (``sysconfig.get_paths()["stdlib"]``, its
``*.py`` files, without ``site-packages``), which every machine has.

Nothing here writes anything; :mod:`dsmoe.data.local_text` builds the TFDS
dataset from what these functions return.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import re
import sysconfig

STDLIB_GLOBS = ("*.py",)
DIR_GLOBS = ("*.txt", "*.md", "*.rst", "*.py")
# Folders never read: installed packages and caches (not part of the stdlib).
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", ".git"})
SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The files of one text directory (paths relative to ``root``, sorted)."""
  root: str
  files: tuple[str, ...]
  globs: tuple[str, ...]
  is_default: bool

  @property
  def slug(self) -> str:
    """A short readable name for the directory, used in dataset names."""
    if self.is_default:
      return "stdlib"
    base = os.path.basename(os.path.normpath(self.root)).lower()
    return re.sub(r"[^a-z0-9]+", "_", base).strip("_")[:32] or "dir"


def stdlib_root() -> str:
  """The Python standard library source folder of this interpreter."""
  return sysconfig.get_paths()["stdlib"]


def parse_globs(file_glob: str, is_default: bool) -> tuple[str, ...]:
  """``"*.txt,*.md"`` -> ("*.txt", "*.md"); "" -> the default patterns."""
  globs = tuple(g.strip() for g in file_glob.split(",") if g.strip())
  return globs or (STDLIB_GLOBS if is_default else DIR_GLOBS)


def list_corpus(text_dir: str, file_glob: str = "") -> Corpus:
  """Lists the text files of `text_dir` ("" : the stdlib source).

  Raises FileNotFoundError for a missing directory and ValueError for an
  empty one or one without files matching the patterns.
  """
  is_default = not text_dir
  root = os.path.abspath(text_dir or stdlib_root())
  globs = parse_globs(file_glob, is_default)
  key = "data.text_dir" if text_dir else "the default corpus (stdlib source)"
  if not os.path.exists(root):
    raise FileNotFoundError(f"{key}: directory {root!r} does not exist; "
                            "expected a directory of text files")
  if not os.path.isdir(root):
    raise ValueError(f"{key}: {root!r} is a file, expected a directory of text files")
  found_any, files = False, []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
    for name in filenames:
      found_any = True
      if any(fnmatch.fnmatch(name, g) for g in globs):
        files.append(os.path.relpath(os.path.join(dirpath, name), root))
  if not found_any:
    raise ValueError(f"{key}: directory {root!r} is empty; expected text files "
                     f"matching {','.join(globs)}")
  if not files:
    raise ValueError(f"{key}: directory {root!r} has no text files matching "
                     f"{','.join(globs)} (set data.file_glob to other patterns)")
  return Corpus(root, tuple(sorted(files)), globs, is_default)


def fingerprint(corpus: Corpus, *extra) -> str:
  """A hash of the file list, sizes and mtimes (and `extra` settings).

  Any added, removed, resized or touched file gives a new fingerprint, so
  the dataset built from the directory is rebuilt.
  """
  h = hashlib.sha256(repr(extra).encode())
  for rel in corpus.files:
    st = os.stat(os.path.join(corpus.root, rel))
    h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()


def split_of(relpath: str, validation_percent: float) -> str:
  """"train" or "validation", decided by a hash of the relative path only."""
  digest = hashlib.sha256(relpath.replace(os.sep, "/").encode()).digest()
  bucket = int.from_bytes(digest[:8], "big") % 10_000
  return "validation" if bucket < validation_percent * 100 else "train"


def read_text(path: str) -> str | None:
  """The UTF-8 text of `path`; None when empty, binary (NUL bytes) or not UTF-8."""
  with open(path, "rb") as f:
    raw = f.read()
  if not raw or b"\x00" in raw:
    return None
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    return None


def readable_files(corpus: Corpus) -> tuple[tuple[str, ...], int]:
  """(files that hold UTF-8 text, number skipped as empty/binary/non-UTF-8).

  Raises ValueError when no file remains.
  """
  good = tuple(rel for rel in corpus.files
               if read_text(os.path.join(corpus.root, rel)) is not None)
  skipped = len(corpus.files) - len(good)
  if not good:
    raise ValueError(
        f"data.text_dir: all {skipped} files matching {','.join(corpus.globs)} "
        f"in {corpus.root!r} were skipped as empty, binary or not UTF-8; "
        "expected UTF-8 text files")
  return good, skipped
