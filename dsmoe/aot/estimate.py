"""A step time and MFU estimated from the compiler's cost model, for steps with loops.

XLA's `cost_analysis()` counts the body of a loop once: a step that scans
its layers and accumulates gradients over A micro-batches is undercounted by
about A x L (and XLA:TPU's `optimal_seconds` comes out negative for it). So
the estimate compiles loop-free probes of the same step, for the same target
and mesh, and scales them by the trip counts the config gives:

  g(n)  loss and gradients of one micro-batch (no accumulation, no layer
        scan) of the model cut to its first_k_dense_replace dense layers
        and n repeated layers (the MoE layers; for a model without any, its
        dense layers);
  t(n)  the whole train step of that cut model (gradients, clipping, the
        optimizer update); u(n) = t(n) - g(n) is its update.

  per micro-batch  G = g(1) + (L - 1) (g(2) - g(1))
  update           U = u(1) + (L - 1) (u(2) - u(1))
  step             A G + U      (for flops and for bytes accessed)

with L repeated layers. Four small compiles: the probes have one or two
repeated layers. The estimated step time is the roofline of those counts
per chip, max(flops / peak FLOP/s, bytes / HBM bandwidth), and the MFU the
model's training FLOPs (dsmoe.flops_per_token) over that time x peak. An
estimate, not a measurement, off in both directions: it assumes compute
and memory traffic overlap perfectly and leaves out the collectives between
chips (too fast), while the compiler counts every op over its static
shape, so an op on a buffer that is mostly empty at run time (ragged_dot
over the receive buffer of the expert-parallel exchange, sized for the
worst case) is counted whole (too slow). `flops / model_flops` in the
result shows how far the compiler's count is from the model's.
"""

from __future__ import annotations

import time

from dsmoe import accounting
from dsmoe import config as config_lib
from dsmoe.aot.compiled import cost_of
from dsmoe.spec import Spec
from dsmoe.train import optimizer as optimizer_lib
from dsmoe.train import plan as train_plan
from dsmoe.train import state as state_lib
from dsmoe.train import step as step_lib

COUNTS = ("flops", "bytes")


def repeated_layers(spec) -> tuple[int, int]:
  """(layers kept whole in every probe, L repeated layers) of a model spec."""
  m = spec.model
  dense = min(m.first_k_dense_replace, m.num_layers)
  if dense == m.num_layers:  # no MoE layer: the dense layers repeat
    return 0, m.num_layers
  return dense, m.num_layers - dense


def probe_config(config, repeated: int, platform: str | None = None):
  """`config` (resolved for `platform`) cut to its leading dense layers +
  `repeated` repeated layers, unscanned, one micro-batch per step."""
  probe = config.copy_and_resolve_references()
  spec = config_lib.resolve(config, platform=platform)
  kept, _ = repeated_layers(spec)
  probe.model.num_layers = kept + repeated
  if spec.model.first_k_dense_replace >= spec.model.num_layers:
    probe.model.first_k_dense_replace = kept + repeated
  probe.model.scan_layers = False
  probe.train.batch_size = spec.train.batch_size // spec.train.grad_accum_steps
  probe.train.grad_accum_steps = 1
  return probe


def probe_counts(config, platform: str, mesh) -> dict[str, dict[str, float]]:
  """{"grads": g, "step": t} of the probe `config` compiled on `mesh`."""
  spec = config_lib.resolve(config, platform=platform)
  abstract = state_lib.abstract_state(spec, optimizer_lib.make_optimizer(spec.train), mesh)
  step = train_plan.compile_train_step(spec, mesh, abstract)
  batch = train_plan.abstract_batch(spec, mesh)
  shapes = abstract.shapes
  grads = step_lib.jit_probe_step(spec, abstract.graphdef, mesh).lower(
      shapes["params"], shapes["rest"], batch).compile()
  return {"grads": cost_of(grads), "step": cost_of(step)}


def combine(one: dict, two: dict, repeated: int, accum: int) -> dict[str, float]:
  """A G + U (module docstring) from the probes with one and two repeated
  layers ({"grads": {...}, "step": {...}} each)."""
  out = {}
  for k in COUNTS:
    g1, g2 = one["grads"][k], two["grads"][k]
    u1, u2 = one["step"][k] - g1, two["step"][k] - g2
    per_micro = g1 + (repeated - 1) * (g2 - g1)
    update = u1 + (repeated - 1) * (u2 - u1)
    out[k] = accum * per_micro + update
  return out


def roofline_s(flops: float, bytes_accessed: float, peak_flops: float,
               hbm_bandwidth: float) -> float:
  """Seconds of a program that is only compute- or memory-bound, whichever is slower."""
  return max(flops / peak_flops, bytes_accessed / hbm_bandwidth)


def train_step(config, tgt, mesh) -> dict:
  """The estimate (module docstring) for `config`'s train step on target
  `tgt` (dsmoe.aot.targets.Target) and `mesh`: per chip flops, bytes,
  estimated_step_s, estimated_mfu, and the model's own FLOPs."""
  start = time.perf_counter()
  if isinstance(config, Spec):  # the probes cut the config the spec was resolved from
    config = config.config
  if config is None:
    return {"estimated_step_s": None, "estimated_mfu": None,
            "why_not": "the probes cut the model's layers: this Spec has no config"}
  spec = config_lib.resolve(config, platform=tgt.platform)
  if spec.model.moe_layer_freq != 1:
    return {"estimated_step_s": None, "estimated_mfu": None,
            "why_not": "model.moe_layer_freq != 1: the layers do not repeat one by one"}
  _, repeated = repeated_layers(spec)
  one = probe_counts(probe_config(config, 1, tgt.platform), tgt.platform, mesh)
  if not one["grads"]["flops"]:  # XLA:GPU without a device: cost_analysis() is None
    return {"estimated_step_s": None, "estimated_mfu": None,
            "why_not": "this target's compiler gives no cost analysis without the device"}
  two = probe_counts(probe_config(config, 2, tgt.platform), tgt.platform, mesh)
  counts = combine(one, two, repeated, spec.train.grad_accum_steps)
  chips = mesh.devices.size
  tokens = spec.train.batch_size * spec.data.seq_len
  model_flops = accounting.flops_per_token(spec) * tokens / chips
  out = {**counts, "model_flops": model_flops,
         "probe_compile_s": round(time.perf_counter() - start, 1)}
  if not (tgt.peak_flops and tgt.hbm_bandwidth):
    return {**out, "estimated_step_s": None, "estimated_mfu": None,
            "why_not": "the target's peak FLOP/s or HBM bandwidth is unknown"}
  step_s = roofline_s(counts["flops"], counts["bytes"], tgt.peak_flops, tgt.hbm_bandwidth)
  return {**out, "estimated_step_s": step_s,
          "estimated_mfu": model_flops / (step_s * tgt.peak_flops)}
