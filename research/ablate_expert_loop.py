"""What each piece of the CPU expert loop's data movement costs, in wall time.

    python research/ablate_expert_loop.py --experts 128 --expert-hidden 128 --top-k 12

Each variant is dsmoe/dispatch/expert_loop.py with one piece of work
removed or replaced by a contiguous, index-free stand-in of the same size,
compiled from a patched copy of its source. **Their results are wrong**: only
the time next to the unchanged loop ("base") means anything. It says how much
faster the loop could be without that piece. All variants and the dense FFN
of equal activated FLOPs are timed in turns in one run (scripts/bench_moe.py's
`measure_all`); shape flags as in bench_moe.py.

Variants:
  no_gathers        token rows read as a contiguous slice instead of by index
                    (forward x, backward x and dy);
  no_fwd_scatter    the forward's scatter-add into y_td replaced by a row sum;
  no_bwd_scatter    the backward's scatter-add into dx_td, the same;
  no_gu_write       only 8 rows of the saved gate/up activations written;
  dw_put_slot0      weight gradients written to expert slots 0 and 1 only;
  same_weights      every expert computes with the weights of expert 0 or 1
                    (cache-hot: the cost of slicing and streaming 128 experts);
  no_data_movement  all of no_gathers, both no_*_scatter, no_gu_write and
                    dw_put_slot0 together.
"""

from __future__ import annotations

import pathlib
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_moe  # noqa: E402  (scripts/bench_moe.py: inputs, compile, paired timing)
from dsmoe.dispatch import dropless, layout  # noqa: E402

SOURCE = ROOT / "dsmoe" / "dispatch" / "expert_loop.py"

_GATHERS = [
    ('x_td.at[tok_r[:n]].get(mode="promise_in_bounds")',
     "lax.dynamic_slice_in_dim(x_td, tok_r[0] % 8, n)"),
    ('x_td.at[tok_r].get(mode="promise_in_bounds")',
     "lax.dynamic_slice_in_dim(x_td, tok_r[0] % 8, n)"),
    ('dy_td.at[tok_r].get(mode="promise_in_bounds")',
     "lax.dynamic_slice_in_dim(dy_td, tok_r[0] % 8, n)"),
]
_FWD_SCATTER = [('y_td.at[_rows(token_p, p0, big)].add(y_rd, mode="promise_in_bounds")',
                 "y_td.at[0].add(y_rd.sum(0))")]
_BWD_SCATTER = [('dx_td.at[_rows(token_p, p0, big)].add(dx_rd, mode="promise_in_bounds")',
                 "dx_td.at[0].add(dx_rd.sum(0))")]
_GU_WRITE = [("tuple(_write(buf, p, p0) for buf, p in zip(saved, parts))",
              "tuple(_write(buf, p[:8], p0) for buf, p in zip(saved, parts))")]
_DW_PUT = [("_put(dwg, dw_g, e), _put(dwu, dw_u, e), _put(dwd, dw_d, e)",
            "_put(dwg, dw_g, e % 2), _put(dwu, dw_u, e % 2), _put(dwd, dw_d, e % 2)")]
_SAME_WEIGHTS = [
    ("_at(w.w_gate_edf, e).astype(dtype), _at(w.w_up_edf, e).astype(dtype), fused)",
     "_at(w.w_gate_edf, e % 2).astype(dtype), _at(w.w_up_edf, e % 2).astype(dtype), fused)"),
    ("_at(w.w_down_efd, e).astype(dtype))", "_at(w.w_down_efd, e % 2).astype(dtype))"),
]

VARIANTS = {
    "base": [],
    "no_gathers": _GATHERS,
    "no_fwd_scatter": _FWD_SCATTER,
    "no_bwd_scatter": _BWD_SCATTER,
    "no_gu_write": _GU_WRITE,
    "dw_put_slot0": _DW_PUT,
    "same_weights": _SAME_WEIGHTS,
    "no_data_movement": _GATHERS + _FWD_SCATTER + _BWD_SCATTER + _GU_WRITE + _DW_PUT,
}


def patched_source(name: str) -> str:
  """expert_loop.py's source with variant `name`'s replacements (each must
  match exactly once, so a change to the loop cannot silently void one)."""
  src = SOURCE.read_text()
  for old, new in VARIANTS[name]:
    if src.count(old) != 1:
      raise ValueError(f"variant {name}: {old!r} occurs {src.count(old)} times in {SOURCE}")
    src = src.replace(old, new)
  return src


def load_variant(name: str) -> types.ModuleType:
  module = types.ModuleType(f"expert_loop_{name}")
  code = compile(patched_source(name), f"<expert_loop {name}>", "exec")
  exec(code, module.__dict__)  # noqa: S102  (our own file, patched above)
  return module


def main(argv=None) -> dict:
  args = bench_moe.parse_args(argv)
  x_td, idx_tk, weight_tk, experts, dense_w, probe_td = bench_moe.make_inputs(args)
  num_experts, pairs = args.experts, args.tokens * args.top_k
  block = dropless.auto_block_size(pairs, num_experts, "loop")
  only = set(filter(None, args.only.split(",")))
  print(f"shape tokens={args.tokens} d_model={args.d_model} experts={num_experts} "
        f"hidden={args.expert_hidden} top_k={args.top_k}; results of every variant "
        "but base are wrong by design: compare times only", flush=True)
  dense = lambda x, i, wt, q: bench_moe.dense_ffn(x, *q)  # noqa: E731
  runs = {"dense_ffn": bench_moe.compile_case(bench_moe.grad_fn(dense, probe_td),
                                              (x_td, weight_tk, dense_w, idx_tk))[0]}
  for name in VARIANTS:
    if only and name not in only and name != "base":
      continue
    loop = load_variant(name)

    def layer(x, i, wt, q, loop=loop):
      lay = layout.blocked_layout(i, num_experts, block)
      rows = min(dropless.loop_target(pairs, num_experts), lay.token_p.shape[0] // block * block)
      return loop.run_layout(x, wt, q, lay, dropless.loop_chunk_sizes(block, rows))
    runs[name] = bench_moe.compile_case(bench_moe.grad_fn(layer, probe_td),
                                        (x_td, weight_tk, experts, idx_tk))[0]
  ms = bench_moe.measure_all(runs, {name: args.reps for name in runs})
  base = ms["base"][0]
  print(f"{'variant':18s} {'ms':>8s} {'ms/dense':>9s} {'x dense':>8s} {'saves ms':>9s}")
  for name, (med, _, paired, *_) in ms.items():
    print(f"{name:18s} {med:8.1f} {med / ms['dense_ffn'][0]:9.2f} {paired:8.2f} "
          f"{base - med:9.1f}")
  return ms


if __name__ == "__main__":
  main()
