// Runs the CUDA kernels of custom_ops/cuda/blocksparse_gpu.cu on the CPU
// (cuda_emulation.h) against the float64 reference, for machines without a
// GPU (tests/test_gpu.py builds and runs it). Small problems only: every
// thread block is 128 std::threads. Prints PASS/FAIL per check; exit 1 on a
// failure.
//   g++ -std=c++20 -O1 -pthread -I. custom_ops/gpu_harness/emulate_check.cc -o emulate_check
//   ./emulate_check [NAME_SUBSTRING]
// The emulation first (it defines SPARSE_ATTENTION_CUDA_EMULATION), so that
// the kernels see it instead of the CUDA headers.
#include "custom_ops/gpu_harness/cuda_emulation.h"
#include "custom_ops/cuda/blocksparse_gpu.cu"  // NOLINT: the kernels themselves

#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "custom_ops/gpu_harness/reference.h"
#include "custom_ops/gpu_harness/tables.h"

namespace {

namespace gpu = sparse_attention::gpu;
using sparse_attention::harness::HostTables;
using sparse_attention::harness::RefProblem;
using sparse_attention::harness::Vec;

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

template <typename T>
struct Operand {
  std::vector<T> v;
  Vec exact;
  Operand(size_t n, double lo, double hi, std::mt19937_64& rng) : v(n), exact(n) {
    std::uniform_real_distribution<double> u(lo, hi);
    for (size_t i = 0; i < n; ++i) {
      v[i] = Elem<T>::From(float(u(rng)));
      exact[i] = Elem<T>::To(v[i]);
    }
  }
};

template <typename T>
Vec ToDouble(const std::vector<T>& x) {
  Vec out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = Elem<T>::To(x[i]);
  return out;
}

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

int failures = 0;
void Check(const std::string& what, double err, double tol) {
  const bool ok = err <= tol;
  failures += !ok;
  std::printf("%s %-58s rel_err %.3e (tol %.0e)\n", ok ? "PASS" : "FAIL", what.c_str(), err, tol);
  std::fflush(stdout);
}

void Must(const std::string& err) {
  if (!err.empty()) {
    std::printf("FAIL kernel error: %s\n", err.c_str());
    std::exit(1);
  }
}

struct Case {
  std::string name;
  std::function<HostTables()> make;
  int64_t batch, heads, d, dv;
  bool padding;
  int checks;  // kValues | kNonFinite (RunNonFinite costs seconds: small cases only)
};
constexpr int kValues = 1, kNonFinite = 2;

// One case's tables and sizes, as the kernels and the reference take them.
struct Problem {
  const HostTables& t;
  int64_t B, N, H, D, Dv, bs, G, Z;
  std::vector<uint8_t> padding;  // [B, N], 1: real key
  const bool* kp;                // padding.data(), or null without padding
  double scale;
  gpu::DeviceTables dtab;
  gpu::Dims dims;
  RefProblem rp;

  Problem(const Case& c, const HostTables& tables)
      : t(tables), B(c.batch), N(t.seq_len), H(c.heads), D(c.d), Dv(c.dv), bs(t.block),
        G(H / t.layout_heads), Z(t.nnz()), padding(B * N, 1),
        kp(c.padding ? reinterpret_cast<const bool*>(padding.data()) : nullptr),
        scale(1.0 / std::sqrt(double(D))),
        rp{B, N, H, D, Dv, &t, c.padding ? &padding : nullptr, scale} {
    for (int64_t b = 0; b < B && c.padding; ++b)
      for (int64_t n = 0; n < N; ++n)
        padding[b * N + n] = (n >= N - (b + 1) * N / 8 || n % 13 == 5) ? 0 : 1;
    dtab.blocks = t.blocks.data();
    dtab.row_offsets = t.row_offsets.data();
    dtab.col_offsets = t.col_offsets.data();
    dtab.col_blocks = t.col_blocks.data();
    dtab.mask_index = t.mask_index.data();
    dtab.masks = reinterpret_cast<const bool*>(t.masks.data());
    dtab.nnz = Z;
    dtab.layout_heads = t.layout_heads;
    dtab.num_blocks = t.num_blocks();
    dims.batch = B;
    dims.seq = N;
    dims.heads = H;
    dims.head_dim = D;
    dims.value_dim = Dv;
    dims.block = bs;
  }
};

// The fused forward and backward (kernels and float64 reference): out, lse,
// dq, dk, dv.
struct AttentionResults {
  Vec out, lse, dq, dk, dv;
};

template <typename T>
AttentionResults RunAttention(const Problem& pr, const Operand<T>& q, const Operand<T>& k,
                              const Operand<T>& v, const Operand<T>& dout) {
  const int64_t B = pr.B, N = pr.N, H = pr.H, D = pr.D, Dv = pr.Dv;
  const gpu::DType dt = Elem<T>::kType;
  std::vector<T> out(B * N * H * Dv), dq(B * N * H * D), dk(B * N * H * D), dv(B * N * H * Dv);
  std::vector<float> lse(B * H * N), work(gpu::AttentionBackwardWorkspaceBytes(pr.dims) / 4);
  Must(gpu::AttentionForward(dt, pr.dims, pr.dtab, pr.kp, float(pr.scale), q.v.data(), k.v.data(),
                             v.v.data(), out.data(), lse.data(), nullptr));
  Must(gpu::AttentionBackward(dt, pr.dims, pr.dtab, pr.kp, float(pr.scale), q.v.data(),
                              k.v.data(), v.v.data(), out.data(), lse.data(), dout.v.data(),
                              dq.data(), dk.data(), dv.data(), work.data(), nullptr));
  return {ToDouble(out), Vec(lse.begin(), lse.end()), ToDouble(dq), ToDouble(dk), ToDouble(dv)};
}

AttentionResults RefResults(const Problem& pr, const Vec& q, const Vec& k, const Vec& v,
                            const Vec& dout) {
  AttentionResults r;
  sparse_attention::harness::RefAttention(pr.rp, q, k, v, &r.out, &r.lse, &dout, &r.dq, &r.dk,
                                          &r.dv);
  return r;
}

template <typename T>
void Run(const Case& c, const HostTables& t) {
  std::mt19937_64 rng(42);
  const Problem pr(c, t);
  const gpu::DType dt = Elem<T>::kType;
  const double tol = Elem<T>::kTol;
  const int64_t B = pr.B, N = pr.N, H = pr.H, D = pr.D, Dv = pr.Dv, bs = pr.bs, G = pr.G, Z = pr.Z;
  const std::string tag = c.name + " " + Elem<T>::kName + " ";
  const RefProblem& rp = pr.rp;
  const gpu::DeviceTables& dtab = pr.dtab;
  const gpu::Dims& dims = pr.dims;
  const bool* kp = pr.kp;
  const double scale = pr.scale;

  Operand<T> q(B * N * H * D, -1, 1, rng), k(B * N * H * D, -1, 1, rng);
  Operand<T> v(B * N * H * Dv, -1, 1, rng), dout(B * N * H * Dv, -1, 1, rng);
  const AttentionResults got = RunAttention(pr, q, k, v, dout);
  const AttentionResults ref = RefResults(pr, q.exact, k.exact, v.exact, dout.exact);
  Check(tag + "attention out", RelErr(got.out, ref.out), tol);
  Check(tag + "attention lse", RelErr(got.lse, ref.lse), tol);
  Check(tag + "attention dq", RelErr(got.dq, ref.dq), tol);
  Check(tag + "attention dk", RelErr(got.dk, ref.dk), tol);
  Check(tag + "attention dv", RelErr(got.dv, ref.dv), tol);
  if (Z == 0) return;

  const size_t sn = size_t(B * G * Z * bs * bs);
  std::vector<T> s(sn);
  Must(gpu::Sdd(dt, dims, dtab, q.v.data(), k.v.data(), s.data(), nullptr));
  Check(tag + "sdd", RelErr(ToDouble(s), sparse_attention::harness::RefSdd(rp, q.exact, k.exact)), tol);
  Operand<T> x(sn, -4, 4, rng), y(sn, 0, 1, rng), dy(sn, -1, 1, rng);
  Must(gpu::Softmax(dt, dims, dtab, kp, float(scale), x.v.data(), s.data(), nullptr));
  Check(tag + "softmax", RelErr(ToDouble(s), sparse_attention::harness::RefSoftmax(rp, x.exact)), tol);
  Must(gpu::SoftmaxGrad(dt, B, G, Z, bs, t.layout_heads * t.num_blocks(), dtab.row_offsets,
                        float(scale), y.v.data(), dy.v.data(), s.data(), nullptr));
  Check(tag + "softmax_grad",
        RelErr(ToDouble(s), sparse_attention::harness::RefSoftmaxGrad(rp, y.exact, dy.exact)), tol);
  std::vector<T> o(B * N * H * D);
  Must(gpu::Dsd(dt, dims, dtab, y.v.data(), k.v.data(), o.data(), nullptr));
  Check(tag + "dsd", RelErr(ToDouble(o), sparse_attention::harness::RefDsd(rp, y.exact, k.exact, false)),
        tol);
  Must(gpu::DsdT(dt, dims, dtab, y.v.data(), k.v.data(), o.data(), nullptr));
  Check(tag + "dsd_t", RelErr(ToDouble(o), sparse_attention::harness::RefDsd(rp, y.exact, k.exact, true)),
        tol);
}

// NaN and +-inf: the elements that are not finite must be exactly the
// reference's (see RefAttention); the finite ones within tol of it. With
// neg_inf (lse), -inf (a row with no visible finite score) must match too.
void CheckNonFinite(const std::string& what, const Vec& got, const Vec& ref, double tol,
                    bool neg_inf = false) {
  int64_t bad = 0, differ = 0;
  double num = 0.0, den = 1e-30;
  for (size_t i = 0; i < ref.size(); ++i) {
    const bool g = std::isfinite(got[i]), r = std::isfinite(ref[i]);
    bad += !r;
    differ += g != r || (neg_inf && (got[i] == -INFINITY) != (ref[i] == -INFINITY));
    if (!g || !r) continue;
    num = std::max(num, std::fabs(got[i] - ref[i]));
    den = std::max(den, std::fabs(ref[i]));
  }
  const bool ok = differ == 0 && num / den <= tol;
  failures += !ok;
  std::printf("%s %-58s non-finite %lld/%zu, %lld differ; rel_err %.3e (tol %.0e)\n",
              ok ? "PASS" : "FAIL", what.c_str(), (long long)bad, ref.size(), (long long)differ,
              num / den, tol);
  std::fflush(stdout);
}

// NaN, +inf and -inf (two of each, at random elements) in q, k or dout, one
// tensor per run: the fused kernels' non-finite out, lse, dq, dk, dv must be
// exactly the float64 visible-pairs reference's (ops.attention's docstring).
// The partial tiles (causal diagonals, random masks) and padded keys are
// where a block product over hidden pairs would add 0 * inf = NaN.
template <typename T>
void RunNonFinite(const Case& c, const HostTables& t) {
  const Problem pr(c, t);
  const double tol = Elem<T>::kTol;
  const int64_t B = pr.B, N = pr.N, H = pr.H, D = pr.D, Dv = pr.Dv;
  const double values[] = {NAN, INFINITY, -INFINITY};
  for (const char* target : {"q", "k", "dout"}) {
    std::mt19937_64 rng(7);
    Operand<T> q(B * N * H * D, -1, 1, rng), k(B * N * H * D, -1, 1, rng);
    Operand<T> v(B * N * H * Dv, -1, 1, rng), dout(B * N * H * Dv, -1, 1, rng);
    Operand<T>& x = target[0] == 'q' ? q : target[0] == 'k' ? k : dout;
    std::uniform_int_distribution<size_t> at(0, x.v.size() - 1);
    for (int round = 0; round < 2; ++round)
      for (const double value : values) {
        const size_t i = at(rng);
        x.v[i] = Elem<T>::From(float(value));
        x.exact[i] = Elem<T>::To(x.v[i]);
      }
    const AttentionResults got = RunAttention(pr, q, k, v, dout);
    const AttentionResults ref = RefResults(pr, q.exact, k.exact, v.exact, dout.exact);
    const std::string tag = c.name + " " + Elem<T>::kName + " nan/inf in " + target + ": ";
    CheckNonFinite(tag + "out", got.out, ref.out, tol);
    CheckNonFinite(tag + "lse", got.lse, ref.lse, tol, true);
    CheckNonFinite(tag + "dq", got.dq, ref.dq, tol);
    CheckNonFinite(tag + "dk", got.dk, ref.dk, tol);
    CheckNonFinite(tag + "dv", got.dv, ref.dv, tol);
  }
}

}  // namespace

int main(int argc, char** argv) {
  using namespace sparse_attention::harness;
  // Optional: only cases whose name contains argv[1].
  const std::string only = argc > 1 ? argv[1] : "";
  const std::vector<Case> cases = {
      {"fixed(64,16) N=256 b=32", [] { return FixedTables(64, 16, 1, true, 256, 32); }, 1, 2, 32, 32,
       false, kValues},
      {"fixed(64,16,groups=2) N=256 b=64 pad", [] { return FixedTables(64, 16, 2, true, 256, 64); },
       1, 2, 16, 32, true, kValues},
      {"strided(16) N=128 b=16", [] { return StridedTables(16, true, 128, 16); }, 1, 1, 16, 16, false,
       kValues},
      {"random N=256 b=128 D=48 Dv=80 pad", [] { return RandomTables(1, 256, 128, 0.7, 5); }, 1, 1,
       48, 80, true, kValues},
      {"random(Hl=2) N=128 b=16 pad", [] { return RandomTables(2, 128, 16, 0.4, 9); }, 1, 2, 16, 16,
       true, kValues},
      {"random(Hl=2) N=64 b=16 pad", [] { return RandomTables(2, 64, 16, 0.6, 3); }, 1, 2, 16, 16,
       true, kNonFinite},
      // Block 128 in 64 x 64 chunks: causal diagonals whose chunks are all,
      // partly or not visible, and a summary tile.
      {"fixed(128,32) N=256 b=128 D=16 pad", [] { return FixedTables(128, 32, 1, true, 256, 128); },
       1, 1, 16, 16, true, kNonFinite},
  };
  for (const Case& c : cases) {
    if (c.name.find(only) == std::string::npos) continue;
    const HostTables t = c.make();
    if (c.checks & kValues) {
      Run<float>(c, t);
      Run<__half>(c, t);
      Run<__nv_bfloat16>(c, t);
    }
    if (c.checks & kNonFinite) {
      RunNonFinite<float>(c, t);
      RunNonFinite<__half>(c, t);
      RunNonFinite<__nv_bfloat16>(c, t);
    }
  }
  std::printf("# emulated kernels: %s\n", failures == 0 ? "all passed" : "FAILURES");
  return failures == 0 ? 0 : 1;
}
