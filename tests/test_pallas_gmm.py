"""Grouped-matmul kernels (pallas_kernels/gmm) in the Pallas interpreter vs references.

Oracles: pallas_kernels/gmm/reference.py (a dense matmul per group, masked),
itself checked against a numpy loop here; gradients of the kernels' custom
VJP against jax autodiff of that reference. Both kernels ("mosaic" = the
TPU kernel, "triton" = the GPU kernel) run interpreted on CPU, small shapes.

Tolerances: float32 inputs use full-precision products in both kernel and
reference, so they agree to rounding (rtol 1e-5, atol 1e-5 * scale);
bfloat16 inputs are accumulated in float32 by both and the kernel rounds its
output to bfloat16 once: atol 1% of the largest reference entry (2^-7 is
bfloat16's relative step).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gmm import Tiling, gmm, metadata, reference, tgmm
from pallas_kernels.gmm import tiling as tiling_lib

M, K, N = 50, 24, 40
# Group sizes (G=5) with M=50 rows: ragged with an empty group and rows past
# the last group; one group holding all rows; empty first and last groups.
SIZES = {
    "ragged": [7, 0, 20, 3, 13],
    "one_group": [0, 0, 50, 0, 0],
    "empty_ends": [0, 17, 9, 24, 0],
}
TILINGS = {"mosaic": Tiling(tm=16), "triton": Tiling(tm=16, tk=16, tn=16)}


def case(sizes, dtype, seed=0, m=M, k=K, n=N):
  rng = np.random.default_rng(seed)
  g = len(sizes)
  lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
  rhs = jnp.asarray(rng.normal(size=(g, k, n)) / np.sqrt(k), dtype)
  dout = jnp.asarray(rng.normal(size=(m, n)), dtype)
  return lhs, rhs, jnp.asarray(sizes, jnp.int32), dout


def assert_close(got, want, dtype):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  scale = max(1.0, float(np.abs(want).max()))
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
  else:
    np.testing.assert_allclose(got, want, atol=0.01 * scale)


def test_reference_matches_numpy_loop():
  lhs, rhs, sizes, dout = case(SIZES["ragged"], jnp.float32)
  x, w, d = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64), np.asarray(dout, np.float64)
  out, drhs = np.zeros((M, N)), np.zeros_like(w)
  start = 0
  for g, size in enumerate(SIZES["ragged"]):
    rows = slice(start, start + size)
    out[rows] = x[rows] @ w[g]
    drhs[g] = x[rows].T @ d[rows]
    start += size
  np.testing.assert_allclose(reference.gmm(lhs, rhs, sizes), out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(reference.tgmm(lhs, dout, sizes), drhs, rtol=1e-5, atol=1e-5)


def fwd_bwd(fn, lhs, rhs, dout):
  """(out, d_lhs, d_rhs) of fn(lhs, rhs) with cotangent dout, in one jit."""
  def run(a, b, d):
    out, vjp = jax.vjp(fn, a, b)
    return (out, *vjp(d))
  return jax.jit(run)(lhs, rhs, dout)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("sizes", list(SIZES), ids=list(SIZES))
@pytest.mark.parametrize("kernel", ["mosaic", "triton"])
def test_forward_and_gradients_match_reference(kernel, sizes, dtype):
  lhs, rhs, group_sizes, dout = case(SIZES[sizes], dtype)
  tiling = TILINGS[kernel]
  got = fwd_bwd(lambda a, b: gmm(a, b, group_sizes, tiling=tiling, kernel=kernel),
                lhs, rhs, dout)
  want = fwd_bwd(lambda a, b: reference.gmm(a, b, group_sizes), lhs, rhs, dout)
  assert all(x.dtype == dtype for x in got)
  for g, w in zip(got, want):  # out, d_lhs (gmm, rhs transposed), d_rhs (tgmm)
    assert_close(g, w, dtype)
  # Rows outside every group (past the last) are exactly 0.
  np.testing.assert_array_equal(np.asarray(got[0][int(sum(SIZES[sizes])):], np.float32), 0.0)


@pytest.mark.parametrize("kernel", ["mosaic", "triton"])
def test_transposed_rhs_and_tgmm_alone(kernel):
  """gmm with rhs stored [G, n, k] (its VJP: d_rhs = tgmm(dout, lhs)); tgmm called directly."""
  lhs, rhs, group_sizes, dout = case(SIZES["ragged"], jnp.float32, seed=3)
  tiling = TILINGS[kernel]
  got = fwd_bwd(lambda a, b: gmm(a, b, group_sizes, tiling=tiling, kernel=kernel,
                                 transpose_rhs=True), lhs, jnp.swapaxes(rhs, 1, 2), dout)
  want = fwd_bwd(lambda a, b: reference.gmm(a, b, group_sizes), lhs, rhs, dout)
  assert_close(got[0], want[0], jnp.float32)
  assert_close(got[1], want[1], jnp.float32)
  assert_close(got[2], jnp.swapaxes(want[2], 1, 2), jnp.float32)
  drhs = jax.jit(lambda a, d: tgmm(a, d, group_sizes, tiling=tiling, kernel=kernel))(lhs, dout)
  assert_close(drhs, reference.tgmm(lhs, dout, group_sizes), jnp.float32)


@pytest.mark.parametrize("m,k,n", [(40, 200, 300), (64, 256, 256)], ids=["ragged", "exact"])
@pytest.mark.parametrize("kernel", ["mosaic", "triton"])
def test_tile_edges_in_k_and_n(kernel, m, k, n):
  """Several k and n tiles; "ragged": the last ones partial (the last k step is
  masked), "exact": every tile full (no masks are emitted)."""
  lhs, rhs, sizes, dout = case([9, 0, m - 9 - 3], jnp.float32, seed=1, m=m, k=k, n=n)
  tiling = Tiling(tm=16, tk=128, tn=128) if kernel == "mosaic" else Tiling(tm=16, tk=64)

  def f(a, b):
    return jax.vjp(lambda a, b: gmm(a, b, sizes, tiling=tiling, kernel=kernel), a, b)

  out, vjp = jax.jit(f)(lhs, rhs)
  ref, ref_vjp = jax.vjp(lambda a, b: reference.gmm(a, b, sizes), lhs, rhs)
  assert_close(out, ref, jnp.float32)
  for got, want in zip(vjp(dout), ref_vjp(dout)):
    assert_close(got, want, jnp.float32)


@pytest.mark.parametrize("kernel", ["mosaic", "triton"])
def test_group_offset_runs_only_local_groups(kernel):
  """Groups 1..3 of 5 (as on an expert-parallel shard), offset traced under jit."""
  lhs, rhs, sizes, dout = case(SIZES["ragged"], jnp.float32, seed=2)
  tiling, rhs_local = TILINGS[kernel], rhs[1:4]

  @jax.jit
  def f(a, b, offset):
    out, vjp = jax.vjp(lambda a, b: gmm(a, b, sizes, group_offset=offset, tiling=tiling,
                                        kernel=kernel), a, b)
    return out, vjp(dout)

  out, (d_lhs, d_rhs) = f(lhs, rhs_local, jnp.int32(1))
  ref, ref_vjp = jax.vjp(lambda a, b: reference.gmm(a, b, sizes, group_offset=1),
                         lhs, rhs_local)
  ref_d_lhs, ref_d_rhs = ref_vjp(dout)
  assert d_rhs.shape == (3, K, N)
  assert_close(out, ref, jnp.float32)
  assert_close(d_lhs, ref_d_lhs, jnp.float32)
  assert_close(d_rhs, ref_d_rhs, jnp.float32)
  # Rows 0..6 (group 0) and 30..49 (group 4 and past the end) are not local: 0.
  np.testing.assert_array_equal(np.asarray(out[:7]), 0.0)
  np.testing.assert_array_equal(np.asarray(out[30:]), 0.0)
  np.testing.assert_array_equal(np.asarray(d_rhs[0]), 0.0)  # group 1 is empty
  drhs = tgmm(lhs, dout, sizes, group_offset=2, num_local_groups=3, tiling=tiling,
              kernel=kernel)
  assert_close(drhs, reference.tgmm(lhs, dout, sizes, group_offset=2, num_local_groups=3),
               jnp.float32)


def test_auto_kernel_is_a_pallas_call_and_bad_input_is_refused():
  lhs, rhs, sizes, _ = case(SIZES["ragged"], jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda a, b: gmm(a, b, sizes))(lhs, rhs))
  assert "pallas_call" in jaxpr and "platform_index" in jaxpr
  with pytest.raises(ValueError, match="one dtype"):
    gmm(lhs.astype(jnp.bfloat16), rhs, sizes)
  with pytest.raises(ValueError, match="rhs must be"):
    gmm(lhs, rhs[:, :5], sizes)
  with pytest.raises(ValueError, match="powers of two"):
    gmm(lhs, rhs, sizes, tiling=Tiling(tm=24), kernel="triton")
  with pytest.raises(ValueError, match="kernel="):
    gmm(lhs, rhs, sizes, kernel="cuda")


@pytest.mark.parametrize("seed", range(6))
def test_visit_schedule_covers_every_tile_and_group(seed):
  """The TPU visit list, checked in numpy: tiles and groups non-decreasing (an
  output block is only revisited consecutively), every tile and every local
  group visited, the live row ranges partition the local rows, the count
  within the static bound."""
  rng = np.random.default_rng(seed)
  g, m, tm = 7, 96, 16
  sizes = rng.multinomial(int(rng.integers(0, m + 1)), rng.dirichlet(np.ones(g) * 0.5))
  offset, num_local = int(rng.integers(0, 3)), int(rng.integers(1, 5))
  ranges = metadata.local_ranges(jnp.asarray(sizes, jnp.int32), m, offset, num_local)
  s = jax.tree.map(np.asarray, metadata.visit_schedule(ranges, m, tm))
  total = int(s.num_visits[0])
  assert total <= m // tm + num_local - 1
  tile, group, lo, hi = (a[:total] for a in (s.tile_v, s.group_v, s.lo_v, s.hi_v))
  assert np.all(np.diff(tile) >= 0) and np.all(np.diff(group) >= 0)
  assert set(tile) == set(range(m // tm))
  base, count = int(s.first_group_visit[0]), int(s.num_group_visits[0])
  assert set(group[base:base + count]) == set(range(num_local))
  ends = np.cumsum(sizes)
  local_start, local_end = (ends - sizes)[offset], ends[offset + num_local - 1]
  covered = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)] + [np.zeros(0, int)])
  np.testing.assert_array_equal(covered, np.arange(local_start, local_end))
  for a, b, t, l in zip(lo, hi, tile, group):  # each range inside its tile and group
    if b > a:
      assert t * tm <= a < b <= t * tm + tm
      assert (ends - sizes)[offset + l] <= a and b <= ends[offset + l]


@pytest.mark.parametrize("gen", sorted(tiling_lib.TPU_GENERATIONS))
def test_tpu_default_tiles_fit_each_generation(gen, monkeypatch):
  """At the 16B expert shape (bf16): blocks within the generation's VMEM, tiles
  legal for Mosaic (multiples of 128 or the whole dimension), and on a megacore
  chip two tiles along the dimension the two TensorCores split."""
  info = tiling_lib.TPU_GENERATIONS[gen]
  monkeypatch.setattr(tiling_lib, "tpu_generation", lambda: info)
  m, d, f = 106496, 2048, 1408
  for kind, (mm, k, n) in [("gmm", (m, d, f)), ("gmm", (m, f, d)), ("tgmm", (m, d, f))]:
    fn = tiling_lib.tpu_gmm_tiles if kind == "gmm" else tiling_lib.tpu_tgmm_tiles
    tm, tk, tn, vmem = fn(Tiling(tm=128), mm, k, n, 2, 2)
    assert tm == 128 and vmem <= info.vmem * 7 // 8
    for tile, dim in ((tk, k), (tn, n)):
      assert tile == dim or tile % 128 == 0
    if info.megacore:
      assert (n if kind == "gmm" else k) > (tn if kind == "gmm" else tk)
    if info.vmem >= 64 * tiling_lib.MIB:  # room for whole weight blocks
      assert (tk, tn) == (k, n) or info.megacore


@pytest.mark.parametrize("dtype,want", [("float32", "HIGHEST"), ("bfloat16", None)])
def test_triton_kernels_ask_float32_products_in_full_precision(dtype, want):
  """Triton runs a float32 dot without a precision in TF32 (~1e-3 error):
  every dot of the GPU kernels (gmm, its transpose, tgmm) asks for HIGHEST
  in float32, and for nothing in bfloat16."""
  from pallas_kernels.gmm import kernel_gpu  # pylint: disable=g-import-not-at-top
  lhs, rhs, sizes, dout = case(SIZES["ragged"], jnp.dtype(dtype))
  jaxprs = [jax.make_jaxpr(f)() for f in (
      lambda: kernel_gpu.gmm(lhs, rhs, sizes, tiling=TILINGS["triton"]),
      lambda: kernel_gpu.gmm(dout, rhs, sizes, tiling=TILINGS["triton"], transpose_rhs=True),
      lambda: kernel_gpu.tgmm(lhs, dout, sizes, num_local_groups=5, tiling=TILINGS["triton"]))]
  for jaxpr in map(str, jaxprs):
    dots = jaxpr.count("dot_general[")
    highest = jaxpr.count("precision=(Precision.HIGHEST, Precision.HIGHEST)")
    assert dots > 0
    assert highest == (dots if want else 0), jaxpr
