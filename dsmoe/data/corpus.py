"""A directory of text files as a corpus: listing, fingerprint, split, reading.

The default corpus (``data.text_dir = ""``) is the Python standard library
source of the running interpreter (``sysconfig.get_paths()["stdlib"]``, its
``*.py`` files, without ``site-packages``), which every machine has. A
folder of the user's (``data.text_dir``) gives every regular file that holds
UTF-8 text, or only those matching ``data.file_glob``; binary, empty and
unreadable files are skipped and counted.

Nothing here writes anything; :mod:`dsmoe.data.local_text` builds the TFDS
dataset from what these functions return.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import re
import stat
import sysconfig

from dsmoe.errors import DataError

STDLIB_GLOBS = ("*.py",)
# Folders never read: installed packages, caches and version control.
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", ".git"})
SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The candidate files of one text directory (paths relative to ``root``,
  sorted), and those that could not even be listed (broken symbolic links,
  unreadable or special files)."""
  root: str
  files: tuple[str, ...]
  globs: tuple[str, ...]  # () : every regular file
  is_default: bool
  unreadable: tuple[str, ...] = ()

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
  """``"*.txt,*.md"`` -> ("*.txt", "*.md"); "" -> the default: ``*.py`` for the
  stdlib, () (every file that holds text) for a folder of the user's."""
  globs = tuple(g.strip() for g in file_glob.split(",") if g.strip())
  return globs or (STDLIB_GLOBS if is_default else ())


def list_corpus(text_dir: str, file_glob: str = "") -> Corpus:
  """Lists the files of `text_dir` ("" : the stdlib source) matching `file_glob`.

  Raises FileNotFoundError for a missing directory and DataError for an
  empty one or one without files matching the patterns. Entries that are
  not regular files, or cannot be examined (a broken symbolic link, no
  permission), are set aside in ``Corpus.unreadable``.
  """
  is_default = not text_dir
  root = os.path.abspath(text_dir or stdlib_root())
  globs = parse_globs(file_glob, is_default)
  key = "data.text_dir" if text_dir else "the default corpus (stdlib source)"
  if not os.path.exists(root):
    raise FileNotFoundError(f"{key}: directory {root!r} does not exist; "
                            "expected a directory of text files")
  if not os.path.isdir(root):
    raise DataError(f"{key}: {root!r} is a file, expected a directory of text files")
  found_any, files, unreadable = False, [], []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
    for name in filenames:
      found_any = True
      if globs and not any(fnmatch.fnmatch(name, g) for g in globs):
        continue
      rel = os.path.relpath(os.path.join(dirpath, name), root)
      (files if _regular(os.path.join(root, rel)) else unreadable).append(rel)
  if not found_any:
    raise DataError(f"{key}: directory {root!r} is empty; expected text files")
  if not files and not unreadable:
    raise DataError(f"{key}: directory {root!r} has no files matching "
                     f"{','.join(globs)} (data.file_glob); change data.file_glob, "
                     "or set it to '' to read every text file")
  return Corpus(root, tuple(sorted(files)), globs, is_default, tuple(sorted(unreadable)))


def _regular(path: str) -> bool:
  """A regular file (after following links) that this process may read."""
  try:
    return stat.S_ISREG(os.stat(path).st_mode) and os.access(path, os.R_OK)
  except OSError:
    return False


def fingerprint(corpus: Corpus, *extra) -> str:
  """A hash of the file list, sizes and mtimes (and `extra` settings).

  Any added, removed, resized or touched file gives a new fingerprint, so
  the dataset built from the directory is rebuilt.
  """
  h = hashlib.sha256(repr(extra).encode())
  for rel in corpus.files:
    try:
      st = os.stat(os.path.join(corpus.root, rel))
      h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError:  # vanished since listing: hash it as absent
      h.update(f"{rel}\0-\n".encode())
  return h.hexdigest()


def split_of(relpath: str, validation_percent: float) -> str:
  """"train" or "validation", decided by a hash of the relative path only."""
  digest = hashlib.sha256(relpath.replace(os.sep, "/").encode()).digest()
  bucket = int.from_bytes(digest[:8], "big") % 10_000
  return "validation" if bucket < validation_percent * 100 else "train"


def decode_text(raw: bytes) -> str | None:
  """The UTF-8 text of `raw`; None when empty, binary (NUL bytes) or not UTF-8."""
  if not raw or b"\x00" in raw:
    return None
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    return None


def read_text(path: str) -> str | None:
  """The UTF-8 text of `path`; None when empty, binary, not UTF-8 or unreadable."""
  try:
    with open(path, "rb") as f:
      return decode_text(f.read())
  except OSError:
    return None


@dataclasses.dataclass
class Selection:
  """Which candidate files hold text, and how many were skipped and why."""
  files: tuple[str, ...]
  binary: int = 0  # NUL bytes or not UTF-8
  empty: int = 0
  unreadable: tuple[str, ...] = ()

  @property
  def skipped(self) -> int:
    return self.binary + self.empty + len(self.unreadable)

  def summary(self) -> str:
    parts = [f"{self.binary} binary or not UTF-8"] if self.binary else []
    parts += [f"{self.empty} empty"] if self.empty else []
    if self.unreadable:
      parts.append(f"{len(self.unreadable)} unreadable (e.g. {self.unreadable[0]!r}: a "
                   "broken link, no permission or not a regular file)")
    return ", ".join(parts)


def select_text_files(corpus: Corpus) -> Selection:
  """Reads every candidate; keeps those holding UTF-8 text.

  Raises DataError when no file remains.
  """
  good, binary, empty, unreadable = [], 0, 0, list(corpus.unreadable)
  for rel in corpus.files:
    try:
      with open(os.path.join(corpus.root, rel), "rb") as f:
        raw = f.read()
    except OSError:
      unreadable.append(rel)
      continue
    if decode_text(raw) is not None:
      good.append(rel)
    elif raw:
      binary += 1
    else:
      empty += 1
  sel = Selection(tuple(good), binary, empty, tuple(unreadable))
  matching = f" matching {','.join(corpus.globs)}" if corpus.globs else ""
  if not good:
    raise DataError(
        f"data.text_dir: all {sel.skipped} files{matching} in {corpus.root!r} were "
        f"skipped ({sel.summary()}); expected UTF-8 text files")
  return sel
