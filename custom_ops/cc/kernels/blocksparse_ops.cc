// TensorFlow CPU kernels of the block-sparse ops: check every shape and table,
// convert to float32, split the work units over TF's CPU thread pool and call
// the framework-free bodies in blocksparse_cpu.h.
#define EIGEN_USE_THREADS

#include <algorithm>
#include <functional>
#include <string>

#include "custom_ops/cc/kernels/blocksparse_cpu.h"
#include "custom_ops/cc/kernels/simd.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "tensorflow/core/platform/threadpool.h"

namespace sparse_attention {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using Status = ::absl::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using CPUDevice = Eigen::ThreadPoolDevice;

namespace {

// InvalidArgument with a message built from the arguments.
template <typename... Args>
Status Invalid(const Args&... args) {
  return absl::InvalidArgumentError(absl::StrCat(args...));
}

std::string ShapeString(const Tensor& t) { return t.shape().DebugString(); }

// Runs fn(begin, end) over [0, units) on TF's intra-op thread pool, in fixed
// chunks of about 1/16 of a thread's share: rows of a pattern differ a lot in
// cost (a causal row near the end keeps many more blocks), and small chunks
// taken on demand keep the threads evenly busy.
void ParallelUnits(OpKernelContext* ctx, int64_t units, int64_t cost_per_unit,
                   const std::function<void(int64_t, int64_t)>& fn) {
  if (units <= 0) return;
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  const int64_t threads = pool->NumThreads();
  if (threads <= 1 || units * cost_per_unit < 20000) {
    fn(0, units);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, units / (16 * threads));
  pool->ParallelFor(units, tsl::thread::ThreadPool::SchedulingParams::Fixed(chunk), fn);
}

// A float32 view of an input: the tensor itself, or a converted copy.
template <typename T>
class FloatInput {
 public:
  Status Init(OpKernelContext* ctx, const Tensor& t) {
    TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT, t.shape(), &copy_));
    copy_.flat<float>().device(ctx->eigen_device<CPUDevice>()) =
        t.flat<T>().template cast<float>();
    data_ = copy_.flat<float>().data();
    return absl::OkStatus();
  }
  const float* data() const { return data_; }

 private:
  Tensor copy_;
  const float* data_ = nullptr;
};

template <>
class FloatInput<float> {
 public:
  Status Init(OpKernelContext*, const Tensor& t) {
    data_ = t.flat<float>().data();
    return absl::OkStatus();
  }
  const float* data() const { return data_; }

 private:
  const float* data_ = nullptr;
};

// A float32 buffer for an output: the output itself, or a temporary that
// Finish() converts into the output.
template <typename T>
class FloatOutput {
 public:
  Status Init(OpKernelContext* ctx, Tensor* out) {
    out_ = out;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT, out->shape(), &buf_));
    return absl::OkStatus();
  }
  float* data() { return buf_.flat<float>().data(); }
  void Finish(OpKernelContext* ctx) {
    out_->flat<T>().device(ctx->eigen_device<CPUDevice>()) = buf_.flat<float>().template cast<T>();
  }

 private:
  Tensor* out_ = nullptr;
  Tensor buf_;
};

template <>
class FloatOutput<float> {
 public:
  Status Init(OpKernelContext*, Tensor* out) {
    out_ = out;
    return absl::OkStatus();
  }
  float* data() { return out_->flat<float>().data(); }
  void Finish(OpKernelContext*) {}

 private:
  Tensor* out_ = nullptr;
};

// Checks a dense [B, N, H, D] operand.
Status CheckDense(const Tensor& t, const char* name) {
  if (t.dims() != 4)
    return Invalid(name, " must have rank 4 [batch, seq, heads, head_dim], got shape ",
                                   ShapeString(t));
  if (t.dim_size(1) < 1 || t.dim_size(2) < 1 || t.dim_size(3) < 1)
    return Invalid(name, " must have seq, heads and head_dim >= 1, got shape ",
                                   ShapeString(t));
  return absl::OkStatus();
}

Status CheckTable(const Tensor& t, const char* name, int rank) {
  if (t.dims() != rank)
    return Invalid(name, " must have rank ", rank, ", got shape ", ShapeString(t));
  return absl::OkStatus();
}

// Fills p from the dense shape, the block size and the tables, and validates
// the tables. col_offsets/col_blocks may be null.
Status MakeProblem(int64_t batch, int64_t seq, int64_t heads, int64_t head_dim, int64_t block,
                   const Tensor& blocks, const Tensor& row_offsets, const Tensor* col_offsets,
                   const Tensor* col_blocks, Problem* p) {
  if (block < 1) return Invalid("block size must be >= 1, got ", block);
  if (seq % block != 0)
    return Invalid("sequence length ", seq, " is not a multiple of the block size ",
                                   block);
  TF_RETURN_IF_ERROR(CheckTable(blocks, "blocks", 2));
  if (blocks.dim_size(1) != 3)
    return Invalid("blocks must have shape [nnz, 3], got ", ShapeString(blocks));
  TF_RETURN_IF_ERROR(CheckTable(row_offsets, "row_offsets", 1));
  const int64_t nb = seq / block, rows = row_offsets.dim_size(0) - 1;
  if (rows < 1 || rows % nb != 0)
    return Invalid("row_offsets must have layout_heads * ", nb,
                                   " + 1 entries for a sequence of ", nb, " blocks, got ",
                                   rows + 1);
  p->batch = batch;
  p->seq = seq;
  p->heads = heads;
  p->head_dim = head_dim;
  p->block = block;
  p->t.blocks = blocks.flat<int32_t>().data();
  p->t.row_offsets = row_offsets.flat<int32_t>().data();
  p->t.nnz = blocks.dim_size(0);
  p->t.layout_heads = rows / nb;
  p->t.num_blocks = nb;
  if (col_offsets != nullptr) {
    TF_RETURN_IF_ERROR(CheckTable(*col_offsets, "col_offsets", 1));
    TF_RETURN_IF_ERROR(CheckTable(*col_blocks, "col_blocks", 1));
    if (col_offsets->dim_size(0) != rows + 1)
      return Invalid("col_offsets must have ", rows + 1, " entries like row_offsets, got ",
                                     col_offsets->dim_size(0));
    if (col_blocks->dim_size(0) != p->t.nnz)
      return Invalid("col_blocks must have one entry per block (", p->t.nnz,
                                     "), got ", col_blocks->dim_size(0));
    p->t.col_offsets = col_offsets->flat<int32_t>().data();
    p->t.col_blocks = col_blocks->flat<int32_t>().data();
  }
  const std::string err = ValidateTables(p->t, heads, col_offsets != nullptr);
  if (!err.empty()) return Invalid("invalid lookup tables: ", err);
  return absl::OkStatus();
}

// Checks a block-sparse [B, G, Z, b, b] operand against the problem.
Status CheckSparse(const Tensor& t, const char* name, const Problem& p) {
  if (t.dims() != 5)
    return Invalid(name, " must have rank 5 [batch, groups, nnz, block, block], got ",
                                   ShapeString(t));
  if (t.dim_size(0) != p.batch || t.dim_size(1) != p.groups() || t.dim_size(2) != p.t.nnz ||
      t.dim_size(3) != p.block || t.dim_size(4) != p.block)
    return Invalid(name, " has shape ", ShapeString(t), " but the tables expect [",
                                   p.batch, ", ", p.groups(), ", ", p.t.nnz, ", ", p.block, ", ",
                                   p.block, "]");
  return absl::OkStatus();
}

// Average flops of one row unit, as the thread pool's cost hint.
int64_t RowCost(const Problem& p) {
  const int64_t rows = p.t.layout_heads * p.t.num_blocks;
  return std::max<int64_t>(1, 2 * p.t.nnz / rows * p.tile() * p.head_dim);
}

}  // namespace

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
    OP_REQUIRES(ctx, x.dims() == 5,
                Invalid("x must have rank 5 [batch, groups, nnz, block, block], got ",
                                        ShapeString(x)));
    OP_REQUIRES(ctx, key_padding.dims() == 2 && key_padding.dim_size(0) == x.dim_size(0),
                Invalid("key_padding_mask must have shape [batch, seq] with batch ",
                                        x.dim_size(0), ", got ", ShapeString(key_padding)));
    OP_REQUIRES(ctx, key_padding.dim_size(1) >= 1,
                Invalid("key_padding_mask must have seq >= 1, got ",
                                        ShapeString(key_padding)));
    // The softmax has no dense operand: heads = groups * layout heads.
    const int64_t block = x.dim_size(3), seq = key_padding.dim_size(1);
    OP_REQUIRES(ctx, block >= 1 && seq % block == 0,
                Invalid("key_padding_mask length ", seq,
                                        " is not a multiple of the block size ", block));
    const Tensor& row_offsets = ctx->input(2);
    OP_REQUIRES_OK(ctx, CheckTable(row_offsets, "row_offsets", 1));
    const int64_t nb = seq / block;
    const int64_t layout_heads = (row_offsets.dim_size(0) - 1) / nb;
    Problem p;
    const Status made = MakeProblem(x.dim_size(0), seq, x.dim_size(1) * std::max<int64_t>(1, layout_heads),
                                    1, block, ctx->input(1), row_offsets, nullptr, nullptr, &p);
    OP_REQUIRES(ctx, made.ok(),
                Invalid(made.message(), " (the sequence length ", seq,
                        " is read from key_padding_mask [batch, seq]: check its length)"));
    OP_REQUIRES_OK(ctx, CheckSparse(x, "x", p));
    OP_REQUIRES_OK(ctx, CheckTable(mask_index, "mask_index", 1));
    OP_REQUIRES_OK(ctx, CheckTable(masks, "masks", 3));
    OP_REQUIRES(ctx, mask_index.dim_size(0) == p.t.nnz,
                Invalid("mask_index must have one entry per block (", p.t.nnz,
                                        "), got ", mask_index.dim_size(0)));
    OP_REQUIRES(ctx, masks.dim_size(1) == block && masks.dim_size(2) == block,
                Invalid("masks must have shape [num_masks, ", block, ", ", block,
                                        "], got ", ShapeString(masks)));
    SoftmaxMasks m;
    m.mask_index = mask_index.flat<int32_t>().data();
    m.masks = masks.flat<bool>().data();
    m.num_masks = masks.dim_size(0);
    // An all-true key padding mask hides nothing: skip reading it per element.
    const bool* kp = key_padding.flat<bool>().data();
    m.key_padding = std::all_of(kp, kp + key_padding.NumElements(), [](bool k) { return k; })
                        ? nullptr
                        : kp;
    const std::string err = ValidateMasks(p, m);
    OP_REQUIRES(ctx, err.empty(), Invalid("invalid masks: ", err));

    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    if (y->NumElements() == 0) return;
    FloatInput<T> fx;
    OP_REQUIRES_OK(ctx, fx.Init(ctx, x));
    FloatOutput<T> fy;
    OP_REQUIRES_OK(ctx, fy.Init(ctx, y));
    ParallelUnits(ctx, p.num_units(), RowCost(p) / std::max<int64_t>(1, block), [&](int64_t s, int64_t e) {
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
