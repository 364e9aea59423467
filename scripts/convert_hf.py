"""Convert DeepSeekMoE v1 checkpoints between the HuggingFace layout and dsmoe.

    # HF folder (config.json + *.safetensors [+ tokenizer]) -> dsmoe model folder
    python scripts/convert_hf.py deepseek-moe-16b-base ckpt/dsmoe-16b [--dtype bfloat16]

    # and back: a dsmoe model folder, or a training run's latest params -> HF folder
    python scripts/convert_hf.py --reverse ckpt/dsmoe-16b ckpt/hf-16b
    python scripts/convert_hf.py --reverse --config configs/hf.py:ckpt/dsmoe-16b \
        --workdir runs/finetune ckpt/hf-finetuned [--step 500]

The output folder must not exist; it appears only when complete. Memory:
about the largest tensor (one shard of --max_shard_gb when exporting).
See docs/HF.md. Errors end with one line `error: ...`.
"""

from absl import flags, logging
from ml_collections import config_flags

import dsmoe
from dsmoe import cli
from dsmoe.errors import ConfigError

config_flags.DEFINE_config_file("config", None, "With --reverse --workdir: the run's config "
                                "(default: the workdir's config.json).",
                                lock_config=True)
flags.DEFINE_boolean("reverse", False, "dsmoe -> HF instead of HF -> dsmoe.")
flags.DEFINE_string("workdir", None, "With --reverse: export this training run's params.")
flags.DEFINE_integer("step", None, "With --workdir: the checkpoint step (default: latest).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                  "Stored dtype (default: the source's, float16 -> float32).")
flags.DEFINE_float("max_shard_gb", 2.0, "With --reverse: the largest safetensors shard (GiB).")
FLAGS = flags.FLAGS


def run(args: list[str]) -> str:
  from dsmoe.interop import hf
  if FLAGS.reverse and FLAGS.workdir:
    if len(args) != 1:
      raise ConfigError("usage: --reverse --workdir RUN [--config CONFIG] OUT_HF_DIR")
    from dsmoe import run_config
    config = run_config.config_for(FLAGS.config, FLAGS.workdir)
    return hf.export_run(dsmoe.resolve(config), FLAGS.workdir, args[0], step=FLAGS.step,
                         dtype=FLAGS.dtype, max_shard_bytes=int(FLAGS.max_shard_gb * 2**30))
  if len(args) != 2:
    raise ConfigError("usage: convert_hf.py [--reverse] SRC_DIR OUT_DIR (see --help)")
  if FLAGS.reverse:
    return hf.export(args[0], args[1], dtype=FLAGS.dtype,
                     max_shard_bytes=int(FLAGS.max_shard_gb * 2**30))
  return hf.convert(args[0], args[1], dtype=FLAGS.dtype)


def main(argv):
  logging.set_verbosity(logging.ERROR)  # Orbax logs every array at WARNING/INFO
  print(f"written: {run(argv[1:])}")


if __name__ == "__main__":
  cli.run(main)
