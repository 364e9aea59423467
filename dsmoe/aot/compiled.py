"""What a compiled program says about itself: its memory and XLA's cost model."""

from __future__ import annotations


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
