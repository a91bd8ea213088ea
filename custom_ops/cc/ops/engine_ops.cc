// Registration of the ops that report the CPU kernels' dispatch.
// Kernels: custom_ops/cc/kernels/engine_ops.cc.
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace sparse_attention {

REGISTER_OP("SparseAttention>SimdIsa")
    .Output("isa: string")
    .SetShapeFn(::tensorflow::shape_inference::ScalarShape)
    .Doc(R"doc(
The instruction set the CPU kernels run on: "avx512", "avx2" or "baseline".
)doc");

REGISTER_OP("SparseAttention>CpuEngines")
    .Output("engines: string")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->Vector(4));
      return absl::OkStatus();
    })
    .Doc(R"doc(
The fused attention's CPU dispatch (custom_ops/cc/kernels/attention_engines.h):
[the float32 engine, the bfloat16 engine ("" when bfloat16 converts to
float32), the engines this CPU runs (comma-separated, best first), the value
of $SPARSE_ATTENTION_TF_ISA]. Fails (FailedPrecondition) when
$SPARSE_ATTENTION_TF_ISA asks for an engine this CPU lacks, as the fused ops do.
)doc");

}  // namespace sparse_attention
