// Fused block-sparse attention on the CPU, framework-free: forward with an
// online softmax over the kept key blocks of each query block row, backward
// that recomputes the probabilities from the saved per-row log-sum-exp. No
// [B, G, Z, b, b] score tensor is ever stored; each work unit keeps one b x b
// tile (and a few b x D panels) in its own small buffers.
//
// Letters as in blocksparse_cpu.h; Dv is the value head dim. Outputs and the
// operands used once per query block row keep the op's token-major layout
// [B, N, H, D] (q, out, dout, dq, and dk, dv: those are only the accumulators
// C of the products, loaded and stored once per product). k and v, read as
// the A/B operands of every product of a kept block, are head-major,
// [B, H, N, D], so that a block of b rows of one head is one contiguous
// b x D panel (rows of [B, N, H, D] are H * D apart, which makes a panel's
// rows alias in the L1 cache); for the forward the TF op packs them
// (PackHeads), converting dtypes in the same pass, and each backward unit
// packs the one head it works on. lse is [B, H, N].
#ifndef SPARSE_ATTENTION_TF_KERNELS_FUSED_ATTENTION_H_
#define SPARSE_ATTENTION_TF_KERNELS_FUSED_ATTENTION_H_

#include <cstdint>
#include <string>
#include <vector>

#include "custom_ops/cc/kernels/blocksparse_cpu.h"

namespace sparse_attention {

struct AttentionProblem {
  Problem p;                           // p.head_dim = D
  int64_t value_dim = 0;               // Dv
  float scale = 1.f;                   // multiplies q . k
  const int32_t* mask_index = nullptr; // [Z] -1 (full tile) or index into bias_t
  const float* bias_t = nullptr;       // [M, b, b] transposed tile masks: 0 or -inf at [key j][query i]
  // The mask tables of layout.py (inputs of the op, checked against masks
  // by ValidateMaskTables; wider ranges are valid, they only cost time):
  const int32_t* key_range = nullptr;  // [M, 2] key columns [lo, hi) of each tile mask
                                       // that any query sees (multiples of 16), or null
  const int32_t* query_range = nullptr; // [M, b/16, 2] per tile mask and group of 16
                                       // keys: the queries [lo, hi) that see any of
                                       // them (multiples of 16), or null
  const bool* split_tile = nullptr;     // [M] true if some group of the mask's key range
                                        // is seen by fewer than all b queries
  const bool* key_padding = nullptr;   // [B, N] true = real key, or null (all real)
  int64_t segments = 1;                // backward: block-row segments per head
  const int32_t* segment_rows = nullptr;  // [Hl, segments + 1] first block row of each segment

  // Offsets into the head-major operands (k, dk: D; v, dv: Dv).
  int64_t k_offset(int64_t b, int64_t n, int64_t head) const {
    return ((b * p.heads + head) * p.seq + n) * p.head_dim;
  }
  int64_t v_offset(int64_t b, int64_t n, int64_t head) const {
    return ((b * p.heads + head) * p.seq + n) * value_dim;
  }
  // Offsets into the token-major operands (q, dq: D; out, dout: Dv) and
  // their row strides.
  int64_t q_offset(int64_t b, int64_t n, int64_t head) const { return p.dense_offset(b, n, head); }
  int64_t o_offset(int64_t b, int64_t n, int64_t head) const {
    return ((b * p.seq + n) * p.heads + head) * value_dim;
  }
  int64_t q_stride() const { return p.heads * p.head_dim; }
  int64_t o_stride() const { return p.heads * value_dim; }
  int64_t lse_offset(int64_t b, int64_t head, int64_t n) const {
    return (b * p.heads + head) * p.seq + n;
  }
  // Backward units: (b, g, h, segment), segment fastest.
  int64_t num_backward_units() const {
    return p.batch * p.groups() * p.t.layout_heads * segments;
  }
};

// The operands. T is float or uint16_t (bfloat16 bits). The kernels are
// the engines of attention_engines.h (one body, fused_attention_body.h).
template <typename T>
struct AttentionForwardArgs {
  const T* q;   // [B, N, H, D]
  const T* k;   // [B, H, N, D]
  const T* v;   // [B, H, N, Dv] (float32); bf16: pairs along N [B, H, N/2, Dv, 2]
  float* out;   // [B, N, H, Dv]
  float* lse;   // [B, H, N]
};

// The backward reads every operand token-major, as the op gets it: each
// backward unit owns one head, packs that head's k and v rows once
// (contiguous [N, D] panels, in its own buffers) and computes
// delta = sum_d dout * out per query row as it goes, so no pass over the
// whole tensors runs before it.
template <typename T>
struct AttentionBackwardArgs {
  const T* q;           // [B, N, H, D]
  const T* k;           // [B, N, H, D]
  const T* v;           // [B, N, H, Dv]
  const T* out;         // [B, N, H, Dv] the forward's output
  const float* lse;     // [B, H, N] from the forward
  const T* dout;        // [B, N, H, Dv]
  float* dq;            // [B, N, H, D]
  float* dk;            // [B, N, H, D]
  float* dv;            // [B, N, H, Dv]
  float* partial_k;     // [segments - 1, B, N, H, D], or null when segments == 1
  float* partial_v;     // [segments - 1, B, N, H, Dv]
};

// A worker's scratch memory, cut into 64-byte aligned slices in the order a
// kernel takes them. Over null memory it only counts, so that each kernel's
// scratch layout (the *Buffers structs of fused_attention_body.h) is written once, in its
// constructor, and ScratchBytes<Layout>() is exactly what the op allocates
// per worker, through TF's allocator (an impossible size is a
// ResourceExhaustedError there, never a std::bad_alloc in a kernel). Slices
// are not zeroed: every one is written before it is read.
class Scratch {
 public:
  explicit Scratch(void* base) : base_(static_cast<char*>(base)) {}
  template <typename T>
  T* Take(int64_t n) {
    used_ = (used_ + 63) / 64 * 64;
    T* p = base_ == nullptr ? nullptr : reinterpret_cast<T*>(base_ + used_);
    used_ += n * static_cast<int64_t>(sizeof(T));
    return p;
  }
  int64_t bytes() const { return (used_ + 63) / 64 * 64; }

 private:
  char* base_;
  int64_t used_ = 0;
};

// Bytes of one worker's scratch of a kernel (a multiple of 64). With a
// supported block size (b <= 128, ValidateBlockSize) every slice is at most
// 128 rows of D or Dv floats, a b x b tile, or one head of k and v [N, D + Dv]
// (the backward), so the total is bounded by a few heads of the inputs.
template <typename Layout>
int64_t ScratchBytes(const AttentionProblem& a) {
  Scratch s(nullptr);
  Layout layout(a, &s);
  return s.bytes();
}

// bf16 x [B, N, H, D] -> head-major [B, H, N, D] (if natural) and pairs along
// the sequence [B, H, N/2, D, 2] (if pairs; N even), for the units (b,
// block of `rows` rows, even) in [begin, end) of B * ceil(N / rows).
void PackHeadsBf16(const uint16_t* x, int64_t batch, int64_t seq, int64_t heads, int64_t dim,
                   int64_t rows, uint16_t* natural, uint16_t* pairs, int64_t begin, int64_t end);

// dk, dv += the partial sums of segments 1.. (in order), for units
// (b, head) in [begin, end) of B * H.
void ReduceSegments(const AttentionProblem& a, const AttentionBackwardArgs<float>& x,
                    int64_t begin, int64_t end);

// [B, N, H, D] -> [B, H, N, D] for the units (b, block of `rows` rows) in
// [begin, end) of B * ceil(N / rows): each token's H * D values are read
// in one sequential sweep and go to H sequential output streams. Src is any
// type convertible to float.
template <typename Src>
void PackHeads(const Src* x, int64_t batch, int64_t seq, int64_t heads, int64_t dim,
               int64_t rows, float* packed, int64_t begin, int64_t end) {
  const int64_t chunks = (seq + rows - 1) / rows;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t c = u % chunks, b = u / chunks;
    for (int64_t n = c * rows; n < seq && n < (c + 1) * rows; ++n)
      for (int64_t head = 0; head < heads; ++head) {
        const Src* src = x + ((b * seq + n) * heads + head) * dim;
        float* dst = packed + ((b * heads + head) * seq + n) * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<float>(src[d]);
      }
  }
}

// Splits each layout head's block rows into `segments` contiguous ranges of
// about equal kept-block count: rows [Hl, segments + 1] (memory of the caller).
void SegmentRows(const Tables& t, int64_t segments, int32_t* rows);

// The block sizes the fused kernels take (those of patterns.py): multiples
// of 16 (a tile row is whole vectors of 16 queries), at most 128 (which
// bounds every scratch buffer, see ScratchBytes).
constexpr int64_t kSupportedBlockSizes[] = {16, 32, 64, 128};

// "" if the fused kernels take this block size, else a message naming it and
// the supported values.
std::string ValidateBlockSize(int64_t block);

// The fused kernels' scale must be finite: where the scale is applied (to q,
// or to the product q . k) decides what inf * 0 gives, so an infinite or NaN
// scale has no one meaning. "" if finite.
std::string ValidateScale(float scale);

}  // namespace sparse_attention

#endif  // SPARSE_ATTENTION_TF_KERNELS_FUSED_ATTENTION_H_
