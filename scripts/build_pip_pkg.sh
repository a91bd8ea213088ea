#!/usr/bin/env bash
# The pip wheel of sparse_attention_tf around an op library already built:
#   bazel build //:build_pip_pkg && bazel-bin/build_pip_pkg dist/   the Bazel library
#   make wheel [DIST=dist]                                          the make library
#   bash scripts/build_pip_pkg.sh [--so LIBRARY] DEST_DIR           any library
# -> DEST_DIR/sparse_attention_tf-<version>-cp311-cp311-linux_x86_64.whl
#
# The package's files are staged in a fresh folder (never a stale build/lib),
# and setup.py packages LIBRARY ($SPARSE_ATTENTION_TF_PREBUILT_OPS) instead of
# compiling one: no compiler, no TensorFlow download. Python: $PYTHON, else
# .venv/bin/python of the workspace (or of the current folder), else python3;
# it needs setuptools>=77 (requirements.txt pins it for .venv).
set -euo pipefail

usage() { echo "usage: $0 [--so LIBRARY] DEST_DIR" >&2; exit 2; }
log() { echo "[build_pip_pkg] $*"; }

SO=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --so) [[ $# -ge 2 ]] || usage; SO="$2"; shift 2 ;;
    -h|--help) usage ;;
    -*) usage ;;
    *) break ;;
  esac
done
[[ $# -eq 1 ]] || usage
DEST="${1%/}"

# Sources: the runfiles of //:build_pip_pkg (Bazel), else the checkout holding this script.
WORKSPACE="${BUILD_WORKSPACE_DIRECTORY:-$PWD}"  # `bazel run` starts in the runfiles
if [[ -f "$0.runfiles/sparse_attention_tf/setup.py" ]]; then
  SRC="$0.runfiles/sparse_attention_tf"
elif [[ -f "${RUNFILES_DIR:-/nonexistent}/sparse_attention_tf/setup.py" ]]; then
  SRC="$RUNFILES_DIR/sparse_attention_tf"
else
  SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  WORKSPACE="$SRC"
  [[ -n "$SO" ]] || SO="$SRC/build/_sparse_attention_ops.so"  # `make ops`
fi
[[ -n "$SO" ]] || SO="$SRC/custom_ops/_sparse_attention_ops.so"
[[ "$DEST" = /* ]] || DEST="${BUILD_WORKSPACE_DIRECTORY:-$PWD}/$DEST"
if [[ ! -f "$SO" ]]; then
  echo "build_pip_pkg: op library $SO not found (--so LIBRARY, or build it first)" >&2
  exit 1
fi

if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  [[ -x "$WORKSPACE/.venv/bin/python" ]] && PYTHON="$WORKSPACE/.venv/bin/python"
fi
if ! "$PYTHON" -c 'import setuptools as s, sys; sys.exit(int(s.__version__.split(".")[0]) < 77)' \
    2>/dev/null; then
  echo "build_pip_pkg: $PYTHON needs setuptools>=77 (pip install 'setuptools>=77', or set" \
       "PYTHON=... to a Python that has it)" >&2
  exit 1
fi

STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
cp "$SRC/pyproject.toml" "$SRC/setup.py" "$SRC/README.md" "$SRC/MANIFEST.in" "$SRC/LICENSE" \
  "$STAGE/"
(cd "$SRC" && find sparse_attention_tf -name '*.py' -not -path '*/__pycache__/*') |
  while read -r f; do install -D -m 0644 "$SRC/$f" "$STAGE/$f"; done

log "packaging $SO with $PYTHON"
SPARSE_ATTENTION_TF_PREBUILT_OPS="$(realpath "$SO")" "$PYTHON" -m pip wheel --quiet --no-deps \
  --no-build-isolation --wheel-dir "$STAGE/dist" "$STAGE" >&2
mkdir -p "$DEST"
for whl in "$STAGE"/dist/*.whl; do
  mv -f "$whl" "$DEST/"
  log "wrote $DEST/$(basename "$whl")"
done
