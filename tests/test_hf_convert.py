"""HF <-> dsmoe conversion: bit-exact round trips, streaming memory, clear errors."""

import glob
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dsmoe.interop import hf
from dsmoe import params_io
from tests import hf_checkpoints as hc
from tests.helpers import ROOT

ENV = dict(os.environ, JAX_PLATFORMS="cpu",
           PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def read_folder(folder):
  tensors = {}
  for path in glob.glob(os.path.join(folder, "*.safetensors")):
    tensors.update(load_file(path))
  with open(os.path.join(folder, "config.json")) as f:
    return json.load(f), tensors


def assert_bit_equal(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
    assert a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
  folder, cfg, weights = hc.make(str(tmp_path / "hf"), seed=1, dtype=dtype, n_shared_experts=None)
  with open(os.path.join(folder, "tokenizer.json"), "w") as f:
    f.write("{}")
  model = hf.convert(folder, str(tmp_path / "dsmoe"))
  saved = params_io.saved_arrays(os.path.join(model, "params"))
  assert {str(d) for _, d in saved.values()} == {np.dtype(dtype).name}
  assert saved["blocks/1/ffn/w_gate_edf"][0] == (8, 32, 16)
  back = hf.export(model, str(tmp_path / "back"), max_shard_bytes=20_000)
  config, tensors = read_folder(back)
  assert config == cfg
  assert_bit_equal(tensors, weights)
  with open(os.path.join(back, "model.safetensors.index.json")) as f:
    index = json.load(f)
  assert set(index["weight_map"]) == set(weights) and len(set(index["weight_map"].values())) > 3
  assert os.path.isfile(os.path.join(back, "tokenizer.json"))


def test_float32_storage_of_a_bfloat16_checkpoint_is_exact(tmp_path):
  folder, cfg, weights = hc.make(str(tmp_path / "hf"), seed=2, dtype=ml_dtypes.bfloat16,
                                 num_shards=1)
  model = hf.convert(folder, str(tmp_path / "f32"), dtype="float32")
  config, up = read_folder(hf.export(model, str(tmp_path / "back32")))
  assert config["torch_dtype"] == "float32"
  assert all(up[k].dtype == np.float32 and np.array_equal(up[k], weights[k].astype(np.float32))
             for k in weights)
  config, down = read_folder(hf.export(model, str(tmp_path / "back16"), dtype="bfloat16"))
  assert config == cfg
  assert_bit_equal(down, weights)


def _break(folder, weights, change):
  weights = dict(weights)
  change(weights)
  for path in glob.glob(os.path.join(folder, "*.safetensors*")):
    os.remove(path)
  save_file(weights, os.path.join(folder, "model.safetensors"))


@pytest.mark.parametrize("change,words", [
    (lambda w: w.pop("model.layers.2.mlp.experts.5.up_proj.weight"),
     "model.layers.2.mlp.experts.5.up_proj.weight is missing"),
    (lambda w: w.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}),
     "unexpected tensor model.layers.0.self_attn.q_proj.bias"),
    (lambda w: w.update({"model.layers.1.mlp.gate.weight": np.zeros((8, 31), np.float32)}),
     r"model.layers.1.mlp.gate.weight has shape \(8, 31\), config.json implies \(8, 32\)"),
    (lambda w: w.update({"model.norm.weight": np.zeros(32, np.int8)}),
     "model.norm.weight has dtype I8"),
])
def test_bad_tensors_give_one_error_naming_the_tensor(tmp_path, change, words):
  folder, _, weights = hc.make(str(tmp_path / "hf"), num_shards=1)
  _break(folder, weights, change)
  out = tmp_path / "out"
  with pytest.raises(hf.HFFormatError, match=words):
    hf.convert(folder, str(out))
  with pytest.raises(hf.HFFormatError, match=words):
    hf.load_hf(folder)
  assert not out.exists() and os.listdir(tmp_path) == ["hf"]


def test_pickle_checkpoints_and_broken_indexes_are_refused(tmp_path):
  folder, _, _ = hc.make(str(tmp_path / "hf"), num_shards=2)
  os.remove(os.path.join(folder, "model-00002-of-00002.safetensors"))
  with pytest.raises(hf.SafetensorsError, match="model-00002-of-00002.safetensors"):
    hf.convert(folder, str(tmp_path / "out"))
  for path in glob.glob(os.path.join(folder, "*.safetensors")):
    os.remove(path)
  open(os.path.join(folder, "pytorch_model.bin"), "wb").close()
  with pytest.raises(hf.SafetensorsError, match="pickle"):
    hf.convert(folder, str(tmp_path / "out"))


def test_convert_script_both_ways_and_its_errors(tmp_path):
  folder, cfg, weights = hc.make(str(tmp_path / "hf"), dtype=ml_dtypes.bfloat16)
  script = [sys.executable, str(ROOT / "scripts/convert_hf.py")]
  run = subprocess.run(script + [folder, str(tmp_path / "m")], capture_output=True,
                       text=True, env=ENV, timeout=300)
  assert run.returncode == 0, run.stderr
  run = subprocess.run(script + ["--reverse", str(tmp_path / "m"), str(tmp_path / "b")],
                       capture_output=True, text=True, env=ENV, timeout=300)
  assert run.returncode == 0, run.stderr
  config, tensors = read_folder(str(tmp_path / "b"))
  assert config == cfg
  assert_bit_equal(tensors, weights)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({**cfg, "rope_scaling": {"type": "dynamic", "factor": 2}}, f)
  blocker = tmp_path / "a_file"  # an output folder that cannot be made
  blocker.write_text("")
  cases = [([folder, str(tmp_path / "x")], "rope_scaling"),
           ([folder, str(tmp_path / "b")], "already exists"),
           (["--reverse", str(tmp_path / "m"), str(blocker / "out")], "a_file"),
           ([str(tmp_path / "m")], "usage")]
  for args, words in cases:
    run = subprocess.run(script + args, capture_output=True, text=True, env=ENV, timeout=300)
    err = run.stderr.strip()
    assert run.returncode == 1 and err.startswith("error:") and words in err, (args, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1
  assert not (tmp_path / "x").exists()
  assert sorted(os.listdir(tmp_path)) == ["a_file", "b", "hf", "m"]


MEMORY_PROBE = r"""
import json, os, resource, sys
from dsmoe.interop import hf
mode, src, out = sys.argv[1:]
if mode == "convert":
  hf.convert(src, out)
else:
  hf.export(src, out, max_shard_bytes=32 << 20)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
"""


def _peak_mb(mode, src, out):
  """Peak resident memory (MiB) of a fresh process that converts or exports."""
  run = subprocess.run([sys.executable, "-c", MEMORY_PROBE, mode, src, out],
                       capture_output=True, text=True, env=ENV, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_conversion_streams_tensor_by_tensor(tmp_path):
  """A 310 MB checkpoint converts (and exports with 32 MB shards) with a peak
  memory growth of a few of its largest arrays (16 MB) or shards, not the
  model (measured: about 25 MB converting, 12 MB exporting; exporting
  without the fixed mmap threshold of dsmoe.interop.hf: about 115 MB)."""
  cfg = hc.tiny_config(vocab_size=4096, hidden_size=512, intermediate_size=2048,
                       moe_intermediate_size=512, num_hidden_layers=6,
                       num_attention_heads=8, n_routed_experts=16, num_experts_per_tok=4,
                       n_shared_experts=1)
  src = str(tmp_path / "big_hf")
  os.makedirs(src)
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump(cfg, f)
  shapes, rng, total = hc.tensor_shapes(cfg), np.random.default_rng(0), 0
  names = list(shapes)
  for i, part in enumerate(np.array_split(np.arange(len(names)), 10)):  # ~31 MB shards
    shard = {names[j]: rng.standard_normal(shapes[names[j]], np.float32) for j in part}
    total += sum(x.nbytes for x in shard.values())
    save_file(shard, os.path.join(src, f"model-{i:05d}.safetensors"))
  assert total > 300e6
  small, _, _ = hc.make(str(tmp_path / "small"))
  # The same work on a tiny checkpoint in an identical fresh process: the
  # difference of the two peaks is what the model size adds.
  mb = {}
  for mode in ("convert", "export"):
    srcs = ((small, src) if mode == "convert" else
            (str(tmp_path / "small_convert"), str(tmp_path / "big_convert")))
    tiny = _peak_mb(mode, srcs[0], str(tmp_path / f"small_{mode}"))
    big = _peak_mb(mode, srcs[1], str(tmp_path / f"big_{mode}"))
    mb[mode] = big - tiny
  largest = 16 * 512 * 512 * 4 / 2**20  # one stacked expert tensor, 16 MB
  assert mb["convert"] < 4 * largest + 32, mb
  assert mb["export"] < 3 * 32, mb  # a few 32 MB shards
