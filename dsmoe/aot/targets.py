"""Targets of ahead-of-time compilation: TPU slices and GPU hosts, without the hardware.

    target("tpu:v5p-256")  -> Target(platform="tpu", devices=[128 v5p chips], ...)
    target("tpu:v5e:2x4")  -> the same from a topology string (8 v5e chips)
    target("cuda:h100x8")  -> 8 deviceless H100s (one host); "cuda:h200x16": 2 hosts
    target("cpu")          -> this machine's (fake) CPU devices

TPU slice names count what Cloud TPU counts: TensorCores for v4 and v5p (two
per chip: v5p-256 is 128 chips), chips for v5e and v6e (v5e-8 is 8 chips).
The devices come from `jax.experimental.topologies.get_topology_desc`, which
needs the TPU compiler (libtpu: `pip install "jax[tpu]==<jax version>"`) or
the CUDA plugin with ptxas (`jax-cuda12-plugin`, `nvidia-cuda-nvcc-cu12`),
but no TPU or GPU; `make aot-env` installs both into `.venv-aot`. The GPU
descriptions are GpuTargetConfig files in `dsmoe/aot/gpus/`, each saying
where its numbers come from. Deviceless GPU topologies describe hosts of 8
GPUs (`1 x hosts x 8`); what they cannot describe (NVLink vs. network
bandwidth between the GPUs) does not change what compiles.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from pathlib import Path

from dsmoe.errors import ConfigError

GPUS = Path(__file__).with_name("gpus")
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class TpuChip:
  """One TPU generation: its topology name, how slice names count, its memory."""
  topology: str  # generation name of get_topology_desc ("v5p")
  cores_per_count: int  # slice-name units per chip (v4/v5p: 2 TensorCores)
  dims: int  # topology dimensions (3: v4/v5p torus, 2: v5e/v6e)
  hbm_bytes: int  # HBM per chip (Cloud TPU system architecture pages)
  peak_bf16_flops: float  # per chip
  hbm_bandwidth: float  # bytes/s per chip (the same pages)


TPU_CHIPS = {
    "v4": TpuChip("v4", 2, 3, 32 * GIB, 275e12, 1200e9),
    "v5p": TpuChip("v5p", 2, 3, 95 * GIB, 459e12, 2765e9),
    "v5e": TpuChip("v5e", 1, 2, 16 * GIB, 197e12, 819e9),
    "v6e": TpuChip("v6e", 1, 2, 32 * GIB, 918e12, 1640e9),
}
GPU_FILES = {"h100": "h100_sxm.txtpb", "h200": "h200_sxm.txtpb", "a100": "a100_sxm.txtpb"}
GPU_PEAK_BF16_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12}  # dense, per GPU
GPUS_PER_HOST = 8
MIN_TPU_CHIPS = 4  # the smallest topology libtpu describes (2x2, 2x2x1)


@dataclasses.dataclass
class Target:
  name: str  # as given
  platform: str  # "tpu", "gpu" or "cpu" (what dsmoe.resolve takes)
  devices: list
  hbm_bytes: int  # memory per device (0: unknown, e.g. CPU)
  peak_flops: float  # bf16 FLOP/s per device (0: unknown)
  hbm_bandwidth: float = 0.0  # bytes/s per device (0: unknown)
  tpu_generation: str | None = None  # for the Pallas kernels' tiling (pallas_kernels.gmm)


def _tpu_topology(chip: TpuChip, chips: int) -> str:
  """The usual slice shape of `chips` chips: a near-cube (3-D) or near-square (2-D)."""
  if chips < 1 or chips & (chips - 1):
    raise ConfigError(f"target: {chips} {chip.topology} chips is not a power of two; "
                      f"give a topology instead, e.g. 'tpu:{chip.topology}:2x2x2'")
  sides = [1] * chip.dims
  for i in range(int(math.log2(chips))):
    sides[i % chip.dims] *= 2
  if chip.dims == 3 and chips < 8:  # 4 chips: 2x2x1, the smallest v4/v5p slices
    sides = sorted(sides, reverse=True)
  else:
    sides = sorted(sides)
  return "x".join(map(str, sides))


def _tpu(spec: str, name: str) -> Target:
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)(?:-(\d+)|:(\d+(?:x\d+){1,2}))", spec)
  if m is None:
    raise ConfigError(f"target {name!r}: expected tpu:<generation>-<size> (a Cloud TPU slice "
                      f"name, e.g. tpu:v5p-256, tpu:v5e-8) or tpu:<generation>:<topology> "
                      f"(e.g. tpu:v5e:2x4); generations: {sorted(TPU_CHIPS)}")
  chip, chips = TPU_CHIPS[m.group(1)], 0
  if m.group(2):
    count = int(m.group(2))
    if count % chip.cores_per_count:
      raise ConfigError(f"target {name!r}: {chip.topology} slice sizes count TensorCores "
                        f"({chip.cores_per_count} per chip): use an even size")
    chips = count // chip.cores_per_count
    # Fewer chips than one host's 2x2: describe the host, use the first chips.
    topology = _tpu_topology(chip, max(chips, MIN_TPU_CHIPS))
  else:
    topology = m.group(3)
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiling processes
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask
  try:
    devices = topologies.get_topology_desc(topology_name=f"{chip.topology}:{topology}",
                                           platform="tpu").devices
  except Exception as e:  # noqa: BLE001 - no libtpu, or a topology it does not know
    hint = ("" if importlib.util.find_spec("libtpu") else
            "; it needs libtpu: pip install 'jax[tpu]==<your jax version>' (make aot-env)")
    raise ConfigError(f"target {name!r}: the TPU compiler cannot describe {chip.topology}:"
                      f"{topology} ({_first_line(e)}){hint}") from None
  devices = list(devices)[:chips or None]
  return Target(name, "tpu", devices, chip.hbm_bytes, chip.peak_bf16_flops,
                chip.hbm_bandwidth, tpu_generation=chip.topology)


def _gpu(spec: str, name: str) -> Target:
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  m = re.fullmatch(r"(h100|h200|a100)x(\d+)", spec)
  if m is None:
    raise ConfigError(f"target {name!r}: expected cuda:<gpu>x<count> with gpu one of "
                      f"{sorted(GPU_FILES)} (e.g. cuda:h100x8)")
  gpu, count = m.group(1), int(m.group(2))
  if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
    raise ConfigError(f"target {name!r}: 1 to {GPUS_PER_HOST} GPUs, or whole hosts of "
                      f"{GPUS_PER_HOST}")
  hosts, per_host = (count // GPUS_PER_HOST, GPUS_PER_HOST) if count > GPUS_PER_HOST else (1, count)
  config = (GPUS / GPU_FILES[gpu]).read_text()
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver to check
  try:
    topo = topologies.get_topology_desc(platform="cuda", target_config=config,
                                        topology=f"1x{hosts}x{per_host}")
  except Exception as e:  # noqa: BLE001 - no CUDA plugin
    hint = ("" if importlib.util.find_spec("jax_plugins.xla_cuda12") else
            "; it needs the CUDA plugin and ptxas: pip install jax-cuda12-plugin==<your jax "
            "version> nvidia-cuda-nvcc-cu12 (make aot-env)")
    raise ConfigError(f"target {name!r}: cannot describe {count} {gpu} GPUs "
                      f"({_first_line(e)}){hint}") from None
  memory = int(re.search(r"device_memory_size:\s*(\d+)", config).group(1))
  bandwidth = float(re.search(r"memory_bandwidth:\s*(\d+)", config).group(1))
  return Target(name, "gpu", list(topo.devices), memory, GPU_PEAK_BF16_FLOPS[gpu], bandwidth)


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def target(name: str) -> Target:
  """The devices of target `name` (module docstring)."""
  kind, _, spec = name.partition(":")
  if kind == "tpu":
    return _tpu(spec, name)
  if kind == "cuda":
    return _gpu(spec, name)
  if kind == "cpu" and not spec:
    import jax  # pylint: disable=g-import-not-at-top
    return Target(name, "cpu", jax.devices("cpu"), 0, 0.0)
  raise ConfigError(f"target {name!r}: expected 'cpu', 'tpu:<slice>' or 'cuda:<gpu>x<n>' "
                    "(e.g. tpu:v5p-256, cuda:h100x8)")
