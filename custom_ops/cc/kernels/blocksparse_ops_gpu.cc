// TensorFlow GPU kernels of the block-sparse ops (built only with
// -DGOOGLE_CUDA=1: `make ops GPU=1` or `bazel build --config=cuda`; without it
// this file compiles to nothing). The CUDA kernels themselves are
// framework-free, in custom_ops/cuda/blocksparse_gpu.{h,cu}.
//
// Needs no CUDA headers (the TF pip package has none): the stream comes from
// TF's stream executor and every CUDA call lives in the .cu file.
//
// Tables (blocks, row/column lists, mask_index) are HostMemory inputs: they
// are checked on the host with the same checks and messages as the CPU
// kernels (ValidateTables / ValidateMasks of blocksparse_cpu.h), then copied
// to the device once per distinct content (a pattern's tables are the same
// at every step) and reused. masks and key_padding_mask stay on the device.
// Kernels run on TF's compute stream.
#if GOOGLE_CUDA

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <mutex>
#include <string>
#include <vector>

#include "custom_ops/cc/kernels/fused_attention.h"
#include "custom_ops/cc/kernels/op_util.h"  // the CPU kernels' checks and messages
#include "custom_ops/cuda/blocksparse_gpu.h"
#include "xla/stream_executor/stream.h"

namespace sparse_attention {

using ::tensorflow::DEVICE_GPU;

namespace {

template <typename T>
struct GpuType;
template <>
struct GpuType<float> {
  static constexpr gpu::DType kValue = gpu::DType::kFloat;
};
template <>
struct GpuType<Eigen::half> {
  static constexpr gpu::DType kValue = gpu::DType::kHalf;
};
template <>
struct GpuType<Eigen::bfloat16> {
  static constexpr gpu::DType kValue = gpu::DType::kBFloat16;
};

// TF's compute stream of this op (a cudaStream_t). Through the stream
// executor rather than Eigen::GpuDevice, which would need the CUDA headers.
gpu::GpuStream Stream(OpKernelContext* ctx) {
  return ctx->op_device_context()->stream()->platform_specific_handle().stream;
}

// A launcher's message as an op error.
Status FromLaunch(const std::string& err) {
  return err.empty() ? absl::OkStatus() : Invalid(err);
}

// ---- checks: op_util.h (FillProblem, ValidateProblem, CheckSparse,
// CheckMaskShapes, ValidateMaskIndex, FillSoftmaxProblem, CheckAttentionShapes),
// the CPU kernels' checks and messages ---------------------------------------
// ---- device copies of the tables --------------------------------------------
// The int32 host tables of one kernel, uploaded to the device once per
// distinct content (and checked by `validate` only then): a pattern's tables
// are the same every step, so the steady state costs one comparison. A few
// entries, because eager mode shares one kernel between layers whose tables
// differ.
class TableCache {
 public:
  // tables: host int32 tensors (null entries allowed); key: the dimensions the
  // validation depended on. Fills ptrs (device, null for null entries) and
  // keep_alive (holds the device buffer for this call).
  Status Get(OpKernelContext* ctx, std::initializer_list<const Tensor*> tables,
             const std::vector<int64_t>& key, const std::function<Status()>& validate,
             Tensor* keep_alive, std::vector<const int32_t*>* ptrs) {
    std::vector<int32_t> packed;
    std::vector<int64_t> offsets;
    for (const Tensor* t : tables) {
      offsets.push_back(t == nullptr ? -1 : int64_t(packed.size()));
      if (t == nullptr) continue;
      const auto f = t->flat<int32_t>();
      packed.insert(packed.end(), f.data(), f.data() + f.size());
    }
    std::lock_guard<std::mutex> lock(mu_);
    Entry* hit = nullptr;
    for (Entry& e : entries_)
      if (e.key == key && e.host == packed) hit = &e;
    if (hit == nullptr) {
      TF_RETURN_IF_ERROR(validate());
      Tensor dev;
      TF_RETURN_IF_ERROR(ctx->allocate_temp(
          tensorflow::DT_INT32, TensorShape({std::max<int64_t>(1, packed.size())}), &dev));
      if (!packed.empty()) {
        // From pageable memory: staged before the call returns, so `packed`
        // may go away afterwards.
        const std::string err = gpu::CopyToDevice(dev.flat<int32_t>().data(), packed.data(),
                                                  packed.size() * sizeof(int32_t), Stream(ctx));
        if (!err.empty())
          return absl::InternalError(absl::StrCat("copying the lookup tables to the GPU: ", err));
      }
      if (entries_.size() >= kMaxEntries) entries_.erase(entries_.begin());  // the oldest
      entries_.push_back(Entry{key, std::move(packed), dev});
      hit = &entries_.back();
    }
    *keep_alive = hit->device;
    const int32_t* base = hit->device.flat<int32_t>().data();
    ptrs->clear();
    for (int64_t o : offsets) ptrs->push_back(o < 0 ? nullptr : base + o);
    return absl::OkStatus();
  }

 private:
  static constexpr size_t kMaxEntries = 8;
  struct Entry {
    std::vector<int64_t> key;
    std::vector<int32_t> host;
    Tensor device;
  };
  std::mutex mu_;
  std::vector<Entry> entries_;
};

gpu::DeviceTables ToDevice(const Problem& p, const std::vector<const int32_t*>& ptrs) {
  gpu::DeviceTables t;
  t.blocks = ptrs[0];
  t.row_offsets = ptrs[1];
  t.col_offsets = ptrs.size() > 2 ? ptrs[2] : nullptr;
  t.col_blocks = ptrs.size() > 3 ? ptrs[3] : nullptr;
  t.mask_index = ptrs.size() > 4 ? ptrs[4] : nullptr;
  t.nnz = p.t.nnz;
  t.layout_heads = p.t.layout_heads;
  t.num_blocks = p.t.num_blocks;
  return t;
}

gpu::Dims ToDims(const Problem& p, int64_t value_dim) {
  gpu::Dims d;
  d.batch = p.batch;
  d.seq = p.seq;
  d.heads = p.heads;
  d.head_dim = p.head_dim;
  d.value_dim = value_dim;
  d.block = p.block;
  return d;
}

template <typename T>
const void* Ptr(const Tensor& t) {
  return t.flat<T>().data();
}
template <typename T>
void* Ptr(Tensor* t) {
  return t->flat<T>().data();
}

}  // namespace

// ---------------------------------------------------------------------------
template <typename T>
class SddGpuOp : public OpKernel {
 public:
  explicit SddGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
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
    OP_REQUIRES_OK(ctx, FillProblem(a.dim_size(0), a.dim_size(1), a.dim_size(2), a.dim_size(3),
                                    block_, ctx->input(2), ctx->input(3), &ctx->input(4),
                                    &ctx->input(5), &p));
    Tensor keep;
    std::vector<const int32_t*> ptrs;
    OP_REQUIRES_OK(ctx, cache_.Get(ctx, {&ctx->input(2), &ctx->input(3), &ctx->input(4), &ctx->input(5)},
                                   {p.heads, p.t.num_blocks}, [&] { return ValidateProblem(p, true); },
                                   &keep, &ptrs));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({p.batch, p.groups(), p.t.nnz, p.block, p.block}), &out));
    if (out->NumElements() == 0) return;
    OP_REQUIRES_OK(ctx, FromLaunch(gpu::Sdd(GpuType<T>::kValue, ToDims(p, 0), ToDevice(p, ptrs),
                                            Ptr<T>(a), Ptr<T>(b), Ptr<T>(out), Stream(ctx))));
  }

 private:
  int64_t block_;
  TableCache cache_;
};

template <typename T, bool kTransposed>
class DsdGpuOp : public OpKernel {
 public:
  explicit DsdGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& probs = ctx->input(0);
    const Tensor& x = ctx->input(1);
    OP_REQUIRES_OK(ctx, CheckDense(x, "x"));
    OP_REQUIRES(ctx, probs.dims() == 5,
                Invalid("p must have rank 5 [batch, groups, nnz, block, block], got ",
                        ShapeString(probs)));
    Problem p;
    OP_REQUIRES_OK(ctx, FillProblem(x.dim_size(0), x.dim_size(1), x.dim_size(2), x.dim_size(3),
                                    probs.dim_size(3), ctx->input(2), ctx->input(3), &ctx->input(4),
                                    &ctx->input(5), &p));
    Tensor keep;
    std::vector<const int32_t*> ptrs;
    OP_REQUIRES_OK(ctx, cache_.Get(ctx, {&ctx->input(2), &ctx->input(3), &ctx->input(4), &ctx->input(5)},
                                   {p.heads, p.t.num_blocks}, [&] { return ValidateProblem(p, true); },
                                   &keep, &ptrs));
    OP_REQUIRES_OK(ctx, CheckSparse(probs, "p", p));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &out));
    if (out->NumElements() == 0) return;
    const auto launch = kTransposed ? gpu::DsdT : gpu::Dsd;
    OP_REQUIRES_OK(ctx, FromLaunch(launch(GpuType<T>::kValue, ToDims(p, 0), ToDevice(p, ptrs),
                                          Ptr<T>(probs), Ptr<T>(x), Ptr<T>(out), Stream(ctx))));
  }

 private:
  TableCache cache_;
};

template <typename T>
class SoftmaxGpuOp : public OpKernel {
 public:
  explicit SoftmaxGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& blocks = ctx->input(1);
    const Tensor& row_offsets = ctx->input(2);
    const Tensor& mask_index = ctx->input(3);
    const Tensor& masks = ctx->input(4);
    const Tensor& key_padding = ctx->input(5);
    Problem p;
    OP_REQUIRES_OK(ctx, FillSoftmaxProblem(x, blocks, row_offsets, key_padding, &p));
    OP_REQUIRES_OK(ctx, CheckSparse(x, "x", p));
    SoftmaxMasks m;
    OP_REQUIRES_OK(ctx, CheckMaskShapes(mask_index, masks, p, &m));
    Tensor keep;
    std::vector<const int32_t*> ptrs;
    OP_REQUIRES_OK(ctx, cache_.Get(ctx, {&blocks, &row_offsets, nullptr, nullptr, &mask_index},
                                   {p.heads, p.t.num_blocks, m.num_masks},
                                   [&]() -> Status {
                                     TF_RETURN_IF_ERROR(ValidateProblem(p, false));
                                     return ValidateMaskIndex(p, m);
                                   },
                                   &keep, &ptrs));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    if (y->NumElements() == 0) return;
    gpu::DeviceTables t = ToDevice(p, ptrs);
    t.masks = masks.flat<bool>().data();
    OP_REQUIRES_OK(ctx, FromLaunch(gpu::Softmax(GpuType<T>::kValue, ToDims(p, 0), t,
                                                key_padding.flat<bool>().data(), scale_, Ptr<T>(x),
                                                Ptr<T>(y), Stream(ctx))));
  }

 private:
  float scale_;
  TableCache cache_;
};

template <typename T>
class SoftmaxGradGpuOp : public OpKernel {
 public:
  explicit SoftmaxGradGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
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
    const int64_t rows = row_offsets.dim_size(0) - 1, nnz = y.dim_size(2);
    OP_REQUIRES(ctx, rows >= 1,
                Invalid("row_offsets must have at least 2 entries, got ", row_offsets.dim_size(0)));
    Tensor keep;
    std::vector<const int32_t*> ptrs;
    OP_REQUIRES_OK(ctx, cache_.Get(ctx, {&row_offsets}, {nnz},
                                   [&]() -> Status {
                                     const int32_t* o = row_offsets.flat<int32_t>().data();
                                     for (int64_t r = 0; r <= rows; ++r) {
                                       const bool ok = (r == 0 ? o[r] == 0 : o[r] >= o[r - 1]) &&
                                                       (r < rows || o[r] == nnz) && o[r] <= nnz;
                                       if (!ok)
                                         return Invalid("invalid lookup tables: row_offsets[", r,
                                                        "] = ", o[r],
                                                        " must be non-decreasing from 0 to the "
                                                        "number of blocks ",
                                                        nnz);
                                     }
                                     return absl::OkStatus();
                                   },
                                   &keep, &ptrs));
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, y.shape(), &dx));
    if (dx->NumElements() == 0) return;
    OP_REQUIRES_OK(ctx, FromLaunch(gpu::SoftmaxGrad(GpuType<T>::kValue, y.dim_size(0), y.dim_size(1),
                                                    nnz, y.dim_size(3), rows, ptrs[0], scale_,
                                                    Ptr<T>(y), Ptr<T>(dy), Ptr<T>(dx), Stream(ctx))));
  }

 private:
  float scale_;
  TableCache cache_;
};

// ---- fused attention ---------------------------------------------------------
template <typename T>
class AttentionGpuOp : public OpKernel {
 public:
  explicit AttentionGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_size", &block_));
    const std::string err = ValidateBlockSize(block_);  // as the CPU kernels
    OP_REQUIRES(ctx, err.empty(), Invalid(err));
    const std::string scale_err = ValidateScale(scale_);
    OP_REQUIRES(ctx, scale_err.empty(), Invalid(scale_err));
  }

  // Inputs: q, k, v, blocks, row_offsets, col_offsets, col_blocks, mask_index,
  // masks, key_padding_mask. Outputs: out [B, N, H, Dv], lse [B, H, N] float.
  void Compute(OpKernelContext* ctx) override {
    const Tensor& q = ctx->input(0);
    const Tensor& k = ctx->input(1);
    const Tensor& v = ctx->input(2);
    Problem p;
    SoftmaxMasks m;
    OP_REQUIRES_OK(ctx, CheckAttentionShapes(ctx, 3, block_, &p, &m));
    Tensor keep;
    std::vector<const int32_t*> ptrs;
    OP_REQUIRES_OK(ctx, cache_.Get(ctx,
                                   {&ctx->input(3), &ctx->input(4), &ctx->input(5), &ctx->input(6),
                                    &ctx->input(7)},
                                   {p.heads, p.t.num_blocks, m.num_masks},
                                   [&]() -> Status {
                                     TF_RETURN_IF_ERROR(ValidateProblem(p, false));
                                     return ValidateMaskIndex(p, m);
                                   },
                                   &keep, &ptrs));
    Tensor* out = nullptr;
    Tensor* lse = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, v.shape(), &out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({p.batch, p.heads, p.seq}), &lse));
    if (out->NumElements() == 0 && lse->NumElements() == 0) return;
    gpu::DeviceTables t = ToDevice(p, ptrs);
    t.masks = ctx->input(8).flat<bool>().data();
    OP_REQUIRES_OK(ctx, FromLaunch(gpu::AttentionForward(
                            GpuType<T>::kValue, ToDims(p, v.dim_size(3)), t,
                            ctx->input(9).flat<bool>().data(), scale_, Ptr<T>(q), Ptr<T>(k),
                            Ptr<T>(v), Ptr<T>(out), lse->flat<float>().data(), Stream(ctx))));
  }

 private:
  float scale_;
  int64_t block_;
  TableCache cache_;
};

template <typename T>
class AttentionGradGpuOp : public OpKernel {
 public:
  explicit AttentionGradGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_size", &block_));
    const std::string err = ValidateBlockSize(block_);  // as the CPU kernels
    OP_REQUIRES(ctx, err.empty(), Invalid(err));
    const std::string scale_err = ValidateScale(scale_);
    OP_REQUIRES(ctx, scale_err.empty(), Invalid(scale_err));
  }

  // Inputs: q, k, v, out, lse, dout, blocks, row_offsets, col_offsets,
  // col_blocks, mask_index, masks, key_padding_mask. Outputs: dq, dk, dv.
  void Compute(OpKernelContext* ctx) override {
    const Tensor& q = ctx->input(0);
    const Tensor& k = ctx->input(1);
    const Tensor& v = ctx->input(2);
    const Tensor& out = ctx->input(3);
    const Tensor& lse = ctx->input(4);
    const Tensor& dout = ctx->input(5);
    Problem p;
    SoftmaxMasks m;
    OP_REQUIRES_OK(ctx, CheckAttentionShapes(ctx, 6, block_, &p, &m));
    OP_REQUIRES(ctx, out.shape() == v.shape() && dout.shape() == v.shape(),
                Invalid("out and dout must have the shape of v ", ShapeString(v), ", got ",
                        ShapeString(out), " and ", ShapeString(dout)));
    OP_REQUIRES(ctx, lse.shape() == TensorShape({p.batch, p.heads, p.seq}),
                Invalid("lse must have shape [batch, heads, seq] = [", p.batch, ", ", p.heads,
                        ", ", p.seq, "], got ", ShapeString(lse)));
    Tensor keep;
    std::vector<const int32_t*> ptrs;
    OP_REQUIRES_OK(ctx, cache_.Get(ctx,
                                   {&ctx->input(6), &ctx->input(7), &ctx->input(8), &ctx->input(9),
                                    &ctx->input(10)},
                                   {p.heads, p.t.num_blocks, m.num_masks},
                                   [&]() -> Status {
                                     TF_RETURN_IF_ERROR(ValidateProblem(p, true));
                                     return ValidateMaskIndex(p, m);
                                   },
                                   &keep, &ptrs));
    Tensor *dq = nullptr, *dk = nullptr, *dv = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, q.shape(), &dq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, k.shape(), &dk));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, v.shape(), &dv));
    if (q.NumElements() == 0) return;
    const gpu::Dims dims = ToDims(p, v.dim_size(3));
    Tensor work;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT,
                                           TensorShape({gpu::AttentionBackwardWorkspaceBytes(dims) / 4}),
                                           &work));
    gpu::DeviceTables t = ToDevice(p, ptrs);
    t.masks = ctx->input(11).flat<bool>().data();
    OP_REQUIRES_OK(ctx, FromLaunch(gpu::AttentionBackward(
                            GpuType<T>::kValue, dims, t, ctx->input(12).flat<bool>().data(), scale_,
                            Ptr<T>(q), Ptr<T>(k), Ptr<T>(v), Ptr<T>(out), lse.flat<float>().data(),
                            Ptr<T>(dout), Ptr<T>(dq), Ptr<T>(dk), Ptr<T>(dv),
                            work.flat<float>().data(), Stream(ctx))));
  }

 private:
  float scale_;
  int64_t block_;
  TableCache cache_;
};

#define SPARSE_ATTENTION_TABLES(builder) \
  builder.HostMemory("blocks").HostMemory("row_offsets").HostMemory("col_offsets").HostMemory("col_blocks")

#define REGISTER_GPU(T)                                                                          \
  REGISTER_KERNEL_BUILDER(SPARSE_ATTENTION_TABLES(Name("SparseAttention>BlocksparseSdd")        \
                                                      .Device(DEVICE_GPU)                        \
                                                      .TypeConstraint<T>("T")),                  \
                          SddGpuOp<T>);                                                          \
  REGISTER_KERNEL_BUILDER(SPARSE_ATTENTION_TABLES(Name("SparseAttention>BlocksparseDsd")        \
                                                      .Device(DEVICE_GPU)                        \
                                                      .TypeConstraint<T>("T")),                  \
                          (DsdGpuOp<T, false>));                                                 \
  REGISTER_KERNEL_BUILDER(SPARSE_ATTENTION_TABLES(Name("SparseAttention>BlocksparseDsdT")       \
                                                      .Device(DEVICE_GPU)                        \
                                                      .TypeConstraint<T>("T")),                  \
                          (DsdGpuOp<T, true>));                                                  \
  REGISTER_KERNEL_BUILDER(Name("SparseAttention>BlocksparseSoftmax")                            \
                              .Device(DEVICE_GPU)                                                \
                              .TypeConstraint<T>("T")                                            \
                              .HostMemory("blocks")                                              \
                              .HostMemory("row_offsets")                                         \
                              .HostMemory("mask_index"),                                         \
                          SoftmaxGpuOp<T>);                                                      \
  REGISTER_KERNEL_BUILDER(Name("SparseAttention>BlocksparseSoftmaxGrad")                        \
                              .Device(DEVICE_GPU)                                                \
                              .TypeConstraint<T>("T")                                            \
                              .HostMemory("row_offsets"),                                        \
                          SoftmaxGradGpuOp<T>);                                                  \
  REGISTER_KERNEL_BUILDER(SPARSE_ATTENTION_TABLES(Name("SparseAttention>BlocksparseAttention")  \
                                                      .Device(DEVICE_GPU)                        \
                                                      .TypeConstraint<T>("T"))                   \
                              .HostMemory("mask_index"),                                         \
                          AttentionGpuOp<T>);                                                    \
  REGISTER_KERNEL_BUILDER(                                                                       \
      SPARSE_ATTENTION_TABLES(Name("SparseAttention>BlocksparseAttentionGrad")                  \
                                  .Device(DEVICE_GPU)                                            \
                                  .TypeConstraint<T>("T"))                                       \
          .HostMemory("mask_index"),                                                             \
      AttentionGradGpuOp<T>);

REGISTER_GPU(float);
REGISTER_GPU(Eigen::half);
REGISTER_GPU(Eigen::bfloat16);
#undef REGISTER_GPU
#undef SPARSE_ATTENTION_TABLES

}  // namespace sparse_attention

#endif  // GOOGLE_CUDA
