// TensorFlow CPU kernels of the block-sparse ops: check every shape and table,
// convert to float32, split the work units over TF's CPU thread pool and call
// the framework-free bodies in blocksparse_cpu.h.
#include "custom_ops/cc/kernels/op_util.h"
#include "custom_ops/cc/kernels/simd.h"

namespace sparse_attention {

// ---------------------------------------------------------------------------
template <typename T>
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
                Invalid("a and b must have the same shape, got ", ShapeString(a),
                                        " and ", ShapeString(b)));
    Problem p;
    OP_REQUIRES_OK(ctx, MakeProblem(a.dim_size(0), a.dim_size(1), a.dim_size(2), a.dim_size(3),
                                    block_, ctx->input(2), ctx->input(3), &ctx->input(4),
                                    &ctx->input(5), &p));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({p.batch, p.groups(), p.t.nnz, p.block, p.block}), &out));
    if (out->NumElements() == 0) return;
    FloatInput<T> fa, fb;
    OP_REQUIRES_OK(ctx, fa.Init(ctx, a));
    OP_REQUIRES_OK(ctx, fb.Init(ctx, b));
    Tensor b_t;  // b transposed per head: [B, H, D, N]
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT,
                                           TensorShape({p.batch, p.heads, p.head_dim, p.seq}), &b_t));
    float* b_t_data = b_t.flat<float>().data();
    ParallelUnits(ctx, p.batch * p.heads, p.seq * p.head_dim * 4,
                  [&](int64_t s, int64_t e) { TransposeHeads(p, fb.data(), b_t_data, s, e); });
    FloatOutput<T> fo;
    OP_REQUIRES_OK(ctx, fo.Init(ctx, out));
    ParallelUnits(ctx, p.num_units(), RowCost(p),
                  [&](int64_t s, int64_t e) { SddRows(p, fa.data(), b_t_data, fo.data(), s, e); });
    fo.Finish(ctx);
  }

 private:
  int64_t block_;
};

// DSD (rows) and DSD^T (columns) share everything but the walk.
template <typename T, bool kTransposed>
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
                                    probs.dim_size(3), ctx->input(2), ctx->input(3), &ctx->input(4),
                                    &ctx->input(5), &p));
    OP_REQUIRES_OK(ctx, CheckSparse(probs, "p", p));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &out));
    if (out->NumElements() == 0) return;
    FloatInput<T> fp, fx;
    OP_REQUIRES_OK(ctx, fp.Init(ctx, probs));
    OP_REQUIRES_OK(ctx, fx.Init(ctx, x));
    FloatOutput<T> fo;
    OP_REQUIRES_OK(ctx, fo.Init(ctx, out));
    ParallelUnits(ctx, p.num_units(), RowCost(p), [&](int64_t s, int64_t e) {
      if (kTransposed)
        DsdTColumns(p, fp.data(), fx.data(), fo.data(), s, e);
      else
        DsdRows(p, fp.data(), fx.data(), fo.data(), s, e);
    });
    fo.Finish(ctx);
  }
};

template <typename T>
class SoftmaxOp : public OpKernel {
 public:
  explicit SoftmaxOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& mask_index = ctx->input(3);
    const Tensor& masks = ctx->input(4);
    const Tensor& key_padding = ctx->input(5);
    Problem p;
    OP_REQUIRES_OK(ctx, FillSoftmaxProblem(x, ctx->input(1), ctx->input(2), key_padding, &p));
    const Status valid = ValidateProblem(p, false);
    OP_REQUIRES(ctx, valid.ok(), SeqFromKeyPadding(valid, p.seq));
    OP_REQUIRES_OK(ctx, CheckSparse(x, "x", p));
    SoftmaxMasks m;
    OP_REQUIRES_OK(ctx, CheckMaskShapes(mask_index, masks, p, &m));
    // An all-true key padding mask hides nothing: skip reading it per element.
    const bool* kp = key_padding.flat<bool>().data();
    m.key_padding = std::all_of(kp, kp + key_padding.NumElements(), [](bool k) { return k; })
                        ? nullptr
                        : kp;
    OP_REQUIRES_OK(ctx, ValidateMaskIndex(p, m));

    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    if (y->NumElements() == 0) return;
    FloatInput<T> fx;
    OP_REQUIRES_OK(ctx, fx.Init(ctx, x));
    FloatOutput<T> fy;
    OP_REQUIRES_OK(ctx, fy.Init(ctx, y));
    ParallelUnits(ctx, p.num_units(), RowCost(p) / std::max<int64_t>(1, p.block), [&](int64_t s, int64_t e) {
      SoftmaxRows(p, m, scale_, fx.data(), fy.data(), s, e);
    });
    fy.Finish(ctx);
  }

 private:
  float scale_;
};

template <typename T>
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
                Invalid("y and dy must have the same shape, got ", ShapeString(y),
                                        " and ", ShapeString(dy)));
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
                                          " must be non-decreasing from 0 to the number of blocks ",
                                          p.t.nnz));
    }
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, y.shape(), &dx));
    if (dx->NumElements() == 0) return;
    FloatInput<T> fy, fdy;
    OP_REQUIRES_OK(ctx, fy.Init(ctx, y));
    OP_REQUIRES_OK(ctx, fdy.Init(ctx, dy));
    FloatOutput<T> fdx;
    OP_REQUIRES_OK(ctx, fdx.Init(ctx, dx));
    ParallelUnits(ctx, p.num_units(), 4 * p.t.nnz / p.t.num_blocks * p.tile() + 1,
                  [&](int64_t s, int64_t e) {
                    SoftmaxGradRows(p, scale_, fy.data(), fdy.data(), fdx.data(), s, e);
                  });
    fdx.Finish(ctx);
  }

 private:
  float scale_;
};

#define REGISTER(T)                                                                        \
  REGISTER_KERNEL_BUILDER(                                                                 \
      Name("SparseAttention>BlocksparseSdd").Device(DEVICE_CPU).TypeConstraint<T>("T"),   \
      SddOp<T>);                                                                           \
  REGISTER_KERNEL_BUILDER(                                                                 \
      Name("SparseAttention>BlocksparseDsd").Device(DEVICE_CPU).TypeConstraint<T>("T"),   \
      (DsdOp<T, false>));                                                                  \
  REGISTER_KERNEL_BUILDER(                                                                 \
      Name("SparseAttention>BlocksparseDsdT").Device(DEVICE_CPU).TypeConstraint<T>("T"),  \
      (DsdOp<T, true>));                                                                   \
  REGISTER_KERNEL_BUILDER(                                                                 \
      Name("SparseAttention>BlocksparseSoftmax").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
      SoftmaxOp<T>);                                                                       \
  REGISTER_KERNEL_BUILDER(Name("SparseAttention>BlocksparseSoftmaxGrad")                  \
                              .Device(DEVICE_CPU)                                          \
                              .TypeConstraint<T>("T"),                                     \
                          SoftmaxGradOp<T>);

REGISTER(float);
REGISTER(Eigen::bfloat16);
REGISTER(Eigen::half);
#undef REGISTER

}  // namespace sparse_attention
