"""DeepSeekMoE 2B validation model (paper section 4, Table 1): about 2.0B total /
0.3B activated parameters.

9 layers, d_model 1280, 10 heads of 128, every layer MoE. Paper form: N=16
coarse experts, m=4, K=2, K_s=1: 1 shared + 63 routed experts, top-7.
The 'standard FFN' size is not printed in the paper; we take the 16B model's
ratio (1408 x 4 = 5632 = 2.75 d_model) and so ffn_hidden = 2.75 x 1280 = 3520,
expert hidden 880. Then total expert parameters are 16 standard FFNs and
activated ones 2, as the paper states. Embeddings (BPE 8K, untied) are counted
in both totals: 2.03B total, 0.32B activated.

Training needs a TPU/GPU pod: 25,000 steps of 2048 x 2048 tokens, LR 1.08e-3.
`:runlocal` gives a CPU-size variant with the same structure.
"""

from dsmoe.config import base_config


def get_config(arg=None):
  c = base_config()
  m = c.model
  m.vocab_size = 8192
  m.d_model, m.num_layers, m.num_heads, m.head_dim = 1280, 9, 10, 128
  m.dense_hidden = 3520
  m.first_k_dense_replace = 0
  m.moe.fine_grained.update(dict(N=16, m=4, K=2, K_s=1, ffn_hidden=3520))
  m.moe.aux_loss_alpha = 0.01
  m.moe.seq_aux = False
  m.init_std = 0.006
  c.data.seq_len = 2048
  c.train.batch_size = 2048
  c.train.steps = 25_000
  c.train.learning_rate = 1.08e-3
  c.train.warmup_steps = 2000
  if arg == "runlocal":
    m.d_model, m.num_layers, m.num_heads, m.head_dim = 128, 2, 2, 64
    m.moe.fine_grained.ffn_hidden = m.dense_hidden = 352
    m.vocab_size = 256
    c.data.tokenizer = "bytes"
    c.data.seq_len, c.train.batch_size, c.train.steps = 128, 8, 50
    c.train.warmup_steps = 10
  return c
