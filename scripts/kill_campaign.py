"""Kills train_main.py at random instants (SIGKILL) and checks that --resume always works,
then that the run ends with the weights of an uninterrupted run.

    .venv/bin/python scripts/kill_campaign.py --kills=20 --workdir=/tmp/kills

One run with a checkpoint after every step (--save_every_steps=1): it is
started with --resume, killed, and started again, --kills times; then it
runs to the end. Every other kill is aimed: as soon as backup/ shows a write
in progress (TensorFlow's `ckpt-N_temp/` or temporary files, newer than the
process); the others come after a random delay (few of those land in a
write, which takes a few ms of a step). Every restart must find a loadable
checkpoint (a line "cannot be loaded" counts as a fallback). It prints a
Markdown table: kills, kills that left a write in progress, resumes that
worked, fallbacks, and the largest weight difference from an uninterrupted
run of the same flags, for each --dropout given.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FLAGS = ["--dataset=pydoc", "--num_layers=2", "--d_model=192", "--num_heads=2",
         "--batch_size=4", "--seq_len=64", "--block_size=16", "--stride=16", "--summary=4",
         "--validation_steps=1", "--verbose=0", "--sample_tokens=8", "--steps_per_epoch=10",
         "--seed=0", "--learning_rate=3e-3", "--warmup_steps=2", "--save_every_steps=1"]


def cpu_model():
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  return "unknown CPU"


def start(args, out_dir, log):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
  env.pop("TF_CONFIG", None)
  with open(log + ".stdout", "w") as o, open(log + ".stderr", "w") as e:
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train_main.py")] + args +
                            [f"--output_dir={out_dir}"], env=env, stdout=o, stderr=e)


def weights(out_dir):
  import keras
  import sparse_attention_tf  # noqa: F401
  return keras.saving.load_model(os.path.join(out_dir, "model.keras")).get_weights()


def writing(backup, since=0.0):
  """Whether backup/ shows a write in progress (temporary names) begun after `since`."""
  found = False
  for n in (os.listdir(backup) if os.path.isdir(backup) else []):
    if n.endswith("_temp") or ".tempstate" in n or n.endswith(".tmp"):
      try:
        found |= os.stat(os.path.join(backup, n)).st_mtime >= since
      except FileNotFoundError:   # renamed or removed meanwhile
        pass
  return found


def campaign(dropout, kills, steps, workdir, rng):
  flags = FLAGS + [f"--dropout={dropout}", f"--steps={steps}"]
  ref, out = os.path.join(workdir, f"ref_{dropout}"), os.path.join(workdir, f"run_{dropout}")
  for d in (ref, out):
    shutil.rmtree(d, ignore_errors=True)
  logs = os.path.join(workdir, f"logs_{dropout}")
  os.makedirs(logs, exist_ok=True)
  if start(flags, ref, os.path.join(logs, "ref")).wait() != 0:
    raise SystemExit(f"the uninterrupted run failed: see {logs}/ref.stderr")
  backup = os.path.join(out, "backup")
  in_write = fallbacks = resumed = 0
  for k in range(kills):
    log = os.path.join(logs, f"kill{k}")
    proc = start(flags + ["--resume"], out, log)
    # The process needs ~5-10 s to import TensorFlow and build; then steps and saves.
    delay = rng.uniform(6.0, 16.0)
    aimed = k % 2 == 1
    begin, started = time.monotonic(), time.time()
    deadline = begin + (20.0 if aimed else delay)
    while time.monotonic() < deadline and proc.poll() is None:
      if aimed and writing(backup, started):
        break
      time.sleep(0.0005 if aimed else 0.01)
    delay = time.monotonic() - begin
    if proc.poll() is not None:
      print(f"kill {k}: the run ended before the kill ({proc.returncode})", flush=True)
      break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    in_write_now = writing(backup, started)
    in_write += in_write_now
    with open(log + ".stdout") as f:
      text = f.read()
    fallbacks += "cannot be loaded" in text
    resumed += k > 0 and "--resume: no checkpoint" not in text
    print(f"kill {k} ({'aimed' if aimed else 'random'}) after {delay:.1f} s: "
          f"{'in a write' if in_write_now else 'between writes'}", flush=True)
  final = os.path.join(logs, "final")
  code = start(flags + ["--resume"], out, final).wait()
  if code != 0:
    raise SystemExit(f"the final resume failed ({code}): see {final}.stderr")
  with open(final + ".stdout") as f:
    fallbacks += "cannot be loaded" in f.read()
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(weights(out), weights(ref)))
  return {"dropout": dropout, "kills": kills, "in_write": in_write, "resumed": resumed + 1,
          "fallbacks": fallbacks, "diff": diff}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1])
  parser.add_argument("--workdir", default="/tmp/kill_campaign")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  rng = random.Random(args.seed)
  os.makedirs(args.workdir, exist_ok=True)
  rows = [campaign(d, args.kills, args.steps, args.workdir, rng) for d in args.dropout]
  print(f"\nSIGKILL campaign, default strategy, {cpu_model()}, checkpoint every step\n")
  print("| dropout | kills (half aimed at writes) | kills inside a write | restarts that found "
        "a checkpoint (the rest: killed before the first) | fallbacks to the previous "
        "checkpoint | max abs weight diff vs uninterrupted |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['dropout']} | {r['kills']} | {r['in_write']} | {r['resumed']} | "
          f"{r['fallbacks']} | {r['diff']:.3g} |")


if __name__ == "__main__":
  main()
