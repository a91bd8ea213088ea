"""The fused attention's CPU engines and their one dispatch ($SPARSE_ATTENTION_TF_ISA).

Every engine this CPU runs -- float32 on AVX-512 / AVX2 / baseline, bf16 on
AVX512_BF16 pairs or AMX tiles, and `amx_emulated` (the AMX engine's code with
each tile instruction emulated in C++, which runs anywhere) -- is forced through
the environment in a fresh process and checked against float64 NumPy on fresh
random inputs: every block size, padding masks with fully padded rows (empty
rows), tiles split by key group, odd head dims (which a bf16 engine does not
take: converted to float32), forward and gradients, NaN and +-inf reaching
exactly the rows that see them, bitwise repeatable run to run, and the same
values with 1 and 2 threads. An engine the CPU lacks is
skipped with the reason (the AMX engine needs amx_tile/amx_bf16).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLOAT32 = ["avx512", "avx2", "baseline"]
BF16 = ["amx", "avx512_bf16", "amx_emulated"]

_SCRIPT = r'''
import json, sys
import numpy as np, tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
tf.config.threading.set_inter_op_parallelism_threads(1)
import sparse_attention_tf as sat
from sparse_attention_tf import ops
from tests import npref
engine, seed, out_file = sys.argv[2], int(sys.argv[3]), sys.argv[4]
report = ops.cpu_engines()
rng = np.random.default_rng(seed)
results, errors = {}, {}
f64 = lambda t: np.asarray(tf.cast(t, tf.float64))
cases = [  # name, pattern, n, block, d, dv, dtype
    ("b16", sat.Fixed(32, 8), 128, 16, 32, 32),
    ("b32", sat.Fixed(64, 16), 256, 32, 64, 48),
    ("b64_strided", sat.Strided(16, mode="merged"), 256, 64, 32, 64),
    ("b128", sat.Local(160), 256, 128, 16, 32),
    ("odd_dims", sat.Fixed(64, 16), 128, 32, 7, 5),
]
dtypes = [tf.float32, tf.bfloat16]
for name, pattern, n, block, d, dv in cases:
  q, k = (rng.standard_normal((2, n, 2, d)) for _ in range(2))
  v = rng.standard_normal((2, n, 2, dv))
  dout = rng.standard_normal((2, n, 2, dv))
  kp = rng.random((2, n)) > 0.25
  kp[1, : n // 2] = False                    # the first half of batch 1 padded
  kp[1, :block] = False
  for dtype in dtypes:
    qt, kt, vt = (tf.cast(t, dtype) for t in (q, k, v))
    ref, grads = npref.attention(f64(qt), f64(kt), f64(vt), pattern.mask(n), 0.3, kp, dout)
    impls = ["custom_op"] + (["custom_op_unfused"] if dtype == tf.float32 else [])
    for impl in impls:
      runs = []
      for _ in range(2):
        with tf.GradientTape() as tape:
          tape.watch([qt, kt, vt])
          out = sat.sparse_attention(qt, kt, vt, pattern, block_size=block, scale=0.3,
                                     key_padding_mask=kp, implementation=impl)
          loss = tf.reduce_sum(tf.cast(out, tf.float64) * dout)
        runs.append([f64(out)] + [f64(g) for g in tape.gradient(loss, [qt, kt, vt])])
      key = f"{name}_{dtype.name}_{impl}"
      assert all(np.array_equal(a, b) for a, b in zip(*runs)), key + ": not bitwise repeatable"
      errors[key] = [npref.rel_err(x, r) for x, r in zip(runs[0], [ref, *grads])]
      results[key] = runs[0]
# NaN and +-inf in q, k or dout reach exactly the rows that see them, on this
# engine too (test_nonfinite's float64 visible-pairs reference).
from tests import test_nonfinite as nonfinite
for pattern_name in nonfinite.PATTERNS:
  for block in (16, 32, 64):
    for dtype in dtypes:
      nonfinite._check("custom_op", pattern_name, block, dtype, rng, check_grads=True)
np.savez(out_file, **{f"{k}_{i}": x for k, v in results.items() for i, x in enumerate(v)})
print(json.dumps({"report": report, "errors": errors}))
'''


def _cpu_engines():
  from sparse_attention_tf import ops
  return ops.cpu_engines()


def _run(engine, threads, seed, out):
  env = dict(os.environ, SPARSE_ATTENTION_TF_ISA=engine, PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(threads), engine, str(seed), str(out)],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("engine", FLOAT32 + BF16)
def test_engine_matches_float64(ops, tmp_path, engine):
  available = _cpu_engines()["available"]
  if engine not in available:
    pytest.skip(f"this CPU does not run the {engine} engine (it runs {', '.join(available)})")
  seed = int(np.random.default_rng().integers(2**31))
  print(f"seed {seed}")
  two = _run(engine, 2, seed, tmp_path / "two.npz")
  _run(engine, 1, seed, tmp_path / "one.npz")
  report = two["report"]
  assert report["requested"] == engine
  if engine in BF16:
    assert report["bfloat16"] == engine
  else:
    assert report["float32"] == engine and report["bfloat16"] is None
  for key, errs in two["errors"].items():
    # bf16 operands: bf16 rounding of q, k, v and of P, dS in the products.
    tol = [1e-2, 2e-2, 2e-2, 2e-2] if "bfloat16" in key else [1e-5] * 4
    assert all(e <= t for e, t in zip(errs, tol)), (key, errs)
  a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  assert sorted(a.files) == sorted(b.files)
  for key in a.files:  # 2 threads split a head's rows into segments: same values
    tol = 1e-5 if "float32" in key else 1e-2
    scale = max(np.abs(a[key]).max(), 1e-30)
    assert np.abs(a[key] - b[key]).max() <= tol * scale, key


def test_default_dispatch_reports_this_cpu(ops):
  report = ops.cpu_engines()
  flags = set()
  for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
    if line.startswith("flags"):
      flags = set(line.split(":", 1)[1].split())
      break
  assert report["requested"] == ""
  has512 = {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags
  expect = "avx512" if has512 else "avx2" if {"avx2", "fma"} <= flags else "baseline"
  assert report["float32"] == expect
  if not (has512 and "avx512_bf16" in flags):
    assert report["bfloat16"] is None       # bf16 converts to float32 here
  elif "amx_tile" not in flags:
    assert report["bfloat16"] == "avx512_bf16"
  else:                                     # AMX, or float32 if the kernel refused the tiles
    assert report["bfloat16"] in ("amx", None)
  assert "amx_emulated" in report["available"] and expect in report["available"]


_REFUSED = r'''
import numpy as np, tensorflow as tf, sparse_attention_tf as sat
from sparse_attention_tf import ops
q = tf.ones((1, 64, 1, 16))
for call in (ops.cpu_engines,
             lambda: sat.sparse_attention(q, q, q, sat.Local(20), block_size=16)):
  try:
    call()
  except Exception as e:
    print(type(e).__name__, str(e).splitlines()[0][:400])
  else:
    print("ran")
'''


@pytest.mark.parametrize("value", ["bogus", "lacking"])
def test_dispatch_refuses_what_it_cannot_run(ops, value):
  available = _cpu_engines()["available"]
  if value == "lacking":
    lacking = [e for e in FLOAT32 + BF16 if e not in available]
    if not lacking:
      pytest.skip("this CPU runs every engine")
    value = lacking[0]
  env = dict(os.environ, SPARSE_ATTENTION_TF_ISA=value, PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, "-c", _REFUSED], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 2, proc.stdout
  for line in lines:
    assert line.startswith("FailedPreconditionError") or line.startswith("RuntimeError"), line
    assert f"SPARSE_ATTENTION_TF_ISA={value}" in line, line
    if value == "bogus":
      assert "names no CPU engine" in line and "avx512_bf16" in line, line
    else:
      assert "which this CPU does not run" in line and "avx2" in line + "baseline", line
