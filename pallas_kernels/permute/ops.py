"""Permute / unpermute of the MoE token rows with custom VJPs, kernel by platform.

    permute(x_td, token_p, row_tk) -> x_pd          x_pd[p] = x_td[token_p[p]]
    unpermute(y_pd, weight_tk, row_tk, token_p, pair_p) -> y_td
                                                    y_td[t] = sum_k w[t,k] y_pd[row_tk[t,k]]

(the maps of dsmoe/dispatch/layout.py: token_p [P] token of each buffer row,
pair_p [P] its flat (token, slot) index or T*K for padding, row_tk [T, K] the
buffer row of each pair, out of range for a dropped pair). Both backwards are
gathers again, never scatter-adds:

    permute:   dx_td[t]     = sum_k dx_pd[row_tk[t, k]]               (combine_rows, w = 1)
    unpermute: dy_pd[p]     = w[pair_p[p]] * dy_td[token_p[p]]          (gather_rows, scaled)
               dw_tk[t, k]  = <y_pd[row_tk[t, k]], dy_td[t]>            (row_dots)

Implementations (`kernel`): "triton" (kernel_gpu.py: the gather, gate scaling
and top-k sum of unpermute in one pass), "xla" (reference.py: XLA's gathers)
and "auto": Triton when lowered for CUDA/ROCm, XLA elsewhere (no TPU kernel:
XLA's row gather is used there). "triton" off a GPU runs in the Pallas
interpreter, as does `interpret=True`.

The MoE dispatch (dsmoe/dispatch/permute.py) keeps XLA's gathers until a GPU
benchmark (scripts/bench_kernels.py) shows these kernels faster.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.permute import kernel_gpu, reference

KERNELS = ("auto", "triton", "xla")


def _by_platform(kernel: str, interpret: bool, op: str, *args):
  """reference.<op> or kernel_gpu.<op> on args, by `kernel` and the lowering platform."""
  if kernel not in KERNELS:
    raise ValueError(f"kernel={kernel!r}: expected one of {KERNELS}")
  xla = getattr(reference, op)
  triton = lambda *a: getattr(kernel_gpu, op)(*a, interpret=interpret)
  interpreted = lambda *a: getattr(kernel_gpu, op)(*a, interpret=True)
  if kernel == "xla":
    return xla(*args)
  if interpret:
    return interpreted(*args)
  if kernel == "triton":
    return jax.lax.platform_dependent(*args, cuda=triton, rocm=triton, default=interpreted)
  return jax.lax.platform_dependent(*args, cuda=triton, rocm=triton, default=xla)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _permute(x_td, token_p, row_tk, kernel, interpret):
  del row_tk
  return _by_platform(kernel, interpret, "gather_rows", x_td, token_p)


def _permute_fwd(x_td, token_p, row_tk, kernel, interpret):
  return _permute(x_td, token_p, row_tk, kernel, interpret), (token_p, row_tk)


def _permute_bwd(kernel, interpret, res, dx_pd):
  token_p, row_tk = res
  ones = jnp.ones(row_tk.shape, jnp.float32)
  return _by_platform(kernel, interpret, "combine_rows", dx_pd, row_tk, ones), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def permute(x_td, token_p, row_tk, *, kernel: str = "auto", interpret: bool = False):
  """x_td [T, D] -> x_pd [P, D]: row p holds token token_p[p]."""
  return _permute(x_td, token_p, row_tk, kernel, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _unpermute(y_pd, weight_tk, row_tk, token_p, pair_p, kernel, interpret):
  del token_p, pair_p
  return _by_platform(kernel, interpret, "combine_rows", y_pd, row_tk, weight_tk)


def _unpermute_fwd(y_pd, weight_tk, row_tk, token_p, pair_p, kernel, interpret):
  out = _unpermute(y_pd, weight_tk, row_tk, token_p, pair_p, kernel, interpret)
  return out, (y_pd, weight_tk, row_tk, token_p, pair_p)


def _unpermute_bwd(kernel, interpret, res, dy_td):
  y_pd, weight_tk, row_tk, token_p, pair_p = res
  w_p = weight_tk.reshape(-1).astype(jnp.float32).at[pair_p].get(mode="fill", fill_value=0)
  dy_pd = _by_platform(kernel, interpret, "gather_rows", dy_td, token_p, w_p)  # padding: 0
  dw_tk = _by_platform(kernel, interpret, "row_dots", y_pd, row_tk, dy_td)
  return dy_pd.astype(y_pd.dtype), dw_tk.astype(weight_tk.dtype), None, None, None


_unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


def unpermute(y_pd, weight_tk, row_tk, token_p, pair_p, *, kernel: str = "auto",
              interpret: bool = False):
  """y_td [T, D] = sum_k weight_tk * y_pd[row_tk] (dropped pairs add 0), in y's dtype."""
  return _unpermute(y_pd, weight_tk, row_tk, token_p, pair_p, kernel, interpret)
