"""Runs train_main.py's multi_worker workers on this machine and restarts them all after a
preemption or a lost worker, the way a cluster manager would.

    .venv/bin/python scripts/supervise_workers.py --workers=2 --max_restarts=3 -- \\
        --strategy=multi_worker --output_dir=runs/mw --steps=1200

Everything after `--` goes to every worker (add --strategy=multi_worker).
Worker i gets TF_CONFIG for a cluster of `--workers` tasks on 127.0.0.1
(fresh ports each generation) and its logs go to
`<log_dir>/gen<G>_worker<i>.stdout|.stderr`.

A generation ends when all its workers have exited:
* all exited 0: done, exit 0;
* one exited with train_main.py's restart status (42: SIGTERM or a lost
  peer) or was killed by a signal (e.g. SIGKILL, an out-of-memory kill):
  once the others have exited too (they stop within the coordination
  service's heartbeat timeout, with status 42; after --grace_seconds they are
  killed), all workers restart with --resume, up to --max_restarts times;
* one exited with another status (2: a bad flag; 1: a crash): the others are
  stopped and this script exits with that status.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

RESTART_EXIT_CODE = 42   # sparse_attention_tf.checkpointing.RESTART_EXIT_CODE
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_ports(count):
  socks = []
  try:
    for _ in range(count):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.bind(("127.0.0.1", 0))
      socks.append(s)
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


def start_generation(gen, args, flags):
  """Starts every worker of generation `gen`; returns their Popen objects."""
  hosts = [f"127.0.0.1:{p}" for p in free_ports(args.workers)]
  procs = []
  for i in range(args.workers):
    env = dict(os.environ)
    env["TF_CONFIG"] = json.dumps({"cluster": {"worker": hosts},
                                   "task": {"type": "worker", "index": i}})
    base = os.path.join(args.log_dir, f"gen{gen}_worker{i}")
    with open(base + ".stdout", "w") as out, open(base + ".stderr", "w") as err:
      procs.append(subprocess.Popen([args.python, args.script] + flags, env=env, stdout=out,
                                    stderr=err))
  print(f"generation {gen}: " + ", ".join(f"worker {i} pid {p.pid}" for i, p in
                                         enumerate(procs)), flush=True)
  return procs


def describe(code):
  return f"killed by signal {-code}" if code < 0 else f"exit {code}"


def wait_generation(procs, grace_seconds):
  """Waits until every worker has exited (killing the rest `grace_seconds` after the first
  failure, or at once after a failure that is not a restart); returns the exit codes."""
  codes = [None] * len(procs)
  first_failure = None
  while None in codes:
    for i, p in enumerate(procs):
      if codes[i] is None and p.poll() is not None:
        codes[i] = p.returncode
        print(f"worker {i} {describe(codes[i])}", flush=True)
        if codes[i] != 0 and first_failure is None:
          first_failure = time.monotonic()
          if codes[i] > 0 and codes[i] != RESTART_EXIT_CODE:
            grace_seconds = 0     # a real error: stop the others now
    if first_failure is not None and time.monotonic() - first_failure > grace_seconds:
      for i, p in enumerate(procs):
        if codes[i] is None:
          print(f"worker {i} still running {grace_seconds:.0f} s after a failure: killing it",
                flush=True)
          p.kill()
    time.sleep(0.1)
  return codes


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if "--" in argv:
    cut = argv.index("--")
    own, flags = argv[:cut], argv[cut + 1:]
  else:
    own, flags = argv, []
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--max_restarts", type=int, default=3)
  parser.add_argument("--grace_seconds", type=float, default=120.0,
                      help="how long the other workers may take to exit after a failure")
  parser.add_argument("--log_dir", default="runs/supervisor_logs")
  parser.add_argument("--python", default=sys.executable)
  parser.add_argument("--script", default=os.path.join(ROOT, "train_main.py"))
  args = parser.parse_args(own)
  if args.workers < 1 or args.max_restarts < 0:
    parser.error("--workers must be >= 1 and --max_restarts >= 0")
  os.makedirs(args.log_dir, exist_ok=True)
  procs = []

  def stop(signum, frame):   # pass a SIGTERM on to the workers, then go
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)
    for p in procs:
      p.wait()
    sys.exit(RESTART_EXIT_CODE)

  signal.signal(signal.SIGTERM, stop)
  for gen in range(args.max_restarts + 1):
    worker_flags = flags + (["--resume"] if gen and "--resume" not in flags else [])
    procs[:] = start_generation(gen, args, worker_flags)
    codes = wait_generation(procs, args.grace_seconds)
    if all(c == 0 for c in codes):
      print(f"done after {gen} restart{'s' if gen != 1 else ''}", flush=True)
      return 0
    errors = [c for c in codes if c > 0 and c != RESTART_EXIT_CODE]
    if errors:
      print(f"a worker failed ({describe(errors[0])}): not restarting; logs in "
            f"{args.log_dir}", file=sys.stderr, flush=True)
      return errors[0]
    print(f"restarting every worker with --resume ({', '.join(map(describe, codes))})",
          flush=True)
  print(f"supervise_workers.py: error: still failing after {args.max_restarts} restarts; logs "
        f"in {args.log_dir}", file=sys.stderr, flush=True)
  return 1


if __name__ == "__main__":
  sys.exit(main())
