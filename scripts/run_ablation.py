"""Trains a grid of ablation variants x seeds, resumably, and writes the results.

    python scripts/run_ablation.py --workdir runs/ablation \
        --variants dense,hash,switch,gshard,shared,m2,deepseekmoe --seeds 0,1,2 \
        [--steps 2000] [--config.train.batch_size=32 ...] [--out docs/results]
    python scripts/run_ablation.py --collect_only --workdir runs/ablation --out docs/results \
        --update_doc docs/RESULTS.md

Each run trains in <workdir>/<variant>/seed<k>. A finished run (its run.json
exists) is skipped; an interrupted one resumes from its latest checkpoint.
After every finished run, <out> (default: the workdir) gets results.csv,
results.md (mean +- std over seeds, the paper's orderings checked against
twice the seed std), loss_curves.png and loss_vs_flops.png; with --out,
raw/<variant>/seed<k>/run.json copies of the raw results too.

Variants come from --config (default: the shipped configs/ablation.py; give
another file with the same variant names to change the base model), and
every --config.<key>=<value> override applies to every variant, e.g. the
paper's 2B validation scale on a pod:
    --config.model.d_model=1280 --config.model.num_layers=9 ...
Errors end with one line `error: ...`.
"""

import os
import shutil

from absl import flags, logging
from ml_collections import config_flags

from dsmoe import cli
from dsmoe.config import config_file as shipped_config_file
from dsmoe.errors import ConfigError

DEFAULT_CONFIG = shipped_config_file("ablation")
config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Ablation config file "
                                "(get_config(variant)); its --config.* overrides "
                                "apply to every variant.", lock_config=True)
flags.DEFINE_string("workdir", None, "One subfolder per variant and seed.")
flags.DEFINE_list("variants", "dense,hash,switch,gshard,shared,m2,deepseekmoe",
                  "Variants of the config file.")
flags.DEFINE_list("seeds", "0,1,2", "train.seed values.")
flags.DEFINE_integer("steps", 0, "train.steps of every run (0: the config's).")
flags.DEFINE_string("out", None, "Where the tables and plots go (default: --workdir).")
flags.DEFINE_boolean("collect_only", False, "Only rewrite the tables and plots "
                     "from the finished runs under --workdir.")
flags.DEFINE_string("update_doc", None, "Also put the table into this markdown file "
                    "(between its ablation-results markers, e.g. docs/RESULTS.md).")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def _collect(order):
  from dsmoe.analysis import ablation, report
  rows = ablation.read_rows(FLAGS.workdir)
  if not rows:
    print(f"no finished runs under {FLAGS.workdir}")
    return
  out = FLAGS.out or FLAGS.workdir
  if FLAGS.out and os.path.abspath(FLAGS.out) != os.path.abspath(FLAGS.workdir):
    for r in rows:
      dst = os.path.join(out, "raw", r["variant"], f"seed{r['seed']}")
      os.makedirs(dst, exist_ok=True)
      src = os.path.join(FLAGS.workdir, r["variant"], f"seed{r['seed']}", ablation.RUN_FILE)
      if os.path.exists(src):
        shutil.copyfile(src, os.path.join(dst, ablation.RUN_FILE))
  paths = report.write_report(rows, out, order)
  if FLAGS.update_doc:
    with open(paths["table"]) as f:
      report.update_doc(FLAGS.update_doc, f.read())
    paths["doc"] = FLAGS.update_doc
  print(f"{len(rows)} finished runs -> " + ", ".join(paths.values()), flush=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from dsmoe.analysis import ablation
  variants = [v for v in FLAGS.variants if v]
  if FLAGS.collect_only:
    return _collect(variants)
  config_file = config_flags.get_config_filename(FLAGS["config"]).split(":")[0]
  overrides = dict(config_flags.get_override_values(FLAGS["config"]))
  if FLAGS.steps:
    overrides["train.steps"] = FLAGS.steps
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    raise ConfigError(f"--seeds={','.join(FLAGS.seeds)}: expected integers") from None
  cells = ablation.grid(variants, seeds)
  for v in variants:  # refuse an unknown variant or override before training anything
    ablation.variant_config(config_file, v, seeds[0], overrides)
  ablation.run_grid(cells, FLAGS.workdir, lambda c: ablation.variant_config(
      config_file, c.variant, c.seed, overrides), after_each=lambda: _collect(variants))
  _collect(variants)


if __name__ == "__main__":
  cli.run(main)
