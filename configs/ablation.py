"""The paper's baselines and ablations as settings of one model (Table 1, Figure 3).

Variants (`--config configs/ablation.py:VARIANT`), all at a CPU-size version
of the 2B validation model (every layer MoE, standard FFN = 2.75 d_model):

  dense        a dense FFN of the standard size (Table 1 'Dense')
  hash         Hash Layer: a fixed hash of the token id picks 1 of 16 experts
  switch       Switch: top-1 of 16 experts, no shared expert
  gshard       GShard: top-2 of 16 experts, no shared expert
  shared       + shared expert isolation: 1 shared + top-1 of 15 (Figure 3)
  m2           + fine-grained m=2: 1 shared + top-3 of 31 (Figure 3)
  deepseekmoe  m=4: 1 shared + top-7 of 63, expert hidden 1/4 (Table 1, Figure 3 'm=4')

Every MoE variant has the same total expert parameters (16 standard FFNs);
gshard / shared / m2 / deepseekmoe also have the same activated ones (2).

    python scripts/train.py --config configs/ablation.py:deepseekmoe --workdir runs/abl_dsmoe

On 2 CPU cores each variant takes a few minutes. The paper (2B, 100B tokens)
orders the Pile losses Dense > Hash > Switch > GShard > DeepSeekMoE and
GShard > +shared > m=2 > m=4.
"""

from dsmoe.config import base_config

VARIANTS = {
    # name: (router, N, m, K, K_s)
    "hash": ("hash", 16, 1, 1, 0),
    "switch": ("topk", 16, 1, 1, 0),
    "gshard": ("topk", 16, 1, 2, 0),
    "shared": ("topk", 16, 1, 2, 1),
    "m2": ("topk", 16, 2, 2, 1),
    "deepseekmoe": ("topk", 16, 4, 2, 1),
}


def get_config(arg=None):
  variant = arg or "deepseekmoe"
  if variant not in VARIANTS and variant != "dense":
    raise ValueError(f"configs/ablation.py: unknown variant {variant!r}; "
                     f"expected one of {['dense', *VARIANTS]}")
  c = base_config()
  m = c.model
  m.vocab_size = 256
  m.d_model, m.num_layers, m.num_heads = 128, 4, 4
  ffn = 352  # 2.75 x d_model, the standard FFN
  m.dense_hidden = ffn
  m.first_k_dense_replace = 0
  m.init_std = 0.02
  m.moe.aux_loss_alpha = 0.01
  m.moe.seq_aux = False
  if variant == "dense":
    m.first_k_dense_replace = m.num_layers  # no MoE layer at all
    m.moe.fine_grained.update(dict(N=1, m=1, K=1, K_s=0, ffn_hidden=ffn))
  else:
    router, n, seg, k, ks = VARIANTS[variant]
    m.moe.router = router
    m.moe.fine_grained.update(dict(N=n, m=seg, K=k, K_s=ks, ffn_hidden=ffn))
  c.data.seq_len = 128
  c.data.tokenizer = "bytes"
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 30
  return c
