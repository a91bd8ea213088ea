#include "custom_ops/cc/kernels/simd.h"

#include <immintrin.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "custom_ops/cc/kernels/fused_attention.h"

namespace sparse_attention {
namespace {

namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#define SPARSE_ATTENTION_BODY_AVX512 1
// GCC 12 flags the intrinsics' own undefined-register idiom (`__Y = __Y`).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "custom_ops/cc/kernels/simd_body.h"
#include "custom_ops/cc/kernels/fused_attention_body.h"
#pragma GCC diagnostic pop
#undef SPARSE_ATTENTION_BODY_AVX512
#pragma GCC pop_options
}  // namespace avx512

namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "custom_ops/cc/kernels/simd_body.h"
#include "custom_ops/cc/kernels/fused_attention_body.h"
#pragma GCC pop_options
}  // namespace avx2

namespace baseline {
#include "custom_ops/cc/kernels/simd_body.h"
#include "custom_ops/cc/kernels/fused_attention_body.h"
}  // namespace baseline

#define SPARSE_ATTENTION_KERNELS(ns) \
  SimdKernels {                                                                          \
    #ns, ns::Gemm, ns::ScaleMaskMax, ns::ExpSum, ns::Scale, ns::Dot, ns::SoftmaxGrad,    \
        ns::fused::Forward, ns::fused::Backward                                          \
  }

// The best build this CPU runs; $SPARSE_ATTENTION_TF_ISA ("avx2", "baseline")
// may ask for a lower one, so that tests exercise every build on one machine.
SimdKernels Select() {
  __builtin_cpu_init();
  const char* env = std::getenv("SPARSE_ATTENTION_TF_ISA");
  const std::string want = env ? env : "";
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx512 && (want.empty() || want == "avx512")) return SPARSE_ATTENTION_KERNELS(avx512);
  if (avx2 && want != "baseline") return SPARSE_ATTENTION_KERNELS(avx2);
  return SPARSE_ATTENTION_KERNELS(baseline);
}
#undef SPARSE_ATTENTION_KERNELS

}  // namespace

const SimdKernels& Simd() {
  static const SimdKernels kernels = Select();
  return kernels;
}

void GemmReference(int64_t m, int64_t n, int64_t k, const float* a, int64_t ars, int64_t aks,
                   const float* b, int64_t ldb, float* c, int64_t ldc) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t kk = 0; kk < k; ++kk) {
      const float s = a[r * ars + kk * aks];
      for (int64_t j = 0; j < n; ++j) c[r * ldc + j] += s * b[kk * ldb + j];
    }
}

}  // namespace sparse_attention
