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

// The largest of the 8 lanes.
RZ_INLINE float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace rz_cpu
