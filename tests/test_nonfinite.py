"""NaN and +-inf in the inputs reach exactly the outputs that can see them (issue 13, item 5).

Masked scores are selected, not added (NaN + -inf is NaN), so a NaN or inf in a
key reaches only the query rows whose mask shows that key, forward and
backward; a NaN or inf in q or dout reaches only the keys its row sees. The
expected set of non-finite rows comes from a float64 NumPy computation whose
every sum runs over visible (query, key) pairs only (`_visible_pairs`).

Also the raw fused ops with a block size they do not take: a clean
InvalidArgumentError, never a crash (issue 13, item 4).
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from sparse_attention_tf import patterns
from sparse_attention_tf.attention import sparse_attention
from tests import npref

N, HEADS, D = 128, 2, 16
SCALE = 0.25
PATTERNS = {"dense": patterns.Dense(), "fixed": patterns.Fixed(64, 16)}
VALUES = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}


def _visible_pairs(q, k, v, dout, vis):
  """out, dq, dk, dv in float64, every sum over the visible pairs of vis [B, H, N, N].

  Hidden pairs contribute nothing (not 0 * x, which is NaN for x = inf). A row's
  softmax as in npref (and reference.py): a row whose sum is not positive is
  divided by 1.
  """
  q, k, v, dout = (np.asarray(t, np.float64) for t in (q, k, v, dout))
  with np.errstate(invalid="ignore", over="ignore"):
    s = np.where(vis, np.einsum("bqhd,bkhd->bhqk", q, k) * SCALE, -np.inf)    # (B, H, N, N)
    mx = s.max(axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.where(vis, np.exp(s - mx), 0.0)
    den = e.sum(axis=-1, keepdims=True)
    p = e / np.where(den > 0, den, 1.0)                                         # (B, H, N, N)

    def pairs(coef, x, over):  # sum over visible pairs of coef * x, x [B, N, H, D]
      if over == "keys":       # out[b, q, h] = sum_k coef[b, h, q, k] x[b, k, h]
        prod = coef[..., None] * np.transpose(x, (0, 2, 1, 3))[:, :, None, :, :]
        return np.transpose(np.where(vis[..., None], prod, 0.0).sum(3), (0, 2, 1, 3))
      prod = coef[..., None] * np.transpose(x, (0, 2, 1, 3))[:, :, :, None, :]
      return np.transpose(np.where(vis[..., None], prod, 0.0).sum(2), (0, 2, 1, 3))

    out = pairs(p, v, "keys")                                                   # (B, N, H, D)
    dv = pairs(p, dout, "queries")
    dp = np.einsum("bqhd,bkhd->bhqk", dout, v)
    delta = np.einsum("bqhd,bqhd->bhq", dout, out)[..., None]
    ds = np.where(vis, p * (dp - delta), 0.0)
    dq = pairs(ds, k, "keys") * SCALE
    dk = pairs(ds, q, "queries") * SCALE
  return out, dq, dk, dv


def _bad_rows(x):
  """[B, N, H] bool: rows (of each head) that hold a NaN or inf."""
  return ~np.isfinite(np.asarray(tf.cast(x, tf.float32))).all(axis=-1)


def _inject(rng, x, values):
  """x with each of values at a random (row, head, dim) of batch 0."""
  x = x.copy()
  for value in values:
    x[0, rng.integers(N), rng.integers(HEADS), rng.integers(D)] = value
  return x


def _run(impl, pattern, block, dtype, q, k, v, dout):
  qt, kt, vt = (tf.constant(t, dtype) for t in (q, k, v))
  with tf.GradientTape() as tape:
    tape.watch([qt, kt, vt])
    out = sparse_attention(qt, kt, vt, pattern, block_size=block, scale=SCALE,
                           implementation=impl)
  grads = tape.gradient(out, [qt, kt, vt], output_gradients=tf.constant(dout, dtype))
  return [out] + grads


def _cases(impl, check_grads):
  """(tensor, values put into it) of each run. NaN, +inf and -inf together in
  one tensor per run; the three-op path's gradients with NaN only in q and k
  (see test_unfused_gradients_skip_exact_zeros)."""
  every = tuple(VALUES.values())
  if not check_grads:
    return [("q", every), ("k", every)]
  if impl == "custom_op":
    return [("q", every), ("k", every), ("dout", every)]
  return [("q", (np.nan,)), ("k", (np.nan, np.nan)), ("dout", every)]


def _check(impl, pattern_name, block, dtype, rng, check_grads):
  pattern = PATTERNS[pattern_name]
  vis = npref.visible_mask(pattern.mask(N), HEADS, None, 1)
  for target, values in _cases(impl, check_grads):
    x = {name: rng.standard_normal((1, N, HEADS, D)) for name in ("q", "k", "v", "dout")}
    x[target] = _inject(rng, x[target], values)
    # The values the op sees (bf16-rounded), in float64.
    x = {name: tf.cast(tf.constant(t, dtype), tf.float64).numpy() for name, t in x.items()}
    if check_grads:
      got = _run(impl, pattern, block, dtype, x["q"], x["k"], x["v"], x["dout"])
    else:
      got = [sparse_attention(*(tf.constant(x[n], dtype) for n in "qkv"), pattern,
                              block_size=block, scale=SCALE, implementation=impl)]
    want = _visible_pairs(x["q"], x["k"], x["v"], x["dout"], vis)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
      bad, expected = _bad_rows(g), _bad_rows(w)
      assert np.array_equal(bad, expected), (
          f"{impl} {pattern_name} b={block} {dtype.name}: {values} in {target}: non-finite "
          f"rows of {name} {np.argwhere(bad)[:, 1:].tolist()}, expected "
          f"{np.argwhere(expected)[:, 1:].tolist()}")


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=lambda d: d.name)
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("pattern_name", list(PATTERNS))
@pytest.mark.parametrize("impl", ["custom_op", "custom_op_unfused"])
def test_custom_ops_contain_nonfinite(ops, rng, impl, pattern_name, block, dtype):
  """out, dq, dk, dv of both C++ paths: exactly the rows that see the value."""
  _check(impl, pattern_name, block, dtype, rng, check_grads=True)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=lambda d: d.name)
@pytest.mark.parametrize("pattern_name", list(PATTERNS))
@pytest.mark.parametrize("impl,block", [("reference", 16), ("reference", 32), ("reference", 64),
                                        ("dense", 32)])  # dense: no blocks
def test_tf_implementations_contain_nonfinite_forward(rng, impl, pattern_name, block, dtype):
  """The pure-TF implementations select their masked scores too (forward).

  Their gradients come from TF's autodiff, whose products add 0 * NaN across
  the mask (reference: within a kept tile, dense: the whole row), so they are
  not held to the visible-pairs sets.
  """
  _check(impl, pattern_name, block, dtype, rng, check_grads=False)


def test_unfused_gradients_skip_exact_zeros(ops):
  """The three-op path's products (dsd, dsd_t) get no mask: a NaN or inf operand
  row skips the exact-zero coefficients, which are the hidden elements but also
  a visible probability that is exactly 0. So an inf in k whose score is -inf
  for a row that sees it leaves that row's dq finite there (0 * inf is NaN in
  the fused op, as in float64)."""
  q = np.ones((1, 32, 1, 16))
  k = np.ones((1, 32, 1, 16))
  k[0, 3, 0, 0] = -np.inf                      # scores of key 3: -inf, probability 0
  v = dout = np.ones((1, 32, 1, 16))
  grads = {impl: _run(impl, patterns.Dense(), 16, tf.float32, q, k, v, dout)[1]
           for impl in ("custom_op", "custom_op_unfused")}
  rows = np.arange(32) >= 3                    # the rows that see key 3
  assert np.array_equal(_bad_rows(grads["custom_op"])[0, :, 0], rows)
  assert not _bad_rows(grads["custom_op_unfused"]).any()


# ---- block sizes the fused kernels do not take (issue 13, item 4) -------------------
_RAW_FUSED = textwrap.dedent("""
    import numpy as np
    import tensorflow as tf
    from sparse_attention_tf import ops

    def run(block, mode):
      n = block if 16 <= block <= 1 << 17 else 64
      q = tf.zeros([1, n, 1, 1])                          # 512 KiB at block 131072
      i32 = lambda x: tf.constant(x, tf.int32)
      b = max(block, 0) if block < 1 << 20 else 0
      tables = (i32(np.zeros((1, 3))), i32([0, 1]), i32([0, 1]), i32([0]), i32([-1]),
                tf.zeros([0, b, b], tf.bool), i32(np.zeros((0, 2))),
                i32(np.zeros((0, b // 16, 2))), tf.zeros([0], tf.bool), tf.ones([1, n], tf.bool))
      fwd = lambda: ops.attention(q, q, q, *tables, scale=1.0, block_size=block)
      bwd = lambda: ops.attention_grad(q, q, q, q, tf.zeros([1, 1, n]), q, *tables, scale=1.0,
                                       block_size=block)
      for name, fn in (("attention", fwd), ("attention_grad", bwd)):
        try:
          (tf.function(fn) if mode == "function" else fn)()
          print(block, mode, name, "no error")
        except (tf.errors.InvalidArgumentError, tf.errors.ResourceExhaustedError,
                ValueError) as e:  # ValueError: the attr's `>= 1`, checked as a graph is built
          print(block, mode, name, type(e).__name__, " ".join(str(e).split()))

    for block in BLOCKS:
      for mode in ("eager", "function") if block == BLOCKS[0] else ("eager",):
        run(block, mode)
""")
BLOCKS = [131072, 0, 8, 24, -16, 256, 1 << 40]


def test_fused_ops_reject_unsupported_block_size(ops):
  """attention and attention_grad, eager (and in a tf.function for the block size of
  the issue, which aborted there), in a subprocess (a crash, SIGSEGV or abort,
  fails the test instead of pytest): an InvalidArgumentError that names
  block_size and the supported values."""
  code = f"BLOCKS = {BLOCKS}\n" + _RAW_FUSED
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
  lines = proc.stdout.splitlines()
  assert len(lines) == 2 * len(BLOCKS) + 2, proc.stdout
  for block, line in zip([BLOCKS[0]] * 2 + list(np.repeat(BLOCKS, 2)), lines):
    assert line.startswith(f"{block} "), line
    if block >= 1:
      assert " InvalidArgumentError " in line and (
          f"block_size must be one of 16, 32, 64, 128 for the fused attention kernels, "
          f"got {block}" in line), line
    else:  # the attribute's own `>= 1`
      assert (" InvalidArgumentError " in line or " ValueError " in line) and (
          "'block_size' of " in line), line


@pytest.mark.parametrize("scale", [np.inf, -np.inf, np.nan])
def test_fused_ops_reject_nonfinite_scale(ops, scale):
  """Where the kernels apply the scale (to q, or to q . k) decides what inf * 0 gives,
  so a non-finite scale has no one meaning: both fused ops refuse it, naming it."""
  n = 16
  q = tf.zeros([1, n, 1, 2])
  i32 = lambda x: tf.constant(x, tf.int32)
  tables = (i32([[0, 0, 0]]), i32([0, 1]), i32([0, 1]), i32([0]), i32([-1]),
            tf.zeros([0, n, n], tf.bool), i32(np.zeros((0, 2))), i32(np.zeros((0, n // 16, 2))),
            tf.zeros([0], tf.bool), tf.ones([1, n], tf.bool))
  pattern = f"scale must be finite for the fused attention kernels, got {str(scale).lower()}"
  with pytest.raises(tf.errors.InvalidArgumentError, match=pattern.replace("-", r"\-")):
    ops.attention(q, q, q, *tables, scale=float(scale), block_size=n)
  with pytest.raises(tf.errors.InvalidArgumentError, match=pattern.replace("-", r"\-")):
    ops.attention_grad(q, q, q, q, tf.zeros([1, 1, n]), q, *tables, scale=float(scale),
                       block_size=n)
  out, _ = ops.attention(q, q, q, *tables, scale=1.0, block_size=n)   # a finite one runs
  assert np.all(np.isfinite(out.numpy()))
