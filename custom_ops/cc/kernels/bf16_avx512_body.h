// bfloat16 helpers on AVX-512 and AVX512_BF16 (vdpbf16ps, vcvtne2ps2bf16),
// shared by the bf16 engines (engine_avx512_bf16.cc, engine_amx.cc): a GEMM
// on bf16 pairs with float32 accumulation, the pair layouts' packing, and
// conversions. Included inside an AVX512_BF16 `#pragma GCC target` region,
// after simd_body.h and fused_attention_body.h (fused::Transpose16). No
// include guard.
//
// Pair layouts (uint16 units; "pairs of X along k"): element (k, c) of a
// k x n matrix lives at base + (k / 2) * ld + 2 * c + k % 2.

inline int32_t Word(const uint16_t* p) {  // one bf16 pair as a 32-bit word
  int32_t w;
  std::memcpy(&w, p, sizeof(w));
  return w;
}

// R rows x NV vectors of C; the last vector's columns are `last` (a lane mask).
// A pair (r, p) at a + r * ars + p * aps; B pair row p at b + p * ldb.
// C += A B, or with kOverwrite C = s * A B (C is then never read).
template <int R, int NV, bool kOverwrite>
inline __attribute__((always_inline)) void MicroTile(int64_t k2, const uint16_t* a, int64_t ars,
                                                     int64_t aps, const uint16_t* b, int64_t ldb,
                                                     float* c, int64_t ldc, __mmask16 last,
                                                     float s) {
  __m512 acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      acc[r][v] = kOverwrite ? _mm512_setzero_ps()
                             : _mm512_maskz_loadu_ps(v == NV - 1 ? last : 0xffff,
                                                     c + r * ldc + 16 * v);
  for (int64_t p = 0; p < k2; ++p) {
    __m512bh bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      bv[v] = (__m512bh)_mm512_maskz_loadu_epi32(v == NV - 1 ? last : 0xffff,
                                                 b + p * ldb + 32 * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(Word(a + r * ars + p * aps));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      _mm512_mask_storeu_ps(c + r * ldc + 16 * v, v == NV - 1 ? last : 0xffff,
                            kOverwrite ? _mm512_mul_ps(acc[r][v], _mm512_set1_ps(s)) : acc[r][v]);
}

template <int NV, bool kOverwrite>
inline __attribute__((always_inline)) void Panel(int64_t m, int64_t k2, const uint16_t* a,
                                                 int64_t ars, int64_t aps, const uint16_t* b,
                                                 int64_t ldb, float* c, int64_t ldc,
                                                 __mmask16 last, float s) {
  constexpr int R = 16 / NV;
  int64_t r = 0;
  for (; r + R <= m; r += R)
    MicroTile<R, NV, kOverwrite>(k2, a + r * ars, ars, aps, b, ldb, c + r * ldc, ldc, last, s);
  for (; r < m; ++r)
    MicroTile<1, NV, kOverwrite>(k2, a + r * ars, ars, aps, b, ldb, c + r * ldc, ldc, last, s);
}

template <bool kOverwrite>
void GemmBf16Impl(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t ars, int64_t aps,
                  const uint16_t* b, int64_t ldb, float* c, int64_t ldc, float s) {
  const int64_t k2 = k / 2;
  int64_t col = 0;
  for (; col + 64 <= n; col += 64)
    Panel<4, kOverwrite>(m, k2, a, ars, aps, b + 2 * col, ldb, c + col, ldc, 0xffff, s);
  if (col + 32 <= n) {
    Panel<2, kOverwrite>(m, k2, a, ars, aps, b + 2 * col, ldb, c + col, ldc, 0xffff, s);
    col += 32;
  }
  for (; col < n; col += 16) {
    const int64_t w = n - col < 16 ? n - col : 16;
    Panel<1, kOverwrite>(m, k2, a, ars, aps, b + 2 * col, ldb, c + col, ldc,
                         static_cast<__mmask16>((1u << w) - 1), s);
  }
}

// C[m x n] += A[m x k] B[k x n], k even; A and B as bf16 pairs along k.
void GemmBf16(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t ars, int64_t aps,
              const uint16_t* b, int64_t ldb, float* c, int64_t ldc) {
  GemmBf16Impl<false>(m, n, k, a, ars, aps, b, ldb, c, ldc, 1.f);
}

// C = s * A B (C is written, never read): the scores' scale is applied in
// float32 to the product, not to bf16 q.
void GemmBf16Scaled(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t ars,
                    int64_t aps, const uint16_t* b, int64_t ldb, float* c, int64_t ldc,
                    float s) {
  GemmBf16Impl<true>(m, n, k, a, ars, aps, b, ldb, c, ldc, s);
}

// Rows 2p and 2p+1 of a float [rows, b] tile -> bf16 pairs along the rows:
// out[p][c][t] = tile[2p + t][c] (round to nearest even).
void PairRows(const float* tile, int64_t rows, int64_t bs, uint16_t* out) {
  static const __m512i kInterleave = _mm512_set_epi16(
      31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
      23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t p = 0; p < rows / 2; ++p)
    for (int64_t c = 0; c < bs; c += 16) {
      const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(tile + (2 * p + 1) * bs + c),
                                                _mm512_loadu_ps(tile + 2 * p * bs + c));
      _mm512_storeu_si512(out + p * 2 * bs + 2 * c,
                          _mm512_permutexvar_epi16(kInterleave, (__m512i)both));
    }
}

// A float [b, b] tile -> bf16, same layout (pairs along its rows' columns).
void ToBf16(const float* tile, int64_t n, uint16_t* out) {
  for (int64_t e = 0; e < n; e += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + e),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(tile + e)));
}

// b rows of width w (even, row stride ld) -> pairs along w:
// out[p][i] = rows[i][2p..2p+1]: a transpose of 32-bit words, 16 x 16 words
// at a time in registers (fused::Transpose16 moves bits, whatever they mean).
void PairColumns(const uint16_t* rows, int64_t ld, int64_t bs, int64_t w, uint16_t* out) {
  const int64_t words = w / 2;
  int64_t p0 = 0;
  for (; p0 + 16 <= words; p0 += 16)
    for (int64_t i0 = 0; i0 < bs; i0 += 16) {
      __m512 r[16];
      for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_ps(rows + (i0 + k) * ld + 2 * p0);
      fused::Transpose16(r);
      for (int c = 0; c < 16; ++c) _mm512_storeu_ps(out + ((p0 + c) * bs + i0) * 2, r[c]);
    }
  for (int64_t i = 0; i < bs; ++i)
    for (int64_t p = p0; p < words; ++p)
      std::memcpy(out + (p * bs + i) * 2, rows + i * ld + 2 * p, 4);
}

// b rows of width w (row stride ld) -> pairs along the rows:
// out[p][c][t] = rows[2p + t][c]. 32 columns at a time: two rows' words
// interleaved by one permute each half.
void PairRowsBf16(const uint16_t* rows, int64_t ld, int64_t bs, int64_t w, uint16_t* out) {
  static const __m512i kLow = _mm512_set_epi16(
      47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
      39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  static const __m512i kHigh = _mm512_set_epi16(
      63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
      55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  for (int64_t p = 0; p < bs / 2; ++p) {
    const uint16_t *r0 = rows + 2 * p * ld, *r1 = r0 + ld;
    uint16_t* o = out + p * w * 2;
    int64_t c = 0;
    for (; c + 32 <= w; c += 32) {
      const __m512i a = _mm512_loadu_si512(r0 + c), b = _mm512_loadu_si512(r1 + c);
      _mm512_storeu_si512(o + 2 * c, _mm512_permutex2var_epi16(a, kLow, b));
      _mm512_storeu_si512(o + 2 * c + 32, _mm512_permutex2var_epi16(a, kHigh, b));
    }
    for (; c < w; ++c) {
      o[2 * c] = r0[c];
      o[2 * c + 1] = r1[c];
    }
  }
}

// sum_d x[d] * y[d] over bf16 rows, in float32.
inline float DotBf16(const uint16_t* x, const uint16_t* y, int64_t n) {
  auto widen = [](__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); };
  __m512 acc = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= n; d += 16)
    acc = _mm512_fmadd_ps(widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + d))),
                          widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + d))), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; d < n; ++d) {
    const uint32_t xb = uint32_t{x[d]} << 16, yb = uint32_t{y[d]} << 16;
    float xf, yf;
    std::memcpy(&xf, &xb, 4);
    std::memcpy(&yf, &yb, 4);
    s += xf * yf;
  }
  return s;
}

void FloatToBf16Vcvt(const float* x, int64_t n, uint16_t* y) {
  int64_t e = 0;
  for (; e + 16 <= n; e += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + e),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + e)));
  if (e < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - e)) - 1);
    _mm256_mask_storeu_epi16(y + e, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + e)));
  }
}

