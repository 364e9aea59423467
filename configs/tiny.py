"""Tiny DeepSeekMoE: the default `make train` model (2 CPU cores, a few minutes).

4 layers, d_model 128, 4 heads; layer 0 dense, layers 1-3 MoE with the paper's
fine-grained form N=8 coarse experts, m=4, K=2, K_s=2 shared, standard FFN
hidden 256: 2 shared + 30 routed experts of hidden 64, top-6 routed.
Data: the Python standard library source (the default corpus, built once into
data_cache/tfds), SentencePiece BPE with 2048 pieces (trained in ~1 s, cached).

    python scripts/train.py --config configs/tiny.py --workdir runs/tiny

Expected on 2 CPU cores: 300 steps in about 2 minutes on an idle machine
(`make train`); the cross-entropy falls from ln(2048) ~ 7.6 to about 4.5 and
the final validation loss is about 5.0 (perplexity ~140).
"""

from dsmoe.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  m = c.model
  m.vocab_size = 2048  # = data.vocab_size (SentencePiece BPE)
  m.d_model, m.num_layers, m.num_heads = 128, 4, 4
  m.dense_hidden = 512
  m.first_k_dense_replace = 1
  m.moe.fine_grained.update(dict(N=8, m=4, K=2, K_s=2, ffn_hidden=256))
  m.moe.aux_loss_alpha = 0.01
  m.init_std = 0.02  # the paper's 0.006 is tuned for d_model >= 1280
  c.data.seq_len = 128
  c.data.tokenizer = "sentencepiece"
  c.data.vocab_size = 2048
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 30
  return c
