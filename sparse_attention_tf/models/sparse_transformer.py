"""The Sparse Transformer language model, with cached sampling."""

from __future__ import annotations

from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from sparse_attention_tf import patterns as patterns_lib
from sparse_attention_tf.layers.block import SparseTransformerBlock
from sparse_attention_tf.layers.embeddings import (ImagePositionEmbedding, PositionEmbedding,
                                                   StridedPositionEmbedding)

HEAD_MODES = ("merged", "interleaved", "multihead")
EMBEDDINGS = ("learned", "image", "strided")


def token_dtype_error(tokens, where: str) -> Optional[str]:
  """The error message for `tokens` (array, tensor, list) that are not integers, else None.

  Any integer width is accepted (int8 ... int64, uint8 ...); floats and bools
  are refused rather than truncated to token ids.
  """
  dtype = getattr(tokens, "dtype", None)
  if dtype is None:
    dtype = np.asarray(tokens).dtype
  try:
    dtype = tf.as_dtype(dtype)
  except TypeError:
    is_integer, name = False, str(dtype)
  else:
    is_integer, name = dtype.is_integer, dtype.name
  if is_integer:
    return None
  return (f"{where}: tokens must be integers (token ids), got dtype {name}. Float tokens are "
          f"not rounded: convert them explicitly, e.g. tokens.astype('int32') or "
          f"tf.cast(tokens, tf.int32).")


def check_token_dtype(tokens, where: str) -> None:
  """Raises a ValueError unless `tokens` holds integers (see `token_dtype_error`)."""
  message = token_dtype_error(tokens, where)
  if message:
    raise ValueError(message)


def layer_patterns(pattern: patterns_lib.Pattern, head_mode: str, num_layers: int,
                   num_heads: int) -> list:
  """The pattern of each layer under one of the paper's head-integration modes.

  `merged`: every head of every layer attends to the union of the pattern's
  components (e.g. `Strided(l, mode="merged")`). `interleaved`: layer i uses
  component `i % k` (row, column, row, ...). `multihead`: each layer splits its
  heads among the components (`patterns.Split`). Patterns without components
  are used as they are.
  """
  if head_mode not in HEAD_MODES:
    raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}.")
  components = pattern.components()
  if len(components) == 1:
    return [pattern] * num_layers
  if head_mode == "merged":
    return [pattern.merged()] * num_layers
  if head_mode == "interleaved":
    return [components[i % len(components)] for i in range(num_layers)]
  return [patterns_lib.Split(components, heads=num_heads)] * num_layers


@keras.saving.register_keras_serializable(package="sparse_attention_tf")
class SparseTransformer(keras.Model):
  """Autoregressive Sparse Transformer (Child et al. 2019, https://arxiv.org/abs/1904.10509).

  Token embedding + position embedding -> `num_layers` pre-activation
  residual blocks with sparse attention -> layer norm -> logits over the
  vocabulary (output weights initialised to zero, as in the paper). Logits at
  position t predict the token at t + 1.

  Args:
    vocab_size: number of token values (256 for bytes and 8-bit pixels).
    seq_len: sequence length the model is built for.
    num_layers: number of residual blocks.
    d_model: width of the residual stream.
    num_heads: attention heads per block.
    pattern: the sparsity pattern (default `Fixed(stride, stride // 4)` with
      `stride = min(128, seq_len)`).
    head_mode: `"merged"`, `"interleaved"` or `"multihead"` (see `layer_patterns`).
    embedding: `"learned"` (1-D), `"image"` (row + column + channel, needs
      `image_shape`) or `"strided"` (row + column of a matrix of width
      `embedding_stride`, the paper's text/audio variant).
    image_shape: `(height, width, channels)` for `embedding="image"`.
    embedding_stride: width for `embedding="strided"` (default: the pattern's stride).
    dropout: dropout at the end of each residual branch.
    recompute: recompute attention and feed-forward in the backward pass.
    block_size: attention kernel block size.
    ffn_multiplier: feed-forward width, times `d_model`.
    implementation: attention implementation (`"auto"`, `"custom_op"` (fused),
      `"custom_op_unfused"`, `"reference"`, `"dense"`).
    **kwargs: `keras.Model` arguments (`name`, ...).

  Call arguments:
    tokens: integer token ids `[batch, T]`, `T <= seq_len`, values in
      `[0, vocab_size)`; any integer dtype. Shorter inputs (`T < seq_len`,
      static or only known when run) are padded with token 0 to seq_len
      inside the model and the logits sliced back to T: the patterns are
      causal, so the logits equal those of the full-length run at the first
      T positions (at the cost of a full-length pass).
    training: whether dropout is active.

  Returns:
    float32 logits `[batch, T, vocab_size]`.

  Raises:
    ValueError: for float (or bool) tokens, tokens that are not `[batch, T]`,
      `T > seq_len`, or token values outside `[0, vocab_size)`. In a traced
      function (`tf.function`, `fit`, `predict`) the dtype, value and
      dynamic length checks fail the run with an InvalidArgumentError
      carrying the same message.

  Example:

  >>> import sparse_attention_tf as sat
  >>> model = SparseTransformer(vocab_size=256, seq_len=128, num_layers=2, d_model=64,
  ...                           num_heads=4, pattern=sat.Fixed(32, 8), block_size=16)
  >>> model(tf.zeros([2, 128], tf.int32)).shape
  TensorShape([2, 128, 256])
  """

  def __init__(self, vocab_size: int, seq_len: int, num_layers: int = 2, d_model: int = 256,
               num_heads: int = 4, pattern=None, head_mode: str = "merged",
               embedding: str = "learned", image_shape=None, embedding_stride=None,
               dropout: float = 0.0, recompute: bool = False, block_size: int = 32,
               ffn_multiplier: int = 4, implementation: str = "auto", **kwargs):
    super().__init__(**kwargs)
    self.vocab_size = int(vocab_size)
    self.seq_len = int(seq_len)
    self.num_layers = int(num_layers)
    self.d_model = int(d_model)
    self.num_heads = int(num_heads)
    if pattern is None:
      stride = min(128, self.seq_len)
      pattern = patterns_lib.Fixed(stride, max(1, stride // 4))
    self.pattern = patterns_lib.deserialize(pattern)
    self.head_mode = head_mode
    self.embedding = embedding
    self.image_shape = tuple(int(d) for d in image_shape) if image_shape else None
    self.embedding_stride = int(embedding_stride) if embedding_stride else None
    self.dropout = float(dropout)
    self.recompute = bool(recompute)
    self.block_size = int(block_size)
    self.ffn_multiplier = int(ffn_multiplier)
    self.implementation = implementation
    for name in ("vocab_size", "seq_len", "num_layers", "d_model", "num_heads"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model ({self.d_model}) must be a multiple of num_heads "
                       f"({self.num_heads}).")

    self.layer_patterns = layer_patterns(self.pattern, head_mode, self.num_layers,
                                         self.num_heads)
    for p in set(self.layer_patterns):
      if not p.causal:
        raise ValueError(f"SparseTransformer is autoregressive: its patterns must be causal, "
                         f"got {p!r} (pass causal=True).")
      p.plan(self.seq_len, self.block_size)   # fail now, with the pattern's own ValueError

    self.token_embedding = keras.layers.Embedding(
        self.vocab_size, self.d_model, embeddings_initializer=keras.initializers.RandomNormal(
            stddev=0.02), name="token_embedding", dtype=self.dtype_policy)
    self.position_embedding = self._make_position_embedding()
    self.blocks = [
        SparseTransformerBlock(self.num_heads, p, num_layers=self.num_layers,
                               ffn_multiplier=self.ffn_multiplier, dropout=self.dropout,
                               block_size=self.block_size, recompute=self.recompute,
                               implementation=implementation, name=f"block_{i}",
                               dtype=self.dtype_policy)
        for i, p in enumerate(self.layer_patterns)
    ]
    self.final_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm",
                                                      dtype=self.dtype_policy)
    # Logits in float32 under mixed precision; zero-initialised as in the paper.
    self.head = keras.layers.Dense(self.vocab_size, kernel_initializer="zeros", name="logits",
                                   dtype="float32")

  def _make_position_embedding(self):
    if self.embedding == "learned":
      return PositionEmbedding(self.seq_len, name="position_embedding", dtype=self.dtype_policy)
    if self.embedding == "image":
      if not self.image_shape or len(self.image_shape) != 3 or \
          int(np.prod(self.image_shape)) != self.seq_len:
        raise ValueError(f"embedding='image' needs image_shape=(height, width, channels) with "
                         f"height*width*channels == seq_len ({self.seq_len}), got "
                         f"{self.image_shape}.")
      return ImagePositionEmbedding(*self.image_shape, name="position_embedding",
                                    dtype=self.dtype_policy)
    if self.embedding == "strided":
      stride = self.embedding_stride or getattr(self.pattern, "stride", None)
      if not stride:
        raise ValueError("embedding='strided' needs embedding_stride (the pattern has no stride).")
      return StridedPositionEmbedding(self.seq_len, stride, name="position_embedding",
                                      dtype=self.dtype_policy)
    raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}.")

  def build(self, input_shape):
    """Builds every sublayer for tokens of `input_shape` `[batch, T]`.

    Explicit (not a symbolic pass) so that Keras' loader, which only knows the
    shape, does not run the model on float placeholders.
    """
    hidden = (input_shape[0], self.seq_len, self.d_model)
    self.token_embedding.build((input_shape[0], self.seq_len))
    self.position_embedding.build(hidden)
    for block in self.blocks:
      block.build(hidden)
    self.final_norm.build(hidden)
    self.head.build(hidden)
    self.built = True

  def __call__(self, *args, **kwargs):
    # Before Keras converts the inputs, which casts float arrays to the compute dtype.
    if args:
      args = (self._integer_tokens(args[0]),) + args[1:]
    elif kwargs.get("tokens") is not None:
      kwargs["tokens"] = self._integer_tokens(kwargs["tokens"])
    return super().__call__(*args, **kwargs)

  def _integer_tokens(self, tokens):
    """`tokens` if integers, else a ValueError; traced float tokens fail when the graph runs.

    Not when traced: Keras' own symbolic build under a distribution strategy
    traces the model on the mean of a batch, a float.
    """
    message = token_dtype_error(tokens, type(self).__name__)
    if message is None:
      return tokens
    if not tf.is_symbolic_tensor(tokens):
      raise ValueError(message)
    with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
      return tf.cast(tokens, tf.int32)

  def call(self, tokens, training=None):
    tokens, length = self._padded_tokens(tokens)                          # (B, N), T
    x = self.token_embedding(tokens)                                      # (B, N, D)
    x = self.position_embedding(x)                                        # (B, N, D)
    for block in self.blocks:
      x = block(x, training=training)                                     # (B, N, D)
    logits = self.head(self.final_norm(x))                                # (B, N, V) float32
    return logits if length is None else logits[:, :length]               # (B, T, V)

  def _padded_tokens(self, tokens):
    """Checked tokens padded to `[B, seq_len]`, and T (None when T == seq_len)."""
    name = type(self).__name__
    tokens = self._integer_tokens(tf.convert_to_tensor(tokens))
    if tokens.shape.rank != 2:
      hint = " Add a batch axis: tokens[None]." if tokens.shape.rank == 1 else ""
      raise ValueError(f"{name} expects tokens of shape [batch, seq_len] (seq_len <= "
                       f"{self.seq_len}), got shape {tokens.shape}.{hint}")
    length = tokens.shape[1]
    too_long = (f"{name} was built for seq_len={self.seq_len}, got tokens of length "
                f"{length if length is not None else '> ' + str(self.seq_len)}: pass at most "
                f"{self.seq_len} tokens per row (shorter rows are padded inside the model).")
    if length is not None and length > self.seq_len:
      raise ValueError(too_long)
    tokens = self._checked_values(tokens)
    if length == self.seq_len:
      return tokens, None
    if length is None:                                   # known only when run
      length = tf.shape(tokens)[1]
      with tf.control_dependencies([tf.debugging.assert_less_equal(
          length, self.seq_len, message=too_long)]):
        tokens = tf.identity(tokens)
    padded = tf.pad(tokens, [[0, 0], [0, self.seq_len - length]])         # (B, N)
    return tf.ensure_shape(padded, [None, self.seq_len]), length

  def _checked_values(self, tokens):
    """tokens (as int32 or int64), with values checked to lie in [0, vocab_size)."""
    if tokens.dtype not in (tf.int32, tf.int64):
      tokens = tf.cast(tokens, tf.int64 if tokens.dtype.size >= 4 else tf.int32)
    message = f"{type(self).__name__}: token ids must be in [0, vocab_size={self.vocab_size})"
    if tf.executing_eagerly():                           # values at hand: check them now
      values = tokens.numpy()
      if values.size and (values.min() < 0 or values.max() >= self.vocab_size):
        raise ValueError(f"{message}, got values from {values.min()} to {values.max()}.")
      return tokens
    checks = [tf.debugging.assert_non_negative(tokens, message=message),
              tf.debugging.assert_less(tokens, tf.cast(self.vocab_size, tokens.dtype),
                                       message=message)]
    with tf.control_dependencies(checks):
      return tf.identity(tokens)

  def get_config(self):
    config = super().get_config()
    config.update({
        "vocab_size": self.vocab_size, "seq_len": self.seq_len,
        "num_layers": self.num_layers, "d_model": self.d_model, "num_heads": self.num_heads,
        "pattern": patterns_lib.serialize(self.pattern), "head_mode": self.head_mode,
        "embedding": self.embedding,
        "image_shape": list(self.image_shape) if self.image_shape else None,
        "embedding_stride": self.embedding_stride, "dropout": self.dropout,
        "recompute": self.recompute, "block_size": self.block_size,
        "ffn_multiplier": self.ffn_multiplier, "implementation": self.implementation,
    })
    return config

  # --- sampling ---------------------------------------------------------------
  def generate(self, prompt, num_tokens: Optional[int] = None, temperature: Optional[float] = None,
               top_k: Optional[int] = None, seed: Optional[int] = None, use_cache: bool = True,
               *, max_length: Optional[int] = None, sampler=None, top_p: Optional[float] = None,
               stop_token_ids=None, pad_token_id: int = 0, return_text: bool = False):
    """Continues `prompt` with sampled tokens (`sparse_attention_tf.generation`).

    The prompt runs through the model once (fused attention), filling each
    block's key/value cache; then one compiled `tf.while_loop` adds the new
    tokens, each block reading only the keys its pattern row keeps. The
    function is traced on the first call and reused by later ones.

    Args:
      prompt: integer tokens `[batch, P]` or `[P]`, values in `[0,
        vocab_size)`, any integer dtype (floats raise a ValueError); rows of
        different lengths as a list (or `tf.RaggedTensor`); for vocab_size
        >= 256 also a str / bytes or a list of them (UTF-8 bytes).
      num_tokens: tokens to add after the longest prompt; or give max_length.
      temperature, top_k, top_p, seed: the sampler's settings (see
        `generation.Sampler`; temperature 0 is greedy; default temperature 1).
      use_cache: False runs the full model for every token (the reference).
      max_length: the result's length, prompt included, `<= seq_len + 1`.
      sampler: a `generation.Sampler` or `"greedy"`, `"random"`, `"top_k"`,
        `"top_p"` (instead of temperature, top_k, top_p, seed).
      stop_token_ids: ids that end a row (kept; pad_token_id follows).
      pad_token_id: fills a row after its stop token.
      return_text: return UTF-8 text (byte-level models).

    Returns:
      int32 `[batch, max_length]` (`[max_length]` for a 1-D prompt); a list
      of rows for prompts of different lengths; str with return_text.

    Raises:
      ValueError: for a prompt that is not integer tokens of the right shape
        and range, or arguments out of range.

    Example:

    >>> lm.generate(prompt, 64, temperature=0.8, top_k=40, seed=0)   # doctest: +SKIP
    >>> lm.generate("Once upon", max_length=128, sampler="greedy",   # doctest: +SKIP
    ...             stop_token_ids=[10], return_text=True)
    """
    from sparse_attention_tf import generation
    settings = {k: v for k, v in (("temperature", temperature), ("top_k", top_k),
                                  ("top_p", top_p), ("seed", seed)) if v is not None}
    if sampler is not None and settings:
      raise ValueError(f"{type(self).__name__}.generate: give a sampler or its settings "
                       f"({', '.join(settings)}), not both.")
    if sampler is None:
      sampler = generation.Sampler(**settings)
    return generation.generate(self, prompt, num_tokens, max_length=max_length, sampler=sampler,
                               stop_token_ids=stop_token_ids, pad_token_id=pad_token_id,
                               return_text=return_text, use_cache=use_cache)

  def sample_images(self, count: int, bos: int, *, prompt=None, sampler=None):
    """Samples whole images: int32 `[count, height, width, channels]` pixel tokens.

    Needs `image_shape`. Each image starts from the start token `bos` that
    the training data put before the first pixel (`data.image_pairs`);
    `prompt` (pixels `[P]` or `[count, P]`) gives the first pixels of each
    image to complete. `sampler` as in `generate` (image b draws with seed + b).
    See `generation.sample_images`.
    """
    from sparse_attention_tf import generation
    return generation.sample_images(self, count, bos, prompt=prompt, sampler=sampler)

  # The decoding interface of sparse_attention_tf.generation.
  def prefill(self, tokens, position):
    """The prompt in one pass: int32 tokens `[B, L]` (L <= seq_len), position an int32 scalar.

    Returns:
      (logits `[B, V]` at `position`, caches: per block (keys, values)
      `[H, L, B, K|V]`, what `decode_step` reads once padded to seq_len).
    """
    x = self.token_embedding(tokens)                                      # (B, N, D)
    x = self.position_embedding(x)                                        # (B, N, D)
    caches = []
    for block in self.blocks:
      x, k, v = block.prefill(x)                                          # (B, N, D), (B, N, H, K|V)
      caches.append((tf.transpose(k, [2, 1, 0, 3]), tf.transpose(v, [2, 1, 0, 3])))
    x = tf.gather(x, position, axis=1)[:, None]                           # (B, 1, D)
    return self.head(self.final_norm(x))[:, 0], caches                    # (B, V)

  def prefill_lengths(self) -> list:
    """Prefix lengths on which `prefill` is exact (`generation.exact_prefill_lengths`)."""
    if "_prefill_lengths" not in self.__dict__:
      from sparse_attention_tf import generation
      object.__setattr__(self, "_prefill_lengths",
                         generation.exact_prefill_lengths(self.blocks, self.seq_len))
    return self._prefill_lengths

  def decode_step(self, token, position, caches):
    """One position with the caches: token int32 `[B]`, position int32 scalar.

    Returns:
      (logits `[B, V]` for the next token, the updated caches).
    """
    x = self.token_embedding(token[:, None])                              # (B, 1, D)
    x = self.position_embedding(x, start_index=position)                  # (B, 1, D)
    tables = {}
    new_caches = []
    for block, cache in zip(self.blocks, caches):
      table = block.attention.decode_table(self.seq_len)                  # (N, H, W) NumPy
      if id(table) not in tables:
        tables[id(table)] = tf.gather(tf.constant(table), position)       # (H, W)
      x, cache = block.decode_step(x, cache, position, tables[id(table)])  # (B, 1, D)
      new_caches.append(cache)
    return self.head(self.final_norm(x))[:, 0], new_caches                # (B, V)

  def logits_stream(self, out, prompt_len: int, num_tokens: int, use_cache: bool = True):
    """Yields the next-token logits `[B, V]` after positions `prompt_len - 1` onwards.

    With the cache: `prefill` on the prompt (eager; on the shortest of
    `prefill_lengths()` and seq_len that holds it, zero-padded), then one
    call of a `tf.function` of `decode_step` per position, traced once per
    model (any batch) and kept. One Python-driven call per token: for teacher-forced
    scoring with the cache, and for samplers written in Python; `generate`
    runs the compiled loop of `sparse_attention_tf.generation` instead.

    Args:
      out: int32 NumPy `[B, prompt_len + num_tokens]`; positions `< prompt_len`
        hold the prompt, and the caller writes position `prompt_len + s`
        after the s-th yield (the sampled token, or a known one).
      prompt_len: positions known before the first yield, `>= 1`.
      num_tokens: number of yields; `prompt_len + num_tokens - 1 <= seq_len`.
      use_cache: cached decoding (one pattern row per step) or a full forward
        pass per step.

    Yields:
      float32 `[B, V]` logits for the token at `prompt_len + s`, s = 0, 1, ...

    Raises:
      ValueError: (at the first `next`) for prompt_len < 1, num_tokens < 0
        or `prompt_len + num_tokens - 1 > seq_len`.
    """
    if prompt_len < 1 or num_tokens < 0 or prompt_len + num_tokens - 1 > self.seq_len:
      raise ValueError(f"{type(self).__name__}.logits_stream: needs prompt_len >= 1, num_tokens "
                       f">= 0 and prompt_len + num_tokens - 1 <= seq_len ({self.seq_len}), got "
                       f"prompt_len={prompt_len}, num_tokens={num_tokens}.")
    if num_tokens == 0:
      return
    batch = out.shape[0]
    if not use_cache:
      forward = tf.function(lambda t: self(t, training=False))
      for pos in range(prompt_len - 1, prompt_len - 1 + num_tokens):
        padded = np.zeros((batch, self.seq_len), np.int32)
        padded[:, :pos + 1] = out[:, :pos + 1]
        yield forward(padded)[:, pos]
      return
    from sparse_attention_tf import generation
    length = min(n for n in generation.prefill_lengths(self) if n >= prompt_len)
    padded = np.zeros((batch, length), np.int32)
    padded[:, :prompt_len] = out[:, :prompt_len]                          # (B, L)
    logits, caches = generation.padded_prefill(self, tf.constant(padded),
                                               tf.constant(prompt_len - 1, tf.int32))
    yield logits                                                          # (B, V)
    step = self._decode_step_function()
    for pos in range(prompt_len, prompt_len - 1 + num_tokens):
      logits, caches = step(tf.constant(out[:, pos], tf.int32), tf.constant(pos, tf.int32),
                            caches)                                       # (B, V)
      yield logits

  def _decode_step_function(self):
    """`decode_step` as a tf.function for any batch, built on first use and kept on the model."""
    step = self.__dict__.get("_decode_step_fn")
    if step is None:
      specs = []
      for block in self.blocks:
        attn = block.attention
        specs.append((
            tf.TensorSpec([attn.num_heads, self.seq_len, None, attn.key_dim], attn.compute_dtype),
            tf.TensorSpec([attn.num_heads, self.seq_len, None, attn.value_dim],
                          attn.compute_dtype)))
      step = tf.function(self.decode_step, input_signature=[
          tf.TensorSpec([None], tf.int32, name="token"),
          tf.TensorSpec([], tf.int32, name="position"), specs])
      object.__setattr__(self, "_decode_step_fn", step)
    return step
