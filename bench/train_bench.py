"""Benchmark: training speed and the longest trainable sequence, sparse vs dense.

    .venv/bin/python bench/train_bench.py
    .venv/bin/python bench/train_bench.py --seq_lens 1024 --max_probe 8192
    .venv/bin/python bench/train_bench.py --seq_lens 4096 --attentions fixed \
        --policies float32 mixed_bfloat16 --probe      # bf16 training vs float32

For each attention (`fixed`: Fixed(128, 32) with the fused custom op;
`fixed_unfused`: the same pattern on the three-op path; `dense`: TF dense
masked attention) and sequence length, a fresh process builds the same
SparseTransformer (batch 1, --num_layers layers, d_model 256, 4 heads), runs
`train_on_batch` steps and reports steps/s and tokens/s (median step after
two warm-up steps), under each Keras dtype policy of --policies (e.g.
`mixed_bfloat16`: bfloat16 compute, float32 variables; the attention then runs
on the CPU's bf16 engine, see `sparse_attention_tf.ops.cpu_engines()`). Then it doubles the sequence length while a training step
fits in --memory_gb of resident memory: the parent watches the child's RSS in
/proc and stops it at the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, statistics, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, keras
import sparse_attention_tf as sat
args = json.loads(sys.argv[1])
keras.mixed_precision.set_global_policy(args["policy"])
n = args["seq_len"]
fixed = args["attention"] != "dense"
impl = {"fixed": "custom_op", "fixed_unfused": "custom_op_unfused", "dense": "dense"}
model = sat.SparseTransformer(
    vocab_size=256, seq_len=n, num_layers=args["layers"], d_model=256, num_heads=4,
    pattern=sat.Fixed(128, 32) if fixed else sat.Dense(), block_size=32,
    recompute=args["recompute"], implementation=impl[args["attention"]])
model.compile(keras.optimizers.Adam(1e-3),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
rng = np.random.default_rng(0)
x, y = (rng.integers(0, 256, (1, n)) for _ in range(2))
times = []
for _ in range(args["steps"] + args["warmup"]):
  start = time.perf_counter()
  model.train_on_batch(x, y)
  times.append(time.perf_counter() - start)
print(json.dumps({"step_s": statistics.median(times[args["warmup"]:])}))
"""


def rss_gb(pid):
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 2**20
  except OSError:
    pass
  return 0.0


def run(attention, seq_len, args, steps, warmup=2, policy="float32"):
  """(result dict or None, peak RSS GB, reason)."""
  cfg = dict(attention=attention, seq_len=seq_len, layers=args.num_layers, steps=steps,
             warmup=warmup, recompute=args.recompute, policy=policy)
  proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg)],
                          env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  peak = 0.0
  while proc.poll() is None:
    peak = max(peak, rss_gb(proc.pid))
    if peak > args.memory_gb:
      proc.kill()
      proc.wait()
      return None, peak, f"over {args.memory_gb:.0f} GB"
    time.sleep(0.1)
  out, err = proc.communicate()
  if proc.returncode != 0:
    return None, peak, (err.strip().splitlines() or ["killed"])[-1][:80]
  return json.loads(out.strip().splitlines()[-1]), peak, ""


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seq_lens", type=int, nargs="+", default=[1024, 2048, 4096])
  parser.add_argument("--num_layers", type=int, default=2)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--memory_gb", type=float, default=20.0)
  parser.add_argument("--max_probe", type=int, default=65536, help="longest sequence tried")
  parser.add_argument("--skip_speed", action="store_true", help="only probe the longest sequence")
  parser.add_argument("--attentions", nargs="+", default=["dense", "fixed_unfused", "fixed"],
                      choices=["dense", "fixed_unfused", "fixed"], help="speed table rows")
  parser.add_argument("--probe", nargs="*", default=["dense", "fixed"],
                      choices=["dense", "fixed_unfused", "fixed"],
                      help="attentions whose longest sequence to probe (dense's first step at "
                           "8192 takes many minutes here)")
  parser.add_argument("--recompute", action="store_true")
  parser.add_argument("--policies", nargs="+", default=["float32"],
                      help="Keras dtype policies of the speed table (float32, mixed_bfloat16)")
  args = parser.parse_args(argv)
  sys.path.insert(0, ROOT)
  from bench.machine import machine_line  # noqa: E402  (CPU model, engines)
  print(machine_line() + "\n")
  print(f"SparseTransformer: {args.num_layers} layers, d_model 256, 4 heads, batch 1, "
        f"recompute={args.recompute}; fixed = Fixed(128, 32) fused custom op, fixed_unfused = "
        f"the three-op path, dense = TF dense masked attention\n")
  print("| attention | policy | seq_len | steps/s | tokens/s | peak RSS (GB) | speedup vs dense "
        "| speedup vs float32 |")
  print("|---|---|---|---|---|---|---|---|")
  speed = {}
  for n in ([] if args.skip_speed else args.seq_lens):
    for attention in args.attentions:
      for policy in args.policies:
        result, peak, why = run(attention, n, args, args.steps, policy=policy)
        if result is None:
          print(f"| {attention} | {policy} | {n} | - | - | {peak:.1f} | {why} | |", flush=True)
          continue
        step = speed[(attention, policy, n)] = result["step_s"]
        dense = speed.get(("dense", policy, n))
        f32 = speed.get((attention, "float32", n))
        print(f"| {attention} | {policy} | {n} | {1 / step:.2f} | {n / step:.0f} | {peak:.1f} | "
              f"{f'{dense / step:.2f}x' if dense else '-'} | "
              f"{f'{f32 / step:.2f}x' if f32 else '-'} |", flush=True)
  print(f"\nlongest sequence with one training step within {args.memory_gb:.0f} GB "
        f"(doubling from {2 * max(args.seq_lens)}; the first step includes tracing):")
  for attention in args.probe:
    n, best = 2 * max(args.seq_lens), None
    while n <= args.max_probe:
      result, peak, why = run(attention, n, args, 1, warmup=0)      # one step: the first
      if result is None:
        print(f"  {attention}: {n} fails ({why}, peak {peak:.1f} GB)", flush=True)
        break
      best = (n, peak, result["step_s"])
      n *= 2
    if best:
      print(f"  {attention}: {best[0]} trains (peak {best[1]:.1f} GB, {best[2]:.1f} s/step)",
            flush=True)


if __name__ == "__main__":
  main()
