// Quantized matmul for aarch64 CPUs with NEON and the dot-product extension, plus i8mm where the
// variant is built with it: y[M, N] = x[M, K] @ W[N, K].T with W kept quantized. The FFI handler
// RzQMatmul takes what qmatmul.cc's takes (x, then each weight's arrays in the order of
// rz_kernels.quantized_matmul.CPU_FFI_ARRAYS; attributes ggml_types and max_threads), and so does
// RzQMatmulLayer (one layer's weights of many, picked by a run-time index).
//
// As on x86 (and in llama.cpp), the activations are quantized once per call to int8, rounded as
// llama.cpp's quantize_row_q8_0 / q8_1 / q8_K: per 32 elements for 32-block weights (the scale
// stored in f16), per 256 for K-quants. The weights are decoded a block at a time from
// rz.quants' planar layout into signed bytes (Q4_0's q - 8, Q5_0's q - 16 and Q6_K's q - 32
// included, since sdot is signed on both sides), and meet the activations in exact int32 dots:
//   - dotprod: vdotq_s32, four weight rows at a time against up to four activation rows (two for
//     K-quants), the four rows' dots gathered into one vector by pairwise adds;
//   - i8mm (two or more activation rows): vmmlaq_s32 on a 2 x 2 tile, two weight rows against two
//     activation rows, each pair interleaved 8 bytes at a time; the activations are laid out so
//     once per call, the weights by two zips per 16 bytes.
// An int32 block dot (a K-quant's: its sub-block dots times their integer scales, summed) becomes
// f32 once: acc = fma(float(dot), d_w * d_x, acc), block after block. Zero points that sdot does
// not absorb (Q4_1's and Q5_1's mins, Q4_K's and Q5_K's) are added at the end by one function per
// output. Every output therefore takes the same float operations in the same order whichever
// instruction computed its integer dots and whatever else is in the tile: a row's output is bit
// for bit the same whatever the number of rows (a sequence's tokens must not depend on its batch).
//
// Work is split over weight rows and shared with rz's spinning workers (threads.h).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "layer_weights.h"
#include "simd_neon.h"
#include "threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using rz_neon::f16_lanes;
using rz_neon::f16_to_f32;
using rz_neon::round_to_f16;

constexpr int64_t kBlock = 32;   // a weight block, and a K-quant's sub-block
constexpr int64_t kSuper = 256;  // a K-quant super-block
constexpr int kWeightRows = 4;   // weight rows per dotprod tile
constexpr int kMaxXRows = 4;     // activation rows per dotprod tile, pairs per i8mm tile
constexpr int64_t kTaskRows = 16;  // weight rows per task (a multiple of kWeightRows)
constexpr int64_t kMinWeightBytesPerThread = 32 << 10;  // below, handing work to a worker costs more than it saves

#if defined(__ARM_FEATURE_MATMUL_INT8)
constexpr bool kI8mm = true;
#else
constexpr bool kI8mm = false;
#endif

// The GGML type numbers (rz.ggml_types.GGMLType) this file implements.
enum GGMLType : int32_t {
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
};

// ---------------------------------------------------------------------------------------------
// Activations.

struct QuantizedX {
  int64_t M = 0, K = 0, x_block = kBlock;
  const int8_t* q = nullptr;         // [M, K]
  const float* d = nullptr;          // [M, K / x_block]: each block's scale (f16-rounded for 32)
  const int16_t* bsum = nullptr;     // [M, K / 32]: sum(q) over 32 elements (what K-quant mins meet)
  const float* sum_q8_1 = nullptr;   // [M, K / 32]: llama.cpp's block_q8_1 s = f16(d * sum(q)), d
                                     // before its f16 rounding (what Q4_1's and Q5_1's mins meet)
  // i8mm: rows 2p and 2p + 1 (the last row twice for odd M) interleaved 8 bytes at a time,
  // [M/2 rounded up, 2K], and their scales in vmmlaq_s32's lane order, [pairs, K/x_block, 4]:
  // d_2p, d_2p+1, d_2p, d_2p+1.
  const int8_t* pq = nullptr;
  const float* pd = nullptr;

  int64_t n_scales() const { return K / x_block; }
  const int8_t* row(int64_t m) const { return q + m * K; }
  float scale(int64_t m, int64_t block) const { return d[m * n_scales() + block]; }
  const int8_t* pair(int64_t p) const { return pq + p * 2 * K; }
  const float* pair_scales(int64_t p) const { return pd + p * n_scales() * 4; }
};

// Quantize one row of K floats per x_block: q = round(x * 127 / amax) (ties to even, as x86's
// vroundps and jnp.round), scale amax / 127.
void quantize_row(const float* x, int64_t K, int64_t x_block, int8_t* q, float* d, int16_t* bsum, float* sum_q8_1) {
  for (int64_t start = 0; start < K; start += x_block) {
    float32x4_t amax4 = vdupq_n_f32(0.0f);
    for (int64_t i = 0; i < x_block; i += 4) amax4 = vmaxq_f32(amax4, vabsq_f32(vld1q_f32(x + start + i)));
    const float amax = vmaxvq_f32(amax4);
    const float scale = amax / 127.0f;
    const float inverse = amax != 0.0f ? 127.0f / amax : 0.0f;
    d[start / x_block] = x_block == kBlock ? round_to_f16(scale) : scale;
    for (int64_t b = start; b < start + x_block; b += kBlock) {
      int32x4_t v[8];
      for (int j = 0; j < 8; ++j) v[j] = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x + b + 4 * j), inverse));
      int16x8_t h[4];
      for (int j = 0; j < 4; ++j) h[j] = vcombine_s16(vqmovn_s32(v[2 * j]), vqmovn_s32(v[2 * j + 1]));
      vst1q_s8(q + b, vcombine_s8(vqmovn_s16(h[0]), vqmovn_s16(h[1])));
      vst1q_s8(q + b + 16, vcombine_s8(vqmovn_s16(h[2]), vqmovn_s16(h[3])));
      const int32_t sum = vaddvq_s32(vaddq_s32(vaddq_s32(vaddq_s32(v[0], v[1]), vaddq_s32(v[2], v[3])),
                                               vaddq_s32(vaddq_s32(v[4], v[5]), vaddq_s32(v[6], v[7]))));
      bsum[b / kBlock] = static_cast<int16_t>(sum);
      if (sum_q8_1) sum_q8_1[b / kBlock] = round_to_f16(scale * static_cast<float>(sum));
    }
  }
}

// Rows 2p and 2p + 1 (or the last row twice) into the i8mm layout.
void pair_rows(const QuantizedX& x, int64_t p, int8_t* pq, float* pd) {
  const int8_t* a = x.row(2 * p);
  const int8_t* b = x.row(std::min(2 * p + 1, x.M - 1));
  int8_t* out = pq + p * 2 * x.K;
  for (int64_t i = 0; i < x.K; i += 16) {
    const int64x2_t va = vreinterpretq_s64_s8(vld1q_s8(a + i)), vb = vreinterpretq_s64_s8(vld1q_s8(b + i));
    vst1q_s8(out + 2 * i, vreinterpretq_s8_s64(vzip1q_s64(va, vb)));
    vst1q_s8(out + 2 * i + 16, vreinterpretq_s8_s64(vzip2q_s64(va, vb)));
  }
  float* scales = pd + p * x.n_scales() * 4;
  for (int64_t s = 0; s < x.n_scales(); ++s) {
    const float da = x.scale(2 * p, s), db = x.scale(std::min(2 * p + 1, x.M - 1), s);
    const float32x4_t lanes = {da, db, da, db};
    vst1q_f32(scales + 4 * s, lanes);
  }
}

// ---------------------------------------------------------------------------------------------
// Weights: a view of a type's arrays (row-major [N, K/block * items]) per type.
//
// 32-block types have
//   block(n, b, lo, hi): block b of row n as signed bytes, elements 0-15 and 16-31;
//   d_row(n): the f16 block scales;
//   offset(n, x, m): what the zero points add to output (m, n), 0 for the symmetric types.
// K-quants have
//   sub<j>(n, s, lo, hi): sub-block j (32 elements) of super-block s of row n, as signed bytes;
//   scales(n, s, sc): the super-block's integer scales, unit u in lane u % 4 of sc[u / 4]; a unit
//     is 16 elements (kUnit16) or 32;
//   d(n, s): the super-block's scale; offset(n, x, m) as above.

RZ_INLINE int8x16_t low_nibbles(uint8x16_t v) { return vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F))); }
RZ_INLINE int8x16_t high_nibbles(uint8x16_t v) { return vreinterpretq_s8_u8(vshrq_n_u8(v, 4)); }

// sum_b f16 mins[b] * sums[b] over nb blocks, in one fixed order.
RZ_INLINE float offset_q8_1(const uint16_t* mins, const float* sums, int64_t nb) {
  float32x4_t acc = vdupq_n_f32(0.0f);
  int64_t b = 0;
  for (; b + 4 <= nb; b += 4) acc = vfmaq_f32(acc, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(mins + b))), vld1q_f32(sums + b));
  float total = vaddvq_f32(acc);
  for (; b < nb; ++b) total = std::fma(f16_to_f32(mins[b]), sums[b], total);
  return total;
}

// Bit i of a 32-bit word -> 0x10 in byte i: the fifth bit of Q5_0/Q5_1's elements 0-15 (lo), 16-31 (hi).
RZ_INLINE void fifth_bits(uint32_t bits, int8x16_t& lo, int8x16_t& hi) {
  static const uint8_t kSpread[32] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
  static const uint8_t kBit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
  const uint8x16_t word = vreinterpretq_u8_u32(vdupq_n_u32(bits)), bit = vld1q_u8(kBit), fifth = vdupq_n_u8(0x10);
  lo = vreinterpretq_s8_u8(vandq_u8(vtstq_u8(vqtbl1q_u8(word, vld1q_u8(kSpread)), bit), fifth));
  hi = vreinterpretq_s8_u8(vandq_u8(vtstq_u8(vqtbl1q_u8(word, vld1q_u8(kSpread + 16)), bit), fifth));
}

// Q4_0 (w = d (q - 8)), Q4_1 (w = d q + m), Q5_0 (w = d (q - 16)) and Q5_1 (w = d q + m): 4-bit
// quants, plus a fifth bit per element from qh for Q5.
template <bool kMin, bool kFifthBit>
struct NibbleW {
  static constexpr bool kSuperBlocks = false;
  const uint8_t* qs;
  const uint32_t* qh;  // Q5 only
  const uint16_t* d;
  const uint16_t* mins;  // Q4_1, Q5_1 only
  int64_t K;
  RZ_INLINE void block(int64_t n, int64_t b, int8x16_t& lo, int8x16_t& hi) const {
    const uint8x16_t v = vld1q_u8(qs + n * K / 2 + 16 * b);
    lo = low_nibbles(v);
    hi = high_nibbles(v);
    if constexpr (kFifthBit) {
      int8x16_t lo5, hi5;
      fifth_bits(qh[n * (K / kBlock) + b], lo5, hi5);
      lo = vorrq_s8(lo, lo5);
      hi = vorrq_s8(hi, hi5);
    }
    if constexpr (!kMin) {
      const int8x16_t zero_point = vdupq_n_s8(kFifthBit ? 16 : 8);
      lo = vsubq_s8(lo, zero_point);
      hi = vsubq_s8(hi, zero_point);
    }
  }
  RZ_INLINE const uint16_t* d_row(int64_t n) const { return d + n * (K / kBlock); }
  RZ_INLINE float offset(int64_t n, const QuantizedX& x, int64_t m) const {
    if constexpr (kMin) return offset_q8_1(mins + n * (K / kBlock), x.sum_q8_1 + m * (K / kBlock), K / kBlock);
    return 0.0f;
  }
};

struct Q8_0W {
  static constexpr bool kSuperBlocks = false;
  const int8_t* qs;
  const uint16_t* d;
  int64_t K;
  RZ_INLINE void block(int64_t n, int64_t b, int8x16_t& lo, int8x16_t& hi) const {
    lo = vld1q_s8(qs + n * K + kBlock * b);
    hi = vld1q_s8(qs + n * K + kBlock * b + 16);
  }
  RZ_INLINE const uint16_t* d_row(int64_t n) const { return d + n * (K / kBlock); }
  RZ_INLINE float offset(int64_t, const QuantizedX&, int64_t) const { return 0.0f; }
};

// Q4_K and Q5_K: w = d * scale * q - dmin * min per 32-element sub-block.
template <bool kFifthBit>
struct QK_W {
  static constexpr bool kSuperBlocks = true;
  static constexpr bool kUnit16 = false;
  const uint8_t* qs;      // K/2, nibble-planar in groups of 64
  const uint8_t* qh;      // K/8, bit-planar in groups of 256 (Q5_K only)
  const uint8_t* scales;  // K/32
  const uint8_t* mins;    // K/32
  const uint16_t* d_;     // K/256
  const uint16_t* dmin;   // K/256
  int64_t K;

  static constexpr int kScaleVectors = 2;
  RZ_INLINE int64_t super(int64_t n, int64_t s) const { return n * (K / kSuper) + s; }
  // Bit j of each byte of h moved to bit 4 (0x10): a shift by an immediate and a mask.
  template <int j>
  static RZ_INLINE int8x16_t fifth_bit(uint8x16_t h) {
    if constexpr (j < 4) h = vshlq_n_u8(h, 4 - j);
    else if constexpr (j > 4) h = vshrq_n_u8(h, j - 4);
    return vreinterpretq_s8_u8(vandq_u8(h, vdupq_n_u8(0x10)));
  }
  template <int j>
  RZ_INLINE void sub(int64_t n, int64_t s, int8x16_t& lo, int8x16_t& hi) const {
    const uint8_t* q = qs + super(n, s) * 128 + 32 * (j / 2);
    const uint8x16_t v0 = vld1q_u8(q), v1 = vld1q_u8(q + 16);
    lo = j % 2 ? high_nibbles(v0) : low_nibbles(v0);
    hi = j % 2 ? high_nibbles(v1) : low_nibbles(v1);
    if constexpr (kFifthBit) {
      const uint8_t* h = qh + super(n, s) * 32;
      lo = vorrq_s8(lo, fifth_bit<j>(vld1q_u8(h)));
      hi = vorrq_s8(hi, fifth_bit<j>(vld1q_u8(h + 16)));
    }
  }
  RZ_INLINE void scales_of(int64_t n, int64_t s, int32x4_t (&sc)[kScaleVectors]) const {
    const uint16x8_t wide = vmovl_u8(vld1_u8(scales + super(n, s) * 8));
    sc[0] = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(wide)));
    sc[1] = vreinterpretq_s32_u32(vmovl_high_u16(wide));
  }
  RZ_INLINE float d(int64_t n, int64_t s) const { return f16_to_f32(d_[super(n, s)]); }
  // -sum_s dmin_s * d_x,s * sum_j min_j * bsum_j, the inner sum exact in int32.
  RZ_INLINE float offset(int64_t n, const QuantizedX& x, int64_t m) const {
    float total = 0.0f;
    for (int64_t s = 0; s < K / kSuper; ++s) {
      const int16x8_t mn = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(mins + super(n, s) * 8)));
      const int16x8_t bs = vld1q_s16(x.bsum + m * (K / kBlock) + 8 * s);
      const int32_t dot = vaddvq_s32(vmlal_high_s16(vmull_s16(vget_low_s16(mn), vget_low_s16(bs)), mn, bs));
      total = std::fma(static_cast<float>(dot), f16_to_f32(dmin[super(n, s)]) * x.scale(m, s), total);
    }
    return -total;
  }
};

// Q6_K: w = d * scale * (q - 32), 6-bit q, one int8 scale per 16 elements.
struct Q6_KW {
  static constexpr bool kSuperBlocks = true;
  static constexpr bool kUnit16 = true;
  const uint8_t* qs;     // K/2, nibble-planar in groups of 128
  const uint8_t* qh;     // K/4, 2-bit planes in groups of 128
  const int8_t* scales;  // K/16
  const uint16_t* d_;    // K/256
  int64_t K;

  static constexpr int kScaleVectors = 4;
  RZ_INLINE int64_t super(int64_t n, int64_t s) const { return n * (K / kSuper) + s; }
  // Plane t of each byte of h (bits 2t, 2t + 1) moved to bits 4-5: a shift by an immediate and a mask.
  template <int t>
  static RZ_INLINE int8x16_t high_bits(uint8x16_t h) {
    if constexpr (t < 2) h = vshlq_n_u8(h, 4 - 2 * t);
    else if constexpr (t == 3) h = vshrq_n_u8(h, 2);
    return vreinterpretq_s8_u8(vandq_u8(h, vdupq_n_u8(0x30)));
  }
  // Sub-block j = 4 g + t: elements 32 t.. of group g (128 elements); its low 4 bits are the low
  // (t < 2) or high nibbles of bytes 32 (t % 2).. of the group's 64, its high 2 bits plane t of qh.
  template <int j>
  RZ_INLINE void sub(int64_t n, int64_t s, int8x16_t& lo, int8x16_t& hi) const {
    constexpr int g = j / 4, t = j % 4;
    const uint8_t* q = qs + super(n, s) * 128 + 64 * g + 32 * (t % 2);
    const uint8_t* h = qh + super(n, s) * 64 + 32 * g;
    const uint8x16_t v0 = vld1q_u8(q), v1 = vld1q_u8(q + 16);
    lo = vorrq_s8(t < 2 ? low_nibbles(v0) : high_nibbles(v0), high_bits<t>(vld1q_u8(h)));
    hi = vorrq_s8(t < 2 ? low_nibbles(v1) : high_nibbles(v1), high_bits<t>(vld1q_u8(h + 16)));
    lo = vsubq_s8(lo, vdupq_n_s8(32));
    hi = vsubq_s8(hi, vdupq_n_s8(32));
  }
  RZ_INLINE void scales_of(int64_t n, int64_t s, int32x4_t (&sc)[kScaleVectors]) const {
    const int8x16_t bytes = vld1q_s8(scales + super(n, s) * 16);
    const int16x8_t low = vmovl_s8(vget_low_s8(bytes)), high = vmovl_high_s8(bytes);
    sc[0] = vmovl_s16(vget_low_s16(low));
    sc[1] = vmovl_high_s16(low);
    sc[2] = vmovl_s16(vget_low_s16(high));
    sc[3] = vmovl_high_s16(high);
  }
  RZ_INLINE float d(int64_t n, int64_t s) const { return f16_to_f32(d_[super(n, s)]); }
  RZ_INLINE float offset(int64_t, const QuantizedX&, int64_t) const { return 0.0f; }
};

// ---------------------------------------------------------------------------------------------
// The dot products. A tile's accumulators hold, per lane, one output's
//   acc = fma(float(block dot), d_w * d_x, acc)
// over its blocks; store_tile adds each output's offset.

// f(std::integral_constant<int, j>) for the 8 sub-blocks j of a super-block: j is a constant
// there, so a sub-block's shifts and scale lanes are immediates.
template <class F, int... j>
RZ_INLINE void for_each_sub(F&& f, std::integer_sequence<int, j...>) {
  (f(std::integral_constant<int, j>{}), ...);
}
template <class F>
RZ_INLINE void for_each_sub(F&& f) {
  for_each_sub(f, std::make_integer_sequence<int, 8>{});
}

// Lane r: the sum of the lanes of p[r] (exact, int32).
RZ_INLINE int32x4_t gather_rows(const int32x4_t (&p)[kWeightRows]) {
  return vpaddq_s32(vpaddq_s32(p[0], p[1]), vpaddq_s32(p[2], p[3]));
}

// Weight rows n + r (clamped to the last row, N - 1: a tail tile repeats it and drops the result).
RZ_INLINE int64_t clamp_row(int64_t n, int64_t N) { return std::min(n, N - 1); }

// dotprod: weight rows [n, n + 4) against activation rows [m0, m0 + MT), lanes = weight rows.
template <int MT, class W>
RZ_INLINE void dot_tile(const W& w, int64_t n, int64_t N, const QuantizedX& x, int64_t m0, float32x4_t (&acc)[MT]) {
  int64_t rows[kWeightRows];
  for (int r = 0; r < kWeightRows; ++r) rows[r] = clamp_row(n + r, N);
  for (int i = 0; i < MT; ++i) acc[i] = vdupq_n_f32(0.0f);
  if constexpr (!W::kSuperBlocks) {
    const uint16_t* d[kWeightRows];
    for (int r = 0; r < kWeightRows; ++r) d[r] = w.d_row(rows[r]);
    for (int64_t b = 0; b < x.K / kBlock; ++b) {
      int8x16_t lo[kWeightRows], hi[kWeightRows];
      for (int r = 0; r < kWeightRows; ++r) w.block(rows[r], b, lo[r], hi[r]);
      const float32x4_t dw = f16_lanes(d[0][b], d[1][b], d[2][b], d[3][b]);
#pragma GCC unroll 4
      for (int i = 0; i < MT; ++i) {
        const int8_t* xb = x.row(m0 + i) + kBlock * b;
        const int8x16_t x_lo = vld1q_s8(xb), x_hi = vld1q_s8(xb + 16);
        int32x4_t p[kWeightRows];
        for (int r = 0; r < kWeightRows; ++r) p[r] = vdotq_s32(vdotq_s32(vdupq_n_s32(0), lo[r], x_lo), hi[r], x_hi);
        acc[i] = vfmaq_f32(acc[i], vcvtq_f32_s32(gather_rows(p)), vmulq_n_f32(dw, x.scale(m0 + i, b)));
      }
    }
  } else {
    for (int64_t s = 0; s < x.K / kSuper; ++s) {
      int32x4_t sums[kWeightRows][MT];
      for (int r = 0; r < kWeightRows; ++r) {
        for (int i = 0; i < MT; ++i) sums[r][i] = vdupq_n_s32(0);
      }
      // Row by row, so that a row's bytes shared by its sub-blocks (Q5_K's and Q6_K's high bits)
      // are loaded once.
#pragma GCC unroll 4
      for (int r = 0; r < kWeightRows; ++r) {
        int32x4_t sc[W::kScaleVectors];
        w.scales_of(rows[r], s, sc);
        for_each_sub([&](auto sub) __attribute__((always_inline)) {
          constexpr int j = decltype(sub)::value;
          int8x16_t lo, hi;
          w.template sub<j>(rows[r], s, lo, hi);
#pragma GCC unroll 4
          for (int i = 0; i < MT; ++i) {
            const int8_t* xb = x.row(m0 + i) + kSuper * s + kBlock * j;
            const int8x16_t x_lo = vld1q_s8(xb), x_hi = vld1q_s8(xb + 16);
            if constexpr (W::kUnit16) {
              sums[r][i] = vmlaq_laneq_s32(sums[r][i], vdotq_s32(vdupq_n_s32(0), lo, x_lo), sc[j / 2], 2 * j % 4);
              sums[r][i] = vmlaq_laneq_s32(sums[r][i], vdotq_s32(vdupq_n_s32(0), hi, x_hi), sc[j / 2], 2 * j % 4 + 1);
            } else {
              sums[r][i] = vmlaq_laneq_s32(sums[r][i], vdotq_s32(vdotq_s32(vdupq_n_s32(0), lo, x_lo), hi, x_hi), sc[j / 4], j % 4);
            }
          }
        });
      }
      const float32x4_t dw = {w.d(rows[0], s), w.d(rows[1], s), w.d(rows[2], s), w.d(rows[3], s)};
      for (int i = 0; i < MT; ++i) {
        const int32x4_t p[kWeightRows] = {sums[0][i], sums[1][i], sums[2][i], sums[3][i]};
        acc[i] = vfmaq_f32(acc[i], vcvtq_f32_s32(gather_rows(p)), vmulq_n_f32(dw, x.scale(m0 + i, s)));
      }
    }
  }
}

template <int MT, class W>
void dot_rows(const W& w, int64_t n, int64_t N, const QuantizedX& x, int64_t m0, float* y, int64_t ld) {
  float32x4_t acc[MT];
  dot_tile<MT>(w, n, N, x, m0, acc);
  for (int i = 0; i < MT; ++i) {
    float lanes[kWeightRows];
    vst1q_f32(lanes, acc[i]);
    for (int r = 0; r < kWeightRows && n + r < N; ++r) y[(m0 + i) * ld + n + r] = lanes[r] + w.offset(n + r, x, m0 + i);
  }
}

#if defined(__ARM_FEATURE_MATMUL_INT8)
// Two rows' 32 signed bytes (lo/hi halves each) -> vmmlaq_s32's left operands, 8 bytes of each row
// per register: [a[0:8] b[0:8]], [a[8:16] b[8:16]], then the same for the high halves.
RZ_INLINE void zip_rows(int8x16_t lo0, int8x16_t hi0, int8x16_t lo1, int8x16_t hi1, int8x16_t (&a)[4]) {
  const int64x2_t l0 = vreinterpretq_s64_s8(lo0), l1 = vreinterpretq_s64_s8(lo1);
  const int64x2_t h0 = vreinterpretq_s64_s8(hi0), h1 = vreinterpretq_s64_s8(hi1);
  a[0] = vreinterpretq_s8_s64(vzip1q_s64(l0, l1));
  a[1] = vreinterpretq_s8_s64(vzip2q_s64(l0, l1));
  a[2] = vreinterpretq_s8_s64(vzip1q_s64(h0, h1));
  a[3] = vreinterpretq_s8_s64(vzip2q_s64(h0, h1));
}

// The 2 x 2 dots of 16 elements: a (two weight rows, zipped) against pair layout bytes at xp.
RZ_INLINE int32x4_t mmla_16(int32x4_t acc, int8x16_t a0, int8x16_t a1, const int8_t* xp) {
  return vmmlaq_s32(vmmlaq_s32(acc, a0, vld1q_s8(xp)), a1, vld1q_s8(xp + 16));
}

// i8mm: weight rows n, n + 1 against the activation pairs [p0, p0 + XP); lanes (w, x) as
// vmmlaq_s32 leaves them: (n, 2p), (n, 2p + 1), (n + 1, 2p), (n + 1, 2p + 1).
template <int XP, class W>
RZ_INLINE void mmla_tile(const W& w, int64_t n, int64_t N, const QuantizedX& x, int64_t p0, float32x4_t (&acc)[XP]) {
  const int64_t n0 = clamp_row(n, N), n1 = clamp_row(n + 1, N);
  for (int i = 0; i < XP; ++i) acc[i] = vdupq_n_f32(0.0f);
  if constexpr (!W::kSuperBlocks) {
    const uint16_t *d0 = w.d_row(n0), *d1 = w.d_row(n1);
    for (int64_t b = 0; b < x.K / kBlock; ++b) {
      int8x16_t lo0, hi0, lo1, hi1, a[4];
      w.block(n0, b, lo0, hi0);
      w.block(n1, b, lo1, hi1);
      zip_rows(lo0, hi0, lo1, hi1, a);
      const float32x4_t dw = f16_lanes(d0[b], d0[b], d1[b], d1[b]);
#pragma GCC unroll 4
      for (int i = 0; i < XP; ++i) {
        const int8_t* xp = x.pair(p0 + i) + 2 * kBlock * b;
        const int32x4_t dots = mmla_16(mmla_16(vdupq_n_s32(0), a[0], a[1], xp), a[2], a[3], xp + 32);
        acc[i] = vfmaq_f32(acc[i], vcvtq_f32_s32(dots), vmulq_f32(dw, vld1q_f32(x.pair_scales(p0 + i) + 4 * b)));
      }
    }
  } else {
    for (int64_t s = 0; s < x.K / kSuper; ++s) {
      int32x4_t sums[XP];
      for (int i = 0; i < XP; ++i) sums[i] = vdupq_n_s32(0);
      // Both rows' scales, unit u in lanes (u0, u0, u1, u1) of pairs[u]: vmmlaq_s32's lane order.
      int32x4_t sc0[W::kScaleVectors], sc1[W::kScaleVectors], pairs[4 * W::kScaleVectors];
      w.scales_of(n0, s, sc0);
      w.scales_of(n1, s, sc1);
      for (int v = 0; v < W::kScaleVectors; ++v) {
        const int64x2_t twice0_low = vreinterpretq_s64_s32(vzip1q_s32(sc0[v], sc0[v])), twice0_high = vreinterpretq_s64_s32(vzip2q_s32(sc0[v], sc0[v]));
        const int64x2_t twice1_low = vreinterpretq_s64_s32(vzip1q_s32(sc1[v], sc1[v])), twice1_high = vreinterpretq_s64_s32(vzip2q_s32(sc1[v], sc1[v]));
        pairs[4 * v] = vreinterpretq_s32_s64(vzip1q_s64(twice0_low, twice1_low));
        pairs[4 * v + 1] = vreinterpretq_s32_s64(vzip2q_s64(twice0_low, twice1_low));
        pairs[4 * v + 2] = vreinterpretq_s32_s64(vzip1q_s64(twice0_high, twice1_high));
        pairs[4 * v + 3] = vreinterpretq_s32_s64(vzip2q_s64(twice0_high, twice1_high));
      }
      for_each_sub([&](auto sub) __attribute__((always_inline)) {
        constexpr int j = decltype(sub)::value;
        int8x16_t lo0, hi0, lo1, hi1, a[4];
        w.template sub<j>(n0, s, lo0, hi0);
        w.template sub<j>(n1, s, lo1, hi1);
        zip_rows(lo0, hi0, lo1, hi1, a);
#pragma GCC unroll 4
        for (int i = 0; i < XP; ++i) {
          const int8_t* xp = x.pair(p0 + i) + 2 * (kSuper * s + kBlock * j);
          if constexpr (W::kUnit16) {
            sums[i] = vmlaq_s32(sums[i], mmla_16(vdupq_n_s32(0), a[0], a[1], xp), pairs[2 * j]);
            sums[i] = vmlaq_s32(sums[i], mmla_16(vdupq_n_s32(0), a[2], a[3], xp + 32), pairs[2 * j + 1]);
          } else {
            sums[i] = vmlaq_s32(sums[i], mmla_16(mmla_16(vdupq_n_s32(0), a[0], a[1], xp), a[2], a[3], xp + 32), pairs[j]);
          }
        }
      });
      const float d0 = w.d(n0, s), d1 = w.d(n1, s);
      const float32x4_t dw = {d0, d0, d1, d1};
      for (int i = 0; i < XP; ++i) {
        acc[i] = vfmaq_f32(acc[i], vcvtq_f32_s32(sums[i]), vmulq_f32(dw, vld1q_f32(x.pair_scales(p0 + i) + 4 * s)));
      }
    }
  }
}

template <int XP, class W>
void mmla_rows(const W& w, int64_t n, int64_t N, const QuantizedX& x, int64_t p0, float* y, int64_t ld) {
  float32x4_t acc[XP];
  mmla_tile<XP>(w, n, N, x, p0, acc);
  for (int i = 0; i < XP; ++i) {
    float lanes[4];
    vst1q_f32(lanes, acc[i]);
    for (int k = 0; k < 4; ++k) {
      const int64_t row = n + k / 2, m = 2 * (p0 + i) + k % 2;
      if (row < N && m < x.M) y[m * ld + row] = lanes[k] + w.offset(row, x, m);
    }
  }
}
#endif

// Rows [n0, n1) of W against every activation row.
template <class W>
void matmul_rows(const W& w, int64_t N, const QuantizedX& x, int64_t n0, int64_t n1, float* y, int64_t ld) {
#if defined(__ARM_FEATURE_MATMUL_INT8)
  if (x.pq != nullptr) {
    const int64_t pairs = (x.M + 1) / 2;
    for (int64_t n = n0; n < n1; n += 2) {
      for (int64_t p = 0; p < pairs; p += kMaxXRows) {
        switch (std::min<int64_t>(kMaxXRows, pairs - p)) {
          case 4: mmla_rows<4>(w, n, N, x, p, y, ld); break;
          case 3: mmla_rows<3>(w, n, N, x, p, y, ld); break;
          case 2: mmla_rows<2>(w, n, N, x, p, y, ld); break;
          default: mmla_rows<1>(w, n, N, x, p, y, ld); break;
        }
      }
    }
    return;
  }
#endif
  // A K-quant tile keeps 4 x MT int32 sums live besides its decoded rows: at most 2 activation rows.
  constexpr int kXRows = W::kSuperBlocks ? 2 : kMaxXRows;
  for (int64_t n = n0; n < n1; n += kWeightRows) {
    for (int64_t m = 0; m < x.M; m += kXRows) {
      switch (std::min<int64_t>(kXRows, x.M - m)) {
        case 4: dot_rows<4>(w, n, N, x, m, y, ld); break;
        case 3: dot_rows<3>(w, n, N, x, m, y, ld); break;
        case 2: dot_rows<2>(w, n, N, x, m, y, ld); break;
        default: dot_rows<1>(w, n, N, x, m, y, ld); break;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Threads.

// Scratch for the quantized activations, reused across calls on the calling thread; one per
// activation block size (32, 256): a call may need both.
struct Scratch {
  std::vector<int8_t> q, pq;
  std::vector<int16_t> bsum;
  std::vector<float> d, sum_q8_1, pd;
};
thread_local Scratch scratch[2];

QuantizedX quantize(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, int64_t x_block, int64_t n_threads, bool q8_1) {
  Scratch& s = scratch[x_block == kBlock ? 0 : 1];
  q8_1 = q8_1 && x_block == kBlock;
  s.q.resize(M * K);
  s.d.resize(M * (K / x_block));
  s.bsum.resize(M * (K / kBlock));
  s.sum_q8_1.resize(q8_1 ? M * (K / kBlock) : 0);
  rz_cpu::parallel_for(pool, M, M * K >= (1 << 16) ? n_threads : 1, [&](int64_t m) {
    quantize_row(x + m * K, K, x_block, s.q.data() + m * K, s.d.data() + m * (K / x_block), s.bsum.data() + m * (K / kBlock),
                 q8_1 ? s.sum_q8_1.data() + m * (K / kBlock) : nullptr);
  });
  QuantizedX qx;
  qx.M = M, qx.K = K, qx.x_block = x_block;
  qx.q = s.q.data(), qx.d = s.d.data(), qx.bsum = s.bsum.data();
  qx.sum_q8_1 = q8_1 ? s.sum_q8_1.data() : nullptr;
  if (kI8mm && M >= 2) {
    const int64_t pairs = (M + 1) / 2;
    s.pq.resize(pairs * 2 * K);
    s.pd.resize(pairs * (K / x_block) * 4);
    for (int64_t p = 0; p < pairs; ++p) pair_rows(qx, p, s.pq.data(), s.pd.data());
    qx.pq = s.pq.data(), qx.pd = s.pd.data();
  }
  return qx;
}

// One weight of a call, its type erased: several weights that read the same x (q/k/v, gate/up)
// go through one call and their rows are shared out together.
struct Part {
  int64_t N = 0;
  int64_t x_block = kBlock;
  double bytes = 0;
  int64_t column = 0;  // where its outputs start in a row of y
  bool q8_1 = false;   // meets llama.cpp's Q8_1 block sums
  std::function<void(const QuantizedX&, int64_t, int64_t, float*, int64_t)> rows;
};

template <class W>
Part make_part(const W& w, int64_t N, double bytes, bool q8_1) {
  Part part;
  part.N = N;
  part.x_block = W::kSuperBlocks ? kSuper : kBlock;
  part.bytes = bytes;
  part.q8_1 = q8_1;
  part.rows = [w, N](const QuantizedX& x, int64_t n0, int64_t n1, float* y, int64_t ld) { matmul_rows(w, N, x, n0, n1, y, ld); };
  return part;
}

void matmul(ffi::ThreadPool& pool, int64_t threads, const std::vector<Part>& parts, const float* x, int64_t M, int64_t K, float* y, int64_t ld) {
  bool q8_1 = false;
  double total_bytes = 0;
  for (const Part& part : parts) {
    q8_1 |= part.q8_1;
    total_bytes += part.bytes;
  }
  QuantizedX by_block[2];
  bool quantized[2] = {false, false};
  for (const Part& part : parts) {
    const int i = part.x_block == kBlock ? 0 : 1;
    if (!quantized[i]) by_block[i] = quantize(pool, x, M, K, part.x_block, threads, q8_1);
    quantized[i] = true;
  }
  struct Task {
    const Part* part;
    int64_t n0, n1;
  };
  std::vector<Task> tasks;
  for (const Part& part : parts) {
    for (int64_t n0 = 0; n0 < part.N; n0 += kTaskRows) tasks.push_back({&part, n0, std::min(part.N, n0 + kTaskRows)});
  }
  const int64_t useful_threads = std::max<int64_t>(1, std::min<int64_t>(threads, static_cast<int64_t>(total_bytes * std::min<int64_t>(M, 4) / kMinWeightBytesPerThread)));
  rz_cpu::parallel_for(pool, static_cast<int64_t>(tasks.size()), useful_threads, [&](int64_t t) {
    const Task& task = tasks[t];
    task.part->rows(by_block[task.part->x_block == kBlock ? 0 : 1], task.n0, task.n1, y + task.part->column, ld);
  });
}

// ---------------------------------------------------------------------------------------------
// The XLA FFI handler.

template <class T>
const T* data(const void* array) {
  return static_cast<const T*>(array);
}

// The arrays each type takes, in order (rz_kernels.quantized_matmul.CPU_FFI_ARRAYS).
int arrays_of(int32_t ggml_type) {
  switch (ggml_type) {
    case Q4_0: case Q8_0: return 2;
    case Q4_1: case Q5_0: return 3;
    case Q5_1: case Q6_K: return 4;
    case Q4_K: return 5;
    case Q5_K: return 6;
    default: return 0;
  }
}

// The part for one weight from its arrays; an empty one when K does not fit the type's block.
Part part_of(int32_t ggml_type, const void* const* a, int64_t N, int64_t K, double bytes) {
  const bool k_quant = ggml_type == Q4_K || ggml_type == Q5_K || ggml_type == Q6_K;
  if (K % (k_quant ? kSuper : kBlock)) return Part{};
  switch (ggml_type) {
    case Q4_0:  // d, qs
      return make_part(NibbleW<false, false>{data<uint8_t>(a[1]), nullptr, data<uint16_t>(a[0]), nullptr, K}, N, bytes, false);
    case Q4_1:  // d, m, qs
      return make_part(NibbleW<true, false>{data<uint8_t>(a[2]), nullptr, data<uint16_t>(a[0]), data<uint16_t>(a[1]), K}, N, bytes, true);
    case Q5_0:  // d, qh, qs
      return make_part(NibbleW<false, true>{data<uint8_t>(a[2]), data<uint32_t>(a[1]), data<uint16_t>(a[0]), nullptr, K}, N, bytes, false);
    case Q5_1:  // d, m, qh, qs
      return make_part(NibbleW<true, true>{data<uint8_t>(a[3]), data<uint32_t>(a[2]), data<uint16_t>(a[0]), data<uint16_t>(a[1]), K}, N, bytes, true);
    case Q8_0:  // d, qs
      return make_part(Q8_0W{data<int8_t>(a[1]), data<uint16_t>(a[0]), K}, N, bytes, false);
    case Q4_K:  // d, dmin, scales, mins, qs
      return make_part(QK_W<false>{data<uint8_t>(a[4]), nullptr, data<uint8_t>(a[2]), data<uint8_t>(a[3]), data<uint16_t>(a[0]), data<uint16_t>(a[1]), K}, N, bytes, false);
    case Q5_K:  // d, dmin, scales, mins, qh, qs
      return make_part(QK_W<true>{data<uint8_t>(a[5]), data<uint8_t>(a[4]), data<uint8_t>(a[2]), data<uint8_t>(a[3]), data<uint16_t>(a[0]), data<uint16_t>(a[1]), K}, N, bytes, false);
    case Q6_K:  // qs, qh, scales, d
      return make_part(Q6_KW{data<uint8_t>(a[0]), data<uint8_t>(a[1]), data<int8_t>(a[2]), data<uint16_t>(a[3]), K}, N, bytes, false);
    default:
      return Part{};
  }
}

// y f32 [M, sum of N] = x f32 [M, K] @ [W_0; W_1; ...].T, the weights' outputs side by side: weight i
// of type ggml_types[i], their arrays `arrays` in turn (rz_cpu::weight_arrays). Both handlers' body.
ffi::Error matmul_weights(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> x, const std::vector<rz_cpu::WeightArray>& arrays,
                          ffi::Span<const int32_t> ggml_types, ffi::ResultBuffer<ffi::F32> y, int32_t max_threads) {
  const auto x_dims = x.dimensions();
  const auto y_dims = y->dimensions();
  if (x_dims.size() != 2 || y_dims.size() != 2 || x_dims[0] != y_dims[0]) {
    return ffi::Error::InvalidArgument("rz_qmatmul: expected x [M, K] and y [M, N]");
  }
  const int64_t M = x_dims[0], K = x_dims[1], ld = y_dims[1];
  std::vector<Part> parts;
  size_t next = 0;
  int64_t column = 0;
  for (const int32_t ggml_type : ggml_types) {
    const int n_arrays = arrays_of(ggml_type);
    if (n_arrays == 0) return ffi::Error::InvalidArgument("rz_qmatmul: unsupported ggml_type");
    if (next + n_arrays > arrays.size()) return ffi::Error::InvalidArgument("rz_qmatmul: fewer weight arrays than the types need");
    const int64_t N = arrays[next].rows;
    double bytes = 0;
    const void* data[6];
    for (int i = 0; i < n_arrays; ++i) {
      if (arrays[next + i].rows != N) return ffi::Error::InvalidArgument("rz_qmatmul: a weight's arrays disagree on N");
      bytes += arrays[next + i].bytes;
      data[i] = arrays[next + i].data;
    }
    Part part = part_of(ggml_type, data, N, K, bytes);
    if (!part.rows) return ffi::Error::InvalidArgument("rz_qmatmul: K is not a multiple of a weight's block");
    part.column = column;
    column += N;
    next += n_arrays;
    parts.push_back(std::move(part));
  }
  if (next != arrays.size() || column != ld) return ffi::Error::InvalidArgument("rz_qmatmul: the weights' rows do not add up to y's columns");
  if (M == 0 || ld == 0) return ffi::Error::Success();
  matmul(pool, rz_cpu::pool_threads(pool, max_threads), parts, x.typed_data(), M, K, y->typed_data(), ld);
  return ffi::Error::Success();
}

// x f32 [M, K], then the arrays of each weight in turn -> y f32 [M, sum of N]: the weights'
// outputs side by side. Attributes: each weight's GGML type, and a cap on the threads (0: all).
ffi::Error QMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs weights, ffi::ResultBuffer<ffi::F32> y,
                       ffi::Span<const int32_t> ggml_types, int32_t max_threads) {
  std::vector<rz_cpu::WeightArray> arrays;
  if (ffi::Error error = rz_cpu::weight_arrays(weights, 0, weights.size(), false, 0, arrays); error.failure()) return error;
  return matmul_weights(pool, x, arrays, ggml_types, y, max_threads);
}

// QMatmulImpl on one layer's weights, chosen at run time (qmatmul.cc's RzQMatmulLayer): x, the
// layer's index (an int32 scalar), then every layer's weights' arrays, layer-major, or one layer's
// worth of arrays each stacked over the layers -> y [M, sum of one layer's N], so a model's layers
// run in one scan. Attributes: the types (every layer's, or stacked one layer's), how many weights a
// layer has, the cap on the threads.
ffi::Error QMatmulLayerImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::BufferR0<ffi::S32> layer, ffi::RemainingArgs weights,
                            ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int32_t> ggml_types, int32_t weights_per_layer,
                            int32_t max_threads) {
  std::vector<rz_cpu::WeightArray> arrays;
  if (rz_cpu::stacked_call(weights, ggml_types, weights_per_layer)) {
    if (ffi::Error error = rz_cpu::weight_arrays(weights, 0, weights.size(), true, *layer.typed_data(), arrays); error.failure()) return error;
    return matmul_weights(pool, x, arrays, ggml_types, y, max_threads);
  }
  rz_cpu::LayerWeights found;
  if (ffi::Error error = rz_cpu::find_layer(ggml_types, weights_per_layer, *layer.typed_data(), weights.size(), arrays_of, found);
      error.failure()) {
    return error;
  }
  if (ffi::Error error = rz_cpu::weight_arrays(weights, found.first_array, found.end_array, false, 0, arrays); error.failure()) return error;
  return matmul_weights(pool, x, arrays, ffi::Span<const int32_t>(ggml_types.begin() + found.first_type, weights_per_layer), y, max_threads);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RzQMatmul, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int32_t>>("ggml_types")
                                  .Attr<int32_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RzQMatmulLayer, QMatmulLayerImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::BufferR0<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int32_t>>("ggml_types")
                                  .Attr<int32_t>("weights_per_layer")
                                  .Attr<int32_t>("max_threads"));
