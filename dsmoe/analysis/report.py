"""Ablation results -> results.csv, a markdown table, comparisons and plots.

Input: the rows of finished runs (:func:`dsmoe.analysis.ablation.read_rows`).
Statistics over seeds use the sample standard deviation (ddof = 1). A gap
between two variants "exceeds the noise" when it is larger than twice the
pooled seed standard deviation ``sqrt((s_a^2 + s_b^2) / 2)``. The paired
standard error of a gap (:func:`gap_se`) measures the other noise source,
the choice of evaluation documents; it is usually far smaller than either
variant's own standard error, since both are scored on the same documents.
"""

from __future__ import annotations

import csv
import math
import os

import numpy as np

from dsmoe.data.evalset import mean_and_se
from dsmoe.errors import UserError

CSV_COLUMNS = ("variant", "seed", "steps", "total_params", "activated_params",
               "flops_per_token", "tokens_seen", "eval_loss", "eval_loss_se",
               "eval_tokens", "eval_docs", "eval_set", "train_s", "wall_s", "resumed")

# The paper's names and 2B-scale Pile losses (docs/MODEL.md); None: not printed.
PAPER = {
    "dense": ("Dense", 2.060), "hash": ("Hash Layer", 1.932), "switch": ("Switch", 1.881),
    "gshard": ("GShard", 1.867), "shared": ("+ shared expert", None),
    "m2": ("+ fine-grained m=2", None), "deepseekmoe": ("DeepSeekMoE (m=4)", 1.808),
    "ks2": ("2 shared of 64", 1.806), "ks4": ("4 shared of 64", 1.811),
    "gshard_x1.5": ("GShard x1.5", 1.808), "dense_x16": ("Dense x16", 1.806),
}
# The orderings the paper reports (highest loss first).
ORDERINGS = {
    "Table 1": ("dense", "hash", "switch", "gshard", "deepseekmoe"),
    "Figure 3": ("gshard", "shared", "m2", "deepseekmoe"),
}


def write_csv(rows: list[dict], path: str) -> None:
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow(r)


def aggregate(rows: list[dict], order: list[str] | None = None) -> dict[str, dict]:
  """variant -> {n, mean, std, se (mean of the runs' s.e.), seeds, sizes, times}."""
  by = {}
  for r in rows:
    by.setdefault(r["variant"], []).append(r)
  names = [v for v in (order or []) if v in by] + sorted(v for v in by if v not in (order or []))
  out = {}
  for v in names:
    runs = sorted(by[v], key=lambda r: r["seed"])
    loss = np.array([r["eval_loss"] for r in runs], np.float64)
    out[v] = {"n": len(runs), "mean": float(loss.mean()),
              "std": float(loss.std(ddof=1)) if len(runs) > 1 else float("nan"),
              "se": float(np.mean([r["eval_loss_se"] for r in runs])),
              "seeds": [r["seed"] for r in runs], "losses": loss.tolist(),
              **{k: runs[0][k] for k in ("total_params", "activated_params",
                                          "flops_per_token", "tokens_seen", "steps")},
              "train_s": float(np.mean([r["train_s"] for r in runs])),
              "documents": _mean_documents(runs)}
  return out


def _mean_documents(runs: list[dict]):
  """(loss sums averaged over seeds [D], tokens [D], eval set) or None."""
  docs = [r.get("documents") for r in runs]
  if any(d is None for d in docs) or len({r.get("eval_set") for r in runs}) != 1:
    return None
  return (np.mean([d["loss_sum"] for d in docs], axis=0), np.asarray(docs[0]["tokens"]),
          runs[0]["eval_set"])


def gap_se(a: dict, b: dict) -> float:
  """Standard error of the gap between two variants' mean losses from the
  evaluation set alone (paired: the same documents; documents as the units);
  nan when the per-document results are missing or from different sets."""
  if a.get("documents") is None or b.get("documents") is None:
    return float("nan")
  (la, n, fa), (lb, _, fb) = a["documents"], b["documents"]
  if fa != fb:
    return float("nan")
  return mean_and_se(la - lb, n)[1]


def pooled_std(a: dict, b: dict) -> float:
  return math.sqrt((a["std"] ** 2 + b["std"] ** 2) / 2)


def comparisons(stats: dict[str, dict], orderings=None) -> list[dict]:
  """Consecutive pairs of each paper ordering: the gap (higher - lower in the
  paper's order; positive = agrees with the paper) against 2 pooled seed stds."""
  out = []
  for name, order in (orderings or ORDERINGS).items():
    present = [v for v in order if v in stats]
    for hi, lo in zip(present, present[1:]):
      gap = stats[hi]["mean"] - stats[lo]["mean"]
      noise = 2 * pooled_std(stats[hi], stats[lo])
      out.append({"ordering": name, "higher": hi, "lower": lo, "gap": gap,
                  "two_std": noise, "gap_se": gap_se(stats[hi], stats[lo]), "agrees": gap > 0,
                  "exceeds_noise": bool(abs(gap) > noise) if math.isfinite(noise) else False})
  return out


def _fmt_params(n: float) -> str:
  return f"{n / 1e6:.2f}M"


def markdown(stats: dict[str, dict], comps: list[dict]) -> str:
  """The results table (mean +- std over seeds) and the ordering checks."""
  lines = ["| variant | paper | seeds | total params | activated | GFLOPs/token | tokens "
           "| eval loss (mean +- std) | s.e. (eval set) | paper Pile loss | train min/run |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for v, s in stats.items():
    name, paper = PAPER.get(v, (v, None))
    lines.append(
        f"| {v} | {name} | {s['n']} | {_fmt_params(s['total_params'])} "
        f"| {_fmt_params(s['activated_params'])} | {s['flops_per_token'] / 1e9:.4f} "
        f"| {s['tokens_seen'] / 1e6:.1f}M | {s['mean']:.4f} +- {s['std']:.4f} "
        f"| {s['se']:.4f} | {'' if paper is None else f'{paper:.3f}'} "
        f"| {s['train_s'] / 60:.1f} |")
  if comps:
    lines += ["", "| ordering | pair (paper: first is worse) | gap | 2 x pooled seed std "
              "| s.e. of gap (eval set, paired) | agrees with the paper | gap > 2 std |",
              "|---|---|---:|---:|---:|---|---|"]
    for c in comps:
      lines.append(f"| {c['ordering']} | {c['higher']} > {c['lower']} | {c['gap']:+.4f} "
                   f"| {c['two_std']:.4f} | {c['gap_se']:.4f} | {'yes' if c['agrees'] else 'no'} "
                   f"| {'yes' if c['exceeds_noise'] else 'no'} |")
  return "\n".join(lines) + "\n"


def write_report(rows: list[dict], out_dir: str, order: list[str] | None = None) -> dict:
  """results.csv, results.md, loss_curves.png, loss_vs_flops.png in `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  stats = aggregate(rows, order)
  comps = comparisons(stats)
  paths = {"csv": os.path.join(out_dir, "results.csv"),
           "table": os.path.join(out_dir, "results.md")}
  write_csv(rows, paths["csv"])
  with open(paths["table"], "w") as f:
    f.write(markdown(stats, comps))
  from dsmoe.analysis import plots  # pylint: disable=g-import-not-at-top
  paths["curves"] = plots.loss_curves(rows, list(stats), os.path.join(out_dir, "loss_curves.png"))
  paths["flops"] = plots.loss_vs_flops(stats, os.path.join(out_dir, "loss_vs_flops.png"))
  return paths


BEGIN, END = "<!-- ablation-results:begin -->", "<!-- ablation-results:end -->"


def update_doc(path: str, table: str) -> None:
  """Replaces the text between the BEGIN and END markers of `path` with `table`.

  Raises UserError when the file lacks the markers.
  """
  with open(path) as f:
    text = f.read()
  if BEGIN not in text or END not in text.split(BEGIN, 1)[1]:
    raise UserError(f"{path} has no '{BEGIN}' ... '{END}' section to update")
  head, rest = text.split(BEGIN, 1)
  tail = rest.split(END, 1)[1]
  with open(path, "w") as f:
    f.write(f"{head}{BEGIN}\n{table}{END}{tail}")


def experts_markdown(results: dict[str, dict]) -> str:
  """Tables of scripts/analyze_experts.py results (name -> experts.analyze)."""
  lines = ["| model | loss as trained | (a) loss increase, r of N' routed experts disabled "
           "| (c) shared off, top-k + 1 | (e) mean pairwise cosine per layer |",
           "|---|---:|---|---|---|"]
  for name, r in results.items():
    base = r["baseline"]["loss"]
    drops = ", ".join(f"{p['disabled']}/{r['model']['routed']}: {p['loss'] - base:+.3f}"
                      for p in r.get("disable_top") or [] if p["disabled"])
    swap = r.get("swap_shared")
    swap_s = (f"{swap['trained']['loss']:.3f} -> {swap['swapped']['loss']:.3f}"
              if swap else "no shared expert")
    red = ", ".join(f"{layer['mean_pairwise_cosine']:.3f}" for layer in r["redundancy"])
    lines.append(f"| {name} | {base:.4f} +- {r['baseline']['se']:.4f} | {drops} "
                 f"| {swap_s} | {red} |")
  lines += ["", "| model | (b) loss with top-k routed experts at evaluation |", "|---|---|"]
  for name, r in results.items():
    ks = ", ".join(f"k={p['top_k']}: {p['loss']:.3f}" for p in r.get("vary_top_k") or [])
    lines.append(f"| {name} (trained k={r['model']['top_k']}) | {ks} |")
  return "\n".join(lines) + "\n"
