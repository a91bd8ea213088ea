"""Fuzzing campaign of the raw ops: a clean error or a result equal to the reference.

Runs the fuzz worker of tests/test_fuzz_ops.py (tests/fuzz_ops_worker.py) for
--seconds of wall time, starting a new worker after each crash or hang, and
prints the Markdown table of the issue-13 report (cases tried / accepted and
equal to the reference / clean errors / crashes / silent wrong / hangs) with
the CPU model, then the last input of each crash and hang and the first wrong
results.

  python scripts/fuzz_ops.py --seconds 600               # a 10-minute campaign
  python scripts/fuzz_ops.py --seconds 60 --seed 7 --out /tmp/fuzz
  python -m tests.fuzz_ops_worker --replay case.json     # one input again
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from tests import fuzz_ops_worker as fuzz  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=600, help="wall time of the campaign")
  parser.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
  parser.add_argument("--case-timeout", type=float, default=20,
                      help="seconds one case may run before it counts as a hang")
  parser.add_argument("--out", default=None, help="folder for the workers' state and logs")
  args = parser.parse_args(argv)
  seed = secrets.randbits(31) if args.seed is None else args.seed
  out = args.out or tempfile.mkdtemp(prefix="fuzz_ops_")
  print(f"fuzzing for {args.seconds:.0f} s, seed {seed}, state in {out}", flush=True)
  summary = fuzz.supervise(args.seconds, seed, out, restart=True, case_timeout=args.case_timeout,
                           log=lambda line: print(line, flush=True))
  print()
  print(fuzz.markdown(summary))
  details = fuzz.describe(summary, limit=5, save_dir=out)
  if details:
    print("\n" + details)
  c = summary["counts"]
  bad = len(summary["crashes"]) + len(summary["hangs"]) + sum(
      c.get(k, 0) for k in ("wrong", "unclean", "harness"))
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
