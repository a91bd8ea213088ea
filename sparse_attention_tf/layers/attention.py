"""Sparse multi-head attention as a Keras 3 layer.

The layer accepts any sequence length: when the pattern's plan does not accept
the length T (e.g. T is not a multiple of the block size), the projected heads
are padded to `padded_length(pattern, T, block_size)`, the padded keys are
masked, and the output is sliced back to T. Real positions then get exactly
the attention of `pattern.mask(padded_length)[:, :T, :T]`.

Dimension letters: B batch, T sequence, L padded sequence, H heads, K key
size, V value size.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from sparse_attention_tf import attention as attention_lib
from sparse_attention_tf import patterns as patterns_lib

_MAX_PADDING_BLOCKS = 4096   # how far padded_length looks (in blocks) before giving up


def padded_length(pattern, seq_len: int, block_size: int) -> int:
  """The smallest length >= seq_len that `pattern.plan(length, block_size)` accepts.

  A multiple of block_size that also meets the pattern's own conditions (e.g.
  a multiple of the stride for `Strided(mode="split")`, of the layout width
  for `Custom`, of the pattern block for `BigBird`).

  Raises:
    ValueError: if no such length is found within 4096 blocks of seq_len.
  """
  pattern = patterns_lib.deserialize(pattern)
  if block_size not in patterns_lib.SUPPORTED_BLOCK_SIZES:
    raise ValueError(f"block_size must be one of {patterns_lib.SUPPORTED_BLOCK_SIZES}, got "
                     f"{block_size!r}.")
  first = -(-int(seq_len) // block_size) * block_size
  error = None
  for length in range(first, first + _MAX_PADDING_BLOCKS * block_size, block_size):
    try:
      pattern.plan(length, block_size)
      return length
    except ValueError as e:
      error = error or e
  raise ValueError(f"no length from {seq_len} to {length} fits {pattern!r} at block_size "
                   f"{block_size}; at {first}: {error}")


def check_rank(layer_name: str, arg: str, shape, layout: str, rank4_hint: str = "") -> None:
  """Raises a ValueError naming the expected layout unless `shape` has rank 3.

  `rank4_hint` is added to the message for rank-4 inputs (what to do instead).
  """
  shape = tuple(shape)
  if len(shape) == 3:
    return
  hint = {4: rank4_hint,
          2: " Add a batch axis (x[None]), or embed token ids first (keras.layers.Embedding)."
          }.get(len(shape), "")
  raise ValueError(f"{layer_name} expects {arg} of shape {layout}, got shape {shape}.{hint}")


@keras.saving.register_keras_serializable(package="sparse_attention_tf")
class SparseMultiHeadAttention(keras.layers.Layer):
  """Multi-head attention that attends only where a sparsity pattern allows.

  The Sparse Transformer's attention (Child et al. 2019,
  https://arxiv.org/abs/1904.10509): query, key and value projections per
  head, block-sparse softmax attention under `pattern` (see
  `sparse_attention_tf.sparse_attention`), then an output projection back to
  the query's width.

  Args:
    num_heads: number of attention heads; a multiple of `pattern.num_heads`.
    key_dim: size of each head for query and key.
    pattern: a `sparse_attention_tf.patterns.Pattern` (or its serialized dict).
    block_size: kernel block size (16, 32, 64 or 128). Sequences whose length
      the pattern's plan does not accept are padded internally (see Call
      arguments).
    value_dim: size of each head for value (default `key_dim`).
    dropout: dropout rate on the attention output, before the output
      projection (the block-sparse kernels do not materialise attention
      probabilities to drop).
    use_bias: whether the projections have biases.
    kernel_initializer: initializer of the query, key and value kernels.
    output_initializer: initializer of the output projection kernel (the
      Sparse Transformer block scales it by `1/sqrt(2 * num_layers)`).
    bias_initializer: initializer of the biases.
    implementation: passed to `sparse_attention`: `"auto"`, `"custom_op"`
      (fused), `"custom_op_unfused"`, `"reference"` or `"dense"`.
    **kwargs: base layer arguments (`name`, `dtype`, ...).

  Call arguments:
    query: `[batch, seq, dim]`; seq must be static (known when traced), any
      length: if the plan does not accept it, q, k and v are padded to
      `padded_length(pattern, seq, block_size)` (the next multiple of
      block_size that the pattern accepts), the padded keys are masked and
      the output is sliced back to seq. Real positions get exactly attention
      under `pattern.mask(padded_length)[:, :seq, :seq]`.
    value: `[batch, seq, dim]` (default: `query`, self-attention).
    key: `[batch, seq, dim]` (default: `value`).
    key_padding_mask: optional `[batch, seq]` bool, True for real keys. When
      absent, the Keras mask of `value` (e.g. from
      `Embedding(mask_zero=True)`) is used.
    training: whether dropout is active.

  Returns:
    `[batch, seq, dim]` with the query's width. Query rows that see no key
    give the output projection's bias.

  Raises:
    ValueError: for inputs that are not `[batch, seq, dim]`, lengths of
      query, key and value that differ, or a sequence length unknown when
      traced.

  Example:

  >>> import sparse_attention_tf as sat
  >>> layer = SparseMultiHeadAttention(num_heads=4, key_dim=16,
  ...                                  pattern=sat.Fixed(stride=32, summary=8),
  ...                                  block_size=16)
  >>> x = keras.random.normal((2, 128, 64))
  >>> layer(x).shape
  TensorShape([2, 128, 64])
  >>> layer(x[:, :100]).shape     # padded to 128 inside, padded keys masked
  TensorShape([2, 100, 64])
  """

  def __init__(self, num_heads: int, key_dim: int, pattern, block_size: int = 32,
               value_dim=None, dropout: float = 0.0, use_bias: bool = True,
               kernel_initializer="glorot_uniform", output_initializer="glorot_uniform",
               bias_initializer="zeros", implementation: str = "auto", **kwargs):
    super().__init__(**kwargs)
    self.supports_masking = True
    self.num_heads = int(num_heads)
    self.key_dim = int(key_dim)
    self.value_dim = int(value_dim) if value_dim else self.key_dim
    self.pattern = patterns_lib.deserialize(pattern)
    self.block_size = int(block_size)
    self.dropout = float(dropout)
    self.use_bias = bool(use_bias)
    self.kernel_initializer = keras.initializers.get(kernel_initializer)
    self.output_initializer = keras.initializers.get(output_initializer)
    self.bias_initializer = keras.initializers.get(bias_initializer)
    if implementation not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f"implementation must be one of {attention_lib.IMPLEMENTATIONS}, got "
                       f"{implementation!r}.")
    self.implementation = implementation
    self._padded_lengths = {}                       # seq_len -> padded_length, computed once
    self._decode_tables = {}                        # seq_len -> decode_table, computed once
    if self.num_heads < 1 or self.key_dim < 1 or self.value_dim < 1:
      raise ValueError(f"num_heads, key_dim and value_dim must be >= 1, got {num_heads}, "
                       f"{key_dim}, {value_dim}.")
    if self.num_heads % self.pattern.num_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of the pattern's heads "
                       f"({self.pattern.num_heads}) for {self.pattern!r}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {dropout}.")

  def _projection(self, name, heads_dim, initializer):
    bias = "de" if self.use_bias else None
    return keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, self.num_heads, heads_dim),
                                    bias_axes=bias, kernel_initializer=initializer,
                                    bias_initializer=self.bias_initializer, name=name,
                                    dtype=self.dtype_policy)

  def build(self, query_shape, value_shape=None, key_shape=None):
    value_shape = query_shape if value_shape is None else value_shape
    key_shape = value_shape if key_shape is None else key_shape
    self._check_shapes(query_shape, value_shape, key_shape)
    width = query_shape[-1]
    self._query_dense = self._projection("query", self.key_dim, self.kernel_initializer)
    self._key_dense = self._projection("key", self.key_dim, self.kernel_initializer)
    self._value_dense = self._projection("value", self.value_dim, self.kernel_initializer)
    self._query_dense.build(query_shape)
    self._key_dense.build(key_shape)
    self._value_dense.build(value_shape)
    self._output_dense = keras.layers.EinsumDense(
        "abcd,cde->abe", output_shape=(None, width), bias_axes="e" if self.use_bias else None,
        kernel_initializer=self.output_initializer, bias_initializer=self.bias_initializer,
        name="attention_output", dtype=self.dtype_policy)
    self._output_dense.build((query_shape[0], query_shape[1], self.num_heads, self.value_dim))
    self._dropout = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)

  # Sublayers, public like those of keras.layers.MultiHeadAttention.
  @property
  def query_dense(self):
    return self._query_dense

  @property
  def key_dense(self):
    return self._key_dense

  @property
  def value_dense(self):
    return self._value_dense

  @property
  def output_dense(self):
    return self._output_dense

  def _check_shapes(self, query_shape, value_shape, key_shape):
    name = type(self).__name__
    for arg, shape in (("query", query_shape), ("value", value_shape), ("key", key_shape)):
      check_rank(name, arg, shape, "[batch, seq, dim]", rank4_hint=(
          " For q, k and v already split into heads [batch, seq, heads, head_dim], call "
          "sparse_attention_tf.sparse_attention instead."))
    lengths = {arg: shape[1] for arg, shape in (("query", query_shape), ("value", value_shape),
                                                ("key", key_shape)) if shape[1] is not None}
    if len(set(lengths.values())) > 1:
      raise ValueError(f"{name} attends within one sequence: query, key and value must have "
                       f"the same length, got {lengths}.")

  def padded_length(self, seq_len: int) -> int:
    """The length a sequence of `seq_len` is padded to (seq_len when none is needed)."""
    if seq_len not in self._padded_lengths:
      self._padded_lengths[seq_len] = padded_length(self.pattern, seq_len, self.block_size)
    return self._padded_lengths[seq_len]

  def call(self, query, value=None, key=None, key_padding_mask=None, training=None, mask=None,
           query_mask=None, value_mask=None, key_mask=None):
    # Keras passes the mask of the only tensor argument as `mask`, and those of
    # several as `<argument>_mask`: the keys' padding is that of value (or key).
    if key_padding_mask is None:
      key_padding_mask = (next((m for m in (value_mask, key_mask) if m is not None), None)
                          if value is not None else
                          next((m for m in (mask, query_mask) if m is not None), None))
    value = query if value is None else value
    key = value if key is None else key
    self._check_shapes(query.shape, value.shape, key.shape)
    q = self._query_dense(query)                                          # (B, T, H, K)
    k = self._key_dense(key)                                              # (B, T, H, K)
    v = self._value_dense(value)                                          # (B, T, H, V)
    out = self.attend(q, k, v, key_padding_mask)                          # (B, T, H, V)
    out = self._dropout(out, training=training)
    return self._output_dense(out)                                        # (B, T, dim)

  def attend(self, q, k, v, key_padding_mask=None):
    """The attention core on projected heads: `[B, T, H, K]` -> `[B, T, H, V]`.

    The override point for other attention computations. This one pads T to
    `self.padded_length(T)` when the pattern needs it (see the class
    docstring) and calls `sparse_attention`.
    """
    seq = q.shape[1]
    if seq is None:
      raise ValueError(
          f"{type(self).__name__} needs a static sequence length (the block layout depends on "
          f"it), got projected query of shape {q.shape}. Give the model a fixed length, e.g. "
          f"keras.Input((seq_len, dim)), or trace tf.function with a fixed-length signature.")
    if key_padding_mask is not None:
      key_padding_mask = tf.cast(tf.convert_to_tensor(key_padding_mask), tf.bool)  # (B, T)
      if key_padding_mask.shape.rank != 2 or key_padding_mask.shape[1] not in (None, seq):
        raise ValueError(f"key_padding_mask must have shape [batch, {seq}], got "
                         f"{key_padding_mask.shape}.")
    padded = self.padded_length(seq)
    if padded != seq:
      pad = [[0, 0], [0, padded - seq], [0, 0], [0, 0]]
      q, k, v = (tf.pad(t, pad) for t in (q, k, v))                      # (B, L, H, K|V)
      if key_padding_mask is None:
        key_padding_mask = tf.ones(tf.stack([tf.shape(q)[0], seq]), tf.bool)  # (B, T)
      key_padding_mask = tf.pad(key_padding_mask, [[0, 0], [0, padded - seq]])  # (B, L)
    out = attention_lib.sparse_attention(q, k, v, self.pattern, block_size=self.block_size,
                                         scale=1.0 / math.sqrt(self.key_dim),
                                         key_padding_mask=key_padding_mask,
                                         implementation=self.implementation)  # (B, L, H, V)
    return out if padded == seq else out[:, :seq]                         # (B, T, H, V)

  # --- one query position against cached keys (generation) --------------------
  def project_step(self, x):
    """Projections of one position `[B, 1, dim]`: q, k, v `[H, B, K|V]`."""
    q, k, v = (tf.transpose(layer(x)[:, 0], [1, 0, 2])                   # (H, B, K|V)
               for layer in (self._query_dense, self._key_dense, self._value_dense))
    return q, k, v

  def attend_step(self, q, key_cache, value_cache, idx, valid):
    """One query position against cached keys.

    Args:
      q: `[H, B, K]` projected query of the position.
      key_cache, value_cache: `[H, N, B, K|V]` projected keys and values of
        every position so far.
      idx, valid: `[H, W]` the positions this query attends and which slots
        hold one (a row of `decode_table`: `max(row, 0)`, `row >= 0`).

    Returns:
      `[B, 1, dim]`, the layer output for this position.
    """
    idx = tf.convert_to_tensor(idx, tf.int32)                            # (H, W)
    keys = tf.gather(key_cache, idx, axis=1, batch_dims=1)               # (H, W, B, K)
    values = tf.gather(value_cache, idx, axis=1, batch_dims=1)           # (H, W, B, V)
    logits = tf.einsum("hbk,hwbk->bhw", tf.cast(q, tf.float32), tf.cast(keys, tf.float32))
    logits *= 1.0 / math.sqrt(self.key_dim)                              # (B, H, W)
    visible = tf.broadcast_to(tf.convert_to_tensor(valid, tf.bool)[None], tf.shape(logits))
    logits = tf.where(visible, logits, tf.fill(tf.shape(logits), -1e30))
    probs = tf.nn.softmax(logits, axis=-1) * tf.cast(visible, tf.float32)
    probs /= tf.maximum(tf.reduce_sum(probs, axis=-1, keepdims=True), 1e-30)
    out = tf.einsum("bhw,hwbv->bhv", probs, tf.cast(values, tf.float32))  # (B, H, V)
    out = tf.cast(out, self.compute_dtype)[:, None]                       # (B, 1, H, V)
    return self._output_dense(out)                                        # (B, 1, dim)

  # --- prefill and compiled decoding (sparse_attention_tf.generation) ---------
  def decode_table(self, seq_len: int) -> np.ndarray:
    """The keys of every query position, per head: int32 `[N, H, W]`, -1 past a row's end.

    Row `t` lists the positions `pattern.mask(seq_len)[h % H_p, t]` keeps, in
    order; W is the longest row. Built once per seq_len (NumPy), so a
    compiled decoding step looks up its keys with a gather on the position.
    """
    tables = self._decode_tables
    if seq_len not in tables:
      mask = self.pattern.mask(seq_len)                                   # (H_p, N, N)
      width = max(1, int(mask.sum(axis=-1).max()))
      table = np.full((seq_len, mask.shape[0], width), -1, np.int32)      # (N, H_p, W)
      for h in range(mask.shape[0]):
        rows, cols = np.nonzero(mask[h])
        slot = np.arange(len(rows)) - np.searchsorted(rows, rows)         # rank within its row
        table[rows, h, slot] = cols
      heads = np.arange(self.num_heads) % mask.shape[0]
      tables[seq_len] = np.ascontiguousarray(table[:, heads])             # (N, H, W)
    return tables[seq_len]

  def prefill(self, query):
    """Self-attention over `query` `[B, T, dim]` (no dropout), and its projected keys.

    Returns:
      (output `[B, T, dim]`, keys `[B, T, H, K]`, values `[B, T, H, V]`):
      the output of `call(query)`, and what a decoding cache holds.
    """
    q = self._query_dense(query)                                          # (B, T, H, K)
    k = self._key_dense(query)                                            # (B, T, H, K)
    v = self._value_dense(query)                                          # (B, T, H, V)
    return self._output_dense(self.attend(q, k, v)), k, v

  def compute_output_shape(self, query_shape, value_shape=None, key_shape=None):
    return query_shape

  def get_config(self):
    config = super().get_config()
    config.update({
        "num_heads": self.num_heads,
        "key_dim": self.key_dim,
        "pattern": patterns_lib.serialize(self.pattern),
        "block_size": self.block_size,
        "value_dim": self.value_dim,
        "dropout": self.dropout,
        "use_bias": self.use_bias,
        "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        "output_initializer": keras.initializers.serialize(self.output_initializer),
        "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        "implementation": self.implementation,
    })
    return config
