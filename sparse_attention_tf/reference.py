"""Pure-TensorFlow implementations of block-sparse attention (no custom op).

`blocksparse_attention` is the readable twin of the C++ path: it gathers the
kept blocks with the same lookup tables, multiplies them with einsum, and
takes the softmax across the blocks of a row with segment reductions. It runs
anywhere TensorFlow runs and exports to a SavedModel of stock ops only.

`dense_attention` is full masked attention under the element mask, O(N^2):
the ground truth for checks and the baseline for benchmarks.

Letters: B batch, N sequence, H heads, D head dim, b block size, Nb blocks per
sequence, Hl layout heads, G = H / Hl, Z kept blocks, R = Hl * Nb block rows.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from sparse_attention_tf import layout as layout_lib

# Scores of hidden elements before exp; finite, so no inf * 0 in gradients.
_HIDDEN = -1e30


def _compute_dtype(dtype):
  return tf.float64 if dtype == tf.float64 else tf.float32


def _gather_tiles(x, block_rows, heads, block_size):
  """x [B,N,H,D] -> [B,G,Z,b,D]: rows of block block_rows[g,z] of head heads[g,z]."""
  b_, n, h, d = tf.unstack(tf.shape(x))
  xt = tf.reshape(x, [b_, n // block_size, block_size, h, d])       # (B, Nb, b, H, D)
  xt = tf.transpose(xt, [1, 3, 0, 2, 4])                            # (Nb, H, B, b, D)
  idx = np.stack([block_rows, heads], axis=-1)                      # (G, Z, 2)
  tiles = tf.gather_nd(xt, idx)                                     # (G, Z, B, b, D)
  return tf.transpose(tiles, [2, 0, 1, 3, 4])                       # (B, G, Z, b, D)


def _row_reduce(values, segments, num_rows, reduce):
  """Reduces [B,G,Z,b] over the blocks of each block row, broadcast back to [B,G,Z,b]."""
  per_block = tf.transpose(values, [2, 0, 1, 3])                    # (Z, B, G, b)
  rows = reduce(per_block, segments, num_rows)                      # (R, B, G, b)
  return tf.transpose(tf.gather(rows, segments), [1, 2, 0, 3])      # (B, G, Z, b)


@tf.autograph.experimental.do_not_convert
def blocksparse_attention(q, k, v, tables: layout_lib.BlockTables, scale: float,
                          key_padding_mask=None):
  """Block-sparse attention on kept blocks only, in plain TF ops.

  Args:
    q, k: [B, N, H, D]; v: [B, N, H, Dv]. H must be a multiple of the tables'
      layout heads; head `g * Hl + h` uses layout head h.
    tables: the `BlockTables` of the pattern part.
    scale: multiplies q . k.
    key_padding_mask: optional bool [B, N], True for real keys.

  Returns:
    [B, N, H, Dv] in q's dtype; rows with no visible key are 0.
  """
  out_dtype = q.dtype
  cdt = _compute_dtype(out_dtype)
  q, k, v = (tf.cast(t, cdt) for t in (q, k, v))
  bsz = tf.shape(q)[0]
  n, h = int(q.shape[1]), int(q.shape[2])
  b, hl, nb, z = tables.block_size, tables.num_layout_heads, tables.num_blocks, tables.nnz
  groups = h // hl
  blk = tables.blocks.astype(np.int64)                                       # (Z, 3)
  heads = np.arange(groups)[:, None] * hl + blk[None, :, 0]                  # (G, Z)
  rows_of = np.broadcast_to(blk[None, :, 1], (groups, z))                    # (G, Z) I
  cols_of = np.broadcast_to(blk[None, :, 2], (groups, z))                    # (G, Z) J
  segments = tf.constant(blk[:, 0] * nb + blk[:, 1], tf.int32)               # (Z,) row id

  qt = _gather_tiles(q, rows_of, heads, b)                                   # (B, G, Z, b, D)
  kt = _gather_tiles(k, cols_of, heads, b)                                   # (B, G, Z, b, D)
  vt = _gather_tiles(v, cols_of, heads, b)                                   # (B, G, Z, b, Dv)
  scores = tf.einsum("bgzid,bgzjd->bgzij", qt, kt) * tf.cast(scale, cdt)     # (B, G, Z, b, b)

  # Visible elements: the tile mask of each block, and the key padding.
  full_and_partial = np.concatenate([np.ones((1, b, b), bool), tables.masks])
  tile = tf.constant(full_and_partial[tables.mask_index + 1])                # (Z, b, b)
  visible = tile[None, None]                                                 # (1, 1, Z, b, b)
  if key_padding_mask is not None:
    kp = tf.reshape(tf.cast(key_padding_mask, tf.bool), [bsz, nb, b])         # (B, Nb, b)
    kp = tf.gather(kp, blk[:, 2], axis=1)                                    # (B, Z, b)
    visible = tf.logical_and(visible, kp[:, None, :, None, :])               # (B, 1, Z, b, b)
  visible = tf.broadcast_to(visible, tf.shape(scores))

  # Softmax across all the blocks of a row: max and sum by segment reductions.
  hidden = tf.fill(tf.shape(scores), tf.cast(_HIDDEN, cdt))
  tile_max = tf.reduce_max(tf.where(visible, scores, hidden), axis=-1)       # (B, G, Z, b)
  row_max = _row_reduce(tile_max, segments, hl * nb, tf.math.unsorted_segment_max)
  row_max = tf.stop_gradient(tf.where(row_max > _HIDDEN / 2, row_max, tf.zeros_like(row_max)))
  shifted = tf.where(visible, scores - row_max[..., None], tf.zeros_like(scores))
  e = tf.exp(shifted) * tf.cast(visible, cdt)                                # (B, G, Z, b, b)
  row_sum = _row_reduce(tf.reduce_sum(e, axis=-1), segments, hl * nb,
                        tf.math.unsorted_segment_sum)                        # (B, G, Z, b)
  probs = e / tf.where(row_sum > 0, row_sum, tf.ones_like(row_sum))[..., None]

  # out_I = sum over the row's blocks of P . V_J, scattered back to [B, N, H, Dv].
  pv = tf.einsum("bgzij,bgzjd->bgzid", probs, vt)                            # (B, G, Z, b, Dv)
  dv = tf.shape(v)[-1]
  rows = tf.math.unsorted_segment_sum(tf.transpose(pv, [2, 0, 1, 3, 4]), segments,
                                      hl * nb)                               # (R, B, G, b, Dv)
  rows = tf.reshape(rows, [hl, nb, bsz, groups, b, dv])                      # (Hl, Nb, B, G, b, Dv)
  out = tf.transpose(rows, [2, 1, 4, 3, 0, 5])                               # (B, Nb, b, G, Hl, Dv)
  out = tf.reshape(out, [bsz, n, h, dv])                                     # (B, N, H, Dv)
  return tf.cast(out, out_dtype)


@tf.autograph.experimental.do_not_convert
def dense_attention(q, k, v, mask: np.ndarray, scale: float, key_padding_mask=None):
  """Full masked softmax attention: O(N^2) time and memory.

  Args:
    q, k: [B, N, H, D]; v: [B, N, H, Dv].
    mask: bool [Hp, N, N]; head h uses mask[h % Hp].
    scale: multiplies q . k.
    key_padding_mask: optional bool [B, N].

  Returns:
    [B, N, H, Dv]; rows with no visible key are 0.
  """
  out_dtype = q.dtype
  cdt = _compute_dtype(out_dtype)
  q, k, v = (tf.cast(t, cdt) for t in (q, k, v))
  h, hp = int(q.shape[2]), mask.shape[0]
  visible = tf.constant(mask)                                                # (Hp, N, N)
  if hp > 1:                                                                 # head h: mask[h % Hp]
    visible = tf.gather(visible, np.arange(h) % hp)                          # (H, N, N)
  visible = visible[None]                                                    # (1, H|1, N, N)
  if key_padding_mask is not None:
    kp = tf.cast(key_padding_mask, tf.bool)
    visible = tf.logical_and(visible, kp[:, None, None, :])                  # (B, H, N, N)
  logits = tf.einsum("bqhd,bkhd->bhqk", q, k) * tf.cast(scale, cdt)          # (B, H, N, N)
  visible = tf.broadcast_to(visible, tf.shape(logits))
  logits = tf.where(visible, logits, tf.cast(_HIDDEN, cdt))
  row_max = tf.stop_gradient(tf.reduce_max(logits, axis=-1, keepdims=True))
  e = tf.exp(tf.where(visible, logits - row_max, tf.zeros_like(logits))) * tf.cast(visible, cdt)
  s = tf.reduce_sum(e, axis=-1, keepdims=True)
  probs = e / tf.where(s > 0, s, tf.ones_like(s))
  out = tf.einsum("bhqk,bkhd->bqhd", probs, v)                               # (B, N, H, Dv)
  return tf.cast(out, out_dtype)
