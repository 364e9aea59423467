"""Per-device memory and collectives of the real train step on a mesh, without
allocating parameters: compiles on fake CPU devices (docs/SCALING.md).

    nice -n 19 python scripts/plan_memory.py --config configs/paper_16b.py \
        --mesh fsdp=32,expert=8 --config.model.scan_layers=True \
        --config.model.remat=full --config.train.grad_accum_steps=9 \
        --config.model.dtype=bfloat16 --config.model.moe.ep_exchange=all_to_all

--mesh sets config.mesh (axes not named are 1); the process gets exactly
data x fsdp x expert fake CPU devices. Prints memory_analysis() of the
compiled step (bytes per device), the state each device holds, and every
collective with its bytes per step per device (loops counted by their trip
counts). --json writes the same as JSON. Errors end with one line `error: ...`.
"""

import json
import os
import time

from absl import flags
from ml_collections import config_flags

import dsmoe
from dsmoe import cli
from dsmoe.errors import ConfigError

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("mesh", None, "Mesh axes, e.g. 'fsdp=32,expert=8' (others 1).")
flags.DEFINE_string("json", None, "Also write the plan to this JSON file.")
flags.DEFINE_integer("top", 12, "Print the N largest collectives.")
flags.mark_flags_as_required(["config", "mesh"])
FLAGS = flags.FLAGS


def _mesh_sizes(text: str) -> dict:
  sizes = {"data": 1, "fsdp": 1, "expert": 1}
  for part in filter(None, text.split(",")):
    key, _, value = part.partition("=")
    if key not in sizes or not value.isdigit() or int(value) < 1:
      raise ConfigError(f"--mesh={text!r} is invalid: expected axis=size pairs of "
                       f"{sorted(sizes)}, e.g. 'fsdp=32,expert=8'")
    sizes[key] = int(value)
  return sizes


def _gib(n: int) -> str:
  return f"{n / 2**30:8.2f} GiB"


def _print(plan: dict, seconds: float, top: int) -> None:
  print(f"mesh {plan['mesh']}; compiled in {seconds:.0f} s")
  print("per device (compiled memory_analysis):")
  for k, v in plan["memory"].items():
    print(f"  {k:14s} {_gib(v)}")
  print("state per device (sharding rules): " + ", ".join(
      f"{k} {_gib(v).strip()}" for k, v in plan["state"].items()))
  print("collectives per step, per device:")
  for op, row in sorted(plan["summary"].items()):
    print(f"  {op:20s} {row['count']:6d} x  {_gib(row['bytes'])}")
  print(f"largest {top} (bytes per execution x executions per step; group size; where):")
  colls = sorted(plan["collectives"], key=lambda c: -c.bytes_per_step)[:top]
  for c in colls:
    where = c.source.split("/")[-1][:40] if c.source else ""
    flag = "" if c.exact_count else " (loop count unknown: counted once)"
    print(f"  {c.op:18s} {c.shape[:48]:48s} {c.bytes / 2**20:9.1f} MiB x {c.count:4d}; "
          f"{c.group_size} devices; {where}{flag}")


def main(argv):
  del argv
  sizes = _mesh_sizes(FLAGS.mesh)  # before jax starts: it needs the device count
  n = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={n}")
  os.environ["JAX_PLATFORMS"] = "cpu"
  config = FLAGS.config
  config.mesh.update(sizes)
  spec = dsmoe.resolve(config)  # after XLA_FLAGS: resolving may start jax
  from dsmoe.parallel import mesh as mesh_lib
  from dsmoe.train import plan
  t0 = time.time()
  result = plan.memory_plan(spec, mesh_lib.make_mesh(spec.mesh))
  _print(result, time.time() - t0, FLAGS.top)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({**result, "collectives": [vars(c) for c in result["collectives"]]}, f,
                indent=1)


if __name__ == "__main__":
  cli.run(main)
