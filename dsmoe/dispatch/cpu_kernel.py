"""The routed experts' SwiGLU as a C++ XLA:CPU custom call (float32; opt-in).

`expert_ffn` computes what expert_loop.expert_loop computes (same layout
inputs, same maths, its own custom_vjp), in two FFI calls (cpu_kernel.cc):
per expert, gather the rows, OpenBLAS sgemm for the three products, SwiGLU,
scatter-add; the experts split over the CPU's cores, each core but the first
with a private zeroed [T, D] accumulator (allocated per call). XLA:CPU runs
the fused loop's many small row operations (gathers, scatter-adds, slices,
in-place updates) one at a time on one thread; this runs them on every core.

It runs only when asked for (`model.moe.gmm_strategy="kernel"`; needs the
`cpu-kernel` extra: `pip install "dsmoe[cpu-kernel]"`, which brings the
`scipy-openblas32` wheel). The library is compiled on first use with the
C++ compiler ($CXX, else g++) against this jaxlib's FFI headers and that
OpenBLAS, for this CPU (-march=native on x86, -mcpu=native elsewhere), and
cached in $DSMOE_CACHE_DIR (default ~/.cache/dsmoe) under a name that hashes
the source, the command, the compiler's version, jaxlib's version and the
CPU's feature line. `available()` says whether that worked;
`unavailable_reason()` says why not, in one line.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from dsmoe.dispatch.common import ExpertWeights

SOURCE = Path(__file__).with_name("cpu_kernel.cc")
FORWARD, BACKWARD = "dsmoe_expert_ffn_forward", "dsmoe_expert_ffn_backward"
CHUNK = 512  # rows per matmul: an expert's rows in chunks of at most this many
# -fopenmp-simd: only the `omp simd` loop pragmas, no OpenMP runtime; with
# -fno-trapping-math (no FP exceptions are ever read) GCC vectorises the SwiGLU
# loops (their float -> int conversions); no -ffast-math (it may turn on
# flush-to-zero for the whole process).
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd", "-fno-trapping-math",
         "-fno-math-errno")
X86 = ("x86_64", "amd64", "i386", "i686")


def _arch_flag() -> str:
  """Code for this CPU: -march=native on x86, -mcpu=native on ARM and others."""
  return "-march=native" if platform.machine().lower() in X86 else "-mcpu=native"


class KernelUnavailable(RuntimeError):
  """The CPU kernel could not be built or loaded here (the message says why)."""


def cache_dir() -> Path:
  """$DSMOE_CACHE_DIR, else $XDG_CACHE_HOME/dsmoe, else ~/.cache/dsmoe."""
  if os.environ.get("DSMOE_CACHE_DIR"):
    return Path(os.environ["DSMOE_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "dsmoe"


def _cpu_flags() -> str:
  """The CPU's feature line (what the native flag compiles for), if known:
  Linux's "flags" (x86) or "Features" (ARM) line, else the CPU's name."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return next((line for line in f if line.startswith(("flags", "Features"))), "")
  except OSError:
    pass
  try:  # macOS
    done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                          text=True, check=False)
    return done.stdout.strip() or platform.processor()
  except OSError:
    return platform.processor()


def _compiler_version(compiler: str) -> str:
  """The first line of `compiler --version` ("" if it does not say)."""
  try:
    done = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False)
  except OSError:
    return ""
  return (done.stdout.strip().splitlines() or [""])[0]


def _build(compiler: str, openblas) -> Path:
  """Compile cpu_kernel.cc into the cache (once per source, compiler and its
  version, jaxlib, OpenBLAS and CPU); returns the library's path."""
  lib_dir = openblas.get_lib_dir()
  cmd = [compiler, *FLAGS, _arch_flag(), str(SOURCE), "-I", jax.ffi.include_dir(), "-I",
         openblas.get_include_dir(), "-L", lib_dir, f"-l{openblas.get_library()}",
         f"-Wl,-rpath,{lib_dir}", "-lpthread"]
  key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(cmd), jaxlib.__version__,
                                  _compiler_version(compiler), platform.machine(),
                                  _cpu_flags()]).encode()).hexdigest()[:16]
  path = cache_dir() / f"cpu_kernel-{key}.so"
  if path.exists():
    return path
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
      out = Path(tmp) / path.name
      done = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True, check=False)
      if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise KernelUnavailable(f"compiling {SOURCE.name} failed: {last}")
      os.replace(out, path)  # atomic: a concurrent build leaves one whole file
  except OSError as e:
    raise KernelUnavailable(f"cannot write the compiled kernel to {path.parent}: {e}; "
                            "set DSMOE_CACHE_DIR to a writable directory") from e
  return path


_REGISTERED: set[str] = set()  # FFI targets registered in this process (once each)


def try_load(compiler: str) -> tuple[bool, str]:
  """Build (if needed) and load the kernel with `compiler`, and register its
  FFI targets: (True, "") or (False, why not)."""
  try:
    if shutil.which(compiler) is None:
      raise KernelUnavailable(f"no C++ compiler {compiler!r} on PATH (set CXX)")
    try:
      import scipy_openblas32 as openblas  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise KernelUnavailable("the scipy-openblas32 package is not installed "
                              "(pip install 'dsmoe[cpu-kernel]')") from e
    lib = ctypes.cdll.LoadLibrary(str(_build(compiler, openblas)))
    for name, symbol in ((FORWARD, lib.DsmoeExpertFfnForward),
                         (BACKWARD, lib.DsmoeExpertFfnBackward)):
      if name not in _REGISTERED:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
        _REGISTERED.add(name)
  except (KernelUnavailable, OSError) as e:
    return False, str(e)
  return True, ""


@functools.cache
def _load() -> tuple[bool, str]:
  return try_load(os.environ.get("CXX", "g++"))


def available() -> bool:
  """Whether the CPU kernel is built and registered (builds it on first call)."""
  return _load()[0]


def unavailable_reason() -> str:
  """Why :func:`available` is False ("" when it is True)."""
  return _load()[1]


def supports(x_td, w: ExpertWeights) -> bool:
  """Whether the kernel computes this call: float32 tokens and weights."""
  return all(a.dtype == jnp.float32 for a in (x_td, w.w_gate_edf, w.w_up_edf, w.w_down_efd))


def _call(name, results, *operands, threads: int, chunk: int):
  if not available():
    raise KernelUnavailable(unavailable_reason())
  return jax.ffi.ffi_call(name, results, vmap_method="sequential")(
      *operands, chunk=np.int64(chunk), threads=np.int64(threads))


def _forward(x_td, weight_p, w: ExpertWeights, token_p, start_e, rows_e, threads, chunk):
  f32 = jnp.float32
  results = (jax.ShapeDtypeStruct(x_td.shape, f32),
             jax.ShapeDtypeStruct((token_p.shape[0], 2 * w.w_gate_edf.shape[-1]), f32))
  return _call(FORWARD, results, x_td, weight_p.astype(f32), token_p.astype(jnp.int32),
               start_e.astype(jnp.int32), rows_e.astype(jnp.int32), w.w_gate_edf, w.w_up_edf,
               w.w_down_efd, threads=threads, chunk=chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def expert_ffn(x_td, weight_p, w: ExpertWeights, token_p, start_e, rows_e, threads: int = 0,
               chunk: int = CHUNK):
  """y_td = sum over rows of gate * SwiGLU_{expert of the row}(x_td[token]).

  The inputs of expert_loop.expert_loop (float32; no chunk sizes), plus
  `threads` (0: every CPU this process may use) and `chunk` (rows per matmul).
  """
  return _forward(x_td, weight_p, w, token_p, start_e, rows_e, threads, chunk)[0]


def _fwd(x_td, weight_p, w, token_p, start_e, rows_e, threads, chunk):
  y_td, saved = _forward(x_td, weight_p, w, token_p, start_e, rows_e, threads, chunk)
  return y_td, (x_td, weight_p, w, token_p, start_e, rows_e, saved)


def _bwd(threads, chunk, res, dy_td):
  x_td, weight_p, w, token_p, start_e, rows_e, saved = res
  f32 = jnp.float32
  results = tuple(jax.ShapeDtypeStruct(a.shape, f32)
                  for a in (x_td, weight_p, w.w_gate_edf, w.w_up_edf, w.w_down_efd))
  dx, dgate, dwg, dwu, dwd = _call(
      BACKWARD, results, x_td, dy_td.astype(f32), weight_p.astype(f32), token_p.astype(jnp.int32),
      start_e.astype(jnp.int32), rows_e.astype(jnp.int32), saved, w.w_gate_edf, w.w_up_edf,
      w.w_down_efd, threads=threads, chunk=chunk)
  return dx, dgate.astype(weight_p.dtype), ExpertWeights(dwg, dwu, dwd), None, None, None


expert_ffn.defvjp(_fwd, _bwd)
