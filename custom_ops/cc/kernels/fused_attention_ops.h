// The fused attention op classes, one per op for every device: they check
// every shape, table and mask (the same checks and messages on the CPU and
// the GPU), build the AttentionProblem and hand it to
// AttentionLauncher<Device, T> (fused_attention_launch.h). Registered for
// DEVICE_CPU in fused_attention_ops.cc and for DEVICE_GPU in
// blocksparse_ops_gpu.cc (the only sources built with GOOGLE_CUDA).
#ifndef SPARSE_ATTENTION_TF_KERNELS_FUSED_ATTENTION_OPS_H_
#define SPARSE_ATTENTION_TF_KERNELS_FUSED_ATTENTION_OPS_H_

#include <string>

#include "custom_ops/cc/kernels/fused_attention.h"
#include "custom_ops/cc/kernels/fused_attention_launch.h"
#include "custom_ops/cc/kernels/mask_tables.h"
#include "custom_ops/cc/kernels/op_util.h"

namespace sparse_attention {

// Where the tables start among each op's inputs (see AttentionTable).
constexpr int kForwardFirstTable = 3;   // q, k, v, tables...
constexpr int kBackwardFirstTable = 6;  // q, k, v, out, lse, dout, tables...

// Checks q, k, v and every table (contents included: the tables, the mask
// index, the mask tables against the masks) and fills the problem. Tables
// are host memory on every device. Where the other inputs are host memory
// too (the CPU), also builds the tile bias the CPU kernels read (in *bias,
// through TF's allocator) and drops an all-true key padding mask; elsewhere
// a->key_padding is the device mask and a->bias_t null.
template <typename Device>
Status MakeAttentionProblem(OpKernelContext* ctx, int first_table, int64_t block, float scale,
                            AttentionProblem* a, Tensor* bias) {
  SoftmaxMasks m;
  TF_RETURN_IF_ERROR(CheckAttentionShapes(ctx, first_table, block, &a->p, &m));
  TF_RETURN_IF_ERROR(ValidateProblem(a->p, true));
  TF_RETURN_IF_ERROR(ValidateMaskIndex(a->p, m));
  TF_RETURN_IF_ERROR(ValidateMaskTablesOf(ctx, first_table, a->p, m));
  const Tensor& key_range = ctx->input(first_table + kMaskKeyRange);
  const Tensor& query_range = ctx->input(first_table + kMaskQueryRange);
  const Tensor& split = ctx->input(first_table + kMaskSplit);
  const Tensor& key_padding = ctx->input(first_table + kKeyPadding);
  a->value_dim = ctx->input(2).dim_size(3);
  a->scale = scale;
  a->mask_index = m.mask_index;
  a->key_range = key_range.flat<int32_t>().data();
  a->query_range = query_range.flat<int32_t>().data();
  a->split_tile = split.flat<bool>().data();
  a->key_padding = key_padding.flat<bool>().data();
  if constexpr (kInputsOnHost<Device>) {
    TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT,
                                          TensorShape({m.num_masks, block, block}), bias));
    BuildTileBias(m.masks, m.num_masks, block, bias->flat<float>().data());
    a->bias_t = bias->flat<float>().data();
    a->key_padding = KeyPaddingOrNull(a->key_padding, key_padding.NumElements());
  }
  return absl::OkStatus();
}

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

// Inputs: q, k, v, then the tables. Outputs: out [B, N, H, Dv], lse [B, H, N].
template <typename Device, typename T>
class AttentionOp : public AttentionKernel {
 public:
  using AttentionKernel::AttentionKernel;

  void Compute(OpKernelContext* ctx) override {
    AttentionProblem a;
    Tensor bias;
    OP_REQUIRES_OK(ctx, MakeAttentionProblem<Device>(ctx, kForwardFirstTable, block_, scale_, &a,
                                                     &bias));
    const Problem& p = a.p;
    Tensor *out = nullptr, *lse = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(2).shape(), &out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({p.batch, p.heads, p.seq}), &lse));
    if (out->NumElements() == 0 && lse->NumElements() == 0) return;
    OP_REQUIRES_OK(ctx, AttentionLauncher<Device, T>::Forward(
                            ctx, &state_, a, ctx->input(0), ctx->input(1), ctx->input(2), out, lse));
  }

 private:
  typename AttentionLauncher<Device, T>::State state_;
};

// Inputs: q, k, v, out, lse, dout, then the tables. Outputs: dq, dk, dv.
template <typename Device, typename T>
class AttentionGradOp : public AttentionKernel {
 public:
  using AttentionKernel::AttentionKernel;

  void Compute(OpKernelContext* ctx) override {
    AttentionProblem a;
    Tensor bias;
    OP_REQUIRES_OK(ctx, MakeAttentionProblem<Device>(ctx, kBackwardFirstTable, block_, scale_, &a,
                                                     &bias));
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
    OP_REQUIRES_OK(ctx, AttentionLauncher<Device, T>::Backward(
                            ctx, &state_, a, ctx->input(0), ctx->input(1), v, out, lse, dout, dq,
                            dk, dv));
  }

 private:
  typename AttentionLauncher<Device, T>::State state_;
};

}  // namespace sparse_attention

#endif  // SPARSE_ATTENTION_TF_KERNELS_FUSED_ATTENTION_OPS_H_
