"""Data pipeline: TFDS source -> tokenizer -> packing -> resumable grain loader.

Interface the trainer relies on::

    loader = make_loader(config, split="train", process_index=None, process_count=None)
    it = iter(loader)            # grain DatasetIterator: get_state() / set_state(state)
    batch = next(it)             # dict of int32 numpy arrays, each [B_local, seq_len]:
                                 #   "inputs", "targets" (next token of the stream),
                                 #   "segment_ids" (0 = padding, 1.. document in the row),
                                 #   "positions" (position within the document piece)
    B_local = config.train.batch_size // process_count

The state is a small dict of ints (JSON-serialisable); restoring it gives the
same following batches. The stream is infinite (a new shuffle each epoch,
seeded by ``train.seed``). See docs/DATA.md.

Modules:
  corpus       a directory of text files: listing, fingerprint, path-hash split
  local_text   the TFDS builder over such a directory (default: stdlib source)
  sources      local_text or a prepared named TFDS dataset (clear offline error)
  tokenizer    bytes, or SentencePiece BPE trained on the training split, cached
  hf_tokenizer a HuggingFace tokenizer.json (data.tokenizer="hf", the generator)
  packing      concatenate-then-split packing with segment ids and positions
  pipeline     make_loader / make_tokenizer: the grain pipeline
"""

from __future__ import annotations

import importlib

__all__ = ["make_loader", "make_tokenizer"]


def __getattr__(name: str):
  """make_loader / make_tokenizer, imported on first use (grain and TFDS are
  not needed to read a tokenizer.json: ``dsmoe.data.hf_tokenizer``)."""
  if name in __all__:
    return getattr(importlib.import_module("dsmoe.data.pipeline"), name)
  raise AttributeError(f"module 'dsmoe.data' has no attribute {name!r}")
