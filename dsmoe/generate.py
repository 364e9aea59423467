"""Text generation: batched autoregressive decoding with a KV cache.

::

    lm = CausalLM.from_run(spec, workdir)        # or dsmoe.interop.hf.load_hf(path)[1]
    logits_btv = lm(tokens_bt)                   # float32 [B, T, V], MoE in eval mode
    out = generate(lm, [[1, 5, 9], [1, 7]], max_new_tokens=32,
                   sampling=Sampling(temperature=0.7, top_p=0.9), stop_tokens=(2,))
    out.tokens                                   # the new tokens of each prompt

How it runs (one jitted call, no recompilation per token):

1. the prompts are right-padded to P tokens and the KV cache has U slots
   (P and U rounded up to powers of two, so other prompt lengths and token
   counts reuse the compiled function);
2. prefill: the model runs on the padded prompts at positions 0..P-1
   (``Transformer.extend``), filling the cache; prompt b's first new token is
   sampled from its logits at position L_b - 1;
3. decode: a ``lax.while_loop`` feeds each row's last token at position L_b,
   L_b + 1, ... (its RoPE position and cache slot), so every row continues
   right after its own prompt. A row stops at a stop token; the loop stops
   when all rows have stopped or `max_new_tokens` were generated.

Sampling: greedy (temperature 0), or temperature with optional top-k and
top-p (nucleus) filtering.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsmoe import config as config_lib
from dsmoe import params_io
from dsmoe.errors import CheckpointError, ConfigError, DataError
from dsmoe.model import Transformer
from dsmoe.spec import ModelSpec

MAX_STOP_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0: greedy; top_k 0 and top_p 1.0: no filtering."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ConfigError(f"temperature={self.temperature} must be >= 0 (0: greedy)")
    if self.top_k < 0:
      raise ConfigError(f"top_k={self.top_k} must be >= 0 (0: off)")
    if not 0 < self.top_p <= 1:
      raise ConfigError(f"top_p={self.top_p} must be in (0, 1] (1: off)")


def sample(logits_bv: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """One token per row [B] (int32) from float32 logits [B, V]."""
  if sampling.temperature == 0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits = logits_bv.astype(jnp.float32) / sampling.temperature
  neg = jnp.finfo(jnp.float32).min
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]  # [B,1]
    logits = jnp.where(logits < kth, neg, logits)
  if sampling.top_p < 1.0:
    sorted_bv = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_bv, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the higher-ranked tokens
    kept = jnp.where(before < sampling.top_p, sorted_bv, jnp.inf)  # the first is always kept
    logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), neg, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class CausalLM:
  """A model for inference: ``lm(tokens_bt)`` -> float32 logits [B, T, V].

  Holds the NNX graph definition and the parameters (a pure dict, as in the
  train state); `module()` rebuilds the :class:`Transformer`.
  """

  def __init__(self, graphdef, params, rest=None):
    self.graphdef, self.params, self.rest = graphdef, params, rest or {}

  @classmethod
  def skeleton(cls, spec: ModelSpec):
    """(graphdef, params as ShapeDtypeStructs, rest) of `spec`, nothing allocated."""
    abstract = nnx.eval_shape(lambda: Transformer(spec, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

  @classmethod
  def from_module(cls, model: Transformer) -> "CausalLM":
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return cls(graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest))

  @classmethod
  def from_run(cls, config, workdir: str | None = None, step: int | None = None) -> "CausalLM":
    """The params of a training run's checkpoint `step` (default latest), or,
    without a workdir or checkpoint, of ``config.train.init_from``; `config`
    is a resolved Spec (a ConfigDict is resolved here)."""
    spec = config_lib.resolve(config)
    graphdef, abstract, rest = cls.skeleton(spec.model)
    if workdir is None and not spec.train.init_from:
      raise CheckpointError("give a workdir or set train.init_from")
    if workdir is not None:
      try:
        path, prefix = params_io.run_checkpoint(workdir, step)
      except CheckpointError:
        if step is not None or not spec.train.init_from:
          raise
        path, prefix = params_io.params_dir(spec.train.init_from), ()
    else:
      path, prefix = params_io.params_dir(spec.train.init_from), ()
    params_io.check_matches(path, abstract, prefix)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                            abstract)
    return cls(graphdef, params_io.restore(path, abstract, prefix), _concrete(rest))

  @property
  def spec(self) -> ModelSpec:
    return self.module().spec

  def module(self) -> Transformer:
    return nnx.merge(self.graphdef, self.params, self.rest)

  def __call__(self, tokens_bt, positions_bt=None) -> jax.Array:
    return _logits(self.graphdef, self.params, self.rest, jnp.asarray(tokens_bt),
                   None if positions_bt is None else jnp.asarray(positions_bt))


def _concrete(rest):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), rest)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, rest, tokens_bt, positions_bt):
  model = nnx.merge(graphdef, params, rest)
  return model(tokens_bt, None, positions_bt, train=False)[0]


@dataclasses.dataclass
class Generated:
  """New tokens of each prompt (without the stop token) and whether it stopped."""
  tokens: list[list[int]]
  stopped: list[bool]


def _bucket(n: int, minimum: int = 16) -> int:
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "sampling"))
def _generate(params, rest, tokens_bp, lengths_b, max_new, stop_ids, num_allowed, key, *,
              graphdef, cache_len: int, sampling: Sampling):
  """(tokens [B, U]: prompt then new tokens; end [B]: end of each row; stopped [B])."""
  model = nnx.merge(graphdef, params, rest)
  b, p = tokens_bp.shape
  rows = jnp.arange(b)
  caches = model.init_cache(b, cache_len)
  logits, caches = model.extend(tokens_bp, jnp.broadcast_to(jnp.arange(p), (b, p)), caches)
  last_bv = logits[rows, lengths_b - 1]  # [B,V] logits of each prompt's last token
  tokens_bu = jnp.zeros((b, cache_len), jnp.int32).at[:, :p].set(tokens_bp)

  def cond(state):
    i, _, _, _, done_b, _, _ = state
    return (i < max_new) & ~jnp.all(done_b)

  def body(state):
    i, tokens_bu, caches, pos_b, done_b, key, last_bv = state
    key, sub = jax.random.split(key)
    allowed_v = jnp.arange(last_bv.shape[-1]) < num_allowed
    next_b = sample(jnp.where(allowed_v, last_bv, jnp.finfo(jnp.float32).min), sub, sampling)
    write_b = jnp.where(done_b, tokens_bu[rows, pos_b], next_b)
    tokens_bu = tokens_bu.at[rows, pos_b].set(write_b, mode="drop")
    stop_b = jnp.any(next_b[:, None] == stop_ids[None, :], axis=-1) & ~done_b
    logits, caches = model.extend(next_b[:, None], pos_b[:, None], caches)
    pos_b = jnp.where(done_b, pos_b, pos_b + 1)
    done_b = done_b | stop_b | (pos_b >= cache_len)
    return i + 1, tokens_bu, caches, pos_b, done_b, key, logits[:, 0]

  state = (jnp.int32(0), tokens_bu, caches, lengths_b, jnp.zeros((b,), bool), key, last_bv)
  state = jax.lax.while_loop(cond, body, state)
  _, tokens_bu, _, end_b, _, _, _ = state
  last_b = tokens_bu[rows, jnp.maximum(end_b - 1, 0)]
  stopped_b = (end_b > lengths_b) & jnp.any(last_b[:, None] == stop_ids[None, :], axis=-1)
  return tokens_bu, end_b, stopped_b


def generate(lm: CausalLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: Sampling = Sampling(), stop_tokens: Sequence[int] = (),
             seed: int = 0, max_len: int | None = None,
             num_allowed: int | None = None) -> Generated:
  """Continues each prompt (a list of token ids) by up to `max_new_tokens`.

  A row ends at one of `stop_tokens` (at most 8; not included in the output)
  or when prompt + new tokens reach `max_len` (default: no limit). Only ids
  below `num_allowed` are generated (default: the whole vocabulary; give the
  tokenizer's size when the model's vocabulary is larger).
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise DataError("every prompt needs at least one token")
  if len(stop_tokens) > MAX_STOP_TOKENS:
    raise ConfigError(f"at most {MAX_STOP_TOKENS} stop tokens, got {len(stop_tokens)}")
  lengths = np.array([len(p) for p in prompts], np.int32)
  if max_len is not None:
    max_new_tokens = min(max_new_tokens, max_len - int(lengths.max()))
    if max_new_tokens < 1:
      raise ConfigError(f"the longest prompt ({lengths.max()} tokens) leaves no room "
                       f"below max_len={max_len}")
  p = _bucket(int(lengths.max()))
  tokens = np.zeros((len(prompts), p), np.int32)
  for row, prompt in zip(tokens, prompts):
    row[:len(prompt)] = prompt
  stop = np.full((MAX_STOP_TOKENS,), -1, np.int32)
  stop[:len(stop_tokens)] = stop_tokens
  out, end, stopped = jax.device_get(_generate(
      lm.params, lm.rest, jnp.asarray(tokens), jnp.asarray(lengths), jnp.int32(max_new_tokens),
      jnp.asarray(stop), jnp.int32(num_allowed or np.iinfo(np.int32).max),
      jax.random.key(seed), graphdef=lm.graphdef,
      cache_len=_bucket(p + max_new_tokens), sampling=sampling))
  rows = [out[i, lengths[i]:end[i] - (1 if stopped[i] else 0)].tolist()
          for i in range(len(prompts))]
  return Generated(rows, [bool(s) for s in stopped])


def lower_generate(spec: ModelSpec, mesh, *, batch: int, prompt_len: int, max_new_tokens: int,
                   sampling: Sampling = Sampling()):
  """`generate`'s whole program (prefill and the decode loop) for `batch`
  prompts of up to `prompt_len` tokens and `max_new_tokens` new ones, lowered
  on `mesh` with nothing allocated: the parameters as ShapeDtypeStructs split
  by the training sharding rules, everything else replicated. Compile the
  result (``.compile()``) to see what a device needs to decode."""
  from dsmoe.parallel import rules  # pylint: disable=g-import-not-at-top
  graphdef, params, rest = CausalLM.skeleton(spec)
  params = rules.with_shardings(params, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def arg(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

  rest = jax.tree.map(lambda s: arg(s.shape, s.dtype), rest)
  p = _bucket(prompt_len)
  key = jax.eval_shape(lambda: jax.random.key(0))
  with jax.set_mesh(mesh):  # the expert-parallel MoE layers read the ambient mesh
    return _generate.lower(
        params, rest, arg((batch, p), jnp.int32), arg((batch,), jnp.int32), arg((), jnp.int32),
        arg((MAX_STOP_TOKENS,), jnp.int32), arg((), jnp.int32), arg(key.shape, key.dtype),
        graphdef=graphdef, cache_len=_bucket(p + max_new_tokens), sampling=sampling)


@dataclasses.dataclass
class TextModel:
  """A CausalLM with its tokenizer and default stop tokens (EOS)."""
  lm: CausalLM
  tokenizer: object  # encode/decode/bos_id/eos_id (dsmoe.data.tokenizer, HFTokenizer)
  stop_tokens: tuple[int, ...]

  @classmethod
  def from_tokenizer(cls, lm: CausalLM, tokenizer) -> "TextModel":
    """`lm` with `tokenizer`, stopping at its EOS (if it has one)."""
    eos = getattr(tokenizer, "eos_id", None)
    return cls(lm, tokenizer, () if eos is None else (eos,))

  @classmethod
  def from_run(cls, config, workdir: str | None = None, step: int | None = None
               ) -> "TextModel":
    """A training run's checkpoint (or ``train.init_from``) with the run's
    tokenizer (an HF or dsmoe model folder: dsmoe.interop.hf.load_text_model)."""
    from dsmoe.data import make_tokenizer  # noqa: PLC0415 (grain, TFDS: only here)
    spec = config_lib.resolve(config)
    tok = make_tokenizer(spec)
    return cls.from_tokenizer(CausalLM.from_run(spec, workdir, step), tok)

  def complete(self, prompts: Sequence[str], *, max_new_tokens: int, add_bos: bool = True,
               **kwargs) -> tuple[list[str], Generated]:
    """The continuation text of each prompt (and the raw Generated result);
    `kwargs` go to :func:`generate` (sampling, seed, max_len, stop_tokens)."""
    bos = getattr(self.tokenizer, "bos_id", None)
    head = [bos] if add_bos and bos is not None else []
    ids = [head + [int(i) for i in self.tokenizer.encode(p)] for p in prompts]
    kwargs.setdefault("stop_tokens", self.stop_tokens)
    kwargs.setdefault("num_allowed", self.tokenizer.vocab_size)
    out = generate(self.lm, ids, max_new_tokens=max_new_tokens, **kwargs)
    return [self.tokenizer.decode(t) for t in out.tokens], out
