#include "custom_ops/cc/kernels/tile_gemm.h"


namespace sparse_attention {
namespace {

namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#include "custom_ops/cc/kernels/tile_gemm_body.h"
#pragma GCC pop_options
}  // namespace avx512

namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "custom_ops/cc/kernels/tile_gemm_body.h"
#pragma GCC pop_options
}  // namespace avx2

namespace baseline {
#include "custom_ops/cc/kernels/tile_gemm_body.h"
}  // namespace baseline

using GemmFn = void (*)(int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
                        const float*, int64_t, float*, int64_t);

// Picked once, from what this CPU can run.
GemmFn SelectGemm() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return avx512::Gemm;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return avx2::Gemm;
  return baseline::Gemm;
}

}  // namespace

void TileGemmAccumulate(int64_t m, int64_t n, int64_t k,
                        const float* a, int64_t ars, int64_t aks,
                        const float* b, int64_t ldb, float* c, int64_t ldc) {
  static const GemmFn gemm = SelectGemm();
  gemm(m, n, k, a, ars, aks, b, ldb, c, ldc);
}

const char* TileGemmIsa() {
  static const GemmFn gemm = SelectGemm();
  return gemm == avx512::Gemm ? "avx512" : gemm == avx2::Gemm ? "avx2" : "baseline";
}

void TileGemmAccumulateReference(int64_t m, int64_t n, int64_t k,
                                 const float* a, int64_t ars, int64_t aks,
                                 const float* b, int64_t ldb, float* c, int64_t ldc) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t kk = 0; kk < k; ++kk) {
      const float s = a[r * ars + kk * aks];
      for (int64_t j = 0; j < n; ++j) c[r * ldc + j] += s * b[kk * ldb + j];
    }
}

}  // namespace sparse_attention
