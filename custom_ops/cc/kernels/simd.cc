#include "custom_ops/cc/kernels/simd.h"

#include "custom_ops/cc/kernels/attention_engines.h"

namespace sparse_attention {

// The three builds (kSimdAvx512, kSimdAvx2, kSimdBaseline) are compiled
// with the float32 attention engines from the same body, in engine_float32.cc.
const SimdKernels& Simd() { return *Dispatch().simd; }

void GemmReference(int64_t m, int64_t n, int64_t k, const float* a, int64_t ars, int64_t aks,
                   const float* b, int64_t ldb, float* c, int64_t ldc) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t kk = 0; kk < k; ++kk) {
      const float s = a[r * ars + kk * aks];
      for (int64_t j = 0; j < n; ++j) c[r * ldc + j] += s * b[kk * ldb + j];
    }
}

}  // namespace sparse_attention
