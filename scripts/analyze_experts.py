"""Expert-specialisation analyses of trained checkpoints (paper section 4.5).

    python scripts/analyze_experts.py --workdir runs/ablation/deepseekmoe/seed0
    python scripts/analyze_experts.py \
        --workdir runs/ablation/deepseekmoe/seed0,runs/ablation/gshard/seed0 --out runs/experts

For each run: (a) the r best routed experts of each token disabled, for a
sweep of ratios (Figure 4); (b) the number of activated routed experts varied
at evaluation (Figure 5); (c) the shared expert disabled and one more routed
expert activated; (d) per-layer expert-load heatmap; (e) redundancy between
experts' outputs. Writes <out>/experts.json, experts.md (tables),
experts.png (a, b, c, e; every run on the same axes) and expert_load.png
(d); <out> defaults to <first workdir>/analysis.

The config is read from <workdir>/config.json (written by
scripts/run_ablation.py) unless --config is given (the file the run was
trained with, and its --config.* overrides). Errors end with one line
`error: ...`.
"""

import json
import os

from absl import flags, logging
from ml_collections import config_flags

import dsmoe
from dsmoe import cli
from dsmoe.errors import ConfigError

config_flags.DEFINE_config_file("config", None, "Config the runs were trained with "
                                "(default: each workdir's config.json).", lock_config=True)
flags.DEFINE_list("workdir", None, "Training workdir(s) with checkpoints.")
flags.DEFINE_list("names", None, "A label per workdir (default: <variant>/<seed> "
                  "folder names).")
flags.DEFINE_string("out", None, "Output folder (default: <first workdir>/analysis).")
flags.DEFINE_integer("eval_batches", 0, "Evaluation batches per score (0: the whole "
                     "evaluation set).")
flags.DEFINE_list("ratios", "0,0.0625,0.125,0.1875,0.25", "(a) ratios of routed experts disabled.")
flags.DEFINE_integer("redundancy_tokens", 2048, "(e) tokens the expert outputs are compared on.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def _spec(workdir):
  """The resolved config of the run in `workdir`."""
  from dsmoe import run_config
  return dsmoe.resolve(run_config.config_for(FLAGS.config, workdir))


def _name(workdir: str) -> str:
  parts = os.path.normpath(os.path.abspath(workdir)).split(os.sep)
  return "/".join(parts[-2:])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from dsmoe.analysis import experts, plots, report
  names = FLAGS.names or [_name(w) for w in FLAGS.workdir]
  if len(names) != len(FLAGS.workdir):
    raise ConfigError("--names needs one label per --workdir")
  out = FLAGS.out or os.path.join(FLAGS.workdir[0], "analysis")
  results = {}
  try:
    ratios = [float(r) for r in FLAGS.ratios]
  except ValueError:
    raise ConfigError(f"--ratios={','.join(FLAGS.ratios)}: expected numbers") from None
  for name, workdir in zip(names, FLAGS.workdir):
    trained = experts.load_trained(_spec(workdir), workdir,
                                   num_batches=FLAGS.eval_batches or None)
    results[name] = experts.analyze(trained, ratios=ratios,
                                    redundancy_tokens=FLAGS.redundancy_tokens)
    results[name]["workdir"] = os.path.abspath(workdir)
    print(f"{name}: evaluation loss {results[name]['baseline']['loss']:.4f}", flush=True)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "experts.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(out, "experts.md"), "w") as f:
    f.write(report.experts_markdown(results))
  paths = [os.path.join(out, "experts.json"), os.path.join(out, "experts.md"),
           plots.expert_analyses(results, os.path.join(out, "experts.png")),
           plots.expert_load(results, os.path.join(out, "expert_load.png"))]
  print("written: " + ", ".join(paths))


if __name__ == "__main__":
  cli.run(main)
