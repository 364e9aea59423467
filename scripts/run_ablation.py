"""Trains the paper's baselines and ablations (configs/ablation.py) one after
another and prints a table of validation loss against parameters and FLOPs.

    python scripts/run_ablation.py --workdir runs/ablation [--steps 300] \
        [--variants dense,hash,switch,gshard,shared,m2,deepseekmoe] [--json FILE]

Each variant trains in <workdir>/<variant> (and resumes there if re-run).
"""

import json
import pathlib

from absl import app, flags, logging

flags.DEFINE_string("workdir", "runs/ablation", "One subfolder per variant.")
flags.DEFINE_string("variants", "dense,hash,switch,gshard,shared,m2,deepseekmoe",
                    "Comma-separated variants of configs/ablation.py.")
flags.DEFINE_integer("steps", 0, "Override train.steps (0: the config's).")
flags.DEFINE_integer("seed", 0, "train.seed.")
flags.DEFINE_string("json", "", "Write the table as JSON here.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import dsmoe
  from dsmoe.train import train_and_evaluate
  rows = []
  for variant in filter(None, FLAGS.variants.split(",")):
    config = dsmoe.load("ablation", variant)
    config.train.seed = FLAGS.seed
    if FLAGS.steps:
      config.train.steps = FLAGS.steps
    counts = dsmoe.count_params(config)
    result = train_and_evaluate(config, str(pathlib.Path(FLAGS.workdir) / variant))
    rows.append({"variant": variant, "total_params": counts["total"],
                 "activated_params": counts["activated"],
                 "gflops_per_token": dsmoe.flops_per_token(config) / 1e9,
                 "eval_loss": result["eval_loss"], "steps": config.train.steps})
  print("\n| variant | total params | activated | GFLOPs/token | eval loss |")
  print("|---|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['variant']} | {r['total_params'] / 1e6:.2f}M | {r['activated_params'] / 1e6:.2f}M "
          f"| {r['gflops_per_token']:.4f} | {r['eval_loss']:.4f} |")
  if FLAGS.json:
    pathlib.Path(FLAGS.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  app.run(main)
