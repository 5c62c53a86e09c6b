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
#elif defined(__AVX2__) && defined(__FMA__)
using vec = __m256;
constexpr int64_t LANES = 8;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vset(float x) { return _mm256_set1_ps(x); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
#else
#error "crossdraft's CPU kernels need x86-64 with AVX2 and FMA (or AVX-512)"
#endif
