"""dsmoe.aot.estimate: a looped train step counted as the compiler counts
the same step written out, and the roofline over those counts.

The oracle for the probes is XLA's own cost analysis of the full step with
no loop in it (layers unscanned, one micro-batch): there the compiler
counts every layer, so the probes' extrapolation must land on its numbers.
"""

import dataclasses

import pytest

from dsmoe import aot
from dsmoe.aot import estimate
from dsmoe.aot import targets
from dsmoe.parallel import mesh as mesh_lib
from tests.helpers import small_config, small_spec

# 1 dense + 3 MoE layers: the extrapolation from the probes' one and two
# MoE layers to three is what is checked.
LAYERS = {"model.num_layers": 4, "train.batch_size": 4}


@pytest.fixture(scope="module")
def unrolled_plan():
  """The plan of a 4-layer model with no loop in its step, on the CPU's
  device given a made-up peak (1e12 flop/s) and HBM bandwidth (1e11 B/s)."""
  cpu = targets.target("cpu")
  fake = targets.Target("fake", "cpu", cpu.devices, 0, peak_flops=1e12, hbm_bandwidth=1e11)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(aot, "target", lambda name: fake)
    return aot.plan(small_config(**LAYERS, **{"model.scan_layers": False}), "fake",
                    mesh={"data": 1})


def test_probes_reproduce_the_count_of_the_step_without_loops(unrolled_plan):
  est, direct = unrolled_plan["estimate"], unrolled_plan["cost_estimate"]
  assert direct["flops"] > 0 and direct["bytes"] > 0
  assert est["flops"] == pytest.approx(direct["flops"], rel=0.01)
  assert est["bytes"] == pytest.approx(direct["bytes"], rel=0.02)


def test_the_step_time_is_the_roofline_and_the_mfu_the_models_flops_over_it(unrolled_plan):
  est = unrolled_plan["estimate"]
  want = max(est["flops"] / 1e12, est["bytes"] / 1e11)
  assert unrolled_plan["estimated_step_s"] == pytest.approx(want)
  assert unrolled_plan["estimated_mfu"] == pytest.approx(est["model_flops"] / (want * 1e12))


def test_a_scanned_accumulated_step_counts_every_layer_and_micro_batch(unrolled_plan):
  """Two micro-batches of the same size, layers in a scan: the estimate is
  twice the unrolled step's forward and backward plus one update, while the
  compiler's count of the looped program itself sees one layer and one
  micro-batch."""
  looped = aot.plan(small_config(**{**LAYERS, "train.batch_size": 8},
                                 **{"model.scan_layers": True, "train.grad_accum_steps": 2}),
                    "cpu", mesh={"data": 1})
  one = unrolled_plan["cost_estimate"]["flops"]
  est = looped["estimate"]["flops"]
  assert 1.85 * one < est <= 2.0 * one  # 2 x (grads) + update, the update a few %
  assert looped["cost_estimate"]["flops"] < 0.5 * est
  # The model's own training FLOPs (6 N per token plus attention) lie between
  # the two: the compiler counts more than they (the router, norms,
  # softmax, padded expert blocks, the optimizer), the looped program less.
  model = looped["estimate"]["model_flops"]
  assert looped["cost_estimate"]["flops"] < model < est
  # The CPU target has no peak FLOP/s or bandwidth: counts, but no time.
  assert looped["estimated_step_s"] is None and "unknown" in looped["estimate"]["why_not"]


def test_combine_by_hand():
  one = {"grads": {"flops": 10.0, "bytes": 100.0}, "step": {"flops": 13.0, "bytes": 150.0}}
  two = {"grads": {"flops": 16.0, "bytes": 140.0}, "step": {"flops": 21.0, "bytes": 210.0}}
  # per micro-batch G = 10 + 4 (16 - 10) = 34; update U = 3 + 4 (5 - 3) = 11;
  # bytes: G = 100 + 4 * 40 = 260, U = 50 + 4 * 20 = 130; A = 3.
  out = estimate.combine(one, two, repeated=5, accum=3)
  assert out == {"flops": 3 * 34 + 11, "bytes": 3 * 260 + 130}


def test_roofline_by_hand():
  # 2e12 flops at 1e12 flop/s = 2 s; 3e9 bytes at 1e9 B/s = 3 s: memory-bound.
  assert estimate.roofline_s(2e12, 3e9, 1e12, 1e9) == 3.0
  assert estimate.roofline_s(5e12, 3e9, 1e12, 1e9) == 5.0


def test_what_cannot_be_estimated_says_why(monkeypatch):
  tgt = targets.target("cpu")
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "expert": 1}, devices=tgt.devices[:1])
  bare = dataclasses.replace(small_spec(), config=None)  # a Spec built by hand
  out = estimate.train_step(bare, tgt, mesh)
  assert out["estimated_step_s"] is None and "has no config" in out["why_not"]
  out = estimate.train_step(small_config(**{"model.num_layers": 3, "model.moe_layer_freq": 2}),
                            tgt, mesh)
  assert out["estimated_step_s"] is None and "moe_layer_freq" in out["why_not"]
  # A compiler that counts nothing (XLA:GPU's deviceless compile returns no
  # cost analysis): no estimate, and the reason, after one probe.
  monkeypatch.setattr(estimate, "cost_of", lambda compiled: {"flops": 0.0, "bytes": 0.0})
  out = estimate.train_step(small_config(), tgt, mesh)
  assert out["estimated_step_s"] is None and "no cost analysis" in out["why_not"]
