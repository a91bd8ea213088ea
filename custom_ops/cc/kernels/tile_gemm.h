// Small dense matrix product on tiles, the arithmetic core of every block-sparse
// kernel. Framework-free: plain pointers and strides.
//
//   C[M x N] += A[M x K] * B[K x N]
//
// A element (r, k) is read at a[r * a_row_stride + k * a_k_stride] (so A can be
// a transposed view), B row k at b + k * ldb (contiguous N floats), C row r at
// c + r * ldc. The compiled library carries AVX-512, AVX2+FMA and baseline
// x86-64 versions and picks one at load time (GCC target_clones), so the .so
// runs on any x86-64 CPU.
#ifndef SPARSE_ATTENTION_TF_KERNELS_TILE_GEMM_H_
#define SPARSE_ATTENTION_TF_KERNELS_TILE_GEMM_H_

#include <cstdint>

namespace sparse_attention {

void TileGemmAccumulate(int64_t m, int64_t n, int64_t k,
                        const float* a, int64_t a_row_stride, int64_t a_k_stride,
                        const float* b, int64_t ldb,
                        float* c, int64_t ldc);

// Which version TileGemmAccumulate runs on this CPU: "avx512", "avx2" or "baseline".
const char* TileGemmIsa();

// Reference version of the same product (plain loops), for the unit tests.
void TileGemmAccumulateReference(int64_t m, int64_t n, int64_t k,
                                 const float* a, int64_t a_row_stride, int64_t a_k_stride,
                                 const float* b, int64_t ldb,
                                 float* c, int64_t ldc);

}  // namespace sparse_attention

#endif  // SPARSE_ATTENTION_TF_KERNELS_TILE_GEMM_H_
