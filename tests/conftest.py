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
