// The fused attention op's CPU launcher (fused_attention_launch.h): converts
// or packs the operands, splits the work units over TF's CPU thread pool with
// per-worker scratch memory, and runs the framework-free kernels of
// fused_attention.h on the engines that the dispatch (attention_engines.h)
// chose for this CPU.
#include <algorithm>
#include <type_traits>

#include "custom_ops/cc/kernels/attention_engines.h"
#include "custom_ops/cc/kernels/fused_attention.h"
#include "custom_ops/cc/kernels/fused_attention_launch.h"
#include "custom_ops/cc/kernels/op_util.h"

namespace sparse_attention {
namespace {

constexpr int64_t kPackRows = 64;  // rows per unit of PackHeads / PackHeadsBf16

// k [B, N, H, D] and v [B, N, H, Dv] of T -> head-major float32 temps
// [B, H, N, D] and [B, H, N, Dv], in one pass over the thread pool.
template <typename T>
Status PackTemps(OpKernelContext* ctx, const Tensor& k, const Tensor& v, Tensor* pk, Tensor* pv) {
  const int64_t b = k.dim_size(0), n = k.dim_size(1), h = k.dim_size(2);
  const int64_t dk = k.dim_size(3), dv = v.dim_size(3);
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({b, h, n, dk}), pk));
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({b, h, n, dv}), pv));
  const T *ks = k.flat<T>().data(), *vs = v.flat<T>().data();
  float *kd = pk->flat<float>().data(), *vd = pv->flat<float>().data();
  const int64_t units = b * ((n + kPackRows - 1) / kPackRows);  // per tensor
  ParallelUnits(ctx, 2 * units, kPackRows * h * (dk + dv) * 2, [&](int64_t s, int64_t e) {
    for (int64_t u = s; u < e; ++u) {
      if (u < units)
        PackHeads<T>(ks, b, n, h, dk, kPackRows, kd, u, u + 1);
      else
        PackHeads<T>(vs, b, n, h, dv, kPackRows, vd, u - units, u - units + 1);
    }
  });
  return absl::OkStatus();
}

const uint16_t* Bits(const Tensor& t) {  // the bits of a bfloat16 tensor
  return reinterpret_cast<const uint16_t*>(t.flat<Eigen::bfloat16>().data());
}

// bf16 k [B, N, H, D] -> head-major k [B, H, N, D], and v [B, N, H, Dv] ->
// pairs along the sequence [B, H, N/2, Dv, 2], in one pass over the pool.
Status PackBf16Temps(OpKernelContext* ctx, const Tensor& k, const Tensor& v, Tensor* kn,
                     Tensor* vp) {
  const int64_t b = k.dim_size(0), n = k.dim_size(1), h = k.dim_size(2);
  const int64_t dk = k.dim_size(3), dv = v.dim_size(3);
  TF_RETURN_IF_ERROR(
      ctx->allocate_temp(tensorflow::DT_BFLOAT16, TensorShape({b, h, n, dk}), kn));
  TF_RETURN_IF_ERROR(
      ctx->allocate_temp(tensorflow::DT_BFLOAT16, TensorShape({b, h, n, dv}), vp));
  uint16_t* kd = const_cast<uint16_t*>(Bits(*kn));
  uint16_t* vd = const_cast<uint16_t*>(Bits(*vp));
  const int64_t units = b * ((n + kPackRows - 1) / kPackRows);  // per tensor
  ParallelUnits(ctx, 2 * units, kPackRows * h * (dk + dv), [&](int64_t s, int64_t e) {
    for (int64_t u = s; u < e; ++u) {
      if (u < units)
        PackHeadsBf16(Bits(k), b, n, h, dk, kPackRows, kd, nullptr, u, u + 1);
      else
        PackHeadsBf16(Bits(v), b, n, h, dv, kPackRows, nullptr, vd, u - units, u - units + 1);
    }
  });
  return absl::OkStatus();
}

// The bf16 engine that runs these bf16 inputs, or null: float32 inputs, no
// bf16 engine on this CPU, or dims it does not take (converted to float32).
template <typename T>
const AttentionEngine<uint16_t>* Bf16Engine(const AttentionProblem& a) {
  const AttentionEngine<uint16_t>* e = Dispatch().bfloat16;
  if (!std::is_same<T, Eigen::bfloat16>::value || e == nullptr || !e->takes(a)) return nullptr;
  return e;
}

// out (T) <- the float32 buffer f. bfloat16 on the dispatch's vectorised
// conversion (Eigen's conversion to bfloat16 is scalar).
template <typename T>
void FinishOutput(OpKernelContext* ctx, FloatOutput<T>* f, Tensor* out) {
  if constexpr (std::is_same<T, Eigen::bfloat16>::value) {
    if (auto* convert = Dispatch().float_to_bf16) {
      constexpr int64_t kChunk = 1 << 14;
      const int64_t n = out->NumElements();
      const float* x = f->data();
      uint16_t* y = reinterpret_cast<uint16_t*>(out->flat<Eigen::bfloat16>().data());
      ParallelUnits(ctx, (n + kChunk - 1) / kChunk, kChunk, [&](int64_t s, int64_t e) {
        for (int64_t c = s; c < e; ++c)
          convert(x + c * kChunk, std::min(kChunk, n - c * kChunk), y + c * kChunk);
      });
      return;
    }
  }
  f->Finish(ctx);
}

// A float32 view of an input: bfloat16 converted by the dispatch's
// vectorised loop (Eigen's conversion is scalar), else as FloatInput.
template <typename T>
class Float32Input {
 public:
  Status Init(OpKernelContext* ctx, const Tensor& t) {
    if constexpr (!std::is_same<T, Eigen::bfloat16>::value) {
      TF_RETURN_IF_ERROR(input_.Init(ctx, t));
      data_ = input_.data();
    } else {
      TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT, t.shape(), &copy_));
      constexpr int64_t kChunk = 1 << 14;
      const int64_t n = t.NumElements();
      const uint16_t* x = Bits(t);
      float* y = copy_.flat<float>().data();
      auto* convert = Dispatch().simd->bf16_to_float;
      ParallelUnits(ctx, (n + kChunk - 1) / kChunk, kChunk, [&](int64_t s, int64_t e) {
        for (int64_t c = s; c < e; ++c)
          convert(x + c * kChunk, std::min(kChunk, n - c * kChunk), y + c * kChunk);
      });
      data_ = y;
    }
    return absl::OkStatus();
  }
  const float* data() const { return data_; }

 private:
  FloatInput<T> input_;
  Tensor copy_;
  const float* data_ = nullptr;
};

// The dispatch's error ($SPARSE_ATTENTION_TF_ISA asks for an engine this CPU
// lacks), as the op's.
Status CheckDispatch() {
  const std::string& err = Dispatch().error;
  return err.empty() ? absl::OkStatus() : absl::FailedPreconditionError(err);
}

// Flops of one block-row unit (forward), as the thread pool's cost hint.
int64_t AttentionRowCost(const AttentionProblem& a) {
  return RowCost(a.p) * (a.p.head_dim + a.value_dim) / std::max<int64_t>(1, a.p.head_dim);
}

}  // namespace

template <typename T>
Status AttentionLauncher<CPUDevice, T>::Forward(OpKernelContext* ctx, State*,
                                                const AttentionProblem& a, const Tensor& q,
                                                const Tensor& k, const Tensor& v, Tensor* out,
                                                Tensor* lse) {
  const Problem& p = a.p;
  TF_RETURN_IF_ERROR(CheckDispatch());
  // q is read, and out written, once per query block row: in place.
  // k and v are read per kept block: packed head-major.
  FloatOutput<T> fo;
  TF_RETURN_IF_ERROR(fo.Init(ctx, out));
  if (const AttentionEngine<uint16_t>* e = Bf16Engine<T>(a)) {
    Tensor kh, v_pairs;  // head-major bf16
    TF_RETURN_IF_ERROR(PackBf16Temps(ctx, k, v, &kh, &v_pairs));
    const AttentionForwardArgs<uint16_t> x{Bits(q), Bits(kh), Bits(v_pairs), fo.data(),
                                           lse->flat<float>().data()};
    TF_RETURN_IF_ERROR(ParallelUnitsWithScratch(
        ctx, p.num_units(), AttentionRowCost(a) / 2, e->forward_scratch(a),
        [&](void* scratch, int64_t s, int64_t e1) { e->forward(a, x, scratch, s, e1); }));
  } else {
    const AttentionEngine<float>* f32 = Dispatch().float32;
    Float32Input<T> fq;
    TF_RETURN_IF_ERROR(fq.Init(ctx, q));
    Tensor kh, vh;  // head-major float32
    TF_RETURN_IF_ERROR(PackTemps<T>(ctx, k, v, &kh, &vh));
    const AttentionForwardArgs<float> x{fq.data(), kh.flat<float>().data(),
                                        vh.flat<float>().data(), fo.data(),
                                        lse->flat<float>().data()};
    TF_RETURN_IF_ERROR(ParallelUnitsWithScratch(
        ctx, p.num_units(), AttentionRowCost(a), f32->forward_scratch(a),
        [&](void* scratch, int64_t s, int64_t e1) { f32->forward(a, x, scratch, s, e1); }));
  }
  FinishOutput<T>(ctx, &fo, out);
  return absl::OkStatus();
}

template <typename T>
Status AttentionLauncher<CPUDevice, T>::Backward(OpKernelContext* ctx, State*, AttentionProblem a,
                                                 const Tensor& q, const Tensor& k,
                                                 const Tensor& v, const Tensor& out,
                                                 const Tensor& lse, const Tensor& dout,
                                                 Tensor* dq, Tensor* dk, Tensor* dv) {
  const Problem& p = a.p;
  TF_RETURN_IF_ERROR(CheckDispatch());
    // Units are (batch, head, segment of block rows). With fewer heads than
    // about two per thread, rows are split into segments whose dK/dV partial
    // sums are added afterwards in a fixed order.
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    const int64_t threads = pool->NumThreads(), heads = p.batch * p.heads;
    a.segments = std::min<int64_t>({8, p.t.num_blocks,
                                    std::max<int64_t>(1, (2 * threads + heads - 1) / heads)});
    Tensor segment_rows;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_INT32,
                                           TensorShape({p.t.layout_heads, a.segments + 1}),
                                           &segment_rows));
    SegmentRows(p.t, a.segments, segment_rows.flat<int32_t>().data());
    a.segment_rows = segment_rows.flat<int32_t>().data();
    Tensor partial_k, partial_v;
    if (a.segments > 1) {
      const int64_t s = a.segments - 1;
      TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT,
                                             TensorShape({s, dk->NumElements()}), &partial_k));
      TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT,
                                             TensorShape({s, dv->NumElements()}), &partial_v));
    }
    // Every operand is read in place (token-major): each unit packs the k
    // and v of its head and computes delta as it goes (fused_attention.h).
    FloatOutput<T> fdq, fdk, fdv;
    TF_RETURN_IF_ERROR(fdq.Init(ctx, dq));
    TF_RETURN_IF_ERROR(fdk.Init(ctx, dk));
    TF_RETURN_IF_ERROR(fdv.Init(ctx, dv));
    float* partial_k_data = a.segments > 1 ? partial_k.flat<float>().data() : nullptr;
    float* partial_v_data = a.segments > 1 ? partial_v.flat<float>().data() : nullptr;
    const int64_t backward_cost = AttentionRowCost(a) * p.t.num_blocks / a.segments * 5 / 2;
    if (const AttentionEngine<uint16_t>* e = Bf16Engine<T>(a)) {
      const AttentionBackwardArgs<uint16_t> x{
          Bits(q), Bits(k), Bits(v), Bits(out), lse.flat<float>().data(), Bits(dout),
          fdq.data(), fdk.data(), fdv.data(), partial_k_data, partial_v_data};
      TF_RETURN_IF_ERROR(ParallelUnitsWithScratch(
          ctx, a.num_backward_units(), backward_cost / 2, e->backward_scratch(a),
          [&](void* scratch, int64_t s, int64_t e1) { e->backward(a, x, scratch, s, e1); }));
    } else {
      const AttentionEngine<float>* f32 = Dispatch().float32;
      Float32Input<T> fq, fk, fv, fo, fdo;
      TF_RETURN_IF_ERROR(fq.Init(ctx, q));
      TF_RETURN_IF_ERROR(fk.Init(ctx, k));
      TF_RETURN_IF_ERROR(fv.Init(ctx, v));
      TF_RETURN_IF_ERROR(fo.Init(ctx, out));
      TF_RETURN_IF_ERROR(fdo.Init(ctx, dout));
      const AttentionBackwardArgs<float> x{
          fq.data(), fk.data(), fv.data(), fo.data(), lse.flat<float>().data(), fdo.data(),
          fdq.data(), fdk.data(), fdv.data(), partial_k_data, partial_v_data};
      TF_RETURN_IF_ERROR(ParallelUnitsWithScratch(
          ctx, a.num_backward_units(), backward_cost, f32->backward_scratch(a),
          [&](void* scratch, int64_t s, int64_t e1) { f32->backward(a, x, scratch, s, e1); }));
    }
    const AttentionBackwardArgs<float> sums{nullptr,    nullptr,    nullptr,        nullptr,
                                            nullptr,    nullptr,    nullptr,        fdk.data(),
                                            fdv.data(), partial_k_data, partial_v_data};
    if (a.segments > 1)
      ParallelUnits(ctx, heads, p.seq * (p.head_dim + a.value_dim) * a.segments,
                    [&](int64_t s, int64_t e) { ReduceSegments(a, sums, s, e); });
    FinishOutput<T>(ctx, &fdq, dq);
    FinishOutput<T>(ctx, &fdk, dk);
    FinishOutput<T>(ctx, &fdv, dv);
  return absl::OkStatus();
}

template struct AttentionLauncher<CPUDevice, float>;
template struct AttentionLauncher<CPUDevice, Eigen::bfloat16>;
template struct AttentionLauncher<CPUDevice, Eigen::half>;

}  // namespace sparse_attention
