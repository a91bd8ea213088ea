"""Sparsity patterns: which keys each query may attend to.

Every pattern answers two questions:

* `mask(seq_len)`: the exact element mask, bool `[H, N, N]`, `mask[h, i, j]`
  true iff query i may attend key j (H is the pattern's number of heads, 1
  when all heads share it). This is the specification; tests hold every
  implementation to it.
* `plan(seq_len, block_size)`: how the kernels compute it, as one or more
  `Part`s, each a set of heads, an optional reordering of the sequence and
  the block lookup tables (see `layout.py`).

With `num_heads` H_p > 1, an attention with H heads (a multiple of H_p) gives
head h the pattern's head `h % H_p`.

Patterns are pure NumPy and static: nothing here touches TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import numpy as np

from sparse_attention_tf import layout as layout_lib

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True, eq=False)
class Part:
  """One kernel launch of a plan.

  Attributes:
    heads: the pattern heads this part covers (None: all of them).
    transpose: if set to a stride l, the part runs on the sequence seen as an
      `[N/l, l]` grid read column by column (position `r*l + c` moves to
      `c*(N/l) + r`), so that positions of one column are contiguous.
    tables: the block lookup tables, in the part's own (possibly reordered)
      position order. Its layout heads repeat over the part's heads.
  """
  heads: Optional[tuple]
  transpose: Optional[int]
  tables: layout_lib.BlockTables


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  num_heads: int
  seq_len: int
  block_size: int
  parts: tuple

  @property
  def nnz(self) -> int:
    return sum(p.tables.nnz for p in self.parts)


def transpose_permutation(seq_len: int, stride: int) -> np.ndarray:
  """perm[k] = original position at reordered position k (column-major grid)."""
  rows = seq_len // stride
  return np.arange(seq_len).reshape(rows, stride).T.reshape(-1)  # (N,)


class Pattern:
  """Base class. Subclasses define `_keep` and, when they can, `_period`."""

  causal: bool = True

  @property
  def num_heads(self) -> int:
    return 1

  # --- the specification -------------------------------------------------
  def _keep(self, h: int, i: np.ndarray, j: np.ndarray, seq_len: int) -> np.ndarray:
    """Element predicate of pattern head h, broadcasting over int arrays."""
    raise NotImplementedError

  def _causal(self, i, j):
    return (j <= i) if self.causal else True

  def mask(self, seq_len: int) -> np.ndarray:
    """The element mask, bool `[H, N, N]`."""
    seq_len = _check_seq_len(seq_len)
    self._validate(seq_len, None)
    i = np.arange(seq_len)[:, None]
    j = np.arange(seq_len)[None, :]
    return np.stack([
        np.broadcast_to(self._keep(h, i, j, seq_len), (seq_len, seq_len))
        for h in range(self.num_heads)
    ])

  def row(self, position: int, seq_len: int) -> list:
    """The keys query `position` attends to: one sorted int array per pattern head.

    One row of `mask(seq_len)`, computed without the `N x N` mask (what a
    cached decoding step reads).
    """
    seq_len = _check_seq_len(seq_len)
    if not 0 <= int(position) < seq_len:
      raise ValueError(f"position must be in [0, {seq_len}), got {position}.")
    self._validate(seq_len, None)
    i = np.array([[int(position)]])
    j = np.arange(seq_len)[None, :]
    return [np.nonzero(np.broadcast_to(self._keep(h, i, j, seq_len), (1, seq_len))[0])[0]
            for h in range(self.num_heads)]

  def density(self, seq_len: int, block_size: Optional[int] = None) -> float:
    """Fraction of the `H x N x N` elements that are kept."""
    plan = self.plan(seq_len, block_size or self._any_block_size(seq_len))
    kept = 0.0
    for part in plan.parts:
      t = part.tables
      counts = np.full(t.nnz, t.block_size**2, np.int64)            # (Z,)
      partial = t.mask_index >= 0
      counts[partial] = t.masks.reshape(len(t.masks), t.block_size**2).sum(axis=1)[t.mask_index[partial]]
      heads = self.num_heads if part.heads is None else len(part.heads)
      kept += counts.sum() * heads / t.num_layout_heads
    return kept / (self.num_heads * seq_len**2)

  def _any_block_size(self, seq_len: int) -> int:
    """The largest supported block size this pattern accepts for seq_len."""
    for b in sorted(SUPPORTED_BLOCK_SIZES, reverse=True):
      try:
        if seq_len % b == 0:
          self._validate(seq_len, b)
          return b
      except ValueError:
        pass
    raise ValueError(f"No supported block size {SUPPORTED_BLOCK_SIZES} fits seq_len "
                     f"({seq_len}) for {self!r}.")

  # --- the plan ------------------------------------------------------------
  def _validate(self, seq_len: int, block_size: Optional[int]) -> None:
    """Raises ValueError for parameters that do not fit this sequence."""

  def _period(self) -> Optional[int]:
    """p such that _keep depends only on (i mod p, i - j); None if none."""
    return None

  def _candidates(self, h: int, num_blocks: int, block_size: int, seq_len: int):
    """A superset of the kept blocks of head h, bool [Nb, Nb] (non-periodic)."""
    return np.ones((num_blocks, num_blocks), bool)

  def _parts(self, seq_len: int, block_size: int):
    """Default: one part, all heads, original order."""
    keep = lambda h, i, j: self._keep(h, i, j, seq_len)
    cands = lambda h, nb, b: self._candidates(h, nb, b, seq_len)
    tables = layout_lib.tables_from_keep(
        keep, self.num_heads, seq_len, block_size, period=self._period(),
        candidates=cands)
    return (Part(heads=None, transpose=None, tables=tables),)

  def plan(self, seq_len: int, block_size: int) -> Plan:
    """Block tables for `seq_len`, computed once and cached on the pattern."""
    seq_len = _check_seq_len(seq_len)
    if block_size not in SUPPORTED_BLOCK_SIZES:
      raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}.")
    if seq_len % block_size:
      raise ValueError(
          f"seq_len ({seq_len}) must be a multiple of block_size ({block_size}): pad the "
          f"sequence to a multiple of {block_size} (and mask the padding with "
          f"key_padding_mask) or choose a smaller block_size.")
    self._validate(seq_len, block_size)
    cache = self.__dict__.setdefault("_plan_cache", {})
    key = (seq_len, block_size)
    if key not in cache:
      cache[key] = Plan(self.num_heads, seq_len, block_size, self._parts(seq_len, block_size))
    return cache[key]

  def components(self) -> list:
    """The factorized components (the paper's A1, A2, ...), for head modes.

    A pattern that is not a union of components returns `[self]`.
    """
    return [self]

  def merged(self) -> "Pattern":
    """The union of the components in every head (the paper's "merged" heads)."""
    return self

  # --- serialization -------------------------------------------------------
  def get_config(self) -> dict:
    raise NotImplementedError

  @classmethod
  def from_config(cls, config: dict) -> "Pattern":
    return cls(**config)

  def __repr__(self) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items()
                     if not isinstance(v, list))
    return f"{type(self).__name__}({args})"

  def __eq__(self, other) -> bool:
    return type(self) is type(other) and self.get_config() == other.get_config()

  def __hash__(self) -> int:
    return hash((type(self).__name__, repr(self.get_config())))


def _check_seq_len(seq_len) -> int:
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}.")
  return int(seq_len)


def _check_int(name: str, value, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
  return int(value)


def _check_heads(heads) -> Optional[int]:
  return None if heads is None else _check_int("heads", heads)


def _band(i, j, width: int, causal: bool):
  d = i - j
  return ((d >= 0) & (d < width)) if causal else (np.abs(d) < width)


# ---------------------------------------------------------------------------
class Dense(Pattern):
  """Full attention: `j <= i` when causal, every key otherwise."""

  def __init__(self, causal: bool = True):
    self.causal = bool(causal)

  def _keep(self, h, i, j, seq_len):
    return np.broadcast_to(self._causal(i, j), np.broadcast_shapes(i.shape, j.shape))

  def _period(self):
    return 1

  def get_config(self):
    return {"causal": self.causal}


class Local(Pattern):
  """Sliding window: `j <= i and i - j < window` (`|i - j| < window` if not causal)."""

  def __init__(self, window: int, causal: bool = True):
    self.window = _check_int("window", window)
    self.causal = bool(causal)

  def _keep(self, h, i, j, seq_len):
    return _band(i, j, self.window, self.causal)

  def _period(self):
    return 1

  def get_config(self):
    return {"window": self.window, "causal": self.causal}


class Strided(Pattern):
  """The paper's strided pattern, for data with a period (rows of an image).

  Components: A1 = the previous `stride` positions (`Local(stride)`), and
  A2 = `{j <= i : (i - j) % stride == 0}`, the same column of a grid of width
  `stride`.

  Args:
    stride: l, ideally about sqrt(N).
    heads: number of heads (required by `mode="split"`).
    mode: `"merged"`: every head attends to A1 | A2 (exact, but A2 crosses
      about `b/l` of all blocks, so it costs far more than split);
      `"split"`: the first half of the heads A1, the second half A2;
      `"row"`: A1 only; `"column"`: A2 only (for layers that alternate).
      A2 in `split`/`column` runs on the transposed `[N/l, l]` sequence, where
      it is block-diagonal, so it needs `seq_len % stride == 0`.
    causal: if False, drops `j <= i` (A1 becomes `|i - j| < l`).
  """

  MODES = ("merged", "split", "row", "column")

  def __init__(self, stride: int, heads: Optional[int] = None, mode: str = "merged",
               causal: bool = True):
    self.stride = _check_int("stride", stride)
    self.heads = _check_heads(heads)
    if mode not in self.MODES:
      raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}.")
    if mode == "split" and (self.heads is None or self.heads % 2):
      raise ValueError(f"mode='split' needs an even number of heads, got heads={heads!r}.")
    self.mode = mode
    self.causal = bool(causal)

  @property
  def num_heads(self):
    return self.heads if self.mode == "split" else 1

  def _a1(self, i, j):
    return _band(i, j, self.stride, self.causal)

  def _a2(self, i, j):
    return ((i - j) % self.stride == 0) & self._causal(i, j)

  def _keep(self, h, i, j, seq_len):
    if self.mode == "merged":
      return self._a1(i, j) | self._a2(i, j)
    if self.mode == "row" or (self.mode == "split" and h < self.heads // 2):
      return self._a1(i, j)
    return self._a2(i, j)

  def _period(self):
    return 1

  def _validate(self, seq_len, block_size):
    if self.mode in ("split", "column") and block_size is not None and seq_len % self.stride:
      raise ValueError(
          f"stride ({self.stride}) must divide seq_len ({seq_len}) for mode={self.mode!r}: "
          f"the column component runs on the sequence as a [seq_len/stride, stride] grid.")

  def _column_part(self, seq_len, block_size, heads):
    rows = seq_len // self.stride       # in the transposed order a column is `rows` long
    def keep(h, i, j):
      same = (i // rows) == (j // rows)
      return (same & (j <= i)) if self.causal else same
    tables = layout_lib.tables_from_keep(keep, 1, seq_len, block_size, period=rows)
    return Part(heads=heads, transpose=self.stride, tables=tables)

  def _parts(self, seq_len, block_size):
    if self.mode in ("merged", "row"):
      keep = lambda h, i, j: self._keep(0, i, j, seq_len)
      tables = layout_lib.tables_from_keep(keep, 1, seq_len, block_size, period=1)
      return (Part(None, None, tables),)
    if self.mode == "column":
      return (self._column_part(seq_len, block_size, None),)
    half = self.heads // 2
    row_tables = layout_lib.tables_from_keep(
        lambda h, i, j: self._a1(i, j), 1, seq_len, block_size, period=1)
    return (Part(tuple(range(half)), None, row_tables),
            self._column_part(seq_len, block_size, tuple(range(half, self.heads))))

  def get_config(self):
    return {"stride": self.stride, "heads": self.heads, "mode": self.mode,
            "causal": self.causal}

  def merged(self):
    if self.mode != "split":
      return self
    return Strided(self.stride, mode="merged", causal=self.causal)

  def components(self):
    if self.mode in ("row", "column"):
      return [self]
    return [Strided(self.stride, mode="row", causal=self.causal),
            Strided(self.stride, mode="column", causal=self.causal)]


class Fixed(Pattern):
  """The paper's fixed pattern, for data without a period (text, audio).

  Query i attends key j iff `j <= i` and either j is in i's window of length
  `stride` (`j // l == i // l`) or j is a summary position: for head h with
  `r = h % head_groups`, `l - (r+1)*c <= j % l <= l - r*c - 1` (one group: the
  last c positions of every window).

  Args:
    stride: l, the window length; a multiple of the block size.
    summary: c, summary positions per window, `1 <= c` and `c * head_groups <= l`.
    heads: number of heads (None: `head_groups`; each group shares a layout).
    head_groups: g, how many different summary sets the heads use.
    mode: `"merged"` (window or summary, the pattern above), `"window"` (A1:
      the window only) or `"summary"` (A2: the summary positions only), for
      layers or heads that take one component each.
    causal: if False, drops `j <= i` (summaries of later windows too).
  """

  MODES = ("merged", "window", "summary")

  def __init__(self, stride: int, summary: int, heads: Optional[int] = None,
               head_groups: int = 1, mode: str = "merged", causal: bool = True):
    self.stride = _check_int("stride", stride)
    self.summary = _check_int("summary", summary)
    self.heads = _check_heads(heads)
    self.head_groups = _check_int("head_groups", head_groups)
    if mode not in self.MODES:
      raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}.")
    self.mode = mode
    self.causal = bool(causal)
    if self.summary * self.head_groups > self.stride:
      raise ValueError(
          f"summary * head_groups ({self.summary} * {self.head_groups}) must be <= stride "
          f"({self.stride}).")
    if self.heads is not None and self.heads % self.head_groups:
      raise ValueError(
          f"heads ({self.heads}) must be a multiple of head_groups ({self.head_groups}).")

  @property
  def num_heads(self):
    return self.heads or self.head_groups

  def _keep(self, h, i, j, seq_len):
    l, c, r = self.stride, self.summary, h % self.head_groups
    window = (j // l) == (i // l)
    jm = j % l
    summary = (jm >= l - (r + 1) * c) & (jm <= l - r * c - 1)
    keep = {"merged": window | summary, "window": window, "summary": summary}[self.mode]
    return keep & self._causal(i, j)

  def _period(self):
    return self.stride

  def _validate(self, seq_len, block_size):
    if block_size is not None and self.stride % block_size:
      raise ValueError(
          f"stride ({self.stride}) must be a multiple of block_size ({block_size}).")

  def _parts(self, seq_len, block_size):
    # Heads of one group share a layout: compute g layouts, repeated over heads.
    keep = lambda h, i, j: self._keep(h, i, j, seq_len)
    tables = layout_lib.tables_from_keep(keep, self.head_groups, seq_len, block_size,
                                         period=self.stride)
    return (Part(None, None, tables),)

  def get_config(self):
    return {"stride": self.stride, "summary": self.summary, "heads": self.heads,
            "head_groups": self.head_groups, "mode": self.mode, "causal": self.causal}

  def components(self):
    if self.mode != "merged":
      return [self]
    # The window does not depend on the head; the summary on the head's group.
    return [Fixed(self.stride, self.summary, mode="window", causal=self.causal),
            Fixed(self.stride, self.summary, head_groups=self.head_groups, mode="summary",
                  causal=self.causal)]


class Longformer(Pattern):
  """Sliding window plus global tokens (Beltagy et al. 2020).

  Query i attends key j iff `|i - j| < window` or i or j is a global token
  (intersected with `j <= i` when causal).

  Args:
    window: reach of the window on each side.
    global_tokens: positions that attend to and are attended by every position.
    causal: default False (Longformer is an encoder pattern).
  """

  def __init__(self, window: int, global_tokens: Sequence[int] = (0,), causal: bool = False):
    self.window = _check_int("window", window)
    self.global_tokens = tuple(_check_int("global_tokens", t, 0) for t in global_tokens)
    self.causal = bool(causal)

  def _validate(self, seq_len, block_size):
    if self.global_tokens and max(self.global_tokens) >= seq_len:
      raise ValueError(
          f"global_tokens must be < seq_len ({seq_len}), got {max(self.global_tokens)}.")

  def _keep(self, h, i, j, seq_len):
    g = np.asarray(self.global_tokens, np.int64)
    glob = np.isin(i, g) | np.isin(j, g)
    return (_band(i, j, self.window, False) | glob) & self._causal(i, j)

  def _candidates(self, h, nb, b, seq_len):
    bi, bj = np.meshgrid(np.arange(nb), np.arange(nb), indexing="ij")
    reach = (self.window - 1 + b - 1) // b + 1
    cand = np.abs(bi - bj) <= reach
    gb = np.asarray(self.global_tokens, np.int64) // b
    cand |= np.isin(bi, gb) | np.isin(bj, gb)
    return cand

  def get_config(self):
    return {"window": self.window, "global_tokens": list(self.global_tokens),
            "causal": self.causal}


class _BlockPattern(Pattern):
  """A pattern defined by a block layout `[H, N/B, N/B]` at its own block size B."""

  def _block_layout(self, seq_len: int) -> np.ndarray:
    raise NotImplementedError

  def _cached_layout(self, seq_len):
    cache = self.__dict__.setdefault("_layout_cache", {})
    if seq_len not in cache:
      cache[seq_len] = self._block_layout(seq_len)
    return cache[seq_len]

  def _keep(self, h, i, j, seq_len):
    lay = self._cached_layout(seq_len)
    size = seq_len // lay.shape[1]
    return lay[h, i // size, j // size] & self._causal(i, j)

  def _candidates(self, h, nb, b, seq_len):
    lay = self._cached_layout(seq_len)[h]              # (Np, Np)
    size = seq_len // lay.shape[0]
    if size % b == 0:                                  # kernel block inside a pattern block
      idx = np.arange(nb) * b // size
      return lay[idx[:, None], idx[None, :]]
    return np.ones((nb, nb), bool)


class BigBird(_BlockPattern):
  """Window + global + random blocks (Zaheer et al. 2020), at block size `block`.

  Block row I attends block J iff `|I - J| <= window // 2`, or I or J is one of
  the first `num_global` blocks, or J is one of I's `num_random` random blocks
  (drawn, with `seed`, among the blocks not already kept; in causal mode among
  J < I). Elements: the blocks expanded, intersected with `j <= i` if causal.

  Args:
    block: the pattern's block size; seq_len must be a multiple of it and the
      kernel block size must divide it for the fast path.
    window: odd number of blocks in the sliding window.
    num_global: leading global blocks.
    num_random: random blocks per block row.
    seed: random seed (the pattern is a pure function of the seed, seq_len and head).
    heads: heads with different random blocks (None: one shared layout).
    causal: default False.
  """

  def __init__(self, block: int = 64, window: int = 3, num_global: int = 1,
               num_random: int = 2, seed: int = 0, heads: Optional[int] = None,
               causal: bool = False):
    self.block = _check_int("block", block)
    self.window = _check_int("window", window)
    if self.window % 2 == 0:
      raise ValueError(f"window must be an odd number of blocks, got {window}.")
    self.num_global = _check_int("num_global", num_global, 0)
    self.num_random = _check_int("num_random", num_random, 0)
    self.seed = _check_int("seed", seed, 0)
    self.heads = _check_heads(heads)
    self.causal = bool(causal)

  @property
  def num_heads(self):
    return self.heads or 1

  def _validate(self, seq_len, block_size):
    if seq_len % self.block:
      raise ValueError(f"seq_len ({seq_len}) must be a multiple of block ({self.block}).")

  def _block_layout(self, seq_len):
    nb = seq_len // self.block
    bi, bj = np.meshgrid(np.arange(nb), np.arange(nb), indexing="ij")
    base = (np.abs(bi - bj) <= self.window // 2) | (bi < self.num_global) | (bj < self.num_global)
    out = np.repeat(base[None], self.num_heads, axis=0)
    for h in range(self.num_heads):
      rng = np.random.default_rng([self.seed, h, nb])
      for row in range(self.num_global, nb):
        limit = row if self.causal else nb
        free = np.nonzero(~base[row, :limit])[0]
        if free.size:
          pick = rng.choice(free, size=min(self.num_random, free.size), replace=False)
          out[h, row, pick] = True
    return out

  def get_config(self):
    return {"block": self.block, "window": self.window, "num_global": self.num_global,
            "num_random": self.num_random, "seed": self.seed, "heads": self.heads,
            "causal": self.causal}


class Custom(_BlockPattern):
  """Any block layout given by the user.

  Args:
    block_layout: bool-like `[H, N/B, N/B]`; the element mask is the layout
      expanded to `B x B` elements, intersected with `j <= i` when causal.
      B = seq_len / layout width; the kernel block size must divide B.
    causal: default True.
  """

  def __init__(self, block_layout, causal: bool = True):
    lay = np.asarray(block_layout)
    if lay.ndim == 2:
      lay = lay[None]
    if lay.ndim != 3 or lay.shape[1] != lay.shape[2] or lay.shape[1] == 0 or lay.shape[0] == 0:
      raise ValueError(
          f"block_layout must have shape [heads, blocks, blocks], got {tuple(np.shape(block_layout))}.")
    if lay.dtype != bool:
      if not np.isin(lay, (0, 1)).all():
        raise ValueError("block_layout must hold only 0/1 or True/False.")
      lay = lay.astype(bool)
    self.causal = bool(causal)
    visible = np.tril(lay).any(axis=2) if self.causal else lay.any(axis=2)
    if not visible.all():
      h, row = np.argwhere(~visible)[0]
      why = " at or before the diagonal (causal=True)" if self.causal else ""
      raise ValueError(
          f"block_layout has an empty query row: head {h}, block row {row} keeps no block{why}.")
    self.block_layout = lay

  @property
  def num_heads(self):
    return self.block_layout.shape[0]

  def _validate(self, seq_len, block_size):
    nb = self.block_layout.shape[1]
    if seq_len % nb:
      raise ValueError(
          f"seq_len ({seq_len}) must be a multiple of the block_layout width ({nb}).")

  def _block_layout(self, seq_len):
    return self.block_layout

  def get_config(self):
    return {"block_layout": self.block_layout.astype(int).tolist(), "causal": self.causal}

  def __hash__(self):
    return hash((type(self).__name__, self.block_layout.tobytes(), self.block_layout.shape,
                 self.causal))


class Split(Pattern):
  """Different patterns on different heads: the paper's "multi-head" integration.

  Heads are cut into `len(components)` contiguous groups of equal size; group k
  uses `components[k]`, its i-th head the component's head `i % num_heads`.
  `Split([Strided(l, mode="row"), Strided(l, mode="column")], heads=8)` is
  `Strided(l, heads=8, mode="split")`.

  Args:
    components: patterns (or their serialized dicts), one per head group.
    heads: total number of heads, a multiple of `len(components)`.
  """

  def __init__(self, components, heads: int):
    self.members = [deserialize(c) for c in components]
    if not self.members:
      raise ValueError("components must name at least one pattern.")
    self.heads = _check_int("heads", heads)
    if self.heads % len(self.members):
      raise ValueError(f"heads ({self.heads}) must be a multiple of the number of components "
                       f"({len(self.members)}).")
    size = self.heads // len(self.members)
    for c in self.members:
      if size % c.num_heads:
        raise ValueError(f"each head group ({size} heads) must be a multiple of its "
                         f"component's heads, got {c!r} with {c.num_heads} heads.")
    self.causal = all(c.causal for c in self.members)

  @property
  def num_heads(self):
    return self.heads

  def _keep(self, h, i, j, seq_len):
    size = self.heads // len(self.members)
    c = self.members[h // size]
    return c._keep((h % size) % c.num_heads, i, j, seq_len)

  def _validate(self, seq_len, block_size):
    for c in self.members:
      c._validate(seq_len, block_size)

  def _parts(self, seq_len, block_size):
    size = self.heads // len(self.members)
    out = []
    for k, c in enumerate(self.members):
      for part in c.plan(seq_len, block_size).parts:
        # Heads of group k whose component head is covered by this part.
        heads = tuple(k * size + i for i in range(size)
                      if part.heads is None or i % c.num_heads in part.heads)
        out.append(Part(heads=heads, transpose=part.transpose, tables=part.tables))
    return tuple(out)

  def components(self):
    return list(self.members)

  def merged(self):
    raise ValueError("Split has no merged form (a union of arbitrary patterns in one head); "
                     "use a pattern with a 'merged' mode, e.g. Strided or Fixed.")

  def get_config(self):
    return {"components": [serialize(c) for c in self.members], "heads": self.heads}


PATTERNS = {cls.__name__: cls for cls in (Dense, Local, Strided, Fixed, Longformer, BigBird, Custom,
                                                 Split)}


def serialize(pattern: Pattern) -> dict:
  """`{"class_name": ..., "config": ...}`, JSON-friendly."""
  return {"class_name": type(pattern).__name__, "config": pattern.get_config()}


def deserialize(config: Any) -> Pattern:
  """Inverse of `serialize`; passes Pattern objects through."""
  if isinstance(config, Pattern):
    return config
  name = config.get("class_name") if isinstance(config, dict) else None
  if not isinstance(name, str) or name not in PATTERNS:
    raise ValueError(
        f"Cannot deserialize a pattern from {config!r}: expected a dict with class_name in "
        f"{sorted(PATTERNS)}.")
  args = config.get("config", {})
  if not isinstance(args, dict):
    raise ValueError(f"Pattern config must be a dict, got {args!r}.")
  try:
    return PATTERNS[name].from_config(args)
  except TypeError as e:
    raise ValueError(f"Bad config for pattern {name}: {e}") from None
