"""Permute / unpermute kernels (pallas_kernels/permute) vs plain jnp with autodiff.

Oracle: the permute and the gate-weighted top-k combine written here as
plain gathers, differentiated by jax (scatter-add backwards), on the maps of
dsmoe's blocked layout (padding rows) and capacity layout (dropped pairs).
The Triton kernels run in the Pallas interpreter on CPU.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsmoe.dispatch import layout
from pallas_kernels.permute import permute, unpermute
from tests.test_pallas_export import CUSTOM_CALL, gpu_target

T, D, E, K = 19, 40, 5, 3


def maps(kind: str):
  rng = np.random.default_rng(0)
  idx = jnp.asarray(np.stack([rng.permutation(E)[:K] for _ in range(T)]), jnp.int32)
  weight = jnp.asarray(rng.uniform(0.1, 1.0, (T, K)), jnp.float32)
  if kind == "blocked":  # each expert padded to blocks of 4 rows
    return layout.blocked_layout(idx, E, 4), weight
  return layout.capacity_layout(idx, weight, E, 6, "position"), weight  # drops pairs


def plain_permute(x_td, token_p):
  return x_td[token_p]


def plain_unpermute(y_pd, weight_tk, row_tk):
  y_tkd = y_pd.at[row_tk].get(mode="fill", fill_value=0)  # dropped pairs: 0
  return jnp.einsum("tkd,tk->td", y_tkd, weight_tk.astype(y_pd.dtype))


@pytest.mark.parametrize("kind", ["blocked", "capacity"])
@pytest.mark.parametrize("kernel", ["triton", "xla"])
def test_permute_unpermute_and_gradients(kernel, kind):
  lay, weight = maps(kind)
  p = lay.token_p.shape[0]
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(p, D)), jnp.float32)
  dx, dy = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((p, D), (T, D)))
  if kind == "capacity":
    assert int(lay.dropped) > 0  # the case really drops pairs
  # Padding rows never reach the MoE output, so their cotangent is 0 (the
  # gather-only backward relies on it; plain autodiff would add it to token 0).
  used = np.zeros(p, bool)
  used[np.asarray(lay.row_tk).ravel()[np.asarray(lay.row_tk).ravel() < p]] = True
  dx = jnp.where(jnp.asarray(used)[:, None], dx, 0.0)

  def both(perm, unperm):
    def fn(x, y, w):
      xp, vjp_p = jax.vjp(perm, x)
      yt, vjp_u = jax.vjp(unperm, y, w)
      return xp, yt, vjp_p(dx), vjp_u(dy)
    return jax.jit(fn)(x, y, weight)

  got = both(lambda x: permute(x, lay.token_p, lay.row_tk, kernel=kernel),
             lambda y, w: unpermute(y, w, lay.row_tk, lay.token_p, lay.pair_p, kernel=kernel))
  want = both(lambda x: plain_permute(x, lay.token_p),
              lambda y, w: plain_unpermute(y, w, lay.row_tk))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
  # dy_pd of a padding row is 0 (its gate is 0), not a copy of token 0's.
  np.testing.assert_array_equal(np.asarray(got[3][0])[~used], 0.0)


def test_unpermute_bfloat16_sums_in_float32():
  lay, weight = maps("blocked")
  y = jnp.asarray(np.random.default_rng(2).normal(size=(lay.token_p.shape[0], D)),
                  jnp.bfloat16)
  got = jax.jit(lambda y: unpermute(y, weight, lay.row_tk, lay.token_p, lay.pair_p,
                                    kernel="triton"))(y)
  want = plain_unpermute(y.astype(jnp.float32), weight, lay.row_tk)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.01 * float(
      jnp.abs(want).max()))


# permute: gather (fwd), combine (bwd); unpermute: combine (fwd), gather + row dots (bwd)
TRITON_KERNELS = {"dsmoe_gather_rows_gpu": 2, "dsmoe_combine_rows_gpu": 2,
                  "dsmoe_row_dots_gpu": 1}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowering_picks_triton_on_gpu_and_xla_on_tpu(platform):
  """At the 16B shape (16384 tokens, top-6, d_model 2048, bf16), forward +
  backward of permute and unpermute: five Triton kernels on CUDA, XLA's
  gathers (no kernel) on TPU."""
  t, k, d, e, block = 16384, 6, 2048, 64, 128
  p = layout.num_blocks_bound(t * k, e, block) * block
  spec = jax.ShapeDtypeStruct

  def fwd_bwd(x, y, w, token_p, row_tk, pair_p):
    xp, vjp_p = jax.vjp(lambda x: permute(x, token_p, row_tk), x)
    yt, vjp_u = jax.vjp(lambda y, w: unpermute(y, w, row_tk, token_p, pair_p), y, w)
    return vjp_p(xp), vjp_u(yt)

  args = (spec((t, d), jnp.bfloat16), spec((p, d), jnp.bfloat16), spec((t, k), jnp.float32),
          spec((p,), jnp.int32), spec((t, k), jnp.int32), spec((p,), jnp.int32))
  unchecked = [jax.export.DisabledSafetyCheck.custom_call(CUSTOM_CALL["cuda"])]
  with gpu_target():
    text = jax.export.export(jax.jit(fwd_bwd), platforms=[platform],
                             disabled_checks=unchecked)(*args).mlir_module()
  names = re.findall(r'name = "(dsmoe_\w+_gpu)"', text)
  assert {n: names.count(n) for n in set(names)} == (TRITON_KERNELS if platform == "cuda"
                                                     else {})
