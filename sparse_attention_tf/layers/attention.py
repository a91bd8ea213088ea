"""Sparse multi-head attention as a Keras 3 layer."""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from sparse_attention_tf import attention as attention_lib
from sparse_attention_tf import patterns as patterns_lib


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
    block_size: kernel block size (16, 32, 64 or 128); must divide the
      sequence length.
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
    query: `[batch, seq, dim]`.
    value: `[batch, seq, dim]` (default: `query`, self-attention).
    key: `[batch, seq, dim]` (default: `value`).
    key_padding_mask: optional `[batch, seq]` bool, True for real keys. When
      absent, the Keras mask of `value` (e.g. from
      `Embedding(mask_zero=True)`) is used.
    training: whether dropout is active.

  Returns:
    `[batch, seq, dim]` with the query's width. Query rows that see no key
    give the output projection's bias.

  Example:

  >>> import sparse_attention_tf as sat
  >>> layer = SparseMultiHeadAttention(num_heads=4, key_dim=16,
  ...                                  pattern=sat.Fixed(stride=32, summary=8),
  ...                                  block_size=16)
  >>> x = keras.random.normal((2, 128, 64))
  >>> layer(x).shape
  TensorShape([2, 128, 64])
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

  def _key_padding(self, value, key_padding_mask, mask):
    if key_padding_mask is not None:
      return key_padding_mask
    keras_mask = getattr(value, "_keras_mask", None)
    return keras_mask if keras_mask is not None else mask

  def call(self, query, value=None, key=None, key_padding_mask=None, training=None, mask=None):
    value = query if value is None else value
    key = value if key is None else key
    key_padding_mask = self._key_padding(value, key_padding_mask, mask)
    q = self._query_dense(query)                                          # (B, T, H, K)
    k = self._key_dense(key)                                              # (B, T, H, K)
    v = self._value_dense(value)                                          # (B, T, H, V)
    out = self.attend(q, k, v, key_padding_mask)                          # (B, T, H, V)
    out = self._dropout(out, training=training)
    return self._output_dense(out)                                        # (B, T, dim)

  def attend(self, q, k, v, key_padding_mask=None):
    """The attention core on projected heads: `[B, T, H, K]` -> `[B, T, H, V]`.

    The override point for other attention computations.
    """
    return attention_lib.sparse_attention(q, k, v, self.pattern, block_size=self.block_size,
                                          scale=1.0 / math.sqrt(self.key_dim),
                                          key_padding_mask=key_padding_mask,
                                          implementation=self.implementation)

  # --- one query position against cached keys (generation) --------------------
  def row_keys(self, position: int, seq_len: int):
    """Keys that `position` attends to, per head, padded: (idx, valid) `[H, K]` int32 / bool.

    Read from the pattern's exact mask row; K is rounded up to a power of two
    so that a traced step function is reused across positions.
    """
    heads = self.pattern.num_heads
    rows = self.pattern.row(position, seq_len)
    width = 1 << max(1, int(max(len(r) for r in rows))).bit_length()
    idx = np.zeros((self.num_heads, width), np.int32)
    valid = np.zeros((self.num_heads, width), bool)
    for h in range(self.num_heads):
      r = rows[h % heads]
      idx[h, :len(r)] = r
      valid[h, :len(r)] = True
    return idx, valid

  def project_step(self, x):
    """Projections of one position `[B, 1, dim]`: q, k, v `[H, B, K|V]`."""
    q, k, v = (tf.transpose(layer(x)[:, 0], [1, 0, 2])                   # (H, B, K|V)
               for layer in (self._query_dense, self._key_dense, self._value_dense))
    return q, k, v

  def attend_step(self, q, key_cache, value_cache, idx, valid, key_padding=None):
    """One query position against cached keys.

    Args:
      q: `[H, B, K]` projected query of the position.
      key_cache, value_cache: `[H, N, B, K|V]` projected keys and values of
        every position so far.
      idx, valid: `[H, W]` the positions this query attends (from `row_keys`).
      key_padding: optional `[B, N]` bool.

    Returns:
      `[B, 1, dim]`, the layer output for this position.
    """
    idx = tf.convert_to_tensor(idx, tf.int32)                            # (H, W)
    keys = tf.gather(key_cache, idx, axis=1, batch_dims=1)               # (H, W, B, K)
    values = tf.gather(value_cache, idx, axis=1, batch_dims=1)           # (H, W, B, V)
    logits = tf.einsum("hbk,hwbk->bhw", tf.cast(q, tf.float32), tf.cast(keys, tf.float32))
    logits *= 1.0 / math.sqrt(self.key_dim)                              # (B, H, W)
    visible = tf.broadcast_to(tf.convert_to_tensor(valid, tf.bool)[None], tf.shape(logits))
    if key_padding is not None:
      kp = tf.gather(tf.cast(key_padding, tf.bool), tf.reshape(idx, [-1]), axis=1)
      visible = tf.logical_and(visible, tf.reshape(kp, tf.shape(logits)))
    logits = tf.where(visible, logits, tf.fill(tf.shape(logits), -1e30))
    probs = tf.nn.softmax(logits, axis=-1) * tf.cast(visible, tf.float32)
    probs /= tf.maximum(tf.reduce_sum(probs, axis=-1, keepdims=True), 1e-30)
    out = tf.einsum("bhw,hwbv->bhv", probs, tf.cast(values, tf.float32))  # (B, H, V)
    out = tf.cast(out, self.compute_dtype)[:, None]                       # (B, 1, H, V)
    return self._output_dense(out)                                        # (B, 1, dim)

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
