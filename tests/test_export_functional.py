"""Tests of `sparse_attention_tf.export` for models other than SparseTransformer.

* Three user models, exported portable: the README's functional model
  (Embedding -> PositionEmbedding -> two SparseTransformerBlocks ->
  LayerNormalization -> Dense), a functional model around a bare
  SparseMultiHeadAttention (two inputs, one a bool key padding mask, a
  split strided pattern, dict outputs) and a Sequential model. A fresh
  process that never imports sparse_attention_tf (asserted on its
  `sys.modules`) loads them with stock TensorFlow, finds no `SparseAttention>`
  op and matches the Keras models at two batch sizes.
* The README model exported with `mode="custom_op"`, loaded with
  `load_saved_model` and called with `predict`, matches too and holds the
  custom ops.
* Signature inputs named, typed and shaped like `model.inputs` (any batch),
  outputs named after the output layers or the dict keys; the metadata, whose
  config rebuilds the model.
* `predict`'s message for a wrong shape names the expected one; models and
  arguments that cannot be exported are refused before anything is written.

The models are tiny and exported once per module; the fresh process runs in
the background while the in-process tests run.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
from concurrent import futures

import numpy as np
import pytest

SEQ_LEN, VOCAB, WIDTH = 64, 32, 16
BATCHES = (3, 1)
TOL = dict(rtol=1e-5, atol=1e-5)
TIMEOUT = 240


# --- the models ------------------------------------------------------------------
def readme_model():
  """The README's "your own model", at test size."""
  import keras
  import sparse_attention_tf as sat
  pattern = sat.Fixed(stride=16, summary=4)
  tokens = keras.Input((SEQ_LEN,), dtype="int32", name="tokens")
  x = keras.layers.Embedding(VOCAB, 32)(tokens)
  x = sat.layers.PositionEmbedding(SEQ_LEN)(x)
  for _ in range(2):
    x = sat.SparseTransformerBlock(num_heads=4, pattern=pattern, num_layers=2, block_size=16,
                                   dropout=0.1)(x)
  logits = keras.layers.Dense(VOCAB, name="logits")(keras.layers.LayerNormalization()(x))
  return keras.Model(tokens, logits)


def attention_model():
  """A bare SparseMultiHeadAttention with a key padding mask input and dict outputs."""
  import keras
  import sparse_attention_tf as sat
  features = keras.Input((SEQ_LEN, WIDTH), name="features")
  real = keras.Input((SEQ_LEN,), dtype="bool", name="real")
  attention = sat.SparseMultiHeadAttention(num_heads=4, key_dim=8,
                                           pattern=sat.Strided(16, heads=2, mode="split"),
                                           block_size=16)
  attended = attention(features, key_padding_mask=real)
  pooled = keras.layers.GlobalAveragePooling1D()(attended)
  return keras.Model({"features": features, "real": real},
                     {"attended": attended, "pooled": keras.layers.Dense(3)(pooled)})


def sequential_model():
  import keras
  import sparse_attention_tf as sat
  return keras.Sequential([
      keras.Input((SEQ_LEN,), dtype="int32", name="ids"),
      keras.layers.Embedding(VOCAB, 16),
      sat.layers.StridedPositionEmbedding(SEQ_LEN, 16),
      sat.SparseTransformerBlock(num_heads=2, pattern=sat.Local(16), block_size=16),
      keras.layers.Dense(VOCAB, name="head")])


def model_inputs(name, rng, batch):
  if name == "attention":
    lengths = rng.integers(1, SEQ_LEN + 1, size=batch)
    return {"features": rng.normal(size=(batch, SEQ_LEN, WIDTH)).astype(np.float32),
            "real": np.arange(SEQ_LEN)[None] < lengths[:, None]}
  key = "tokens" if name == "readme" else "ids"
  return {key: rng.integers(0, VOCAB, size=(batch, SEQ_LEN)).astype(np.int32)}


def keras_outputs(model, inputs):
  """The Keras model's outputs as {signature output name: array}."""
  out = model(inputs if len(inputs) > 1 else next(iter(inputs.values())), training=False)
  if isinstance(out, dict):
    return {k: np.asarray(v) for k, v in out.items()}
  name = model.layers[-1].name
  return {name: np.asarray(out)}


# --- exports, once per module ------------------------------------------------------
FRESH = """
# Stock TensorFlow only: loads each portable export and runs it on the saved inputs.
import json, sys, traceback
import numpy as np
import tensorflow as tf

result = {}
for name in sys.argv[1].split(","):
  try:
    loaded = tf.saved_model.load(f"{name}_export/1")
    fn = loaded.signatures["serving_default"]
    types = set()
    for signature in loaded.signatures.values():
      graph = signature.graph.as_graph_def()
      types |= {n.op for n in graph.node} | {n.op for f in graph.library.function
                                             for n in f.node_def}
    result[name] = {"signatures": sorted(loaded.signatures),
                    "custom_ops": sorted(t for t in types if t.startswith("SparseAttention>"))}
    for i in range(int(sys.argv[2])):
      inputs = dict(np.load(f"{name}_inputs_{i}.npz"))
      out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
      np.savez(f"{name}_out_{i}.npz", **{k: v.numpy() for k, v in out.items()})
    if "generate" in loaded.signatures:
      inputs = dict(np.load("generate_inputs.npz"))
      out = loaded.signatures["generate"](**{k: tf.constant(v) for k, v in inputs.items()})
      np.savez(f"{name}_generate.npz", **{k: v.numpy() for k, v in out.items()})
  except Exception:
    result[name] = {"error": traceback.format_exc()}
result["our_modules"] = sorted(m for m in sys.modules if m.startswith("sparse_attention_tf"))
with open("result.json", "w") as f:
  json.dump(result, f)
"""


def run_fresh(workdir, names):
  """The fresh process: no PYTHONPATH, so sparse_attention_tf cannot even be imported."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(TF_CPP_MIN_LOG_LEVEL="3", TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")
  return subprocess.run([sys.executable, "-c", textwrap.dedent(FRESH), ",".join(names),
                         str(len(BATCHES))], cwd=workdir, env=env, capture_output=True,
                        text=True, timeout=TIMEOUT)


class Artifacts:
  pass


@pytest.fixture(scope="module")
def art(tmp_path_factory, ops):
  from sparse_attention_tf import export
  seed = int(os.environ.get("SPARSE_ATTENTION_TEST_SEED", secrets.randbits(32)))
  print(f"SPARSE_ATTENTION_TEST_SEED={seed}")
  rng = np.random.default_rng(seed)
  a = Artifacts()
  a.root = tmp_path_factory.mktemp("functional")
  a.models = {"readme": readme_model(), "attention": attention_model(),
              "sequential": sequential_model()}
  a.inputs, a.outputs, a.exports = {}, {}, {}
  for name, model in a.models.items():
    a.inputs[name] = [model_inputs(name, rng, batch) for batch in BATCHES]
    a.outputs[name] = [keras_outputs(model, inputs) for inputs in a.inputs[name]]
    signatures = ("serving_default", "generate") if name == "readme" else None
    a.exports[name] = export.export_saved_model(model, str(a.root / f"{name}_export"),
                                                signatures=signatures, stop_token_ids=[5])
    for i, inputs in enumerate(a.inputs[name]):
      np.savez(a.root / f"{name}_inputs_{i}.npz", **inputs)
  a.generate = {"tokens": rng.integers(0, VOCAB, (2, 9)).astype(np.int32),
                "lengths": np.array([9, 4], np.int32),
                "max_new_tokens": np.array([20, 30], np.int32),
                "temperature": np.array([1.5, 0.0], np.float32),
                "top_k": np.array([6, 0], np.int32), "top_p": np.array([0.9, 1.0], np.float32),
                "seed": np.array([3, 4], np.int32)}
  np.savez(a.root / "generate_inputs.npz", **a.generate)
  pool = futures.ThreadPoolExecutor(max_workers=1)
  a.fresh = pool.submit(run_fresh, a.root, list(a.models))
  a.custom = export.export_saved_model(a.models["readme"], str(a.root / "custom"),
                                       mode="custom_op")
  yield a
  pool.shutdown(wait=True, cancel_futures=True)


# --- 1. portable exports in a process without the library -----------------------------
def test_functional_generate_signature_matches_sparse_causal_lm(art):
  """The README model's generate signature, in the fresh process, samples what
  SparseCausalLM.generate samples for each row (same sampler, seed and stop token)."""
  from sparse_attention_tf import generation
  proc = art.fresh.result()
  assert proc.returncode == 0, proc.stderr[-4000:]
  got = dict(np.load(art.root / "readme_generate.npz"))
  lm = generation.SparseCausalLM(art.models["readme"])
  g = art.generate
  for b, n in enumerate(g["lengths"]):
    sampler = generation.Sampler(temperature=float(g["temperature"][b]),
                                 top_k=int(g["top_k"][b]) or None, top_p=float(g["top_p"][b]),
                                 seed=int(g["seed"][b]))
    want = lm.generate(g["tokens"][b, :n], int(g["max_new_tokens"][b]), sampler=sampler,
                       stop_token_ids=[5])
    hits = np.nonzero(want[n:] == 5)[0]
    end = n + hits[0] + 1 if len(hits) else len(want)
    assert got["sequence_lengths"][b] == end, (b, got["sequence_lengths"], want)
    np.testing.assert_array_equal(got["sequences"][b, :len(want)], want, err_msg=f"row {b}")
    assert (got["sequences"][b, len(want):] == 0).all()


@pytest.mark.parametrize("name", ["readme", "attention", "sequential"])
def test_portable_export_matches_without_the_library(art, name):
  proc = art.fresh.result()
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads((art.root / "result.json").read_text())
  assert result["our_modules"] == [], result["our_modules"]
  assert "error" not in result[name], result[name]["error"]
  want_signatures = ["generate", "serving_default"] if name == "readme" else ["serving_default"]
  assert result[name]["signatures"] == want_signatures
  assert result[name]["custom_ops"] == []
  for i, want in enumerate(art.outputs[name]):
    got = dict(np.load(art.root / f"{name}_out_{i}.npz"))
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for key in want:
      assert got[key].shape == want[key].shape and got[key].dtype == np.float32, key
      np.testing.assert_allclose(got[key], want[key], **TOL, err_msg=f"{name}/{key} {i}")


# --- 2. custom_op export ---------------------------------------------------------------
def test_custom_op_export_matches(art):
  from sparse_attention_tf import export
  loaded = export.load_saved_model(art.custom)
  graph = loaded.signatures["serving_default"].graph.as_graph_def()
  ops = {n.op for f in graph.library.function for n in f.node_def}
  assert any(op.startswith("SparseAttention>") for op in ops), sorted(ops)
  for inputs, want in zip(art.inputs["readme"], art.outputs["readme"]):
    got = export.predict(loaded, inputs)
    assert sorted(got) == ["logits"]
    np.testing.assert_allclose(got["logits"], want["logits"], **TOL)


# --- 3. signatures and metadata -----------------------------------------------------------
def test_signature_follows_the_model_inputs(art):
  import tensorflow as tf
  loaded = tf.saved_model.load(art.exports["attention"])
  fn = loaded.signatures["serving_default"]
  specs = fn.structured_input_signature[1]
  assert specs == {"features": tf.TensorSpec([None, SEQ_LEN, WIDTH], tf.float32, "features"),
                   "real": tf.TensorSpec([None, SEQ_LEN], tf.bool, "real")}, specs
  assert sorted(fn.structured_outputs) == ["attended", "pooled"]
  meta = json.loads(open(os.path.join(art.exports["readme"], "assets.extra",
                                      "sparse_attention_tf.json")).read())
  assert meta["mode"] == "portable" and meta["op_library"] is None
  assert meta["model_class"] == "Functional"
  assert meta["signatures"]["serving_default"] == {
      "inputs": {"tokens": {"dtype": "int32", "shape": [None, SEQ_LEN]}},
      "outputs": {"logits": {"dtype": "float32", "shape": [None, SEQ_LEN, VOCAB]}}}
  assert list(meta["signatures"]) == ["serving_default", "generate"]
  assert meta["generate"] == {"jit_compile": False, "stop_token_ids": [5], "pad_token_id": 0}
  assert meta["signatures"]["generate"]["outputs"] == {
      "sequences": {"dtype": "int32", "shape": [None, None]},
      "sequence_lengths": {"dtype": "int32", "shape": [None]}}


def test_metadata_config_rebuilds_the_model(art):
  import keras
  meta = json.loads(open(os.path.join(art.exports["sequential"], "assets.extra",
                                      "sparse_attention_tf.json")).read())
  assert meta["model_class"] == "Sequential"
  rebuilt = keras.Sequential.from_config(meta["model_config"])
  blocks = [l for l in rebuilt.layers if "sparse_transformer_block" in l.name]
  assert [b.implementation for b in blocks] == ["reference"]
  rebuilt.set_weights(art.models["sequential"].get_weights())
  inputs = art.inputs["sequential"][0]["ids"]
  np.testing.assert_allclose(np.asarray(rebuilt(inputs)), art.outputs["sequential"][0]["head"],
                             **TOL)


def test_predict_names_the_expected_shape(art):
  import tensorflow as tf
  from sparse_attention_tf import export
  loaded = tf.saved_model.load(art.exports["readme"])
  tokens = art.inputs["readme"][0]["tokens"]
  with pytest.raises(ValueError, match=rf"'tokens' .* must be int32 \[batch, {SEQ_LEN}\].*"
                                       rf"got int32 \[3, {SEQ_LEN - 1}\]"):
    export.predict(loaded, tokens[:, 1:])
  with pytest.raises(ValueError, match=r"must be bool \[batch, 64\].*got int64"):
    inputs = dict(art.inputs["attention"][0], real=np.ones((3, SEQ_LEN), np.int64))
    export.predict(tf.saved_model.load(art.exports["attention"]), inputs)


# --- 4. what cannot be exported -------------------------------------------------------
class Subclassed:
  """Builds a subclassed model (the class is made inside the test, where keras is imported)."""

  @staticmethod
  def make():
    import keras
    import sparse_attention_tf as sat

    class Classifier(keras.Model):
      def __init__(self):
        super().__init__()
        self.embed = keras.layers.Embedding(VOCAB, 16)
        self.block = sat.SparseTransformerBlock(2, sat.Local(16), block_size=16)

      def call(self, tokens):
        return self.block(self.embed(tokens))

    model = Classifier()
    model(np.zeros((1, SEQ_LEN), np.int32))
    return model


def test_refuses_what_it_cannot_export(art, tmp_path):
  import keras
  import sparse_attention_tf as sat
  from sparse_attention_tf import export
  path = str(tmp_path / "out")
  with pytest.raises(ValueError, match=r"subclassed model Classifier.*keras.Model\(inputs"):
    export.export_saved_model(Subclassed.make(), path)
  with pytest.raises(ValueError, match="no inputs yet"):
    export.export_saved_model(keras.Sequential([sat.SparseTransformerBlock(2, sat.Local(16))]),
                              path)
  with pytest.raises(ValueError, match="signatures must be a non-empty subset of"):
    export.export_saved_model(art.models["readme"], path, signatures=("score",))
  with pytest.raises(ValueError, match="SparseCausalLM"):   # not a language model
    export.export_saved_model(art.models["attention"], path,
                              signatures=("serving_default", "generate"))
  assert not os.path.exists(path)


def test_portable_refuses_attention_it_cannot_switch(tmp_path):
  """A layer that fixes its own implementation would leave a custom op in a portable export."""
  import keras
  import sparse_attention_tf as sat
  from sparse_attention_tf import export

  class FusedOnly(keras.layers.Layer):
    def call(self, x):
      q = keras.ops.reshape(x, (-1, SEQ_LEN, 2, WIDTH // 2))               # (B, T, H, K)
      out = sat.sparse_attention(q, q, q, sat.Local(16), block_size=16,
                                 implementation="custom_op")
      return keras.ops.reshape(out, (-1, SEQ_LEN, WIDTH))                  # (B, T, D)

  features = keras.Input((SEQ_LEN, WIDTH))
  model = keras.Model(features, keras.layers.Dense(2)(FusedOnly()(features)))
  path = str(tmp_path / "out")
  with pytest.raises(ValueError, match="still holds custom ops"):
    export.export_saved_model(model, path)
  assert not os.path.exists(path)
  assert os.path.isdir(export.export_saved_model(model, path, mode="custom_op"))
