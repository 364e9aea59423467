"""Where the time of a compiled computation goes on XLA:CPU, per kind of op.

    times = op_times(compiled, run, reps=1)
    by_kind = breakdown(times)        # {kind: (ms per run, ops per run)}
    top = slowest(times, n=20)        # the 20 slowest instructions

runs `run()` (which executes `compiled`) under ``jax.profiler.trace``, reads
the XLA:CPU per-op events of the trace (jax.profiler.ProfileData; no
TensorBoard needed) and sums their durations per kind of HLO instruction,
found in ``compiled.as_text()``: "matmul" (dots and the fusions that hold
one), "gather", "scatter-add", "dynamic-slice", "dynamic-update-slice",
"zeros" (broadcasts of a constant: buffer initialisation), "copy"
(copies, concatenates, transposes, pads), "sort", "elementwise" (other
fusions: elementwise ops and reductions) and "other". Loops and
conditionals are containers (their bodies' ops are counted instead).

XLA:CPU records these events only with the flag
``--xla_cpu_enable_xprof_traceme=true`` in XLA_FLAGS, set before jax is
imported. The sums are op time, not wall time: ops that run concurrently on
several threads all count, and the time between ops (dispatch, waiting for a
thread) does not.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile

import jax

TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"
_CONTAINERS = ("while", "conditional", "call")
_FUSED_KINDS = (("dot(", "matmul"), ("scatter(", "scatter-add"), ("gather(", "gather"),
                ("dynamic-update-slice(", "dynamic-update-slice"),
                ("dynamic-slice(", "dynamic-slice"), ("sort(", "sort"))
_PLAIN_KINDS = {"dot": "matmul", "gather": "gather", "scatter": "scatter-add",
                "dynamic-slice": "dynamic-slice", "dynamic-update-slice": "dynamic-update-slice",
                "sort": "sort", "broadcast": "zeros", "copy": "copy", "concatenate": "copy",
                "transpose": "copy", "pad": "copy"}


def _computations(hlo: str) -> dict[str, str]:
  """Computation name -> body text."""
  return {m.group(1).lstrip("%"): m.group(2)
          for m in re.finditer(r"\n(%?[\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S)}


def _fusion_kind(line: str, body: str) -> str:
  if "__ynn_fusion" in line or "__onednn" in line:
    return "matmul"
  for token, kind in _FUSED_KINDS:
    if token in body:
      return kind
  ops = [ln for ln in body.split("\n") if "=" in ln and "parameter(" not in ln]
  if len(ops) <= 2 and any(" broadcast(" in ln for ln in ops):
    return "zeros"
  if all(re.search(r" (copy|concatenate|transpose|pad|bitcast|slice)\(", ln) for ln in ops):
    return "copy"
  return "elementwise"


def op_kinds(hlo: str) -> dict[str, str | None]:
  """HLO instruction name -> kind (None for loops and conditionals)."""
  comps, kinds = _computations(hlo), {}
  for line in hlo.split("\n"):
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*? ([\w\-]+)\(", line)
    if not m:
      continue
    name, op = m.groups()
    if op == "fusion":
      callee = re.search(r"calls=%([\w.\-]+)", line)
      kinds[name] = _fusion_kind(line, comps.get(callee.group(1), "") if callee else "")
    elif op in _CONTAINERS:
      kinds[name] = None
    else:
      kinds[name] = _PLAIN_KINDS.get(op, "other")
  return kinds


def op_times(compiled, run, reps: int = 1) -> dict[str, dict]:
  """{instruction name: {"kind", "ms" (per run), "calls" (per run), "type"}}
  of the ops of `compiled` seen while tracing `reps` calls of `run()`."""
  hlo = compiled.as_text()
  kinds, types = op_kinds(hlo), result_types(hlo)
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder):
      for _ in range(reps):
        jax.block_until_ready(run())
    files = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)
    data = jax.profiler.ProfileData.from_file(files[0])
  ms, count = collections.defaultdict(float), collections.defaultdict(int)
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if kinds.get(event.name):
          ms[event.name] += event.duration_ns / 1e6 / reps
          count[event.name] += 1
  return {name: {"kind": kinds[name], "ms": ms[name], "calls": count[name] // reps,
                 "type": types.get(name, "")} for name in ms}


def breakdown(times: dict[str, dict]) -> dict[str, tuple[float, int]]:
  """{kind: (milliseconds per run, ops per run)} from :func:`op_times`, largest first."""
  by_kind, ops = collections.defaultdict(float), collections.defaultdict(int)
  for op in times.values():
    by_kind[op["kind"]] += op["ms"]
    ops[op["kind"]] += op["calls"]
  return {k: (by_kind[k], ops[k]) for k in sorted(by_kind, key=by_kind.get, reverse=True)}


def slowest(times: dict[str, dict], n: int = 20) -> list[dict]:
  """The n instructions of :func:`op_times` with the most time per run,
  largest first, each with its "name"."""
  names = sorted(times, key=lambda name: times[name]["ms"], reverse=True)[:n]
  return [{"name": name, **times[name]} for name in names]


def result_types(hlo: str) -> dict[str, str]:
  """HLO instruction name -> its result type, e.g. "f32[4096,512]{1,0}"."""
  return {m.group(1): m.group(2) for m in
          re.finditer(r"\n\s*(?:ROOT )?%([\w.\-]+) = (\([^)]*\)|\S+) ", hlo)}
