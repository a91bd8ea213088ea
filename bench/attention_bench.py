"""Benchmark: fused block-sparse attention vs the three-op path, the pure-TF
reference and dense attention.

    .venv/bin/python bench/attention_bench.py                  # fused-kernel targets
    .venv/bin/python bench/attention_bench.py --suite patterns # every pattern and impl
    .venv/bin/python bench/attention_bench.py --sizes 1024 --repeats 2

Everything is measured in one run; each table's baseline in the same process:
the fused op (`custom_op`), the three ops SDD -> softmax -> DSD
(`custom_op_unfused`), the pure-TF reference on the same kept blocks, TF dense
masked attention (full N^2, the mask applied with tf.where, as a user would
write it; above --dense_chunk_above it runs a few heads at a time, the same
arithmetic in less memory), and a dense `tf.matmul` 4096^3 as the machine's
arithmetic ceiling (in the fused suite measured again just before each row,
as this VM's speed drifts). Times are the median of --repeats calls of a
tf.function after one warm-up call, waiting for the devices but not copying
results to NumPy. Memory is the peak resident set size of a fresh process
(subprocess) that runs one forward+backward.

Useful FLOPs count only kept elements: 4 * N^2 * D * H * density forward
(Q.K^T and P.V), 2.5x that for forward + backward.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import sparse_attention_tf as sat  # noqa: E402
from bench.machine import machine_line  # noqa: E402
from sparse_attention_tf import ops  # noqa: E402

IMPLS = ("custom_op", "custom_op_unfused", "reference", "dense")
FIXED = dict(stride=128, summary=32)


def median_seconds(fn, args, repeats):
  """Median wall time of fn(*args), after one warm-up call (trace + first run).

  Waits for the devices, but does not copy the results to NumPy: the copy is
  not part of the computation (2.7 ms of the 110 ms of the fused
  forward+backward at N=4096, for its 24 MB of gradients).
  """
  fn(*args)
  tf.test.experimental.sync_devices()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn(*args)
    tf.test.experimental.sync_devices()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_gflops(repeats):
  """Dense float32 tf.matmul 4096^3, GFLOP/s: the ceiling for ratios."""
  a = tf.random.normal((4096, 4096))
  b = tf.random.normal((4096, 4096))
  f = tf.function(lambda a, b: tf.matmul(a, b))
  return 2 * 4096**3 / median_seconds(f, (a, b), repeats) / 1e9


def strided_stride(n):
  """A power of two near sqrt(N)."""
  return 2 ** round(math.log2(math.sqrt(n)))


def dense_in_chunks(q, k, v, mask, heads_per_chunk):
  """Dense masked softmax attention, a few heads at a time (same FLOPs, less memory)."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  outs = []
  for h0 in range(0, q.shape[2], heads_per_chunk):
    sl = slice(h0, h0 + heads_per_chunk)
    s = tf.einsum("bqhd,bkhd->bhqk", q[:, :, sl], k[:, :, sl]) * scale     # (B, h, N, N)
    s = tf.where(mask, s, tf.constant(-1e30, s.dtype))
    outs.append(tf.einsum("bhqk,bkhd->bqhd", tf.nn.softmax(s), v[:, :, sl]))  # (B, N, h, D)
  return tf.concat(outs, axis=2)


def make_fns(pattern, block, impl, n=None, heads_per_chunk=None):
  """tf.functions (forward, forward+backward) of one implementation."""
  mask = None
  if impl == "dense" and heads_per_chunk:
    assert pattern.num_heads == 1
    mask = tf.constant(pattern.mask(n)[0])                                  # (N, N)

  def forward(q, k, v):
    if mask is not None:
      return dense_in_chunks(q, k, v, mask, heads_per_chunk)
    return sat.sparse_attention(q, k, v, pattern, block_size=block, implementation=impl)

  def forward_backward(q, k, v):
    with tf.GradientTape() as tape:
      tape.watch([q, k, v])
      out = forward(q, k, v)
      loss = tf.reduce_sum(tf.cast(out, tf.float32) ** 2)
    return tape.gradient(loss, [q, k, v])

  return tf.function(forward), tf.function(forward_backward)


def inputs(n, heads, head_dim, dtype=tf.float32, seed=0):
  rng = np.random.default_rng(seed)
  shape = (1, n, heads, head_dim)
  return [tf.cast(rng.standard_normal(shape, np.float32), dtype) for _ in range(3)]


def table_header(columns):
  print("| " + " | ".join(columns) + " |")
  print("|" + "---|" * len(columns))


# --- memory: one forward+backward in a fresh process ----------------------------
def _status_bytes(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def memory_child(n, impl, dtype, block, heads, head_dim):
  """Runs in a subprocess: the peak resident set size of one forward+backward.

  A first call traces and warms up; the measured second call starts from the
  inputs alone (freed memory given back to the OS: large blocks are mmapped,
  see memory_run, and malloc_trim), with the kernel's peak counter (VmHWM)
  reset. Reported: peak
  minus that start, plus the inputs' own size, i.e. the working memory of a
  forward+backward including q, k and v.
  """
  dtype = tf.as_dtype(dtype)
  _, fwd_bwd = make_fns(sat.Fixed(**FIXED), block, impl)
  q, k, v = inputs(n, heads, head_dim, dtype)
  [g.numpy() for g in fwd_bwd(q, k, v)]               # trace + warm up
  ctypes.CDLL("libc.so.6").malloc_trim(0)             # give freed memory back to the OS
  start_rss = _status_bytes("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:      # reset VmHWM to the current RSS
    f.write("5")
  start = time.perf_counter()
  grads = [g.numpy() for g in fwd_bwd(q, k, v)]
  seconds = time.perf_counter() - start
  peak = _status_bytes("VmHWM")
  del grads
  input_bytes = 3 * n * heads * head_dim * dtype.size
  print(json.dumps(dict(used=peak - start_rss + input_bytes, seconds=seconds)))


def memory_run(n, impl, dtype, args):
  cmd = [sys.executable, os.path.abspath(__file__), "--_memory_child", str(n), impl, dtype,
         "--block", str(args.block), "--heads", str(args.heads), "--head_dim", str(args.head_dim)]
  # The resident set must track what is live, not what allocators cache:
  # oneDNN's options switch TF's CPU allocator to a caching BFC allocator, and
  # a fixed mmap threshold makes malloc give freed large tensors back at once.
  env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", TF_ENABLE_ONEDNN_OPTS="0")
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode != 0:
    return None, (proc.stderr.strip().splitlines() or ["killed"])[-1][:120]
  return json.loads(proc.stdout.strip().splitlines()[-1]), None


# --- suites ---------------------------------------------------------------------
def fused_suite(args):
  """The fused kernel's targets: speed vs dense, share of matmul, memory, bf16."""
  pattern = sat.Fixed(**FIXED)
  if "speed" in args.sections:
    speed_table(args, pattern)
  if "memory" in args.sections:
    memory_table(args)
  if "bf16" in args.sections:
    if len(args.sections) == 1:
      bf16_table(args, pattern)
    else:
      # In its own process: after the dense N=8192 runs above, this process's
      # allocator state slows the bf16 path (1.3x instead of 1.5-1.75x here;
      # cause not found), which is not what a training step sees.
      cmd = [sys.executable, os.path.abspath(__file__), "--sections", "bf16",
             "--bf16_n", str(args.bf16_n), "--block", str(args.block), "--heads",
             str(args.heads), "--head_dim", str(args.head_dim), "--repeats", str(args.repeats),
             "--bf16_sizes", *map(str, args.bf16_sizes), "--blocks", *map(str, args.blocks)]
      out = subprocess.run(cmd, capture_output=True, text=True).stdout
      print("\n" + out[out.index("### bfloat16"):] if "### bfloat16" in out else out, end="")


def speed_table(args, pattern):
  """Fused and three-op path against dense, and against the matmul ceiling.

  This VM's speed drifts by up to 1.6x within minutes (other tenants), so the
  share of matmul of each row is taken against a tf.matmul 4096^3 measured
  just before that row ("matmul GFLOP/s"), not only the one at the start.
  """
  print("### Speed: Fixed(128, 32), batch 1, float32\n")
  table_header(["N", "block", "impl", "fwd ms", "fwd+bwd ms", "fwd+bwd GFLOP/s",
                "matmul GFLOP/s", "% of matmul", "fwd+bwd speedup vs dense",
                "targets (>= 5x dense, >= 50% matmul)"])
  for n in args.sizes:
    q, k, v = inputs(n, args.heads, args.head_dim)
    density = pattern.density(n)
    flops = 2.5 * 4 * n * n * args.head_dim * args.heads * density
    chunk = args.heads if n <= args.dense_chunk_above else 1
    near = matmul_gflops(args.repeats)
    dense_fwd, dense_all = (median_seconds(f, (q, k, v), args.repeats)
                            for f in make_fns(pattern, None, "dense", n, chunk))
    print(f"| {n} | - | dense ({chunk} head{'s' if chunk > 1 else ''} at a time) | "
          f"{dense_fwd * 1e3:.1f} | {dense_all * 1e3:.1f} | {flops / dense_all / 1e9:.1f} | "
          f"{near:.0f} | {100 * flops / dense_all / 1e9 / near:.1f}% | 1.00x | |", flush=True)
    for block in args.blocks:
      for impl in ("custom_op", "custom_op_unfused"):
        fwd, fwd_bwd = make_fns(pattern, block, impl)
        near = matmul_gflops(args.repeats)
        t_fwd = median_seconds(fwd, (q, k, v), args.repeats)
        t_all = median_seconds(fwd_bwd, (q, k, v), args.repeats)
        share = flops / t_all / 1e9 / near
        met = ""
        if impl == "custom_op":
          met = "MET" if dense_all / t_all >= 5 and share >= 0.5 else "NOT MET"
        print(f"| {n} | {block} | {impl} | {t_fwd * 1e3:.1f} | {t_all * 1e3:.1f} | "
              f"{flops / t_all / 1e9:.1f} | {near:.0f} | {100 * share:.1f}% | "
              f"{dense_all / t_all:.2f}x | {met} |", flush=True)


def memory_table(args):
  print("\n### Memory: peak resident set size of one forward+backward (fresh process)\n")
  table_header(["N", "impl", "dtype", "seconds", "q,k,v,out + grads MiB",
                "peak RSS of fwd+bwd incl. q,k,v, MiB", "ratio", "target (<= 2x; completes)"])
  for n, impl in [(args.memory_n, "custom_op"), (args.memory_n, "custom_op_unfused"),
                  (args.largest_n, "custom_op")]:
    tensors = n * args.heads * args.head_dim * 4
    r, err = memory_run(n, impl, "float32", args)
    if r is None:
      print(f"| {n} | {impl} | float32 | failed: {err} | | | | |", flush=True)
      continue
    used = r["used"]
    ratio = used / (8 * tensors)
    target = ("completes" if n == args.largest_n else
              ("MET" if ratio <= 2 else "NOT MET") if impl == "custom_op" else "")
    print(f"| {n} | {impl} | float32 | {r['seconds']:.1f} | {8 * tensors / 2**20:.0f} | "
          f"{used / 2**20:.0f} | {ratio:.2f}x | {target} |", flush=True)



def interleaved_medians(fns, args_list, repeats):
  """Median wall time of each fn(*args), measured in turns (one call of each
  per round, after one warm-up call each), so that this VM's drifting speed
  falls on every column of a row alike."""
  for fn, a in zip(fns, args_list):
    fn(*a)
  tf.test.experimental.sync_devices()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for t, fn, a in zip(times, fns, args_list):
      start = time.perf_counter()
      fn(*a)
      tf.test.experimental.sync_devices()
      t.append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def bf16_table(args, pattern):
  """bfloat16 against float32 on the engines the dispatch chose for this CPU."""
  engines = ops.cpu_engines()
  bf16_engine = engines["bfloat16"] or "converted to float32"
  amx = engines["bfloat16"] == "amx"
  print(f"\n### bfloat16 vs float32: fused op, Fixed(128, 32), batch 1, {args.heads} heads, "
        f"head_dim {args.head_dim}; bfloat16 engine: {bf16_engine}, float32 engine: "
        f"{engines['float32']}\n")
  target = ("fwd >= 3x, fwd+bwd >= 2.5x at N >= 8192 (AMX)" if amx else
            "bf16 fwd+bwd >= 1.0x float32 at N >= 4096")
  table_header(["N", "block", "f32 fwd ms", "bf16 fwd ms", "fwd speedup", "f32 fwd+bwd ms",
                "bf16 fwd+bwd ms", "fwd+bwd speedup", f"target ({target})"])
  for n in args.bf16_sizes:
    q32, k32, v32 = inputs(n, args.heads, args.head_dim)
    qb, kb, vb = (tf.cast(t, tf.bfloat16) for t in (q32, k32, v32))
    for block in args.blocks:
      fwd, fwd_bwd = make_fns(pattern, block, "custom_op")
      f32_f, b16_f = interleaved_medians([fwd, fwd], [(q32, k32, v32), (qb, kb, vb)],
                                         args.repeats)
      f32_a, b16_a = interleaved_medians([fwd_bwd, fwd_bwd], [(q32, k32, v32), (qb, kb, vb)],
                                         args.repeats)
      if amx:
        met = (f32_f / b16_f >= 3 and f32_a / b16_a >= 2.5) if n >= 8192 else None
      else:
        met = f32_a / b16_a >= 1.0
      print(f"| {n} | {block} | {f32_f * 1e3:.1f} | {b16_f * 1e3:.1f} | {f32_f / b16_f:.2f}x | "
            f"{f32_a * 1e3:.1f} | {b16_a * 1e3:.1f} | {f32_a / b16_a:.2f}x | "
            f"{'' if met is None else 'MET' if met else 'NOT MET'} |", flush=True)
  n = args.bf16_n
  print(f"\nbfloat16 error against float64 (the reference path on the kept blocks), N={n}, "
        f"block {args.block}:\n")
  q32, k32, v32 = inputs(n, args.heads, args.head_dim)
  f64 = [tf.cast(tf.cast(t, tf.bfloat16), tf.float64) for t in (q32, k32, v32)]
  with tf.GradientTape() as tape:                    # float64 on the same bf16 inputs
    tape.watch(f64)
    out = sat.sparse_attention(*f64, pattern, block_size=args.block, implementation="reference")
    loss = tf.reduce_sum(out ** 2)
  ref = [out] + tape.gradient(loss, f64)
  q, k, v = (tf.cast(t, tf.bfloat16) for t in (q32, k32, v32))
  with tf.GradientTape() as tape:
    tape.watch([q, k, v])
    out = sat.sparse_attention(q, k, v, pattern, block_size=args.block)
    loss = tf.reduce_sum(tf.cast(out, tf.float32) ** 2)
  got = [out] + tape.gradient(loss, [q, k, v])
  errs = [float(tf.norm(tf.cast(g, tf.float64) - r) / tf.norm(r)) for g, r in zip(got, ref)]
  table_header(["rel err out", "rel err dq", "rel err dk", "rel err dv", "target (<= 1e-2)"])
  print("| " + " | ".join(f"{e:.1e}" for e in errs) +
        f" | {'MET' if max(errs) <= 1e-2 else 'NOT MET'} |", flush=True)


def patterns_suite(args, ceiling):
  """Every pattern family and implementation (the table of the core issue)."""
  table_header(["pattern", "N", "density", "impl", "fwd ms", "fwd+bwd ms", "fwd+bwd GFLOP/s",
                "% of matmul", "fwd speedup vs dense", "fwd+bwd speedup vs dense"])
  rng = np.random.default_rng(0)
  for n in args.sizes:
    shape = (1, n, args.heads, args.head_dim)
    q, k, v = (tf.constant(rng.standard_normal(shape), tf.float32) for _ in range(3))
    for name in args.patterns:
      if name == "fixed":
        pattern = sat.Fixed(**FIXED)
      elif name == "strided_split":
        pattern = sat.Strided(strided_stride(n), heads=args.heads, mode="split")
      else:
        pattern = sat.Strided(strided_stride(n), mode="merged")
      density = pattern.density(n, args.block)
      flops_fwd = 4 * n * n * args.head_dim * args.heads * density
      results = {}
      for impl in IMPLS:
        fwd, fwd_bwd = make_fns(pattern, args.block, impl)
        t_fwd = median_seconds(fwd, (q, k, v), args.repeats)
        t_all = None
        if impl != "dense" or n <= args.dense_chunk_above:
          t_all = median_seconds(fwd_bwd, (q, k, v), args.repeats)
        results[impl] = (t_fwd, t_all)
      dense_fwd, dense_all = results["dense"]
      for impl, (t_fwd, t_all) in results.items():
        all_ms = f"{t_all * 1e3:.1f}" if t_all else "out of memory"
        gflops = f"{2.5 * flops_fwd / t_all / 1e9:.1f}" if t_all else "-"
        share = f"{100 * 2.5 * flops_fwd / t_all / 1e9 / ceiling:.1f}%" if t_all else "-"
        speed_all = f"{dense_all / t_all:.2f}x" if dense_all and t_all else "-"
        print(f"| {pattern!r} | {n} | {density:.3f} | {impl} | {t_fwd * 1e3:.1f} | "
              f"{all_ms} | {gflops} | {share} | {dense_fwd / t_fwd:.2f}x | {speed_all} |",
              flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--suite", choices=["fused", "patterns"], default="fused")
  parser.add_argument("--sizes", type=int, nargs="+", default=None,
                      help="sequence lengths (fused: 4096 8192; patterns: 1024 ... 8192)")
  parser.add_argument("--block", type=int, default=32)
  parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64],
                      help="block sizes of the fused suite's speed table")
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--sections", nargs="+", default=["speed", "memory", "bf16"],
                      choices=["speed", "memory", "bf16"], help="parts of the fused suite")
  parser.add_argument("--memory_n", type=int, default=16384)
  parser.add_argument("--largest_n", type=int, default=65536)
  parser.add_argument("--bf16_n", type=int, default=4096, help="N of the bf16 error check")
  parser.add_argument("--bf16_sizes", type=int, nargs="+", default=[4096, 8192, 16384],
                      help="sequence lengths of the bf16 vs float32 speed table")
  parser.add_argument("--patterns", nargs="+", default=["fixed", "strided_split", "strided_merged"],
                      choices=["fixed", "strided_split", "strided_merged"])
  parser.add_argument("--dense_chunk_above", type=int, default=4096,
                      help="above this N, dense attention runs one head at a time (its "
                           "N^2 temporaries for all heads exceed 24 GB at N=8192)")
  parser.add_argument("--_memory_child", nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  tf.get_logger().setLevel("ERROR")      # one tf.function per case: retracing is expected
  if not ops.is_available():
    sys.exit("bench: the op library is not built; run `bash scripts/setup.sh` first.")
  if args._memory_child:
    n, impl, dtype = args._memory_child
    memory_child(int(n), impl, dtype, args.block, args.heads, args.head_dim)
    return
  if args.sizes is None:
    args.sizes = [4096, 8192] if args.suite == "fused" else [1024, 2048, 4096, 8192]

  ceiling = matmul_gflops(args.repeats)
  print(machine_line())
  print(f"threads: intra-op {tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()}"
        f", kernels: {ops.simd_isa()}, op library: {ops.library_path()}")
  print(f"dense tf.matmul 4096^3 float32: {ceiling:.0f} GFLOP/s\n")
  if args.suite == "fused":
    fused_suite(args)
  else:
    patterns_suite(args, ceiling)


if __name__ == "__main__":
  main()
