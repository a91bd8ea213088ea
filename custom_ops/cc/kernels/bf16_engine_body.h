// What the two bf16 engines of the fused attention (engine_avx512_bf16.cc:
// pair products; amx_engine_body.h: tiles) share: one head's keys and values
// and one block row's q and dO in the same pair layouts (bf16_avx512_body.h),
// the scale applied in float32 to the score products (not to bf16 q), and
// the float32 dot products of bf16 rows. Included after the bf16 helpers
// PairColumns, PairRowsBf16 and DotBf16 of the includer's namespace. No
// include guard.

struct Bf16Operands {
  using In = uint16_t;
  static constexpr bool kSplitGroups = false;  // tiles are never split by key group

  struct BwdHead {
    uint16_t* kn;  // this head's keys      [N, D]
    uint16_t* kp;  // ... pairs along rows  [N/2, D, 2]
    uint16_t* vn;  // this head's values    [N, Dv]
    BwdHead(const AttentionProblem& a, Scratch* s)
        : kn(s->Take<uint16_t>(a.p.seq * a.p.head_dim)),
          kp(s->Take<uint16_t>(a.p.seq * a.p.head_dim)),
          vn(s->Take<uint16_t>(a.p.seq * a.value_dim)) {}
  };
  // One block row's operands; each engine adds what its products need.
  struct RowOperands {
    uint16_t* qp;   // Q_I^T pairs along D   [D/2, b, 2]
    uint16_t* qr;   // Q_I pairs along rows  [b/2, D, 2]
    uint16_t* dop;  // dO_I^T pairs along Dv [Dv/2, b, 2]
    uint16_t* dor;  // dO_I pairs along rows [b/2, Dv, 2]
    uint16_t* ptb;  // P^T bf16              [b, b]
    uint16_t* dsb;  // dS^T bf16             [b, b]
    RowOperands(const AttentionProblem& a, Scratch* s)
        : qp(s->Take<uint16_t>(a.p.head_dim * a.p.block)),
          qr(s->Take<uint16_t>(a.p.block * a.p.head_dim)),
          dop(s->Take<uint16_t>(a.value_dim * a.p.block)),
          dor(s->Take<uint16_t>(a.p.block * a.value_dim)),
          ptb(s->Take<uint16_t>(a.p.block * a.p.block)),
          dsb(s->Take<uint16_t>(a.p.block * a.p.block)) {}
  };

  static void LoadHead(const AttentionProblem& a, const uint16_t* k, int64_t lq,
                       const uint16_t* v, int64_t lo, BwdHead& h) {
    const int64_t N = a.p.seq, D = a.p.head_dim;
    fused::PackHead(k, lq, N, D, h.kn);
    PairRowsBf16(k, lq, N, D, h.kp);
    fused::PackHead(v, lo, N, a.value_dim, h.vn);
  }
  static const uint16_t* KeyRows(const AttentionProblem& a, const BwdHead& h, int64_t n0) {
    return h.kn + n0 * a.p.head_dim;
  }
  static void LoadRow(const AttentionProblem& a, const uint16_t* q, int64_t lq,
                      const uint16_t* dout, int64_t lo, RowOperands& r) {
    const int64_t bs = a.p.block, D = a.p.head_dim, Dv = a.value_dim;
    PairColumns(q, lq, bs, D, r.qp);
    PairRowsBf16(q, lq, bs, D, r.qr);
    PairColumns(dout, lo, bs, Dv, r.dop);
    PairRowsBf16(dout, lo, bs, Dv, r.dor);
  }
  static bool RowsBad(const AttentionProblem& a, const RowOperands&, const uint16_t* q,
                      int64_t lq, const uint16_t* dout, int64_t lo) {
    return !fused::RowsFinite(q, lq, a.p.block, a.p.head_dim) ||
           !fused::RowsFinite(dout, lo, a.p.block, a.value_dim);
  }
  static float DsScale(const AttentionProblem& a) { return a.scale; }
  static float DqScale(const AttentionProblem&) { return 1.f; }
  static float VisibleQScale(const AttentionProblem&) { return 1.f; }
  static float RowDot(const uint16_t* x, const uint16_t* y, int64_t n) { return DotBf16(x, y, n); }
};
