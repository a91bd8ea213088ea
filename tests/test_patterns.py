"""Tests of `sparse_attention_tf.patterns` against brute-force reference masks.

Every reference mask here is built with plain Python loops over (i, j) from
the written specification of each pattern; nothing is derived from the
module's own predicates. The block tables of every plan are then checked
against the reference tiles (layout, sort orders, offsets, partial masks) and
expanded back to the exact element mask.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Callable

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparse_attention_tf import layout as layout_lib  # noqa: E402
from sparse_attention_tf import patterns  # noqa: E402

BLOCK_SIZES = (16, 32, 64)


# ---------------------------------------------------------------------------
# Brute-force references (the specification, written as loops).
# ---------------------------------------------------------------------------
def _loop_mask(n: int, pred: Callable[[int, int], bool]) -> np.ndarray:
  out = np.zeros((n, n), bool)
  for i in range(n):
    row = out[i]
    for j in range(n):
      if pred(i, j):
        row[j] = True
  return out


def ref_dense(n, causal):
  return np.stack([_loop_mask(n, lambda i, j: (j <= i) or not causal)])


def ref_local(n, w, causal):
  if causal:
    return np.stack([_loop_mask(n, lambda i, j: j <= i and i - j < w)])
  return np.stack([_loop_mask(n, lambda i, j: abs(i - j) < w)])


def _a1(l, causal):
  if causal:
    return lambda i, j: j <= i and i - j < l
  return lambda i, j: abs(i - j) < l


def _a2(l, causal):
  if causal:
    return lambda i, j: j <= i and (i - j) % l == 0
  return lambda i, j: (i - j) % l == 0


def ref_strided(n, l, heads, mode, causal):
  a1, a2 = _a1(l, causal), _a2(l, causal)
  if mode == "merged":
    return np.stack([_loop_mask(n, lambda i, j: a1(i, j) or a2(i, j))])
  if mode == "row":
    return np.stack([_loop_mask(n, a1)])
  if mode == "column":
    return np.stack([_loop_mask(n, a2)])
  assert mode == "split" and heads % 2 == 0
  m1, m2 = _loop_mask(n, a1), _loop_mask(n, a2)
  return np.stack([m1] * (heads // 2) + [m2] * (heads // 2))


def ref_fixed(n, l, c, heads, g, causal, mode="merged"):
  num = heads if heads is not None else g
  per_group = []
  for r in range(g):
    lo, hi = l - (r + 1) * c, l - r * c - 1

    def pred(i, j, lo=lo, hi=hi):
      if causal and j > i:
        return False
      window, summary = j // l == i // l, lo <= j % l <= hi
      return {"merged": window or summary, "window": window, "summary": summary}[mode]

    per_group.append(_loop_mask(n, pred))
  return np.stack([per_group[h % g] for h in range(num)])


def ref_longformer(n, w, glob, causal):
  g = set(glob)

  def pred(i, j):
    if causal and j > i:
      return False
    return abs(i - j) < w or i in g or j in g

  return np.stack([_loop_mask(n, pred)])


def ref_custom(n, block_layout, causal):
  lay = np.asarray(block_layout)
  if lay.ndim == 2:
    lay = lay[None]
  heads, nbl = lay.shape[0], lay.shape[1]
  size = n // nbl
  out = []
  for h in range(heads):
    rows = lay[h].tolist()
    out.append(_loop_mask(
        n, lambda i, j, rows=rows: bool(rows[i // size][j // size]) and (j <= i or not causal)))
  return np.stack(out)


def bigbird_base(nb, w, ng):
  """The deterministic (window + global) block set, as nested lists."""
  return [[abs(bi - bj) <= w // 2 or bi < ng or bj < ng for bj in range(nb)]
          for bi in range(nb)]


def check_bigbird_mask(mask, n, block, w, ng, nr, heads, causal):
  """Checks the spec of a BigBird mask; returns it. Raises AssertionError."""
  num = heads or 1
  assert mask.shape == (num, n, n) and mask.dtype == bool
  nb = n // block
  blk = mask.reshape(num, nb, block, nb, block).any(axis=(2, 4))
  # The element mask is the block mask expanded, intersected with j <= i if causal.
  for h in range(num):
    bl = blk[h].tolist()
    expect = _loop_mask(n, lambda i, j: bl[i // block][j // block] and (j <= i or not causal))
    assert np.array_equal(mask[h], expect), f"head {h} is not a block-expanded mask"
  base = bigbird_base(nb, w, ng)
  for h in range(num):
    for bi in range(nb):
      for bj in range(nb):
        if base[bi][bj] and (bj <= bi or not causal):
          assert blk[h, bi, bj], f"window/global block ({bi}, {bj}) missing in head {h}"
      extras = [bj for bj in range(nb) if blk[h, bi, bj] and not base[bi][bj]]
      if bi < ng:
        assert extras == [], f"global row {bi} got random blocks {extras}"
        continue
      limit = bi if causal else nb
      free = [bj for bj in range(limit) if not base[bi][bj]]
      assert set(extras) <= set(free), (h, bi, extras, free)
      assert len(extras) == min(nr, len(free)), (h, bi, extras, nr, free)
  return mask


def ref_perm(n, l):
  """Original position at reordered position k: the [n/l, l] grid read by columns."""
  rows = n // l
  return np.array([r * l + c for c in range(l) for r in range(rows)])


# ---------------------------------------------------------------------------
# Cases.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  make: Callable[[], patterns.Pattern]
  ref: Callable[[int], np.ndarray]   # n -> bool [H, n, n]
  n: int
  plan_ok: Callable[[int, int], bool] = lambda n, b: n % b == 0

  def __repr__(self):
    return self.id


_REF_CACHE: dict = {}


def reference(case: Case) -> np.ndarray:
  if case.id not in _REF_CACHE:
    _REF_CACHE[case.id] = case.ref(case.n)
  return _REF_CACHE[case.id]


def _dense(n, causal):
  return Case(f"Dense-n{n}-c{int(causal)}", lambda: patterns.Dense(causal=causal),
              lambda n: ref_dense(n, causal), n)


def _local(n, w, causal):
  return Case(f"Local-n{n}-w{w}-c{int(causal)}", lambda: patterns.Local(w, causal=causal),
              lambda n: ref_local(n, w, causal), n)


def _strided(n, l, heads, mode, causal):
  def ok(n, b):
    return n % b == 0 and (mode in ("merged", "row") or n % l == 0)
  return Case(f"Strided-n{n}-l{l}-h{heads}-{mode}-c{int(causal)}",
              lambda: patterns.Strided(l, heads=heads, mode=mode, causal=causal),
              lambda n: ref_strided(n, l, heads, mode, causal), n, ok)


def _fixed(n, l, c, g, heads, causal):
  return Case(f"Fixed-n{n}-l{l}-c{c}-g{g}-h{heads}-c{int(causal)}",
              lambda: patterns.Fixed(l, c, heads=heads, head_groups=g, causal=causal),
              lambda n: ref_fixed(n, l, c, heads, g, causal), n,
              lambda n, b: n % b == 0 and l % b == 0)


def _fixed_mode(n, l, c, g, heads, mode, causal):
  return Case(f"Fixed-n{n}-l{l}-c{c}-g{g}-h{heads}-{mode}-c{int(causal)}",
              lambda: patterns.Fixed(l, c, heads=heads, head_groups=g, mode=mode, causal=causal),
              lambda n: ref_fixed(n, l, c, heads, g, causal, mode), n,
              lambda n, b: n % b == 0 and l % b == 0)


def _split(n, l, c, heads):
  """Split: first half of the heads a column-strided pattern, second half Fixed summary."""
  def ref(n):
    col = ref_strided(n, l, None, "column", True)[0]
    summ = ref_fixed(n, l, c, None, 1, True, "summary")[0]
    return np.stack([col] * (heads // 2) + [summ] * (heads // 2))
  return Case(f"Split-n{n}-l{l}-c{c}-h{heads}",
              lambda: patterns.Split([patterns.Strided(l, mode="column"),
                                      patterns.serialize(patterns.Fixed(l, c, mode="summary"))],
                                     heads=heads),
              ref, n, lambda n, b: n % b == 0 and l % b == 0 and n % l == 0)


def _longformer(n, w, glob, causal):
  return Case(f"Longformer-n{n}-w{w}-g{'_'.join(map(str, glob)) or 'none'}-c{int(causal)}",
              lambda: patterns.Longformer(w, global_tokens=glob, causal=causal),
              lambda n: ref_longformer(n, w, glob, causal), n)


def _bigbird(n, block, w, ng, nr, seed, heads, causal):
  kw = dict(block=block, window=w, num_global=ng, num_random=nr, seed=seed, heads=heads,
            causal=causal)
  return Case(f"BigBird-n{n}-B{block}-w{w}-g{ng}-r{nr}-s{seed}-h{heads}-c{int(causal)}",
              lambda: patterns.BigBird(**kw),
              lambda n: check_bigbird_mask(patterns.BigBird(**kw).mask(n), n, block, w, ng,
                                           nr, heads, causal), n)


def random_layout(seed, heads, nbl, density, causal, single_rows=2, two_d=False):
  """A random 0/1 block layout with no empty query row, some rows with one block."""
  rng = np.random.default_rng(seed)
  lay = (rng.random((heads, nbl, nbl)) < density).astype(np.int64)
  for h in range(heads):
    for bi in range(nbl):
      allowed = bi + 1 if causal else nbl
      if not lay[h, bi, :allowed].any():
        lay[h, bi, rng.integers(0, allowed)] = 1
    # Some rows with exactly one block (the only visible one when causal).
    for bi in rng.choice(nbl, size=min(single_rows, nbl), replace=False):
      allowed = bi + 1 if causal else nbl
      lay[h, bi, :] = 0
      lay[h, bi, rng.integers(0, allowed)] = 1
  return lay[0] if two_d else lay


def _custom(n, seed, heads, nbl, density, causal, two_d=False):
  lay = random_layout(seed, heads, nbl, density, causal, two_d=two_d)
  return Case(f"Custom-n{n}-s{seed}-h{heads}-nb{nbl}-d{density}-c{int(causal)}"
              f"{'-2d' if two_d else ''}",
              lambda: patterns.Custom(lay, causal=causal),
              lambda n: ref_custom(n, lay, causal), n)


CASES = [
    _dense(64, True), _dense(128, False), _dense(96, True),
    _local(128, 1, True), _local(128, 5, True), _local(256, 17, True), _local(256, 40, False),
    _local(64, 200, True), _local(192, 33, False), _local(128, 64, True),
    _strided(128, 8, None, "merged", True), _strided(256, 16, None, "merged", True),
    _strided(144, 10, None, "merged", True), _strided(128, 12, 4, "merged", False),
    _strided(256, 16, 4, "split", True), _strided(192, 12, 2, "split", True),
    _strided(128, 32, 6, "split", False), _strided(256, 64, 2, "split", True),
    _strided(96, 6, 2, "split", True),
    _strided(128, 8, None, "row", True), _strided(128, 20, None, "row", False),
    _strided(256, 16, None, "column", True), _strided(192, 24, None, "column", False),
    _strided(128, 4, None, "column", True), _strided(192, 64, None, "column", True),
    _strided(192, 64, 2, "split", False),
    _fixed(128, 32, 4, 1, None, True), _fixed(256, 64, 8, 2, None, True),
    _fixed(192, 64, 5, 3, None, True), _fixed(256, 32, 3, 3, 6, True),
    _fixed(128, 32, 16, 2, 4, False), _fixed(96, 64, 7, 3, None, False),
    _fixed(128, 16, 16, 1, None, True), _fixed(192, 48, 6, 2, 2, True),
    _fixed(256, 128, 10, 3, 3, False), _fixed(64, 32, 1, 1, 3, True),
    _fixed_mode(128, 32, 4, 1, None, "window", True), _fixed_mode(256, 64, 8, 2, 4, "summary", True),
    _fixed_mode(128, 32, 5, 1, None, "summary", False),
    _split(256, 32, 8, 4), _split(128, 16, 4, 2),
    _longformer(128, 5, (0,), False), _longformer(256, 17, (0, 100, 255), False),
    _longformer(128, 1, (), True), _longformer(192, 33, (5, 64), True),
    _longformer(64, 100, (3,), False), _longformer(128, 16, (0, 1, 2, 127), True),
    _bigbird(256, 16, 3, 1, 2, 0, None, False), _bigbird(256, 32, 3, 1, 2, 7, 2, True),
    _bigbird(256, 64, 1, 0, 1, 3, None, False), _bigbird(128, 16, 5, 2, 3, 1, 3, False),
    _bigbird(192, 32, 3, 1, 10, 2, None, False), _bigbird(256, 16, 1, 0, 0, 0, None, True),
    _bigbird(256, 16, 3, 1, 3, 5, 2, True),
    _custom(128, 1, 1, 8, 0.1, True), _custom(256, 2, 2, 16, 0.3, True),
    _custom(256, 3, 3, 8, 0.6, True), _custom(128, 4, 2, 4, 0.2, False),
    _custom(256, 5, 1, 16, 0.45, False), _custom(192, 6, 2, 6, 0.35, True),
    _custom(128, 7, 1, 8, 0.5, True, two_d=True), _custom(256, 8, 1, 2, 0.1, True),
]


def _heads_of(part, num_heads):
  return tuple(range(num_heads)) if part.heads is None else tuple(part.heads)


# ---------------------------------------------------------------------------
# Table checks.
# ---------------------------------------------------------------------------
def loop_mask_tables(masks, b):
  """The fused kernels' mask ranges from their definition (layout.py), by loops.

  Per mask: the groups of 16 keys some query sees give the key range; each
  seen group, the first and last query that sees it, widened to multiples of
  16; split when a seen group's query range is narrower than the tile.
  """
  groups = b // 16
  key_range = np.zeros((len(masks), 2), np.int64)
  query_range = np.zeros((len(masks), groups, 2), np.int64)
  split = np.zeros(len(masks), bool)
  for m, tile in enumerate(masks):
    seen = []
    for g in range(groups):
      queries = [i for i in range(b) for j in range(16 * g, 16 * g + 16) if tile[i, j]]
      if not queries:
        continue
      seen.append(g)
      lo, hi = min(queries) // 16 * 16, (max(queries) + 16) // 16 * 16
      query_range[m, g] = (lo, hi)
      split[m] |= hi - lo < b
    if seen:
      key_range[m] = (16 * seen[0], 16 * seen[-1] + 16)
  return key_range, query_range, split


def check_mask_tables(t):
  """t's mask_key_range, mask_query_range, mask_split against loop_mask_tables."""
  b, m = t.block_size, t.masks.shape[0]
  key_range, query_range, split = loop_mask_tables(t.masks, b)
  assert t.mask_key_range.dtype == np.int32 and t.mask_key_range.shape == (m, 2)
  assert t.mask_query_range.dtype == np.int32 and t.mask_query_range.shape == (m, b // 16, 2)
  assert t.mask_split.dtype == bool and t.mask_split.shape == (m,)
  np.testing.assert_array_equal(t.mask_key_range, key_range)
  np.testing.assert_array_equal(t.mask_query_range, query_range)
  np.testing.assert_array_equal(t.mask_split, split)


def check_tables(t, ref, b):
  """Checks BlockTables `t` against the reference element mask `ref` [Hl, N, N]."""
  hl, n = ref.shape[0], ref.shape[1]
  nb = n // b
  assert isinstance(t, layout_lib.BlockTables)
  assert (t.seq_len, t.block_size, t.num_layout_heads) == (n, b, hl)
  tiles = ref.reshape(hl, nb, b, nb, b).transpose(0, 1, 3, 2, 4)    # [Hl, Nb, Nb, b, b]
  expected = [(h, bi, bj) for h in range(hl) for bi in range(nb) for bj in range(nb)
              if tiles[h, bi, bj].any()]
  z = len(expected)

  blocks = np.asarray(t.blocks)
  assert blocks.shape == (z, 3)
  assert [tuple(x) for x in blocks.tolist()] == expected     # kept blocks, sorted by (h, I, J)
  assert t.nnz == z

  ro = np.asarray(t.row_offsets).tolist()
  assert len(ro) == hl * nb + 1 and ro[0] == 0 and ro[-1] == z
  assert all(a <= c for a, c in zip(ro, ro[1:]))
  for h in range(hl):
    for bi in range(nb):
      k = h * nb + bi
      assert [tuple(x) for x in blocks[ro[k]:ro[k + 1]].tolist()] == \
          [e for e in expected if e[0] == h and e[1] == bi]

  co = np.asarray(t.col_offsets).tolist()
  cb = np.asarray(t.col_blocks).tolist()
  assert len(co) == hl * nb + 1 and co[0] == 0 and co[-1] == z
  assert all(a <= c for a, c in zip(co, co[1:]))
  assert sorted(cb) == list(range(z))
  for h in range(hl):
    for bj in range(nb):
      k = h * nb + bj
      got = [tuple(blocks[x]) for x in cb[co[k]:co[k + 1]]]
      assert got == [e for e in sorted(expected, key=lambda e: (e[0], e[2], e[1]))
                     if e[0] == h and e[2] == bj]

  masks = np.asarray(t.masks)
  mi = np.asarray(t.mask_index).tolist()
  m = masks.shape[0]
  assert masks.dtype == bool and masks.shape == (m, b, b)
  assert len(mi) == z and all(-1 <= x < m for x in mi)
  assert len({x.tobytes() for x in masks}) == m, "partial masks are not distinct"
  for idx, (h, bi, bj) in enumerate(expected):
    tile = tiles[h, bi, bj]
    assert tile.any()
    if mi[idx] == -1:
      assert tile.all(), f"block {(h, bi, bj)} marked full but is partial"
    else:
      assert not tile.all(), f"full block {(h, bi, bj)} carries a mask"
      assert np.array_equal(masks[mi[idx]], tile), f"wrong tile mask for {(h, bi, bj)}"

  for name in ("blocks", "row_offsets", "col_offsets", "col_blocks", "mask_index"):
    assert np.asarray(getattr(t, name)).dtype == np.int32, name

  check_mask_tables(t)
  expanded = t.element_mask()
  assert expanded.shape == (hl, n, n)
  assert np.array_equal(expanded, ref)


# ---------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_mask_tables_of_random_tiles(block):
  """tables_from_layout's mask ranges on random tiles, fresh each run: scattered
  elements, causal and banded tiles, empty groups between seen ones, empty tiles."""
  rng = np.random.default_rng()
  nb = 3
  layout = rng.random((2, nb, nb)) < 0.7
  layout[:, 0, 0] = True
  z = int(layout.sum())
  i, j = np.meshgrid(np.arange(block), np.arange(block), indexing="ij")
  kinds = [lambda: rng.random((block, block)) < rng.uniform(0.01, 0.5),
           lambda: j <= i,
           lambda: (abs(i - j) < rng.integers(1, block)) & (rng.random((block, block)) < 0.9),
           lambda: (j // 16 % 2 == 0) & (i >= rng.integers(0, block)),
           lambda: np.zeros((block, block), bool),
           lambda: np.ones((block, block), bool)]
  tiles = np.stack([kinds[rng.integers(len(kinds))]() for _ in range(z)])
  t = layout_lib.tables_from_layout(layout, tiles, np.arange(z), block)
  assert t.masks.shape[0] >= 1
  check_mask_tables(t)
  full = layout_lib.tables_from_layout(layout, np.ones((z, block, block), bool), np.arange(z),
                                       block)
  assert full.masks.shape == (0, block, block)     # no partial tile: empty mask tables
  check_mask_tables(full)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_mask_matches_reference(case):
  ref = reference(case)
  mask = case.make().mask(case.n)
  assert isinstance(mask, np.ndarray) and mask.dtype == bool
  assert mask.shape == ref.shape
  for h in range(ref.shape[0]):
    assert np.array_equal(mask[h], ref[h]), f"head {h} differs"


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_plan_matches_reference(case, block_size):
  pattern = case.make()
  n = case.n
  if not case.plan_ok(n, block_size):
    with pytest.raises(ValueError):
      pattern.plan(n, block_size)
    return
  ref = reference(case)
  num_heads = ref.shape[0]
  plan = pattern.plan(n, block_size)
  assert (plan.num_heads, plan.seq_len, plan.block_size) == (num_heads, n, block_size)
  assert len(plan.parts) >= 1

  covered = []
  for part in plan.parts:
    heads = _heads_of(part, num_heads)
    covered.extend(heads)
    t = part.tables
    hl = t.num_layout_heads
    assert 1 <= hl <= len(heads)
    if part.transpose is None:
      perm = np.arange(n)
    else:
      assert n % part.transpose == 0
      perm = ref_perm(n, part.transpose)
    expected = [None] * hl
    for k, h in enumerate(heads):
      head_ref = ref[h][np.ix_(perm, perm)]
      if expected[k % hl] is None:
        expected[k % hl] = head_ref
      else:
        assert np.array_equal(expected[k % hl], head_ref), (
            f"heads sharing layout head {k % hl} need different masks")
    check_tables(t, np.stack(expected), block_size)
  assert sorted(covered) == list(range(num_heads)), "parts must cover every head once"
  assert plan.nnz == sum(p.tables.nnz for p in plan.parts)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_density(case):
  ref = reference(case)
  assert case.make().density(case.n) == pytest.approx(float(ref.mean()), rel=1e-12, abs=0)


@pytest.mark.parametrize("n,l", [(128, 8), (96, 12), (64, 64), (256, 16), (48, 3), (10, 1)])
def test_transpose_permutation(n, l):
  perm = np.asarray(patterns.transpose_permutation(n, l))
  assert perm.tolist() == ref_perm(n, l).tolist()


def test_split_uses_transposed_column_part():
  """The column component of split/column runs on the transposed sequence (spec of Part)."""
  for p in (patterns.Strided(16, heads=4, mode="split"), patterns.Strided(16, mode="column")):
    transposed = [part for part in p.plan(256, 16).parts if part.transpose is not None]
    assert [part.transpose for part in transposed] == [16]


# --- Strided / Fixed details ------------------------------------------------
def test_strided_head_counts():
  assert patterns.Strided(8).mask(64).shape == (1, 64, 64)
  assert patterns.Strided(8, mode="row").mask(64).shape == (1, 64, 64)
  assert patterns.Strided(8, mode="column").mask(64).shape == (1, 64, 64)
  assert patterns.Strided(8, heads=6, mode="split").mask(64).shape == (6, 64, 64)


@pytest.mark.parametrize("heads,g,expected", [(None, 1, 1), (None, 3, 3), (6, 3, 6), (4, 2, 4)])
def test_fixed_head_counts(heads, g, expected):
  p = patterns.Fixed(32, 2, heads=heads, head_groups=g)
  assert p.mask(64).shape == (expected, 64, 64)


# --- BigBird ------------------------------------------------------------------
def test_bigbird_same_seed_same_mask():
  kw = dict(block=16, window=3, num_global=1, num_random=2, heads=2)
  a = patterns.BigBird(seed=11, **kw).mask(256)
  b = patterns.BigBird(seed=11, **kw).mask(256)
  assert np.array_equal(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_different_seed_different_mask(causal):
  kw = dict(block=16, window=3, num_global=1, num_random=2, causal=causal)
  masks = [patterns.BigBird(seed=s, **kw).mask(256) for s in range(4)]
  for m in masks:
    check_bigbird_mask(m, 256, 16, 3, 1, 2, None, causal)
  assert len({m.tobytes() for m in masks}) > 1


def test_bigbird_heads_draw_different_blocks():
  m = patterns.BigBird(block=16, window=3, num_global=1, num_random=2, seed=0,
                       heads=4).mask(256)
  check_bigbird_mask(m, 256, 16, 3, 1, 2, 4, False)
  assert len({m[h].tobytes() for h in range(4)}) > 1


def test_bigbird_no_random_is_deterministic_window_global():
  n, block = 256, 32
  m = patterns.BigBird(block=block, window=3, num_global=2, num_random=0).mask(n)
  nb = n // block
  base = bigbird_base(nb, 3, 2)
  expect = _loop_mask(n, lambda i, j: base[i // block][j // block])
  assert np.array_equal(m, expect[None])


# --- Custom -------------------------------------------------------------------
def test_custom_2d_is_one_head():
  lay = random_layout(21, 1, 8, 0.3, True, two_d=True)
  p = patterns.Custom(lay)
  assert p.mask(128).shape == (1, 128, 128)
  assert np.array_equal(p.mask(128), ref_custom(128, lay, True))


def test_custom_accepts_bool_and_int_layouts():
  lay = random_layout(22, 2, 4, 0.5, True)
  a = patterns.Custom(lay).mask(64)
  b = patterns.Custom(lay.astype(bool)).mask(64)
  c = patterns.Custom(lay.astype(np.float32)).mask(64)
  assert np.array_equal(a, b) and np.array_equal(a, c)
  assert np.array_equal(a, ref_custom(64, lay, True))


def test_custom_noncausal_upper_only_rows_allowed():
  lay = np.array([[0, 1], [1, 0]])
  p = patterns.Custom(lay, causal=False)
  assert np.array_equal(p.mask(32), ref_custom(32, lay, False))
  with pytest.raises(ValueError, match="block_layout"):
    patterns.Custom(lay, causal=True)


# --- Validation ---------------------------------------------------------------
def _raises(fn, word):
  with pytest.raises(ValueError) as err:
    fn()
  assert word in str(err.value), f"{word!r} not named in: {err.value}"


VALIDATION = [
    ("plan_seq_len_not_multiple", lambda: patterns.Local(4).plan(100, 16), "block_size"),
    ("plan_seq_len_not_multiple_64", lambda: patterns.Dense().plan(96, 64), "seq_len"),
    ("block_size_8", lambda: patterns.Local(4).plan(128, 8), "block_size"),
    ("block_size_48", lambda: patterns.Local(4).plan(192, 48), "block_size"),
    ("block_size_256", lambda: patterns.Dense().plan(256, 256), "block_size"),
    ("block_size_str", lambda: patterns.Dense().plan(256, "32"), "block_size"),
    ("fixed_stride_vs_block", lambda: patterns.Fixed(48, 4).plan(192, 32), "stride"),
    ("fixed_stride_vs_block_64", lambda: patterns.Fixed(32, 4).plan(128, 64), "stride"),
    ("fixed_summary_groups", lambda: patterns.Fixed(16, 5, head_groups=4), "summary"),
    ("fixed_summary_groups_name", lambda: patterns.Fixed(16, 9, head_groups=2), "head_groups"),
    ("fixed_summary_gt_stride", lambda: patterns.Fixed(16, 17), "summary"),
    ("fixed_summary_zero", lambda: patterns.Fixed(32, 0), "summary"),
    ("fixed_heads_not_multiple", lambda: patterns.Fixed(32, 2, heads=3, head_groups=2), "heads"),
    ("strided_split_no_heads", lambda: patterns.Strided(8, mode="split"), "heads"),
    ("strided_split_odd_heads", lambda: patterns.Strided(8, heads=3, mode="split"), "heads"),
    ("strided_split_stride_divides",
     lambda: patterns.Strided(12, heads=2, mode="split").plan(128, 16), "stride"),
    ("strided_column_stride_divides",
     lambda: patterns.Strided(24, mode="column").plan(256, 32), "stride"),
    ("strided_unknown_mode", lambda: patterns.Strided(8, mode="diagonal"), "mode"),
    ("custom_1d", lambda: patterns.Custom(np.ones(4)), "block_layout"),
    ("custom_not_square", lambda: patterns.Custom(np.ones((2, 3))), "block_layout"),
    ("custom_not_square_3d", lambda: patterns.Custom(np.ones((2, 4, 3))), "block_layout"),
    ("custom_4d", lambda: patterns.Custom(np.ones((1, 1, 2, 2))), "block_layout"),
    ("custom_value_2", lambda: patterns.Custom(np.full((2, 2), 2)), "block_layout"),
    ("custom_value_half", lambda: patterns.Custom([[0.5, 1.0], [1.0, 1.0]]), "block_layout"),
    ("custom_value_neg", lambda: patterns.Custom(np.tril(-np.ones((3, 3), int))), "block_layout"),
    ("custom_empty_row_causal", lambda: patterns.Custom([[0, 1], [1, 1]]), "block_layout"),
    ("custom_empty_row_second_head",
     lambda: patterns.Custom(np.stack([np.eye(3), np.triu(np.ones((3, 3)), 1)])), "block_layout"),
    ("custom_empty_row_noncausal",
     lambda: patterns.Custom([[1, 1], [0, 0]], causal=False), "block_layout"),
    ("mask_seq_len_zero", lambda: patterns.Local(4).mask(0), "seq_len"),
    ("mask_seq_len_negative", lambda: patterns.Dense().mask(-16), "seq_len"),
    ("plan_seq_len_zero", lambda: patterns.Dense().plan(0, 16), "seq_len"),
    ("bigbird_seq_len_vs_block", lambda: patterns.BigBird(block=64).mask(96), "block"),
    ("bigbird_even_window", lambda: patterns.BigBird(window=2), "window"),
]


@pytest.mark.parametrize("fn,word", [v[1:] for v in VALIDATION], ids=[v[0] for v in VALIDATION])
def test_validation(fn, word):
  _raises(fn, word)


def test_valid_edge_parameters_do_not_raise():
  patterns.Fixed(16, 16)                       # c * g == l
  patterns.Fixed(48, 8, head_groups=6)         # c * g == l
  patterns.Fixed(32, 4, heads=6, head_groups=3)
  patterns.Strided(12, heads=2, mode="split").mask(100)   # only plan() needs l | N
  patterns.Strided(12, heads=2, mode="merged").plan(128, 16)
  patterns.Local(4).plan(256, 128)


# --- Serialization ------------------------------------------------------------
SERIAL = [
    lambda: patterns.Dense(),
    lambda: patterns.Dense(causal=False),
    lambda: patterns.Local(17, causal=False),
    lambda: patterns.Strided(8),
    lambda: patterns.Strided(16, heads=4, mode="split", causal=False),
    lambda: patterns.Strided(8, mode="column"),
    lambda: patterns.Fixed(32, 4, heads=6, head_groups=3),
    lambda: patterns.Fixed(64, 8, head_groups=2, causal=False),
    lambda: patterns.Longformer(9, global_tokens=(0, 17, 63)),
    lambda: patterns.Longformer(3, global_tokens=(), causal=True),
    lambda: patterns.BigBird(block=16, window=5, num_global=2, num_random=1, seed=4, heads=2),
    lambda: patterns.Custom(random_layout(31, 2, 4, 0.4, True)),
    lambda: patterns.Custom(random_layout(32, 1, 8, 0.3, False, two_d=True), causal=False),
]


@pytest.mark.parametrize("idx", range(len(SERIAL)))
def test_serialize_roundtrip(idx):
  p = SERIAL[idx]()
  d = patterns.serialize(p)
  assert isinstance(d, dict)
  text = json.dumps(d)
  q = patterns.deserialize(json.loads(text))
  assert type(q) is type(p)
  assert q == p and not (q != p)
  assert hash(q) == hash(p)
  assert np.array_equal(q.mask(64), p.mask(64))
  assert patterns.deserialize(d) == p


def test_serialize_distinguishes_patterns():
  assert patterns.Local(4) != patterns.Local(5)
  assert patterns.Local(4) != patterns.Local(4, causal=False)
  assert patterns.Strided(8) != patterns.Strided(8, mode="row")
  assert patterns.Fixed(32, 4, head_groups=2) != patterns.Fixed(32, 4)
  lay = random_layout(33, 1, 4, 0.5, True)
  lay2 = lay.copy()
  lay2[0, 3, :] = 1
  assert patterns.Custom(lay) != patterns.Custom(lay2)
  assert patterns.Dense() != patterns.Local(10**6)


@pytest.mark.parametrize("garbage", [
    None, 42, "Local", [], {}, {"config": {"window": 3}}, {"class_name": "NoSuchPattern"},
    {"class_name": "Pattern", "config": {}}, {"class_name": 3, "config": {}},
], ids=repr)
def test_deserialize_garbage(garbage):
  with pytest.raises(ValueError):
    patterns.deserialize(garbage)


@pytest.mark.parametrize("garbage", [
    {"class_name": "Local", "config": {"windw": 3}},
    {"class_name": "Local", "config": {}},
    {"class_name": "Dense", "config": [1]},
    {"class_name": ["Local"], "config": {}},
], ids=repr)
def test_deserialize_garbage_config(garbage):
  with pytest.raises(ValueError):
    patterns.deserialize(garbage)


def test_components_factorize_the_pattern():
  """Head-mode components: their union is the merged pattern."""
  for merged in (patterns.Strided(8), patterns.Fixed(32, 8), patterns.Fixed(32, 4, head_groups=2)):
    comps = merged.components()
    assert len(comps) == 2
    union = np.zeros_like(merged.mask(128))
    for c in comps:
      union = union | c.mask(128)
    assert np.array_equal(union, merged.mask(128))
  assert patterns.Local(4).components() == [patterns.Local(4)]


def test_split_equals_strided_split():
  a = patterns.Split(patterns.Strided(16).components(), heads=4)
  b = patterns.Strided(16, heads=4, mode="split")
  assert np.array_equal(a.mask(256), b.mask(256))


@pytest.mark.parametrize("bad, match", [
    (lambda: patterns.Split([], heads=2), "components"),
    (lambda: patterns.Split([patterns.Dense(), patterns.Local(3)], heads=3), "heads"),
    (lambda: patterns.Split([patterns.Fixed(16, 4, head_groups=2)], heads=3), "heads"),
    (lambda: patterns.Fixed(16, 4, mode="rows"), "mode"),
])
def test_split_and_mode_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    bad()
