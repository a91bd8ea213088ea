// Registration of the block-sparse ops: attributes, shape functions, docs.
// Kernels: custom_ops/cc/kernels/blocksparse_ops.cc. Python wrappers and
// gradients: sparse_attention_tf/ops.py.
//
// Letters: B batch, N sequence, H heads, D head dim, b block size,
// Nb = N / b, Hl layout heads, G = H / Hl, Z kept blocks.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace sparse_attention {

using Status = ::absl::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

// blocks [Z, 3], then `num_lists` rank-1 tables.
Status CheckTableRanks(InferenceContext* c, int blocks_input, int num_lists) {
  ShapeHandle blocks, list;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(blocks_input), 2, &blocks));
  DimensionHandle three;
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(blocks, 1), 3, &three));
  for (int k = 1; k <= num_lists; ++k)
    TF_RETURN_IF_ERROR(c->WithRank(c->input(blocks_input + k), 1, &list));
  return absl::OkStatus();
}

// Output [B, G, Z, b, b] of the SDD product.
Status SddShape(InferenceContext* c) {
  ShapeHandle a, b;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &a));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &b));
  TF_RETURN_IF_ERROR(c->Merge(a, b, &a));
  TF_RETURN_IF_ERROR(CheckTableRanks(c, 2, 3));
  int64_t block;
  TF_RETURN_IF_ERROR(c->GetAttr("block_size", &block));
  DimensionHandle groups = c->UnknownDim();
  const DimensionHandle n = c->Dim(a, 1), h = c->Dim(a, 2);
  const DimensionHandle rows = c->Dim(c->input(3), 0);
  if (c->ValueKnown(n) && c->ValueKnown(h) && c->ValueKnown(rows) && block > 0 &&
      c->Value(n) % block == 0 && c->Value(n) > 0) {
    const int64_t nb = c->Value(n) / block;
    const int64_t layout_heads = (c->Value(rows) - 1) / nb;
    if (layout_heads > 0 && c->Value(h) % layout_heads == 0)
      groups = c->MakeDim(c->Value(h) / layout_heads);
  }
  c->set_output(0, c->MakeShape({c->Dim(a, 0), groups, c->Dim(c->input(2), 0),
                                 c->MakeDim(block), c->MakeDim(block)}));
  return absl::OkStatus();
}

// DSD / DSD^T: [B, G, Z, b, b] x [B, N, H, D] -> [B, N, H, D].
Status DsdShape(InferenceContext* c) {
  ShapeHandle p, x;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 5, &p));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &x));
  TF_RETURN_IF_ERROR(CheckTableRanks(c, 2, 3));
  c->set_output(0, x);
  return absl::OkStatus();
}

// Softmax and its gradient keep the [B, G, Z, b, b] shape.
Status SparseShape(InferenceContext* c) {
  ShapeHandle x;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 5, &x));
  c->set_output(0, x);
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("SparseAttention>BlocksparseSdd")
    .Input("a: T")
    .Input("b: T")
    .Input("blocks: int32")
    .Input("row_offsets: int32")
    .Input("col_offsets: int32")
    .Input("col_blocks: int32")
    .Output("out: T")
    .Attr("block_size: int >= 1")
    .Attr("T: {float, bfloat16, half}")
    .SetShapeFn(SddShape)
    .Doc(R"doc(
Dense x dense^T -> block-sparse: out[b, g, z] = A_I . B_J^T for each kept block
z = (h, I, J), where A_I are rows I*b..I*b+b of head g*Hl+h of a.

a: [B, N, H, D].
b: [B, N, H, D].
blocks: [Z, 3] kept blocks (h, I, J), sorted.
row_offsets: [Hl*Nb + 1] start of each block row in blocks.
col_offsets: [Hl*Nb + 1] start of each block column in col_blocks.
col_blocks: [Z] block indices sorted by (h, J, I).
out: [B, G, Z, b, b], G = H / Hl.
All three products take the same four tables, so that each one's gradient
(built from the other two) has the tables it needs.
)doc");

REGISTER_OP("SparseAttention>BlocksparseDsd")
    .Input("p: T")
    .Input("x: T")
    .Input("blocks: int32")
    .Input("row_offsets: int32")
    .Input("col_offsets: int32")
    .Input("col_blocks: int32")
    .Output("out: T")
    .Attr("T: {float, bfloat16, half}")
    .SetShapeFn(DsdShape)
    .Doc(R"doc(
Block-sparse x dense -> dense: out_I = sum over kept blocks (h, I, J) of P . X_J.

p: [B, G, Z, b, b].
x: [B, N, H, D].
out: [B, N, H, D]; rows of block rows with no kept block are 0.
)doc");

REGISTER_OP("SparseAttention>BlocksparseDsdT")
    .Input("p: T")
    .Input("x: T")
    .Input("blocks: int32")
    .Input("row_offsets: int32")
    .Input("col_offsets: int32")
    .Input("col_blocks: int32")
    .Output("out: T")
    .Attr("T: {float, bfloat16, half}")
    .SetShapeFn(DsdShape)
    .Doc(R"doc(
Transposed block-sparse x dense -> dense: out_J = sum over kept blocks (h, I, J)
of P^T . X_I, walking the column lists.

p: [B, G, Z, b, b].
x: [B, N, H, D].
out: [B, N, H, D].
)doc");

REGISTER_OP("SparseAttention>BlocksparseSoftmax")
    .Input("x: T")
    .Input("blocks: int32")
    .Input("row_offsets: int32")
    .Input("mask_index: int32")
    .Input("masks: bool")
    .Input("key_padding_mask: bool")
    .Output("y: T")
    .Attr("scale: float")
    .Attr("T: {float, bfloat16, half}")
    .SetShapeFn([](InferenceContext* c) -> Status {
      TF_RETURN_IF_ERROR(SparseShape(c));
      TF_RETURN_IF_ERROR(CheckTableRanks(c, 1, 1));
      ShapeHandle s;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 1, &s));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 3, &s));
      return c->WithRank(c->input(5), 2, &s);
    })
    .Doc(R"doc(
Softmax over each query row of a block-sparse tensor, in float32:
y = exp(scale*x - max) / sum over the visible elements of the row. An element
is visible if its block's tile mask keeps it and its key is not padding.
Masked elements, and whole rows with no visible key, are 0.

x: [B, G, Z, b, b].
mask_index: [Z] -1 for a full tile, else an index into masks.
masks: [M, b, b] tile masks (true: keep).
key_padding_mask: [B, N] (true: real key, false: padding).
)doc");

REGISTER_OP("SparseAttention>BlocksparseSoftmaxGrad")
    .Input("y: T")
    .Input("dy: T")
    .Input("row_offsets: int32")
    .Output("dx: T")
    .Attr("scale: float")
    .Attr("T: {float, bfloat16, half}")
    .SetShapeFn([](InferenceContext* c) -> Status {
      TF_RETURN_IF_ERROR(SparseShape(c));
      ShapeHandle s;
      TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(1), &s));
      return c->WithRank(c->input(2), 1, &s);
    })
    .Doc(R"doc(
Gradient of BlocksparseSoftmax: dx = scale * y * (dy - sum_row(y * dy)).

y: [B, G, Z, b, b] the softmax output.
dy: [B, G, Z, b, b].
row_offsets: [R + 1] start of each block row (any layout head) in the blocks.
)doc");

}  // namespace sparse_attention
