// Shared pieces of the TF kernels: the device tags, error messages, the
// thread-pool split and float32 views of the CPU launchers, and the shape and
// table checks every device's op class runs.
#ifndef SPARSE_ATTENTION_TF_KERNELS_OP_UTIL_H_
#define SPARSE_ATTENTION_TF_KERNELS_OP_UTIL_H_

#define EIGEN_USE_THREADS

#include <algorithm>
#include <atomic>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "custom_ops/cc/kernels/blocksparse_cpu.h"
#include "custom_ops/cc/kernels/mask_tables.h"
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
// The GPU launchers' device tag (blocksparse_ops_gpu.cc). Not Eigen::GpuDevice:
// that needs the CUDA headers, which TF's pip package does not ship.
struct GPUDevice {};

// Whether an op's inputs that are not HostMemory can be read on the host.
template <typename Device>
constexpr bool kInputsOnHost = std::is_same<Device, CPUDevice>::value;


// InvalidArgument with a message built from the arguments.
template <typename... Args>
inline Status Invalid(const Args&... args) {
  return absl::InvalidArgumentError(absl::StrCat(args...));
}

inline std::string ShapeString(const Tensor& t) { return t.shape().DebugString(); }

inline std::vector<int64_t> DimSizes(const Tensor& t) {
  const auto d = t.shape().dim_sizes();
  return std::vector<int64_t>(d.begin(), d.end());
}

// Runs fn(begin, end) over [0, units) on TF's intra-op thread pool, in fixed
// chunks of about 1/16 of a thread's share: rows of a pattern differ a lot in
// cost (a causal row near the end keeps many more blocks), and small chunks
// taken on demand keep the threads evenly busy.
inline void ParallelUnits(OpKernelContext* ctx, int64_t units, int64_t cost_per_unit,
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

// ParallelUnits for kernels that need scratch memory per worker: allocates
// `bytes_per_worker` (a multiple of 64) for each of up to NumThreads workers
// in one temp through TF's allocator, so an impossible size is an error
// status (ResourceExhausted, or InvalidArgument when the byte count
// overflows), never a std::bad_alloc in a kernel. Each worker takes chunks
// of units from a shared counter, as ParallelUnits' chunks, and runs
// fn(its scratch, begin, end).
inline Status ParallelUnitsWithScratch(
    OpKernelContext* ctx, int64_t units, int64_t cost_per_unit, int64_t bytes_per_worker,
    const std::function<void(void*, int64_t, int64_t)>& fn) {
  if (units <= 0) return absl::OkStatus();
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  const int64_t threads = pool->NumThreads();
  const bool inline_run = threads <= 1 || units * cost_per_unit < 20000;
  const int64_t chunk = inline_run ? units : std::max<int64_t>(1, units / (16 * threads));
  const int64_t workers = std::min(inline_run ? 1 : threads, (units + chunk - 1) / chunk);
  const int64_t words = std::max<int64_t>(1, bytes_per_worker / 8);
  TensorShape shape;
  TF_RETURN_IF_ERROR(TensorShape::BuildTensorShape({workers, words}, &shape));
  Tensor scratch;
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_INT64, shape, &scratch));
  char* base = reinterpret_cast<char*>(scratch.flat<int64_t>().data());
  const int64_t stride = words * 8;
  if (workers == 1) {
    fn(base, 0, units);
    return absl::OkStatus();
  }
  std::atomic<int64_t> next{0};
  pool->ParallelFor(workers, tsl::thread::ThreadPool::SchedulingParams::Fixed(1),
                    [&](int64_t w0, int64_t w1) {
                      for (int64_t w = w0; w < w1; ++w)
                        for (int64_t u = next.fetch_add(chunk); u < units;
                             u = next.fetch_add(chunk))
                          fn(base + w * stride, u, std::min(units, u + chunk));
                    });
  return absl::OkStatus();
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
inline Status CheckDense(const Tensor& t, const char* name) {
  if (t.dims() != 4)
    return Invalid(name, " must have rank 4 [batch, seq, heads, head_dim], got shape ",
                                   ShapeString(t));
  if (t.dim_size(1) < 1 || t.dim_size(2) < 1 || t.dim_size(3) < 1)
    return Invalid(name, " must have seq, heads and head_dim >= 1, got shape ",
                                   ShapeString(t));
  return absl::OkStatus();
}

inline Status CheckTable(const Tensor& t, const char* name, int rank) {
  if (t.dims() != rank)
    return Invalid(name, " must have rank ", rank, ", got shape ", ShapeString(t));
  return absl::OkStatus();
}

// Fills p from the dense shape, the block size and the table shapes (host
// table pointers included), without reading the tables' contents.
// col_offsets/col_blocks may be null.
inline Status FillProblem(int64_t batch, int64_t seq, int64_t heads, int64_t head_dim, int64_t block,
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
  return absl::OkStatus();
}

// Checks the contents of p's tables (every index a kernel will read).
inline Status ValidateProblem(const Problem& p, bool need_columns) {
  const std::string err = ValidateTables(p.t, p.heads, need_columns);
  if (!err.empty()) return Invalid("invalid lookup tables: ", err);
  return absl::OkStatus();
}

// FillProblem, then ValidateProblem.
inline Status MakeProblem(int64_t batch, int64_t seq, int64_t heads, int64_t head_dim,
                          int64_t block, const Tensor& blocks, const Tensor& row_offsets,
                          const Tensor* col_offsets, const Tensor* col_blocks, Problem* p) {
  TF_RETURN_IF_ERROR(FillProblem(batch, seq, heads, head_dim, block, blocks, row_offsets,
                                 col_offsets, col_blocks, p));
  return ValidateProblem(*p, col_offsets != nullptr);
}

// Checks a block-sparse [B, G, Z, b, b] operand against the problem.
inline Status CheckSparse(const Tensor& t, const char* name, const Problem& p) {
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

// mask_index [Z] and masks [M, b, b] against the problem; fills m's mask
// fields (the contents are checked by ValidateMaskIndex).
inline Status CheckMaskShapes(const Tensor& mask_index, const Tensor& masks, const Problem& p,
                              SoftmaxMasks* m) {
  TF_RETURN_IF_ERROR(CheckTable(mask_index, "mask_index", 1));
  TF_RETURN_IF_ERROR(CheckTable(masks, "masks", 3));
  if (mask_index.dim_size(0) != p.t.nnz)
    return Invalid("mask_index must have one entry per block (", p.t.nnz, "), got ",
                   mask_index.dim_size(0));
  if (masks.dim_size(1) != p.block || masks.dim_size(2) != p.block)
    return Invalid("masks must have shape [num_masks, ", p.block, ", ", p.block, "], got ",
                   ShapeString(masks));
  m->mask_index = mask_index.flat<int32_t>().data();
  m->masks = masks.flat<bool>().data();
  m->num_masks = masks.dim_size(0);
  return absl::OkStatus();
}

inline Status ValidateMaskIndex(const Problem& p, const SoftmaxMasks& m) {
  const std::string err = ValidateMasks(p, m);
  if (!err.empty()) return Invalid("invalid masks: ", err);
  return absl::OkStatus();
}

// Adds where the softmax's sequence length comes from to a table error.
inline Status SeqFromKeyPadding(const Status& s, int64_t seq) {
  return Invalid(s.message(), " (the sequence length ", seq,
                 " is read from key_padding_mask [batch, seq]: check its length)");
}

// The shapes of the softmax's operands: x [B, G, Z, b, b], the row tables and
// key_padding [B, N], which is where the sequence length comes from. Fills p
// (heads = groups * layout heads, head_dim 1) without reading the tables.
inline Status FillSoftmaxProblem(const Tensor& x, const Tensor& blocks, const Tensor& row_offsets,
                                 const Tensor& key_padding, Problem* p) {
  if (x.dims() != 5)
    return Invalid("x must have rank 5 [batch, groups, nnz, block, block], got ", ShapeString(x));
  if (key_padding.dims() != 2 || key_padding.dim_size(0) != x.dim_size(0))
    return Invalid("key_padding_mask must have shape [batch, seq] with batch ", x.dim_size(0),
                   ", got ", ShapeString(key_padding));
  if (key_padding.dim_size(1) < 1)
    return Invalid("key_padding_mask must have seq >= 1, got ", ShapeString(key_padding));
  const int64_t block = x.dim_size(3), seq = key_padding.dim_size(1);
  if (block < 1 || seq % block != 0)
    return Invalid("key_padding_mask length ", seq, " is not a multiple of the block size ",
                   block);
  TF_RETURN_IF_ERROR(CheckTable(row_offsets, "row_offsets", 1));
  const int64_t layout_heads = (row_offsets.dim_size(0) - 1) / (seq / block);
  const Status made = FillProblem(x.dim_size(0), seq,
                                  x.dim_size(1) * std::max<int64_t>(1, layout_heads), 1, block,
                                  blocks, row_offsets, nullptr, nullptr, p);
  if (!made.ok()) return SeqFromKeyPadding(made, seq);
  return absl::OkStatus();
}

// The fused attention ops' inputs from the first table: blocks, row_offsets,
// col_offsets, col_blocks, mask_index, masks, mask_key_range,
// mask_query_range, mask_split, key_padding_mask.
enum AttentionTable {
  kBlocks = 0, kRowOffsets, kColOffsets, kColBlocks, kMaskIndex, kMasks, kMaskKeyRange,
  kMaskQueryRange, kMaskSplit, kKeyPadding
};

// The shapes of the fused attention's operands: q, k [B, N, H, D],
// v [B, N, H, Dv], then from input first_table the tables (AttentionTable)
// with key_padding_mask [B, N]. Fills p and m without reading the tables.
inline Status CheckAttentionShapes(OpKernelContext* ctx, int first_table, int64_t block,
                                   Problem* p, SoftmaxMasks* m) {
  const Tensor& q = ctx->input(0);
  const Tensor& k = ctx->input(1);
  const Tensor& v = ctx->input(2);
  TF_RETURN_IF_ERROR(CheckDense(q, "q"));
  TF_RETURN_IF_ERROR(CheckDense(k, "k"));
  TF_RETURN_IF_ERROR(CheckDense(v, "v"));
  if (q.shape() != k.shape())
    return Invalid("q and k must have the same shape, got ", ShapeString(q), " and ",
                   ShapeString(k));
  if (v.dim_size(0) != q.dim_size(0) || v.dim_size(1) != q.dim_size(1) ||
      v.dim_size(2) != q.dim_size(2))
    return Invalid("v must agree with q on [batch, seq, heads], got ", ShapeString(v), " and ",
                   ShapeString(q));
  auto in = [&](AttentionTable t) -> const Tensor& { return ctx->input(first_table + t); };
  TF_RETURN_IF_ERROR(FillProblem(q.dim_size(0), q.dim_size(1), q.dim_size(2), q.dim_size(3),
                                 block, in(kBlocks), in(kRowOffsets), &in(kColOffsets),
                                 &in(kColBlocks), p));
  TF_RETURN_IF_ERROR(CheckMaskShapes(in(kMaskIndex), in(kMasks), *p, m));
  const std::string err = ValidateMaskTableShapes(
      m->num_masks, block, DimSizes(in(kMaskKeyRange)), DimSizes(in(kMaskQueryRange)),
      DimSizes(in(kMaskSplit)));
  if (!err.empty()) return Invalid(err);
  const Tensor& key_padding = in(kKeyPadding);
  if (key_padding.dims() != 2 || key_padding.dim_size(0) != p->batch ||
      key_padding.dim_size(1) != p->seq)
    return Invalid("key_padding_mask must have shape [", p->batch, ", ", p->seq,
                   "] (batch, seq), got ", ShapeString(key_padding));
  return absl::OkStatus();
}

// The contents of the mask tables (host memory) against the masks.
inline Status ValidateMaskTablesOf(OpKernelContext* ctx, int first_table, const Problem& p,
                                   const SoftmaxMasks& m) {
  auto in = [&](AttentionTable t) -> const Tensor& { return ctx->input(first_table + t); };
  const std::string err = ValidateMaskTables(
      m.masks, m.num_masks, p.block, in(kMaskKeyRange).flat<int32_t>().data(),
      in(kMaskQueryRange).flat<int32_t>().data(), in(kMaskSplit).flat<bool>().data());
  if (!err.empty()) return Invalid("invalid mask tables: ", err);
  return absl::OkStatus();
}

// An all-true key padding mask hides nothing: null, so that no kernel reads
// it per element. Host memory only.
inline const bool* KeyPaddingOrNull(const bool* kp, int64_t n) {
  return std::all_of(kp, kp + n, [](bool x) { return x; }) ? nullptr : kp;
}

// Average flops of one row unit, as the thread pool's cost hint.
inline int64_t RowCost(const Problem& p) {
  const int64_t rows = p.t.layout_heads * p.t.num_blocks;
  return std::max<int64_t>(1, 2 * p.t.nnz / rows * p.tile() * p.head_dim);
}


}  // namespace sparse_attention

#endif  // SPARSE_ATTENTION_TF_KERNELS_OP_UTIL_H_
