// The AMX-BF16 engine of the fused attention (amx_engine_body.h): every
// block product of the forward and the backward on `tdpbf16ps` tiles,
// operands packed once per call (k, v) or per block row (q, dO), float32
// accumulation and the softmax of fused_attention_body.h. This translation
// unit alone is compiled with -mamx-tile -mamx-bf16 (Makefile,
// custom_ops/build_defs.bzl); attention_engines.cc runs it only where the CPU
// has AMX and the kernel grants the tile state.
//
// Also built here: the same engine with each tile instruction emulated in
// plain C++ ("amx_emulated", selected only by $SPARSE_ATTENTION_TF_ISA), so
// that the packing and tiling are checked against float64 on any CPU.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cmath>
#include <cstring>

#include "custom_ops/cc/kernels/attention_engines.h"
#include "custom_ops/cc/kernels/fused_attention.h"

namespace sparse_attention {
namespace {

// ---------------------------------------------------------------------------
// On the tiles.
namespace amx {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,prefer-vector-width=512")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wunused-function"
#define SPARSE_ATTENTION_BODY_AVX512 1
#include "custom_ops/cc/kernels/simd_body.h"
#include "custom_ops/cc/kernels/fused_attention_body.h"
#include "custom_ops/cc/kernels/bf16_avx512_body.h"
#undef SPARSE_ATTENTION_BODY_AVX512

// dst[i * ld + j] = bf16(src[j * bs + i]) for keys j < rows (a multiple of
// 16) and queries i < bs: a float S^T tile -> bf16 at [query][key], 16 x 16
// at a time through registers.
void TransposeToBf16(const float* src, int64_t rows, int64_t bs, uint16_t* dst, int64_t ld) {
  for (int64_t j0 = 0; j0 < rows; j0 += 16)
    for (int64_t i0 = 0; i0 < bs; i0 += 16) {
      __m512 r[16];
      for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_ps(src + (j0 + k) * bs + i0);
      fused::Transpose16(r);
      for (int c = 0; c < 16; ++c)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (i0 + c) * ld + j0),
                            (__m256i)_mm512_cvtneps_pbh(r[c]));
    }
}

#define TILE_LOAD(t, p, stride) _tile_loadd(t, p, stride)
#define TILE_STORE(t, p, stride) _tile_stored(t, p, stride)
#define TILE_ZERO(t) _tile_zero(t)
#define TILE_DP(c, a, b) _tile_dpbf16ps(c, a, b)
#include "custom_ops/cc/kernels/amx_engine_body.h"
#undef TILE_LOAD
#undef TILE_STORE
#undef TILE_ZERO
#undef TILE_DP

// The tile configuration for the length of one call of a worker, released
// after it: no tile state is left to other code on the thread.
struct TileScope {
  TileScope() {
    static const TileConfig config;
    _tile_loadconfig(&config);
  }
  ~TileScope() { _tile_release(); }
};

void Forward(const AttentionProblem& a, const AttentionForwardArgs<uint16_t>& x, void* scratch,
             int64_t begin, int64_t end) {
  TileScope tiles;
  fused::Forward<AmxEngine>(a, x, scratch, begin, end);
}

void Backward(const AttentionProblem& a, const AttentionBackwardArgs<uint16_t>& x,
              void* scratch, int64_t begin, int64_t end) {
  TileScope tiles;
  fused::Backward<AmxEngine>(a, x, scratch, begin, end);
}

#pragma GCC diagnostic pop
#pragma GCC pop_options
}  // namespace amx

// ---------------------------------------------------------------------------
// Emulated: the tile instructions as their documented semantics, in plain C++
// on this thread's 8 tiles of 1 KiB; the helpers as scalar loops.
namespace amx_emulated {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "custom_ops/cc/kernels/simd_body.h"
#include "custom_ops/cc/kernels/fused_attention_body.h"

struct EmulatedTiles {
  uint8_t rows[8];
  uint16_t colsb[8];
  alignas(64) uint8_t data[8][1024];
};
thread_local EmulatedTiles tiles;

inline float Bf16ToFloat(uint16_t h) { return fused::ToFloat(h); }

// Round to nearest even, as vcvtneps2bf16; NaN stays a (quiet) NaN.
inline uint16_t FloatToBf16Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

void TileLoad(int t, const void* p, int64_t stride) {
  for (int r = 0; r < tiles.rows[t]; ++r)
    std::memcpy(tiles.data[t] + r * 64, static_cast<const uint8_t*>(p) + r * stride,
                tiles.colsb[t]);
}
void TileStore(int t, void* p, int64_t stride) {
  for (int r = 0; r < tiles.rows[t]; ++r)
    std::memcpy(static_cast<uint8_t*>(p) + r * stride, tiles.data[t] + r * 64, tiles.colsb[t]);
}
void TileZero(int t) { std::memset(tiles.data[t], 0, sizeof(tiles.data[t])); }
// C[m][n] += sum_k A[m][2k] B[k][2n] + A[m][2k+1] B[k][2n+1] in float32.
void TileDp(int c, int a, int b) {
  const int M = tiles.rows[c], N = tiles.colsb[c] / 4, K = tiles.colsb[a] / 4;
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float acc;
      std::memcpy(&acc, tiles.data[c] + m * 64 + 4 * n, 4);
      for (int k = 0; k < K; ++k) {
        uint16_t a2[2], b2[2];
        std::memcpy(a2, tiles.data[a] + m * 64 + 4 * k, 4);
        std::memcpy(b2, tiles.data[b] + k * 64 + 4 * n, 4);
        acc += Bf16ToFloat(a2[0]) * Bf16ToFloat(b2[0]);
        acc += Bf16ToFloat(a2[1]) * Bf16ToFloat(b2[1]);
      }
      std::memcpy(tiles.data[c] + m * 64 + 4 * n, &acc, 4);
    }
}

void PairColumns(const uint16_t* rows, int64_t ld, int64_t bs, int64_t w, uint16_t* out) {
  for (int64_t i = 0; i < bs; ++i)
    for (int64_t d = 0; d < w; ++d) out[((d / 2) * bs + i) * 2 + d % 2] = rows[i * ld + d];
}
void PairRowsBf16(const uint16_t* rows, int64_t ld, int64_t bs, int64_t w, uint16_t* out) {
  for (int64_t i = 0; i < bs; ++i)
    for (int64_t c = 0; c < w; ++c) out[(i / 2) * w * 2 + 2 * c + i % 2] = rows[i * ld + c];
}
void ToBf16(const float* tile, int64_t n, uint16_t* out) {
  for (int64_t e = 0; e < n; ++e) out[e] = FloatToBf16Bits(tile[e]);
}
void TransposeToBf16(const float* src, int64_t rows, int64_t bs, uint16_t* dst, int64_t ld) {
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t i = 0; i < bs; ++i) dst[i * ld + j] = FloatToBf16Bits(src[j * bs + i]);
}
float DotBf16(const uint16_t* x, const uint16_t* y, int64_t n) {
  float s = 0.f;
  for (int64_t d = 0; d < n; ++d) s += Bf16ToFloat(x[d]) * Bf16ToFloat(y[d]);
  return s;
}

#define TILE_LOAD(t, p, stride) TileLoad(t, p, stride)
#define TILE_STORE(t, p, stride) TileStore(t, p, stride)
#define TILE_ZERO(t) TileZero(t)
#define TILE_DP(c, a, b) TileDp(c, a, b)
#include "custom_ops/cc/kernels/amx_engine_body.h"
#undef TILE_LOAD
#undef TILE_STORE
#undef TILE_ZERO
#undef TILE_DP

void LoadConfig() {
  const TileConfig config;
  for (int t = 0; t < 8; ++t) tiles.rows[t] = config.rows[t], tiles.colsb[t] = config.colsb[t];
}

void Forward(const AttentionProblem& a, const AttentionForwardArgs<uint16_t>& x, void* scratch,
             int64_t begin, int64_t end) {
  LoadConfig();
  fused::Forward<AmxEngine>(a, x, scratch, begin, end);
}

void Backward(const AttentionProblem& a, const AttentionBackwardArgs<uint16_t>& x,
              void* scratch, int64_t begin, int64_t end) {
  LoadConfig();
  fused::Backward<AmxEngine>(a, x, scratch, begin, end);
}
#pragma GCC diagnostic pop
}  // namespace amx_emulated

}  // namespace

bool RequestAmxTileState() {
  // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): Linux 5.16+ gives a
  // process the AMX tile state only on request.
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool granted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
}

#define SPARSE_ATTENTION_AMX_ENGINE(var, name, ns)                                                \
  const AttentionEngine<uint16_t> var{                                                            \
      name, ns::AmxEngine::Takes,                                                                 \
      [](const AttentionProblem& a) {                                                             \
        return ScratchBytes<ns::fused::ForwardBuffers<ns::AmxEngine>>(a);                         \
      },                                                                                          \
      ns::Forward,                                                                                \
      [](const AttentionProblem& a) {                                                             \
        return ScratchBytes<ns::fused::BackwardBuffers<ns::AmxEngine>>(a);                        \
      },                                                                                          \
      ns::Backward};
SPARSE_ATTENTION_AMX_ENGINE(kBf16Amx, "amx", amx)
SPARSE_ATTENTION_AMX_ENGINE(kBf16AmxEmulated, "amx_emulated", amx_emulated)
#undef SPARSE_ATTENTION_AMX_ENGINE

}  // namespace sparse_attention
