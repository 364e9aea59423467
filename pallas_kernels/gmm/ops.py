"""Grouped matmul ops: kernel choice by lowering platform, and the custom VJP.

    gmm(lhs[m,k], rhs[L,k,n], group_sizes[G], *, tiling=None, group_offset=0,
        num_local_groups=None, preferred_element_type=None, transpose_rhs=False,
        interpret=False, kernel="auto") -> out[m,n]       (rhs [L,n,k] if transposed)
    tgmm(lhs[m,k], dout[m,n], group_sizes[G], *, ...) -> drhs[L,k,n]

Meaning (reference.py): rows are grouped by `group_sizes` (consecutive
ranges); the L local groups group_offset .. group_offset + L - 1 use rhs[0..L-1];
rows of other groups, and rows past sum(group_sizes), give 0. `group_offset`
may be a traced int32 scalar (e.g. an expert-parallel shard's first expert);
offset + L must not exceed G.

`gmm` is differentiable in lhs and rhs (jax.custom_vjp):
    d_lhs = gmm(dout, rhs^T)   (the same kernel, rhs read transposed)
    d_rhs = tgmm(lhs, dout)    (with transpose_rhs: d_rhs = tgmm(dout, lhs))

Kernel choice (`kernel`): "auto" picks by the platform the computation is
LOWERED for (jax.lax.platform_dependent), so `jax.export(..., platforms=
["tpu"])` on a CPU machine emits the Mosaic kernel and platforms=["cuda"]
the Triton one: TPU -> "mosaic", CUDA/ROCm -> "triton", anything else (CPU)
-> the Mosaic kernel run by the Pallas interpreter (slow: tests only).
"mosaic" / "triton" force one kernel; it is compiled on its own platform and
interpreted elsewhere. `interpret=True` interprets on every platform.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import mlir

from pallas_kernels.gmm import kernel_gpu, kernel_tpu
from pallas_kernels.gmm.tiling import TileError, Tiling

KERNELS = ("auto", "mosaic", "triton")
_IMPLS = {"mosaic": kernel_tpu, "triton": kernel_gpu}
_NATIVE = {"mosaic": ("tpu",), "triton": ("cuda", "rocm")}


class _Options(NamedTuple):
  """The static arguments of one gmm / tgmm call (hashable)."""
  tiling: Tiling
  out_dtype: jnp.dtype | None
  kernel: str
  interpret: bool
  transpose_rhs: bool = False


# A kernel that cannot be built for one platform (its tile rule refuses the
# tiling) must not stop the others: platform_dependent traces every branch,
# but lowers only the lowering platform's. Such a branch becomes this
# primitive, which has the kernel's output type and raises when lowered.
_unbuildable_p = jex_core.Primitive("dsmoe_gmm_unbuildable")
_unbuildable_p.def_abstract_eval(lambda x, *, shape, dtype, message: jax.core.ShapedArray(
    shape, dtype))


def _refuse_lowering(ctx, x, *, shape, dtype, message):
  raise TileError(message)


mlir.register_lowering(_unbuildable_p, _refuse_lowering)


def _by_platform(opts: _Options, op: str, x, y, group_sizes, group_offset, *, out_shape,
                 **static):
  """kernel_<impl>.<op>(x, y, group_sizes, group_offset=...) with the
  implementation for the lowering platform (`static`: hashable keywords;
  `out_shape`: the result's ShapeDtypeStruct). A tiling that one platform's
  kernel refuses is an error when lowering for that platform only."""
  def call(impl: str, interpret: bool):
    fn = getattr(_IMPLS[impl], op)

    def branch(x, y, sizes, offset):
      try:
        return fn(x, y, sizes, group_offset=offset, interpret=interpret, tiling=opts.tiling,
                  **static)
      except TileError as e:
        if opts.kernel != "auto" or opts.interpret:
          raise
        return _unbuildable_p.bind(x, shape=tuple(out_shape.shape), dtype=out_shape.dtype,
                                   message=f"{op} ({impl} kernel): {e}")
    return branch

  args = (x, y, group_sizes, group_offset)

  if opts.kernel not in KERNELS:
    raise ValueError(f"kernel={opts.kernel!r}: expected one of {KERNELS}")
  if opts.interpret:
    return call("mosaic" if opts.kernel == "auto" else opts.kernel, True)(*args)
  if opts.kernel == "auto":
    branches = dict(tpu=call("mosaic", False), cuda=call("triton", False),
                    rocm=call("triton", False))
    return jax.lax.platform_dependent(*args, default=call("mosaic", True), **branches)
  native = {p: call(opts.kernel, False) for p in _NATIVE[opts.kernel]}
  return jax.lax.platform_dependent(*args, default=call(opts.kernel, True), **native)


def _check(lhs, rhs_or_dout, group_sizes, name: str):
  if lhs.ndim != 2 or group_sizes.ndim != 1:
    raise ValueError(f"{name}: lhs must be [m, k] and group_sizes [G]; got "
                     f"{lhs.shape} and {group_sizes.shape}")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"{name}: group_sizes must be integers; got {group_sizes.dtype}")
  if lhs.dtype != rhs_or_dout.dtype:
    raise ValueError(f"{name}: both operands need one dtype; got {lhs.dtype} and "
                     f"{rhs_or_dout.dtype} (cast them first)")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm(lhs, rhs, group_sizes, group_offset, opts: _Options):
  n = rhs.shape[1] if opts.transpose_rhs else rhs.shape[2]
  out = jax.ShapeDtypeStruct((lhs.shape[0], n), opts.out_dtype or lhs.dtype)
  return _by_platform(opts, "gmm", lhs, rhs, group_sizes, group_offset, out_shape=out,
                      preferred_element_type=opts.out_dtype, transpose_rhs=opts.transpose_rhs)


def _gmm_fwd(lhs, rhs, group_sizes, group_offset, opts: _Options):
  out = _gmm(lhs, rhs, group_sizes, group_offset, opts)
  return out, (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(opts: _Options, res, dout):
  lhs, rhs, group_sizes, group_offset = res
  dout = dout.astype(lhs.dtype)
  d_lhs = _by_platform(opts, "gmm", dout, rhs, group_sizes, group_offset,
                       out_shape=jax.ShapeDtypeStruct(lhs.shape, lhs.dtype),
                       preferred_element_type=lhs.dtype, transpose_rhs=not opts.transpose_rhs)
  a, b = (dout, lhs) if opts.transpose_rhs else (lhs, dout)  # d_rhs[l] = a[rows]^T b[rows]
  # tgmm steps over rows: its row tile is its own (the default), not the
  # forward's (which the MoE sets to its block size).
  tgmm_opts = opts._replace(tiling=opts.tiling._replace(tm=None))
  d_rhs = _by_platform(tgmm_opts, "tgmm", a, b, group_sizes, group_offset,
                       out_shape=jax.ShapeDtypeStruct(rhs.shape, rhs.dtype),
                       num_local_groups=rhs.shape[0], preferred_element_type=rhs.dtype)
  return d_lhs, d_rhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs, rhs, group_sizes, *, tiling: Tiling | None = None, group_offset=0,
        num_local_groups: int | None = None, preferred_element_type=None,
        transpose_rhs: bool = False, interpret: bool = False, kernel: str = "auto"):
  """out[m, n] = lhs rows of local group l @ rhs[l] (rhs[l]^T if `transpose_rhs`);
  0 elsewhere (module docstring)."""
  _check(lhs, rhs, group_sizes, "gmm")
  k_axis = 2 if transpose_rhs else 1
  if rhs.ndim != 3 or rhs.shape[k_axis] != lhs.shape[1]:
    raise ValueError(f"gmm: rhs must be [L, {'n, k' if transpose_rhs else 'k, n'}] with "
                     f"k={lhs.shape[1]}; got {rhs.shape}")
  if num_local_groups not in (None, rhs.shape[0]):
    raise ValueError(f"gmm: num_local_groups={num_local_groups} but rhs holds "
                     f"{rhs.shape[0]} groups")
  opts = _Options(tiling or Tiling(), preferred_element_type, kernel, interpret, transpose_rhs)
  return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), jnp.asarray(group_offset, jnp.int32),
              opts)


def tgmm(lhs, dout, group_sizes, *, tiling: Tiling | None = None, group_offset=0,
         num_local_groups: int | None = None, preferred_element_type=None,
         interpret: bool = False, kernel: str = "auto"):
  """drhs[L, k, n] = per local group, lhs[rows]^T @ dout[rows] (module docstring).

  L = num_local_groups, or G (all groups) when None.
  """
  _check(lhs, dout, group_sizes, "tgmm")
  if dout.ndim != 2 or dout.shape[0] != lhs.shape[0]:
    raise ValueError(f"tgmm: dout must be [m={lhs.shape[0]}, n]; got {dout.shape}")
  opts = _Options(tiling or Tiling(), preferred_element_type, kernel, interpret)
  local = num_local_groups or group_sizes.shape[0]
  out = jax.ShapeDtypeStruct((local, lhs.shape[1], dout.shape[1]),
                             preferred_element_type or lhs.dtype)
  return _by_platform(opts, "tgmm", lhs, dout, group_sizes.astype(jnp.int32),
                      jnp.asarray(group_offset, jnp.int32), out_shape=out,
                      num_local_groups=local, preferred_element_type=preferred_element_type)
