// CPU kernels of the ops that report the CPU kernels' dispatch.
#include "custom_ops/cc/kernels/op_util.h"
#include "custom_ops/cc/kernels/simd.h"

namespace sparse_attention {

// Reports which build of the SIMD primitives this CPU runs.
class SimdIsaOp : public OpKernel {
 public:
  explicit SimdIsaOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<tensorflow::tstring>()() = Simd().isa;
  }
};
REGISTER_KERNEL_BUILDER(Name("SparseAttention>SimdIsa").Device(DEVICE_CPU), SimdIsaOp);

}  // namespace sparse_attention
