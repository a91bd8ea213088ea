"""Tests of `sparse_attention_tf.export` for a SparseTransformer: SavedModels for TF Serving.

(Functional, Sequential and attention-only models: `test_export_functional.py`.)

* Portable export: a fresh Python process that never loads this library (no
  PYTHONPATH to the repo, no import of sparse_attention_tf, the op library not
  mapped) loads the SavedModel with stock TensorFlow, runs all four signatures
  on three batches (prompts of different `lengths`, garbage after each
  length, `tokens` narrower than seq_len) and matches the Keras model and
  NumPy: `last` is the distribution after position `lengths - 1`, `score`
  the mean bits of `tokens[1:lengths]`; the graphs hold no `SparseAttention>` op.
* The graph's own checks (what TF Serving can send) and `predict`'s checks.
* Layout and metadata (`assets.extra/sparse_attention_tf.json`).
* `saved_model_cli show` / `run` on the export.
* custom_op export: fails to load without the op library (and
  `load_saved_model(load_ops=False)` says which library), loads and matches
  after `tf.load_op_library`, and really uses the custom ops.
* `rest_to_inputs`: every TF Serving REST body form, ragged prompts padded
  and `lengths` filled in, and its ValueErrors; an integer outside int32 must
  not wrap around to another token.
* Errors of `export_saved_model` and of the command line; the command line
  and `train_main.py --export_dir` write `<export_dir>/1/`; an export of a
  subset of the signatures lists in its metadata what the SavedModel holds.
* An existing version is replaced only with `overwrite=True` / `--overwrite`,
  and a failed export leaves the old version (or nothing) behind.

The model is tiny and built and exported once per module. The subprocesses
(fresh interpreters, saved_model_cli, the command line, train_main.py) run two
at a time in the background while the in-process tests run; they write their
outputs to files that are compared here.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import textwrap
from concurrent import futures

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN, VOCAB = 64, 32
SIGNATURE_OUTPUTS = {"serving_default": {"logits"}, "logits": {"logits"},
                     "next_token_distribution": {"probabilities", "last"},
                     "score": {"bits_per_token"}}
# tag -> (batch, width L of `tokens`, lengths; None: random in [2, L)). Rows of different
# lengths, full rows (the requests of a fixed-length client), tokens narrower than seq_len.
BATCHES = {"a": (3, SEQ_LEN, (SEQ_LEN, None, 2)), "b": (1, SEQ_LEN, (SEQ_LEN,)),
           "c": (2, 40, (None, 40))}
TOL = dict(rtol=1e-4, atol=1e-4)
TIMEOUT = 240
# The generate signature's request: per row a sampler (plain, greedy, top-k + top-p at
# temperature 1.5, and a row that asks for no new token), prompts of different lengths.
GENERATE_LENGTHS = [20, 5, 11, 7]
GENERATE_ROWS = {"max_new_tokens": ([30, SEQ_LEN + 1 - 5, 10, 0], np.int32),
                 "temperature": ([1.0, 0.0, 1.5, 1.0], np.float32),
                 "top_k": ([0, 0, 5, 0], np.int32),
                 "top_p": ([0.9, 1.0, 0.8, 1.0], np.float32),
                 "seed": ([11, -5, 2**31 - 1, 0], np.int32)}   # any int32 seed
GENERATE_STOP = [3]       # export-time stop token: some rows end early

# TensorFlow's native start-up lines (written before TF_CPP_MIN_LOG_LEVEL applies).
_TF_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|"
                     r"[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ )")


def program_lines(stderr: str) -> list:
  """stderr without TensorFlow's native log lines."""
  return [l for l in stderr.splitlines() if l.strip() and not _TF_LOG.match(l)]


def run_process(args, cwd, pythonpath=None, timeout=TIMEOUT):
  """Runs a subprocess with PYTHONPATH removed (or set to `pythonpath`)."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  env.setdefault("TF_NUM_INTRAOP_THREADS", "1")   # tiny models; the CPUs are shared
  env.setdefault("TF_NUM_INTEROP_THREADS", "1")
  if pythonpath:
    env["PYTHONPATH"] = pythonpath
  return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def python_args(code, *args):
  return [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]


def check_exit(proc, want=0):
  assert proc.returncode == want, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n" \
                                  f"stderr:\n{proc.stderr[-6000:]}"


class Jobs:
  """The module's subprocesses, run two at a time in the background.

  A job starts only when one of its tests (`JOB_TESTS`) is selected;
  `result` waits for it (or runs it, if it was not started).
  """

  def __init__(self, selected):
    self.selected = selected
    self.pool = futures.ThreadPoolExecutor(max_workers=2)
    self.futures, self.specs = {}, {}

  def add(self, name, args, cwd, pythonpath=None):
    self.specs[name] = (args, str(cwd), pythonpath)
    if self.selected & set(JOB_TESTS[name]):
      self.futures[name] = self.pool.submit(run_process, args, str(cwd), pythonpath)

  def result(self, name):
    if name not in self.futures:
      self.futures[name] = self.pool.submit(run_process, *self.specs[name])
    return self.futures[name].result()

  def close(self):
    self.pool.shutdown(wait=True, cancel_futures=True)


JOB_TESTS = {   # job -> the tests that read it
    "train_main": ("test_train_main_export_dir",),
    "cli_missing": ("test_cli_missing_model",),
    "fresh": ("test_portable_export_runs_without_the_library",
              "test_portable_export_runs_in_a_session_like_tf_serving",
              "test_custom_op_export_needs_the_op_library"),
    "load_saved_model": ("test_load_saved_model_names_the_missing_library",),
    "cli_show": ("test_saved_model_cli_show_and_run",),
    "cli_run": ("test_saved_model_cli_show_and_run",),
    "cli_run_generate": ("test_saved_model_cli_runs_generate",),
    "cli_export": ("test_cli_exports_a_keras_file",),
    "cli_exists": ("test_cli_refuses_an_existing_version",),
}
TRAIN_FLAGS = ["--num_layers=1", "--d_model=32", "--num_heads=2", "--batch_size=4",
               "--seq_len=64", "--block_size=16", "--stride=16", "--summary=4", "--steps=2",
               "--steps_per_epoch=1", "--validation_steps=1", "--verbose=0", "--sample_tokens=8"]


# --- NumPy references ----------------------------------------------------------
def np_softmax(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=-1, keepdims=True)


def np_bits_per_token(logits, tokens, lengths):
  """Mean over t = 1..n-1 of -log2 p(tokens[t] | tokens[:t]), from logits at t - 1; n = length."""
  bits = []
  for row_logits, row, n in zip(logits, tokens, lengths):
    x = np.asarray(row_logits[:n - 1], np.float64)                        # (n-1, V)
    x = x - x.max(axis=-1, keepdims=True)
    log_p = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    target = log_p[np.arange(n - 1), row[1:n]]                            # (n-1,)
    bits.append((-target / np.log(2.0)).mean())
  return np.array(bits)                                                   # (B,)


def expected_outputs(logits, tokens, lengths):
  """The four signatures' outputs from the Keras logits `[B, seq_len, V]`."""
  logits = logits[:, :tokens.shape[1]]                                    # (B, L, V)
  probs = np_softmax(logits)
  last = probs[np.arange(len(lengths)), np.asarray(lengths) - 1]          # (B, V)
  return {"serving_default": {"logits": logits}, "logits": {"logits": logits},
          "next_token_distribution": {"probabilities": probs, "last": last},
          "score": {"bits_per_token": np_bits_per_token(logits, tokens, lengths)}}


def make_batch(rng, batch, width, lengths):
  """`tokens` [B, L] with garbage after each row's length, `lengths`, and the zero-padded
  `[B, seq_len]` tokens the Keras model sees."""
  lengths = np.array([rng.integers(2, width) if n is None else n for n in lengths], np.int32)
  tokens = rng.integers(0, VOCAB, size=(batch, width)).astype(np.int32)
  full = np.zeros((batch, SEQ_LEN), np.int32)
  for i, n in enumerate(lengths):
    full[i, :n] = tokens[i, :n]
    tokens[i, n:] = rng.integers(-5, 5 * VOCAB, size=width - n)   # ignored by the graph
  return tokens, lengths, full


# --- the model and its exports, once per module ------------------------------
def make_model(seed):
  import sparse_attention_tf as sat
  model = sat.SparseTransformer(vocab_size=VOCAB, seq_len=SEQ_LEN, num_layers=2, d_model=32,
                                num_heads=4, pattern=sat.Fixed(16, 4), block_size=16)
  model(np.zeros((1, SEQ_LEN), np.int32))
  rng = np.random.default_rng(seed)
  changed = 0
  for w in model.weights:
    if "logits" in w.path:   # zero-initialised: make the outputs non-uniform
      w.assign(rng.normal(0.0, 1.0, size=tuple(w.shape)).astype(np.float32))
      changed += 1
  assert changed == 2
  return model


class Artifacts:
  pass


@pytest.fixture(scope="module")
def jobs(request, tmp_path_factory):
  """The background subprocesses; those without the model start at once."""
  here = request.module.__file__
  selected = {getattr(item, "originalname", item.name) for item in request.session.items
              if getattr(item, "fspath", None) and str(item.fspath) == here}
  j = Jobs(selected)
  j.root = tmp_path_factory.mktemp("jobs")
  j.add("train_main", [sys.executable, os.path.join(REPO_ROOT, "train_main.py"), *TRAIN_FLAGS,
                       f"--output_dir={j.root / 'train_run'}",
                       f"--export_dir={j.root / 'train_export'}"], REPO_ROOT)
  j.add("cli_missing", [sys.executable, "-m", "sparse_attention_tf.export", "--model",
                        "/does/not/exist", "--export_dir", str(j.root / "missing_export")],
        REPO_ROOT)
  (j.root / "cli_exists" / "1").mkdir(parents=True)
  (j.root / "cli_exists" / "1" / "keep.txt").write_text("kept")
  j.add("cli_exists", [sys.executable, "-m", "sparse_attention_tf.export", "--model", here,
                       "--export_dir", str(j.root / "cli_exists")], REPO_ROOT)  # never read
  yield j
  j.close()


@pytest.fixture(scope="module")
def art(jobs, tmp_path_factory, ops):
  """The model, its tokens and logits, its exports; starts the jobs that need them."""
  from sparse_attention_tf import export
  seed = int(os.environ.get("SPARSE_ATTENTION_TEST_SEED", secrets.randbits(32)))
  print(f"SPARSE_ATTENTION_TEST_SEED={seed}")
  a = Artifacts()
  a.root = tmp_path_factory.mktemp("export")
  a.model = make_model(seed)
  rng = np.random.default_rng(seed + 1)
  a.tokens, a.lengths, a.full, a.logits = {}, {}, {}, {}
  for tag, spec in BATCHES.items():
    a.tokens[tag], a.lengths[tag], a.full[tag] = make_batch(rng, *spec)
    a.logits[tag] = np.asarray(a.model(a.full[tag], training=False), np.float32)
    assert a.logits[tag].std() > 0.5, "outputs are (nearly) uniform"
  a.portable_base = str(a.root / "portable")
  a.portable = export.export_saved_model(a.model, a.portable_base, stop_token_ids=GENERATE_STOP)
  a.custom_base = str(a.root / "custom")
  a.custom = export.export_saved_model(a.model, a.custom_base, mode="custom_op",
                                       stop_token_ids=GENERATE_STOP, generate_jit_compile=True)
  a.generate, _, _ = make_batch(rng, len(GENERATE_LENGTHS), 20, GENERATE_LENGTHS)
  a.generate = {"tokens": a.generate, "lengths": np.array(GENERATE_LENGTHS, np.int32),
                **{k: np.array(v, t) for k, (v, t) in GENERATE_ROWS.items()}}
  a.keras_file = str(a.root / "model.keras")
  a.model.save(a.keras_file)
  a.library = ops.library_path()
  a.dirs = {}
  for name in ("fresh", "load_saved_model", "cli"):
    a.dirs[name] = jobs.root / name
    a.dirs[name].mkdir()
    for tag in BATCHES:
      np.save(a.dirs[name] / f"tokens_{tag}.npy", a.tokens[tag])
      np.save(a.dirs[name] / f"lengths_{tag}.npy", a.lengths[tag])
    for key, value in a.generate.items():
      np.save(a.dirs[name] / f"generate_{key}.npy", value)
  jobs.add("fresh", python_args(FRESH, a.portable, a.custom, a.library,
                                ",".join(SIGNATURE_OUTPUTS), ",".join(BATCHES), SEQ_LEN),
           a.dirs["fresh"])
  jobs.add("load_saved_model", python_args(FRESH_LOAD_SAVED_MODEL, a.custom),
           a.dirs["load_saved_model"], pythonpath=REPO_ROOT)
  jobs.add("cli_show", [saved_model_cli(), "show", "--dir", a.portable, "--all"], a.dirs["cli"])
  jobs.add("cli_run", [saved_model_cli(), "run", "--dir", a.portable, "--tag_set", "serve",
                       "--signature_def", "serving_default", "--inputs",
                       f"tokens={a.dirs['cli'] / 'tokens_a.npy'};"
                       f"lengths={a.dirs['cli'] / 'lengths_a.npy'}", "--outdir",
                       str(a.dirs["cli"] / "cli_out")], a.dirs["cli"])
  jobs.add("cli_run_generate", [
      saved_model_cli(), "run", "--dir", a.portable, "--tag_set", "serve", "--signature_def",
      "generate", "--inputs", ";".join(f"{k}={a.dirs['cli'] / f'generate_{k}.npy'}"
                                       for k in a.generate),
      "--outdir", str(a.dirs["cli"] / "generate_out")], a.dirs["cli"])
  a.cli_export_dir = jobs.root / "cli_export"
  (a.cli_export_dir / "1").mkdir(parents=True)   # a stale version: --overwrite replaces it
  (a.cli_export_dir / "1" / "stale.txt").write_text("old")
  jobs.add("cli_export", [sys.executable, "-m", "sparse_attention_tf.export", "--model",
                          a.keras_file, "--export_dir", str(a.cli_export_dir), "--overwrite",
                          "--stop_token_ids", "3,9", "--pad_token_id", "-1",
                          "--generate_jit_compile"], REPO_ROOT)
  return a


@pytest.fixture(scope="module")
def portable_loaded(art):
  import tensorflow as tf
  return tf.saved_model.load(art.portable)


def saved_model_cli():
  path = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
  assert os.path.exists(path), path
  return path


# --- 1. portable export in a process without the library ---------------------
FRESH = """
# Runs with stock TensorFlow only: first the portable export (the op library not
# loaded), then the custom_op export before and after tf.load_op_library.
import importlib.util, json, sys, traceback
import numpy as np
import tensorflow as tf

portable, custom, library = sys.argv[1:4]
names, tags = sys.argv[4].split(","), sys.argv[5].split(",")

def inputs(tag):
  return {"tokens": tf.constant(np.load(f"tokens_{tag}.npy")),
          "lengths": tf.constant(np.load(f"lengths_{tag}.npy"))}

def generate_inputs():
  names = ("tokens", "lengths", "max_new_tokens", "temperature", "top_k", "top_p", "seed")
  return {k: tf.constant(np.load(f"generate_{k}.npy")) for k in names}

def op_types(fn):
  graph = fn.graph.as_graph_def()
  types = {n.op for n in graph.node}
  types |= {n.op for f in graph.library.function for n in f.node_def}
  return sorted(t for t in types if t.startswith("SparseAttention>"))

def ours():
  return sorted(m for m in sys.modules if m.startswith("sparse_attention_tf"))

def library_mapped():
  with open("/proc/self/maps") as f:
    return "_sparse_attention_ops" in f.read()

result = {}
try:
  loaded = tf.saved_model.load(portable)
  result["signatures"] = sorted(loaded.signatures.keys())
  result["custom_ops"] = {}
  for name in names:
    fn = loaded.signatures[name]
    result["custom_ops"][name] = op_types(fn)
    for tag in tags:
      out = fn(**inputs(tag))
      np.savez(f"out_{name}_{tag}.npz", **{k: v.numpy() for k, v in out.items()})
  fn = loaded.signatures["generate"]
  result["custom_ops"]["generate"] = op_types(fn)
  out = fn(**generate_inputs())
  np.savez("generate_portable.npz", **{k: v.numpy() for k, v in out.items()})
  result["our_modules"] = ours()
  result["importable"] = importlib.util.find_spec("sparse_attention_tf") is not None
  result["op_library_mapped"] = library_mapped()
except Exception:
  result["error"] = traceback.format_exc()
with open("portable.json", "w") as f:
  json.dump(result, f)

# As TF Serving runs it: Session::Run on the signature's tensor names, in a TF1 graph.
result = {}
try:
  with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as sess:
    meta_graph = tf.compat.v1.saved_model.loader.load(sess, ["serve"], portable)
    sig = meta_graph.signature_def["serving_default"]
    def run(tokens, lengths):
      return sess.run(sig.outputs["logits"].name, {sig.inputs["tokens"].name: tokens,
                                                   sig.inputs["lengths"].name: lengths})
    np.save("session_logits_c.npy", run(np.load("tokens_c.npy"), np.load("lengths_c.npy")))
    try:
      run(np.zeros((1, int(sys.argv[6]) + 1), np.int32), np.ones([1], np.int32))
      result["too_long"] = "no error"
    except Exception as e:
      result["too_long"] = [type(e).__name__, str(e)]
except Exception:
  result["error"] = traceback.format_exc()
with open("session.json", "w") as f:
  json.dump(result, f)

result = {"mapped_before": library_mapped()}
try:
  try:
    tf.saved_model.load(custom)
    result["first_load"] = "loaded"
  except Exception as e:
    result["first_load"] = f"{type(e).__name__}: {e}"
  tf.load_op_library(library)
  loaded = tf.saved_model.load(custom)
  fn = loaded.signatures["serving_default"]
  result["custom_ops"] = op_types(fn)
  for tag in tags:
    logits = fn(**inputs(tag))["logits"]
    np.save(f"logits_{tag}.npy", logits.numpy())
  out = loaded.signatures["generate"](**generate_inputs())      # its decoding loop under XLA
  np.savez("generate_custom.npz", **{k: v.numpy() for k, v in out.items()})
  result["our_modules"] = ours()
except Exception:
  result["error"] = traceback.format_exc()
with open("custom.json", "w") as f:
  json.dump(result, f)
"""


def test_portable_export_runs_without_the_library(art, jobs):
  check_exit(jobs.result("fresh"))
  workdir = art.dirs["fresh"]
  result = json.loads((workdir / "portable.json").read_text())
  assert "error" not in result, result["error"]
  # The process really ran without this library.
  assert result["our_modules"] == [] and not result["importable"], result
  assert not result["op_library_mapped"]
  assert set(SIGNATURE_OUTPUTS) <= set(result["signatures"]), result["signatures"]
  assert result["custom_ops"] == {name: [] for name in [*SIGNATURE_OUTPUTS, "generate"]}, \
      result["custom_ops"]
  for tag, (batch, width, _) in BATCHES.items():
    want = expected_outputs(art.logits[tag], art.tokens[tag], art.lengths[tag])
    for name, keys in SIGNATURE_OUTPUTS.items():
      got = dict(np.load(workdir / f"out_{name}_{tag}.npz"))
      assert set(got) == keys, (name, sorted(got))
      for key in keys:
        assert got[key].dtype == np.float32, (name, key, got[key].dtype)
        assert got[key].shape == want[name][key].shape, (name, key, got[key].shape)
        assert got[key].shape[0] == batch
        np.testing.assert_allclose(got[key], want[name][key], **TOL,
                                   err_msg=f"{name}/{key} batch {tag}")
  # The rows really differ in length, and a narrower batch came back narrower.
  assert len(set(art.lengths["a"])) == 3 and BATCHES["c"][1] < SEQ_LEN


def test_portable_export_runs_in_a_session_like_tf_serving(art, jobs):
  check_exit(jobs.result("fresh"))
  workdir = art.dirs["fresh"]
  result = json.loads((workdir / "session.json").read_text())
  assert "error" not in result, result["error"]
  np.testing.assert_allclose(np.load(workdir / "session_logits_c.npy"),
                             art.logits["c"][:, :BATCHES["c"][1]], **TOL)
  kind, message = result["too_long"]
  assert kind == "InvalidArgumentError", result["too_long"]
  assert f"seq_len = {SEQ_LEN}: send at most {SEQ_LEN} tokens" in message, message


# --- 2. layout and metadata -----------------------------------------------------
@pytest.mark.parametrize("mode", ["portable", "custom_op"])
def test_layout_and_metadata(art, mode):
  import sparse_attention_tf as sat
  base, out = (art.portable_base, art.portable) if mode == "portable" else \
      (art.custom_base, art.custom)
  assert out == os.path.join(base, "1")
  assert sorted(os.listdir(base)) == ["1"]
  assert os.path.isfile(os.path.join(out, "saved_model.pb"))
  assert os.path.isdir(os.path.join(out, "variables"))
  assert os.path.isfile(os.path.join(out, "variables", "variables.index"))
  meta_file = os.path.join(out, "assets.extra", "sparse_attention_tf.json")
  assert os.path.isfile(meta_file)
  with open(meta_file) as f:
    meta = json.load(f)
  assert meta["mode"] == mode
  assert list(meta["signatures"]) == [*SIGNATURE_OUTPUTS, "generate"]
  assert meta["generate"] == {"jit_compile": mode == "custom_op", "stop_token_ids": GENERATE_STOP,
                              "pad_token_id": 0}
  rows = {k: {"dtype": np.dtype(t).name, "shape": [None]} for k, (_, t) in GENERATE_ROWS.items()}
  assert meta["signatures"]["generate"] == {
      "inputs": {"tokens": {"dtype": "int32", "shape": [None, None]},
                 "lengths": {"dtype": "int32", "shape": [None]}, **rows},
      "outputs": {"sequences": {"dtype": "int32", "shape": [None, None]},
                  "sequence_lengths": {"dtype": "int32", "shape": [None]}}}
  inputs = {"tokens": {"dtype": "int32", "shape": [None, None]},
            "lengths": {"dtype": "int32", "shape": [None]}}
  outputs = {"logits": [None, None, VOCAB], "probabilities": [None, None, VOCAB],
             "last": [None, VOCAB], "bits_per_token": [None]}
  for name, keys in SIGNATURE_OUTPUTS.items():
    assert meta["signatures"][name] == {
        "inputs": inputs,
        "outputs": {k: {"dtype": "float32", "shape": outputs[k]} for k in sorted(keys)}}, name
  assert meta["model_class"] == "SparseTransformer"
  assert meta["op_library"] == (None if mode == "portable" else "_sparse_attention_ops.so")
  config = meta["model_config"]
  assert config["implementation"] == ("reference" if mode == "portable" else "custom_op")
  rebuilt = sat.SparseTransformer.from_config(config)
  assert isinstance(rebuilt, sat.SparseTransformer)
  original = art.model.get_config()
  for key in ("vocab_size", "seq_len", "num_layers", "d_model", "num_heads", "pattern",
              "head_mode", "embedding", "block_size", "ffn_multiplier", "dropout"):
    assert rebuilt.get_config()[key] == original[key], key
  assert rebuilt.pattern == art.model.pattern
  # Same architecture: the original weights fit and give the same logits.
  rebuilt(np.zeros((1, SEQ_LEN), np.int32))
  rebuilt.set_weights([w.numpy() for w in art.model.weights])
  np.testing.assert_allclose(np.asarray(rebuilt(art.full["a"], training=False)),
                             art.logits["a"], **TOL)


# --- 3. saved_model_cli ---------------------------------------------------------
def signature_blocks(show_output: str) -> dict:
  parts = re.split(r"^signature_def\['([^']+)'\]:\s*$", show_output, flags=re.M)
  blocks = dict(zip(parts[1::2], parts[2::2]))
  last = parts[-1] if len(parts) > 1 else ""
  if len(parts) > 1:   # cut the tail (ops list, concrete functions) off the last block
    blocks[parts[-2]] = last.split("\nThe MetaGraph with tag set")[0].split("\nConcrete")[0]
  return blocks


def tensor_infos(block: str, kind: str) -> dict:
  """{name: (dtype, shape)} of `inputs` or `outputs` in a signature block."""
  found = re.findall(kind + r"\['([^']+)'\] tensor_info:\s*\n\s*dtype: (\S+)\s*\n\s*shape: "
                     r"(\([^)]*\))", block)
  return {name: (dtype, shape) for name, dtype, shape in found}


def test_saved_model_cli_show_and_run(art, jobs):
  show = jobs.result("cli_show")
  check_exit(show)
  blocks = signature_blocks(show.stdout)
  assert set(SIGNATURE_OUTPUTS) <= set(blocks), sorted(blocks)
  out_shapes = {"logits": f"(-1, -1, {VOCAB})", "probabilities": f"(-1, -1, {VOCAB})",
                "last": f"(-1, {VOCAB})", "bits_per_token": "(-1)"}
  for name, keys in SIGNATURE_OUTPUTS.items():
    assert tensor_infos(blocks[name], "inputs") == {"tokens": ("DT_INT32", "(-1, -1)"),
                                                    "lengths": ("DT_INT32", "(-1)")}, \
        (name, blocks[name])
    outputs = tensor_infos(blocks[name], "outputs")
    assert outputs == {k: ("DT_FLOAT", out_shapes[k]) for k in keys}, (name, blocks[name])
    assert "Method name is: tensorflow/serving/predict" in blocks[name]
  assert tensor_infos(blocks["generate"], "inputs") == {
      "tokens": ("DT_INT32", "(-1, -1)"), "lengths": ("DT_INT32", "(-1)"),
      **{k: ("DT_FLOAT" if t == np.float32 else "DT_INT32", "(-1)")
         for k, (_, t) in GENERATE_ROWS.items()}}, blocks["generate"]
  assert tensor_infos(blocks["generate"], "outputs") == {
      "sequences": ("DT_INT32", "(-1, -1)"), "sequence_lengths": ("DT_INT32", "(-1)")}

  run = jobs.result("cli_run")
  check_exit(run)
  outdir = art.dirs["cli"] / "cli_out"
  logits = np.load(outdir / "logits.npy")
  assert logits.shape == (BATCHES["a"][0], SEQ_LEN, VOCAB)
  np.testing.assert_allclose(logits, art.logits["a"], **TOL)


# --- 3b. the generate signature ---------------------------------------------------
@pytest.fixture(scope="module")
def generate_expected(art):
  """Each row of the generate request through the Python `generate`, one row per call:
  `[B, max(lengths + max_new_tokens)]` (0 after each row's end) and each row's end."""
  from sparse_attention_tf import generation
  g = art.generate
  limits = g["lengths"] + g["max_new_tokens"]
  out = np.zeros((len(limits), limits.max()), np.int32)
  ends = limits.copy()
  for b, n in enumerate(g["lengths"]):
    sampler = generation.Sampler(temperature=float(g["temperature"][b]),
                                 top_k=int(g["top_k"][b]) or None, top_p=float(g["top_p"][b]),
                                 seed=int(g["seed"][b]))
    row = art.model.generate(g["tokens"][b, :n], int(g["max_new_tokens"][b]), sampler=sampler,
                             stop_token_ids=GENERATE_STOP)
    out[b, :len(row)] = row
    stops = np.nonzero(row[n:] == GENERATE_STOP[0])[0]
    if len(stops):
      ends[b] = n + stops[0] + 1
  # The request exercises a stop and a full row (rows 1 and 3 are deterministic).
  assert (ends < limits).any() or (limits[1] == SEQ_LEN + 1 and ends[1] == SEQ_LEN + 1)
  return out, ends


def check_generated(got: dict, expected, where: str):
  want, ends = expected
  assert set(got) == {"sequences", "sequence_lengths"}, (where, sorted(got))
  assert got["sequences"].dtype == np.int32 and got["sequence_lengths"].dtype == np.int32
  np.testing.assert_array_equal(got["sequence_lengths"], ends, err_msg=where)
  np.testing.assert_array_equal(got["sequences"], want, err_msg=where)


def test_exported_generate_matches_python_generate(art, jobs, generate_expected):
  """In a process without the library: the portable export (plain TF loop) and the
  custom_op export (XLA loop) sample what the Python generate samples, row by row."""
  check_exit(jobs.result("fresh"))
  workdir = art.dirs["fresh"]
  for mode in ("portable", "custom"):
    result = json.loads((workdir / f"{mode}.json").read_text())
    assert "error" not in result, result["error"]
    check_generated(dict(np.load(workdir / f"generate_{mode}.npz")), generate_expected, mode)
  # The prompts came back unchanged (the garbage after each length did not).
  g = art.generate
  for b, n in enumerate(g["lengths"]):
    np.testing.assert_array_equal(generate_expected[0][b, :n], g["tokens"][b, :n])


def test_saved_model_cli_runs_generate(art, jobs, generate_expected):
  run = jobs.result("cli_run_generate")
  check_exit(run)
  outdir = art.dirs["cli"] / "generate_out"
  got = {k: np.load(outdir / f"{k}.npy") for k in ("sequences", "sequence_lengths")}
  check_generated(got, generate_expected, "saved_model_cli run")


def test_generate_in_process_and_per_row_independence(art, portable_loaded, generate_expected):
  """`predict` on the loaded export; a row alone gives what it gave in the batch."""
  from sparse_attention_tf import export
  check_generated(export.predict(portable_loaded, art.generate, "generate"), generate_expected,
                  "predict")
  alone = export.predict(portable_loaded, {k: v[2:3] for k, v in art.generate.items()},
                         "generate")
  want, ends = generate_expected
  n = ends[2]
  np.testing.assert_array_equal(alone["sequences"][0, :n], want[2, :n])


GENERATE_ERRORS = {   # case -> (changed inputs, a part of the message)
    "past_seq_len": ({"max_new_tokens": [SEQ_LEN - 18, 1, 1, 1]}, "lengths + max_new_tokens"),
    "negative_new": ({"max_new_tokens": [1, -1, 1, 1]}, "max_new_tokens must be >= 0"),
    "temperature": ({"temperature": [1.0, -0.5, 1.0, 1.0]}, "temperature must be finite"),
    "temperature_nan": ({"temperature": [np.nan, 1.0, 1.0, 1.0]}, "temperature must be finite"),
    "top_k": ({"top_k": [0, VOCAB + 1, 0, 0]}, f"top_k must be <= vocab_size = {VOCAB}"),
    "top_p": ({"top_p": [1.0, 0.0, 1.0, 1.0]}, "top_p must be in (0, 1]"),
    "rows": ({"seed": [1, 2]}, "seed must hold one value per row"),
    "rows_broadcast": ({"max_new_tokens": [1, 1]}, "max_new_tokens must hold one value per row"),
    "int32_overflow": ({"max_new_tokens": [2**31 - 2, 1, 1, 1]}, "lengths + max_new_tokens"),
    "empty_batch": ({"tokens": np.zeros((0, 20)), "lengths": [], "max_new_tokens": [],
                     "temperature": [], "top_k": [], "top_p": [], "seed": []},
                    "at least one row"),
    "token": ({"tokens": np.full((4, 20), VOCAB)}, f"vocab_size = {VOCAB})"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_ERRORS))
def test_generate_checks_in_the_graph(art, portable_loaded, case):
  import tensorflow as tf
  changed, message = GENERATE_ERRORS[case]
  inputs = {**art.generate, **changed}
  fn = portable_loaded.signatures["generate"]
  specs = fn.structured_input_signature[1]
  with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(message)):
    fn(**{k: tf.constant(np.asarray(v), specs[k].dtype) for k, v in inputs.items()})


# --- 4. custom_op export ----------------------------------------------------------
FRESH_LOAD_SAVED_MODEL = """
import json, sys
import numpy as np
import tensorflow as tf
from sparse_attention_tf import export

path = sys.argv[1]
def mapped():
  with open("/proc/self/maps") as f:
    return "_sparse_attention_ops" in f.read()
result = {"mapped_before": mapped()}
try:
  export.load_saved_model(path, load_ops=False)
  result["error"] = None
except Exception as e:
  result["error"] = [type(e).__name__, str(e)]
loaded = export.load_saved_model(path)          # load_ops=True: loads the library first
result["mapped_after"] = mapped()
inputs = {"tokens": np.load("tokens_a.npy"), "lengths": np.load("lengths_a.npy")}
np.save("logits_a.npy", export.predict(loaded, inputs)["logits"])
with open("result.json", "w") as f:
  json.dump(result, f)
"""


def test_custom_op_export_needs_the_op_library(art, jobs):
  library = art.library
  assert library and os.path.basename(library) == "_sparse_attention_ops.so", library
  check_exit(jobs.result("fresh"))
  workdir = art.dirs["fresh"]
  result = json.loads((workdir / "custom.json").read_text())
  assert not result["mapped_before"]
  assert "error" not in result, result["error"]
  assert result["our_modules"] == []
  assert result["first_load"] != "loaded", "loaded without the op library"
  assert "SparseAttention>" in result["first_load"], result["first_load"]
  assert result["custom_ops"], "the custom_op export holds no SparseAttention> op"
  assert any("Blocksparse" in t for t in result["custom_ops"]), result["custom_ops"]
  for tag, (_, width, _) in BATCHES.items():
    np.testing.assert_allclose(np.load(workdir / f"logits_{tag}.npy"),
                               art.logits[tag][:, :width], **TOL)


def test_load_saved_model_names_the_missing_library(art, jobs):
  check_exit(jobs.result("load_saved_model"))
  workdir = art.dirs["load_saved_model"]
  result = json.loads((workdir / "result.json").read_text())
  assert not result["mapped_before"], "importing the package loaded the op library"
  assert result["error"] is not None, "load_saved_model(load_ops=False) loaded a custom_op export"
  kind, message = result["error"]
  assert kind == "RuntimeError", result["error"]
  assert "_sparse_attention_ops.so" in message, message
  assert "tf.load_op_library" in message, message
  assert result["mapped_after"]
  np.testing.assert_allclose(np.load(workdir / "logits_a.npy"), art.logits["a"], **TOL)


# --- 5. rest_to_inputs ------------------------------------------------------------
def rest_bodies(tokens, lengths):
  """{name: (body, expected width)}: ragged prompts alone, or padded rows with their lengths."""
  rows = [r[:n] for r, n in zip(tokens.tolist(), lengths.tolist())]
  padded, lengths = tokens.tolist(), lengths.tolist()
  bodies = {
      "instances_lists": {"instances": rows},
      "instances_dicts": {"instances": [{"tokens": r} for r in rows]},
      "inputs_list": {"inputs": rows},
      "inputs_dict": {"inputs": {"tokens": rows}},
      "instances_with_lengths": {"instances": [{"tokens": r, "lengths": n}
                                               for r, n in zip(padded, lengths)]},
      "inputs_with_lengths": {"inputs": {"tokens": padded, "lengths": lengths}},
  }
  for name in list(bodies):
    bodies[name + "_json"] = json.dumps(bodies[name])
  bodies["instances_lists_bytes"] = json.dumps(bodies["instances_lists"]).encode()
  bodies["with_signature_name"] = {"signature_name": "serving_default", "instances": rows}
  return {name: (body, tokens.shape[1] if "with_lengths" in name else max(lengths))
          for name, body in bodies.items()}


@pytest.mark.parametrize("tag", sorted(BATCHES))
def test_rest_to_inputs_feeds_the_signature(art, portable_loaded, tag):
  from sparse_attention_tf import export
  tokens, lengths = art.tokens[tag], art.lengths[tag]
  for name, (body, width) in rest_bodies(tokens, lengths).items():
    inputs = export.rest_to_inputs(body, seq_len=SEQ_LEN, vocab_size=VOCAB)
    assert set(inputs) == {"tokens", "lengths"}, name
    for key, got in inputs.items():
      assert isinstance(got, np.ndarray) and got.dtype == np.int32, (name, key, type(got))
    assert inputs["tokens"].shape == (len(lengths), width), (name, inputs["tokens"].shape)
    np.testing.assert_array_equal(inputs["lengths"], lengths, err_msg=name)
    np.testing.assert_array_equal(inputs["tokens"], art.full[tag][:, :width], err_msg=name)
    logits = export.predict(portable_loaded, inputs)["logits"]
    np.testing.assert_allclose(logits, art.logits[tag][:, :width], **TOL, err_msg=name)


def test_rest_to_inputs_pads_and_fills_lengths():
  from sparse_attention_tf import export
  got = export.rest_to_inputs({"instances": [[1, 2, 3], [4]]})
  np.testing.assert_array_equal(got["tokens"], [[1, 2, 3], [4, 0, 0]])
  np.testing.assert_array_equal(got["lengths"], [3, 1])
  # Given lengths: what follows is padding, set to 0 whatever it was (but integers).
  got = export.rest_to_inputs({"inputs": {"tokens": [[1, 2, -7], [4, 99, 5]], "lengths": [2, 1]}},
                              seq_len=3, vocab_size=VOCAB)
  np.testing.assert_array_equal(got["tokens"], [[1, 2, 0], [4, 0, 0]])
  np.testing.assert_array_equal(got["lengths"], [2, 1])
  # Without seq_len, any length is accepted.
  assert export.rest_to_inputs({"inputs": [_row(3 * SEQ_LEN)]})["tokens"].shape == (1, 3 * SEQ_LEN)


def _row(n=SEQ_LEN, value=1):
  return [value] * n


def _nested(depth, inner=1):
  """`inner` inside `depth` lists, built without recursion."""
  for _ in range(depth):
    inner = [inner]
  return inner


DEEP = 5000   # levels: past json.loads' recursion (~1,000) and repr's


BAD_BODIES = {   # case -> (body, a word of the message)
    "both_keys": ({"instances": [_row()], "inputs": [_row()]}, "exactly one"),
    "neither_key": ({"tokens": [_row()]}, "exactly one"),
    "not_a_dict": ([_row()], "exactly one"),
    "json_list": (json.dumps([_row()]), "exactly one"),
    "row_too_long_columnar": ({"inputs": {"tokens": [_row(), _row(SEQ_LEN + 1)]}}, "seq_len"),
    "too_long": ({"inputs": [_row(SEQ_LEN + 1)]}, "seq_len"),
    "floats": ({"instances": [[0.5] * SEQ_LEN]}, "integers"),
    "integral_floats": ({"inputs": [[1.0] * SEQ_LEN]}, "integers"),
    "strings": ({"instances": [["a"] * SEQ_LEN]}, "integers"),
    "digit_strings": ({"inputs": [["1"] * SEQ_LEN]}, "integers"),
    "bools": ({"instances": [[True] * SEQ_LEN]}, "integers"),
    "one_bool": ({"instances": [[1, True, 2]]}, "integers"),
    "float_in_padding": ({"inputs": {"tokens": [[1, 2, 0.5]], "lengths": [2]}}, "integers"),
    "out_of_vocab": ({"instances": [[1, VOCAB]]}, "must be in"),
    "negative": ({"instances": [[1, -1]]}, "must be in"),
    "flat_row": ({"instances": _row()}, "list of integer tokens"),
    "three_dims": ({"inputs": [[_row()]]}, "integers"),
    "empty": ({"instances": []}, "non-empty"),
    "empty_columnar": ({"inputs": {"tokens": []}}, "non-empty"),
    "empty_row": ({"instances": [[]]}, "empty"),
    "empty_row_among_others": ({"inputs": [_row(), []]}, "empty"),
    "extra_input_row": ({"instances": [{"tokens": _row(), "mask": _row()}]}, "lengths"),
    "extra_input_columnar": ({"inputs": {"tokens": [_row()], "mask": [_row()]}}, "lengths"),
    "wrong_input_name": ({"inputs": {"ids": [_row()]}}, "tokens"),
    "mixed_instances": ({"instances": [{"tokens": _row()}, _row()]}, "instance"),
    "lengths_in_some_instances": ({"instances": [{"tokens": _row(), "lengths": 3},
                                                 {"tokens": _row()}]}, "instance"),
    "length_zero": ({"inputs": {"tokens": [_row()], "lengths": [0]}}, "lengths[0]"),
    "length_past_row": ({"instances": [{"tokens": _row(5), "lengths": 6}]}, "lengths[0]"),
    "length_float": ({"inputs": {"tokens": [_row()], "lengths": [3.0]}}, "lengths[0]"),
    "length_bool": ({"inputs": {"tokens": [_row()], "lengths": [True]}}, "lengths[0]"),
    "lengths_count": ({"inputs": {"tokens": [_row(), _row()], "lengths": [3]}}, "one length"),
    "lengths_scalar": ({"inputs": {"tokens": [_row()], "lengths": 3}}, "one length"),
    "bad_json": ('{"instances": [[1, 2', "Expecting"),
    "json_bool": ('{"instances": [[1, true, 2]]}', "tokens must be integers, got True (bool)"),
    "json_length_bool": ('{"inputs": {"tokens": [[1, 2]], "lengths": [true]}}', "lengths[0]"),
    # nesting deeper than [batch, tokens], measured without recursion
    "deep_json": ('{"instances": ' + "[" * DEEP + "]" * DEEP + "}", f"{DEEP + 1} levels deep"),
    "deep_json_bytes": (b'{"inputs": ' + b"[" * DEEP + b"1" + b"]" * DEEP + b"}",
                        f"{DEEP + 1} levels deep"),
    "deep_json_in_other_field": ('{"instances": [[1]], "x": ' + "[" * DEEP + "]" * DEEP + "}",
                                 "levels deep"),
    "json_one_level_too_deep": (json.dumps({"inputs": {"tokens": [[[1]]]}}), "5 levels deep"),
    "deep_rows": ({"instances": _nested(DEEP)}, "nested deeper than [batch, tokens]"),
    "deep_token": ({"inputs": [[1, _nested(DEEP)]]}, "nested deeper than [batch, tokens]"),
    "deep_length": ({"inputs": {"tokens": [_row()], "lengths": [_nested(DEEP)]}},
                    "lengths[0] must be an integer"),
    "deep_lengths": ({"inputs": {"tokens": [_row(), _row()], "lengths": _nested(DEEP)}},
                     "one length per row (2), got a list of 1"),
    "deep_instance_length": ({"instances": [{"tokens": _row(), "lengths": _nested(DEEP)}]},
                             "lengths[0] must be an integer"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_rest_to_inputs_rejects(case):
  from sparse_attention_tf import export
  body, word = BAD_BODIES[case]
  with pytest.raises(ValueError, match=re.escape(word)):
    export.rest_to_inputs(body, seq_len=SEQ_LEN, vocab_size=VOCAB)


def test_rest_to_inputs_does_not_wrap_tokens_outside_int32():
  """2**32 + 5 is an integer, but not an int32: it must not arrive as token 5."""
  from sparse_attention_tf import export
  row = [2**32 + 5] + [1] * (SEQ_LEN - 1)
  try:
    tokens = export.rest_to_inputs({"instances": [row]}, seq_len=SEQ_LEN)["tokens"]
  except ValueError:
    return
  assert tokens[0, 0] == row[0], f"token {row[0]} silently became {tokens[0, 0]}"


# --- 6. errors and the command line -----------------------------------------------
@pytest.mark.parametrize("case", ["bad_mode", "bad_signature", "no_signatures", "version_0",
                                  "version_negative", "version_bool", "version_str",
                                  "stop_ids_float", "pad_two_ids", "jit_compile_str"])
def test_export_rejects_bad_arguments(art, tmp_path, case):
  from sparse_attention_tf import export
  kwargs = {"bad_mode": dict(mode="tflite"),
            "bad_signature": dict(signatures=("logits", "predict")),
            "no_signatures": dict(signatures=()),
            "version_0": dict(version=0), "version_negative": dict(version=-1),
            "version_bool": dict(version=True), "version_str": dict(version="1"),
            "stop_ids_float": dict(stop_token_ids=[1.5]), "pad_two_ids": dict(pad_token_id=[1, 2]),
            "jit_compile_str": dict(generate_jit_compile="yes")}[case]
  path = str(tmp_path / "out")
  with pytest.raises(ValueError):
    export.export_saved_model(art.model, path, **kwargs)
  assert not os.path.exists(path)


def test_export_subset_of_signatures(art, tmp_path):
  """The metadata lists the signatures the SavedModel really has (TF Serving serves them all)."""
  import tensorflow as tf
  from sparse_attention_tf import export
  out = export.export_saved_model(art.model, str(tmp_path / "sub"), signatures=("score",),
                                  version=7)
  assert out == str(tmp_path / "sub" / "7")
  with open(os.path.join(out, "assets.extra", "sparse_attention_tf.json")) as f:
    listed = list(json.load(f)["signatures"])
  loaded = tf.saved_model.load(out)
  assert "score" in listed and "score" in loaded.signatures
  inputs = {"tokens": art.tokens["a"], "lengths": art.lengths["a"]}
  bits = export.predict(loaded, inputs, "score")["bits_per_token"]
  want = expected_outputs(art.logits["a"], art.tokens["a"], art.lengths["a"])
  np.testing.assert_allclose(bits, want["score"]["bits_per_token"], **TOL)
  assert sorted(loaded.signatures) == sorted(listed), (
      f"the SavedModel has signatures {sorted(loaded.signatures)}, the metadata lists {listed}")
  # serving_default is always there and is the logits.
  np.testing.assert_allclose(export.predict(loaded, inputs)["logits"], art.logits["a"], **TOL)


def test_cli_missing_model(jobs):
  export_dir = jobs.root / "missing_export"
  proc = jobs.result("cli_missing")
  check_exit(proc, 2)
  assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
  lines = program_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr
  assert "/does/not/exist" in lines[0] and "error" in lines[0], lines
  assert not export_dir.exists()


def test_cli_exports_a_keras_file(art, jobs):
  """--overwrite over a stale version."""
  import tensorflow as tf
  from sparse_attention_tf import export
  export_dir = art.cli_export_dir
  proc = jobs.result("cli_export")
  check_exit(proc)
  assert program_lines(proc.stderr) == [], proc.stderr
  out = export_dir / "1"
  assert sorted(os.listdir(export_dir)) == ["1"]
  assert (out / "saved_model.pb").is_file() and (out / "variables").is_dir()
  meta = json.loads((out / "assets.extra" / "sparse_attention_tf.json").read_text())
  assert meta["mode"] == "portable"
  assert meta["generate"] == {"jit_compile": True, "stop_token_ids": [3, 9], "pad_token_id": -1}
  assert not (out / "stale.txt").exists(), "--overwrite kept a file of the old version"
  assert str(out) in proc.stdout, proc.stdout
  loaded = tf.saved_model.load(str(out))
  logits = export.predict(loaded, {"tokens": art.tokens["a"], "lengths": art.lengths["a"]})
  np.testing.assert_allclose(logits["logits"], art.logits["a"], **TOL)


def test_cli_refuses_an_existing_version(jobs):
  proc = jobs.result("cli_exists")
  check_exit(proc, 2)
  assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
  lines = program_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr
  assert "already exists" in lines[0] and "--overwrite" in lines[0], lines
  assert (jobs.root / "cli_exists" / "1" / "keep.txt").read_text() == "kept"
  assert sorted(os.listdir(jobs.root / "cli_exists")) == ["1"]


# --- 7. the graph's checks (what TF Serving can send) and predict's -------------------
GRAPH_ERRORS = {   # case -> (signature, tokens, lengths, a part of the message)
    "longer_than_seq_len": ("logits", np.zeros((2, SEQ_LEN + 1)), [3, 3], f"seq_len = {SEQ_LEN}"),
    "length_zero": ("next_token_distribution", np.zeros((2, 8)), [0, 3], "lengths must be >= 1"),
    "length_past_tokens": ("score", np.zeros((2, 8)), [3, 9], "lengths must be <= the number"),
    "lengths_per_row": ("logits", np.zeros((2, 8)), [3], "one length per row"),
    "token_past_vocab": ("logits", np.full((2, 8), VOCAB), [8, 8], f"vocab_size = {VOCAB})"),
    "negative_token": ("score", np.full((1, 8), -1), [8], f"vocab_size = {VOCAB})"),
    "score_one_token": ("score", np.zeros((2, 8)), [1, 8], "score needs lengths >= 2"),
}


@pytest.mark.parametrize("case", sorted(GRAPH_ERRORS))
def test_signature_checks_in_the_graph(portable_loaded, case):
  """A signature called as TF Serving calls it (names and dtypes right) raises a readable error."""
  import tensorflow as tf
  name, tokens, lengths, message = GRAPH_ERRORS[case]
  fn = portable_loaded.signatures[name]
  with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(message)):
    fn(tokens=tf.constant(tokens, tf.int32), lengths=tf.constant(lengths, tf.int32))


def test_one_token_prompts_and_padding(art, portable_loaded):
  """`last` of a one-token prompt is after position 0; padding values never matter."""
  from sparse_attention_tf import export
  tokens = np.array([[5, -3, 999], [5, 7, 1]], np.int32)
  out = export.predict(portable_loaded, {"tokens": tokens, "lengths": [1, 3]},
                       "next_token_distribution")
  full = np.zeros((2, SEQ_LEN), np.int32)
  full[0, 0], full[1, :3] = 5, [5, 7, 1]
  probs = np_softmax(np.asarray(art.model(full, training=False)))
  np.testing.assert_allclose(out["last"], probs[[0, 1], [0, 2]], **TOL)
  np.testing.assert_allclose(out["probabilities"][0, 0], out["probabilities"][1, 0], **TOL)


PREDICT_ERRORS = {   # case -> (inputs, a part of the message)
    "tokens_1d": ({"tokens": np.zeros(8), "lengths": [8]}, "'tokens'"),
    "float_tokens": ({"tokens": np.zeros((1, 8), np.float32), "lengths": [8]},
                     "must be int32 [batch, any]"),
    "outside_int32": ({"tokens": np.full((1, 8), 2**40), "lengths": [8]}, "int32"),
    "lengths_2d": ({"tokens": np.zeros((1, 8), np.int32), "lengths": [[8]]},
                   "'lengths' of signature 'logits' must be int32 [batch]"),
    "missing_lengths": ({"tokens": np.zeros((1, 8), np.int32)}, "lengths: int32 [batch]"),
    "extra_input": ({"tokens": np.zeros((1, 8), np.int32), "lengths": [8], "mask": [1]},
                    "takes the inputs"),
    "batch_sizes": ({"tokens": np.zeros((2, 8), np.int32), "lengths": [8]}, "one batch size"),
    "one_array": (np.zeros((1, 8), np.int32), "pass a dict"),
}


@pytest.mark.parametrize("case", sorted(PREDICT_ERRORS))
def test_predict_checks_the_inputs(portable_loaded, case):
  from sparse_attention_tf import export
  inputs, message = PREDICT_ERRORS[case]
  with pytest.raises(ValueError, match=re.escape(message)):
    export.predict(portable_loaded, inputs, "logits")


def test_predict_accepts_other_integer_types(art, portable_loaded):
  from sparse_attention_tf import export
  with pytest.raises(ValueError, match="no signature 'beam_search'"):
    export.predict(portable_loaded, {}, "beam_search")
  inputs = {"tokens": art.tokens["b"].astype(np.int64), "lengths": art.lengths["b"].tolist()}
  np.testing.assert_allclose(export.predict(portable_loaded, inputs)["logits"], art.logits["b"],
                             **TOL)


# --- 8. versions: overwrite, and no half-written version -----------------------------
@pytest.fixture(scope="module")
def small_model():
  """Cheap to export: no attention (the version handling does not depend on the model)."""
  import keras
  model = keras.Sequential([keras.Input((8,), dtype="int32", name="tokens"),
                            keras.layers.Embedding(VOCAB, 4), keras.layers.Dense(3, name="out")])
  return model


def test_export_refuses_an_existing_version(small_model, tmp_path):
  from sparse_attention_tf import export
  base = str(tmp_path / "m")
  out = export.export_saved_model(small_model, base)
  before = os.stat(os.path.join(out, "saved_model.pb")).st_mtime_ns
  with pytest.raises(FileExistsError, match=r"already exists: pass overwrite=True"):
    export.export_saved_model(small_model, base)
  assert os.stat(os.path.join(out, "saved_model.pb")).st_mtime_ns == before
  assert sorted(os.listdir(base)) == ["1"]
  assert export.export_saved_model(small_model, base, version=2).endswith("2")


def test_export_overwrite_replaces_the_version(small_model, tmp_path):
  import tensorflow as tf
  from sparse_attention_tf import export
  base = tmp_path / "m"
  (base / "1").mkdir(parents=True)
  (base / "1" / "stale.txt").write_text("old")
  out = export.export_saved_model(small_model, str(base), overwrite=True)
  assert sorted(os.listdir(base)) == ["1"], "a temporary folder was left behind"
  assert not os.path.exists(os.path.join(out, "stale.txt"))
  assert os.path.isfile(os.path.join(out, "saved_model.pb"))
  tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % VOCAB
  got = export.predict(tf.saved_model.load(out), tokens)["out"]
  np.testing.assert_allclose(got, np.asarray(small_model(tokens)), **TOL)


@pytest.mark.parametrize("existing", [True, False])
def test_failed_export_leaves_no_partial_version(small_model, tmp_path, monkeypatch, existing):
  """The export fails after the SavedModel is written: the old version (or nothing) remains."""
  from sparse_attention_tf import export
  base = tmp_path / "m"
  if existing:
    (base / "1").mkdir(parents=True)
    (base / "1" / "keep.txt").write_text("kept")

  def fail(folder, meta):
    assert os.path.isfile(os.path.join(folder, "saved_model.pb"))
    raise OSError("disk full")

  monkeypatch.setattr(export, "_write_metadata", fail)
  with pytest.raises(OSError, match="disk full"):
    export.export_saved_model(small_model, str(base), overwrite=True)
  if existing:
    assert sorted(os.listdir(base)) == ["1"]
    assert sorted(os.listdir(base / "1")) == ["keep.txt"]
  else:
    assert not base.exists()


# --- 9. train_main.py --export_dir ------------------------------------------------
def test_train_main_export_dir(jobs):
  export_dir = jobs.root / "train_export"
  check_exit(jobs.result("train_main"))
  assert (export_dir / "1" / "saved_model.pb").is_file()
  assert (jobs.root / "train_run" / "model.keras").is_file()
  meta = json.loads((export_dir / "1" / "assets.extra" / "sparse_attention_tf.json").read_text())
  assert meta["mode"] == "portable"
  assert meta["model_config"]["num_layers"] == 1 and meta["model_config"]["seq_len"] == 64


def test_rest_to_inputs_checks_the_vocabulary():
  from sparse_attention_tf import export
  row = [1] * SEQ_LEN
  assert export.rest_to_inputs({"instances": [row]}, seq_len=SEQ_LEN,
                               vocab_size=VOCAB)["tokens"].shape == (1, SEQ_LEN)
  for bad in (-1, VOCAB):
    with pytest.raises(ValueError, match="tokens must be in"):
      export.rest_to_inputs({"instances": [[bad] + row[1:]]}, seq_len=SEQ_LEN, vocab_size=VOCAB)
