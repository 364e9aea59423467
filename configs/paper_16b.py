"""DeepSeekMoE 16B (released `deepseek-moe-16b-base` config.json): 16.4B total /
2.8B activated parameters.

28 layers, d_model 2048, 16 heads of 128; layer 0 dense (intermediate 10944),
layers 1-27 MoE with 2 shared + 64 routed experts of hidden 1408 (0.25 x a
standard FFN of 5632), top-6, softmax scores, no renormalisation, a1 = 0.001
per sequence (seq_aux). Vocabulary 102400, untied; both embedding tables are
counted in total and activated parameters.

Training: 106,449 steps of 4608 x 4096 tokens, LR 4.2e-4 (a pod).
"""

from dsmoe.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  m = c.model
  m.vocab_size = 102_400
  m.d_model, m.num_layers, m.num_heads, m.head_dim = 2048, 28, 16, 128
  m.dense_hidden = 10_944
  m.first_k_dense_replace, m.moe_layer_freq = 1, 1
  m.moe.num_routed_experts, m.moe.num_shared_experts = 64, 2
  m.moe.top_k, m.moe.expert_hidden = 6, 1408
  m.moe.aux_loss_alpha, m.moe.seq_aux = 0.001, True
  m.init_std = 0.006
  c.data.seq_len = 4096
  c.data.vocab_size = 102_400  # bring the tokenizer: --config.data.tokenizer_path
  c.train.batch_size = 4608
  c.train.steps = 106_449
  c.train.learning_rate = 4.2e-4
  c.train.warmup_steps = 2000
  return c
