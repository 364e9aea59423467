"""Parameter counts of the paper configs (docs/MODEL.md) and FLOPs."""

import pytest

import dsmoe
from tests.helpers import load_config


@pytest.mark.parametrize("name,total,activated,tol", [
    ("paper_16b", 16.4e9, 2.8e9, 0.03),
    ("paper_145b", 144.6e9, 22.2e9, 0.03),
])
def test_paper_param_counts(name, total, activated, tol):
  config = load_config(name)
  # Stacked layers trace one MoE layer, not 59 (the counts are the same:
  # test_stacked_layers_keep_the_counts).
  config.model.scan_layers = True
  counts = dsmoe.count_params(config)
  assert counts["total"] == pytest.approx(total, rel=tol)
  assert counts["activated"] == pytest.approx(activated, rel=tol)


def test_paper_2b_counts_to_one_digit():
  counts = dsmoe.count_params(load_config("paper_2b"))
  assert round(counts["total"] / 1e9, 1) == 2.0
  assert round(counts["activated"] / 1e9, 1) == 0.3


def test_tiny_counts_by_hand():
  c = load_config("tiny")
  d, v, layers, dense_h = 128, c.model.vocab_size, 4, 512
  attn = 4 * d * d
  norms = 2 * d
  dense_layer = attn + 3 * d * dense_h + norms
  e, s, k, h = 30, 2, 6, 64
  moe_layer = attn + norms + d * e + 3 * d * (s * h) + e * 3 * d * h
  total = 2 * v * d + d + dense_layer + 3 * moe_layer
  activated = total - 3 * (e - k) * 3 * d * h
  assert dsmoe.count_params(c) == {"total": total, "activated": activated, "embedding": 2 * v * d}


def test_flops_of_2b_match_paper_table():
  # Table 1: DeepSeekMoE 2B costs 4.3T FLOPs per 2K tokens.
  c = load_config("paper_2b")
  assert dsmoe.flops_per_token(c) * 2048 == pytest.approx(4.3e12, rel=0.03)


def test_stacked_layers_keep_the_counts():
  """model.scan_layers stacks the MoE layers' weights on a layer axis; the
  counts (paper: 16.4B / 2.8B) do not change."""
  config = load_config("paper_16b")
  plain = dsmoe.count_params(config)
  config.model.scan_layers = True
  assert dsmoe.count_params(config) == plain
