"""A HuggingFace ``tokenizer.json`` (the ``tokenizers`` library) as a dsmoe tokenizer.

It has the interface of dsmoe.data.tokenizer (``encode(text) -> int32
array``, ``decode(ids)``, ``vocab_size``, ``pad_id``/``bos_id``/``eos_id``),
so the data pipeline (``data.tokenizer="hf"``) and the generator use it.
``encode`` adds no special tokens; callers add BOS/EOS themselves. The
special ids come from ``tokenizer_config.json`` next to the file
(``bos_token``/``eos_token``/``pad_token``), else from ``config.json``
(``bos_token_id``/...); a missing one is None.
"""

from __future__ import annotations

import json
import os

import numpy as np

from dsmoe.errors import DataError


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      out = json.load(f)
  except (OSError, ValueError):
    return {}
  return out if isinstance(out, dict) else {}


class HFTokenizer:
  """`path`: a tokenizer.json file, or a folder holding one."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer  # noqa: PLC0415 (an optional dependency)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise FileNotFoundError(f"no HuggingFace tokenizer file {file!r}")
    try:
      self._tok = Tokenizer.from_file(file)
    except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions
      raise DataError(f"{file!r} is not a HuggingFace tokenizer.json ({e})") from None
    self.path = file
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    folder = os.path.dirname(file)
    tok_config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    model_config = _read_json(os.path.join(folder, "config.json"))
    self.bos_id, self.eos_id, self.pad_id = (
        self._special(tok_config, model_config, name) for name in ("bos", "eos", "pad"))

  def _special(self, tok_config: dict, model_config: dict, name: str) -> int | None:
    token = tok_config.get(f"{name}_token")
    if isinstance(token, dict):
      token = token.get("content")
    if isinstance(token, str) and self._tok.token_to_id(token) is not None:
      return self._tok.token_to_id(token)
    value = model_config.get(f"{name}_token_id")
    return value if isinstance(value, int) else None

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def __getstate__(self):  # picklable for multiprocessing workers
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])
