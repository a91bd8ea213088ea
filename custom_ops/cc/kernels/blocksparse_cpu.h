// Block-sparse attention kernels on the CPU, framework-free.
//
// Everything here works on float32 plain pointers, the lookup tables and
// ranges of independent work units, so that a TF kernel (or a test harness,
// or a CUDA twin of the same algorithm) only has to allocate, convert dtypes
// and split the units over threads.
//
// Letters: B batch, N sequence, H heads, D head dim, b block size,
// Nb = N / b, Hl layout heads (H % Hl == 0), G = H / Hl, Z kept blocks.
// Dense tensors are [B, N, H, D]. Block-sparse tensors are [B, G, Z, b, b];
// block z of group g belongs to head g * Hl + blocks[z].h.
// Tables (validated by ValidateTables before any kernel reads them):
//   blocks [Z, 3] (h, I, J) sorted by (h, I, J); row_offsets [Hl*Nb + 1];
//   col_offsets [Hl*Nb + 1]; col_blocks [Z] (block ids sorted by (h, J, I)).
#ifndef SPARSE_ATTENTION_TF_KERNELS_BLOCKSPARSE_CPU_H_
#define SPARSE_ATTENTION_TF_KERNELS_BLOCKSPARSE_CPU_H_

#include <cstdint>
#include <string>
#include <vector>

namespace sparse_attention {

struct Tables {
  const int32_t* blocks = nullptr;       // [Z, 3]
  const int32_t* row_offsets = nullptr;  // [Hl*Nb + 1]
  const int32_t* col_offsets = nullptr;  // [Hl*Nb + 1] (may be null if unused)
  const int32_t* col_blocks = nullptr;   // [Z]         (may be null if unused)
  int64_t nnz = 0;                       // Z
  int64_t layout_heads = 0;              // Hl
  int64_t num_blocks = 0;                // Nb
};

// A problem: dense shape, block size and tables. Units of work:
// "rows" (b, g, h, I) and "columns" (b, g, h, J), both B * G * Hl * Nb.
struct Problem {
  int64_t batch, seq, heads, head_dim, block;
  Tables t;
  int64_t groups() const { return heads / t.layout_heads; }
  int64_t num_units() const { return batch * groups() * t.layout_heads * t.num_blocks; }
  int64_t tile() const { return block * block; }
  // Offset of element (b, n, head, 0) of a dense [B, N, H, D] tensor.
  int64_t dense_offset(int64_t b, int64_t n, int64_t head) const {
    return ((b * seq + n) * heads + head) * head_dim;
  }
  // Offset of tile (b, g, z) of a block-sparse [B, G, Z, b, b] tensor.
  int64_t sparse_offset(int64_t b, int64_t g, int64_t z) const {
    return ((b * groups() + g) * t.nnz + z) * tile();
  }
};

// Checks the tables against the dimensions: every index a kernel will read is
// in range and the row/column lists are consistent. Returns "" if valid, else
// a message naming the first problem. Needs col tables only if need_columns.
std::string ValidateTables(const Tables& t, int64_t heads, bool need_columns);

// Splits a unit index into (b, g, h, I): I fastest.
struct Unit {
  int64_t b, g, h, i;
};
inline Unit SplitUnit(const Problem& p, int64_t u) {
  Unit r;
  r.i = u % p.t.num_blocks;
  u /= p.t.num_blocks;
  r.h = u % p.t.layout_heads;
  u /= p.t.layout_heads;
  r.g = u % p.groups();
  r.b = u / p.groups();
  return r;
}

// out[b,g,z] = A[rows of block I] * B[rows of block J]^T for each kept block
// of the rows in [begin, end). a and b_t: b_t is B transposed per head,
// [B, H, D, N] (see TransposeHeads). out: [B, G, Z, b, b].
void SddRows(const Problem& p, const float* a, const float* b_t, float* out,
             int64_t begin, int64_t end);

// Packs x [B, N, H, D] into x_t [B, H, D, N], for units (b, head) in [begin, end).
void TransposeHeads(const Problem& p, const float* x, float* x_t, int64_t begin, int64_t end);

// out[rows of block I] = sum over the row's blocks of P[b,g,z] * X[rows of J],
// rows in [begin, end). p: [B, G, Z, b, b]; x, out: [B, N, H, D].
void DsdRows(const Problem& p, const float* probs, const float* x, float* out,
             int64_t begin, int64_t end);

// out[rows of block J] = sum over the column's blocks of P[b,g,z]^T * X[rows of I],
// columns in [begin, end).
void DsdTColumns(const Problem& p, const float* probs, const float* x, float* out,
                 int64_t begin, int64_t end);

// Masks of the softmax. mask_index [Z] (-1: full tile) into masks [M, b, b];
// key_padding [B, N] (true: key is real) or null.
struct SoftmaxMasks {
  const int32_t* mask_index = nullptr;
  const bool* masks = nullptr;
  int64_t num_masks = 0;
  const bool* key_padding = nullptr;
};

// Checks mask_index against num_masks. "" if valid.
std::string ValidateMasks(const Problem& p, const SoftmaxMasks& m);

// y = softmax(scale * x) over the kept, unmasked elements of each query row;
// masked elements and rows with no visible key give 0.
void SoftmaxRows(const Problem& p, const SoftmaxMasks& m, float scale, const float* x,
                 float* y, int64_t begin, int64_t end);

// dx = scale * y * (dy - sum_row(y * dy)).
void SoftmaxGradRows(const Problem& p, float scale, const float* y, const float* dy,
                     float* dx, int64_t begin, int64_t end);

}  // namespace sparse_attention

#endif  // SPARSE_ATTENTION_TF_KERNELS_BLOCKSPARSE_CPU_H_
