// x86 helpers the CPU kernels share. Each variant (rz_kernels/build.py) compiles the same sources
// with its own flags; the integer dot products below pick their instructions from the compiler's
// macros: AVX-512 VNNI (with VL, 256-bit EVEX) or AVX-VNNI (VEX) `vpdpbusd`/`vpdpwssd`, else
// AVX2's maddubs + madd. Where maddubs does not saturate (every caller here: the unsigned
// operand is at most 128 and a pair of products at most 2 * 128 * 127), both give the same
// int32 sums, so every variant's outputs are bit for bit the AVX2 variant's.

#pragma once

#include <immintrin.h>

// The hot helpers take lambdas and accumulator arrays by reference: unless they are inlined the
// accumulators live in memory, which halves the speed.
#define RZ_INLINE inline __attribute__((always_inline))

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define RZ_VNNI 1
#define RZ_DPBUSD _mm256_dpbusd_epi32
#define RZ_DPWSSD _mm256_dpwssd_epi32
#elif defined(__AVXVNNI__)
#define RZ_VNNI 1
#define RZ_DPBUSD _mm256_dpbusd_avx_epi32
#define RZ_DPWSSD _mm256_dpwssd_avx_epi32
#else
#define RZ_VNNI 0
#endif

namespace rz_cpu {

// acc + the sums of each four adjacent products u * s (u unsigned bytes, s signed bytes), per
// int32 lane.
RZ_INLINE __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if RZ_VNNI
  return RZ_DPBUSD(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// The same for two pairs of operands at once (a block's two halves, or two blocks): AVX2 adds
// their int16 pair sums before one madd, which needs |u| <= 64 (4- and 5-bit quants: at most
// 2 * 2 * 31 * 127); kWide (unsigned operands up to 128, Q8_0's magnitudes) takes a madd each.
template <bool kWide>
RZ_INLINE __m256i dot_u8s8_2(__m256i u0, __m256i s0, __m256i u1, __m256i s1) {
#if RZ_VNNI
  return RZ_DPBUSD(RZ_DPBUSD(_mm256_setzero_si256(), u0, s0), u1, s1);
#else
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (kWide) {
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(u0, s0), ones), _mm256_madd_epi16(_mm256_maddubs_epi16(u1, s1), ones));
  } else {
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1)), ones);
  }
#endif
}

// acc + the products u * s summed in pairs, each pair times its int16 multiplier in `words`
// (twice per int32 lane): K-quants' integer sub-block scales ride in this multiply.
RZ_INLINE __m256i dot_u8s8_words(__m256i acc, __m256i u, __m256i s, __m256i words) {
#if RZ_VNNI
  return RZ_DPWSSD(acc, _mm256_maddubs_epi16(u, s), words);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), words));
#endif
}

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
