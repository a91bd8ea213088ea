#!/usr/bin/env bash
# Idempotent set-up (Debian 12, run as root or with sudo):
#   system packages (Bazel 4.2.3 from Debian, make) -> .venv from requirements.txt
#   -> scripts/configure.sh -> bazel build -> sparse_attention_tf/_sparse_attention_ops.so
#   -> make ops (plain g++ build in build/).
# A second run only checks stamps and lets Bazel/make confirm nothing changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { echo "[setup] $*"; }
sha() { sha256sum "$@" | cut -d' ' -f1; }

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

# --- (a) system packages -------------------------------------------------------
APT_PKGS=()
if ! command -v bazel >/dev/null 2>&1 || [[ ! -d /usr/share/bazel/rules/java ]] \
    || [[ ! -d /usr/share/bazel/tools/platforms ]]; then
  APT_PKGS+=(bazel-bootstrap bazel-rules-java bazel-platforms)
fi
command -v make >/dev/null 2>&1 || APT_PKGS+=(make)
command -v g++ >/dev/null 2>&1 || APT_PKGS+=(g++)
if [[ ${#APT_PKGS[@]} -gt 0 ]]; then
  log "apt-get install ${APT_PKGS[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${APT_PKGS[@]}" >/dev/null
else
  log "system packages: ok"
fi

# --- (b) Python virtualenv -----------------------------------------------------
PY="$ROOT/.venv/bin/python"
STAMP="$ROOT/.venv/.requirements.sha256"
if [[ ! -x "$PY" ]]; then
  log "creating .venv with ${PYTHON3:-python3}"
  "${PYTHON3:-python3}" -m venv "$ROOT/.venv"
fi
REQ_HASH="$(sha requirements.txt)"
if [[ "$(cat "$STAMP" 2>/dev/null || true)" != "$REQ_HASH" ]]; then
  log "pip install -r requirements.txt (requirements changed or first run)"
  "$PY" -m pip install -q -r requirements.txt
  echo "$REQ_HASH" > "$STAMP"
else
  log "python deps: ok (requirements.txt unchanged)"
fi

# --- (c) configure (TF paths/flags for Bazel) ----------------------------------
# Plus the TF version the op library records (custom_ops/cc/build_info.cc).
CONF="$ROOT/.tf_configure.bazelrc"
CONF_KEY="$(printf '%s\n' "$ROOT" "$REQ_HASH" "$(sha scripts/configure.sh)" tf_version \
  | sha256sum | cut -d' ' -f1)"
if ! grep -qxF "# key: $CONF_KEY" "$CONF" 2>/dev/null; then
  log "configure"
  PYTHON="$PY" bash scripts/configure.sh
  TF_VERSION="$(TF_CPP_MIN_LOG_LEVEL=3 "$PY" -c 'import tensorflow as tf; print(tf.__version__)' \
    2>/dev/null)"
  echo "build --define=tf_version=$TF_VERSION" >> "$CONF"
  echo "# key: $CONF_KEY" >> "$CONF"
else
  log "configure: ok"
fi

# --- (d) Bazel build -------------------------------------------------------------
log "bazel build //custom_ops:_sparse_attention_ops.so"
bazel build --noshow_progress --show_result=0 --ui_event_filters=-info \
  //custom_ops:_sparse_attention_ops.so
SO_SRC="$ROOT/bazel-bin/custom_ops/_sparse_attention_ops.so"
SO_DST="$ROOT/sparse_attention_tf/_sparse_attention_ops.so"
mkdir -p "$(dirname "$SO_DST")"
if ! cmp -s "$SO_SRC" "$SO_DST"; then
  install -m 0755 "$SO_SRC" "$SO_DST"
  log "installed ${SO_DST#"$ROOT"/}"
fi

# --- (e) plain g++ build ---------------------------------------------------------
log "make ops"
make --no-print-directory -s -j"$(nproc)" PYTHON="$PY" ops
log "done"
