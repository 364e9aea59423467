"""Benchmark of the routed-expert dispatch against the dense-FLOPs limit.

Measures, in one process, forward+backward time (jit, one warm-up run, median
of reps; each rep right after a rep of dense_ffn, and the ratio to dense is
the median of those paired ratios, which a shared machine's changing load
hardly moves; "cpu x" is the same for the process's CPU time, user + system
over all threads, which waiting for a busy core does not count), peak
temporary memory (XLA's compiled memory_analysis().temp_size_in_bytes: every
intermediate, not the inputs and outputs), and per run the median system
time and "fresh MiB" (minor page faults x page size: memory the process
touched for the first time since the OS handed it out, which every call pays
for when its buffers come from and go back to the OS) of:
  dense_ffn             the model's SwiGLU FFN (dsmoe.model.layers.swiglu) of
                        hidden top_k * expert_hidden: the same activated FLOPs
                        as the MoE layer, the physical limit;
  flat_expert_ffn       all T*K pairs through ONE expert's weights: same FLOPs
                        and matmul shapes as the MoE, no routing (shape limit);
  capacity              dsmoe capacity dispatch (factor --capacity-factor);
  capacity_score        the same with drop_policy="score";
  dropless_blocked      dsmoe dropless, blocked grouped matmul (--block-size);
                        these three run strategy --strategy (default "auto":
                        the platform's default; "kernel": the C++ CPU kernel,
                        float32);
                        --other-strategy adds "batched" or "loop", whichever
                        that strategy is not;
  capacity_loop,        capacity and dropless with the fused XLA loop
  dropless_loop         (strategy "loop"), whatever --strategy says;
  dropless_ragged_dot   dsmoe dropless, jax.lax.ragged_dot backend;
  naive_onehot_einsum   GShard-style dispatch/combine one-hot einsums [T,E,C];
  naive_ragged_dot      sort + take + lax.ragged_dot + segment_sum, plain autodiff.

Routing: random router logits -> softmax -> top-k (realistic imbalance).
The gradient is taken w.r.t. the tokens, the gate weights and all weights.

    python scripts/bench_moe.py                       # default shape, float32
    python scripts/bench_moe.py --dtype bfloat16 --json /tmp/moe.json
    python scripts/bench_moe.py --strategy kernel     # the C++ CPU kernel

--model instead times whole-model training (dsmoe.train.throughput): the real
jitted train step of each given MoE config and of the dense config of equal
activated FLOPs (every MoE FFN replaced by a SwiGLU FFN of hidden
(K_s + K') * expert_hidden), in turns, and reports tokens/s and MFU:

    python scripts/bench_moe.py --model ablation:deepseekmoe,ablation:gshard

The layer benchmark runs without ml_collections (dsmoe.dispatch takes
explicit arguments); --model needs the training stack.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from dsmoe import dispatch  # noqa: E402  (needs neither ml_collections nor data)
from dsmoe.dispatch import capacity, dropless, expert_loop  # noqa: E402
from dsmoe.spec import ExpertPlan  # noqa: E402
from dsmoe.model import layers  # noqa: E402  (flax; no ml_collections)


# ----------------------------------------------------------------------------
# The layers under test: layer(x_td, idx_tk, weight_tk, params) -> y_td.
# ----------------------------------------------------------------------------

def dense_ffn(x_td, w1_df, w2_df, w3_fd):
  """The model's dense SwiGLU FFN (dsmoe.model.layers.swiglu) of hidden K*F."""
  return layers.swiglu(x_td, w1_df, w2_df, w3_fd)  # [T,D]


def flat_expert_ffn(x_td, idx_tk, weight_tk, w):
  """Not a dispatch: every one of the T*K pairs through expert 0's weights.

  The same FLOPs and matmul shapes ([S, D] x [D, F]) as any exact MoE layer,
  with no routing work: the limit any dispatch can reach with XLA's matmuls.
  """
  del idx_tk
  (t, d), k = x_td.shape, weight_tk.shape[1]
  dt = x_td.dtype
  x_sd = jnp.broadcast_to(x_td[:, None], (t, k, d)).reshape(t * k, d)  # [S,D]
  g = jnp.einsum("sd,df->sf", x_sd, w.w_gate_edf[0].astype(dt))  # [S,F]
  u = jnp.einsum("sd,df->sf", x_sd, w.w_up_edf[0].astype(dt))  # [S,F]
  y_sd = jnp.einsum("sf,fd->sd", jax.nn.silu(g) * u, w.w_down_efd[0].astype(dt))  # [S,D]
  return jnp.einsum("tkd,tk->td", y_sd.reshape(t, k, d), weight_tk.astype(dt))  # [T,D]


def naive_onehot_einsum(x_td, idx_tk, weight_tk, w, factor):
  """GShard: positions by cumsum of one-hots, [T,E,C] dispatch/combine tensors."""
  (t, d), k = x_td.shape, idx_tk.shape[1]
  e = w.w_gate_edf.shape[0]
  cap = max(1, int(np.ceil(factor * t * k / e)))
  dt = x_td.dtype
  onehot_ske = jax.nn.one_hot(idx_tk.T.reshape(-1), e, dtype=jnp.int32)  # [K*T,E] slot-major
  pos_ske = (jnp.cumsum(onehot_ske, axis=0) - 1) * onehot_ske  # [K*T,E]
  pos_kt = pos_ske.sum(-1).reshape(k, t)
  keep_kt = pos_kt < cap
  combine_tec = jnp.zeros((t, e, cap), dt)
  for j in range(k):  # one [T,E,C] one-hot per slot, as GShard
    oh_te = jax.nn.one_hot(idx_tk[:, j], e, dtype=dt) * keep_kt[j][:, None]
    oh_tc = jax.nn.one_hot(pos_kt[j], cap, dtype=dt)
    combine_tec += (weight_tk[:, j].astype(dt)[:, None, None]
                    * jnp.einsum("te,tc->tec", oh_te, oh_tc))  # [T,E,C]
  dispatch_tec = (combine_tec > 0).astype(dt)
  x_ecd = jnp.einsum("tec,td->ecd", dispatch_tec, x_td)  # [E,C,D]
  g = jnp.einsum("ecd,edf->ecf", x_ecd, w.w_gate_edf.astype(dt))  # [E,C,F]
  u = jnp.einsum("ecd,edf->ecf", x_ecd, w.w_up_edf.astype(dt))  # [E,C,F]
  y_ecd = jnp.einsum("ecf,efd->ecd", jax.nn.silu(g) * u, w.w_down_efd.astype(dt))
  return jnp.einsum("tec,ecd->td", combine_tec, y_ecd)  # [T,D]


def naive_ragged_dot(x_td, idx_tk, weight_tk, w):
  """Sort by expert, take, lax.ragged_dot, segment_sum; XLA's own autodiff."""
  (t, _), k = x_td.shape, idx_tk.shape[1]
  e, dt = w.w_gate_edf.shape[0], x_td.dtype
  flat_s = idx_tk.reshape(-1)
  order_s = jnp.argsort(flat_s, stable=True)
  token_s = order_s // k
  sizes_e = jnp.bincount(flat_s, length=e).astype(jnp.int32)
  x_sd = jnp.take(x_td, token_s, axis=0)  # [S,D]
  g = jax.lax.ragged_dot(x_sd, w.w_gate_edf.astype(dt), sizes_e)  # [S,F]
  u = jax.lax.ragged_dot(x_sd, w.w_up_edf.astype(dt), sizes_e)  # [S,F]
  y_sd = jax.lax.ragged_dot(jax.nn.silu(g) * u, w.w_down_efd.astype(dt), sizes_e)
  y_sd = y_sd * jnp.take(weight_tk.reshape(-1), order_s)[:, None].astype(dt)
  return jax.ops.segment_sum(y_sd, token_s, num_segments=t)  # [T,D]


# ----------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------

def make_inputs(args):
  """Tokens, routing (softmax of random logits, top-k) and f32 weights."""
  t, d, e, h, k = args.tokens, args.d_model, args.experts, args.expert_hidden, args.top_k
  ks = jax.random.split(jax.random.key(args.seed), 9)
  dt = jnp.dtype(args.dtype)
  x_td = jax.random.normal(ks[0], (t, d), jnp.float32).astype(dt)
  scores_te = jax.nn.softmax(jax.random.normal(ks[1], (t, e), jnp.float32), axis=-1)
  weight_tk, idx_tk = jax.lax.top_k(scores_te, k)
  std = 0.02
  experts = dispatch.ExpertWeights(
      std * jax.random.normal(ks[2], (e, d, h)), std * jax.random.normal(ks[3], (e, d, h)),
      std * jax.random.normal(ks[4], (e, h, d)))
  dense_w = (std * jax.random.normal(ks[5], (d, k * h)), std * jax.random.normal(ks[6], (d, k * h)),
             std * jax.random.normal(ks[7], (k * h, d)))
  probe_td = jax.random.normal(ks[8], (t, d), jnp.float32).astype(dt)
  return x_td, idx_tk.astype(jnp.int32), weight_tk, experts, dense_w, probe_td


def grad_fn(layer, probe_td, forward_only=False):
  """value_and_grad of <layer(x, idx, weight, params), probe> w.r.t. x, weight, params.

  idx_tk is an argument, not a constant, so the routing work is timed too.
  """
  def loss(x_td, weight_tk, params, idx_tk):
    y_td = layer(x_td, idx_tk, weight_tk, params)
    return jnp.sum(y_td.astype(jnp.float32) * probe_td.astype(jnp.float32))
  return jax.jit(loss if forward_only else jax.value_and_grad(loss, argnums=(0, 1, 2)))


def compile_case(fn, operands):
  """Ahead-of-time compile; returns (run(), temporary memory in MiB, compiled)."""
  compiled = fn.lower(*operands).compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
  return (lambda: compiled(*operands)), (temp / 2**20 if temp else float("nan")), compiled


def available_mib() -> float:
  """MemAvailable of /proc/meminfo in MiB (inf where there is none)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return float("inf")


def print_summary(results: dict) -> None:
  """Summary: x dense (the paired medians), x flat, and the speed-up over the
  one-hot baseline, of the dropless and capacity cases."""
  x = {name: r["ratio_to_dense"] for name, r in results.items()}
  ms = {name: r["ms"] for name, r in results.items()}
  parts = []
  for case in ("dropless_blocked", "capacity"):
    if case in x:
      parts.append(f"{case}: {x[case]:.2f}x dense")
      if "flat_expert_ffn" in x:
        parts[-1] += f", {x[case] / x['flat_expert_ffn']:.2f}x flat"
      if "naive_onehot_einsum" in ms:
        parts[-1] += f", {ms['naive_onehot_einsum'] / ms[case]:.1f}x faster than one-hot"
  if parts:
    print("summary: " + "; ".join(parts))


PAGE_MIB = resource.getpagesize() / 2**20


def timed(run) -> tuple[float, float, float, float]:
  """(wall ms, CPU ms of this process (user + system, all threads), system ms,
  MiB of fresh pages: minor page faults x page size) of one run."""
  r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  jax.block_until_ready(run())
  t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
  cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
  return (1e3 * (t1 - t0), 1e3 * cpu, 1e3 * (r1.ru_stime - r0.ru_stime),
          (r1.ru_minflt - r0.ru_minflt) * PAGE_MIB)


def measure_all(runs: dict, reps: dict, reference: str = "dense_ffn") -> dict:
  """One untimed run of each case with > 1 reps, then interleaved rounds.

  In each round every case that still has reps left is timed right after a
  run of the reference, so a change in the load of a shared machine hits
  both alike. Returns name -> (median ms, min ms, median of the per-round
  wall-time ratios case / reference, the same for CPU time, median system
  ms, median MiB of fresh pages).
  """
  for name, run in runs.items():
    if reps[name] > 1:
      jax.block_until_ready(run())
  samples = {name: [] for name in runs}
  ratios = {name: [] for name in runs}
  for r in range(max(reps.values())):
    for name, run in runs.items():
      if r < reps[name]:
        t_ref = timed(runs[reference])
        samples[reference].append(t_ref)
        t = t_ref if name == reference else timed(run)
        if name != reference:
          samples[name].append(t)
        ratios[name].append((t[0] / t_ref[0], t[1] / t_ref[1]))
  out = {}
  for name in runs:
    wall, _, sys_ms, fresh = (np.asarray(col) for col in zip(*samples[name]))
    out[name] = (float(np.median(wall)), float(np.min(wall)),
                 float(np.median([w for w, _ in ratios[name]])),
                 float(np.median([c for _, c in ratios[name]])),
                 float(np.median(sys_ms)), float(np.median(fresh)))
  return out


def _loop_gate_up(layer, fuse_max_hidden: int):
  """`layer` traced with expert_loop's fuse threshold set (its backward
  follows the forward's choice, so only the forward's trace needs it)."""
  def run(*operands):
    saved = expert_loop.FUSE_GATE_UP_MAX_HIDDEN
    expert_loop.FUSE_GATE_UP_MAX_HIDDEN = fuse_max_hidden
    try:
      return layer(*operands)
    finally:
      expert_loop.FUSE_GATE_UP_MAX_HIDDEN = saved
  return run


def cases(args):
  """name -> (layer(x, idx, weight, params), which params, reps)."""
  fast, slow = args.reps, args.slow_reps
  bs, cf = args.block_size, args.capacity_factor

  strategy = args.strategy
  if strategy == "auto":  # what model.moe.gmm_strategy="auto" runs here (dsmoe.config)
    strategy = "loop" if jax.default_backend() == "cpu" else "batched"

  def plan(grouped_impl, impl, policy="position"):
    return ExpertPlan(dispatch=impl, grouped=grouped_impl, block_size=bs, capacity_factor=cf,
                      eval_capacity_factor=0.0, drop_policy=policy, ep_exchange="allgather",
                      platform=jax.default_backend())

  def cap(policy="position", grouped_impl=strategy):
    p_ = plan(grouped_impl, "capacity", policy)
    return lambda x, i, wt, p: capacity.dispatch(x, i, wt, p, p_, cf).y_td

  def drop(grouped_impl=strategy):
    p_ = plan(grouped_impl, "dropless")
    return lambda x, i, wt, p: dropless.dispatch(x, i, wt, p, p_).y_td

  table = {
      "dense_ffn": (lambda x, i, wt, p: dense_ffn(x, *p), "dense", fast),
      "flat_expert_ffn": (flat_expert_ffn, "moe", fast),
      "capacity": (cap(), "moe", fast),
      "capacity_score": (cap(policy="score"), "moe", fast),
      "dropless_blocked": (drop(), "moe", fast),
      "capacity_loop": (cap(grouped_impl="loop"), "moe", fast),  # the XLA loop, whatever --strategy
      "dropless_loop": (drop(grouped_impl="loop"), "moe", fast),
      "dropless_ragged_dot": (drop(grouped_impl="ragged_dot"), "moe", slow),
      "naive_onehot_einsum": (lambda x, i, wt, p: naive_onehot_einsum(x, i, wt, p, cf),
                              "moe", slow + 2),  # ~20x dense: a few reps are affordable
      "naive_ragged_dot": (naive_ragged_dot, "moe", slow),
  }
  if args.loop_gate_up_both:  # the CPU loop with gate/up fused and split, whatever the hidden
    for name, fuse_max in (("fused", 1 << 30), ("split", 0)):
      table[f"dropless_blocked_{name}"] = (_loop_gate_up(drop(grouped_impl="loop"), fuse_max),
                                           "moe", fast)
  if args.other_strategy:  # the blocked strategy --strategy does not resolve to
    other = "batched" if strategy in ("loop", "kernel") else "loop"
    table[f"dropless_blocked_{other}"] = (drop(grouped_impl=other), "moe", fast)
    table[f"capacity_{other}"] = (cap(grouped_impl=other), "moe", fast)
  return table


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--d-model", type=int, default=512)
  p.add_argument("--experts", type=int, default=64)
  p.add_argument("--expert-hidden", type=int, default=256)
  p.add_argument("--top-k", type=int, default=6)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--reps", type=int, default=5, help="timed reps of the fast paths")
  p.add_argument("--slow-reps", type=int, default=1,
                 help="timed reps of the ragged_dot baselines (the one-hot one: +2)")
  p.add_argument("--block-size", type=int, default=0,
                 help="rows per block of the blocked backend (0: chosen from the shape)")
  p.add_argument("--capacity-factor", type=float, default=1.25)
  p.add_argument("--strategy", default="auto", choices=["auto", "loop", "kernel", "batched"],
                 help="gmm_strategy of capacity, capacity_score and dropless_blocked "
                      "(auto: the platform's default; kernel: the C++ CPU kernel)")
  p.add_argument("--other-strategy", action="store_true",
                 help="also time the blocked strategy --strategy does not resolve to "
                      "('batched' for loop or kernel, else 'loop')")
  p.add_argument("--loop-gate-up-both", action="store_true",
                 help="add the CPU loop with gate/up as one fused matmul and as two "
                      "(dropless_blocked_fused, dropless_blocked_split)")
  p.add_argument("--forward-only", action="store_true", help="time the forward pass only")
  p.add_argument("--only", default="", help="comma-separated subset of case names")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default="", help="write the results to this file")
  p.add_argument("--model", default="",
                 help="comma-separated MoE configs (dsmoe.load names, e.g. "
                      "ablation:deepseekmoe): whole-model training next to the dense "
                      "config of equal activated FLOPs, instead of the layer benchmark")
  p.add_argument("--model-steps", type=int, default=10, help="--model: timed steps each")
  p.add_argument("--extra", default="",
                 help="--model: comma-separated further configs to time (e.g. ablation:dense)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="--model: override a config key in every config "
                      "(e.g. model.moe.impl=capacity); repeatable")
  return p.parse_args(argv)


def _override(config, assignments):
  """key=value assignments (Python literals, else strings) on a ConfigDict."""
  import ast  # pylint: disable=g-import-not-at-top
  for item in assignments:
    key, _, text = item.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *path, last = key.split(".")
    node = config
    for part in path:
      node = node[part]
    node[last] = value
  return config


def model_main(args):
  """--model: tokens/s and MFU of each MoE config and its dense equivalent."""
  import dsmoe  # pylint: disable=g-import-not-at-top
  from dsmoe.train import throughput  # pylint: disable=g-import-not-at-top
  moe_names = [n for n in args.model.split(",") if n]
  configs = {}
  for name in moe_names:
    cfg = _override(dsmoe.load(name), args.set)
    dense = throughput.dense_equivalent(cfg)
    hidden = dense.model.dense_hidden
    configs.setdefault(f"dense_equivalent(hidden {hidden})", dense)
    configs[name] = cfg
  for name in filter(None, args.extra.split(",")):
    configs[name] = _override(dsmoe.load(name), args.set)
  configs = dict(sorted(configs.items(), key=lambda kv: not kv[0].startswith("dense_eq")))
  print(f"--model: {len(configs)} configs, {args.model_steps} timed steps each, in turns; "
        f"jax {jax.__version__}, {jax.default_backend()}", flush=True)
  res = throughput.compare(configs, steps=args.model_steps)
  print(f"{'config':32s} {'GFLOP/tok':>9s} {'step ms':>8s} {'tokens/s':>9s} {'MFU':>6s} "
        f"{'MFU/first':>9s} {'cpu':>6s}")
  for name, r in res.items():
    print(f"{name:32s} {r['gflops_per_token']:9.4f} {r['step_ms']:8.1f} {r['tokens_per_s']:9.0f} "
          f"{r['mfu']:6.3f} {r['mfu_ratio']:9.3f} {r['cpu_mfu_ratio']:6.3f}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({"model": res, "set": args.set}, indent=1))
  return res


def main(argv=None):
  args = parse_args(argv)
  if args.model:
    return model_main(args)
  x_td, idx_tk, weight_tk, experts, dense_w, probe_td = make_inputs(args)
  shape = {k: getattr(args, k) for k in ("tokens", "d_model", "experts", "expert_hidden",
                                         "top_k", "dtype", "block_size", "capacity_factor")}
  shape["platform"] = jax.default_backend()
  shape["pass"] = "forward" if args.forward_only else "forward+backward"
  print(f"shape {shape}  jax {jax.__version__}", flush=True)
  only = set(filter(None, args.only.split(",")))
  runs, reps, temp_mb = {}, {}, {}
  for name, (layer, which, n) in cases(args).items():
    if only and name not in only and name != "dense_ffn":
      continue
    params = dense_w if which == "dense" else experts
    run, temp, _ = compile_case(grad_fn(layer, probe_td, args.forward_only),
                                   (x_td, weight_tk, params, idx_tk))
    free = available_mib()
    if temp > 0.8 * free:
      print(f"{name}: skipped, needs {temp:.0f} MiB of temporaries, {free:.0f} MiB available")
      continue
    runs[name], temp_mb[name], reps[name] = run, temp, n
  ms = measure_all(runs, reps)
  results = {}
  print(f"{'case':26s} {'ms':>9s} {'min ms':>9s} {'x dense':>8s} {'ms/dense':>8s} "
        f"{'cpu x':>6s} {'temp MiB':>9s} {'sys ms':>7s} {'fresh MiB':>9s}  reps")
  for name in runs:
    med, low, ratio, cpu_ratio, sys_ms, fresh = ms[name]
    results[name] = {"ms": med, "min_ms": low, "ratio_to_dense": ratio,
                     "ms_over_dense_ms": med / ms["dense_ffn"][0],
                     "cpu_ratio_to_dense": cpu_ratio, "peak_mb": temp_mb[name],
                     "system_ms": sys_ms, "fresh_page_mib": fresh, "reps": reps[name]}
    print(f"{name:26s} {med:9.1f} {low:9.1f} {ratio:8.2f} {med / ms['dense_ffn'][0]:8.2f} "
          f"{cpu_ratio:6.2f} {temp_mb[name]:9.1f} {sys_ms:7.1f} {fresh:9.1f}  {reps[name]}")
  print_summary(results)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(
        {"shape": shape, "results": results}, indent=1))
  return results


if __name__ == "__main__":
  main()
