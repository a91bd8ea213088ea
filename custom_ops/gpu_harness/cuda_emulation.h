// A tiny CPU emulation of the CUDA features custom_ops/cuda/blocksparse_gpu.cu
// uses, so that its kernels can run (slowly) on machines without a GPU:
// emulate_check.cc includes this header (which defines
// SPARSE_ATTENTION_CUDA_EMULATION), then the .cu file, and compares every
// kernel with the float64 reference. The .cu file never includes this header.
//
// Thread blocks run one at a time on blockDim.x std::threads: __syncthreads is a
// barrier of the block (__syncthreads_or one that also ORs a vote),
// __shfl_xor_sync an exchange through a per-warp slot array between two
// barriers of the warp. WMMA fragments follow the
// documented semantics (row/col-major loads with a leading dimension, one
// 16x16x16 product); lane 0 of a warp does a fragment's whole work (the
// other lanes' fragments are unused), which keeps loads, products and stores
// of one warp ordered. half / bfloat16 round to nearest even like the GPU
// conversions. What this cannot check: real fragment register layouts, bank
// conflicts, races the GPU would expose but a barrier-per-step CPU run hides
// (the emulated barriers are stricter than the hardware's), performance.
#ifndef SPARSE_ATTENTION_TF_GPU_HARNESS_CUDA_EMULATION_H_
#define SPARSE_ATTENTION_TF_GPU_HARNESS_CUDA_EMULATION_H_

#define SPARSE_ATTENTION_CUDA_EMULATION 1

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__
#define __launch_bounds__(x)
#define SPARSE_ATTENTION_DYNAMIC_SHARED(name) unsigned char* name = ::emu::DynamicShared()

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

// ---- half / bfloat16 -------------------------------------------------------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return float(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = _Float16(x);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  __nv_bfloat16 b;
  if (std::isnan(x)) {
    b.bits = 0x7fc0;
  } else {
    u += 0x7fff + ((u >> 16) & 1);  // round to nearest even
    b.bits = uint16_t(u >> 16);
  }
  return b;
}

// ---- runtime API -------------------------------------------------------------
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1 };
inline const char* cudaGetErrorString(cudaError_t) { return "emulation error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = 163 * 1024;  // an A100 (sm_80): the smaller of the two targets
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind,
                                   cudaStream_t) {
  std::memcpy(dst, src, n);
  return cudaSuccess;
}

namespace emu {

struct Block {
  std::vector<unsigned char> smem;
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<float> slots;
  std::vector<int> votes[2];  // __syncthreads_or, alternate calls
  Block(unsigned threads, size_t bytes)
      : smem(bytes + 128), all(threads), slots(threads), votes{std::vector<int>(threads),
                                                              std::vector<int>(threads)} {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w)
      warp_bar.push_back(std::make_unique<std::barrier<>>(32));
  }
};
inline thread_local Block* current = nullptr;
inline thread_local unsigned vote_round = 0;  // calls of __syncthreads_or by this thread

inline unsigned char* DynamicShared() {
  const uintptr_t p = reinterpret_cast<uintptr_t>(current->smem.data());
  return reinterpret_cast<unsigned char*>((p + 127) & ~uintptr_t(127));
}

// Runs kernel over the grid: blockDim.x threads (created once) run the
// blocks one after the other, meeting at a barrier between blocks.
template <typename... KArgs, typename... Args>
void Launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args... args) {
  Block state(block.x, smem);
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < block.x; ++t)
    threads.emplace_back([&, t] {
      threadIdx = dim3(t);
      blockDim = block;
      gridDim = grid;
      current = &state;
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx = dim3(x, y, z);
            kernel(args...);
            state.all.arrive_and_wait();  // the block is done before the next one starts
          }
    });
  for (auto& th : threads) th.join();
}

}  // namespace emu

inline void __syncthreads() { emu::current->all.arrive_and_wait(); }

// A barrier that returns non-zero to every thread if any thread's pred is.
// One barrier: alternate calls vote in alternate arrays, and no thread can
// vote again in this call's array before every thread has passed the next
// call's barrier, i.e. has read this call's votes.
inline int __syncthreads_or(int pred) {
  emu::Block& b = *emu::current;
  std::vector<int>& votes = b.votes[emu::vote_round++ & 1];
  votes[threadIdx.x] = pred != 0;
  b.all.arrive_and_wait();
  int any = 0;
  for (unsigned t = 0; t < blockDim.x; ++t) any |= votes[t];
  return any;
}

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  emu::Block& b = *emu::current;
  const unsigned t = threadIdx.x, base = t & ~31u;
  b.slots[t] = v;
  b.warp_bar[t / 32]->arrive_and_wait();
  const float r = b.slots[base + ((t - base) ^ unsigned(lane_mask))];
  b.warp_bar[t / 32]->arrive_and_wait();
  return r;
}

// ---- WMMA ----------------------------------------------------------------------
namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

inline float ToFloat(float x) { return x; }
inline float ToFloat(__half x) { return __half2float(x); }
inline float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
inline bool Lane0() { return threadIdx.x % 32 == 0; }

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float x[16][16];
};

// a(i, k) / b(k, n) as 16x16 matrices: row-major ptr[r * ldm + c], col-major ptr[c * ldm + r].
template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  if (!Lane0()) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.x[r][c] = ToFloat(std::is_same<Layout, row_major>::value ? p[r * ldm + c] : p[c * ldm + r]);
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ldm, layout_t layout) {
  if (!Lane0()) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r][c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  if (!Lane0()) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r][c];
}
inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
  for (auto& row : f.x)
    for (float& e : row) e = v;
}
template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  if (!Lane0()) return;
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i][j];
      for (int k = 0; k < 16; ++k) s += a.x[i][k] * b.x[k][j];
      out[i][j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda

#endif  // SPARSE_ATTENTION_TF_GPU_HARNESS_CUDA_EMULATION_H_
