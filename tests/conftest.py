"""Shared fixtures: fresh random inputs (seed printed for replay) and the op library."""

import os
import secrets

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def rng():
  """A fresh generator per test; replay a failure with SPARSE_ATTENTION_TEST_SEED=<seed>."""
  seed = int(os.environ.get("SPARSE_ATTENTION_TEST_SEED", secrets.randbits(32)))
  print(f"SPARSE_ATTENTION_TEST_SEED={seed}")
  return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def ops():
  """The op module; the tests fail (never skip) when the library is missing."""
  from sparse_attention_tf import ops as ops_lib
  assert ops_lib.is_available(), ops_lib.load_error()
  return ops_lib


class InstalledPackage:
  """This checkout's wheel, installed with pip into a folder of its own.

  `run(code, cwd)` runs Python code in a fresh process that sees the installed
  copy only (PYTHONPATH=target, cwd outside the checkout, no $SPARSE_ATTENTION_TF_OPS).
  """

  def __init__(self, wheel, target):
    self.wheel, self.target = wheel, target

  def run(self, code, cwd, env=None, timeout=600):
    import subprocess
    import sys
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("PYTHONPATH", "SPARSE_ATTENTION_TF_OPS")}
    full_env.update(PYTHONPATH=str(self.target), TF_CPP_MIN_LOG_LEVEL="2")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _check_run(cmd):
  import subprocess
  proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, f"{' '.join(map(str, cmd))}:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="session")
def installed_package(tmp_path_factory):
  """This checkout's wheel (`make wheel`), installed by `pip install --no-deps --target`.

  Built every session, so never stale: a few seconds (make rebuilds the op library
  only if its sources changed).
  """
  import pathlib
  import sys
  root = pathlib.Path(__file__).resolve().parent.parent
  dist, target = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("installed")
  _check_run(["make", "-C", root, "--no-print-directory", "-s", f"PYTHON={sys.executable}",
              f"DIST={dist}", "wheel"])
  (wheel,) = dist.glob("*.whl")
  _check_run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, wheel])
  return InstalledPackage(wheel, target)
