"""dsmoe.train.throughput: the dense config of equal activated FLOPs, and the
side-by-side measurement behind scripts/bench_moe.py --model."""

import pytest

import dsmoe
from dsmoe.train import throughput
from tests.helpers import load_config, small_config


@pytest.mark.parametrize("variant", ["deepseekmoe", "gshard", "m2"])
def test_dense_equivalent_differs_only_by_the_routers(variant):
  moe = load_config("ablation", variant)
  dense = throughput.dense_equivalent(moe)
  spec = dsmoe.resolve(moe).model
  # every FFN of the dense copy is one SwiGLU of hidden (K_s + K') * F ...
  assert dsmoe.resolve(dense).model.first_k_dense_replace == spec.num_layers
  assert dense.model.dense_hidden == (spec.moe.num_shared_experts + spec.moe.top_k) * \
      spec.moe.expert_hidden
  # ... so the activated parameters differ by the routers' d_model x N' alone
  router = spec.num_layers * spec.d_model * spec.moe.num_routed_experts
  assert dsmoe.count_params(moe)["activated"] - dsmoe.count_params(dense)["activated"] == router
  assert moe.model.first_k_dense_replace == 0  # the input config is left alone


def test_dense_equivalent_refuses_mixed_dense_layers():
  cfg = small_config()  # tiny: layer 0 dense (hidden 64), MoE of activated hidden 64
  cfg.model.dense_hidden = 96
  with pytest.raises(ValueError, match="dense_hidden"):
    throughput.dense_equivalent(cfg)


@pytest.mark.slow  # compiles two train steps
def test_compare_times_each_config():
  moe = small_config(**{"model.first_k_dense_replace": 0})
  res = throughput.compare({"dense": throughput.dense_equivalent(moe), "moe": moe},
                           steps=2, warmup=1, peak_flops=1e9)
  assert list(res) == ["dense", "moe"]
  assert res["dense"]["mfu_ratio"] == res["dense"]["cpu_mfu_ratio"] == pytest.approx(1.0)
  for r in res.values():
    assert r["tokens_per_s"] > 0 and r["step_ms"] > 0
    # MFU = tokens/s * FLOPs per token / peak (1 GFLOP/s here)
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["gflops_per_token"])
