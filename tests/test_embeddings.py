"""Position-embedding layers against NumPy written from the paper's formulas."""

import doctest
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from sparse_attention_tf.layers import embeddings as emb
from sparse_attention_tf.layers.embeddings import (ImagePositionEmbedding, PositionEmbedding,
                                                   StridedPositionEmbedding)

D = 6
# (factory, capacity): capacities small, shapes that do not divide evenly.
LAYERS = {
    "plain": (lambda **kw: PositionEmbedding(sequence_length=20, **kw), 20),
    "image": (lambda **kw: ImagePositionEmbedding(height=3, width=4, channels=2, **kw), 24),
    "strided": (lambda **kw: StridedPositionEmbedding(sequence_length=22, stride=5, **kw), 22),
}
KINDS = list(LAYERS)


def np_reference(layer, x, start=0):
  """inputs + embedding, from the formulas alone, in float64."""
  w = [np.asarray(t, np.float64) for t in layer.get_weights()]
  p = start + np.arange(x.shape[1])
  if isinstance(layer, ImagePositionEmbedding):
    h, wd, c = layer.height, layer.width, layer.channels
    assert [t.shape[0] for t in w] == [h, wd, c]
    e = w[0][p // (wd * c)] + w[1][(p // c) % wd] + w[2][p % c]
  elif isinstance(layer, StridedPositionEmbedding):
    s = layer.stride
    assert [t.shape[0] for t in w] == [math.ceil(layer.sequence_length / s), s]
    e = w[0][p // s] + w[1][p % s]
  else:
    assert [t.shape[0] for t in w] == [layer.sequence_length]
    e = w[0][p]
  return np.asarray(x, np.float64) + e[None]


def make(kind, rng, batch=2, length=None, **kw):
  factory, cap = LAYERS[kind]
  layer = factory(**kw)
  x = rng.standard_normal((batch, length or cap, D)).astype("float32")
  layer.build(x.shape)
  # Random tables (not the 0.02 init), so that a wrong index changes the output clearly.
  layer.set_weights([rng.standard_normal(w.shape).astype("float32") for w in layer.get_weights()])
  return layer, x, cap


@pytest.mark.parametrize("kind", KINDS)
def test_output_shape_and_dtype(kind, rng):
  layer, x, cap = make(kind, rng, batch=3, length=7)
  out = layer(x)
  assert tuple(out.shape) == (3, 7, D) and out.dtype == tf.float32
  assert layer.compute_output_shape((3, 7, D)) == (3, 7, D)


@pytest.mark.parametrize("kind", KINDS)
def test_values_match_formula(kind, rng):
  layer, x, cap = make(kind, rng)
  np.testing.assert_allclose(layer(x).numpy(), np_reference(layer, x), rtol=1e-6, atol=1e-5)
  start = int(rng.integers(1, cap - 3))
  part = x[:, :cap - start]
  for s in (start, tf.constant(start), tf.constant(start, tf.int64)):
    np.testing.assert_allclose(layer(part, start_index=s).numpy(),
                               np_reference(layer, part, start), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_two_halves_equal_whole(kind, rng):
  layer, x, cap = make(kind, rng)
  split = int(rng.integers(1, cap))
  halves = tf.concat([layer(x[:, :split]), layer(x[:, split:], start_index=split)], axis=1)
  np.testing.assert_array_equal(halves.numpy(), layer(x).numpy())
  # One token at a time, as in cached generation.
  steps = tf.concat([layer(x[:, t:t + 1], start_index=t) for t in range(cap)], axis=1)
  np.testing.assert_array_equal(steps.numpy(), layer(x).numpy())


@pytest.mark.parametrize("kind", KINDS)
def test_tf_function_with_dynamic_length_and_start(kind, rng):
  layer, x, cap = make(kind, rng)
  fn = tf.function(lambda x, s: layer(x, start_index=s), input_signature=[
      tf.TensorSpec([None, None, D]), tf.TensorSpec([], tf.int32)])
  start = int(rng.integers(0, cap - 2))
  part = x[:, :cap - start - 1]
  np.testing.assert_allclose(fn(part, start).numpy(), np_reference(layer, part, start),
                             rtol=1e-6, atol=1e-5)
  with pytest.raises(tf.errors.InvalidArgumentError, match="start_index"):
    fn(part, start + 2)
  with pytest.raises(tf.errors.InvalidArgumentError, match="start_index"):
    fn(part, -1)


@pytest.mark.parametrize("kind", KINDS)
def test_too_long_raises(kind, rng):
  layer, x, cap = make(kind, rng)
  with pytest.raises(ValueError, match="sequence length"):
    layer(np.zeros((1, cap + 1, D), "float32"))
  with pytest.raises(ValueError, match="sequence length"):
    layer(x[:, :2], start_index=cap - 1)
  with pytest.raises(ValueError, match="start_index"):
    layer(x[:, :2], start_index=-1)
  layer(x[:, :1], start_index=cap - 1)  # the last position is fine


@pytest.mark.parametrize("cls,kwargs,bad", [
    (PositionEmbedding, dict(sequence_length=4), "sequence_length"),
    (ImagePositionEmbedding, dict(height=2, width=2, channels=3), "height"),
    (ImagePositionEmbedding, dict(height=2, width=2, channels=3), "width"),
    (ImagePositionEmbedding, dict(height=2, width=2, channels=3), "channels"),
    (StridedPositionEmbedding, dict(sequence_length=8, stride=2), "sequence_length"),
    (StridedPositionEmbedding, dict(sequence_length=8, stride=2), "stride"),
])
@pytest.mark.parametrize("value", [0, -3, 2.5, None, True])
def test_bad_sizes_raise(cls, kwargs, bad, value):
  with pytest.raises(ValueError, match=bad):
    cls(**{**kwargs, bad: value})


def test_unknown_d_model_or_wrong_rank_raises():
  with pytest.raises(ValueError, match="d_model"):
    PositionEmbedding(4).build((None, 4, None))
  with pytest.raises(ValueError, match="batch, sequence_length, d_model"):
    PositionEmbedding(4).build((2, 4))


@pytest.mark.parametrize("kind", KINDS)
def test_config_round_trip(kind):
  init = keras.initializers.TruncatedNormal(stddev=0.3, seed=7)
  layer = LAYERS[kind][0](embeddings_initializer=init, name=f"pe_{kind}")
  config = layer.get_config()
  assert config["embeddings_initializer"] == keras.initializers.serialize(init)
  clone = type(layer).from_config(config)
  assert json.dumps(clone.get_config(), sort_keys=True) == json.dumps(config, sort_keys=True)
  # Every constructor argument is in the config.
  for arg in ("sequence_length", "height", "width", "channels", "stride"):
    assert (arg in config) == hasattr(layer, arg)
  # Same seeded initializer, same tables.
  layer.build((1, 2, D))
  clone.build((1, 2, D))
  for a, b in zip(layer.get_weights(), clone.get_weights()):
    np.testing.assert_array_equal(a, b)


def test_default_initializer_is_normal_002():
  layer = PositionEmbedding(sequence_length=400)
  layer.build((1, 400, 50))
  w = layer.get_weights()[0]
  assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002


def test_save_and_load_in_functional_model(tmp_path, rng):
  inputs = keras.Input((12, D))
  h = PositionEmbedding(16, name="pe")(inputs)
  h = ImagePositionEmbedding(2, 3, 2, name="image")(h)
  h = StridedPositionEmbedding(13, 4, name="strided")(h)
  model = keras.Model(inputs, keras.layers.Dense(3)(h))
  model.set_weights([rng.standard_normal(w.shape).astype("float32")
                     for w in model.get_weights()])
  x = rng.standard_normal((2, 12, D)).astype("float32")
  path = str(tmp_path / "model.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
  for name in ("pe", "image", "strided"):
    assert type(loaded.get_layer(name)) is type(model.get_layer(name))
    assert loaded.get_layer(name).get_config() == model.get_layer(name).get_config()


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_float16(kind, rng):
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    layer, x, cap = make(kind, rng, length=5)
    out = layer(x, start_index=2)
    assert out.dtype == tf.float16 == layer.compute_dtype
    assert all(v.dtype == "float32" for v in layer.weights)
    np.testing.assert_allclose(out.numpy(), np_reference(layer, x, 2), rtol=2e-2, atol=2e-2)
  finally:
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_reaches_used_rows_only(kind, rng):
  layer, _, cap = make(kind, rng)
  start, length = 3, 4  # positions 3..6: some rows of every table stay unused
  x = tf.constant(rng.standard_normal((2, length, D)), tf.float32)
  g_out = rng.standard_normal((2, length, D))
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(layer(x, start_index=start) * g_out)
  grads = [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, layer.trainable_weights)]
  # d loss / d table[r] = sum over batch and the positions that read row r.
  p = start + np.arange(length)
  if kind == "image":
    index_sets = [p // (4 * 2), (p // 2) % 4, p % 2]
  elif kind == "strided":
    index_sets = [p // 5, p % 5]
  else:
    index_sets = [p]
  assert len(grads) == len(index_sets)
  for g, idx in zip(grads, index_sets):
    expect = np.zeros(g.shape)
    np.add.at(expect, idx, g_out.sum(0))
    np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-5)
    used = np.unique(idx)
    assert np.all(np.abs(g[used]).sum(-1) > 0)
    assert not np.any(np.delete(g, used, axis=0))


def test_docstring_examples_run():
  result = doctest.testmod(emb, extraglobs={"np": np}, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 6 and result.failed == 0


@pytest.mark.parametrize("kind", KINDS)
def test_embeddings_cast_to_input_dtype_without_autocast(kind, rng):
  # autocast=False: float32 tables meet float16 inputs; the layer casts the embedding.
  layer = LAYERS[kind][0](autocast=False)
  x = rng.standard_normal((2, 5, D)).astype("float16")
  out = layer(x, start_index=1)
  assert out.dtype == tf.float16 and all(v.dtype == "float32" for v in layer.weights)
  np.testing.assert_allclose(out.numpy(), np_reference(layer, x, 1), rtol=1e-2, atol=1e-2)
