"""Data-pipeline headroom: tokens/s the loader delivers vs tokens/s the model trains.

    python scripts/bench_data.py                      # configs/tiny.py, warm cache
    python scripts/bench_data.py --cold               # also time a fresh build + tokenizer
    python scripts/bench_data.py --config configs/tiny.py --batches 400 --steps 10

Prints one line per measurement and a final JSON line. Both numbers count
input tokens (batch * seq_len). The train step is the trainer's own
(dsmoe.train.step: forward + backward + AdamW) on the loader's batches,
jitted, timed after one compile step. Headroom = loader tokens/s / train tokens/s (goal >= 10).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import jax

import dsmoe
from dsmoe.data import make_loader
from dsmoe.train import optimizer as optimizer_lib
from dsmoe.train import step as step_lib


def time_cold_start(config) -> float:
  """Seconds to build local_text and train the tokenizer in an empty data_dir."""
  tmp = tempfile.mkdtemp(prefix="bench_data_")
  cold = config.copy_and_resolve_references()
  cold.data.data_dir = tmp
  try:
    t0 = time.perf_counter()
    next(iter(make_loader(cold, process_index=0, process_count=1)))
    return time.perf_counter() - t0
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def loader_tokens_per_s(config, batches: int) -> float:
  it = iter(make_loader(config, process_index=0, process_count=1))
  for _ in range(10):  # warm up threads and buffers
    next(it)
  t0 = time.perf_counter()
  n = sum(next(it)["inputs"].size for _ in range(batches))
  return n / (time.perf_counter() - t0)


def train_tokens_per_s(config, steps: int) -> float:
  spec = dsmoe.resolve(config)
  tx = optimizer_lib.make_optimizer(spec.train)
  graphdef, state = step_lib.init_state(spec, tx)
  step = step_lib.jit_train_step(spec, graphdef, tx)
  it = iter(make_loader(spec, process_index=0, process_count=1))
  batches = [next(it) for _ in range(steps + 1)]
  state, m = step(state, batches[0])  # compile
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for b in batches[1:]:
    state, m = step(state, b)
  jax.block_until_ready(m)
  return steps * batches[0]["inputs"].size / (time.perf_counter() - t0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/tiny.py")
  parser.add_argument("--batches", type=int, default=400, help="loader batches timed")
  parser.add_argument("--steps", type=int, default=10, help="train steps timed")
  parser.add_argument("--cold", action="store_true", help="also time a cold start")
  args = parser.parse_args()
  config = dsmoe.load(args.config)
  result = {"config": args.config, "cpu_cores": os.cpu_count(),
            "batch": config.train.batch_size, "seq_len": config.data.seq_len,
            "tokenizer": config.data.tokenizer, "vocab": config.model.vocab_size}
  if args.cold:
    result["cold_start_s"] = round(time_cold_start(config), 2)
    print(f"cold start (build + tokenizer): {result['cold_start_s']} s")
  result["loader_tokens_per_s"] = round(loader_tokens_per_s(config, args.batches))
  print(f"loader: {result['loader_tokens_per_s']:,} tokens/s")
  result["train_tokens_per_s"] = round(train_tokens_per_s(config, args.steps))
  print(f"train:  {result['train_tokens_per_s']:,} tokens/s")
  result["headroom"] = round(result["loader_tokens_per_s"] / result["train_tokens_per_s"], 1)
  print(f"headroom: {result['headroom']}x")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
