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

}  // namespace sparse_attention
