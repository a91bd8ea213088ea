"""Bits per token (per byte, dim or sample): cross-entropy in base 2, averaged per token."""

from __future__ import annotations

import math

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="sparse_attention_tf")
class BitsPerToken(keras.metrics.Metric):
  """Mean next-token cross-entropy in bits (the paper's bits/byte, bits/dim).

  Name it for what a token is, as `sparse_attention_tf.data` does
  (`TokenData.unit`): "bits_per_byte" for bytes, "bits_per_dim" for image
  pixels x channels, "bits_per_sample" for µ-law audio samples.

  Args:
    from_logits: whether predictions are logits (default) or probabilities.
    name: metric name (default "bits_per_byte").

  Call arguments (`update_state`):
    y_true: int token ids `[batch, seq]`.
    y_pred: `[batch, seq, vocab]`.
    sample_weight: optional `[batch, seq]` weights (0 for padding).

  Example:

  >>> m = BitsPerToken()
  >>> m.update_state([[0, 1]], tf.zeros([1, 2, 256]))
  >>> round(float(m.result()), 4)
  8.0
  """

  def __init__(self, from_logits: bool = True, name: str = "bits_per_byte", **kwargs):
    super().__init__(name=name, **kwargs)
    self.from_logits = bool(from_logits)
    self.total = self.add_variable(shape=(), initializer="zeros", name="total_bits")
    self.count = self.add_variable(shape=(), initializer="zeros", name="count")

  def update_state(self, y_true, y_pred, sample_weight=None):
    y_true = tf.convert_to_tensor(y_true)      # lists and arrays too, as in the example
    y_pred = tf.cast(y_pred, tf.float32)
    nats = keras.losses.sparse_categorical_crossentropy(y_true, y_pred,
                                                        from_logits=self.from_logits)
    weight = tf.ones_like(nats) if sample_weight is None else tf.cast(sample_weight, tf.float32)
    weight = tf.broadcast_to(weight, tf.shape(nats))
    self.total.assign_add(tf.reduce_sum(nats * weight) / math.log(2.0))
    self.count.assign_add(tf.reduce_sum(weight))

  def result(self):
    return tf.math.divide_no_nan(self.total, self.count)

  def reset_state(self):
    self.total.assign(0.0)
    self.count.assign(0.0)

  def get_config(self):
    return {**super().get_config(), "from_logits": self.from_logits}
