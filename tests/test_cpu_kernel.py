"""The C++ CPU expert kernel (dsmoe/dispatch/cpu_kernel.py, cpu_kernel.cc).

The oracle is the routed-expert sum written out per (token, slot) pair with
gathered per-pair weights and differentiated by jax.grad: no layout, no
chunks, no threads. The dispatch-level equality with the dense reference
(every strategy) is in test_dispatch.py; expert parallelism in
test_parallel.py.
"""

import importlib.util
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsmoe
from dsmoe.dispatch import ExpertWeights, cpu_kernel, dropless
from dsmoe.dispatch import layout as layout_lib
from dsmoe.dispatch.common import gate_per_row
from dsmoe.errors import ConfigError
from dsmoe.spec import ExpertPlan
from tests.helpers import small_config

# The kernel is opt-in: it needs a C++ compiler and the cpu-kernel extra
# (scipy-openblas32), which `make test` installs.
pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None
    or importlib.util.find_spec("scipy_openblas32") is None,
    reason="no C++ compiler, or the cpu-kernel extra is not installed")

pytestmark = [pytestmark, pytest.mark.usefixtures("full_precision_matmuls")]


def pairwise_moe(x_td, idx_tk, weight_tk, w: ExpertWeights):
  """sum_k weight[t, k] * SwiGLU with expert idx[t, k]'s weights, per pair."""
  g = jnp.einsum("td,tkdf->tkf", x_td, w.w_gate_edf[idx_tk])
  u = jnp.einsum("td,tkdf->tkf", x_td, w.w_up_edf[idx_tk])
  y = jnp.einsum("tkf,tkfd->tkd", jax.nn.silu(g) * u, w.w_down_efd[idx_tk])
  return jnp.einsum("tk,tkd->td", weight_tk, y)


def make_case(seed=0, t=40, d=12, f=10, e=6, k=2):
  """Uneven routing: expert 0 takes most pairs (more rows than a small chunk),
  the last expert none."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(t, d)).astype(np.float32)
  p = np.array([8.0] + [1.0] * (e - 2) + [0.0])
  idx = np.stack([rng.choice(e, k, replace=False, p=p / p.sum()) for _ in range(t)])
  weight = rng.uniform(0.1, 1.0, size=(t, k)).astype(np.float32)
  w = ExpertWeights(*(jnp.asarray(0.4 * rng.normal(size=s).astype(np.float32))
                      for s in [(e, d, f), (e, d, f), (e, f, d)]))
  probe = rng.normal(size=(t, d)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(idx, jnp.int32), jnp.asarray(weight), w, jnp.asarray(probe)


def kernel_moe(x_td, idx_tk, weight_tk, w, *, block, threads, chunk):
  lay = layout_lib.blocked_layout(idx_tk, w.w_gate_edf.shape[0], block)
  rows_e = (lay.count_e + block - 1) // block * block
  return cpu_kernel.expert_ffn(x_td, gate_per_row(weight_tk, lay.pair_p), w, lay.token_p,
                               lay.start_e, rows_e, threads, chunk)


def loss_and_grads(fn, x, idx, weight, w, probe):
  loss = lambda x, weight, w: jnp.sum(fn(x, idx, weight, w) * probe)
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, weight, w)


def test_kernel_builds_here():
  """make test's machine has g++ and scipy-openblas32: the kernel must build
  (a failed build would otherwise only show as "auto" falling back)."""
  assert cpu_kernel.available(), cpu_kernel.unavailable_reason()


@pytest.mark.parametrize("threads,chunk,block", [(1, 512, 1), (2, 3, 1), (3, 4, 4), (0, 7, 2),
                                                 (8, 1, 1)])
def test_kernel_matches_pairwise_reference(threads, chunk, block):
  """Values and gradients (tokens, gates, all weights) for one or several
  threads, chunks smaller than an expert's rows (weight gradients summed over
  chunks), padding rows (block > 1) and an expert with no rows (zero
  gradients)."""
  x, idx, weight, w, probe = make_case()
  assert int(jnp.sum(idx == w.w_gate_edf.shape[0] - 1)) == 0  # the empty expert
  assert chunk == 512 or int(jnp.sum(idx == 0)) > chunk  # several chunks (512: one per expert)
  got = loss_and_grads(lambda *a: kernel_moe(*a, block=block, threads=threads, chunk=chunk),
                       x, idx, weight, w, probe)
  ref = loss_and_grads(pairwise_moe, x, idx, weight, w, probe)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5)
  assert not np.any(np.asarray(got[1][2].w_gate_edf[-1]))  # the empty expert's gradient


def test_kernel_under_jit_and_vmap():
  """jit, and vmap over a batch of token sets (sequential calls)."""
  x, idx, weight, w, probe = make_case(seed=1)
  xs = jnp.stack([x, 2 * x])
  fn = jax.jit(jax.vmap(lambda x: kernel_moe(x, idx, weight, w, block=2, threads=0, chunk=512)))
  got = fn(xs)
  for i in range(2):
    np.testing.assert_allclose(got[i], pairwise_moe(xs[i], idx, weight, w), rtol=2e-5, atol=2e-5)


def test_bad_token_index_is_an_error_not_a_wild_write():
  x, idx, weight, w, _ = make_case()
  lay = layout_lib.blocked_layout(idx, w.w_gate_edf.shape[0], 1)
  token_p = lay.token_p.at[0].set(x.shape[0])  # one past the last token
  with pytest.raises(Exception, match="token index is out of range"):
    jax.block_until_ready(cpu_kernel.expert_ffn(
        x, gate_per_row(weight, lay.pair_p), w, token_p, lay.start_e, lay.count_e))


def kernel_plan():
  return ExpertPlan(dispatch="dropless", grouped="kernel", block_size=4, capacity_factor=1.25,
                    eval_capacity_factor=0.0, drop_policy="position", ep_exchange="allgather",
                    platform="cpu")


def test_bfloat16_is_refused_not_silently_run_elsewhere():
  """The kernel computes in float32: bfloat16 tokens are one clear error
  (dsmoe.config refuses the setting earlier; this is the library's guard)."""
  x, idx, weight, w, _ = make_case()
  with pytest.raises(ConfigError, match="computes in float32"):
    dropless.dispatch(x.astype(jnp.bfloat16), idx, weight, w, kernel_plan())


def test_missing_compiler_and_failed_build_say_why(tmp_path, monkeypatch):
  monkeypatch.setenv("DSMOE_CACHE_DIR", str(tmp_path))  # no cached library to find
  ok, why = cpu_kernel.try_load("no-such-compiler-xyz")
  assert not ok and "no C++ compiler 'no-such-compiler-xyz'" in why
  ok, why = cpu_kernel.try_load("false")  # a "compiler" that fails
  assert not ok and "compiling cpu_kernel.cc failed" in why
  assert not list(tmp_path.glob("*.so"))


def test_auto_never_builds_the_kernel_and_kernel_is_opt_in(monkeypatch):
  """"auto" on CPU is the XLA loop: resolving and tracing it runs no compiler.
  Asked for where it cannot build, "kernel" is one line saying why."""
  def no_build():
    raise AssertionError("the C++ kernel was built")
  monkeypatch.setattr(cpu_kernel, "_load", no_build)
  spec = dsmoe.resolve(small_config(), platform="cpu")
  assert spec.model.moe.plan.grouped == "loop"
  x, idx, weight, w, _ = make_case()
  jax.make_jaxpr(lambda x: dropless.dispatch(x, idx, weight, w, spec.model.moe.plan).y_td)(x)
  monkeypatch.setattr(cpu_kernel, "_load", lambda: (False, "no C++ compiler 'g++' on PATH"))
  with pytest.raises(ConfigError, match=r"unavailable here \(no C\+\+ compiler 'g\+\+' on PATH\)"):
    dropless.dispatch(x, idx, weight, w, kernel_plan())


def test_cache_key_includes_the_compiler_version(tmp_path, monkeypatch):
  """Another compiler version (same command) builds another library."""
  monkeypatch.setenv("DSMOE_CACHE_DIR", str(tmp_path))
  for version in ("g++ (A) 1.0", "g++ (B) 2.0", "g++ (A) 1.0"):
    monkeypatch.setattr(cpu_kernel, "_compiler_version", lambda _, v=version: v)
    ok, why = cpu_kernel.try_load(os.environ.get("CXX", "g++"))
    assert ok, why
  assert len(list(tmp_path.glob("cpu_kernel-*.so"))) == 2
