"""Released DeepSeekMoE v1 checkpoints (HuggingFace layout) <-> dsmoe.

::

    config, lm = load_hf("deepseek-moe-16b-base", dtype="bfloat16")
    logits_btv = lm(tokens_bt)                      # float32 [batch, seq, vocab]
    text = load_text_model("deepseek-moe-16b-base")  # + its tokenizer.json, EOS

    convert("deepseek-moe-16b-base", "ckpt/dsmoe-16b")          # -> a model folder
    export("ckpt/dsmoe-16b", "ckpt/hf-again")                   # and back
    export_run(config, "runs/finetune", "ckpt/hf-finetuned")    # a training run's params

An HF folder holds ``config.json``, ``*.safetensors`` (one file or shards
with ``model.safetensors.index.json``) and usually the tokenizer files. A
dsmoe *model folder* (what :func:`convert` writes) holds the same
``config.json`` and tokenizer files plus ``params/``, a params-only Orbax
checkpoint (dsmoe.params_io) that ``train.init_from``,
``configs/hf.py`` and the generator read. Both kinds load with
:func:`load_hf`.

Every step streams tensor by tensor: reading a safetensors tensor, turning
it into dsmoe's layout (dsmoe.interop.hf_layout) and writing it (to Orbax,
to a device or to a safetensors shard) before the next, so host memory stays
near the largest tensor (one shard when exporting), not the model. Output
folders are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile

import jax
import numpy as np

from dsmoe import config as config_lib
from dsmoe import params_io
from dsmoe.data.hf_tokenizer import HFTokenizer
from dsmoe.errors import HFFormatError
from dsmoe.generate import CausalLM, TextModel
from dsmoe.interop import hf_config, hf_layout, safetensors_io
from dsmoe.interop.hf_config import HFConfigError
from dsmoe.interop.safetensors_io import SafetensorsError

PARAMS = "params"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
IGNORED_TENSOR_SUFFIX = ".rotary_emb.inv_freq"  # a buffer older code saved; derived from rope_theta
DTYPES = ("float32", "bfloat16")
DEFAULT_SHARD_BYTES = 2 << 30


def is_model_folder(path: str) -> bool:
  """A folder written by :func:`convert` (config.json + params/)."""
  return os.path.isdir(os.path.join(path, PARAMS))


def _check_folder(path: str) -> None:
  if not os.path.isdir(path):
    raise HFFormatError(f"{path}: no such folder")


def model_config(path: str, dtype: str | None = None):
  """The dsmoe ConfigDict of an HF or model folder's config.json; the dtype of
  the model (params and compute) is `dtype`, by default the stored one."""
  _check_folder(path)
  hf = hf_config.read(path)
  return hf_config.to_dsmoe(hf, dtype=dtype or _stored_dtype(path))


def _stored_dtype(path: str) -> str:
  """bfloat16 or float32: the checkpoint's dtype (float16 and others: float32)."""
  if is_model_folder(path):
    arrays = params_io.saved_arrays(params_io.params_dir(path))
    dtypes = {str(d) for _, d in arrays.values()}
  else:
    reader = safetensors_io.Reader(path)
    dtypes = {reader.dtype(n) for n in reader.names()}
  dtypes = {{"BF16": "bfloat16", "F32": "float32"}.get(d, d) for d in dtypes}
  return "bfloat16" if dtypes == {"bfloat16"} else "float32"


def _check_dtype(dtype: str) -> None:
  if dtype not in DTYPES:
    raise HFFormatError(f"dtype={dtype!r} must be one of {list(DTYPES)}")


def _checked_reader(path: str, layout: list[hf_layout.Param]) -> safetensors_io.Reader:
  """The folder's safetensors, after checking every name and shape of `layout`."""
  reader = safetensors_io.Reader(path)
  expected = {n: p.hf_shape() for p in layout for n in p.hf_names}
  present = {n for n in reader.names() if not n.endswith(IGNORED_TENSOR_SUFFIX)}
  missing = sorted(set(expected) - present)
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise HFFormatError(f"{path}: tensor {missing[0]} is missing{more}; config.json "
                        "describes a model with it")
  unknown = sorted(present - set(expected))
  if unknown:
    more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
    raise HFFormatError(f"{path}: unexpected tensor {unknown[0]}{more}: the model "
                        "that config.json describes has no such weight")
  for name, shape in expected.items():
    if reader.shape(name) != shape:
      raise HFFormatError(f"{path}: tensor {name} has shape {reader.shape(name)}, "
                          f"config.json implies {shape}")
    if reader.dtype(name) not in safetensors_io.FLOAT_DTYPES:
      raise HFFormatError(f"{path}: tensor {name} has dtype {reader.dtype(name)}; "
                          "expected a float type (quantized checkpoints are not supported)")
  return reader


def _lazy_params(reader, layout, dtype) -> dict:
  tree = {}
  np_dtype = np.dtype(dtype)
  for p in layout:
    load = (lambda p=p: p.to_dsmoe([reader.get(n) for n in p.hf_names], np_dtype))
    hf_layout.set_path(tree, p.path, params_io.LazyArray(p.shape, np_dtype, load))
  return tree


def load_hf(path: str, dtype: str = "float32"):
  """(config, lm): the dsmoe ConfigDict and a :class:`dsmoe.generate.CausalLM`
  of an HF folder or a dsmoe model folder; ``lm(tokens_bt)`` returns float32
  logits [batch, seq, vocab]. Params and compute are in `dtype`. Each tensor
  goes to the default device as soon as it is read."""
  _check_dtype(dtype)
  config = model_config(path, dtype)
  spec = config_lib.resolve(config).model
  graphdef, abstract, rest = CausalLM.skeleton(spec)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if is_model_folder(path):
    ppath = params_io.params_dir(path)
    params_io.check_matches(ppath, abstract)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                            abstract)
    params = params_io.restore(ppath, abstract)
  else:
    layout = hf_layout.params(spec)
    reader = _checked_reader(path, layout)
    params = {}
    for p in layout:
      array = p.to_dsmoe([reader.get(n) for n in p.hf_names], np.dtype(dtype))
      hf_layout.set_path(params, p.path, jax.device_put(array, device))
      del array
  rest = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), rest)
  return config, CausalLM(graphdef, params, rest)


def load_text_model(path: str, dtype: str = "float32") -> TextModel:
  """:func:`load_hf` of an HF or dsmoe model folder with its tokenizer.json
  (dsmoe.data.hf_tokenizer), stopping at the tokenizer's EOS."""
  _, lm = load_hf(path, dtype)
  return TextModel.from_tokenizer(lm, HFTokenizer(path))


def _fix_malloc_mmap_threshold(threshold: int = 1 << 20) -> None:
  """Makes glibc give freed large arrays back to the OS at once.

  glibc raises its mmap threshold (up to 32 MiB) each time a large mmapped
  block is freed; later arrays below it then come from the heap arenas of
  Orbax/TensorStore threads, and the freed memory stays with the process, so
  a streaming conversion would still grow towards the model size. Fixing the
  threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns the adjustment
  off) keeps the peak near the arrays in flight. A no-op without glibc.
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
  except (OSError, AttributeError):
    pass


def _check_new(out_dir: str) -> None:
  if os.path.exists(out_dir):
    raise FileExistsError(f"{os.path.abspath(out_dir)} already exists; choose a new "
                          "output folder (nothing was written)")


def _new_output(out_dir: str) -> str:
  """A temporary folder next to `out_dir` (which must not exist yet)."""
  out_dir = os.path.abspath(out_dir)
  _check_new(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  return tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)


def _copy_side_files(src: str, dst: str) -> None:
  """Tokenizer, generation config, code...: every plain file but weights."""
  for name in os.listdir(src):
    path = os.path.join(src, name)
    if (os.path.isfile(path) and not name.endswith(WEIGHT_SUFFIXES)
        and name != safetensors_io.INDEX):
      shutil.copy2(path, os.path.join(dst, name))


def convert(in_dir: str, out_dir: str, dtype: str | None = None) -> str:
  """Converts an HF folder into a dsmoe model folder `out_dir` (new).

  Params are stored in `dtype` (default: the checkpoint's, float16 -> float32).
  Returns `out_dir`. The peak host memory is about the largest tensor.
  """
  _check_folder(in_dir)
  _check_new(out_dir)
  hf = hf_config.read(in_dir)
  dtype = dtype or _stored_dtype(in_dir)
  _check_dtype(dtype)
  spec = config_lib.resolve(hf_config.to_dsmoe(hf, dtype=dtype)).model
  layout = hf_layout.params(spec)
  reader = _checked_reader(in_dir, layout)
  _fix_malloc_mmap_threshold()
  tmp = _new_output(out_dir)
  try:
    _copy_side_files(in_dir, tmp)
    params_io.save_streaming(os.path.join(tmp, PARAMS), _lazy_params(reader, layout, dtype))
    os.replace(tmp, os.path.abspath(out_dir))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def _write_hf(spec, params_path: str, prefix: tuple, out_dir: str, *, original: dict | None,
              side_files: str | None, dtype: str | None, max_shard_bytes: int) -> str:
  layout = hf_layout.params(spec)
  saved = params_io.saved_arrays(params_path, prefix)
  params_io.check_matches(params_path, _abstract(layout), prefix)
  dtypes = {p.path: np.dtype(dtype) if dtype else saved[p.path][1] for p in layout}
  if len({str(d) for d in dtypes.values()}) != 1:
    raise HFFormatError(f"{params_path}: params of several dtypes; give dtype=")
  out_dtype = str(next(iter(dtypes.values())))
  owner = {n: p for p in layout for n in p.hf_names}
  tensors = [(n, p.hf_shape(), dtypes[p.path]) for p in layout for n in p.hf_names]

  def load(names):
    """The HF tensors of one shard, from one restore of the dsmoe arrays they need."""
    needed = list(dict.fromkeys(owner[n] for n in names))
    restored = params_io.restore_numpy(params_path, [p.path for p in needed], prefix)
    arrays = {}
    for p in needed:
      pieces = p.to_hf(restored.pop(p.path), dtypes[p.path])
      arrays.update((n, x) for n, x in zip(p.hf_names, pieces) if n in names)
    return arrays

  _fix_malloc_mmap_threshold()
  tmp = _new_output(out_dir)
  try:
    if side_files:
      _copy_side_files(side_files, tmp)
    safetensors_io.write(tmp, tensors, load, max_shard_bytes)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config.to_hf(spec, original, dtype=out_dtype), f, indent=2)
      f.write("\n")
    os.replace(tmp, os.path.abspath(out_dir))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def _abstract(layout) -> dict:
  tree = {}
  for p in layout:
    hf_layout.set_path(tree, p.path, jax.ShapeDtypeStruct(p.shape, np.float32))
  return tree


def export(model_dir: str, out_dir: str, dtype: str | None = None,
           max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
  """Writes a dsmoe model folder back as an HF folder `out_dir` (new):
  config.json (the original's keys kept), safetensors shards + index and the
  side files. `dtype` default: the stored one, so a round trip is bit-exact."""
  _check_folder(model_dir)
  _check_new(out_dir)
  if not is_model_folder(model_dir):
    raise HFFormatError(f"{model_dir}: not a dsmoe model folder (no {PARAMS}/)")
  hf = hf_config.read(model_dir)
  spec = config_lib.resolve(hf_config.to_dsmoe(hf)).model
  return _write_hf(spec, os.path.join(model_dir, PARAMS), (), out_dir, original=hf,
                   side_files=model_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)


def export_run(config, workdir: str, out_dir: str, step: int | None = None,
               dtype: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
  """Writes the params of a training run's checkpoint `step` (default latest)
  as an HF folder. When ``train.init_from`` names a model folder, its
  config.json keys and side files (tokenizer) are carried over."""
  _check_new(out_dir)
  spec = config_lib.resolve(config)
  path, prefix = params_io.run_checkpoint(workdir, step)
  source = spec.train.init_from if spec.train.init_from else None
  source = source if source and is_model_folder(source) else None
  original = hf_config.read(source) if source else None
  return _write_hf(spec.model, path, prefix, out_dir, original=original, side_files=source,
                   dtype=dtype, max_shard_bytes=max_shard_bytes)


__all__ = ["HFConfigError", "HFFormatError", "SafetensorsError", "convert", "export",
           "export_run", "load_hf", "load_text_model", "model_config"]
