"""Sharding rules: parameter kind -> PartitionSpec, in one table.

A parameter's kind is its name (the shape letters say what each dimension
is). Routed expert weights are split over `expert` on their expert dimension
and over `fsdp` on d_model; every other weight is split over `fsdp` on one
dimension (FSDP) and replicated over `data` and `expert`. The optimizer
state mirrors the parameters (Adam's moments are found by the same names);
scalars (step counters) are replicated.

Two adjustments keep the table short:
  * a stacked layer axis in front (``model.scan_layers``) is left unsplit;
  * a dimension that an axis does not divide stays unsplit on that axis
    (e.g. a vocabulary of 50257 over fsdp=8).
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

# name -> one entry per dimension: the mesh axis it is split over, or None.
RULES: dict[str, tuple] = {
    "table_vd": ("fsdp", None),  # embedding [V, D]
    "w_head_dv": ("fsdp", None),  # LM head [D, V]
    "w_q_dnh": ("fsdp", None, None),  # attention [D, N, H]
    "w_k_dnh": ("fsdp", None, None),
    "w_v_dnh": ("fsdp", None, None),
    "w_o_nhd": (None, None, "fsdp"),  # [N, H, D]
    "w_gate_df": ("fsdp", None),  # dense / shared-expert MLP [D, F]
    "w_up_df": ("fsdp", None),
    "w_down_fd": (None, "fsdp"),  # [F, D]
    "w_de": ("fsdp", None),  # router [D, E]
    "scale_d": (None,),  # RMSNorm: small, replicated
    "w_gate_edf": ("expert", "fsdp", None),  # routed experts [E, D, F]
    "w_up_edf": ("expert", "fsdp", None),
    "w_down_efd": ("expert", None, "fsdp"),  # [E, F, D]
}


def _name(path) -> str | None:
  for k in reversed(path):
    key = getattr(k, "key", getattr(k, "name", None))
    if isinstance(key, str):
      return key
  return None


def spec_for(name: str | None, shape: tuple[int, ...], axis_sizes: dict[str, int]) -> P:
  """The PartitionSpec of an array called `name` of `shape` on a mesh with
  `axis_sizes` ({axis: size}); unknown names and scalars are replicated."""
  rule = RULES.get(name)
  if rule is None or len(shape) < len(rule):
    return P()
  rule = (None,) * (len(shape) - len(rule)) + tuple(rule)  # stacked layer axes
  dims = [a if a is not None and a in axis_sizes and n % axis_sizes[a] == 0 else None
          for a, n in zip(rule, shape)]
  dims = [None if a is not None and axis_sizes[a] == 1 else a for a in dims]
  while dims and dims[-1] is None:
    dims.pop()
  return P(*dims)


def mesh_axis_sizes(mesh) -> dict[str, int]:
  return dict(mesh.shape)


def tree_specs(tree, mesh):
  """PartitionSpecs for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
  sizes = mesh_axis_sizes(mesh)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: spec_for(_name(path), tuple(x.shape), sizes), tree)


def tree_shardings(tree, mesh):
  """NamedShardings for every leaf of `tree` on `mesh` (see RULES)."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), tree_specs(tree, mesh),
                      is_leaf=lambda x: isinstance(x, P))


def with_shardings(shapes, mesh):
  """`shapes` (ShapeDtypeStructs) with their shardings on `mesh` attached."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, tree_shardings(shapes, mesh))
