#include "custom_ops/cc/kernels/blocksparse_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "custom_ops/cc/kernels/simd.h"

namespace sparse_attention {
namespace {

std::string At(const char* what, int64_t index) {
  return std::string(what) + "[" + std::to_string(index) + "]";
}

// Checks an offsets array [rows + 1]: starts at 0, ends at nnz, never decreases.
std::string ValidateOffsets(const char* name, const int32_t* offsets, int64_t rows,
                            int64_t nnz) {
  if (offsets[0] != 0) return std::string(name) + "[0] must be 0, got " + std::to_string(offsets[0]);
  if (offsets[rows] != nnz)
    return At(name, rows) + " must equal the number of blocks " + std::to_string(nnz) +
           ", got " + std::to_string(offsets[rows]);
  for (int64_t r = 0; r < rows; ++r)
    if (offsets[r + 1] < offsets[r]) return At(name, r + 1) + " is smaller than " + At(name, r);
  return "";
}

void ZeroRows(float* out, int64_t rows, int64_t row_stride, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) std::memset(out + r * row_stride, 0, width * sizeof(float));
}

// Whether `rows` rows of `width` floats (row stride ld) are all finite: the
// exponent bits of NaN and inf are all ones (an integer test, so it vectorises).
bool RowsFinite(const float* x, int64_t rows, int64_t ld, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    uint32_t bad = 0;
    for (int64_t d = 0; d < width; ++d) {
      uint32_t bits;
      std::memcpy(&bits, x + r * ld + d, sizeof(bits));
      bad |= (bits & 0x7f800000u) == 0x7f800000u;
    }
    if (bad) return false;
  }
  return true;
}

// out[r] += sum_k P(r, k) * x[k] over the nonzero P(r, k) only (P(r, k) =
// probs[r * prs + k * pks]): for X rows holding a NaN or inf, which a GEMM
// would add (as 0 * inf = NaN) to every row, also those whose coefficient
// is an exact 0 (a hidden element, see SoftmaxRows and SoftmaxGradRows).
void SkipZerosProduct(const Problem& p, const float* probs, int64_t prs, int64_t pks,
                      const float* x, float* out) {
  const int64_t bs = p.block, ld = p.heads * p.head_dim;
  for (int64_t r = 0; r < bs; ++r)
    for (int64_t k = 0; k < bs; ++k) {
      const float c = probs[r * prs + k * pks];
      if (c == 0.f) continue;
      for (int64_t d = 0; d < p.head_dim; ++d) out[r * ld + d] += c * x[k * ld + d];
    }
}

}  // namespace

std::string ValidateTables(const Tables& t, int64_t heads, bool need_columns) {
  if (t.layout_heads < 1 || heads % t.layout_heads != 0)
    return "the tables have " + std::to_string(t.layout_heads) +
           " layout heads, which must divide the number of heads " + std::to_string(heads);
  const int64_t nb = t.num_blocks, rows = t.layout_heads * nb;
  int64_t prev_key = -1;
  for (int64_t z = 0; z < t.nnz; ++z) {
    const int32_t h = t.blocks[3 * z], i = t.blocks[3 * z + 1], j = t.blocks[3 * z + 2];
    if (h < 0 || h >= t.layout_heads || i < 0 || i >= nb || j < 0 || j >= nb)
      return "blocks[" + std::to_string(z) + "] = (" + std::to_string(h) + ", " +
             std::to_string(i) + ", " + std::to_string(j) + ") is out of range for " +
             std::to_string(t.layout_heads) + " layout heads and " + std::to_string(nb) +
             " blocks per sequence";
    const int64_t key = (h * nb + i) * nb + j;
    if (key <= prev_key)
      return "blocks must be sorted by (head, row, column) without repeats; blocks[" +
             std::to_string(z) + "] is not";
    prev_key = key;
  }
  std::string err = ValidateOffsets("row_offsets", t.row_offsets, rows, t.nnz);
  if (!err.empty()) return err;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t z = t.row_offsets[r]; z < t.row_offsets[r + 1]; ++z)
      if (t.blocks[3 * z] * nb + t.blocks[3 * z + 1] != r)
        return "row_offsets do not match blocks: block " + std::to_string(z) +
               " is listed in row " + std::to_string(r);
  if (!need_columns) return "";
  err = ValidateOffsets("col_offsets", t.col_offsets, rows, t.nnz);
  if (!err.empty()) return err;
  std::vector<bool> seen(t.nnz, false);
  for (int64_t c = 0; c < rows; ++c)
    for (int64_t k = t.col_offsets[c]; k < t.col_offsets[c + 1]; ++k) {
      const int32_t z = t.col_blocks[k];
      if (z < 0 || z >= t.nnz)
        return At("col_blocks", k) + " = " + std::to_string(z) + " is not a block index in [0, " +
               std::to_string(t.nnz) + ")";
      if (seen[z]) return At("col_blocks", k) + " repeats block " + std::to_string(z);
      seen[z] = true;
      if (t.blocks[3 * z] * nb + t.blocks[3 * z + 2] != c)
        return "col_offsets/col_blocks do not match blocks: block " + std::to_string(z) +
               " is listed in column " + std::to_string(c);
    }
  return "";
}

std::string ValidateMasks(const Problem& p, const SoftmaxMasks& m) {
  for (int64_t z = 0; z < p.t.nnz; ++z) {
    const int32_t mi = m.mask_index[z];
    if (mi < -1 || mi >= m.num_masks)
      return At("mask_index", z) + " = " + std::to_string(mi) + " must be -1 (full block) or in [0, " +
             std::to_string(m.num_masks) + ")";
  }
  return "";
}

void TransposeHeads(const Problem& p, const float* x, float* x_t, int64_t begin, int64_t end) {
  const int64_t n_total = p.seq, d_total = p.head_dim;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t b = u / p.heads, head = u % p.heads;
    float* dst = x_t + u * d_total * n_total;                       // [D, N]
    for (int64_t n0 = 0; n0 < n_total; n0 += 16) {                  // 16 rows at a time
      const int64_t n1 = std::min(n_total, n0 + 16);
      for (int64_t d = 0; d < d_total; ++d)
        for (int64_t n = n0; n < n1; ++n) dst[d * n_total + n] = x[p.dense_offset(b, n, head) + d];
    }
  }
}

void SddRows(const Problem& p, const float* a, const float* b_t, float* out, int64_t begin,
             int64_t end) {
  const int64_t bs = p.block, nb = p.t.num_blocks, row_stride = p.heads * p.head_dim;
  for (int64_t u = begin; u < end; ++u) {
    const Unit w = SplitUnit(p, u);
    const int64_t head = w.g * p.t.layout_heads + w.h, row = w.h * nb + w.i;
    const float* a_rows = a + p.dense_offset(w.b, w.i * bs, head);                 // [b, D]
    const float* bt_head = b_t + (w.b * p.heads + head) * p.head_dim * p.seq;     // [D, N]
    for (int64_t z = p.t.row_offsets[row]; z < p.t.row_offsets[row + 1]; ++z) {
      const int64_t j = p.t.blocks[3 * z + 2];
      float* tile = out + p.sparse_offset(w.b, w.g, z);                            // [b, b]
      std::memset(tile, 0, p.tile() * sizeof(float));
      Simd().gemm(bs, bs, p.head_dim, a_rows, row_stride, 1, bt_head + j * bs, p.seq,
                         tile, bs);
    }
  }
}

void DsdRows(const Problem& p, const float* probs, const float* x, float* out, int64_t begin,
             int64_t end) {
  const int64_t bs = p.block, nb = p.t.num_blocks, row_stride = p.heads * p.head_dim;
  for (int64_t u = begin; u < end; ++u) {
    const Unit w = SplitUnit(p, u);
    const int64_t head = w.g * p.t.layout_heads + w.h, row = w.h * nb + w.i;
    float* out_rows = out + p.dense_offset(w.b, w.i * bs, head);                   // [b, D]
    ZeroRows(out_rows, bs, row_stride, p.head_dim);
    for (int64_t z = p.t.row_offsets[row]; z < p.t.row_offsets[row + 1]; ++z) {
      const int64_t j = p.t.blocks[3 * z + 2];
      const float* xj = x + p.dense_offset(w.b, j * bs, head);
      if (!RowsFinite(xj, bs, row_stride, p.head_dim)) {
        SkipZerosProduct(p, probs + p.sparse_offset(w.b, w.g, z), bs, 1, xj, out_rows);
        continue;
      }
      Simd().gemm(bs, p.head_dim, bs, probs + p.sparse_offset(w.b, w.g, z), bs, 1, xj,
                  row_stride, out_rows, row_stride);
    }
  }
}

void DsdTColumns(const Problem& p, const float* probs, const float* x, float* out,
                 int64_t begin, int64_t end) {
  const int64_t bs = p.block, nb = p.t.num_blocks, row_stride = p.heads * p.head_dim;
  for (int64_t u = begin; u < end; ++u) {
    const Unit w = SplitUnit(p, u);  // w.i is the block column J here
    const int64_t head = w.g * p.t.layout_heads + w.h, col = w.h * nb + w.i;
    float* out_rows = out + p.dense_offset(w.b, w.i * bs, head);                   // [b, D]
    ZeroRows(out_rows, bs, row_stride, p.head_dim);
    for (int64_t k = p.t.col_offsets[col]; k < p.t.col_offsets[col + 1]; ++k) {
      const int64_t z = p.t.col_blocks[k], i = p.t.blocks[3 * z + 1];
      const float* xi = x + p.dense_offset(w.b, i * bs, head);
      // P^T: element (r, k) of the transposed tile is probs[k * bs + r].
      if (!RowsFinite(xi, bs, row_stride, p.head_dim)) {
        SkipZerosProduct(p, probs + p.sparse_offset(w.b, w.g, z), 1, bs, xi, out_rows);
        continue;
      }
      Simd().gemm(bs, p.head_dim, bs, probs + p.sparse_offset(w.b, w.g, z), 1, bs, xi,
                  row_stride, out_rows, row_stride);
    }
  }
}

// Both softmax kernels walk each block row tile by tile (sequential memory),
// keeping per-row running values (max, sum, dot) for the b query rows.
void SoftmaxRows(const Problem& p, const SoftmaxMasks& m, float scale, const float* x,
                 float* y, int64_t begin, int64_t end) {
  const SimdKernels& simd = Simd();
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t bs = p.block, nb = p.t.num_blocks;
  std::vector<uint8_t> keep(bs);
  std::vector<float> mx(bs), sum(bs);
  for (int64_t u = begin; u < end; ++u) {
    const Unit w = SplitUnit(p, u);
    const int64_t row = w.h * nb + w.i;
    const int64_t z0 = p.t.row_offsets[row], z1 = p.t.row_offsets[row + 1];
    // Pass 1: y = scale * x on visible elements, -inf elsewhere; row maxima.
    std::fill(mx.begin(), mx.end(), kNegInf);
    for (int64_t z = z0; z < z1; ++z) {
      const int64_t off = p.sparse_offset(w.b, w.g, z);
      const int32_t mi = m.mask_index[z];
      const uint8_t* keys = m.key_padding == nullptr
          ? nullptr
          : reinterpret_cast<const uint8_t*>(m.key_padding + w.b * p.seq + p.t.blocks[3 * z + 2] * bs);
      for (int64_t i = 0; i < bs; ++i) {
        const uint8_t* k = keys;
        if (mi >= 0) {
          const uint8_t* tile_row = reinterpret_cast<const uint8_t*>(m.masks + (mi * bs + i) * bs);
          k = tile_row;
          if (keys != nullptr) {
            for (int64_t jj = 0; jj < bs; ++jj) keep[jj] = tile_row[jj] & keys[jj];
            k = keep.data();
          }
        }
        mx[i] = std::max(mx[i], simd.scale_mask_max(x + off + i * bs, k, scale, y + off + i * bs, bs));
      }
    }
    // Pass 2: exponentials and row sums (rows with no visible key stay all -inf -> 0).
    std::fill(sum.begin(), sum.end(), 0.f);
    for (int64_t z = z0; z < z1; ++z) {
      float* tile = y + p.sparse_offset(w.b, w.g, z);
      for (int64_t i = 0; i < bs; ++i)
        sum[i] += simd.exp_sum(tile + i * bs, mx[i] == kNegInf ? 0.f : mx[i], bs);
    }
    // Pass 3: normalise. A row that sees a NaN (sum NaN) is divided by 1, as
    // in the reference: its hidden elements stay 0 and its visible ones
    // nonzero, so that the gradient (SoftmaxGradRows) keeps them apart.
    for (int64_t i = 0; i < bs; ++i)
      sum[i] = sum[i] > 0.f ? 1.f / sum[i] : (sum[i] == 0.f ? 0.f : 1.f);
    for (int64_t z = z0; z < z1; ++z) {
      float* tile = y + p.sparse_offset(w.b, w.g, z);
      for (int64_t i = 0; i < bs; ++i) simd.scale(tile + i * bs, sum[i], bs);
    }
  }
}

void SoftmaxGradRows(const Problem& p, float scale, const float* y, const float* dy, float* dx,
                     int64_t begin, int64_t end) {
  const SimdKernels& simd = Simd();
  const int64_t bs = p.block, nb = p.t.num_blocks;
  std::vector<float> dot(bs);
  for (int64_t u = begin; u < end; ++u) {
    const Unit w = SplitUnit(p, u);
    const int64_t row = w.h * nb + w.i;
    const int64_t z0 = p.t.row_offsets[row], z1 = p.t.row_offsets[row + 1];
    std::fill(dot.begin(), dot.end(), 0.f);
    for (int64_t z = z0; z < z1; ++z) {
      const int64_t off = p.sparse_offset(w.b, w.g, z);
      for (int64_t i = 0; i < bs; ++i) dot[i] += simd.dot(y + off + i * bs, dy + off + i * bs, bs);
    }
    for (int64_t z = z0; z < z1; ++z) {
      const int64_t off = p.sparse_offset(w.b, w.g, z);
      for (int64_t i = 0; i < bs; ++i)
        simd.softmax_grad(y + off + i * bs, dy + off + i * bs, dot[i], scale, dx + off + i * bs, bs);
    }
  }
}

}  // namespace sparse_attention
