"""Packaging: the wheel's files and metadata, and the installed package at work.

The wheel comes from `make wheel` and is installed with pip into a folder of its
own (conftest.installed_package); every check of the installed package runs in
a fresh process whose only copy of sparse_attention_tf is that folder, from a
working directory outside the checkout. The Bazel wheel (`bazel build
//:build_pip_pkg`) must hold the same files.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
import tensorflow as tf
from packaging.requirements import Requirement

from sparse_attention_tf import build_info

ROOT = pathlib.Path(__file__).resolve().parent.parent
LIBRARY = "sparse_attention_tf/_sparse_attention_ops.so"
PY_TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"
VERSION = re.search(r'^__version__ = "(.+)"$',
                    (ROOT / "sparse_attention_tf" / "__init__.py").read_text(), re.M).group(1)
DIST_INFO = f"sparse_attention_tf-{VERSION}.dist-info/"


def _pyproject() -> dict:
  with open(ROOT / "pyproject.toml", "rb") as f:
    return tomllib.load(f)


def _declared() -> list:
  """Every Requirement of pyproject.toml: dependencies and optional dependencies."""
  project = _pyproject()["project"]
  extras = [r for group in project["optional-dependencies"].values() for r in group]
  return [Requirement(r) for r in project["dependencies"] + extras]


def _wheel_text(wheel, name: str) -> str:
  with zipfile.ZipFile(wheel) as z:
    return z.read(name).decode()


def _wheel_files(wheel) -> list:
  with zipfile.ZipFile(wheel) as z:
    return sorted(z.namelist())


def test_wheel_name_and_files(installed_package):
  """A platform wheel: the package's modules, the op library and metadata, nothing else."""
  wheel = installed_package.wheel
  assert wheel.name == f"sparse_attention_tf-{VERSION}-{PY_TAG}-{PY_TAG}-linux_x86_64.whl"
  files = _wheel_files(wheel)
  modules = [str(p.relative_to(ROOT)) for p in (ROOT / "sparse_attention_tf").rglob("*.py")
             if "__pycache__" not in p.parts]
  assert [f for f in files if not f.startswith(DIST_INFO)] == sorted(modules + [LIBRARY])
  assert {DIST_INFO + n for n in ("METADATA", "WHEEL", "RECORD", "licenses/LICENSE")} <= set(files)
  assert not [f for f in files if f.startswith(("tests/", "bench/", "custom_ops/"))]
  tags = _wheel_text(wheel, DIST_INFO + "WHEEL")
  assert "Root-Is-Purelib: false" in tags and f"Tag: {PY_TAG}-{PY_TAG}-linux_x86_64" in tags


def test_wheel_metadata_declares_the_ranges(installed_package):
  """METADATA carries pyproject.toml's ranges: TensorFlow of this minor version only."""
  metadata = _wheel_text(installed_package.wheel, DIST_INFO + "METADATA")
  assert f"\nVersion: {VERSION}\n" in metadata
  requires = [Requirement(line.split(": ", 1)[1])
              for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
  in_wheel = {(r.name, str(r.specifier), tuple(re.findall(r'extra == "(\w+)"', str(r.marker))))
              for r in requires}
  project = _pyproject()["project"]
  groups = [(project["dependencies"], ())] + [
      (group, (extra,)) for extra, group in project["optional-dependencies"].items()]
  declared = {(r.name, str(r.specifier), extra)
              for group, extra in groups for r in map(Requirement, group)}
  assert in_wheel == declared
  by_name = {r.name: r for r in requires if r.marker is None}
  major, minor = map(int, tf.__version__.split(".")[:2])
  assert by_name["tensorflow"].specifier.contains(tf.__version__)
  assert not by_name["tensorflow"].specifier.contains(f"{major}.{minor + 1}.0")
  assert not by_name["tensorflow"].specifier.contains(f"{major}.{minor - 1}.0")
  assert by_name["keras"].specifier.contains("3.15.1")
  assert not by_name["keras"].specifier.contains("4.0.0")
  assert {"numpy", "absl-py"} <= set(by_name)
  extras = set(re.findall(r"^Provides-Extra: (\S+)$", metadata, re.M))
  assert extras == {"train", "plot", "test"}


def test_requirements_pins_lie_in_the_declared_ranges():
  """requirements.txt pins every declared dependency, each inside its pyproject.toml range."""
  pins = {}
  for line in (ROOT / "requirements.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      name, version = line.split("==")
      pins[name.strip()] = version.strip()
  build = [Requirement(r) for r in _pyproject()["build-system"]["requires"]]
  for requirement in _declared() + build:
    assert requirement.name in pins, f"{requirement.name} is not pinned in requirements.txt"
    assert requirement.specifier.contains(pins[requirement.name]), (
        f"requirements.txt pins {requirement.name}=={pins[requirement.name]}, outside "
        f"pyproject.toml's {requirement}")


def test_library_records_the_tensorflow_it_was_built_with(installed_package):
  info = build_info.read(installed_package.target / LIBRARY)
  assert info == {"tensorflow": tf.__version__,
                  "graph_def_version": str(tf.version.GRAPH_DEF_VERSION)}


def test_mismatch_rule():
  """Same minor version runs; another does not; without a version, the GraphDef version."""
  graph_def = tf.version.GRAPH_DEF_VERSION
  info = {"tensorflow": "2.21.0", "graph_def_version": str(graph_def)}
  assert build_info.mismatch(info, "2.21.3", graph_def + 5) is None
  assert build_info.mismatch(info, "2.22.0rc1", graph_def) == (
      "built with TensorFlow 2.21.0, running TensorFlow 2.22.0rc1 (the op ABI changes between "
      "TensorFlow minor versions)")
  unknown = {"tensorflow": "unknown", "graph_def_version": str(graph_def)}
  assert build_info.mismatch(unknown, "2.30.0", graph_def) is None
  assert "unknown TensorFlow (GraphDef version" in build_info.mismatch(unknown, "2.30.0", 1)
  assert build_info.mismatch({}, "2.30.0", graph_def) is None


INSTALLED_WORKS = """
import pathlib, sys
import keras, numpy as np, tensorflow as tf
import sparse_attention_tf as sat
import npref

package = pathlib.Path(%r) / "sparse_attention_tf"
assert pathlib.Path(sat.__file__).parent == package, sat.__file__
assert "sparse_attention_tf.export" not in sys.modules  # imported on first use
assert sat.ops.checkout_root() is None
assert sat.ops.library_candidates() == [package / "_sparse_attention_ops.so"]
assert sat.ops.library_path() == str(package / "_sparse_attention_ops.so"), sat.ops.load_error()
assert callable(sat.export.export_saved_model) and callable(sat.plotting.plot_pattern)
assert sat.layers.SparseMultiHeadAttention and sat.models.SparseTransformer

# Forward and backward through the fused op, against float64 NumPy.
rng = np.random.default_rng(0)
pattern, n = sat.Fixed(32, 8), 128
q, k, v = (tf.constant(rng.standard_normal((2, n, 4, 16)), tf.float32) for _ in range(3))
dout = rng.standard_normal((2, n, 4, 16))
ref, grads = npref.attention(q, k, v, pattern.mask(n), 0.25, None, dout)
with tf.GradientTape() as tape:
  tape.watch([q, k, v])
  out = sat.sparse_attention(q, k, v, pattern, block_size=16, scale=0.25,
                             implementation="custom_op")
  loss = tf.reduce_sum(out * dout)
assert npref.rel_err(out, ref) <= 1e-5, npref.rel_err(out, ref)
for name, g, r in zip("qkv", tape.gradient(loss, [q, k, v]), grads):
  assert npref.rel_err(g, r) <= 1e-5, (name, npref.rel_err(g, r))

# A small Keras fit of a model made of the library's layers (the op library: "auto").
keras.utils.set_random_seed(0)
tokens = keras.Input((32,), dtype="int32")
x = keras.layers.Embedding(16, 16)(tokens)
x = sat.layers.PositionEmbedding(32)(x)
x = sat.SparseTransformerBlock(num_heads=2, pattern=sat.Fixed(16, 4), block_size=16)(x)
model = keras.Model(tokens, keras.layers.Dense(16)(x))
model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
data = rng.integers(0, 16, (8, 33))
history = model.fit(data[:, :-1], data[:, 1:], epochs=3, batch_size=4, verbose=0)
losses = history.history["loss"]
assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
print("ok")
"""


def test_installed_package_works_outside_the_checkout(installed_package, tmp_path):
  """Imported from the install folder, its own op library, custom op against float64, a fit."""
  shutil.copy(ROOT / "tests" / "npref.py", tmp_path)  # the independent reference, not the package
  proc = installed_package.run(INSTALLED_WORKS % str(installed_package.target), tmp_path)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


MISMATCH = """
import warnings
import numpy as np, tensorflow as tf
import sparse_attention_tf as sat

message = sat.ops.load_error()
print(message)
assert sat.ops.library_path() is None
assert "built with TensorFlow %s, running TensorFlow " + tf.__version__ in message, message
x = tf.ones([1, 32, 1, 8])
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  outs = [sat.sparse_attention(x, x, x, sat.Dense(), block_size=16) for _ in range(2)]
fallback = [w for w in caught if issubclass(w.category, RuntimeWarning)
            and "sparse_attention_tf" in str(w.message)]
assert len(fallback) == 1, [str(w.message) for w in caught]
assert message in str(fallback[0].message), fallback[0].message   # says why and how to rebuild
reference = sat.sparse_attention(x, x, x, sat.Dense(), block_size=16, implementation="reference")
for out in outs:
  np.testing.assert_allclose(out, reference)
try:
  sat.sparse_attention(x, x, x, sat.Dense(), block_size=16, implementation="custom_op")
  raise AssertionError("custom_op ran without its library")
except RuntimeError as e:
  assert str(e) == message, e
print("ok")
"""


def test_version_mismatch_is_refused_with_both_versions(installed_package, tmp_path):
  """A library whose recorded TensorFlow differs (patched copy) is not loaded; "auto" falls back."""
  library = installed_package.target / LIBRARY
  built = build_info.read(library)["tensorflow"]
  fake = ("8" if built[0] == "9" else "9") + built[1:]  # another major version, same length
  data = library.read_bytes()
  old, new = (f"{{tensorflow={v};".encode() for v in (built, fake))
  assert data.count(old) == 1
  patched = tmp_path / "lib" / "_sparse_attention_ops.so"
  patched.parent.mkdir()
  patched.write_bytes(data.replace(old, new))
  assert build_info.read(patched)["tensorflow"] == fake
  proc = installed_package.run(MISMATCH % fake, tmp_path,
                               env={"SPARSE_ATTENTION_TF_OPS": str(patched)})
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.stdout,
                                                                       proc.stderr[-3000:])
  assert str(patched) in proc.stdout and "--force-reinstall" in proc.stdout, proc.stdout


def test_installed_copy_ignores_builds_beside_it(installed_package, tmp_path):
  """An install folder holding build/ and bazel-bin/ libraries is no source checkout."""
  target = tmp_path / "site"
  shutil.copytree(installed_package.target, target)
  (target / LIBRARY).unlink()
  for stray in ("build", "bazel-bin/custom_ops"):
    (target / stray).mkdir(parents=True)
    shutil.copy(installed_package.target / LIBRARY, target / stray)
  code = ("import sparse_attention_tf as sat\n"
          "print(sat.ops.library_path())\nprint(sat.ops.load_error())\n")
  proc = installed_package.run(code, tmp_path, env={"PYTHONPATH": str(target)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0] == "None", proc.stdout
  assert f"  {target / LIBRARY}: not found" in lines and "build/" not in proc.stdout, proc.stdout


def test_bazel_wheel_holds_the_same_files(installed_package, tmp_path):
  """`bazel build //:build_pip_pkg && bazel-bin/build_pip_pkg DIR`: the same wheel, Bazel's .so."""
  if shutil.which("bazel") is None:
    pytest.fail("bazel not found: run `bash scripts/setup.sh`")
  for cmd in (["bazel", "build", "--noshow_progress", "//:build_pip_pkg"],
              [str(ROOT / "bazel-bin" / "build_pip_pkg"), str(tmp_path)]):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
  (wheel,) = tmp_path.glob("*.whl")
  assert wheel.name == installed_package.wheel.name
  assert _wheel_files(wheel) == _wheel_files(installed_package.wheel)
  for name in ("METADATA", "WHEEL"):
    assert _wheel_text(wheel, DIST_INFO + name) == _wheel_text(installed_package.wheel,
                                                               DIST_INFO + name)
  with zipfile.ZipFile(wheel) as z:
    z.extract(LIBRARY, tmp_path / "unpacked")
  assert build_info.read(tmp_path / "unpacked" / LIBRARY)["tensorflow"] == tf.__version__
