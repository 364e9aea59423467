"""Validation loss and perplexity of a checkpoint; writes <workdir>/eval_step<N>.json.

    python scripts/evaluate.py --config configs/tiny.py --workdir runs/tiny [--step 300]
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file the run was trained with.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Workdir of the training run.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from dsmoe.train.checkpoint import CheckpointError
  from dsmoe.train.evaluation import evaluate_checkpoint
  try:
    result = evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.step)
  except (CheckpointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(json.dumps({k: v for k, v in result.items() if k != "path"}))
  print(f"written to {result['path']}")


if __name__ == "__main__":
  app.run(main)
