"""Compile the real train step (or decode step) for a TPU slice or GPU hosts,
on a machine without them.

    plan(config, "tpu:v5p-256", mesh={"fsdp": 16, "expert": 8}) -> dict
    plan(config, "cuda:h100x1", step="decode", decode={"batch": 8, ...}) -> dict
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
import re
import time

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


def memory_of(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled program (peak = arguments + outputs -
  aliased + temporaries)."""
  m = compiled.memory_analysis()
  memory = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes}
  memory["peak"] = (memory["arguments"] + memory["outputs"] - memory["aliased"]
                    + memory["temporaries"])
  return memory


def cost_of(compiled) -> dict[str, float]:
  """XLA's cost model of the program (per device): flops, bytes accessed and,
  where the compiler gives it, its roofline estimate optimal_seconds. XLA
  counts each loop body once (a layer scan, gradient accumulation), so these
  undercount scanned or accumulated steps."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  out = {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}
  if "optimal_seconds" in cost:
    out["optimal_seconds"] = float(cost["optimal_seconds"])
  return out


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
# The decode step's default shapes: 8 prompts of up to 128 tokens, 128 new tokens.
DECODE = {"batch": 8, "prompt_len": 128, "max_new_tokens": 128}


def plan(config, target_name: str, mesh: dict[str, int] | None = None, *, step: str = "train",
         decode: dict[str, int] | None = None) -> dict:
  """Compile `config`'s train step (step="train") or the program of
  `dsmoe.generate` (step="decode": prefill and the decode loop, shapes
  `decode`, default DECODE) for `target_name` on `mesh` ({axis: size};
  default: the config's mesh) and report it (module docstring)."""
  from dsmoe.errors import ConfigError  # pylint: disable=g-import-not-at-top
  if step not in STEPS:
    raise ConfigError(f"step={step!r} is not one of {list(STEPS)}")
  from dsmoe import config as config_lib  # pylint: disable=g-import-not-at-top
  from dsmoe.parallel import hlo  # pylint: disable=g-import-not-at-top
  from dsmoe.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from dsmoe.train import plan as train_plan  # pylint: disable=g-import-not-at-top
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
        compiled = train_plan.compile_train_step(spec, device_mesh)
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
  return {
      **summary, "compiled": True, "compile_s": round(compile_s, 1), "memory": memory,
      "fits": bool(tgt.hbm_bytes) and memory["peak"] <= tgt.hbm_bytes,
      "custom_calls": calls,
      "kernels": {KERNEL_CALLS[k]: v for k, v in calls.items() if k in KERNEL_CALLS},
      "collectives": hlo.summary(colls),
      # False where a loop around a collective has no trip count in the HLO
      # (XLA:TPU's compiled HLO records none): its count is then per loop body.
      "collectives_exact": all(c.exact_count for c in colls),
      "cost_estimate": cost_of(compiled),
  }


__all__ = ["DECODE", "KERNEL_CALLS", "STEPS", "Target", "cost_of", "custom_calls",
           "kernel_context", "memory_of", "plan", "target"]
