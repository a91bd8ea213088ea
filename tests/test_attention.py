"""`sparse_attention` against float64 dense masked attention, with gradients."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import sparse_attention_tf as sat
from sparse_attention_tf import patterns
from tests import npref

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMPLS = ["custom_op", "custom_op_unfused", "reference", "dense"]
TOL = {tf.float32: 1e-5, tf.bfloat16: 1e-2, tf.float16: 1e-2}

# (pattern, seq_len, block_size, heads): every pattern family, odd head counts
# where the pattern allows, all block sizes.
CASES = [
    (patterns.Dense(), 64, 16, 3),
    (patterns.Dense(causal=False), 128, 64, 1),
    (patterns.Local(100), 256, 128, 2),
    (patterns.Local(40), 128, 32, 3),
    (patterns.Local(7, causal=False), 64, 16, 2),
    (patterns.Strided(8), 64, 16, 3),
    (patterns.Strided(16, heads=4, mode="split"), 256, 32, 4),
    (patterns.Strided(8, heads=2, mode="split", causal=False), 64, 16, 6),
    (patterns.Strided(16, mode="column"), 128, 16, 1),
    (patterns.Fixed(32, 8), 128, 16, 3),
    (patterns.Fixed(64, 16, heads=4, head_groups=2), 256, 64, 4),
    (patterns.Fixed(32, 5, head_groups=3, causal=False), 96, 32, 3),
    (patterns.Longformer(9, (0, 33)), 64, 16, 2),
    (patterns.BigBird(block=32, window=3, num_global=1, num_random=1, heads=2), 128, 32, 2),
    (patterns.BigBird(block=32, causal=True), 128, 16, 1),
]
CASE_IDS = [f"{p!r}-n{n}-b{b}-h{h}" for p, n, b, h in CASES]


def inputs(rng, batch, n, heads, d, dtype=tf.float32, dv=None):
  q, k = (rng.standard_normal((batch, n, heads, d)) for _ in range(2))
  v = rng.standard_normal((batch, n, heads, dv or d))
  # Round to the dtype so that the float64 reference sees the same inputs.
  return [tf.cast(tf.constant(x, tf.float32), dtype) for x in (q, k, v)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pattern,n,block,heads", CASES, ids=CASE_IDS)
def test_forward_and_gradients_match_float64(ops, rng, impl, pattern, n, block, heads):
  batch, d = int(rng.integers(1, 4)), 8 * int(rng.integers(1, 5))
  q, k, v = inputs(rng, batch, n, heads, d)
  kp = rng.random((batch, n)) > 0.25
  scale = float(rng.uniform(0.2, 0.6))
  dout = rng.standard_normal((batch, n, heads, d))
  ref, ref_grads = npref.attention(q, k, v, pattern.mask(n), scale, kp, dout)
  with tf.GradientTape() as tape:
    tape.watch([q, k, v])
    out = sat.sparse_attention(q, k, v, pattern, block_size=block, scale=scale,
                               key_padding_mask=kp, implementation=impl)
    loss = tf.reduce_sum(out * dout)
  assert out.shape == q.shape and out.dtype == tf.float32
  assert npref.rel_err(out, ref) <= 1e-5
  for name, g, r in zip("qkv", tape.gradient(loss, [q, k, v]), ref_grads):
    assert npref.rel_err(g, r) <= 1e-5, name


@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float16], ids=lambda d: d.name)
@pytest.mark.parametrize("impl", ["custom_op", "custom_op_unfused", "reference"])
@pytest.mark.parametrize("pattern,n,block,heads", [CASES[i] for i in (2, 5, 9)],
                         ids=[CASE_IDS[i] for i in (2, 5, 9)])
def test_low_precision(ops, rng, dtype, impl, pattern, n, block, heads):
  q, k, v = inputs(rng, 2, n, heads, 16, dtype)
  ref, ref_grads = npref.attention(q.numpy().astype(np.float64), k.numpy().astype(np.float64),
                                   v.numpy().astype(np.float64), pattern.mask(n), 0.25,
                                   dout=np.ones((2, n, heads, 16)))
  with tf.GradientTape() as tape:
    tape.watch([q, k, v])
    out = sat.sparse_attention(q, k, v, pattern, block_size=block, scale=0.25,
                               implementation=impl)
    loss = tf.reduce_sum(tf.cast(out, tf.float32))
  assert out.dtype == dtype
  assert npref.rel_err(tf.cast(out, tf.float32), ref) <= 1e-2
  for g, r in zip(tape.gradient(loss, [q, k, v]), ref_grads):
    assert g.dtype == dtype
    assert npref.rel_err(tf.cast(g, tf.float32), r) <= 2e-2


@pytest.mark.parametrize("block", [16, 32, 64])
def test_random_custom_layouts(ops, rng, block):
  """Random layouts, density 0.1-0.6, several heads, rows with a single block."""
  n, heads = 256, 3
  nb = n // block
  lay = np.tril(rng.random((heads, nb, nb)) < rng.uniform(0.1, 0.6))
  lay[:, np.arange(nb), np.arange(nb)] |= rng.random((heads, nb)) < 0.5
  for h in range(heads):                       # rows left empty: a single random block
    for i in np.nonzero(~lay[h].any(axis=1))[0]:
      lay[h, i, rng.integers(0, i + 1)] = True
  pattern = patterns.Custom(lay)
  q, k, v = inputs(rng, 2, n, heads, 16)
  ref = npref.attention(q, k, v, pattern.mask(n), 0.25)
  for impl in ("custom_op", "custom_op_unfused", "reference"):
    out = sat.sparse_attention(q, k, v, pattern, block_size=block, scale=0.25,
                               implementation=impl)
    assert npref.rel_err(out, ref) <= 1e-5, impl


def test_rows_without_visible_keys_are_zero(ops, rng):
  """Local window over padded keys: early rows see nothing and must give 0, not NaN."""
  n, heads = 64, 2
  q, k, v = inputs(rng, 2, n, heads, 8)
  kp = np.ones((2, n), bool)
  kp[0, :20] = False                                  # rows 0..19 of batch 0 see no key
  for impl in IMPLS:
    with tf.GradientTape() as tape:
      tape.watch([q, k, v])
      out = sat.sparse_attention(q, k, v, patterns.Local(4), block_size=16,
                                 key_padding_mask=kp, implementation=impl)
      loss = tf.reduce_sum(out)
    grads = tape.gradient(loss, [q, k, v])
    assert np.all(out.numpy()[0, :20] == 0), impl
    assert np.isfinite(out.numpy()).all() and all(np.isfinite(g.numpy()).all() for g in grads)
    assert npref.rel_err(out, npref.attention(q, k, v, patterns.Local(4).mask(n), 8**-0.5,
                                              kp)) <= 1e-5


def test_value_dim_differs_from_key_dim(ops, rng):
  q, k, v = inputs(rng, 1, 128, 2, 16, dv=24)
  pattern = patterns.Fixed(32, 8)
  ref = npref.attention(q, k, v, pattern.mask(128), 0.25)
  for impl in IMPLS:
    out = sat.sparse_attention(q, k, v, pattern, block_size=32, scale=0.25, implementation=impl)
    assert out.shape == (1, 128, 2, 24) and npref.rel_err(out, ref) <= 1e-5


def test_tf_function_and_default_scale(ops, rng):
  q, k, v = inputs(rng, 2, 128, 4, 32)
  pattern = patterns.Strided(16, heads=4, mode="split")

  @tf.function
  def run(q, k, v, kp):
    with tf.GradientTape() as tape:
      tape.watch(q)
      out = sat.sparse_attention(q, k, v, pattern, block_size=16, key_padding_mask=kp)
      loss = tf.reduce_sum(out)
    return out, tape.gradient(loss, q)

  kp = rng.random((2, 128)) > 0.1
  out, dq = run(q, k, v, tf.constant(kp))
  ref, (ref_dq, _, _) = npref.attention(q, k, v, pattern.mask(128), 32**-0.5, kp,
                                         np.ones(q.shape))
  assert npref.rel_err(out, ref) <= 1e-5 and npref.rel_err(dq, ref_dq) <= 1e-5


def test_compute_gradient_sparse_attention(ops, rng):
  q, k, v = inputs(rng, 1, 32, 2, 8)
  f = lambda q, k, v: sat.sparse_attention(q, k, v, patterns.Fixed(16, 4), block_size=16,
                                           implementation="custom_op")
  theoretical, numerical = tf.test.compute_gradient(f, [q, k, v], delta=1e-2)
  for th, nu in zip(theoretical, numerical):
    assert np.abs(th - nu).max() <= 2e-2 * max(1.0, np.abs(nu).max())


def test_custom_op_matches_reference_large(ops, rng):
  """At a realistic size the two implementations agree closely."""
  q, k, v = inputs(rng, 1, 1024, 4, 64)
  pattern = patterns.Fixed(128, 32, heads=4, head_groups=2)
  a = sat.sparse_attention(q, k, v, pattern, implementation="custom_op")
  b = sat.sparse_attention(q, k, v, pattern, implementation="reference")
  assert npref.rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("path", ["bazel-bin/custom_ops/_sparse_attention_ops.so",
                                  "build/_sparse_attention_ops.so"], ids=["bazel", "make"])
def test_library_loads_from_each_build(path):
  """Each build's .so loads in a fresh process and computes attention."""
  lib = ROOT / path
  assert lib.exists(), f"{lib} is missing: run `bash scripts/setup.sh`"
  code = ("import numpy as np, sparse_attention_tf as sat\n"
          "from sparse_attention_tf import ops\n"
          "assert ops.library_path() == %r, ops.library_path()\n"
          "x = np.ones((1, 64, 1, 8), np.float32)\n"
          "out = sat.sparse_attention(x, x, x, sat.Dense(), block_size=16,"
          " implementation='custom_op')\n"
          "assert np.allclose(out, 1.0)\nprint('ok')\n") % str(lib)
  env = dict(os.environ, SPARSE_ATTENTION_TF_OPS=str(lib), PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
