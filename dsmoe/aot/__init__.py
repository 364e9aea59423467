"""Compile the real train step (or decode step) for a TPU slice or GPU hosts,
on a machine without them.

    plan(config, "tpu:v5p-256", mesh={"fsdp": 16, "expert": 8}) -> dict
    plan(config, "cuda:h100x1", step="decode", decode={"batch": 8, ...}) -> dict
    plan(config, "cpu", mesh={"fsdp": 4, "expert": 2})  # this host's (fake) CPU devices
    scripts/aot_compile.py --config configs/paper_16b.py --target tpu:v5p-256 --mesh fsdp=16,expert=8

The decode step is `dsmoe.generate`'s one program (prefill, then the
decode loop over the KV cache) with the parameters split by the training
sharding rules and the prompts replicated.

The config is resolved for the target's platform (dsmoe.resolve(...,
platform=...)), so every "auto" choice (the routed experts' grouped matmul,
the expert-parallel token exchange) is what that platform runs, not what the
host would; the Pallas kernels are tiled for the target's TPU generation.
The step is then lowered and compiled by the target's own compiler
(XLA:TPU with Mosaic, or XLA:GPU with Triton and ptxas) against
ShapeDtypeStructs carrying their shardings: nothing the size of the model
is allocated.

What a compile proves: the program compiles for that chip, its per-chip
memory (from that compiler) fits the chip's HBM or not, and which kernels
run (Pallas custom calls vs. XLA ops) and which collectives. What it does
not prove: speed. The cost-model figures are XLA's estimates, labelled so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time

from dsmoe.aot.compiled import cost_of, memory_of
from dsmoe.aot.targets import Target, target

# Custom-call targets of the Pallas kernels in compiled HLO.
# (Mosaic calls are also how XLA:TPU runs some ops of its own, e.g. ragged_dot.)
KERNEL_CALLS = {"tpu_custom_call": "Mosaic (Pallas, or XLA:TPU's own kernels)",
                "__gpu$xla.gpu.triton": "Triton (Pallas GPU)"}


def custom_calls(hlo_text: str) -> dict[str, int]:
  """{custom-call target: how many instructions} of a compiled program."""
  counts: dict[str, int] = {}
  for name in re.findall(r'custom_call_target="([^"]+)"', hlo_text):
    counts[name] = counts.get(name, 0) + 1
  return counts


def kernel_context(tgt: Target):
  """The context the kernels are traced in for `tgt` (the TPU generation's tiles)."""
  if tgt.tpu_generation is None:
    return contextlib.nullcontext()
  from pallas_kernels.gmm import tiling  # pylint: disable=g-import-not-at-top
  return tiling.tpu_target(tgt.tpu_generation)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def out_of_hbm(exc: BaseException) -> int | None:
  """The bytes a program needs per chip when the compiler refused it for not
  fitting device memory ("Used 32.5G of 15.75G hbm"), else None."""
  text = str(exc)
  if "RESOURCE_EXHAUSTED" not in text:
    return None
  for pattern in (r"\(([\d.]+)([KMGT]?)\) exceeds available HBM",  # XLA:TPU
                  r"[Uu]sed ([\d.]+)([KMGT]?)i?B? of [\d.]+[KMGT]?i?B? hbm"):
    m = re.search(pattern, text)
    if m is not None:
      return int(float(m.group(1)) * _UNITS[m.group(2)])
  return None


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:500]


STEPS = ("train", "decode")
LARGEST = 12  # collectives listed one by one in a plan, largest bytes per step first
# The decode step's default shapes: 8 prompts of up to 128 tokens, 128 new tokens.
DECODE = {"batch": 8, "prompt_len": 128, "max_new_tokens": 128}


def plan(config, target_name: str, mesh: dict[str, int] | None = None, *, step: str = "train",
         decode: dict[str, int] | None = None, estimate: bool = True) -> dict:
  """Compile `config`'s train step (step="train") or the program of
  `dsmoe.generate` (step="decode": prefill and the decode loop, shapes
  `decode`, default DECODE) for `target_name` on `mesh` ({axis: size};
  default: the config's mesh) and report it (module docstring). With
  `estimate`, a train step that fits also gets the step time and MFU
  estimated from the compiler's cost model (dsmoe.aot.estimate: four more
  small compiles)."""
  from dsmoe.errors import ConfigError  # pylint: disable=g-import-not-at-top
  if step not in STEPS:
    raise ConfigError(f"step={step!r} is not one of {list(STEPS)}")
  from dsmoe import config as config_lib  # pylint: disable=g-import-not-at-top
  from dsmoe.parallel import hlo  # pylint: disable=g-import-not-at-top
  from dsmoe.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from dsmoe.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from dsmoe.train import plan as train_plan  # pylint: disable=g-import-not-at-top
  from dsmoe.train import state as state_lib  # pylint: disable=g-import-not-at-top
  tgt = target(target_name)
  if mesh is not None:
    config = config.copy_and_resolve_references()
    config.mesh.update({"data": 1, "fsdp": 1, "expert": 1, **mesh})
  spec = config_lib.resolve(config, platform=tgt.platform)
  device_mesh = mesh_lib.make_mesh(spec.mesh, devices=tgt.devices)
  shapes = {**DECODE, **(decode or {})} if step == "decode" else None
  start = time.perf_counter()
  summary = {"target": target_name, "step": step, "platform": tgt.platform,
             "devices": len(tgt.devices),
             "device_kind": getattr(tgt.devices[0], "device_kind", ""),
             "mesh": dict(device_mesh.shape),
             "plan": {"grouped": spec.model.moe.plan.grouped,
                      "ep_exchange": spec.model.moe.plan.ep_exchange},
             "hbm_bytes": tgt.hbm_bytes}
  if shapes is not None:
    summary["decode"] = shapes
  try:
    with kernel_context(tgt):
      if step == "train":
        abstract = state_lib.abstract_state(spec, optimizer_lib.make_optimizer(spec.train),
                                            device_mesh)
        summary["state"] = train_plan.state_bytes_per_device(abstract)
        compiled = train_plan.compile_train_step(spec, device_mesh, abstract)
      else:
        from dsmoe import generate  # pylint: disable=g-import-not-at-top
        compiled = generate.lower_generate(spec.model, device_mesh, **shapes).compile()
  except Exception as e:  # noqa: BLE001 - the compiler's own "does not fit" is a plan
    peak = out_of_hbm(e)
    if peak is None:
      raise
    return {**summary, "compiled": False, "compile_s": round(time.perf_counter() - start, 1),
            "memory": {"peak": peak}, "fits": False, "error": _first_line(e)}
  compile_s = time.perf_counter() - start
  text = compiled.as_text()
  memory = memory_of(compiled)
  colls = hlo.collectives(text)
  calls = custom_calls(text)
  fits = memory["peak"] <= tgt.hbm_bytes if tgt.hbm_bytes else None
  estimated = {"estimated_step_s": None, "estimated_mfu": None}
  if step != "train":
    estimated["why_not"] = "estimated for the train step only"
  elif fits is False:
    estimated["why_not"] = "the step does not fit"
  elif not estimate:
    estimated["why_not"] = "not asked for"
  else:
    from dsmoe.aot import estimate as estimate_lib  # pylint: disable=g-import-not-at-top
    with kernel_context(tgt):
      estimated = estimate_lib.train_step(config, tgt, device_mesh)
  return {
      **summary, "compiled": True, "compile_s": round(compile_s, 1), "memory": memory,
      "fits": fits,  # None: the device's memory is unknown (the CPU's fake devices)
      "custom_calls": calls,
      "kernels": {KERNEL_CALLS[k]: v for k, v in calls.items() if k in KERNEL_CALLS},
      "collectives": hlo.summary(colls),
      "largest_collectives": [dataclasses.asdict(c) for c in sorted(
          colls, key=lambda c: -c.bytes_per_step)[:LARGEST]],
      # False where a loop around a collective has no trip count in the HLO
      # (XLA:TPU's compiled HLO records none): its count is then per loop body.
      "collectives_exact": all(c.exact_count for c in colls),
      "cost_estimate": cost_of(compiled),
      # The roofline of the compiler's counts over loop-free probes (dsmoe.aot.estimate).
      "estimated_step_s": estimated.pop("estimated_step_s"),
      "estimated_mfu": estimated.pop("estimated_mfu"),
      "estimate": estimated,
  }


__all__ = ["DECODE", "KERNEL_CALLS", "STEPS", "Target", "cost_of", "custom_calls",
           "kernel_context", "memory_of", "plan", "target"]
