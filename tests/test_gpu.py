"""The CUDA kernels: build checks that run everywhere, GPU checks where TF sees a GPU.

Always (CPU only):
  * the CUDA kernels, compiled for a CPU emulation of CUDA
    (custom_ops/gpu_harness/cuda_emulation.h), match the float64 reference,
    and with NaN / +-inf in q, k or dout the fused kernels' non-finite out,
    lse, dq, dk, dv are exactly the reference's (visible pairs only);
  * the C++ table generator of the GPU harness (custom_ops/gpu_harness/
    tables.h) gives the same tables as `patterns` plans;
  * the CUDA sources and the harness compile with nvcc for sm_80 and sm_90,
    and the DEVICE_GPU registrations compile with -DGOOGLE_CUDA=1 (skipped
    only when nvcc or g++ is absent).
With a GPU (and the op library built with `make ops GPU=1`): every op on the
GPU against the same op on the CPU, forward and gradients, in each dtype.
"""

import os
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from sparse_attention_tf import patterns

ROOT = pathlib.Path(__file__).resolve().parent.parent
HARNESS = ROOT / "custom_ops" / "gpu_harness"


def _nvcc():
  found = shutil.which("nvcc")
  if found:
    return found
  default = pathlib.Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
  return str(default) if default.exists() else None


def _run(cmd, timeout, **kwargs):
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
  assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"
  return proc.stdout


# ---- table generator ---------------------------------------------------------
@pytest.fixture(scope="module")
def tables_dump(tmp_path_factory):
  if shutil.which("g++") is None:
    pytest.skip("g++ not found: cannot build the C++ table generator")
  exe = tmp_path_factory.mktemp("tables") / "tables_dump"
  _run(["g++", "-std=c++17", "-O2", f"-I{ROOT}", str(HARNESS / "tables_dump.cc"), "-o", str(exe)],
       timeout=120)
  return exe


def _parse_dump(text):
  lines = text.splitlines()
  head = lines[0].split()
  info = {head[k]: int(head[k + 1]) for k in range(0, len(head), 2)}
  tables = {}
  for line in lines[1:5]:
    name, *values = line.split()
    tables[name] = np.array(values, np.int64)
  tiles = lines[5:]
  return info, tables, tiles


def _python_tiles(t):
  """Per kept block: "F" for a full tile, else its b*b 0/1 string."""
  out = []
  for z in range(t.nnz):
    mi = t.mask_index[z]
    out.append("F" if mi < 0 else "".join("1" if x else "0" for x in t.masks[mi].reshape(-1)))
  return out


@pytest.mark.parametrize("args, pattern, seq, block", [
    (["fixed", 128, 32, 1, 1], patterns.Fixed(128, 32), 1024, 64),
    (["fixed", 128, 32, 2, 1], patterns.Fixed(128, 32, head_groups=2), 512, 32),
    (["fixed", 64, 16, 1, 0], patterns.Fixed(64, 16, causal=False), 512, 16),
    (["strided", 32, 1], patterns.Strided(32), 512, 16),
    (["strided", 48, 0], patterns.Strided(48, causal=False), 768, 32),
])
def test_cpp_tables_equal_python_plans(tables_dump, args, pattern, seq, block):
  plan = pattern.plan(seq, block)
  assert len(plan.parts) == 1 and plan.parts[0].transpose is None
  t = plan.parts[0].tables
  out = _run([str(tables_dump)] + [str(a) for a in args] + [str(seq), str(block)], timeout=60)
  info, cpp, tiles = _parse_dump(out)
  assert info == {"seq": seq, "block": block, "layout_heads": t.num_layout_heads, "nnz": t.nnz}
  np.testing.assert_array_equal(cpp["blocks"], t.blocks.reshape(-1))
  for name in ("row_offsets", "col_offsets", "col_blocks"):
    np.testing.assert_array_equal(cpp[name], getattr(t, name), err_msg=name)
  # Partial tiles may be numbered differently; each block's tile must agree.
  assert tiles == _python_tiles(t)


# ---- builds --------------------------------------------------------------------
def test_cuda_sources_compile(tmp_path):
  """Kernels and harness compile with nvcc for sm_80 and sm_90."""
  nvcc = _nvcc()
  if nvcc is None:
    pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
  env = dict(os.environ, NVCC=nvcc, CUDA_ARCHS="80 90", BUILD_DIR=str(tmp_path))
  _run(["bash", str(HARNESS / "run.sh"), "--build-only"], timeout=600, env=env)
  assert (tmp_path / "harness").exists()


def test_production_sources_include_no_harness_header():
  """The CUDA kernels and the TF kernels never include a header of the test harness."""
  for folder in ("cuda", "cc"):
    for path in (ROOT / "custom_ops" / folder).rglob("*"):
      if path.suffix in (".cu", ".cc", ".h"):
        includes = re.findall(r'^\s*#\s*include\s+"([^"]+)"', path.read_text(), re.M)
        assert not [i for i in includes if "gpu_harness/" in i], path


def test_gpu_registrations_compile():
  """The DEVICE_GPU kernels need only TF's headers: syntax-check them with GOOGLE_CUDA."""
  if shutil.which("g++") is None:
    pytest.skip("g++ not found")
  flags = tf.sysconfig.get_compile_flags()
  _run(["g++", "-fsyntax-only", "-Wall", "-Wno-psabi", "-DGOOGLE_CUDA=1", f"-I{ROOT}"] + flags +
       [str(ROOT / "custom_ops" / "cc" / "kernels" / "blocksparse_ops_gpu.cc")], timeout=300)


def test_emulated_kernels_match_float64_reference(tmp_path):
  """The CUDA kernels themselves, run on the CPU (gpu_harness/cuda_emulation.h).

  Also NaN and +-inf in q, k, dout: the non-finite elements of out, lse, dq,
  dk, dv must be exactly the float64 visible-pairs reference's (RunNonFinite
  in emulate_check.cc), the containment the ops.attention docstring promises.
  """
  if shutil.which("g++") is None:
    pytest.skip("g++ not found: cannot build the CUDA emulation check")
  exe = tmp_path / "emulate_check"
  _run(["g++", "-std=c++20", "-O1", "-pthread", f"-I{ROOT}", str(HARNESS / "emulate_check.cc"),
        "-o", str(exe)], timeout=300)
  out = _run([str(exe)], timeout=600)
  assert "FAIL" not in out and "all passed" in out, out


# ---- on the GPU ------------------------------------------------------------------
requires_gpu = pytest.mark.skipif(
    not tf.config.list_physical_devices("GPU"),
    reason="TensorFlow sees no GPU: the GPU kernels are checked on GPU machines only "
    "(and by custom_ops/gpu_harness/run.sh)")

TOL = {tf.float32: 1e-5, tf.bfloat16: 1e-2, tf.float16: 1e-2}
DTYPES = [tf.float32, tf.bfloat16, tf.float16]


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  finite = np.isfinite(ref)
  assert np.array_equal(x[~finite], ref[~finite])  # -inf lse of rows with no visible key
  return np.abs(x[finite] - ref[finite]).max() / max(np.abs(ref[finite]).max(), 1e-30)


@pytest.fixture(scope="module")
def raw_ops():
  from sparse_attention_tf import ops as ops_lib
  lib = ops_lib.load_library()
  assert lib is not None, ops_lib.load_error()
  return lib


def _on(device, fn, *args):
  """Runs fn under device; the outputs must really be there (no soft placement)."""
  with tf.device(device):
    out = fn(*args)
  outs = out if isinstance(out, (list, tuple)) else [out]
  kind = device.split(":")[0].strip("/")
  if not all(kind in o.device for o in outs):
    if kind == "GPU":
      pytest.skip("the loaded op library has no GPU kernels: build it with `make ops GPU=1` "
                  "(or bazel --config=cuda) and set "
                  "SPARSE_ATTENTION_TF_OPS=build/gpu/_sparse_attention_ops.so")
    raise AssertionError(f"ran on {[o.device for o in outs]}, not {device}")
  return [np.asarray(tf.cast(o, tf.float32) if o.dtype != tf.float32 else o) for o in outs]


def _cases():
  rng = np.random.default_rng(0)
  nb = 8
  lay = rng.random((2, nb, nb)) < 0.4
  lay[:, :, 0] = True
  return [
      ("fixed", patterns.Fixed(128, 32).plan(512, 64).parts[0].tables, 2, 4, 64, 64),
      ("fixed_groups", patterns.Fixed(64, 16, head_groups=2).plan(256, 32).parts[0].tables, 1, 4,
       32, 48),
      ("random", patterns.Custom(lay, causal=False).plan(256, 32).parts[0].tables, 2, 4, 64, 64),
  ]


def _inputs(tables, batch, heads, d, dv, dtype, seed):
  rng = np.random.default_rng(seed)
  n = tables.seq_len
  x = lambda *s: tf.cast(rng.uniform(-1, 1, s).astype(np.float32), dtype)
  q, k, v, dout = x(batch, n, heads, d), x(batch, n, heads, d), x(batch, n, heads, dv), x(
      batch, n, heads, dv)
  kpm = np.ones((batch, n), bool)
  kpm[:, -n // 8:] = False
  kpm[0, rng.integers(0, n, n // 10)] = False
  return q, k, v, dout, tf.constant(kpm)


def _table_tensors(t):
  return [tf.constant(a) for a in (t.blocks, t.row_offsets, t.col_offsets, t.col_blocks)]


def _fused_tables(t):
  from sparse_attention_tf import ops as ops_lib
  return list(ops_lib.TableTensors(t).fused_tables)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_fused_attention_gpu_matches_cpu(raw_ops, case, dtype):
  _, t, batch, heads, d, dv = case
  q, k, v, dout, kpm = _inputs(t, batch, heads, d, dv, dtype, 1)
  tabs = _fused_tables(t)
  scale = d**-0.5
  fwd = lambda q, k, v: raw_ops.sparse_attention_blocksparse_attention(
      q, k, v, *tabs, kpm, scale=scale, block_size=t.block_size)
  # Reference: the CPU op in float32 (itself held to float64 NumPy by test_ops).
  f32 = lambda x: tf.cast(x, tf.float32)
  ref_out, ref_lse = _on("/CPU:0", fwd, f32(q), f32(k), f32(v))
  out, lse = _on("/GPU:0", fwd, q, k, v)
  assert rel_err(out, ref_out) <= TOL[dtype]
  assert rel_err(lse, ref_lse) <= TOL[dtype]

  def grad(q, k, v, dout):
    o, l = raw_ops.sparse_attention_blocksparse_attention(q, k, v, *tabs, kpm, scale=scale,
                                                          block_size=t.block_size)
    return raw_ops.sparse_attention_blocksparse_attention_grad(q, k, v, o, l, dout, *tabs, kpm,
                                                               scale=scale,
                                                               block_size=t.block_size)

  ref = _on("/CPU:0", grad, f32(q), f32(k), f32(v), f32(dout))
  got = _on("/GPU:0", grad, q, k, v, dout)
  for name, g, r in zip(("dq", "dk", "dv"), got, ref):
    assert rel_err(g, r) <= TOL[dtype], name
  # Deterministic: no atomics, so a second run is bitwise equal.
  again = _on("/GPU:0", grad, q, k, v, dout)
  for g, a in zip(got, again):
    np.testing.assert_array_equal(g, a)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_three_op_path_gpu_matches_cpu(raw_ops, case, dtype):
  _, t, batch, heads, d, _ = case
  q, k, _, _, kpm = _inputs(t, batch, heads, d, d, dtype, 2)
  tabs = _table_tensors(t)
  scale = d**-0.5
  bs = t.block_size

  def path(q, k):
    s = raw_ops.sparse_attention_blocksparse_sdd(q, k, *tabs, block_size=bs)
    p = raw_ops.sparse_attention_blocksparse_softmax(s, tabs[0], tabs[1], tf.constant(t.mask_index),
                                                     tf.constant(t.masks), kpm, scale=scale)
    dp = raw_ops.sparse_attention_blocksparse_sdd(k, q, *tabs, block_size=bs)
    ds = raw_ops.sparse_attention_blocksparse_softmax_grad(p, dp, tabs[1], scale=scale)
    o = raw_ops.sparse_attention_blocksparse_dsd(p, k, *tabs)
    ot = raw_ops.sparse_attention_blocksparse_dsd_t(ds, q, *tabs)
    return s, p, ds, o, ot

  f32 = lambda x: tf.cast(x, tf.float32)
  ref = _on("/CPU:0", path, f32(q), f32(k))
  got = _on("/GPU:0", path, q, k)
  # Later ops see earlier rounded outputs on both sides only in float32; in
  # 16-bit the chained error stays well under the tolerance at these sizes.
  for name, g, r in zip(("sdd", "softmax", "softmax_grad", "dsd", "dsd_t"), got, ref):
    assert rel_err(g, r) <= (TOL[dtype] if dtype == tf.float32 else 2e-2), name


@requires_gpu
def test_gpu_rejects_bad_tables_like_cpu(raw_ops):
  t = patterns.Fixed(128, 32).plan(256, 64).parts[0].tables
  q, k, v, _, kpm = _inputs(t, 1, 2, 32, 32, tf.float32, 3)
  good = _fused_tables(t)
  fwd = lambda *tabs: raw_ops.sparse_attention_blocksparse_attention(
      q, k, v, *tabs, kpm, scale=0.1, block_size=t.block_size)
  grad = lambda *tabs: raw_ops.sparse_attention_blocksparse_attention_grad(
      q, k, v, v, tf.zeros([1, 2, t.seq_len]), v, *tabs, kpm, scale=0.1,
      block_size=t.block_size)
  _on("/GPU:0", fwd, *good)  # skips if the library has no GPU kernels
  bad = t.blocks.copy()
  bad[0, 2] = 99
  with tf.device("/GPU:0"), pytest.raises(tf.errors.InvalidArgumentError, match="blocks"):
    fwd(tf.constant(bad), *good[1:])
  # The same checks as the CPU's (one op class): the column lists, in the
  # forward too, and the mask tables' coverage of the masks.
  cols = t.col_blocks[::-1].copy()
  split = t.mask_split.copy()
  query_range = t.mask_query_range.copy()
  query_range[split, :, 1] = query_range[split, :, 0]     # covers no query
  for fn in (fwd, grad):
    for i, bad, message in ((3, cols, "col_blocks"),
                            (8, query_range, "does not cover query")):
      tabs = list(good)
      tabs[i] = tf.constant(bad)
      with tf.device("/GPU:0"), pytest.raises(tf.errors.InvalidArgumentError, match=message):
        fn(*tabs)
