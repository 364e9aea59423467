"""Transformer-level properties: causality, layer plan, dtypes, segment masking."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dsmoe
from dsmoe.model import Transformer, is_moe_layer
from tests.conftest import load_config


def small(impl="dropless", **model):
  c = load_config("tiny")
  c.model.d_model, c.model.num_layers, c.model.dense_hidden = 32, 3, 64
  c.model.moe.fine_grained.ffn_hidden = 64
  c.model.moe.impl = impl
  c.model.update(model)
  return dsmoe.resolve(c).model


def test_causality_future_tokens_do_not_change_earlier_logits():
  model = Transformer(small(), rngs=nnx.Rngs(0))
  tok = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
  tok2 = tok.at[:, 7:].set((tok[:, 7:] + 13) % 256)
  a, _ = model(tok)
  b, _ = model(tok2)
  np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(a[:, 7:] - b[:, 7:])).max() > 1e-4


def test_segment_ids_keep_attention_within_documents():
  model = Transformer(small(impl="dense"), rngs=nnx.Rngs(0))
  tok = jax.random.randint(jax.random.key(1), (1, 10), 0, 256)
  seg = jnp.array([[1] * 4 + [2] * 6])
  tok2 = tok.at[:, :4].set((tok[:, :4] + 1) % 256)  # change document 1 only
  a, _ = model(tok, seg)
  b, _ = model(tok2, seg)
  np.testing.assert_allclose(a[:, 4:], b[:, 4:], rtol=1e-5, atol=1e-6)


def test_layer_plan_follows_first_k_dense_and_freq():
  cfg = small(num_layers=6, first_k_dense_replace=2, moe_layer_freq=2)
  plan = [is_moe_layer(cfg, i) for i in range(6)]
  assert plan == [False, False, True, False, True, False]
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  assert [b.is_moe for b in model.blocks] == plan
  _, aux = model(jnp.zeros((1, 4), jnp.int32))
  assert aux["moe"]["tokens_per_expert"].shape[0] == 2


def test_bf16_compute_with_f32_params():
  model = Transformer(small(dtype="bfloat16"), rngs=nnx.Rngs(0))
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)
  logits, aux = model(jnp.zeros((1, 4), jnp.int32))
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))


def test_init_std_is_configurable():
  model = Transformer(small(init_std=0.006, num_layers=1, vocab_size=4096), rngs=nnx.Rngs(0))
  std = float(jnp.std(model.embed.table_vd[...]))
  assert abs(std - 0.006) < 0.0005
