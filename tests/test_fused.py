"""The fused block-sparse attention op: lse, the bf16 kernels, work split and repeatability.

Accuracy over every pattern, block size and padding mask is in test_attention.py
(`implementation="custom_op"` is the fused op); error paths in test_errors.py.
"""

import dataclasses
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import sparse_attention_tf as sat
from sparse_attention_tf import layout as layout_lib
from sparse_attention_tf import ops as ops_lib
from sparse_attention_tf import patterns
from tests import npref

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tables(pattern, n, block):
  plan = pattern.plan(n, block)
  assert len(plan.parts) == 1 and plan.parts[0].transpose is None
  return ops_lib.TableTensors(plan.parts[0].tables)


def _fused(q, k, v, t, kp, scale):
  return ops_lib.attention(q, k, v, *t.fused_tables, kp, scale=scale, block_size=t.block_size)


def _np_lse(q, k, mask, scale, kp):
  """float64 log-sum-exp of each row's visible scores: [B, H, N], -inf if none."""
  q, k = (np.asarray(t, np.float64) for t in (q, k))
  b, n, h, _ = q.shape
  vis = npref.visible_mask(mask, h, kp, b)
  s = np.where(vis, np.einsum("bqhd,bkhd->bhqk", q, k) * scale, -np.inf)
  mx = s.max(-1, keepdims=True)
  safe = np.where(np.isfinite(mx), mx, 0.0)
  with np.errstate(divide="ignore"):
    return (np.log(np.exp(s - safe).sum(-1)) + safe[..., 0])


@pytest.mark.parametrize("pattern,n,block", [
    (patterns.Fixed(32, 8), 128, 16),
    (patterns.Local(40), 128, 32),
    (patterns.Fixed(64, 16, heads=2, head_groups=2), 256, 64),
    (patterns.Dense(causal=False), 128, 128),
], ids=["fixed-16", "local-32", "fixed-groups-64", "dense-128"])
def test_lse_matches_float64(ops, rng, pattern, n, block):
  q, k, v = (tf.constant(rng.standard_normal((2, n, 2, 16)), tf.float32) for _ in range(3))
  kp = rng.random((2, n)) > 0.3
  kp[1] = False                                         # batch 1: no row sees a key
  out, lse = _fused(q, k, v, _tables(pattern, n, block), tf.constant(kp), 0.3)
  ref = _np_lse(q, k, pattern.mask(n), 0.3, kp)
  assert lse.shape == (2, 2, n) and lse.dtype == tf.float32
  lse = lse.numpy()
  assert np.array_equal(np.isneginf(lse), np.isneginf(ref))
  fin = np.isfinite(ref)
  assert np.abs(lse[fin] - ref[fin]).max() <= 1e-5 * max(1.0, np.abs(ref[fin]).max())
  assert np.all(out.numpy()[1] == 0)


@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("d,dv", [(64, 64), (24, 40), (8, 2)])
def test_bf16_kernels_match_float64(ops, rng, block, d, dv):
  """bf16 inputs (even dims: the bf16 dot-product kernels where the CPU has them)."""
  n = 256
  pattern = patterns.Fixed(128, 32)
  q, k = (tf.cast(rng.standard_normal((2, n, 3, d)), tf.bfloat16) for _ in range(2))
  v = tf.cast(rng.standard_normal((2, n, 3, dv)), tf.bfloat16)
  kp = rng.random((2, n)) > 0.2
  dout = tf.cast(rng.standard_normal((2, n, 3, dv)), tf.bfloat16)
  f64 = lambda t: tf.cast(t, tf.float64).numpy()
  ref, grads = npref.attention(f64(q), f64(k), f64(v), pattern.mask(n), 0.2, kp, f64(dout))
  with tf.GradientTape() as tape:
    tape.watch([q, k, v])
    out = sat.sparse_attention(q, k, v, pattern, block_size=block, scale=0.2,
                               key_padding_mask=kp)
    loss = tf.reduce_sum(tf.cast(out, tf.float32) * tf.cast(dout, tf.float32))
  assert out.dtype == tf.bfloat16
  assert npref.rel_err(f64(out), ref) <= 1e-2
  for name, g, r in zip("qkv", tape.gradient(loss, [q, k, v]), grads):
    assert g.dtype == tf.bfloat16 and npref.rel_err(f64(g), r) <= 2e-2, name


def test_odd_head_dim_bf16(ops, rng):
  """Odd dims cannot use the paired bf16 products: converted to float32 instead."""
  n, pattern = 128, patterns.Local(50)
  q, k, v = (tf.cast(rng.standard_normal((1, n, 2, 7)), tf.bfloat16) for _ in range(3))
  out = sat.sparse_attention(q, k, v, pattern, block_size=32, scale=0.3)
  ref = npref.attention(*(tf.cast(t, tf.float64).numpy() for t in (q, k, v)), pattern.mask(n),
                        0.3)
  assert npref.rel_err(tf.cast(out, tf.float64), ref) <= 1e-2


def _group_tiles(rng, block):
  """Tile masks whose groups of 16 keys are seen by different query ranges.

  The fused kernels compute each such group only for the queries that see
  it (a causal diagonal tile is the common case); these tiles add holes, a
  group no query sees between seen ones, a group seen by one 16-query band,
  and scattered single elements.
  """
  i, j = np.meshgrid(np.arange(block), np.arange(block), indexing="ij")
  stair = (j // 16 <= i // 16) & (rng.random((block, block)) > 0.2)
  band = np.zeros((block, block), bool)
  band[16:32, : block // 2] = True                       # one query band sees the first half
  band[:, -16:] = rng.random((block, 16)) > 0.5
  if block >= 48:
    band[:, 16:32] = False                               # a group between seen ones: nobody
  sparse = rng.random((block, block)) > 0.9
  causal = j <= i
  return np.stack([np.ones((block, block), bool), stair, band, sparse, causal])


@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_tiles_with_per_group_query_ranges(ops, rng, block):
  """Fused forward and gradients against float64 on tiles split by key group."""
  n = 256
  nb = n // block
  layout = rng.random((1, nb, nb)) > 0.3
  layout[0, np.arange(nb), np.arange(nb)] = True         # every row keeps a block
  tiles = _group_tiles(rng, block)
  tile_of_block = rng.integers(0, len(tiles), int(layout.sum()))
  tables = layout_lib.tables_from_layout(layout, tiles, tile_of_block, block)
  t = ops_lib.TableTensors(tables)
  q, k = (tf.constant(rng.standard_normal((2, n, 2, 32)), tf.float32) for _ in range(2))
  v = tf.constant(rng.standard_normal((2, n, 2, 24)), tf.float32)
  kp = rng.random((2, n)) > 0.15
  dout = rng.standard_normal((2, n, 2, 24))
  with tf.GradientTape() as tape:
    tape.watch([q, k, v])
    out, _ = _fused(q, k, v, t, tf.constant(kp), 0.3)
  grads = tape.gradient(out, [q, k, v], output_gradients=tf.constant(dout, tf.float32))
  ref, ref_grads = npref.attention(q.numpy(), k.numpy(), v.numpy(), tables.element_mask(), 0.3,
                                   kp, dout)
  for x, r in zip([out, *grads], [ref, *ref_grads]):
    assert npref.rel_err(x, r) <= 1e-5


@pytest.mark.parametrize("block", [32, 64, 128])
def test_wider_mask_tables_give_the_same_result(ops, rng, block):
  """Conservative mask tables (every key, every query; split or not) only cost time:
  forward and gradients equal those of the derived tables, which split tiles."""
  n = 256
  nb = n // block
  layout = np.tril(np.ones((1, nb, nb), bool))
  tiles = _group_tiles(rng, block)
  tables = layout_lib.tables_from_layout(layout, tiles, rng.integers(0, len(tiles), int(layout.sum())),
                                         block)
  assert tables.mask_split.any()
  m, g = tables.masks.shape[0], block // 16
  whole = dict(mask_key_range=np.tile(np.int32([0, block]), (m, 1)),
               mask_query_range=np.tile(np.int32([0, block]), (m, g, 1)))
  variants = [tables,
              dataclasses.replace(tables, **whole, mask_split=np.zeros(m, bool)),
              dataclasses.replace(tables, **whole, mask_split=np.ones(m, bool))]
  q, k, v = (tf.constant(rng.standard_normal((1, n, 2, 16)), tf.float32) for _ in range(3))
  kp = tf.constant(rng.random((1, n)) > 0.1)
  dout = tf.constant(rng.standard_normal((1, n, 2, 16)), tf.float32)
  results = []
  for t in variants:
    with tf.GradientTape() as tape:
      tape.watch([q, k, v])
      out, lse = _fused(q, k, v, ops_lib.TableTensors(t), kp, 0.3)
    results.append([out, lse] + tape.gradient(out, [q, k, v], output_gradients=dout))
  for other in results[1:]:
    for x, y in zip(results[0], other):
      np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=1e-5, atol=1e-6)


def test_fused_matches_unfused_tightly(ops, rng):
  q, k, v = (tf.constant(rng.standard_normal((2, 512, 4, 32)), tf.float32) for _ in range(3))
  kp = rng.random((2, 512)) > 0.1
  pattern = patterns.Fixed(128, 32, heads=4, head_groups=2)
  outs = []
  for impl in ("custom_op", "custom_op_unfused"):
    with tf.GradientTape() as tape:
      tape.watch([q, k, v])
      out = sat.sparse_attention(q, k, v, pattern, key_padding_mask=kp, implementation=impl)
      loss = tf.reduce_sum(out * out)
    outs.append([out] + tape.gradient(loss, [q, k, v]))
  for a, b in zip(*outs):
    assert npref.rel_err(a, b) <= 1e-5  # float32, two summation orders


# Work split: the backward runs (batch, head, row segment) units; with fewer
# heads than about two per thread the rows are split into segments. Run in
# subprocesses with fixed thread counts.
_SPLIT_SCRIPT = r'''
import sys
import numpy as np, tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
tf.config.threading.set_inter_op_parallelism_threads(1)
import sparse_attention_tf as sat
from tests import npref
rng = np.random.default_rng(int(sys.argv[2]))
results = {}
for name, pattern, b, h, dtype in [("one_head", sat.Fixed(64, 16), 1, 1, tf.float32),
                                   ("four_heads", sat.Strided(32), 2, 2, tf.float32),
                                   ("bf16", sat.Fixed(64, 16), 1, 1, tf.bfloat16)]:
  n = 512
  q, k, v = (tf.cast(rng.standard_normal((b, n, h, 32)), dtype) for _ in range(3))
  kp = rng.random((b, n)) > 0.2
  dout = rng.standard_normal((b, n, h, 32))
  runs = []
  for _ in range(3):
    with tf.GradientTape() as tape:
      tape.watch([q, k, v])
      out = sat.sparse_attention(q, k, v, pattern, block_size=32, scale=0.25, key_padding_mask=kp)
      loss = tf.reduce_sum(tf.cast(out, tf.float32) * dout)
    runs.append([t.numpy().astype(np.float64) for t in [out] + tape.gradient(loss, [q, k, v])])
  for again in runs[1:]:                          # bitwise repeatable run to run
    assert all(np.array_equal(x, y) for x, y in zip(runs[0], again)), name
  f64 = [np.asarray(tf.cast(t, tf.float64)) for t in (q, k, v)]
  ref, grads = npref.attention(*f64, pattern.mask(n), 0.25, kp, dout)
  tol = 1e-5 if dtype == tf.float32 else 2e-2
  for x, r in zip(runs[0], [ref, *grads]):
    assert npref.rel_err(x, r) <= tol, name
  results[name] = runs[0]
np.savez(sys.argv[3], **{f"{k}_{i}": x for k, v in results.items() for i, x in enumerate(v)})
print("ok")
'''


def test_bitwise_repeatable_and_thread_counts_agree(ops, tmp_path):
  seed = int(np.random.default_rng().integers(2**31))
  files = {}
  for threads in (1, 2):
    files[threads] = tmp_path / f"t{threads}.npz"
    proc = subprocess.run([sys.executable, "-c", _SPLIT_SCRIPT, str(threads), str(seed),
                           str(files[threads])], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
  one, two = np.load(files[1]), np.load(files[2])
  assert sorted(one.files) == sorted(two.files)
  for key in one.files:   # 2 threads split the rows of one head into segments: same values
    tol = 1e-5 if not key.startswith("bf16") else 1e-2
    assert npref.rel_err(two[key], one[key]) <= tol, key


def test_numerical_gradient_fused(ops, rng):
  q, k, v = (tf.constant(rng.standard_normal((1, 64, 2, 8)), tf.float64) for _ in range(3))
  q, k, v = (tf.cast(t, tf.float32) for t in (q, k, v))
  t = _tables(patterns.Fixed(32, 8), 64, 16)
  kp = tf.constant(rng.random((1, 64)) > 0.2)
  f = lambda q, k, v: _fused(q, k, v, t, kp, 0.4)[0]
  theoretical, numerical = tf.test.compute_gradient(f, [q, k, v], delta=1e-2)
  for th, nu in zip(theoretical, numerical):
    assert np.abs(th - nu).max() <= 2e-2 * max(1.0, np.abs(nu).max())


def test_empty_batch_and_graph_shapes(ops):
  t = _tables(patterns.Local(20), 64, 16)
  z = tf.zeros((0, 64, 2, 8))
  out, lse = _fused(z, z, z, t, tf.zeros((0, 64), tf.bool), 0.5)
  assert out.shape == (0, 64, 2, 8) and lse.shape == (0, 2, 64)

  @tf.function(input_signature=[tf.TensorSpec([None, 64, 2, 8], tf.float32)] * 2 +
               [tf.TensorSpec([None, 64, 2, 4], tf.float32)])
  def f(q, k, v):
    out, lse = _fused(q, k, v, t, tf.ones(tf.shape(q)[:2], tf.bool), 0.5)
    assert out.shape.as_list() == [None, 64, 2, 4] and lse.shape.as_list() == [None, 2, 64]
    return out

  assert f(tf.ones((1, 64, 2, 8)), tf.ones((1, 64, 2, 8)), tf.ones((1, 64, 2, 4))).shape == (1, 64, 2, 4)
