"""Tile sizes of the grouped matmuls and their defaults per platform.

A :class:`Tiling` names the tile of one kernel step; a field left None takes
the default of the platform the kernel is lowered for:

  gmm   (out[m,n] = lhs[m,k] @ rhs[g,k,n]):  tm rows x tn columns of out,
        contracting tk at a time;
  tgmm  (drhs[g,k,n] = lhs^T @ dout):        tk x tn of drhs, reducing over
        the rows tm at a time.

TPU (Mosaic): the defaults depend on the generation (:data:`TPU_GENERATIONS`;
reasoning in docs/BENCHMARKS.md). tk and tn start at the full k and n, so that
a group's weight block stays in VMEM while all of the group's row tiles
stream past it (no refetch), and are halved (in multiples of the MXU width)
until the double-buffered blocks fit the generation's VMEM budget. On a
megacore chip (v4, v5p) gmm keeps at least two column tiles and tgmm two row
tiles of drhs, one for each TensorCore. The generation is the one named by
:func:`tpu_target` (the ahead-of-time compile for a TPU slice from a CPU host
sets it), else the local TPU's; lowering with neither (exporting from a CPU)
uses a conservative generic entry.

GPU (Triton): tile sides are powers of two >= 16 (Triton's rule); defaults
are a common Triton matmul configuration (128 x 128, k-steps of 64 for
16-bit inputs, up to 3 pipeline stages within GPU_SMEM_BUDGET) with 8 warps
(GPU_WARPS), not tuned on hardware: they compile for sm_80 and sm_90 (the
deviceless compile tests), no GPU has timed them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import NamedTuple

import jax
import numpy as np


class TileError(ValueError):
  """A tile size the platform's kernel cannot take (the message names the rule)."""


class Tiling(NamedTuple):
  """Tile sizes (None: the platform default; see the module docstring)."""
  tm: int | None = None  # lhs rows per tile
  tk: int | None = None  # gmm: contraction per step; tgmm: drhs rows per tile
  tn: int | None = None  # columns of out / drhs per tile
  num_warps: int | None = None  # GPU only
  num_stages: int | None = None  # GPU only


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  name: str
  mxu: int  # MXU width: tiles are multiples of it
  vmem: int  # VMEM bytes per TensorCore
  megacore: bool  # two TensorCores split the grid's "parallel" dimension

  @property
  def budget(self) -> int:
    """Bytes our double-buffered blocks may take (the rest: Mosaic's own use)."""
    return self.vmem * 5 // 8


MIB = 1 << 20
TPU_GENERATIONS = {
    "generic": TpuGeneration("generic", 128, 16 * MIB, False),  # fits every generation
    "v4": TpuGeneration("v4", 128, 16 * MIB, True),
    "v5e": TpuGeneration("v5e", 128, 128 * MIB, False),
    "v5p": TpuGeneration("v5p", 128, 64 * MIB, True),
    "v6e": TpuGeneration("v6e", 256, 128 * MIB, False),
    "v7x": TpuGeneration("v7x", 256, 64 * MIB, False),
}
_DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p",
                 "TPU v5p": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e", "TPU7x": "v7x"}


_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("tpu_target", default=None)


@contextlib.contextmanager
def tpu_target(generation: str):
  """Within it, kernels are tiled for TPU `generation` (a key of
  TPU_GENERATIONS, or a device kind such as "TPU v5 lite"), whatever the
  local devices are: for compiling ahead of time for a TPU one does not have."""
  name = _DEVICE_KINDS.get(generation, generation)
  if name not in TPU_GENERATIONS:
    raise ValueError(f"tpu_target({generation!r}): expected one of {sorted(TPU_GENERATIONS)} "
                     f"or a device kind {sorted(_DEVICE_KINDS)}")
  token = _TARGET.set(name)
  try:
    yield TPU_GENERATIONS[name]
  finally:
    _TARGET.reset(token)


def tpu_generation() -> TpuGeneration:
  """The generation of :func:`tpu_target`, else the local TPU's, else the
  generic entry (no TPU, or unknown)."""
  if _TARGET.get() is not None:
    return TPU_GENERATIONS[_TARGET.get()]
  try:
    device = jax.devices()[0]
  except RuntimeError:
    return TPU_GENERATIONS["generic"]
  if device.platform != "tpu":
    return TPU_GENERATIONS["generic"]
  return TPU_GENERATIONS[_DEVICE_KINDS.get(device.device_kind, "generic")]


def _down(x: int, align: int) -> int:
  return max(align, x // align * align)


def _fit_rows(tm: int | None, m: int, default: int) -> int:
  """Rows per tile: a multiple of 8 below m, or all of m."""
  tm = tm or default
  if tm >= m:
    return m
  if tm % 8:
    raise TileError(f"tiling.tm={tm}: TPU row tiles are multiples of 8 (or all {m} rows)")
  return tm


def _fit_cols(t: int | None, dim: int) -> int:
  """A column tile: all of dim, or a multiple of 128 below it."""
  if t is None or t >= dim:
    return dim
  if t % 128:
    raise TileError(f"tiling: TPU column tiles are multiples of 128 (or all {dim}); got {t}")
  return t


def tpu_gmm_tiles(tiling: Tiling, m: int, k: int, n: int, in_bytes: int, out_bytes: int):
  """(tm, tk, tn, vmem_limit_bytes) of the TPU gmm."""
  gen, tm, tk, tn = _first_tiles(tiling, m, k, n)

  def need(tk, tn):
    operands = tm * tk + tk * tn
    return (2 * operands * in_bytes + _f32_split(operands, in_bytes)
            + 2 * tm * tn * out_bytes + 4 * tm * tn)

  if tiling.tn is None and gen.megacore and n >= 2 * gen.mxu:
    tn = _down(-(-n // 2) + gen.mxu - 1, gen.mxu)  # two column tiles, one per core
  tk, tn = _within_budget(tiling, gen, need, tk, tn, k_first=lambda tk, tn: False)
  return tm, tk, tn, _vmem_limit(need(tk, tn), gen)


def tpu_tgmm_tiles(tiling: Tiling, m: int, k: int, n: int, in_bytes: int, out_bytes: int):
  """(tm, tk, tn, vmem_limit_bytes) of the TPU tgmm."""
  gen, tm, tk, tn = _first_tiles(tiling, m, k, n)

  def need(tk, tn):
    operands = tm * tk + tm * tn
    return (2 * operands * in_bytes + _f32_split(operands, in_bytes)
            + 2 * tk * tn * out_bytes + 4 * tk * tn)

  if tiling.tk is None and gen.megacore and k >= 2 * gen.mxu:
    tk = _down(-(-k // 2) + gen.mxu - 1, gen.mxu)  # two row tiles of drhs, one per core
  tk, tn = _within_budget(tiling, gen, need, tk, tn, k_first=lambda tk, tn: tk >= tn)
  return tm, tk, tn, _vmem_limit(need(tk, tn), gen)


def _first_tiles(tiling: Tiling, m: int, k: int, n: int):
  """(generation, tm, tk, tn): the requested tiles fitted to the operands."""
  gen = tpu_generation()
  return gen, _fit_rows(tiling.tm, m, gen.mxu), _fit_cols(tiling.tk, k), _fit_cols(tiling.tn, n)


def _within_budget(tiling: Tiling, gen: TpuGeneration, need, tk: int, tn: int, k_first):
  """Halve the tiles the caller left free (tiling.tk/tn None), one per round
  and never below the MXU width, until need(tk, tn) bytes fit gen.budget.
  k_first(tk, tn): halve tk rather than tn this round when both can shrink."""
  while need(tk, tn) > gen.budget:
    can_k = tiling.tk is None and tk > gen.mxu
    can_n = tiling.tn is None and tn > gen.mxu
    if can_k and (not can_n or k_first(tk, tn)):
      tk = _down(tk // 2, gen.mxu)
    elif can_n:
      tn = _down(tn // 2, gen.mxu)
    else:
      break
  return tk, tn


def _f32_split(operand_elements: int, in_bytes: int) -> int:
  """VMEM for a float32 matmul at full precision on the bfloat16 MXU: Mosaic
  keeps three bfloat16 pieces of each operand block (hi, mid, lo). Without
  this term the real compiler ran out of scoped VMEM for float32 tiles at
  the DeepSeekMoE-16B expert shape (it needed 1.56x the blocks' bytes)."""
  return 3 * 2 * operand_elements if in_bytes == 4 else 0


def _vmem_limit(need: int, gen: TpuGeneration) -> int:
  """Scoped VMEM to ask Mosaic for: our blocks plus room for its own scratch."""
  return int(min(gen.vmem * 7 // 8, max(need + need // 4, 8 * MIB)))


def _pow2(t: int, dim: int) -> int:
  """A Triton block side: a power of two >= 16, no larger than needed for dim."""
  t = min(t, max(16, int(2 ** np.ceil(np.log2(max(dim, 1))))))
  if t < 16 or t & (t - 1):
    raise TileError(f"tiling: GPU (Triton) tiles are powers of two >= 16; got {t}")
  return t


# Shared memory the software pipeline's stages may take per block: below an
# A100's 163 KiB (an H100 has 227 KiB), so one default fits every GPU we target.
GPU_SMEM_BUDGET = 160 * 1024
# 8 warps: a 128 x 128 float32 accumulator over 4 warps is 128 registers per
# thread before any operand fragment, close to the 255 a thread may hold (so
# it spills); over 8 warps it is 64.
GPU_WARPS = 8


def gpu_tiles(tiling: Tiling, m: int, k: int, n: int, in_bytes: int, transposed: bool = False):
  """(tm, tk, tn, num_warps, num_stages) of a Triton kernel.

  `transposed`: tgmm, whose output tile is tk x tn and which steps over rows.
  Unless num_stages is given, the pipeline gets as many stages (at most 3) as
  fit GPU_SMEM_BUDGET.
  """
  small_k = 64 if in_bytes <= 2 else 32
  tm = _pow2(tiling.tm or (64 if transposed else 128), m)
  tk = _pow2(tiling.tk or (128 if transposed else small_k), k)
  tn = _pow2(tiling.tn or 128, n)
  per_stage = (tm * tk + (tm * tn if transposed else tk * tn)) * in_bytes
  stages = tiling.num_stages or max(1, min(3, GPU_SMEM_BUDGET // per_stage))
  return tm, tk, tn, tiling.num_warps or GPU_WARPS, stages
