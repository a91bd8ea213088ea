// Body of the fused attention kernels (see fused_attention.h), included once
// per instruction set by simd.cc after simd_body.h, whose Gemm, v16 vectors
// and ExpNonPositive it uses. No include guard: included several times.
//
// Tiles are [key j][query i] with b (a multiple of 16) queries per row, so
// every softmax step is a whole-vector operation over 16 queries.

namespace fused {

using ::sparse_attention::AttentionBackwardArgs;
using ::sparse_attention::AttentionForwardArgs;
using ::sparse_attention::AttentionProblem;
using ::sparse_attention::SplitUnit;
using ::sparse_attention::Unit;

constexpr float kPosInf = __builtin_inff();

using ::sparse_attention::BackwardScratch;
using ::sparse_attention::ForwardScratch;
using ::sparse_attention::Scratch;

// One head's rows of a token-major [B, N, H, w] tensor (x points at the
// head's row 0, row stride ld) -> dst [N, w], contiguous.
template <typename T>
inline void PackHead(const T* x, int64_t ld, int64_t seq, int64_t w, T* dst) {
  for (int64_t n = 0; n < seq; ++n) std::memcpy(dst + n * w, x + n * ld, w * sizeof(T));
}

// n rows of w floats (row stride ld) <- 0.
inline void ZeroRows(float* rows, int64_t ld, int64_t n, int64_t w) {
  for (int64_t i = 0; i < n; ++i) std::memset(rows + i * ld, 0, w * sizeof(float));
}

#if defined(SPARSE_ATTENTION_BODY_AVX512)
// 16 rows of 16 floats -> their transpose, in registers (unpack 32-bit and
// 64-bit pairs within 128-bit lanes, then gather the lanes in two steps).
inline __attribute__((always_inline)) void Transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + c], lane L: rows 4i..4i+3 of column 4L + c
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 u0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);  // lanes 0, 2
    const __m512 u1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);  // lanes 1, 3
    const __m512 w0 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    const __m512 w1 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
    t[c] = _mm512_shuffle_f32x4(u0, w0, 0x88);       // column c
    t[8 + c] = _mm512_shuffle_f32x4(u0, w0, 0xdd);   // column 8 + c
    t[4 + c] = _mm512_shuffle_f32x4(u1, w1, 0x88);   // column 4 + c
    t[12 + c] = _mm512_shuffle_f32x4(u1, w1, 0xdd);  // column 12 + c
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

// dst[d][i] = s * rows[i][d] (bs rows of stride ld, bs a multiple of 16,
// width w): a transposed panel. Where AVX-512 is compiled in, 16 x 16 blocks
// go through registers (the scalar loop's scattered stores took 8% of the
// forward's time).
inline void TransposePanel(const float* rows, int64_t ld, int64_t bs, int64_t w, float s,
                           float* dst) {
  int64_t d0 = 0;
#if defined(SPARSE_ATTENTION_BODY_AVX512)
  const __m512 sv = _mm512_set1_ps(s);
  for (; d0 + 16 <= w; d0 += 16)
    for (int64_t i0 = 0; i0 < bs; i0 += 16) {
      __m512 r[16];
      for (int k = 0; k < 16; ++k)
        r[k] = _mm512_mul_ps(sv, _mm512_loadu_ps(rows + (i0 + k) * ld + d0));
      Transpose16(r);
      for (int c = 0; c < 16; ++c) _mm512_storeu_ps(dst + (d0 + c) * bs + i0, r[c]);
    }
#endif
  for (int64_t i = 0; i < bs; ++i)
    for (int64_t d = d0; d < w; ++d) dst[d * bs + i] = s * rows[i * ld + d];
}

// Key padding of the keys of block J from key row j0 on, or null when all
// keys are real.
inline const bool* KeyRow(const AttentionProblem& a, int64_t b, int64_t j, int64_t j0) {
  return a.key_padding == nullptr ? nullptr
                                  : a.key_padding + b * a.p.seq + j * a.p.block + j0;
}

// The transposed tile mask of block z from key row j0 on, or null (full tile).
inline const float* TileBias(const AttentionProblem& a, int64_t z, int64_t j0) {
  const int32_t mi = a.mask_index[z];
  return mi < 0 ? nullptr : a.bias_t + mi * a.p.tile() + j0 * a.p.block;
}

// The key rows [lo, hi) of block z's tile that can be visible (all b rows
// for a full tile).
inline void KeyRange(const AttentionProblem& a, int64_t z, int64_t* lo, int64_t* hi) {
  const int32_t mi = a.mask_index[z];
  if (mi < 0 || a.key_range == nullptr) {
    *lo = 0, *hi = a.p.block;
  } else {
    *lo = a.key_range[2 * mi], *hi = a.key_range[2 * mi + 1];
  }
}

// The query ranges [lo, hi) of tile z's groups of 16 keys ([b/16, 2]), or
// null when every group is seen by all queries (full tiles, most masks).
inline const int32_t* SplitRanges(const AttentionProblem& a, int64_t z) {
  const int32_t mi = a.mask_index[z];
  if (mi < 0 || a.split_tile == nullptr || !a.split_tile[mi]) return nullptr;
  return a.query_range + mi * (a.p.block / 16) * 2;
}

// Columns [0, q0) and [q1, bs) of 16 tile rows (row stride bs) <- v: the
// queries a group's products skipped.
inline void FillOutside(float* rows, int64_t bs, int64_t q0, int64_t q1, float v) {
  const v16 f = (v16){} + v;
  for (int64_t r = 0; r < 16; ++r) {
    for (int64_t c = 0; c < q0; c += 16) Store(rows + r * bs + c, f);
    for (int64_t c = q1; c < bs; c += 16) Store(rows + r * bs + c, f);
  }
}

// rows key rows of S^T (row stride bs): hidden elements (bias -inf, or a
// padded key j) <- -inf. Selected, not added (NaN + -inf is NaN): a NaN or
// inf score of a hidden element, from a NaN or inf in q or k, reaches no
// query that cannot see the key.
inline void ApplyMasks(float* st, const float* bias, const bool* keys, int64_t rows, int64_t bs) {
  if (bias == nullptr && keys == nullptr) return;
  const v16 neg = (v16){} + kNegInf;
  for (int64_t j = 0; j < rows; ++j) {
    float* row = st + j * bs;
    if (keys != nullptr && !keys[j]) {
      for (int64_t c = 0; c < bs; c += 16) Store(row + c, neg);
    } else if (bias != nullptr) {
      for (int64_t c = 0; c < bs; c += 16)
        Store(row + c, Load(bias + j * bs + c) == 0.f ? Load(row + c) : neg);
    }
  }
}

// Whether n values are all finite (x * 0 is NaN for NaN and +-inf).
inline bool AllFinite(const float* x, int64_t n) {
  v16 acc = (v16){};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc += Load(x + i) * 0.f;
  float tail = 0.f;
  for (; i < n; ++i) tail += x[i] * 0.f;
  return HorizontalSum(acc) + tail == 0.f;
}

// The same for bfloat16 bits (exponent all ones: NaN or inf).
inline bool AllFinite(const uint16_t* x, int64_t n) {
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= (x[i] & 0x7f80) == 0x7f80;
  return bad == 0;
}

// Whether rows rows of width w (row stride ld) are all finite.
template <typename T>
inline bool RowsFinite(const T* x, int64_t ld, int64_t rows, int64_t w) {
  for (int64_t i = 0; i < rows; ++i)
    if (!AllFinite(x + i * ld, w)) return false;
  return true;
}

// bad[J] = 1 if block J of a head's packed keys [N, D] holds a NaN or inf.
template <typename T>
inline void MarkBadKeyBlocks(const AttentionProblem& a, const T* k, uint8_t* bad) {
  const int64_t n = a.p.block * a.p.head_dim;
  for (int64_t J = 0; J < a.p.t.num_blocks; ++J) bad[J] = AllFinite(k + J * n, n) ? 0 : 1;
}

// Whether a backward tile takes VisibleProducts: it has hidden elements
// (a tile mask or padded keys) and its Q_I, dO_I or K_J rows hold a NaN or
// inf (operands_bad).
inline bool NeedsVisibleProducts(const float* bias, const bool* keys, bool operands_bad) {
  return operands_bad && (bias != nullptr || keys != nullptr);
}

inline float ToFloat(float x) { return x; }
inline float ToFloat(uint16_t bf16) {
  const uint32_t bits = uint32_t{bf16} << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// The backward's three products of one tile, over its visible pairs only:
// dV_J += P^T dO_I, dQ_I += dS K_J, dK_J += qscale * dS^T Q_I, from P^T and
// dS^T (rows key rows from j0, row stride bs, 0 where hidden: see
// ProbsAndScoreGrad). For tiles with hidden elements whose Q_I, dO_I or K_J
// rows hold a NaN or inf, where a GEMM would add 0 * inf = NaN to the rows
// that cannot see it; rare, so plain loops. q, dout: token-major rows of
// the query block (strides lq, lo); k: the tile's key rows [rows, D]; hv,
// hk: their dV, dK rows; dqa: [b, D].
template <typename T>
void VisibleProducts(const AttentionProblem& a, const float* pt, const float* dst,
                     const float* bias, const bool* keys, int64_t rows, const T* q, int64_t lq,
                     float qscale, const T* dout, int64_t lo, const T* k, float* hv, float* dqa,
                     float* hk) {
  const int64_t bs = a.p.block, D = a.p.head_dim, Dv = a.value_dim;
  for (int64_t j = 0; j < rows; ++j) {
    if (keys != nullptr && !keys[j]) continue;
    for (int64_t i = 0; i < bs; ++i) {
      if (bias != nullptr && bias[j * bs + i] != 0.f) continue;
      const float p = pt[j * bs + i], ds = dst[j * bs + i], dsq = ds * qscale;
      for (int64_t d = 0; d < Dv; ++d) hv[j * Dv + d] += p * ToFloat(dout[i * lo + d]);
      for (int64_t d = 0; d < D; ++d) {
        dqa[i * D + d] += ds * ToFloat(k[j * D + d]);
        hk[j * D + d] += dsq * ToFloat(q[i * lq + d]);
      }
    }
  }
}

// Asks for `rows` rows of `width` floats (row stride ld) to be brought into
// the cache, for reading or (write) for writing. Used one work unit ahead for
// the token-major q, out, dout and dq rows: they are H * D floats apart,
// which the hardware prefetcher does not follow, so each row read or
// written cold would wait on memory.
template <typename T>
inline void PrefetchRows(const T* p, int64_t ld, int64_t rows, int64_t width, bool write) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t off = 0; off < width; off += kLine) {
      if (write)
        __builtin_prefetch(p + i * ld + off, 1, 2);
      else
        __builtin_prefetch(p + i * ld + off, 0, 2);
    }
}

// The backward's next block row: its q, dout and out rows (read) and dq
// rows (written), given this row's.
template <typename T>
inline void PrefetchNextRow(const AttentionProblem& a, const T* q, const T* dout, const T* out,
                            const float* dq) {
  const int64_t bs = a.p.block, lq = a.q_stride(), lo = a.o_stride();
  PrefetchRows(q + bs * lq, lq, bs, a.p.head_dim, false);
  PrefetchRows(dout + bs * lo, lo, bs, a.value_dim, false);
  PrefetchRows(out + bs * lo, lo, bs, a.value_dim, false);
  PrefetchRows(dq + bs * lq, lq, bs, a.p.head_dim, true);
}

// One step of the online softmax: st holds the masked scores S^T of the next
// key block (rows key rows, row stride bs). Updates the running max m and sum
// l of each query, turns st into exp(S^T - m) and sets alpha =
// exp(m_old - m_new), the factor that rescales what was accumulated so far.
// Returns whether any alpha differs from 1.
inline bool OnlineSoftmaxStep(float* st, int64_t rows, int64_t bs, float* m, float* l,
                              float* alpha) {
  v16i changed = (v16i){};
  for (int64_t c = 0; c < bs; c += 16) {  // 16 queries at a time
    v16 mx = Load(m + c);
    for (int64_t jj = 0; jj < rows; ++jj) {
      const v16 s = Load(st + jj * bs + c);
      mx = s > mx ? s : mx;
    }
    const v16 shift = mx == kNegInf ? (v16){} : mx;  // no visible key yet: keep 0s
    const v16 al = ExpNonPositive(Load(m + c) - shift);
    v16 sum = (v16){};
    for (int64_t jj = 0; jj < rows; ++jj) {
      const v16 e = ExpNonPositive(Load(st + jj * bs + c) - shift);
      Store(st + jj * bs + c, e);
      sum += e;
    }
    Store(l + c, Load(l + c) * al + sum);
    Store(m + c, mx);
    Store(alpha + c, al);
    changed |= al != 1.f;
  }
  int32_t any = 0;
#pragma GCC unroll 16
  for (int k2 = 0; k2 < 16; ++k2) any |= changed[k2];
  return any != 0;
}

// Backward tile step: pt holds the masked scores S^T, dst holds dP^T (rows
// key rows, row stride bs; bias and keys as for ApplyMasks). Makes pt = P^T
// = exp(S^T - lse) and dst = dS^T = s * P^T * (dP^T - delta), both selected
// to 0 where hidden: a NaN lse or delta (a query row that sees a NaN) or a
// NaN dP (a NaN in dout) stays in the elements the row sees.
inline void ProbsAndScoreGrad(float* pt, float* dst, const float* lse, const float* delta,
                              float s, int64_t rows, int64_t bs, const float* bias,
                              const bool* keys) {
  const v16 zero = (v16){};
  for (int64_t jj = 0; jj < rows; ++jj) {
    float *pr = pt + jj * bs, *dr = dst + jj * bs;
    if (keys != nullptr && !keys[jj]) {
      for (int64_t c = 0; c < bs; c += 16) Store(pr + c, zero), Store(dr + c, zero);
    } else if (bias != nullptr) {
      for (int64_t c = 0; c < bs; c += 16) {
        const v16i vis = Load(bias + jj * bs + c) == 0.f;
        const v16 p = ExpNonPositive(Load(pr + c) - Load(lse + c));
        Store(pr + c, vis ? p : zero);
        Store(dr + c, vis ? p * (Load(dr + c) - Load(delta + c)) * s : zero);
      }
    } else {
      for (int64_t c = 0; c < bs; c += 16) {
        const v16 p = ExpNonPositive(Load(pr + c) - Load(lse + c));
        Store(pr + c, p);
        Store(dr + c, p * (Load(dr + c) - Load(delta + c)) * s);
      }
    }
  }
}

// out rows (stride ld) = o / l; lse = m + log(l), or 0 and -inf for rows
// with no visible key (l = 0), NaN for rows that see a NaN (l = NaN).
inline void FinishRows(const float* o, const float* m, const float* l, int64_t bs, int64_t dv,
                       float* out, int64_t ld, float* lse) {
  for (int64_t i = 0; i < bs; ++i) {
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;  // l = NaN: o is NaN too
    for (int64_t d = 0; d < dv; ++d) out[i * ld + d] = o[i * dv + d] * inv;
  }
  for (int64_t c = 0; c < bs; c += 16) {  // bs is a multiple of 16
    const v16 lv = Load(l + c);
    const v16i any = lv > 0.f;  // l >= 1 when a key is visible
    const v16 none = lv == 0.f ? (v16){} + kNegInf : lv;
    Store(lse + c, any != 0 ? Load(m + c) + LogPositive(any != 0 ? lv : 1.f) : none);
  }
}

// The row of per-query lse of block row `row0`, +inf where a row sees no key
// (-inf) or a NaN (NaN): exp(S - inf) is 0 for finite scores, so the
// probabilities of such a row are 0 except where its score itself is NaN or
// +inf, as in the reference, which divides by 1 where a row's sum is not
// positive.
inline void LoadLse(const AttentionProblem& a, const float* lse_in, int64_t b, int64_t head,
                    int64_t row0, float* lse) {
  for (int64_t i = 0; i < a.p.block; ++i) {
    const float v = lse_in[a.lse_offset(b, head, row0 + i)];
    lse[i] = v == kNegInf || v != v ? kPosInf : v;
  }
}

// Copies one head's dK and dV, accumulated head-major in hk [N, D] and
// hv [N, Dv], to its rows of the token-major dk [B, N, H, D] and dv
// [B, N, H, Dv]. (Summing into token-major rows directly is slower: they are
// H * D floats apart, so a head's rows fall into a few cache sets.)
inline void StoreHead(const AttentionProblem& a, int64_t b, int64_t head, const float* hk,
                      const float* hv, float* dk, float* dv) {
  const int64_t D = a.p.head_dim, Dv = a.value_dim;
  for (int64_t n = 0; n < a.p.seq; ++n) {
    std::memcpy(dk + a.q_offset(b, n, head), hk + n * D, D * sizeof(float));
    std::memcpy(dv + a.o_offset(b, n, head), hv + n * Dv, Dv * sizeof(float));
  }
}

// Backward unit u (segment fastest): its (b, g, h) (w.i unused: the unit
// covers a segment of block rows), head, segment, and the dK/dV it writes:
// dk, dv for segment 0, else that segment's partial sums.
struct BackwardTarget {
  Unit w;
  int64_t head, seg;
  float* dk;
  float* dv;
};

template <typename T>
inline BackwardTarget BackwardUnit(const AttentionProblem& a, const AttentionBackwardArgs<T>& x,
                                   int64_t u) {
  const auto& p = a.p;
  const int64_t S = a.segments, v = u / S, seg = u % S;
  const Unit w{v / p.t.layout_heads / p.groups(), v / p.t.layout_heads % p.groups(),
               v % p.t.layout_heads, 0};
  const int64_t k_size = p.batch * p.heads * p.seq * p.head_dim;
  const int64_t v_size = p.batch * p.heads * p.seq * a.value_dim;
  return BackwardTarget{w, w.g * p.t.layout_heads + w.h, seg,
                        seg == 0 ? x.dk : x.partial_k + (seg - 1) * k_size,
                        seg == 0 ? x.dv : x.partial_v + (seg - 1) * v_size};
}

void Forward(const AttentionProblem& a, const AttentionForwardArgs<float>& x, void* scratch,
             int64_t begin, int64_t end) {
  const auto& p = a.p;
  const int64_t bs = p.block, D = p.head_dim, Dv = a.value_dim, nb = p.t.num_blocks;
  const int64_t ldk = D, ldv = Dv;
  Scratch sc(scratch);
  const ForwardScratch buf(a, &sc);
  float *qt = buf.qt, *st = buf.st, *o = buf.o, *m = buf.m, *l = buf.l, *alpha = buf.alpha;
  for (int64_t u = begin; u < end; ++u) {
    const Unit w = SplitUnit(p, u);
    const int64_t head = w.g * p.t.layout_heads + w.h, row = w.h * nb + w.i;
    const int64_t z0 = p.t.row_offsets[row], z1 = p.t.row_offsets[row + 1];
    TransposePanel(x.q + a.q_offset(w.b, w.i * bs, head), a.q_stride(), bs, D, a.scale, qt);
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
      const float* kj = x.k + a.k_offset(w.b, j * bs, head);  // K_J, V_J panels
      const float* vj = x.v + a.v_offset(w.b, j * bs, head);
      const int32_t* qr = SplitRanges(a, z);
      if (qr == nullptr) {
        GemmOverwrite(rows, bs, D, kj + j0 * ldk, ldk, 1, qt, bs, sr, bs);  // S^T
      } else {  // per group of 16 keys, on the queries that see it
        for (int64_t g = j0 / 16; g < j1 / 16; ++g) {
          const int64_t q0 = qr[2 * g], q1 = qr[2 * g + 1];
          if (q1 > q0)
            GemmOverwrite(16, q1 - q0, D, kj + 16 * g * ldk, ldk, 1, qt + q0, bs,
                          st + 16 * g * bs + q0, bs);
          FillOutside(st + 16 * g * bs, bs, q0, q1, kNegInf);
        }
      }
      ApplyMasks(sr, TileBias(a, z, j0), KeyRow(a, w.b, j, j0), rows, bs);
      const bool rescale = OnlineSoftmaxStep(sr, rows, bs, m, l, alpha);
      if (rescale)
        for (int64_t i = 0; i < bs; ++i)
          if (alpha[i] != 1.f) Scale(o + i * Dv, alpha[i], Dv);
      // O += P V_J, P[i][j] = st[j][i].
      if (qr == nullptr) {
        Gemm(bs, Dv, rows, sr, 1, bs, vj + j0 * ldv, ldv, o, Dv);
      } else {
        for (int64_t g = j0 / 16; g < j1 / 16; ++g) {
          const int64_t q0 = qr[2 * g], q1 = qr[2 * g + 1];
          if (q1 > q0)
            Gemm(q1 - q0, Dv, 16, st + 16 * g * bs + q0, 1, bs, vj + 16 * g * ldv, ldv,
                 o + q0 * Dv, Dv);
        }
      }
    }
    FinishRows(o, m, l, bs, Dv, x.out + a.o_offset(w.b, w.i * bs, head), a.o_stride(),
               x.lse + a.lse_offset(w.b, head, w.i * bs));
  }
}

void Backward(const AttentionProblem& a, const AttentionBackwardArgs<float>& x, void* scratch,
              int64_t begin, int64_t end) {
  const auto& p = a.p;
  const int64_t bs = p.block, D = p.head_dim, Dv = a.value_dim, nb = p.t.num_blocks;
  const int64_t S = a.segments, N = p.seq;
  const int64_t lq = a.q_stride(), lo = a.o_stride();
  Scratch sc(scratch);
  const BackwardScratch buf(a, &sc);
  float *qt = buf.qt, *qs = buf.qs, *dot = buf.dot, *dor = buf.dor, *pt = buf.pt, *dst = buf.dst;
  float *dqa = buf.dqa, *lse = buf.lse, *delta = buf.delta, *pk = buf.pk, *pv = buf.pv;
  float *hk = buf.hk, *hv = buf.hv;
  for (int64_t u = begin; u < end; ++u) {
    const BackwardTarget t = BackwardUnit(a, x, u);
    const Unit& w = t.w;
    const int64_t head = t.head, seg = t.seg;
    PackHead(x.k + a.q_offset(w.b, 0, head), lq, N, D, pk);
    PackHead(x.v + a.o_offset(w.b, 0, head), lo, N, Dv, pv);
    MarkBadKeyBlocks(a, pk, buf.k_bad);
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
      const float* q = x.q + a.q_offset(w.b, bi * bs, head);
      const float* dout = x.dout + a.o_offset(w.b, bi * bs, head);
      const float* out = x.out + a.o_offset(w.b, bi * bs, head);
      if (bi + 1 < seg_rows[seg + 1]) PrefetchNextRow(a, q, dout, out, dq);
      TransposePanel(q, lq, bs, D, a.scale, qt);
      TransposePanel(dout, lo, bs, Dv, 1.f, dot);
      for (int64_t i = 0; i < bs; ++i) {
        for (int64_t d = 0; d < D; ++d) qs[i * D + d] = a.scale * q[i * lq + d];
        std::memcpy(dor + i * Dv, dout + i * lo, Dv * sizeof(float));
        delta[i] = Dot(dout + i * lo, out + i * lo, Dv);
      }
      LoadLse(a, x.lse, w.b, head, bi * bs, lse);
      const bool rows_bad = !RowsFinite(qs, D, bs, D) || !RowsFinite(dor, Dv, bs, Dv);
      std::memset(dqa, 0, bs * D * sizeof(float));
      for (int64_t z = z0; z < z1; ++z) {
        const int64_t j = p.t.blocks[3 * z + 2];
        int64_t j0, j1;  // the tile's key rows that can be visible
        KeyRange(a, z, &j0, &j1);
        if (j1 <= j0) continue;
        const int64_t rows = j1 - j0, n0 = j * bs + j0;
        float *pr = pt + j0 * bs, *dr = dst + j0 * bs;
        const float* kr = pk + n0 * D;
        const float* bias = TileBias(a, z, j0);
        const bool* keys = KeyRow(a, w.b, j, j0);
        const int32_t* qr = SplitRanges(a, z);
        if (qr == nullptr) {
          GemmOverwrite(rows, bs, D, kr, D, 1, qt, bs, pr, bs);                // S^T
          GemmOverwrite(rows, bs, Dv, pv + n0 * Dv, Dv, 1, dot, bs, dr, bs);   // dP^T
        } else {  // per group of 16 keys, on the queries that see it
          for (int64_t g = j0 / 16; g < j1 / 16; ++g) {
            const int64_t q0 = qr[2 * g], q1 = qr[2 * g + 1], ng = j * bs + 16 * g;
            if (q1 > q0) {
              GemmOverwrite(16, q1 - q0, D, pk + ng * D, D, 1, qt + q0, bs,
                            pt + 16 * g * bs + q0, bs);
              GemmOverwrite(16, q1 - q0, Dv, pv + ng * Dv, Dv, 1, dot + q0, bs,
                            dst + 16 * g * bs + q0, bs);
            }
            FillOutside(pt + 16 * g * bs, bs, q0, q1, kNegInf);  // P = 0 there
            FillOutside(dst + 16 * g * bs, bs, q0, q1, 0.f);     // so dS = 0
          }
        }
        ApplyMasks(pr, bias, keys, rows, bs);
        ProbsAndScoreGrad(pr, dr, lse, delta, 1.f, rows, bs, bias, keys);
        if (NeedsVisibleProducts(bias, keys, rows_bad || buf.k_bad[j])) {
          VisibleProducts(a, pr, dr, bias, keys, rows, q, lq, a.scale, dout, lo, kr,
                          hv + n0 * Dv, dqa, hk + n0 * D);
        } else if (qr == nullptr) {
          Gemm(rows, Dv, bs, pr, bs, 1, dor, Dv, hv + n0 * Dv, Dv);  // dV_J += P^T dO_I
          Gemm(bs, D, rows, dr, 1, bs, kr, D, dqa, D);               // dQ_I += dS K_J
          Gemm(rows, D, bs, dr, bs, 1, qs, D, hk + n0 * D, D);       // dK_J += dS^T Q_I
        } else {
          for (int64_t g = j0 / 16; g < j1 / 16; ++g) {
            const int64_t q0 = qr[2 * g], q1 = qr[2 * g + 1], ng = j * bs + 16 * g;
            if (q1 <= q0) continue;
            const float *pg = pt + 16 * g * bs + q0, *dg = dst + 16 * g * bs + q0;
            Gemm(16, Dv, q1 - q0, pg, bs, 1, dor + q0 * Dv, Dv, hv + ng * Dv, Dv);
            Gemm(q1 - q0, D, 16, dg, 1, bs, pk + ng * D, D, dqa + q0 * D, D);
            Gemm(16, D, q1 - q0, dg, bs, 1, qs + q0 * D, D, hk + ng * D, D);
          }
        }
      }
      for (int64_t i = 0; i < bs; ++i)
        for (int64_t d = 0; d < D; ++d) dq[i * lq + d] = a.scale * dqa[i * D + d];
    }
    StoreHead(a, w.b, head, hk, hv, t.dk, t.dv);
  }
}

}  // namespace fused
