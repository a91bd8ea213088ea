"""Error handling: every malformed input gives a clear error, never a crash.

* Raw ops: corrupt one input (a shape, a table entry, an attribute) at a time
  and expect `tf.errors.InvalidArgumentError` (eager) whose message names the
  problem; a few of the same cases inside `tf.function`.
* Fuzzing (random tables, shapes, attributes; results against a float64
  reference) lives in test_fuzz_ops.py.
* `sparse_attention`: bad arguments raise ValueError naming the parameter.
* Finally a valid call still works after all of the above.
"""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import tensorflow as tf  # noqa: E402

from sparse_attention_tf import sparse_attention  # noqa: E402
from sparse_attention_tf.patterns import Fixed, Strided  # noqa: E402

# The base problem: 2 layout heads (Fixed with 2 head groups), H = 4 heads so
# G = 2 groups, N = 128, block 16 (Nb = 8), batch 2, head_dim 8.
B, N, H, D, BS = 2, 128, 4, 8, 16
NB = N // BS
PATTERN = Fixed(32, 8, heads=2, head_groups=2)

ERRORS = (tf.errors.InvalidArgumentError, ValueError)


def _tables():
  t = PATTERN.plan(N, BS).parts[0].tables
  assert t.num_layout_heads == 2 and t.nnz > 4 and t.masks.shape[0] >= 1
  return t


TABLES = _tables()
HL, Z, M = TABLES.num_layout_heads, TABLES.nnz, TABLES.masks.shape[0]
G = H // HL


def _base(op: str) -> dict:
  """Valid numpy inputs of a raw op, by input name (deterministic values)."""
  rng = np.random.default_rng(0)
  t = TABLES
  dense = lambda: rng.standard_normal((B, N, H, D)).astype(np.float32)
  sparse = lambda: rng.standard_normal((B, G, Z, BS, BS)).astype(np.float32)
  tables = dict(blocks=t.blocks.copy(), row_offsets=t.row_offsets.copy(),
                col_offsets=t.col_offsets.copy(), col_blocks=t.col_blocks.copy())
  if op == "sdd":
    return dict(a=dense(), b=dense(), **tables, block_size=BS)
  if op in ("dsd", "dsd_t"):
    return dict(p=sparse(), x=dense(), **tables)
  if op == "softmax":
    return dict(x=sparse(), blocks=t.blocks.copy(), row_offsets=t.row_offsets.copy(),
                mask_index=t.mask_index.copy(), masks=t.masks.copy(),
                key_padding_mask=np.ones((B, N), bool), scale=0.5)
  if op == "softmax_grad":
    return dict(y=sparse(), dy=sparse(), row_offsets=t.row_offsets.copy(), scale=0.5)
  fused = dict(q=dense(), k=dense(), v=dense(), **tables, mask_index=t.mask_index.copy(),
               masks=t.masks.copy(), mask_key_range=t.mask_key_range.copy(),
               mask_query_range=t.mask_query_range.copy(), mask_split=t.mask_split.copy(),
               key_padding_mask=np.ones((B, N), bool), scale=0.5, block_size=BS)
  if op == "attention":
    return fused
  if op == "attention_grad":
    return dict(fused, out=dense(), lse=rng.standard_normal((B, H, N)).astype(np.float32),
                dout=dense())
  raise KeyError(op)


_ORDER = {
    "sdd": ("a", "b", "blocks", "row_offsets", "col_offsets", "col_blocks"),
    "dsd": ("p", "x", "blocks", "row_offsets", "col_offsets", "col_blocks"),
    "dsd_t": ("p", "x", "blocks", "row_offsets", "col_offsets", "col_blocks"),
    "softmax": ("x", "blocks", "row_offsets", "mask_index", "masks", "key_padding_mask"),
    "softmax_grad": ("y", "dy", "row_offsets"),
    "attention": ("q", "k", "v", "blocks", "row_offsets", "col_offsets", "col_blocks",
                  "mask_index", "masks", "mask_key_range", "mask_query_range", "mask_split",
                  "key_padding_mask"),
    "attention_grad": ("q", "k", "v", "out", "lse", "dout", "blocks", "row_offsets",
                       "col_offsets", "col_blocks", "mask_index", "masks", "mask_key_range",
                       "mask_query_range", "mask_split", "key_padding_mask"),
}
_ATTRS = {"sdd": ("block_size",), "softmax": ("scale",), "softmax_grad": ("scale",),
          "attention": ("scale", "block_size"), "attention_grad": ("scale", "block_size")}


def _call(ops, op: str, args: dict):
  tensors = [tf.convert_to_tensor(args[k]) for k in _ORDER[op]]
  attrs = {k: args[k] for k in _ATTRS.get(op, ())}
  return getattr(ops, op)(*tensors, **attrs)


# --- mutations: each returns a modified copy of the inputs --------------------
def _set(**changes):
  def f(args):
    out = dict(args)
    for k, v in changes.items():
      out[k] = v(out[k]) if callable(v) else v
    return out
  return f


def _entry(name, index, value):
  """Sets args[name][index] = value (value may be a function of args)."""
  def f(args):
    out = dict(args)
    arr = np.array(out[name], copy=True)
    arr[index] = value(args) if callable(value) else value
    out[name] = arr
    return out
  return f


def _swap_rows(name, i, j):
  def f(args):
    out = dict(args)
    arr = np.array(out[name], copy=True)
    arr[[i, j]] = arr[[j, i]]
    out[name] = arr
    return out
  return f


def _dense_pair(fn, names=("a", "b")):
  """Applies fn to both dense operands of sdd (they must agree)."""
  return _set(**{n: fn for n in names})


def _first_row_boundary(offsets):
  """Index r (0 < r < len-1) with offsets[r-1] < offsets[r] < offsets[r+1]."""
  for r in range(1, len(offsets) - 1):
    if offsets[r - 1] < offsets[r] < offsets[r + 1]:
      return r
  raise AssertionError("no interior boundary in the tables")


_RB = _first_row_boundary(TABLES.row_offsets)
_CB = _first_row_boundary(TABLES.col_offsets)
I32_MAX, I32_MIN = np.iinfo(np.int32).max, np.iinfo(np.int32).min

# Corruptions of the four tables, shared by sdd, dsd and dsd_t: (id, mutation, keyword).
BLOCK_CASES = [
    ("blocks_rank1", _set(blocks=lambda a: a.reshape(-1)), r"blocks must have rank 2"),
    ("blocks_rank3", _set(blocks=lambda a: a[None]), r"blocks must have rank 2"),
    ("blocks_second_dim_2", _set(blocks=lambda a: a[:, :2]), r"blocks must have shape \[nnz, 3\]"),
    ("blocks_second_dim_4", _set(blocks=lambda a: np.pad(a, ((0, 0), (0, 1)))),
     r"blocks must have shape \[nnz, 3\]"),
    ("blocks_h_negative", _entry("blocks", (0, 0), -1), r"blocks\[0\].*out of range"),
    ("blocks_h_too_large", _entry("blocks", (-1, 0), HL), r"blocks\[\d+\].*out of range"),
    ("blocks_h_int32_max", _entry("blocks", (-1, 0), I32_MAX), r"blocks\[\d+\].*out of range"),
    ("blocks_i_negative", _entry("blocks", (0, 1), -1), r"blocks\[0\].*out of range"),
    ("blocks_i_too_large", _entry("blocks", (-1, 1), NB), r"blocks\[\d+\].*out of range"),
    ("blocks_i_int32_min", _entry("blocks", (3, 1), I32_MIN), r"blocks\[3\].*out of range"),
    ("blocks_j_negative", _entry("blocks", (2, 2), -1), r"blocks\[2\].*out of range"),
    ("blocks_j_too_large", _entry("blocks", (-1, 2), NB), r"blocks\[\d+\].*out of range"),
    ("blocks_j_int32_max", _entry("blocks", (1, 2), I32_MAX), r"blocks\[1\].*out of range"),
    ("blocks_unsorted", _swap_rows("blocks", 1, 2), r"blocks must be sorted"),
    ("blocks_duplicate", _entry("blocks", 1, lambda a: a["blocks"][0]),
     r"blocks must be sorted .*without repeats"),
    ("blocks_fewer_rows", _set(blocks=lambda a: a[:-1]),
     r"row_offsets\[\d+\] must equal the number of blocks|col_blocks must have one entry per block"),
    ("row_offsets_rank2", _set(row_offsets=lambda a: a[None]), r"row_offsets must have rank 1"),
    ("row_offsets_empty", _set(row_offsets=lambda a: a[:0]), r"row_offsets must have"),
    ("row_offsets_one_entry", _set(row_offsets=lambda a: a[:1]), r"row_offsets must have"),
    ("row_offsets_too_long", _set(row_offsets=lambda a: np.append(a, a[-1])), r"row_offsets must have"),
    ("row_offsets_too_short", _set(row_offsets=lambda a: a[:-1]), r"row_offsets must have"),
    ("row_offsets_not_from_0", _entry("row_offsets", 0, 1), r"row_offsets\[0\] must be 0"),
    ("row_offsets_not_to_nnz", _entry("row_offsets", -1, Z - 1), rf"row_offsets\[{HL * NB}\] must equal"),
    ("row_offsets_past_nnz", _entry("row_offsets", -1, Z + 1), rf"row_offsets\[{HL * NB}\] must equal"),
    ("row_offsets_decreasing", _entry("row_offsets", _RB, lambda a: a["row_offsets"][_RB + 1] + 1),
     r"row_offsets\[\d+\] is smaller than row_offsets\[\d+\]"),
    ("row_offsets_negative", _entry("row_offsets", 1, -5), r"row_offsets\[\d+\] is smaller"),
    ("row_offsets_inconsistent", _entry("row_offsets", _RB, lambda a: a["row_offsets"][_RB] + 1),
     r"row_offsets do not match blocks"),
]
COLUMN_CASES = [
    ("col_offsets_rank2", _set(col_offsets=lambda a: a[None]), r"col_offsets must have rank 1"),
    ("col_offsets_too_short", _set(col_offsets=lambda a: a[:-1]), rf"col_offsets must have {HL * NB + 1} entries"),
    ("col_offsets_too_long", _set(col_offsets=lambda a: np.append(a, a[-1])),
     rf"col_offsets must have {HL * NB + 1} entries"),
    ("col_offsets_not_from_0", _entry("col_offsets", 0, 1), r"col_offsets\[0\] must be 0"),
    ("col_offsets_not_to_nnz", _entry("col_offsets", -1, Z - 1), rf"col_offsets\[{HL * NB}\] must equal"),
    ("col_offsets_decreasing", _entry("col_offsets", _CB, lambda a: a["col_offsets"][_CB + 1] + 1),
     r"col_offsets\[\d+\] is smaller than col_offsets\[\d+\]"),
    ("col_offsets_inconsistent", _entry("col_offsets", _CB, lambda a: a["col_offsets"][_CB] + 1),
     r"col_offsets/col_blocks do not match blocks"),
    ("col_blocks_rank0", _set(col_blocks=lambda a: a[0]), r"col_blocks must have rank 1"),
    ("col_blocks_too_short", _set(col_blocks=lambda a: a[:-1]), r"col_blocks must have one entry per block"),
    ("col_blocks_too_long", _set(col_blocks=lambda a: np.append(a, 0).astype(np.int32)),
     r"col_blocks must have one entry per block"),
    ("col_blocks_negative", _entry("col_blocks", 0, -1), r"col_blocks\[0\] = -1 is not a block index"),
    ("col_blocks_nnz", _entry("col_blocks", 0, Z), rf"col_blocks\[0\] = {Z} is not a block index"),
    ("col_blocks_int32_min", _entry("col_blocks", 3, I32_MIN), r"col_blocks\[3\] = .* is not a block index"),
    ("col_blocks_repeated", _entry("col_blocks", 1, lambda a: a["col_blocks"][0]),
     r"col_blocks\[\d+\] repeats block"),
    ("col_blocks_permuted", _swap_rows("col_blocks", 0, -1), r"col_offsets/col_blocks do not match blocks"),
    ("col_blocks_row_order", _set(col_blocks=lambda a: np.arange(Z, dtype=np.int32)),
     r"col_offsets/col_blocks do not match blocks"),
]


def _assert_invalid(ops, op, args, pattern):
  with pytest.raises(tf.errors.InvalidArgumentError) as info:
    out = _call(ops, op, args)
    [np.asarray(o) for o in tf.nest.flatten(out)]  # only reached if no error
  assert re.search(pattern, info.value.message), info.value.message


# --- 1. raw ops, eager ---------------------------------------------------------
@pytest.mark.parametrize("op", ["sdd", "dsd", "dsd_t"])
@pytest.mark.parametrize("case", BLOCK_CASES + COLUMN_CASES, ids=lambda c: c[0])
def test_product_ops_reject_bad_tables(ops, op, case):
  _, mutate, pattern = case
  _assert_invalid(ops, op, mutate(_base(op)), pattern)


@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: c[0])
def test_softmax_rejects_bad_tables(ops, case):
  _, mutate, pattern = case
  args = mutate(_base("softmax"))
  if case[0] == "blocks_fewer_rows":   # mask_index must follow blocks, or it is reported first
    args["mask_index"] = args["mask_index"][:-1]
  _assert_invalid(ops, "softmax", args, pattern)


def test_valid_base_inputs_run(ops):
  """The unmodified inputs are valid, so each case above tests only its corruption."""
  for op in _ORDER:
    for out in tf.nest.flatten(_call(ops, op, _base(op))):
      assert np.isfinite(np.asarray(out)).all(), op


SDD_CASES = [
    ("a_rank3", _dense_pair(lambda a: a[0]), r"a must have rank 4"),
    ("a_rank5", _dense_pair(lambda a: a[None]), r"a must have rank 4"),
    ("a_b_head_dim", _set(b=lambda a: a[..., :4]), r"a and b must have the same shape"),
    ("a_b_batch", _set(b=lambda a: a[:1]), r"a and b must have the same shape"),
    ("a_b_seq", _set(b=lambda a: a[:, :64]), r"a and b must have the same shape"),
    ("b_rank3", _set(b=lambda a: a[0]), r"a and b must have the same shape"),
    ("seq_not_multiple", _dense_pair(lambda a: a[:, :120]), r"not a multiple of the block size 16"),
    ("seq_shorter_than_block", _dense_pair(lambda a: a[:, :8]), r"not a multiple of the block size"),
    ("seq_zero", _dense_pair(lambda a: a[:, :0]), r"seq, heads and head_dim >= 1"),
    ("heads_zero", _dense_pair(lambda a: a[:, :, :0]), r"seq, heads and head_dim >= 1"),
    ("head_dim_zero", _dense_pair(lambda a: a[..., :0]), r"seq, heads and head_dim >= 1"),
    ("heads_not_multiple_of_layout_heads", _dense_pair(lambda a: a[:, :, :3]),
     r"2 layout heads, which must divide the number of heads 3"),
    ("block_size_mismatch", _set(block_size=32), r"blocks|row_offsets"),
    ("block_size_not_dividing", _set(block_size=48), r"not a multiple of the block size 48"),
]


@pytest.mark.parametrize("case", SDD_CASES, ids=lambda c: c[0])
def test_sdd_rejects_bad_operands(ops, case):
  _, mutate, pattern = case
  _assert_invalid(ops, "sdd", mutate(_base("sdd")), pattern)


def test_sdd_rejects_bad_block_size_attr(ops):
  args = _base("sdd")
  for bad in (0, -16):
    with pytest.raises(ERRORS, match=r"block_size"):
      _call(ops, "sdd", dict(args, block_size=bad))


def test_ops_reject_bad_dtypes(ops):
  args = _base("sdd")
  with pytest.raises((tf.errors.InvalidArgumentError, TypeError), match=r"int32|int64"):
    _call(ops, "sdd", dict(args, blocks=args["blocks"].astype(np.int64)))
  with pytest.raises((tf.errors.InvalidArgumentError, TypeError, tf.errors.NotFoundError),
                     match=r"double|float64"):
    _call(ops, "sdd", dict(args, a=args["a"].astype(np.float64), b=args["b"].astype(np.float64)))


DSD_CASES = [
    ("x_rank3", _set(x=lambda a: a[0]), r"x must have rank 4"),
    ("x_rank5", _set(x=lambda a: a[None]), r"x must have rank 4"),
    ("p_rank4", _set(p=lambda a: a[0]), r"p must have rank 5"),
    ("p_rank6", _set(p=lambda a: a[None]), r"p must have rank 5"),
    ("p_batch", _set(p=lambda a: a[:1]), r"p has shape \[1,2,\d+,16,16\] but the tables expect \[2, 2,"),
    ("p_groups", _set(p=lambda a: a[:, :1]), r"p has shape .* but the tables expect"),
    ("p_nnz", _set(p=lambda a: a[:, :, :-1]), r"p has shape .* but the tables expect"),
    ("p_nnz_zero", _set(p=lambda a: a[:, :, :0]), r"p has shape .* but the tables expect"),
    ("p_last_dim", _set(p=lambda a: a[..., :8]), r"p has shape .* but the tables expect"),
    ("p_block_zero", _set(p=lambda a: a[:, :, :, :0, :0]), r"block size must be >= 1"),
    ("p_block_not_dividing", _set(p=lambda a: np.zeros(a.shape[:3] + (24, 24), np.float32)),
     r"not a multiple of the block size 24"),
    ("x_seq_not_multiple", _set(x=lambda a: a[:, :120]), r"not a multiple of the block size 16"),
    ("x_batch", _set(x=lambda a: a[:1]), r"p has shape .* but the tables expect \[1,"),
    ("x_heads_not_multiple_of_layout_heads", _set(x=lambda a: a[:, :, :3]),
     r"2 layout heads, which must divide the number of heads 3"),
    ("x_heads_other_groups", _set(x=lambda a: np.concatenate([a, a], axis=2)),
     r"p has shape .* but the tables expect \[2, 4,"),
    ("x_head_dim_zero", _set(x=lambda a: a[..., :0]), r"seq, heads and head_dim >= 1"),
]


@pytest.mark.parametrize("op", ["dsd", "dsd_t"])
@pytest.mark.parametrize("case", DSD_CASES, ids=lambda c: c[0])
def test_dsd_rejects_bad_operands(ops, op, case):
  _, mutate, pattern = case
  _assert_invalid(ops, op, mutate(_base(op)), pattern)


SOFTMAX_CASES = [
    ("x_rank4", _set(x=lambda a: a[0]), r"x must have rank 5"),
    ("x_nnz", _set(x=lambda a: a[:, :, :-1]), r"x has shape .* but the tables expect"),
    ("x_last_dim", _set(x=lambda a: a[..., :8]), r"x has shape .* but the tables expect"),
    ("x_block_not_dividing", _set(x=lambda a: np.zeros(a.shape[:3] + (24, 24), np.float32)),
     r"not a multiple of the block size 24"),
    ("x_batch", _set(x=lambda a: a[:1]), r"key_padding_mask must have shape \[batch, seq\] with batch 1"),
    ("key_padding_mask_rank1", _set(key_padding_mask=lambda a: a[0]), r"key_padding_mask must have shape"),
    ("key_padding_mask_rank3", _set(key_padding_mask=lambda a: a[None]), r"key_padding_mask must have shape"),
    ("key_padding_mask_batch", _set(key_padding_mask=lambda a: a[:1]),
     r"key_padding_mask must have shape \[batch, seq\] with batch 2, got \[1,128\]"),
    ("key_padding_mask_seq_zero", _set(key_padding_mask=lambda a: a[:, :0]), r"key_padding_mask must have seq >= 1"),
    ("key_padding_mask_seq_not_multiple", _set(key_padding_mask=lambda a: a[:, :120]),
     r"key_padding_mask length 120 is not a multiple of the block size 16"),
    ("mask_index_rank2", _set(mask_index=lambda a: a[None]), r"mask_index must have rank 1"),
    ("mask_index_too_short", _set(mask_index=lambda a: a[:-1]), r"mask_index must have one entry per block"),
    ("mask_index_too_long", _set(mask_index=lambda a: np.append(a, -1).astype(np.int32)), r"mask_index must have one entry per block"),
    ("mask_index_below_minus_1", _entry("mask_index", 0, -2), r"mask_index\[0\] = -2 must be -1"),
    ("mask_index_int32_min", _entry("mask_index", 2, I32_MIN), r"mask_index\[2\] = -2147483648 must be -1"),
    ("mask_index_num_masks", _entry("mask_index", -1, M), rf"mask_index\[\d+\] = {M} must be -1 \(full block\) or in \[0, {M}\)"),
    ("mask_index_int32_max", _entry("mask_index", 1, I32_MAX), r"mask_index\[1\] = 2147483647"),
    ("mask_index_no_masks", _set(masks=lambda a: a[:0]), r"mask_index\[\d+\] = \d+ must be -1 \(full block\) or in \[0, 0\)"),
    ("masks_rank2", _set(masks=lambda a: a[0]), r"masks must have rank 3"),
    ("masks_tile_shape", _set(masks=lambda a: a[:, :, :8]), r"masks must have shape \[num_masks, 16, 16\]"),
    ("masks_tile_transposed_shape", _set(masks=lambda a: np.ones((M, 8, 32), bool)),
     r"masks must have shape \[num_masks, 16, 16\]"),
]


@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=lambda c: c[0])
def test_softmax_rejects_bad_operands(ops, case):
  _, mutate, pattern = case
  _assert_invalid(ops, "softmax", mutate(_base("softmax")), pattern)


@pytest.mark.parametrize("op", ["attention", "attention_grad"])
@pytest.mark.parametrize("case", BLOCK_CASES + COLUMN_CASES, ids=lambda c: c[0])
def test_fused_attention_rejects_bad_tables(ops, op, case):
  _, mutate, pattern = case
  args = mutate(_base(op))
  if case[0] == "blocks_fewer_rows":   # mask_index must follow blocks, or it is reported first
    args["mask_index"] = args["mask_index"][:-1]
  _assert_invalid(ops, op, args, pattern)


_QKV = ("q", "k", "v")
ATTENTION_CASES = [
    ("q_rank3", _set(q=lambda a: a[0]), r"q must have rank 4"),
    ("v_rank5", _set(v=lambda a: a[None]), r"v must have rank 4"),
    ("k_head_dim", _set(k=lambda a: a[..., :4]), r"q and k must have the same shape"),
    ("q_k_seq", _set(k=lambda a: a[:, :64]), r"q and k must have the same shape"),
    ("v_seq", _set(v=lambda a: a[:, :64]), r"v must agree with q on \[batch, seq, heads\]"),
    ("v_heads", _set(v=lambda a: a[:, :, :2]), r"v must agree with q on \[batch, seq, heads\]"),
    ("seq_not_multiple", _set(**{n: (lambda a: a[:, :120]) for n in _QKV},
                              key_padding_mask=lambda a: a[:, :120]),
     r"sequence length 120 is not a multiple of the block size 16"),
    ("heads_not_multiple_of_layout", _set(**{n: (lambda a: a[:, :, :3]) for n in _QKV}),
     r"2 layout heads, which must divide the number of heads 3"),
    ("seq_other_length", _set(**{n: (lambda a: np.concatenate([a, a], 1)) for n in _QKV},
                              key_padding_mask=lambda a: np.concatenate([a, a], 1)),
     r"is out of range for 1 layout heads and 16 blocks per sequence"),
    ("key_padding_mask_rank1", _set(key_padding_mask=lambda a: a[0]), r"key_padding_mask must have shape \[2, 128\]"),
    ("key_padding_mask_seq", _set(key_padding_mask=lambda a: a[:, :64]), r"key_padding_mask must have shape \[2, 128\]"),
    ("key_padding_mask_batch", _set(key_padding_mask=lambda a: a[:1]), r"key_padding_mask must have shape \[2, 128\]"),
    ("mask_index_too_short", _set(mask_index=lambda a: a[:-1]), r"mask_index must have one entry per block"),
    ("mask_index_below_minus_1", _entry("mask_index", 0, -2), r"mask_index\[0\] = -2 must be -1"),
    ("mask_index_num_masks", _entry("mask_index", -1, M), rf"mask_index\[\d+\] = {M} must be -1 \(full block\) or in \[0, {M}\)"),
    ("mask_index_int32_max", _entry("mask_index", 1, I32_MAX), r"mask_index\[1\] = 2147483647"),
    ("masks_rank2", _set(masks=lambda a: a[0]), r"masks must have rank 3"),
    ("masks_tile_shape", _set(masks=lambda a: a[:, :, :8]), r"masks must have shape \[num_masks, 16, 16\]"),
    ("block_size_attr", _set(block_size=32),  # tiles of 16 in the masks, 32 asked for
     r"masks must have shape \[num_masks, 32, 32\], got \[\d+,16,16\]"),
]
GRAD_CASES = [
    ("out_shape", _set(out=lambda a: a[..., :4]), r"out and dout must have the shape of v"),
    ("dout_shape", _set(dout=lambda a: a[:, :64]), r"out and dout must have the shape of v"),
    ("lse_shape", _set(lse=lambda a: a[:, :, :64]), r"lse must have shape \[2, 4, 128\]"),
    ("lse_transposed", _set(lse=lambda a: np.ascontiguousarray(a.transpose(0, 2, 1))),
     r"lse must have shape \[2, 4, 128\]"),
]


@pytest.mark.parametrize("op", ["attention", "attention_grad"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c[0])
def test_fused_attention_rejects_bad_operands(ops, op, case):
  _, mutate, pattern = case
  args = mutate(_base(op))
  if op == "attention_grad":  # keep out / dout / lse consistent with the mutated q, k, v
    v = args["v"]
    if v.ndim == 4:
      args["out"] = args["dout"] = np.zeros_like(v)
      args["lse"] = np.zeros((v.shape[0], v.shape[2], v.shape[1]), np.float32)
  _assert_invalid(ops, op, args, pattern)


# The mask tables (layout.mask_tables): shapes, values, and coverage of the
# masks. At block 16 every mask has one key group, so mask_query_range is
# [M, 1, 2] and every derived range is [0, 16) or (0, 0).
_MV = int(np.argmax(TABLES.masks.any(axis=(1, 2))))   # a mask that shows something
_VISIBLE = np.argwhere(TABLES.masks[_MV])             # the (query, key) pairs it shows
_SEEN_KEY = _VISIBLE[:, 1].min()


def _split_without_queries(args):
  """masks[_MV] computed group by group, on no query."""
  out = dict(args, mask_split=args["mask_split"].copy(),
             mask_query_range=args["mask_query_range"].copy())
  out["mask_split"][_MV] = True
  out["mask_query_range"][_MV, 0] = (0, 0)
  return out


MASK_TABLE_CASES = [
    ("key_range_rank1", _set(mask_key_range=lambda a: a.reshape(-1)),
     rf"mask_key_range must have shape \[{M}, 2\] \(num_masks, \[lo, hi\)\), got \[{2 * M}\]"),
    ("key_range_one_short", _set(mask_key_range=lambda a: a[:-1]),
     rf"mask_key_range must have shape \[{M}, 2\]"),
    ("query_range_two_groups", _set(mask_query_range=lambda a: np.concatenate([a, a], 1)),
     rf"mask_query_range must have shape \[{M}, 1, 2\] \(num_masks, block_size / 16, \[lo, hi\)\), "
     rf"got \[{M},2,2\]"),
    ("query_range_rank2", _set(mask_query_range=lambda a: a[:, 0]),
     rf"mask_query_range must have shape \[{M}, 1, 2\]"),
    ("split_one_long", _set(mask_split=lambda a: np.append(a, False)),
     rf"mask_split must have shape \[{M}\] \(num_masks\), got \[{M + 1}\]"),
    ("key_range_past_block", _entry("mask_key_range", 0, (0, 32)),
     r"invalid mask tables: mask_key_range\[0\] = \[0, 32\) is out of \[0, 16\]"),
    ("key_range_negative", _entry("mask_key_range", -1, (-16, 16)),
     rf"mask_key_range\[{M - 1}\] = \[-16, 16\) is out of \[0, 16\]"),
    ("key_range_int32_min", _entry("mask_key_range", 0, (I32_MIN, 0)),
     r"mask_key_range\[0\] = \[-2147483648, 0\) is out of \[0, 16\]"),
    ("key_range_not_multiple_of_16", _entry("mask_key_range", 0, (0, 8)),
     r"mask_key_range\[0\] = \[0, 8\) is not made of multiples of 16"),
    ("key_range_lo_above_hi", _entry("mask_key_range", 0, (16, 0)),
     r"mask_key_range\[0\] = \[16, 0\) has lo > hi"),
    ("query_range_past_block", _entry("mask_query_range", (0, 0), (0, I32_MAX)),
     r"mask_query_range\[0, 0\] = \[0, 2147483647\) is out of \[0, 16\]"),
    ("query_range_not_multiple_of_16", _entry("mask_query_range", (-1, 0), (4, 16)),
     rf"mask_query_range\[{M - 1}, 0\] = \[4, 16\) is not made of multiples of 16"),
    ("query_range_lo_above_hi", _entry("mask_query_range", (0, 0), (16, 0)),
     r"mask_query_range\[0, 0\] = \[16, 0\) has lo > hi"),
    ("key_range_misses_keys", _entry("mask_key_range", _MV, (16, 16)),
     rf"invalid mask tables: mask_key_range\[{_MV}\] = \[16, 16\) does not cover key {_SEEN_KEY} "
     rf"of masks\[{_MV}\], which query \d+ sees"),
    ("split_query_range_misses_queries", _split_without_queries,
     rf"invalid mask tables: mask_query_range\[{_MV}, 0\] = \[0, 0\) does not cover query "
     rf"{_VISIBLE[0, 0]}, which sees key {_VISIBLE[0, 1]} of masks\[{_MV}\] "
     rf"\(mask_split\[{_MV}\] is true\)"),
]


@pytest.mark.parametrize("op", ["attention", "attention_grad"])
@pytest.mark.parametrize("case", MASK_TABLE_CASES, ids=lambda c: c[0])
def test_fused_attention_rejects_bad_mask_tables(ops, op, case):
  _, mutate, pattern = case
  _assert_invalid(ops, op, mutate(_base(op)), pattern)


@pytest.mark.parametrize("op", ["attention", "attention_grad"])
def test_fused_attention_takes_wider_mask_tables(ops, op):
  """Ranges wider than derived only cost time; a query range is read only where split."""
  base = _base(op)
  want = [np.asarray(o) for o in tf.nest.flatten(_call(ops, op, base))]
  wide = dict(base, mask_key_range=np.tile(np.int32([0, BS]), (M, 1)),
              mask_query_range=np.tile(np.int32([0, BS]), (M, 1, 1)),
              mask_split=np.ones(M, bool))
  unsplit_empty = dict(base, mask_query_range=np.zeros_like(base["mask_query_range"]),
                       mask_split=np.zeros(M, bool))
  for args in (wide, unsplit_empty):
    got = [np.asarray(o) for o in tf.nest.flatten(_call(ops, op, args))]
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c[0])
def test_fused_attention_grad_rejects_bad_operands(ops, case):
  _, mutate, pattern = case
  _assert_invalid(ops, "attention_grad", mutate(_base("attention_grad")), pattern)


@pytest.mark.parametrize("length", [N // 2, 2 * N])
def test_softmax_key_padding_mask_of_other_length(ops, length):
  """A [B, N'] mask (N' a multiple of the block, but not the tables' N) is rejected.

  The softmax has no dense operand, so key_padding_mask is its only source of
  N; the error should say that the mask does not fit the tables.
  """
  args = _base("softmax")
  args["key_padding_mask"] = np.ones((B, length), bool)
  _assert_invalid(ops, "softmax", args, r"key_padding_mask")


SOFTMAX_GRAD_CASES = [
    ("y_rank4", _set(y=lambda a: a[0], dy=lambda a: a[0]), r"y must have rank 5"),
    ("dy_rank4", _set(dy=lambda a: a[0]), r"y and dy must have the same shape"),
    ("dy_batch", _set(dy=lambda a: a[:1]), r"y and dy must have the same shape"),
    ("dy_nnz", _set(dy=lambda a: a[:, :, :-1]), r"y and dy must have the same shape"),
    ("dy_block", _set(dy=lambda a: a[..., :8]), r"y and dy must have the same shape"),
    ("not_square", _set(y=lambda a: a[..., :8], dy=lambda a: a[..., :8]), r"y must hold square blocks"),
    ("row_offsets_rank2", _set(row_offsets=lambda a: a[None]), r"row_offsets must have rank 1"),
    ("row_offsets_empty", _set(row_offsets=lambda a: a[:0]), r"row_offsets must have at least 2 entries"),
    ("row_offsets_one_entry", _set(row_offsets=lambda a: a[:1]), r"row_offsets must have at least 2 entries"),
    ("row_offsets_not_from_0", _entry("row_offsets", 0, 1), r"row_offsets\[0\] = 1 must be non-decreasing from 0"),
    ("row_offsets_not_to_nnz", _entry("row_offsets", -1, Z - 1), rf"row_offsets\[{HL * NB}\] = {Z - 1} must be"),
    ("row_offsets_past_nnz", _entry("row_offsets", -1, Z + 1), rf"row_offsets\[{HL * NB}\] = {Z + 1} must be"),
    ("row_offsets_middle_past_nnz", _entry("row_offsets", 1, I32_MAX), r"row_offsets\[1\] = 2147483647 must be"),
    ("row_offsets_decreasing", _entry("row_offsets", _RB, lambda a: a["row_offsets"][_RB + 1] + 1),
     r"row_offsets\[\d+\] = \d+ must be non-decreasing"),
    ("row_offsets_negative", _entry("row_offsets", 1, -1), r"row_offsets\[1\] = -1 must be"),
    ("row_offsets_other_nnz", _set(y=lambda a: a[:, :, :-1], dy=lambda a: a[:, :, :-1]),
     rf"row_offsets\[{HL * NB}\] = {Z} must be non-decreasing from 0 to the number of blocks {Z - 1}"),
]


@pytest.mark.parametrize("case", SOFTMAX_GRAD_CASES, ids=lambda c: c[0])
def test_softmax_grad_rejects_bad_operands(ops, case):
  _, mutate, pattern = case
  _assert_invalid(ops, "softmax_grad", mutate(_base("softmax_grad")), pattern)


def test_empty_but_valid_tables_run(ops):
  """Zero kept blocks is a valid (if useless) layout: every op returns zeros."""
  z = np.zeros((0, 3), np.int32)
  offs = np.zeros(HL * NB + 1, np.int32)
  cb = np.zeros(0, np.int32)
  a = np.ones((B, N, H, D), np.float32)
  s = ops.sdd(a, a, z, offs, offs, cb, block_size=BS)
  assert s.shape == (B, G, 0, BS, BS)
  for fn in (ops.dsd, ops.dsd_t):
    out = fn(s, a, z, offs, offs, cb)
    assert out.shape == a.shape and not np.asarray(out).any()
  y = ops.softmax(s, z, offs, cb, np.zeros((0, BS, BS), bool), np.ones((B, N), bool), 1.0)
  assert y.shape == s.shape
  assert ops.softmax_grad(y, y, offs, 1.0).shape == s.shape


# --- 1b. the same inside tf.function ---------------------------------------------
def _graph_call(ops, op, args, signature=None):
  names = _ORDER[op]
  attrs = {k: args[k] for k in _ATTRS.get(op, ())}

  def body(*tensors):
    return getattr(ops, op)(*tensors, **attrs)

  fn = tf.function(body, input_signature=signature)
  return fn(*[tf.convert_to_tensor(args[k]) for k in names])


def _unknown_signature(op, args):
  """Fully unknown shapes, so only the kernel can catch the problem."""
  return [tf.TensorSpec(None, tf.convert_to_tensor(args[k]).dtype) for k in _ORDER[op]]


GRAPH_CASES = [
    # (id, op, mutation, keyword); static shapes: may fail at trace time (ValueError).
    ("sdd_a_b_mismatch", "sdd", _set(b=lambda a: a[..., :4]), r"a and b must have the same shape|must be equal, but are 8 and 4"),
    ("sdd_blocks_second_dim", "sdd", _set(blocks=lambda a: a[:, :2]), r"blocks must have shape \[nnz, 3\]|Dimension must be 3 but is 2"),
    ("sdd_a_rank3", "sdd", _dense_pair(lambda a: a[0]), r"a must have rank 4|Shape must be rank 4 but is rank 3"),
    ("sdd_blocks_out_of_range", "sdd", _entry("blocks", (0, 2), NB), r"blocks\[0\].*out of range"),
    ("dsd_p_nnz", "dsd", _set(p=lambda a: a[:, :, :-1]), r"p has shape"),
    ("dsd_t_col_blocks_repeated", "dsd_t", _entry("col_blocks", 1, lambda a: a["col_blocks"][0]),
     r"col_blocks\[\d+\] repeats block"),
    ("softmax_mask_index_out_of_range", "softmax", _entry("mask_index", 0, M), r"mask_index\[0\]"),
    ("softmax_masks_rank2", "softmax", _set(masks=lambda a: a[0]), r"masks must have rank 3|Shape must be rank 3 but is rank 2"),
    ("softmax_key_padding_mask_batch", "softmax", _set(key_padding_mask=lambda a: a[:1]),
     r"key_padding_mask"),
    ("softmax_grad_mismatch", "softmax_grad", _set(dy=lambda a: a[:1]), r"y and dy must have the same shape|must be equal, but are 2 and 1"),
    ("softmax_grad_row_offsets", "softmax_grad", _entry("row_offsets", 0, 3), r"row_offsets\[0\]"),
    ("attention_q_k_mismatch", "attention", _set(k=lambda a: a[..., :4]),
     r"q and k must have the same shape|must be equal, but are 8 and 4"),
    ("attention_v_seq", "attention", _set(v=lambda a: a[:, :64]),
     r"v must agree with q|must be equal, but are 128 and 64"),
    ("attention_masks_rank2", "attention", _set(masks=lambda a: a[0]),
     r"masks must have rank 3|Shape must be rank 3 but is rank 2"),
    ("attention_mask_index_out_of_range", "attention", _entry("mask_index", 0, M), r"mask_index\[0\]"),
    ("attention_mask_key_range_second_dim", "attention", _set(mask_key_range=lambda a: a[:, :1]),
     r"mask_key_range must have shape|Dimension must be 2 but is 1"),
    ("attention_grad_mask_key_range_coverage", "attention_grad",
     _entry("mask_key_range", _MV, (0, 0)), rf"mask_key_range\[{_MV}\] = \[0, 0\) does not cover key"),
    ("attention_grad_lse_rank", "attention_grad", _set(lse=lambda a: a[0]),
     r"lse must have shape|Shape must be rank 3 but is rank 2"),
    ("attention_grad_dout", "attention_grad", _set(dout=lambda a: a[:1]),
     r"out and dout must have the shape of v|must be equal, but are 2 and 1"),
]


@pytest.mark.parametrize("static", [True, False], ids=["static_shapes", "unknown_shapes"])
@pytest.mark.parametrize("case", GRAPH_CASES, ids=lambda c: c[0])
def test_graph_mode_errors(ops, case, static):
  _, op, mutate, pattern = case
  args = mutate(_base(op))
  signature = None if static else _unknown_signature(op, args)
  with pytest.raises(ERRORS) as info:
    [np.asarray(o) for o in tf.nest.flatten(_graph_call(ops, op, args, signature))]
  message = getattr(info.value, "message", None) or str(info.value)
  assert re.search(pattern, message), message
  if not static:  # no shape function can see it: the kernel must report it
    assert isinstance(info.value, tf.errors.InvalidArgumentError), message


def test_graph_mode_valid_call_matches_eager(ops):
  for op in _ORDER:
    args = _base(op)
    eager = tf.nest.flatten(_call(ops, op, args))
    graph = tf.nest.flatten(_graph_call(ops, op, args, _unknown_signature(op, args)))
    assert len(graph) == len(eager)
    for g, e in zip(graph, eager):
      np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-6)


# --- 2. sparse_attention ----------------------------------------------------------
def _qkv(shape=(B, N, H, D), dtype=tf.float32):
  x = tf.random.stateless_normal(shape, seed=[1, 2])
  return tf.cast(x, dtype)


ATTENTION_CASES = [
    # (id, kwargs builder, message pattern)
    ("query_rank3", lambda q: dict(query=q[0], key=q, value=q), r"query must have rank 4"),
    ("key_rank5", lambda q: dict(query=q, key=q[None], value=q), r"key must have rank 4"),
    ("value_rank2", lambda q: dict(query=q, key=q, value=q[0, 0]), r"value must have rank 4"),
    ("key_seq", lambda q: dict(query=q, key=q[:, :64], value=q), r"query, key and value must agree"),
    ("value_heads", lambda q: dict(query=q, key=q, value=q[:, :, :2]), r"query, key and value must agree"),
    ("key_head_dim", lambda q: dict(query=q, key=q[..., :4], value=q), r"query and key must have the same head_dim"),
    ("dtype_mismatch", lambda q: dict(query=q, key=tf.cast(q, tf.float16), value=q), r"one dtype"),
    ("int32", lambda q: dict(query=tf.cast(q, tf.int32), key=tf.cast(q, tf.int32), value=tf.cast(q, tf.int32)),
     r"dtype int32 is not supported"),
    ("float64_custom_op", lambda q: dict(query=tf.cast(q, tf.float64), key=tf.cast(q, tf.float64),
                                         value=tf.cast(q, tf.float64), implementation="custom_op"),
     r"dtype float64 is not supported by implementation 'custom_op'"),
    ("unknown_implementation", lambda q: dict(query=q, key=q, value=q, implementation="cuda"),
     r"implementation must be one of"),
    ("heads_not_multiple", lambda q: dict(query=q[:, :, :3], key=q[:, :, :3], value=q[:, :, :3],
                                          pattern=Fixed(32, 8, heads=2, head_groups=2)),
     r"number of heads \(3\) must be a multiple of the pattern's heads \(2\)"),
    ("seq_not_multiple_of_block", lambda q: dict(query=q[:, :120], key=q[:, :120], value=q[:, :120],
                                                 pattern=Fixed(24, 8), block_size=16),
     r"seq_len \(120\) must be a multiple of block_size \(16\)"),
    ("block_size_24", lambda q: dict(query=q, key=q, value=q, block_size=24), r"block_size must be one of"),
    ("block_size_0", lambda q: dict(query=q, key=q, value=q, block_size=0), r"block_size must be one of"),
    ("key_padding_mask_seq", lambda q: dict(query=q, key=q, value=q, key_padding_mask=tf.ones([B, 64], tf.bool)),
     r"key_padding_mask must have shape \[batch, 128\]"),
    ("key_padding_mask_rank1", lambda q: dict(query=q, key=q, value=q, key_padding_mask=tf.ones([N], tf.bool)),
     r"key_padding_mask must have shape"),
    ("key_padding_mask_rank3", lambda q: dict(query=q, key=q, value=q, key_padding_mask=tf.ones([B, N, 1], tf.bool)),
     r"key_padding_mask must have shape"),
    ("fixed_stride_not_multiple_of_block", lambda q: dict(query=q, key=q, value=q, pattern=Fixed(40, 8), block_size=16),
     r"stride \(40\) must be a multiple of block_size \(16\)"),
    ("strided_split_stride_not_dividing", lambda q: dict(query=q[:, :, :2], key=q[:, :, :2], value=q[:, :, :2],
                                                         pattern=Strided(24, heads=2, mode="split")),
     r"stride \(24\) must divide seq_len \(128\)"),
    ("bad_pattern", lambda q: dict(query=q, key=q, value=q, pattern="fixed"), r"pattern"),
]


def _attention_kwargs(build):
  q = _qkv()
  kw = dict(pattern=Fixed(32, 8), block_size=BS)
  kw.update(build(q))
  return kw


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c[0])
def test_sparse_attention_value_errors(ops, case):
  _, build, pattern = case
  with pytest.raises(ValueError, match=pattern):
    sparse_attention(**_attention_kwargs(build))


def test_fixed_heads_not_multiple_of_head_groups(ops):
  """Fixed(32, 8, heads=4, head_groups=2) needs a multiple of 4 heads; 6 is not."""
  q = _qkv((1, N, 6, D))
  with pytest.raises(ValueError, match=r"heads \(6\) must be a multiple of the pattern's heads \(4\)"):
    sparse_attention(q, q, q, Fixed(32, 8, heads=4, head_groups=2), block_size=BS)


@pytest.mark.parametrize("name", ["key", "value", "key_padding_mask"])
def test_sparse_attention_batch_mismatch_is_a_value_error(ops, name):
  """q/k/v/key_padding_mask with different static batch sizes are rejected up front.

  The docstring promises ValueError "for shapes ... that do not fit"; without
  a check the error comes from inside the kernels (e.g. "a and b must have the
  same shape"), and with implementation="dense" a batch-1 key_padding_mask is
  silently broadcast while "custom_op" rejects it.
  """
  q = _qkv()
  kwargs = dict(key=q, value=q)
  if name == "key_padding_mask":
    kwargs[name] = tf.ones([1, N], tf.bool)
  else:
    kwargs[name] = _qkv((B + 1, N, H, D))
  with pytest.raises(ValueError, match=name):
    sparse_attention(q, pattern=Fixed(32, 8), block_size=BS, implementation="custom_op", **kwargs)


def test_sparse_attention_zero_head_dim_is_a_value_error(ops):
  q = _qkv((B, N, H, 0))
  with pytest.raises(ValueError, match=r"head_dim"):
    sparse_attention(q, q, q, Fixed(32, 8), block_size=BS)


def test_sparse_attention_errors_in_tf_function(ops):
  pattern = Fixed(32, 8)

  @tf.function
  def f(q, k, v):
    return sparse_attention(q, k, v, pattern, block_size=BS, implementation="custom_op")

  q = _qkv()
  with pytest.raises(ValueError, match=r"query, key and value must agree"):
    f(q, q[:, :64], q[:, :64])

  @tf.function(input_signature=[tf.TensorSpec([None, None, H, D], tf.float32)] * 3)
  def g(q, k, v):
    return sparse_attention(q, k, v, pattern, block_size=BS, implementation="custom_op")

  with pytest.raises(ValueError, match=r"must be known statically"):
    g.get_concrete_function()


# --- the library still works ----------------------------------------------------------
def test_valid_call_after_errors(ops):
  """Run last: after all the rejected calls, results still match dense attention."""
  q, k, v = _qkv(), _qkv() * 0.5, _qkv() + 1.0
  pattern = Fixed(32, 8, heads=2, head_groups=2)
  kp = np.ones((B, N), bool)
  kp[1, -20:] = False
  got = sparse_attention(q, k, v, pattern, block_size=BS, key_padding_mask=kp,
                         implementation="custom_op")
  want = sparse_attention(q, k, v, pattern, block_size=BS, key_padding_mask=kp,
                          implementation="dense")
  np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
  for op in _ORDER:
    for out in tf.nest.flatten(_call(ops, op, _base(op))):
      assert np.isfinite(np.asarray(out)).all(), op
