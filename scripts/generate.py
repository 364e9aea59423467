"""Sample text from a model: a HuggingFace/dsmoe model folder or a training run.

    python scripts/generate.py --hf deepseek-moe-16b-base --dtype bfloat16 \
        --prompt "The capital of France is" --max_new_tokens 32
    python scripts/generate.py --config configs/tiny.py --workdir runs/tiny \
        --prompt "def main(" --temperature 0.8 --top_p 0.95
    python scripts/generate.py --config configs/hf.py:ckpt/dsmoe-16b --prompt "Hi"

Several --prompt flags decode as one batch. Greedy by default (--temperature
0); stops at the tokenizer's EOS (or --stop_token ids). See docs/HF.md.
Errors end with one line `error: ...`.
"""

import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

import dsmoe
from dsmoe import cli
from dsmoe.errors import ConfigError

config_flags.DEFINE_config_file("config", None, "Config of the run (default with --workdir: "
                                "its config.json), or configs/hf.py:MODEL_DIR.", lock_config=True)
flags.DEFINE_string("workdir", None, "Training run whose latest checkpoint to use.")
flags.DEFINE_integer("step", None, "With --workdir: the checkpoint step (default: latest).")
flags.DEFINE_string("hf", None, "An HF folder (config.json, *.safetensors, tokenizer.json) "
                    "or a dsmoe model folder from scripts/convert_hf.py.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "With --hf: params and compute.")
flags.DEFINE_multi_string("prompt", None, "A prompt (repeat for a batch).")
flags.DEFINE_integer("max_new_tokens", 64, "New tokens per prompt at most.")
flags.DEFINE_integer("max_len", 0, "Prompt + new tokens at most (0: no limit).")
flags.DEFINE_float("temperature", 0.0, "0: greedy; else sample at this temperature.")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_multi_integer("stop_token", None, "Stop ids (default: the tokenizer's EOS).")
flags.DEFINE_boolean("bos", True, "Start each prompt with the tokenizer's BOS token.")
flags.mark_flags_as_required(["prompt"])
FLAGS = flags.FLAGS


def _model():
  if FLAGS.hf:
    from dsmoe.interop.hf import load_text_model
    return load_text_model(FLAGS.hf, FLAGS.dtype)
  if FLAGS.config is None and FLAGS.workdir is None:
    raise ConfigError("give --hf MODEL_DIR, or --workdir of a training run (its config.json, "
                      "or --config)")
  from dsmoe import run_config
  from dsmoe.generate import TextModel
  config = run_config.config_for(FLAGS.config, FLAGS.workdir)
  return TextModel.from_run(dsmoe.resolve(config), FLAGS.workdir, FLAGS.step)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.ERROR)
  from dsmoe.generate import Sampling
  model = _model()
  kwargs = dict(sampling=Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p),
                seed=FLAGS.seed, max_len=FLAGS.max_len or None)
  if FLAGS.stop_token:
    kwargs["stop_tokens"] = tuple(FLAGS.stop_token)
  start = time.perf_counter()
  texts, out = model.complete(FLAGS.prompt, max_new_tokens=FLAGS.max_new_tokens,
                              add_bos=FLAGS.bos, **kwargs)
  seconds = time.perf_counter() - start
  for prompt, text, stopped in zip(FLAGS.prompt, texts, out.stopped):
    print(f"{prompt}{text}" + ("" if stopped else " [...]"))
    print("-" * 40)
  n = sum(len(t) for t in out.tokens)
  print(f"{n} new tokens in {seconds:.2f} s (compilation included)", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
