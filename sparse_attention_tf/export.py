"""SavedModel export for TF Serving, of any Keras model built from this library's layers.

    python -m sparse_attention_tf.export --model runs/default/model.keras --export_dir exports/lm
    python -m sparse_attention_tf.export --model ... --export_dir ... --mode custom_op --version 2
    python -m sparse_attention_tf.export --model ... --export_dir ... --overwrite

    export_saved_model(model, "exports/lm")                # Python: any supported model
    loaded = load_saved_model("exports/lm/1")
    predict(loaded, rest_to_inputs(body, seq_len, vocab_size), "next_token_distribution")

Models: a `SparseTransformer`, or a functional or `Sequential` Keras model
with defined inputs (`keras.Input`) whose layers may be any Keras layers,
including `SparseMultiHeadAttention`, `SparseTransformerBlock` and the
position embeddings (nested functional / Sequential models too). The model is
rebuilt with public Keras APIs (`keras.models.clone_model` with a clone
function, `from_config(get_config())`) with every sparse attention switched
to the mode's implementation, and its weights copied. Subclassed models
other than `SparseTransformer` cannot be rebuilt layer by layer and are
refused with a `ValueError`. The export computes in float32 (the variables'
dtype), also for a mixed-precision model.

Two modes:

* `portable` (default): attention runs through the pure-TF reference
  implementation, so the SavedModel holds only stock TensorFlow ops (checked
  while exporting) and runs on stock TF Serving, `tf.saved_model.load`
  anywhere, TFLite converters, ...
* `custom_op`: attention runs through this library's C++ ops (faster). A
  process must load `_sparse_attention_ops.so` before loading the model
  (`tf.load_op_library`, or `load_saved_model` here); TF Serving must be
  built with the op library linked in (see the README).

Layout (what TF Serving expects): `<export_dir>/<version>/saved_model.pb`,
`variables/`, and `assets.extra/sparse_attention_tf.json` with the mode, the
model's class and config, and each signature's input and output specs. A
version is written into a temporary folder beside it (`.<version>.partial-*`,
which TF Serving ignores) and renamed into place when complete, so a failed
export never leaves a half-written version. An existing version is replaced
only with `overwrite=True` (`--overwrite`); TF Serving does not reload a
version it already serves, so roll out a new model under a new version.

Signatures of a functional or Sequential model: `serving_default`. Its
inputs are the model's inputs, named like them (`keras.Input(name=...)`),
with their dtypes and shapes and any batch; its outputs are named after the
keys of a dict output, else after the output layers (`model.output_names`),
else `output_<i>`. A functional language model of our layers (one that
`generation.SparseCausalLM` accepts) also gets `generate` (below) when
`signatures` asks for it.

Signatures of a `SparseTransformer` (a language model). Prompts may be
shorter than `seq_len`: every signature takes

  `tokens`   int32 `[batch, L]`, `1 <= L <= seq_len`, each row a prompt
             padded at the end to the batch's longest (any padding value);
  `lengths`  int32 `[batch]`, the real length of each row, `1 <= lengths <= L`.

Both are required (TF Serving requires every input of a signature), also
where `lengths` changes nothing (`logits`), so one request body fits every
signature. Inside the graph, positions at or after a row's length are set to
token 0 and the rows are padded to `seq_len` (the model is causal: padding
never changes an earlier position); outputs are cut back to `L` positions.

  `serving_default`, `logits`   `logits`: float32 `[batch, L, vocab]`
  `next_token_distribution`     `probabilities`: float32 `[batch, L, vocab]`, the
                                distribution of the token after each position;
                                `last`: `[batch, vocab]`, after position `lengths - 1`
  `score`                       `bits_per_token`: float32 `[batch]`, mean bits of
                                `tokens[1:lengths]` given their prefix (`lengths >= 2`)

Outputs at positions `>= lengths` are padding: ignore them.

  `generate`                    samples a continuation of each prompt in the
                                graph (`generation.Generator`: the prompt in one
                                pass, then a `tf.while_loop` of cached decoding
                                steps). Further inputs, one value per row, each
                                `[batch]`: `max_new_tokens` int32 (`lengths +
                                max_new_tokens <= seq_len + 1`), `temperature`
                                float32 (0: greedy), `top_k` int32 (0: no
                                limit), `top_p` float32 in (0, 1] (1: no limit),
                                `seed` int32. Outputs: `sequences` int32
                                `[batch, max(lengths + max_new_tokens)]`, the
                                prompt then the new tokens, `pad_token_id` after
                                each row's end; `sequence_lengths` int32
                                `[batch]`, each row's end (after its stop token).

A row's tokens depend only on its own inputs (not on the other rows a server
batches with it), and equal `model.generate` with the same settings and seed.
Stop tokens and the pad id are fixed at export (`stop_token_ids`,
`pad_token_id`). The decoding loop runs as plain TensorFlow by default;
`generate_jit_compile=True` (`--generate_jit_compile`) compiles it with XLA,
about 4x faster on CPU, which TF Serving runs only when started with
`--xla_cpu_compilation_enabled=true` (without it such a request fails).

Errors. In the graph (what TF Serving can send), `tf.debugging` asserts raise
`InvalidArgumentError`s that say what is wrong: more than `seq_len`
positions, `lengths` out of `[1, L]` or not one per row, tokens outside
`[0, vocab_size)`, `score` with `lengths < 2`, generate settings out of range
(`lengths + max_new_tokens > seq_len + 1`, checked without int32 overflow) or
not one per row, a generate request without rows. Not every caller checks inputs
against the signature (a loaded signature called from Python casts and
broadcasts silently): `predict(loaded, inputs, signature)` first checks them
and raises a `ValueError` naming the expected dtype and shape. `rest_to_inputs` turns a REST `predict` body (prompts of any
length up to `seq_len`) into `tokens` and `lengths`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import uuid
from typing import Optional

import numpy as np

SIGNATURES = ("serving_default", "logits", "next_token_distribution", "score", "generate")
# The inputs of the generate signature after tokens and lengths: one value per row.
GENERATE_INPUTS = (("max_new_tokens", "int32"), ("temperature", "float32"), ("top_k", "int32"),
                   ("top_p", "float32"), ("seed", "int32"))
MODES = ("portable", "custom_op")
METADATA = os.path.join("assets.extra", "sparse_attention_tf.json")
IMPLEMENTATION = {"portable": "reference", "custom_op": "custom_op"}
_OP_PREFIX = "SparseAttention>"


# --- the model to serve: attention switched, weights copied -------------------
def _attention_classes():
  from sparse_attention_tf.layers import SparseMultiHeadAttention, SparseTransformerBlock
  from sparse_attention_tf.models import SparseTransformer
  return SparseMultiHeadAttention, SparseTransformerBlock, SparseTransformer


def _serving_config(layer, implementation: str) -> dict:
  """`layer.get_config()` in float32 compute, with `implementation` for our attention layers."""
  config = layer.get_config()
  policy = layer.dtype_policy
  if policy.compute_dtype != policy.variable_dtype:   # mixed precision: serve in float32
    config["dtype"] = policy.variable_dtype
  if isinstance(layer, _attention_classes()):
    config["implementation"] = implementation
  return config


def _model_inputs(model) -> list:
  """The flat `model.inputs`, or a ValueError saying which models can be exported."""
  try:
    inputs = model.inputs
  except AttributeError:
    inputs = None
  if inputs:
    return list(inputs)
  import keras
  if isinstance(model, keras.Sequential):
    raise ValueError("this Sequential model has no inputs yet: start it with keras.Input(shape, "
                     "dtype=...) (or call it once on a batch) before exporting.")
  raise ValueError(
      f"export_saved_model exports a sparse_attention_tf.SparseTransformer or a functional or "
      f"Sequential Keras model (with keras.Input inputs; its layers may be any Keras layers, "
      f"SparseMultiHeadAttention and SparseTransformerBlock included), got the subclassed model "
      f"{type(model).__name__}, which cannot be rebuilt layer by layer to switch its attention. "
      f"Build it functionally: outputs = ...(keras.Input(...)); keras.Model(inputs, outputs).")


def with_implementation(model, implementation: str):
  """A copy of `model` whose sparse attention uses `implementation`, same weights.

  Args:
    model: a built `SparseTransformer`, or a functional or `Sequential` model
      (see the module docstring).
    implementation: for every `SparseMultiHeadAttention` (also those inside
      `SparseTransformerBlock` and `SparseTransformer`), e.g. `"reference"`.

  Returns:
    The copy, computing in float32, its weights equal to `model`'s.

  Raises:
    ValueError: for a model that is not built or cannot be rebuilt.
  """
  import keras
  sparse_transformer = _attention_classes()[2]
  is_lm = isinstance(model, sparse_transformer)
  if not is_lm:
    _model_inputs(model)
  if not model.built or not model.weights:
    raise ValueError(f"{type(model).__name__} has no weights yet: build it (call it on a batch "
                     f"or train it) before exporting.")
  if is_lm:
    clone = sparse_transformer.from_config(_serving_config(model, implementation))
    clone(np.zeros((1, model.seq_len), np.int32))
  else:
    clone = keras.models.clone_model(
        model, recursive=True,
        clone_function=lambda layer: layer.__class__.from_config(
            _serving_config(layer, implementation)))
  clone.set_weights(model.get_weights())
  return clone


def _custom_op_nodes(concrete_fn) -> list:
  """`(op, node)` of the `SparseAttention>` ops in a traced function and its library."""
  graph = concrete_fn.graph.as_graph_def()
  nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
  return sorted({(n.op, n.name) for n in nodes if n.op.startswith(_OP_PREFIX)})


# --- signatures ----------------------------------------------------------------
def _lm_tokens(tokens, lengths, seq_len: int, vocab_size: int):
  """Checks the LM inputs; returns tokens padded to `[B, seq_len]` and as sent, `[B, L]`.

  In both, positions at or after a row's length are 0.
  """
  import tensorflow as tf
  width = tf.shape(tokens)[1]
  shape_checks = [
      tf.debugging.assert_less_equal(
          width, seq_len, message=f"tokens has more positions than the model holds, "
          f"seq_len = {seq_len}: send at most {seq_len} tokens per row"),
      tf.debugging.assert_positive(width, message="tokens must have at least one position"),
      tf.debugging.assert_equal(
          tf.shape(lengths)[0], tf.shape(tokens)[0],
          message="lengths must hold one length per row of tokens ([batch])"),
      tf.debugging.assert_positive(lengths, message="lengths must be >= 1"),
      tf.debugging.assert_less_equal(
          lengths, width, message="lengths must be <= the number of positions of tokens"),
  ]
  with tf.control_dependencies(shape_checks):
    real = tf.sequence_mask(lengths, width)                               # (B, L)
    tokens = tf.where(real, tokens, tf.zeros_like(tokens))                # (B, L)
  message = f"tokens must be in [0, vocab_size = {vocab_size})"
  value_checks = [tf.debugging.assert_non_negative(tokens, message=message),
                  tf.debugging.assert_less(tokens, vocab_size, message=message)]
  with tf.control_dependencies(value_checks):
    padded = tf.pad(tokens, [[0, 0], [0, seq_len - width]])               # (B, N)
  return tf.ensure_shape(padded, [None, seq_len]), tokens


def _lm_endpoints(served, names, generate=None) -> dict:
  """{signature: (fn, input specs)} of a SparseTransformer; `generate`: the generate options."""
  import tensorflow as tf
  seq_len, vocab_size = served.seq_len, served.vocab_size
  specs = _lm_input_specs()

  def logits_of(tokens, lengths):
    padded, tokens = _lm_tokens(tokens, lengths, seq_len, vocab_size)    # (B, N), (B, L)
    logits = served(padded, training=False)[:, :tf.shape(tokens)[1]]     # (B, L, V)
    return logits, tokens

  def logits_fn(tokens, lengths):
    return {"logits": logits_of(tokens, lengths)[0]}                      # (B, L, V)

  def next_token_fn(tokens, lengths):
    probs = tf.nn.softmax(logits_of(tokens, lengths)[0], axis=-1)         # (B, L, V)
    last = tf.gather(probs, lengths - 1, axis=1, batch_dims=1)            # (B, V)
    return {"probabilities": probs, "last": last}

  def score_fn(tokens, lengths):
    check = tf.debugging.assert_greater_equal(
        lengths, 2, message="score needs lengths >= 2: a one-token prompt has nothing to score")
    with tf.control_dependencies([check]):
      logits, tokens = logits_of(tokens, lengths)                         # (B, L, V), (B, L)
    nats = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tokens[:, 1:], logits=logits[:, :-1])                      # (B, L-1)
    scored = tf.sequence_mask(lengths - 1, tf.shape(nats)[1], nats.dtype)  # (B, L-1)
    count = tf.cast(lengths - 1, nats.dtype)                              # (B,)
    return {"bits_per_token": tf.reduce_sum(nats * scored, axis=-1) / count / math.log(2.0)}

  fns = {"serving_default": logits_fn, "logits": logits_fn,
         "next_token_distribution": next_token_fn, "score": score_fn}
  endpoints = {name: (fns[name], specs) for name in names if name in fns}
  if "generate" in names:
    endpoints["generate"] = _generate_endpoint(served, **(generate or {}))
  return endpoints


def _lm_input_specs() -> list:
  """`tokens` `[B, L]` and `lengths` `[B]`: the inputs every language model signature takes."""
  import tensorflow as tf
  return [tf.TensorSpec([None, None], tf.int32, name="tokens"),
          tf.TensorSpec([None], tf.int32, name="lengths")]


def _generate_endpoint(served, jit_compile: bool = False, stop_token_ids=(),
                       pad_token_id: int = 0):
  """(fn, input specs) of the generate signature: `generation.Generator`'s loop in the graph."""
  import tensorflow as tf
  from sparse_attention_tf import generation
  seq_len, vocab_size = served.seq_len, served.vocab_size
  gen = generation.Generator(served, jit_compile=jit_compile)
  stops = tf.constant(np.asarray(stop_token_ids, np.int32).reshape(-1))
  specs = _lm_input_specs() + [tf.TensorSpec([None], dtype, name=name)
                               for name, dtype in GENERATE_INPUTS]

  def generate_fn(tokens, lengths, max_new_tokens, temperature, top_k, top_p, seed):
    tokens, _ = _lm_tokens(tokens, lengths, seq_len, vocab_size)         # (B, N), checked
    batch = tf.shape(tokens)[0]
    row_checks = [tf.debugging.assert_equal(
        tf.shape(value)[0], batch, message=f"{name} must hold one value per row of tokens "
        f"([batch])") for name, value in (("max_new_tokens", max_new_tokens),
                                          ("temperature", temperature), ("top_k", top_k),
                                          ("top_p", top_p), ("seed", seed))]
    row_checks.append(tf.debugging.assert_positive(
        batch, message="tokens must have at least one row"))
    with tf.control_dependencies(row_checks):   # shapes first: the value checks broadcast
      value_checks = _generate_value_checks(lengths, max_new_tokens, temperature, top_k, top_p,
                                            seq_len, vocab_size)
    with tf.control_dependencies(value_checks):
      limits = lengths + max_new_tokens                                   # (B,)
      sequences, ends = gen.generate_rows(tokens, lengths, limits, temperature, top_k, top_p,
                                          seed, stops, tf.constant(pad_token_id, tf.int32))
    return {"sequences": sequences, "sequence_lengths": ends}

  return generate_fn, specs


def _generate_value_checks(lengths, max_new_tokens, temperature, top_k, top_p, seq_len: int,
                           vocab_size: int) -> list:
  """The generate signature's asserts on the sampler inputs (each `[B]`)."""
  import tensorflow as tf
  return [
      tf.debugging.assert_non_negative(max_new_tokens, message="max_new_tokens must be >= 0"),
      # Not lengths + max_new_tokens <= ...: the sum could wrap around int32.
      tf.debugging.assert_less_equal(
          max_new_tokens, seq_len + 1 - lengths, message=f"lengths + max_new_tokens must be "
          f"<= seq_len + 1 = {seq_len + 1}: the last token is predicted from position "
          f"seq_len - 1"),
      tf.debugging.assert_equal(
          tf.logical_and(tf.math.is_finite(temperature), temperature >= 0.0),
          tf.ones_like(temperature, tf.bool),
          message="temperature must be finite and >= 0 (0: greedy)"),
      tf.debugging.assert_non_negative(top_k, message="top_k must be >= 0 (0: no limit)"),
      tf.debugging.assert_less_equal(
          top_k, vocab_size, message=f"top_k must be <= vocab_size = {vocab_size}"),
      tf.debugging.assert_equal(
          tf.logical_and(top_p > 0.0, top_p <= 1.0), tf.ones_like(top_p, tf.bool),
          message="top_p must be in (0, 1] (1: no limit)"),
  ]


def _output_names(served) -> list:
  import keras
  if isinstance(served, keras.Sequential):
    return [served.layers[-1].name]
  names = list(getattr(served, "output_names", None) or [])
  count = len(served.outputs)
  if len(names) != count or len(set(names)) != count:
    names = [f"output_{i}" for i in range(count)]
  return names


def _model_endpoints(served) -> dict:
  """{"serving_default": (fn, input specs)} of a functional or Sequential model."""
  import keras
  import tensorflow as tf
  # A Sequential model has one input (and no `input` unless it was called).
  structure = served.inputs[0] if isinstance(served, keras.Sequential) else served.input
  specs = [tf.TensorSpec((None,) + tuple(t.shape[1:]), t.dtype, name=t.name)
           for t in keras.tree.flatten(structure)]
  names = _output_names(served)

  def serve(*inputs):
    outputs = served(keras.tree.pack_sequence_as(structure, list(inputs)), training=False)
    if isinstance(outputs, dict):
      return dict(outputs)
    return dict(zip(names, keras.tree.flatten(outputs)))

  return {"serving_default": (serve, specs)}


def _spec_json(t) -> dict:
  return {"dtype": t.dtype.name, "shape": t.shape.as_list()}


def _token_ids(value, name: str) -> np.ndarray:
  """int32 `[S]` from None, an int or a list of ints, or a ValueError naming `name`."""
  values = np.asarray([] if value is None else value, dtype=object).reshape(-1)
  if not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
             and -2**31 <= v < 2**31 for v in values):
    raise ValueError(f"{name} must be int32 token ids, got {value!r}.")
  return values.astype(np.int32)


# --- writing -----------------------------------------------------------------------
def version_path(path: str, version: int = 1, overwrite: bool = False) -> str:
  """The folder an export of `version` writes, `path/<version>`.

  Raises:
    ValueError: `version` is not a positive integer.
    FileExistsError: the folder exists and `overwrite` is False.
  """
  if isinstance(version, bool) or not isinstance(version, int) or version < 1:
    raise ValueError(f"version must be a positive integer, got {version!r}.")
  out = os.path.join(path, str(version))
  if os.path.lexists(out) and not overwrite:
    raise _exists_error(out)
  return out


def _exists_error(out: str) -> FileExistsError:
  return FileExistsError(f"{out} already exists: pass overwrite=True to replace it, or export "
                         f"another version.")


def _move_into_place(staged: str, out: str, overwrite: bool):
  """Renames the complete export `staged` to `out`, replacing `out` only if `overwrite`."""
  if not os.path.lexists(out):
    os.rename(staged, out)
    return
  if not overwrite:   # written by someone else while this export ran
    raise _exists_error(out)
  old = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.old-{uuid.uuid4().hex}")
  os.rename(out, old)
  try:
    os.rename(staged, out)
  except OSError:
    os.rename(old, out)
    raise
  if os.path.isdir(old) and not os.path.islink(old):
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.remove(old)


def _write_metadata(folder: str, meta: dict):
  os.makedirs(os.path.join(folder, "assets.extra"), exist_ok=True)
  with open(os.path.join(folder, METADATA), "w") as f:
    json.dump(meta, f, indent=1, default=str)


def export_saved_model(model, path: str, mode: str = "portable", version: int = 1,
                       signatures=None, overwrite: bool = False, *,
                       generate_jit_compile: bool = False, stop_token_ids=None,
                       pad_token_id: int = 0) -> str:
  """Writes `model` as a versioned SavedModel; returns the version folder.

  Args:
    model: a `SparseTransformer`, or a functional or `Sequential` Keras model
      (see the module docstring); built, with its weights.
    path: export base folder; the model goes to `path/<version>/`.
    mode: `"portable"` (stock TF ops only) or `"custom_op"`.
    version: the TF Serving version number.
    signatures: for a `SparseTransformer`, which of `SIGNATURES` to export
      (default all; `serving_default`, the logits, is always included).
      Other models export `serving_default`, and `generate` when asked for
      (`signatures=("serving_default", "generate")`): a functional language
      model that `generation.SparseCausalLM` accepts.
    overwrite: replace an existing `path/<version>`.
    generate_jit_compile: compile the generate signature's decoding loop
      with XLA (about 4x faster on CPU), which TF Serving runs only when
      started with `--xla_cpu_compilation_enabled=true`; the default runs
      on any TensorFlow.
    stop_token_ids: token ids that end a row in the generate signature (kept
      in the row, then `pad_token_id`).
    pad_token_id: what fills a generate row after its end.

  Returns:
    The folder written, `path/<version>`.

  Raises:
    ValueError: bad arguments, a model that cannot be exported, or a portable
      export that would still hold a custom op.
    FileExistsError: `path/<version>` exists and `overwrite` is False.
    RuntimeError: `mode="custom_op"` without the op library.
  """
  import keras
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  out = version_path(path, version, overwrite)
  is_lm = isinstance(model, _attention_classes()[2])
  if signatures is None:
    signatures = SIGNATURES if is_lm else ("serving_default",)
  allowed = SIGNATURES if is_lm else ("serving_default", "generate")
  unknown = sorted(set(signatures) - set(allowed))
  if unknown or not signatures:
    raise ValueError(f"signatures must be a non-empty subset of {allowed} for a "
                     f"{type(model).__name__}, got {tuple(signatures)}.")
  stops = _token_ids(stop_token_ids, "stop_token_ids")
  pad = _token_ids(pad_token_id, "pad_token_id")
  if pad.shape != (1,) or not isinstance(generate_jit_compile, bool):
    raise ValueError(f"pad_token_id must be one integer and generate_jit_compile a bool, got "
                     f"{pad_token_id!r} and {generate_jit_compile!r}.")
  generate = {"jit_compile": generate_jit_compile, "stop_token_ids": stops.tolist(),
              "pad_token_id": int(pad[0])}
  if mode == "custom_op":
    from sparse_attention_tf import ops
    if not ops.is_available():
      raise RuntimeError(ops.load_error())
  served = with_implementation(model, IMPLEMENTATION[mode])
  # serving_default always comes first: TF Serving's default signature.
  names = ["serving_default"] + [n for n in dict.fromkeys(signatures) if n != "serving_default"]
  if is_lm:
    endpoints = _lm_endpoints(served, names, generate)
  else:
    endpoints = _model_endpoints(served)
    if "generate" in names:   # a language model of our layers: SparseCausalLM says if not
      from sparse_attention_tf.generation import SparseCausalLM
      endpoints["generate"] = _generate_endpoint(SparseCausalLM(served), **generate)
  # Not archive.track(served): the endpoints bring their variables (and Keras lookup tables),
  # and tracking a subclassed model makes Keras trace its call on float inputs.
  archive = keras.export.ExportArchive()
  meta_signatures = {}
  for name, (fn, specs) in endpoints.items():
    traced = archive.add_endpoint(name, fn, input_signature=specs).get_concrete_function()
    if mode == "portable" and _custom_op_nodes(traced):
      raise ValueError(
          f"the portable export's {name} signature still holds custom ops "
          f"{_custom_op_nodes(traced)[:3]}: a layer runs sparse attention without taking "
          f"`implementation` from its config (only SparseMultiHeadAttention, "
          f"SparseTransformerBlock and SparseTransformer are switched). Give that layer an "
          f"`implementation` argument passed on to its attention, or export with "
          f"mode='custom_op'.")
    meta_signatures[name] = {
        "inputs": {s.name: _spec_json(s) for s in specs},
        "outputs": {k: _spec_json(t) for k, t in traced.structured_outputs.items()}}
  meta = {"mode": mode, "signatures": meta_signatures,
          "model_class": type(served).__name__, "model_config": served.get_config(),
          "op_library": None if mode == "portable" else "_sparse_attention_ops.so"}
  if "generate" in names:
    meta["generate"] = generate
  created = not os.path.isdir(path)
  os.makedirs(path, exist_ok=True)
  staged = tempfile.mkdtemp(prefix=f".{version}.partial-", dir=path)
  try:
    archive.write_out(staged, verbose=False)
    _write_metadata(staged, meta)
    _move_into_place(staged, out, overwrite)
  except BaseException:
    shutil.rmtree(staged, ignore_errors=True)
    if created and not os.listdir(path):
      os.rmdir(path)
    raise
  return out


# --- loading and calling --------------------------------------------------------
def load_saved_model(path: str, load_ops: bool = True):
  """`tf.saved_model.load`, loading this library's ops first when the model needs them.

  Call its signatures with `predict` to have the inputs checked.

  Raises:
    RuntimeError: the model uses the custom ops and they are not loaded (the
      message names the library and how to load it).
  """
  import tensorflow as tf
  if load_ops:
    from sparse_attention_tf import ops
    ops.load_library()
  try:
    return tf.saved_model.load(path)
  except (tf.errors.NotFoundError, RuntimeError) as e:   # "Op type not registered ..."
    if _OP_PREFIX not in str(e):
      raise
    raise RuntimeError(
        f"{path} was exported with mode='custom_op' and needs the sparse_attention_tf op library "
        f"_sparse_attention_ops.so: call tf.load_op_library('<path>/_sparse_attention_ops.so') "
        f"(built by scripts/setup.sh) before loading, or export with mode='portable'.") from None


def _describe(spec) -> str:
  dims = ["batch" if i == 0 and d is None else ("any" if d is None else str(d))
          for i, d in enumerate(spec.shape.as_list())]
  return f"{spec.dtype.name} [{', '.join(dims)}]"


def _fits(value: np.ndarray, dtype) -> bool:
  """Whether an array's values are of `dtype`'s kind and representable in it."""
  if dtype.is_bool:
    return value.dtype == bool
  if dtype.is_integer:
    if not np.issubdtype(value.dtype, np.integer):
      return False
    return value.size == 0 or (dtype.min <= value.min() and value.max() <= dtype.max)
  if dtype.is_floating:
    return np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)
  if dtype == "string":
    return value.dtype.kind in "OSU"
  return value.dtype == dtype.as_numpy_dtype


def check_inputs(fn, inputs, signature: str = "serving_default") -> dict:
  """Checks `inputs` against a loaded signature `fn`; returns them as tensors of its dtypes.

  Args:
    fn: a signature of a loaded SavedModel (`loaded.signatures[name]`).
    inputs: `{name: array-like}`, or one array for a one-input signature.
    signature: the signature's name, for the messages.

  Raises:
    ValueError: a missing or unexpected input, a dtype of another kind
      (integers for an integer input, ...) or values outside it, a shape other
      than the signature's, or inputs whose batch sizes differ; the message
      names the expected inputs, dtypes and shapes.
  """
  import tensorflow as tf
  specs = fn.structured_input_signature[1]                                # {name: TensorSpec}
  expected = ", ".join(f"{name}: {_describe(s)}" for name, s in specs.items())
  if not isinstance(inputs, dict):
    if len(specs) != 1:
      raise ValueError(f"signature {signature!r} takes the inputs {{{expected}}}: pass a dict.")
    inputs = {next(iter(specs)): inputs}
  if set(inputs) != set(specs):
    raise ValueError(f"signature {signature!r} takes the inputs {{{expected}}}, got "
                     f"{sorted(inputs)}.")
  checked, batches = {}, set()
  for name, spec in specs.items():
    value = inputs[name]
    value = np.asarray(value.numpy() if isinstance(value, tf.Tensor) else value)
    shape = spec.shape.as_list()
    if (not _fits(value, spec.dtype) or value.ndim != len(shape)
        or any(d is not None and d != v for d, v in zip(shape, value.shape))):
      raise ValueError(f"input {name!r} of signature {signature!r} must be {_describe(spec)} "
                       f"(any batch size), got {value.dtype.name} {list(value.shape)}.")
    if value.ndim:
      batches.add(value.shape[0])
    checked[name] = tf.constant(value.astype(spec.dtype.as_numpy_dtype))
  if len(batches) > 1:
    raise ValueError(f"the inputs of signature {signature!r} must have one batch size, got "
                     f"{ {k: list(v.shape) for k, v in checked.items()} }.")
  return checked


def predict(loaded, inputs, signature: str = "serving_default") -> dict:
  """Runs a signature of a loaded export on checked inputs; returns NumPy outputs.

  Args:
    loaded: from `load_saved_model` (or `tf.saved_model.load`).
    inputs: `{name: array-like}` (e.g. from `rest_to_inputs`), or one array
      for a one-input signature.
    signature: the signature's name.

  Raises:
    ValueError: an unknown signature or inputs that do not fit it (see
      `check_inputs`).
    tf.errors.InvalidArgumentError: from the graph's own checks (e.g. a
      prompt longer than `seq_len`).
  """
  if signature not in loaded.signatures:
    raise ValueError(f"no signature {signature!r}; the export has {sorted(loaded.signatures)}.")
  fn = loaded.signatures[signature]
  outputs = fn(**check_inputs(fn, inputs, signature))
  return {name: value.numpy() for name, value in outputs.items()}


# --- REST bodies -------------------------------------------------------------------
# The deepest a predict body nests arrays and objects: {"inputs": {"tokens": [[...]]}}
# or {"instances": [{"tokens": [...]}]}.
MAX_BODY_DEPTH = 4


def _json_depth(text) -> int:
  """How deep JSON `text` (str or UTF-8 bytes) nests arrays and objects, counted in one
  pass without recursion (json.loads recurses per level and fails near 1,000 levels)."""
  if isinstance(text, str):
    text = text.encode("utf-8", "surrogatepass")
  bare = re.sub(rb'"[^"\\]*(?:\\.[^"\\]*)*"', b'""', text)   # strings may hold brackets
  step = np.zeros(256, np.int64)                                     # by byte value
  step[list(b"[{")], step[list(b"]}")] = 1, -1
  return int(np.cumsum(step[np.frombuffer(bare, np.uint8)]).max(initial=0))


def _brief(value) -> str:
  """`value` for an error message: short, and never the repr of a (deep) container."""
  if isinstance(value, (list, tuple, dict)):
    return f"a {type(value).__name__} of {len(value)}"
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + "..."


def _int_row(row, i: int) -> list:
  """Row `i` of a body as a list of Python ints, or a ValueError."""
  if not isinstance(row, (list, tuple)):
    raise ValueError(f"row {i} must be a list of integer tokens, got {type(row).__name__}.")
  for v in row:
    if isinstance(v, (list, tuple, dict)):
      raise ValueError(f"tokens must be integers, got {_brief(v)} in row {i}: prompts are "
                       f"nested deeper than [batch, tokens].")
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
      raise ValueError(f"tokens must be integers, got {_brief(v)} ({type(v).__name__}) in "
                       f"row {i}.")
  return [int(v) for v in row]


def _rest_fields(body) -> tuple:
  """(rows, lengths or None) from the row or columnar form of a REST body."""
  if isinstance(body, (str, bytes)):
    depth = _json_depth(body)
    if depth > MAX_BODY_DEPTH:
      raise ValueError(f"the body nests arrays and objects {depth} levels deep; a predict "
                       f"body nests at most {MAX_BODY_DEPTH} "
                       f'({{"inputs": {{"tokens": [[...]]}}}}): prompts are [batch, tokens].')
    body = json.loads(body)
  if not isinstance(body, dict) or len({"instances", "inputs"} & set(body)) != 1:
    raise ValueError("a predict request needs exactly one of 'instances' (row format) or "
                     "'inputs' (columnar format).")
  allowed = ({"tokens"}, {"tokens", "lengths"})
  if "instances" in body:
    rows = body["instances"]
    if not isinstance(rows, list) or not rows:
      raise ValueError("'instances' must be a non-empty list of prompts.")
    if not any(isinstance(r, dict) for r in rows):
      return rows, None
    if not all(isinstance(r, dict) and set(r) in allowed for r in rows) or \
        len({frozenset(r) for r in rows}) != 1:
      raise ValueError("each instance must hold the input 'tokens' (and optionally 'lengths'), "
                       "all instances the same inputs.")
    lengths = [r["lengths"] for r in rows] if "lengths" in rows[0] else None
    return [r["tokens"] for r in rows], lengths
  inputs = body["inputs"]
  if not isinstance(inputs, dict):
    return inputs, None
  if set(inputs) not in allowed:
    raise ValueError(f"'inputs' must hold 'tokens' (and optionally 'lengths'), got "
                     f"{sorted(map(str, inputs))}.")
  return inputs["tokens"], inputs.get("lengths")


def rest_to_inputs(body, seq_len: Optional[int] = None,
                   vocab_size: Optional[int] = None) -> dict:
  """Turns a TF Serving REST `predict` body into a language model signature's inputs.

  Accepts the row format `{"instances": [[t0, t1, ...], ...]}` (or
  `[{"tokens": [...], "lengths": n}, ...]`) and the columnar format
  `{"inputs": [[...]]}` or `{"inputs": {"tokens": [[...]], "lengths": [...]}}`.
  Rows may have different lengths: they are padded with 0 to the longest, and
  `lengths`, when not given, is each row's length. A given `lengths[i]` may be
  shorter than row i: the rest of the row is padding, set to 0 (it must still
  be integers).

  Returns:
    `{"tokens": int32 [batch, L], "lengths": int32 [batch]}`, `L` the
    longest row; send it to TF Serving as
    `{"inputs": {k: v.tolist() for k, v in inputs.items()}}`.

  Raises:
    ValueError: for a body that is not one of those forms, an empty body or
      row, non-integer tokens (booleans included), prompts nested deeper than
      `[batch, tokens]` (a JSON body is measured before it is parsed, without
      recursion), tokens outside `[0, vocab_size)` (or int32), a row longer
      than `seq_len`, or lengths that are not integers in `[1, len(row)]`, one
      per row.
  """
  rows, lengths = _rest_fields(body)
  if not isinstance(rows, list) or not rows:
    raise ValueError("tokens must be a non-empty list of prompts (lists of integer tokens).")
  rows = [_int_row(r, i) for i, r in enumerate(rows)]
  for i, r in enumerate(rows):
    if not r:
      raise ValueError(f"row {i} is empty: each prompt needs at least one token.")
    if seq_len is not None and len(r) > seq_len:
      raise ValueError(f"row {i} has {len(r)} tokens, more than the model's seq_len = "
                       f"{seq_len}.")
  if lengths is None:
    lengths = [len(r) for r in rows]
  if not isinstance(lengths, list) or len(lengths) != len(rows):
    raise ValueError(f"lengths must be a list of one length per row ({len(rows)}), got "
                     f"{_brief(lengths)}.")
  high = np.iinfo(np.int32).max if vocab_size is None else vocab_size - 1
  tokens = np.zeros((len(rows), max(len(r) for r in rows)), np.int32)   # (B, L)
  for i, (n, r) in enumerate(zip(lengths, rows)):
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or \
        not 1 <= n <= len(r):
      raise ValueError(f"lengths[{i}] must be an integer in [1, {len(r)}] (the length of row "
                       f"{i}), got {_brief(n)}.")
    real = r[:n]                                  # the rest of the row is padding
    if min(real) < 0 or max(real) > high:
      raise ValueError(f"tokens must be in [0, {high}], got values in [{min(real)}, "
                       f"{max(real)}] in row {i}.")
    tokens[i, :n] = real
  return {"tokens": tokens, "lengths": np.asarray(lengths, np.int32)}


# --- command line ----------------------------------------------------------------
def _export_file(args) -> str:
  """The command line's export; what can fail without TensorFlow fails first."""
  if not os.path.exists(args.model):
    raise FileNotFoundError(f"model file not found: {args.model}")
  out = os.path.join(args.export_dir, str(args.version))
  if os.path.lexists(out) and not args.overwrite:
    raise FileExistsError(f"{out} already exists: pass --overwrite to replace it, or another "
                          f"--version.")
  import keras
  import sparse_attention_tf  # noqa: F401  (registers the layers for loading)
  model = keras.models.load_model(args.model)
  return export_saved_model(model, args.export_dir, mode=args.mode, version=args.version,
                            overwrite=args.overwrite,
                            generate_jit_compile=args.generate_jit_compile,
                            stop_token_ids=args.stop_token_ids, pad_token_id=args.pad_token_id)


def _id_list(text: str) -> list:
  """argparse type of --stop_token_ids: comma-separated integers (may be empty)."""
  try:
    return [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integer token ids, got "
                                     f"{text!r}") from None


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m sparse_attention_tf.export",
      description="Export a trained Keras model (a SparseTransformer, or a functional or "
                  "Sequential model built with sparse_attention_tf layers) for TF Serving.")
  parser.add_argument("--model", required=True, help="a .keras file (train_main.py's model.keras)")
  parser.add_argument("--export_dir", required=True,
                      help="base folder; writes <export_dir>/<version>")
  parser.add_argument("--mode", choices=MODES, default="portable")
  parser.add_argument("--version", type=int, default=1)
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing <export_dir>/<version>")
  parser.add_argument("--generate_jit_compile", action="store_true",
                      help="compile the generate signature's decoding loop with XLA (about 4x "
                           "faster on CPU; TF Serving then needs "
                           "--xla_cpu_compilation_enabled=true)")
  parser.add_argument("--stop_token_ids", type=_id_list, default=[],
                      help="comma-separated token ids that end a generate row, e.g. 10")
  parser.add_argument("--pad_token_id", type=int, default=0,
                      help="fills a generate row after its end (default 0)")
  args = parser.parse_args(argv)
  try:
    out = _export_file(args)
  except (ValueError, RuntimeError, OSError) as e:
    print(f"export: error: {e}", file=sys.stderr)
    return 2
  print(f"exported ({args.mode}) to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
