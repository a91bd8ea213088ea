"""The build step of the package: the op library `_sparse_attention_ops.so`.

Metadata and dependencies are in pyproject.toml; this file only adds the op
library to the package. `pip install .`, `pip install -e .` and `pip wheel .`
compile it with the Makefile (g++, `make ops`) against the TensorFlow that the
build's Python imports: pyproject.toml's build-system `tensorflow` (pip's
isolated build environment), or with `--no-build-isolation` the environment's
own. Objects go to build/temp.*/ops, apart from the dev build in build/.

`SPARSE_ATTENTION_TF_PREBUILT_OPS=<path to .so>` packages an already built
library instead (scripts/build_pip_pkg.sh: the wheels of `bazel build
//:build_pip_pkg` and `make wheel`).

Either way the library's recorded TensorFlow version (build_info.py) must lie
in the `tensorflow` range that the package declares, or the build stops: a
wheel never claims a TensorFlow its library was not built for.
"""

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent
PREBUILT_ENV = "SPARSE_ATTENTION_TF_PREBUILT_OPS"


def _build_info_module():
  """sparse_attention_tf/build_info.py, loaded alone (the package imports TensorFlow)."""
  spec = importlib.util.spec_from_file_location(
      "_sparse_attention_tf_build_info", ROOT / "sparse_attention_tf" / "build_info.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _declared_tensorflow():
  """The `tensorflow` requirement of pyproject.toml's dependencies, as a Requirement."""
  from packaging.requirements import Requirement  # setuptools ships packaging
  with open(ROOT / "pyproject.toml", "rb") as f:
    dependencies = tomllib.load(f)["project"]["dependencies"]
  return next(r for r in map(Requirement, dependencies) if r.name == "tensorflow")


class BuildPackage(build_py):
  """build_py that starts from an empty package folder in build/lib.

  pip builds a source checkout in place, and setuptools reuses build/lib: a module
  deleted from the sources would otherwise stay in every later wheel.
  """

  def run(self):
    shutil.rmtree(pathlib.Path(self.build_lib) / "sparse_attention_tf", ignore_errors=True)
    super().run()


class BuildOps(build_ext):
  """Builds the TensorFlow op library (loaded by tf.load_op_library, not imported)."""

  def get_ext_filename(self, fullname):
    # The name ops.py loads, without the interpreter's extension-module suffix.
    return os.path.join(*fullname.split(".")) + ".so"

  def build_extension(self, ext):
    prebuilt = os.environ.get(PREBUILT_ENV)
    library = pathlib.Path(prebuilt) if prebuilt else self._make()
    if not library.is_file():
      raise FileNotFoundError(f"{PREBUILT_ENV}={prebuilt}: no such file")
    self._check_tensorflow_version(library)
    out = pathlib.Path(self.get_ext_fullpath(ext.name))
    out.parent.mkdir(parents=True, exist_ok=True)
    # A new file renamed into place: a process that has the old one loaded (an
    # editable install's source tree) keeps its copy instead of seeing it rewritten.
    tmp = out.with_name(out.name + ".tmp")
    shutil.copyfile(library, tmp)
    tmp.chmod(0o755)
    os.replace(tmp, out)

  def _make(self) -> pathlib.Path:
    """`make ops` with this Python's TensorFlow, into build/temp.*/ops; returns the .so."""
    missing = [tool for tool in ("make", os.environ.get("CXX", "g++")) if not shutil.which(tool)]
    if missing:
      raise RuntimeError(f"building the op library needs {' and '.join(missing)} (Debian: "
                         "`apt-get install make g++`), or install a prebuilt wheel.")
    build_dir = pathlib.Path(self.build_temp).resolve() / "ops"
    jobs = self.parallel or os.cpu_count() or 1
    subprocess.run(["make", "-C", str(ROOT), "--no-print-directory", f"-j{jobs}",
                    f"PYTHON={sys.executable}", f"BUILD_DIR={build_dir}", "ops"], check=True)
    return build_dir / "_sparse_attention_ops.so"

  @staticmethod
  def _check_tensorflow_version(library: pathlib.Path):
    built = _build_info_module().read(library).get("tensorflow", "unknown")
    declared = _declared_tensorflow()
    if not declared.specifier.contains(built, prereleases=True):
      raise RuntimeError(
          f"{library} was built with TensorFlow {built}, but this package declares "
          f"{declared}: build it against a TensorFlow in that range (with "
          "--no-build-isolation, install one first), or change the range in pyproject.toml.")


setup(
    ext_modules=[Extension("sparse_attention_tf._sparse_attention_ops", sources=[])],
    cmdclass={"build_py": BuildPackage, "build_ext": BuildOps},
)
