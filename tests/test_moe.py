"""The MoE block: formula vs numpy, shared vs routed experts, dropless vs dense."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsmoe
from dsmoe.model import MoE, Transformer
from tests.helpers import load_config, np_swiglu, small_config, small_moe_spec


def np_moe(block, x):
  """DeepSeekMoE formula in numpy: shared(x) + sum_topk g_i FFN_i(x)."""
  x = np.asarray(x, np.float64)
  w = np.asarray(block.router.w_de[...], np.float64)
  logits = x @ w
  s = np.exp(logits - logits.max(-1, keepdims=True))
  s /= s.sum(-1, keepdims=True)
  k = block.spec.top_k
  idx = np.argsort(-s, -1, kind="stable")[..., :k]
  wg, wu, wd = (np.asarray(p[...], np.float64) for p in (block.w_gate_edf, block.w_up_edf, block.w_down_efd))
  out = np.zeros_like(x)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      for j in idx[b, t]:
        out[b, t] += s[b, t, j] * np_swiglu(x[b, t], wg[j], wu[j], wd[j])
  if block.shared is not None:
    out += np_swiglu(x, *(np.asarray(p[...], np.float64) for p in
                          (block.shared.w_gate_df, block.shared.w_up_df, block.shared.w_down_fd)))
  return out


@pytest.mark.parametrize("impl", ["dense", "dropless"])
def test_moe_matches_numpy_formula(impl):
  block = MoE(small_moe_spec(impl), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  y, aux, stats = block(x, jnp.zeros((2, 5), jnp.int32))
  np.testing.assert_allclose(y, np_moe(block, x), rtol=1e-4, atol=1e-5)
  assert float(stats["tokens_per_expert"].sum()) == 2 * 5 * 2
  load = np.bincount(np.asarray(block.route(x, None).idx_btk).ravel(), minlength=6)
  np.testing.assert_array_equal(stats["tokens_per_expert"], load)
  assert set(aux) == {"expert_balance"}


def test_shared_experts_apply_to_every_token_routed_only_to_selected():
  cfg = small_moe_spec("dense", shared=1, routed=4, top_k=1)
  block = MoE(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (1, 8, 16))
  tokens = jnp.zeros((1, 8), jnp.int32)
  y0, _, _ = block(x, tokens)
  routing = block.route(x, tokens)
  chosen = np.asarray(routing.idx_btk)[0, :, 0]
  # Zeroing the shared expert changes every token's output.
  saved = block.shared.w_down_fd[...]
  block.shared.w_down_fd[...] = jnp.zeros_like(saved)
  y1, _, _ = block(x, tokens)
  assert np.all(np.abs(np.asarray(y0 - y1)).max(-1) > 1e-6)
  block.shared.w_down_fd[...] = saved
  # Zeroing one routed expert changes exactly the tokens routed to it.
  e = int(chosen[0])
  block.w_down_efd[...] = block.w_down_efd[...].at[e].set(0.0)
  y2, _, _ = block(x, tokens)
  changed = np.abs(np.asarray(y0 - y2)).max(-1)[0] > 1e-7
  np.testing.assert_array_equal(changed, chosen == e)


@pytest.mark.parametrize("backend", ["auto", "pallas"])  # pallas on CPU: interpreted
def test_dropless_equals_dense_forward_and_gradients(backend):
  x = jax.random.normal(jax.random.key(3), (2, 7, 16))
  tokens = jnp.zeros((2, 7), jnp.int32)

  def loss_and_grads(impl):
    settings = {} if impl == "dense" else dict(gmm_backend=backend)  # dense: no grouped matmul
    block = MoE(small_moe_spec(impl, routed=8, top_k=3, **settings), rngs=nnx.Rngs(0))

    def f(block, x):
      y, aux, _ = block(x, tokens)
      return jnp.sum(jnp.sin(y)) + sum(aux.values())

    (val, (gm, gx)) = nnx.value_and_grad(f, argnums=(0, 1))(block, x)
    return val, gm, gx

  v0, gm0, gx0 = loss_and_grads("dense")
  v1, gm1, gx1 = loss_and_grads("dropless")
  np.testing.assert_allclose(v0, v1, rtol=1e-5)
  np.testing.assert_allclose(gx0, gx1, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(nnx.state(gm0)), jax.tree.leaves(nnx.state(gm1))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_aux_loss_gradient_reaches_router():
  # Two device groups on one device (the config ties them to mesh.expert).
  spec = small_moe_spec("dense", aux_loss_alpha=0.1).replace(
      moe=dict(device_balance_alpha=0.2, num_device_groups=2))
  block = MoE(spec, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(4), (2, 6, 16))

  def f(block):
    _, aux, _ = block(x, jnp.zeros((2, 6), jnp.int32))
    return aux["expert_balance"] + aux["device_balance"]

  g = nnx.grad(f)(block)
  assert float(jnp.abs(g.router.w_de[...]).sum()) > 0


def np_hash_expert(token_ids, num_experts):
  """Knuth's multiplicative hash of the token id, folded, mod E (written here)."""
  h = (np.asarray(token_ids, np.uint64) * 2654435761) % 2**32
  h ^= h >> 16
  return (h % num_experts).astype(np.int64)


def test_hash_router_sends_each_token_to_its_hashed_expert():
  cfg = small_moe_spec("dense", shared=0, routed=4, top_k=1, router="hash")
  block = MoE(cfg, rngs=nnx.Rngs(0))
  tokens = np.arange(40, 52)[None]  # 12 token ids
  expected = np_hash_expert(tokens[0], 4)
  assert len(set(expected)) >= 3  # the case spreads over several experts
  x = jax.random.normal(jax.random.key(5), (1, 12, 16))
  y, aux, stats = block(x, jnp.asarray(tokens, jnp.int32))
  assert aux == {}  # no learned scores, no balance loss
  wg, wu, wd = (np.asarray(p[...], np.float64)
                for p in (block.w_gate_edf, block.w_up_edf, block.w_down_efd))
  xs = np.asarray(x, np.float64)[0]
  want = np.stack([np_swiglu(xs[t], wg[e], wu[e], wd[e]) for t, e in enumerate(expected)])
  np.testing.assert_allclose(np.asarray(y)[0], want, rtol=1e-4, atol=1e-5)  # gate 1
  np.testing.assert_array_equal(stats["tokens_per_expert"], np.bincount(expected, minlength=4))


def test_graphdef_is_hashable_and_a_static_jit_argument():
  model = Transformer(dsmoe.resolve(small_config()).model, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  assert hash(graphdef) == hash(nnx.split(Transformer(
      dsmoe.resolve(small_config()).model, rngs=nnx.Rngs(1)))[0])
  tokens = jnp.zeros((1, 4), jnp.int32)
  fn = jax.jit(lambda g, s: nnx.merge(g, s)(tokens)[0], static_argnums=0)
  np.testing.assert_allclose(fn(graphdef, state), model(tokens)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m", [1, 2, 4])
def test_segmentation_keeps_params_and_flops(m):
  base = None
  c = load_config("tiny")
  c.model.moe.fine_grained.update(dict(N=4, m=m, K=2, K_s=0, ffn_hidden=256))
  counts = dsmoe.count_params(c)
  flops = dsmoe.flops_per_token(c)
  ref = load_config("tiny")
  ref.model.moe.fine_grained.update(dict(N=4, m=1, K=2, K_s=0, ffn_hidden=256))
  base = dsmoe.count_params(ref), dsmoe.flops_per_token(ref)
  # Only the router grows (N'=mN columns), everything else is equal.
  router_extra = (m - 1) * 4 * c.model.d_model * (c.model.num_layers - c.model.first_k_dense_replace)
  assert counts["total"] - base[0]["total"] == router_extra
  assert counts["activated"] - base[0]["activated"] == router_extra
  assert flops - base[1] == 6 * router_extra
  r = dsmoe.resolve(c).model.moe
  assert (r.num_routed_experts, r.top_k, r.expert_hidden) == (4 * m, 2 * m, 256 // m)
