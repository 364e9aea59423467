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
    ("tensor parallelism is not built", lambda c: setattr(c.mesh, "tensor", 2),
     "config.mesh.tensor=2"),
    ("two mesh axes are -1", lambda c: setattr(c.mesh, "fsdp", -1), "config.mesh="),
    ("expert parallelism with the dense dispatch",
     lambda c: (setattr(c.mesh, "expert", 2), setattr(c.model.moe, "impl", "dense")),
     "config.model.moe.impl='dense'"),
    ("device groups are not the expert devices",
     lambda c: (setattr(c.mesh, "expert", 2), setattr(c.model.moe, "device_balance_alpha", 0.1)),
     "config.model.moe.num_device_groups=1"),
    ("device limit above the device groups",
     lambda c: c.model.moe.update(dict(num_device_groups=2, max_devices_per_token=3)),
     "config.model.moe.max_devices_per_token=3"),
    ("device limit too small for top-k",
     lambda c: c.model.moe.update(dict(num_device_groups=15, max_devices_per_token=2)),
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
    ("device groups do not divide experts", lambda c: setattr(c.model.moe, "num_device_groups", 4),
     "config.model.moe.num_device_groups=4"),
    ("hash router with top-k > 1", lambda c: setattr(c.model.moe, "router", "hash"),
     "config.model.moe.top_k=6"),
    ("pallas block not a power of two", lambda c: c.model.moe.update(
        dict(gmm_backend="pallas", block_size=24)), "config.model.moe.block_size=24"),
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
