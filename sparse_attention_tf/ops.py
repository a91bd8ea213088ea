"""Thin wrappers of the C++ block-sparse ops, and their gradients.

The op library is loaded lazily, on first use, from the first of:
  1. `$SPARSE_ATTENTION_TF_OPS` (a path to the .so); when set, only this one,
  2. the package folder (an installed wheel's library, or in a source checkout
     the Bazel build that `scripts/setup.sh` copies there),
  3. only in a source checkout: `bazel-bin/custom_ops/` and `build/` (Bazel, make),
whose build info (build_info.py) names the TensorFlow minor version running.

Letters: B batch, N sequence, H heads, D head dim, b block size, Z kept
blocks, G = H / Hl groups of heads sharing one layout head (see layout.py).

Ops (all take float32, bfloat16 or float16 and accumulate in float32):
  sdd(a, b)        [B,N,H,D] x [B,N,H,D] -> [B,G,Z,b,b]   A_I . B_J^T on kept blocks
  dsd(p, x)        [B,G,Z,b,b] x [B,N,H,D] -> [B,N,H,D]   out_I = sum_J P_IJ . X_J
  dsd_t(p, x)      [B,G,Z,b,b] x [B,N,H,D] -> [B,N,H,D]   out_J = sum_I P_IJ^T . X_I
  softmax(x)       [B,G,Z,b,b] -> [B,G,Z,b,b]             row softmax with masks
  attention(q,k,v) [B,N,H,D] x2, [B,N,H,Dv] -> [B,N,H,Dv], lse [B,H,N]
                   fused: online softmax per query block row, no score tensor
The three products are closed under differentiation (each one's gradient is
made of the other two), as in openai/blocksparse.
"""

from __future__ import annotations

import os
import pathlib
import threading
from typing import Optional

import numpy as np
import tensorflow as tf

from sparse_attention_tf import build_info as build_info_lib
from sparse_attention_tf import layout as layout_lib

LIBRARY_NAME = "_sparse_attention_ops.so"
_ENV_VAR = "SPARSE_ATTENTION_TF_OPS"

_lock = threading.Lock()
_module = None
_module_path: Optional[str] = None
_load_error: Optional[str] = None


def checkout_root() -> Optional[pathlib.Path]:
  """The source checkout this package lies in, or None for an installed copy."""
  root = pathlib.Path(__file__).resolve().parent.parent
  return root if (root / "custom_ops" / "cc").is_dir() else None


def library_candidates() -> list:
  """Paths tried, in order, to load the op library.

  `$SPARSE_ATTENTION_TF_OPS` alone when it is set: an explicit choice is never
  replaced by another library. Else the package folder, then the Bazel and make
  outputs of the source checkout, if the package lies in one: an installed copy
  never picks up a build that happens to lie beside it.
  """
  if os.environ.get(_ENV_VAR):
    return [pathlib.Path(os.environ[_ENV_VAR])]
  paths = [pathlib.Path(__file__).resolve().parent / LIBRARY_NAME]
  root = checkout_root()
  if root is not None:
    paths += [root / "bazel-bin" / "custom_ops" / LIBRARY_NAME, root / "build" / LIBRARY_NAME]
  return paths


def _how_to_fix(built_version: Optional[str]) -> str:
  """What to do when no library loads, in a source checkout or for an installed copy."""
  running = tf.__version__
  root = checkout_root()
  if root is not None:
    return (f"To fix: build it against this TensorFlow ({running}) in {root}: "
            f"`bash scripts/setup.sh` (Bazel) or `make ops`; or set ${_ENV_VAR} to a library "
            "built for it.")
  fixes = []
  built = build_info_lib.minor_version(built_version)
  if built is not None:
    fixes.append("install the TensorFlow it was built for "
                 f"(`pip install \"tensorflow=={built[0]}.{built[1]}.*\"`)")
  fixes.append(f"rebuild sparse_attention_tf against this TensorFlow ({running}): in its source "
               "checkout, `pip install --force-reinstall --no-deps --no-build-isolation .` "
               "(needs setuptools>=77, make and g++)")
  fixes.append(f"set ${_ENV_VAR} to a library built for TensorFlow {running}")
  return "To fix: " + "; or ".join(fixes) + "."


def load_library():
  """Loads the op library once; returns the op module, or None if none loads."""
  global _module, _module_path, _load_error
  with _lock:
    if _module is not None or _load_error is not None:
      return _module
    tried, built_version = [], None
    for path in library_candidates():
      if not path.is_file():
        tried.append(f"  {path}: not found")
        continue
      info = build_info_lib.read(path)  # checked before loading: a mismatch may load and crash
      built_version = built_version or info.get("tensorflow")
      problem = build_info_lib.mismatch(info, tf.__version__, tf.version.GRAPH_DEF_VERSION)
      if problem is None:
        try:
          _module = tf.load_op_library(str(path))
          _module_path = str(path)
          return _module
        except (tf.errors.NotFoundError, OSError) as e:  # missing symbols, not a library
          problem = str(e).strip() + (f" (built with {build_info_lib.built_with(info)})"
                                      if info else "")
      tried.append(f"  {path}: {problem}")
    if os.environ.get(_ENV_VAR):
      tried.append(f"  (only ${_ENV_VAR} is tried while it is set)")
    _load_error = ("The sparse_attention_tf op library could not be loaded; tried:\n" +
                   "\n".join(tried) + "\n" + _how_to_fix(built_version))
    return None


def is_available() -> bool:
  """True if the custom ops can be used in this process."""
  return load_library() is not None


def load_error() -> Optional[str]:
  """Why the op library did not load (what to do about it), or None if it loaded."""
  load_library()
  return _load_error


def library_path() -> Optional[str]:
  """The path of the loaded library (None if not loaded)."""
  load_library()
  return _module_path


def simd_isa() -> str:
  """Which build of the CPU kernels runs here: "avx512", "avx2" or "baseline".

  `$SPARSE_ATTENTION_TF_ISA` (read when the library loads) can ask for a lower one.
  """
  return _ops().sparse_attention_simd_isa().numpy().decode()


def cpu_engines() -> dict:
  """The fused attention's CPU dispatch, chosen once when the library loads.

  Returns {"float32": engine, "bfloat16": engine or None (bfloat16 inputs are
  converted to float32), "available": the engines this CPU runs, best first,
  "requested": $SPARSE_ATTENTION_TF_ISA or ""}. Engines: "amx" (bf16 on AMX
  tiles), "avx512_bf16" (bf16 pair products), "avx512", "avx2", "baseline"
  (float32), and "amx_emulated" (tests only). `$SPARSE_ATTENTION_TF_ISA`
  names the highest engine allowed; one this CPU lacks raises
  `tf.errors.FailedPreconditionError` here and in every fused op.
  """
  f32, bf16, available, requested = (
      s.decode() for s in _ops().sparse_attention_cpu_engines().numpy())
  return {"float32": f32, "bfloat16": bf16 or None,
          "available": [e for e in available.split(", ") if e], "requested": requested}


def _ops():
  module = load_library()
  if module is None:
    raise RuntimeError(_load_error)
  return module


# --- lookup tables as tensors -------------------------------------------------
class TableTensors:
  """The int32 / bool tensors of one `BlockTables`, made once and reused."""

  def __init__(self, tables: layout_lib.BlockTables):
    self.tables = tables
    self.block_size = tables.block_size
    self.blocks = tf.constant(tables.blocks, tf.int32)
    self.row_offsets = tf.constant(tables.row_offsets, tf.int32)
    self.col_offsets = tf.constant(tables.col_offsets, tf.int32)
    self.col_blocks = tf.constant(tables.col_blocks, tf.int32)
    self.mask_index = tf.constant(tables.mask_index, tf.int32)
    self.masks = tf.constant(tables.masks, tf.bool)
    self.mask_key_range = tf.constant(tables.mask_key_range, tf.int32)
    self.mask_query_range = tf.constant(tables.mask_query_range, tf.int32)
    self.mask_split = tf.constant(tables.mask_split, tf.bool)

  @property
  def all_tables(self):
    """The tables of the products (sdd, dsd, dsd_t), in their argument order."""
    return (self.blocks, self.row_offsets, self.col_offsets, self.col_blocks)

  @property
  def fused_tables(self):
    """The tables of `attention` / `attention_grad`, in their argument order."""
    return self.all_tables + (self.mask_index, self.masks, self.mask_key_range,
                              self.mask_query_range, self.mask_split)


# --- raw ops ------------------------------------------------------------------
@tf.autograph.experimental.do_not_convert
def sdd(a, b, blocks, row_offsets, col_offsets, col_blocks, block_size: int):
  """[B,N,H,D] x [B,N,H,D] -> [B,G,Z,b,b]: A_I . B_J^T on each kept block."""
  return _ops().sparse_attention_blocksparse_sdd(
      a, b, blocks, row_offsets, col_offsets, col_blocks, block_size=block_size)


@tf.autograph.experimental.do_not_convert
def dsd(p, x, blocks, row_offsets, col_offsets, col_blocks):
  """[B,G,Z,b,b] x [B,N,H,D] -> [B,N,H,D]: out_I = sum_J P_IJ . X_J."""
  return _ops().sparse_attention_blocksparse_dsd(p, x, blocks, row_offsets, col_offsets,
                                                 col_blocks)


@tf.autograph.experimental.do_not_convert
def dsd_t(p, x, blocks, row_offsets, col_offsets, col_blocks):
  """[B,G,Z,b,b] x [B,N,H,D] -> [B,N,H,D]: out_J = sum_I P_IJ^T . X_I."""
  return _ops().sparse_attention_blocksparse_dsd_t(p, x, blocks, row_offsets, col_offsets,
                                                   col_blocks)


@tf.autograph.experimental.do_not_convert
def softmax(x, blocks, row_offsets, mask_index, masks, key_padding_mask, scale: float):
  """Row softmax of scale * x over visible elements; masked and empty rows give 0.

  key_padding_mask: bool [B, N], True for real keys.
  """
  return _ops().sparse_attention_blocksparse_softmax(
      x, blocks, row_offsets, mask_index, masks, key_padding_mask, scale=scale)


@tf.autograph.experimental.do_not_convert
def softmax_grad(y, dy, row_offsets, scale: float):
  return _ops().sparse_attention_blocksparse_softmax_grad(y, dy, row_offsets, scale=scale)


@tf.autograph.experimental.do_not_convert
def attention(q, k, v, blocks, row_offsets, col_offsets, col_blocks, mask_index, masks,
              mask_key_range, mask_query_range, mask_split, key_padding_mask, scale: float,
              block_size: int):
  """Fused block-sparse attention: (out [B,N,H,Dv], lse [B,H,N] float32).

  The tables are a `TableTensors`' `fused_tables` (see layout.py; the op
  checks each, and that the mask ranges cover every visible element of
  `masks`). key_padding_mask: bool [B, N], True for real keys. `lse` (log-sum-exp of each
  row's visible scaled scores, -inf for rows that see no key, NaN for rows
  that see a NaN) is what the gradient recomputes the probabilities from; it
  is not differentiable. `block_size` must be one of 16, 32, 64, 128 (else an
  InvalidArgumentError).

  NaN and inf: masked scores are selected, not added, so a NaN or +-inf in q
  or k reaches exactly the rows that can see it (the rows of `reference` and
  `dense`), in out and, through `attention_grad`, in dq, dk and dv; a NaN in
  the output gradient reaches dq of its row and dk, dv of the keys its row
  sees. A NaN in v is not contained: it reaches every row whose kept tiles
  hold it (in the forward, the rows of its tile's query range, not only those
  that see it), as in dense attention, where it reaches every row.
  """
  return _ops().sparse_attention_blocksparse_attention(
      q, k, v, blocks, row_offsets, col_offsets, col_blocks, mask_index, masks, mask_key_range,
      mask_query_range, mask_split, key_padding_mask, scale=scale, block_size=block_size)


@tf.autograph.experimental.do_not_convert
def attention_grad(q, k, v, out, lse, dout, blocks, row_offsets, col_offsets, col_blocks,
                   mask_index, masks, mask_key_range, mask_query_range, mask_split,
                   key_padding_mask, scale: float, block_size: int):
  """(dq, dk, dv) of `attention` for the output gradient dout."""
  return _ops().sparse_attention_blocksparse_attention_grad(
      q, k, v, out, lse, dout, blocks, row_offsets, col_offsets, col_blocks, mask_index,
      masks, mask_key_range, mask_query_range, mask_split, key_padding_mask, scale=scale,
      block_size=block_size)


# --- gradients ------------------------------------------------------------------
_NO_TABLE_GRADS = (None, None, None, None)


@tf.RegisterGradient("SparseAttention>BlocksparseSdd")
def _sdd_grad(op, dc):
  a, b, *tables = op.inputs
  da = dsd(dc, b, *tables)      # dA_I = sum_J dC_IJ . B_J
  db = dsd_t(dc, a, *tables)    # dB_J = sum_I dC_IJ^T . A_I
  return (da, db) + _NO_TABLE_GRADS


@tf.RegisterGradient("SparseAttention>BlocksparseDsd")
def _dsd_grad(op, dout):
  p, x, *tables = op.inputs
  dp = sdd(dout, x, *tables, block_size=int(p.shape[-1]))  # dP_IJ = dOut_I . X_J^T
  dx = dsd_t(p, dout, *tables)                              # dX_J = sum_I P_IJ^T . dOut_I
  return (dp, dx) + _NO_TABLE_GRADS


@tf.RegisterGradient("SparseAttention>BlocksparseDsdT")
def _dsd_t_grad(op, dout):
  p, x, *tables = op.inputs
  dp = sdd(x, dout, *tables, block_size=int(p.shape[-1]))  # dP_IJ = X_I . dOut_J^T
  dx = dsd(p, dout, *tables)                                # dX_I = sum_J P_IJ . dOut_J
  return (dp, dx) + _NO_TABLE_GRADS


@tf.RegisterGradient("SparseAttention>BlocksparseSoftmax")
def _softmax_grad(op, dy):
  y = op.outputs[0]
  dx = softmax_grad(y, dy, op.inputs[2], scale=op.get_attr("scale"))
  return (dx, None, None, None, None, None)


@tf.RegisterGradient("SparseAttention>BlocksparseAttention")
def _attention_grad(op, dout, unused_dlse):
  q, k, v, *tables = op.inputs
  out, lse = op.outputs
  dq, dk, dv = attention_grad(q, k, v, out, lse, dout, *tables, scale=op.get_attr("scale"),
                              block_size=op.get_attr("block_size"))
  return (dq, dk, dv) + (None,) * len(tables)
