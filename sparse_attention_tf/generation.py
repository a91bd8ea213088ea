"""Fast autoregressive sampling: the prompt in one pass, then a compiled decoding loop.

`generate(model, prompt, ...)` runs one `tf.function`, traced once per model
and reused by every later call (any batch, prompt length, sampler settings or
seed: all are tensors):

1. Prefill: the prompt goes through the model once with the fused attention
   op, which fills every block's key/value cache and gives the logits at the
   last position of the shortest prompt. It runs on the shortest of seq_len,
   seq_len / 2, ... (down to seq_len / 64) that holds that prompt, one branch
   each in the one trace, where the patterns allow (`exact_prefill_lengths`).
2. Decode: a `tf.while_loop` adds one position per iteration; each block
   reads only the keys its pattern row keeps, looked up in a `[N, H, W]`
   table built once in NumPy (`SparseMultiHeadAttention.decode_table`).
   Rows whose prompt is longer copy their prompt tokens until it ends;
   rows that sample a stop token are padded from then on, and the loop ends
   when every row has stopped.
3. Sampling, in the graph: greedy (temperature 0), temperature, top-k and
   top-p (nucleus), each setting per row, from a counter-based hash of (the
   row's seed, the position, the token id), so a seed reproduces the tokens
   and a row's tokens never depend on the other rows of its batch (row b of
   a `generate` call draws with seed + b).

`Generator.generate_rows` is the graph; `export.export_saved_model` puts it in
the SavedModel's `generate` signature, the same computation.

The model is anything with the decoding interface (`SparseTransformer`, or a
functional model wrapped in `SparseCausalLM`):

    seq_len, vocab_size                     ints
    prefill(tokens, position)               tokens int32 [B, L] -> (logits [B, V]
                                            at `position`, caches [H, L, B, K|V])
    prefill_lengths()                       optional: prefix lengths L < N on
                                            which prefill is exact
    decode_step(token, position, caches)    token int32 [B], position int32 scalar
                                            -> (logits [B, V], caches)

Dimension letters: B batch, N seq_len, V vocabulary, H heads, W keys per row.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Optional

import numpy as np
import tensorflow as tf

SAMPLERS = ("greedy", "random", "top_k", "top_p")


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How the next token is picked from the logits.

  Args:
    temperature: logits are divided by it; 0 picks the most likely token (greedy).
    top_k: sample among the k most likely tokens only (None or 0: all).
    top_p: sample among the most likely tokens whose probabilities sum to at
      least p (nucleus sampling, after top_k; None or 1: all).
    seed: an int makes the samples reproducible (None: a fresh seed per call);
      row b of a batch draws with seed + b, so a row gives the same tokens
      alone as in a batch.

  Tokens whose logit ties the k-th (or the nucleus' last) are kept too.
  """
  temperature: float = 1.0
  top_k: Optional[int] = None
  top_p: Optional[float] = None
  seed: Optional[int] = None

  @classmethod
  def get(cls, sampler) -> "Sampler":
    """A Sampler from a Sampler, None (plain sampling) or a name in `SAMPLERS`.

    The names follow keras-hub: `"greedy"`, `"random"`, `"top_k"` (k=5),
    `"top_p"` (p=0.1).
    """
    if sampler is None or isinstance(sampler, cls):
      return sampler or cls()
    named = {"greedy": cls(temperature=0.0), "random": cls(), "top_k": cls(top_k=5),
             "top_p": cls(top_p=0.1)}
    if isinstance(sampler, str) and sampler in named:
      return named[sampler]
    raise ValueError(f"sampler must be a Sampler or one of {SAMPLERS}, got {sampler!r}.")

  def check(self, vocab_size: int) -> None:
    """Raises a ValueError naming the argument that is out of range."""
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}.")
    if self.top_k is not None and not 0 <= self.top_k <= vocab_size:
      raise ValueError(f"top_k must be in [0, {vocab_size}] (the vocabulary; 0 or None: no "
                       f"limit), got {self.top_k}.")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")


def sample_tokens(logits, temperature, top_k, top_p, seed, position=0):
  """One token per row from `logits` `[B, V]`: int32 `[B]`. Graph-friendly.

  Args:
    logits: `[B, V]`.
    temperature: float, a scalar or one per row `[B]`; 0 gives the argmax.
    top_k: int32, a scalar or `[B]`; 0 for no limit.
    top_p: float, a scalar or `[B]`; >= 1 for no limit.
    seed: int32, a scalar or `[B]`: row b's draw is a pure function of
      (seed[b], position, logits[b]), whatever the row's place in the batch.
    position: int32 scalar, the position the token is drawn for.
  """
  logits = tf.cast(logits, tf.float32)                                    # (B, V)
  batch, vocab = tf.shape(logits)[0], tf.shape(logits)[1]

  def per_row(value, dtype):
    return tf.broadcast_to(tf.cast(value, dtype), [batch])[:, None]       # (B, 1)

  temperature = per_row(temperature, tf.float32)
  top_k, top_p = per_row(top_k, tf.int32), per_row(top_p, tf.float32)
  greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)               # (B,)
  scaled = logits / tf.maximum(temperature, 1e-30)                        # (B, V)
  ranked = tf.sort(scaled, axis=-1, direction="DESCENDING")               # (B, V)
  rank = tf.range(vocab)[None]                                            # (1, V)
  k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)                # (B, 1)
  in_k = rank < k                                                         # (B, V)
  probs = tf.nn.softmax(tf.where(in_k, ranked, -np.inf), axis=-1)         # (B, V)
  before = tf.cumsum(probs, axis=-1, exclusive=True)                      # mass ranked above
  keep = tf.logical_and(in_k, tf.logical_or(before < top_p, top_p >= 1.0))  # (B, V)
  kept = tf.maximum(tf.reduce_sum(tf.cast(keep, tf.int32), axis=-1), 1)   # (B,)
  threshold = tf.gather(ranked, kept - 1, axis=1, batch_dims=1)[:, None]  # (B, 1)
  masked = tf.where(scaled >= threshold, scaled, -np.inf)                 # (B, V)
  uniform = _uniform(vocab, per_row(seed, tf.int32)[:, 0], position)     # (B, V)
  gumbel = -tf.math.log(-tf.math.log(uniform))                            # (B, V)
  sampled = tf.argmax(masked + gumbel, axis=-1, output_type=tf.int32)     # Gumbel-max
  return tf.where(temperature[:, 0] > 0, sampled, greedy)                 # (B,)


_MASK32 = 0xFFFFFFFF


def _hash(x):
  """A 32-bit integer mix (after C. Wellons' hash32), in int64 so that no product overflows."""
  for shift, factor in ((16, 0x7FEB352D), (15, 0x297A2D39), (16, None)):
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, shift))
    if factor:
      x = tf.bitwise.bitwise_and(x * factor, _MASK32)
  return x


def _uniform(vocab, seeds, position):
  """Uniform (0, 1) float32 `[B, vocab]`; row b a pure function of (seeds[b], position).

  A counter-based hash rather than `tf.random.stateless_*`, whose streams
  differ under XLA: the compiled decoding loop and the uncached reference
  must draw the same numbers.
  """
  seeds = tf.bitwise.bitwise_and(tf.cast(seeds, tf.int64), _MASK32)      # (B,)
  position = tf.cast(position, tf.int64)
  key = _hash(tf.bitwise.bitwise_and(_hash(seeds) + position * 0x9E3779B1, _MASK32))  # (B,)
  counter = tf.range(tf.cast(vocab, tf.int64))[None]                      # (1, V)
  bits = _hash(tf.bitwise.bitwise_and(counter * 0x2545F491 + key[:, None], _MASK32))
  bits = _hash(tf.bitwise.bitwise_xor(bits, key[:, None]))               # (B, V)
  return (tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) + 0.5) / 2.0**24


def _advance(pos, logits, tokens, done, ends, rows):
  """Writes the token at pos + 1: the prompt's, a sample, or padding.

  A row is done once it sampled a stop token or reached its limit.
  Returns the new (tokens `[B, N + 1]`, done `[B]`, ends `[B]`).
  """
  lengths, limits, temperature, top_k, top_p, seeds, stop_token_ids, pad_token_id = rows
  nxt = pos + 1
  sampled = sample_tokens(logits, temperature, top_k, top_p, seeds, pos)  # (B,)
  in_prompt = nxt < lengths                                               # (B,)
  active = tf.logical_not(tf.logical_or(in_prompt, tf.logical_or(done, nxt >= limits)))
  new = tf.where(in_prompt, tokens[:, nxt], tf.where(active, sampled, pad_token_id))
  stop = tf.logical_and(active, tf.reduce_any(sampled[:, None] == stop_token_ids[None], axis=-1))
  tokens = tf.where(tf.range(tf.shape(tokens)[1])[None] == nxt, new[:, None], tokens)
  done = tf.logical_or(tf.logical_or(done, stop), nxt + 1 >= limits)
  return tokens, done, tf.where(stop, nxt + 1, ends)


def prefill_lengths(model) -> list:
  """The lengths `model.prefill` may run on, ascending: its exact prefix lengths
  (`model.prefill_lengths()`, when it has them) and seq_len."""
  n = int(model.seq_len)
  return sorted(set(getattr(model, "prefill_lengths", lambda: [n])()) | {n})


def padded_prefill(model, tokens, position):
  """`model.prefill(tokens [B, L], position)` with its caches padded to seq_len:
  (logits `[B, V]`, per block (keys, values) `[H, N, B, K|V]`), what `decode_step` reads."""
  pad = [[0, 0], [0, int(model.seq_len) - tokens.shape[1]], [0, 0], [0, 0]]
  logits, caches = model.prefill(tokens, position)
  return logits, [(tf.pad(k, pad), tf.pad(v, pad)) for k, v in caches]


class Generator:
  """The compiled prefill + decoding loop of one model; see the module docstring.

  `generate` builds one per model and keeps it, so later calls reuse the
  trace. `traces` counts how often the function was traced.
  """

  def __init__(self, model, jit_compile: bool = True):
    for name in ("seq_len", "vocab_size", "prefill", "decode_step"):
      if not hasattr(model, name):
        raise TypeError(f"{type(model).__name__} has no {name!r}: generation needs seq_len, "
                        f"vocab_size, prefill and decode_step (wrap a functional model in "
                        f"sparse_attention_tf.generation.SparseCausalLM).")
    self.model = model
    self.traces = 0
    # The decoding loop through XLA: caches updated in place, the small per-step ops fused.
    self._decode = tf.function(self._decode_loop, jit_compile=jit_compile, autograph=False)
    n = int(model.seq_len)
    self.function = tf.function(self.generate_rows, autograph=False, input_signature=[
        tf.TensorSpec([None, None], tf.int32, name="tokens"),
        tf.TensorSpec([None], tf.int32, name="lengths"),
        tf.TensorSpec([None], tf.int32, name="limits"),
        tf.TensorSpec([None], tf.float32, name="temperature"),
        tf.TensorSpec([None], tf.int32, name="top_k"),
        tf.TensorSpec([None], tf.float32, name="top_p"),
        tf.TensorSpec([None], tf.int32, name="seed"),
        tf.TensorSpec([None], tf.int32, name="stop_token_ids"),
        tf.TensorSpec([], tf.int32, name="pad_token_id"),
    ])

  def generate_rows(self, tokens, lengths, limits, temperature, top_k, top_p, seed,
                    stop_token_ids, pad_token_id):
    """The graph of `function`: every sampler setting per row. Unchecked: callers check.

    Args:
      tokens: int32 `[B, L]`, `L <= seq_len + 1`, row b's prompt in `[:lengths[b]]`.
      lengths: int32 `[B]`, `1 <= lengths <= L`.
      limits: int32 `[B]`, each row's length when done, `lengths <= limits <= seq_len + 1`.
      temperature, top_k, top_p, seed: `[B]`, each row's sampler (see `sample_tokens`).
      stop_token_ids: int32 `[S]`, ids that end a row (kept in it).
      pad_token_id: int32 scalar, what follows a row's end.

    Returns:
      (tokens int32 `[B, max(limits)]`, padded with pad_token_id after each
      row's end; ends int32 `[B]`, each row's length: its limit, or up to and
      including its stop token).
    """
    self.traces += 1
    n = int(self.model.seq_len)
    batch = tf.shape(tokens)[0]
    tokens = tf.pad(tokens, [[0, 0], [0, n + 1 - tf.shape(tokens)[1]]])
    tokens = tf.ensure_shape(tokens, [None, n + 1])                       # (B, N + 1)
    rows = (lengths, limits, temperature, top_k, top_p, seed, stop_token_ids, pad_token_id)
    start = tf.reduce_min(lengths)
    logits, caches = self._prefill(tokens[:, :n], start)                  # (B, V)
    done = tf.zeros([batch], tf.bool)
    tokens, done, ends = _advance(start - 1, logits, tokens, done, limits, rows)
    tokens, ends = self._decode(start, tokens, done, ends, caches, rows)
    columns = tf.range(n + 1)[None]                                       # (1, N + 1)
    tokens = tf.where(columns >= ends[:, None], pad_token_id, tokens)     # (B, N + 1)
    return tokens[:, :tf.reduce_max(limits)], ends

  def _prefill(self, tokens, start):
    """`padded_prefill` on the shortest of `prefill_lengths(model)` that holds positions < start.

    One branch per length; each pads its caches to seq_len, so the branches agree.
    """
    lengths = prefill_lengths(self.model)

    def prefill_at(length):
      return lambda: padded_prefill(self.model, tokens[:, :length], start - 1)

    if len(lengths) == 1:
      return prefill_at(lengths[0])()
    branch = tf.reduce_sum(tf.cast(tf.constant(lengths[:-1]) < start, tf.int32))
    return tf.switch_case(branch, [prefill_at(length) for length in lengths])

  def _decode_loop(self, start, tokens, done, ends, caches, rows):
    """Decoding steps from position `start` until every row is done."""
    last = tf.reduce_max(rows[1]) - 1

    def cond(pos, tokens, done, ends, caches):
      return tf.logical_and(pos < last, tf.logical_not(tf.reduce_all(done)))

    def body(pos, tokens, done, ends, caches):
      logits, caches = self.model.decode_step(tokens[:, pos], pos, caches)  # (B, V)
      tokens, done, ends = _advance(pos, logits, tokens, done, ends, rows)
      return pos + 1, tokens, done, ends, caches

    _, tokens, _, ends, _ = tf.while_loop(cond, body, (start, tokens, done, ends, caches),
                                          parallel_iterations=1)
    return tokens, ends

  def __call__(self, tokens, lengths, max_length, sampler, stop_token_ids=(), pad_token_id=0):
    """Runs the compiled function on NumPy inputs; returns NumPy (tokens, lengths).

    Args:
      tokens: int32 `[B, L]`, `L <= seq_len + 1`, row b's prompt in `[:lengths[b]]`.
      lengths: `[B]` prompt lengths, `1 <= lengths <= max_length`.
      max_length: total length of the result, `<= seq_len + 1`.
      sampler: a `Sampler`; row b draws with seed `sampler.seed + b`.
      stop_token_ids: token ids that end a row (kept in the result).
      pad_token_id: what follows a stop token.
    """
    out, ends = self.function(*_row_inputs(tokens, lengths, max_length, sampler, stop_token_ids,
                                            pad_token_id))
    return out.numpy(), ends.numpy()


def _row_seeds(sampler: "Sampler", batch: int) -> np.ndarray:
  """Row b's seed: sampler.seed + b, wrapped to int32 (what an int32 seed input holds:
  the export's seed s equals the Python seed s); a fresh random seed for None."""
  seed = sampler.seed if sampler.seed is not None else secrets.randbits(31)
  seeds = (int(seed) + np.arange(batch, dtype=object)) % 2**32            # Python ints
  return np.array([int(v) for v in seeds], np.uint32).view(np.int32)


def _row_inputs(tokens, lengths, max_length, sampler, stop_token_ids, pad_token_id) -> list:
  """The tensors of `Generator.function` for one sampler and max_length for every row."""
  batch = len(tokens)
  def full(value, dtype):
    return tf.constant(np.full(batch, value, dtype))
  return [tf.constant(np.asarray(tokens, np.int32)), tf.constant(np.asarray(lengths, np.int32)),
          full(max_length, np.int32), full(sampler.temperature, np.float32),
          full(sampler.top_k or 0, np.int32),
          full(1.0 if sampler.top_p is None else sampler.top_p, np.float32),
          tf.constant(_row_seeds(sampler, batch)),
          tf.constant(np.asarray(stop_token_ids, np.int32).reshape(-1)),
          tf.constant(pad_token_id, tf.int32)]


def reference_generate(model, tokens, lengths, max_length, sampler, stop_token_ids=(),
                       pad_token_id=0):
  """What `Generator` computes, with one full forward pass per new token (slow; for tests).

  Same arguments and results as `Generator.__call__`; the same sampling
  function and seeds, so equal logits give equal tokens.
  """
  n = int(model.seq_len)
  tokens = np.asarray(tokens, np.int32)
  lengths = np.asarray(lengths, np.int32)
  batch = tokens.shape[0]
  out = np.zeros((batch, n + 1), np.int32)
  out[:, :tokens.shape[1]] = tokens
  seeds = tf.constant(_row_seeds(sampler, batch))
  forward = tf.function(lambda t: model(t, training=False))
  done = np.zeros(batch, bool)
  ends = np.full(batch, max_length, np.int32)
  stops = np.asarray(stop_token_ids, np.int32).reshape(-1)
  for pos in range(int(lengths.min()) - 1, max_length - 1):
    if done.all():
      break
    padded = np.where(np.arange(n)[None] <= pos, out[:, :n], 0)
    logits = forward(tf.constant(padded))[:, pos]                         # (B, V)
    sampled = sample_tokens(logits, sampler.temperature, sampler.top_k or 0,
                            1.0 if sampler.top_p is None else sampler.top_p, seeds,
                            pos).numpy()
    in_prompt = pos + 1 < lengths
    stop = np.isin(sampled, stops) & ~in_prompt & ~done
    out[:, pos + 1] = np.where(in_prompt, out[:, pos + 1], np.where(done, pad_token_id, sampled))
    ends = np.where(stop, pos + 2, ends)
    done |= stop
  out = np.where(np.arange(n + 1)[None] >= ends[:, None], pad_token_id, out)[:, :max_length]
  return out, ends


def generator(model) -> Generator:
  """The model's Generator, built on first use and kept on the model.

  For a `SparseCausalLM` it is kept on the wrapped Keras model, so a new
  wrapper of the same model reuses the trace.
  """
  holder = model.model if isinstance(model, SparseCausalLM) else model
  gen = holder.__dict__.get("_sparse_attention_generator")
  if gen is None:
    gen = Generator(model)
    object.__setattr__(holder, "_sparse_attention_generator", gen)
  return gen


def _prompt_rows(prompt, vocab_size: int, where: str):
  """(rows: list of int32 arrays, text: bool, batched: bool, ragged: bool) from any prompt form."""
  from sparse_attention_tf.models.sparse_transformer import check_token_dtype
  single = isinstance(prompt, (str, bytes))
  items = [prompt] if single else prompt
  if isinstance(items, (list, tuple)) and items and all(isinstance(p, (str, bytes))
                                                       for p in items):
    if vocab_size < 256:
      raise ValueError(f"{where}: text prompts need a byte-level model (vocab_size >= 256), "
                       f"got vocab_size={vocab_size}; pass token ids instead.")
    rows = [np.frombuffer(p.encode("utf-8") if isinstance(p, str) else p, np.uint8)
            .astype(np.int32) for p in items]
    return rows, True, not single, len({len(r) for r in rows}) > 1
  if isinstance(prompt, tf.RaggedTensor):
    prompt = prompt.to_list()
  if isinstance(prompt, (list, tuple)) and prompt and all(np.ndim(p) == 1 for p in prompt) \
      and len({len(p) for p in prompt}) > 1:
    rows = [np.asarray(p) for p in prompt]
    for r in rows:
      check_token_dtype(r, where)
    return [r.astype(np.int64) for r in rows], False, True, True
  tokens = np.asarray(prompt)
  check_token_dtype(tokens, where)
  if tokens.ndim not in (1, 2) or min(tokens.shape) < 1:
    raise ValueError(f"{where}: prompt must be int tokens [batch >= 1, length >= 1] or "
                     f"[length >= 1], got shape {np.shape(prompt)}.")
  batched = tokens.ndim == 2
  return list(np.atleast_2d(tokens).astype(np.int64)), False, batched, False


def generate(model, prompt, num_tokens: Optional[int] = None, *, max_length: Optional[int] = None,
             sampler=None, stop_token_ids=None, pad_token_id: int = 0,
             return_text: bool = False, use_cache: bool = True):
  """Continues `prompt` with tokens sampled from `model` (see the module docstring).

  Args:
    model: a model with the decoding interface (`SparseTransformer`, `SparseCausalLM`).
    prompt: int tokens `[P]` or `[batch, P]`; a list of rows of different
      lengths (or a `tf.RaggedTensor`); or, for byte-level models
      (vocab_size >= 256), a str / bytes or a list of them (UTF-8 bytes).
    num_tokens: tokens to add after the longest prompt (the result is `max_length
      = P_max + num_tokens` long). Give this or max_length.
    max_length: length of the result, prompt included, `<= seq_len + 1` (the
      last token is predicted from position seq_len - 1). Shorter prompts get
      more new tokens.
    sampler: a `Sampler` or a name in `SAMPLERS` (default: `Sampler()`, plain sampling).
    stop_token_ids: ids that end a row (the stop token is kept, then
      `pad_token_id` follows); the loop ends when every row has stopped.
    pad_token_id: fills rows after their stop token.
    return_text: decode each row (cut after its stop token) as UTF-8 text
      (byte-level models only; invalid bytes are replaced).
    use_cache: False runs the full model for every new token (the reference).

  Returns:
    int32 `[batch, max_length]` (`[max_length]` for a 1-D prompt or one
    string); for prompts of different lengths, a list of int32 rows, each
    cut after its stop token; with return_text, a str (or a list of str).

  Raises:
    ValueError: for prompts that are not integer tokens in `[0, vocab_size)`,
      lengths out of range, or sampler settings out of range.
  """
  where = f"{type(model).__name__}.generate"
  seq_len, vocab_size = int(model.seq_len), int(model.vocab_size)
  rows, text, batched, ragged = _prompt_rows(prompt, vocab_size, where)
  lengths = np.array([len(r) for r in rows], np.int32)
  longest = int(lengths.max())
  if min(lengths) < 1:
    raise ValueError(f"{where}: every prompt needs at least one token, got lengths "
                     f"{lengths.tolist()}.")
  if (num_tokens is None) == (max_length is None):
    raise ValueError(f"{where}: give exactly one of num_tokens and max_length, got "
                     f"{num_tokens} and {max_length}.")
  if num_tokens is not None and num_tokens < 0:
    raise ValueError(f"{where}: num_tokens must be >= 0, got {num_tokens}.")
  max_length = longest + num_tokens if max_length is None else int(max_length)
  if not longest <= max_length <= seq_len + 1:
    raise ValueError(f"{where}: max_length ({max_length}, prompt length {longest} + new tokens) "
                     f"must be >= the prompt length and <= seq_len + 1 ({seq_len + 1}): the last "
                     f"token is predicted from position seq_len - 1.")
  low, high = min(int(r.min()) for r in rows), max(int(r.max()) for r in rows)
  if low < 0 or high >= vocab_size:
    raise ValueError(f"{where}: prompt tokens must be in [0, {vocab_size}), got values from "
                     f"{low} to {high}.")
  if return_text and vocab_size < 256:
    raise ValueError(f"{where}: return_text needs a byte-level model (vocab_size >= 256).")
  sampler = Sampler.get(sampler)
  sampler.check(vocab_size)
  stops = np.asarray([] if stop_token_ids is None else stop_token_ids, np.int32).reshape(-1)

  tokens = np.zeros((len(rows), longest), np.int32)
  for b, r in enumerate(rows):
    tokens[b, :len(r)] = r
  if max_length == lengths.min():                         # nothing to add to any row
    out = np.zeros((len(rows), max_length), np.int32) + pad_token_id
    out[:, :longest] = tokens
    ends = lengths
  elif use_cache:
    out, ends = generator(model)(tokens, lengths, max_length, sampler, stops, pad_token_id)
  else:
    out, ends = reference_generate(model, tokens, lengths, max_length, sampler, stops,
                                   pad_token_id)
  if return_text:
    texts = [bytes(np.clip(row[:end], 0, 255).astype(np.uint8)).decode("utf-8", "replace")
             for row, end in zip(out, ends)]
    return texts if batched else texts[0]
  if ragged:
    return [row[:end] for row, end in zip(out, ends)]
  return out if batched else out[0]


def sample_images(model, count: int, bos: int, *, prompt=None, sampler=None, image_shape=None):
  """Samples whole images from an image model: int32 `[count, height, width, channels]`.

  Each image is a sequence of `seq_len = height * width * channels` pixel
  tokens (raster order, channels innermost) after the start token `bos`,
  the layout `data.image_pairs` trains on.

  Args:
    model: a model with the decoding interface (`SparseTransformer`, `SparseCausalLM`).
    count: images to sample (the batch).
    bos: the start token the training data put before the first pixel.
    prompt: optional pixel tokens `[P]` (shared) or `[count, P]`, `P < seq_len`:
      the first pixels of each image, completed by the model.
    sampler: a `Sampler` or a name in `SAMPLERS` (default: plain sampling);
      image b draws with seed + b.
    image_shape: `(height, width, channels)`; default `model.image_shape`.

  Raises:
    ValueError: no image shape, or one that does not hold seq_len pixels; bad
      count, bos or prompt.
  """
  where = f"{type(model).__name__}.sample_images"
  seq_len, vocab_size = int(model.seq_len), int(model.vocab_size)
  shape = tuple(image_shape or getattr(model, "image_shape", None) or ())
  if len(shape) != 3 or int(np.prod(shape)) != seq_len:
    raise ValueError(f"{where}: needs image_shape (height, width, channels) with height * width "
                     f"* channels = seq_len ({seq_len}), got {shape or None}.")
  if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
    raise ValueError(f"{where}: count must be a positive integer, got {count!r}.")
  if isinstance(bos, bool) or not isinstance(bos, (int, np.integer)) or \
      not 0 <= bos < vocab_size:
    raise ValueError(f"{where}: bos must be a token in [0, {vocab_size}), got {bos!r}.")
  pixels = np.zeros((count, 0), np.int64) if prompt is None else np.asarray(prompt)
  from sparse_attention_tf.models.sparse_transformer import check_token_dtype
  check_token_dtype(pixels, where)
  if pixels.ndim == 1:
    pixels = np.broadcast_to(pixels, (count, len(pixels)))
  if pixels.ndim != 2 or pixels.shape[0] != count or pixels.shape[1] >= seq_len:
    raise ValueError(f"{where}: prompt must be pixels [P] or [count={count}, P] with P < "
                     f"seq_len ({seq_len}), got shape {np.shape(prompt)}.")
  tokens = np.concatenate([np.full((count, 1), bos), pixels], axis=1)   # (count, 1 + P)
  out = generate(model, tokens, max_length=seq_len + 1, sampler=sampler)  # (count, N + 1)
  return out[:, 1:].reshape((count,) + shape)


def exact_prefill_lengths(blocks, seq_len: int) -> list:
  """Prefix lengths L (seq_len / 2, / 4, ..., down to max(16, seq_len / 64)) on which
  every block's attention gives the rows `< L` of its seq_len mask (its padded
  mask agrees there).

  Patterns whose keys do not depend on the sequence length (fixed, strided,
  local, dense) qualify; a layout drawn per length (BigBird's random blocks)
  may not, and then only seq_len is used.
  """
  lengths, length = [], seq_len // 2
  while length >= max(16, seq_len // 64) and 2 * length <= seq_len:
    lengths.append(length)
    length //= 2
  good = []
  for length in lengths:
    ok = True
    for block in blocks:
      attention = block.attention
      try:
        padded = attention.padded_length(length)
      except ValueError:
        ok = False
        break
      full = attention.pattern.mask(seq_len)[:, :length, :length]
      ok = ok and np.array_equal(attention.pattern.mask(padded)[:, :length, :length], full)
    if ok:
      good.append(length)
  return good


# Layers that act on each position alone: the decoding step runs them on one position.
_PER_POSITION = ("Embedding", "LayerNormalization", "Dense", "Dropout", "Activation",
                 "Identity", "RMSNormalization")


class SparseCausalLM:
  """Generation for your own functional language model built from our layers.

  The model must be a chain (each layer feeding the next) from
  `keras.Input((seq_len,), dtype="int32")` to logits `[batch, seq_len,
  vocab]`, of: `keras.layers.Embedding`, a position embedding
  (`PositionEmbedding`, `ImagePositionEmbedding`, `StridedPositionEmbedding`),
  `SparseTransformerBlock`s with causal patterns, and per-position layers
  (`LayerNormalization`, `Dense`, `Dropout`, `Activation`). Anything else
  raises a ValueError naming the layer. The wrapper shares the model's
  weights; it provides the decoding interface (see the module docstring).

  Args:
    model: the functional `keras.Model`.

  Example:

  >>> tokens = keras.Input((64,), dtype="int32")              # doctest: +SKIP
  >>> x = keras.layers.Embedding(256, 32)(tokens)
  >>> x = sat.layers.PositionEmbedding(64)(x)
  >>> x = sat.SparseTransformerBlock(4, sat.Fixed(16, 4), block_size=16)(x)
  >>> logits = keras.layers.Dense(256)(keras.layers.LayerNormalization()(x))
  >>> lm = SparseCausalLM(keras.Model(tokens, logits))
  >>> lm.generate("Hello", max_length=40, sampler="greedy", return_text=True)
  """

  def __init__(self, model):
    from sparse_attention_tf.layers.block import SparseTransformerBlock
    from sparse_attention_tf.layers.embeddings import _PositionEmbeddingBase
    name = type(model).__name__
    inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
    if not inputs or len(inputs) != 1 or len(outputs) != 1 or len(inputs[0].shape) != 2 or \
        inputs[0].shape[1] is None or len(outputs[0].shape) != 3:
      raise ValueError(f"SparseCausalLM needs a functional model from keras.Input((seq_len,)) "
                       f"to logits [batch, seq_len, vocab], got {name} with inputs "
                       f"{[tuple(i.shape) for i in inputs or []]}.")
    self.model = model
    self.seq_len = int(inputs[0].shape[1])
    self.vocab_size = int(outputs[0].shape[-1])
    self.layers = [l for l in model.layers if type(l).__name__ != "InputLayer"]
    previous = inputs[0]
    for layer in self.layers:
      if layer.input is not previous:
        raise ValueError(f"SparseCausalLM needs a chain of layers, each fed by the one before; "
                         f"{layer.name} is not fed by the layer before it.")
      previous = layer.output
      is_block = isinstance(layer, SparseTransformerBlock)
      if is_block and not layer.pattern.causal:
        raise ValueError(f"{layer.name}: generation needs causal patterns, got "
                         f"{layer.pattern!r}.")
      if not (is_block or isinstance(layer, _PositionEmbeddingBase)
              or type(layer).__name__ in _PER_POSITION):
        raise ValueError(f"SparseCausalLM cannot decode through {layer.name} "
                         f"({type(layer).__name__}): use SparseTransformerBlock, a position "
                         f"embedding, or per-position layers ({', '.join(_PER_POSITION)}).")
    if previous is not outputs[0]:
      raise ValueError("SparseCausalLM: the model's output is not the last layer's output.")
    for layer in self.layers:
      if type(layer).__name__ == "Embedding" and layer.input_dim < self.vocab_size:
        raise ValueError(f"SparseCausalLM: {layer.name} looks up {layer.input_dim} token ids, "
                         f"but the model predicts {self.vocab_size}: a sampled id could not be "
                         f"fed back. Give the Embedding input_dim >= the logits' size.")
    self._blocks = [l for l in self.layers if isinstance(l, SparseTransformerBlock)]
    self._position_layers = tuple(l for l in self.layers if isinstance(l, _PositionEmbeddingBase))

  def __call__(self, tokens, training=False):
    return self.model(tokens, training=training)

  def prefill_lengths(self) -> list:
    """Prefix lengths on which prefill is exact (see `exact_prefill_lengths`)."""
    if "_prefill_lengths" not in self.__dict__:
      self._prefill_lengths = exact_prefill_lengths(self._blocks, self.seq_len)
    return self._prefill_lengths

  def prefill(self, tokens, position):
    """See the module docstring: (logits `[B, V]` at position, caches)."""
    x, caches = tokens, []
    last = self.layers.index(self._blocks[-1]) if self._blocks else -1
    for i, layer in enumerate(self.layers):
      if layer in self._blocks:
        x, k, v = layer.prefill(x)                                        # (B, N, D), (B, N, H, K)
        caches.append((tf.transpose(k, [2, 1, 0, 3]), tf.transpose(v, [2, 1, 0, 3])))
      else:
        x = layer(x)
      if i == last:
        x = tf.gather(x, position, axis=1)[:, None]                       # (B, 1, D)
    if last < 0:
      x = tf.gather(x, position, axis=1)[:, None]
    return x[:, 0], caches                                                # (B, V)

  def decode_step(self, token, position, caches):
    """See the module docstring: (logits `[B, V]`, caches)."""
    x, new_caches, tables = token[:, None], [], {}
    blocks = iter(zip(self._blocks, caches))
    for layer in self.layers:
      if layer in self._blocks:
        block, cache = next(blocks)
        table = block.attention.decode_table(self.seq_len)                # (N, H, W) NumPy
        if id(table) not in tables:
          tables[id(table)] = tf.gather(tf.constant(table), position)     # (H, W)
        x, cache = block.decode_step(x, cache, position, tables[id(table)])
        new_caches.append(cache)
      elif layer in self._position_layers:
        x = layer(x, start_index=position)                                # (B, 1, D)
      else:
        x = layer(x)
    return x[:, 0], new_caches                                            # (B, V)

  def generate(self, prompt, num_tokens: Optional[int] = None, *, max_length=None, sampler=None,
               stop_token_ids=None, pad_token_id: int = 0, return_text: bool = False,
               use_cache: bool = True):
    """Continues prompt: `generation.generate(self, ...)` (same arguments)."""
    return generate(self, prompt, num_tokens, max_length=max_length, sampler=sampler,
                    stop_token_ids=stop_token_ids, pad_token_id=pad_token_id,
                    return_text=return_text, use_cache=use_cache)

  def sample_images(self, count: int, bos: int, *, image_shape, prompt=None, sampler=None):
    """Whole images: `generation.sample_images(self, ...)` (same arguments)."""
    return sample_images(self, count, bos, prompt=prompt, sampler=sampler,
                         image_shape=image_shape)
