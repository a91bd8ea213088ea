// The float32 builds: the SIMD primitives (simd_body.h, simd.h) and the
// float32 fused attention engine (fused_attention_body.h's F32Engine), each
// built three times from one text under different `#pragma GCC target`s:
// AVX-512, AVX2+FMA and baseline x86-64. attention_engines.cc picks one.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "custom_ops/cc/kernels/attention_engines.h"
#include "custom_ops/cc/kernels/fused_attention.h"
#include "custom_ops/cc/kernels/simd.h"

namespace sparse_attention {
namespace {

bool TakesAll(const AttentionProblem&) { return true; }

namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#define SPARSE_ATTENTION_BODY_AVX512 1
// GCC 12 flags the intrinsics' own undefined-register idiom (`__Y = __Y`).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wunused-function"
#include "custom_ops/cc/kernels/simd_body.h"
#include "custom_ops/cc/kernels/fused_attention_body.h"
#pragma GCC diagnostic pop
#undef SPARSE_ATTENTION_BODY_AVX512
#pragma GCC pop_options
}  // namespace avx512

namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SPARSE_ATTENTION_BODY_AVX2 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "custom_ops/cc/kernels/simd_body.h"
#include "custom_ops/cc/kernels/fused_attention_body.h"
#pragma GCC diagnostic pop
#undef SPARSE_ATTENTION_BODY_AVX2
#pragma GCC pop_options
}  // namespace avx2

namespace baseline {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "custom_ops/cc/kernels/simd_body.h"
#include "custom_ops/cc/kernels/fused_attention_body.h"
#pragma GCC diagnostic pop
}  // namespace baseline

}  // namespace

#define SPARSE_ATTENTION_KERNELS(ns)                                                   \
  SimdKernels {                                                                        \
    #ns, ns::Gemm, ns::ScaleMaskMax, ns::ExpSum, ns::Scale, ns::Dot, ns::SoftmaxGrad,  \
        ns::FloatToBf16, ns::Bf16ToFloat                                               \
  }
const SimdKernels kSimdAvx512 = SPARSE_ATTENTION_KERNELS(avx512);
const SimdKernels kSimdAvx2 = SPARSE_ATTENTION_KERNELS(avx2);
const SimdKernels kSimdBaseline = SPARSE_ATTENTION_KERNELS(baseline);
#undef SPARSE_ATTENTION_KERNELS

#define SPARSE_ATTENTION_F32_ENGINE(var, ns)                                              \
  const AttentionEngine<float> var{                                                       \
      #ns, TakesAll,                                                                      \
      [](const AttentionProblem& a) {                                                     \
        return ScratchBytes<ns::fused::ForwardBuffers<ns::fused::F32Engine>>(a);          \
      },                                                                                  \
      ns::fused::Forward<ns::fused::F32Engine>,                                           \
      [](const AttentionProblem& a) {                                                     \
        return ScratchBytes<ns::fused::BackwardBuffers<ns::fused::F32Engine>>(a);         \
      },                                                                                  \
      ns::fused::Backward<ns::fused::F32Engine>};

SPARSE_ATTENTION_F32_ENGINE(kFloat32Avx512, avx512)
SPARSE_ATTENTION_F32_ENGINE(kFloat32Avx2, avx2)
SPARSE_ATTENTION_F32_ENGINE(kFloat32Baseline, baseline)
#undef SPARSE_ATTENTION_F32_ENGINE

}  // namespace sparse_attention
