// TensorFlow CPU kernels of the fused block-sparse attention and its gradient:
// check every shape, table and mask, then run the framework-free kernels of
// fused_attention.h over TF's CPU thread pool.
#include <algorithm>

#include "custom_ops/cc/kernels/fused_attention.h"
#include "custom_ops/cc/kernels/fused_attention_launch.h"
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
    OP_REQUIRES_OK(ctx, AttentionLauncher<CPUDevice, T>::Forward(
                            ctx, &state_, a, ctx->input(0), ctx->input(1), ctx->input(2), out, lse));
  }

 private:
  typename AttentionLauncher<CPUDevice, T>::State state_;
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
    OP_REQUIRES_OK(ctx, AttentionLauncher<CPUDevice, T>::Backward(
                            ctx, &state_, a, ctx->input(0), ctx->input(1), v, out, lse, dout, dq,
                            dk, dv));
  }

 private:
  typename AttentionLauncher<CPUDevice, T>::State state_;
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
