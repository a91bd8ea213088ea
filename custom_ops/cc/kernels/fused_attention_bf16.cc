// bfloat16 fused attention on the CPU's bf16 dot-product instruction
// (AVX512_BF16 `vdpbf16ps`: 16 lanes, each adding the products of one pair of
// bf16 values to a float32 accumulator). Same algorithm and tile layout as
// fused_attention_body.h; only the products differ: every GEMM reads its
// operands as bf16 pairs along the summed dimension and accumulates in
// float32. The softmax, the running max/sum and the tile gradient are the
// float32 code of fused_attention_body.h. Built only for this instruction set
// (runtime check in HasBf16Kernels); elsewhere bf16 inputs are converted to
// float32 and take the float32 kernels.
//
// Pair layouts (uint16 units; "pairs of X along k"): element (k, c) of a
// k x n matrix lives at base + (k / 2) * ld + 2 * c + k % 2.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "custom_ops/cc/kernels/fused_attention.h"
#include "custom_ops/cc/kernels/simd.h"

namespace sparse_attention {
namespace {

bool CpuHasBf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16");
}

namespace avx512bf16 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,prefer-vector-width=512")
// GCC 12 flags the intrinsics' own undefined-register idiom (`__Y = __Y`).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// Only part of the two bodies is used here (the float32 GEMM and the softmax
// steps); the rest is compiled for this ISA and dropped.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#define SPARSE_ATTENTION_BODY_AVX512 1
#include "custom_ops/cc/kernels/simd_body.h"
#include "custom_ops/cc/kernels/fused_attention_body.h"
#undef SPARSE_ATTENTION_BODY_AVX512
#pragma GCC diagnostic pop

using fused::ApplyMasks;
using fused::BackwardTarget;
using fused::BackwardUnit;
using fused::FinishRows;
using fused::KeyRange;
using fused::KeyRow;
using fused::LoadLse;
using fused::MarkBadKeyBlocks;
using fused::NeedsVisibleProducts;
using fused::OnlineSoftmaxStep;
using fused::PackHead;
using fused::PrefetchNextRow;
using fused::PrefetchRows;
using fused::ProbsAndScoreGrad;
using fused::RowsFinite;
using fused::TileBias;
using fused::VisibleProducts;
using fused::ZeroRows;

inline int32_t Word(const uint16_t* p) {  // one bf16 pair as a 32-bit word
  int32_t w;
  std::memcpy(&w, p, sizeof(w));
  return w;
}

// R rows x NV vectors of C; the last vector's columns are `last` (a lane mask).
// A pair (r, p) at a + r * ars + p * aps; B pair row p at b + p * ldb.
// C += A B, or with kOverwrite C = s * A B (C is then never read).
template <int R, int NV, bool kOverwrite>
inline __attribute__((always_inline)) void MicroTile(int64_t k2, const uint16_t* a, int64_t ars,
                                                     int64_t aps, const uint16_t* b, int64_t ldb,
                                                     float* c, int64_t ldc, __mmask16 last,
                                                     float s) {
  __m512 acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      acc[r][v] = kOverwrite ? _mm512_setzero_ps()
                             : _mm512_maskz_loadu_ps(v == NV - 1 ? last : 0xffff,
                                                     c + r * ldc + 16 * v);
  for (int64_t p = 0; p < k2; ++p) {
    __m512bh bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      bv[v] = (__m512bh)_mm512_maskz_loadu_epi32(v == NV - 1 ? last : 0xffff,
                                                 b + p * ldb + 32 * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(Word(a + r * ars + p * aps));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      _mm512_mask_storeu_ps(c + r * ldc + 16 * v, v == NV - 1 ? last : 0xffff,
                            kOverwrite ? _mm512_mul_ps(acc[r][v], _mm512_set1_ps(s)) : acc[r][v]);
}

template <int NV, bool kOverwrite>
inline __attribute__((always_inline)) void Panel(int64_t m, int64_t k2, const uint16_t* a,
                                                 int64_t ars, int64_t aps, const uint16_t* b,
                                                 int64_t ldb, float* c, int64_t ldc,
                                                 __mmask16 last, float s) {
  constexpr int R = 16 / NV;
  int64_t r = 0;
  for (; r + R <= m; r += R)
    MicroTile<R, NV, kOverwrite>(k2, a + r * ars, ars, aps, b, ldb, c + r * ldc, ldc, last, s);
  for (; r < m; ++r)
    MicroTile<1, NV, kOverwrite>(k2, a + r * ars, ars, aps, b, ldb, c + r * ldc, ldc, last, s);
}

template <bool kOverwrite>
void GemmBf16Impl(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t ars, int64_t aps,
                  const uint16_t* b, int64_t ldb, float* c, int64_t ldc, float s) {
  const int64_t k2 = k / 2;
  int64_t col = 0;
  for (; col + 64 <= n; col += 64)
    Panel<4, kOverwrite>(m, k2, a, ars, aps, b + 2 * col, ldb, c + col, ldc, 0xffff, s);
  if (col + 32 <= n) {
    Panel<2, kOverwrite>(m, k2, a, ars, aps, b + 2 * col, ldb, c + col, ldc, 0xffff, s);
    col += 32;
  }
  for (; col < n; col += 16) {
    const int64_t w = n - col < 16 ? n - col : 16;
    Panel<1, kOverwrite>(m, k2, a, ars, aps, b + 2 * col, ldb, c + col, ldc,
                         static_cast<__mmask16>((1u << w) - 1), s);
  }
}

// C[m x n] += A[m x k] B[k x n], k even; A and B as bf16 pairs along k.
void GemmBf16(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t ars, int64_t aps,
              const uint16_t* b, int64_t ldb, float* c, int64_t ldc) {
  GemmBf16Impl<false>(m, n, k, a, ars, aps, b, ldb, c, ldc, 1.f);
}

// C = s * A B (C is written, never read): the scores' scale is applied in
// float32 to the product, not to bf16 q.
void GemmBf16Scaled(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t ars,
                    int64_t aps, const uint16_t* b, int64_t ldb, float* c, int64_t ldc,
                    float s) {
  GemmBf16Impl<true>(m, n, k, a, ars, aps, b, ldb, c, ldc, s);
}

// Rows 2p and 2p+1 of a float [rows, b] tile -> bf16 pairs along the rows:
// out[p][c][t] = tile[2p + t][c] (round to nearest even).
void PairRows(const float* tile, int64_t rows, int64_t bs, uint16_t* out) {
  static const __m512i kInterleave = _mm512_set_epi16(
      31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
      23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t p = 0; p < rows / 2; ++p)
    for (int64_t c = 0; c < bs; c += 16) {
      const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(tile + (2 * p + 1) * bs + c),
                                                _mm512_loadu_ps(tile + 2 * p * bs + c));
      _mm512_storeu_si512(out + p * 2 * bs + 2 * c,
                          _mm512_permutexvar_epi16(kInterleave, (__m512i)both));
    }
}

// A float [b, b] tile -> bf16, same layout (pairs along its rows' columns).
void ToBf16(const float* tile, int64_t n, uint16_t* out) {
  for (int64_t e = 0; e < n; e += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + e),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(tile + e)));
}

// b rows of width w (even, row stride ld) -> pairs along w:
// out[p][i] = rows[i][2p..2p+1]: a transpose of 32-bit words, 16 x 16 words
// at a time in registers (fused::Transpose16 moves bits, whatever they mean).
void PairColumns(const uint16_t* rows, int64_t ld, int64_t bs, int64_t w, uint16_t* out) {
  const int64_t words = w / 2;
  int64_t p0 = 0;
  for (; p0 + 16 <= words; p0 += 16)
    for (int64_t i0 = 0; i0 < bs; i0 += 16) {
      __m512 r[16];
      for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_ps(rows + (i0 + k) * ld + 2 * p0);
      fused::Transpose16(r);
      for (int c = 0; c < 16; ++c) _mm512_storeu_ps(out + ((p0 + c) * bs + i0) * 2, r[c]);
    }
  for (int64_t i = 0; i < bs; ++i)
    for (int64_t p = p0; p < words; ++p)
      std::memcpy(out + (p * bs + i) * 2, rows + i * ld + 2 * p, 4);
}

// b rows of width w (row stride ld) -> pairs along the rows:
// out[p][c][t] = rows[2p + t][c]. 32 columns at a time: two rows' words
// interleaved by one permute each half.
void PairRowsBf16(const uint16_t* rows, int64_t ld, int64_t bs, int64_t w, uint16_t* out) {
  static const __m512i kLow = _mm512_set_epi16(
      47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
      39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  static const __m512i kHigh = _mm512_set_epi16(
      63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
      55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  for (int64_t p = 0; p < bs / 2; ++p) {
    const uint16_t *r0 = rows + 2 * p * ld, *r1 = r0 + ld;
    uint16_t* o = out + p * w * 2;
    int64_t c = 0;
    for (; c + 32 <= w; c += 32) {
      const __m512i a = _mm512_loadu_si512(r0 + c), b = _mm512_loadu_si512(r1 + c);
      _mm512_storeu_si512(o + 2 * c, _mm512_permutex2var_epi16(a, kLow, b));
      _mm512_storeu_si512(o + 2 * c + 32, _mm512_permutex2var_epi16(a, kHigh, b));
    }
    for (; c < w; ++c) {
      o[2 * c] = r0[c];
      o[2 * c + 1] = r1[c];
    }
  }
}

void Forward(const AttentionProblem& a, const AttentionForwardArgs<uint16_t>& x,
             const uint16_t* v_pairs, void* scratch, int64_t begin, int64_t end) {
  const auto& p = a.p;
  const int64_t bs = p.block, D = p.head_dim, Dv = a.value_dim, nb = p.t.num_blocks;
  Scratch sc(scratch);
  const ForwardBf16Scratch buf(a, &sc);
  float *st = buf.st, *o = buf.o, *m = buf.m, *l = buf.l, *alpha = buf.alpha;
  uint16_t *qp = buf.qp, *pp = buf.pp;
  for (int64_t u = begin; u < end; ++u) {
    const Unit w = SplitUnit(p, u);
    const int64_t head = w.g * p.t.layout_heads + w.h, row = w.h * nb + w.i;
    const int64_t z0 = p.t.row_offsets[row], z1 = p.t.row_offsets[row + 1];
    PairColumns(x.q + a.q_offset(w.b, w.i * bs, head), a.q_stride(), bs, D, qp);
    for (int64_t i = 0; i < bs; ++i) m[i] = kNegInf, l[i] = 0.f;
    std::memset(o, 0, bs * Dv * sizeof(float));
    if (u + 1 < end) {  // the next unit's q and out rows
      const Unit n = SplitUnit(p, u + 1);
      const int64_t nh = n.g * p.t.layout_heads + n.h;
      PrefetchRows(x.q + a.q_offset(n.b, n.i * bs, nh), a.q_stride(), bs, D, false);
      PrefetchRows(x.out + a.o_offset(n.b, n.i * bs, nh), a.o_stride(), bs, Dv, true);
    }
    for (int64_t z = z0; z < z1; ++z) {
      const int64_t j = p.t.blocks[3 * z + 2];
      int64_t j0, j1;  // the tile's key rows that can be visible
      KeyRange(a, z, &j0, &j1);
      if (j1 <= j0) continue;
      const int64_t rows = j1 - j0;
      float* sr = st + j0 * bs;
      GemmBf16Scaled(rows, bs, D, x.k + a.k_offset(w.b, j * bs + j0, head), D, 2, qp, 2 * bs, sr,
                     bs, a.scale);
      ApplyMasks(sr, TileBias(a, z, j0), KeyRow(a, w.b, j, j0), rows, bs);
      if (OnlineSoftmaxStep(sr, rows, bs, m, l, alpha))
        for (int64_t i = 0; i < bs; ++i)
          if (alpha[i] != 1.f) Scale(o + i * Dv, alpha[i], Dv);
      PairRows(sr, rows, bs, pp);
      GemmBf16(bs, Dv, rows, pp, 2, 2 * bs, v_pairs + a.v_offset(w.b, j * bs + j0, head), 2 * Dv,
               o, Dv);
    }
    FinishRows(o, m, l, bs, Dv, x.out + a.o_offset(w.b, w.i * bs, head), a.o_stride(),
               x.lse + a.lse_offset(w.b, head, w.i * bs));
  }
}

// sum_d x[d] * y[d] over bf16 rows, in float32.
inline float DotBf16(const uint16_t* x, const uint16_t* y, int64_t n) {
  auto widen = [](__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); };
  __m512 acc = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= n; d += 16)
    acc = _mm512_fmadd_ps(widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + d))),
                          widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + d))), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; d < n; ++d) {
    const uint32_t xb = uint32_t{x[d]} << 16, yb = uint32_t{y[d]} << 16;
    float xf, yf;
    std::memcpy(&xf, &xb, 4);
    std::memcpy(&yf, &yb, 4);
    s += xf * yf;
  }
  return s;
}

void Backward(const AttentionProblem& a, const AttentionBackwardArgs<uint16_t>& x, void* scratch,
              int64_t begin, int64_t end) {
  const auto& p = a.p;
  const int64_t bs = p.block, D = p.head_dim, Dv = a.value_dim, nb = p.t.num_blocks;
  const int64_t S = a.segments, N = p.seq;
  const int64_t lq = a.q_stride(), lo = a.o_stride();
  Scratch sc(scratch);
  const BackwardBf16Scratch buf(a, &sc);
  float *pt = buf.pt, *dst = buf.dst, *dqa = buf.dqa, *lse = buf.lse, *delta = buf.delta;
  float *hk = buf.hk, *hv = buf.hv;
  uint16_t *qp = buf.qp, *qr = buf.qr, *dop = buf.dop, *dor = buf.dor, *ptb = buf.ptb;
  uint16_t *dsb = buf.dsb, *dsp = buf.dsp, *kn = buf.kn, *kp = buf.kp, *vn = buf.vn;
  for (int64_t u = begin; u < end; ++u) {
    const BackwardTarget t = BackwardUnit(a, x, u);
    const Unit& w = t.w;
    const int64_t head = t.head, seg = t.seg;
    PackHead(x.k + a.q_offset(w.b, 0, head), lq, N, D, kn);
    PairRowsBf16(x.k + a.q_offset(w.b, 0, head), lq, N, D, kp);
    PackHead(x.v + a.o_offset(w.b, 0, head), lo, N, Dv, vn);
    MarkBadKeyBlocks(a, kn, buf.k_bad);
    std::memset(hk, 0, N * D * sizeof(float));
    std::memset(hv, 0, N * Dv * sizeof(float));
    const int32_t* seg_rows = a.segment_rows + w.h * (S + 1);
    for (int64_t bi = seg_rows[seg]; bi < seg_rows[seg + 1]; ++bi) {
      const int64_t row = w.h * nb + bi;
      const int64_t z0 = p.t.row_offsets[row], z1 = p.t.row_offsets[row + 1];
      float* dq = x.dq + a.q_offset(w.b, bi * bs, head);
      if (z0 == z1) {  // no kept block: dQ = 0
        ZeroRows(dq, lq, bs, D);
        continue;
      }
      const uint16_t* q = x.q + a.q_offset(w.b, bi * bs, head);
      const uint16_t* dout = x.dout + a.o_offset(w.b, bi * bs, head);
      const uint16_t* out = x.out + a.o_offset(w.b, bi * bs, head);
      if (bi + 1 < seg_rows[seg + 1]) PrefetchNextRow(a, q, dout, out, dq);
      PairColumns(q, lq, bs, D, qp);
      PairRowsBf16(q, lq, bs, D, qr);
      PairColumns(dout, lo, bs, Dv, dop);
      PairRowsBf16(dout, lo, bs, Dv, dor);
      for (int64_t i = 0; i < bs; ++i) delta[i] = DotBf16(dout + i * lo, out + i * lo, Dv);
      LoadLse(a, x.lse, w.b, head, bi * bs, lse);
      const bool rows_bad = !RowsFinite(q, lq, bs, D) || !RowsFinite(dout, lo, bs, Dv);
      std::memset(dqa, 0, bs * D * sizeof(float));
      for (int64_t z = z0; z < z1; ++z) {
        const int64_t j = p.t.blocks[3 * z + 2];
        int64_t j0, j1;  // the tile's key rows that can be visible
        KeyRange(a, z, &j0, &j1);
        if (j1 <= j0) continue;
        const int64_t rows = j1 - j0, n0 = j * bs + j0;
        float *pr = pt + j0 * bs, *dr = dst + j0 * bs;
        const float* bias = TileBias(a, z, j0);
        const bool* keys = KeyRow(a, w.b, j, j0);
        GemmBf16Scaled(rows, bs, D, kn + n0 * D, D, 2, qp, 2 * bs, pr, bs, a.scale);
        ApplyMasks(pr, bias, keys, rows, bs);
        GemmBf16Scaled(rows, bs, Dv, vn + n0 * Dv, Dv, 2, dop, 2 * bs, dr, bs, 1.f);
        ProbsAndScoreGrad(pr, dr, lse, delta, a.scale, rows, bs, bias, keys);
        if (NeedsVisibleProducts(bias, keys, rows_bad || buf.k_bad[j])) {
          VisibleProducts(a, pr, dr, bias, keys, rows, q, lq, 1.f, dout, lo, kn + n0 * D,
                          hv + n0 * Dv, dqa, hk + n0 * D);
          continue;
        }
        ToBf16(pr, rows * bs, ptb);
        ToBf16(dr, rows * bs, dsb);
        PairRows(dr, rows, bs, dsp);
        GemmBf16(rows, Dv, bs, ptb, bs, 2, dor, 2 * Dv, hv + n0 * Dv, Dv);
        GemmBf16(bs, D, rows, dsp, 2, 2 * bs, kp + n0 * D, 2 * D, dqa, D);
        GemmBf16(rows, D, bs, dsb, bs, 2, qr, 2 * D, hk + n0 * D, D);
      }
      for (int64_t i = 0; i < bs; ++i) std::memcpy(dq + i * lq, dqa + i * D, D * sizeof(float));
    }
    fused::StoreHead(a, w.b, head, hk, hv, t.dk, t.dv);
  }
}

void FloatToBf16(const float* x, int64_t n, uint16_t* y) {
  int64_t e = 0;
  for (; e + 16 <= n; e += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + e),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + e)));
  if (e < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - e)) - 1);
    _mm256_mask_storeu_epi16(y + e, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + e)));
  }
}

#pragma GCC diagnostic pop  // -Wmaybe-uninitialized
#pragma GCC pop_options
}  // namespace avx512bf16

}  // namespace

bool HasBf16Kernels() {
  static const bool has = CpuHasBf16() && [] {
    const char* env = std::getenv("SPARSE_ATTENTION_TF_ISA");  // a lower ISA was asked for
    return env == nullptr || std::string(env).empty() || std::string(env) == "avx512";
  }();
  return has;
}

void FloatToBf16(const float* x, int64_t n, uint16_t* y) { avx512bf16::FloatToBf16(x, n, y); }

void AttentionForwardBf16(const AttentionProblem& a, const AttentionForwardArgs<uint16_t>& x,
                          const uint16_t* v_pairs, void* scratch, int64_t begin, int64_t end) {
  avx512bf16::Forward(a, x, v_pairs, scratch, begin, end);
}

void AttentionBackwardBf16(const AttentionProblem& a, const AttentionBackwardArgs<uint16_t>& x,
                           void* scratch, int64_t begin, int64_t end) {
  avx512bf16::Backward(a, x, scratch, begin, end);
}

}  // namespace sparse_attention
