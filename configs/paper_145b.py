"""DeepSeekMoE 145B (paper section 7): 144.6B total / 22.2B activated parameters.

62 layers, d_model 4096, 32 heads of 128; layer 0 dense, layers 1-61 MoE with
4 shared + 128 routed experts, top-12, expert hidden 0.125 x a standard FFN.
The standard FFN is taken as 2.75 x d_model = 11264 (the 16B model's ratio),
so expert hidden = 1408. The dense first layer's hidden size is not printed;
we use 22528, the FFN width a token activates in an MoE layer (16 x 1408),
as the 16B model roughly does (10944 vs 8 x 1408). a1 = 0.003, a2 = 0.05 over
4 device groups. Vocabulary 102400, untied, both tables counted.
Our count: 144.6B total / 22.1B activated.

Training: 13,000 steps of 4608 x 4096 tokens, LR 3.0e-4, constant after warmup.
"""

from dsmoe.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  m = c.model
  m.vocab_size = 102_400
  m.d_model, m.num_layers, m.num_heads, m.head_dim = 4096, 62, 32, 128
  m.dense_hidden = 22_528
  m.first_k_dense_replace, m.moe_layer_freq = 1, 1
  m.moe.num_routed_experts, m.moe.num_shared_experts = 128, 4
  m.moe.top_k, m.moe.expert_hidden = 12, 1408
  m.moe.aux_loss_alpha, m.moe.seq_aux = 0.003, False
  m.moe.device_balance_alpha = 0.05  # a2 over the D = mesh.expert = 4 device groups
  m.init_std = 0.006
  c.data.seq_len = 4096
  c.data.vocab_size = 102_400  # bring the tokenizer: --config.data.tokenizer_path
  c.train.batch_size = 4608
  c.train.steps = 13_000
  c.train.learning_rate = 3.0e-4
  c.train.warmup_steps = 2000
  c.train.schedule = "constant"
  c.mesh.expert = 4  # the paper's 4 device groups: routed experts split over 4 devices
  return c
