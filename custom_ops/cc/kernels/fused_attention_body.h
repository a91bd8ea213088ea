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

// Per-unit work buffers, allocated once per call of a kernel.
struct Buffers {
  explicit Buffers(int64_t floats) : data(floats + 16) {}
  float* take(int64_t n) {  // 64-byte aligned slices
    float* base = data.data() + used;
    const uintptr_t mis = (reinterpret_cast<uintptr_t>(base) / sizeof(float)) % 16;
    const int64_t pad = mis ? 16 - mis : 0;
    used += pad + n;
    return base + pad;
  }
  std::vector<float> data;
  int64_t used = 0;
};

// dst[d][i] = s * rows[i][d] (b rows of stride ld, width w): a transposed panel.
inline void TransposePanel(const float* rows, int64_t ld, int64_t bs, int64_t w, float s,
                           float* dst) {
  for (int64_t i = 0; i < bs; ++i)
    for (int64_t d = 0; d < w; ++d) dst[d * bs + i] = s * rows[i * ld + d];
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

// Asks for the next key block's panels (rows x width floats, contiguous) to
// be brought into the cache while the current block is computed: each
// panel row is read by one micro-tile, as a stream from L2 otherwise.
inline void PrefetchPanel(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
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
    const bool any = l[i] > 0.f;
    const float inv = any ? 1.f / l[i] : 0.f;
    for (int64_t d = 0; d < dv; ++d) out[i * ld + d] = o[i * dv + d] * inv;
    lse[i] = any ? m[i] + std::log(l[i]) : kNegInf;
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

// Zeroes one head's rows of the token-major dk [B, N, H, D] and dv [B, N, H, Dv]
// (accumulators: gradients of keys no query sees stay 0).
inline void ZeroHead(const AttentionProblem& a, int64_t b, int64_t head, float* dk, float* dv) {
  for (int64_t n = 0; n < a.p.seq; ++n) {
    std::memset(dk + a.q_offset(b, n, head), 0, a.p.head_dim * sizeof(float));
    std::memset(dv + a.o_offset(b, n, head), 0, a.value_dim * sizeof(float));
  }
}

// Backward unit u -> (b, g, h, segment), segment fastest.
inline Unit BackwardUnit(const AttentionProblem& a, int64_t u, int64_t* seg) {
  const auto& p = a.p;
  const int64_t S = a.segments, v = u / S;
  *seg = u % S;
  return Unit{v / p.t.layout_heads / p.groups(), v / p.t.layout_heads % p.groups(),
              v % p.t.layout_heads, 0};
}

void Forward(const AttentionProblem& a, const AttentionForwardArgs<float>& x, int64_t begin,
             int64_t end) {
  const auto& p = a.p;
  const int64_t bs = p.block, D = p.head_dim, Dv = a.value_dim, nb = p.t.num_blocks;
  const int64_t ldk = D, ldv = Dv;
  Buffers buf(D * bs + bs * bs + bs * Dv + 4 * bs + 64);
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
    for (int64_t z = z0; z < z1; ++z) {
      const int64_t j = p.t.blocks[3 * z + 2];
      if (z + 1 < z1) {
        const int64_t jn = p.t.blocks[3 * z + 5];
        PrefetchPanel(x.k + a.k_offset(w.b, jn * bs, head), bs * D * sizeof(float));
        PrefetchPanel(x.v + a.v_offset(w.b, jn * bs, head), bs * Dv * sizeof(float));
      }
      int64_t j0, j1;  // the tile's key rows that can be visible
      KeyRange(a, z, &j0, &j1);
      if (j1 <= j0) continue;
      const int64_t rows = j1 - j0;
      float* sr = st + j0 * bs;
      GemmOverwrite(rows, bs, D, x.k + a.k_offset(w.b, j * bs + j0, head), ldk, 1, qt, bs, sr,
                    bs);                                                      // S^T
      ApplyMasks(sr, TileBias(a, z, j0), KeyRow(a, w.b, j, j0), rows, bs);
      const bool rescale = OnlineSoftmaxStep(sr, rows, bs, m, l, alpha);
      if (rescale)
        for (int64_t i = 0; i < bs; ++i)
          if (alpha[i] != 1.f) Scale(o + i * Dv, alpha[i], Dv);
      // O += P V_J, P[i][j] = st[j][i].
      Gemm(bs, Dv, rows, sr, 1, bs, x.v + a.v_offset(w.b, j * bs + j0, head), ldv, o, Dv);
    }
    FinishRows(o, m, l, bs, Dv, x.out + a.o_offset(w.b, w.i * bs, head), a.o_stride(),
               x.lse + a.lse_offset(w.b, head, w.i * bs));
  }
}

void Backward(const AttentionProblem& a, const AttentionBackwardArgs<float>& x, int64_t begin,
              int64_t end) {
  const auto& p = a.p;
  const int64_t bs = p.block, D = p.head_dim, Dv = a.value_dim, nb = p.t.num_blocks;
  const int64_t ldk = D, ldv = Dv, S = a.segments;
  const int64_t lq = a.q_stride(), lo = a.o_stride();
  const int64_t k_size = p.batch * p.heads * p.seq * D, v_size = p.batch * p.heads * p.seq * Dv;
  Buffers buf(2 * D * bs + 2 * bs * bs + 2 * Dv * bs + bs * D + 2 * bs + 64);
  float* qt = buf.take(D * bs);    // [D, b]  scale * Q_I^T
  float* qs = buf.take(bs * D);    // [b, D]  scale * Q_I
  float* dot = buf.take(Dv * bs);  // [Dv, b] dO_I^T
  float* dor = buf.take(bs * Dv);  // [b, Dv] dO_I
  float* pt = buf.take(bs * bs);   // [b, b]  P^T
  float* dst = buf.take(bs * bs);  // [b, b]  dP^T, then dS^T
  float* dqa = buf.take(bs * D);   // [b, D]  dQ_I / scale
  float* lse = buf.take(bs);       // lse per query, +inf for rows with no visible key
  float* delta = buf.take(bs);     // sum_d dO * O per query
  for (int64_t u = begin; u < end; ++u) {
    int64_t seg;
    const Unit w = BackwardUnit(a, u, &seg);  // w.i unused: the unit covers a row segment
    const int64_t head = w.g * p.t.layout_heads + w.h;
    float* dk = seg == 0 ? x.dk : x.partial_k + (seg - 1) * k_size;
    float* dv = seg == 0 ? x.dv : x.partial_v + (seg - 1) * v_size;
    ZeroHead(a, w.b, head, dk, dv);
    const int32_t* seg_rows = a.segment_rows + w.h * (S + 1);
    for (int64_t bi = seg_rows[seg]; bi < seg_rows[seg + 1]; ++bi) {
      const int64_t row = w.h * nb + bi;
      const int64_t z0 = p.t.row_offsets[row], z1 = p.t.row_offsets[row + 1];
      float* dq = x.dq + a.q_offset(w.b, bi * bs, head);
      if (z0 == z1) {
        for (int64_t i = 0; i < bs; ++i) std::memset(dq + i * lq, 0, D * sizeof(float));
        continue;
      }
      const float* q = x.q + a.q_offset(w.b, bi * bs, head);
      const float* dout = x.dout + a.o_offset(w.b, bi * bs, head);
      TransposePanel(q, lq, bs, D, a.scale, qt);
      TransposePanel(dout, lo, bs, Dv, 1.f, dot);
      for (int64_t i = 0; i < bs; ++i) {
        for (int64_t d = 0; d < D; ++d) qs[i * D + d] = a.scale * q[i * lq + d];
        std::memcpy(dor + i * Dv, dout + i * lo, Dv * sizeof(float));
        delta[i] = x.delta[a.lse_offset(w.b, head, bi * bs + i)];
      }
      LoadLse(a, x.lse, w.b, head, bi * bs, lse);
      std::memset(dqa, 0, bs * D * sizeof(float));
      for (int64_t z = z0; z < z1; ++z) {
        const int64_t j = p.t.blocks[3 * z + 2];
        const float* k = x.k + a.k_offset(w.b, j * bs, head);
        const float* v = x.v + a.v_offset(w.b, j * bs, head);
        int64_t j0, j1;  // the tile's key rows that can be visible
        KeyRange(a, z, &j0, &j1);
        if (j1 <= j0) continue;
        const int64_t rows = j1 - j0;
        float *pr = pt + j0 * bs, *dr = dst + j0 * bs;
        const float* kr = k + j0 * D;
        GemmOverwrite(rows, bs, D, kr, ldk, 1, qt, bs, pr, bs);             // S^T
        ApplyMasks(pr, TileBias(a, z, j0), KeyRow(a, w.b, j, j0), rows, bs);
        GemmOverwrite(rows, bs, Dv, v + j0 * Dv, ldv, 1, dot, bs, dr, bs);  // dP^T
        ProbsAndScoreGrad(pr, dr, lse, delta, 1.f, rows, bs);
        Gemm(rows, Dv, bs, pr, bs, 1, dor, Dv, dv + a.o_offset(w.b, j * bs + j0, head), lo);  // dV_J += P^T dO_I
        Gemm(bs, D, rows, dr, 1, bs, kr, ldk, dqa, D);                                         // dQ_I += dS K_J
        Gemm(rows, D, bs, dr, bs, 1, qs, D, dk + a.q_offset(w.b, j * bs + j0, head), lq);     // dK_J += dS^T Q_I
      }
      for (int64_t i = 0; i < bs; ++i)
        for (int64_t d = 0; d < D; ++d) dq[i * lq + d] = a.scale * dqa[i * D + d];
    }
  }
}

}  // namespace fused
