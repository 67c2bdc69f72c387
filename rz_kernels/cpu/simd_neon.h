// NEON helpers the aarch64 kernels share (qmatmul_neon.cc, attention_neon.cc, machine_neon.cc).

#pragma once

#include <arm_neon.h>

#include <cstdint>

// The hot helpers take lambdas and accumulator arrays by reference: unless they are inlined the
// accumulators live in memory.
#define RZ_INLINE inline __attribute__((always_inline))

namespace rz_neon {

RZ_INLINE float f16_to_f32(uint16_t h) {
  __fp16 v;
  __builtin_memcpy(&v, &h, 2);
  return static_cast<float>(v);
}

// v rounded to the nearest f16 (ties to even), back in f32: llama.cpp's block_q8_0 scale.
RZ_INLINE float round_to_f16(float v) { return static_cast<float>(static_cast<__fp16>(v)); }

// Four f16 values, one from each pointer, as f32 lanes.
RZ_INLINE float32x4_t f16_lanes(uint16_t a, uint16_t b, uint16_t c, uint16_t d) {
  const uint16x4_t h = {a, b, c, d};
  return vcvt_f32_f16(vreinterpret_f16_u16(h));
}

}  // namespace rz_neon
