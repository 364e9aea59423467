"""Fine-tune, evaluate or sample a converted DeepSeekMoE v1 model (docs/HF.md).

The argument is a dsmoe model folder written by scripts/convert_hf.py:

    python scripts/convert_hf.py deepseek-moe-16b-base ckpt/dsmoe-16b
    python scripts/train.py --config configs/hf.py:ckpt/dsmoe-16b --workdir runs/ft \
        --config.data.text_dir=my_texts --config.model.dtype=bfloat16
    python scripts/evaluate.py --config configs/hf.py:ckpt/dsmoe-16b --workdir runs/ft
    python scripts/generate.py --config configs/hf.py:ckpt/dsmoe-16b --prompt "Hello"

* model: every key from the folder's config.json (dsmoe.interop.hf_config);
  float32 parameters (master weights; restoring bfloat16 casts exactly) and
  float32 compute (set model.dtype=bfloat16 on accelerators);
* train.init_from: the folder's params, so a run starts from the released
  weights with a fresh optimizer (a run that has checkpoints resumes from
  them instead);
* data: the folder's tokenizer.json (data.tokenizer="hf"), documents start
  with BOS as in DeepSeek's pretraining data; without a tokenizer.json,
  byte tokens (only sensible for tests);
* training: fine-tuning settings (constant learning rate 1e-5 after 100
  warmup steps, AdamW as the paper); override any key as usual.
"""

import os

from dsmoe.data.hf_tokenizer import HFTokenizer
from dsmoe.errors import ConfigError
from dsmoe.interop.hf import model_config


def get_config(arg=None):
  if not arg:
    raise ConfigError("configs/hf.py needs a model folder: --config configs/hf.py:PATH "
                     "(written by scripts/convert_hf.py)")
  c = model_config(arg, dtype="float32")
  c.train.init_from = os.path.abspath(arg)
  tokenizer = os.path.join(arg, "tokenizer.json")
  if os.path.isfile(tokenizer):
    c.data.tokenizer, c.data.tokenizer_path = "hf", os.path.abspath(tokenizer)
    c.data.add_bos = HFTokenizer(tokenizer).bos_id is not None
  else:
    c.data.tokenizer = "bytes"
  c.train.learning_rate = 1e-5
  c.train.schedule = "constant"
  c.train.warmup_steps = 100
  return c
