"""The collectives of a compiled XLA program (its HLO text), with bytes per step.

    collectives(compiled.as_text()) -> [Collective(...)]

Each collective instruction is reported once with how many times one step
runs it: the product of the trip counts of the while loops around it (a
layer scan, gradient accumulation; XLA records `known_trip_count`; a loop
without one counts once and is flagged). `bytes` is the larger of the
operand and the result on one device (all-gather: what each device ends up
with; reduce-scatter: what each device contributes; all-reduce, all-to-all,
collective-permute: the buffer), per execution. Collectives over groups of
one device (a mesh axis of size 1) move nothing and are left out.
"""

from __future__ import annotations

import dataclasses
import math
import re

OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
       "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
          "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")


@dataclasses.dataclass
class Collective:
  op: str  # "all-gather", ...
  name: str  # HLO instruction name
  shape: str  # result type as printed
  bytes: int  # per device per execution (see module docstring)
  group_size: int  # devices taking part together
  count: int  # executions per step
  exact_count: bool  # False if a loop around it has no known trip count
  source: str  # jax op_name metadata (where in the model), if any

  @property
  def bytes_per_step(self) -> int:
    return self.bytes * self.count


def type_bytes(text: str) -> int:
  """Bytes of an HLO type (a shape or a tuple of shapes)."""
  return sum(_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for dt, dims in _SHAPE.findall(text))


def _group_size(line: str) -> int:
  m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[([0-9,]+)\]<=", line)
  if m:
    return int(m.group(1).split(",")[-1])
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)))
  m = re.search(r"source_target_pairs=\{(.*?)\}\}", line)
  return len(m.group(1).split("},{")) if m else 1


def _computations(text: str) -> dict[str, list[str]]:
  comps, current, entry = {}, None, None
  for line in text.splitlines():
    h = _HEADER.match(line)
    if h and not line.startswith(" "):
      current = h.group(1)
      comps[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif current is not None and line.strip() and line.strip() != "}":
      comps[current].append(line)
  comps["__entry__"] = [entry]
  return comps


def _multiplicities(comps) -> dict[str, tuple[int, bool]]:
  """How often each computation runs per step, and whether that is exact."""
  mult = {comps["__entry__"][0]: (1, True)}
  todo = [comps["__entry__"][0]]
  while todo:
    name = todo.pop()
    n, exact = mult[name]
    for line in comps.get(name, []):
      calls = []
      body = re.search(r"\bbody=%?([\w.\-]+)", line)
      if body:
        trip = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
        calls.append((body.group(1), n * (int(trip.group(1)) if trip else 1),
                      exact and trip is not None))
      for key in ("to_apply", "calls", "condition"):
        for callee in re.findall(rf"\b{key}=%?([\w.\-]+)", line):
          calls.append((callee, n, exact))
      for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
        calls += [(c.strip().lstrip("%"), n, False) for c in group.split(",")]
      for callee, m, ex in calls:
        if callee in comps and (callee not in mult or mult[callee][0] < m):
          mult[callee] = (m, ex)
          todo.append(callee)
  return mult


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective of the compiled program (see the module docstring)."""
  comps = _computations(hlo_text)
  mult = _multiplicities(comps)
  sizes = {}
  for name, lines in comps.items():
    for line in lines:
      m = _INSTR.match(line) if isinstance(line, str) else None
      if m:
        sizes[m.group(1)] = type_bytes(m.group(2))
  out = []
  for comp, lines in comps.items():
    if comp not in mult:
      continue
    n, exact = mult[comp]
    for line in lines:
      m = _INSTR.match(line)
      if not m:
        continue
      op = m.group(3).removesuffix("-start")
      if op not in OPS:
        continue
      operands = re.findall(r"%([\w.\-]+)", m.group(4).split(")")[0])
      in_bytes = sum(sizes.get(o, 0) for o in operands)
      group = _group_size(line)
      if group == 1:
        continue  # over a mesh axis of size 1: moves nothing
      src = re.search(r'op_name="([^"]*)"', line)
      out.append(Collective(op, m.group(1), m.group(2), max(in_bytes, type_bytes(m.group(2))),
                            group, n, exact, src.group(1) if src else ""))
  return out


def summary(colls: list[Collective]) -> dict[str, dict[str, int]]:
  """{op: {"count": executions per step, "bytes": bytes per step per device}}."""
  table: dict[str, dict[str, int]] = {}
  for c in colls:
    row = table.setdefault(c.op, {"count": 0, "bytes": 0})
    row["count"] += c.count
    row["bytes"] += c.bytes_per_step
  return table
