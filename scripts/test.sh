#!/usr/bin/env bash
# Set up (idempotent) and run the test suite: bash scripts/test.sh [pytest args]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

rc=0
TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}" \
  .venv/bin/python -m pytest tests/ "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
  echo "[test] pytest collected no tests: failing on purpose" >&2
fi
exit "$rc"
