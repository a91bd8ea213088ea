"""Fuzzing the raw ops against float64 references, in a worker process.

Shared by tests/test_fuzz_ops.py (20 s) and scripts/fuzz_ops.py
(longer campaigns). The worker runs hypothesis cases until a deadline; every
call must either raise a clean error or, if it is accepted, give the result of
an independent float64 NumPy reference (written here from the op docs, sharing
no code with the kernels). A crash or a hang ends the worker, never its
caller: `supervise()` runs it in a subprocess and reads what it was doing from
its state file.

Verdicts of one case:
  equal    accepted, and every output equals the reference within the dtype's tolerance
  error    rejected with a clean error (tf.errors.OpError, ValueError, TypeError)
  wrong    accepted, but an output differs from the reference, or the input
           breaks the ops' contract (no reference exists for it): a silent wrong result
  unclean  another Python exception
  crash    the worker died (signal or abort) during the case
  hang     the case ran past the per-case timeout
Comparison, element by element: where the reference is finite the output
must be close to it (values past the dtype's largest may be that infinity);
where it is NaN or +-inf the output must not be finite (a dropped NaN is
wrong); where it is +-inf and every input is finite (the lse of a row that
sees no key) the output must be that infinity.

The non-finite semantics the references implement (ops.attention's
docstring, tests/test_nonfinite.py, the kernels' comments):
  attention  masked scores are selected, not added: NaN / +-inf in q or k reach
             exactly the (query, key) pairs that are visible. A row that sees a
             NaN or +inf score gives out NaN and lse NaN; a row with no visible
             key (or only -inf scores) gives out 0 and lse -inf. A NaN / inf in
             v reaches the rows that see it and MAY reach every other query row
             of a kept tile that holds it (0 * NaN inside the tile's P.V).
  attention_grad  P = exp(S - lse) on visible pairs, with lse NaN or -inf read
             as +inf (P = 0 there except where the score itself is NaN or +inf);
             dS = P * (dout . v^T - rowsum(dout * out)), 0 where hidden; dq, dk,
             dv are sums over visible pairs only, so NaN / inf in q, k or dout
             reach exactly the rows and keys that see them.
  sdd        plain products of whole tiles (a NaN reaches its whole tile row).
  dsd, dsd_t exact-zero coefficients of P are skipped (0 * NaN adds nothing),
             every other coefficient is multiplied as in IEEE arithmetic.
  softmax    over visible elements; a row that sees a NaN or +inf is divided by
             1 (exp(s - max) with the max of its non-NaN scores), rows with no
             visible key are 0.
  softmax_grad  dx = 0 where y == 0, else y * (dy - sum_row(y * dy)) * scale.
  scale      the fused ops refuse a non-finite scale (InvalidArgumentError: where
             the scale is applied, to q or to q . k, decides what inf * 0 gives);
             softmax and softmax_grad apply it elementwise (IEEE). A finite scale
             is placed as each kernel does: the float body (scale * q) . k, the
             AVX-512 BF16 body scale * (q . k); an element is equal if it matches
             the reference of either placement.
In tape mode the gradient's reference is computed from the forward outputs
the kernel gave (the registered gradient uses those), which are compared
with the forward reference on their own.

Case kinds (hypothesis strategies):
  valid    tables of real patterns (sparse_attention_tf.patterns) or random
           valid layouts, the right shapes, any dtype, eager / tf.function /
           GradientTape; sometimes NaN / inf in an operand or a special scale
  mutated  a valid case with 1-3 things changed: a table entry or length, a
           dim, the block size, the scale, a dtype, a rank
  garbage  random shapes and random int32 / bool tables
  huge     block sizes 65536 .. 2**40 on a 131072-long sequence (512 KiB
           operands) and empty tables

Replay one case (the state file of a crash, or a case printed by a failure):
  python -m tests.fuzz_ops_worker --replay case.json
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import faulthandler
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Optional

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# Allowed |out - ref| <= TOL * (|ref| + max |ref| of the tensor), by dtype. The worst
# seen on 1500 valid cases: float32 1.3e-5 (attention_grad), float16 9e-4 (softmax),
# bfloat16 8e-3 (attention: probabilities rounded to bfloat16 before P.V).
TOL = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}
# Gradients of saturated softmax rows cancel (dP - delta is a few float32 ulps
# of |dP| while the float64 value is ~1e-85): allowed besides TOL, COND_EPS
# times the sum of the absolute terms (8 float32 ulps). Seen: attention_grad,
# scale 100, dq 2.3e-5 against 2e-85 with terms of 508.
COND_EPS = 1e-6

# Argument names of each raw op, in order, and its attributes.
SIGNATURES = {
    "sdd": (("a", "b", "blocks", "row_offsets", "col_offsets", "col_blocks"), ("block_size",)),
    "dsd": (("p", "x", "blocks", "row_offsets", "col_offsets", "col_blocks"), ()),
    "dsd_t": (("p", "x", "blocks", "row_offsets", "col_offsets", "col_blocks"), ()),
    "softmax": (("x", "blocks", "row_offsets", "mask_index", "masks", "key_padding_mask"),
                ("scale",)),
    "softmax_grad": (("y", "dy", "row_offsets"), ("scale",)),
    "attention": (("q", "k", "v", "blocks", "row_offsets", "col_offsets", "col_blocks",
                   "mask_index", "masks", "mask_key_range", "mask_query_range", "mask_split",
                   "key_padding_mask"), ("scale", "block_size")),
    "attention_grad": (("q", "k", "v", "out", "lse", "dout", "blocks", "row_offsets",
                        "col_offsets", "col_blocks", "mask_index", "masks", "mask_key_range",
                        "mask_query_range", "mask_split", "key_padding_mask"),
                       ("scale", "block_size")),
}
OPS = tuple(SIGNATURES)
TAPE_OPS = ("sdd", "dsd", "dsd_t", "softmax", "attention")  # forward ops with a registered gradient
TABLE_NAMES = ("blocks", "row_offsets", "col_offsets", "col_blocks", "mask_index",
               "mask_key_range", "mask_query_range")
BOOL_NAMES = ("masks", "mask_split", "key_padding_mask")
HUGE_SEQ = 131072
FUSED_BLOCKS = (16, 32, 64, 128)   # ops.attention: else an InvalidArgumentError


# --- the contract: what each op must accept ------------------------------------------
def _dense_problem(x, name) -> Optional[str]:
  if x.ndim != 4:
    return f"{name} rank {x.ndim}"
  if min(x.shape[1:]) < 1:
    return f"{name} has an empty seq, heads or head_dim {x.shape}"
  return None


def _tables_problem(blocks, ro, co, cb, seq, heads, block) -> Optional[str]:
  """Why blocks/row_offsets (and col_offsets/col_blocks unless None) are invalid, or None."""
  if block < 1 or seq < 1 or seq % block:
    return f"seq {seq} is not a positive multiple of the block size {block}"
  if blocks.ndim != 2 or blocks.shape[1] != 3 or ro.ndim != 1:
    return "table ranks"
  nb, rows, z = seq // block, ro.shape[0] - 1, blocks.shape[0]
  if rows < 1 or rows % nb:
    return f"row_offsets has {rows + 1} entries for {nb} blocks per sequence"
  hl = rows // nb
  if heads % hl:
    return f"{hl} layout heads do not divide {heads} heads"
  b = blocks.astype(np.int64)
  if z and ((b.min(axis=0) < 0).any() or (b.max(axis=0) >= [hl, nb, nb]).any()):
    return "a block is out of range"
  key = (b[:, 0] * nb + b[:, 1]) * nb + b[:, 2]
  if np.any(np.diff(key) <= 0):
    return "blocks are not sorted without repeats"
  if not np.array_equal(ro, np.searchsorted(b[:, 0] * nb + b[:, 1], np.arange(rows + 1))):
    return "row_offsets do not match blocks"
  if co is None:
    return None
  if co.ndim != 1 or cb.ndim != 1 or co.shape[0] != rows + 1 or cb.shape[0] != z:
    return "column table shapes"
  if not np.array_equal(np.sort(cb), np.arange(z)):
    return "col_blocks is not a permutation of the blocks"
  col_key = (b[:, 0] * nb + b[:, 2])[cb]
  if np.any(np.diff(col_key) < 0) or not np.array_equal(
      co, np.searchsorted(col_key, np.arange(rows + 1))):
    return "col_offsets/col_blocks do not match blocks"   # the order within a column is free
  return None


def _masks_problem(mi, masks, z, block) -> Optional[str]:
  if mi.ndim != 1 or mi.shape[0] != z or masks.ndim != 3 or masks.shape[1:] != (block, block):
    return "mask shapes"
  if z and (mi.min() < -1 or mi.max() >= masks.shape[0]):
    return "mask_index out of range"
  return None


def _mask_tables_problem(x, block) -> Optional[str]:
  """Why the fused ops' mask tables do not fit (or cover) the masks, or None."""
  masks, kr, qr, split = (x[n] for n in ("masks", "mask_key_range", "mask_query_range",
                                         "mask_split"))
  m, g = masks.shape[0], block // 16
  if kr.shape != (m, 2) or qr.shape != (m, g, 2) or split.shape != (m,):
    return "mask table shapes"
  for r in (kr, qr.reshape(-1, 2)):
    if r.size and (r.min() < 0 or r.max() > block or (r % 16).any() or (r[:, 0] > r[:, 1]).any()):
      return "a mask table range is not [lo, hi) of multiples of 16 in [0, b]"
  mi, i, j = np.nonzero(masks)                                  # every visible element
  if ((j < kr[mi, 0]) | (j >= kr[mi, 1])).any():
    return "mask_key_range does not cover a visible key"
  q = qr[mi, j // 16]
  if (split[mi] & ((i < q[:, 0]) | (i >= q[:, 1]))).any():
    return "mask_query_range does not cover a visible query of a split tile"
  return None


def contract_problem(op, x: dict, attrs: dict) -> Optional[str]:
  """Why the inputs break the op's documented contract (None: valid, a reference exists)."""
  floats = [x[n] for n in SIGNATURES[op][0] if n not in TABLE_NAMES + BOOL_NAMES]
  dtypes = {str(a.dtype) for a in floats if a is not x.get("lse")}
  if len(dtypes) != 1 or dtypes.pop() not in FLOAT_DTYPES:
    return "float operands must share one of float32, bfloat16, float16"
  if "lse" in x and x["lse"].dtype != np.float32:
    return "lse must be float32"
  for n in TABLE_NAMES:
    if n in x and x[n].dtype != np.int32:
      return f"{n} must be int32"
  for n in BOOL_NAMES:
    if n in x and x[n].dtype != bool:
      return f"{n} must be bool"
  if op == "softmax_grad":
    y, ro = x["y"], x["row_offsets"]
    if y.ndim != 5 or x["dy"].shape != y.shape or y.shape[3] != y.shape[4] or ro.ndim != 1:
      return "shapes"
    if ro.shape[0] < 2 or ro[0] != 0 or ro[-1] != y.shape[2] or np.any(np.diff(ro) < 0):
      return "row_offsets"
    return None
  if op == "softmax":
    s, kp = x["x"], x["key_padding_mask"]
    if s.ndim != 5 or kp.ndim != 2 or kp.shape[0] != s.shape[0] or kp.shape[1] < 1:
      return "shapes"
    block, ro = s.shape[3], x["row_offsets"]
    if block < 1 or kp.shape[1] % block or ro.ndim != 1:
      return "seq"
    nb = kp.shape[1] // block
    hl = (ro.shape[0] - 1) // nb
    problem = _tables_problem(x["blocks"], ro, None, None, kp.shape[1], s.shape[1] * hl, block)
    if problem:
      return problem
    if s.shape != (s.shape[0], s.shape[1], x["blocks"].shape[0], block, block):
      return "x shape"
    return _masks_problem(x["mask_index"], x["masks"], s.shape[2], block)
  dense = ("a", "b") if op == "sdd" else ("x",) if op in ("dsd", "dsd_t") else ("q", "k", "v")
  for n in dense:
    problem = _dense_problem(x[n], n)
    if problem:
      return problem
  first = x[dense[0]]
  if op in ("dsd", "dsd_t"):
    p = x["p"]
    if p.ndim != 5:
      return "p rank"
    block = p.shape[3]
  else:
    block = attrs["block_size"]
  bt, ro, co, cb = (x[n] for n in ("blocks", "row_offsets", "col_offsets", "col_blocks"))
  problem = _tables_problem(bt, ro, co, cb, first.shape[1], first.shape[2], block)
  if problem:
    return problem
  hl = (ro.shape[0] - 1) // (first.shape[1] // block)
  z = bt.shape[0]
  if op == "sdd":
    return None if x["a"].shape == x["b"].shape else "a and b shapes"
  if op in ("dsd", "dsd_t"):
    want = (first.shape[0], first.shape[2] // hl, z, block, block)
    return None if x["p"].shape == want else f"p shape {x['p'].shape} != {want}"
  q, k, v = x["q"], x["k"], x["v"]
  if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
    return "q, k, v shapes"
  if block not in FUSED_BLOCKS:
    return f"the fused ops take block sizes {FUSED_BLOCKS}"
  if not np.isfinite(attrs["scale"]):
    return "the fused ops take a finite scale"
  problem = (_masks_problem(x["mask_index"], x["masks"], z, block) or
             _mask_tables_problem(x, block))
  if problem:
    return problem
  if x["key_padding_mask"].shape != q.shape[:2]:
    return "key_padding_mask shape"
  if op == "attention_grad":
    if x["out"].shape != v.shape or x["dout"].shape != v.shape:
      return "out/dout shape"
    if x["lse"].shape != (q.shape[0], q.shape[2], q.shape[1]):
      return "lse shape"
  return None


# --- float64 references ---------------------------------------------------------------
@dataclasses.dataclass
class Layout:
  """What the tables say, for the references: kept blocks (h, I, J) and their groups."""
  block: int
  nb: int
  hl: int
  groups: int
  h: np.ndarray      # (Z,)
  i: np.ndarray
  j: np.ndarray

  @classmethod
  def of(cls, blocks, seq, block, rows, heads):
    nb = seq // block
    hl = rows // nb
    b = blocks.astype(np.int64)
    return cls(block, nb, hl, heads // hl, b[:, 0], b[:, 1], b[:, 2])

  @property
  def row_key(self):  # (Z,) the block row (h, I) of each block
    return self.h * self.nb + self.i

  def index(self, blk):
    """(token index [1, Z, b], head index [G, Z, 1]) of block row/column `blk` (Z,)."""
    tok = blk[None, :, None] * self.block + np.arange(self.block)[None, None, :]
    head = (np.arange(self.groups)[:, None] * self.hl + self.h[None, :])[:, :, None]
    return tok, head

  def gather(self, x, blk):  # x [B, N, H, D] -> [B, G, Z, b, D]
    tok, head = self.index(blk)
    return x[:, tok, head, :]

  def scatter(self, shape, blk, c):  # sum of c [B, G, Z, b, D] into [B, N, H, D] at blk
    tok, head = self.index(blk)
    out = np.zeros(shape)
    full = np.broadcast_shapes(tok.shape, head.shape)
    np.add.at(out, (slice(None), np.broadcast_to(tok, full), np.broadcast_to(head, full),
                    slice(None)), c)
    return out


def _f64(a):
  return np.asarray(a).astype(np.float64)


def masked_matmul(w, vis, x):
  """sum_k w[..., q, k] x[..., k, d] over visible pairs (vis) only, NaN-safe.

  A non-finite x[k] counts only where (q, k) is visible: a hidden key must not
  reach a query row, not even as 0 * NaN.
  """
  w = np.where(vis, w, 0.0)
  fin = np.isfinite(x)
  out = np.einsum("...qk,...kd->...qd", w, np.where(fin, x, 0.0))
  if fin.all():
    return out
  hit = np.asarray(vis)[..., :, :, None] & ~fin[..., None, :, :]          # (..., q, k, d)
  extra = np.where(hit, w[..., None] * np.where(fin, 0.0, x)[..., None, :, :], 0.0)
  return out + extra.sum(axis=-2)


def ref_sdd(a, b, lay: Layout):
  return np.einsum("bgzqd,bgzkd->bgzqk", lay.gather(_f64(a), lay.i), lay.gather(_f64(b), lay.j))


def ref_dsd(p, x, lay: Layout):
  """out_I = sum_J P_IJ . X_J, exact-zero coefficients of P skipped."""
  p, x = _f64(p), _f64(x)
  c = masked_matmul(p, p != 0, lay.gather(x, lay.j))
  return lay.scatter(x.shape, lay.i, c)


def ref_dsd_t(p, x, lay: Layout):
  """out_J = sum_I P_IJ^T . X_I, exact-zero coefficients of P skipped."""
  pt, x = np.swapaxes(_f64(p), -1, -2), _f64(x)
  c = masked_matmul(pt, pt != 0, lay.gather(x, lay.i))
  return lay.scatter(x.shape, lay.j, c)


def visible(lay: Layout, mask_index, masks, key_padding):
  """bool [B, 1, Z, b, b]: tile mask and key padding of each kept block."""
  z, bs = lay.h.shape[0], lay.block
  tile = np.ones((z, bs, bs), bool)
  part = mask_index >= 0
  tile[part] = masks[mask_index[part]]
  keys = key_padding[:, lay.j[:, None] * bs + np.arange(bs)]           # (B, Z, b)
  return (tile[None] & keys[:, :, None, :])[:, None]


def row_softmax(s, vis, lay: Layout):
  """Softmax of scores s [B, G, Z, b, b] over the visible keys of each query row.

  Rows run across the blocks of one block row (h, I). Returns the probabilities
  (0 where hidden; a row that sees a NaN or +inf score is divided by 1:
  exp(s - max) with the max of its non-NaN scores, NaN where the score is NaN
  or +inf) and the lse [B, G, Hl*Nb, b] (-inf for a row with no visible finite
  score, NaN for a row that sees a NaN or +inf).
  """
  rows, key = lay.hl * lay.nb, lay.row_key
  sv = np.where(vis, s, -np.inf)
  lead = s.shape[:2]
  mx = np.full(lead + (rows, lay.block), -np.inf)
  np.fmax.at(mx, (slice(None), slice(None), key), np.fmax.reduce(sv, axis=-1, initial=-np.inf))
  m = mx[:, :, key][..., None]
  e = np.where(vis, np.exp(sv - np.where(m == -np.inf, 0.0, m)), 0.0)  # inf - inf: NaN
  total = np.zeros(mx.shape)
  np.add.at(total, (slice(None), slice(None), key), e.sum(axis=-1))
  t = total[:, :, key][..., None]
  prob = np.where(t > 0, e / np.where(t > 0, t, 1.0), np.where(t == 0, 0.0, e))
  lse = np.where(total > 0, mx + np.log(np.where(total > 0, total, 1.0)),
                 np.where(total == 0, -np.inf, np.nan))
  return prob, lse


def ref_softmax(x, blocks, ro, mi, masks, kp, scale):
  x = _f64(x)
  lay = Layout.of(blocks, kp.shape[1], x.shape[3], ro.shape[0] - 1, 1)
  lay.groups = x.shape[1]
  prob, _ = row_softmax(np.float64(scale) * x, visible(lay, mi, masks, kp), lay)
  return prob


def ref_softmax_grad(y, dy, ro, scale, magnitude=False):
  """dx = 0 where y == 0, else y * (dy - sum_row(y * dy)) * scale.

  magnitude: the same sum over absolute values of its terms instead, the size
  of float32 rounding in dy - sum_row (see COND_EPS).
  """
  if y.size == 0:     # [0, 2**30, 2**30] fits no float64 array
    return np.zeros(y.shape, np.float32)
  y, dy = _f64(y), _f64(dy)
  if magnitude:
    y, dy, scale = np.abs(y), np.abs(dy), abs(scale)
  key = np.searchsorted(ro, np.arange(y.shape[2]), side="right") - 1   # (Z,) row of each block
  dot = np.zeros(y.shape[:2] + (ro.shape[0] - 1, y.shape[3]))
  np.add.at(dot, (slice(None), slice(None), key), (y * dy).sum(axis=-1))
  dot = dot[:, :, key][..., None]
  return np.where(y == 0, 0.0, y * ((dy + dot) if magnitude else (dy - dot)) * np.float64(scale))


SCALE_PLACEMENTS = ("q", "product")   # where the fused kernels apply the scale (module doc)


def _scores(qi, kj, scale, placement):
  if placement == "q":
    return np.einsum("bgzqd,bgzkd->bgzqk", np.float64(scale) * qi, kj)
  return np.float64(scale) * np.einsum("bgzqd,bgzkd->bgzqk", qi, kj)


def ref_attention(q, k, v, lay: Layout, vis, scale, placement="q"):
  """(out [B, N, H, Dv], lse [B, H, N], probabilities [B, G, Z, b, b])."""
  q, k, v = _f64(q), _f64(k), _f64(v)
  s = _scores(lay.gather(q, lay.i), lay.gather(k, lay.j), scale, placement)
  prob, lse = row_softmax(s, vis, lay)
  out = lay.scatter(v.shape, lay.i, masked_matmul(prob, vis, lay.gather(v, lay.j)))
  b, n, h, _ = q.shape
  return out, lse.reshape(b, h, n), prob


def v_reach(v, lay: Layout):
  """bool [B, N, H, 1]: query rows that share a kept tile with a NaN / inf in v.

  The forward's P.V runs over whole tiles (0 where hidden), so such a value
  may reach these rows (not only the rows that see it).
  """
  vbad = ~np.isfinite(_f64(v)).all(axis=-1, keepdims=True)             # (B, N, H, 1)
  if not vbad.any():
    return np.zeros(vbad.shape, bool)
  tiles = lay.gather(vbad.astype(np.float64), lay.j).any(axis=(-2, -1))  # (B, G, Z)
  rows = np.broadcast_to(tiles[..., None, None], tiles.shape + (lay.block, 1)).astype(float)
  return lay.scatter(vbad.shape, lay.i, rows) > 0


def ref_attention_grad(q, k, v, out, lse, dout, lay: Layout, vis, scale, placement="q",
                       magnitude=False):
  """(dq, dk, dv) from the saved out and lse, as the gradient op defines them.

  magnitude: instead, the size of their float32 rounding (see COND_EPS): dS
  from |dout| . |v| + |dout . out| (dP - delta cancels where a row's softmax is
  saturated) plus |dP - delta| (|S| + |lse|) (P = exp(S - lse) of large scores),
  summed with |k|, |q| and |dout|.
  """
  if magnitude:
    return _attention_grad_magnitude(q, k, v, out, lse, dout, lay, vis, scale)
  q, k, v, out, lse, dout = (_f64(t) for t in (q, k, v, out, lse, dout))
  b, n, h, _ = q.shape
  qi, kj = lay.gather(q, lay.i), lay.gather(k, lay.j)
  s = _scores(qi, kj, scale, placement)
  lse = np.where(np.isnan(lse) | (lse == -np.inf), np.inf, lse)      # P = 0 but NaN / +inf scores
  rows_lse = lse.reshape(b, lay.groups, lay.hl * lay.nb, lay.block)[:, :, lay.row_key]
  prob = np.where(vis, np.exp(s - rows_lse[..., None]), 0.0)
  do_i = lay.gather(dout, lay.i)
  delta = (do_i * lay.gather(out, lay.i)).sum(axis=-1)                  # (B, G, Z, b)
  vis_t = np.swapaxes(vis, -1, -2)
  dv = lay.scatter(v.shape, lay.j, masked_matmul(np.swapaxes(prob, -1, -2), vis_t, do_i))
  dp = np.einsum("bgzqd,bgzkd->bgzqk", do_i, lay.gather(v, lay.j))
  ds = np.where(vis, prob * (dp - delta[..., None]), 0.0)
  sc = np.float64(scale)
  if placement == "q":
    dq = sc * lay.scatter(q.shape, lay.i, masked_matmul(ds, vis, kj))
    dk = lay.scatter(k.shape, lay.j, masked_matmul(np.swapaxes(ds, -1, -2), vis_t, sc * qi))
  else:
    ds = np.where(vis, ds * sc, 0.0)
    dq = lay.scatter(q.shape, lay.i, masked_matmul(ds, vis, kj))
    dk = lay.scatter(k.shape, lay.j, masked_matmul(np.swapaxes(ds, -1, -2), vis_t, qi))
  return dq, dk, dv


def _attention_grad_magnitude(q, k, v, out, lse, dout, lay: Layout, vis, scale):
  q, k, v, out, lse, dout = (_f64(t) for t in (q, k, v, out, lse, dout))
  b, n, h, _ = q.shape
  sc = abs(np.float64(scale))
  qi, kj = lay.gather(q, lay.i), lay.gather(k, lay.j)
  s = sc * np.einsum("bgzqd,bgzkd->bgzqk", np.abs(qi), np.abs(kj))          # >= |S|
  lse = np.where(np.isfinite(lse), lse, np.inf)
  rows_lse = lse.reshape(b, lay.groups, lay.hl * lay.nb, lay.block)[:, :, lay.row_key][..., None]
  prob = np.where(vis, np.exp(np.float64(scale) * np.einsum("bgzqd,bgzkd->bgzqk", qi, kj)
                              - rows_lse), 0.0)
  p_err = s + np.abs(np.where(np.isfinite(rows_lse), rows_lse, 0.0))      # relative error of P / eps
  do_i = lay.gather(dout, lay.i)
  dp = np.einsum("bgzqd,bgzkd->bgzqk", do_i, lay.gather(v, lay.j))
  delta = (do_i * lay.gather(out, lay.i)).sum(axis=-1)[..., None]
  terms = (np.einsum("bgzqd,bgzkd->bgzqk", np.abs(do_i), np.abs(lay.gather(v, lay.j)))
           + (np.abs(do_i) * np.abs(lay.gather(out, lay.i))).sum(axis=-1)[..., None])
  ds = np.where(vis, prob * (terms + np.abs(dp - delta) * p_err), 0.0)
  vis_t = np.swapaxes(vis, -1, -2)
  dv = lay.scatter(v.shape, lay.j, masked_matmul(np.swapaxes(prob * p_err, -1, -2), vis_t,
                                                 np.abs(do_i)))
  dq = sc * lay.scatter(q.shape, lay.i, masked_matmul(ds, vis, np.abs(kj)))
  dk = sc * lay.scatter(k.shape, lay.j, masked_matmul(np.swapaxes(ds, -1, -2), vis_t, np.abs(qi)))
  return dq, dk, dv


def rounding_magnitudes(op, x: dict, upstream, forward, n_outputs):
  """Per output, the size of its float32 rounding where cancellation makes it
  exceed the tolerance of the values (gradients of saturated softmax rows), or None."""
  mags = [None] * n_outputs
  if op == "softmax_grad":
    mags[0] = ref_softmax_grad(x["y"], x["dy"], x["row_offsets"], x["scale"], magnitude=True)
  elif op == "softmax" and upstream is not None:
    mags[1] = ref_softmax_grad(forward[0], upstream[0], x["row_offsets"], x["scale"],
                               magnitude=True)
  elif op in ("attention", "attention_grad"):
    lay = _attention_layout(x)
    vis = visible(lay, x["mask_index"], x["masks"], x["key_padding_mask"])
    if op == "attention_grad":
      mags[:3] = ref_attention_grad(x["q"], x["k"], x["v"], x["out"], x["lse"], x["dout"], lay,
                                    vis, x["scale"], magnitude=True)
    elif upstream is not None:
      mags[2:5] = ref_attention_grad(x["q"], x["k"], x["v"], forward[0], forward[1], upstream[0],
                                     lay, vis, x["scale"], magnitude=True)
  return [m if m is None else np.where(np.isfinite(m), m, 0.0) for m in mags]


def _attention_layout(x):
  q = x["q"]
  return Layout.of(x["blocks"], q.shape[1], x["block_size"], x["row_offsets"].shape[0] - 1,
                   q.shape[2])


def reference(op, x: dict, upstream=None, forward=None, placement="q"):
  """The op's outputs in float64 (then, with upstream gradients, the input gradients).

  forward: in tape mode, the forward outputs the kernel gave; the gradients'
  reference starts from them (as the registered gradient does).
  """
  if op == "softmax_grad":
    return [ref_softmax_grad(x["y"], x["dy"], x["row_offsets"], x["scale"])]
  if op == "softmax":
    y = ref_softmax(x["x"], x["blocks"], x["row_offsets"], x["mask_index"], x["masks"],
                    x["key_padding_mask"], x["scale"])
    if upstream is None:
      return [y]
    y_fwd = y if forward is None else forward[0]
    return [y, ref_softmax_grad(y_fwd, upstream[0], x["row_offsets"], x["scale"])]
  if op in ("attention", "attention_grad"):
    lay = _attention_layout(x)
    vis = visible(lay, x["mask_index"], x["masks"], x["key_padding_mask"])
    if op == "attention_grad":
      return list(ref_attention_grad(x["q"], x["k"], x["v"], x["out"], x["lse"], x["dout"], lay,
                                     vis, x["scale"], placement))
    out, lse, _ = ref_attention(x["q"], x["k"], x["v"], lay, vis, x["scale"], placement)
    if upstream is None:
      return [out, lse]
    out_fwd, lse_fwd = (out, lse) if forward is None else forward[:2]
    grads = ref_attention_grad(x["q"], x["k"], x["v"], out_fwd, lse_fwd, upstream[0], lay, vis,
                               x["scale"], placement)
    return [out, lse, *grads]
  dense = x["a"] if op == "sdd" else x["x"]
  block = x["block_size"] if op == "sdd" else x["p"].shape[3]
  lay = Layout.of(x["blocks"], dense.shape[1], block, x["row_offsets"].shape[0] - 1,
                  dense.shape[2])
  if op == "sdd":
    out = [ref_sdd(x["a"], x["b"], lay)]
    if upstream is not None:   # dA = dsd(dC, B), dB = dsd_t(dC, A)
      out += [ref_dsd(upstream[0], x["b"], lay), ref_dsd_t(upstream[0], x["a"], lay)]
    return out
  fwd, back = (ref_dsd, ref_dsd_t) if op == "dsd" else (ref_dsd_t, ref_dsd)
  out = [fwd(x["p"], x["x"], lay)]
  if upstream is not None:     # dP from an SDD product, dX from the other product
    dp = ref_sdd(upstream[0], x["x"], lay) if op == "dsd" else ref_sdd(x["x"], upstream[0], lay)
    out += [dp, back(x["p"], upstream[0], lay)]
  return out


def allowed_nonfinite(op, x: dict, n_outputs: int):
  """Per output, a bool mask (broadcastable) of elements that may be non-finite
  although the reference is finite, or None: the forward's out rows that share a
  kept tile with a NaN / inf in v."""
  masks = [None] * n_outputs
  if op == "attention" and x["v"].size:
    masks[0] = v_reach(x["v"], _attention_layout(x))
  return masks


def _mismatch(got, ref, tol, tiny, big, strict_inf, allowed, rounding):
  """bool mask of the elements of got (float64) that differ from ref (module doc)."""
  fin = np.isfinite(ref)
  mag = float(np.abs(ref[fin]).max()) if fin.any() else 0.0
  slack = tol * (np.abs(ref) + (mag if mag > 0 else 1.0)) + tiny
  if rounding is not None:
    slack = slack + COND_EPS * rounding
  close = np.abs(got - ref) <= slack
  close |= (np.abs(ref) > big) & (got == np.sign(ref) * np.inf)      # rounded past the dtype
  ok = np.where(fin, close, np.where(np.isinf(ref), (got == ref) | np.isnan(got),
                                     ~np.isfinite(got)))
  if allowed is not None:
    ok |= np.broadcast_to(allowed, got.shape) & ~np.isfinite(got)
  if strict_inf:
    ok &= ~np.isinf(ref) | (got == ref)
  return ~ok


def compare(got, refs, tol, strict_inf, allowed=None, rounding=None) -> Optional[str]:
  """None if `got` equals one of `refs` (alternatives, element by element) under
  the rules of the module docstring, else why not.

  Besides the relative tolerance, values below the output dtype's smallest normal
  number (6e-5 in float16) are equal: the dtype cannot tell them apart from 0;
  and where `rounding` (rounding_magnitudes) is given, COND_EPS * rounding more.
  """
  got = np.asarray(got)
  refs = refs if isinstance(refs, (list, tuple)) else [refs]
  if got.shape != refs[0].shape:
    return f"shape {got.shape}, reference {refs[0].shape}"
  if got.size == 0:
    return None
  info = ml_dtypes_finfo(got.dtype)
  tiny, big = float(info.smallest_normal), float(info.max)
  got = got.astype(np.float64)
  bad = np.ones(got.shape, bool)
  for ref in refs:
    bad &= _mismatch(got, ref, tol, tiny, big, strict_inf, allowed, rounding)
  if bad.any():
    ref = refs[0]
    fin = np.isfinite(ref)
    mag = float(np.abs(ref[fin]).max()) if fin.any() else 0.0
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    return (f"{int(bad.sum())} of {bad.size} elements differ; first at {idx}: got {got[idx]!r}, "
            f"reference {ref[idx]!r} (max |ref| {mag:.3g}, tol {tol})")
  return None


def ml_dtypes_finfo(dtype):
  import ml_dtypes   # numpy's finfo does not know bfloat16
  return ml_dtypes.finfo(dtype)


# --- cases -----------------------------------------------------------------------------
def _np_dtype(name):
  if name == "bfloat16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def realize(case) -> dict:
  """The numpy inputs of a case, by argument name (attributes included)."""
  x = dict(case["attrs"])
  if "scale" in x:
    x["scale"] = float(np.float32(x["scale"]))   # the attribute is a float32
  derived = []
  for name, spec in case["inputs"]:
    shape = tuple(spec["shape"])
    if "normal" in spec and 0 in shape:     # numpy cannot draw [0, 2**30, 2**30] (nor hold
      x[name] = np.zeros(shape, _np_dtype(spec["dtype"]))   # it in float64)
    elif "normal" in spec:
      rng = np.random.default_rng(spec["normal"])
      a = rng.standard_normal(shape) * spec.get("mult", 1.0)
      for i, val in spec.get("poison", ()):
        if a.size:
          a.reshape(-1)[i % a.size] = float(val)
      x[name] = a.astype(_np_dtype(spec["dtype"]))
    elif "values" in spec:
      x[name] = np.resize(np.array(spec["values"]).astype(_np_dtype(spec["dtype"])), shape)
    else:
      derived.append((name, spec))
  for name, spec in derived:     # attention_grad's out and lse, from the reference forward
    try:
      lay = _attention_layout(x)
      vis = visible(lay, x["mask_index"], x["masks"], x["key_padding_mask"])
      with np.errstate(all="ignore"):
        out, lse, _ = ref_attention(x["q"], x["k"], x["v"], lay, vis, x["scale"])
      a = out if name == "out" else lse
      assert a.shape == tuple(spec["shape"])
    except Exception:            # invalid tables: no forward; random values of that shape
      a = np.random.default_rng(1).standard_normal(tuple(spec["shape"]))
    x[name] = a.astype(_np_dtype(spec["dtype"]))
  return x


def normal(shape, seed, dtype, mult=1.0):
  return {"shape": list(shape), "normal": int(seed), "mult": mult, "dtype": dtype}


def table(values, dtype="int32"):
  a = np.asarray(values)
  flat = a.reshape(-1)
  if flat.size and (flat == flat[0]).all():
    flat = flat[:1]                  # a constant table is stored as one value
  vals = [bool(v) for v in flat] if dtype == "bool" else [int(v) for v in flat]
  return {"shape": list(a.shape), "values": vals, "dtype": dtype}


_PLANS = {}


def _patterns():
  from sparse_attention_tf import patterns as P
  return [P.Dense(), P.Dense(causal=False), P.Local(20), P.Local(40, causal=False),
          P.Strided(16), P.Strided(32, heads=2, mode="split"), P.Strided(16, mode="column"),
          P.Fixed(32, 8), P.Fixed(32, 8, heads=2, head_groups=2), P.Fixed(64, 16),
          P.Longformer(16, global_tokens=(0, 5)),
          P.BigBird(block=16, window=3, num_global=1, num_random=1), P.BigBird(block=32, num_random=1)]


def pattern_tables(pattern_id, seq, block, part):
  """Tables of part `part` of a real pattern's plan (a Dense plan if that one is refused)."""
  key = (pattern_id, seq, block)
  if key not in _PLANS:
    if "patterns" not in _PLANS:
      _PLANS["patterns"] = _patterns()
    pats = _PLANS["patterns"]
    try:
      _PLANS[key] = pats[pattern_id].plan(seq, block).parts
    except ValueError:
      _PLANS[key] = pats[0].plan(seq, block).parts
  parts = _PLANS[key]
  return parts[part % len(parts)].tables


def random_layout_tables(rng, hl, nb, block):
  """Valid tables of a random kept-block layout and random tile masks."""
  from sparse_attention_tf import layout as layout_lib
  lay = rng.random((hl, nb, nb)) < rng.uniform(0.0, 1.0)
  z = int(lay.sum())
  if z == 0:  # no kept block (tables_from_layout cannot build that one)
    zeros = np.zeros(hl * nb + 1, np.int32)
    masks = np.zeros((0, block, block), bool)
    return layout_lib.BlockTables(nb * block, block, hl, np.zeros((0, 3), np.int32), zeros, zeros,
                                  np.zeros(0, np.int32), np.zeros(0, np.int32), masks,
                                  *layout_lib.mask_tables(masks))
  tiles = np.ones((z, block, block), bool)
  for t in range(z):
    kind = rng.integers(4)
    if kind == 1:
      tiles[t] = rng.random((block, block)) < 0.6
    elif kind == 2:
      tiles[t] = np.tril(np.ones((block, block), bool))
    elif kind == 3 and rng.random() < 0.3:
      tiles[t] = False          # a kept block that hides everything
  return layout_lib.tables_from_layout(lay, tiles, np.arange(z), block)


def _strategies():
  """The hypothesis strategy of one case (built on first use: it imports hypothesis)."""
  from hypothesis import strategies as st

  i32 = np.iinfo(np.int32)
  any_int = st.integers(-3, 20) | st.sampled_from([int(i32.min), int(i32.max), -1, 2**30])
  specials = [0.0, -0.0, -1.0, -2.5, 1e-30, 100.0, float("inf"), float("-inf"), float("nan")]
  scale_st = st.floats(-3, 3, width=32) | st.sampled_from(specials)
  seeds = st.integers(0, 2**31 - 1)

  def pick(draw, options):
    return draw(st.sampled_from(options))

  def float_inputs(draw, op, dims, dtype, poison):
    """Specs of the float operands of a valid call; dims: B, N, H, D, Dv, G, Z, b."""
    b, n, h, d, dv, g, z, bs = (dims[k] for k in ("B", "N", "H", "D", "Dv", "G", "Z", "b"))
    mult = pick(draw, [1.0, 1.0, 1.0, 4.0])
    dense, sparse = (b, n, h, d), (b, g, z, bs, bs)
    shapes = {"sdd": {"a": dense, "b": dense}, "dsd": {"p": sparse, "x": dense},
              "dsd_t": {"p": sparse, "x": dense}, "softmax": {"x": sparse},
              "softmax_grad": {"y": sparse, "dy": sparse},
              "attention": {"q": dense, "k": dense, "v": (b, n, h, dv)},
              "attention_grad": {"q": dense, "k": dense, "v": (b, n, h, dv),
                                 "dout": (b, n, h, dv)}}[op]
    specs = {name: normal(shape, draw(seeds), dtype, mult) for name, shape in shapes.items()}
    if poison:   # NaN / inf at 1-3 places of one operand
      name = pick(draw, sorted(specs))
      specs[name]["poison"] = [[draw(st.integers(0, 2**20)), pick(draw, ["nan", "inf", "-inf"])]
                               for _ in range(draw(st.integers(1, 3)))]
    if op == "attention_grad":
      specs["out"] = {"shape": [b, n, h, dv], "derived": "out", "dtype": dtype}
      specs["lse"] = {"shape": [b, h, n], "derived": "lse", "dtype": "float32"}
    return specs

  def assemble(op, floats, t, kp, attrs, kind, dtype, mode, upstream_seed):
    tabs = {"blocks": table(t.blocks), "row_offsets": table(t.row_offsets),
            "col_offsets": table(t.col_offsets), "col_blocks": table(t.col_blocks),
            "mask_index": table(t.mask_index), "masks": table(t.masks, "bool"),
            "mask_key_range": table(t.mask_key_range),
            "mask_query_range": table(t.mask_query_range),
            "mask_split": table(t.mask_split, "bool"), "key_padding_mask": table(kp, "bool")}
    names, attr_names = SIGNATURES[op]
    inputs = [[n, floats[n] if n in floats else tabs[n]] for n in names]
    return {"kind": kind, "op": op, "dtype": dtype, "mode": mode, "upstream": upstream_seed,
            "attrs": {a: attrs[a] for a in attr_names}, "inputs": inputs}

  @st.composite
  def valid(draw):
    op = pick(draw, OPS)
    if draw(st.integers(0, 3)):   # a real pattern
      bs = pick(draw, [16, 16, 32, 64] if op.startswith("attention") else [16, 32, 64])
      n = pick(draw, [m for m in (16, 32, 48, 64, 96, 128, 192, 256) if m % bs == 0])
      t = pattern_tables(draw(st.integers(0, 12)), n, bs, draw(st.integers(0, 1)))
    else:                         # a random valid layout, any block size (FUSED_BLOCKS for the fused op)
      sizes = list(FUSED_BLOCKS) if op.startswith("attention") else [1, 2, 3, 4, 8, 16, 24, 48]
      bs = pick(draw, sizes)
      nb = draw(st.integers(1, 2 if bs >= 128 else 4))
      t = random_layout_tables(np.random.default_rng(draw(seeds)), draw(st.integers(1, 3)), nb, bs)
    n, hl = t.seq_len, t.num_layout_heads
    g = draw(st.integers(1, 2))
    dims = {"B": pick(draw, [1, 1, 2, 0]), "N": n, "H": g * hl, "D": draw(st.integers(1, 9)),
            "Dv": draw(st.integers(1, 9)), "G": g, "Z": t.nnz, "b": t.block_size}
    dtype = pick(draw, list(FLOAT_DTYPES))
    poison = bs <= 64 and draw(st.integers(0, 3)) == 0     # the non-finite semantics
    floats = float_inputs(draw, op, dims, dtype, poison)
    kp_kind = pick(draw, ["all", "all", "random", "none"])
    kp = np.ones((dims["B"], n), bool)
    if kp_kind == "random":
      kp = np.random.default_rng(draw(seeds)).random((dims["B"], n)) < 0.7
    elif kp_kind == "none" and dims["B"]:
      kp[-1] = False              # a sequence that is all padding
    scale = draw(scale_st) if draw(st.integers(0, 4)) == 0 else draw(st.floats(0.0625, 2, width=32))
    mode = pick(draw, ["eager"] * 5 + ["graph"] * 2 + (["tape"] * 2 if op in TAPE_OPS else []))
    attrs = {"block_size": t.block_size, "scale": scale}
    return assemble(op, floats, t, kp, attrs, "valid", dtype, mode, draw(seeds))

  @st.composite
  def mutated(draw):
    case = draw(valid())
    case["kind"] = "mutated"
    if case["mode"] == "tape":
      case["mode"] = "eager"
    for _ in range(draw(st.integers(1, 3))):
      what = pick(draw, ["table", "table", "table_len", "dim", "dim", "block_size", "scale",
                         "dtype", "rank"])
      i = draw(st.integers(0, len(case["inputs"]) - 1))
      name, spec = case["inputs"][i]
      spec = case["inputs"][i][1] = json.loads(json.dumps(spec))
      shape = spec["shape"]
      if what == "block_size" and "block_size" in case["attrs"]:
        case["attrs"]["block_size"] = pick(draw, [0, -1, -16, 1, 8, 15, 17, 24, 48, 131072,
                                                  2**30, 2**31 - 1, 2**40])
      elif what == "scale" and "scale" in case["attrs"]:
        case["attrs"]["scale"] = pick(draw, specials)
      elif what == "table" and "values" in spec and shape:
        vals = np.resize(np.array(spec["values"]), shape).reshape(-1)
        if vals.size:
          k = draw(st.integers(0, vals.size - 1))
          vals = vals.tolist()
          vals[k] = (not vals[k]) if spec["dtype"] == "bool" else draw(any_int)
          spec["values"] = vals
      elif what == "table_len" and "values" in spec and shape:
        vals = np.resize(np.array(spec["values"]), shape)
        change = pick(draw, ["drop", "append", "reverse"])
        if change == "drop" and vals.shape[0]:
          vals = np.delete(vals, draw(st.integers(0, vals.shape[0] - 1)), axis=0)
        elif change == "append":
          vals = np.concatenate([vals, vals[-1:] if vals.shape[0] else vals[:0]], axis=0)
        else:
          vals = vals[::-1]
        case["inputs"][i][1] = table(vals, spec["dtype"])
      elif what == "dim" and shape:
        ax = draw(st.integers(0, len(shape) - 1))
        shape[ax] = pick(draw, [0, 1, 3, max(0, shape[ax] - 1), shape[ax] + 1, 2 * shape[ax]])
      elif what == "dtype":
        spec["dtype"] = pick(draw, ["float32", "bfloat16", "float16", "float64", "int32", "int64",
                                    "bool"])
      elif what == "rank":
        spec["shape"] = shape[:-1] if shape and draw(st.booleans()) else shape + [1]
    return case

  small_shape = st.lists(st.integers(0, 4) | st.sampled_from([8, 16]), min_size=0,
                         max_size=6).filter(lambda s: np.prod(s) <= 4096)

  @st.composite
  def garbage(draw):
    op = pick(draw, OPS)
    names, attr_names = SIGNATURES[op]
    dtype = pick(draw, list(FLOAT_DTYPES))
    inputs = []
    for name in names:
      shape = draw(small_shape)
      if name in TABLE_NAMES:
        spec = {"shape": shape, "values": draw(st.lists(any_int, min_size=1, max_size=16)),
                "dtype": "int32"}
      elif name in BOOL_NAMES:
        spec = {"shape": shape, "values": draw(st.lists(st.booleans(), min_size=1, max_size=16)),
                "dtype": "bool"}
      else:
        spec = normal(shape, draw(seeds), "float32" if name == "lse" else dtype)
      inputs.append([name, spec])
    attrs = {"block_size": draw(st.integers(-2, 20) | st.sampled_from([2**31 - 1, 2**40])),
             "scale": draw(scale_st)}
    return {"kind": "garbage", "op": op, "dtype": dtype, "mode": pick(draw, ["eager"] * 4 + ["graph"]),
            "upstream": 0, "attrs": {a: attrs[a] for a in attr_names}, "inputs": inputs}

  @st.composite
  def huge(draw):
    """Block sizes far past any pattern's on a 131072-long sequence (512 KiB q), no kept block."""
    op = pick(draw, OPS)
    bs = pick(draw, [65536, HUGE_SEQ, HUGE_SEQ, 2**30, 2**31 - 1, 2**40])
    n = HUGE_SEQ
    nb = max(1, n // bs) if n % bs == 0 else 1
    dims = {"B": 1, "N": n, "H": 1, "D": 1, "Dv": 1, "G": 1, "Z": 0, "b": min(bs, 2**30)}
    t = _Tables(blocks=np.zeros((0, 3), np.int32), row_offsets=np.zeros(nb + 1, np.int32),
                col_offsets=np.zeros(nb + 1, np.int32), col_blocks=np.zeros(0, np.int32),
                mask_index=np.zeros(0, np.int32), masks=np.zeros((0, dims["b"], dims["b"]), bool),
                mask_key_range=np.zeros((0, 2), np.int32),
                mask_query_range=np.zeros((0, dims["b"] // 16, 2), np.int32),
                mask_split=np.zeros(0, bool))
    dtype = pick(draw, list(FLOAT_DTYPES))
    floats = float_inputs(draw, op, dims, dtype, False)
    attrs = {"block_size": bs, "scale": 0.5}
    return assemble(op, floats, t, np.ones((1, n), bool), attrs, "huge", dtype,
                    pick(draw, ["eager", "graph"]), 0)

  return st.integers(0, 99).flatmap(
      lambda r: valid() if r < 45 else mutated() if r < 75 else garbage() if r < 99 else huge())


@dataclasses.dataclass
class _Tables:
  blocks: np.ndarray
  row_offsets: np.ndarray
  col_offsets: np.ndarray
  col_blocks: np.ndarray
  mask_index: np.ndarray
  masks: np.ndarray
  mask_key_range: np.ndarray
  mask_query_range: np.ndarray
  mask_split: np.ndarray


# --- running one case -------------------------------------------------------------------
def _is_clean(e) -> bool:
  import tensorflow as tf
  return isinstance(e, (tf.errors.OpError, ValueError, TypeError))


def call(case, x: dict):
  """Runs the op of a case: its outputs (and, in tape mode, the float inputs' gradients)."""
  import tensorflow as tf
  from sparse_attention_tf import ops
  op, mode = case["op"], case["mode"]
  names, attr_names = SIGNATURES[op]
  attrs = {a: case["attrs"][a] for a in attr_names}
  tensors = [tf.convert_to_tensor(x[n]) for n in names]
  fn = getattr(ops, op)
  if mode == "graph":
    outs = tf.function(lambda *t: fn(*t, **attrs), autograph=False)(*tensors)
  elif mode == "tape":
    watched = [t for n, t in zip(names, tensors) if t.dtype.is_floating and n != "lse"]
    with tf.GradientTape() as tape:
      tape.watch(watched)
      outs = fn(*tensors, **attrs)
    first = outs[0] if isinstance(outs, (tuple, list)) else outs
    up = tf.convert_to_tensor(upstream_of(case, first.shape, first.dtype.as_numpy_dtype))
    grads = tape.gradient(first, watched, output_gradients=up)
    outs = tf.nest.flatten(outs) + list(grads)
  else:
    outs = fn(*tensors, **attrs)
  return [np.asarray(o.numpy() if hasattr(o, "numpy") else o) for o in tf.nest.flatten(outs)]


def upstream_of(case, shape, dtype):
  rng = np.random.default_rng(case["upstream"])
  return rng.standard_normal(tuple(shape)).astype(dtype)


def run_case(case):
  """(verdict, detail) of one case: see the module docstring."""
  x = realize(case)
  problem = contract_problem(case["op"], x, case["attrs"])
  try:
    outs = call(case, x)
  except Exception as e:  # noqa: BLE001 -- classified here
    detail = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    if not _is_clean(e):
      return "unclean", detail
    return ("error", detail) if problem else ("error_valid", detail)
  if problem:
    return "wrong", f"accepted an input that breaks the contract ({problem})"
  op, scale = case["op"], case["attrs"].get("scale", 1.0)
  up = fwd = None
  if case["mode"] == "tape":
    up = [upstream_of(case, outs[0].shape, outs[0].dtype).astype(np.float64)]
    fwd = [o.astype(np.float64) if o.dtype.kind == "f" or o.dtype.name == "bfloat16" else o
           for o in outs[:2]]
  placements = (SCALE_PLACEMENTS if op.startswith("attention") and not np.isfinite(scale)
                else SCALE_PLACEMENTS[:1])
  try:
    with np.errstate(all="ignore"):
      alternatives = [reference(op, x, up, fwd, placement) for placement in placements]
      allowed = allowed_nonfinite(op, x, len(alternatives[0]))
      rounding = rounding_magnitudes(op, x, up, fwd, len(alternatives[0]))
  except Exception as e:  # noqa: BLE001
    return "harness", f"the reference failed: {type(e).__name__}: {e}"
  if len(alternatives[0]) != len(outs):
    return "wrong", f"{len(outs)} outputs, the reference has {len(alternatives[0])}"
  finite_in = np.isfinite(scale) and all(
      x[n].size == 0 or np.isfinite(x[n].astype(np.float32)).all() for n in SIGNATURES[op][0]
      if x[n].dtype.kind == "f" or str(x[n].dtype) == "bfloat16")
  tol = TOL[str(x[SIGNATURES[op][0][0]].dtype)]   # a mutation may change the dtype
  for k, o in enumerate(outs):
    with np.errstate(all="ignore"):
      why = compare(o, [refs[k] for refs in alternatives], tol, strict_inf=finite_in,
                    allowed=allowed[k], rounding=rounding[k])
    if why:
      return "wrong", f"output {k}: {why}"
  return "equal", "empty" if not any(o.size for o in outs) else ""


# --- the worker ------------------------------------------------------------------------
VERDICTS = ("equal", "error", "error_valid", "wrong", "unclean", "harness")


def _write_json(path, obj):
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(json.dumps(obj))   # json.dump encodes in Python, dumps in C (10x faster)
  os.replace(tmp, path)


def work(state_dir, until, seed, case_timeout, round_size=40):
  """Runs cases until the wall-clock time `until`; state_dir/state.json holds the counts
  and the case in progress (written before each call), wrong.jsonl the wrong results."""
  from hypothesis import HealthCheck, Phase, given, seed as hseed, settings

  from sparse_attention_tf import ops  # TensorFlow loads here, before the first case
  assert ops.is_available(), ops.load_error()
  state_dir = pathlib.Path(state_dir)
  counts = collections.Counter()
  samples = []   # messages of valid inputs that were rejected
  _write_json(state_dir / "isa.json", {"simd_isa": ops.simd_isa()})
  strategy = _strategies()
  wrong_log = open(state_dir / "wrong.jsonl", "a")

  def one(case):
    if time.time() >= until:
      return
    counts["tried"] += 1
    counts[f"tried_{case['kind']}"] += 1
    _write_json(state_dir / "state.json", {"counts": counts, "samples": samples, "case": case,
                                          "started": time.time()})
    faulthandler.dump_traceback_later(case_timeout, exit=True)
    try:
      verdict, detail = run_case(case)
    except Exception as e:  # noqa: BLE001 -- a bug of the fuzzer, reported as such
      verdict, detail = "harness", f"{type(e).__name__}: {e}"[:500]
    faulthandler.cancel_dump_traceback_later()
    counts[verdict] += 1
    if verdict == "equal":
      counts[f"equal_{case['kind']}"] += 1
      counts["equal_nonempty"] += detail != "empty"
    if verdict in ("wrong", "unclean", "harness") and counts[verdict] <= 20:
      wrong_log.write(json.dumps({"verdict": verdict, "detail": detail, "case": case}) + "\n")
      wrong_log.flush()
    if verdict == "error_valid" and len(samples) < 5:
      samples.append(f"{case['op']} (block {case['attrs'].get('block_size')}): {detail[:150]}")

  rounds = 0
  while time.time() < until:
    fuzz = given(case=strategy)(one)
    fuzz = settings(max_examples=round_size, phases=[Phase.generate], database=None,
                    deadline=None, suppress_health_check=list(HealthCheck))(fuzz)
    hseed(seed * 100_003 + rounds)(fuzz)()
    rounds += 1
  _write_json(state_dir / "state.json", {"counts": counts, "samples": samples, "case": None,
                                          "done": True})


# --- the supervisor (the caller's side) ---------------------------------------------------
def cpu_model() -> str:
  """The model name in /proc/cpuinfo, the cores, and the SIMD flags the kernels use."""
  model, flags = "unknown CPU", set()
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
      elif line.startswith("flags"):
        flags = set(line.split(":", 1)[1].split())
        break
  except OSError:
    pass
  simd = [f for f in ("avx2", "avx512f", "avx512_bf16") if f in flags]
  return f"{model}, {os.cpu_count()} cores{', ' + ' '.join(simd) if simd else ''}"


def _tail(path, lines=40):
  try:
    return "\n".join(pathlib.Path(path).read_text(errors="replace").splitlines()[-lines:])
  except OSError:
    return ""


def _read_json(path):
  try:
    return json.loads(pathlib.Path(path).read_text())
  except (OSError, ValueError):
    return None


def supervise(seconds, seed, state_dir, restart=True, case_timeout=20.0, log=None):
  """Runs workers for `seconds` of wall time (a new one after each crash or hang if
  `restart`). Returns a summary dict: counts, crashes and hangs with their last input,
  wrong results, workers started, duration, CPU model."""
  state_dir = pathlib.Path(state_dir)
  start = time.time()
  until = start + seconds
  totals = collections.Counter()
  crashes, hangs, wrongs, errors_valid = [], [], [], []
  workers = 0
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  while workers == 0 or (restart and until - time.time() > 15):
    wdir = state_dir / f"worker{workers}"
    wdir.mkdir(parents=True, exist_ok=True)
    wseed = seed + 7919 * workers
    cmd = [sys.executable, "-m", "tests.fuzz_ops_worker", "--work", str(wdir), "--until",
           repr(until), "--seed", str(wseed), "--case-timeout", str(case_timeout)]
    with open(wdir / "stderr.txt", "w") as err:
      proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=err, stderr=subprocess.STDOUT,
                              start_new_session=True)
    workers += 1
    launched, killed = time.time(), False
    while proc.poll() is None:
      time.sleep(0.25)
      state = _read_json(wdir / "state.json") or {}
      started = state.get("started") or launched + 60     # 60 s to import TensorFlow
      if state.get("done"):                                 # no case runs: let it exit
        started = time.time()
      if time.time() - started > case_timeout + 15 or time.time() > until + case_timeout + 60:
        os.killpg(proc.pid, signal.SIGKILL)                 # faulthandler did not end it
        proc.wait()
        killed = True
    state = _read_json(wdir / "state.json") or {}
    counts = collections.Counter(state.get("counts", {}))
    stderr = _tail(wdir / "stderr.txt")
    if proc.returncode == 0 and state.get("done"):
      pass
    elif killed or "Timeout (" in stderr:
      counts["hang"] += 1
      hangs.append({"case": state.get("case"), "seed": wseed, "stderr": stderr})
    elif proc.returncode < 0:  # killed by a signal: SIGSEGV, SIGABRT (std::terminate), ...
      counts["crash"] += 1
      crashes.append({"case": state.get("case"), "seed": wseed, "stderr": stderr,
                      "how": f"signal {signal.Signals(-proc.returncode).name}"})
    else:                      # a Python error of the worker itself
      counts["harness"] += 1
      wrongs.append({"verdict": "harness", "case": state.get("case"),
                     "detail": f"the worker failed (exit code {proc.returncode}):\n{stderr}"})
    for line in open(wdir / "wrong.jsonl") if (wdir / "wrong.jsonl").exists() else ():
      wrongs.append(json.loads(line))
    errors_valid += state.get("samples", [])
    totals.update(counts)
    if log:
      log(f"worker {workers - 1} (seed {wseed}) ended after {time.time() - launched:.0f}s: "
          f"{dict(sorted(counts.items()))}")
  isa = (_read_json(state_dir / "worker0" / "isa.json") or {}).get("simd_isa", "?")
  return {"counts": dict(totals), "crashes": crashes, "hangs": hangs, "wrong": wrongs,
          "errors_valid": errors_valid, "workers": workers, "seconds": time.time() - start,
          "seed": seed, "cpu": f"{cpu_model()}; kernels: {isa}"}


def markdown(summary) -> str:
  """The campaign table, with the CPU model and the share of valid cases accepted."""
  c = collections.Counter(summary["counts"])
  clean = c["error"] + c["error_valid"]
  rows = [
      "| cases tried | accepted, equal to reference | clean errors | crashes | silent wrong | hangs |",
      "|---:|---:|---:|---:|---:|---:|",
      f"| {c['tried']} | {c['equal']} | {clean} | {c['crash']} | {c['wrong']} | {c['hang']} |",
      "",
      f"CPU: {summary['cpu']}; {summary['seconds']:.0f} s wall, {summary['workers']} worker "
      f"process(es), seed {summary['seed']}.",
  ]
  kinds = ", ".join(f"{k} {c['equal_' + k]}/{c['tried_' + k]}"
                    for k in ("valid", "mutated", "garbage", "huge") if c["tried_" + k])
  rows.append(f"Accepted and equal / tried, by case kind: {kinds}; {c['equal_nonempty']} "
              f"accepted calls had a non-empty output compared.")
  if c["error_valid"]:
    rows.append(f"Valid (by the contract) but rejected: {c['error_valid']}, e.g. "
                + " | ".join(summary["errors_valid"][:3]))
  if c["unclean"] or c["harness"]:
    rows.append(f"Unclean exceptions: {c['unclean']}; reference failures: {c['harness']}.")
  return "\n".join(rows)


def case_line(case) -> str:
  """One line about a case: op, kind, dtype, mode, attributes, float operands (shape, poison)."""
  if not case:
    return "(no case: the worker died between cases)"
  floats = ", ".join(f"{n}{spec['shape']}" + (f" poison {spec['poison']}" if spec.get("poison") else "")
                     for n, spec in case["inputs"] if "normal" in spec)
  return (f"{case['op']} ({case['kind']}, {case['dtype']}, {case['mode']}) attrs {case['attrs']}; "
          f"{floats}")


def describe(summary, limit=3, save_dir=None) -> str:
  """The last input of each crash / hang and the first wrong results, for a failure
  message: one line each, the whole case saved as save_dir/case_<n>.json (or
  printed when there is no save_dir)."""
  out, saved = [], 0

  def where(case):
    nonlocal saved
    if save_dir is None:
      return json.dumps(case)
    path = pathlib.Path(save_dir) / f"case_{saved}.json"
    saved += 1
    _write_json(path, case)
    return str(path)

  for what in ("crashes", "hangs"):
    for item in summary[what][:limit]:
      out.append(f"--- {what[:-1] if what == 'hangs' else 'crash'} "
                 f"({item.get('how', 'timeout')}, worker seed {item['seed']}); last input: "
                 f"{case_line(item['case'])}\n    {where(item['case'])}\n"
                 f"worker output (tail):\n{item['stderr']}")
  for item in sorted(summary["wrong"], key=lambda w: VERDICTS.index(w["verdict"]))[:limit]:
    out.append(f"--- {item['verdict']}: {item['detail']}\n    input: {case_line(item['case'])}"
               f"\n    {where(item['case'])}")
  if out:
    out.append("Replay one input: `python -m tests.fuzz_ops_worker --replay case.json` "
               "(a case file above, or the JSON printed saved as one).")
  return "\n".join(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--work", help="run as a worker, with this state folder")
  parser.add_argument("--until", type=float, help="worker: wall-clock end (time.time())")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--case-timeout", type=float, default=20.0)
  parser.add_argument("--replay", help="run one case (JSON) and print its verdict")
  args = parser.parse_args(argv)
  faulthandler.enable(all_threads=True)
  if args.replay:
    case = json.loads(pathlib.Path(args.replay).read_text())
    case = case.get("case", case)
    x = realize(case)
    print("contract:", contract_problem(case["op"], x, case["attrs"]) or "valid")
    print("verdict: %s %s" % run_case(case))
    return 0
  work(args.work, args.until, args.seed, args.case_timeout)
  return 0


if __name__ == "__main__":
  sys.exit(main())
