// The fused attention op's device launchers. The op classes
// (fused_attention_ops.cc) check every input and build the AttentionProblem
// once for every device; AttentionLauncher<Device, T> then runs the kernels:
// the CPU launcher (fused_attention_cpu.cc) over TF's thread pool on the
// precision engine chosen for this CPU, the GPU launcher
// (blocksparse_ops_gpu.cc) on the CUDA kernels.
#ifndef SPARSE_ATTENTION_TF_KERNELS_FUSED_ATTENTION_LAUNCH_H_
#define SPARSE_ATTENTION_TF_KERNELS_FUSED_ATTENTION_LAUNCH_H_

#include "custom_ops/cc/kernels/fused_attention.h"
#include "custom_ops/cc/kernels/op_util.h"

namespace sparse_attention {

template <typename Device, typename T>
struct AttentionLauncher;

template <typename T>
struct AttentionLauncher<CPUDevice, T> {
  // Per op-kernel state (the GPU launcher keeps its device tables there).
  struct State {};

  // out [B, N, H, Dv] (T), lse [B, H, N] (float), both allocated.
  static Status Forward(OpKernelContext* ctx, State* state, const AttentionProblem& a,
                        const Tensor& q, const Tensor& k, const Tensor& v, Tensor* out,
                        Tensor* lse);

  // dq, dk [B, N, H, D] and dv [B, N, H, Dv] (T), allocated. `a` is a copy:
  // the launcher sets its work split (segments).
  static Status Backward(OpKernelContext* ctx, State* state, AttentionProblem a,
                         const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                         const Tensor& lse, const Tensor& dout, Tensor* dq, Tensor* dk,
                         Tensor* dv);
};

}  // namespace sparse_attention

#endif  // SPARSE_ATTENTION_TF_KERNELS_FUSED_ATTENTION_LAUNCH_H_
