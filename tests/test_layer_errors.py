"""What a new user sees when the inputs of the layers, the model or `sparse_attention` are wrong.

Each message is checked for what it must say: the expected layout or dtype, the number that
did not fit, and what to do instead.
"""

import pathlib
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import sparse_attention_tf as sat
from sparse_attention_tf import patterns as P
from sparse_attention_tf.layers import (PositionEmbedding, SparseMultiHeadAttention,
                                        SparseTransformerBlock)
from sparse_attention_tf.models import SparseTransformer

N, D, HEADS, KEY_DIM, BLOCK, VOCAB = 64, 32, 4, 8, 16, 12
ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model():
  model = SparseTransformer(vocab_size=VOCAB, seq_len=N, num_layers=1, d_model=D,
                            num_heads=HEADS, pattern=P.Fixed(16, 4), block_size=BLOCK)
  model(np.zeros((1, N), np.int32))
  return model


def _tokens(length=N, batch=2):
  return np.random.default_rng(0).integers(0, VOCAB, (batch, length))


# --- 1. Token dtype and values -------------------------------------------------------------

FLOAT_TOKENS = {
    "numpy_float64": lambda t: t.astype("float64"),
    "numpy_float32": lambda t: t.astype("float32"),
    "tf_float32": lambda t: tf.constant(t, tf.float32),
    "tf_bfloat16": lambda t: tf.constant(t, tf.bfloat16),
    "numpy_bool": lambda t: t > 3,
}


@pytest.mark.parametrize("kind", list(FLOAT_TOKENS))
def test_model_refuses_non_integer_tokens(model, kind, ops):
  tokens = FLOAT_TOKENS[kind](_tokens())
  dtype = tf.as_dtype(tokens.dtype).name
  pattern = rf"tokens must be integers.*got dtype {dtype}"
  with pytest.raises(ValueError, match=pattern):
    model(tokens)
  with pytest.raises(ValueError, match=pattern):
    model.call(tf.convert_to_tensor(tokens))
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"tokens must be integers"):
    model.predict(tokens, verbose=0)                   # traced: fails when run
  with pytest.raises(ValueError, match=rf"generate: tokens must be integers.*dtype {dtype}"):
    model.generate(tokens[:1, :3], 2)


def test_model_refuses_float_tokens_in_functional_models_and_lists(model):
  with pytest.raises(ValueError, match=r"tokens must be integers.*float32"):
    model(keras.Input((N,), dtype="float32"))
  with pytest.raises(ValueError, match=r"generate: tokens must be integers.*float64"):
    model.generate([1.0, 2.0], 2)
  traced = tf.function(lambda t: model(t))
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"tokens must be integers.*float16"):
    traced(tf.constant(_tokens(), tf.float16))


def test_model_refuses_token_values_outside_the_vocabulary(model, ops):
  for bad in (VOCAB, -1):
    tokens = _tokens()
    tokens[1, 7] = bad
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, vocab_size={VOCAB}\)"):
      model(tokens)
    traced = tf.function(lambda t: model(t))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"token ids must be in \[0, vocab"):
      traced(tf.constant(tokens, tf.int32))
  with pytest.raises(ValueError, match=rf"prompt tokens must be in \[0, {VOCAB}\)"):
    model.generate(np.array([1, VOCAB]), 2)
  # uint8 holds 255 >= VOCAB: checked before any cast.
  with pytest.raises(ValueError, match=r"token ids must be in"):
    model(np.full((1, N), 255, np.uint8))


# --- 2. Token shapes -----------------------------------------------------------------------

def test_model_names_its_seq_len_for_longer_tokens(model, ops):
  with pytest.raises(ValueError, match=rf"SparseTransformer was built for seq_len={N}, got "
                                       rf"tokens of length {N + 7}"):
    model(_tokens(N + 7))
  traced = tf.function(lambda t: model(t), input_signature=[tf.TensorSpec([None, None], tf.int32)])
  with pytest.raises(tf.errors.InvalidArgumentError, match=rf"built for seq_len={N}"):
    traced(tf.constant(_tokens(N + 1), tf.int32))
  with pytest.raises(ValueError, match=rf"built for seq_len={N}, got tokens of length {2 * N}"):
    model(keras.Input((2 * N,), dtype="int32"))


def test_model_wants_a_batch_axis(model):
  with pytest.raises(ValueError, match=r"expects tokens of shape \[batch, seq_len\].*"
                                       r"tokens\[None\]"):
    model(_tokens()[0])
  with pytest.raises(ValueError, match=r"expects tokens of shape \[batch, seq_len\]"):
    model(_tokens()[..., None])


# --- 3. Layer ranks ------------------------------------------------------------------------

def test_attention_layer_names_its_layout():
  layer = SparseMultiHeadAttention(HEADS, KEY_DIM, P.Fixed(16, 4), block_size=BLOCK)
  split = np.zeros((2, N, HEADS, KEY_DIM), np.float32)
  with pytest.raises(ValueError, match=r"SparseMultiHeadAttention expects query of shape "
                                       r"\[batch, seq, dim\], got shape \(2, 64, 4, 8\).*"
                                       r"sparse_attention"):
    layer(split)                                        # when it builds
  layer(np.zeros((2, N, D), np.float32))
  with pytest.raises(ValueError, match=r"expects query of shape \[batch, seq, dim\]"):
    layer(split)                                        # once built
  with pytest.raises(ValueError, match=r"expects value of shape \[batch, seq, dim\].*"
                                       r"batch axis"):
    layer(np.zeros((2, N, D), np.float32), np.zeros((N, D), np.float32))
  with pytest.raises(ValueError, match=r"expects query of shape.*\(None, 64, 4, 8\)"):
    SparseMultiHeadAttention(HEADS, KEY_DIM, P.Fixed(16, 4), block_size=BLOCK)(
        keras.Input((N, HEADS, KEY_DIM)))


def test_attention_layer_wants_one_length_and_a_static_one(ops):
  layer = SparseMultiHeadAttention(HEADS, KEY_DIM, P.Dense(causal=False), block_size=BLOCK)
  x = np.zeros((2, N, D), np.float32)
  with pytest.raises(ValueError, match=r"same length, got \{'query': 64, 'value': 48"):
    layer(x, x[:, :48])
  with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[batch, 64\]"):
    layer(x, key_padding_mask=np.ones((2, 50), bool))
  traced = tf.function(lambda x: layer(x), input_signature=[tf.TensorSpec([None, None, D])])
  with pytest.raises(ValueError, match=r"needs a static sequence length.*keras.Input"):
    traced.get_concrete_function()


def test_block_and_embedding_name_their_layout():
  block = SparseTransformerBlock(HEADS, P.Fixed(16, 4), block_size=BLOCK)
  with pytest.raises(ValueError, match=r"SparseTransformerBlock expects inputs of shape "
                                       r"\[batch, seq, width\], got shape \(2, 8, 8, 32\).*"
                                       r"height \* width"):
    block(np.zeros((2, 8, 8, D), np.float32))
  block(np.zeros((2, N, D), np.float32))
  with pytest.raises(ValueError, match=r"\[batch, seq, width\], got shape \(64, 32\)"):
    block(np.zeros((N, D), np.float32))
  embedding = PositionEmbedding(N)
  embedding(np.zeros((2, N, D), np.float32))
  with pytest.raises(ValueError, match=r"expects inputs \[batch, sequence_length, d_model\].*"
                                       r"Embedding"):
    embedding(np.zeros((2, N), np.float32))


# --- 4. sparse_attention: strict lengths, and the layout it expects ------------------------

def test_sparse_attention_points_at_the_layers_for_other_lengths(ops):
  q = tf.zeros([2, 50, HEADS, KEY_DIM])
  with pytest.raises(ValueError, match=r"seq_len \(50\) must be a multiple of block_size \(16\)"
                                       r".*SparseMultiHeadAttention.*pad internally") as info:
    sat.sparse_attention(q, q, q, P.Fixed(16, 4), block_size=BLOCK)
  assert "transpose" not in str(info.value)            # no layout hint for a true length


@pytest.mark.parametrize("pattern,heads,seq", [
    (P.Fixed(32, 8), 4, 96),                           # "seq" 4: not a multiple of the block
    (P.Fixed(32, 8, heads=3, head_groups=3), 6, 64),   # "heads" 64: not a multiple of 3
    (P.Strided(24, heads=2, mode="split"), 16, 96),    # "seq" 16 fits the block, not the stride
], ids=["block", "pattern_heads", "stride"])
def test_sparse_attention_suggests_transposing_heads_first_inputs(pattern, heads, seq, ops):
  q = tf.zeros([2, heads, seq, KEY_DIM])               # [batch, heads, seq, head_dim]
  with pytest.raises(ValueError, match=r"look like \[batch, heads, seq, head_dim\].*expects "
                                       r"\[batch, seq, heads, head_dim\].*"
                                       r"tf.transpose\(x, \[0, 2, 1, 3\]\)"):
    sat.sparse_attention(q, q, q, pattern, block_size=BLOCK)
  t = tf.transpose(q, [0, 2, 1, 3])
  assert sat.sparse_attention(t, t, t, pattern, block_size=BLOCK).shape == t.shape


def test_sparse_attention_rank3_points_at_the_layer():
  x = tf.zeros([2, N, D])
  with pytest.raises(ValueError, match=r"rank 4 \[batch, seq, heads, head_dim\].*"
                                       r"SparseMultiHeadAttention"):
    sat.sparse_attention(x, x, x, P.Dense(), block_size=BLOCK)


# --- 5. Public names across modules ----------------------------------------------------------

MY_MODULES = ["attention.py", "layers/attention.py", "layers/block.py", "layers/embeddings.py",
              "models/sparse_transformer.py"]


@pytest.mark.parametrize("path", MY_MODULES)
def test_no_private_names_of_other_objects(path):
  """`x._name` only for x = self (or cls): other objects are reached through public names."""
  source = (ROOT / "sparse_attention_tf" / path).read_text()
  code = "\n".join(line.split("#")[0] for line in source.splitlines())
  found = re.findall(r"\b(?!self\b|cls\b)(\w+)\._[a-z]\w*", code)
  assert not found, f"{path} reads private names of {sorted(set(found))}"
