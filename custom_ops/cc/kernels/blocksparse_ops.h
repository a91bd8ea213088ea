// The block-sparse op classes (Sdd, Dsd, DsdT, Softmax, SoftmaxGrad), one per
// op for every device: each checks its shapes and tables (the same checks and
// messages on the CPU and the GPU) and hands a checked Problem to
// BlocksparseLauncher<Device, T>: the CPU launcher (blocksparse_ops.cc) over
// TF's thread pool, the GPU launcher (blocksparse_ops_gpu.cc) on the CUDA
// kernels. Registered for DEVICE_CPU in blocksparse_ops.cc and for DEVICE_GPU
// in blocksparse_ops_gpu.cc (the only source built with GOOGLE_CUDA).
#ifndef SPARSE_ATTENTION_TF_KERNELS_BLOCKSPARSE_OPS_H_
#define SPARSE_ATTENTION_TF_KERNELS_BLOCKSPARSE_OPS_H_

#include "custom_ops/cc/kernels/op_util.h"

namespace sparse_attention {

template <typename Device, typename T>
struct BlocksparseLauncher;

// Outputs are allocated (and not empty); the problem's tables are checked.
template <typename T>
struct BlocksparseLauncher<CPUDevice, T> {
  struct State {};  // per op kernel (the GPU launcher keeps its device tables there)
  // out [B, G, Z, b, b] = A_I B_J^T on the kept blocks.
  static Status Sdd(OpKernelContext* ctx, State* state, const Problem& p, const Tensor& a,
                    const Tensor& b, Tensor* out);
  // out = P X by rows (transposed: P^T X by columns).
  static Status Dsd(OpKernelContext* ctx, State* state, const Problem& p, bool transposed,
                    const Tensor& probs, const Tensor& x, Tensor* out);
  // m: the masks and the key padding mask as the op got them.
  static Status Softmax(OpKernelContext* ctx, State* state, const Problem& p,
                        const SoftmaxMasks& m, float scale, const Tensor& x, Tensor* y);
  // p: the row view of SoftmaxGradOp (only the row lists).
  static Status SoftmaxGrad(OpKernelContext* ctx, State* state, const Problem& p, float scale,
                            const Tensor& y, const Tensor& dy, Tensor* dx);
};

// Inputs: a, b [B, N, H, D], blocks, row_offsets, col_offsets, col_blocks.
template <typename Device, typename T>
class SddOp : public OpKernel {
 public:
  explicit SddOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_size", &block_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& a = ctx->input(0);
    const Tensor& b = ctx->input(1);
    OP_REQUIRES_OK(ctx, CheckDense(a, "a"));
    OP_REQUIRES(ctx, a.shape() == b.shape(),
                Invalid("a and b must have the same shape, got ", ShapeString(a), " and ",
                        ShapeString(b)));
    Problem p;
    OP_REQUIRES_OK(ctx, MakeProblem(a.dim_size(0), a.dim_size(1), a.dim_size(2), a.dim_size(3),
                                    block_, ctx->input(2), ctx->input(3), &ctx->input(4),
                                    &ctx->input(5), &p));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({p.batch, p.groups(), p.t.nnz, p.block, p.block}), &out));
    if (out->NumElements() == 0) return;
    OP_REQUIRES_OK(ctx, BlocksparseLauncher<Device, T>::Sdd(ctx, &state_, p, a, b, out));
  }

 private:
  int64_t block_;
  typename BlocksparseLauncher<Device, T>::State state_;
};

// DSD (rows) and DSD^T (columns) share everything but the walk. Inputs:
// p [B, G, Z, b, b], x [B, N, H, D], blocks, row_offsets, col_offsets, col_blocks.
template <typename Device, typename T, bool kTransposed>
class DsdOp : public OpKernel {
 public:
  explicit DsdOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& probs = ctx->input(0);
    const Tensor& x = ctx->input(1);
    OP_REQUIRES_OK(ctx, CheckDense(x, "x"));
    OP_REQUIRES(ctx, probs.dims() == 5,
                Invalid("p must have rank 5 [batch, groups, nnz, block, block], got ",
                        ShapeString(probs)));
    Problem p;
    OP_REQUIRES_OK(ctx, MakeProblem(x.dim_size(0), x.dim_size(1), x.dim_size(2), x.dim_size(3),
                                    probs.dim_size(3), ctx->input(2), ctx->input(3),
                                    &ctx->input(4), &ctx->input(5), &p));
    OP_REQUIRES_OK(ctx, CheckSparse(probs, "p", p));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &out));
    if (out->NumElements() == 0) return;
    OP_REQUIRES_OK(ctx, BlocksparseLauncher<Device, T>::Dsd(ctx, &state_, p, kTransposed, probs,
                                                            x, out));
  }

 private:
  typename BlocksparseLauncher<Device, T>::State state_;
};

// Inputs: x [B, G, Z, b, b], blocks, row_offsets, mask_index, masks,
// key_padding_mask [B, N] (the source of N).
template <typename Device, typename T>
class SoftmaxOp : public OpKernel {
 public:
  explicit SoftmaxOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& key_padding = ctx->input(5);
    Problem p;
    OP_REQUIRES_OK(ctx, FillSoftmaxProblem(x, ctx->input(1), ctx->input(2), key_padding, &p));
    const Status valid = ValidateProblem(p, false);
    OP_REQUIRES(ctx, valid.ok(), SeqFromKeyPadding(valid, p.seq));
    OP_REQUIRES_OK(ctx, CheckSparse(x, "x", p));
    SoftmaxMasks m;
    OP_REQUIRES_OK(ctx, CheckMaskShapes(ctx->input(3), ctx->input(4), p, &m));
    OP_REQUIRES_OK(ctx, ValidateMaskIndex(p, m));
    m.key_padding = key_padding.flat<bool>().data();
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    if (y->NumElements() == 0) return;
    OP_REQUIRES_OK(ctx, BlocksparseLauncher<Device, T>::Softmax(ctx, &state_, p, m, scale_, x, y));
  }

 private:
  float scale_;
  typename BlocksparseLauncher<Device, T>::State state_;
};

// Inputs: y, dy [B, G, Z, b, b], row_offsets [R + 1] (rows of any layout head).
template <typename Device, typename T>
class SoftmaxGradOp : public OpKernel {
 public:
  explicit SoftmaxGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& y = ctx->input(0);
    const Tensor& dy = ctx->input(1);
    const Tensor& row_offsets = ctx->input(2);
    OP_REQUIRES(ctx, y.dims() == 5,
                Invalid("y must have rank 5 [batch, groups, nnz, block, block], got ",
                        ShapeString(y)));
    OP_REQUIRES(ctx, y.shape() == dy.shape(),
                Invalid("y and dy must have the same shape, got ", ShapeString(y), " and ",
                        ShapeString(dy)));
    OP_REQUIRES(ctx, y.dim_size(3) == y.dim_size(4),
                Invalid("y must hold square blocks, got ", ShapeString(y)));
    OP_REQUIRES_OK(ctx, CheckTable(row_offsets, "row_offsets", 1));
    // Row view: only the row lists are read, so a "layout" of R rows of one block.
    Problem p;
    p.batch = y.dim_size(0);
    p.heads = y.dim_size(1);
    p.block = y.dim_size(3);
    p.head_dim = 1;
    p.t.nnz = y.dim_size(2);
    p.t.layout_heads = 1;
    p.t.num_blocks = row_offsets.dim_size(0) - 1;
    p.seq = p.t.num_blocks * p.block;
    p.t.row_offsets = row_offsets.flat<int32_t>().data();
    OP_REQUIRES(ctx, p.t.num_blocks >= 1,
                Invalid("row_offsets must have at least 2 entries, got ",
                        row_offsets.dim_size(0)));
    for (int64_t r = 0; r <= p.t.num_blocks; ++r) {
      const int32_t o = p.t.row_offsets[r];
      const bool ok = (r == 0 ? o == 0 : o >= p.t.row_offsets[r - 1]) &&
                      (r < p.t.num_blocks || o == p.t.nnz) && o <= p.t.nnz;
      OP_REQUIRES(ctx, ok,
                  Invalid("invalid lookup tables: row_offsets[", r, "] = ", o,
                          " must be non-decreasing from 0 to the number of blocks ", p.t.nnz));
    }
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, y.shape(), &dx));
    if (dx->NumElements() == 0) return;
    OP_REQUIRES_OK(ctx, BlocksparseLauncher<Device, T>::SoftmaxGrad(ctx, &state_, p, scale_, y,
                                                                    dy, dx));
  }

 private:
  float scale_;
  typename BlocksparseLauncher<Device, T>::State state_;
};

}  // namespace sparse_attention

#endif  // SPARSE_ATTENTION_TF_KERNELS_BLOCKSPARSE_OPS_H_
