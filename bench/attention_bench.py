"""Benchmark: block-sparse attention vs the pure-TF reference vs dense attention.

    .venv/bin/python bench/attention_bench.py              # the full table
    .venv/bin/python bench/attention_bench.py --sizes 1024 --repeats 2

Everything is measured in one process, one run: the custom op, the pure-TF
reference on the same kept blocks, TF dense masked attention (full N^2, the
mask applied with tf.where, as a user would write it; its forward+backward
is skipped above --dense_backward_max, where it does not fit in 24 GB), and a dense
`tf.matmul` 4096^3 as the machine's arithmetic ceiling. Times are the median
of --repeats calls of a tf.function after one warm-up call.

Useful FLOPs count only kept elements: 4 * N^2 * D * H * density forward
(Q.K^T and P.V), 2.5x that for forward + backward.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import sparse_attention_tf as sat  # noqa: E402
from sparse_attention_tf import ops  # noqa: E402

IMPLS = ("custom_op", "reference", "dense")


def median_seconds(fn, args, repeats):
  result = fn(*args)                                  # warm-up: trace + first run
  tf.nest.map_structure(lambda t: t.numpy(), result)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn(*args)
    tf.nest.map_structure(lambda t: t.numpy(), result)
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


def make_fns(pattern, block, impl):
  def forward(q, k, v):
    return sat.sparse_attention(q, k, v, pattern, block_size=block, implementation=impl)

  def forward_backward(q, k, v):
    with tf.GradientTape() as tape:
      tape.watch([q, k, v])
      out = forward(q, k, v)
      loss = tf.reduce_sum(out * out)
    return tape.gradient(loss, [q, k, v])

  return tf.function(forward), tf.function(forward_backward)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
  parser.add_argument("--block", type=int, default=32)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--patterns", nargs="+", default=["fixed", "strided_split", "strided_merged"],
                      choices=["fixed", "strided_split", "strided_merged"])
  parser.add_argument("--dense_backward_max", type=int, default=4096,
                      help="largest N for dense forward+backward: at N=8192 its N^2 "
                           "temporaries exceed 24 GB and the process is killed")
  args = parser.parse_args(argv)
  tf.get_logger().setLevel("ERROR")      # one tf.function per case: retracing is expected
  if not ops.is_available():
    sys.exit("bench: the op library is not built; run `bash scripts/setup.sh` first.")

  ceiling = matmul_gflops(args.repeats)
  print(f"threads: intra-op {tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()}"
        f", kernels: {ops.simd_isa()}, op library: {ops.library_path()}")
  print(f"dense tf.matmul 4096^3 float32: {ceiling:.0f} GFLOP/s\n")
  header = ("| pattern | N | density | impl | fwd ms | fwd+bwd ms | fwd+bwd GFLOP/s | "
            "% of matmul | fwd speedup vs dense | fwd+bwd speedup vs dense |")
  print(header)
  print("|" + "---|" * (header.count("|") - 1))
  rng = np.random.default_rng(0)
  floor = {}
  for n in args.sizes:
    shape = (1, n, args.heads, args.head_dim)
    q, k, v = (tf.constant(rng.standard_normal(shape), tf.float32) for _ in range(3))
    for name in args.patterns:
      if name == "fixed":
        pattern = sat.Fixed(stride=128, summary=32)
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
        if impl != "dense" or n <= args.dense_backward_max:
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
      if name == "fixed" and n == 4096 and dense_all:
        floor = {impl: t for impl, (_, t) in results.items()}
  if floor:
    speedup = floor["dense"] / floor["custom_op"]
    ok = speedup >= 3 and floor["custom_op"] < floor["reference"]
    print(f"\nfloor (N=4096, Fixed, fwd+bwd): custom op {speedup:.2f}x faster than dense "
          f"(need >= 3x), {floor['reference'] / floor['custom_op']:.2f}x faster than the "
          f"reference (need > 1x): {'MET' if ok else 'NOT MET'}")


if __name__ == "__main__":
  main()
