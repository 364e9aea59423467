"""Training throughput of models side by side (``scripts/bench_moe.py --model``).

  dense_equivalent(config)  the dense model of the same activated FLOPs: every
                            MoE layer's FFN replaced by one SwiGLU FFN of
                            hidden (K_s + K') * expert_hidden;
  compare(configs, ...)     tokens/s and MFU of each config's real jitted train
                            step (dsmoe.train.step: forward, backward, AdamW),
                            timed step by step in turn, so that the changing
                            load of a shared machine hits every config alike.

MFU = tokens/s * dsmoe.flops_per_token(config) / peak FLOP/s, with the peak
measured once for all configs (or given), so the ratio of two MFUs does not
depend on it. Batches are random tokens (one document per row).
"""

from __future__ import annotations

import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsmoe import accounting
from dsmoe import config as config_lib
from dsmoe.errors import ConfigError
from dsmoe.train import metrics as metrics_lib
from dsmoe.train import optimizer as optimizer_lib
from dsmoe.train import step as step_lib


def dense_equivalent(config):
  """A copy of `config` whose MoE layers are dense SwiGLU FFNs of hidden
  (K_s + K') * expert_hidden: the same activated FFN parameters per token
  (the router's d_model x N' weights aside).

  Refuses configs that also have dense FFN layers of another hidden size
  (first_k_dense_replace, moe_layer_freq): one `dense_hidden` cannot match
  both.
  """
  model = config_lib.resolve(config).model
  moe = model.moe
  hidden = (moe.num_shared_experts + moe.top_k) * moe.expert_hidden
  has_dense = any(not model.is_moe_layer(i) for i in range(model.num_layers))
  if has_dense and model.dense_hidden != hidden:
    raise ConfigError(
        f"dense_equivalent: the config mixes dense layers (dense_hidden="
        f"{model.dense_hidden}) with MoE layers of activated hidden {hidden}; give "
        "a config whose every FFN layer is MoE, or whose dense_hidden is "
        f"{hidden}")
  dense = config.copy_and_resolve_references()
  dense.model.first_k_dense_replace = model.num_layers
  dense.model.dense_hidden = hidden
  return dense


def random_batch(config, seed: int = 0) -> dict:
  """A training batch of uniform random tokens, one document per row."""
  spec = config_lib.resolve(config)
  b, t, v = spec.train.batch_size, spec.data.seq_len, spec.model.vocab_size
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, v, size=(b, t + 1), dtype=np.int32)
  return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
          "segment_ids": jnp.ones((b, t), jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}


def _stepper(config):
  """(run one step, tokens per step): the jitted train step on its own state."""
  spec = config_lib.resolve(config)
  tx = optimizer_lib.make_optimizer(spec.train)
  graphdef, state = step_lib.init_state(spec, tx)
  step = step_lib.jit_train_step(spec, graphdef, tx)
  batch = random_batch(config)
  box = [state]

  def run():
    box[0], metrics = step(box[0], batch)
    jax.block_until_ready(metrics["loss"])

  return run, int(np.prod(batch["inputs"].shape))


def compare(configs: dict, *, steps: int = 10, warmup: int = 2,
            peak_flops: float = 0.0) -> dict:
  """{name: {"step_ms", "tokens_per_s", "gflops_per_token", "mfu", "mfu_ratio"}}.

  Every config runs `warmup` untimed steps (compilation), then `steps` rounds
  in which each config runs one timed step in turn. "step_ms" is the median
  step time; "mfu_ratio" is the median over rounds of this config's MFU
  divided by the first config's in the same round; "cpu_mfu_ratio" the same
  with the process's CPU time in place of wall time (waiting for a core that
  other processes hold does not count).
  """
  runs = {name: _stepper(c) for name, c in configs.items()}
  fpt = {name: accounting.flops_per_token(c) for name, c in configs.items()}
  for run, _ in runs.values():
    for _ in range(warmup):
      run()
  peak = (peak_flops or metrics_lib.measure_peak_flops()) * jax.device_count()
  times = {name: [] for name in runs}
  cpu = {name: [] for name in runs}
  for _ in range(steps):
    for name, (run, _) in runs.items():
      c0, t0 = _cpu_seconds(), time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t0)
      cpu[name].append(_cpu_seconds() - c0)
  first = next(iter(runs))
  work = {name: runs[name][1] * fpt[name] for name in runs}  # FLOPs per step

  def ratio(per_step, name):  # median over rounds of FLOP rate / the first's
    mine, ref = np.asarray(per_step[name]), np.asarray(per_step[first])
    return float(np.median((work[name] / mine) / (work[first] / ref)))

  out = {}
  for name, ts in times.items():
    tps = runs[name][1] / float(np.median(ts))
    out[name] = {"step_ms": 1e3 * float(np.median(ts)), "tokens_per_s": tps,
                 "gflops_per_token": fpt[name] / 1e9, "mfu": tps * fpt[name] / peak,
                 "mfu_ratio": ratio(times, name), "cpu_mfu_ratio": ratio(cpu, name),
                 "peak_gflops": peak / 1e9}
  return out


def _cpu_seconds() -> float:
  """User + system CPU time of this process (all threads)."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime
