// Registration of the fused block-sparse attention op and its gradient.
// Kernels: custom_ops/cc/kernels/fused_attention_ops.cc (TF) over
// fused_attention.h (framework-free). Python: sparse_attention_tf/ops.py.
//
// Letters: B batch, N sequence, H heads, D head dim, Dv value head dim,
// b block size, Z kept blocks, M tile masks.
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace sparse_attention {

using Status = ::absl::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

// q, k [B, N, H, D] and v [B, N, H, Dv]; the tables from input `first`:
// blocks [Z, 3], row_offsets, col_offsets, col_blocks, mask_index (rank 1),
// masks (rank 3), mask_key_range [M, 2], mask_query_range (rank 3),
// mask_split (rank 1), key_padding_mask (rank 2). Sets *v to v's shape.
Status CheckAttentionInputs(InferenceContext* c, int first, ShapeHandle* qk, ShapeHandle* v) {
  ShapeHandle k, s;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, qk));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &k));
  TF_RETURN_IF_ERROR(c->Merge(*qk, k, qk));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 4, v));
  ShapeHandle qk3, v3;
  TF_RETURN_IF_ERROR(c->Subshape(*qk, 0, 3, &qk3));
  TF_RETURN_IF_ERROR(c->Subshape(*v, 0, 3, &v3));
  TF_RETURN_IF_ERROR(c->Merge(qk3, v3, &qk3));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(first), 2, &s));
  DimensionHandle three;
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(s, 1), 3, &three));
  for (int i = 1; i <= 4; ++i) TF_RETURN_IF_ERROR(c->WithRank(c->input(first + i), 1, &s));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(first + 5), 3, &s));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(first + 6), 2, &s));
  DimensionHandle two;
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(s, 1), 2, &two));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(first + 7), 3, &s));
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(s, 2), 2, &two));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(first + 8), 1, &s));
  return c->WithRank(c->input(first + 9), 2, &s);
}

}  // namespace

REGISTER_OP("SparseAttention>BlocksparseAttention")
    .Input("q: T")
    .Input("k: T")
    .Input("v: T")
    .Input("blocks: int32")
    .Input("row_offsets: int32")
    .Input("col_offsets: int32")
    .Input("col_blocks: int32")
    .Input("mask_index: int32")
    .Input("masks: bool")
    .Input("mask_key_range: int32")
    .Input("mask_query_range: int32")
    .Input("mask_split: bool")
    .Input("key_padding_mask: bool")
    .Output("out: T")
    .Output("lse: float")
    .Attr("scale: float")
    .Attr("block_size: int >= 1")
    .Attr("T: {float, bfloat16, half}")
    .SetShapeFn([](InferenceContext* c) -> Status {
      ShapeHandle qk, v;
      TF_RETURN_IF_ERROR(CheckAttentionInputs(c, 3, &qk, &v));
      c->set_output(0, v);
      c->set_output(1, c->MakeShape({c->Dim(qk, 0), c->Dim(qk, 2), c->Dim(qk, 1)}));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Fused block-sparse softmax attention: for each query row, the softmax of
scale * q . k over its visible keys (kept block, tile mask true, key not
padding), times v; computed block row by block row with an online softmax,
never storing the score tensor. Rows with no visible key give 0.

q: [B, N, H, D].
k: [B, N, H, D].
v: [B, N, H, Dv].
blocks, row_offsets, col_offsets, col_blocks: the lookup tables (see BlocksparseSdd).
mask_index: [Z] -1 for a full tile, else an index into masks.
masks: [M, b, b] tile masks (true: keep) at [query row, key column].
mask_key_range: [M, 2] per tile mask the key columns [lo, hi) that some query
  sees, multiples of 16 in [0, b]; (0, 0) for a mask no query sees anything of.
mask_query_range: [M, b/16, 2] per tile mask and group g of 16 keys (keys
  16g..16g+15) the queries [lo, hi) that see any of them, multiples of 16 in
  [0, b]; (0, 0) where none does.
mask_split: [M] true if the kernels compute the tile group by group on the
  queries of mask_query_range only. The three tables are built once per
  pattern (sparse_attention_tf/layout.py); they must cover every visible
  element of masks (checked), and wider ranges are valid (only slower).
key_padding_mask: [B, N] (true: real key, false: padding).
out: [B, N, H, Dv].
lse: [B, H, N] float32 log-sum-exp of each row's visible scaled scores, -inf
  for rows with no visible key; the gradient op recomputes the probabilities
  from it. Not differentiable.
)doc");

REGISTER_OP("SparseAttention>BlocksparseAttentionGrad")
    .Input("q: T")
    .Input("k: T")
    .Input("v: T")
    .Input("out: T")
    .Input("lse: float")
    .Input("dout: T")
    .Input("blocks: int32")
    .Input("row_offsets: int32")
    .Input("col_offsets: int32")
    .Input("col_blocks: int32")
    .Input("mask_index: int32")
    .Input("masks: bool")
    .Input("mask_key_range: int32")
    .Input("mask_query_range: int32")
    .Input("mask_split: bool")
    .Input("key_padding_mask: bool")
    .Output("dq: T")
    .Output("dk: T")
    .Output("dv: T")
    .Attr("scale: float")
    .Attr("block_size: int >= 1")
    .Attr("T: {float, bfloat16, half}")
    .SetShapeFn([](InferenceContext* c) -> Status {
      ShapeHandle qk, v, s;
      TF_RETURN_IF_ERROR(CheckAttentionInputs(c, 6, &qk, &v));
      TF_RETURN_IF_ERROR(c->Merge(v, c->input(3), &v));
      TF_RETURN_IF_ERROR(c->Merge(v, c->input(5), &v));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 3, &s));
      c->set_output(0, qk);
      c->set_output(1, qk);
      c->set_output(2, v);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Gradient of BlocksparseAttention: with P recomputed from lse,
delta = rowsum(dout * out), dS = P * (dout . v^T - delta):
dq = scale * dS . k, dk = scale * dS^T . q, dv = P^T . dout. Work units are
(batch, head, block-row segment), so no two threads write one element and
results repeat bitwise for a given thread count.

q, k: [B, N, H, D]. v, out, dout: [B, N, H, Dv]. lse: [B, H, N].
dq, dk: [B, N, H, D]. dv: [B, N, H, Dv].
)doc");

}  // namespace sparse_attention
