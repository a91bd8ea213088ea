// DEVICE_CPU registrations of the fused attention ops (the op classes and
// their checks: fused_attention_ops.h; the CPU launcher: fused_attention_cpu.cc).
#include "custom_ops/cc/kernels/fused_attention_ops.h"

namespace sparse_attention {

#define REGISTER(T)                                                                          \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("SparseAttention>BlocksparseAttention").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
      (AttentionOp<CPUDevice, T>));                                                          \
  REGISTER_KERNEL_BUILDER(Name("SparseAttention>BlocksparseAttentionGrad")                  \
                              .Device(DEVICE_CPU)                                            \
                              .TypeConstraint<T>("T"),                                       \
                          (AttentionGradOp<CPUDevice, T>));

REGISTER(float);
REGISTER(Eigen::bfloat16);
REGISTER(Eigen::half);
#undef REGISTER

}  // namespace sparse_attention
