"""Benchmark: sampling speed, compiled prefill + decoding loop vs the step-per-call path.

    .venv/bin/python bench/generate_bench.py
    .venv/bin/python bench/generate_bench.py --repeats 5 --paths new

The model of issue 14: SparseTransformer, 2 layers, width 128, 4 heads,
Fixed(64, 16), seq_len 1024, vocab 256, random weights. Each case (prompt
length, new tokens, batch) gives one row per path:

  new   `model.generate`: one compiled function, the prompt in one prefill
        pass, then an XLA-compiled `tf.while_loop` that decodes and samples
        in the graph (sparse_attention_tf.generation).
  step  the baseline, `model.logits_stream`: the same prefill (run eagerly),
        then one Python-driven call of a `tf.function` of `decode_step` per
        new token, sampling in eager TF between calls (`step_generate`).
  export    the portable SavedModel's `generate` signature (loaded with
        `tf.saved_model.load`, called as TF Serving calls it): reference
        attention in the prefill, the decoding loop as plain TF ops (what
        stock TF Serving runs).
  exp_xla   the same export with `generate_jit_compile=True` (TF Serving
        needs --xla_cpu_compilation_enabled=true).

`x new` is the row's seconds over the `new` row's of the same case.

Columns: the median of --repeats calls (after one warm-up call, which
traces): seconds, new tokens/s (all rows), prefill ms (a call that adds one
token: prefill + one sample), ms per decoding step ((seconds - prefill) /
(new - 1)), one full forward pass at seq_len (tf.function, batch of the
case) as the yardstick, and the process CPU seconds of the timed call (a
guide when other processes load the machine: with 2 cores, unloaded wall
time is about cpu s / 1..2).

A path is a function `(model, prompt) -> generate(num_tokens)` in `PATHS`;
add one there to get its rows.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
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


def step_generate(model, prompt, num_tokens, seed=0):
  """The step-per-call baseline: logits_stream (prefill, then one decode_step call per
  new token) with sampling in eager TF. Returns int32 `[B, P + num_tokens]`."""
  batch, prompt_len = prompt.shape
  out = np.zeros((batch, prompt_len + num_tokens), np.int32)
  out[:, :prompt_len] = prompt
  stream = model.logits_stream(out, prompt_len, num_tokens, True)
  for step, logits in enumerate(stream):                                 # (B, V)
    out[:, prompt_len + step] = tf.random.stateless_categorical(
        tf.cast(logits, tf.float32), 1, seed=(seed, step), dtype=tf.int32)[:, 0].numpy()
  return out


def new_path(model, prompt):
  return lambda num_tokens: model.generate(prompt, num_tokens, temperature=1.0, seed=0)


def step_path(model, prompt):
  return lambda num_tokens: step_generate(model, prompt, num_tokens)


_EXPORTS = {}


def _exported(model, jit_compile: bool):
  """The model's portable SavedModel (exported once per setting), loaded."""
  if jit_compile not in _EXPORTS:
    from sparse_attention_tf import export
    folder = export.export_saved_model(model, tempfile.mkdtemp(prefix="generate_bench_"),
                                       generate_jit_compile=jit_compile)
    _EXPORTS[jit_compile] = tf.saved_model.load(folder).signatures["generate"]
  return _EXPORTS[jit_compile]


def export_path(model, prompt, jit_compile=False):
  """The export's generate signature, called as TF Serving would (same seeds as new)."""
  fn = _exported(model, jit_compile)
  batch, length = prompt.shape

  def run(num_tokens):
    rows = {"max_new_tokens": np.full(batch, num_tokens, np.int32),
            "temperature": np.ones(batch, np.float32), "top_k": np.zeros(batch, np.int32),
            "top_p": np.ones(batch, np.float32), "seed": np.arange(batch, dtype=np.int32)}
    out = fn(tokens=tf.constant(prompt), lengths=tf.fill([batch], length),
             **{k: tf.constant(v) for k, v in rows.items()})
    return out["sequences"].numpy()
  return run


PATHS = {"new": new_path, "step": step_path, "export": export_path,
         "exp_xla": lambda model, prompt: export_path(model, prompt, jit_compile=True)}


def timed(fn, repeats):
  """Median wall seconds of `repeats` calls (and the process CPU seconds of that call)."""
  times = []
  for _ in range(repeats):
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    times.append((time.perf_counter() - start, time.process_time() - cpu))
  return sorted(times)[len(times) // 2]


def measure(generate, new: int, repeats: int) -> dict:
  """seconds and cpu of `generate(new)`, and prefill seconds (`generate(1)`), after a warm-up."""
  generate(new)                                                  # warm-up (traces once)
  seconds, cpu = timed(lambda: generate(new), repeats)
  prefill = timed(lambda: generate(1), max(repeats, 5))[0]
  return {"seconds": seconds, "cpu": cpu, "prefill": prefill}


HEADER = (f"{'path':<7} {'prompt':>6} {'new':>5} {'batch':>5} {'seconds':>8} {'new tok/s':>10} "
          f"{'prefill ms':>10} {'ms/step':>8} {'forward ms':>10} {'x new':>6} {'cpu s':>7}")


def format_row(path, prompt_len, new, batch, forward_ms, seconds, cpu, prefill,
               baseline=None) -> str:
  step_ms = 1e3 * (seconds - prefill) / max(new - 1, 1)
  ratio = f"{seconds / baseline:>6.2f}" if baseline else f"{'-':>6}"
  return (f"{path:<7} {prompt_len:>6} {new:>5} {batch:>5} {seconds:>8.3f} "
          f"{batch * new / seconds:>10.0f} {1e3 * prefill:>10.2f} {step_ms:>8.2f} "
          f"{forward_ms:>10.2f} {ratio} {cpu:>7.3f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--paths", default=",".join(PATHS),
                      help=f"comma-separated paths to time, of {', '.join(PATHS)}")
  args = parser.parse_args()
  paths = args.paths.split(",")
  unknown = [p for p in paths if p not in PATHS]
  if unknown:
    parser.error(f"unknown paths {unknown}: choose from {', '.join(PATHS)}")
  model = build_model(args.seq_len)
  forward = tf.function(lambda t: model(t, training=False))
  print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), TF {tf.__version__}, load average "
        f"{os.getloadavg()[0]:.1f} (other processes slow every column)")
  print(f"model: 2 layers, width 128, 4 heads, Fixed(64, 16), seq_len {args.seq_len}, vocab 256")
  print(HEADER)
  print("-" * len(HEADER))
  rng = np.random.default_rng(1)
  for prompt_len, new, batch in CASES:
    prompt = rng.integers(0, 256, (batch, prompt_len)).astype(np.int32)
    zeros = tf.zeros((batch, args.seq_len), tf.int32)
    forward(zeros)
    forward_ms = 1e3 * timed(lambda: forward(zeros).numpy(), max(args.repeats, 5))[0]
    baseline = None
    for path in paths:
      times = measure(PATHS[path](model, prompt), new, args.repeats)
      baseline = times["seconds"] if path == "new" else baseline
      print(format_row(path, prompt_len, new, batch, forward_ms, **times, baseline=baseline),
            flush=True)
  print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
