// TensorFlow CPU kernels of the fused block-sparse attention and its gradient:
// check every shape, table and mask, then run the framework-free kernels of
// fused_attention.h over TF's CPU thread pool.
#include <cmath>
#include <type_traits>

#include "custom_ops/cc/kernels/fused_attention.h"
#include "custom_ops/cc/kernels/op_util.h"

namespace sparse_attention {
namespace {

// Checks q, k, v and the tables and fills the problem (masks and key padding
// included); `tables` keeps what it derives from the tile masks (allocated
// through TF's allocator) alive for the kernels.
Status MakeAttentionProblem(OpKernelContext* ctx, int first_table, int64_t block, float scale,
                            AttentionProblem* a, Tensor tables[4]) {
  SoftmaxMasks m;
  TF_RETURN_IF_ERROR(CheckAttentionShapes(ctx, first_table, block, &a->p, &m));
  TF_RETURN_IF_ERROR(ValidateProblem(a->p, true));
  TF_RETURN_IF_ERROR(ValidateMaskIndex(a->p, m));
  const Tensor& masks = ctx->input(first_table + 5);
  const Tensor& key_padding = ctx->input(first_table + 6);
  a->value_dim = ctx->input(2).dim_size(3);
  a->scale = scale;
  a->mask_index = m.mask_index;
  const int64_t num_masks = masks.dim_size(0);
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT,
                                        TensorShape({num_masks, block, block}), &tables[0]));
  TF_RETURN_IF_ERROR(
      ctx->allocate_temp(tensorflow::DT_INT32, TensorShape({num_masks, 2}), &tables[1]));
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_INT32,
                                        TensorShape({num_masks, block / 16, 2}), &tables[2]));
  TF_RETURN_IF_ERROR(
      ctx->allocate_temp(tensorflow::DT_UINT8, TensorShape({num_masks}), &tables[3]));
  const MaskTables mt{tables[0].flat<float>().data(), tables[1].flat<int32_t>().data(),
                      tables[2].flat<int32_t>().data(), tables[3].flat<uint8_t>().data()};
  BuildMaskTables(masks.flat<bool>().data(), num_masks, block, mt);
  mt.Attach(a);
  // An all-true key padding mask hides nothing: skip reading it.
  const bool* kp = key_padding.flat<bool>().data();
  a->key_padding =
      std::all_of(kp, kp + key_padding.NumElements(), [](bool x) { return x; }) ? nullptr : kp;
  return absl::OkStatus();
}

constexpr int64_t kPackRows = 64;  // rows per unit of PackHeads / PackHeadsBf16

// k [B, N, H, D] and v [B, N, H, Dv] of T -> head-major float32 temps
// [B, H, N, D] and [B, H, N, Dv], in one pass over the thread pool.
template <typename T>
Status PackTemps(OpKernelContext* ctx, const Tensor& k, const Tensor& v, Tensor* pk, Tensor* pv) {
  const int64_t b = k.dim_size(0), n = k.dim_size(1), h = k.dim_size(2);
  const int64_t dk = k.dim_size(3), dv = v.dim_size(3);
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({b, h, n, dk}), pk));
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({b, h, n, dv}), pv));
  const T *ks = k.flat<T>().data(), *vs = v.flat<T>().data();
  float *kd = pk->flat<float>().data(), *vd = pv->flat<float>().data();
  const int64_t units = b * ((n + kPackRows - 1) / kPackRows);  // per tensor
  ParallelUnits(ctx, 2 * units, kPackRows * h * (dk + dv) * 2, [&](int64_t s, int64_t e) {
    for (int64_t u = s; u < e; ++u) {
      if (u < units)
        PackHeads<T>(ks, b, n, h, dk, kPackRows, kd, u, u + 1);
      else
        PackHeads<T>(vs, b, n, h, dv, kPackRows, vd, u - units, u - units + 1);
    }
  });
  return absl::OkStatus();
}

const uint16_t* Bits(const Tensor& t) {  // the bits of a bfloat16 tensor
  return reinterpret_cast<const uint16_t*>(t.flat<Eigen::bfloat16>().data());
}

// bf16 k [B, N, H, D] -> head-major k [B, H, N, D], and v [B, N, H, Dv] ->
// pairs along the sequence [B, H, N/2, Dv, 2], in one pass over the pool.
Status PackBf16Temps(OpKernelContext* ctx, const Tensor& k, const Tensor& v, Tensor* kn,
                     Tensor* vp) {
  const int64_t b = k.dim_size(0), n = k.dim_size(1), h = k.dim_size(2);
  const int64_t dk = k.dim_size(3), dv = v.dim_size(3);
  TF_RETURN_IF_ERROR(
      ctx->allocate_temp(tensorflow::DT_BFLOAT16, TensorShape({b, h, n, dk}), kn));
  TF_RETURN_IF_ERROR(
      ctx->allocate_temp(tensorflow::DT_BFLOAT16, TensorShape({b, h, n, dv}), vp));
  uint16_t* kd = const_cast<uint16_t*>(Bits(*kn));
  uint16_t* vd = const_cast<uint16_t*>(Bits(*vp));
  const int64_t units = b * ((n + kPackRows - 1) / kPackRows);  // per tensor
  ParallelUnits(ctx, 2 * units, kPackRows * h * (dk + dv), [&](int64_t s, int64_t e) {
    for (int64_t u = s; u < e; ++u) {
      if (u < units)
        PackHeadsBf16(Bits(k), b, n, h, dk, kPackRows, kd, nullptr, u, u + 1);
      else
        PackHeadsBf16(Bits(v), b, n, h, dv, kPackRows, nullptr, vd, u - units, u - units + 1);
    }
  });
  return absl::OkStatus();
}

// Whether bf16 inputs take the bf16 dot-product kernels: the CPU has them and
// the dims are even (the products read pairs).
template <typename T>
bool UseBf16Kernels(const AttentionProblem& a) {
  return std::is_same<T, Eigen::bfloat16>::value && HasBf16Kernels() && a.p.head_dim % 2 == 0 &&
         a.value_dim % 2 == 0;
}

// out (T) <- the float32 buffer f. bfloat16 on the bf16 instructions where
// the bf16 kernels ran (Eigen's conversion to bfloat16 is scalar).
template <typename T>
void FinishOutput(OpKernelContext* ctx, FloatOutput<T>* f, Tensor* out, bool bf16_kernels) {
  if constexpr (std::is_same<T, Eigen::bfloat16>::value) {
    if (bf16_kernels) {
      constexpr int64_t kChunk = 1 << 14;
      const int64_t n = out->NumElements();
      const float* x = f->data();
      uint16_t* y = reinterpret_cast<uint16_t*>(out->flat<Eigen::bfloat16>().data());
      ParallelUnits(ctx, (n + kChunk - 1) / kChunk, kChunk, [&](int64_t s, int64_t e) {
        for (int64_t c = s; c < e; ++c)
          FloatToBf16(x + c * kChunk, std::min(kChunk, n - c * kChunk), y + c * kChunk);
      });
      return;
    }
  }
  f->Finish(ctx);
}

// Flops of one block-row unit (forward), as the thread pool's cost hint.
int64_t AttentionRowCost(const AttentionProblem& a) {
  return RowCost(a.p) * (a.p.head_dim + a.value_dim) / std::max<int64_t>(1, a.p.head_dim);
}

}  // namespace

// The attributes both fused ops share. A block size the kernels do not take
// fails here, before any input is read or buffer sized from it.
class AttentionKernel : public OpKernel {
 public:
  explicit AttentionKernel(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_size", &block_));
    const std::string err = ValidateBlockSize(block_);
    OP_REQUIRES(ctx, err.empty(), Invalid(err));
    const std::string scale_err = ValidateScale(scale_);
    OP_REQUIRES(ctx, scale_err.empty(), Invalid(scale_err));
  }

 protected:
  float scale_;
  int64_t block_;
};

template <typename T>
class AttentionOp : public AttentionKernel {
 public:
  using AttentionKernel::AttentionKernel;

  void Compute(OpKernelContext* ctx) override {
    AttentionProblem a;
    Tensor tables[4];
    OP_REQUIRES_OK(ctx, MakeAttentionProblem(ctx, 3, block_, scale_, &a, tables));
    const Problem& p = a.p;
    Tensor *out = nullptr, *lse = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(2).shape(), &out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({p.batch, p.heads, p.seq}), &lse));
    if (out->NumElements() == 0 && lse->NumElements() == 0) return;
    // q is read, and out written, once per query block row: in place.
    // k and v are read per kept block: packed head-major.
    FloatOutput<T> fo;
    OP_REQUIRES_OK(ctx, fo.Init(ctx, out));
    if (UseBf16Kernels<T>(a)) {
      Tensor k, v_pairs;  // head-major bf16
      OP_REQUIRES_OK(ctx, PackBf16Temps(ctx, ctx->input(1), ctx->input(2), &k, &v_pairs));
      const AttentionForwardArgs<uint16_t> x{Bits(ctx->input(0)), Bits(k), nullptr, fo.data(),
                                             lse->flat<float>().data()};
      OP_REQUIRES_OK(ctx, ParallelUnitsWithScratch(
                              ctx, p.num_units(), AttentionRowCost(a) / 2,
                              ScratchBytes<ForwardBf16Scratch>(a),
                              [&](void* scratch, int64_t s, int64_t e) {
                                AttentionForwardBf16(a, x, Bits(v_pairs), scratch, s, e);
                              }));
    } else {
      FloatInput<T> q;
      OP_REQUIRES_OK(ctx, q.Init(ctx, ctx->input(0)));
      Tensor k, v;  // head-major float32
      OP_REQUIRES_OK(ctx, PackTemps<T>(ctx, ctx->input(1), ctx->input(2), &k, &v));
      const AttentionForwardArgs<float> x{q.data(), k.flat<float>().data(),
                                          v.flat<float>().data(), fo.data(),
                                          lse->flat<float>().data()};
      OP_REQUIRES_OK(ctx, ParallelUnitsWithScratch(
                              ctx, p.num_units(), AttentionRowCost(a),
                              ScratchBytes<ForwardScratch>(a),
                              [&](void* scratch, int64_t s, int64_t e) {
                                AttentionForward(a, x, scratch, s, e);
                              }));
    }
    FinishOutput<T>(ctx, &fo, out, UseBf16Kernels<T>(a));
  }
};

template <typename T>
class AttentionGradOp : public AttentionKernel {
 public:
  using AttentionKernel::AttentionKernel;

  void Compute(OpKernelContext* ctx) override {
    AttentionProblem a;
    Tensor tables[4];
    OP_REQUIRES_OK(ctx, MakeAttentionProblem(ctx, 6, block_, scale_, &a, tables));
    const Problem& p = a.p;
    const Tensor& v = ctx->input(2);
    const Tensor& out = ctx->input(3);
    const Tensor& lse = ctx->input(4);
    const Tensor& dout = ctx->input(5);
    OP_REQUIRES(ctx, out.shape() == v.shape() && dout.shape() == v.shape(),
                Invalid("out and dout must have the shape of v ", ShapeString(v), ", got ",
                        ShapeString(out), " and ", ShapeString(dout)));
    OP_REQUIRES(ctx, lse.shape() == TensorShape({p.batch, p.heads, p.seq}),
                Invalid("lse must have shape [", p.batch, ", ", p.heads, ", ", p.seq,
                        "] (batch, heads, seq), got ", ShapeString(lse)));
    Tensor *dq = nullptr, *dk = nullptr, *dv = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(0).shape(), &dq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, ctx->input(1).shape(), &dk));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, v.shape(), &dv));
    if (dq->NumElements() == 0 && dv->NumElements() == 0) return;

    // Units are (batch, head, segment of block rows). With fewer heads than
    // about two per thread, rows are split into segments whose dK/dV partial
    // sums are added afterwards in a fixed order.
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    const int64_t threads = pool->NumThreads(), heads = p.batch * p.heads;
    a.segments = std::min<int64_t>({8, p.t.num_blocks,
                                    std::max<int64_t>(1, (2 * threads + heads - 1) / heads)});
    Tensor segment_rows;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT32,
                                           TensorShape({p.t.layout_heads, a.segments + 1}),
                                           &segment_rows));
    SegmentRows(p.t, a.segments, segment_rows.flat<int32_t>().data());
    a.segment_rows = segment_rows.flat<int32_t>().data();
    Tensor partial_k, partial_v;
    if (a.segments > 1) {
      const int64_t s = a.segments - 1;
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT,
                                             TensorShape({s, dk->NumElements()}), &partial_k));
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT,
                                             TensorShape({s, dv->NumElements()}), &partial_v));
    }
    // Every operand is read in place (token-major): each unit packs the k
    // and v of its head and computes delta as it goes (fused_attention.h).
    FloatOutput<T> fdq, fdk, fdv;
    OP_REQUIRES_OK(ctx, fdq.Init(ctx, dq));
    OP_REQUIRES_OK(ctx, fdk.Init(ctx, dk));
    OP_REQUIRES_OK(ctx, fdv.Init(ctx, dv));
    float* partial_k_data = a.segments > 1 ? partial_k.flat<float>().data() : nullptr;
    float* partial_v_data = a.segments > 1 ? partial_v.flat<float>().data() : nullptr;
    const int64_t backward_cost = AttentionRowCost(a) * p.t.num_blocks / a.segments * 5 / 2;
    if (UseBf16Kernels<T>(a)) {
      const AttentionBackwardArgs<uint16_t> x{
          Bits(ctx->input(0)), Bits(ctx->input(1)), Bits(v),    Bits(out),
          lse.flat<float>().data(), Bits(dout), fdq.data(), fdk.data(),
          fdv.data(), partial_k_data, partial_v_data};
      OP_REQUIRES_OK(ctx, ParallelUnitsWithScratch(
                              ctx, a.num_backward_units(), backward_cost / 2,
                              ScratchBytes<BackwardBf16Scratch>(a),
                              [&](void* scratch, int64_t s, int64_t e) {
                                AttentionBackwardBf16(a, x, scratch, s, e);
                              }));
    } else {
      FloatInput<T> fq, fk, fv, fo, fdo;
      OP_REQUIRES_OK(ctx, fq.Init(ctx, ctx->input(0)));
      OP_REQUIRES_OK(ctx, fk.Init(ctx, ctx->input(1)));
      OP_REQUIRES_OK(ctx, fv.Init(ctx, v));
      OP_REQUIRES_OK(ctx, fo.Init(ctx, out));
      OP_REQUIRES_OK(ctx, fdo.Init(ctx, dout));
      const AttentionBackwardArgs<float> x{
          fq.data(), fk.data(), fv.data(), fo.data(), lse.flat<float>().data(), fdo.data(),
          fdq.data(), fdk.data(), fdv.data(), partial_k_data, partial_v_data};
      OP_REQUIRES_OK(ctx, ParallelUnitsWithScratch(
                              ctx, a.num_backward_units(), backward_cost,
                              ScratchBytes<BackwardScratch>(a),
                              [&](void* scratch, int64_t s, int64_t e) {
                                AttentionBackward(a, x, scratch, s, e);
                              }));
    }
    const AttentionBackwardArgs<float> sums{nullptr,    nullptr,    nullptr,        nullptr,
                                            nullptr,    nullptr,    nullptr,        fdk.data(),
                                            fdv.data(), partial_k_data, partial_v_data};
    if (a.segments > 1)
      ParallelUnits(ctx, heads, p.seq * (p.head_dim + a.value_dim) * a.segments,
                    [&](int64_t s, int64_t e) { ReduceSegments(a, sums, s, e); });
    const bool bf16_kernels = UseBf16Kernels<T>(a);
    FinishOutput<T>(ctx, &fdq, dq, bf16_kernels);
    FinishOutput<T>(ctx, &fdk, dk, bf16_kernels);
    FinishOutput<T>(ctx, &fdv, dv, bf16_kernels);
  }
};

#define REGISTER(T)                                                                          \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("SparseAttention>BlocksparseAttention").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
      AttentionOp<T>);                                                                       \
  REGISTER_KERNEL_BUILDER(Name("SparseAttention>BlocksparseAttentionGrad")                  \
                              .Device(DEVICE_CPU)                                            \
                              .TypeConstraint<T>("T"),                                       \
                          AttentionGradOp<T>);

REGISTER(float);
REGISTER(Eigen::bfloat16);
REGISTER(Eigen::half);
#undef REGISTER

}  // namespace sparse_attention
