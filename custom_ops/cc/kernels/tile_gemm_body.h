// Body of the tile product, included once per instruction set by tile_gemm.cc
// inside a `#pragma GCC target` region and a namespace of its own.
// (No include guard: included several times on purpose.)

// 16 floats: one AVX-512 register, two AVX2 registers, four SSE registers.
typedef float v16 __attribute__((vector_size(64), aligned(4)));

inline __attribute__((always_inline)) v16 Load(const float* p) {
  return *reinterpret_cast<const v16*>(p);
}
inline __attribute__((always_inline)) void Store(float* p, v16 v) {
  *reinterpret_cast<v16*>(p) = v;
}

// R rows x (16 * NV) columns of C kept in registers over the whole k loop.
template <int R, int NV>
inline __attribute__((always_inline)) void MicroTile(
    int64_t k, const float* __restrict a, int64_t ars, int64_t aks,
    const float* __restrict b, int64_t ldb, float* __restrict c, int64_t ldc) {
  v16 acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = Load(c + r * ldc + 16 * v);
  for (int64_t kk = 0; kk < k; ++kk) {
    v16 bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = Load(b + kk * ldb + 16 * v);
    const float* ak = a + kk * aks;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float s = ak[r * ars];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += s * bv[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) Store(c + r * ldc + 16 * v, acc[r][v]);
}

// All rows of one column panel of width 16 * NV.
template <int NV>
inline __attribute__((always_inline)) void Panel(
    int64_t m, int64_t k, const float* a, int64_t ars, int64_t aks,
    const float* b, int64_t ldb, float* c, int64_t ldc) {
  constexpr int R = 16 / NV;  // 16 accumulator registers on AVX-512
  int64_t r = 0;
  for (; r + R <= m; r += R)
    MicroTile<R, NV>(k, a + r * ars, ars, aks, b, ldb, c + r * ldc, ldc);
  for (; r < m; ++r) MicroTile<1, NV>(k, a + r * ars, ars, aks, b, ldb, c + r * ldc, ldc);
}


void Gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t ars, int64_t aks,
          const float* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t col = 0;
  for (; col + 64 <= n; col += 64) Panel<4>(m, k, a, ars, aks, b + col, ldb, c + col, ldc);
  if (col + 32 <= n) {
    Panel<2>(m, k, a, ars, aks, b + col, ldb, c + col, ldc);
    col += 32;
  }
  if (col + 16 <= n) {
    Panel<1>(m, k, a, ars, aks, b + col, ldb, c + col, ldc);
    col += 16;
  }
  if (col < n) {  // fewer than 16 columns left: plain loops
    sparse_attention::TileGemmAccumulateReference(m, n - col, k, a, ars, aks, b + col, ldb, c + col, ldc);
  }
}
