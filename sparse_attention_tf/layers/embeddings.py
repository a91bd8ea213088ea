"""Learned position embeddings of the Sparse Transformer (Child et al. 2019, Section 5.2).

https://arxiv.org/abs/1904.10509

Each layer adds a position embedding to its input `[batch, T, d_model]` and
returns the sum. `call(inputs, start_index=0)` takes the absolute position of
`inputs[:, 0]`, so that a model generating one step at a time with a cache
embeds token t at position t:

    positions = start_index + arange(T)                    # (T,)

  PositionEmbedding         one learned table [sequence_length, d]
  ImagePositionEmbedding    row + column + channel tables (images in raster
                            order, channels innermost)
  StridedPositionEmbedding  row + column tables of a matrix whose width is
                            the stride (text, audio)

The shared logic (checks, positions, dtype) lives in `_PositionEmbeddingBase`;
a subclass says how many positions it holds (`_capacity`), creates its tables
(`_build_tables`) and maps positions to embeddings (`_embed`).

Positions past the layer's capacity raise a ValueError when the lengths are
known in Python, and an InvalidArgumentError when a tensor `start_index` is
checked as the graph runs; not under XLA (`jit_compile=True`), which cannot
run Assert ops: there the caller checks its positions.

Dimension letters: B batch, T tokens in this call, D d_model.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.ops import control_flow_util  # pylint: disable=g-direct-tensorflow-import

_PACKAGE = "sparse_attention_tf"


def _default_initializer():
  return keras.initializers.RandomNormal(stddev=0.02)


def _in_xla_context() -> bool:
  """Whether ops built now are compiled by XLA (`tf.function(jit_compile=True)`, TPU).

  XLA cannot run Assert ops: it drops them and logs "Ignoring Assert operator"
  at every trace, so the layer leaves its dynamic checks out there
  (`generation.generate` checks the lengths before its compiled loop).
  """
  return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _check_positive_int(name, value):
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  return int(value)


class _PositionEmbeddingBase(keras.layers.Layer):
  """Adds `self._embed(positions)` to the inputs; subclasses define the tables."""

  def __init__(self, embeddings_initializer=None, **kwargs):
    super().__init__(**kwargs)
    self.embeddings_initializer = keras.initializers.get(
        embeddings_initializer if embeddings_initializer is not None
        else _default_initializer())

  # -- override points -------------------------------------------------------

  @property
  def _capacity(self) -> int:
    """The number of positions the layer can embed."""
    raise NotImplementedError

  def _capacity_name(self) -> str:
    """How the capacity is written in error messages."""
    raise NotImplementedError

  def _build_tables(self, d_model: int):
    raise NotImplementedError

  def _embed(self, positions):
    """int32 positions (T,) -> embeddings (T, D) in the variables' dtype."""
    raise NotImplementedError

  # -- shared -----------------------------------------------------------------

  def _add_table(self, name, rows, d_model):
    return self.add_weight(name=name, shape=(rows, d_model),
                           initializer=self.embeddings_initializer, trainable=True)

  def _check_rank(self, shape):
    if len(shape) != 3:
      hint = (" Embed token ids first (keras.layers.Embedding): this layer adds positions to "
              "embeddings." if len(shape) == 2 else "")
      raise ValueError(f"{self.__class__.__name__} expects inputs [batch, sequence_length, "
                       f"d_model], got shape {tuple(shape)}.{hint}")

  def build(self, input_shape):
    self._check_rank(input_shape)
    d_model = input_shape[-1]
    if d_model is None:
      raise ValueError(f"{self.__class__.__name__} needs a static d_model (last input "
                       f"dimension), got shape {tuple(input_shape)}.")
    self._build_tables(int(d_model))
    super().build(input_shape)

  def _positions(self, inputs, start_index):
    """Absolute positions (T,) int32, checked against the capacity."""
    length = inputs.shape[1]
    static_start = isinstance(start_index, (int, np.integer)) and not isinstance(
        start_index, (bool, np.bool_))
    if static_start and start_index < 0:
      raise ValueError(f"start_index must be >= 0, got {start_index}.")
    if static_start and length is not None:
      if start_index + length > self._capacity:
        raise ValueError(
            f"{self.__class__.__name__}: input sequence length {length} starting at position "
            f"{int(start_index)} needs {int(start_index) + length} positions, but the layer "
            f"holds {self._capacity_name()} = {self._capacity}. Pass shorter inputs or build "
            f"the layer with a larger sequence length.")
    if length is None:
      length = tf.shape(inputs)[1]
    start = tf.cast(start_index, tf.int32)
    if not static_start:
      if start.shape.rank != 0:
        raise ValueError(f"start_index must be a scalar, got shape {start.shape}.")
      if not _in_xla_context():       # XLA drops Assert ops (with a warning at every trace)
        message = (f"{self.__class__.__name__}: start_index + input sequence length must lie "
                   f"in [0, {self._capacity}] ({self._capacity_name()}).")
        checks = [tf.debugging.assert_non_negative(start, message=message),
                  tf.debugging.assert_less_equal(start + length, self._capacity,
                                                 message=message)]
        with tf.control_dependencies(checks):
          start = tf.identity(start)
    return start + tf.range(length, dtype=tf.int32)               # (T,)

  def call(self, inputs, start_index=0):
    self._check_rank(inputs.shape)
    positions = self._positions(inputs, start_index)              # (T,)
    embeddings = tf.cast(self._embed(positions), inputs.dtype)    # (T, D)
    return inputs + embeddings[None]                              # (B, T, D)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    config = super().get_config()
    config["embeddings_initializer"] = keras.initializers.serialize(self.embeddings_initializer)
    return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PositionEmbedding(_PositionEmbeddingBase):
  """Adds a learned 1-D position embedding to a sequence.

  The plain learned table of GPT-style models; the Sparse Transformer's
  baseline embedding (Child et al. 2019, https://arxiv.org/abs/1904.10509).

  Args:
    sequence_length: the number of positions the table holds (> 0).
    embeddings_initializer: initializer of the table; default
      `RandomNormal(stddev=0.02)`.
    **kwargs: standard layer arguments (`name`, `dtype`, ...).

  Call arguments:
    inputs: `[batch, T, d_model]`; d_model is read from the last dimension
      when the layer is built.
    start_index: absolute position of `inputs[:, 0]`, a Python int or a scalar
      int tensor (default 0); with a cache, the number of tokens seen so far.

  Returns:
    `inputs + table[start_index + arange(T)]`, shape `[batch, T, d_model]`, in
    the layer's compute dtype.

  Example:

  >>> layer = PositionEmbedding(sequence_length=16)
  >>> x = np.zeros((2, 10, 8), "float32")
  >>> tuple(layer(x).shape)
  (2, 10, 8)
  >>> tuple(layer(x[:, :1], start_index=10).shape)  # the 11th token alone
  (2, 1, 8)
  """

  def __init__(self, sequence_length, embeddings_initializer=None, **kwargs):
    super().__init__(embeddings_initializer=embeddings_initializer, **kwargs)
    self.sequence_length = _check_positive_int("sequence_length", sequence_length)

  @property
  def _capacity(self):
    return self.sequence_length

  def _capacity_name(self):
    return "sequence_length"

  def _build_tables(self, d_model):
    self.embeddings = self._add_table("embeddings", self.sequence_length, d_model)

  def _embed(self, positions):
    return tf.gather(self.embeddings, positions)                  # (T, D)

  def get_config(self):
    config = super().get_config()
    config["sequence_length"] = self.sequence_length
    return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ImagePositionEmbedding(_PositionEmbeddingBase):
  """Adds the factorized row + column + channel embedding of an image.

  The Sparse Transformer's image embedding (Child et al. 2019, Section 5.2,
  https://arxiv.org/abs/1904.10509): an image of `height x width x channels`
  values is a sequence in raster order with channels innermost, and position
  p gets `row_table[p // (width * channels)] + column_table[(p // channels) %
  width] + channel_table[p % channels]`.

  Args:
    height: rows of the image (> 0).
    width: columns of the image (> 0).
    channels: values per pixel, e.g. 3 for RGB (> 0).
    embeddings_initializer: initializer of the three tables; default
      `RandomNormal(stddev=0.02)`.
    **kwargs: standard layer arguments (`name`, `dtype`, ...).

  Call arguments:
    inputs: `[batch, T, d_model]` with `start_index + T <= height * width *
      channels`.
    start_index: absolute position of `inputs[:, 0]`, a Python int or a scalar
      int tensor (default 0).

  Returns:
    `inputs` plus the embedding of each position, shape `[batch, T, d_model]`,
    in the layer's compute dtype.

  Example:

  >>> layer = ImagePositionEmbedding(height=4, width=4, channels=3)
  >>> x = np.zeros((2, 48, 8), "float32")
  >>> tuple(layer(x).shape)
  (2, 48, 8)
  >>> [tuple(w.shape) for w in layer.get_weights()]
  [(4, 8), (4, 8), (3, 8)]
  """

  def __init__(self, height, width, channels, embeddings_initializer=None, **kwargs):
    super().__init__(embeddings_initializer=embeddings_initializer, **kwargs)
    self.height = _check_positive_int("height", height)
    self.width = _check_positive_int("width", width)
    self.channels = _check_positive_int("channels", channels)

  @property
  def _capacity(self):
    return self.height * self.width * self.channels

  def _capacity_name(self):
    return "height * width * channels"

  def _build_tables(self, d_model):
    self.row_embeddings = self._add_table("row_embeddings", self.height, d_model)
    self.column_embeddings = self._add_table("column_embeddings", self.width, d_model)
    self.channel_embeddings = self._add_table("channel_embeddings", self.channels, d_model)

  def _embed(self, positions):
    rows = positions // (self.width * self.channels)              # (T,)
    columns = (positions // self.channels) % self.width           # (T,)
    channels = positions % self.channels                          # (T,)
    return (tf.gather(self.row_embeddings, rows)                  # (T, D)
            + tf.gather(self.column_embeddings, columns)
            + tf.gather(self.channel_embeddings, channels))

  def get_config(self):
    config = super().get_config()
    config.update(height=self.height, width=self.width, channels=self.channels)
    return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StridedPositionEmbedding(_PositionEmbeddingBase):
  """Adds a row + column embedding of a sequence laid out with a stride.

  The Sparse Transformer's text and audio embedding (Child et al. 2019,
  Section 5.2, https://arxiv.org/abs/1904.10509): the sequence is written
  into the rows of a matrix `stride` wide, and position p gets
  `row_table[p // stride] + column_table[p % stride]`. Match the stride of
  the attention pattern so that each head's attended positions share a row or
  a column embedding.

  Args:
    sequence_length: the number of positions the layer holds (> 0).
    stride: width of the matrix (> 0); the row table has
      `ceil(sequence_length / stride)` rows.
    embeddings_initializer: initializer of both tables; default
      `RandomNormal(stddev=0.02)`.
    **kwargs: standard layer arguments (`name`, `dtype`, ...).

  Call arguments:
    inputs: `[batch, T, d_model]` with `start_index + T <= sequence_length`.
    start_index: absolute position of `inputs[:, 0]`, a Python int or a scalar
      int tensor (default 0).

  Returns:
    `inputs` plus the embedding of each position, shape `[batch, T, d_model]`,
    in the layer's compute dtype.

  Example:

  >>> layer = StridedPositionEmbedding(sequence_length=10, stride=4)
  >>> x = np.zeros((2, 10, 8), "float32")
  >>> tuple(layer(x).shape)
  (2, 10, 8)
  >>> [tuple(w.shape) for w in layer.get_weights()]
  [(3, 8), (4, 8)]
  """

  def __init__(self, sequence_length, stride, embeddings_initializer=None, **kwargs):
    super().__init__(embeddings_initializer=embeddings_initializer, **kwargs)
    self.sequence_length = _check_positive_int("sequence_length", sequence_length)
    self.stride = _check_positive_int("stride", stride)

  @property
  def _capacity(self):
    return self.sequence_length

  def _capacity_name(self):
    return "sequence_length"

  def _build_tables(self, d_model):
    rows = math.ceil(self.sequence_length / self.stride)
    self.row_embeddings = self._add_table("row_embeddings", rows, d_model)
    self.column_embeddings = self._add_table("column_embeddings", self.stride, d_model)

  def _embed(self, positions):
    rows = positions // self.stride                               # (T,)
    columns = positions % self.stride                             # (T,)
    return (tf.gather(self.row_embeddings, rows)                  # (T, D)
            + tf.gather(self.column_embeddings, columns))

  def get_config(self):
    config = super().get_config()
    config.update(sequence_length=self.sequence_length, stride=self.stride)
    return config
