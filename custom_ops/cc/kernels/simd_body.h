// Body of the SIMD primitives (see simd.h), included once per instruction set
// by simd.cc inside a `#pragma GCC target` region and a namespace of its own.
// No include guard: included several times on purpose.
//
// Written with GCC vector extensions (16 floats per vector) rather than
// intrinsics, so one text serves every target.

// 16 floats: one AVX-512 register, two AVX2 registers, four SSE registers.
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t v16i __attribute__((vector_size(64), aligned(4)));

inline __attribute__((always_inline)) v16 Load(const float* p) {
  return *reinterpret_cast<const v16*>(p);
}
inline __attribute__((always_inline)) void Store(float* p, v16 v) {
  *reinterpret_cast<v16*>(p) = v;
}

// The GEMM micro-kernel works on the target's native vector (vn: 16, 8 or 4
// floats), not on v16: GCC lowers v16 arithmetic on AVX2 and SSE through the
// stack (a scalar times a v16 became 16 scalar stores and vector loads that
// cannot forward from them), which made the GEMMs ~30x slower there.
#if defined(SPARSE_ATTENTION_BODY_AVX512)
typedef float vn __attribute__((vector_size(64), aligned(4)));
constexpr int kRegisters = 32;
#elif defined(SPARSE_ATTENTION_BODY_AVX2)
typedef float vn __attribute__((vector_size(32), aligned(4)));
constexpr int kRegisters = 16;
#else
typedef float vn __attribute__((vector_size(16), aligned(4)));
constexpr int kRegisters = 16;
#endif
constexpr int kParts = 64 / sizeof(vn);  // native vectors per 16 floats

// Rows of a register tile 16 * NV floats wide: its accumulators and one row
// of B must fit the registers (AVX-512: 16 accumulators, as before).
template <int NV>
constexpr int TileRows() {
  return kParts == 1 ? 16 / NV
                     : (kRegisters - NV * kParts) / (NV * kParts) > 0
                           ? (kRegisters - NV * kParts) / (NV * kParts) : 1;
}

// R rows x (16 * NV) columns of C kept in registers over the whole k loop;
// C += A B, or C = A B when !kAccumulate (C is then never read).
template <int R, int NV, bool kAccumulate = true>
inline __attribute__((always_inline)) void MicroTile(
    int64_t k, const float* __restrict a, int64_t ars, int64_t aks,
    const float* __restrict b, int64_t ldb, float* __restrict c, int64_t ldc) {
  constexpr int P = NV * kParts;              // native vectors per row of the tile
  constexpr int W = 16 / kParts;              // floats per native vector
  vn acc[R][P];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < P; ++v)
      acc[r][v] = kAccumulate ? *reinterpret_cast<const vn*>(c + r * ldc + W * v) : (vn){};
  for (int64_t kk = 0; kk < k; ++kk) {
    vn bv[P];
#pragma GCC unroll 16
    for (int v = 0; v < P; ++v) bv[v] = *reinterpret_cast<const vn*>(b + kk * ldb + W * v);
    const float* ak = a + kk * aks;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const vn s = (vn){} + ak[r * ars];      // one broadcast
#pragma GCC unroll 16
      for (int v = 0; v < P; ++v) acc[r][v] += s * bv[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < P; ++v) *reinterpret_cast<vn*>(c + r * ldc + W * v) = acc[r][v];
}

// All rows of one column panel of width 16 * NV.
template <int NV, bool kAccumulate>
inline __attribute__((always_inline)) void Panel(
    int64_t m, int64_t k, const float* a, int64_t ars, int64_t aks,
    const float* b, int64_t ldb, float* c, int64_t ldc) {
  constexpr int R = TileRows<NV>();
  int64_t r = 0;
  for (; r + R <= m; r += R)
    MicroTile<R, NV, kAccumulate>(k, a + r * ars, ars, aks, b, ldb, c + r * ldc, ldc);
  for (; r < m; ++r)
    MicroTile<1, NV, kAccumulate>(k, a + r * ars, ars, aks, b, ldb, c + r * ldc, ldc);
}

template <bool kAccumulate>
void GemmImpl(int64_t m, int64_t n, int64_t k, const float* a, int64_t ars, int64_t aks,
              const float* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t col = 0;
  for (; col + 64 <= n; col += 64)
    Panel<4, kAccumulate>(m, k, a, ars, aks, b + col, ldb, c + col, ldc);
  if (col + 32 <= n) {
    Panel<2, kAccumulate>(m, k, a, ars, aks, b + col, ldb, c + col, ldc);
    col += 32;
  }
  if (col + 16 <= n) {
    Panel<1, kAccumulate>(m, k, a, ars, aks, b + col, ldb, c + col, ldc);
    col += 16;
  }
  if (col < n) {  // fewer than 16 columns left: plain loops
    if (!kAccumulate)
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = col; j < n; ++j) c[r * ldc + j] = 0.f;
    sparse_attention::GemmReference(m, n - col, k, a, ars, aks, b + col, ldb, c + col, ldc);
  }
}

// C[m x n] += A[m x k] B[k x n] (the contract of SimdKernels::gemm).
void Gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t ars, int64_t aks,
          const float* b, int64_t ldb, float* c, int64_t ldc) {
  GemmImpl<true>(m, n, k, a, ars, aks, b, ldb, c, ldc);
}

// C = A B: C is written, never read.
void GemmOverwrite(int64_t m, int64_t n, int64_t k, const float* a, int64_t ars, int64_t aks,
                   const float* b, int64_t ldb, float* c, int64_t ldc) {
  GemmImpl<false>(m, n, k, a, ars, aks, b, ldb, c, ldc);
}

// ---------------------------------------------------------------------------
// Row operations of the softmax.

constexpr float kNegInf = -__builtin_inff();

// exp(x) for x <= 0 (Cephes-style: x = n ln2 + r, polynomial in r, times 2^n);
// relative error ~1e-7; x below -87.3 (and -inf) gives 0, NaN stays NaN.
#if defined(SPARSE_ATTENTION_BODY_AVX512)
// AVX-512 (the includer defines SPARSE_ATTENTION_BODY_AVX512 inside its
// target region; GCC's __AVX512F__ does not follow `#pragma GCC target`): rounding and the 2^n scaling are single instructions (vrndscaleps,
// vscalefps), and the zeroing below -87.3 a mask: 14 operations instead of 21.
inline __attribute__((always_inline)) v16 ExpNonPositive(v16 x) {
  const __m512 xv = reinterpret_cast<__m512>(x);
  const __mmask16 live = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-87.3f), _CMP_NLT_UQ);
  const __m512 t = _mm512_mul_ps(xv, _mm512_set1_ps(1.44269504088896341f));
  // (The mask form: GCC 12 warns about the plain form's undefined source.)
  const __m512 n = _mm512_mask_roundscale_ps(t, 0xffff, t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xv);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return reinterpret_cast<v16>(_mm512_maskz_scalef_ps(live, p, n));
}
#else
inline __attribute__((always_inline)) v16 ExpNonPositive(v16 x) {
  const v16 lo = x < -87.3f ? (v16){} + -87.3f : x;                  // avoid 2^n underflow
  const v16 t = lo * 1.44269504088896341f;
  const v16 n = (t + 12582912.0f) - 12582912.0f;                     // round to nearest
  v16 r = lo - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16 p = (v16){} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;  // 2^n
  v16 scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  const v16 e = p * scale;
  return x < -87.3f ? (v16){} : e;
}
#endif

// log(x) for finite x > 0 (Cephes-style: x = m 2^e, m in [sqrt(1/2),
// sqrt(2)), polynomial in m - 1); relative error ~1e-7. A vector of them
// instead of libm's logf, which cost ~100 ns a call after AVX-512 code here.
inline __attribute__((always_inline)) v16 LogPositive(v16 x) {
  v16i bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  const v16i e = (bits >> 23) - 126;  // x = f 2^e, f in [0.5, 1)
  bits = (bits & 0x007fffff) | 0x3f000000;
  v16 f;
  __builtin_memcpy(&f, &bits, sizeof(f));
  const v16i small = f < 0.707106781186547524f;  // -1 where f < sqrt(1/2): use 2f, e - 1
  const v16 ef = __builtin_convertvector(e + small, v16);
  const v16 m = (small != 0 ? f + f : f) - 1.0f;
  const v16 z = m * m;
  v16 y = (v16){} + 7.0376836292e-2f;
  y = y * m + -1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m + -1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m + -1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m + -2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z + ef * -2.12194440e-4f - 0.5f * z;
  return m + y + ef * 0.693359375f;
}

inline float ExpNonPositiveScalar(float x) {
  v16 v = (v16){} + x;
  return ExpNonPositive(v)[0];
}

inline __attribute__((always_inline)) float HorizontalSum(v16 v) {
  float s = 0.f;
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

inline __attribute__((always_inline)) float HorizontalMax(v16 v) {
  float s = v[0];
#pragma GCC unroll 16
  for (int i = 1; i < 16; ++i) s = v[i] > s ? v[i] : s;
  return s;
}

float ScaleMaskMax(const float* x, const uint8_t* keep, float scale, float* y, int64_t n) {
  v16 mx = (v16){} + kNegInf;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    v16 v = Load(x + j) * scale;
    if (keep != nullptr) {
      v16i k;
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) k[i] = keep[j + i];
      v = k != 0 ? v : (v16){} + kNegInf;
    }
    Store(y + j, v);
    mx = v > mx ? v : mx;
  }
  float m = HorizontalMax(mx);
  for (; j < n; ++j) {
    const float v = (keep == nullptr || keep[j]) ? scale * x[j] : kNegInf;
    y[j] = v;
    m = v > m ? v : m;
  }
  return m;
}

float ExpSum(float* y, float shift, int64_t n) {
  v16 acc = (v16){};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const v16 e = ExpNonPositive(Load(y + j) - shift);
    Store(y + j, e);
    acc += e;
  }
  float s = HorizontalSum(acc);
  for (; j < n; ++j) {
    y[j] = ExpNonPositiveScalar(y[j] - shift);
    s += y[j];
  }
  return s;
}

void Scale(float* y, float s, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) Store(y + j, Load(y + j) * s);
  for (; j < n; ++j) y[j] *= s;
}

float Dot(const float* x, const float* y, int64_t n) {
  v16 acc = (v16){};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) acc += Load(x + j) * Load(y + j);
  float s = HorizontalSum(acc);
  for (; j < n; ++j) s += x[j] * y[j];
  return s;
}

// dx = 0 where y = 0 (hidden elements, and probabilities that underflowed),
// selected: a NaN in dy or dot (a NaN in dout) stays in the elements the
// row sees.
void SoftmaxGrad(const float* y, const float* dy, float dot, float scale, float* dx, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const v16 yv = Load(y + j);
    Store(dx + j, yv == 0.f ? (v16){} : yv * (Load(dy + j) - dot) * scale);
  }
  for (; j < n; ++j) dx[j] = y[j] == 0.f ? 0.f : scale * y[j] * (dy[j] - dot);
}

// ---------------------------------------------------------------------------
// bfloat16 conversions (plain loops GCC vectorises for the target).

// float32 -> bf16 bits, rounded to nearest even (as Eigen::bfloat16 and
// vcvtneps2bf16); a NaN stays a quiet NaN.
void FloatToBf16(const float* x, int64_t n, uint16_t* y) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    __builtin_memcpy(&u, x + i, 4);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    y[i] = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
  }
}

// bf16 bits -> float32 (exact).
void Bf16ToFloat(const uint16_t* x, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = uint32_t{x[i]} << 16;
    __builtin_memcpy(y + i, &u, 4);
  }
}
