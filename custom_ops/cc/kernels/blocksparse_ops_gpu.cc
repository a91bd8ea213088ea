// The GPU launchers of every op (built only with -DGOOGLE_CUDA=1: `make ops
// GPU=1` or `bazel build --config=cuda`; without it this file compiles to
// nothing) and the DEVICE_GPU registrations of the op classes, which are the
// CPU's: blocksparse_ops.h and fused_attention_ops.h, so both devices run
// the same checks with the same messages. The CUDA kernels themselves are
// framework-free, in custom_ops/cuda/blocksparse_gpu.{h,cu}.
//
// Needs no CUDA headers (the TF pip package has none): the stream comes from
// TF's stream executor and every CUDA call lives in the .cu file.
//
// The inputs the checks read are HostMemory: the tables (blocks, row and
// column lists, mask_index) and, for the fused attention, masks and the mask
// tables (the coverage check reads masks). The launchers copy what the CUDA
// kernels read to the device once per distinct content (a pattern's tables
// are the same at every step) and reuse it. The softmax's masks and every
// key_padding_mask stay in device memory. Kernels run on TF's compute stream.
#if GOOGLE_CUDA

#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "custom_ops/cc/kernels/blocksparse_ops.h"
#include "custom_ops/cc/kernels/fused_attention_ops.h"
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

// One host array to copy to the device (data null: absent).
struct HostArray {
  const void* data;
  int64_t bytes;
};

}  // namespace

// ---- device copies of the tables --------------------------------------------
// The (already checked) host tables of one op kernel, copied to the device
// once per distinct content: a pattern's tables are the same every step, so
// the steady state costs one comparison. A few entries, because eager mode
// shares one kernel between layers whose tables differ.
class TableCache {
 public:
  // Fills ptrs (device, one per array, null for absent ones) and keep_alive
  // (holds the device buffer for this call).
  Status Get(OpKernelContext* ctx, const std::vector<HostArray>& arrays, Tensor* keep_alive,
             std::vector<const void*>* ptrs) {
    std::vector<char> packed;
    std::vector<int64_t> offsets, sizes;
    for (const HostArray& a : arrays) {
      packed.resize((packed.size() + 7) / 8 * 8);  // every array 8-byte aligned
      offsets.push_back(a.data == nullptr ? -1 : int64_t(packed.size()));
      sizes.push_back(a.data == nullptr ? -1 : a.bytes);
      if (a.data == nullptr) continue;
      const char* bytes = static_cast<const char*>(a.data);
      packed.insert(packed.end(), bytes, bytes + a.bytes);
    }
    std::lock_guard<std::mutex> lock(mu_);
    Entry* hit = nullptr;
    for (Entry& e : entries_)
      if (e.sizes == sizes && e.host == packed) hit = &e;
    if (hit == nullptr) {
      Tensor dev;
      TF_RETURN_IF_ERROR(ctx->allocate_temp(
          tensorflow::DT_UINT8, TensorShape({std::max<int64_t>(1, packed.size())}), &dev));
      if (!packed.empty()) {
        // From pageable memory: staged before the call returns, so `packed`
        // may go away afterwards.
        const std::string err = gpu::CopyToDevice(dev.flat<uint8_t>().data(), packed.data(),
                                                  packed.size(), Stream(ctx));
        if (!err.empty())
          return absl::InternalError(absl::StrCat("copying the lookup tables to the GPU: ", err));
      }
      if (entries_.size() >= kMaxEntries) entries_.erase(entries_.begin());  // the oldest
      entries_.push_back(Entry{std::move(sizes), std::move(packed), dev});
      hit = &entries_.back();
    }
    *keep_alive = hit->device;
    const uint8_t* base = hit->device.flat<uint8_t>().data();
    ptrs->clear();
    for (int64_t o : offsets) ptrs->push_back(o < 0 ? nullptr : base + o);
    return absl::OkStatus();
  }

 private:
  static constexpr size_t kMaxEntries = 8;
  struct Entry {
    std::vector<int64_t> sizes;
    std::vector<char> host;
    Tensor device;
  };
  std::mutex mu_;
  std::vector<Entry> entries_;
};

namespace {

// Device copies of p's tables (the column lists if p has them), of
// mask_index (if not null) and of host masks (if not null: num_masks tiles);
// fills *t (t->masks stays null without host masks).
Status UploadTables(OpKernelContext* ctx, TableCache* cache, const Problem& p,
                    const int32_t* mask_index, const bool* masks, int64_t num_masks,
                    Tensor* keep_alive, gpu::DeviceTables* t) {
  const int64_t rows = p.t.layout_heads * p.t.num_blocks + 1, z = p.t.nnz;
  const bool columns = p.t.col_offsets != nullptr;
  std::vector<const void*> ptrs;
  TF_RETURN_IF_ERROR(cache->Get(
      ctx,
      {{p.t.blocks, 12 * z},
       {p.t.row_offsets, 4 * rows},
       {columns ? p.t.col_offsets : nullptr, 4 * rows},
       {columns ? p.t.col_blocks : nullptr, 4 * z},
       {mask_index, 4 * z},
       {masks, num_masks * p.block * p.block}},
      keep_alive, &ptrs));
  t->blocks = static_cast<const int32_t*>(ptrs[0]);
  t->row_offsets = static_cast<const int32_t*>(ptrs[1]);
  t->col_offsets = static_cast<const int32_t*>(ptrs[2]);
  t->col_blocks = static_cast<const int32_t*>(ptrs[3]);
  t->mask_index = static_cast<const int32_t*>(ptrs[4]);
  t->masks = static_cast<const bool*>(ptrs[5]);
  t->nnz = z;
  t->layout_heads = p.t.layout_heads;
  t->num_blocks = p.t.num_blocks;
  return absl::OkStatus();
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

// ---- the block-sparse ops ------------------------------------------------------
template <typename T>
struct BlocksparseLauncher<GPUDevice, T> {
  struct State {
    TableCache cache;
  };

  static Status Sdd(OpKernelContext* ctx, State* state, const Problem& p, const Tensor& a,
                    const Tensor& b, Tensor* out) {
    Tensor keep;
    gpu::DeviceTables t;
    TF_RETURN_IF_ERROR(UploadTables(ctx, &state->cache, p, nullptr, nullptr, 0, &keep, &t));
    return FromLaunch(gpu::Sdd(GpuType<T>::kValue, ToDims(p, 0), t, Ptr<T>(a), Ptr<T>(b),
                               Ptr<T>(out), Stream(ctx)));
  }

  static Status Dsd(OpKernelContext* ctx, State* state, const Problem& p, bool transposed,
                    const Tensor& probs, const Tensor& x, Tensor* out) {
    Tensor keep;
    gpu::DeviceTables t;
    TF_RETURN_IF_ERROR(UploadTables(ctx, &state->cache, p, nullptr, nullptr, 0, &keep, &t));
    const auto launch = transposed ? gpu::DsdT : gpu::Dsd;
    return FromLaunch(launch(GpuType<T>::kValue, ToDims(p, 0), t, Ptr<T>(probs), Ptr<T>(x),
                             Ptr<T>(out), Stream(ctx)));
  }

  // m.masks and m.key_padding are device memory (not HostMemory inputs).
  static Status Softmax(OpKernelContext* ctx, State* state, const Problem& p,
                        const SoftmaxMasks& m, float scale, const Tensor& x, Tensor* y) {
    Tensor keep;
    gpu::DeviceTables t;
    TF_RETURN_IF_ERROR(
        UploadTables(ctx, &state->cache, p, m.mask_index, nullptr, 0, &keep, &t));
    t.masks = m.masks;
    return FromLaunch(gpu::Softmax(GpuType<T>::kValue, ToDims(p, 0), t, m.key_padding, scale,
                                   Ptr<T>(x), Ptr<T>(y), Stream(ctx)));
  }

  static Status SoftmaxGrad(OpKernelContext* ctx, State* state, const Problem& p, float scale,
                            const Tensor& y, const Tensor& dy, Tensor* dx) {
    Tensor keep;
    std::vector<const void*> ptrs;
    TF_RETURN_IF_ERROR(state->cache.Get(ctx, {{p.t.row_offsets, 4 * (p.t.num_blocks + 1)}},
                                        &keep, &ptrs));
    return FromLaunch(gpu::SoftmaxGrad(GpuType<T>::kValue, p.batch, p.heads, p.t.nnz, p.block,
                                       p.t.num_blocks, static_cast<const int32_t*>(ptrs[0]),
                                       scale, Ptr<T>(y), Ptr<T>(dy), Ptr<T>(dx), Stream(ctx)));
  }
};

// ---- fused attention ---------------------------------------------------------
// a's tables, mask_index and the mask tables are host memory; a.key_padding
// is the device mask; masks (HostMemory: the checks read it) is copied with
// the tables, as the CUDA kernels read it.
template <typename T>
struct AttentionLauncher<GPUDevice, T> {
  struct State {
    TableCache cache;
  };

  static Status Forward(OpKernelContext* ctx, State* state, const AttentionProblem& a,
                        const Tensor& q, const Tensor& k, const Tensor& v, Tensor* out,
                        Tensor* lse) {
    Tensor keep;
    gpu::DeviceTables t;
    TF_RETURN_IF_ERROR(Upload(ctx, state, a, kForwardFirstTable, &keep, &t));
    return FromLaunch(gpu::AttentionForward(GpuType<T>::kValue, ToDims(a.p, a.value_dim), t,
                                            a.key_padding, a.scale, Ptr<T>(q), Ptr<T>(k),
                                            Ptr<T>(v), Ptr<T>(out), lse->flat<float>().data(),
                                            Stream(ctx)));
  }

  static Status Backward(OpKernelContext* ctx, State* state, AttentionProblem a,
                         const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                         const Tensor& lse, const Tensor& dout, Tensor* dq, Tensor* dk,
                         Tensor* dv) {
    Tensor keep;
    gpu::DeviceTables t;
    TF_RETURN_IF_ERROR(Upload(ctx, state, a, kBackwardFirstTable, &keep, &t));
    const gpu::Dims dims = ToDims(a.p, a.value_dim);
    Tensor work;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(
        tensorflow::DT_FLOAT, TensorShape({gpu::AttentionBackwardWorkspaceBytes(dims) / 4}),
        &work));
    return FromLaunch(gpu::AttentionBackward(
        GpuType<T>::kValue, dims, t, a.key_padding, a.scale, Ptr<T>(q), Ptr<T>(k), Ptr<T>(v),
        Ptr<T>(out), lse.flat<float>().data(), Ptr<T>(dout), Ptr<T>(dq), Ptr<T>(dk), Ptr<T>(dv),
        work.flat<float>().data(), Stream(ctx)));
  }

 private:
  static Status Upload(OpKernelContext* ctx, State* state, const AttentionProblem& a,
                       int first_table, Tensor* keep, gpu::DeviceTables* t) {
    const Tensor& masks = ctx->input(first_table + kMasks);
    return UploadTables(ctx, &state->cache, a.p, a.mask_index, masks.flat<bool>().data(),
                        masks.dim_size(0), keep, t);
  }
};

// ---- registrations ---------------------------------------------------------------
#define SPARSE_ATTENTION_TABLES(builder)                                                   \
  builder.HostMemory("blocks").HostMemory("row_offsets").HostMemory("col_offsets").HostMemory( \
      "col_blocks")
#define SPARSE_ATTENTION_MASK_TABLES(builder)                                                \
  builder.HostMemory("mask_index")                                                           \
      .HostMemory("masks")                                                                   \
      .HostMemory("mask_key_range")                                                          \
      .HostMemory("mask_query_range")                                                        \
      .HostMemory("mask_split")

#define REGISTER_GPU(T)                                                                          \
  REGISTER_KERNEL_BUILDER(SPARSE_ATTENTION_TABLES(Name("SparseAttention>BlocksparseSdd")        \
                                                      .Device(DEVICE_GPU)                        \
                                                      .TypeConstraint<T>("T")),                  \
                          (SddOp<GPUDevice, T>));                                                \
  REGISTER_KERNEL_BUILDER(SPARSE_ATTENTION_TABLES(Name("SparseAttention>BlocksparseDsd")        \
                                                      .Device(DEVICE_GPU)                        \
                                                      .TypeConstraint<T>("T")),                  \
                          (DsdOp<GPUDevice, T, false>));                                         \
  REGISTER_KERNEL_BUILDER(SPARSE_ATTENTION_TABLES(Name("SparseAttention>BlocksparseDsdT")       \
                                                      .Device(DEVICE_GPU)                        \
                                                      .TypeConstraint<T>("T")),                  \
                          (DsdOp<GPUDevice, T, true>));                                          \
  REGISTER_KERNEL_BUILDER(Name("SparseAttention>BlocksparseSoftmax")                            \
                              .Device(DEVICE_GPU)                                                \
                              .TypeConstraint<T>("T")                                            \
                              .HostMemory("blocks")                                              \
                              .HostMemory("row_offsets")                                         \
                              .HostMemory("mask_index"),                                         \
                          (SoftmaxOp<GPUDevice, T>));                                            \
  REGISTER_KERNEL_BUILDER(Name("SparseAttention>BlocksparseSoftmaxGrad")                        \
                              .Device(DEVICE_GPU)                                                \
                              .TypeConstraint<T>("T")                                            \
                              .HostMemory("row_offsets"),                                        \
                          (SoftmaxGradOp<GPUDevice, T>));                                        \
  REGISTER_KERNEL_BUILDER(                                                                       \
      SPARSE_ATTENTION_MASK_TABLES(SPARSE_ATTENTION_TABLES(                                      \
          Name("SparseAttention>BlocksparseAttention").Device(DEVICE_GPU).TypeConstraint<T>("T"))), \
      (AttentionOp<GPUDevice, T>));                                                              \
  REGISTER_KERNEL_BUILDER(SPARSE_ATTENTION_MASK_TABLES(SPARSE_ATTENTION_TABLES(                  \
                              Name("SparseAttention>BlocksparseAttentionGrad")                   \
                                  .Device(DEVICE_GPU)                                            \
                                  .TypeConstraint<T>("T"))),                                     \
                          (AttentionGradOp<GPUDevice, T>));

REGISTER_GPU(float);
REGISTER_GPU(Eigen::half);
REGISTER_GPU(Eigen::bfloat16);
#undef REGISTER_GPU
#undef SPARSE_ATTENTION_MASK_TABLES
#undef SPARSE_ATTENTION_TABLES

}  // namespace sparse_attention

#endif  // GOOGLE_CUDA
