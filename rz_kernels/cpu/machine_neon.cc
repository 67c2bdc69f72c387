// The machine's limits on aarch64, measured with the instruction mixes the NEON kernels use, for
// benchmarks to report achieved bandwidth and throughput against (machine.cc's probes, same symbols).

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "machine_probe.h"
#include "simd_neon.h"

using rz_cpu::on_threads;
using rz_cpu::seconds_since;

// A streaming read of `bytes` of memory by n_threads threads, best of `repeats`, in GB/s.
extern "C" double rz_stream_read_gbps(int64_t bytes, int32_t n_threads, int32_t repeats) {
  bytes = bytes / (64 * n_threads) * (64 * n_threads);
  auto* buffer = static_cast<uint8_t*>(std::aligned_alloc(64, bytes));
  std::memset(buffer, 1, bytes);
  std::vector<uint64_t> sinks(n_threads);
  double best = 0;
  for (int32_t r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    on_threads(n_threads, [&](int32_t t) {
      const int64_t share = bytes / n_threads;
      const uint8_t* p = buffer + t * share;
      uint64x2_t s0 = vdupq_n_u64(0), s1 = s0, s2 = s0, s3 = s0;
      for (int64_t i = 0; i < share; i += 64) {
        s0 = vaddq_u64(s0, vreinterpretq_u64_u8(vld1q_u8(p + i)));
        s1 = vaddq_u64(s1, vreinterpretq_u64_u8(vld1q_u8(p + i + 16)));
        s2 = vaddq_u64(s2, vreinterpretq_u64_u8(vld1q_u8(p + i + 32)));
        s3 = vaddq_u64(s3, vreinterpretq_u64_u8(vld1q_u8(p + i + 48)));
      }
      sinks[t] = vgetq_lane_u64(vaddq_u64(vaddq_u64(s0, s1), vaddq_u64(s2, s3)), 0);
    });
    best = std::max(best, static_cast<double>(bytes) / seconds_since(start) / 1e9);
  }
  std::free(buffer);
  return best;
}

// The int8 multiply-accumulate rate of the quantized matmul's inner step (two sdot per 32
// products, convert, FMA) on n_threads threads, best of `repeats` runs, in G int8 MAC/s.
extern "C" double rz_int8_dot_peak_gmacs(int32_t n_threads, int32_t repeats) {
  constexpr int64_t kIterations = 20'000'000;
  double best = 0;
  for (int32_t r = 0; r < repeats; ++r) {
    std::vector<float> sinks(n_threads);
    const auto start = std::chrono::steady_clock::now();
    on_threads(n_threads, [&](int32_t t) {
      int8x16_t a = vdupq_n_s8(static_cast<int8_t>(3 + t)), b = vdupq_n_s8(5);
      const float32x4_t scale = vdupq_n_f32(1e-9f);
      float32x4_t acc[6];
      for (auto& v : acc) v = vdupq_n_f32(0.0f);
      for (int64_t i = 0; i < kIterations; ++i) {
        for (int j = 0; j < 6; ++j) {
          const int32x4_t dots = vdotq_s32(vdotq_s32(vdupq_n_s32(0), a, b), b, a);
          acc[j] = vfmaq_f32(acc[j], vcvtq_f32_s32(dots), scale);
        }
        __asm__ volatile("" : "+w"(a), "+w"(b));
      }
      float total = 0;
      for (const float32x4_t& v : acc) total += vgetq_lane_f32(v, 0);
      sinks[t] = total;
    });
    best = std::max(best, 6.0 * 32 * kIterations * n_threads / seconds_since(start) / 1e9);
  }
  return best;
}
