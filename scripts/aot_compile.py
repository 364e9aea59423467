"""Compile the real train step, or the decode step, for a TPU slice or GPU
hosts, without the hardware.

    .venv-aot/bin/python scripts/aot_compile.py --config configs/paper_16b.py \
        --target tpu:v5p-256 --mesh fsdp=16,expert=8 --config.model.scan_layers=True \
        --config.model.dtype=bfloat16 --config.model.remat=full \
        --config.train.grad_accum_steps=9 --json /tmp/plan.json

Targets (dsmoe/aot/targets.py): tpu:<generation>-<size> (Cloud TPU slice
names: v4-8, v5p-256, v5e-8, v6e-64, ...) or tpu:<generation>:<topology>,
and cuda:<h100|h200|a100>x<count> (hosts of 8), which need the AOT
environment (`make aot-env`: libtpu and the CUDA plugin); and cpu: this
process gets data x fsdp x expert fake CPU devices (an axis of -1 counts as
1) and XLA:CPU compiles the step (any environment; its memory is not the
accelerator's, and no HBM is checked). The config is resolved for the
target's platform, so "auto" settings are what the target runs. Prints, per
chip, the compiled memory against the chip's HBM, the kernels (Pallas custom
calls) and collectives, and XLA's cost-model figures (an estimate, and one
that counts each loop body once). A plan that does not fit is one `error:`
line with exit status 1 (after writing --json). --mesh sets config.mesh
(axes not named are 1). --step=decode compiles dsmoe.generate's program
(prefill, then the decode loop over the KV cache) for --decode_batch
prompts of up to --prompt_len tokens and --max_new_tokens new ones.
"""

import json
import os

from absl import flags
from ml_collections import config_flags

from dsmoe import cli
from dsmoe.errors import ConfigError

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("target", None, "What to compile for: tpu:v5p-256, tpu:v5e:2x4, "
                    "cuda:h100x8, ...")
flags.DEFINE_string("mesh", None, "Mesh axes, e.g. 'fsdp=16,expert=8' (others 1); "
                    "default: the config's mesh.")
flags.DEFINE_enum("step", "train", ["train", "decode"], "What to compile: the train step, "
                  "or the decode step of dsmoe.generate (prefill and the decode loop).")
flags.DEFINE_integer("decode_batch", 8, "--step=decode: prompts decoded together.")
flags.DEFINE_integer("prompt_len", 128, "--step=decode: the longest prompt, in tokens.")
flags.DEFINE_integer("max_new_tokens", 128, "--step=decode: new tokens per prompt.")
flags.DEFINE_boolean("estimate", True, "Also estimate the train step's time and MFU from "
                     "the compiler's cost model (four more small compiles; "
                     "dsmoe/aot/estimate.py).")
flags.DEFINE_string("json", None, "Also write the plan to this JSON file.")
flags.DEFINE_integer("top", 8, "Also print the N collectives with the most bytes per step.")
flags.mark_flags_as_required(["config", "target"])
FLAGS = flags.FLAGS
AXES = ("data", "fsdp", "expert")


def mesh_sizes(text: str) -> dict:
  sizes = {}
  for part in filter(None, text.split(",")):
    key, _, value = part.partition("=")
    if key not in AXES or not value.isdigit() or int(value) < 1:
      raise ConfigError(f"--mesh={text!r} is invalid: expected axis=size pairs of "
                        f"{list(AXES)}, e.g. 'fsdp=16,expert=8'")
    sizes[key] = int(value)
  return sizes


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def report(plan: dict, top: int = 0) -> None:
  if not plan["compiled"]:
    print(f"target {plan['target']}: {plan['devices']} x {plan['device_kind']}; mesh "
          f"{plan['mesh']}; the compiler refused it for device memory after "
          f"{plan['compile_s']} s: {plan['error']}")
    return
  what = "train step" if plan["step"] == "train" else "decode step ({batch} prompts of up to " \
      "{prompt_len} tokens, {max_new_tokens} new)".format(**plan["decode"])
  print(f"target {plan['target']}: {plan['devices']} x {plan['device_kind']}; mesh "
        f"{plan['mesh']}; {what} compiled in {plan['compile_s']} s")
  print(f"routed experts: {plan['plan']['grouped']}; token exchange: "
        f"{plan['plan']['ep_exchange']}")
  print("memory per chip (this compiler's memory_analysis):")
  for k, v in plan["memory"].items():
    print(f"  {k:12s} {_gib(v)}")
  if plan["fits"] is None:
    print("  HBM          unknown for this target (nothing checked)")
  else:
    print(f"  HBM          {_gib(plan['hbm_bytes'])}: "
          f"{'fits' if plan['fits'] else 'DOES NOT FIT'}")
  if "state" in plan:
    print("  of the arguments, state per chip (sharding rules): " + ", ".join(
        f"{k} {_gib(v)}" for k, v in plan["state"].items()))
  kernels = ", ".join(f"{k} x{v}" for k, v in plan["kernels"].items()) or "none (XLA ops only)"
  print(f"kernels (custom calls): {kernels}")
  exact = "" if plan["collectives_exact"] else (
      " (this compiler's HLO has no loop trip counts: each loop body counted once)")
  print(f"collectives per {'step' if plan['step'] == 'train' else 'call'}, per chip{exact}:")
  for op, row in sorted(plan["collectives"].items()):
    print(f"  {op:20s} {row['count']:6d} x  {_gib(row['bytes'])}")
  if top and plan["largest_collectives"]:
    print("largest (bytes per execution x executions; devices; where):")
    for c in plan["largest_collectives"][:top]:
      where = c["source"].split("/")[-1][:40] if c["source"] else ""
      print(f"  {c['op']:18s} {c['shape'][:44]:44s} {c['bytes'] / 2**20:9.1f} MiB x "
            f"{c['count']:4d}; {c['group_size']} devices; {where}")
  cost = plan["cost_estimate"]
  print("XLA cost model of this program (loop bodies counted once): " + ", ".join(
      f"{k} {v:.3g}" for k, v in cost.items()))
  est = plan["estimate"]
  if plan["estimated_step_s"] is None:
    print(f"estimated step time: none ({est.get('why_not', '')})")
    return
  print(f"estimated from loop-free probes (dsmoe/aot/estimate.py; {est['probe_compile_s']} s), "
        f"per chip per step: {est['flops']:.3g} flops, {est['bytes']:.3g} bytes; the "
        f"model's own training FLOPs {est['model_flops']:.3g} "
        f"(the compiler counts {est['flops'] / est['model_flops']:.3g} x those)")
  print(f"estimated step time {plan['estimated_step_s']:.4g} s, MFU "
        f"{100 * plan['estimated_mfu']:.3g}% (an estimate, no measurement: the compute/HBM "
        "roofline of the compiler's counts, collectives left out, ops counted over their "
        "static shapes)")


def fake_cpu_devices(mesh: dict | None, config) -> dict:
  """The mesh of the cpu target ({axis: size}; --mesh, else the config's
  with -1 as 1), after giving this process one fake CPU device per mesh
  position (before jax starts its CPU backend, which reads the count once)."""
  if mesh:
    sizes = {k: mesh.get(k, 1) for k in AXES}
  else:
    sizes = {k: max(config.mesh[k], 1) for k in AXES}
  n = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                             f"--xla_force_host_platform_device_count={n}").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  return sizes


def main(argv):
  del argv
  mesh = mesh_sizes(FLAGS.mesh) if FLAGS.mesh else None
  if FLAGS.target == "cpu":
    mesh = fake_cpu_devices(mesh, FLAGS.config)
  from dsmoe import aot  # pylint: disable=g-import-not-at-top
  for name in ("decode_batch", "prompt_len", "max_new_tokens"):
    if getattr(FLAGS, name) < 1:
      raise ConfigError(f"--{name}={getattr(FLAGS, name)} must be at least 1")
  decode = {"batch": FLAGS.decode_batch, "prompt_len": FLAGS.prompt_len,
            "max_new_tokens": FLAGS.max_new_tokens}
  plan = aot.plan(FLAGS.config, FLAGS.target, mesh=mesh, step=FLAGS.step, decode=decode,
                   estimate=FLAGS.estimate)
  report(plan, FLAGS.top)
  if FLAGS.json:
    with open(FLAGS.json, "w", encoding="utf-8") as f:
      json.dump(plan, f, indent=1)
  if plan["fits"] is False:
    bound = "" if plan["compiled"] else "at least "  # the compiler stopped at its first overrun
    change = ("lower train.batch_size or raise train.grad_accum_steps, set "
              "model.remat=full, or spread the model over more chips (--mesh fsdp=..., "
              "expert=...)") if plan["step"] == "train" else (
              "lower --decode_batch, --prompt_len or --max_new_tokens, use "
              "model.dtype=bfloat16, or spread the model over more chips (--mesh ...)")
    cli.fail(f"the plan does not fit: peak {bound}{_gib(plan['memory']['peak'])} per chip > "
             f"{_gib(plan['hbm_bytes'])} HBM of {plan['device_kind']}; {change}")


if __name__ == "__main__":
  cli.run(main)
