// CPU kernels of the ops that report the CPU kernels' dispatch.
#include "custom_ops/cc/kernels/op_util.h"
#include "custom_ops/cc/kernels/attention_engines.h"
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

// Reports the fused attention's dispatch, or its error.
class CpuEnginesOp : public OpKernel {
 public:
  explicit CpuEnginesOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    const CpuDispatch& d = Dispatch();
    OP_REQUIRES(ctx, d.error.empty(), absl::FailedPreconditionError(d.error));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({4}), &out));
    auto v = out->vec<tensorflow::tstring>();
    v(0) = d.float32->name;
    v(1) = d.bfloat16 != nullptr ? d.bfloat16->name : "";
    v(2) = d.available;
    v(3) = d.requested;
  }
};
REGISTER_KERNEL_BUILDER(Name("SparseAttention>CpuEngines").Device(DEVICE_CPU), CpuEnginesOp);

}  // namespace sparse_attention
