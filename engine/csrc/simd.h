// What the CPU kernels share: 8 values of any stored float format widened to fp32 in one AVX2 register, a register's
// horizontal sum, and the GEMM's Vec (16 lanes in the AVX-512 build). Header-only and static, so each kernel file
// inlines its own copy.
#pragma once

// GCC 12's AVX-512 intrinsics start from a self-initialized "undefined" register, which -Wmaybe-uninitialized
// reports wherever they inline; the warning's location is the header, so it is silenced there alone.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#include <cmath>
#include <cstdint>

namespace gpt2_cpu {

struct BF16 {  // bfloat16's bits: the top half of an fp32
  uint16_t bits;
};
using FP16 = uint16_t;  // IEEE half's bits, widened by F16C

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const FP16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const BF16* p) {
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline float load1(const float* p) { return *p; }
inline float load1(const FP16* p) { return _cvtsh_ss(*p); }
inline float load1(const BF16* p) {
  const uint32_t bits = static_cast<uint32_t>(p->bits) << 16;
  float out;
  __builtin_memcpy(&out, &bits, sizeof(out));
  return out;
}

// fp32 to the stored format, rounding to nearest even as PyTorch's ``.to()`` does (NaN stays NaN).
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(FP16* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store1(float* p, float v) { *p = v; }
inline void store1(FP16* p, float v) { *p = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline void store1(BF16* p, float v) {
  uint32_t bits;
  __builtin_memcpy(&bits, &v, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    p->bits = static_cast<uint16_t>((bits >> 16) | 0x40u);  // a quiet NaN
  } else {
    p->bits = static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
}
inline void store8(BF16* p, __m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  for (int i = 0; i < 8; i++) store1(p + i, lanes[i]);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The GEMM's widest register, Vec: kLanes fp32 lanes, 16 where the library is built for AVX-512 (engine/cpu_kernels.py
// builds that variant on CPUs that have it), else 8. Loads widen any stored float format, as load8 does.
#if defined(__AVX512F__)
constexpr long kLanes = 16;
using Vec = __m512;
inline Vec vec_zero() { return _mm512_setzero_ps(); }
inline Vec vec_fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vec_load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vec_broadcast(const float* p) { return _mm512_set1_ps(*p); }
inline Vec vec_add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline void vec_store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vec_load(const FP16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline Vec vec_load(const BF16* p) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline float vec_sum(Vec v) { return hsum(_mm256_add_ps(_mm512_extractf32x8_ps(v, 0), _mm512_extractf32x8_ps(v, 1))); }
#else
constexpr long kLanes = 8;
using Vec = __m256;
inline Vec vec_zero() { return _mm256_setzero_ps(); }
inline Vec vec_fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
template <typename T>
inline Vec vec_load(const T* p) {
  return load8(p);
}
inline Vec vec_broadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec vec_add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline void vec_store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline float vec_sum(Vec v) { return hsum(v); }
#endif

// e^x for x <= 0 to about 1 ulp (Cephes' expf: 2^n times a degree-5 polynomial on [-ln2/2, ln2/2]); x below
// -87 gives e^-87 rather than a denormal or 0.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // x - n ln2, in two parts for precision
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(scale));
}

// GPT-2's GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), with tanh(u) = sign(u) (1 - e) / (1 + e) for
// e = e^(-2|u|): within about 1e-7 of the exact tanh.
constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluCubic = 0.044715f;

inline __m256 gelu_tanh(__m256 x) {
  const __m256 u = _mm256_mul_ps(_mm256_set1_ps(kGeluC),
                                 _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(kGeluCubic), x), _mm256_mul_ps(x, x), x));
  const __m256 sign = _mm256_and_ps(u, _mm256_set1_ps(-0.0f));
  const __m256 e = exp_nonpositive(_mm256_mul_ps(_mm256_set1_ps(-2.0f), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), u)));
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = _mm256_or_ps(sign, _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e)));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(one, t));
}

inline float gelu_tanh(float x) { return 0.5f * x * (1.0f + std::tanh(kGeluC * (x + kGeluCubic * x * x * x))); }

// The stored formats the kernels take, as engine/cpu_kernels.py numbers them.
enum Kind { kF32 = 0, kF16 = 1, kBF16 = 2, kInt8 = 3 };

}  // namespace gpt2_cpu
