"""Benchmark of the Pallas grouped-matmul kernels and the MoE layer on them.

Part 1, kernels: one expert projection at the MoE's shape, x[S, D] -> [S, F]
with S = tokens * top_k rows sorted by expert (routing: softmax of random
logits, top-k). Timed separately:
  fwd    out = x @ w[e]                  (per row, its expert's weights)
  d_lhs  dx = dout @ w[e]^T
  d_rhs  dw[e] = x[rows of e]^T @ dout[rows of e]
for three implementations:
  pallas      pallas_kernels.gmm (the platform's kernel), rows padded per
              expert to the row tile (--block) as in the MoE layer;
  ragged_dot  jax.lax.ragged_dot on the unpadded rows (its autodiff for d_lhs
              and d_rhs);
  dense       one plain matmul with the same FLOPs ([S, D] x [D, F]): the
              speed limit.
TFLOP/s counts the useful FLOPs 2*S*D*F for all three (pallas also
multiplies the padding rows).

Part 2, check: at the same shape, the Pallas kernels' fwd, d_lhs and d_rhs
against jax.lax.ragged_dot (and its autodiff) computed in float32 on the
same padded layout: the largest difference relative to the largest entry,
against a tolerance for the dtype (bfloat16 2e-2, float32 1e-4). A case
over it is reported as FAIL and the script exits 1 at the end.

Part 3, sweep: the forward gmm timed over a few tilings (GPU: row tile tm
x warps x pipeline stages; elsewhere: tm), each with the layout padded to
its own tm.

Part 4, the routed-expert layer, forward + backward (w.r.t. tokens, gates and
all expert weights) of dsmoe.dispatch.dropless with gmm_backend "pallas",
"ragged_dot" and "blocked" + strategy "batched", and `dense_ffn` (a SwiGLU FFN
of hidden top_k * expert_hidden: the same activated FLOPs).

Shapes (--shape): 16b: 16384 tokens, d_model 2048, 64 experts of hidden 1408,
top-6 (DeepSeekMoE 16B); 2b: 16384 tokens, d_model 1280, 63 of 880, top-7
(DeepSeekMoE 2B); tiny: a CPU smoke test, where the kernels run in the Pallas
interpreter (their times mean nothing there).

    python scripts/bench_kernels.py --shape 16b --json /tmp/kernels_16b.json

Runs without ml_collections, grain or tensorflow-datasets. A case that fails
(out of memory, a kernel that does not compile) prints its error and the rest
go on.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from dsmoe.dispatch import ExpertWeights, dropless, grouped  # noqa: E402
from dsmoe.spec import ExpertPlan  # noqa: E402
from pallas_kernels.gmm import Tiling, gmm, tgmm  # noqa: E402

SHAPES = {  # tokens, d_model, experts, expert_hidden, top_k
    "16b": (16384, 2048, 64, 1408, 6),
    "2b": (16384, 1280, 63, 880, 7),
    "tiny": (64, 32, 4, 16, 2),
}


def timed(fn, *args, reps: int, budget_s: float = 20.0) -> float:
  """Median milliseconds of jitted fn(*args) over up to `reps` runs after the
  compile and one warm run (the budget is counted in warm runs: a slow
  compile does not cut the repetitions)."""
  jfn = jax.jit(fn)
  jax.block_until_ready(jfn(*args))  # compile
  start = time.perf_counter()
  jax.block_until_ready(jfn(*args))  # one warm run: what a repetition costs
  first = time.perf_counter() - start
  reps = max(1, min(reps, int(budget_s / max(first, 1e-6))))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(jfn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def routing(key, tokens: int, experts: int, top_k: int):
  """(idx_tk, weight_tk): softmax of random logits, top-k."""
  scores = jax.nn.softmax(jax.random.normal(key, (tokens, experts), jnp.float32), axis=-1)
  weight_tk, idx_tk = jax.lax.top_k(scores, top_k)
  return idx_tk.astype(jnp.int32), weight_tk


def kernel_cases(shape, dtype, block: int):
  """{op: {impl: (fn, args)}} for fwd, d_lhs, d_rhs; and the useful FLOPs."""
  t, d, e, f, k = shape
  keys = jax.random.split(jax.random.key(0), 4)
  idx_tk, _ = routing(keys[0], t, e, k)
  s = t * k
  sizes_e = jnp.bincount(idx_tk.reshape(-1), length=e).astype(jnp.int32)
  padded_e = -(-sizes_e // block) * block  # the MoE layout: whole row tiles per expert
  p = int(np.ceil((s + e * (block - 1)) / block)) * block  # its static row bound
  x = jax.random.normal(keys[1], (p, d), jnp.float32).astype(dtype)
  dy = jax.random.normal(keys[2], (p, f), jnp.float32).astype(dtype)
  w = (jax.random.normal(keys[3], (e, d, f), jnp.float32) / np.sqrt(d)).astype(dtype)
  xs, dys, w0 = x[:s], dy[:s], w[0]
  tiling = Tiling(tm=block)

  def ragged_vjp(argnum):
    def fn(x, w, dy):
      _, vjp = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w, sizes_e), x, w)
      return vjp(dy)[argnum]
    return fn

  cases = {
      "fwd": {"pallas": (lambda x, w: gmm(x, w, padded_e, tiling=tiling), (x, w)),
              "ragged_dot": (lambda x, w: jax.lax.ragged_dot(x, w, sizes_e), (xs, w)),
              "dense": (jnp.matmul, (xs, w0))},
      "d_lhs": {"pallas": (lambda dy, w: gmm(dy, w, padded_e, tiling=tiling,
                                             transpose_rhs=True), (dy, w)),
                "ragged_dot": (ragged_vjp(0), (xs, w, dys)),
                "dense": (lambda dy, w: dy @ w.T, (dys, w0))},
      "d_rhs": {"pallas": (lambda x, dy: tgmm(x, dy, padded_e, tiling=tiling), (x, dy)),
                "ragged_dot": (ragged_vjp(1), (xs, w, dys)),
                "dense": (lambda x, dy: x.T @ dy, (xs, dys))},
  }
  return cases, 2 * s * d * f, int(padded_e.sum()) - s


def run_kernels(args, shape, dtype) -> list[dict]:
  cases, flops, padding = kernel_cases(shape, dtype, args.block)
  print(f"\n## gmm kernels: S={shape[0] * shape[4]} rows, D={shape[1]}, F={shape[3]}, "
        f"E={shape[2]}, {dtype.name}; pallas pads {padding} rows (block {args.block})")
  print("| op | impl | ms | TFLOP/s | x dense time | pallas speed-up |")
  print("|---|---|---:|---:|---:|---:|")
  rows = []
  for op, impls in cases.items():
    ms = {}
    for impl, (fn, operands) in impls.items():
      ms[impl] = measure(fn, operands, args.reps)
    for impl, t in ms.items():
      row = dict(part="kernel", op=op, impl=impl, ms=t, tflops=flops / (t * 1e-3) / 1e12)
      rows.append(row)
      print(f"| {op} | {impl} | {t:.3f} | {row['tflops']:.3g} | {t / ms['dense']:.2f} | "
            f"{t / ms['pallas']:.2f} |")
  return rows


TOLERANCE = {"bfloat16": 2e-2, "float32": 1e-4}  # max |diff| / max |reference|


def run_check(args, shape, dtype) -> list[dict]:
  """Part 2: the kernels against ragged_dot in float32 on the same padded rows."""
  t, d, e, f, k = shape
  keys = jax.random.split(jax.random.key(2), 4)
  idx_tk, _ = routing(keys[0], t, e, k)
  sizes_e = jnp.bincount(idx_tk.reshape(-1), length=e).astype(jnp.int32)
  padded_e = -(-sizes_e // args.block) * args.block
  p = int(np.ceil((t * k + e * (args.block - 1)) / args.block)) * args.block
  x = jax.random.normal(keys[1], (p, d), jnp.float32).astype(dtype)
  dy = jax.random.normal(keys[2], (p, f), jnp.float32).astype(dtype)
  w = (jax.random.normal(keys[3], (e, d, f), jnp.float32) / np.sqrt(d)).astype(dtype)
  tiling = Tiling(tm=args.block)
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  hi = jax.lax.Precision.HIGHEST
  ref_fwd = lambda x, w: jax.lax.ragged_dot(f32(x), f32(w), padded_e, precision=hi)  # noqa: E731
  cases = {
      "fwd": (lambda x, w, dy: gmm(x, w, padded_e, tiling=tiling),
              lambda x, w, dy: ref_fwd(x, w)),
      "d_lhs": (lambda x, w, dy: gmm(dy, w, padded_e, tiling=tiling, transpose_rhs=True),
                lambda x, w, dy: jax.vjp(lambda x: ref_fwd(x, w), f32(x))[1](f32(dy))[0]),
      "d_rhs": (lambda x, w, dy: tgmm(x, dy, padded_e, tiling=tiling),
                lambda x, w, dy: jax.vjp(lambda w: ref_fwd(x, w), f32(w))[1](f32(dy))[0]),
  }
  print(f"\n## check: kernels vs ragged_dot in float32, {dtype.name}, block {args.block}")
  print("| op | max abs diff / max abs reference | tolerance | |")
  print("|---|---:|---:|---|")
  rows = []
  for op, (kernel, reference) in cases.items():
    try:
      got = jax.jit(kernel)(x, w, dy)
      want = jax.jit(reference)(x, w, dy)
      err = float(jnp.max(jnp.abs(f32(got) - want)) / jnp.max(jnp.abs(want)))
    except Exception as e:  # pylint: disable=broad-except  (report and go on)
      print(f"  failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      err = float("nan")
    ok = err <= TOLERANCE[dtype.name]
    rows.append(dict(part="check", op=op, rel_err=err, ok=ok))
    print(f"| {op} | {err:.2e} | {TOLERANCE[dtype.name]:.0e} | {'ok' if ok else 'FAIL'} |")
  return rows


def sweep_tilings() -> list[Tiling]:
  """The tilings of part 3 on this platform."""
  if jax.default_backend() == "gpu":
    return [Tiling(tm=tm, num_warps=w, num_stages=s)
            for tm in (64, 128) for w in (4, 8) for s in (2, 3, 4)]
  return [Tiling(tm=tm) for tm in (64, 128)]


def run_sweep(args, shape, dtype) -> list[dict]:
  t, d, e, f, k = shape
  keys = jax.random.split(jax.random.key(3), 3)
  idx_tk, _ = routing(keys[0], t, e, k)
  sizes_e = jnp.bincount(idx_tk.reshape(-1), length=e).astype(jnp.int32)
  w = (jax.random.normal(keys[2], (e, d, f), jnp.float32) / np.sqrt(d)).astype(dtype)
  flops = 2 * t * k * d * f
  print(f"\n## sweep: forward gmm tilings, {dtype.name}")
  print("| tm | warps | stages | ms | TFLOP/s |")
  print("|---:|---:|---:|---:|---:|")
  rows = []
  for tiling in sweep_tilings():
    padded_e = -(-sizes_e // tiling.tm) * tiling.tm
    p = int(np.ceil((t * k + e * (tiling.tm - 1)) / tiling.tm)) * tiling.tm
    x = jax.random.normal(keys[1], (p, d), jnp.float32).astype(dtype)
    ms = measure(lambda x, w, tiling=tiling, sizes=padded_e: gmm(x, w, sizes, tiling=tiling),
                 (x, w), args.reps)
    row = dict(part="sweep", tm=tiling.tm, num_warps=tiling.num_warps,
               num_stages=tiling.num_stages, ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
    rows.append(row)
    print(f"| {tiling.tm} | {tiling.num_warps or '-'} | {tiling.num_stages or '-'} | "
          f"{ms:.3f} | {row['tflops']:.3g} |")
  return rows


def measure(fn, operands, reps: int) -> float:
  """timed(), or NaN with the error printed (out of memory, compile failure)."""
  try:
    return timed(fn, *operands, reps=reps)
  except Exception as err:  # pylint: disable=broad-except  (report and go on)
    print(f"  failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return float("nan")


def dense_ffn(x_td, w_gate_df, w_up_df, w_down_fd):
  g = x_td @ w_gate_df.astype(x_td.dtype)  # [T,K*F]
  u = x_td @ w_up_df.astype(x_td.dtype)  # [T,K*F]
  return (jax.nn.silu(g) * u) @ w_down_fd.astype(x_td.dtype)  # [T,D]


def layer_cases(shape, dtype, block: int):
  """{name: (loss_and_grads fn, operands)} of the routed-expert layer."""
  t, d, e, f, k = shape
  keys = jax.random.split(jax.random.key(1), 9)
  idx_tk, weight_tk = routing(keys[0], t, e, k)
  x_td = jax.random.normal(keys[1], (t, d), jnp.float32).astype(dtype)
  probe_td = jax.random.normal(keys[2], (t, d), jnp.float32).astype(dtype)

  def weights(keys, *shapes):  # float32 master weights, cast by the layer
    return [0.02 * jax.random.normal(key, s) for key, s in zip(keys, shapes)]

  experts = ExpertWeights(*weights(keys[3:6], (e, d, f), (e, d, f), (e, f, d)))
  dense_w = weights(keys[6:9], (d, k * f), (d, k * f), (k * f, d))

  def grads(layer):
    def loss(x_td, weight_tk, params, idx_tk):
      return jnp.sum(layer(x_td, idx_tk, weight_tk, params).astype(jnp.float32)
                     * probe_td.astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))

  def routed(grouped_impl, block_size=0):
    plan = ExpertPlan(dispatch="dropless", grouped=grouped_impl, block_size=block_size,
                      capacity_factor=1.25, eval_capacity_factor=0.0, drop_policy="position",
                      ep_exchange="allgather", platform=jax.default_backend())
    return grads(lambda x, i, g, w: dropless.dispatch(x, i, g, w, plan).y_td)

  operands = (x_td, weight_tk, experts, idx_tk)
  return {
      "dense_ffn (limit)": (grads(lambda x, i, g, w: dense_ffn(x, *w)),
                            (x_td, weight_tk, dense_w, idx_tk)),
      "dropless pallas": (routed("pallas", block_size=block), operands),
      "dropless blocked batched": (routed("batched"), operands),
      "dropless ragged_dot": (routed("ragged_dot"), operands),
  }


def run_layer(args, shape, dtype) -> list[dict]:
  print(f"\n## routed-expert layer fwd+bwd: T={shape[0]}, D={shape[1]}, E={shape[2]}, "
        f"F={shape[3]}, top-{shape[4]}, {dtype.name}")
  print("| case | ms | x dense_ffn | pallas speed-up |")
  print("|---|---:|---:|---:|")
  ms = {name: measure(fn, operands, args.reps)
        for name, (fn, operands) in layer_cases(shape, dtype, args.block).items()}
  rows = []
  for name, t in ms.items():
    rows.append(dict(part="layer", case=name, ms=t))
    print(f"| {name} | {t:.2f} | {t / ms['dense_ffn (limit)']:.2f} | "
          f"{t / ms['dropless pallas']:.2f} |")
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shape", choices=sorted(SHAPES), default="16b")
  parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
  parser.add_argument("--block", type=int, default=grouped.PALLAS_BLOCK,
                      help="rows per expert block = the kernels' row tile")
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--only", choices=["kernels", "check", "sweep", "layer"], default=None)
  parser.add_argument("--json", default="", help="also write the rows here")
  args = parser.parse_args()
  shape, dtype = SHAPES[args.shape], jnp.dtype(args.dtype)
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind} ({jax.default_backend()})")
  meta = dict(shape=args.shape, dtype=args.dtype, block=args.block, jax=jax.__version__,
              device=jax.devices()[0].device_kind)
  rows = []
  parts = (("kernels", run_kernels), ("check", run_check), ("sweep", run_sweep),
           ("layer", run_layer))
  for part, run in parts:
    if args.only in (None, part):
      rows += run(args, shape, dtype)
      if args.json:  # after every part: a run cut short keeps what it measured
        pathlib.Path(args.json).write_text(json.dumps(dict(meta, rows=rows), indent=1))
  failed = [r["op"] for r in rows if r["part"] == "check" and not r["ok"]]
  if failed:
    print(f"error: the kernels differ from ragged_dot beyond the tolerance: {failed}",
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
