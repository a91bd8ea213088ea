// CUDA kernels of the block-sparse attention ops (see blocksparse_gpu.h).
//
// Every kernel works on one "unit" per thread block, like the CPU kernels
// (blocksparse_cpu.h): a query block row (b, head, I) or a key block column
// (b, head, J), cut into chunks of rm query rows / kc key columns so that the
// shared-memory footprint does not depend on the block size. Inside a thread
// block, tiles live in shared memory and block products go through CtaGemm:
// WMMA 16x16x16 tensor-core fragments for half / bfloat16 (float32
// accumulators), FMA loops for float32.
//
// Determinism: no atomics. Each output tile belongs to one thread block,
// which walks its row (or column) list in table order; dk/dv walk the column
// lists (col_offsets/col_blocks) instead of scattering from the rows.
#include "custom_ops/cuda/blocksparse_gpu.h"

// A CPU emulation of CUDA (gpu_harness/emulate_check.cc, for checks on
// machines without a GPU) defines SPARSE_ATTENTION_CUDA_EMULATION and what
// the CUDA headers would before including this file.
#ifndef SPARSE_ATTENTION_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define SPARSE_ATTENTION_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace sparse_attention {
namespace gpu {
namespace {

constexpr int kThreads = 128;  // 4 warps per thread block
constexpr int kWarps = kThreads / 32;

// ---- element conversions ----------------------------------------------------
__device__ __forceinline__ float ToF(float x) { return x; }
__device__ __forceinline__ float ToF(__half x) { return __half2float(x); }
__device__ __forceinline__ float ToF(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T FromF(float x);
template <>
__device__ __forceinline__ float FromF<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half FromF<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 FromF<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Row paddings (elements) of shared tiles: WMMA needs rows of 16-bit tiles to
// be multiples of 8 elements and float accumulators multiples of 4; float32
// tiles are read by FMA loops, where an odd stride avoids bank conflicts.
template <typename T>
struct Pad {
  static constexpr int kT = 8, kF = 4;
};
template <>
struct Pad<float> {
  static constexpr int kT = 1, kF = 1;
};

// Chunk sizes of one launch: rm query rows, kc key columns, padded head dims.
struct Tiles {
  int rm, kc, dp, dvp;
};

// Carves 128-byte aligned buffers out of dynamic shared memory; with a null
// base it only counts bytes (the host sizes the launch with the same code).
struct Carve {
  uintptr_t base;
  size_t off = 0;
  __host__ __device__ explicit Carve(void* b) : base(reinterpret_cast<uintptr_t>(b)) {}
  template <typename U>
  __host__ __device__ U* take(size_t n) {
    off = (off + 127) & ~size_t(127);
    U* p = reinterpret_cast<U*>(base + off);
    off += n * sizeof(U);
    return p;
  }
};

// ---- shared-memory layouts, one per kernel ---------------------------------
template <typename T>
struct FwdSmem {  // forward: Q chunk, K/V chunks, S, P, O accumulator, row stats
  T *q, *k, *v, *p;
  float *s, *o, *m, *l, *alpha;
  int ldq, ldv, lds, ldp, ldo;
  size_t bytes = 0;
  __host__ __device__ FwdSmem(void* base, const Tiles& t) {
    Carve c(base);
    ldq = t.dp + Pad<T>::kT;
    ldv = t.dvp + Pad<T>::kT;
    lds = t.kc + Pad<T>::kF;
    ldp = t.kc + Pad<T>::kT;
    ldo = t.dvp + Pad<T>::kF;
    q = c.take<T>(size_t(t.rm) * ldq);
    k = c.take<T>(size_t(t.kc) * ldq);
    v = c.take<T>(size_t(t.kc) * ldv);
    s = c.take<float>(size_t(t.rm) * lds);
    p = c.take<T>(size_t(t.rm) * ldp);
    o = c.take<float>(size_t(t.rm) * ldo);
    m = c.take<float>(t.rm);
    l = c.take<float>(t.rm);
    alpha = c.take<float>(t.rm);
    bytes = c.off;
  }
};

template <typename T>
struct BwdSmem {  // both backward kernels: Q/dO chunk, K/V chunk, S|dP, P, dS, two accumulators
  T *q, *dout, *k, *v, *p, *ds;
  float *s, *acc0, *acc1, *lse, *delta;
  int ldq, ldv, lds, ldp, lda0, lda1;
  size_t bytes = 0;
  // acc0: [rows0, dp] (dq: rm rows; dk: kc rows); acc1: [kc, dvp] for dv (dkdv only).
  __host__ __device__ BwdSmem(void* base, const Tiles& t, bool dkdv) {
    Carve c(base);
    ldq = t.dp + Pad<T>::kT;
    ldv = t.dvp + Pad<T>::kT;
    lds = t.kc + Pad<T>::kF;
    ldp = t.kc + Pad<T>::kT;
    lda0 = t.dp + Pad<T>::kF;
    lda1 = t.dvp + Pad<T>::kF;
    q = c.take<T>(size_t(t.rm) * ldq);
    dout = c.take<T>(size_t(t.rm) * ldv);
    k = c.take<T>(size_t(t.kc) * ldq);
    v = c.take<T>(size_t(t.kc) * ldv);
    s = c.take<float>(size_t(t.rm) * lds);
    p = c.take<T>(size_t(t.rm) * ldp);
    ds = c.take<T>(size_t(t.rm) * ldp);
    acc0 = c.take<float>(size_t(dkdv ? t.kc : t.rm) * lda0);
    acc1 = dkdv ? c.take<float>(size_t(t.kc) * lda1) : nullptr;
    lse = c.take<float>(t.rm);
    delta = c.take<float>(t.rm);
    bytes = c.off;
  }
};

template <typename T>
struct ProductSmem {  // sdd / dsd / dsd_t: two operand tiles and a float tile
  T *a, *b;
  float* c;
  int lda, ldb, ldc;
  size_t bytes = 0;
  // a: [ra, ca], b: [rb, cb], c: [rc, cc] (elements, before padding).
  __host__ __device__ ProductSmem(void* base, int ra, int ca, int rb, int cb, int rc, int cc) {
    Carve k(base);
    lda = ca + Pad<T>::kT;
    ldb = cb + Pad<T>::kT;
    ldc = cc + Pad<T>::kF;
    a = k.take<T>(size_t(ra) * lda);
    b = k.take<T>(size_t(rb) * ldb);
    c = k.take<float>(size_t(rc) * ldc);
    bytes = k.off;
  }
};

// ---- thread-block building blocks ------------------------------------------
struct alignas(16) Bytes16 {
  uint32_t w[4];
};

// Exponent field of T (all ones: NaN or +-inf), in the low bits of a word.
template <typename T>
struct Exponent;
template <>
struct Exponent<float> {
  static constexpr uint32_t kMask = 0x7f800000u;
};
template <>
struct Exponent<__half> {
  static constexpr uint32_t kMask = 0x7c00u;
};
template <>
struct Exponent<__nv_bfloat16> {
  static constexpr uint32_t kMask = 0x7f80u;
};

// Whether x is neither NaN nor +-inf (from its bits: no float conversion).
template <typename T>
__device__ __forceinline__ bool Finite(T x) {
  uint32_t u = 0;
  memcpy(&u, &x, sizeof(T));
  return (u & Exponent<T>::kMask) != Exponent<T>::kMask;
}

// The same for the 16 / sizeof(T) elements of a 16-byte copy.
template <typename T>
__device__ __forceinline__ bool Finite(const Bytes16& x) {
  constexpr uint32_t m = Exponent<T>::kMask;
  bool ok = true;
  for (int i = 0; i < 4; ++i) {
    ok &= (x.w[i] & m) != m;
    if (sizeof(T) == 2) ok &= ((x.w[i] >> 16) & m) != m;
  }
  return ok;
}

// dst[r, c] = src[r * stride + c] for c < width, 0 for width <= c < padded.
// 16-byte copies when the rows allow it (16-bit tiles with D % 8 == 0).
// Returns whether the elements this thread copied are all finite (the
// backward's per-chunk flag, see VisibleProducts; unused results cost
// nothing once inlined).
template <typename T>
__device__ __forceinline__ bool LoadRows(const T* __restrict__ src, int64_t stride, int rows,
                                         int width, int padded, T* dst, int ld) {
  constexpr int kVec = 16 / sizeof(T);
  bool finite = true;
  if (width == padded && width % kVec == 0 && stride % kVec == 0 && ld % kVec == 0 &&
      reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    const int per_row = width / kVec;
    for (int idx = threadIdx.x; idx < rows * per_row; idx += blockDim.x) {
      const int r = idx / per_row, c = (idx - r * per_row) * kVec;
      const Bytes16 x = *reinterpret_cast<const Bytes16*>(src + r * stride + c);
      *reinterpret_cast<Bytes16*>(dst + r * ld + c) = x;
      finite &= Finite<T>(x);
    }
    return finite;
  }
  for (int idx = threadIdx.x; idx < rows * padded; idx += blockDim.x) {
    const int r = idx / padded, c = idx - r * padded;
    const T x = c < width ? src[r * stride + c] : FromF<T>(0.f);
    dst[r * ld + c] = x;
    finite &= Finite(x);
  }
  return finite;
}

template <typename T>
__device__ void ZeroFloat(float* x, int rows, int cols, int ld) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
    const int r = idx / cols;
    x[r * ld + idx - r * cols] = 0.f;
  }
}

// C[M, N] (+)= op(A)[M, K] op(B)[K, N], all in shared memory, M, N, K
// multiples of 16. op(A)(m, k) = TA ? A[k * lda + m] : A[m * lda + k];
// op(B)(k, n) = TB ? B[n * ldb + k] : B[k * ldb + n]. The caller syncs.
template <typename T, bool TA, bool TB>
__device__ void CtaGemm(int M, int N, int K, const T* A, int lda, const T* B, int ldb, float* C,
                        int ldc, bool accumulate) {
  if constexpr (std::is_same<T, float>::value) {
    for (int idx = threadIdx.x; idx < M * N; idx += blockDim.x) {
      const int m = idx / N, n = idx - m * N;
      float acc = accumulate ? C[m * ldc + n] : 0.f;
      for (int k = 0; k < K; ++k) {
        const float a = TA ? A[k * lda + m] : A[m * lda + k];
        const float b = TB ? B[n * ldb + k] : B[k * ldb + n];
        acc = fmaf(a, b, acc);
      }
      C[m * ldc + n] = acc;
    }
  } else {
    namespace wmma = nvcuda::wmma;
    using LA = typename std::conditional<TA, wmma::col_major, wmma::row_major>::type;
    using LB = typename std::conditional<TB, wmma::col_major, wmma::row_major>::type;
    const int warp = threadIdx.x / 32, tiles_n = N / 16, tiles = (M / 16) * tiles_n;
    for (int tile = warp; tile < tiles; tile += blockDim.x / 32) {
      const int m0 = (tile / tiles_n) * 16, n0 = (tile % tiles_n) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      if (accumulate)
        wmma::load_matrix_sync(c, C + m0 * ldc + n0, ldc, wmma::mem_row_major);
      else
        wmma::fill_fragment(c, 0.f);
      for (int k0 = 0; k0 < K; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> b;
        wmma::load_matrix_sync(a, TA ? A + k0 * lda + m0 : A + m0 * lda + k0, lda);
        wmma::load_matrix_sync(b, TB ? B + n0 * ldb + k0 : B + k0 * ldb + n0, ldb);
        wmma::mma_sync(c, a, b, c);
      }
      wmma::store_matrix_sync(C + m0 * ldc + n0, c, ldc, wmma::mem_row_major);
    }
  }
}

__device__ __forceinline__ float WarpMax(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float WarpSum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Is element (query row qi, key column kj) of a block with mask index mi
// visible? keys: the key padding row of this batch at the block's first key
// (not the chunk's: kj counts from the block's first column).
__device__ __forceinline__ bool Visible(const bool* masks, int mi, int block, int qi, int kj,
                                        const bool* keys) {
  if (mi >= 0 && !masks[(int64_t(mi) * block + qi) * block + kj]) return false;
  return keys == nullptr || keys[kj];
}

// Everything a kernel needs, passed by value.
struct Args {
  DeviceTables t;
  const bool* key_padding;
  float scale;
  int64_t batch, seq, heads, block;
  int d, dv;
  const void *q, *k, *v, *out, *dout;
  const float* lse;
  float* delta;
  void *o_out, *dq, *dk, *dv_out;
  float* lse_out;
};

__device__ __forceinline__ int64_t DenseOffset(const Args& a, int64_t b, int64_t n, int64_t head,
                                               int width) {
  return ((b * a.seq + n) * a.heads + head) * width;
}

// Block row of the unit-th thread block of a row walk: last rows first, as
// causal layouts keep the most blocks there, and the longest walks should
// not start last (dk/dv walk columns, whose longest are the first).
__device__ __forceinline__ int64_t LastFirst(const Args& a, int64_t unit) {
  return a.t.num_blocks - 1 - unit;
}

__device__ __forceinline__ const bool* KeyRow(const Args& a, int64_t b, int64_t key0) {
  return a.key_padding == nullptr ? nullptr : a.key_padding + b * a.seq + key0;
}

// ---- fused forward -----------------------------------------------------------
// grid (Nb * chunks, H, B); chunk = rm query rows of block row I.
template <typename T>
__global__ void __launch_bounds__(kThreads) AttentionForwardKernel(Args a, Tiles t) {
  SPARSE_ATTENTION_DYNAMIC_SHARED(smem);
  FwdSmem<T> sm(smem, t);
  const int chunks = int(a.block / t.rm);
  const int64_t I = LastFirst(a, blockIdx.x / chunks), b = blockIdx.z, head = blockIdx.y;
  const int r0 = (blockIdx.x % chunks) * t.rm;  // first row inside the block
  const int64_t hl = a.t.layout_heads, nb = a.t.num_blocks, bs = a.block;
  const int64_t row = (head % hl) * nb + I, q0 = I * bs + r0;
  const int64_t stride_q = a.heads * a.d, stride_v = a.heads * a.dv;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  LoadRows(q + DenseOffset(a, b, q0, head, a.d), stride_q, t.rm, a.d, t.dp, sm.q, sm.ldq);
  ZeroFloat<T>(sm.o, t.rm, t.dvp, sm.ldo);
  for (int r = threadIdx.x; r < t.rm; r += blockDim.x) {
    sm.m[r] = -INFINITY;
    sm.l[r] = 0.f;
  }
  const int z0 = a.t.row_offsets[row], z1 = a.t.row_offsets[row + 1];
  for (int z = z0; z < z1; ++z) {
    const int64_t J = a.t.blocks[3 * z + 2];
    const int mi = a.t.mask_index[z];
    for (int c0 = 0; c0 < bs; c0 += t.kc) {
      const int64_t k0 = J * bs + c0;
      __syncthreads();  // previous chunk's readers of k, v, p are done
      LoadRows(k + DenseOffset(a, b, k0, head, a.d), stride_q, t.kc, a.d, t.dp, sm.k, sm.ldq);
      LoadRows(v + DenseOffset(a, b, k0, head, a.dv), stride_v, t.kc, a.dv, t.dvp, sm.v, sm.ldv);
      __syncthreads();
      CtaGemm<T, false, true>(t.rm, t.kc, t.dp, sm.q, sm.ldq, sm.k, sm.ldq, sm.s, sm.lds, false);
      __syncthreads();
      // Online softmax, one warp per query row.
      const bool* keys = KeyRow(a, b, J * bs);
      for (int r = warp; r < t.rm; r += kWarps) {
        float* s = sm.s + r * sm.lds;
        float mx = -INFINITY;
        for (int c = lane; c < t.kc; c += 32) {
          const float x = Visible(a.t.masks, mi, int(bs), r0 + r, c0 + c, keys) ? s[c] * a.scale
                                                                                 : -INFINITY;
          s[c] = x;
          mx = fmaxf(mx, x);
        }
        const float m_old = sm.m[r], m_new = fmaxf(m_old, WarpMax(mx));
        // No visible score above -inf yet: shift by 0, so that hidden and -inf
        // scores give 0 but a NaN score (fmaxf skipped it) gives NaN, as in
        // the CPU kernel (a row whose scores are all NaN has out and lse NaN).
        const float shift = m_new == -INFINITY ? 0.f : m_new;
        float sum = 0.f;
        for (int c = lane; c < t.kc; c += 32) {
          const T p = FromF<T>(expf(s[c] - shift));
          sm.p[r * sm.ldp + c] = p;
          sum += ToF(p);  // the rounded P, as the PV product sees it
        }
        sum = WarpSum(sum);
        if (lane == 0) {
          const float alpha = m_old == -INFINITY ? 0.f : expf(m_old - m_new);
          sm.l[r] = sm.l[r] * alpha + sum;
          sm.m[r] = m_new;
          sm.alpha[r] = alpha;
        }
      }
      __syncthreads();
      for (int idx = threadIdx.x; idx < t.rm * t.dvp; idx += blockDim.x) {
        const int r = idx / t.dvp;
        sm.o[r * sm.ldo + idx - r * t.dvp] *= sm.alpha[r];
      }
      __syncthreads();
      CtaGemm<T, false, false>(t.rm, t.dvp, t.kc, sm.p, sm.ldp, sm.v, sm.ldv, sm.o, sm.ldo, true);
    }
  }
  __syncthreads();
  T* out = static_cast<T*>(a.o_out) + DenseOffset(a, b, q0, head, a.dv);
  for (int idx = threadIdx.x; idx < t.rm * a.dv; idx += blockDim.x) {
    const int r = idx / a.dv, c = idx - r * a.dv;
    const float l = sm.l[r];
    out[r * stride_v + c] = FromF<T>(l == 0.f ? 0.f : sm.o[r * sm.ldo + c] / l);  // l NaN: NaN
  }
  // lse: -inf for rows that see no key, NaN for rows that see a NaN (as the CPU kernel).
  float* lse = a.lse_out + (b * a.heads + head) * a.seq + q0;
  for (int r = threadIdx.x; r < t.rm; r += blockDim.x) {
    const float l = sm.l[r];
    lse[r] = l > 0.f ? sm.m[r] + logf(l) : (l == 0.f ? -INFINITY : l);
  }
}

// ---- fused backward ----------------------------------------------------------
// delta [B, H, N] = rowsum(dout * out); one warp per dense row.
template <typename T>
__global__ void __launch_bounds__(kThreads) DeltaKernel(Args a) {
  const int64_t rows = a.batch * a.seq * a.heads;
  const int64_t rr = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (rr >= rows) return;
  const int lane = threadIdx.x % 32;
  const T* o = static_cast<const T*>(a.out) + rr * a.dv;
  const T* g = static_cast<const T*>(a.dout) + rr * a.dv;
  float sum = 0.f;
  for (int c = lane; c < a.dv; c += 32) sum += ToF(o[c]) * ToF(g[c]);
  sum = WarpSum(sum);
  if (lane == 0) {
    const int64_t head = rr % a.heads, n = (rr / a.heads) % a.seq, b = rr / (a.heads * a.seq);
    a.delta[(b * a.heads + head) * a.seq + n] = sum;
  }
}

// Loads a query chunk's Q, dO, lse and delta. Returns whether the Q and dO
// elements this thread loaded are all finite.
template <typename T>
__device__ bool LoadQueryChunk(const Args& a, const BwdSmem<T>& sm, const Tiles& t, int64_t b,
                               int64_t head, int64_t q0) {
  bool finite = LoadRows(static_cast<const T*>(a.q) + DenseOffset(a, b, q0, head, a.d),
                         a.heads * a.d, t.rm, a.d, t.dp, sm.q, sm.ldq);
  finite &= LoadRows(static_cast<const T*>(a.dout) + DenseOffset(a, b, q0, head, a.dv),
                     a.heads * a.dv, t.rm, a.dv, t.dvp, sm.dout, sm.ldv);
  const int64_t off = (b * a.heads + head) * a.seq + q0;
  for (int r = threadIdx.x; r < t.rm; r += blockDim.x) {
    sm.lse[r] = a.lse[off + r];
    sm.delta[r] = a.delta[off + r];
  }
  return finite;
}

// Loads a key chunk's K and V. Returns whether the K elements this thread
// loaded are all finite.
template <typename T>
__device__ bool LoadKeyChunk(const Args& a, const BwdSmem<T>& sm, const Tiles& t, int64_t b,
                             int64_t head, int64_t k0) {
  const bool finite = LoadRows(static_cast<const T*>(a.k) + DenseOffset(a, b, k0, head, a.d),
                               a.heads * a.d, t.kc, a.d, t.dp, sm.k, sm.ldq);
  LoadRows(static_cast<const T*>(a.v) + DenseOffset(a, b, k0, head, a.dv), a.heads * a.dv, t.kc,
           a.dv, t.dvp, sm.v, sm.ldv);
  return finite;
}

// Whether a chunk's backward products must skip its hidden pairs (see
// VisibleProducts): its tile has hidden elements (a tile mask or padded keys)
// and some thread loaded a NaN or inf operand (bad). Also the barrier after
// the chunk's loads: every thread calls it.
__device__ __forceinline__ bool NeedsVisibleProducts(int mi, const bool* keys, bool bad) {
  return __syncthreads_or((mi >= 0 || keys != nullptr) && bad) != 0;
}

// With Q, dO, K, V of one (query chunk, key chunk) in shared memory: S = QK^T,
// P = exp(scale*S - lse) on visible entries, dP = dO V^T, dS = P * (dP - delta).
// Leaves P in sm.p and dS in sm.ds. keys: key padding at the block's first key.
template <typename T>
__device__ void ProbsAndGrads(const Args& a, const BwdSmem<T>& sm, const Tiles& t, int mi, int r0,
                              int c0, const bool* keys) {
  CtaGemm<T, false, true>(t.rm, t.kc, t.dp, sm.q, sm.ldq, sm.k, sm.ldq, sm.s, sm.lds, false);
  __syncthreads();
  const int bs = int(a.block);
  // P and dS are selected to 0 where hidden (a NaN in dout or delta stays in
  // the elements its row sees). A row with lse -inf (no visible key) or NaN
  // (it sees a NaN) uses +inf: P = 0 except where its score is NaN or +inf,
  // as in the CPU kernel (LoadLse) and the reference.
  for (int idx = threadIdx.x; idx < t.rm * t.kc; idx += blockDim.x) {
    const int r = idx / t.kc, c = idx - r * t.kc;
    const float lse = sm.lse[r] == -INFINITY || sm.lse[r] != sm.lse[r] ? INFINITY : sm.lse[r];
    const bool vis = Visible(a.t.masks, mi, bs, r0 + r, c0 + c, keys);
    sm.p[r * sm.ldp + c] = FromF<T>(vis ? expf(sm.s[r * sm.lds + c] * a.scale - lse) : 0.f);
  }
  __syncthreads();
  CtaGemm<T, false, true>(t.rm, t.kc, t.dvp, sm.dout, sm.ldv, sm.v, sm.ldv, sm.s, sm.lds, false);
  __syncthreads();
  for (int idx = threadIdx.x; idx < t.rm * t.kc; idx += blockDim.x) {
    const int r = idx / t.kc, c = idx - r * t.kc;
    const bool vis = Visible(a.t.masks, mi, bs, r0 + r, c0 + c, keys);
    sm.ds[r * sm.ldp + c] = FromF<T>(
        vis ? ToF(sm.p[r * sm.ldp + c]) * (sm.s[r * sm.lds + c] - sm.delta[r]) : 0.f);
  }
  __syncthreads();
}

// The backward products of one (query chunk, key chunk) over its visible
// pairs only, after ProbsAndGrads (P and dS in shared memory, 0 where
// hidden): with kDkDv, dV += P^T dO and dK += dS^T Q (acc1, acc0 [kc, .]),
// else dQ += dS K (acc0 [rm, .]). For chunks with hidden pairs whose Q or dO
// rows (kDkDv) or K rows (dq) hold a NaN or inf, where a block product adds
// 0 * inf = NaN to the keys (queries) that cannot see it; as the CPU kernel's
// VisibleProducts. Rare, so plain loops: sm.s (dP, no longer needed) first
// gets the chunk's visibility (1 / 0), since a visible P or dS may be 0 too
// (0 * inf is NaN there, as in float64). Each thread owns its accumulator
// elements and sums in a fixed order: deterministic.
template <typename T, bool kDkDv>
__device__ void VisibleProducts(const Args& a, const BwdSmem<T>& sm, const Tiles& t, int mi,
                                int r0, int c0, const bool* keys) {
  const int bs = int(a.block);
  for (int idx = threadIdx.x; idx < t.rm * t.kc; idx += blockDim.x) {
    const int r = idx / t.kc, c = idx - r * t.kc;
    sm.s[r * sm.lds + c] = Visible(a.t.masks, mi, bs, r0 + r, c0 + c, keys) ? 1.f : 0.f;
  }
  __syncthreads();
  if (kDkDv) {  // key column c: dV[c, :dvp], then dK[c, :dp]
    const int w = t.dvp + t.dp;
    for (int idx = threadIdx.x; idx < t.kc * w; idx += blockDim.x) {
      const int c = idx / w, e = idx - c * w;
      const bool value = e < t.dvp;
      const T* coef = value ? sm.p : sm.ds;                    // P or dS, [rm, kc]
      const T* x = value ? sm.dout + e : sm.q + (e - t.dvp);   // dO or Q column
      const int ldx = value ? sm.ldv : sm.ldq;
      float* acc = value ? sm.acc1 + c * sm.lda1 + e : sm.acc0 + c * sm.lda0 + (e - t.dvp);
      float sum = *acc;
      for (int r = 0; r < t.rm; ++r)
        if (sm.s[r * sm.lds + c] != 0.f) sum = fmaf(ToF(coef[r * sm.ldp + c]), ToF(x[r * ldx]), sum);
      *acc = sum;
    }
  } else {  // query row r: dQ[r, :dp]
    for (int idx = threadIdx.x; idx < t.rm * t.dp; idx += blockDim.x) {
      const int r = idx / t.dp, d = idx - r * t.dp;
      float sum = sm.acc0[r * sm.lda0 + d];
      for (int c = 0; c < t.kc; ++c)
        if (sm.s[r * sm.lds + c] != 0.f)
          sum = fmaf(ToF(sm.ds[r * sm.ldp + c]), ToF(sm.k[c * sm.ldq + d]), sum);
      sm.acc0[r * sm.lda0 + d] = sum;
    }
  }
}

// dk, dv: grid (Nb * key chunks, H, B). Walks column (h, J)'s blocks in
// col_blocks order, every query chunk of each: dV += P^T dO, dK += dS^T Q.
template <typename T>
__global__ void __launch_bounds__(kThreads) AttentionBackwardDkDvKernel(Args a, Tiles t) {
  SPARSE_ATTENTION_DYNAMIC_SHARED(smem);
  BwdSmem<T> sm(smem, t, true);
  const int chunks = int(a.block / t.kc);
  const int64_t J = blockIdx.x / chunks, b = blockIdx.z, head = blockIdx.y;
  const int c0 = (blockIdx.x % chunks) * t.kc;
  const int64_t hl = a.t.layout_heads, nb = a.t.num_blocks, bs = a.block;
  const int64_t col = (head % hl) * nb + J, k0 = J * bs + c0;
  LoadKeyChunk(a, sm, t, b, head, k0);
  ZeroFloat<T>(sm.acc0, t.kc, t.dp, sm.lda0);
  ZeroFloat<T>(sm.acc1, t.kc, t.dvp, sm.lda1);
  const bool* keys = KeyRow(a, b, J * bs);
  const int e0 = a.t.col_offsets[col], e1 = a.t.col_offsets[col + 1];
  for (int e = e0; e < e1; ++e) {
    const int z = a.t.col_blocks[e];
    const int64_t I = a.t.blocks[3 * z + 1];
    const int mi = a.t.mask_index[z];
    for (int r0 = 0; r0 < bs; r0 += t.rm) {
      __syncthreads();  // the previous chunk's products are done with q, dout, p, ds
      const bool finite = LoadQueryChunk(a, sm, t, b, head, I * bs + r0);
      const bool visible_only = NeedsVisibleProducts(mi, keys, !finite);
      ProbsAndGrads(a, sm, t, mi, r0, c0, keys);
      if (visible_only) {
        VisibleProducts<T, true>(a, sm, t, mi, r0, c0, keys);
        continue;
      }
      CtaGemm<T, true, false>(t.kc, t.dvp, t.rm, sm.p, sm.ldp, sm.dout, sm.ldv, sm.acc1, sm.lda1,
                              true);
      CtaGemm<T, true, false>(t.kc, t.dp, t.rm, sm.ds, sm.ldp, sm.q, sm.ldq, sm.acc0, sm.lda0, true);
    }
  }
  __syncthreads();
  T* dk = static_cast<T*>(a.dk) + DenseOffset(a, b, k0, head, a.d);
  T* dv = static_cast<T*>(a.dv_out) + DenseOffset(a, b, k0, head, a.dv);
  for (int idx = threadIdx.x; idx < t.kc * a.d; idx += blockDim.x) {
    const int r = idx / a.d, c = idx - r * a.d;
    dk[r * a.heads * a.d + c] = FromF<T>(a.scale * sm.acc0[r * sm.lda0 + c]);
  }
  for (int idx = threadIdx.x; idx < t.kc * a.dv; idx += blockDim.x) {
    const int r = idx / a.dv, c = idx - r * a.dv;
    dv[r * a.heads * a.dv + c] = FromF<T>(sm.acc1[r * sm.lda1 + c]);
  }
}

// dq: grid (Nb * query chunks, H, B). Walks row (h, I)'s blocks: dQ += dS K.
template <typename T>
__global__ void __launch_bounds__(kThreads) AttentionBackwardDqKernel(Args a, Tiles t) {
  SPARSE_ATTENTION_DYNAMIC_SHARED(smem);
  BwdSmem<T> sm(smem, t, false);
  const int chunks = int(a.block / t.rm);
  const int64_t I = LastFirst(a, blockIdx.x / chunks), b = blockIdx.z, head = blockIdx.y;
  const int r0 = (blockIdx.x % chunks) * t.rm;
  const int64_t hl = a.t.layout_heads, nb = a.t.num_blocks, bs = a.block;
  const int64_t row = (head % hl) * nb + I, q0 = I * bs + r0;
  LoadQueryChunk(a, sm, t, b, head, q0);
  ZeroFloat<T>(sm.acc0, t.rm, t.dp, sm.lda0);
  const int z0 = a.t.row_offsets[row], z1 = a.t.row_offsets[row + 1];
  for (int z = z0; z < z1; ++z) {
    const int64_t J = a.t.blocks[3 * z + 2];
    const int mi = a.t.mask_index[z];
    for (int c0 = 0; c0 < bs; c0 += t.kc) {
      __syncthreads();
      const bool finite = LoadKeyChunk(a, sm, t, b, head, J * bs + c0);
      const bool* keys = KeyRow(a, b, J * bs);
      const bool visible_only = NeedsVisibleProducts(mi, keys, !finite);
      ProbsAndGrads(a, sm, t, mi, r0, c0, keys);
      if (visible_only) {
        VisibleProducts<T, false>(a, sm, t, mi, r0, c0, keys);
        continue;
      }
      CtaGemm<T, false, false>(t.rm, t.dp, t.kc, sm.ds, sm.ldp, sm.k, sm.ldq, sm.acc0, sm.lda0, true);
    }
  }
  __syncthreads();
  T* dq = static_cast<T*>(a.dq) + DenseOffset(a, b, q0, head, a.d);
  for (int idx = threadIdx.x; idx < t.rm * a.d; idx += blockDim.x) {
    const int r = idx / a.d, c = idx - r * a.d;
    dq[r * a.heads * a.d + c] = FromF<T>(a.scale * sm.acc0[r * sm.lda0 + c]);
  }
}

// ---- three-op path -----------------------------------------------------------
__device__ __forceinline__ int64_t SparseOffset(const Args& a, int64_t b, int64_t g, int64_t z) {
  return ((b * (a.heads / a.t.layout_heads) + g) * a.t.nnz + z) * a.block * a.block;
}

// out[b, g, z] = A_I B_J^T: grid (Z * row chunks * col chunks, G, B).
template <typename T>
__global__ void __launch_bounds__(kThreads) SddKernel(Args a, Tiles t) {
  SPARSE_ATTENTION_DYNAMIC_SHARED(smem);
  ProductSmem<T> sm(smem, t.rm, t.dp, t.kc, t.dp, t.rm, t.kc);
  const int64_t bs = a.block;
  const int rc = int(bs / t.rm), cc = int(bs / t.kc);
  const int64_t z = blockIdx.x / (rc * cc), g = blockIdx.y, b = blockIdx.z;
  const int r0 = int(blockIdx.x / cc % rc) * t.rm, c0 = int(blockIdx.x % cc) * t.kc;
  const int64_t head = g * a.t.layout_heads + a.t.blocks[3 * z];
  const int64_t I = a.t.blocks[3 * z + 1], J = a.t.blocks[3 * z + 2];
  const int64_t stride = a.heads * a.d;
  LoadRows(static_cast<const T*>(a.q) + DenseOffset(a, b, I * bs + r0, head, a.d), stride, t.rm,
           a.d, t.dp, sm.a, sm.lda);
  LoadRows(static_cast<const T*>(a.k) + DenseOffset(a, b, J * bs + c0, head, a.d), stride, t.kc,
           a.d, t.dp, sm.b, sm.ldb);
  __syncthreads();
  CtaGemm<T, false, true>(t.rm, t.kc, t.dp, sm.a, sm.lda, sm.b, sm.ldb, sm.c, sm.ldc, false);
  __syncthreads();
  T* out = static_cast<T*>(a.o_out) + SparseOffset(a, b, g, z) + r0 * bs + c0;
  for (int idx = threadIdx.x; idx < t.rm * t.kc; idx += blockDim.x) {
    const int r = idx / t.kc, c = idx - r * t.kc;
    out[r * bs + c] = FromF<T>(sm.c[r * sm.ldc + c]);
  }
}

// out_I = sum_z P_z X_J (kTransposed: out_J = sum_z P_z^T X_I over the column).
// grid (Nb * chunks, H, B); a.q holds P, a.v holds X.
template <typename T, bool kTransposed>
__global__ void __launch_bounds__(kThreads) DsdKernel(Args a, Tiles t) {
  SPARSE_ATTENTION_DYNAMIC_SHARED(smem);
  // a: the P chunk [rm, kc]; b: the X chunk (kc rows, or rm rows transposed); c: [out rows, dp].
  const int out_rows = kTransposed ? t.kc : t.rm;
  ProductSmem<T> sm(smem, t.rm, t.kc, kTransposed ? t.rm : t.kc, t.dp, out_rows, t.dp);
  const int64_t bs = a.block;
  const int chunks = int(bs / out_rows);
  const int64_t U = blockIdx.x / chunks, b = blockIdx.z, head = blockIdx.y;
  const int u0 = (blockIdx.x % chunks) * out_rows;  // first output row inside block U
  const int64_t hl = a.t.layout_heads, g = head / hl, list = (head % hl) * a.t.num_blocks + U;
  const int64_t stride = a.heads * a.d;
  const T* p = static_cast<const T*>(a.q);
  const T* x = static_cast<const T*>(a.v);
  ZeroFloat<T>(sm.c, out_rows, t.dp, sm.ldc);
  const int32_t* offsets = kTransposed ? a.t.col_offsets : a.t.row_offsets;
  const int e0 = offsets[list], e1 = offsets[list + 1];
  for (int e = e0; e < e1; ++e) {
    const int z = kTransposed ? a.t.col_blocks[e] : e;
    const int64_t other = a.t.blocks[3 * z + (kTransposed ? 1 : 2)];  // I (transposed) or J
    const T* tile = p + SparseOffset(a, b, g, z);
    const int step = kTransposed ? t.rm : t.kc;
    for (int s0 = 0; s0 < bs; s0 += step) {
      __syncthreads();
      if (kTransposed) {  // P rows s0.., columns u0..; X rows I*b + s0..
        LoadRows(tile + s0 * bs + u0, bs, t.rm, t.kc, t.kc, sm.a, sm.lda);
        LoadRows(x + DenseOffset(a, b, other * bs + s0, head, a.d), stride, t.rm, a.d, t.dp, sm.b,
                 sm.ldb);
      } else {  // P rows u0.., columns s0..; X rows J*b + s0..
        LoadRows(tile + u0 * bs + s0, bs, t.rm, t.kc, t.kc, sm.a, sm.lda);
        LoadRows(x + DenseOffset(a, b, other * bs + s0, head, a.d), stride, t.kc, a.d, t.dp, sm.b,
                 sm.ldb);
      }
      __syncthreads();
      if (kTransposed)
        CtaGemm<T, true, false>(t.kc, t.dp, t.rm, sm.a, sm.lda, sm.b, sm.ldb, sm.c, sm.ldc, true);
      else
        CtaGemm<T, false, false>(t.rm, t.dp, t.kc, sm.a, sm.lda, sm.b, sm.ldb, sm.c, sm.ldc, true);
    }
  }
  __syncthreads();
  T* out = static_cast<T*>(a.o_out) + DenseOffset(a, b, U * bs + u0, head, a.d);
  for (int idx = threadIdx.x; idx < out_rows * a.d; idx += blockDim.x) {
    const int r = idx / a.d, c = idx - r * a.d;
    out[r * stride + c] = FromF<T>(sm.c[r * sm.ldc + c]);
  }
}

// Softmax over the query rows of block row (h, I): grid (Hl * Nb, G, B), one
// warp per query row. a.q holds x, a.o_out y.
template <typename T>
__global__ void __launch_bounds__(kThreads) SoftmaxKernel(Args a) {
  const int64_t row = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const int bs = int(a.block), warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* x = static_cast<const T*>(a.q);
  T* y = static_cast<T*>(a.o_out);
  const int z0 = a.t.row_offsets[row], z1 = a.t.row_offsets[row + 1];
  for (int i = warp; i < bs; i += kWarps) {
    float mx = -INFINITY;
    for (int z = z0; z < z1; ++z) {
      const int64_t off = SparseOffset(a, b, g, z) + int64_t(i) * bs;
      const bool* keys = KeyRow(a, b, int64_t(a.t.blocks[3 * z + 2]) * bs);
      const int mi = a.t.mask_index[z];
      for (int c = lane; c < bs; c += 32)
        if (Visible(a.t.masks, mi, bs, i, c, keys)) mx = fmaxf(mx, ToF(x[off + c]) * a.scale);
    }
    mx = WarpMax(mx);
    float sum = 0.f;
    for (int z = z0; z < z1; ++z) {
      const int64_t off = SparseOffset(a, b, g, z) + int64_t(i) * bs;
      const bool* keys = KeyRow(a, b, int64_t(a.t.blocks[3 * z + 2]) * bs);
      const int mi = a.t.mask_index[z];
      for (int c = lane; c < bs; c += 32)
        if (Visible(a.t.masks, mi, bs, i, c, keys)) sum += expf(ToF(x[off + c]) * a.scale - mx);
    }
    sum = WarpSum(sum);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int z = z0; z < z1; ++z) {
      const int64_t off = SparseOffset(a, b, g, z) + int64_t(i) * bs;
      const bool* keys = KeyRow(a, b, int64_t(a.t.blocks[3 * z + 2]) * bs);
      const int mi = a.t.mask_index[z];
      for (int c = lane; c < bs; c += 32) {
        const bool vis = Visible(a.t.masks, mi, bs, i, c, keys);
        y[off + c] = FromF<T>(vis ? expf(ToF(x[off + c]) * a.scale - mx) * inv : 0.f);
      }
    }
  }
}

// dx = scale * y * (dy - rowsum(y * dy)): grid (rows, groups, B). a.q: y,
// a.k: dy, a.o_out: dx; a.heads = groups, layout heads 1.
template <typename T>
__global__ void __launch_bounds__(kThreads) SoftmaxGradKernel(Args a) {
  const int64_t row = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const int bs = int(a.block), warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* y = static_cast<const T*>(a.q);
  const T* dy = static_cast<const T*>(a.k);
  T* dx = static_cast<T*>(a.o_out);
  const int z0 = a.t.row_offsets[row], z1 = a.t.row_offsets[row + 1];
  for (int i = warp; i < bs; i += kWarps) {
    float dot = 0.f;
    for (int z = z0; z < z1; ++z) {
      const int64_t off = SparseOffset(a, b, g, z) + int64_t(i) * bs;
      for (int c = lane; c < bs; c += 32) dot += ToF(y[off + c]) * ToF(dy[off + c]);
    }
    dot = WarpSum(dot);
    for (int z = z0; z < z1; ++z) {
      const int64_t off = SparseOffset(a, b, g, z) + int64_t(i) * bs;
      for (int c = lane; c < bs; c += 32)
        dx[off + c] = FromF<T>(a.scale * ToF(y[off + c]) * (ToF(dy[off + c]) - dot));
    }
  }
}

// ---- host side -----------------------------------------------------------------
int RoundUp16(int64_t x) { return int((x + 15) / 16 * 16); }

size_t MaxSharedMemory() {
  int dev = 0, bytes = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 48 * 1024;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return 48 * 1024;
  return size_t(bytes);
}

// Chunk sizes (rm, kc), largest first; each divides every supported block size.
constexpr int kChunks[][2] = {{64, 64}, {32, 64}, {64, 32}, {32, 32}, {16, 32}, {32, 16}, {16, 16}};

// The first chunking whose shared memory (bytes_of(tiles)) fits the device.
template <typename BytesOf>
std::string ChooseTiles(int64_t block, int64_t d, int64_t dv, const char* what, BytesOf bytes_of,
                        Tiles* tiles, size_t* bytes) {
  const size_t limit = MaxSharedMemory();
  for (const auto& c : kChunks) {
    if (c[0] > block || c[1] > block) continue;
    const Tiles t{c[0], c[1], RoundUp16(d), RoundUp16(dv)};
    const size_t need = bytes_of(t);
    if (need <= limit) {
      *tiles = t;
      *bytes = need;
      return "";
    }
  }
  return std::string(what) + ": head_dim " + std::to_string(d) + " / value dim " +
         std::to_string(dv) + " needs more shared memory than this GPU has per block (" +
         std::to_string(limit) + " bytes); use a smaller head dimension";
}

template <typename... KArgs, typename... Args_>
std::string Launch(const char* what, void (*kernel)(KArgs...), dim3 grid, size_t smem,
                   GpuStream stream, Args_... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return "";
  if (grid.y > 65535 || grid.z > 65535)
    return std::string(what) + ": too many heads or batch entries for one launch (at most 65535)";
  if (smem > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess)
      return std::string(what) + ": cannot reserve " + std::to_string(smem) +
             " bytes of shared memory: " + cudaGetErrorString(e);
  }
#ifdef SPARSE_ATTENTION_CUDA_EMULATION
  emu::Launch(kernel, grid, dim3(kThreads), smem, args...);
#else
  kernel<<<grid, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(args...);
#endif
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return std::string(what) + ": kernel launch failed: " + cudaGetErrorString(e);
  return "";
}

// Common checks of the dense dimensions against the tables.
std::string CheckDims(const Dims& d, const DeviceTables& t, const char* what) {
  if (!SupportedBlock(d.block))
    return std::string(what) + ": block size " + std::to_string(d.block) +
           " is not supported on the GPU (16, 32, 64 or 128)";
  if (d.seq % d.block != 0 || t.num_blocks != d.seq / d.block)
    return std::string(what) + ": sequence length " + std::to_string(d.seq) +
           " does not match the tables' " + std::to_string(t.num_blocks) + " blocks of " +
           std::to_string(d.block);
  if (t.layout_heads < 1 || d.heads % t.layout_heads != 0)
    return std::string(what) + ": layout heads must divide the number of heads";
  if (d.head_dim < 1 || d.head_dim > 1024 || d.value_dim < 0 || d.value_dim > 1024)
    return std::string(what) + ": head dimensions must be in [1, 1024]";
  return "";
}

Args MakeArgs(const Dims& d, const DeviceTables& t, const bool* key_padding, float scale) {
  Args a{};
  a.t = t;
  a.key_padding = key_padding;
  a.scale = scale;
  a.batch = d.batch;
  a.seq = d.seq;
  a.heads = d.heads;
  a.block = d.block;
  a.d = int(d.head_dim);
  a.dv = int(d.value_dim);
  return a;
}

template <typename T>
std::string ForwardImpl(const Dims& d, const DeviceTables& t, const bool* key_padding, float scale,
                        const void* q, const void* k, const void* v, void* out, float* lse,
                        GpuStream stream) {
  Tiles tiles{};
  size_t bytes = 0;
  std::string err = ChooseTiles(d.block, d.head_dim, d.value_dim, "BlocksparseAttention",
                                [](const Tiles& x) { return FwdSmem<T>(nullptr, x).bytes; },
                                &tiles, &bytes);
  if (!err.empty()) return err;
  Args a = MakeArgs(d, t, key_padding, scale);
  a.q = q;
  a.k = k;
  a.v = v;
  a.o_out = out;
  a.lse_out = lse;
  const dim3 grid(unsigned(t.num_blocks * (d.block / tiles.rm)), unsigned(d.heads), unsigned(d.batch));
  return Launch("BlocksparseAttention", AttentionForwardKernel<T>, grid, bytes, stream, a, tiles);
}

template <typename T>
std::string BackwardImpl(const Dims& d, const DeviceTables& t, const bool* key_padding,
                         float scale, const void* q, const void* k, const void* v, const void* out,
                         const float* lse, const void* dout, void* dq, void* dk, void* dv,
                         float* workspace, GpuStream stream) {
  Args a = MakeArgs(d, t, key_padding, scale);
  a.q = q;
  a.k = k;
  a.v = v;
  a.out = out;
  a.dout = dout;
  a.lse = lse;
  a.delta = workspace;
  a.dq = dq;
  a.dk = dk;
  a.dv_out = dv;
  const int64_t rows = d.batch * d.seq * d.heads;
  std::string err = Launch("BlocksparseAttentionGrad (delta)", DeltaKernel<T>,
                           dim3(unsigned((rows + kWarps - 1) / kWarps)), 0, stream, a);
  if (!err.empty()) return err;
  Tiles tiles{};
  size_t bytes = 0;
  err = ChooseTiles(d.block, d.head_dim, d.value_dim, "BlocksparseAttentionGrad",
                    [](const Tiles& x) { return BwdSmem<T>(nullptr, x, true).bytes; }, &tiles,
                    &bytes);
  if (!err.empty()) return err;
  dim3 grid(unsigned(t.num_blocks * (d.block / tiles.kc)), unsigned(d.heads), unsigned(d.batch));
  err = Launch("BlocksparseAttentionGrad (dk, dv)", AttentionBackwardDkDvKernel<T>, grid, bytes,
               stream, a, tiles);
  if (!err.empty()) return err;
  err = ChooseTiles(d.block, d.head_dim, d.value_dim, "BlocksparseAttentionGrad",
                    [](const Tiles& x) { return BwdSmem<T>(nullptr, x, false).bytes; }, &tiles,
                    &bytes);
  if (!err.empty()) return err;
  grid = dim3(unsigned(t.num_blocks * (d.block / tiles.rm)), unsigned(d.heads), unsigned(d.batch));
  return Launch("BlocksparseAttentionGrad (dq)", AttentionBackwardDqKernel<T>, grid, bytes, stream,
                a, tiles);
}

template <typename T>
std::string SddImpl(const Dims& d, const DeviceTables& t, const void* x, const void* y, void* out,
                    GpuStream stream) {
  Tiles tiles{};
  size_t bytes = 0;
  std::string err = ChooseTiles(
      d.block, d.head_dim, d.head_dim, "BlocksparseSdd",
      [](const Tiles& s) { return ProductSmem<T>(nullptr, s.rm, s.dp, s.kc, s.dp, s.rm, s.kc).bytes; },
      &tiles, &bytes);
  if (!err.empty()) return err;
  Args a = MakeArgs(d, t, nullptr, 1.f);
  a.q = x;
  a.k = y;
  a.o_out = out;
  const int64_t per_block = (d.block / tiles.rm) * (d.block / tiles.kc);
  const dim3 grid(unsigned(t.nnz * per_block), unsigned(d.heads / t.layout_heads), unsigned(d.batch));
  return Launch("BlocksparseSdd", SddKernel<T>, grid, bytes, stream, a, tiles);
}

template <typename T, bool kTransposed>
std::string DsdImpl(const Dims& d, const DeviceTables& t, const void* p, const void* x, void* out,
                    GpuStream stream) {
  const char* what = kTransposed ? "BlocksparseDsdT" : "BlocksparseDsd";
  Tiles tiles{};
  size_t bytes = 0;
  std::string err = ChooseTiles(
      d.block, d.head_dim, d.head_dim, what,
      [](const Tiles& s) {
        const int out_rows = kTransposed ? s.kc : s.rm;
        return ProductSmem<T>(nullptr, s.rm, s.kc, kTransposed ? s.rm : s.kc, s.dp, out_rows, s.dp)
            .bytes;
      },
      &tiles, &bytes);
  if (!err.empty()) return err;
  Args a = MakeArgs(d, t, nullptr, 1.f);
  a.q = p;
  a.v = x;
  a.o_out = out;
  const int64_t chunks = d.block / (kTransposed ? tiles.kc : tiles.rm);
  const dim3 grid(unsigned(t.num_blocks * chunks), unsigned(d.heads), unsigned(d.batch));
  return Launch(what, DsdKernel<T, kTransposed>, grid, bytes, stream, a, tiles);
}

template <typename T>
std::string SoftmaxImpl(const Dims& d, const DeviceTables& t, const bool* key_padding, float scale,
                        const void* x, void* y, GpuStream stream) {
  Args a = MakeArgs(d, t, key_padding, scale);
  a.q = x;
  a.o_out = y;
  const dim3 grid(unsigned(t.layout_heads * t.num_blocks), unsigned(d.heads / t.layout_heads),
                  unsigned(d.batch));
  return Launch("BlocksparseSoftmax", SoftmaxKernel<T>, grid, 0, stream, a);
}

template <typename T>
std::string SoftmaxGradImpl(int64_t batch, int64_t groups, int64_t nnz, int64_t block, int64_t rows,
                            const int32_t* row_offsets, float scale, const void* y, const void* dy,
                            void* dx, GpuStream stream) {
  Args a{};
  a.t.row_offsets = row_offsets;
  a.t.nnz = nnz;
  a.t.layout_heads = 1;
  a.t.num_blocks = rows;
  a.heads = groups;
  a.batch = batch;
  a.block = block;
  a.seq = rows * block;
  a.scale = scale;
  a.q = y;
  a.k = dy;
  a.o_out = dx;
  return Launch("BlocksparseSoftmaxGrad", SoftmaxGradKernel<T>,
                dim3(unsigned(rows), unsigned(groups), unsigned(batch)), 0, stream, a);
}

}  // namespace

bool SupportedBlock(int64_t block) {
  return block == 16 || block == 32 || block == 64 || block == 128;
}

std::string CopyToDevice(void* dst, const void* src, int64_t bytes, GpuStream stream) {
  if (bytes <= 0) return "";
  const cudaError_t e = cudaMemcpyAsync(dst, src, size_t(bytes), cudaMemcpyHostToDevice,
                                        static_cast<cudaStream_t>(stream));
  return e == cudaSuccess ? "" : std::string("host to device copy failed: ") + cudaGetErrorString(e);
}

#define SPARSE_ATTENTION_DISPATCH(dtype, FN, ...)                                   \
  switch (dtype) {                                                                  \
    case DType::kFloat:                                                             \
      return FN<float>(__VA_ARGS__);                                                \
    case DType::kHalf:                                                              \
      return FN<__half>(__VA_ARGS__);                                               \
    case DType::kBFloat16:                                                          \
      return FN<__nv_bfloat16>(__VA_ARGS__);                                        \
  }                                                                                 \
  return "unknown dtype"

std::string AttentionForward(DType dtype, const Dims& d, const DeviceTables& t,
                             const bool* key_padding, float scale, const void* q, const void* k,
                             const void* v, void* out, float* lse, GpuStream stream) {
  const std::string err = CheckDims(d, t, "BlocksparseAttention");
  if (!err.empty()) return err;
  if (d.batch == 0) return "";
  SPARSE_ATTENTION_DISPATCH(dtype, ForwardImpl, d, t, key_padding, scale, q, k, v, out, lse, stream);
}

int64_t AttentionBackwardWorkspaceBytes(const Dims& d) {
  return d.batch * d.heads * d.seq * int64_t(sizeof(float));
}

std::string AttentionBackward(DType dtype, const Dims& d, const DeviceTables& t,
                              const bool* key_padding, float scale, const void* q, const void* k,
                              const void* v, const void* out, const float* lse, const void* dout,
                              void* dq, void* dk, void* dv, float* workspace,
                              GpuStream stream) {
  const std::string err = CheckDims(d, t, "BlocksparseAttentionGrad");
  if (!err.empty()) return err;
  if (d.batch == 0) return "";
  SPARSE_ATTENTION_DISPATCH(dtype, BackwardImpl, d, t, key_padding, scale, q, k, v, out, lse, dout,
                            dq, dk, dv, workspace, stream);
}

std::string Sdd(DType dtype, const Dims& d, const DeviceTables& t, const void* a, const void* b,
                void* out, GpuStream stream) {
  const std::string err = CheckDims(d, t, "BlocksparseSdd");
  if (!err.empty()) return err;
  if (d.batch == 0 || t.nnz == 0) return "";
  SPARSE_ATTENTION_DISPATCH(dtype, SddImpl, d, t, a, b, out, stream);
}

std::string Dsd(DType dtype, const Dims& d, const DeviceTables& t, const void* p, const void* x,
                void* out, GpuStream stream) {
  const std::string err = CheckDims(d, t, "BlocksparseDsd");
  if (!err.empty()) return err;
  if (d.batch == 0) return "";
  switch (dtype) {
    case DType::kFloat: return DsdImpl<float, false>(d, t, p, x, out, stream);
    case DType::kHalf: return DsdImpl<__half, false>(d, t, p, x, out, stream);
    case DType::kBFloat16: return DsdImpl<__nv_bfloat16, false>(d, t, p, x, out, stream);
  }
  return "unknown dtype";
}

std::string DsdT(DType dtype, const Dims& d, const DeviceTables& t, const void* p, const void* x,
                 void* out, GpuStream stream) {
  const std::string err = CheckDims(d, t, "BlocksparseDsdT");
  if (!err.empty()) return err;
  if (d.batch == 0) return "";
  switch (dtype) {
    case DType::kFloat: return DsdImpl<float, true>(d, t, p, x, out, stream);
    case DType::kHalf: return DsdImpl<__half, true>(d, t, p, x, out, stream);
    case DType::kBFloat16: return DsdImpl<__nv_bfloat16, true>(d, t, p, x, out, stream);
  }
  return "unknown dtype";
}

std::string Softmax(DType dtype, const Dims& d, const DeviceTables& t, const bool* key_padding,
                    float scale, const void* x, void* y, GpuStream stream) {
  if (!SupportedBlock(d.block))
    return "BlocksparseSoftmax: block size " + std::to_string(d.block) +
           " is not supported on the GPU (16, 32, 64 or 128)";
  if (d.batch == 0 || t.nnz == 0) return "";
  SPARSE_ATTENTION_DISPATCH(dtype, SoftmaxImpl, d, t, key_padding, scale, x, y, stream);
}

std::string SoftmaxGrad(DType dtype, int64_t batch, int64_t groups, int64_t nnz, int64_t block,
                        int64_t rows, const int32_t* row_offsets, float scale, const void* y,
                        const void* dy, void* dx, GpuStream stream) {
  if (!SupportedBlock(block))
    return "BlocksparseSoftmaxGrad: block size " + std::to_string(block) +
           " is not supported on the GPU (16, 32, 64 or 128)";
  if (batch == 0 || groups == 0 || nnz == 0) return "";
  SPARSE_ATTENTION_DISPATCH(dtype, SoftmaxGradImpl, batch, groups, nnz, block, rows, row_offsets,
                            scale, y, dy, dx, stream);
}

#undef SPARSE_ATTENTION_DISPATCH

}  // namespace gpu
}  // namespace sparse_attention
