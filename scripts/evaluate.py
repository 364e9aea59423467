"""Validation loss and perplexity of a checkpoint; writes <workdir>/eval_step<N>.json.

    python scripts/evaluate.py --workdir runs/tiny [--config configs/tiny.py] \
        [--step 300] [--output result.json] [--debug]

The config is the workdir's config.json (the trainer writes it), or
--config (its differences from config.json are reported).

The result is printed as one JSON line and written to --output (default
<workdir>/eval_step<N>.json), whose folder is checked to be writable before
anything is computed. Errors end with one line `error: ...`.
"""

import json

from absl import flags, logging
from ml_collections import config_flags

import dsmoe
from dsmoe import cli

config_flags.DEFINE_config_file("config", None, "Config file the run was trained with "
                                "(default: the workdir's config.json).", lock_config=True)
flags.DEFINE_string("workdir", None, "Workdir of the training run.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("output", None, "Where to write the result JSON (default: "
                    "<workdir>/eval_step<N>.json).")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from dsmoe import run_config
  from dsmoe.train.evaluation import evaluate_checkpoint
  config = run_config.config_for(FLAGS.config, FLAGS.workdir)
  result = evaluate_checkpoint(dsmoe.resolve(config), FLAGS.workdir, FLAGS.step,
                               output=FLAGS.output)
  print(json.dumps({k: v for k, v in result.items() if k != "path"}), flush=True)
  print(f"written to {result['path']}")


if __name__ == "__main__":
  cli.run(main)
