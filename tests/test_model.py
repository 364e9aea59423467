"""Transformer-level properties: causality, layer plan, dtypes, segment masking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsmoe.model import Transformer
from dsmoe.model.attention import Attention
from tests.helpers import small_spec


def small(impl="dropless", **model):
  """ModelSpec of a 3-layer small config; `model` overrides config.model keys."""
  overrides = {"model.num_layers": 3, "model.moe.impl": impl}
  overrides.update({f"model.{k}": v for k, v in model.items()})
  return small_spec(**overrides).model


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
  plan = [cfg.is_moe_layer(i) for i in range(6)]
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


def np_rope(x, pos, theta):
  """Rotate-half RoPE in numpy: pairs (i, i + H/2) by pos * theta^(-2i/H)."""
  h = x.shape[-1]
  ang = pos[:, None] * theta ** (-np.arange(0, h, 2) / h)  # [T,H/2]
  c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
  x1, x2 = x[..., :h // 2], x[..., h // 2:]
  return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def np_attention(attn, x, pos):
  """Causal MHA with RoPE at positions `pos`, in numpy (one sequence)."""
  w = {k: np.asarray(getattr(attn, k)[...], np.float64)
       for k in ("w_q_dnh", "w_k_dnh", "w_v_dnh", "w_o_nhd")}
  q = np_rope(np.einsum("td,dnh->tnh", x, w["w_q_dnh"]), pos, attn.rope_theta)
  k = np_rope(np.einsum("td,dnh->tnh", x, w["w_k_dnh"]), pos, attn.rope_theta)
  v = np.einsum("td,dnh->tnh", x, w["w_v_dnh"])
  logits = np.einsum("tnh,unh->ntu", q, k) / np.sqrt(attn.head_dim)
  t = x.shape[0]
  logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("ntu,unh,nhd->td", p, v, w["w_o_nhd"])


def test_attention_uses_the_given_rope_positions():
  """Positions that restart mid-row (packed documents) change relative
  distances: the output must follow the positions given, not 0..T-1."""
  attn = Attention(16, 2, 8, rope_theta=10000.0, init_std=0.5, param_dtype=jnp.float32,
                   rngs=nnx.Rngs(0))
  x = np.asarray(jax.random.normal(jax.random.key(3), (1, 6, 16)))
  pos = np.array([0, 1, 2, 0, 1, 2])
  y = attn(jnp.asarray(x), None, jnp.asarray(pos)[None])
  np.testing.assert_allclose(y[0], np_attention(attn, x[0].astype(np.float64), pos),
                             rtol=1e-4, atol=1e-5)
  y_default = attn(jnp.asarray(x))
  np.testing.assert_allclose(y_default[0], np_attention(attn, x[0].astype(np.float64),
                                                        np.arange(6)), rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(y - y_default)).max() > 1e-3


def test_swiglu_fused_and_unfused_match_numpy():
  """Both compute paths of layers.swiglu (gate/up as one concatenated matmul
  at small hidden sizes, two matmuls above) against numpy, values and grads."""
  from dsmoe.model import layers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  d = 8
  for f in (layers.FUSE_GATE_UP_MAX_HIDDEN, layers.FUSE_GATE_UP_MAX_HIDDEN + 8):
    x = rng.normal(size=(3, 5, d))
    wg, wu = 0.2 * rng.normal(size=(d, f)), 0.2 * rng.normal(size=(d, f))
    wd = 0.2 * rng.normal(size=(f, d))
    g, u = x @ wg, x @ wu
    sig = 1 / (1 + np.exp(-g))
    want = (g * sig * u) @ wd
    args = [jnp.asarray(a, jnp.float32) for a in (x, wg, wu, wd)]
    with jax.default_matmul_precision("highest"):
      got = layers.swiglu(*args)
      grads = jax.grad(lambda *a: jnp.sum(layers.swiglu(*a)), argnums=(0, 1, 2, 3))(*args)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # d/dwd of sum(a @ wd) = a^T 1; d/du = (1 wd^T) * silu(g); chain to wu = x^T du
    da = np.ones((3, 5, d)) @ wd.T
    dwu = np.einsum("btd,btf->df", x, da * g * sig)
    dwg = np.einsum("btd,btf->df", x, da * u * sig * (1 + g * (1 - sig)))
    dx = (da * u * sig * (1 + g * (1 - sig))) @ wg.T + (da * g * sig) @ wu.T
    for a, b in zip(grads, (dx, dwg, dwu, np.einsum("btf,btd->fd", g * sig * u, np.ones((3, 5, d))))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _stack_moe_layers(params, first):
  """The unscanned parameter tree in the scanned layout: layers >= first
  stacked on a new leading axis under "moe_blocks" (written here)."""
  blocks = params["blocks"]
  out = {k: v for k, v in params.items() if k != "blocks"}
  out["blocks"] = {i: blocks[i] for i in range(first)}
  out["moe_blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                   *[blocks[i] for i in range(first, len(blocks))])
  return out


def _loss_grads(spec, params_fn=None):
  model = Transformer(spec, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if params_fn is not None:
    nnx.replace_by_pure_dict(params, params_fn())
  tok = jax.random.randint(jax.random.key(3), (2, 9), 0, 256)

  def f(p):
    logits, aux = nnx.merge(graphdef, p, rest)(tok)
    return jnp.mean(jax.nn.logsumexp(logits, -1)) + sum(aux["losses"].values()), aux["moe"]

  (val, stats), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  return val, stats, nnx.to_pure_dict(grads), nnx.to_pure_dict(params)


def test_default_parameter_tree_has_no_stacked_layers():
  params = nnx.to_pure_dict(nnx.state(Transformer(small(), rngs=nnx.Rngs(0)), nnx.Param))
  assert "moe_blocks" not in params and sorted(params["blocks"]) == [0, 1, 2]


def test_scanned_layers_equal_the_layer_loop():
  """scan_layers runs layers 1..2 (MoE) as one nnx.scan over stacked weights;
  with the same weights it gives the loop's loss, statistics and gradients.
  (The models of the remat test below: the same compiled programs.)"""
  plain = small()
  v0, st0, g0, p0 = _loss_grads(plain)
  scanned = plain.replace(scan_layers=True)
  v1, st1, g1, p1 = _loss_grads(scanned, lambda: _stack_moe_layers(p0, 1))
  assert p1["moe_blocks"]["ffn"]["w_gate_edf"].shape[0] == 2  # stacked layer axis
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  np.testing.assert_array_equal(st1["tokens_per_expert"], st0["tokens_per_expert"])
  want = _stack_moe_layers(g0, 1)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_keep_loss_and_gradients(scan):
  v0, _, g0, _ = _loss_grads(small(scan_layers=scan))
  for remat in ("full", "save_dots", "save_moe_exchange"):
    v1, _, g1, _ = _loss_grads(small(scan_layers=scan, remat=remat))
    np.testing.assert_allclose(v1, v0, rtol=1e-6, err_msg=remat)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7), g0, g1)
