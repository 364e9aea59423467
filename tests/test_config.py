"""Each impossible config raises one ValueError naming the key and the rule."""

import os
import subprocess
import sys

import pytest
from ml_collections import config_flags  # noqa: F401  (import check)

import dsmoe
from tests.helpers import ROOT, load_config

CASES = [
    # (description, mutation, expected substring of the error)
    ("top-k > routed", lambda c: _explicit(c, top_k=40, num_routed_experts=30),
     "config.model.moe.top_k=40"),
    ("shared not fewer than total",
     lambda c: c.model.moe.fine_grained.update(dict(N=2, m=2, K=1, K_s=4)),
     "config.model.moe.fine_grained.K_s=4"),
    ("m does not divide hidden", lambda c: c.model.moe.fine_grained.update(dict(m=3)),
     "config.model.moe.fine_grained.m=3"),
    ("non-positive d_model", lambda c: setattr(c.model, "d_model", 0), "config.model.d_model=0"),
    ("non-positive layers", lambda c: setattr(c.model, "num_layers", -1), "config.model.num_layers=-1"),
    ("non-positive expert hidden", lambda c: _explicit(c, expert_hidden=0),
     "config.model.moe.expert_hidden=0"),
    ("unknown dispatch", lambda c: setattr(c.model.moe, "impl", "magic"), "config.model.moe.impl='magic'"),
    ("unknown score fn", lambda c: setattr(c.model.moe, "score_fn", "relu"),
     "config.model.moe.score_fn='relu'"),
    ("d_model not divisible by heads", lambda c: setattr(c.model, "num_heads", 3),
     "config.model.d_model=128"),
    ("expert axis does not divide the experts", lambda c: setattr(c.mesh, "expert", 4),
     "config.mesh.expert=4"),
    ("two mesh axes are -1", lambda c: setattr(c.mesh, "fsdp", -1), "config.mesh="),
    ("expert parallelism with the dense dispatch",
     lambda c: (setattr(c.mesh, "expert", 2), setattr(c.model.moe, "impl", "dense")),
     "config.model.moe.impl='dense'"),
    ("device-level balance without expert parallelism",
     lambda c: setattr(c.model.moe, "device_balance_alpha", 0.1),
     "config.model.moe.device_balance_alpha=0.1"),
    ("device limit with mesh.expert=-1",
     lambda c: (c.mesh.update(dict(data=1, expert=-1)),
                setattr(c.model.moe, "max_devices_per_token", 2)),
     "config.model.moe.max_devices_per_token=2"),
    ("device limit above the expert devices",
     lambda c: (setattr(c.mesh, "expert", 2), setattr(c.model.moe, "max_devices_per_token", 3)),
     "config.model.moe.max_devices_per_token=3"),
    ("device limit too small for top-k",
     lambda c: (setattr(c.mesh, "expert", 15), setattr(c.model.moe, "max_devices_per_token", 2)),
     "config.model.moe.max_devices_per_token=2"),
    ("communication loss without a device limit",
     lambda c: setattr(c.model.moe, "comm_balance_alpha", 0.02),
     "config.model.moe.comm_balance_alpha=0.02"),
    ("unknown token exchange", lambda c: setattr(c.model.moe, "ep_exchange", "mpi"),
     "config.model.moe.ep_exchange='mpi'"),
    ("unknown remat policy", lambda c: setattr(c.model, "remat", "some"),
     "config.model.remat='some'"),
    ("scan over interleaved layers",
     lambda c: c.model.update(dict(scan_layers=True, moe_layer_freq=2)),
     "config.model.scan_layers=True"),
    ("mesh does not divide batch", lambda c: c.mesh.update(dict(data=3)), "config.train.batch_size=16"),
    ("mesh.data neither -1 nor positive", lambda c: setattr(c.mesh, "data", 0), "config.mesh.data=0"),
    ("unknown blocked strategy", lambda c: setattr(c.model.moe, "gmm_strategy", "fast"),
     "config.model.moe.gmm_strategy='fast'"),
    ("negative block size", lambda c: setattr(c.model.moe, "block_size", -8),
     "config.model.moe.block_size=-8"),
    ("negative a1", lambda c: setattr(c.model.moe, "aux_loss_alpha", -0.1),
     "config.model.moe.aux_loss_alpha=-0.1"),
    ("negative a2", lambda c: setattr(c.model.moe, "device_balance_alpha", -1.0),
     "config.model.moe.device_balance_alpha=-1.0"),
    ("seq_len < 1", lambda c: setattr(c.data, "seq_len", 0), "config.data.seq_len=0"),
    ("override below derived top-k", lambda c: setattr(c.model.moe, "num_routed_experts", 4),
     "config.model.moe.top_k=6"),
    ("hash router with top-k > 1", lambda c: setattr(c.model.moe, "router", "hash"),
     "config.model.moe.top_k=6"),
    ("pallas block not a power of two", lambda c: c.model.moe.update(
        dict(gmm_backend="pallas", block_size=24)), "config.model.moe.block_size=24"),
    # Settings that cannot apply to the plan they resolve to are refused, not ignored.
    ("strategy of another backend", lambda c: c.model.moe.update(
        dict(gmm_backend="ragged_dot", gmm_strategy="loop")), "config.model.moe.gmm_strategy='loop'"),
    ("block size for ragged_dot", lambda c: c.model.moe.update(
        dict(gmm_backend="ragged_dot", block_size=16)), "config.model.moe.block_size=16"),
    ("grouped matmul of the dense reference", lambda c: c.model.moe.update(
        dict(impl="dense", gmm_backend="blocked")), "config.model.moe.gmm_backend='blocked'"),
    ("block size of the dense reference", lambda c: c.model.moe.update(
        dict(impl="dense", block_size=8)), "config.model.moe.block_size=8"),
    ("capacity factor where nothing drops", lambda c: setattr(c.model.moe, "capacity_factor", 2.0),
     "config.model.moe.capacity_factor=2.0"),
    ("drop policy where nothing drops", lambda c: setattr(c.model.moe, "drop_policy", "score"),
     "config.model.moe.drop_policy='score'"),
    ("exchange without expert parallelism",
     lambda c: setattr(c.model.moe, "ep_exchange", "all_to_all"),
     "config.model.moe.ep_exchange='all_to_all'"),
    ("C++ kernel in bfloat16", lambda c: (setattr(c.model.moe, "gmm_strategy", "kernel"),
                                          setattr(c.model, "dtype", "bfloat16")),
     "config.model.moe.gmm_strategy='kernel'"),
    ("ragged all-to-all on CPU", lambda c: (setattr(c.mesh, "expert", 2), setattr(
        c.model.moe, "ep_exchange", "ragged_all_to_all")),
     "config.model.moe.ep_exchange='ragged_all_to_all'"),
]


def _explicit(c, **kw):
  fg = c.model.moe.fine_grained
  sizes = dsmoe.config.fine_grained(fg.N, fg.m, fg.K, fg.K_s, fg.ffn_hidden)
  fg.N = 0
  sizes.update(kw)
  c.model.moe.update(sizes)


@pytest.mark.parametrize("name,mutate,expected", CASES, ids=[c[0] for c in CASES])
def test_invalid_config_raises_clear_error(name, mutate, expected):
  c = load_config("tiny")
  mutate(c)
  with pytest.raises(ValueError) as err:
    dsmoe.validate(c)
  assert expected in str(err.value), (name, str(err.value))


@pytest.mark.parametrize("name", ["tiny", "paper_2b", "paper_16b", "paper_145b"])
def test_shipped_configs_are_valid(name):
  dsmoe.validate(load_config(name))


# (model.moe settings, platform) -> (grouped SwiGLU, token exchange): the table
# of docs/MODEL.md, "Routed-expert implementations".
PLANS = [
    ({}, "cpu", "loop", "allgather"),
    ({}, "tpu", "ragged_dot", "ragged_all_to_all"),
    ({}, "gpu", "batched", "ragged_all_to_all"),
    ({}, "cuda", "batched", "ragged_all_to_all"),
    ({"gmm_backend": "blocked"}, "cpu", "loop", "allgather"),
    ({"gmm_backend": "blocked"}, "tpu", "batched", "ragged_all_to_all"),
    ({"gmm_backend": "pallas"}, "gpu", "pallas", "ragged_all_to_all"),
    ({"gmm_backend": "ragged_dot"}, "cpu", "ragged_dot", "allgather"),
    ({"gmm_strategy": "kernel"}, "cpu", "kernel", "allgather"),
    ({"gmm_strategy": "batched"}, "cpu", "batched", "allgather"),
    ({"gmm_strategy": "loop"}, "tpu", "loop", "ragged_all_to_all"),
    ({"impl": "dense"}, "tpu", "", "ragged_all_to_all"),
]


@pytest.mark.parametrize("moe,platform,grouped,exchange", PLANS)
def test_expert_plan_is_resolved_for_the_platform(moe, platform, grouped, exchange):
  c = load_config("tiny")
  c.model.moe.update(moe)
  plan = dsmoe.resolve(c, platform=platform).model.moe.plan
  assert (plan.grouped, plan.ep_exchange) == (grouped, exchange)
  assert plan.platform == {"cuda": "gpu"}.get(platform, platform)


def test_expert_plan_refusals_depend_on_the_platform():
  c = load_config("tiny")
  c.model.moe.block_size = 64  # blocks: fine where "auto" is blocked, not on TPU (ragged_dot)
  assert dsmoe.resolve(c, platform="cpu").model.moe.plan.block_size == 64
  with pytest.raises(ValueError, match="config.model.moe.block_size=64.*ragged_dot"):
    dsmoe.resolve(c, platform="tpu")
  c = load_config("tiny")
  c.model.moe.gmm_strategy = "kernel"
  with pytest.raises(ValueError, match="config.model.moe.gmm_strategy='kernel'.*CPU only"):
    dsmoe.resolve(c, platform="tpu")
  c = load_config("tiny")
  c.mesh.expert, c.model.moe.ep_exchange = 2, "ragged_all_to_all"
  assert dsmoe.resolve(c, platform="tpu").model.moe.plan.ep_exchange == "ragged_all_to_all"


def test_device_groups_are_the_expert_devices():
  c = load_config("tiny")
  assert dsmoe.resolve(c).model.moe.num_device_groups == 1
  c.mesh.expert, c.model.moe.device_balance_alpha = 2, 0.1
  assert dsmoe.resolve(c).model.moe.num_device_groups == 2
  assert dsmoe.resolve(load_config("paper_145b")).model.moe.num_device_groups == 4


def test_lock_config_refuses_unknown_keys():
  c = load_config("tiny")
  c.lock()
  with pytest.raises(AttributeError):
    c.model.moe.num_routed_expertz = 3


def test_load_finds_shipped_configs_by_name_path_and_argument(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # shipped names do not depend on the current folder
  assert dsmoe.load("tiny").model.d_model == 128
  gshard = dsmoe.load("ablation:gshard").model.moe.fine_grained
  assert (gshard.N, gshard.K, gshard.K_s) == (16, 2, 0)
  assert dsmoe.load("ablation", "shared").model.moe.fine_grained.K_s == 1
  path = ROOT / "configs" / "paper_2b.py"
  assert dsmoe.load(f"{path}:runlocal").model.d_model == 128
  with pytest.raises(FileNotFoundError, match="no config named 'tinny'.*tiny"):
    dsmoe.load("tinny")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    dsmoe.load(str(tmp_path / "missing.py"))


def test_resolved_spec_is_frozen_and_hashable():
  spec = dsmoe.resolve(load_config("tiny"))
  assert hash(spec) == hash(dsmoe.resolve(load_config("tiny")))
  assert spec.model.head_dim == 32  # 0 in the config: d_model // num_heads
  with pytest.raises(Exception):
    spec.model.moe.top_k = 3
  assert dsmoe.resolve(spec) is spec


def test_fine_grained_form_is_derived():
  c = load_config("paper_2b")
  moe = dsmoe.resolve(c).model.moe
  assert (moe.num_routed_experts, moe.num_shared_experts, moe.top_k, moe.expert_hidden) == (63, 1, 7, 880)


def test_ablation_variants_keep_expert_parameters_equal():
  sizes = {}
  for v in ["hash", "switch", "gshard", "shared", "m2", "deepseekmoe"]:
    c = load_config("ablation", v)
    dsmoe.validate(c)
    moe = dsmoe.resolve(c).model.moe
    sizes[v] = (moe.num_routed_experts + moe.num_shared_experts) * moe.expert_hidden
  assert len(set(sizes.values())) == 1, sizes  # 16 standard FFNs each
  dense = dsmoe.count_params(load_config("ablation", "dense"))
  assert dense["total"] == dense["activated"]


def test_ablation_unknown_variant():
  with pytest.raises(ValueError, match="unknown variant 'foo'"):
    load_config("ablation", "foo")


def test_explicit_size_overrides_the_paper_form():
  c = load_config("tiny")  # fine_grained N=8, m=4, K=2, K_s=2 -> 30 routed, top-6
  c.model.moe.num_routed_experts = 32
  moe = dsmoe.resolve(c).model.moe
  assert (moe.num_routed_experts, moe.top_k, moe.num_shared_experts, moe.expert_hidden) == (32, 6, 2, 64)


PROBE = """
from absl import app, flags
from ml_collections import config_flags
config_flags.DEFINE_config_file("config", None, "", lock_config=True)
def main(_):
  import dsmoe
  print("routed", dsmoe.resolve(flags.FLAGS.config).model.moe.num_routed_experts)
app.run(main)
"""


def test_command_line_override_works_with_lock_config(tmp_path):
  probe = tmp_path / "probe.py"
  probe.write_text(PROBE)
  base = [sys.executable, str(probe), "--config", str(ROOT / "configs" / "tiny.py")]
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  ok = subprocess.run(base + ["--config.model.moe.num_routed_experts=32"],
                      capture_output=True, text=True, env=env, timeout=120)
  assert ok.returncode == 0 and "routed 32" in ok.stdout, ok.stderr[-2000:]
  bad = subprocess.run(base + ["--config.model.moe.num_routed_expertz=3"],
                       capture_output=True, text=True, env=env, timeout=120)
  assert bad.returncode != 0 and "num_routed_expertz" in bad.stderr
