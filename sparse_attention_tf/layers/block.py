"""The Sparse Transformer's residual block, with optional recomputation."""

from __future__ import annotations

import keras
import tensorflow as tf

from sparse_attention_tf import patterns as patterns_lib
from sparse_attention_tf.layers.attention import SparseMultiHeadAttention, check_rank


def stateless_dropout(x, rate: float, seed):
  """Dropout whose mask is a pure function of `seed` (int32 `[2]`).

  Recomputation in the backward pass calls it again with the same seed and
  gets the same mask.
  """
  if rate == 0.0:
    return x
  keep = tf.random.stateless_uniform(tf.shape(x), seed=seed) >= rate
  return tf.where(keep, x / tf.cast(1.0 - rate, x.dtype), tf.zeros_like(x))


@keras.saving.register_keras_serializable(package="sparse_attention_tf")
class SparseTransformerBlock(keras.layers.Layer):
  """The pre-activation residual block of the Sparse Transformer.

  Section 5.2 of Child et al. 2019 (https://arxiv.org/abs/1904.10509):

      a = dropout(attention(norm(H)))
      b = dropout(ff(norm(H + a)))          ff(x) = W2 . gelu(W1 . x + b1) + b2
      output = H + a + b

  Dropout is applied only at the end of each residual branch; the output
  projections of both branches (`W_p` of the attention, `W2`) are initialised
  with glorot-uniform scaled by `1/sqrt(2 * num_layers)`.

  Args:
    num_heads: attention heads.
    pattern: the sparsity pattern of this block's attention.
    num_layers: depth of the whole network, for the initialisation scale.
    key_dim: size of each head (default `width / num_heads`).
    ffn_multiplier: hidden width of the feed-forward network, times the width.
    dropout: rate at the end of each residual branch.
    block_size: attention kernel block size; any sequence length works (the
      attention pads internally, see `SparseMultiHeadAttention`).
    recompute: recompute both branches in the backward pass instead of
      keeping their activations (`tf.recompute_grad`); dropout masks are
      reproduced exactly.
    layer_norm_epsilon: epsilon of the layer norms.
    implementation: attention implementation (see `sparse_attention`).
    seed: initial seed of the dropout masks (default: drawn from Python's
      `random`, which `keras.utils.set_random_seed` seeds). The masks come
      from a `keras.random.SeedGenerator` whose state advances once per
      training call; `sparse_attention_tf.checkpointing.RunCheckpoint` saves
      that state, so a resumed run draws the masks the uninterrupted run would.
    **kwargs: base layer arguments.

  Call arguments:
    inputs: `[batch, seq, width]`, seq static and of any length: when the
      pattern's plan does not accept it, the attention pads to the next
      length it accepts, masks the padded keys and slices back, so real
      positions get attention under `pattern.mask(padded_length)[:, :seq,
      :seq]` (the feed-forward branch is per position).
    key_padding_mask: optional `[batch, seq]` bool, True for real positions
      (default: the Keras mask of `inputs`).
    training: whether dropout is active.

  Returns:
    `[batch, seq, width]`.

  Raises:
    ValueError: for inputs that are not `[batch, seq, width]`.

  Example:

  >>> import sparse_attention_tf as sat
  >>> block = SparseTransformerBlock(num_heads=4, pattern=sat.Fixed(32, 8), num_layers=2,
  ...                                block_size=16)
  >>> block(keras.random.normal((2, 128, 64))).shape
  TensorShape([2, 128, 64])
  >>> block(keras.random.normal((2, 100, 64))).shape
  TensorShape([2, 100, 64])
  """

  def __init__(self, num_heads: int, pattern, num_layers: int = 1, key_dim=None,
               ffn_multiplier: int = 4, dropout: float = 0.0, block_size: int = 32,
               recompute: bool = False, layer_norm_epsilon: float = 1e-5,
               implementation: str = "auto", seed=None, **kwargs):
    super().__init__(**kwargs)
    self.supports_masking = True
    self.seed = None if seed is None else int(seed)
    self.seed_generator = keras.random.SeedGenerator(self.seed, name="dropout_seed")
    self.num_heads = int(num_heads)
    self.pattern = patterns_lib.deserialize(pattern)
    self.num_layers = int(num_layers)
    self.key_dim = int(key_dim) if key_dim else None
    self.ffn_multiplier = int(ffn_multiplier)
    self.dropout = float(dropout)
    self.block_size = int(block_size)
    self.recompute = bool(recompute)
    self.layer_norm_epsilon = float(layer_norm_epsilon)
    self.implementation = implementation
    if self.num_layers < 1 or self.ffn_multiplier < 1:
      raise ValueError(f"num_layers and ffn_multiplier must be >= 1, got {num_layers}, "
                       f"{ffn_multiplier}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {dropout}.")

  def build(self, input_shape):
    self._check_rank(input_shape)
    width = input_shape[-1]
    key_dim = self.key_dim or width // self.num_heads
    if key_dim < 1:
      raise ValueError(f"width ({width}) is smaller than num_heads ({self.num_heads}).")
    scaled = keras.initializers.VarianceScaling(scale=1.0 / (2 * self.num_layers),
                                                mode="fan_avg", distribution="uniform")
    dt = self.dtype_policy
    self.attention_norm = keras.layers.LayerNormalization(
        epsilon=self.layer_norm_epsilon, name="attention_norm", dtype=dt)
    self.attention = SparseMultiHeadAttention(
        self.num_heads, key_dim, self.pattern, block_size=self.block_size,
        output_initializer=scaled, implementation=self.implementation, name="attention",
        dtype=dt)
    self.ffn_norm = keras.layers.LayerNormalization(
        epsilon=self.layer_norm_epsilon, name="ffn_norm", dtype=dt)
    self.ffn_inner = keras.layers.Dense(self.ffn_multiplier * width, activation="gelu",
                                        name="ffn_inner", dtype=dt)
    self.ffn_output = keras.layers.Dense(width, kernel_initializer=scaled, name="ffn_output",
                                         dtype=dt)
    self.attention_norm.build(input_shape)
    self.attention.build(input_shape)
    self.ffn_norm.build(input_shape)
    self.ffn_inner.build(input_shape)
    self.ffn_output.build(tuple(input_shape[:-1]) + (self.ffn_multiplier * width,))

  def _check_rank(self, shape):
    check_rank(type(self).__name__, "inputs", shape, "[batch, seq, width]", rank4_hint=(
        " Flatten the positions into one sequence axis first, e.g. images "
        "[batch, height, width, channels] -> [batch, height * width, channels]."))

  # The two residual branches, as functions of tensors only (so they can be recomputed).
  def _attention_branch(self, x, key_padding_mask, seed, rate):
    a = self.attention(self.attention_norm(x), key_padding_mask=key_padding_mask)
    return stateless_dropout(a, rate, seed)

  def _ffn_branch(self, x, seed, rate):
    return stateless_dropout(self.ffn_output(self.ffn_inner(self.ffn_norm(x))), rate, seed)

  def call(self, inputs, key_padding_mask=None, training=None, mask=None):
    self._check_rank(inputs.shape)
    if key_padding_mask is None:
      key_padding_mask = mask                   # Keras passes the mask of `inputs` here
    rate = self.dropout if training else 0.0
    if rate > 0.0:   # a stateless seed per branch, from the checkpointed generator state
      seeds = keras.random.randint([2, 2], 0, 2**31 - 1, dtype="int32",
                                   seed=self.seed_generator)
    else:
      seeds = tf.zeros([2, 2], tf.int32)                                  # unused
    kp = key_padding_mask

    def attention_branch(x, seed):
      return self._attention_branch(x, kp, seed, rate)

    def ffn_branch(x, seed):
      return self._ffn_branch(x, seed, rate)

    if self.recompute and training:
      attention_branch = tf.recompute_grad(attention_branch)
      ffn_branch = tf.recompute_grad(ffn_branch)
    a = attention_branch(inputs, seeds[0])                                # (B, T, D)
    b = ffn_branch(inputs + a, seeds[1])                                  # (B, T, D)
    return inputs + a + b

  def prefill(self, x):
    """The block on `x` `[B, T, width]` without dropout, and its attention's keys and values.

    Returns:
      (output `[B, T, width]`, keys `[B, T, H, K]`, values `[B, T, H, V]`).
    """
    a, k, v = self.attention.prefill(self.attention_norm(x))              # (B, T, D), ...
    b = self.ffn_output(self.ffn_inner(self.ffn_norm(x + a)))             # (B, T, D)
    return x + a + b, k, v

  def decode_step(self, x, cache, position, keys):
    """One position through the block against a cache held as tensors (no variables).

    Args:
      x: `[B, 1, width]`, the block input at `position`.
      cache: (keys, values) `[H, N, B, K|V]`; row `position` is replaced.
      position: int32 scalar tensor.
      keys: int32 `[H, W]`, the row `position` of `attention.decode_table`
        (-1 past the row's end).

    Returns:
      (output `[B, 1, width]`, the updated cache).
    """
    q, k, v = self.attention.project_step(self.attention_norm(x))        # (H, B, K|V)
    heads = tf.shape(k)[0]
    where = tf.stack([tf.range(heads), tf.fill([heads], position)], axis=1)  # (H, 2)
    key_cache = tf.tensor_scatter_nd_update(cache[0], where, k)          # (H, N, B, K)
    value_cache = tf.tensor_scatter_nd_update(cache[1], where, v)        # (H, N, B, V)
    a = self.attention.attend_step(q, key_cache, value_cache, tf.maximum(keys, 0), keys >= 0)
    b = self.ffn_output(self.ffn_inner(self.ffn_norm(x + a)))             # (B, 1, D)
    return x + a + b, (key_cache, value_cache)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    config = super().get_config()
    config.update({
        "num_heads": self.num_heads,
        "pattern": patterns_lib.serialize(self.pattern),
        "num_layers": self.num_layers,
        "key_dim": self.key_dim,
        "ffn_multiplier": self.ffn_multiplier,
        "dropout": self.dropout,
        "block_size": self.block_size,
        "recompute": self.recompute,
        "layer_norm_epsilon": self.layer_norm_epsilon,
        "implementation": self.implementation,
        "seed": self.seed,
    })
    return config
