// AVX2 helpers the CPU kernels share.

#pragma once

#include <immintrin.h>

// The hot helpers take lambdas and accumulator arrays by reference: unless they are inlined the
// accumulators live in memory, which halves the speed.
#define RZ_INLINE inline __attribute__((always_inline))

namespace rz_cpu {

// The sum of the 8 lanes.
RZ_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lane i: the sum of the lanes of v[i] (eight horizontal sums in 6 hadds, 2 permutes and an add).
RZ_INLINE __m256 hsum_8x8(const __m256 (&v)[8]) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Lane i: the sum of the lanes of v[i], for 4 vectors.
RZ_INLINE __m128 hsum_4x8(const __m256 (&v)[4]) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

// The largest of the 8 lanes.
RZ_INLINE float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace rz_cpu
