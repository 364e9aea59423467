"""Which HF tensors make each dsmoe parameter, and how.

Torch ``Linear`` weights are stored ``[out, in]``; dsmoe keeps ``[in, out]``
with the head axes split (``w_q_dnh`` [D, N, H] is ``q_proj.weight`` [N*H, D]
transposed) and the routed experts of a layer stacked (``w_gate_edf`` [E, D, F]
is ``mlp.experts.{e}.gate_proj.weight`` [F, D] of every expert e, transposed).
Norm scales and the embedding table are copied as they are.

A :class:`Param` is one dsmoe parameter and the HF tensors it is made of;
:func:`params` lists them for a model, in the order of the HF state dict.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dsmoe.spec import ModelSpec


@dataclasses.dataclass(frozen=True)
class Param:
  """One dsmoe parameter: its path, shape, and the HF tensors it comes from.

  kind "copy": one HF tensor, the same array. kind "linear": one HF [out, in]
  tensor per stacked slice (one slice, or one per routed expert when
  `stacked`); the first `n_in` dsmoe axes (after the expert axis) are "in".
  """
  path: str  # "blocks/3/attn/w_q_dnh"
  shape: tuple[int, ...]
  hf_names: tuple[str, ...]
  kind: str = "linear"
  n_in: int = 1
  stacked: bool = False

  @property
  def slice_shape(self) -> tuple[int, ...]:
    return self.shape[1:] if self.stacked else self.shape

  def hf_shape(self) -> tuple[int, ...]:
    """The shape of each of its HF tensors."""
    s = self.slice_shape
    if self.kind == "copy":
      return s
    return (math.prod(s[self.n_in:]), math.prod(s[:self.n_in]))

  def to_dsmoe(self, hf_arrays: list[np.ndarray], dtype) -> np.ndarray:
    """The dsmoe array (C-contiguous, `dtype`) from its HF tensors."""
    if self.kind == "copy":
      return np.ascontiguousarray(hf_arrays[0].astype(dtype, copy=False))
    out = np.empty(self.shape, dtype)
    slices = out if self.stacked else out[None]
    for dst, src in zip(slices, hf_arrays):
      dst[...] = src.T.reshape(self.slice_shape)
    return out

  def to_hf(self, array: np.ndarray, dtype) -> list[np.ndarray]:
    """Its HF tensors (C-contiguous, `dtype`) from the dsmoe array."""
    if self.kind == "copy":
      return [np.ascontiguousarray(array.astype(dtype, copy=False))]
    slices = array if self.stacked else array[None]
    n_in = math.prod(self.slice_shape[:self.n_in])
    return [np.ascontiguousarray(x.reshape(n_in, -1).T.astype(dtype, copy=False))
            for x in slices]


def _mlp(prefix: str, hf_prefix: str, d: int, f: int) -> list[Param]:
  return [Param(f"{prefix}/w_gate_df", (d, f), (f"{hf_prefix}.gate_proj.weight",)),
          Param(f"{prefix}/w_up_df", (d, f), (f"{hf_prefix}.up_proj.weight",)),
          Param(f"{prefix}/w_down_fd", (f, d), (f"{hf_prefix}.down_proj.weight",))]


def _moe(prefix: str, hf: str, spec: ModelSpec) -> list[Param]:
  moe, d = spec.moe, spec.d_model
  e, f = moe.num_routed_experts, moe.expert_hidden

  def experts(name):
    return tuple(f"{hf}.experts.{i}.{name}.weight" for i in range(e))
  out = [Param(f"{prefix}/w_gate_edf", (e, d, f), experts("gate_proj"), stacked=True),
         Param(f"{prefix}/w_up_edf", (e, d, f), experts("up_proj"), stacked=True),
         Param(f"{prefix}/w_down_efd", (e, f, d), experts("down_proj"), stacked=True),
         Param(f"{prefix}/router/w_de", (d, e), (f"{hf}.gate.weight",))]
  if moe.num_shared_experts:
    out += _mlp(f"{prefix}/shared", f"{hf}.shared_experts", d,
                moe.num_shared_experts * f)
  return out


def params(spec: ModelSpec) -> list[Param]:
  """Every dsmoe parameter of `spec` with its HF tensors."""
  d, n, h = spec.d_model, spec.num_heads, spec.head_dim
  out = [Param("embed/table_vd", (spec.vocab_size, d), ("model.embed_tokens.weight",),
               kind="copy")]
  for i in range(spec.num_layers):
    p, hf = f"blocks/{i}", f"model.layers.{i}"
    out += [Param(f"{p}/attn/w_{x}_dnh", (d, n, h), (f"{hf}.self_attn.{x}_proj.weight",))
            for x in "qkv"]
    out.append(Param(f"{p}/attn/w_o_nhd", (n, h, d), (f"{hf}.self_attn.o_proj.weight",),
                     n_in=2))
    if spec.is_moe_layer(i):
      out += _moe(f"{p}/ffn", f"{hf}.mlp", spec)
    else:
      out += _mlp(f"{p}/ffn", f"{hf}.mlp", d, spec.dense_hidden)
    out += [Param(f"{p}/attn_norm/scale_d", (d,), (f"{hf}.input_layernorm.weight",),
                  kind="copy"),
            Param(f"{p}/ffn_norm/scale_d", (d,), (f"{hf}.post_attention_layernorm.weight",),
                  kind="copy")]
  out += [Param("final_norm/scale_d", (d,), ("model.norm.weight",), kind="copy"),
          Param("w_head_dv", (d, spec.vocab_size), ("lm_head.weight",))]
  return out


def set_path(tree: dict, path: str, value) -> None:
  """tree["blocks"][3]["attn"]["w_q_dnh"] = value for path "blocks/3/attn/w_q_dnh"."""
  *parents, last = [int(k) if k.isdigit() else k for k in path.split("/")]
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[last] = value
