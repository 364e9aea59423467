"""Train a DeepSeekMoE model; resumes from the latest checkpoint in --workdir.

    python scripts/train.py --config configs/tiny.py --workdir runs/tiny \
        [--config.train.steps=100] [--config.model.moe.impl=dense] [--debug]

Multi-process (see docs/TRAINING.md): --coordinator_address, --num_processes,
--process_id, or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment variables, or --distributed on a Cloud TPU pod.
Errors end with one line `error: ...` (exit status 1, or 2 when the flags
cannot be parsed); --debug or DSMOE_DEBUG=1 also prints the traceback.
"""

from absl import flags, logging
from ml_collections import config_flags

import dsmoe
from dsmoe import cli

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and plots go here.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Number of processes.")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.DEFINE_boolean("distributed", False, "jax.distributed.initialize() with "
                     "auto-detection (Cloud TPU pods, SLURM).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  from dsmoe.train import distributed, train_and_evaluate
  distributed.maybe_initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id, force=FLAGS.distributed)
  spec = dsmoe.resolve(FLAGS.config)  # validated once (after JAX's distributed start:
  # resolving reads the platform)
  train_and_evaluate(spec, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main)
