"""dsmoe.profiling: the HLO instruction -> kind map and result types that the
op-time tables of scripts/bench_moe.py --profile rest on (the traced timings
themselves need an XLA flag set before jax starts: not tested here)."""

import jax
import jax.numpy as jnp
from jax import lax
import pytest

from dsmoe import profiling


def _compiled():
  def f(x_td, w_df, idx_s):
    rows = x_td[idx_s]  # gather
    y = jnp.tanh(rows @ w_df)  # matmul, elementwise
    acc = jnp.zeros((x_td.shape[0], w_df.shape[1]))  # zeros
    acc = lax.fori_loop(0, 2, lambda i, a: a.at[idx_s].add(y * i), acc)  # loop, scatter-add
    return acc, jnp.sort(idx_s)  # sort
  args = (jnp.ones((64, 32)), jnp.ones((32, 16)), jnp.arange(48, dtype=jnp.int32) % 64)
  return jax.jit(f).lower(*args).compile()


def test_op_kinds_names_the_ops_each_kind_comes_from():
  hlo = _compiled().as_text()
  kinds = profiling.op_kinds(hlo)
  found = {k for k in kinds.values() if k}
  for kind in ("matmul", "gather", "scatter-add", "sort", "zeros"):
    assert kind in found, (kind, sorted(found))
  assert None in kinds.values()  # the while loop is a container, not an op
  # every instruction named in the text gets a kind (or None)
  names = [line.split(" = ")[0].split("%")[-1] for line in hlo.split("\n")
           if " = " in line and "%" in line.split(" = ")[0]]
  assert set(names) <= set(kinds)


def test_result_types_are_the_instructions_shapes():
  compiled = _compiled()
  types = profiling.result_types(compiled.as_text())
  kinds = profiling.op_kinds(compiled.as_text())
  sorts = [n for n, k in kinds.items() if k == "sort"]
  assert sorts and all(types[n].startswith("s32[48]") or types[n].startswith("(s32[48]")
                       for n in sorts)
  scatters = [n for n, k in kinds.items() if k == "scatter-add"]
  assert scatters and all(types[n].startswith("f32[64,16]") for n in scatters)
  tuples = [t for t in types.values() if t.startswith("(")]
  assert tuples and all(t.endswith(")") for t in tuples)  # the loop's carry: read whole


def test_breakdown_and_slowest_sum_and_order_the_instructions():
  times = {"a": {"kind": "matmul", "ms": 3.0, "calls": 2, "type": "f32[2]"},
           "b": {"kind": "zeros", "ms": 5.0, "calls": 1, "type": "f32[9]"},
           "c": {"kind": "matmul", "ms": 1.5, "calls": 4, "type": "f32[3]"}}
  assert profiling.breakdown(times) == {"matmul": (4.5, 6), "zeros": (5.0, 1)}
  assert list(profiling.breakdown(times)) == ["zeros", "matmul"]  # largest first
  assert [op["name"] for op in profiling.slowest(times, 2)] == ["b", "a"]


def test_loop_ablation_variants_patch_the_current_loop(monkeypatch):
  """scripts/ablate_expert_loop.py: every variant's replacements still match
  expert_loop.py exactly once (a refactor of the loop must update them, not
  silently time the unchanged loop), each non-base variant changes the
  source, and a pattern that no longer matches is refused."""
  from tests.conftest import ROOT  # pylint: disable=g-import-not-at-top
  monkeypatch.syspath_prepend(str(ROOT / "scripts"))
  import ablate_expert_loop as ablate  # pylint: disable=g-import-not-at-top
  original = ablate.SOURCE.read_text()
  assert ablate.patched_source("base") == original
  for name in ablate.VARIANTS:
    module = ablate.load_variant(name)  # compiles and imports
    assert hasattr(module, "run_layout")
    if name != "base":
      assert ablate.patched_source(name) != original, name
  monkeypatch.setitem(ablate.VARIANTS, "stale", [("no such line", "x")])
  with pytest.raises(ValueError, match="occurs 0 times"):
    ablate.patched_source("stale")


def test_matmul_rate_fact_times_the_layers_flops_on_both_sides(monkeypatch):
  """bench_xla_cpu_facts fact 4 compares the experts' products with the dense
  FFN's: both lists must hold a SwiGLU layer's forward+backward FLOPs,
  3 passes x 2 x (T*K rows) x 3 projections x D x F (by hand, not from the
  script), or the ratio it prints compares different work."""
  from tests.conftest import ROOT  # pylint: disable=g-import-not-at-top
  monkeypatch.syspath_prepend(str(ROOT / "scripts"))
  import bench_xla_cpu_facts  # pylint: disable=g-import-not-at-top
  # hidden 768 is above FUSE_GATE_UP_MAX_HIDDEN: gate and up as two products per expert
  for t, d, e, f, k in ((4096, 512, 128, 128, 12), (64, 16, 8, 4, 2), (96, 8, 6, 10, 3),
                        (4096, 512, 16, 768, 2)):
    per_expert, dense = bench_xla_cpu_facts.swiglu_products(t, d, e, f, k)
    expected = 3 * 2 * (t * k) * 3 * d * f
    assert sum(2 * e * m * kk * n * c for _, m, kk, n, c in per_expert) == expected
    assert sum(2 * m * kk * n * c for _, m, kk, n, c in dense) == expected
