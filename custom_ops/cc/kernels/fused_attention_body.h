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

// Per-unit work buffers, allocated once per call of a kernel and not
// zeroed: every buffer is written before it is read. `floats` is the sum of
// the slices; room for the alignment of up to 32 slices is added.
struct Buffers {
  explicit Buffers(int64_t floats) : data(new float[floats + 16 * 33]) {}
  float* take(int64_t n) {  // 64-byte aligned slices
    float* base = data.get() + used;
    const uintptr_t mis = (reinterpret_cast<uintptr_t>(base) / sizeof(float)) % 16;
    const int64_t pad = mis ? 16 - mis : 0;
    used += pad + n;
    return base + pad;
  }
  std::unique_ptr<float[]> data;
  int64_t used = 0;
};

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

// rows key rows of S^T (row stride bs): st[j][:] += bias[j][:], or -inf for
// padded keys j.
inline void ApplyMasks(float* st, const float* bias, const bool* keys, int64_t rows, int64_t bs) {
  if (bias == nullptr && keys == nullptr) return;
  const v16 neg = (v16){} + kNegInf;
  for (int64_t j = 0; j < rows; ++j) {
    float* row = st + j * bs;
    if (keys != nullptr && !keys[j]) {
      for (int64_t c = 0; c < bs; c += 16) Store(row + c, neg);
    } else if (bias != nullptr) {
      for (int64_t c = 0; c < bs; c += 16) Store(row + c, Load(row + c) + Load(bias + j * bs + c));
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
// key rows, row stride bs). Makes pt = P^T = exp(S^T - lse) and
// dst = dS^T = s * P^T * (dP^T - delta).
inline void ProbsAndScoreGrad(float* pt, float* dst, const float* lse, const float* delta,
                              float s, int64_t rows, int64_t bs) {
  for (int64_t jj = 0; jj < rows; ++jj)
    for (int64_t c = 0; c < bs; c += 16) {
      const v16 pr = ExpNonPositive(Load(pt + jj * bs + c) - Load(lse + c));
      Store(pt + jj * bs + c, pr);
      Store(dst + jj * bs + c, pr * (Load(dst + jj * bs + c) - Load(delta + c)) * s);
    }
}

// out rows (stride ld) = o / l; lse = m + log(l), or 0 and -inf for rows
// with no visible key.
inline void FinishRows(const float* o, const float* m, const float* l, int64_t bs, int64_t dv,
                       float* out, int64_t ld, float* lse) {
  for (int64_t i = 0; i < bs; ++i) {
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    for (int64_t d = 0; d < dv; ++d) out[i * ld + d] = o[i * dv + d] * inv;
  }
  for (int64_t c = 0; c < bs; c += 16) {  // bs is a multiple of 16
    const v16 lv = Load(l + c);
    const v16i any = lv > 0.f;  // l >= 1 when a key is visible
    Store(lse + c, any != 0 ? Load(m + c) + LogPositive(any != 0 ? lv : 1.f) : kNegInf);
  }
}

// The key-padding flags of block j (null: all real), the tile's bias (null:
// full tile), and its row of per-query lse (+inf where a row sees no key,
// so that its probabilities come out 0).
inline void LoadLse(const AttentionProblem& a, const float* lse_in, int64_t b, int64_t head,
                    int64_t row0, float* lse) {
  for (int64_t i = 0; i < a.p.block; ++i) {
    const float v = lse_in[a.lse_offset(b, head, row0 + i)];
    lse[i] = v == kNegInf ? kPosInf : v;  // exp(anything - inf) = 0
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

void Forward(const AttentionProblem& a, const AttentionForwardArgs<float>& x, int64_t begin,
             int64_t end) {
  const auto& p = a.p;
  const int64_t bs = p.block, D = p.head_dim, Dv = a.value_dim, nb = p.t.num_blocks;
  const int64_t ldk = D, ldv = Dv;
  Buffers buf(D * bs + bs * bs + bs * Dv + 3 * bs);
  float* qt = buf.take(D * bs);      // [D, b]  scale * Q_I^T
  float* st = buf.take(bs * bs);     // [b, b]  S^T, then P^T
  float* o = buf.take(bs * Dv);      // [b, Dv] unnormalised output rows
  float* m = buf.take(bs);           // running max per query
  float* l = buf.take(bs);           // running sum per query
  float* alpha = buf.take(bs);       // rescale factor of this step
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

void Backward(const AttentionProblem& a, const AttentionBackwardArgs<float>& x, int64_t begin,
              int64_t end) {
  const auto& p = a.p;
  const int64_t bs = p.block, D = p.head_dim, Dv = a.value_dim, nb = p.t.num_blocks;
  const int64_t S = a.segments, N = p.seq;
  const int64_t lq = a.q_stride(), lo = a.o_stride();
  Buffers buf(2 * D * bs + 2 * bs * bs + 2 * Dv * bs + bs * D + 2 * bs + 2 * N * (D + Dv));
  float* qt = buf.take(D * bs);    // [D, b]  scale * Q_I^T
  float* qs = buf.take(bs * D);    // [b, D]  scale * Q_I
  float* dot = buf.take(Dv * bs);  // [Dv, b] dO_I^T
  float* dor = buf.take(bs * Dv);  // [b, Dv] dO_I
  float* pt = buf.take(bs * bs);   // [b, b]  P^T
  float* dst = buf.take(bs * bs);  // [b, b]  dP^T, then dS^T
  float* dqa = buf.take(bs * D);   // [b, D]  dQ_I / scale
  float* lse = buf.take(bs);       // lse per query, +inf for rows with no visible key
  float* delta = buf.take(bs);     // sum_d dO * O per query
  float* pk = buf.take(N * D);     // [N, D]  this head's keys
  float* pv = buf.take(N * Dv);    // [N, Dv] this head's values
  float* hk = buf.take(N * D);     // [N, D]  this head's dK
  float* hv = buf.take(N * Dv);    // [N, Dv] this head's dV
  for (int64_t u = begin; u < end; ++u) {
    const BackwardTarget t = BackwardUnit(a, x, u);
    const Unit& w = t.w;
    const int64_t head = t.head, seg = t.seg;
    PackHead(x.k + a.q_offset(w.b, 0, head), lq, N, D, pk);
    PackHead(x.v + a.o_offset(w.b, 0, head), lo, N, Dv, pv);
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
      std::memset(dqa, 0, bs * D * sizeof(float));
      for (int64_t z = z0; z < z1; ++z) {
        const int64_t j = p.t.blocks[3 * z + 2];
        int64_t j0, j1;  // the tile's key rows that can be visible
        KeyRange(a, z, &j0, &j1);
        if (j1 <= j0) continue;
        const int64_t rows = j1 - j0, n0 = j * bs + j0;
        float *pr = pt + j0 * bs, *dr = dst + j0 * bs;
        const float* kr = pk + n0 * D;
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
        ApplyMasks(pr, TileBias(a, z, j0), KeyRow(a, w.b, j, j0), rows, bs);
        ProbsAndScoreGrad(pr, dr, lse, delta, 1.f, rows, bs);
        if (qr == nullptr) {
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
