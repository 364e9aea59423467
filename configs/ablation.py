"""The paper's baselines and ablations as settings of one model.

`--config configs/ablation.py:VARIANT` (or `dsmoe.load("ablation:VARIANT")`).
Every variant is a CPU-size copy of the 2B validation model: 4 layers,
d_model 128, 4 heads, every layer MoE, the standard FFN hidden
352 = 2.75 d_model, SentencePiece BPE 8K (the paper's vocabulary size).
Sizes in the paper's form (N coarse experts, m segments, K active, K_s
shared); "FFN" below is one standard FFN of 3 x 128 x 352 parameters.

Table 1 (expert parameters: 16 FFNs in total)
  dense        a dense FFN of the standard size             (1 FFN active)
  hash         Hash Layer: a fixed hash of the token id picks 1 of 16
  switch       Switch: top-1 of 16                           (1 FFN active)
  gshard       GShard: top-2 of 16                           (2 FFNs active)
  deepseekmoe  1 shared + top-7 of 63, experts of 1/4 FFN    (2 FFNs active)

Figure 3 (16 FFNs in total, 2 active): gshard -> shared (1 shared + top-1
of 15) -> m2 (1 shared + top-3 of 31, 1/2 FFN experts) -> deepseekmoe (m=4).

Shared:routed ratio (section 4.4; 64 experts of 1/4 FFN, 8 active, so the
same parameters and FLOPs): deepseekmoe (1 shared + top-7 of 63), ks2
(2 + top-6 of 62), ks4 (4 + top-4 of 60).

Table 2 upper bounds: gshard_x1.5 (top-2 of 16 experts of 1.5 FFN: 24 FFNs
in total, 3 active) and dense_x16 (one dense FFN 16x the standard size).

All variants train the same way (`train.steps` is the budget; change it, or
anything else, with `--config.*` flags, e.g. through
`scripts/run_ablation.py`). At the end of a run the whole held-out
evaluation set (>= 250K tokens from many held-out files, docs/RESULTS.md) is
scored; during training every `train.eval_every` steps a fixed subset of it.

    python scripts/train.py --config configs/ablation.py:deepseekmoe --workdir runs/abl_dsmoe
    python scripts/run_ablation.py --workdir runs/ablation --variants dense,gshard,deepseekmoe --seeds 0,1,2

The paper (2B, 100B tokens) orders the Pile losses Dense > Hash > Switch >
GShard > DeepSeekMoE, and GShard > +shared > m=2 > m=4.
"""

from dsmoe.config import base_config
from dsmoe.errors import ConfigError

D_MODEL = 128
FFN = 352  # the standard FFN: 2.75 x d_model (the 16B model's ratio)

# name: (router, N, m, K, K_s, expert size in FFNs)
MOE_VARIANTS = {
    "hash": ("hash", 16, 1, 1, 0, 1.0),
    "switch": ("topk", 16, 1, 1, 0, 1.0),
    "gshard": ("topk", 16, 1, 2, 0, 1.0),
    "shared": ("topk", 16, 1, 2, 1, 1.0),
    "m2": ("topk", 16, 2, 2, 1, 1.0),
    "deepseekmoe": ("topk", 16, 4, 2, 1, 1.0),
    "ks2": ("topk", 16, 4, 2, 2, 1.0),
    "ks4": ("topk", 16, 4, 2, 4, 1.0),
    "gshard_x1.5": ("topk", 16, 1, 2, 0, 1.5),
}
# name: dense FFN hidden in FFNs
DENSE_VARIANTS = {"dense": 1, "dense_x16": 16}
VARIANTS = (*DENSE_VARIANTS, *MOE_VARIANTS)


def get_config(arg=None):
  variant = arg or "deepseekmoe"
  if variant not in VARIANTS:
    raise ConfigError(f"configs/ablation.py: unknown variant {variant!r}; "
                     f"expected one of {list(VARIANTS)}")
  c = base_config()
  m = c.model
  m.vocab_size = 8192  # = data.vocab_size
  m.d_model, m.num_layers, m.num_heads = D_MODEL, 4, 4
  m.dense_hidden = FFN
  m.first_k_dense_replace = 0
  m.init_std = 0.02  # the paper's 0.006 is tuned for d_model >= 1280
  m.moe.aux_loss_alpha = 0.01  # the 2B runs' a1
  m.moe.seq_aux = False
  if variant in DENSE_VARIANTS:
    m.dense_hidden = FFN * DENSE_VARIANTS[variant]
    m.first_k_dense_replace = m.num_layers  # no MoE layer at all
    # Unused by a model without MoE layers, but the schema needs valid sizes.
    m.moe.fine_grained.update(dict(N=1, m=1, K=1, K_s=0, ffn_hidden=FFN))
  else:
    router, n, seg, k, ks, size = MOE_VARIANTS[variant]
    m.moe.router = router
    m.moe.fine_grained.update(dict(N=n, m=seg, K=k, K_s=ks, ffn_hidden=int(FFN * size)))
  c.data.seq_len = 128
  c.data.tokenizer = "sentencepiece"
  c.data.vocab_size = 8192
  c.data.eval_tokens = 262_144  # the held-out evaluation set
  c.train.steps = 1000  # 2M tokens: what fits 21 runs on 2 shared CPU cores
  c.train.batch_size = 16
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 50
  c.train.eval_every = 100
  c.train.eval_batches = 8  # the fixed subset: 16K tokens from about 50 files
  c.train.eval_full_at_end = True
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 2
  return c
