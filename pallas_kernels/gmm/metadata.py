"""Group metadata of the grouped matmuls, computed in jnp before a kernel runs.

Rows of lhs [m, k] are grouped: group g owns rows [start_g, end_g), with
end_g = sizes_0 + ... + sizes_g (groups are consecutive, possibly empty). A
call works on the local groups g = offset .. offset + L - 1 only (expert
parallelism: the weights of L experts live here); rows of other groups are
outside its work.

Two views of that metadata:

* :func:`visit_schedule` (TPU kernels): a list of "visits", each one
  (m-tile, local group) pair, in the order the Mosaic grid walks them.
  Visits are sorted by tile and by group at once (groups are consecutive row
  ranges), so an output block is only ever revisited by consecutive grid
  steps, which the TPU pipeline needs. Every m-tile gets at least one visit
  (gmm writes zeros where no local group owns the rows) and every local group
  gets at least one visit (tgmm writes zeros for an empty group). A tile that
  straddles two groups is visited once per group, each visit masked to its
  rows. The count is at most tiles_m + L - 1 (a static bound); only the
  first `num_visits` are live.

* :func:`tile_groups` (GPU kernels): for each m-tile, the first local group
  touching it and how many local groups do (a straddling tile loops over
  them inside one program).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class GroupRanges(NamedTuple):
  """Row ranges of the L local groups, clipped to [0, m)."""
  start_l: jax.Array  # [L] int32 first row of local group l
  end_l: jax.Array  # [L] int32 one past its last row


def local_ranges(group_sizes: jax.Array, m: int, group_offset, num_local: int) -> GroupRanges:
  """Rows of the groups group_offset .. group_offset + num_local - 1."""
  sizes_g = group_sizes.astype(jnp.int32)
  end_g = jnp.cumsum(sizes_g)
  start_g = end_g - sizes_g
  offset = jnp.asarray(group_offset, jnp.int32)
  start_l = jax.lax.dynamic_slice_in_dim(start_g, offset, num_local)
  end_l = jax.lax.dynamic_slice_in_dim(end_g, offset, num_local)
  return GroupRanges(jnp.minimum(start_l, m), jnp.minimum(end_l, m))


class Schedule(NamedTuple):
  """The TPU visit list; arrays of static length V = tiles_m + L - 1."""
  tile_v: jax.Array  # m-tile of the visit (the output block of gmm)
  group_v: jax.Array  # local group of the visit (the output block of tgmm)
  lo_v: jax.Array  # first row the visit computes (absolute row index)
  hi_v: jax.Array  # one past its last row; lo_v == hi_v: nothing to compute
  fetch_tile_v: jax.Array  # m-tile to load: the visit's, or for an idle visit
  fetch_group_v: jax.Array  # (lo == hi) the nearest live one's, so no new DMA
  num_visits: jax.Array  # [1] number of visits to run (the rest are padding)
  first_group_visit: jax.Array  # [1] index of the first visit of a local group
  num_group_visits: jax.Array  # [1] visits from there that belong to local groups


def _nearest_live(live_v: jax.Array) -> jax.Array:
  """Index of the last live visit at or before each visit (else the first live one)."""
  v = live_v.shape[0]
  iota = jnp.arange(v, dtype=jnp.int32)
  last_live = jax.lax.cummax(jnp.where(live_v, iota, -1))
  first_live = jnp.argmax(live_v).astype(jnp.int32)  # 0 if none is live
  return jnp.where(last_live >= 0, last_live, first_live)


def visit_schedule(ranges: GroupRanges, m: int, tm: int) -> Schedule:
  """Visits: tiles before the local rows, then each local group's tiles, then
  the tiles after (see the module docstring)."""
  start_l, end_l = ranges
  num_local = start_l.shape[0]
  tiles_m = -(-m // tm)
  size_v = tiles_m + num_local - 1
  nonempty_l = end_l > start_l
  first_tile_l = jnp.minimum(start_l // tm, tiles_m - 1)  # [L]
  last_tile_l = jnp.where(nonempty_l, (end_l - 1) // tm, first_tile_l)  # [L]
  count_l = last_tile_l - first_tile_l + 1  # [L] >= 1 visit per local group
  before = first_tile_l[0]  # tiles before the first local group's first tile
  after_first = last_tile_l[-1] + 1  # first tile after the last group's visits
  group_visits = jnp.sum(count_l)
  total = before + group_visits + (tiles_m - after_first)

  i = jnp.arange(size_v, dtype=jnp.int32)
  j = jnp.clip(i - before, 0, group_visits - 1)  # index among the group visits
  cum_l = jnp.cumsum(count_l)
  g = jnp.minimum(jnp.searchsorted(cum_l, j, side="right"), num_local - 1).astype(jnp.int32)
  tile_in_group = first_tile_l[g] + j - (cum_l[g] - count_l[g])
  in_pre, in_post = i < before, i >= before + group_visits
  tile_v = jnp.where(in_pre, i, jnp.where(in_post, after_first + i - before - group_visits,
                                          tile_in_group))
  tile_v = jnp.minimum(tile_v, tiles_m - 1).astype(jnp.int32)  # padding: the last tile
  group_v = jnp.where(in_pre, 0, jnp.where(in_post, num_local - 1, g)).astype(jnp.int32)
  active = ~in_pre & ~in_post
  lo_v = jnp.where(active, jnp.maximum(start_l[g], tile_v * tm), 0).astype(jnp.int32)
  hi_v = jnp.where(active, jnp.minimum(end_l[g], tile_v * tm + tm), 0).astype(jnp.int32)
  hi_v = jnp.maximum(hi_v, lo_v)
  near = _nearest_live((hi_v > lo_v) & (i < total))
  return Schedule(tile_v, group_v, lo_v, hi_v, tile_v[near], group_v[near],
                  total.astype(jnp.int32)[None], before.astype(jnp.int32)[None],
                  group_visits.astype(jnp.int32)[None])


class TileGroups(NamedTuple):
  """For each m-tile j, the local groups first_j .. first_j + count_j - 1 touch it."""
  first_j: jax.Array  # [tiles_m] int32
  count_j: jax.Array  # [tiles_m] int32 (0: no local row in the tile)


def tile_groups(ranges: GroupRanges, m: int, tm: int) -> TileGroups:
  """Local groups whose rows meet each m-tile (empty groups at a tile edge excluded)."""
  start_l, end_l = ranges
  tiles_m = -(-m // tm)
  tile_start = jnp.arange(tiles_m, dtype=jnp.int32) * tm
  ended = jnp.searchsorted(end_l, tile_start, side="right")  # groups ending <= tile start
  started = jnp.searchsorted(start_l, tile_start + tm, side="left")  # starting < tile end
  count = jnp.maximum(started - ended, 0)
  return TileGroups(ended.astype(jnp.int32), count.astype(jnp.int32))
