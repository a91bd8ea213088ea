"""Benchmark: sampling speed, compiled prefill + decoding loop vs the step-per-call path.

    .venv/bin/python bench/generate_bench.py
    .venv/bin/python bench/generate_bench.py --repeats 5 --skip_old

The model of issue 14: SparseTransformer, 2 layers, width 128, 4 heads,
Fixed(64, 16), seq_len 1024, vocab 256, random weights. Per case (prompt
length, new tokens, batch) it reports the median of --repeats calls of
`generate` (after one warm-up call, which traces): seconds, new tokens/s
(all rows), prefill ms (a call that adds one token: prefill + one sample),
ms per decoding step ((seconds - prefill) / (new - 1)), and one full forward
pass at seq_len (tf.function, batch of the case) as the yardstick, and the
process CPU seconds of the timed call (a guide when other processes load the
machine: with 2 cores, unloaded wall time is about cpu s / 1..2). `old` is
the previous path (one tf.function call per position, prompt fed token by
token, sampling in eager TF), timed once.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import sparse_attention_tf as sat  # noqa: E402

CASES = ((512, 64, 1), (16, 256, 1), (16, 256, 8))


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def build_model(seq_len: int):
  model = sat.SparseTransformer(vocab_size=256, seq_len=seq_len, num_layers=2, d_model=128,
                                num_heads=4, pattern=sat.Fixed(64, 16), block_size=32)
  model(np.zeros((1, seq_len), np.int32))
  rng = np.random.default_rng(0)
  for w in model.weights:
    w.assign(0.2 * rng.standard_normal(w.shape).astype(w.dtype))
  return model


def old_generate(model, prompt, num_tokens, seed=0):
  """The previous generate: logits_stream (one step call per position) + eager sampling."""
  batch, prompt_len = prompt.shape
  out = np.zeros((batch, prompt_len + num_tokens), np.int32)
  out[:, :prompt_len] = prompt
  stream = model.logits_stream(out, prompt_len, num_tokens, True)
  for step in range(num_tokens):
    logits = tf.cast(next(stream), tf.float32)
    out[:, prompt_len + step] = tf.random.stateless_categorical(
        logits, 1, seed=(seed, step), dtype=tf.int32)[:, 0].numpy()
  stream.close()
  return out


def timed(fn, repeats):
  """Median wall seconds of `repeats` calls (and the process CPU seconds of that call)."""
  times = []
  for _ in range(repeats):
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    times.append((time.perf_counter() - start, time.process_time() - cpu))
  return sorted(times)[len(times) // 2]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip_old", action="store_true", help="do not time the previous path")
  args = parser.parse_args()
  model = build_model(args.seq_len)
  forward = tf.function(lambda t: model(t, training=False))
  print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), TF {tf.__version__}, load average "
        f"{os.getloadavg()[0]:.1f} (other processes slow every column)")
  print(f"model: 2 layers, width 128, 4 heads, Fixed(64, 16), seq_len {args.seq_len}, vocab 256")
  header = (f"{'path':<5} {'prompt':>6} {'new':>5} {'batch':>5} {'seconds':>8} {'new tok/s':>10} "
            f"{'prefill ms':>10} {'ms/step':>8} {'forward ms':>10} {'cpu s':>7}")
  print(header)
  print("-" * len(header))
  rng = np.random.default_rng(1)
  for prompt_len, new, batch in CASES:
    prompt = rng.integers(0, 256, (batch, prompt_len)).astype(np.int32)
    zeros = tf.zeros((batch, args.seq_len), tf.int32)
    forward(zeros)
    forward_ms = 1e3 * timed(lambda: forward(zeros).numpy(), max(args.repeats, 5))[0]

    def run(n):
      return model.generate(prompt, n, temperature=1.0, seed=0)

    run(new)                                                       # warm-up (traces once)
    seconds, cpu = timed(lambda: run(new), args.repeats)
    prefill = timed(lambda: run(1), max(args.repeats, 5))[0]
    step_ms = 1e3 * (seconds - prefill) / max(new - 1, 1)
    print(f"{'new':<5} {prompt_len:>6} {new:>5} {batch:>5} {seconds:>8.3f} "
          f"{batch * new / seconds:>10.0f} {1e3 * prefill:>10.2f} {step_ms:>8.2f} "
          f"{forward_ms:>10.2f} {cpu:>7.3f}", flush=True)
    if not args.skip_old:
      old_generate(model, prompt[:, :2], 2)                        # warm-up of its step
      start, cpu = time.perf_counter(), time.process_time()
      old_generate(model, prompt, new)
      old, cpu = time.perf_counter() - start, time.process_time() - cpu
      print(f"{'old':<5} {prompt_len:>6} {new:>5} {batch:>5} {old:>8.3f} "
            f"{batch * new / old:>10.0f} {'-':>10} {1e3 * old / (prompt_len + new - 1):>8.2f} "
            f"{forward_ms:>10.2f} {cpu:>7.3f}", flush=True)
  print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
