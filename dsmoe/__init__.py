"""dsmoe: DeepSeekMoE in JAX / Flax NNX.

Public entry points (imported lazily, so ``import dsmoe.dispatch`` needs
neither ml_collections nor the data stack):

    dsmoe.load("tiny")                 a shipped config (dsmoe.configs, or a path) -> ConfigDict
    dsmoe.resolve(config)              validate -> frozen Spec (model: ModelSpec)
    dsmoe.count_params(config)         {"total", "activated", "embedding"}
    dsmoe.flops_per_token(config)      training FLOPs per token

Released checkpoints and text (docs/HF.md): ``dsmoe.interop.hf.load_hf(path)``
-> (config, model) with ``model(tokens_bt)`` -> logits; ``dsmoe.generate``;
``dsmoe.interop.hf.load_text_model(path)`` with the tokenizer. Deliberate
failures raise a ``dsmoe.errors.UserError`` (ConfigError, DataError, ...).

Shape letters
-------------
Array and weight names end in one letter per dimension (``x_btd`` is
[batch, token, d_model]; ``w_gate_edf`` is [expert, d_model, ffn hidden]).
Each letter has one meaning everywhere in the package:

  b  batch: sequences of a batch
  t  token: a position in a sequence; in dispatch, where batch and sequence
     are flattened, any token of the batch (T = B * sequence length)
  u  an attended (key) token position in attention
  d  d_model, the residual stream width
  n  attention heads
  h  head dimension (size of one head)
  f  FFN hidden size (dense MLP, shared experts or one routed expert)
  v  vocabulary
  e  routed experts
  k  a token's top-k slot (its k-th chosen routed expert)
  s  a (token, slot) pair, s = t * K + k (S = T * K pairs)
  p  a row of the expert-sorted dispatch buffer
  g  a block: a group of R consecutive buffer rows that all belong to one expert
  r  a row within a block
  c  a row of one expert's capacity buffer
  l  a layer (per-MoE-layer statistics)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "base_config": "dsmoe.config",
    "load": "dsmoe.config",
    "resolve": "dsmoe.config",
    "validate": "dsmoe.config",
    "count_params": "dsmoe.accounting",
    "flops_per_token": "dsmoe.accounting",
    "ModelSpec": "dsmoe.spec",
    "MoESpec": "dsmoe.spec",
    "Spec": "dsmoe.spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'dsmoe' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(__all__))
