"""Packing token documents into fixed-length rows (concatenate, then split).

Documents (int32 token arrays, each already ending in EOS) are laid end to
end into one stream, which is cut into rows of ``seq_len`` inputs::

    stream   d1 d1 d1 E | d2 d2 E | d3 d3 d3 d3 d3 E | ...
    row 0    inputs  = stream[0 : L]      targets = stream[1 : L+1]
    row 1    inputs  = stream[L : 2L]     targets = stream[L+1 : 2L+1]

so every token is a target exactly once and nothing is padded. Per row:

* ``segment_ids``: 1 for the first (possibly continued) document of the row,
  2 for the next, ...; 0 would be padding, which this packer never emits.
* ``positions``: position within the document's piece in this row (restarts
  at 0 at each document start and at the start of each row).

A model that keeps attention within a document masks pairs with different
segment ids. The target of an EOS input is the first token of the next
document.

The iterator's state is the parent's state before the current document was
read plus the offset in that document, so a checkpoint stores a few integers
and restoring gives exactly the same rows.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from dsmoe.errors import DataError


class PackIterDataset(grain.IterDataset):
  """Rows of `seq_len` packed tokens from a parent of 1-D int32 documents.

  `docs_per_epoch` bounds how many documents one row may need: if a full
  epoch of documents yields fewer than ``seq_len + 1`` tokens the corpus is
  shorter than one sequence and iteration raises DataError.
  """

  def __init__(self, parent: grain.IterDataset, seq_len: int, docs_per_epoch: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._docs_per_epoch = docs_per_epoch

  def __iter__(self) -> "PackIterator":
    return PackIterator(self._parent.__iter__(), self._seq_len, self._docs_per_epoch)

  def __str__(self) -> str:
    return f"PackIterDataset(seq_len={self._seq_len})"


class PackIterator(grain.DatasetIterator):
  """Cursor over the document stream: (document, offset) plus parent state."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, docs_per_epoch: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._docs_per_epoch = docs_per_epoch
    self._doc = np.zeros((0,), np.int32)  # current document (not in the state)
    self._offset = 0  # next unread token of self._doc
    self._doc_state = parent.get_state()  # parent state before self._doc was read

  def _next_doc(self) -> None:
    self._doc_state = self._parent.get_state()
    self._doc = np.asarray(next(self._parent), dtype=np.int32)
    self._offset = 0

  def _take(self, n: int) -> list[np.ndarray]:
    """The next `n` tokens of the stream, one array per document piece."""
    pieces, fetched = [], 0
    while n > 0:
      if self._offset >= len(self._doc):
        if fetched > self._docs_per_epoch:
          raise DataError(
              f"the corpus is shorter than one sequence: a whole epoch of "
              f"{self._docs_per_epoch} documents holds fewer than "
              f"data.seq_len+1={self._seq_len + 1} tokens; use a larger corpus "
              "or a smaller data.seq_len")
        self._next_doc()
        fetched += 1
        continue
      piece = self._doc[self._offset:self._offset + n]
      pieces.append(piece)
      self._offset += len(piece)
      n -= len(piece)
    return pieces

  def _peek(self) -> int:
    """The next stream token, without consuming it."""
    while self._offset >= len(self._doc):
      self._next_doc()
    return int(self._doc[self._offset])

  def __next__(self) -> dict[str, np.ndarray]:
    pieces = self._take(self._seq_len)
    inputs = np.concatenate(pieces)
    targets = np.append(inputs[1:], np.int32(self._peek()))
    lengths = [len(p) for p in pieces]
    segment_ids = np.repeat(np.arange(1, len(pieces) + 1, dtype=np.int32), lengths)
    starts = np.repeat(np.cumsum([0] + lengths[:-1]), lengths)
    positions = (np.arange(self._seq_len) - starts).astype(np.int32)
    return {"inputs": inputs, "targets": targets.astype(np.int32),
            "segment_ids": segment_ids, "positions": positions}

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._doc_state, "offset": int(self._offset),
            "has_doc": bool(len(self._doc))}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._doc_state = state["parent"]
    self._doc, self._offset = np.zeros((0,), np.int32), 0
    if state["has_doc"]:
      self._next_doc()
      self._offset = int(state["offset"])
