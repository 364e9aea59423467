"""Four facts about XLA:CPU behind the CPU expert loop's design (dsmoe/dispatch/expert_loop.py).

    python research/bench_xla_cpu_facts.py            # all four, fact 4 at the narrower shape
    python research/bench_xla_cpu_facts.py --facts 4 --experts 64 --hidden 256 --top-k 6

1. Zero-filling a loop-carried f32 buffer: cheap below 32 MiB, ~0.25 ms per
   MiB above (allocations of 32 MiB and more are fresh pages that fault on
   first touch, every call).
2. Two independent fori_loops (each gathering, transforming and
   scatter-adding rows) take as long as one loop over both halves' work plus
   a sum: XLA:CPU does not run them concurrently.
3. In a loop over 128 experts, the backward's dx matmul [384, 256] x [512, 256]^T
   (the weight as stored, contracted on its last dim) against the same
   product with each weight transposed beforehand ([256, 512], plain
   matmul): whether the transposed operand itself is slow.
4. The matmul rate (GFLOP/s) of the six products of a SwiGLU layer's
   forward and backward at the narrower shape, per expert (128 experts x
   384 rows, hidden 128) and at the dense FFN's shapes (4096 rows, hidden
   1536): what the matmuls alone cost at each shape, with no routing (per
   expert: the weight slice and the product, nothing else).
   --tokens/--d-model/--experts/--hidden/--top-k pick another shape.
Times are the best of 20 (1.) or 10 (2.-4.) calls after a compile call.
"""

import argparse
import time

import jax
import jax.numpy as jnp
from jax import lax

from dsmoe.dispatch.common import FUSE_GATE_UP_MAX_HIDDEN


def best_ms(f, *args, reps=20):
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * min(times)


def zero_fill():
  def touch(buf, x):  # a data-dependent loop, so the buffer must exist
    n = x[2].astype(jnp.int32) * 3
    return lax.fori_loop(0, n, lambda i, b: b.at[i * 7].set(x[0]), buf)
  x = jnp.ones((4,))
  for mib in (8, 16, 24, 31, 32, 33, 40, 64):
    rows = mib * 2**20 // (4 * 256)
    f = jax.jit(lambda x, rows=rows: touch(jnp.zeros((rows, 256), jnp.float32), x))
    print(f"zero-filled loop carry f32[{rows}, 256] ({mib} MiB): {best_ms(f, x):7.2f} ms")


def two_loops():
  experts, rows, d, t = 64, 384, 512, 4096
  key = jax.random.key(0)
  x_td = jax.random.normal(key, (t, d))
  idx = jax.random.randint(key, (experts, rows), 0, t)

  def loop(lo, hi):
    def body(e, acc):
      return acc.at[idx[e]].add(jnp.tanh(x_td[idx[e]]) * 1.5)
    return lax.fori_loop(lo, hi, body, jnp.zeros((t, d)))
  one = jax.jit(lambda: loop(0, experts))
  two = jax.jit(lambda: loop(0, experts // 2) + loop(experts // 2, experts))
  print(f"one loop over {experts} groups: {best_ms(one, reps=10):6.2f} ms; "
        f"two independent loops over halves (+ sum): {best_ms(two, reps=10):6.2f} ms")


def transposed_operand():
  experts, rows, d, f2 = 128, 384, 512, 256
  key = jax.random.key(1)
  w_edf = jax.random.normal(key, (experts, d, f2))
  w_efd = jnp.swapaxes(w_edf, 1, 2).copy()  # each expert's weight transposed, stored
  a_rf = jax.random.normal(key, (rows, f2))

  def loop(w, contract):
    def body(e, acc):
      w_e = lax.dynamic_index_in_dim(w, e, 0, keepdims=False)
      return acc + lax.dot_general(a_rf * (e + 1.0), w_e, (((1,), (contract,)), ((), ())))
    return lax.fori_loop(0, experts, body, jnp.zeros((rows, d)))
  nt = jax.jit(lambda w: loop(w, 1))
  nn = jax.jit(lambda w: loop(w, 0))
  print(f"{experts} x [{rows},{f2}] x [{d},{f2}]^T: {best_ms(nt, w_edf, reps=10):6.2f} ms; "
        f"the same with [{f2},{d}] weights: {best_ms(nn, w_efd, reps=10):6.2f} ms")


def swiglu_products(tokens, d, experts, hidden, top_k):
  """The six products of a SwiGLU layer's forward and backward as (name, M,
  K, N, count) for [M, K] x [K, N]: per expert (tokens * top_k / experts
  rows; gate and up as one [D, 2F] product up to FUSE_GATE_UP_MAX_HIDDEN,
  as two [D, F] ones above it, as the expert loop runs them) and for the
  dense FFN of equal activated FLOPs (hidden top_k * hidden, gate and up as
  two products)."""
  rows, wide, f2 = tokens * top_k // experts, top_k * hidden, 2 * hidden
  if hidden <= FUSE_GATE_UP_MAX_HIDDEN:  # as the expert loop runs them
    gate_up = [("x w_gu", rows, d, f2, 1), ("dgu w_gu^T", rows, f2, d, 1),
               ("x^T dgu", d, rows, f2, 1)]
  else:
    gate_up = [("x w_g, x w_u", rows, d, hidden, 2), ("dg w_g^T, du w_u^T", rows, hidden, d, 2),
               ("x^T dg, x^T du", d, rows, hidden, 2)]
  per_expert = [gate_up[0], ("a w_down", rows, hidden, d, 1), ("dy w_down^T", rows, d, hidden, 1),
                gate_up[1], gate_up[2], ("a^T dy", hidden, rows, d, 1)]
  dense = [("x w_g, x w_u", tokens, d, wide, 2), ("a w_down", tokens, wide, d, 1),
           ("dy w_down^T", tokens, d, wide, 1), ("dg w_g^T, du w_u^T", tokens, wide, d, 2),
           ("x^T dg, x^T du", d, tokens, wide, 2), ("a^T dy", wide, tokens, d, 1)]
  return per_expert, dense


def matmul_rates(tokens=4096, d=512, experts=128, hidden=128, top_k=12):
  """Each product of :func:`swiglu_products` as a row-major [M, K] x [K, N]
  matmul (no transposed operand). Per expert: a loop over the experts, the
  right operand a distinct [K, N] slice of an [E, K, N] stack (as the loop
  streams expert weights), the left one the same array throughout (in
  cache, as the loop's gathered or computed rows are); the loop carries each
  product to the next step, which overwrites it, so only the slice and the
  product are timed (until 2026-12-06 each product was added into an
  accumulator, which cost 3-17% more). Dense: one call."""
  per_expert, dense = swiglu_products(tokens, d, experts, hidden, top_k)
  key = jax.random.key(2)

  def looped(m, k, n):
    a, b = jax.random.normal(key, (m, k)), jax.random.normal(key, (experts, k, n))

    def body(e, prev):  # each product overwrites the last: no add timed with it
      del prev
      return a @ lax.dynamic_index_in_dim(b, e, 0, keepdims=False)
    return best_ms(jax.jit(lambda a, b: lax.fori_loop(0, experts, body, jnp.zeros((m, n)))),
                   a, b, reps=10)

  def single(m, k, n):
    a, b = jax.random.normal(key, (m, k)), jax.random.normal(key, (k, n))
    return best_ms(jax.jit(lambda a, b: a @ b), a, b, reps=10)

  total = {}
  for where, products, time_ms, copies in ((f"{experts} experts x", per_expert, looped, experts),
                                           ("dense FFN", dense, single, 1)):
    total[where] = 0.0
    for name, m, k, n, count in products:
      ms = count * time_ms(m, k, n)
      total[where] += ms
      rate = 2 * count * copies * m * k * n / ms / 1e6
      print(f"  {where:16s} {name:20s} [{m},{k}]x[{k},{n}] {ms:7.2f} ms  {rate:5.0f} GFLOP/s",
            flush=True)
  moe, ffn = total.values()
  print(f"the six products of forward+backward: experts {moe:.1f} ms, dense FFN {ffn:.1f} ms "
        f"({moe / ffn:.2f}x)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--facts", default="1,2,3,4", help="comma-separated subset of 1,2,3,4")
  parser.add_argument("--tokens", type=int, default=4096, help="fact 4's shape")
  parser.add_argument("--d-model", type=int, default=512)
  parser.add_argument("--experts", type=int, default=128)
  parser.add_argument("--hidden", type=int, default=128, help="one expert's hidden size")
  parser.add_argument("--top-k", type=int, default=12)
  args = parser.parse_args()
  try:
    facts = {int(f) for f in args.facts.split(",")}
  except ValueError:
    parser.error(f"--facts {args.facts!r}: expected a comma-separated subset of 1,2,3,4")
  if not facts <= {1, 2, 3, 4}:
    parser.error(f"--facts {args.facts!r}: expected a comma-separated subset of 1,2,3,4")
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
  for number, fact in ((1, zero_fill), (2, two_loops), (3, transposed_operand)):
    if number in facts:
      fact()
  if 4 in facts:
    matmul_rates(args.tokens, args.d_model, args.experts, args.hidden, args.top_k)


if __name__ == "__main__":
  main()
