#!/usr/bin/env bash
# Builds and runs the standalone GPU harness (no TensorFlow needed):
#   correctness of every CUDA kernel vs a float64 reference (PASS/FAIL lines),
#   then fused forward+backward timing vs dense causal attention (PyTorch /
#   cuBLAS) and a dense GEMM ceiling, as a markdown table in $OUT_DIR/bench.md.
#
#   bash custom_ops/gpu_harness/run.sh               # build, check, time
#   bash custom_ops/gpu_harness/run.sh --build-only  # compile only (no GPU needed)
#   bash custom_ops/gpu_harness/run.sh --check-only  # correctness only
#   Extra arguments go to the harness (e.g. --seqs 4096,16384 --dtype fp16).
# Environment: NVCC (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc),
# CUDA_ARCHS (default "80 90"), BUILD_DIR (default build/gpu_harness),
# OUT_DIR (default $BUILD_DIR/out), PYTHON (default python3).
# Exit status: non-zero if the build or any correctness check fails.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")}"
CUDA_ARCHS="${CUDA_ARCHS:-80 90}"
BUILD_DIR="${BUILD_DIR:-$ROOT/build/gpu_harness}"
OUT_DIR="${OUT_DIR:-$BUILD_DIR/out}"
PYTHON="${PYTHON:-python3}"

build_only=0 check_only=0
args=()
for a in "$@"; do
  case "$a" in
    --build-only) build_only=1 ;;
    --check-only) check_only=1; args+=("$a") ;;
    *) args+=("$a") ;;
  esac
done

gencode=()
for a in $CUDA_ARCHS; do gencode+=(-gencode "arch=compute_$a,code=sm_$a"); done

mkdir -p "$BUILD_DIR"
echo "[gpu_harness] $NVCC ($("$NVCC" --version | tail -1)) for sm_${CUDA_ARCHS// /, sm_}"
# One nvcc per file, one file at a time (-t 1): light on small build machines.
"$NVCC" -t 1 -std=c++17 -O3 -I"$ROOT" "${gencode[@]}" \
  -c "$ROOT/custom_ops/cuda/blocksparse_gpu.cu" -o "$BUILD_DIR/blocksparse_gpu.o"
"$NVCC" -t 1 -std=c++17 -O2 -I"$ROOT" "${gencode[@]}" \
  "$HERE/harness.cu" "$BUILD_DIR/blocksparse_gpu.o" -o "$BUILD_DIR/harness"
echo "[gpu_harness] built $BUILD_DIR/harness"
if [[ $build_only -eq 1 ]]; then exit 0; fi

mkdir -p "$OUT_DIR"
if [[ $check_only -eq 1 ]]; then
  exec "$BUILD_DIR/harness" "${args[@]}"
fi
# Correctness first (fails the script on any FAIL), then timing.
"$BUILD_DIR/harness" --json "$OUT_DIR/sparse.json" "${args[@]}" | tee "$OUT_DIR/harness.log"
"$PYTHON" "$HERE/bench_table.py" --sparse "$OUT_DIR/sparse.json" --out "$OUT_DIR/bench.md"
