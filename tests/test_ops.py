"""The raw block-sparse ops against float64 NumPy, and their gradients."""

import numpy as np
import pytest
import tensorflow as tf

from sparse_attention_tf import layout, patterns
from sparse_attention_tf import ops as ops_lib

TOL = {tf.float32: 1e-5, tf.bfloat16: 1e-2, tf.float16: 1e-2}


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30)


def random_tables(rng, n, block, heads=1, density=0.4):
  """Tables of a random block layout with some rows of a single block."""
  nb = n // block
  lay = rng.random((heads, nb, nb)) < density
  lay[:, np.arange(nb), rng.integers(0, nb, nb)] = True      # no empty row
  lay[:, 0, :] = False
  lay[:, 0, rng.integers(0, nb)] = True                      # row 0: a single block
  return patterns.Custom(lay, causal=False).plan(n, block).parts[0].tables


def np_tiles(x, tables, g, z):
  """Rows of block rows/cols: (A_I, A_J) tiles of x [B,N,H,D] for group g, block z."""
  b = tables.block_size
  h, i, j = tables.blocks[z]
  head = g * tables.num_layout_heads + h
  return x[:, i * b:(i + 1) * b, head], x[:, j * b:(j + 1) * b, head]


def np_sdd(a, bm, tables, heads):
  groups = heads // tables.num_layout_heads
  out = np.zeros((a.shape[0], groups, tables.nnz, tables.block_size, tables.block_size))
  for g in range(groups):
    for z in range(tables.nnz):
      ai, _ = np_tiles(a, tables, g, z)
      _, bj = np_tiles(bm, tables, g, z)
      out[:, g, z] = np.einsum("bid,bjd->bij", ai, bj)
  return out


def np_dsd(p, x, tables, transpose=False):
  b = tables.block_size
  out = np.zeros(x.shape)
  for g in range(p.shape[1]):
    for z in range(tables.nnz):
      h, i, j = tables.blocks[z]
      head = g * tables.num_layout_heads + h
      if transpose:
        out[:, j * b:(j + 1) * b, head] += np.einsum("bij,bid->bjd", p[:, g, z],
                                                     x[:, i * b:(i + 1) * b, head])
      else:
        out[:, i * b:(i + 1) * b, head] += np.einsum("bij,bjd->bid", p[:, g, z],
                                                     x[:, j * b:(j + 1) * b, head])
  return out


def np_softmax(x, tables, scale, key_padding):
  """Softmax over each query row across its blocks, float64."""
  bsz, groups, z, b, _ = x.shape
  tiles = np.ones((z, b, b), bool)
  part = tables.mask_index >= 0
  tiles[part] = tables.masks[tables.mask_index[part]]
  kp = key_padding.reshape(bsz, -1, b)[:, tables.blocks[:, 2]]       # (B, Z, b) keys of block J
  vis = tiles[None, None] & kp[:, None, :, None, :]                    # (B, 1, Z, b, b)
  vis = np.broadcast_to(vis, x.shape)
  y = np.zeros(x.shape)
  rows = tables.blocks[:, 0] * tables.num_blocks + tables.blocks[:, 1]
  for r in np.unique(rows):
    zs = np.nonzero(rows == r)[0]
    s = np.where(vis[:, :, zs], x[:, :, zs] * scale, -np.inf)       # (B, G, k, b, b)
    s = np.moveaxis(s, 2, 3).reshape(bsz, groups, b, -1)             # (B, G, b, k*b)
    mx = s.max(-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0)
    e = np.exp(s - mx)
    den = e.sum(-1, keepdims=True)
    p = e / np.where(den > 0, den, 1)
    y[:, :, zs] = np.moveaxis(p.reshape(bsz, groups, b, len(zs), b), 3, 2)
  return y


def to_tf(x, dtype):
  return tf.cast(tf.constant(x, tf.float32), dtype)


CASES = [  # (block, n, layout heads, heads, head_dim)
    (16, 64, 1, 3, 8),
    (32, 128, 2, 4, 24),
    (64, 128, 1, 1, 64),
    (16, 96, 3, 3, 40),
    (128, 256, 1, 2, 16),
]


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16, tf.float16], ids=lambda d: d.name)
@pytest.mark.parametrize("block,n,hl,heads,d", CASES)
def test_products_match_numpy(ops, rng, dtype, block, n, hl, heads, d):
  tables = random_tables(rng, n, block, hl, density=rng.uniform(0.1, 0.6))
  t = ops_lib.TableTensors(tables)
  bsz = int(rng.integers(1, 4))
  a, bm, x = (rng.standard_normal((bsz, n, heads, d)) for _ in range(3))
  groups = heads // hl
  p = rng.standard_normal((bsz, groups, tables.nnz, block, block))
  # Round inputs to the dtype first, so the reference sees what the op sees.
  a, bm, x, p = (to_tf(v, dtype) for v in (a, bm, x, p))
  an, bn, xn, pn = (v.numpy().astype(np.float64) for v in (a, bm, x, p))

  out = ops.sdd(a, bm, *t.all_tables, block_size=block)
  assert out.shape == (bsz, groups, tables.nnz, block, block) and out.dtype == dtype
  assert rel_err(out.numpy().astype(np.float64), np_sdd(an, bn, tables, heads)) <= TOL[dtype]
  out = ops.dsd(p, x, *t.all_tables)
  assert rel_err(out.numpy().astype(np.float64), np_dsd(pn, xn, tables)) <= TOL[dtype]
  out = ops.dsd_t(p, x, *t.all_tables)
  assert rel_err(out.numpy().astype(np.float64), np_dsd(pn, xn, tables, True)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16, tf.float16], ids=lambda d: d.name)
@pytest.mark.parametrize("pattern,block,n", [
    (patterns.Fixed(32, 8), 16, 128),
    (patterns.Local(40), 32, 128),
    (patterns.Strided(16), 16, 64),
    (patterns.Dense(), 64, 128),
])
def test_softmax_matches_numpy(ops, rng, dtype, pattern, block, n):
  tables = pattern.plan(n, block).parts[0].tables
  t = ops_lib.TableTensors(tables)
  bsz, groups = 3, 2
  x = to_tf(3 * rng.standard_normal((bsz, groups, tables.nnz, block, block)), dtype)
  kp = rng.random((bsz, n)) > 0.3
  kp[1, :] = False                                   # batch row 1: no visible key at all
  scale = float(rng.uniform(0.1, 1.0))
  y = ops.softmax(x, t.blocks, t.row_offsets, t.mask_index, t.masks, kp, scale=scale)
  ref = np_softmax(x.numpy().astype(np.float64), tables, scale, kp)
  assert rel_err(y.numpy().astype(np.float64), ref) <= TOL[dtype]
  assert np.all(y.numpy()[1] == 0) and np.isfinite(y.numpy().astype(np.float32)).all()

  dy = to_tf(rng.standard_normal(x.shape), dtype)
  dx = ops.softmax_grad(y, dy, t.row_offsets, scale=scale)
  yn, dyn = y.numpy().astype(np.float64), dy.numpy().astype(np.float64)
  rows = tables.blocks[:, 0] * tables.num_blocks + tables.blocks[:, 1]
  dot = np.zeros(yn.shape[:-1])
  for r in np.unique(rows):
    zs = rows == r
    dot[:, :, zs] = (yn[:, :, zs] * dyn[:, :, zs]).sum(axis=(2, 4), keepdims=True)[:, :, :, :, 0]
  ref = scale * yn * (dyn - dot[..., None])
  assert rel_err(dx.numpy().astype(np.float64), ref) <= 2 * TOL[dtype]


def test_product_gradients_match_numpy(ops, rng):
  """Gradients of the three products (each built from the other two)."""
  block, n, hl, heads, d = 16, 64, 2, 4, 8
  tables = random_tables(rng, n, block, hl, density=0.5)
  t = ops_lib.TableTensors(tables)
  a, bm, x = (tf.constant(rng.standard_normal((2, n, heads, d)), tf.float32) for _ in range(3))
  p = tf.constant(rng.standard_normal((2, heads // hl, tables.nnz, block, block)), tf.float32)
  up_s = rng.standard_normal(p.shape)
  up_d = rng.standard_normal(x.shape)
  an, bn, xn, pn = (v.numpy().astype(np.float64) for v in (a, bm, x, p))
  with tf.GradientTape(persistent=True) as tape:
    tape.watch([a, bm, x, p])
    l_sdd = tf.reduce_sum(ops.sdd(a, bm, *t.all_tables, block_size=block) * up_s)
    l_dsd = tf.reduce_sum(ops.dsd(p, x, *t.all_tables) * up_d)
    l_dsdt = tf.reduce_sum(ops.dsd_t(p, x, *t.all_tables) * up_d)
  da, db = tape.gradient(l_sdd, [a, bm])
  assert rel_err(da, np_dsd(up_s, bn, tables)) <= 1e-5
  assert rel_err(db, np_dsd(up_s, an, tables, transpose=True)) <= 1e-5
  dp, dx = tape.gradient(l_dsd, [p, x])
  assert rel_err(dp, np_sdd(up_d, xn, tables, heads)) <= 1e-5
  assert rel_err(dx, np_dsd(pn, up_d, tables, transpose=True)) <= 1e-5
  dp, dx = tape.gradient(l_dsdt, [p, x])
  assert rel_err(dp, np_sdd(xn, up_d, tables, heads)) <= 1e-5
  assert rel_err(dx, np_dsd(pn, up_d, tables)) <= 1e-5


def test_numerical_gradients(ops, rng):
  """tf.test.compute_gradient: finite differences against the registered gradients."""
  block, n, heads, d = 16, 32, 2, 8
  tables = patterns.Fixed(16, 4).plan(n, block).parts[0].tables
  t = ops_lib.TableTensors(tables)
  kp = np.ones((1, n), bool)
  kp[0, 5] = False
  a, bm, x = (tf.constant(rng.standard_normal((1, n, heads, d)), tf.float32) for _ in range(3))

  def chain(a, bm, x):
    s = ops.sdd(a, bm, *t.all_tables, block_size=block)
    p = ops.softmax(s, t.blocks, t.row_offsets, t.mask_index, t.masks, kp, scale=0.5)
    return ops.dsd_t(p, x, *t.all_tables) + ops.dsd(p, x, *t.all_tables)

  theoretical, numerical = tf.test.compute_gradient(chain, [a, bm, x], delta=1e-2)
  for th, nu in zip(theoretical, numerical):
    assert np.abs(th - nu).max() <= 2e-2 * max(1.0, np.abs(nu).max())


def test_deterministic_and_thread_count_independent(ops, rng):
  """Every output element is written by one work unit: bitwise repeatable."""
  tables = patterns.Fixed(64, 16).plan(256, 32).parts[0].tables
  t = ops_lib.TableTensors(tables)
  a, bm = (tf.constant(rng.standard_normal((2, 256, 4, 32)), tf.float32) for _ in range(2))
  first = ops.dsd(ops.sdd(a, bm, *t.all_tables, block_size=32), bm, *t.all_tables).numpy()
  for _ in range(3):
    again = ops.dsd(ops.sdd(a, bm, *t.all_tables, block_size=32), bm, *t.all_tables).numpy()
    assert np.array_equal(first, again)


def test_empty_batch(ops):
  tables = patterns.Dense().plan(32, 16).parts[0].tables
  t = ops_lib.TableTensors(tables)
  a = tf.zeros((0, 32, 2, 8))
  assert ops.sdd(a, a, *t.all_tables, block_size=16).shape == (0, 2, tables.nnz, 16, 16)
