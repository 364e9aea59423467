"""Decoding speed: new tokens/s of dsmoe.generate (KV cache) vs. no cache.

    python scripts/bench_generate.py                          # configs/tiny.py, random weights
    python scripts/bench_generate.py --config configs/tiny.py --batch 1,8 --new 128 --reps 3

For each batch size: `generate` (prefill of a --prompt-token prompt, then
--new greedy decode steps in one jitted while_loop) timed after a compile
call, as the median of --reps runs; and, side by side, decoding without a
cache: a jitted full forward pass over the whole (padded) sequence for each
new token, as a naive loop would do. Prints one JSON line per batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np
from flax import nnx

import dsmoe
from dsmoe import generate as gen
from dsmoe.model import Transformer


def time_cached(lm, prompts, new: int, reps: int) -> float:
  gen.generate(lm, prompts, max_new_tokens=new)  # compile
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = gen.generate(lm, prompts, max_new_tokens=new)
    times.append(time.perf_counter() - t0)
  assert all(len(t) == new for t in out.tokens)
  return statistics.median(times)


def time_uncached(lm, prompts, new: int) -> float:
  """Greedy decoding by a full forward pass per token over a fixed-width buffer."""
  b, p = len(prompts), len(prompts[0])
  buf = np.zeros((b, p + new), np.int32)
  buf[:, :p] = prompts
  jax.block_until_ready(lm(buf))  # compile
  t0 = time.perf_counter()
  for i in range(new):
    logits = np.asarray(lm(buf))[:, p + i - 1]
    buf[:, p + i] = logits.argmax(-1)
  return time.perf_counter() - t0


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="tiny")
  ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
  ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
  ap.add_argument("--new", type=int, default=128, help="new tokens per row")
  ap.add_argument("--reps", type=int, default=3)
  args = ap.parse_args()
  spec = dsmoe.resolve(dsmoe.load(args.config))
  lm = gen.CausalLM.from_module(Transformer(spec.model, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  print(f"# {args.config}: {jax.devices()[0].platform}, load average "
        f"{os.getloadavg()[0]:.1f}", flush=True)
  for b in (int(x) for x in args.batch.split(",")):
    prompts = rng.integers(3, spec.model.vocab_size, (b, args.prompt)).tolist()
    cached = time_cached(lm, prompts, args.new, args.reps)
    uncached = time_uncached(lm, prompts, args.new)
    print(json.dumps({"batch": b, "prompt": args.prompt, "new": args.new,
                      "kv_cache_tokens_per_s": round(b * args.new / cached, 1),
                      "no_cache_tokens_per_s": round(b * args.new / uncached, 1),
                      "speedup": round(uncached / cached, 2)}), flush=True)


if __name__ == "__main__":
  main()
