// The bf16 pair engine of the fused attention: every block product on the
// AVX512_BF16 dot-product instruction (`vdpbf16ps`: 16 lanes, each adding
// the products of one pair of bf16 values to a float32 accumulator), reading
// its operands as bf16 pairs along the summed dimension (bf16_avx512_body.h);
// the body (fused_attention_body.h) is the float32 engine's. Built only for
// this instruction set; attention_engines.cc runs it where the CPU has it.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "custom_ops/cc/kernels/attention_engines.h"
#include "custom_ops/cc/kernels/fused_attention.h"

namespace sparse_attention {
namespace {
namespace avx512bf16 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,prefer-vector-width=512")
// GCC 12 flags the intrinsics' own undefined-register idiom (`__Y = __Y`).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// Only part of the primitives is used here; the rest is dropped.
#pragma GCC diagnostic ignored "-Wunused-function"
#define SPARSE_ATTENTION_BODY_AVX512 1
#include "custom_ops/cc/kernels/simd_body.h"
#include "custom_ops/cc/kernels/fused_attention_body.h"
#include "custom_ops/cc/kernels/bf16_avx512_body.h"
#undef SPARSE_ATTENTION_BODY_AVX512

#include "custom_ops/cc/kernels/bf16_engine_body.h"

struct PairEngine : Bf16Operands {
  struct FwdRow {
    uint16_t* qp;  // Q_I^T as pairs along D: [D/2, b, 2]
    uint16_t* pp;  // P as pairs along keys: [b/2, b, 2]
    FwdRow(const AttentionProblem& a, Scratch* s)
        : qp(s->Take<uint16_t>(a.p.head_dim * a.p.block)),
          pp(s->Take<uint16_t>(a.p.block * a.p.block)) {}
  };
  struct BwdRow : RowOperands {
    uint16_t* dsp;  // dS pairs along keys [b/2, b, 2]
    BwdRow(const AttentionProblem& a, Scratch* s)
        : RowOperands(a, s), dsp(s->Take<uint16_t>(a.p.block * a.p.block)) {}
  };

  static bool Takes(const AttentionProblem& a) {
    return a.p.head_dim % 2 == 0 && a.value_dim % 2 == 0;
  }
  static void LoadQuery(const AttentionProblem& a, const uint16_t* q, int64_t ld, FwdRow& r) {
    PairColumns(q, ld, a.p.block, a.p.head_dim, r.qp);
  }
  static void Scores(const AttentionProblem& a, const FwdRow& r, const uint16_t* k, int64_t rows,
                     int64_t, int64_t, float* st) {
    const int64_t bs = a.p.block, D = a.p.head_dim;
    GemmBf16Scaled(rows, bs, D, k, D, 2, r.qp, 2 * bs, st, bs, a.scale);
  }
  static void AddPV(const AttentionProblem& a, FwdRow& r, const float* pt, int64_t rows,
                    int64_t, int64_t, const uint16_t* v_pairs, float* o) {
    const int64_t bs = a.p.block, Dv = a.value_dim;
    PairRows(pt, rows, bs, r.pp);
    GemmBf16(bs, Dv, rows, r.pp, 2, 2 * bs, v_pairs, 2 * Dv, o, Dv);
  }
  static void ScoresAndDp(const AttentionProblem& a, const BwdHead& h, const BwdRow& r,
                          int64_t n0, int64_t rows, int64_t, int64_t, float* pt, float* dst) {
    const int64_t bs = a.p.block, D = a.p.head_dim, Dv = a.value_dim;
    GemmBf16Scaled(rows, bs, D, h.kn + n0 * D, D, 2, r.qp, 2 * bs, pt, bs, a.scale);
    GemmBf16Scaled(rows, bs, Dv, h.vn + n0 * Dv, Dv, 2, r.dop, 2 * bs, dst, bs, 1.f);
  }
  static void Gradients(const AttentionProblem& a, const BwdHead& h, BwdRow& r, int64_t n0,
                        int64_t rows, int64_t, int64_t, float* pt, float* dst, float* hv,
                        float* dqa, float* hk) {
    const int64_t bs = a.p.block, D = a.p.head_dim, Dv = a.value_dim;
    ToBf16(pt, rows * bs, r.ptb);
    ToBf16(dst, rows * bs, r.dsb);
    PairRows(dst, rows, bs, r.dsp);
    GemmBf16(rows, Dv, bs, r.ptb, bs, 2, r.dor, 2 * Dv, hv, Dv);           // dV_J += P^T dO_I
    GemmBf16(bs, D, rows, r.dsp, 2, 2 * bs, h.kp + n0 * D, 2 * D, dqa, D);  // dQ_I += dS K_J
    GemmBf16(rows, D, bs, r.dsb, bs, 2, r.qr, 2 * D, hk, D);               // dK_J += dS^T Q_I
  }
};

#pragma GCC diagnostic pop
#pragma GCC pop_options
}  // namespace avx512bf16
}  // namespace

const AttentionEngine<uint16_t> kBf16Pairs{
    "avx512_bf16", avx512bf16::PairEngine::Takes,
    [](const AttentionProblem& a) {
      return ScratchBytes<avx512bf16::fused::ForwardBuffers<avx512bf16::PairEngine>>(a);
    },
    avx512bf16::fused::Forward<avx512bf16::PairEngine>,
    [](const AttentionProblem& a) {
      return ScratchBytes<avx512bf16::fused::BackwardBuffers<avx512bf16::PairEngine>>(a);
    },
    avx512bf16::fused::Backward<avx512bf16::PairEngine>};

void FloatToBf16Avx512(const float* x, int64_t n, uint16_t* y) { avx512bf16::FloatToBf16Vcvt(x, n, y); }

}  // namespace sparse_attention
