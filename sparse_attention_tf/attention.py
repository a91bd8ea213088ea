"""`sparse_attention`: the one function users call.

    out = sparse_attention(q, k, v, Fixed(stride=128, summary=32))

q, k, v are `[batch, seq, heads, head_dim]`, the layout of
`keras.ops.dot_product_attention`. The result equals dense softmax attention
under `pattern.mask(seq)` for every query row that sees at least one key;
rows that see none (all their keys padded) are 0.

The library's functions are plain Python over static shapes and tables, so
they are marked `do_not_convert`: inside a `tf.function`, AutoGraph traces
them as they are instead of rewriting them.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Optional

import numpy as np
import tensorflow as tf

from sparse_attention_tf import ops as ops_lib
from sparse_attention_tf import patterns as patterns_lib
from sparse_attention_tf import reference

IMPLEMENTATIONS = ("auto", "custom_op", "custom_op_unfused", "reference", "dense")
_CUSTOM_OPS = ("custom_op", "custom_op_unfused")
_FLOAT_DTYPES = (tf.float32, tf.bfloat16, tf.float16)
_warned_fallback = False
# Table tensors of each plan part, made once per part when executing eagerly.
_EAGER_TABLES = weakref.WeakKeyDictionary()


def resolve_implementation(implementation: str) -> str:
  """Maps "auto" to "custom_op" when the op library loads, else "reference"."""
  global _warned_fallback
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
  if implementation != "auto":
    return implementation
  if ops_lib.is_available():
    return "custom_op"
  if not _warned_fallback:
    _warned_fallback = True
    warnings.warn("sparse_attention_tf: using the pure-TF reference implementation (slower). "
                  f"{ops_lib.load_error()}", RuntimeWarning, stacklevel=3)
  return "reference"


def _check_inputs(query, key, value, pattern, key_padding_mask, implementation, block_size):
  for name, t in (("query", query), ("key", key), ("value", value)):
    if t.shape.rank != 4:
      hint = (" For inputs [batch, seq, dim] use the layer SparseMultiHeadAttention, which "
              "projects them into heads." if t.shape.rank == 3 else "")
      raise ValueError(f"{name} must have rank 4 [batch, seq, heads, head_dim], got shape "
                       f"{t.shape}.{hint}")
  if query.shape[1:3] != key.shape[1:3] or query.shape[1:3] != value.shape[1:3]:
    raise ValueError(f"query, key and value must agree on seq and heads, got {query.shape}, "
                     f"{key.shape}, {value.shape}.")
  batches = {name: t.shape[0] for name, t in (("query", query), ("key", key), ("value", value),
                                               ("key_padding_mask", key_padding_mask))
             if t is not None and t.shape.rank in (2, 4) and t.shape[0] is not None}
  if len(set(batches.values())) > 1:
    raise ValueError(f"batch sizes differ: {batches}.")
  if query.shape[3] != key.shape[3]:
    raise ValueError(f"query and key must have the same head_dim, got {query.shape[3]} and "
                     f"{key.shape[3]}.")
  if query.dtype != key.dtype or query.dtype != value.dtype:
    raise ValueError(f"query, key and value must have one dtype, got {query.dtype.name}, "
                     f"{key.dtype.name}, {value.dtype.name}.")
  allowed = _FLOAT_DTYPES + ((tf.float64,) if implementation not in _CUSTOM_OPS else ())
  if query.dtype not in allowed:
    raise ValueError(f"dtype {query.dtype.name} is not supported by implementation "
                     f"{implementation!r}; use one of {[d.name for d in allowed]}.")
  seq, heads = query.shape[1], query.shape[2]
  if seq is None or heads is None or query.shape[3] is None or value.shape[3] is None:
    raise ValueError(f"seq, heads and head_dim must be known statically (the block layout "
                     f"depends on them), got shapes {query.shape} and {value.shape}.")
  if min(query.shape[1:]) < 1 or value.shape[3] < 1:
    raise ValueError(f"seq, heads, head_dim and value_dim must be >= 1, got shapes "
                     f"{query.shape} and {value.shape}.")
  if heads % pattern.num_heads:
    raise ValueError(f"the number of heads ({heads}) must be a multiple of the pattern's heads "
                     f"({pattern.num_heads}) for {pattern!r}."
                     f"{_layout_hint(query.shape, pattern, block_size)}")
  if key_padding_mask is not None:
    if key_padding_mask.shape.rank != 2 or key_padding_mask.shape[1] != seq:
      raise ValueError(f"key_padding_mask must have shape [batch, {seq}], got "
                       f"{key_padding_mask.shape}.")


def _fits(pattern, seq: int, block_size: int) -> bool:
  """Whether `pattern.plan(seq, block_size)` accepts seq."""
  try:
    pattern.plan(seq, block_size)
  except ValueError:
    return False
  return True


def _layout_hint(shape, pattern, block_size: int) -> str:
  """A sentence for inputs that look like [batch, heads, seq, head_dim], else ""."""
  seq, heads = shape[1], shape[2]
  if seq == heads or seq % pattern.num_heads or not _fits(pattern, heads, block_size):
    return ""
  return (f" The inputs look like [batch, heads, seq, head_dim] = {list(shape)}: "
          f"sparse_attention expects [batch, seq, heads, head_dim] (the layout of "
          f"keras.ops.dot_product_attention). Transpose q, k and v with "
          f"tf.transpose(x, [0, 2, 1, 3]), and the output back the same way.")


def _plan(pattern, shape, block_size: int):
  """`pattern.plan` for the seq axis of `shape`, with errors that say what to do."""
  seq = shape[1]
  if block_size in patterns_lib.SUPPORTED_BLOCK_SIZES and seq % block_size:
    raise ValueError(
        f"seq_len ({seq}) must be a multiple of block_size ({block_size}): sparse_attention "
        f"does not pad. Pad q, k and v to a multiple of {block_size} and mask the padded keys with "
        f"key_padding_mask, or use the Keras layers SparseMultiHeadAttention and "
        f"SparseTransformerBlock, which accept any length and pad internally."
        f"{_layout_hint(shape, pattern, block_size)}")
  try:
    return pattern.plan(seq, block_size)
  except ValueError as e:
    hint = _layout_hint(shape, pattern, block_size)
    if not hint:
      raise
    raise ValueError(f"{e}{hint}") from None


def _part_heads(part, heads: int, pattern_heads: int) -> np.ndarray:
  """Attention heads (indices into H) that a plan part covers."""
  if part.heads is None:
    return np.arange(heads)
  return np.array([h for h in range(heads) if h % pattern_heads in part.heads])


def _table_tensors(part) -> ops_lib.TableTensors:
  """Table tensors of a part; made once per part when executing eagerly."""
  if not tf.executing_eagerly() or tf.inside_function():
    return ops_lib.TableTensors(part.tables)
  cached = _EAGER_TABLES.get(part)
  if cached is None:
    cached = _EAGER_TABLES[part] = ops_lib.TableTensors(part.tables)
  return cached


def _fused_attention(q, k, v, part, scale, key_padding_mask):
  t = _table_tensors(part)
  if key_padding_mask is None:
    key_padding_mask = tf.ones(tf.shape(q)[:2], tf.bool)                  # (B, N)
  out, _ = ops_lib.attention(q, k, v, *t.fused_tables, key_padding_mask, scale=scale,
                             block_size=t.block_size)                   # (B, N, H, Dv)
  return out


def _unfused_attention(q, k, v, part, scale, key_padding_mask):
  t = _table_tensors(part)
  if key_padding_mask is None:
    key_padding_mask = tf.ones(tf.shape(q)[:2], tf.bool)                  # (B, N)
  scores = ops_lib.sdd(q, k, *t.all_tables, block_size=t.block_size)      # (B, G, Z, b, b)
  probs = ops_lib.softmax(scores, t.blocks, t.row_offsets, t.mask_index, t.masks,
                          key_padding_mask, scale=scale)                  # (B, G, Z, b, b)
  return ops_lib.dsd(probs, v, *t.all_tables)                             # (B, N, H, Dv)


@tf.autograph.experimental.do_not_convert
def sparse_attention(query, key, value, pattern, block_size: int = 32,
                     scale: Optional[float] = None, key_padding_mask=None,
                     implementation: str = "auto"):
  """Block-sparse softmax attention under a sparsity pattern.

  Args:
    query: `[batch, seq, heads, head_dim]`.
    key: `[batch, seq, heads, head_dim]`.
    value: `[batch, seq, heads, value_dim]`.
    pattern: a `sparse_attention_tf.patterns.Pattern` (or its serialized dict).
      Head h uses the pattern's head `h % pattern.num_heads`.
    block_size: kernel block size, one of 16, 32, 64, 128; must divide seq
      (strictly: this function does not pad; `SparseMultiHeadAttention` and
      `SparseTransformerBlock` accept any length by padding internally).
    scale: multiplies `q . k`; default `1 / sqrt(head_dim)`.
    key_padding_mask: optional `[batch, seq]`, True (or 1) for real keys and
      False for padding.
    implementation: `"custom_op"` (the fused C++ kernel: online softmax, no
      score tensor), `"custom_op_unfused"` (the three C++ ops SDD -> softmax ->
      DSD, which store the `[B, G, Z, b, b]` scores), `"reference"` (pure TF
      on the kept blocks), `"dense"` (full masked attention, O(N^2), for
      checking) or `"auto"` (the fused op if its library loads, else the
      reference, with one warning).

  Returns:
    `[batch, seq, heads, value_dim]` in the input dtype. Rows that see no key
    are 0.

  Raises:
    ValueError: for shapes, dtypes or pattern parameters that do not fit; a
      seq_len that is not a multiple of block_size; inputs that look like
      `[batch, heads, seq, head_dim]` (the message says how to transpose).
  """
  pattern = patterns_lib.deserialize(pattern)
  query, key, value = (tf.convert_to_tensor(t) for t in (query, key, value))
  if key_padding_mask is not None:
    key_padding_mask = tf.convert_to_tensor(key_padding_mask)
  implementation = resolve_implementation(implementation)
  _check_inputs(query, key, value, pattern, key_padding_mask, implementation, block_size)
  seq, heads, head_dim = (int(d) for d in query.shape[1:])
  scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
  if key_padding_mask is not None:
    key_padding_mask = tf.cast(key_padding_mask, tf.bool)

  plan = _plan(pattern, query.shape, block_size)   # validates seq / block / pattern parameters
  if implementation == "dense":
    return reference.dense_attention(query, key, value, pattern.mask(seq), scale,
                                     key_padding_mask)

  outputs, head_order = [], []
  for part in plan.parts:
    idx = _part_heads(part, heads, pattern.num_heads)
    q, k, v = (_take_heads(t, idx) for t in (query, key, value))
    kp = key_padding_mask
    if part.transpose is not None:                                        # column-major grid
      q, k, v = (_grid_transpose(t, part.transpose) for t in (q, k, v))
      kp = None if kp is None else _grid_transpose(kp, part.transpose)
    if implementation == "custom_op":
      out = _fused_attention(q, k, v, part, scale, kp)
    elif implementation == "custom_op_unfused":
      out = _unfused_attention(q, k, v, part, scale, kp)
    else:
      out = reference.blocksparse_attention(q, k, v, part.tables, scale, kp)
    if part.transpose is not None:
      out = _grid_transpose(out, seq // part.transpose)                   # and back
    outputs.append(out)
    head_order.append(idx)
  out = outputs[0] if len(outputs) == 1 else tf.concat(outputs, axis=2)  # heads grouped by part
  order = np.concatenate(head_order)
  if np.array_equal(order, np.arange(heads)):
    return out
  return tf.gather(out, np.argsort(order), axis=2)


def _take_heads(t, idx: np.ndarray):
  """t[:, :, idx]: a slice when idx is a contiguous range, else a gather."""
  if idx.size and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):
    return t if idx.size == t.shape[2] else t[:, :, idx[0]:idx[0] + idx.size]
  return tf.gather(t, idx, axis=2)


def _grid_transpose(t, stride: int):
  """Reorders axis 1 (length N) as the [N/stride, stride] grid read column by column.

  Position r*stride + c moves to c*(N/stride) + r (see
  patterns.transpose_permutation); applying it with stride N/stride undoes it.
  A reshape and a transpose: cheaper than a gather, and so is its gradient.
  """
  shape = tf.shape(t)
  n = t.shape[1]
  grid = tf.reshape(t, tf.concat([shape[:1], [n // stride, stride], shape[2:]], 0))
  perm = [0, 2, 1] + list(range(3, t.shape.rank + 1))
  return tf.reshape(tf.transpose(grid, perm), shape)
