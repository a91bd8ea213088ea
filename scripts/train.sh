#!/usr/bin/env bash
# Set up (idempotent) and run the main job: bash scripts/train.sh [train_main.py flags]
# With no flags: a small Sparse Transformer on Python's own documentation
# (pydoc_data.topics, bundled with Python: no download), a few minutes on 2 cores.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}" exec .venv/bin/python train_main.py "$@"
