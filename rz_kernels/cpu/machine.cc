// The machine's limits, measured with the instruction mixes the kernels use, for benchmarks to
// report achieved bandwidth and throughput against.

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "machine_probe.h"
#include "simd.h"

using rz_cpu::on_threads;
using rz_cpu::seconds_since;

// A streaming read of `bytes` of memory by n_threads threads, best of `repeats`, in GB/s: the
// memory bandwidth a decode step's weight streaming is measured against.
extern "C" double rz_stream_read_gbps(int64_t bytes, int32_t n_threads, int32_t repeats) {
  bytes = bytes / (128 * n_threads) * (128 * n_threads);
  auto* buffer = static_cast<uint8_t*>(std::aligned_alloc(64, bytes));
  std::memset(buffer, 1, bytes);
  std::vector<int64_t> sinks(n_threads);
  double best = 0;
  for (int32_t r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    on_threads(n_threads, [&](int32_t t) {
      const int64_t share = bytes / n_threads;
      const uint8_t* p = buffer + t * share;
      __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
      for (int64_t i = 0; i < share; i += 128) {
        s0 = _mm256_add_epi64(s0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
        s1 = _mm256_add_epi64(s1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
        s2 = _mm256_add_epi64(s2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
        s3 = _mm256_add_epi64(s3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
      }
      sinks[t] = _mm256_extract_epi64(_mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3)), 0);
    });
    best = std::max(best, static_cast<double>(bytes) / seconds_since(start) / 1e9);
  }
  std::free(buffer);
  return best;
}

// The int8 multiply-accumulate rate of the quantized matmul's inner step (the variant's int8 dot,
// rz_cpu::dot_u8s8, then a convert and an FMA per 32 products) on n_threads threads, best of `repeats` runs, in G int8 MAC/s.
extern "C" double rz_int8_dot_peak_gmacs(int32_t n_threads, int32_t repeats) {
  constexpr int64_t kIterations = 20'000'000;
  double best = 0;
  for (int32_t r = 0; r < repeats; ++r) {
    std::vector<float> sinks(n_threads);
    const auto start = std::chrono::steady_clock::now();
    on_threads(n_threads, [&](int32_t t) {
      __m256i a = _mm256_set1_epi8(3 + t), b = _mm256_set1_epi8(5);
      __m256 scale = _mm256_set1_ps(1e-9f);
      __m256 acc[6] = {};
      for (int64_t i = 0; i < kIterations; ++i) {
        for (int j = 0; j < 6; ++j) {
          const __m256i products = rz_cpu::dot_u8s8(_mm256_setzero_si256(), a, b);
          acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), scale, acc[j]);
        }
        __asm__ volatile("" : "+x"(a), "+x"(b));
      }
      float total = 0;
      for (const __m256& v : acc) total += v[0];
      sinks[t] = total;
    });
    best = std::max(best, 6.0 * 32 * kIterations * n_threads / seconds_since(start) / 1e9);
  }
  return best;
}
