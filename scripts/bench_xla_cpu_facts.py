"""Three facts about XLA:CPU that the M12 analysis (docs/BENCHMARKS.md) rests on.

    python scripts/bench_xla_cpu_facts.py

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
Times are the best of 20 (1.) or 10 (2., 3.) calls after a compile call.
"""

import time

import jax
import jax.numpy as jnp
from jax import lax


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


if __name__ == "__main__":
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
  zero_fill()
  two_loops()
  transposed_operand()
