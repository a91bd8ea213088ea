// The AMX-BF16 engine of the fused attention (see fused_attention_body.h for
// the engine contract), included twice by engine_amx.cc: with the real tile
// instructions, and with each tile instruction emulated in plain C++ (for
// tests on CPUs without AMX). No include guard.
//
// Before this text the includer defines, in its namespace:
//   TILE_LOAD(t, p, stride_bytes), TILE_STORE(t, p, stride_bytes), TILE_ZERO(t),
//   TILE_DP(c, a, b) (tdpbf16ps: C += A B, A natural bf16 16 x K, B pairs along K)
// and the bf16 helpers PairColumns, PairRowsBf16, ToBf16, TransposeToBf16 and
// DotBf16 (bf16_avx512_body.h and this file's emulation). Includes
// bf16_engine_body.h (what it shares with the pair engine).
//
// Tiles, as LoadTileConfig sets them per thread for the length of one call:
// 0-3 float32 accumulators C (16 x 16), 4 and 5 an A (16 x 32 bf16) and a B
// (16 pair rows x 16 columns) for 32 steps of the sum, 6 and 7 the same for
// 16 steps (A 16 x 16, B 8 pair rows). Every block product is a multiple of
// 16 in every dimension (D and Dv must be multiples of 16: Takes).

#include "custom_ops/cc/kernels/bf16_engine_body.h"

// The palette-1 configuration (64 bytes, as ldtilecfg reads it).
struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 6; ++t) colsb[t] = 64, rows[t] = 16;
    colsb[6] = 32, rows[6] = 16;
    colsb[7] = 64, rows[7] = 8;
  }
};

// C[M x N] = or += A[M x K] B[K x N]: A natural bf16 (row stride lda
// elements), B pairs along K (pair-row stride ldb elements), C float32 (row
// stride ldc). M, N and K multiples of 16.
template <bool kAccumulate>
void TileGemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
              int64_t ldb, float* C, int64_t ldc) {
  const int64_t as = lda * 2, bstr = ldb * 2, cs = ldc * 4;
  for (int64_t m = 0; m < M; m += 16)
    for (int64_t n = 0; n < N; n += 64) {
      const int nt = N - n >= 64 ? 4 : static_cast<int>((N - n) / 16);
      float* c = C + m * ldc + n;
#define SPARSE_ATTENTION_C(t) \
  if (nt > t) {               \
    if (kAccumulate)          \
      TILE_LOAD(t, c + 16 * t, cs); \
    else                      \
      TILE_ZERO(t);           \
  }
      SPARSE_ATTENTION_C(0) SPARSE_ATTENTION_C(1) SPARSE_ATTENTION_C(2) SPARSE_ATTENTION_C(3)
#undef SPARSE_ATTENTION_C
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {
        TILE_LOAD(4, A + m * lda + k, as);
        const uint16_t* b = B + (k / 2) * ldb + 2 * n;
#define SPARSE_ATTENTION_DP(t)           \
  if (nt > t) {                          \
    TILE_LOAD(5, b + 32 * t, bstr);      \
    TILE_DP(t, 4, 5);                    \
  }
        SPARSE_ATTENTION_DP(0) SPARSE_ATTENTION_DP(1) SPARSE_ATTENTION_DP(2) SPARSE_ATTENTION_DP(3)
#undef SPARSE_ATTENTION_DP
      }
      if (k < K) {  // the last 16 steps
        TILE_LOAD(6, A + m * lda + k, as);
        const uint16_t* b = B + (k / 2) * ldb + 2 * n;
#define SPARSE_ATTENTION_DP(t)           \
  if (nt > t) {                          \
    TILE_LOAD(7, b + 32 * t, bstr);      \
    TILE_DP(t, 6, 7);                    \
  }
        SPARSE_ATTENTION_DP(0) SPARSE_ATTENTION_DP(1) SPARSE_ATTENTION_DP(2) SPARSE_ATTENTION_DP(3)
#undef SPARSE_ATTENTION_DP
      }
#define SPARSE_ATTENTION_S(t) \
  if (nt > t) TILE_STORE(t, c + 16 * t, cs);
      SPARSE_ATTENTION_S(0) SPARSE_ATTENTION_S(1) SPARSE_ATTENTION_S(2) SPARSE_ATTENTION_S(3)
#undef SPARSE_ATTENTION_S
    }
}

// rows x bs float tile (row stride bs) *= s.
inline void ScaleTile(float* st, int64_t rows, int64_t bs, float s) {
  if (s != 1.f)
    for (int64_t j = 0; j < rows; ++j) Scale(st + j * bs, s, bs);
}

struct AmxEngine : Bf16Operands {
  struct FwdRow {
    uint16_t* qp;  // Q_I^T as pairs along D: [D/2, b, 2]  (B of S^T = K Q^T)
    uint16_t* pn;  // P bf16, natural [b, b] at [query][key] (A of O += P V)
    FwdRow(const AttentionProblem& a, Scratch* s)
        : qp(s->Take<uint16_t>(a.p.head_dim * a.p.block)),
          pn(s->Take<uint16_t>(a.p.block * a.p.block)) {}
  };
  // Products: S^T = K Q^T (A kn, B qp), dP^T = V dO^T (A vn, B dop),
  // dV += P^T dO (A ptb, B dor), dQ += dS K (A dsn, B kp), dK += dS^T Q
  // (A dsb, B qr).
  struct BwdRow : RowOperands {
    uint16_t* dsn;  // dS bf16, natural [b, b] at [query][key]
    BwdRow(const AttentionProblem& a, Scratch* s)
        : RowOperands(a, s), dsn(s->Take<uint16_t>(a.p.block * a.p.block)) {}
  };

  static bool Takes(const AttentionProblem& a) {
    return a.p.head_dim % 16 == 0 && a.value_dim % 16 == 0;
  }
  static void LoadQuery(const AttentionProblem& a, const uint16_t* q, int64_t ld, FwdRow& r) {
    PairColumns(q, ld, a.p.block, a.p.head_dim, r.qp);
  }
  static void Scores(const AttentionProblem& a, const FwdRow& r, const uint16_t* k, int64_t rows,
                     int64_t, int64_t, float* st) {
    const int64_t bs = a.p.block, D = a.p.head_dim;
    TileGemm<false>(rows, bs, D, k, D, r.qp, 2 * bs, st, bs);
    ScaleTile(st, rows, bs, a.scale);
  }
  static void AddPV(const AttentionProblem& a, FwdRow& r, const float* pt, int64_t rows,
                    int64_t, int64_t, const uint16_t* v_pairs, float* o) {
    const int64_t bs = a.p.block, Dv = a.value_dim;
    TransposeToBf16(pt, rows, bs, r.pn, bs);
    TileGemm<true>(bs, Dv, rows, r.pn, bs, v_pairs, 2 * Dv, o, Dv);
  }

  static void ScoresAndDp(const AttentionProblem& a, const BwdHead& h, const BwdRow& r,
                          int64_t n0, int64_t rows, int64_t, int64_t, float* pt, float* dst) {
    const int64_t bs = a.p.block, D = a.p.head_dim, Dv = a.value_dim;
    TileGemm<false>(rows, bs, D, h.kn + n0 * D, D, r.qp, 2 * bs, pt, bs);      // S^T
    ScaleTile(pt, rows, bs, a.scale);
    TileGemm<false>(rows, bs, Dv, h.vn + n0 * Dv, Dv, r.dop, 2 * bs, dst, bs);  // dP^T
  }
  static void Gradients(const AttentionProblem& a, const BwdHead& h, BwdRow& r, int64_t n0,
                        int64_t rows, int64_t, int64_t, float* pt, float* dst, float* hv,
                        float* dqa, float* hk) {
    const int64_t bs = a.p.block, D = a.p.head_dim, Dv = a.value_dim;
    ToBf16(pt, rows * bs, r.ptb);
    ToBf16(dst, rows * bs, r.dsb);
    TransposeToBf16(dst, rows, bs, r.dsn, bs);
    TileGemm<true>(rows, Dv, bs, r.ptb, bs, r.dor, 2 * Dv, hv, Dv);           // dV_J += P^T dO_I
    TileGemm<true>(bs, D, rows, r.dsn, bs, h.kp + n0 * D, 2 * D, dqa, D);     // dQ_I += dS K_J
    TileGemm<true>(rows, D, bs, r.dsb, bs, r.qr, 2 * D, hk, D);               // dK_J += dS^T Q_I
  }
};
