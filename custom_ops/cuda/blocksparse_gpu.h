// Block-sparse attention kernels on NVIDIA GPUs, framework-free: the CUDA
// twins of custom_ops/cc/kernels/blocksparse_cpu.h.
//
// Everything takes plain device pointers and the lookup tables (already
// validated on the host and copied to the device), and launches
// asynchronously on the given stream. The TF kernels
// (custom_ops/cc/kernels/blocksparse_ops_gpu.cc) and the standalone harness
// (custom_ops/gpu_harness/) both call these functions.
//
// Letters: B batch, N sequence, H heads, D head dim, Dv value dim, b block
// size, Nb = N / b, Hl layout heads (H % Hl == 0), G = H / Hl, Z kept blocks,
// M distinct partial tiles. Dense tensors are [B, N, H, D]; block-sparse
// tensors are [B, G, Z, b, b]; head = g * Hl + h for block z = (h, I, J).
// Tables:
//   blocks [Z, 3] (h, I, J) sorted by (h, I, J); row_offsets [Hl*Nb + 1];
//   col_offsets [Hl*Nb + 1]; col_blocks [Z] (block ids sorted by (h, J, I));
//   mask_index [Z] (-1: full tile, else an index into masks);
//   masks [M, b, b] bool (query row i, key column j; true: visible);
//   key_padding [B, N] bool (true: real key) or null (every key is real).
//
// Element types: T = float, half or bfloat16 (bit-compatible with
// Eigen::half / Eigen::bfloat16 / __half / __nv_bfloat16); accumulation is
// always float32. Half and bfloat16 block products run on tensor cores
// (WMMA 16x16x16 -> float); float32 products use FMA (exact float32, so the
// float32 results match the CPU kernels to ~1e-6).
//
// Every function returns "" on success, else a message saying what was wrong
// (unsupported size, launch error). Work is never split with atomics: each
// output element is written by exactly one thread block, summing its terms
// in a fixed order, so results are bitwise deterministic run to run.
#ifndef SPARSE_ATTENTION_TF_CUDA_BLOCKSPARSE_GPU_H_
#define SPARSE_ATTENTION_TF_CUDA_BLOCKSPARSE_GPU_H_

#include <cstdint>
#include <string>

namespace sparse_attention {
namespace gpu {

enum class DType { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// A cudaStream_t, as void* so that callers need no CUDA headers (the TF
// kernels get it from TF's stream executor; the CUDA headers are not part of
// TensorFlow's pip package).
using GpuStream = void*;

// Bytes of one element of dtype.
inline int SizeOf(DType t) { return t == DType::kFloat ? 4 : 2; }

// Device copies of the tables. col_offsets/col_blocks are needed by
// AttentionBackward and DsdT; mask_index/masks by the attention and softmax.
struct DeviceTables {
  const int32_t* blocks = nullptr;       // [Z, 3]
  const int32_t* row_offsets = nullptr;  // [Hl*Nb + 1]
  const int32_t* col_offsets = nullptr;  // [Hl*Nb + 1]
  const int32_t* col_blocks = nullptr;   // [Z]
  const int32_t* mask_index = nullptr;   // [Z]
  const bool* masks = nullptr;           // [M, b, b]
  int64_t nnz = 0;                       // Z
  int64_t layout_heads = 1;              // Hl
  int64_t num_blocks = 0;                // Nb
};

// Dense shape and block size. value_dim: Dv of v / out (attention only).
struct Dims {
  int64_t batch = 0, seq = 0, heads = 0, head_dim = 0, value_dim = 0, block = 0;
};

// Block sizes the kernels accept.
bool SupportedBlock(int64_t block);

// Asynchronous host -> device copy on stream (from pageable memory: src may be
// freed once this returns).
std::string CopyToDevice(void* dst, const void* src, int64_t bytes, GpuStream stream);

// ---- Fused attention -------------------------------------------------------
// out [B, N, H, Dv] = softmax(scale * q k^T) v over the visible keys of each
// query row; lse [B, H, N] float32 = log of the row's softmax denominator
// (-inf, and out = 0, for rows with no visible key). One thread block per
// (batch, head, query block row I, chunk of rows), online softmax over the
// row's kept blocks.
std::string AttentionForward(DType dtype, const Dims& d, const DeviceTables& t,
                             const bool* key_padding, float scale, const void* q, const void* k,
                             const void* v, void* out, float* lse, GpuStream stream);

// Float32 scratch AttentionBackward needs: delta [B, H, N].
int64_t AttentionBackwardWorkspaceBytes(const Dims& d);

// dq, dk, dv of AttentionForward from out, lse and dout. dk/dv: one thread
// block per key block column walking the column lists (col_offsets/
// col_blocks); dq: one per query block row. P is recomputed from lse.
std::string AttentionBackward(DType dtype, const Dims& d, const DeviceTables& t,
                              const bool* key_padding, float scale, const void* q, const void* k,
                              const void* v, const void* out, const float* lse, const void* dout,
                              void* dq, void* dk, void* dv, float* workspace,
                              GpuStream stream);

// ---- Three-op path (BlocksparseSdd / Dsd / DsdT / Softmax / SoftmaxGrad) --
// out [B, G, Z, b, b]: out[b, g, z] = A_I B_J^T (a, b: [B, N, H, D]).
std::string Sdd(DType dtype, const Dims& d, const DeviceTables& t, const void* a, const void* b,
                void* out, GpuStream stream);

// out_I [B, N, H, D] = sum over the row's blocks of P_z X_J.
std::string Dsd(DType dtype, const Dims& d, const DeviceTables& t, const void* p, const void* x,
                void* out, GpuStream stream);

// out_J = sum over the column's blocks of P_z^T X_I (needs the column lists).
std::string DsdT(DType dtype, const Dims& d, const DeviceTables& t, const void* p, const void* x,
                 void* out, GpuStream stream);

// y = softmax(scale * x) over the visible elements of each query row of the
// block-sparse x [B, G, Z, b, b]; masked elements and empty rows give 0.
// Uses d.batch, d.seq (for key_padding), d.block, d.heads = G * Hl.
std::string Softmax(DType dtype, const Dims& d, const DeviceTables& t, const bool* key_padding,
                    float scale, const void* x, void* y, GpuStream stream);

// dx = scale * y * (dy - sum_row(y * dy)) over [batch, groups, Z, b, b]; only
// row_offsets [rows + 1] is read (rows of any layout head).
std::string SoftmaxGrad(DType dtype, int64_t batch, int64_t groups, int64_t nnz, int64_t block,
                        int64_t rows, const int32_t* row_offsets, float scale, const void* y,
                        const void* dy, void* dx, GpuStream stream);

}  // namespace gpu
}  // namespace sparse_attention

#endif  // SPARSE_ATTENTION_TF_CUDA_BLOCKSPARSE_GPU_H_
