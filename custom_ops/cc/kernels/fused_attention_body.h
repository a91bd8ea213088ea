// Body of the fused attention kernels (see fused_attention.h), written once
// for every precision as templates over a tile-product engine, and included
// once per instruction set (engine_float32.cc, engine_avx512_bf16.cc,
// engine_amx.cc) after simd_body.h, whose Gemm, v16 vectors and
// ExpNonPositive it uses. No include guard: included several times.
//
// The body owns the work units, the online softmax, the masks, the
// non-finite rules and the reductions, all in float32 on one tile S^T
// [key j][query i] (b queries per row, a multiple of 16, so every softmax
// step is a whole-vector operation over 16 queries). An engine E owns the
// operand layouts and the block products:
//
//   using In                      operand element: float, or uint16_t (bf16 bits)
//   kSplitGroups                  whether it computes a split tile group by group
//   struct FwdRow, BwdRow, BwdHead  its buffers (constructed from (a, Scratch*))
//   LoadQuery(a, q, ld, row)      forward: one block row's queries
//   Scores(a, row, k, rows, q0, q1, st)      st[j][i - q0] = scale * k_j . q_i
//   AddPV(a, row, pt, rows, q0, q1, v, o)    o[i - q0] += sum_j pt[j][i - q0] v_j
//   LoadHead(a, k, lq, v, lo, head)          backward: one head's keys and values
//   KeyRows(head, n0)             that head's key rows from n0, [rows, D] natural
//   LoadRow(a, q, lq, dout, lo, row)         backward: one block row's q and dO
//   RowsBad(a, row, q, lq, dout, lo)         whether q or dO rows hold NaN / inf
//   ScoresAndDp(a, head, row, n0, rows, q0, q1, pt, dst)  S^T as Scores, dP^T
//   Gradients(a, head, row, n0, rows, q0, q1, pt, dst, hv, dqa, hk)
//                                 dV += P^T dO, dQa += dS K, dK += dS^T Q (see
//                                 DsScale / DqScale / VisibleQScale for the scale)
//   RowDot(x, y, n)               sum of x * y in float32
// Tiles st / pt / dst have row stride b; "at q0" pointers point at column q0.

namespace fused {

using ::sparse_attention::AttentionBackwardArgs;
using ::sparse_attention::AttentionForwardArgs;
using ::sparse_attention::AttentionProblem;
using ::sparse_attention::Scratch;
using ::sparse_attention::SplitUnit;
using ::sparse_attention::Unit;

constexpr float kPosInf = __builtin_inff();

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

// The body's own forward buffers, then the engine's.
template <class E>
struct ForwardBuffers {
  float* st;     // [b, b]  S^T, then P^T
  float* o;      // [b, Dv] unnormalised output rows
  float* m;      // [b] running max per query
  float* l;      // [b] running sum per query
  float* alpha;  // [b] rescale factor of this step
  typename E::FwdRow row;
  ForwardBuffers(const AttentionProblem& a, Scratch* s)
      : st(s->Take<float>(a.p.block * a.p.block)),
        o(s->Take<float>(a.p.block * a.value_dim)),
        m(s->Take<float>(a.p.block)),
        l(s->Take<float>(a.p.block)),
        alpha(s->Take<float>(a.p.block)),
        row(a, s) {}
};

template <class E>
struct BackwardBuffers {
  float* pt;       // [b, b]  P^T
  float* dst;      // [b, b]  dP^T, then dS^T
  float* dqa;      // [b, D]  dQ_I (times 1 / DqScale)
  float* lse;      // [b] lse per query, +inf for rows with no visible key
  float* delta;    // [b] sum_d dO * O per query
  float* hk;       // [N, D]  this head's dK
  float* hv;       // [N, Dv] this head's dV
  uint8_t* k_bad;  // [N / b] 1 if key block J of this head holds a NaN or inf
  typename E::BwdHead head;
  typename E::BwdRow row;
  BackwardBuffers(const AttentionProblem& a, Scratch* s)
      : pt(s->Take<float>(a.p.block * a.p.block)),
        dst(s->Take<float>(a.p.block * a.p.block)),
        dqa(s->Take<float>(a.p.block * a.p.head_dim)),
        lse(s->Take<float>(a.p.block)),
        delta(s->Take<float>(a.p.block)),
        hk(s->Take<float>(a.p.seq * a.p.head_dim)),
        hv(s->Take<float>(a.p.seq * a.value_dim)),
        k_bad(s->Take<uint8_t>(a.p.t.num_blocks)),
        head(a, s),
        row(a, s) {}
};

// The forward over the query block-row units [begin, end).
template <class E>
void Forward(const AttentionProblem& a, const AttentionForwardArgs<typename E::In>& x,
             void* scratch, int64_t begin, int64_t end) {
  const auto& p = a.p;
  const int64_t bs = p.block, D = p.head_dim, Dv = a.value_dim, nb = p.t.num_blocks;
  Scratch sc(scratch);
  ForwardBuffers<E> buf(a, &sc);
  float *st = buf.st, *o = buf.o, *m = buf.m, *l = buf.l, *alpha = buf.alpha;
  for (int64_t u = begin; u < end; ++u) {
    const Unit w = SplitUnit(p, u);
    const int64_t head = w.g * p.t.layout_heads + w.h, row = w.h * nb + w.i;
    const int64_t z0 = p.t.row_offsets[row], z1 = p.t.row_offsets[row + 1];
    E::LoadQuery(a, x.q + a.q_offset(w.b, w.i * bs, head), a.q_stride(), buf.row);
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
      const typename E::In* kj = x.k + a.k_offset(w.b, j * bs, head);  // K_J, V_J
      const typename E::In* vj = x.v + a.v_offset(w.b, j * bs, head);
      const int32_t* qr = E::kSplitGroups ? SplitRanges(a, z) : nullptr;
      if (qr == nullptr) {
        E::Scores(a, buf.row, kj + j0 * D, rows, 0, bs, sr);
      } else {  // per group of 16 keys, on the queries that see it
        for (int64_t g = j0 / 16; g < j1 / 16; ++g) {
          const int64_t q0 = qr[2 * g], q1 = qr[2 * g + 1];
          if (q1 > q0) E::Scores(a, buf.row, kj + 16 * g * D, 16, q0, q1, st + 16 * g * bs + q0);
          FillOutside(st + 16 * g * bs, bs, q0, q1, kNegInf);
        }
      }
      ApplyMasks(sr, TileBias(a, z, j0), KeyRow(a, w.b, j, j0), rows, bs);
      if (OnlineSoftmaxStep(sr, rows, bs, m, l, alpha))
        for (int64_t i = 0; i < bs; ++i)
          if (alpha[i] != 1.f) Scale(o + i * Dv, alpha[i], Dv);
      if (qr == nullptr) {  // O += P V_J, P[i][j] = st[j][i]
        E::AddPV(a, buf.row, sr, rows, 0, bs, vj + j0 * Dv, o);
      } else {
        for (int64_t g = j0 / 16; g < j1 / 16; ++g) {
          const int64_t q0 = qr[2 * g], q1 = qr[2 * g + 1];
          if (q1 > q0)
            E::AddPV(a, buf.row, st + 16 * g * bs + q0, 16, q0, q1, vj + 16 * g * Dv,
                     o + q0 * Dv);
        }
      }
    }
    FinishRows(o, m, l, bs, Dv, x.out + a.o_offset(w.b, w.i * bs, head), a.o_stride(),
               x.lse + a.lse_offset(w.b, head, w.i * bs));
  }
}

// The backward over the units [begin, end) of num_backward_units().
template <class E>
void Backward(const AttentionProblem& a, const AttentionBackwardArgs<typename E::In>& x,
              void* scratch, int64_t begin, int64_t end) {
  using In = typename E::In;
  const auto& p = a.p;
  const int64_t bs = p.block, D = p.head_dim, Dv = a.value_dim, nb = p.t.num_blocks;
  const int64_t S = a.segments;
  const int64_t lq = a.q_stride(), lo = a.o_stride();
  const float ds_scale = E::DsScale(a), dq_scale = E::DqScale(a);
  Scratch sc(scratch);
  BackwardBuffers<E> buf(a, &sc);
  float *pt = buf.pt, *dst = buf.dst, *dqa = buf.dqa, *lse = buf.lse, *delta = buf.delta;
  float *hk = buf.hk, *hv = buf.hv;
  for (int64_t u = begin; u < end; ++u) {
    const BackwardTarget t = BackwardUnit(a, x, u);
    const Unit& w = t.w;
    const int64_t head = t.head, seg = t.seg;
    E::LoadHead(a, x.k + a.q_offset(w.b, 0, head), lq, x.v + a.o_offset(w.b, 0, head), lo,
                buf.head);
    MarkBadKeyBlocks(a, E::KeyRows(a, buf.head, 0), buf.k_bad);
    std::memset(hk, 0, p.seq * D * sizeof(float));
    std::memset(hv, 0, p.seq * Dv * sizeof(float));
    const int32_t* seg_rows = a.segment_rows + w.h * (S + 1);
    for (int64_t bi = seg_rows[seg]; bi < seg_rows[seg + 1]; ++bi) {
      const int64_t row = w.h * nb + bi;
      const int64_t z0 = p.t.row_offsets[row], z1 = p.t.row_offsets[row + 1];
      float* dq = x.dq + a.q_offset(w.b, bi * bs, head);
      if (z0 == z1) {  // no kept block: dQ = 0
        ZeroRows(dq, lq, bs, D);
        continue;
      }
      const In* q = x.q + a.q_offset(w.b, bi * bs, head);
      const In* dout = x.dout + a.o_offset(w.b, bi * bs, head);
      const In* out = x.out + a.o_offset(w.b, bi * bs, head);
      if (bi + 1 < seg_rows[seg + 1]) PrefetchNextRow(a, q, dout, out, dq);
      E::LoadRow(a, q, lq, dout, lo, buf.row);
      for (int64_t i = 0; i < bs; ++i) delta[i] = E::RowDot(dout + i * lo, out + i * lo, Dv);
      LoadLse(a, x.lse, w.b, head, bi * bs, lse);
      const bool rows_bad = E::RowsBad(a, buf.row, q, lq, dout, lo);
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
        const int32_t* qr = E::kSplitGroups ? SplitRanges(a, z) : nullptr;
        if (qr == nullptr) {
          E::ScoresAndDp(a, buf.head, buf.row, n0, rows, 0, bs, pr, dr);
        } else {  // per group of 16 keys, on the queries that see it
          for (int64_t g = j0 / 16; g < j1 / 16; ++g) {
            const int64_t q0 = qr[2 * g], q1 = qr[2 * g + 1];
            if (q1 > q0)
              E::ScoresAndDp(a, buf.head, buf.row, j * bs + 16 * g, 16, q0, q1,
                             pt + 16 * g * bs + q0, dst + 16 * g * bs + q0);
            FillOutside(pt + 16 * g * bs, bs, q0, q1, kNegInf);  // P = 0 there
            FillOutside(dst + 16 * g * bs, bs, q0, q1, 0.f);     // so dS = 0
          }
        }
        ApplyMasks(pr, bias, keys, rows, bs);
        ProbsAndScoreGrad(pr, dr, lse, delta, ds_scale, rows, bs, bias, keys);
        if (NeedsVisibleProducts(bias, keys, rows_bad || buf.k_bad[j])) {
          VisibleProducts(a, pr, dr, bias, keys, rows, q, lq, E::VisibleQScale(a), dout, lo,
                          E::KeyRows(a, buf.head, n0), hv + n0 * Dv, dqa, hk + n0 * D);
        } else if (qr == nullptr) {
          E::Gradients(a, buf.head, buf.row, n0, rows, 0, bs, pr, dr, hv + n0 * Dv, dqa,
                       hk + n0 * D);
        } else {
          for (int64_t g = j0 / 16; g < j1 / 16; ++g) {
            const int64_t q0 = qr[2 * g], q1 = qr[2 * g + 1], ng = j * bs + 16 * g;
            if (q1 > q0)
              E::Gradients(a, buf.head, buf.row, ng, 16, q0, q1, pt + 16 * g * bs + q0,
                           dst + 16 * g * bs + q0, hv + ng * Dv, dqa + q0 * D, hk + ng * D);
          }
        }
      }
      for (int64_t i = 0; i < bs; ++i)
        for (int64_t d = 0; d < D; ++d) dq[i * lq + d] = dq_scale * dqa[i * D + d];
    }
    StoreHead(a, w.b, head, hk, hv, t.dk, t.dv);
  }
}

// ---------------------------------------------------------------------------
// The float32 engine: products on this ISA's Gemm, scale applied to q.
struct F32Engine {
  using In = float;
  static constexpr bool kSplitGroups = true;

  struct FwdRow {
    float* qt;  // [D, b] scale * Q_I^T
    FwdRow(const AttentionProblem& a, Scratch* s) : qt(s->Take<float>(a.p.head_dim * a.p.block)) {}
  };
  struct BwdHead {
    float* pk;  // [N, D]  this head's keys
    float* pv;  // [N, Dv] this head's values
    BwdHead(const AttentionProblem& a, Scratch* s)
        : pk(s->Take<float>(a.p.seq * a.p.head_dim)), pv(s->Take<float>(a.p.seq * a.value_dim)) {}
  };
  struct BwdRow {
    float* qt;   // [D, b]  scale * Q_I^T
    float* qs;   // [b, D]  scale * Q_I
    float* dot;  // [Dv, b] dO_I^T
    float* dor;  // [b, Dv] dO_I
    BwdRow(const AttentionProblem& a, Scratch* s)
        : qt(s->Take<float>(a.p.head_dim * a.p.block)),
          qs(s->Take<float>(a.p.block * a.p.head_dim)),
          dot(s->Take<float>(a.value_dim * a.p.block)),
          dor(s->Take<float>(a.p.block * a.value_dim)) {}
  };

  static void LoadQuery(const AttentionProblem& a, const float* q, int64_t ld, FwdRow& r) {
    TransposePanel(q, ld, a.p.block, a.p.head_dim, a.scale, r.qt);
  }
  static void Scores(const AttentionProblem& a, const FwdRow& r, const float* k, int64_t rows,
                     int64_t q0, int64_t q1, float* st) {
    const int64_t bs = a.p.block, D = a.p.head_dim;
    GemmOverwrite(rows, q1 - q0, D, k, D, 1, r.qt + q0, bs, st, bs);
  }
  static void AddPV(const AttentionProblem& a, FwdRow&, const float* pt, int64_t rows,
                    int64_t q0, int64_t q1, const float* v, float* o) {
    const int64_t Dv = a.value_dim;
    Gemm(q1 - q0, Dv, rows, pt, 1, a.p.block, v, Dv, o, Dv);
  }

  static void LoadHead(const AttentionProblem& a, const float* k, int64_t lq, const float* v,
                       int64_t lo, BwdHead& h) {
    PackHead(k, lq, a.p.seq, a.p.head_dim, h.pk);
    PackHead(v, lo, a.p.seq, a.value_dim, h.pv);
  }
  static const float* KeyRows(const AttentionProblem& a, const BwdHead& h, int64_t n0) {
    return h.pk + n0 * a.p.head_dim;
  }
  static void LoadRow(const AttentionProblem& a, const float* q, int64_t lq, const float* dout,
                      int64_t lo, BwdRow& r) {
    const int64_t bs = a.p.block, D = a.p.head_dim, Dv = a.value_dim;
    TransposePanel(q, lq, bs, D, a.scale, r.qt);
    TransposePanel(dout, lo, bs, Dv, 1.f, r.dot);
    for (int64_t i = 0; i < bs; ++i) {
      for (int64_t d = 0; d < D; ++d) r.qs[i * D + d] = a.scale * q[i * lq + d];
      std::memcpy(r.dor + i * Dv, dout + i * lo, Dv * sizeof(float));
    }
  }
  // On the scaled rows: scale * q can overflow where q does not.
  static bool RowsBad(const AttentionProblem& a, const BwdRow& r, const float*, int64_t,
                      const float*, int64_t) {
    const int64_t bs = a.p.block, D = a.p.head_dim, Dv = a.value_dim;
    return !RowsFinite(r.qs, D, bs, D) || !RowsFinite(r.dor, Dv, bs, Dv);
  }
  static void ScoresAndDp(const AttentionProblem& a, const BwdHead& h, const BwdRow& r,
                          int64_t n0, int64_t rows, int64_t q0, int64_t q1, float* pt,
                          float* dst) {
    const int64_t bs = a.p.block, D = a.p.head_dim, Dv = a.value_dim;
    GemmOverwrite(rows, q1 - q0, D, h.pk + n0 * D, D, 1, r.qt + q0, bs, pt, bs);       // S^T
    GemmOverwrite(rows, q1 - q0, Dv, h.pv + n0 * Dv, Dv, 1, r.dot + q0, bs, dst, bs);  // dP^T
  }
  static void Gradients(const AttentionProblem& a, const BwdHead& h, BwdRow& r, int64_t n0,
                        int64_t rows, int64_t q0, int64_t q1, float* pt, float* dst, float* hv,
                        float* dqa, float* hk) {
    const int64_t bs = a.p.block, D = a.p.head_dim, Dv = a.value_dim, nq = q1 - q0;
    Gemm(rows, Dv, nq, pt, bs, 1, r.dor + q0 * Dv, Dv, hv, Dv);   // dV_J += P^T dO_I
    Gemm(nq, D, rows, dst, 1, bs, h.pk + n0 * D, D, dqa, D);      // dQ_I += dS K_J
    Gemm(rows, D, nq, dst, bs, 1, r.qs + q0 * D, D, hk, D);       // dK_J += dS^T Q_I
  }
  static float DsScale(const AttentionProblem&) { return 1.f; }
  static float DqScale(const AttentionProblem& a) { return a.scale; }
  static float VisibleQScale(const AttentionProblem& a) { return a.scale; }
  static float RowDot(const float* x, const float* y, int64_t n) { return Dot(x, y, n); }
};

}  // namespace fused
