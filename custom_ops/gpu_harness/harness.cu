// Standalone GPU harness of the block-sparse kernels (no TensorFlow):
//   1. correctness: every kernel of custom_ops/cuda/blocksparse_gpu.h on the
//      paper's patterns (Fixed, Strided) and random layouts, float32 / half /
//      bfloat16, against the float64 reference (reference.h); one PASS/FAIL
//      line per check, exit status 1 if any fails;
//   2. determinism: forward + backward twice, bitwise equal;
//   3. timing: fused forward and forward + backward, median of CUDA-event
//      timed runs, written as JSON lines for bench_table.py.
//
//   harness [--check-only | --bench-only] [--json PATH] [--seqs 4096,16384,65536]
//           [--dtype bf16|fp16] [--block 64]
// Build and run everything with custom_ops/gpu_harness/run.sh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "custom_ops/cuda/blocksparse_gpu.h"
#include "custom_ops/gpu_harness/reference.h"
#include "custom_ops/gpu_harness/tables.h"

namespace sa = sparse_attention;
namespace gpu = sparse_attention::gpu;
using sa::harness::HostTables;
using sa::harness::RefProblem;
using sa::harness::Vec;

#define CUDA_CHECK(expr)                                                              \
  do {                                                                                \
    const cudaError_t e_ = (expr);                                                    \
    if (e_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr,              \
                   cudaGetErrorString(e_));                                           \
      std::exit(2);                                                                   \
    }                                                                                 \
  } while (0)

namespace {

void Must(const std::string& err) {
  if (!err.empty()) {
    std::fprintf(stderr, "kernel error: %s\n", err.c_str());
    std::exit(2);
  }
}

// ---- element types --------------------------------------------------------
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static constexpr gpu::DType kType = gpu::DType::kFloat;
  static constexpr const char* kName = "float32";
  static constexpr double kTol = 1e-5;
  static float From(float x) { return x; }
  static double To(float x) { return x; }
};
template <>
struct Elem<__half> {
  static constexpr gpu::DType kType = gpu::DType::kHalf;
  static constexpr const char* kName = "float16";
  static constexpr double kTol = 1e-2;
  static __half From(float x) { return __float2half_rn(x); }
  static double To(__half x) { return __half2float(x); }
};
template <>
struct Elem<__nv_bfloat16> {
  static constexpr gpu::DType kType = gpu::DType::kBFloat16;
  static constexpr const char* kName = "bfloat16";
  static constexpr double kTol = 1e-2;
  static __nv_bfloat16 From(float x) { return __float2bfloat16_rn(x); }
  static double To(__nv_bfloat16 x) { return __bfloat162float(x); }
};

// A device buffer freed on scope exit.
template <typename U>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) { resize(n); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (p_ != nullptr) cudaFree(p_);
  }
  void resize(size_t n) {
    if (p_ != nullptr) cudaFree(p_);
    p_ = nullptr;
    n_ = n;
    CUDA_CHECK(cudaMalloc(&p_, std::max<size_t>(1, n) * sizeof(U)));
  }
  void upload(const std::vector<U>& h) {
    resize(h.size());
    if (!h.empty()) CUDA_CHECK(cudaMemcpy(p_, h.data(), h.size() * sizeof(U), cudaMemcpyHostToDevice));
  }
  std::vector<U> download() const {
    std::vector<U> h(n_);
    if (n_ > 0) CUDA_CHECK(cudaMemcpy(h.data(), p_, n_ * sizeof(U), cudaMemcpyDeviceToHost));
    return h;
  }
  U* get() const { return p_; }
  size_t size() const { return n_; }

 private:
  U* p_ = nullptr;
  size_t n_ = 0;
};

// Device copies of a HostTables.
struct TablesOnDevice {
  DeviceBuffer<int32_t> blocks, row_offsets, col_offsets, col_blocks, mask_index;
  DeviceBuffer<bool> masks;
  gpu::DeviceTables view;
  explicit TablesOnDevice(const HostTables& t) {
    blocks.upload(t.blocks);
    row_offsets.upload(t.row_offsets);
    col_offsets.upload(t.col_offsets);
    col_blocks.upload(t.col_blocks);
    mask_index.upload(t.mask_index);
    masks.resize(t.masks.size());  // bytes 0/1 (std::vector<bool> is packed)
    if (!t.masks.empty())
      CUDA_CHECK(cudaMemcpy(masks.get(), t.masks.data(), t.masks.size(), cudaMemcpyHostToDevice));
    view.blocks = blocks.get();
    view.row_offsets = row_offsets.get();
    view.col_offsets = col_offsets.get();
    view.col_blocks = col_blocks.get();
    view.mask_index = mask_index.get();
    view.masks = masks.get();
    view.nnz = t.nnz();
    view.layout_heads = t.layout_heads;
    view.num_blocks = t.num_blocks();
  }
};

// Random values in [lo, hi) rounded to T: the device copy and its exact value.
template <typename T>
struct Operand {
  std::vector<T> host;
  Vec exact;
  DeviceBuffer<T> dev;
  Operand(size_t n, double lo, double hi, std::mt19937_64& rng) {
    std::uniform_real_distribution<double> u(lo, hi);
    host.resize(n);
    exact.resize(n);
    for (size_t i = 0; i < n; ++i) {
      host[i] = Elem<T>::From(float(u(rng)));
      exact[i] = Elem<T>::To(host[i]);
    }
    dev.upload(host);
  }
};

template <typename T>
Vec ToDouble(const std::vector<T>& x) {
  Vec out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = Elem<T>::To(x[i]);
  return out;
}
Vec ToDouble(const std::vector<float>& x) { return Vec(x.begin(), x.end()); }

// max |got - ref| / max |ref|; infinities must match exactly (lse of empty rows).
double RelErr(const Vec& got, const Vec& ref) {
  double num = 0.0, den = 1e-30;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isinf(ref[i])) {
      if (got[i] != ref[i]) return INFINITY;
      continue;
    }
    if (!std::isfinite(got[i])) return INFINITY;
    num = std::max(num, std::fabs(got[i] - ref[i]));
    den = std::max(den, std::fabs(ref[i]));
  }
  return num / den;
}

struct Tally {
  int passed = 0, failed = 0;
  void check(const std::string& what, double err, double tol) {
    const bool ok = err <= tol;
    (ok ? passed : failed)++;
    std::printf("%s %-62s rel_err %.3e (tol %.0e)\n", ok ? "PASS" : "FAIL", what.c_str(), err, tol);
    std::fflush(stdout);
  }
};

struct Case {
  std::string name;
  std::function<HostTables()> make;
  int64_t batch, heads, head_dim, value_dim;
  bool padding;
};

template <typename T>
void RunCase(const Case& c, const HostTables& t, Tally* tally, std::mt19937_64& rng) {
  const gpu::DType dt = Elem<T>::kType;
  const double tol = Elem<T>::kTol;
  const int64_t B = c.batch, N = t.seq_len, H = c.heads, D = c.head_dim, Dv = c.value_dim;
  const int64_t bs = t.block, G = H / t.layout_heads, Z = t.nnz();
  const std::string tag = c.name + " " + Elem<T>::kName + " ";
  TablesOnDevice tables(t);

  std::vector<uint8_t> padding(B * N, 1);
  if (c.padding) {
    std::uniform_real_distribution<double> u(0.0, 1.0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t n = 0; n < N; ++n)
        padding[b * N + n] = (n >= N - (b + 1) * N / 8 || u(rng) < 0.05) ? 0 : 1;
  }
  DeviceBuffer<bool> kp(B * N);
  CUDA_CHECK(cudaMemcpy(kp.get(), padding.data(), padding.size(), cudaMemcpyHostToDevice));
  const bool* kp_dev = c.padding ? kp.get() : nullptr;

  const double scale = 1.0 / std::sqrt(double(D));
  RefProblem rp{B, N, H, D, Dv, &t, c.padding ? &padding : nullptr, scale};
  gpu::Dims dims;
  dims.batch = B;
  dims.seq = N;
  dims.heads = H;
  dims.head_dim = D;
  dims.value_dim = Dv;
  dims.block = bs;

  // ---- fused attention, forward and backward --------------------------------
  Operand<T> q(B * N * H * D, -1, 1, rng), k(B * N * H * D, -1, 1, rng);
  Operand<T> v(B * N * H * Dv, -1, 1, rng), dout(B * N * H * Dv, -1, 1, rng);
  DeviceBuffer<T> out(B * N * H * Dv), dq(B * N * H * D), dk(B * N * H * D), dv(B * N * H * Dv);
  DeviceBuffer<float> lse(B * H * N), work(gpu::AttentionBackwardWorkspaceBytes(dims) / 4);
  auto run = [&] {
    Must(gpu::AttentionForward(dt, dims, tables.view, kp_dev, float(scale), q.dev.get(), k.dev.get(),
                               v.dev.get(), out.get(), lse.get(), 0));
    Must(gpu::AttentionBackward(dt, dims, tables.view, kp_dev, float(scale), q.dev.get(),
                                k.dev.get(), v.dev.get(), out.get(), lse.get(), dout.dev.get(),
                                dq.get(), dk.get(), dv.get(), work.get(), 0));
    CUDA_CHECK(cudaDeviceSynchronize());
  };
  run();
  const auto out1 = out.download();
  const auto dq1 = dq.download(), dk1 = dk.download(), dv1 = dv.download();
  const auto lse1 = lse.download();
  Vec r_out, r_lse, r_dq, r_dk, r_dv;
  sa::harness::RefAttention(rp, q.exact, k.exact, v.exact, &r_out, &r_lse, &dout.exact, &r_dq,
                            &r_dk, &r_dv);
  tally->check(tag + "attention out", RelErr(ToDouble(out1), r_out), tol);
  tally->check(tag + "attention lse", RelErr(ToDouble(lse1), r_lse), tol);
  tally->check(tag + "attention dq", RelErr(ToDouble(dq1), r_dq), tol);
  tally->check(tag + "attention dk", RelErr(ToDouble(dk1), r_dk), tol);
  tally->check(tag + "attention dv", RelErr(ToDouble(dv1), r_dv), tol);
  run();  // determinism: a second run is bitwise equal
  const bool same = std::memcmp(out1.data(), out.download().data(), out1.size() * sizeof(T)) == 0 &&
                    std::memcmp(dq1.data(), dq.download().data(), dq1.size() * sizeof(T)) == 0 &&
                    std::memcmp(dk1.data(), dk.download().data(), dk1.size() * sizeof(T)) == 0 &&
                    std::memcmp(dv1.data(), dv.download().data(), dv1.size() * sizeof(T)) == 0;
  tally->check(tag + "attention bitwise deterministic", same ? 0.0 : 1.0, 0.0);

  // ---- three-op path -----------------------------------------------------------
  const size_t sparse_n = size_t(B * G * Z * bs * bs);
  if (Z > 0) {
    DeviceBuffer<T> s(sparse_n);
    Must(gpu::Sdd(dt, dims, tables.view, q.dev.get(), k.dev.get(), s.get(), 0));
    CUDA_CHECK(cudaDeviceSynchronize());
    tally->check(tag + "sdd", RelErr(ToDouble(s.download()), sa::harness::RefSdd(rp, q.exact, k.exact)),
                 tol);

    Operand<T> x(sparse_n, -4, 4, rng);
    Must(gpu::Softmax(dt, dims, tables.view, kp_dev, float(scale), x.dev.get(), s.get(), 0));
    CUDA_CHECK(cudaDeviceSynchronize());
    tally->check(tag + "softmax", RelErr(ToDouble(s.download()), sa::harness::RefSoftmax(rp, x.exact)),
                 tol);

    Operand<T> y(sparse_n, 0, 1, rng), dy(sparse_n, -1, 1, rng);
    Must(gpu::SoftmaxGrad(dt, B, G, Z, bs, t.layout_heads * t.num_blocks(), tables.view.row_offsets,
                          float(scale), y.dev.get(), dy.dev.get(), s.get(), 0));
    CUDA_CHECK(cudaDeviceSynchronize());
    tally->check(tag + "softmax_grad",
                 RelErr(ToDouble(s.download()), sa::harness::RefSoftmaxGrad(rp, y.exact, dy.exact)),
                 tol);

    DeviceBuffer<T> o(B * N * H * D);
    Must(gpu::Dsd(dt, dims, tables.view, y.dev.get(), k.dev.get(), o.get(), 0));
    CUDA_CHECK(cudaDeviceSynchronize());
    tally->check(tag + "dsd", RelErr(ToDouble(o.download()), sa::harness::RefDsd(rp, y.exact, k.exact, false)),
                 tol);
    Must(gpu::DsdT(dt, dims, tables.view, y.dev.get(), k.dev.get(), o.get(), 0));
    CUDA_CHECK(cudaDeviceSynchronize());
    tally->check(tag + "dsd_t", RelErr(ToDouble(o.download()), sa::harness::RefDsd(rp, y.exact, k.exact, true)),
                 tol);
  }
}

std::vector<Case> Cases() {
  using namespace sa::harness;
  return {
      {"fixed(128,32) N=1024 b=64", [] { return FixedTables(128, 32, 1, true, 1024, 64); }, 2, 4, 64,
       64, false},
      {"fixed(128,32,groups=2) N=512 b=32 pad", [] { return FixedTables(128, 32, 2, true, 512, 32); },
       1, 4, 64, 32, true},
      {"fixed(64,16) N=512 b=64 D=128", [] { return FixedTables(64, 16, 1, true, 512, 64); }, 1, 2,
       128, 128, false},
      {"strided(32) N=512 b=16", [] { return StridedTables(32, true, 512, 16); }, 2, 2, 32, 32, false},
      {"strided(64,bidir) N=512 b=32 pad", [] { return StridedTables(64, false, 512, 32); }, 1, 2, 64,
       64, true},
      {"random(Hl=2) N=512 b=128 pad", [] { return RandomTables(2, 512, 128, 0.5, 7); }, 2, 4, 64, 64,
       true},
      {"random N=256 b=16 D=48 Dv=80 pad", [] { return RandomTables(1, 256, 16, 0.3, 11); }, 1, 3, 48,
       80, true},
  };
}

// ---- timing ----------------------------------------------------------------------
template <typename T>
void Bench(const std::vector<int64_t>& seqs, int64_t block, FILE* json) {
  const int64_t B = 1, H = 8, D = 64;
  std::mt19937_64 rng(1234);
  std::printf("\n# timing: Fixed(128, 32) causal, B=%lld H=%lld D=%lld block=%lld %s\n",
              (long long)B, (long long)H, (long long)D, (long long)block, Elem<T>::kName);
  for (const int64_t N : seqs) {
    const HostTables t = sa::harness::FixedTables(128, 32, 1, true, N, block);
    TablesOnDevice tables(t);
    gpu::Dims dims;
    dims.batch = B;
    dims.seq = N;
    dims.heads = H;
    dims.head_dim = D;
    dims.value_dim = D;
    dims.block = block;
    const size_t n = size_t(B * N * H * D);
    Operand<T> q(n, -1, 1, rng), k(n, -1, 1, rng), v(n, -1, 1, rng), dout(n, -1, 1, rng);
    DeviceBuffer<T> out(n), dq(n), dk(n), dv(n);
    DeviceBuffer<float> lse(B * H * N), work(gpu::AttentionBackwardWorkspaceBytes(dims) / 4);
    const float scale = float(1.0 / std::sqrt(double(D)));
    const gpu::DType dt = Elem<T>::kType;
    auto fwd = [&] {
      Must(gpu::AttentionForward(dt, dims, tables.view, nullptr, scale, q.dev.get(), k.dev.get(),
                                 v.dev.get(), out.get(), lse.get(), 0));
    };
    auto bwd = [&] {
      Must(gpu::AttentionBackward(dt, dims, tables.view, nullptr, scale, q.dev.get(), k.dev.get(),
                                  v.dev.get(), out.get(), lse.get(), dout.dev.get(), dq.get(),
                                  dk.get(), dv.get(), work.get(), 0));
    };
    cudaEvent_t e0, e1;
    CUDA_CHECK(cudaEventCreate(&e0));
    CUDA_CHECK(cudaEventCreate(&e1));
    auto median_ms = [&](const std::function<void()>& fn, int reps) {
      std::vector<float> ms;
      for (int r = 0; r < reps; ++r) {
        CUDA_CHECK(cudaEventRecord(e0));
        fn();
        CUDA_CHECK(cudaEventRecord(e1));
        CUDA_CHECK(cudaEventSynchronize(e1));
        float x = 0.f;
        CUDA_CHECK(cudaEventElapsedTime(&x, e0, e1));
        ms.push_back(x);
      }
      std::sort(ms.begin(), ms.end());
      return double(ms[ms.size() / 2]);
    };
    fwd();
    bwd();
    CUDA_CHECK(cudaDeviceSynchronize());
    const int reps = N <= 4096 ? 50 : N <= 16384 ? 20 : 9;
    const double fwd_ms = median_ms(fwd, reps);
    const double total_ms = median_ms([&] { fwd(); bwd(); }, reps);
    std::vector<int64_t> mask_kept(t.num_masks, 0);  // kept elements per partial tile
    for (size_t e = 0; e < t.masks.size(); ++e) mask_kept[e / (block * block)] += t.masks[e];
    int64_t kept = 0;  // kept elements of the layout (all layout heads)
    for (int64_t z = 0; z < t.nnz(); ++z)
      kept += t.mask_index[z] < 0 ? block * block : mask_kept[t.mask_index[z]];
    // Block products computed: 2 forward (QK^T, PV) + 5 backward (standard count).
    const double flops = 7.0 * 2.0 * double(t.nnz()) * block * block * D * H * B;
    std::printf("N=%-6lld blocks=%-8lld fwd %.3f ms  fwd+bwd %.3f ms  %.1f TFLOP/s (block products)\n",
                (long long)N, (long long)t.nnz(), fwd_ms, total_ms, flops / total_ms * 1e-9);
    if (json != nullptr)
      std::fprintf(json,
                   "{\"seq\": %lld, \"batch\": %lld, \"heads\": %lld, \"head_dim\": %lld, "
                   "\"block\": %lld, \"dtype\": \"%s\", \"nnz\": %lld, \"block_density\": %.6f, "
                   "\"element_density\": %.6f, \"fwd_ms\": %.4f, \"fwd_bwd_ms\": %.4f, "
                   "\"flops\": %.6e}\n",
                   (long long)N, (long long)B, (long long)H, (long long)D, (long long)block,
                   Elem<T>::kName, (long long)t.nnz(),
                   double(t.nnz()) / double(t.num_blocks() * t.num_blocks()),
                   double(kept) / (double(N) * double(N)), fwd_ms, total_ms, flops);
    CUDA_CHECK(cudaEventDestroy(e0));
    CUDA_CHECK(cudaEventDestroy(e1));
  }
}

std::vector<int64_t> ParseSeqs(const char* s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(std::atoll(item.c_str()));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  bool check = true, bench = true;
  std::string json_path, dtype = "bf16";
  std::vector<int64_t> seqs = {4096, 16384, 65536};
  int64_t block = 64;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--check-only") bench = false;
    else if (a == "--bench-only") check = false;
    else if (a == "--json" && i + 1 < argc) json_path = argv[++i];
    else if (a == "--seqs" && i + 1 < argc) seqs = ParseSeqs(argv[++i]);
    else if (a == "--dtype" && i + 1 < argc) dtype = argv[++i];
    else if (a == "--block" && i + 1 < argc) block = std::atoll(argv[++i]);
    else {
      std::fprintf(stderr,
                   "usage: harness [--check-only|--bench-only] [--json PATH] [--seqs N,N,..] "
                   "[--dtype bf16|fp16] [--block 64]\n");
      return 2;
    }
  }
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("# device: %s (sm_%d%d, %d SMs, %.0f GiB)\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount, prop.totalGlobalMem / 1073741824.0);

  Tally tally;
  if (check) {
    std::mt19937_64 rng(20240611);
    for (const Case& c : Cases()) {
      const HostTables t = c.make();
      std::printf("# case %s: Z=%lld blocks, %lld partial tiles\n", c.name.c_str(),
                  (long long)t.nnz(), (long long)t.num_masks);
      RunCase<float>(c, t, &tally, rng);
      RunCase<__half>(c, t, &tally, rng);
      RunCase<__nv_bfloat16>(c, t, &tally, rng);
    }
    std::printf("# correctness: %d passed, %d failed\n", tally.passed, tally.failed);
  }
  if (bench) {
    FILE* json = json_path.empty() ? nullptr : std::fopen(json_path.c_str(), "w");
    if (!json_path.empty() && json == nullptr) {
      std::fprintf(stderr, "cannot write %s\n", json_path.c_str());
      return 2;
    }
    if (dtype == "fp16")
      Bench<__half>(seqs, block, json);
    else
      Bench<__nv_bfloat16>(seqs, block, json);
    if (json != nullptr) std::fclose(json);
  }
  return tally.failed == 0 ? 0 : 1;
}
