// The block-sparse ops' CPU launcher: converts to float32, splits the work
// units over TF's CPU thread pool and calls the framework-free bodies in
// blocksparse_cpu.h; and the DEVICE_CPU registrations of the op classes
// (blocksparse_ops.h).
#include "custom_ops/cc/kernels/blocksparse_ops.h"

namespace sparse_attention {

template <typename T>
Status BlocksparseLauncher<CPUDevice, T>::Sdd(OpKernelContext* ctx, State*, const Problem& p,
                                              const Tensor& a, const Tensor& b, Tensor* out) {
  FloatInput<T> fa, fb;
  TF_RETURN_IF_ERROR(fa.Init(ctx, a));
  TF_RETURN_IF_ERROR(fb.Init(ctx, b));
  Tensor b_t;  // b transposed per head: [B, H, D, N]
  TF_RETURN_IF_ERROR(ctx->allocate_temp(
      tensorflow::DT_FLOAT, TensorShape({p.batch, p.heads, p.head_dim, p.seq}), &b_t));
  float* b_t_data = b_t.flat<float>().data();
  ParallelUnits(ctx, p.batch * p.heads, p.seq * p.head_dim * 4,
                [&](int64_t s, int64_t e) { TransposeHeads(p, fb.data(), b_t_data, s, e); });
  FloatOutput<T> fo;
  TF_RETURN_IF_ERROR(fo.Init(ctx, out));
  ParallelUnits(ctx, p.num_units(), RowCost(p),
                [&](int64_t s, int64_t e) { SddRows(p, fa.data(), b_t_data, fo.data(), s, e); });
  fo.Finish(ctx);
  return absl::OkStatus();
}

template <typename T>
Status BlocksparseLauncher<CPUDevice, T>::Dsd(OpKernelContext* ctx, State*, const Problem& p,
                                              bool transposed, const Tensor& probs,
                                              const Tensor& x, Tensor* out) {
  FloatInput<T> fp, fx;
  TF_RETURN_IF_ERROR(fp.Init(ctx, probs));
  TF_RETURN_IF_ERROR(fx.Init(ctx, x));
  FloatOutput<T> fo;
  TF_RETURN_IF_ERROR(fo.Init(ctx, out));
  ParallelUnits(ctx, p.num_units(), RowCost(p), [&](int64_t s, int64_t e) {
    if (transposed)
      DsdTColumns(p, fp.data(), fx.data(), fo.data(), s, e);
    else
      DsdRows(p, fp.data(), fx.data(), fo.data(), s, e);
  });
  fo.Finish(ctx);
  return absl::OkStatus();
}

template <typename T>
Status BlocksparseLauncher<CPUDevice, T>::Softmax(OpKernelContext* ctx, State*, const Problem& p,
                                                  const SoftmaxMasks& masks, float scale,
                                                  const Tensor& x, Tensor* y) {
  SoftmaxMasks m = masks;
  m.key_padding = KeyPaddingOrNull(m.key_padding, p.batch * p.seq);
  FloatInput<T> fx;
  TF_RETURN_IF_ERROR(fx.Init(ctx, x));
  FloatOutput<T> fy;
  TF_RETURN_IF_ERROR(fy.Init(ctx, y));
  ParallelUnits(ctx, p.num_units(), RowCost(p) / std::max<int64_t>(1, p.block),
                [&](int64_t s, int64_t e) { SoftmaxRows(p, m, scale, fx.data(), fy.data(), s, e); });
  fy.Finish(ctx);
  return absl::OkStatus();
}

template <typename T>
Status BlocksparseLauncher<CPUDevice, T>::SoftmaxGrad(OpKernelContext* ctx, State*,
                                                      const Problem& p, float scale,
                                                      const Tensor& y, const Tensor& dy,
                                                      Tensor* dx) {
  FloatInput<T> fy, fdy;
  TF_RETURN_IF_ERROR(fy.Init(ctx, y));
  TF_RETURN_IF_ERROR(fdy.Init(ctx, dy));
  FloatOutput<T> fdx;
  TF_RETURN_IF_ERROR(fdx.Init(ctx, dx));
  ParallelUnits(ctx, p.num_units(), 4 * p.t.nnz / p.t.num_blocks * p.tile() + 1,
                [&](int64_t s, int64_t e) {
                  SoftmaxGradRows(p, scale, fy.data(), fdy.data(), fdx.data(), s, e);
                });
  fdx.Finish(ctx);
  return absl::OkStatus();
}

template struct BlocksparseLauncher<CPUDevice, float>;
template struct BlocksparseLauncher<CPUDevice, Eigen::bfloat16>;
template struct BlocksparseLauncher<CPUDevice, Eigen::half>;

#define REGISTER(T)                                                                          \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("SparseAttention>BlocksparseSdd").Device(DEVICE_CPU).TypeConstraint<T>("T"),     \
      (SddOp<CPUDevice, T>));                                                                \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("SparseAttention>BlocksparseDsd").Device(DEVICE_CPU).TypeConstraint<T>("T"),     \
      (DsdOp<CPUDevice, T, false>));                                                         \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("SparseAttention>BlocksparseDsdT").Device(DEVICE_CPU).TypeConstraint<T>("T"),    \
      (DsdOp<CPUDevice, T, true>));                                                          \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("SparseAttention>BlocksparseSoftmax").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
      (SoftmaxOp<CPUDevice, T>));                                                            \
  REGISTER_KERNEL_BUILDER(Name("SparseAttention>BlocksparseSoftmaxGrad")                    \
                              .Device(DEVICE_CPU)                                            \
                              .TypeConstraint<T>("T"),                                       \
                          (SoftmaxGradOp<CPUDevice, T>));

REGISTER(float);
REGISTER(Eigen::bfloat16);
REGISTER(Eigen::half);
#undef REGISTER

}  // namespace sparse_attention
