"""Benchmark: peak memory and time of a training step vs depth, with and without recompute.

    .venv/bin/python bench/recompute_bench.py
    .venv/bin/python bench/recompute_bench.py --depths 1 2 4 --seq_len 2048

Each (depth, recompute) configuration runs in a fresh process, since a
process's peak resident set size only grows: the child builds a
SparseTransformer, measures its peak RSS, runs training steps (`train_on_batch`)
and reports how much the peak grew (activations kept for the backward pass,
plus the step's temporaries) and the median step time. With recompute, a
block keeps only its input; the attention scores and feed-forward activations
are rebuilt in the backward pass, so the growth should barely depend on depth.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, resource, statistics, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf, keras
import sparse_attention_tf as sat
from sparse_attention_tf.models import SparseTransformer
args = json.loads(sys.argv[1])
model = SparseTransformer(vocab_size=256, seq_len=args["seq_len"], num_layers=args["depth"],
                          d_model=args["d_model"], num_heads=args["heads"],
                          pattern=sat.Fixed(128, 32), block_size=32, dropout=0.1,
                          recompute=args["recompute"])
model.compile(optimizer=keras.optimizers.Adam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (args["batch"], args["seq_len"]))
y = rng.integers(0, 256, (args["batch"], args["seq_len"]))
model(x[:1])                                     # build the weights
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # MiB
before = peak()
times = []
for _ in range(args["steps"]):
  start = time.perf_counter()
  model.train_on_batch(x, y)
  times.append(time.perf_counter() - start)
print(json.dumps({"growth_mib": peak() - before, "step_s": statistics.median(times[1:])}))
"""


def run(depth, recompute, args):
  cfg = dict(depth=depth, recompute=recompute, seq_len=args.seq_len, d_model=args.d_model,
             heads=args.heads, batch=args.batch, steps=args.steps)
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], env=env,
                        capture_output=True, text=True)
  if proc.returncode != 0:
    return None, proc.stderr.strip().splitlines()[-1:]
  return json.loads(proc.stdout.strip().splitlines()[-1]), None


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8])
  parser.add_argument("--seq_len", type=int, default=4096)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args(argv)
  print(f"SparseTransformer, Fixed(128, 32), seq_len {args.seq_len}, d_model {args.d_model}, "
        f"{args.heads} heads, batch {args.batch}, float32\n")
  print("| layers | recompute | peak RSS growth (MiB) | per layer (MiB) | step (s) |")
  print("|---|---|---|---|---|")
  growth = {}
  for depth in args.depths:
    for recompute in (False, True):
      result, err = run(depth, recompute, args)
      if result is None:
        print(f"| {depth} | {recompute} | failed: {err} | | |", flush=True)
        continue
      growth[(depth, recompute)] = result["growth_mib"]
      print(f"| {depth} | {recompute} | {result['growth_mib']:.0f} | "
            f"{result['growth_mib'] / depth:.0f} | {result['step_s']:.2f} |", flush=True)
  lo, hi = min(args.depths), max(args.depths)
  for recompute in (False, True):
    if (lo, recompute) in growth and (hi, recompute) in growth:
      slope = (growth[(hi, recompute)] - growth[(lo, recompute)]) / (hi - lo)
      print(f"\nrecompute={recompute}: peak memory grows {slope:.0f} MiB per added layer")


if __name__ == "__main__":
  main()
