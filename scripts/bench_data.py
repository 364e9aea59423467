"""Data-pipeline headroom: tokens/s the loader delivers vs tokens/s the model trains.

    python scripts/bench_data.py                      # configs/tiny.py, warm cache
    python scripts/bench_data.py --cold               # also time a fresh build + tokenizer
    python scripts/bench_data.py --config configs/tiny.py --batches 400 --steps 10

Prints one line per measurement and a final JSON line. Both numbers count
input tokens (batch * seq_len). The train step is forward + backward + AdamW
of ``dsmoe.model.Transformer`` on the loader's batches, jitted, timed after
one compile step. Headroom = loader tokens/s / train tokens/s (goal >= 10).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import dsmoe
from dsmoe.data import make_loader


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(None)


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


def make_train_step(model_cfg, lr: float):
  """(state, jitted step(state, batch) -> (state, loss)) for the model."""
  model = dsmoe.model.Transformer(model_cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adamw(lr)

  def loss_fn(params, batch):
    logits, aux = nnx.merge(graphdef, params)(batch["inputs"], batch["segment_ids"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return nll.mean() + sum(aux["losses"].values(), 0.0)

  @jax.jit
  def step(state, batch):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return (params, tx.init(params)), step


def train_tokens_per_s(config, steps: int) -> float:
  state, step = make_train_step(dsmoe.resolve(config).model, config.train.learning_rate)
  it = iter(make_loader(config, process_index=0, process_count=1))
  batches = [next(it) for _ in range(steps + 1)]
  state, loss = step(state, batches[0])  # compile
  loss.block_until_ready()
  t0 = time.perf_counter()
  for b in batches[1:]:
    state, loss = step(state, b)
  loss.block_until_ready()
  return steps * batches[0]["inputs"].size / (time.perf_counter() - t0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/tiny.py")
  parser.add_argument("--batches", type=int, default=400, help="loader batches timed")
  parser.add_argument("--steps", type=int, default=10, help="train steps timed")
  parser.add_argument("--cold", action="store_true", help="also time a cold start")
  args = parser.parse_args()
  config = load_config(args.config)
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
