// Vectorised primitives of the block-sparse kernels, framework-free: a small
// dense product on tiles and the row operations of the softmax.
//
// The library carries three builds of each primitive (AVX-512, AVX2+FMA and
// baseline x86-64), compiled from one body (simd_body.h) under different
// `#pragma GCC target`s; Simd() returns the one the dispatch
// (attention_engines.h) chose for this CPU, once. So the .so runs on any
// x86-64 and is never built with -march=native.
#ifndef SPARSE_ATTENTION_TF_KERNELS_SIMD_H_
#define SPARSE_ATTENTION_TF_KERNELS_SIMD_H_

#include <cstdint>


namespace sparse_attention {

struct SimdKernels {
  const char* isa;  // "avx512", "avx2" or "baseline"

  // C[m x n] += A[m x k] * B[k x n]. A element (r, kk) at a[r * ars + kk * aks]
  // (so A may be a transposed view), B row kk at b + kk * ldb, C row r at c + r * ldc.
  void (*gemm)(int64_t m, int64_t n, int64_t k, const float* a, int64_t ars, int64_t aks,
               const float* b, int64_t ldb, float* c, int64_t ldc);

  // y[j] = keep[j] ? scale * x[j] : -inf (keep null: all kept); returns max_j y[j].
  float (*scale_mask_max)(const float* x, const uint8_t* keep, float scale, float* y,
                          int64_t n);

  // y[j] = exp(y[j] - shift), with exp(-inf) = 0; returns sum_j y[j].
  float (*exp_sum)(float* y, float shift, int64_t n);

  // y[j] *= s.
  void (*scale)(float* y, float s, int64_t n);

  // sum_j x[j] * y[j].
  float (*dot)(const float* x, const float* y, int64_t n);

  // dx[j] = scale * y[j] * (dy[j] - dot), or 0 where y[j] = 0.
  void (*softmax_grad)(const float* y, const float* dy, float dot, float scale, float* dx,
                       int64_t n);

  // float32 -> bf16 bits rounded to nearest even (NaN stays NaN), and back.
  void (*float_to_bf16)(const float* x, int64_t n, uint16_t* y);
  void (*bf16_to_float)(const uint16_t* x, int64_t n, float* y);

};

// The primitives for this CPU, chosen on first use (attention_engines.cc).
const SimdKernels& Simd();

// Plain-loop product with the same contract as SimdKernels::gemm (reference
// for tests, and the tail of the vector version).
void GemmReference(int64_t m, int64_t n, int64_t k, const float* a, int64_t ars, int64_t aks,
                   const float* b, int64_t ldb, float* c, int64_t ldc);

}  // namespace sparse_attention

#endif  // SPARSE_ATTENTION_TF_KERNELS_SIMD_H_
