"""SavedModel export for TF Serving.

    python -m sparse_attention_tf.export --model runs/default/model.keras --export_dir exports/lm
    python -m sparse_attention_tf.export --model ... --export_dir ... --mode custom_op

Two modes:

* `portable` (default): attention runs through the pure-TF reference
  implementation, so the SavedModel holds only stock TensorFlow ops and runs
  on stock TF Serving, `tf.saved_model.load` anywhere, TFLite converters, ...
* `custom_op`: attention runs through this library's C++ ops (faster). A
  process must load `_sparse_attention_ops.so` before loading the model
  (`tf.load_op_library`, or `load_saved_model` here); TF Serving must be
  built with the op library linked in (see the README).

Layout (what TF Serving expects): `<export_dir>/<version>/saved_model.pb`,
`variables/`, and `assets.extra/sparse_attention_tf.json` with the model
config, pattern and signatures.

Signatures, all with one input `tokens`, int32 `[batch, seq_len]` (any batch):

| name | outputs |
|---|---|
| `serving_default`, `logits` | `logits`: float32 `[batch, seq_len, vocab]` |
| `next_token_distribution` | `probabilities`: float32 `[batch, seq_len, vocab]` (of the token after each position); `last`: `[batch, vocab]` (after the last position) |
| `score` | `bits_per_token`: float32 `[batch]`, mean bits of tokens[1:] given the prefix |
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional

import numpy as np

SIGNATURES = ("serving_default", "logits", "next_token_distribution", "score")
MODES = ("portable", "custom_op")
METADATA = os.path.join("assets.extra", "sparse_attention_tf.json")


def with_implementation(model, implementation: str):
  """A copy of a SparseTransformer whose attention uses `implementation`, same weights."""
  import keras
  from sparse_attention_tf.models import SparseTransformer
  if not isinstance(model, SparseTransformer):
    raise ValueError(f"export needs a sparse_attention_tf.SparseTransformer, got "
                     f"{type(model).__name__}.")
  config = dict(model.get_config(), implementation=implementation)
  config.pop("dtype", None)                          # export in float32 compute
  clone = SparseTransformer.from_config(config)
  clone(np.zeros((1, model.seq_len), np.int32))
  clone.set_weights([keras.ops.convert_to_numpy(w) for w in model.weights])
  return clone


def export_saved_model(model, path: str, mode: str = "portable", version: int = 1,
                       signatures=SIGNATURES) -> str:
  """Writes `model` as a versioned SavedModel; returns the version folder.

  Args:
    model: a `SparseTransformer`.
    path: export base folder; the model goes to `path/<version>/`.
    mode: `"portable"` (stock TF ops only) or `"custom_op"`.
    version: the TF Serving version number.
    signatures: which of `SIGNATURES` to export; `serving_default` (the
      logits) is always included.

  Returns:
    The folder written, `path/<version>`.
  """
  import keras
  import tensorflow as tf
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  unknown = sorted(set(signatures) - set(SIGNATURES))
  if unknown or not signatures:
    raise ValueError(f"signatures must be a non-empty subset of {SIGNATURES}, got {unknown}.")
  if isinstance(version, bool) or not isinstance(version, int) or version < 1:
    raise ValueError(f"version must be a positive integer, got {version!r}.")
  if mode == "custom_op":
    from sparse_attention_tf import ops
    if not ops.is_available():
      raise RuntimeError(ops.load_error())
  served = with_implementation(model, "reference" if mode == "portable" else "custom_op")
  spec = [tf.TensorSpec([None, served.seq_len], tf.int32, name="tokens")]

  def logits_fn(tokens):
    return {"logits": served(tokens, training=False)}                   # (B, T, V)

  def next_token_fn(tokens):
    probs = tf.nn.softmax(served(tokens, training=False), axis=-1)      # (B, T, V)
    return {"probabilities": probs, "last": probs[:, -1]}

  def score_fn(tokens):
    logits = served(tokens, training=False)[:, :-1]                     # (B, T-1, V)
    nats = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tokens[:, 1:], logits=logits)
    return {"bits_per_token": tf.reduce_mean(nats, axis=-1) / math.log(2.0)}

  fns = {"serving_default": logits_fn, "logits": logits_fn,
         "next_token_distribution": next_token_fn, "score": score_fn}
  # serving_default (logits) always comes first: TF Serving's default signature.
  signatures = ["serving_default"] + [n for n in dict.fromkeys(signatures)
                                      if n != "serving_default"]
  archive = keras.export.ExportArchive()
  archive.track(served)
  for name in signatures:
    archive.add_endpoint(name, fns[name], input_signature=spec)
  out = os.path.join(path, str(version))
  archive.write_out(out, verbose=False)
  meta = {"mode": mode, "signatures": list(signatures), "input": {"tokens": ["batch", served.seq_len],
          "dtype": "int32"}, "model_config": served.get_config(),
          "op_library": None if mode == "portable" else "_sparse_attention_ops.so"}
  os.makedirs(os.path.join(out, "assets.extra"), exist_ok=True)
  with open(os.path.join(out, METADATA), "w") as f:
    json.dump(meta, f, indent=1, default=str)
  return out


def load_saved_model(path: str, load_ops: bool = True):
  """`tf.saved_model.load`, loading this library's ops first when the model needs them.

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
    if "SparseAttention>" not in str(e):
      raise
    raise RuntimeError(
        f"{path} was exported with mode='custom_op' and needs the sparse_attention_tf op library "
        f"_sparse_attention_ops.so: call tf.load_op_library('<path>/_sparse_attention_ops.so') "
        f"(built by scripts/setup.sh) before loading, or export with mode='portable'.") from None


def rest_to_inputs(body, seq_len: Optional[int] = None,
                   vocab_size: Optional[int] = None) -> dict:
  """Turns a TF Serving REST `predict` body into the signature's inputs.

  Accepts the row format `{"instances": [[t0, t1, ...], ...]}` (or
  `[{"tokens": [...]}, ...]`) and the columnar format `{"inputs": [[...]]}` or
  `{"inputs": {"tokens": [[...]]}}`.

  Returns:
    `{"tokens": int32 array [batch, seq_len]}`.

  Raises:
    ValueError: for a body that is not one of those forms, ragged or
      non-integer tokens, tokens outside `[0, vocab_size)` (or int32), or a
      length other than `seq_len`.
  """
  if isinstance(body, (str, bytes)):
    body = json.loads(body)
  if not isinstance(body, dict) or len({"instances", "inputs"} & set(body)) != 1:
    raise ValueError("a predict request needs exactly one of 'instances' (row format) or "
                     "'inputs' (columnar format).")
  if "instances" in body:
    rows = body["instances"]
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
      if any(set(r) != {"tokens"} for r in rows):
        raise ValueError("each instance must hold exactly the input 'tokens'.")
      rows = [r["tokens"] for r in rows]
  else:
    rows = body["inputs"]
    if isinstance(rows, dict):
      if set(rows) != {"tokens"}:
        raise ValueError("'inputs' must hold exactly the input 'tokens'.")
      rows = rows["tokens"]
  try:
    tokens = np.array(rows)
  except ValueError:
    raise ValueError("tokens must be a rectangular list of lists of integers.") from None
  if tokens.dtype == object or tokens.ndim != 2 or tokens.size == 0:
    raise ValueError(f"tokens must be a non-empty [batch, seq_len] list of lists, got shape "
                     f"{tokens.shape}.")
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be integers, got {tokens.dtype}.")
  if seq_len is not None and tokens.shape[1] != seq_len:
    raise ValueError(f"tokens must have length {seq_len}, got {tokens.shape[1]}.")
  high = np.iinfo(np.int32).max if vocab_size is None else vocab_size - 1
  if tokens.min() < 0 or tokens.max() > high:
    raise ValueError(f"tokens must be in [0, {high}], got values in [{tokens.min()}, "
                     f"{tokens.max()}].")
  return {"tokens": tokens.astype(np.int32)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m sparse_attention_tf.export",
                                   description="Export a trained SparseTransformer for TF Serving.")
  parser.add_argument("--model", required=True, help="a .keras file (train_main.py's model.keras)")
  parser.add_argument("--export_dir", required=True, help="base folder; writes <export_dir>/<version>")
  parser.add_argument("--mode", choices=MODES, default="portable")
  parser.add_argument("--version", type=int, default=1)
  args = parser.parse_args(argv)
  if not os.path.exists(args.model):
    print(f"export: error: model file not found: {args.model}", file=sys.stderr)
    return 2
  import keras
  import sparse_attention_tf  # noqa: F401  (registers the layers for loading)
  try:
    model = keras.models.load_model(args.model)
    out = export_saved_model(model, args.export_dir, mode=args.mode, version=args.version)
  except (ValueError, RuntimeError, OSError) as e:
    print(f"export: error: {e}", file=sys.stderr)
    return 2
  print(f"exported ({args.mode}) to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
