"""Block layouts and the lookup tables the kernels read.

A pattern's element mask is cut into `block_size x block_size` tiles. A tile
with at least one kept element is a *kept block*; only kept blocks are
computed. Kept blocks whose tile is not all-true carry a per-element mask
(the causal diagonal, a window edge, a summary column that does not fill a
block), stored once per distinct tile.

Dimension letters used below:
  Hl  layout heads (1 when every attention head shares the layout)
  Nb  blocks along the sequence (seq_len // block_size)
  Z   number of kept blocks (nnz) over all layout heads
  M   number of distinct partial-tile masks
  b   block size

Tables (all int32 except `masks`), computed once per (pattern, seq_len, block):
  blocks      [Z, 3]      (h, I, J) of each kept block, sorted by (h, I, J)
  row_offsets [Hl*Nb+1]   blocks of row (h, I) are blocks[row_offsets[h*Nb+I]:...+1]
  col_offsets [Hl*Nb+1]   column (h, J) lists col_blocks[col_offsets[h*Nb+J]:...+1]
  col_blocks  [Z]         block indices, sorted by (h, J, I)
  mask_index  [Z]         -1 for a full tile, else an index into masks
  masks       [M, b, b]   bool, the distinct partial tiles, at [query i, key j]

and what the fused kernels compute of each partial tile (`mask_tables`), in
groups of 16 keys g = 0 .. ceil(b/16) - 1 (keys 16g .. 16g + 15); every lo and
hi is a multiple of 16 in [0, b]:
  mask_key_range   [M, 2]             the keys [lo, hi) that some query sees;
                                      (0, 0) for a tile no query sees anything of
  mask_query_range [M, ceil(b/16), 2] per key group, the queries [lo, hi) that
                                      see any of its keys; (0, 0) where none does
  mask_split       [M]                bool, true if a seen group's query range is
                                      narrower than [0, b): the kernels then
                                      compute the tile group by group, each on
                                      its queries only (a causal diagonal tile)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import numpy as np

# keep(h, i, j) -> bool array, broadcasting over integer arrays i (query) and j (key).
KeepFn = Callable[[int, np.ndarray, np.ndarray], np.ndarray]
# candidates(h, num_blocks, block_size) -> bool [Nb, Nb]: a superset of the kept blocks.
CandidatesFn = Callable[[int, int, int], np.ndarray]

# Elements evaluated per numpy chunk when expanding tiles (bounds peak memory).
_CHUNK_ELEMENTS = 1 << 24


@dataclasses.dataclass(frozen=True, eq=False)
class BlockTables:
  """Lookup tables of one block layout (see the module docstring)."""

  seq_len: int
  block_size: int
  num_layout_heads: int
  blocks: np.ndarray
  row_offsets: np.ndarray
  col_offsets: np.ndarray
  col_blocks: np.ndarray
  mask_index: np.ndarray
  masks: np.ndarray
  mask_key_range: np.ndarray
  mask_query_range: np.ndarray
  mask_split: np.ndarray

  @property
  def num_blocks(self) -> int:
    return self.seq_len // self.block_size

  @property
  def nnz(self) -> int:
    return int(self.blocks.shape[0])

  @property
  def block_density(self) -> float:
    """Fraction of the `Hl x Nb x Nb` tiles that are kept."""
    return self.nnz / float(self.num_layout_heads * self.num_blocks**2)

  def layout(self) -> np.ndarray:
    """The kept-block layout, bool `[Hl, Nb, Nb]`."""
    out = np.zeros((self.num_layout_heads, self.num_blocks, self.num_blocks), bool)
    out[self.blocks[:, 0], self.blocks[:, 1], self.blocks[:, 2]] = True
    return out

  def element_mask(self) -> np.ndarray:
    """Expands the tables back to the element mask `[Hl, N, N]` (for tests)."""
    b, nb = self.block_size, self.num_blocks
    tiles = np.ones((self.nnz, b, b), bool)
    partial = self.mask_index >= 0
    tiles[partial] = self.masks[self.mask_index[partial]]
    out = np.zeros((self.num_layout_heads, nb, b, nb, b), bool)
    h, i, j = self.blocks[:, 0], self.blocks[:, 1], self.blocks[:, 2]
    out[h, i, :, j, :] = tiles
    return out.reshape(self.num_layout_heads, self.seq_len, self.seq_len)

  def visible_rows(self) -> np.ndarray:
    """bool `[Hl, N]`: query rows that can see at least one key."""
    return self.element_mask().any(axis=-1)


def mask_tables(masks: np.ndarray):
  """The fused kernels' ranges of tile masks (see the module docstring).

  Args:
    masks: bool `[M, b, b]` at [query i, key j].

  Returns:
    (mask_key_range int32 `[M, 2]`, mask_query_range int32 `[M, ceil(b/16), 2]`,
    mask_split bool `[M]`).
  """
  m, b, _ = masks.shape
  g = -(-b // 16)
  keys = np.zeros((m, b, g * 16), bool)
  keys[:, :, :b] = masks
  sees = keys.reshape(m, b, g, 16).any(axis=3)                  # (M, b, G) query i sees group g
  seen = sees.any(axis=1)                                       # (M, G)
  up = lambda x: np.minimum((x + 15) // 16 * 16, b)             # round up to 16, at most b
  q_lo = np.argmax(sees, axis=1) // 16 * 16                     # (M, G) first query, rounded down
  q_hi = up(b - np.argmax(sees[:, ::-1], axis=1))               # (M, G) one past the last
  query_range = np.where(seen[..., None], np.stack([q_lo, q_hi], axis=-1), 0)
  any_seen = seen.any(axis=1)                                   # (M,)
  k_lo = 16 * np.argmax(seen, axis=1)                           # (M,) first seen group
  k_hi = up(16 * (g - np.argmax(seen[:, ::-1], axis=1)))        # (M,) past the last one
  key_range = np.where(any_seen[:, None], np.stack([k_lo, k_hi], axis=-1), 0)
  split = (seen & (q_hi - q_lo < b)).any(axis=1)
  return (key_range.astype(np.int32).reshape(m, 2),
          query_range.astype(np.int32).reshape(m, g, 2), split.reshape(m))


def tables_from_layout(layout: np.ndarray, tiles: np.ndarray, tile_of_block: np.ndarray,
                       block_size: int) -> BlockTables:
  """Builds tables from a kept-block layout and the element tile of each kept block.

  Args:
    layout: bool `[Hl, Nb, Nb]`.
    tiles: bool `[T, b, b]`, candidate tiles (may repeat).
    tile_of_block: int `[Z]`, the tile of each kept block, in
      `np.nonzero(layout)` order.
    block_size: b.
  """
  hl, nb, _ = layout.shape
  h, i, j = np.nonzero(layout)                                   # (Z,) each, sorted by (h, I, J)
  blocks = np.stack([h, i, j], axis=1).astype(np.int32)          # (Z, 3)
  row_offsets = np.searchsorted(h * nb + i, np.arange(hl * nb + 1)).astype(np.int32)
  col_blocks = np.lexsort((i, j, h)).astype(np.int32)            # (Z,) sorted by (h, J, I)
  col_key = (h * nb + j)[col_blocks]
  col_offsets = np.searchsorted(col_key, np.arange(hl * nb + 1)).astype(np.int32)

  # Distinct partial tiles: full tiles map to -1, the others to their class.
  flat = tiles.reshape(tiles.shape[0], -1)                       # (T, b*b)
  tile_class = np.full(tiles.shape[0], -1, np.int64)             # (T,)
  partial = ~flat.all(axis=1)
  masks = np.zeros((0, block_size, block_size), bool)
  if partial.any():
    packed = np.packbits(flat[partial], axis=1)
    _, first, inverse = np.unique(packed, axis=0, return_index=True, return_inverse=True)
    masks = tiles[np.nonzero(partial)[0][first]]
    tile_class[partial] = inverse.reshape(-1)
  mask_index = tile_class[tile_of_block].astype(np.int32)        # (Z,)
  masks = np.ascontiguousarray(masks)                            # (M, b, b)
  key_range, query_range, split = mask_tables(masks)
  return BlockTables(
      seq_len=nb * block_size, block_size=block_size, num_layout_heads=hl,
      blocks=blocks, row_offsets=row_offsets, col_offsets=col_offsets,
      col_blocks=col_blocks, mask_index=mask_index, masks=masks, mask_key_range=key_range,
      mask_query_range=query_range, mask_split=split)


def _tiles(keep: KeepFn, h: int, bi: np.ndarray, bj: np.ndarray, b: int) -> np.ndarray:
  """Evaluates keep on the tiles of blocks (bi, bj): bool [len(bi), b, b]."""
  out = np.empty((bi.shape[0], b, b), bool)
  step = max(1, _CHUNK_ELEMENTS // (b * b))
  a = np.arange(b, dtype=np.int64)
  for s in range(0, bi.shape[0], step):
    i = bi[s:s + step, None, None].astype(np.int64) * b + a[None, :, None]  # (k, b, 1)
    j = bj[s:s + step, None, None].astype(np.int64) * b + a[None, None, :]  # (k, 1, b)
    out[s:s + step] = np.broadcast_to(keep(h, i, j), (i.shape[0], b, b))
  return out


def tables_from_keep(keep: KeepFn, num_layout_heads: int, seq_len: int, block_size: int,
                     period: Optional[int] = None,
                     candidates: Optional[CandidatesFn] = None) -> BlockTables:
  """Computes the tables of an element predicate without an `N x N` pass.

  Args:
    keep: the element predicate `keep(h, i, j)`.
    num_layout_heads: Hl; `keep` is called with h in `range(Hl)`.
    seq_len: N, a multiple of `block_size`.
    block_size: b.
    period: if set, `keep(h, i, j)` depends only on `(i mod period, i - j)`
      (true of windows, strides and causality). The tiles are then evaluated
      once per distinct `(I mod p, I - J)` pair: cost O(p * Nb * b^2).
    candidates: otherwise, a function giving a superset of the kept blocks of
      a head; only those tiles are evaluated. Default: every block.
  """
  b = block_size
  nb = seq_len // b
  layouts, tiles, tile_of_block = [], [], []
  num_tiles = 0
  for h in range(num_layout_heads):
    if period is not None:
      p = math.lcm(period, b) // b                            # block rows per period
      r = np.repeat(np.arange(p), 2 * nb - 1)                 # (p*(2Nb-1),)  I mod p
      d = np.tile(np.arange(-(nb - 1), nb), p)                # (p*(2Nb-1),)  I - J
      rep = _tiles(keep, h, r, r - d, b)                      # (p*(2Nb-1), b, b)
      kept = rep.reshape(rep.shape[0], -1).any(axis=1)
      bi, bj = np.meshgrid(np.arange(nb), np.arange(nb), indexing="ij")
      key = (bi % p) * (2 * nb - 1) + (bi - bj + nb - 1)      # (Nb, Nb)
      layout = kept[key]                                      # (Nb, Nb)
      tiles.append(rep)
      tile_of_block.append(num_tiles + key[layout])
    else:
      cand = np.ones((nb, nb), bool) if candidates is None else candidates(h, nb, b)
      ci, cj = np.nonzero(cand)
      t = _tiles(keep, h, ci, cj, b)
      hit = t.reshape(t.shape[0], -1).any(axis=1)
      layout = np.zeros((nb, nb), bool)
      layout[ci[hit], cj[hit]] = True
      tiles.append(t[hit])                                    # row-major == nonzero order
      tile_of_block.append(num_tiles + np.arange(int(hit.sum())))
    num_tiles += tiles[-1].shape[0]
    layouts.append(layout)
  return tables_from_layout(np.stack(layouts), np.concatenate(tiles, axis=0),
                            np.concatenate(tile_of_block), b)
