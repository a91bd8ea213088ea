"""Benchmark: does sparse attention lose quality against dense, and does long context help?

    .venv/bin/python bench/quality_bench.py --estimate          # time each configuration, print
                                                                # the full run's cost, train nothing
    .venv/bin/python bench/quality_bench.py --out runs/quality  # the full benchmark (< 2 h, 2 cores)
    .venv/bin/python bench/quality_bench.py --smoke --out /tmp/quality   # tiny, end to end, < 1 min

The paper's two questions at laptop scale, on data every machine has:

1. Attention (its Table 2): the same SparseTransformer (--num_layers 4, --d_model
   256, --num_heads 8, no dropout) trained with `dense`, `fixed` (Fixed(128, 32))
   and `strided` attention for the same --steps and the same --tokens_per_step:
   * on `pystdlib` (the running Python's standard library source as bytes, split
     by file, see `sparse_attention_tf.data`) at seq_len 2048 and 4096, with
     Strided(128) and the strided position embedding;
   * on images: scikit-learn's bundled 8x8 digits upsampled (bilinear) to 32x32
     = 1024 pixels and requantized to their 17 grey levels, with Strided(32) (a
     row: the paper's image pattern) and the image position embedding. Why
     these: they need no download (CIFAR-10 would); they are real handwriting,
     not a pattern we chose to suit one attention; and at 32 pixels a row, the
     pixel above is 32 tokens back and a digit's strokes span the whole
     1024-token sequence, so the model must reach far back in raster order,
     which is what the sparse patterns thin out. (Upsampling makes neighbouring
     pixels easy to predict, so the bits/dim are far below CIFAR-10's; compare
     the attentions with each other, not with the paper's numbers.)
2. Context length: `fixed` at seq_len 256, 1024, 4096 (--context_seq_lens; 16384
   needs --tokens_per_step >= 16384) with equal tokens per step (batch size =
   tokens_per_step / seq_len), so every model sees the same bytes of training.

Every text configuration is evaluated on the same held-out bytes: the first
--eval_tokens + 1 bytes of pystdlib's validation part, cut into windows of
seq_len with stride seq_len (x = s[k L : (k+1) L], y = s[k L + 1 : (k+1) L + 1]),
so every model predicts exactly bytes 1 .. eval_tokens, each with its full
window of context before it (eval_tokens is a multiple of every seq_len);
images on the first eval_tokens / 1024 validation digits. That is also the
validation `training.fit` runs every --eval_every steps: the learning curves
and the final number measure the same thing.

Each configuration trains in a fresh process (`training.fit`, AdamW with
warm-up and cosine decay, `training.compile_model`), whose peak resident
memory the parent reads from /proc (as bench/train_bench.py does). Reported per
configuration: final validation bits per byte (text) or per dim (images),
seconds per step (the median of --timing_steps extra steps after training and
one untimed one: the steady state, without tracing and validation), peak RSS. The learning curves'
wall-clock axis is the step count times that median (the time a run spends
training, validations and tracing left out). A configuration identical to
another (the context study's 4096 is the attention study's fixed 4096) runs
once. (--smoke runs them all in one process: its peak RSS is shared.)

Outputs in --out: results.json (every configuration; `estimate` mode: the
measured step and validation times and the estimate), curves_pystdlib_2048.png,
curves_pystdlib_4096.png, curves_digits32.png (digits<size>: validation bits against steps
and against seconds, one line per attention), context.png (bits per byte
against context length).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.train_bench import rss_gb  # noqa: E402  (the resident memory of a child)

DIGITS_SIZE = 32              # upsampled digits: 32 x 32 = 1024 pixels a sequence
DIGITS_LEVELS = 17            # sklearn's digits: grey levels 0..16 (BOS = 17)
SMOKE = dict(num_layers=1, d_model=32, num_heads=2, steps=3, eval_every=2, tokens_per_step=256,
             text_seq_lens=[64], context_seq_lens=[32, 64], eval_tokens=512, stride=32,
             summary=8, block_size=16, digits_size=16, timing_steps=0)


def configurations(args) -> list:
  """Every configuration to run, each a dict naming its study (or studies), once."""
  configs = {}

  def add(study, dataset, attention, seq_len):
    if args.tokens_per_step % seq_len:
      raise SystemExit(f"--tokens_per_step ({args.tokens_per_step}) must be a multiple of "
                       f"seq_len {seq_len} (equal tokens per step)")
    key = (dataset, attention, seq_len)
    config = configs.setdefault(key, dict(
        name=f"{dataset}_{seq_len}_{attention}", dataset=dataset, attention=attention,
        seq_len=seq_len, batch_size=args.tokens_per_step // seq_len, studies=[]))
    config["studies"].append(study)

  for seq_len in args.text_seq_lens:
    for attention in args.attentions:
      add("attention", "pystdlib", attention, seq_len)
  for attention in args.attentions:
    add("attention", f"digits{args.digits_size}", attention, args.digits_size**2)
  for seq_len in args.context_seq_lens:
    add("context", "pystdlib", "fixed", seq_len)
  return list(configs.values())


# ---------------------------------------------------------------------------
# The child: one configuration, trained and measured


def digits_images(size: int):
  """sklearn's digits upsampled (bilinear) to size x size, 17 grey levels, split as
  `data.load("digits")` splits them: `(train, validation)` int32 `[N, size, size, 1]`."""
  import numpy as np
  import tensorflow as tf
  from sklearn.datasets import load_digits
  from sparse_attention_tf import data as data_lib
  images = load_digits().images[..., None].astype(np.float32)                 # (1797, 8, 8, 1)
  up = tf.image.resize(images, (size, size), method="bilinear").numpy()      # (N, S, S, 1)
  pixels = np.clip(np.round(up), 0, DIGITS_LEVELS - 1).astype(np.int32)
  order = np.random.default_rng(data_lib.DIGITS_SPLIT_SEED).permutation(len(pixels))
  num_train = int(len(pixels) * data_lib.DIGITS_TRAIN_FRACTION)
  return pixels[order[:num_train]], pixels[order[num_train:]]


@functools.lru_cache(maxsize=1)
def pystdlib_parts():
  """`data.pystdlib_bytes()`, read once per process."""
  from sparse_attention_tf import data as data_lib
  return data_lib.pystdlib_bytes()


def make_data(cfg):
  """(endless shuffled train batches, validation batches, validation steps, vocab size,
  unit, image shape) of a configuration."""
  import numpy as np
  import tensorflow as tf
  from sparse_attention_tf import data as data_lib
  seq_len, batch = cfg["seq_len"], cfg["batch_size"]
  if cfg["dataset"] == "pystdlib":
    parts = pystdlib_parts()
    train = data_lib.files_data("pystdlib", parts, seq_len, "pystdlib").train
    stream = parts[1][:cfg["eval_tokens"] + 1].astype(np.int32)
    starts = np.arange(0, cfg["eval_tokens"], seq_len)                          # (W,)
    x = np.stack([stream[s:s + seq_len] for s in starts])                        # (W, L)
    y = np.stack([stream[s + 1:s + 1 + seq_len] for s in starts])                # (W, L)
    validation = tf.data.Dataset.from_tensor_slices((x, y))
    vocab, unit, image_shape = 256, data_lib.UNITS["text"], None
  else:
    bos = DIGITS_LEVELS
    train_images, val_images = digits_images(cfg["digits_size"])
    val_images = val_images[:cfg["eval_tokens"] // seq_len]
    pairs = lambda images: tf.data.Dataset.from_tensor_slices(images).map(
        lambda p: data_lib.image_pairs(p, bos))
    train, validation = pairs(train_images), pairs(val_images)
    vocab, unit, image_shape = DIGITS_LEVELS + 1, data_lib.UNITS["image"], train_images.shape[1:]
  steps = max(1, (cfg["eval_tokens"] // seq_len) // batch)
  train_ds = data_lib.make_batches(train.repeat(), batch, shuffle=True, seed=cfg["seed"],
                                   drop_remainder=True)
  val_ds = data_lib.make_batches(validation, batch, shuffle=False, seed=None,
                                 drop_remainder=True)
  return train_ds, val_ds, steps, vocab, unit, image_shape


def make_pattern(cfg):
  import sparse_attention_tf as sat
  image = cfg["dataset"] != "pystdlib"
  if cfg["attention"] == "fixed":
    return sat.Fixed(cfg["stride"], cfg["summary"])
  if cfg["attention"] == "strided":
    return sat.Strided(cfg["digits_size"] if image else cfg["stride"])
  return sat.Dense()


def train_one(cfg) -> dict:
  """Trains one configuration with `training.fit`; its curves, final bits and timings."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import keras
  import numpy as np
  import sparse_attention_tf as sat
  from sparse_attention_tf import training
  keras.utils.set_random_seed(cfg["seed"])
  train_ds, val_ds, val_steps, vocab, unit, image_shape = make_data(cfg)
  seq_len, steps = cfg["seq_len"], cfg["steps"]
  model = sat.SparseTransformer(
      vocab_size=vocab, seq_len=seq_len, num_layers=cfg["num_layers"], d_model=cfg["d_model"],
      num_heads=cfg["num_heads"], pattern=make_pattern(cfg),
      embedding="image" if image_shape is not None else "strided",
      image_shape=image_shape, embedding_stride=cfg["stride"], dropout=0.0,
      block_size=cfg["block_size"])
  config = training.TrainConfig(
      steps=steps, batch_size=cfg["batch_size"], learning_rate=cfg["learning_rate"],
      warmup_steps=min(cfg["warmup_steps"], steps // 10), steps_per_epoch=cfg["eval_every"],
      validation_steps=val_steps, verbose=0, unit=unit)
  training.compile_model(model, config)
  model(np.zeros((1, seq_len), np.int32))
  run = training.fit(model, train_ds, val_ds, config, print_fn=lambda line: None)
  start = time.perf_counter()
  model.evaluate(val_ds, steps=val_steps, verbose=0)
  eval_seconds = time.perf_counter() - start
  batches = iter(train_ds)
  if cfg["timing_steps"]:
    model.train_on_batch(*next(batches))   # traces train_on_batch's function, untimed
  times = []
  for _ in range(cfg["timing_steps"]):
    x, y = next(batches)
    start = time.perf_counter()
    model.train_on_batch(x, y)
    times.append(time.perf_counter() - start)
  # --timing_steps 0 (--smoke): fit's time over its steps, tracing and validations included
  step_seconds = statistics.median(times) if times else run["train_seconds"] / steps
  curve = [float(v) for v in run["history"][f"val_{unit}"]]
  curve_steps = [min((k + 1) * cfg["eval_every"], steps) for k in range(len(curve))]
  return dict(cfg, unit=unit, bits=float(run["validation"][unit]), steps_done=run["steps_done"],
              step_seconds=step_seconds, eval_seconds=eval_seconds,
              fit_seconds=run["train_seconds"], curve_steps=curve_steps, curve_bits=curve,
              curve_seconds=[s * step_seconds for s in curve_steps])


def run_child(cfgs: list, memory_gb: float) -> list:
  """`train_one` of each of `cfgs`, one after the other in one fresh process; adds the
  process's peak RSS (GB) to each, or an `error` to each."""
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfgs)],
                          env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  peak = 0.0
  while proc.poll() is None:
    peak = max(peak, rss_gb(proc.pid))
    if peak > memory_gb:
      proc.kill()
      proc.wait()
      return [dict(cfg, peak_rss_gb=peak, error=f"over {memory_gb:.0f} GB") for cfg in cfgs]
    time.sleep(0.1)
  out, err = proc.communicate()
  if proc.returncode != 0:
    why = (err.strip().splitlines() or ["killed"])[-1][:200]
    return [dict(cfg, peak_rss_gb=peak, error=why) for cfg in cfgs]
  return [dict(r, peak_rss_gb=peak) for r in json.loads(out.strip().splitlines()[-1])]


# ---------------------------------------------------------------------------
# Reports: the tables, the plots, the estimate


def unit_label(unit: str) -> str:
  return unit.replace("bits_per_", "bits/")


def write_plots(results: list, out: str) -> list:
  """The learning-curve PNGs (one per data set and seq_len of the attention study) and the
  context-length PNG; returns their paths."""
  from sparse_attention_tf import plotting
  paths = []
  groups = {}
  for r in results:
    if "attention" in r["studies"] and "error" not in r:
      groups.setdefault((r["dataset"], r["seq_len"]), []).append(r)
  for (dataset, seq_len), rs in sorted(groups.items()):
    tag = f"{dataset}_{seq_len}" if dataset == "pystdlib" else dataset
    path = os.path.join(out, f"curves_{tag}.png")
    plotting.plot_curves(
        [("training step", {r["attention"]: (r["curve_steps"], r["curve_bits"]) for r in rs}),
         ("training seconds (steps x median s/step)",
          {r["attention"]: (r["curve_seconds"], r["curve_bits"]) for r in rs})],
        f"validation {unit_label(rs[0]['unit'])}",
        f"{dataset}, seq_len {seq_len}, {rs[0]['steps']} steps of {rs[0]['batch_size']} x "
        f"{seq_len} tokens", path)
    paths.append(path)
  context = sorted((r for r in results if "context" in r["studies"] and "error" not in r),
                   key=lambda r: r["seq_len"])
  if context:
    path = os.path.join(out, "context.png")
    plotting.plot_curves(
        [("context length (seq_len)", {"fixed": ([r["seq_len"] for r in context],
                                                 [r["bits"] for r in context])})],
        "validation bits/byte (same held-out bytes)",
        f"pystdlib, fixed attention, {context[0]['steps']} steps of "
        f"{context[0]['batch_size'] * context[0]['seq_len']} tokens", path, log2_x=True)
    paths.append(path)
  return paths


def print_tables(results: list) -> None:
  print("\n| data | seq_len | attention | validation bits | vs dense | s/step | speedup vs dense "
        "| peak RSS (GB) |")
  print("|---|---|---|---|---|---|---|---|")
  dense = {(r["dataset"], r["seq_len"]): r for r in results
           if r["attention"] == "dense" and "error" not in r}
  for r in results:
    if "attention" not in r["studies"]:
      continue
    if "error" in r:
      print(f"| {r['dataset']} | {r['seq_len']} | {r['attention']} | - | - | - | - | "
            f"{r['peak_rss_gb']:.1f} ({r['error']}) |")
      continue
    d = dense.get((r["dataset"], r["seq_len"]))
    vs = f"{100 * (r['bits'] / d['bits'] - 1):+.1f}%" if d else "-"
    speed = f"{d['step_seconds'] / r['step_seconds']:.2f}x" if d else "-"
    print(f"| {r['dataset']} | {r['seq_len']} | {r['attention']} | {r['bits']:.4f} "
          f"{unit_label(r['unit'])} | {vs} | {r['step_seconds']:.2f} | {speed} | "
          f"{r['peak_rss_gb']:.1f} |")
  print("\n| context (seq_len) | batch | validation bits/byte | s/step |\n|---|---|---|---|")
  for r in sorted((r for r in results if "context" in r["studies"]), key=lambda r: r["seq_len"]):
    bits = f"{r['bits']:.4f}" if "error" not in r else r["error"]
    step = f"{r['step_seconds']:.2f}" if "error" not in r else "-"
    print(f"| {r['seq_len']} | {r['batch_size']} | {bits} | {step} |")


def estimate(configs: list, args) -> list:
  """Times each configuration briefly (a fresh process: 2 training steps with a validation
  after each, then a timed validation, an untimed step and 2 timed steps); estimates the full run: steps x s/step + validations x their time + the
  process's start-up and tracing (the measured run's time beyond those)."""
  rows, total = [], 0.0
  for cfg in configs:
    short = dict(cfg, steps=2, eval_every=1, timing_steps=2)
    start = time.perf_counter()
    r, = run_child([short], args.memory_gb)
    wall = time.perf_counter() - start
    if "error" in r:
      print(f"{cfg['name']}: {r['error']}", flush=True)
      rows.append(r)
      continue
    overhead = max(0.0, wall - 5 * r["step_seconds"] - 4 * r["eval_seconds"])
    evals = math.ceil(cfg["steps"] / cfg["eval_every"]) + 2     # fit's + final + our timing
    seconds = (cfg["steps"] + cfg["timing_steps"] + 1) * r["step_seconds"] + \
        evals * r["eval_seconds"] + overhead
    total += seconds
    rows.append(dict(r, estimated_seconds=seconds, start_up_seconds=overhead))
    print(f"{cfg['name']}: {r['step_seconds']:.2f} s/step, validation {r['eval_seconds']:.1f} s, "
          f"start-up and tracing {overhead:.0f} s, peak {r['peak_rss_gb']:.1f} GB -> "
          f"{seconds / 60:.1f} min for {cfg['steps']} steps", flush=True)
  print(f"\nestimated full benchmark: {total / 60:.0f} min ({total / 3600:.2f} h) for "
        f"{len(configs)} configurations", flush=True)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="runs/quality", help="results.json and the PNGs")
  parser.add_argument("--steps", type=int, default=200, help="training steps per configuration")
  parser.add_argument("--tokens_per_step", type=int, default=4096,
                      help="tokens per training step (batch size = this / seq_len)")
  parser.add_argument("--eval_every", type=int, default=40, help="steps between validations")
  parser.add_argument("--eval_tokens", type=int, default=32768,
                      help="held-out tokens per validation (a multiple of every seq_len)")
  parser.add_argument("--text_seq_lens", type=int, nargs="+", default=[2048, 4096])
  parser.add_argument("--context_seq_lens", type=int, nargs="+", default=[256, 1024, 4096])
  parser.add_argument("--attentions", nargs="+", default=["dense", "fixed", "strided"],
                      choices=["dense", "fixed", "strided"])
  parser.add_argument("--num_layers", type=int, default=4)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--num_heads", type=int, default=8)
  parser.add_argument("--stride", type=int, default=128, help="fixed: l; strided (text): l")
  parser.add_argument("--summary", type=int, default=32, help="fixed: c")
  parser.add_argument("--block_size", type=int, default=32)
  parser.add_argument("--digits_size", type=int, default=DIGITS_SIZE,
                      help="digits upsampled to this many pixels a side")
  parser.add_argument("--learning_rate", type=float, default=1e-3)
  parser.add_argument("--warmup_steps", type=int, default=20)
  parser.add_argument("--timing_steps", type=int, default=3,
                      help="extra steps after training whose median is the s/step (0: fit's "
                           "seconds / steps, tracing and validations included)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--memory_gb", type=float, default=20.0,
                      help="stop a configuration whose process exceeds this resident memory")
  parser.add_argument("--smoke", action="store_true",
                      help=f"tiny settings end to end: {SMOKE}")
  parser.add_argument("--estimate", action="store_true",
                      help="time 2 steps of each configuration and print the full run's cost")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps([train_one(cfg) for cfg in json.loads(args.child)]))
    return
  if args.smoke:
    for name, value in SMOKE.items():
      setattr(args, name, value)
  shared = {name: getattr(args, name) for name in (
      "steps", "eval_every", "eval_tokens", "num_layers", "d_model", "num_heads", "stride",
      "summary", "block_size", "digits_size", "learning_rate", "warmup_steps", "timing_steps",
      "seed")}
  configs = [dict(shared, **c) for c in configurations(args)]
  for c in configs:
    if args.eval_tokens % c["seq_len"]:
      raise SystemExit(f"--eval_tokens ({args.eval_tokens}) must be a multiple of seq_len "
                       f"{c['seq_len']} (every model predicts the same held-out bytes)")
  os.makedirs(args.out, exist_ok=True)
  from bench import machine
  try:
    print(machine.machine_line(), flush=True)
  except Exception as e:   # noqa: BLE001  (an op library older than the engines report)
    model, flags = machine.cpu_model_and_flags()
    print(f"Machine: {model}, {os.cpu_count()} cores, flags: {' '.join(flags)} (engines "
          f"unknown: {type(e).__name__})", flush=True)
  print(f"SparseTransformer {args.num_layers} layers x {args.d_model}, {args.num_heads} heads; "
        f"{args.steps} steps of {args.tokens_per_step} tokens; {len(configs)} configurations",
        flush=True)
  if args.estimate:
    rows = estimate(configs, args)
    with open(os.path.join(args.out, "estimate.json"), "w") as f:
      json.dump(rows, f, indent=1)
    return
  results = []
  # One fresh process per configuration (its own peak RSS); --smoke: one for all (fast).
  for group in [configs] if args.smoke else [[cfg] for cfg in configs]:
    start = time.perf_counter()
    rs = run_child(group, args.memory_gb)
    for r in rs:
      r["wall_seconds"] = (time.perf_counter() - start) / len(rs)
      print(f"{r['name']}: " + (r["error"] if "error" in r else
                                f"{r['bits']:.4f} {unit_label(r['unit'])}, "
                                f"{r['step_seconds']:.2f} s/step, peak {r['peak_rss_gb']:.1f} GB, "
                                f"{r['wall_seconds']:.0f} s"), flush=True)
    results.extend(rs)
  print_tables(results)
  plots = write_plots(results, args.out)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"settings": vars(args), "results": results, "plots": plots}, f, indent=1)
  print(f"\nresults: {os.path.join(args.out, 'results.json')}; plots: {', '.join(plots)}")


if __name__ == "__main__":
  main()
