// The vector operations crossdraft's CPU kernels are written in: AVX-512 where the compiler targets it,
// else AVX2 with FMA (an x86-64 CPU without them does not build, and torch's kernels serve).
#pragma once
#include <cstdint>
#include <immintrin.h>

#if defined(__AVX512F__)
using vec = __m512;
constexpr int64_t LANES = 16;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vset(float x) { return _mm512_set1_ps(x); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
// LANES bfloat16 values (their bits) widened to float32: exact, a bfloat16 is a float32's upper half
inline vec vload_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
inline vec vfnma(vec a, vec b, vec c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
inline vec vround(vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec vpow2(vec n) {  // 2^n for whole n in [-126, 127]
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline vec vzero_below(vec x, vec lo, vec y) {  // y, with 0 where x < lo
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ), y);
}
#elif defined(__AVX2__) && defined(__FMA__)
using vec = __m256;
constexpr int64_t LANES = 8;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vset(float x) { return _mm256_set1_ps(x); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vload_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
inline vec vfnma(vec a, vec b, vec c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a b
inline vec vround(vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec vpow2(vec n) {  // 2^n for whole n in [-126, 127]
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline vec vzero_below(vec x, vec lo, vec y) {  // y, with 0 where x < lo
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), y);
}
#else
#error "crossdraft's CPU kernels need x86-64 with AVX2 and FMA (or AVX-512)"
#endif

// The sum of a vector's lanes, always in the same order (halves added pairwise down to one lane).
inline float vsum(vec v) {
  float lanes[LANES];
  vstore(lanes, v);
  for (int64_t w = LANES / 2; w >= 1; w /= 2)
    for (int64_t i = 0; i < w; ++i) lanes[i] += lanes[i + w];
  return lanes[0];
}

// e^x lane by lane (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r, times 2^n;
// within 2 ulp of e^x), 0 below -87 where e^x is under float32's smallest normal, x <= 88.
inline vec vexp(vec x) {
  const vec lo = vset(-87.f);
  const vec xc = vmin(vmax(x, lo), vset(88.f));
  const vec n = vround(vmul(xc, vset(1.44269504088896341f)));
  vec r = vfnma(n, vset(0.693359375f), xc);
  r = vfnma(n, vset(-2.12194440e-4f), r);
  vec y = vset(1.9875691500e-4f);
  y = vfma(y, r, vset(1.3981999507e-3f));
  y = vfma(y, r, vset(8.3334519073e-3f));
  y = vfma(y, r, vset(4.1665795894e-2f));
  y = vfma(y, r, vset(1.6666665459e-1f));
  y = vfma(y, r, vset(5.0000001201e-1f));
  y = vadd(vfma(y, vmul(r, r), r), vset(1.f));
  return vzero_below(x, lo, vmul(y, vpow2(n)));
}
