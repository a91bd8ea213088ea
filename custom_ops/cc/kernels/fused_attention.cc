#include "custom_ops/cc/kernels/fused_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>


namespace sparse_attention {

void ReduceSegments(const AttentionProblem& a, const AttentionBackwardArgs<float>& x,
                    int64_t begin, int64_t end) {
  const Problem& p = a.p;
  const int64_t D = p.head_dim, Dv = a.value_dim;
  const int64_t k_size = p.batch * p.seq * p.heads * D, v_size = p.batch * p.seq * p.heads * Dv;
  for (int64_t u = begin; u < end; ++u) {  // (b, head): that head's rows, token-major
    const int64_t b = u / p.heads, head = u % p.heads;
    for (int64_t s = 1; s < a.segments; ++s)
      for (int64_t n = 0; n < p.seq; ++n) {
        float* dk = x.dk + a.q_offset(b, n, head);
        const float* pk = x.partial_k + (s - 1) * k_size + a.q_offset(b, n, head);
        for (int64_t d = 0; d < D; ++d) dk[d] += pk[d];
        float* dv = x.dv + a.o_offset(b, n, head);
        const float* pv = x.partial_v + (s - 1) * v_size + a.o_offset(b, n, head);
        for (int64_t d = 0; d < Dv; ++d) dv[d] += pv[d];
      }
  }
}

void PackHeadsBf16(const uint16_t* x, int64_t batch, int64_t seq, int64_t heads, int64_t dim,
                   int64_t rows, uint16_t* natural, uint16_t* pairs, int64_t begin, int64_t end) {
  const int64_t chunks = (seq + rows - 1) / rows;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t c = u % chunks, b = u / chunks;
    for (int64_t n = c * rows; n < seq && n < (c + 1) * rows; ++n)
      for (int64_t head = 0; head < heads; ++head) {
        const int64_t bh = b * heads + head;
        const uint16_t* src = x + ((b * seq + n) * heads + head) * dim;
        if (natural != nullptr) std::memcpy(natural + (bh * seq + n) * dim, src, dim * 2);
        if (pairs != nullptr) {
          uint16_t* dst = pairs + (bh * seq + (n & ~int64_t{1})) * dim + (n & 1);
          for (int64_t d = 0; d < dim; ++d) dst[2 * d] = src[d];
        }
      }
  }
}

void SegmentRows(const Tables& t, int64_t segments, int32_t* rows) {
  const int64_t nb = t.num_blocks;
  for (int64_t h = 0; h < t.layout_heads; ++h) {
    int32_t* r = rows + h * (segments + 1);
    const int64_t first = t.row_offsets[h * nb], total = t.row_offsets[(h + 1) * nb] - first;
    r[0] = 0;
    int64_t row = 0;
    for (int64_t s = 1; s < segments; ++s) {  // first row whose blocks reach s/segments of the total
      const int64_t target = first + (total * s + segments - 1) / segments;
      while (row < nb && t.row_offsets[h * nb + row] < target) ++row;
      r[s] = static_cast<int32_t>(std::max<int64_t>(row, r[s - 1]));
    }
    r[segments] = static_cast<int32_t>(nb);
  }
}

std::string ValidateBlockSize(int64_t block) {
  for (int64_t b : kSupportedBlockSizes)
    if (block == b) return "";
  std::string values;
  for (int64_t b : kSupportedBlockSizes) values += (values.empty() ? "" : ", ") + std::to_string(b);
  return "block_size must be one of " + values + " for the fused attention kernels, got " +
         std::to_string(block);
}

std::string ValidateScale(float scale) {
  if (std::isfinite(scale)) return "";
  return "scale must be finite for the fused attention kernels, got " + std::to_string(scale);
}

}  // namespace sparse_attention
