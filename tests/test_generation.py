"""Compiled generation (sparse_attention_tf.generation): prefill + cached decoding loop.

The cached path is held equal to the full model (greedy tokens and the logits
themselves) for every pattern family (the head modes on Fixed), with prompts
shorter than one block, ending mid-block, ending on a block boundary, and rows
of different lengths in one batch. Models are tiny (seq_len 64, d_model 32, 1
or 2 layers, block_size 16) and shared by the tests of this module (the `models`
fixture): the time is the generate function's trace and XLA compilation, paid
once per model and batch size.
"""

import os
import secrets
import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import sparse_attention_tf as sat
from sparse_attention_tf import generation
from sparse_attention_tf import patterns as P

N, D, HEADS, BLOCK, VOCAB = 64, 32, 4, 16, 12
BYTES = 256                     # the shared byte-level model (text prompts and sampling tests)

PATTERNS = {
    "fixed": lambda: P.Fixed(16, 4),
    "strided": lambda: P.Strided(16),
    "local": lambda: P.Local(20),
    "dense": lambda: P.Dense(),
    "bigbird": lambda: P.BigBird(block=16, window=3, num_global=1, num_random=1, seed=3,
                                 causal=True),
}
# Head modes differ only for patterns with several components: all three on Fixed, the
# other families merged. fixed-merged is the shared 2-layer model (caches of a stack of
# layers); the others have 1 layer (what differs between them, the pattern's mask and the
# head mode, is in every layer).
CASES = [("fixed", m) for m in ("merged", "interleaved", "multihead")] + \
        [(p, "merged") for p in ("strided", "local", "dense", "bigbird")]


def _model(rng, pattern="fixed", head_mode="merged", vocab=VOCAB, layers=2):
  model = sat.SparseTransformer(vocab_size=vocab, seq_len=N, num_layers=layers, d_model=D,
                                num_heads=HEADS, pattern=PATTERNS[pattern](),
                                head_mode=head_mode, block_size=BLOCK, implementation="custom_op")
  model(np.zeros((1, N), np.int32))
  for w in model.weights:
    w.assign(0.5 * rng.standard_normal(w.shape).astype("float32"))
  # Large logit gaps, so float rounding between the paths cannot flip an argmax.
  model.head.kernel.assign(2.0 * rng.standard_normal(model.head.kernel.shape).astype("float32"))
  return model


@pytest.fixture(scope="module")
def models():
  """`models(pattern, head_mode, vocab, layers)`: one model per key for the whole module.

  `models()` is the shared Fixed/merged byte-level model (2 layers): the sampling,
  stop-token, retrace and text tests run on it, and so does the cached-greedy
  check's fixed-merged case (one trace for all of them).

  Each key's weights come from its own generator, seeded from the module seed
  (printed in every test that asks; replay with SPARSE_ATTENTION_TEST_SEED=<seed>).
  """
  seed = int(os.environ.get("SPARSE_ATTENTION_TEST_SEED", secrets.randbits(32)))
  built = {}

  def get(pattern="fixed", head_mode="merged", vocab=BYTES, layers=2):
    print(f"SPARSE_ATTENTION_TEST_SEED={seed} (module models)")
    key = (pattern, head_mode, vocab, layers)
    if key not in built:
      rng = np.random.default_rng([seed, zlib.crc32(repr(key).encode())])
      built[key] = _model(rng, pattern, head_mode, vocab, layers)
    return built[key]

  return get


def _case_model(models, pattern, head_mode):
  """The model of a CASES entry: fixed-merged is the shared one."""
  if (pattern, head_mode) == ("fixed", "merged"):
    return models()
  return models(pattern, head_mode, VOCAB, 1)


def _assert_greedy(model, rows, out):
  """Each token after a row's prompt is the argmax of the full model at the position before."""
  padded = np.zeros((len(out), N), np.int32)
  for b, got in enumerate(out):
    padded[b, :min(len(got), N)] = got[:N]
  full = model(padded).numpy()                                            # (B, N, V)
  for prompt, got, logits in zip(rows, out, full):
    np.testing.assert_array_equal(got[:len(prompt)], prompt)
    np.testing.assert_array_equal(got[len(prompt):], logits[len(prompt) - 1:len(got) - 1]
                                  .argmax(-1), err_msg=f"prompt length {len(prompt)}")


@pytest.mark.parametrize("pattern,head_mode", CASES, ids=[f"{p}-{m}" for p, m in CASES])
def test_cached_greedy_matches_full_model(pattern, head_mode, rng, ops, models):
  model = _case_model(models, pattern, head_mode)
  # Shorter than a block, mid-block, on a block boundary: one batch each, then all in one.
  for length in (5, 23, 32):
    prompt = rng.integers(0, VOCAB, (3, length)).astype(np.int32)     # one batch size: one XLA
    out = model.generate(prompt, max_length=48, sampler="greedy")       # compilation
    assert out.shape == (3, 48) and out.dtype == np.int32
    _assert_greedy(model, prompt, out)
  rows = [rng.integers(0, VOCAB, n).astype(np.int32) for n in (23, 5, 32)]
  out = model.generate(rows, max_length=N + 1, sampler="greedy")       # to the very end
  assert [len(r) for r in out] == [N + 1] * 3
  _assert_greedy(model, rows, out)
  assert generation.generator(model).traces == 1


@pytest.mark.parametrize("pattern,head_mode", [("fixed", "multihead"), ("bigbird", "merged")])
def test_prefill_and_decode_logits_match_forward(pattern, head_mode, rng, ops, models):
  """Teacher-forced: the prefill's logits and every decoding step's equal the full pass."""
  # Fixed: 2 layers (the second layer's cache rows too); BigBird: the greedy check's model.
  model = models(pattern, head_mode, VOCAB, 2 if pattern == "fixed" else 1)
  tokens = rng.integers(0, VOCAB, (2, N)).astype(np.int32)
  full = model(tokens).numpy()                                            # (B, N, V)
  start = 23
  logits, caches = model.prefill(tf.constant(tokens), tf.constant(start - 1))
  np.testing.assert_allclose(logits.numpy(), full[:, start - 1], atol=1e-4)
  # On a prefix (what generate runs for short prompts): the same logits and cache rows.
  assert model.prefill_lengths() == [32, 16]
  short, short_caches = model.prefill(tf.constant(tokens[:, :32]), tf.constant(start - 1))
  np.testing.assert_allclose(short.numpy(), full[:, start - 1], atol=1e-4)
  for (k, v), (k32, v32) in zip(caches, short_caches):
    np.testing.assert_allclose(k32.numpy(), k.numpy()[:, :32], atol=1e-5)
    np.testing.assert_allclose(v32.numpy(), v.numpy()[:, :32], atol=1e-5)
  step = tf.function(model.decode_step)
  for pos in range(start, N):
    logits, caches = step(tf.constant(tokens[:, pos]), tf.constant(pos), caches)
    np.testing.assert_allclose(logits.numpy(), full[:, pos], atol=1e-4, err_msg=f"{pos}")


def test_seeded_sampling_is_reproducible(rng, ops, models):
  model = models()
  kernel = model.head.kernel.numpy()
  model.head.kernel.assign(0.05 * kernel)                                 # a broad distribution
  try:
    _check_seeded_sampling(model, rng)
  finally:
    model.head.kernel.assign(kernel)                                      # shared: put it back


def _check_seeded_sampling(model, rng):
  prompt = rng.integers(0, VOCAB, (3, 7)).astype(np.int32)
  a = model.generate(prompt, 30, temperature=3.0, seed=1)
  np.testing.assert_array_equal(a, model.generate(prompt, 30, temperature=3.0, seed=1))
  assert not np.array_equal(a, model.generate(prompt, 30, temperature=3.0, seed=2))
  # Row b draws with seed + b, whatever else is in the batch (a server may batch requests).
  np.testing.assert_array_equal(a[1], model.generate(prompt[1], 30, temperature=3.0, seed=2))
  # The uncached reference draws with the same seeds: same tokens.
  np.testing.assert_array_equal(a, model.generate(prompt, 30, temperature=3.0, seed=1,
                                                  use_cache=False))
  sampler = generation.Sampler(temperature=2.0, top_k=4, top_p=0.9, seed=7)
  np.testing.assert_array_equal(model.generate(prompt, 30, sampler=sampler),
                                model.generate(prompt, 30, sampler=sampler))
  # temperature 0 and top_k=1 are greedy.
  greedy = model.generate(prompt, 30, sampler="greedy")
  np.testing.assert_array_equal(model.generate(prompt, 30, top_k=1, seed=3), greedy)
  # top_k 0 is no limit (as in the exported signature), like None.
  np.testing.assert_array_equal(model.generate(prompt, 30, temperature=3.0, top_k=0, seed=1), a)


def test_top_k_and_top_p_never_pick_excluded_tokens():
  """A crafted distribution, sampled 4000 times per setting."""
  probs = np.array([0.05, 0.4, 0.02, 0.3, 0.2, 0.03], np.float32)        # ranks: 1, 3, 4, ...
  logits = tf.constant(np.tile(np.log(probs), (4000, 1)))
  cases = {(0, 1.0): {0, 1, 2, 3, 4, 5},     # neither: every token appears
           (3, 1.0): {1, 3, 4},               # the 3 most likely
           (0, 0.5): {1, 3},                  # 0.4 < 0.5, 0.4 + 0.3 >= 0.5
           (0, 0.35): {1},                    # the first alone reaches 0.35
           (0, 0.71): {1, 3, 4},
           (2, 0.95): {1, 3}}                 # top-k first, then the nucleus of what is left
  for (k, p), allowed in cases.items():
    got = generation.sample_tokens(logits, 1.0, k, p, tf.range(4000)).numpy()   # row seeds
    assert set(got.tolist()) == allowed, (k, p, np.bincount(got, minlength=6))
  got = generation.sample_tokens(logits, 0.0, 0, 1.0, 11).numpy()
  assert set(got.tolist()) == {1}                                         # greedy
  # Per-row settings: row b's draw depends on its own settings and seed only.
  temperature = np.array([0.0, 1.0, 1.0, 1.0] * 1000, np.float32)
  top_k = np.array([0, 1, 0, 3] * 1000, np.int32)
  top_p = np.array([1.0, 1.0, 0.35, 1.0] * 1000, np.float32)
  got = generation.sample_tokens(logits, temperature, top_k, top_p, tf.range(4000)).numpy()
  for row, allowed in enumerate(({1}, {1}, {1}, {1, 3, 4})):
    assert set(got[row::4].tolist()) == allowed, row
  assert len(set(got[3::4].tolist())) == 3                              # really sampled
  same = generation.sample_tokens(logits[:8], 1.0, 0, 1.0, np.full(8, 5, np.int32), 9).numpy()
  assert len(set(same.tolist())) == 1        # one seed, one position, equal logits: one draw
  again = generation.sample_tokens(logits[:1], 1.0, 0, 1.0, 5, 9).numpy()
  assert again[0] == same[0]                 # whatever the batch


def test_generate_top_k_stays_in_the_k_most_likely(rng, ops, models):
  model = models()
  prompt = rng.integers(0, VOCAB, (3, 4)).astype(np.int32)  # batch 3: compiled for greedy
  out = model.generate(prompt, 40, temperature=5.0, top_k=2, seed=9)
  padded = np.zeros((3, N), np.int32)
  padded[:, :44] = out
  best2 = np.argsort(-model(padded).numpy()[:, 3:43], axis=-1)[..., :2]  # (B, 40, 2)
  assert (out[:, 4:, None] == best2).any(-1).all()


def test_stop_tokens_end_rows_independently(rng, ops, models):
  model = models()
  rows = [rng.integers(0, VOCAB, n).astype(np.int32) for n in (6, 11, 8)]     # batch 3
  free = model.generate(rows, max_length=50, sampler="greedy")            # no stop tokens
  # A stop id that row 0 produces; each row must end at its own first occurrence of it.
  stop = int(free[0][6 + 3])
  # (Two stop ids, one never produced, in both calls: one XLA compilation.)
  out = model.generate(rows, max_length=50, sampler="greedy", stop_token_ids=[stop, BYTES + 3])
  for prompt, full, got in zip(rows, free, out):
    hits = np.nonzero(full[len(prompt):] == stop)[0]
    end = len(prompt) + hits[0] + 1 if len(hits) else 50
    np.testing.assert_array_equal(got, full[:end])
  # Rectangular prompts: padded with pad_token_id after the stop token.
  prompt = np.stack([r[:6] for r in rows])
  free = model.generate(prompt, max_length=50, sampler="greedy")
  out = model.generate(prompt, max_length=50, sampler="greedy", stop_token_ids=[stop, BYTES + 3],
                       pad_token_id=-1)
  for full, got in zip(free, out):
    hits = np.nonzero(full[6:] == stop)[0]
    end = 6 + hits[0] + 1 if len(hits) else 50
    np.testing.assert_array_equal(got[:end], full[:end])
    assert (got[end:] == -1).all()


def test_second_call_does_not_retrace(rng, ops, models):
  model = models()                      # shared: other tests' calls may have traced it already
  gen = generation.generator(model)
  model.generate(rng.integers(0, VOCAB, (1, 3)), 5, seed=0)
  model.generate(rng.integers(0, VOCAB, (3, 9)), 20, temperature=0.5, top_k=3, seed=1)
  model.generate([[1, 2], [3, 4, 5, 6], [7]], max_length=30, sampler="top_p",
                 stop_token_ids=[1, 2])
  model.generate(rng.integers(0, VOCAB, 7), 2, sampler="greedy")
  assert gen.traces == 1
  assert generation.generator(model) is gen


def test_text_prompts_on_a_byte_model(rng, ops, models):
  model = models()
  text = model.generate("héllo", max_length=20, sampler="greedy", return_text=True)
  assert isinstance(text, str) and text.startswith("héllo")
  tokens = model.generate(b"ab", max_length=8, sampler="greedy")
  assert tokens.shape == (8,) and tokens[:2].tolist() == [97, 98]
  texts = model.generate(["a", "bcd", "xy"], max_length=10, sampler="greedy", return_text=True)
  assert [t[:len(p)] for t, p in zip(texts, ("a", "bcd", "xy"))] == ["a", "bcd", "xy"]
  with pytest.raises(ValueError, match="byte-level"):
    models("strided", "merged", VOCAB, 1).generate("abc", 3)


def test_generate_rejects_bad_arguments(models):
  model = models()
  ok = np.array([1, 2, 3], np.int32)
  with pytest.raises(ValueError, match="not both"):
    model.generate(ok, 2, temperature=1.0, sampler="greedy")
  with pytest.raises(ValueError, match="exactly one"):
    model.generate(ok, 2, max_length=5)
  with pytest.raises(ValueError, match="exactly one"):
    model.generate(ok)
  with pytest.raises(ValueError, match="seq_len"):
    model.generate(ok, max_length=N + 2)
  with pytest.raises(ValueError, match="top_p"):
    model.generate(ok, 2, top_p=0.0)
  with pytest.raises(ValueError, match="temperature must be finite"):
    model.generate(ok, 2, temperature=float("inf"))
  with pytest.raises(ValueError, match="top_k"):
    model.generate(ok, 2, top_k=BYTES + 1)
  with pytest.raises(ValueError, match="sampler"):
    model.generate(ok, 2, sampler="beam")
  with pytest.raises(ValueError, match="tokens"):
    model.generate([[1, 2], [3, BYTES, 1]], 2)
  with pytest.raises(ValueError, match="integers"):
    model.generate([[1, 2], [3.0, 4.0, 1.0]], 2)


def test_functional_model_through_sparse_causal_lm(rng, ops):
  tokens = keras.Input((N,), dtype="int32")
  x = keras.layers.Embedding(VOCAB, D)(tokens)
  x = sat.layers.PositionEmbedding(N)(x)
  x = sat.SparseTransformerBlock(HEADS, P.Fixed(16, 4), num_layers=1, block_size=BLOCK)(x)
  x = sat.SparseTransformerBlock(HEADS, P.Local(20), num_layers=1, block_size=BLOCK,
                                 dropout=0.1)(x)
  x = keras.layers.Dense(VOCAB)(keras.layers.LayerNormalization()(x))
  model = keras.Model(tokens, x)
  for w in model.weights:
    w.assign(0.5 * rng.standard_normal(w.shape).astype("float32"))
  lm = generation.SparseCausalLM(model)
  rows = [rng.integers(0, VOCAB, n).astype(np.int32) for n in (5, 16)]
  out = lm.generate(rows, max_length=N + 1, sampler="greedy")
  _assert_greedy(model, rows, out)
  sampler = generation.Sampler(temperature=2.0, seed=4)
  cached = lm.generate(rows, 20, sampler=sampler)                         # batch 2: compiled
  for a, b in zip(cached, lm.generate(rows, 20, sampler=sampler, use_cache=False)):
    np.testing.assert_array_equal(a, b)
  # A new wrapper of the same model reuses the trace.
  assert generation.generator(generation.SparseCausalLM(model)) is generation.generator(lm)
  small = keras.layers.Dense(VOCAB + 1)(keras.layers.Embedding(VOCAB, D)(tokens))
  with pytest.raises(ValueError, match="could not be fed back"):
    generation.SparseCausalLM(keras.Model(tokens, small))
  conv = keras.layers.Conv1D(D, 3, padding="causal")(keras.layers.Embedding(VOCAB, D)(tokens))
  with pytest.raises(ValueError, match="Conv1D"):
    generation.SparseCausalLM(keras.Model(tokens, keras.layers.Dense(VOCAB)(conv)))


def test_sample_images_whole_and_completed(rng, ops):
  """An image model (8x8x1 pixels, image position embedding) samples whole images from
  its start token, and completes a given first row; both equal the uncached greedy path."""
  levels, bos = 17, 17
  model = sat.SparseTransformer(vocab_size=levels + 1, seq_len=N, num_layers=1, d_model=D,
                                num_heads=HEADS, pattern=P.Strided(8), block_size=BLOCK,
                                embedding="image", image_shape=(8, 8, 1))
  model(np.zeros((1, N), np.int32))
  for w in model.weights:
    w.assign(0.5 * rng.standard_normal(w.shape).astype("float32"))
  model.head.kernel.assign(2.0 * rng.standard_normal(model.head.kernel.shape).astype("float32"))
  images = model.sample_images(2, bos, sampler="greedy")                  # the method
  assert images.shape == (2, 8, 8, 1) and images.dtype == np.int32
  tokens = np.concatenate([[bos], images[0].reshape(-1)])                 # (N + 1,)
  _assert_greedy(model, [tokens[:1]], [tokens])
  np.testing.assert_array_equal(images[0], images[1])                     # greedy: no seed
  first_row = rng.integers(0, levels, (2, 8))
  completed = generation.sample_images(model, 2, bos, prompt=first_row, sampler="greedy")
  np.testing.assert_array_equal(completed[:, 0, :, 0], first_row)
  for row, image in zip(first_row, completed):
    tokens = np.concatenate([[bos], image.reshape(-1)])
    _assert_greedy(model, [tokens[:9]], [tokens])
  sampled = generation.sample_images(model, 2, bos, sampler=generation.Sampler(seed=5))
  assert not np.array_equal(sampled[0], sampled[1])                       # seeds 5 and 6
  for kwargs, message in ((dict(count=0), "count"), (dict(bos=levels + 1), "bos"),
                          (dict(prompt=np.zeros((3, 4), np.int32)), "prompt"),
                          (dict(prompt=np.zeros(N, np.int32)), "prompt"),
                          (dict(prompt=np.zeros(4, np.float32)), "integers"),
                          (dict(image_shape=(4, 4, 1)), "image_shape")):
    args = {"count": 2, "bos": bos, **kwargs}
    with pytest.raises(ValueError, match=message):
      generation.sample_images(model, args.pop("count"), args.pop("bos"), **args)
