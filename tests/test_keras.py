"""Keras layers and model: SparseMultiHeadAttention, SparseTransformerBlock, SparseTransformer.

Checked against the dense implementation, against float64 NumPy written from
the definitions (tests/npref.py), and against the model's own uncached path.
Models are tiny (seq_len 64, d_model 32, 2 layers, block_size 16).
"""

import doctest
import importlib
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import sparse_attention_tf as sat
from sparse_attention_tf import patterns as P
from sparse_attention_tf.layers import (SparseMultiHeadAttention, SparseTransformerBlock,
                                        stateless_dropout)
from sparse_attention_tf.layers.attention import padded_length
from sparse_attention_tf.metrics import BitsPerToken
from sparse_attention_tf.models import SparseTransformer, layer_patterns
from tests import npref

N = 64          # sequence length
D = 32          # model width
HEADS = 4
KEY_DIM = 8
BLOCK = 16
VOCAB = 12



def _custom_layout():
  lay = np.tril(np.ones((2, 4, 4), bool))
  lay[1, 3, 1] = False
  return lay


# Patterns for the layer checks, all valid for N=64, block 16, 4 heads.
LAYER_PATTERNS = {
    "fixed": lambda rng: P.Fixed(32, 8),
    "fixed_groups": lambda rng: P.Fixed(32, 8, heads=4, head_groups=2),
    "strided_split": lambda rng: P.Strided(16, heads=4, mode="split"),
    "local": lambda rng: P.Local(20),
    "bigbird": lambda rng: P.BigBird(block=16, window=3, num_global=1, num_random=1,
                                     seed=int(rng.integers(1000))),
    "split": lambda rng: P.Split([P.Local(8), P.Fixed(16, 4)], heads=4),
}

# One instance of every pattern class (and every mode) for the config round trips.
ALL_PATTERNS = {
    "dense": P.Dense(),
    "dense_noncausal": P.Dense(causal=False),
    "local": P.Local(20),
    "local_noncausal": P.Local(7, causal=False),
    "strided_merged": P.Strided(16),
    "strided_split": P.Strided(16, heads=4, mode="split"),
    "strided_row": P.Strided(16, mode="row"),
    "strided_column": P.Strided(16, mode="column", causal=False),
    "fixed": P.Fixed(32, 8),
    "fixed_groups": P.Fixed(32, 4, heads=4, head_groups=2),
    "fixed_window": P.Fixed(32, 8, mode="window"),
    "fixed_summary": P.Fixed(32, 8, head_groups=2, mode="summary"),
    "longformer": P.Longformer(8, global_tokens=(0, 17)),
    "bigbird": P.BigBird(block=16, window=3, num_global=1, num_random=1, seed=5, heads=2),
    "custom": P.Custom(_custom_layout()),
    "split": P.Split([P.Local(8), P.Strided(16, mode="column")], heads=4),
    "split_nested": P.Split([P.Fixed(16, 4, heads=2, head_groups=2), P.Dense()], heads=4),
}


def _randomize(layer_or_model, rng, scale=0.5):
  """Random weights everywhere (biases included), so every weight shows in the output."""
  layer_or_model.set_weights([(scale * rng.standard_normal(w.shape)).astype(w.dtype)
                              for w in layer_or_model.get_weights()])


def _attention_layer(pattern, rng, implementation="custom_op", seq=N, **kw):
  layer = SparseMultiHeadAttention(HEADS, KEY_DIM, pattern, block_size=BLOCK,
                                   implementation=implementation, **kw)
  layer.build((2, seq, D))
  _randomize(layer, rng)
  return layer


def _padding(rng, batch=3, seq=N):
  """Key padding: a prefix length, a random scatter, and one all-padded sequence."""
  kp = np.ones((batch, seq), bool)
  kp[0, int(rng.integers(seq // 4, seq)):] = False
  kp[1] = rng.random(seq) < 0.6
  kp[2:] = False
  return kp


def _np_layer(layer, query, value, key_padding_mask, mask=None):
  """The layer's forward pass in float64 NumPy: projections, masked attention, projection.

  `mask` defaults to `layer.pattern.mask(seq)`.
  """
  w = lambda v: np.asarray(v, np.float64)
  q = np.einsum("btc,chk->bthk", w(query), w(layer.query_dense.kernel)) + w(layer.query_dense.bias)
  k = np.einsum("btc,chk->bthk", w(value), w(layer.key_dense.kernel)) + w(layer.key_dense.bias)
  v = np.einsum("btc,chk->bthk", w(value), w(layer.value_dense.kernel)) + w(layer.value_dense.bias)
  mask = layer.pattern.mask(query.shape[1]) if mask is None else mask
  out = npref.attention(q, k, v, mask, 1.0 / math.sqrt(layer.key_dim), key_padding_mask)
  return (np.einsum("bthv,hvd->btd", out, w(layer.output_dense.kernel))
          + w(layer.output_dense.bias))


# --- 1. SparseMultiHeadAttention against dense and NumPy --------------------------------------

@pytest.mark.parametrize("implementation", ["custom_op", "reference"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("name", list(LAYER_PATTERNS))
def test_attention_layer_matches_dense_and_numpy(name, padded, implementation, rng, ops):
  pattern = LAYER_PATTERNS[name](rng)
  layer = _attention_layer(pattern, rng, implementation=implementation)
  dense = SparseMultiHeadAttention(HEADS, KEY_DIM, pattern, block_size=BLOCK,
                                   implementation="dense")
  dense.build((2, N, D))
  dense.set_weights(layer.get_weights())
  x = rng.standard_normal((3, N, D)).astype("float32")
  kp = _padding(rng) if padded else None

  out = layer(x, key_padding_mask=kp).numpy()
  ref = dense(x, key_padding_mask=kp).numpy()
  assert out.shape == (3, N, D) and out.dtype == np.float32
  assert npref.rel_err(out, ref) < 1e-5, npref.rel_err(out, ref)

  expected = _np_layer(layer, x, x, kp)
  assert npref.rel_err(out, expected) < 1e-5, npref.rel_err(out, expected)
  if padded:
    # Every query of the all-padded sequence sees no key: the output is the output bias.
    np.testing.assert_allclose(out[2], np.broadcast_to(layer.output_dense.bias, (N, D)),
                               atol=1e-6)


@pytest.mark.parametrize("name", ["fixed", "strided_split", "bigbird"])
def test_attention_layer_gradients_match_dense(name, rng, ops):
  pattern = LAYER_PATTERNS[name](rng)
  layer = _attention_layer(pattern, rng, implementation="custom_op")
  dense = _attention_layer(pattern, rng, implementation="dense")
  dense.set_weights(layer.get_weights())
  x = tf.constant(rng.standard_normal((3, N, D)).astype("float32"))
  dout = tf.constant(rng.standard_normal((3, N, D)).astype("float32"))
  kp = _padding(rng)
  grads = []
  for lay in (layer, dense):
    with tf.GradientTape() as tape:
      tape.watch(x)
      loss = tf.reduce_sum(lay(x, key_padding_mask=kp) * dout)
    grads.append(tape.gradient(loss, [x] + lay.trainable_variables))
  names = ["input"] + [v.path for v in layer.trainable_variables]
  assert len(names) == 9 and names[4].endswith("key/bias")
  for name, a, b in zip(names, *grads):
    if name.endswith("key/bias"):     # softmax is shift invariant: zero up to round-off
      assert np.abs(a).max() < 1e-3 and np.abs(b).max() < 1e-3
    else:
      assert npref.rel_err(a, b) < 1e-5, (name, npref.rel_err(a, b))


def test_attention_layer_cross_attention_numpy(rng, ops):
  """query, key and value from different tensors; value_dim != key_dim."""
  layer = SparseMultiHeadAttention(HEADS, KEY_DIM, P.Fixed(32, 8), block_size=BLOCK,
                                   value_dim=12, implementation="custom_op")
  q, kv = (rng.standard_normal((2, N, D)).astype("float32") for _ in range(2))
  layer(q, kv)
  _randomize(layer, rng)
  assert layer.value_dense.kernel.shape == (D, HEADS, 12)
  kp = _padding(rng, batch=2)
  out = layer(q, kv, key_padding_mask=kp).numpy()
  assert npref.rel_err(out, _np_layer(layer, q, kv, kp)) < 1e-5


def test_attention_layer_without_bias(rng, ops):
  layer = SparseMultiHeadAttention(HEADS, KEY_DIM, P.Local(16), block_size=BLOCK,
                                   use_bias=False)
  x = rng.standard_normal((2, N, D)).astype("float32")
  layer(x)
  assert len(layer.get_weights()) == 4
  assert layer.query_dense.bias is None and layer.output_dense.bias is None


# --- 2. Keras masks --------------------------------------------------------------------------

def test_attention_uses_keras_mask_from_embedding(rng, ops):
  tokens = rng.integers(0, 4, (3, N)).astype("int32")     # zeros are padding, anywhere
  tokens[:, 0] = 1
  tokens[2, N // 2:] = 0
  inputs = keras.Input((N,), dtype="int32")
  embedding = keras.layers.Embedding(VOCAB, D, mask_zero=True)
  attention = SparseMultiHeadAttention(HEADS, KEY_DIM, P.Fixed(32, 8), block_size=BLOCK)
  model = keras.Model(inputs, attention(embedding(inputs)))
  _randomize(model, rng)

  explicit = attention(embedding(tokens), key_padding_mask=tokens != 0).numpy()
  unmasked = attention(embedding(tokens),
                       key_padding_mask=np.ones_like(tokens, bool)).numpy()
  assert np.abs(explicit - unmasked).max() > 1e-3          # the mask matters for these inputs
  np.testing.assert_allclose(model(tokens).numpy(), explicit, atol=1e-6)
  # Eagerly too: the embedding output carries its mask to the layer.
  np.testing.assert_allclose(attention(embedding(tokens)).numpy(), explicit, atol=1e-6)


def test_cross_attention_uses_the_mask_of_value(rng, ops):
  tokens = rng.integers(0, 3, (2, N)).astype("int32")
  q_in = keras.Input((N, D))
  t_in = keras.Input((N,), dtype="int32")
  embedding = keras.layers.Embedding(VOCAB, D, mask_zero=True)
  attention = SparseMultiHeadAttention(HEADS, KEY_DIM, P.Dense(causal=False), block_size=BLOCK)
  model = keras.Model([q_in, t_in], attention(q_in, embedding(t_in)))
  _randomize(model, rng)
  q = rng.standard_normal((2, N, D)).astype("float32")
  explicit = attention(q, embedding(tokens), key_padding_mask=tokens != 0).numpy()
  np.testing.assert_allclose(model([q, tokens]).numpy(), explicit, atol=1e-6)


def test_block_uses_keras_mask(rng, ops):
  tokens = rng.integers(0, 4, (2, N)).astype("int32")
  tokens[:, 0] = 1
  inputs = keras.Input((N,), dtype="int32")
  embedding = keras.layers.Embedding(VOCAB, D, mask_zero=True)
  block = SparseTransformerBlock(HEADS, P.Fixed(16, 4), num_layers=2, block_size=BLOCK)
  model = keras.Model(inputs, block(embedding(inputs)))
  _randomize(model, rng)
  e = embedding(tokens)
  explicit = block(e, key_padding_mask=tokens != 0).numpy()
  unmasked = block(e, key_padding_mask=np.ones_like(tokens, bool)).numpy()
  assert np.abs(explicit - unmasked).max() > 1e-3
  np.testing.assert_allclose(model(tokens).numpy(), explicit, atol=1e-5)


# --- 2a. Any sequence length: the layers pad inside ------------------------------------------

# (pattern, seq, padded length): lengths that are not a multiple of the block size, causal and
# not; Strided split also needs a multiple of its stride, BigBird of its block, Custom of its
# layout width, and BigBird's and Custom's masks depend on the padded length itself.
PAD_CASES = {
    "fixed": (lambda rng: P.Fixed(16, 4), 50, 64),
    "strided_split": (lambda rng: P.Strided(24, heads=4, mode="split"), 50, 96),
    "dense_noncausal": (lambda rng: P.Dense(causal=False), 33, 48),
    "longformer": (lambda rng: P.Longformer(6, global_tokens=(0, 37)), 45, 48),
    "bigbird": (lambda rng: P.BigBird(block=16, window=3, num_global=1, num_random=1,
                                      seed=int(rng.integers(1000))), 40, 48),
    "custom": (lambda rng: P.Custom(np.tril(np.ones((1, 7, 7), bool))), 50, 112),
}


def _pad_case(name, rng):
  make, seq, padded = PAD_CASES[name]
  pattern = make(rng)
  assert seq % BLOCK and padded_length(pattern, seq, BLOCK) == padded
  return pattern, seq, padded


def _real_padding(rng, batch, seq):
  """A user key padding on the real positions (one prefix, one scatter)."""
  kp = np.ones((batch, seq), bool)
  kp[0, int(rng.integers(seq // 2, seq)):] = False
  kp[1] = rng.random(seq) < 0.7
  return kp


@pytest.mark.parametrize("user_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("name", list(PAD_CASES))
def test_attention_layer_pads_lengths_the_plan_refuses(name, user_mask, rng, ops):
  """Output at the real positions = attention under pattern.mask(padded)[:, :N, :N] (float64)."""
  pattern, seq, padded = _pad_case(name, rng)
  layer = _attention_layer(pattern, rng, seq=seq)
  assert layer.padded_length(seq) == padded and layer.padded_length(padded) == padded
  x = rng.standard_normal((2, seq, D)).astype("float32")
  kp = _real_padding(rng, 2, seq) if user_mask else None
  out = layer(x, key_padding_mask=kp).numpy()
  assert out.shape == (2, seq, D)
  expected = _np_layer(layer, x, x, kp, mask=pattern.mask(padded)[:, :seq, :seq])
  assert npref.rel_err(out, expected) < 1e-5, npref.rel_err(out, expected)


@pytest.mark.parametrize("user_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("name", ["fixed", "strided_split", "longformer", "bigbird"])
def test_padded_attend_gradients_match_float64(name, user_mask, rng, ops):
  """attend() on projected heads of a padded length: forward and dq, dk, dv against NumPy."""
  pattern, seq, padded = _pad_case(name, rng)
  layer = _attention_layer(pattern, rng, seq=seq)
  q, k, v = (tf.constant(rng.standard_normal((2, seq, HEADS, KEY_DIM)), tf.float32)
             for _ in range(3))
  kp = _real_padding(rng, 2, seq) if user_mask else None
  dout = rng.standard_normal((2, seq, HEADS, KEY_DIM))
  with tf.GradientTape() as tape:
    tape.watch([q, k, v])
    out = layer.attend(q, k, v, kp)
    loss = tf.reduce_sum(out * dout)
  grads = tape.gradient(loss, [q, k, v])
  ref, ref_grads = npref.attention(q, k, v, pattern.mask(padded)[:, :seq, :seq],
                                   1.0 / math.sqrt(KEY_DIM), kp, dout)
  assert out.shape == (2, seq, HEADS, KEY_DIM)
  assert npref.rel_err(out, ref) < 1e-5
  for letter, g, r in zip("qkv", grads, ref_grads):
    assert npref.rel_err(g, r) < 1e-5, (letter, npref.rel_err(g, r))


def test_padded_attention_in_tf_function_and_with_reference(rng, ops):
  pattern, seq, padded = _pad_case("strided_split", rng)
  layer = _attention_layer(pattern, rng, seq=seq)
  reference = _attention_layer(pattern, rng, implementation="reference", seq=seq)
  reference.set_weights(layer.get_weights())
  x = tf.constant(rng.standard_normal((2, seq, D)).astype("float32"))
  kp = tf.constant(_real_padding(rng, 2, seq))
  expected = _np_layer(layer, x, x, kp.numpy(), mask=pattern.mask(padded)[:, :seq, :seq])

  @tf.function(input_signature=[tf.TensorSpec([None, seq, D]), tf.TensorSpec([None, seq], tf.bool)])
  def run(x, kp):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x, key_padding_mask=kp)
      loss = tf.reduce_sum(y * y)
    return y, tape.gradient(loss, x)

  out, dx = run(x, kp)
  assert npref.rel_err(out, expected) < 1e-5
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = reference(x, key_padding_mask=kp)
    loss = tf.reduce_sum(y * y)
  assert npref.rel_err(y, expected) < 1e-5
  dx_reference = tape.gradient(loss, x)
  assert dx is not None and np.abs(dx).max() > 0
  assert npref.rel_err(dx, dx_reference) < 1e-5


def test_padding_keeps_the_keras_mask(rng, ops):
  """A Keras mask from Embedding(mask_zero=True) on a padded length: the same as passing it."""
  seq = 50
  tokens = rng.integers(0, 4, (2, seq)).astype("int32")
  tokens[:, 0] = 1
  inputs = keras.Input((seq,), dtype="int32")
  embedding = keras.layers.Embedding(VOCAB, D, mask_zero=True)
  attention = SparseMultiHeadAttention(HEADS, KEY_DIM, P.Dense(causal=False), block_size=BLOCK)
  model = keras.Model(inputs, attention(embedding(inputs)))
  _randomize(model, rng)
  explicit = attention(embedding(tokens), key_padding_mask=tokens != 0).numpy()
  unmasked = attention(embedding(tokens), key_padding_mask=np.ones_like(tokens, bool)).numpy()
  assert np.abs(explicit - unmasked).max() > 1e-3
  np.testing.assert_allclose(model(tokens).numpy(), explicit, atol=1e-6)
  np.testing.assert_allclose(attention(embedding(tokens)).numpy(), explicit, atol=1e-6)


# Block outputs with randomized weights reach |x| ~ 20; graph and eager runs (and the padded
# and unpadded lengths) sum in another order: float32 rounding is ~1e-5 there, a padding
# error is O(1).
BLOCK_TOL = dict(rtol=1e-5, atol=1e-4)


def test_block_pads_lengths_the_plan_refuses(rng, ops):
  """Causal: a block on the first 50 positions equals the block on 64, sliced (any suffix).
  Not causal: the block on 50 equals the block on 50 zero-padded to 64 with the tail masked."""
  x = rng.standard_normal((2, N, D)).astype("float32")
  causal = SparseTransformerBlock(HEADS, P.Fixed(16, 4), num_layers=2, block_size=BLOCK)
  causal.build(x.shape)
  _randomize(causal, rng)
  np.testing.assert_allclose(causal(x[:, :50]).numpy(), causal(x).numpy()[:, :50], **BLOCK_TOL)
  step = tf.function(lambda x: causal(x))
  np.testing.assert_allclose(step(x[:, :50]).numpy(), causal(x).numpy()[:, :50], **BLOCK_TOL)

  both = SparseTransformerBlock(HEADS, P.Longformer(6, global_tokens=(0,)), num_layers=2,
                                block_size=BLOCK)
  both.build(x.shape)
  _randomize(both, rng)
  kp = _real_padding(rng, 2, 50)
  padded_x = np.concatenate([x[:, :50], np.zeros((2, N - 50, D), np.float32)], axis=1)
  padded_kp = np.concatenate([kp, np.zeros((2, N - 50), bool)], axis=1)
  np.testing.assert_allclose(both(x[:, :50], key_padding_mask=kp).numpy(),
                             both(padded_x, key_padding_mask=padded_kp).numpy()[:, :50],
                             **BLOCK_TOL)


def test_functional_model_with_padded_layers_saves_and_loads(rng, tmp_path, ops):
  seq = 50
  inputs = keras.Input((seq, D))
  h = SparseTransformerBlock(HEADS, P.Strided(24, heads=4, mode="split"), num_layers=2,
                             block_size=BLOCK, name="block")(inputs)
  h = SparseMultiHeadAttention(HEADS, KEY_DIM, P.Local(9, causal=False), block_size=BLOCK,
                               name="attention")(h)
  model = keras.Model(inputs, keras.layers.Dense(3)(h))
  _randomize(model, rng, scale=0.3)
  x = rng.standard_normal((2, seq, D)).astype("float32")
  expected = model(x).numpy()
  assert expected.shape == (2, seq, 3)
  model.save(tmp_path / "padded.keras")
  loaded = keras.models.load_model(tmp_path / "padded.keras")
  np.testing.assert_array_equal(loaded(x).numpy(), expected)
  assert _dumps(loaded.get_layer("block").get_config()) == _dumps(
      model.get_layer("block").get_config())
  assert npref.rel_err(loaded.predict(x, verbose=0), expected) < 1e-5    # traced: round-off


# --- 3. Config round trips --------------------------------------------------------------------

def _dumps(cfg):
  return json.dumps(cfg, sort_keys=True)


@pytest.mark.parametrize("name", list(ALL_PATTERNS))
def test_attention_config_round_trip(name):
  pattern = ALL_PATTERNS[name]
  layer = SparseMultiHeadAttention(HEADS, KEY_DIM, pattern, block_size=BLOCK, value_dim=6,
                                   dropout=0.25, use_bias=False, implementation="reference",
                                   kernel_initializer="he_normal",
                                   output_initializer=keras.initializers.RandomNormal(0.0, 0.1),
                                   bias_initializer="ones", name="attn")
  cfg = layer.get_config()
  json.dumps(cfg)                                       # JSON-friendly
  clone = SparseMultiHeadAttention.from_config(cfg)
  assert _dumps(clone.get_config()) == _dumps(cfg)
  assert clone.pattern == pattern and type(clone.pattern) is type(pattern)
  np.testing.assert_array_equal(clone.pattern.mask(N), pattern.mask(N))
  # Through JSON text as well (what a .keras file stores).
  again = SparseMultiHeadAttention.from_config(json.loads(json.dumps(cfg)))
  assert _dumps(again.get_config()) == _dumps(cfg)


@pytest.mark.parametrize("name", list(ALL_PATTERNS))
def test_block_config_round_trip(name):
  pattern = ALL_PATTERNS[name]
  block = SparseTransformerBlock(HEADS, pattern, num_layers=3, key_dim=5, ffn_multiplier=2,
                                 dropout=0.1, block_size=BLOCK, recompute=True,
                                 layer_norm_epsilon=1e-6, implementation="reference",
                                 name="blk")
  cfg = block.get_config()
  clone = SparseTransformerBlock.from_config(json.loads(json.dumps(cfg)))
  assert _dumps(clone.get_config()) == _dumps(cfg)
  assert clone.pattern == pattern


@pytest.mark.parametrize("name", list(ALL_PATTERNS))
def test_model_config_round_trip(name):
  pattern = ALL_PATTERNS[name]
  for head_mode in ("merged", "interleaved", "multihead"):
    if head_mode == "merged" and isinstance(pattern, P.Split):
      continue                                          # Split has no merged form
    if not pattern.causal:                              # an autoregressive model refuses it
      with pytest.raises(ValueError, match="causal"):
        SparseTransformer(vocab_size=VOCAB, seq_len=N, num_layers=2, d_model=D,
                          num_heads=HEADS, pattern=pattern, head_mode=head_mode,
                          block_size=BLOCK)
      continue
    model = SparseTransformer(vocab_size=VOCAB, seq_len=N, num_layers=2, d_model=D,
                              num_heads=HEADS, pattern=pattern, head_mode=head_mode,
                              dropout=0.1, recompute=True, block_size=BLOCK, ffn_multiplier=2,
                              implementation="reference", name="st")
    cfg = model.get_config()
    clone = SparseTransformer.from_config(json.loads(json.dumps(cfg)))
    assert _dumps(clone.get_config()) == _dumps(cfg), head_mode
    assert clone.layer_patterns == model.layer_patterns


def test_model_config_round_trip_embeddings():
  for kw in ({"embedding": "image", "image_shape": (4, 8, 2)},
             {"embedding": "strided", "embedding_stride": 8}):
    model = SparseTransformer(vocab_size=VOCAB, seq_len=N, num_layers=1, d_model=D,
                              num_heads=HEADS, pattern=P.Strided(16), block_size=BLOCK, **kw)
    cfg = model.get_config()
    clone = SparseTransformer.from_config(json.loads(json.dumps(cfg)))
    assert _dumps(clone.get_config()) == _dumps(cfg)


# --- 4. The residual block ----------------------------------------------------------------------

def test_block_residual_structure(rng, ops):
  block = SparseTransformerBlock(HEADS, P.Fixed(16, 4), num_layers=2, block_size=BLOCK)
  x = rng.standard_normal((2, N, D)).astype("float32")
  block.build(x.shape)
  _randomize(block, rng)
  out = block(x).numpy()

  a = block.attention(block.attention_norm(x))
  b = block.ffn_output(block.ffn_inner(block.ffn_norm(x + a)))
  np.testing.assert_allclose(out, (x + a + b).numpy(), atol=1e-5)
  # Dropout 0: training changes nothing.
  np.testing.assert_allclose(block(x, training=True).numpy(), out, atol=1e-6)
  # The FFN is W2 . gelu(W1 . z + b1) + b2 and the norms are layer norms (checked in NumPy).
  z = rng.standard_normal((2, 5, D))
  w1, b1 = (np.asarray(v, np.float64) for v in (block.ffn_inner.kernel, block.ffn_inner.bias))
  h = z @ w1 + b1
  gelu = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
  gelu_tanh = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
  got = block.ffn_inner(z.astype("float32")).numpy()
  assert min(np.abs(got - gelu).max(), np.abs(got - gelu_tanh).max()) < 1e-4
  g, beta = (np.asarray(v, np.float64) for v in (block.ffn_norm.gamma, block.ffn_norm.beta))
  ln = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5) * g + beta
  np.testing.assert_allclose(block.ffn_norm(z.astype("float32")).numpy(), ln, atol=1e-4)


def test_block_output_projection_init_scale():
  """Glorot-uniform of the projection as a matrix (fan_in: all heads' values), / sqrt(2L)."""
  width, heads = 256, 4
  std = {}
  for layers in (1, 8):
    keras.utils.set_random_seed(layers)
    block = SparseTransformerBlock(heads, P.Local(16), num_layers=layers, block_size=BLOCK)
    block.build((1, BLOCK, width))
    kernels = {"attention_output": block.attention.output_dense.kernel,   # (H, V, width)
               "ffn_output": block.ffn_output.kernel}                      # (4 width, width)
    fans = {"attention_output": (heads * (width // heads), width),
            "ffn_output": (4 * width, width)}
    std[layers] = {name: float(np.std(np.asarray(k))) for name, k in kernels.items()}
    for name, (fan_in, fan_out) in fans.items():
      glorot = math.sqrt(2.0 / (fan_in + fan_out))
      ratio = std[layers][name] / (glorot / math.sqrt(2 * layers))
      assert abs(ratio - 1) < 0.05, (name, layers, ratio)
    # The other kernels are not scaled: plain glorot-uniform.
    for kernel, (fan_in, fan_out) in ((block.ffn_inner.kernel, (width, 4 * width)),
                                      (block.attention.query_dense.kernel, (width, width))):
      ratio = np.std(np.asarray(kernel)) / math.sqrt(2.0 / (fan_in + fan_out))
      assert abs(ratio - 1) < 0.05, (kernel.path, ratio)
  for name in ("attention_output", "ffn_output"):
    ratio = std[1][name] / std[8][name]
    assert abs(ratio / math.sqrt(8) - 1) < 0.15, (name, ratio)


def test_stateless_dropout_is_a_function_of_the_seed(rng):
  x = tf.constant(rng.standard_normal((4, 64)).astype("float32") + 3.0)
  a = stateless_dropout(x, 0.5, tf.constant([1, 2]))
  b = stateless_dropout(x, 0.5, tf.constant([1, 2]))
  c = stateless_dropout(x, 0.5, tf.constant([1, 3]))
  np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert not np.array_equal(a.numpy(), c.numpy())
  kept = a.numpy() != 0
  assert 0.35 < kept.mean() < 0.65
  np.testing.assert_allclose(a.numpy()[kept], 2 * x.numpy()[kept], rtol=1e-6)
  assert stateless_dropout(x, 0.0, tf.constant([1, 2])) is x


# --- 5. Recomputation -------------------------------------------------------------------------

def _grads(block, x, dout, seed):
  tf.random.set_seed(seed)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = block(x, training=True)
    loss = tf.reduce_sum(y * dout)
  return y, tape.gradient(loss, [x] + block.trainable_variables)


def test_recompute_gives_the_same_gradients_with_dropout(rng, ops):
  x = tf.constant(rng.standard_normal((2, N, D)).astype("float32"))
  dout = tf.constant(rng.standard_normal((2, N, D)).astype("float32"))
  plain, recomputed = (
      SparseTransformerBlock(HEADS, P.Fixed(16, 4), num_layers=2, dropout=0.3,
                             block_size=BLOCK, recompute=r, seed=7)   # the same masks
      for r in (False, True))
  plain.build(x.shape)
  recomputed.build(x.shape)
  _randomize(plain, rng)
  recomputed.set_weights(plain.get_weights())

  calls = []
  attend = recomputed.attention.attend
  recomputed.attention.attend = lambda *a, **k: calls.append(1) or attend(*a, **k)

  y0, g0 = _grads(plain, x, dout, seed=11)
  y1, g1 = _grads(recomputed, x, dout, seed=11)
  assert len(calls) == 2, "recompute=True should run the attention branch again for backward"
  np.testing.assert_allclose(y1.numpy(), y0.numpy(), atol=1e-6)
  assert len(g0) == len(g1) == 1 + len(plain.trainable_variables) == 17
  for var, a, b in zip(["input"] + [v.path for v in plain.trainable_variables], g0, g1):
    assert a is not None and b is not None, var
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, err_msg=var)
  # Dropout was on: the same weights without dropout give a different output.
  tf.random.set_seed(11)
  assert np.abs(plain(x, training=False).numpy() - y0.numpy()).max() > 1e-3


def test_block_dropout_active_only_in_training(rng, ops):
  block = SparseTransformerBlock(HEADS, P.Local(16), num_layers=2, dropout=0.3,
                                 block_size=BLOCK, recompute=True)
  x = rng.standard_normal((2, N, D)).astype("float32")
  block.build(x.shape)
  _randomize(block, rng)
  t1, t2 = block(x, training=True).numpy(), block(x, training=True).numpy()
  assert np.abs(t1 - t2).max() > 1e-3
  e1, e2 = block(x, training=False).numpy(), block(x).numpy()
  np.testing.assert_array_equal(e1, e2)
  clean = SparseTransformerBlock(HEADS, P.Local(16), num_layers=2, block_size=BLOCK)
  clean.build(x.shape)
  clean.set_weights(block.get_weights())
  np.testing.assert_allclose(e1, clean(x).numpy(), atol=1e-6)


def test_attention_layer_dropout(rng, ops):
  layer = _attention_layer(P.Local(16), rng, dropout=0.5)
  x = rng.standard_normal((2, N, D)).astype("float32")
  np.testing.assert_array_equal(layer(x).numpy(), layer(x, training=False).numpy())
  assert np.abs(layer(x, training=True).numpy() - layer(x).numpy()).max() > 1e-3


# --- 6. Training the model ----------------------------------------------------------------------

def _model(pattern=None, **kw):
  args = dict(vocab_size=VOCAB, seq_len=N, num_layers=2, d_model=D, num_heads=HEADS,
              pattern=pattern or P.Fixed(16, 4), block_size=BLOCK)
  args.update(kw)
  return SparseTransformer(**args)


def _compile(model, lr=1e-2):
  model.compile(optimizer=keras.optimizers.Adam(lr),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=[BitsPerToken()])


def _periodic_data(rng, count, period=5):
  """Windows of a repeating sequence of distinct tokens: the next token is learnable."""
  base = rng.permutation(VOCAB)[:period]
  starts = rng.integers(0, period, count)
  seqs = np.stack([base[(s + np.arange(N + 1)) % period] for s in starts]).astype("int32")
  return seqs[:, :-1], seqs[:, 1:]


def test_fit_lowers_the_loss(rng, ops):
  x, y = _periodic_data(rng, 32)
  ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
  model = _model(dropout=0.05)
  _compile(model)

  # Zero-initialised logits: uniform predictions, loss ln(V), log2(V) bits.
  logits = model(x[:2])
  assert logits.shape == (2, N, VOCAB) and logits.dtype == tf.float32
  np.testing.assert_array_equal(logits.numpy(), 0.0)
  assert not np.any(model.head.kernel.numpy()) and not np.any(model.head.bias.numpy())
  loss0, bits0 = model.evaluate(ds, verbose=0)
  assert loss0 == pytest.approx(math.log(VOCAB), rel=1e-5)
  assert bits0 == pytest.approx(math.log2(VOCAB), rel=1e-5)

  history = model.fit(ds, epochs=4, verbose=0).history
  assert history["loss"][-1] < 0.5 * math.log(VOCAB), history["loss"]
  assert history["loss"][-1] < history["loss"][0]
  # Bits per token is the loss in base 2.
  np.testing.assert_allclose(history["bits_per_byte"], np.array(history["loss"]) / math.log(2),
                             rtol=1e-3)
  loss1, bits1 = model.evaluate(ds, verbose=0)
  assert loss1 < 0.5 * loss0 and bits1 == pytest.approx(loss1 / math.log(2), rel=1e-4)
  pred = model.predict(x, batch_size=8, verbose=0)
  assert pred.shape == (32, N, VOCAB) and pred.dtype == np.float32
  np.testing.assert_allclose(pred[:4], model(x[:4]).numpy(), atol=1e-4)
  assert (pred.argmax(-1) == y).mean() > 0.8


def test_train_step_with_recompute_and_dropout(rng, ops):
  x, y = _periodic_data(rng, 4)
  model = _model(dropout=0.2, recompute=True, head_mode="interleaved")
  _compile(model)
  before = [w.copy() for w in model.get_weights()]
  loss, bits = model.train_on_batch(x, y)
  assert np.isfinite(loss) and np.isfinite(bits)
  changed = [not np.array_equal(a, b) for a, b in zip(before, model.get_weights())]
  assert all(changed), "every weight should receive a gradient"
  # Dropout is active in training calls only.
  t1, t2 = model(x, training=True).numpy(), model(x, training=True).numpy()
  assert np.abs(t1 - t2).max() > 1e-4
  np.testing.assert_array_equal(model(x, training=False).numpy(), model(x).numpy())


# --- 7. Saving ----------------------------------------------------------------------------------

def test_save_and_load(rng, tmp_path, ops):
  model = _model(P.Strided(16, heads=4, mode="split"), head_mode="multihead")
  tokens = rng.integers(0, VOCAB, (2, N)).astype("int32")
  model(tokens)
  _randomize(model, rng, scale=0.3)
  _compile(model)
  model.train_on_batch(tokens, tokens)
  expected = model(tokens).numpy()
  assert np.abs(expected).max() > 1e-2

  path = tmp_path / "m.keras"
  model.save(path)
  loaded = keras.models.load_model(path)
  assert isinstance(loaded, SparseTransformer)
  np.testing.assert_array_equal(loaded(tokens).numpy(), expected)
  assert loaded.layer_patterns == model.layer_patterns
  np.testing.assert_allclose(loaded.evaluate(tokens, tokens, verbose=0),
                             model.evaluate(tokens, tokens, verbose=0), rtol=1e-6)

  clone = SparseTransformer.from_config(model.get_config())
  assert clone(tokens).shape == (2, N, VOCAB)
  assert len(clone.get_weights()) == len(model.get_weights())


# --- 8. Mixed precision -------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_training(policy, rng, ops):
  x, y = _periodic_data(rng, 8)
  keras.mixed_precision.set_global_policy(policy)
  try:
    model = _model()
    _compile(model)
    logits = model(x[:2])
    assert logits.dtype == tf.float32
    assert model.blocks[0].attention.compute_dtype == policy.split("_")[1]
    if policy == "mixed_float16":
      assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    loss, bits = model.train_on_batch(x, y)
    assert np.isfinite(loss) and np.isfinite(bits)
    assert loss == pytest.approx(math.log(VOCAB), rel=1e-3)   # first step: zero logits
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][-1])
    assert np.any(model.head.kernel.numpy())                  # the weights moved
    assert model.predict(x[:2], verbose=0).dtype == np.float32
  finally:
    keras.mixed_precision.set_global_policy("float32")


def test_model_dtype_argument_reaches_its_layers(rng, ops):
  """SparseTransformer(dtype="mixed_bfloat16") under a float32 policy computes in bfloat16."""
  model = _model(dtype="mixed_bfloat16")
  model(np.zeros((1, N), np.int32))
  assert model.dtype_policy.name == "mixed_bfloat16"
  computes = {layer.name: layer.compute_dtype for layer in
              [model.token_embedding, model.final_norm, *model.blocks,
               *(b.attention for b in model.blocks)]}
  assert set(computes.values()) == {"bfloat16"}, computes
  assert model.head.compute_dtype == "float32"


def test_mixed_precision_model_saves_and_loads_under_float32(rng, tmp_path, ops):
  """A model saved under mixed_float16 computes the same after loading under float32."""
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    model = _model(P.Strided(16), head_mode="interleaved")
    model(np.zeros((1, N), np.int32))
    _randomize(model, rng, scale=0.5)
    model.save(tmp_path / "m.keras")
  finally:
    keras.mixed_precision.set_global_policy("float32")
  tokens = rng.integers(0, VOCAB, (2, N)).astype("int32")
  loaded = keras.models.load_model(tmp_path / "m.keras")
  assert loaded.dtype_policy.name == "mixed_float16"
  assert loaded.blocks[0].attention.compute_dtype == "float16"
  np.testing.assert_array_equal(loaded(tokens).numpy(), model(tokens).numpy())


# --- 9. Generation ------------------------------------------------------------------------------
# tests/test_generation.py holds the compiled generate path equal to the full model for every
# pattern family and head mode, and checks the samplers; here: logits_stream (prefill, then one
# Python-driven decode_step call per position), the image and strided position embeddings on
# the cache, mixed precision, and generate's argument checks.

def _sampling_model(rng, pattern=None, head_mode="merged", **kw):
  model = _model(pattern, head_mode=head_mode, **kw)
  model(np.zeros((1, N), np.int32))
  _randomize(model, rng, scale=0.5)
  # A larger head than _randomize gives: logits far apart, greedy tokens rarely near a tie.
  model.head.kernel.assign(2.0 * rng.standard_normal(model.head.kernel.shape).astype("float32"))
  return model


def _stream(model, tokens, prompt_len, use_cache=True):
  """Teacher-forced logits_stream to the end: `[B, N + 1 - prompt_len, V]`, positions
  prompt_len - 1 ... N - 1."""
  out = np.pad(tokens, [(0, 0), (0, N + 1 - tokens.shape[1])])          # (B, N + 1)
  stream = model.logits_stream(out, prompt_len, N + 1 - prompt_len, use_cache)
  return np.stack([np.asarray(logits) for logits in stream], axis=1)


def test_logits_stream_cache_matches_full_forward(rng, ops):
  """Teacher-forced on random tokens: the cached logits equal the uncached stream's and the
  full forward pass's (2 layers, Fixed interleaved); the decoding step is traced once."""
  model = _sampling_model(rng, P.Fixed(16, 4), "interleaved")
  tokens = rng.integers(0, VOCAB, (2, N)).astype("int32")
  full = model(tokens).numpy()                                            # (B, N, V)
  cached = _stream(model, tokens, 3)
  np.testing.assert_allclose(cached, full[:, 2:], atol=1e-4)
  np.testing.assert_allclose(_stream(model, tokens, 3, use_cache=False), cached, atol=1e-4)
  # Another batch size and prompt length (the prompt ends mid-block): the same trace.
  more = rng.integers(0, VOCAB, (3, N)).astype("int32")
  np.testing.assert_allclose(_stream(model, more, 21), model(more).numpy()[:, 20:], atol=1e-4)
  assert model._decode_step_fn.experimental_get_tracing_count() == 1
  with pytest.raises(ValueError, match="seq_len"):
    next(model.logits_stream(np.zeros((2, N + 2), np.int32), 3, N - 1))


def test_logits_stream_with_position_embeddings(rng, ops):
  """The cached step embeds position t as t for the image and strided embeddings too."""
  tokens = rng.integers(0, VOCAB, (2, N)).astype("int32")
  for kw in ({"embedding": "image", "image_shape": (4, 8, 2)},
             {"embedding": "strided", "embedding_stride": 16}):
    model = _sampling_model(rng, P.Fixed(16, 4), **kw)
    np.testing.assert_allclose(_stream(model, tokens, 3), model(tokens).numpy()[:, 2:],
                               atol=1e-4, err_msg=str(kw))


def test_position_embedding_checks_are_left_out_under_xla():
  """XLA drops Assert ops with a warning at every trace (the compiled decoding loop):
  the layer builds its start_index checks only outside XLA."""
  layer = sat.layers.PositionEmbedding(N)
  layer.build((1, N, D))

  def op_types(jit_compile):
    fn = tf.function(lambda x, s: layer(x, start_index=s), jit_compile=jit_compile)
    graph = fn.get_concrete_function(tf.TensorSpec([1, 1, D]), tf.TensorSpec([], tf.int32)).graph
    return {op.type for op in graph.get_operations()}

  assert "Assert" in op_types(False)
  assert "Assert" not in op_types(True)


def _slack(logits):
  """How far bfloat16 rounding may move logits `[..., V]`: 2% of the largest, per position."""
  return 0.02 * np.abs(logits).max(axis=-1)


def _near_greedy_logits(model, out, prompt_len):
  """The full model's logits before each new token of `out` `[B, T]`: `[B, T - prompt_len, V]`,
  after checking that each new token's logit is within `_slack` of the best."""
  padded = np.pad(out, [(0, 0), (0, N - out.shape[1])])                  # (B, N)
  logits = model(padded).numpy()[:, prompt_len - 1:out.shape[1] - 1]     # (B, T - P, V)
  chosen = np.take_along_axis(logits, out[:, prompt_len:, None], axis=-1)[..., 0]
  assert (chosen >= logits.max(axis=-1) - _slack(logits)).all(), "not the full model's greedy"
  return logits


def test_generate_under_mixed_bfloat16(rng, ops):
  """Greedy generation of a mixed_bfloat16 model: cached equals uncached, up to rounding.

  The paths round bfloat16 differently (logits differ by up to about 2^-8 of the
  largest), so greedy tokens may part where the full model's two best logits are that
  close: each path must pick a token within `_slack` of the full model's best, and the
  paths must agree up to the first such near-tie.
  """
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    model = _sampling_model(rng, P.Fixed(16, 4))
  finally:
    keras.mixed_precision.set_global_policy(previous)
  assert model.blocks[0].attention.compute_dtype == "bfloat16"
  prompt = rng.integers(0, VOCAB, (2, 5)).astype("int32")
  cached = model.generate(prompt, max_length=40, sampler="greedy")
  full = model.generate(prompt, max_length=40, sampler="greedy", use_cache=False)
  assert cached.shape == full.shape == (2, 40) and cached.dtype == np.int32
  np.testing.assert_array_equal(cached[:, :5], prompt)
  logits = _near_greedy_logits(model, cached, 5)                          # (B, 35, V)
  _near_greedy_logits(model, full, 5)
  top2 = np.sort(logits, axis=-1)[..., -2:]                               # (B, 35, 2)
  near_tie = top2[..., 1] - top2[..., 0] <= _slack(logits)                # (B, 35)
  for b in range(2):
    ties = np.nonzero(near_tie[b])[0]
    end = 5 + (ties[0] if len(ties) else 35)       # token `end` may differ: a near-tie
    np.testing.assert_array_equal(cached[b, :end], full[b, :end])
  # Finer than greedy tokens: teacher-forced, the cached logits lie within the slack.
  tokens = rng.integers(0, VOCAB, (2, N)).astype("int32")
  full_logits = model(tokens).numpy()[:, 2:]                              # (B, N - 2, V)
  error = np.abs(_stream(model, tokens, 3) - full_logits).max(axis=-1)    # (B, N - 2)
  assert (error <= _slack(full_logits)).all(), error.max()


def test_generate_rejects_bad_arguments(rng):
  model = _model()
  model(np.zeros((1, N), np.int32))
  ok = np.array([1, 2, 3], np.int32)
  # The last token can be predicted from position seq_len - 1: P + num_tokens <= seq_len + 1.
  with pytest.raises(ValueError, match="seq_len"):
    model.generate(np.ones(N + 1, np.int32), 1)
  with pytest.raises(ValueError, match="seq_len"):
    model.generate(np.ones(N + 2, np.int32), 0)
  with pytest.raises(ValueError, match="seq_len"):
    model.generate(ok, N - 1)
  with pytest.raises(ValueError, match="tokens"):
    model.generate(np.array([1, VOCAB], np.int32), 2)
  with pytest.raises(ValueError, match="tokens"):
    model.generate(np.array([-1, 2], np.int32), 2)
  with pytest.raises(ValueError, match="temperature"):
    model.generate(ok, 2, temperature=-0.5)
  with pytest.raises(ValueError, match="top_k"):
    model.generate(ok, 2, top_k=-1)                     # 0 (like None) is no limit
  with pytest.raises(ValueError):
    model.generate(np.zeros((2, 0), np.int32), 2)
  with pytest.raises(ValueError):
    model.generate(ok, -1)
  np.testing.assert_array_equal(model.generate(ok, 0), ok)  # nothing to add: 1-D in, 1-D out


# --- 10. layer_patterns and model construction ---------------------------------------------------

def test_layer_patterns_head_modes():
  fixed = P.Fixed(16, 4)
  window, summary = fixed.components()
  assert layer_patterns(fixed, "interleaved", 5, 4) == [window, summary, window, summary, window]
  assert window.mode == "window" and summary.mode == "summary"
  np.testing.assert_array_equal(window.mask(N) | summary.mask(N), fixed.mask(N))
  assert layer_patterns(fixed, "merged", 3, 4) == [fixed] * 3

  multi = layer_patterns(fixed, "multihead", 2, 4)
  assert len(multi) == 2 and all(isinstance(p, P.Split) for p in multi)
  assert multi[0].components() == [window, summary] and multi[0].num_heads == 4
  mask = multi[0].mask(N)
  np.testing.assert_array_equal(mask[:2], np.broadcast_to(window.mask(N), (2, N, N)))
  np.testing.assert_array_equal(mask[2:], np.broadcast_to(summary.mask(N), (2, N, N)))

  split = P.Strided(16, heads=4, mode="split")
  merged = layer_patterns(split, "merged", 2, 4)
  assert merged == [P.Strided(16, mode="merged")] * 2
  assert split.merged() == P.Strided(16)
  np.testing.assert_array_equal(merged[0].mask(N)[0], split.mask(N).any(axis=0))
  row, col = split.components()
  assert layer_patterns(split, "interleaved", 3, 4) == [row, col, row]
  # multihead: a Split with the same mask as the split-mode pattern.
  np.testing.assert_array_equal(layer_patterns(split, "multihead", 1, 4)[0].mask(N),
                                split.mask(N))
  np.testing.assert_array_equal(layer_patterns(P.Strided(16), "multihead", 1, 4)[0].mask(N),
                                split.mask(N))

  local = P.Local(16)
  for mode in ("merged", "interleaved", "multihead"):
    assert layer_patterns(local, mode, 3, 4) == [local] * 3
  with pytest.raises(ValueError, match="head_mode"):
    layer_patterns(fixed, "bogus", 2, 4)
  with pytest.raises(ValueError, match="head_mode"):
    _model(head_mode="bogus")
  with pytest.raises(ValueError):
    P.Split(fixed.components(), heads=4).merged()


def test_multihead_fixed_with_heads():
  """Fixed(heads=4) is Fixed() on a 4-head attention; multihead should split it the same way."""
  plain = layer_patterns(P.Fixed(32, 8), "multihead", 2, 4)[0]
  with_heads = layer_patterns(P.Fixed(32, 8, heads=4), "multihead", 2, 4)[0]
  np.testing.assert_array_equal(with_heads.mask(N), plain.mask(N))
  model = _model(P.Fixed(32, 8, heads=4), head_mode="multihead")
  assert model.blocks[0].pattern.num_heads == HEADS


def test_model_blocks_use_the_layer_patterns(rng, ops):
  model = _model(P.Fixed(16, 4), head_mode="interleaved", num_layers=3)
  assert [b.pattern for b in model.blocks] == model.layer_patterns
  assert [b.pattern.mode for b in model.blocks] == ["window", "summary", "window"]
  # Each block's attention uses its pattern: a change outside it does not reach query 20.
  model(np.zeros((1, N), np.int32))
  _randomize(model, rng)
  tokens = rng.integers(0, VOCAB, (1, N)).astype("int32")
  changed = tokens.copy()
  changed[0, 21:] = (changed[0, 21:] + 1) % VOCAB          # the future only
  np.testing.assert_allclose(model(changed).numpy()[0, :21], model(tokens).numpy()[0, :21],
                             atol=1e-5)


@pytest.mark.parametrize("pattern", [
    P.Fixed(16, 4), P.Strided(16, heads=4, mode="split"), P.Local(20),
    P.BigBird(block=16, window=3, num_global=1, num_random=1), P.Longformer(8),
    P.Dense(causal=False)],
    ids=["fixed", "strided_split", "local", "bigbird", "longformer", "dense_noncausal"])
def test_model_is_autoregressive(pattern, rng, ops):
  """Logits at t never depend on tokens after t: a model either refuses a non-causal pattern
  (ValueError) or is causal anyway."""
  try:
    model = _model(pattern)
  except ValueError:
    assert not pattern.causal
    return
  model(np.zeros((1, N), np.int32))
  _randomize(model, rng)
  tokens = rng.integers(0, VOCAB, (1, N)).astype("int32")
  t = int(rng.integers(1, N - 1))
  changed = tokens.copy()
  changed[0, t + 1:] = (changed[0, t + 1:] + 1 + rng.integers(0, VOCAB - 1, N - t - 1)) % VOCAB
  np.testing.assert_allclose(model(changed).numpy()[0, :t + 1], model(tokens).numpy()[0, :t + 1],
                             atol=1e-5, err_msg=f"logits up to position {t} saw later tokens")


def test_model_pads_shorter_inputs_to_seq_len(rng, ops):
  """Tokens [B, T < seq_len]: the logits of the full-length run at the first T positions, for a
  pattern whose mask depends on the length (BigBird's random blocks), eagerly, traced with an
  unknown length, and in a functional model of a shorter static length."""
  model = _model(P.BigBird(block=16, window=3, num_global=1, num_random=1, causal=True))
  model(np.zeros((1, N), np.int32))
  _randomize(model, rng)
  tokens = rng.integers(0, VOCAB, (2, N)).astype("int32")
  full = model(tokens).numpy()
  for length in (1, 37, 48):
    got = model(tokens[:, :length]).numpy()
    assert got.shape == (2, length, VOCAB)
    np.testing.assert_allclose(got, full[:, :length], atol=1e-5, err_msg=str(length))
  traced = tf.function(lambda t: model(t), input_signature=[tf.TensorSpec([None, None], tf.int32)])
  np.testing.assert_allclose(traced(tokens[:, :37]).numpy(), full[:, :37], atol=1e-5)
  np.testing.assert_allclose(traced(tokens).numpy(), full, atol=1e-5)
  inputs = keras.Input((37,), dtype="int32")
  functional = keras.Model(inputs, model(inputs))
  np.testing.assert_allclose(functional(tokens[:, :37]).numpy(), full[:, :37], atol=1e-5)


def test_model_accepts_every_integer_dtype(rng, ops):
  model = _model()
  model(np.zeros((1, N), np.int32))
  _randomize(model, rng)
  tokens = rng.integers(0, VOCAB, (2, N))
  expected = model(tokens.astype("int32")).numpy()
  for dtype in ("int8", "int16", "int64", "uint8", "uint16", "uint32"):
    np.testing.assert_array_equal(model(tokens.astype(dtype)).numpy(), expected, err_msg=dtype)
  np.testing.assert_array_equal(model(tf.constant(tokens, tf.int64)).numpy(), expected)
  assert model.generate(tokens[0, :3].astype("uint8"), 2, temperature=0).dtype == np.int32


def test_model_rejects_bad_arguments():
  with pytest.raises(ValueError):
    _model(d_model=30)                                   # not a multiple of num_heads
  with pytest.raises(ValueError):
    _model(pattern=P.Fixed(24, 4))                       # stride not a multiple of block size
  with pytest.raises(ValueError):
    _model(embedding="image", image_shape=(3, 3, 3))
  with pytest.raises(ValueError):
    _model(embedding="nope")


# --- 11. BitsPerToken ---------------------------------------------------------------------------

def _np_bits(logits, y, weight=None):
  z = logits.astype(np.float64)
  logp = z - z.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  bits = -np.take_along_axis(logp, y[..., None], -1)[..., 0] / math.log(2)
  weight = np.ones_like(bits) if weight is None else weight
  return (bits * weight).sum() / weight.sum()


def test_bits_per_token_matches_numpy(rng):
  logits = (3 * rng.standard_normal((3, 7, 10))).astype("float32")
  y = rng.integers(0, 10, (3, 7))
  m = BitsPerToken()
  m.update_state(y, logits)
  assert float(m.result()) == pytest.approx(_np_bits(logits, y), rel=1e-5)

  w = rng.random((3, 7)) * (rng.random((3, 7)) < 0.7)
  m = BitsPerToken(name="bits_per_dim")
  m.update_state(y, logits, sample_weight=w)
  assert m.name == "bits_per_dim"
  assert float(m.result()) == pytest.approx(_np_bits(logits, y, w), rel=1e-5)

  # Accumulates over updates: the weighted mean of everything seen.
  more = (3 * rng.standard_normal((2, 7, 10))).astype("float32")
  y2 = rng.integers(0, 10, (2, 7))
  m.update_state(y2, more)
  all_logits = np.concatenate([logits, more])
  all_w = np.concatenate([w, np.ones((2, 7))])
  assert float(m.result()) == pytest.approx(
      _np_bits(all_logits, np.concatenate([y, y2]), all_w), rel=1e-5)
  m.reset_state()
  assert float(m.result()) == 0.0

  # Probabilities instead of logits.
  probs = tf.nn.softmax(logits).numpy()
  p = BitsPerToken(from_logits=False)
  p.update_state(y, probs)
  assert float(p.result()) == pytest.approx(_np_bits(logits, y), rel=1e-4)
  # Round trip of the config.
  clone = BitsPerToken.from_config(p.get_config())
  assert clone.from_logits is False and clone.name == p.name


# --- 12. Docstring examples ---------------------------------------------------------------------

@pytest.mark.parametrize("module", ["layers.attention", "layers.block",
                                    "models.sparse_transformer"])
def test_docstring_examples_run(module, ops):
  mod = importlib.import_module(f"sparse_attention_tf.{module}")
  result = doctest.testmod(mod, extraglobs={"np": np, "keras": keras, "tf": tf})
  assert result.attempted > 0 and result.failed == 0, result
