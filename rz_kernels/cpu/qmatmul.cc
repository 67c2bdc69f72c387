// Quantized matmul for x86-64 CPUs with AVX2 (and, in the VNNI variants, vpdpbusd/vpdpwssd):
// y[M, N] = x[M, K] @ W[N, K].T with W kept quantized.
//
// The design is llama.cpp's (ggml-cpu's vec_dot_*_q8_0 / _q8_K, llamafile's tinyBLAS): the
// activations are quantized once per call to int8 with one f32 scale per block, and each
// 32-element block of weights meets a block of activations in one int8 dot to int32 lanes
// (rz_cpu::dot_u8s8: AVX2's _mm256_maddubs_epi16 + _mm256_madd_epi16, or VNNI's one vpdpbusd).
//   - 32-block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): activations in blocks of 32 (Q8_0); each
//     block's int32 dot is converted and FMA'd with the product of the two block scales.
//   - K-quants (Q4_K, Q5_K, Q6_K): activations in blocks of 256 (Q8_K); the weights' integer
//     sub-block scales ride in the madd, so a super-block's eight dots add up in int32 and are
//     converted once.
// Unsigned quants go into maddubs as they are; their zero point (Q4_0's 8, Q4_1's min, Q4_K's
// min, Q6_K's 32) is an offset per 16 or 32 weights, times the activations' block sums computed
// with them, added by one FMA per block for all of a group's rows. Q8_0 is signed: the sign trick
// (|w| times x with w's sign) keeps maddubs' unsigned operand non-negative.
//
// Weights are read in rz.quants' planar layout (one array per kind of data, [N, K/block*items]);
// nothing is repacked. With few activation rows (a decode step), each weight block is decoded and
// used at once, so the weights stream through once; 4-, 5- and 8-bit types (Q4_0, Q4_1, Q5_0, Q5_1,
// Q8_0) meet two blocks at a time, a block per 128-bit lane, against a matching permutation of
// the activations (the paired layout), so that a pair shares one convert, scale and FMA. With 9-16
// rows, each weight row is decoded to bytes once and met by the activation rows in groups of 8; a
// prompt's rows (more than 16) meet decoded weight rows in register tiles (prefill_tile; K-quants
// with AVX-512 VNNI in panels of 16 rows, panel_tile). Up to 8
// rows, a row's output is bit for bit the same whatever the number of rows: a sequence's tokens
// must not depend on what else is in its decode batch.
//
// One call may take several weights that read the same x (q/k/v, gate/up): x is quantized once
// per activation block size and their rows are shared out together. Work is split over output
// rows (and, for large M, over tiles of x rows) and shared with rz's spinning workers
// (threads.h) by an atomic task counter; the calling thread takes tasks too.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include "layer_weights.h"
#include "qmatmul.h"
#include "simd.h"
#include "threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;


namespace {

using rz_cpu::hsum;
using rz_cpu::hsum_4x8;
using rz_cpu::hsum_8x8;

constexpr int64_t kBlock = 32;   // a weight block, and the unit of the activations' layout
constexpr int64_t kSuper = 256;  // a K-quant super-block
constexpr int64_t kRowGroup = 8;  // activation rows met by one pass over a weight row
constexpr int64_t kSuperRows = 4;  // for K-quants, by one pass (see super_row)
// How far ahead a decode step prefetches a K-quant weight, in super-blocks (4-7 KiB of quants).
// The hardware prefetcher stops at each 4 KiB page, so without it a core computing on a weight
// streamed from DRAM spends much of its time waiting for the next lines.
constexpr int64_t kPrefetchSupers = 16;
constexpr int64_t kSmallM = 16;  // up to this many activation rows, a call is a decode step's
// A prompt's rows meet in panels where the variant has 512-bit vpdpbusd (AVX-512 VNNI): kLanes
// activation rows in a vector's int32 lanes, against one weight row's four bytes broadcast
// (panel_tile). Elsewhere they take the 256-bit register tiles (super_tile, block_tile).
#if defined(__AVX512VNNI__)
constexpr bool kPanels = true;
#else
constexpr bool kPanels = false;
#endif
constexpr int64_t kLanes = 16;  // activation rows per panel

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

RZ_INLINE float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

RZ_INLINE int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

RZ_INLINE __m256i low_nibbles(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
RZ_INLINE __m256i high_nibbles(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }
RZ_INLINE void store(void* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
RZ_INLINE __m256i load(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
RZ_INLINE __m128i load_128(const void* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
RZ_INLINE __m128i load_64(const void* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }

// ---------------------------------------------------------------------------------------------
// Activations. Rows are quantized in groups of kRowGroup rows; a group is laid out
// [K/32][kRowGroup][32] (scales [K/x_block][kRowGroup]), so the inner loop walks one pointer for
// all the rows it serves. A last, partial group is padded with zero rows. The block sums, which
// meet the weights' offsets, are per row, zero-padded to a multiple of 8 units.
//
// One row alone (a batch-1 decode step) is a group of one, its blocks contiguous: in a group of
// eight its 32-byte blocks lie 256 bytes apart (512 in the paired layout), so the row of a
// K = 8192 weight (a 1B model's down projection) covers 16 KiB of lines in a quarter of L1's sets,
// which evict each other, and each weight row read them again from L2.

struct QuantizedX {
  int64_t K = 0;
  int64_t group = kRowGroup;  // rows per group: group_rows(M)
  int64_t x_block = kBlock;  // elements per activation scale: 32, or 256 for K-quants
  int8_t* q = nullptr;
  float* d = nullptr;      // the scale of each x_block elements
  float* sum32 = nullptr;  // d * sum(q) over each 32 elements: the block's value sum
  // llama.cpp's block_q8_1 sum, which Q4_1 and Q5_1 meet: f16(d * sum(q)) with d before its f16
  // rounding (32-element scales only).
  float* sum32_q8_1 = nullptr;
  float* sum16 = nullptr;  // the same over each 16 elements (Q6_K's sub-blocks)
  // The paired layout (few rows, K a multiple of 64; null otherwise), for weights met two blocks
  // at a time (paired_tile): per group, pair p of blocks b = 2p, b + 1 and row i,
  // 64 bytes [x_b[0:16], x_b+1[0:16], x_b[16:32], x_b+1[16:32]] and 8 floats [d_b x4, d_b+1 x4].
  int8_t* pq = nullptr;
  float* pd = nullptr;
  // The panel layout (a prompt's rows, with kPanels; null otherwise): per panel of kLanes rows,
  // the quants [K/4][kLanes][4] (four consecutive elements of each row in turn), then in panel_f
  // the scales [K/x_block][kLanes] and the sums [K/32][kLanes] and [K/16][kLanes], then, with
  // sum32_q8_1, those sums [K/32][kLanes].
  int8_t* panel_q = nullptr;
  float* panel_f = nullptr;

  static int64_t group_rows(int64_t M) { return M == 1 ? 1 : kRowGroup; }
  static int64_t padded_rows(int64_t M) { return (M + group_rows(M) - 1) / group_rows(M) * group_rows(M); }
  int64_t group_start(int64_t m) const { return m / group * group; }
  static int64_t padded_units(int64_t n) { return (n + 7) / 8 * 8; }
  const int8_t* q_group(int64_t m0) const { return q + m0 * K; }
  const float* d_group(int64_t m0) const { return d + m0 * (K / x_block); }
  const int8_t* pq_group(int64_t m0) const { return pq + m0 * K; }
  const float* pd_group(int64_t m0) const { return pd + m0 * (K / 64) * 8; }
  // The sums of row m over units of `unit` (32 or 16) elements.
  const float* sums(int64_t m, int64_t unit) const {
    return unit == kBlock ? sum32 + m * padded_units(K / kBlock) : sum16 + m * padded_units(K / 16);
  }
  // The 32-element sums a 32-block weight type meets: its activation type's (Q8_0 or Q8_1).
  const float* block_sums(int64_t m, bool q8_1) const { return (q8_1 ? sum32_q8_1 : sum32) + m * padded_units(K / kBlock); }
  static int64_t panels(int64_t M) { return (M + kLanes - 1) / kLanes; }
  int64_t panel_floats() const { return (K / x_block + K / kBlock * (sum32_q8_1 ? 2 : 1) + K / 16) * kLanes; }
  const int8_t* panel_quants(int64_t p) const { return panel_q + p * K * kLanes; }
  const float* panel_d(int64_t p) const { return panel_f + p * panel_floats(); }
  // Panel p's sums over units of `unit` (32 or 16) elements (q8_1: the Q8_1 block sums).
  const float* panel_sums(int64_t p, int64_t unit, bool q8_1) const {
    const int64_t before = K / x_block + (unit == kBlock ? (q8_1 ? K / kBlock + K / 16 : 0) : K / kBlock);
    return panel_d(p) + before * kLanes;
  }
};

RZ_INLINE float max_abs(const float* x, int64_t n) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  __m256 amax = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, _mm256_loadu_ps(x + i)));
  __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(amax, 1), _mm256_castps256_ps128(amax));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  return _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
}

// Quantize row m of x (x == nullptr: a zero padding row) into qx's layout, rounding as
// llama.cpp's quantize_row_q8_0 / q8_1 / q8_K: q = round(x * 127 / amax), scale amax / 127.
// A 32-element scale is stored as llama.cpp's block_q8_0 stores it, rounded to f16 (the quants
// are computed before that rounding, as there). Every block's dot is scaled by it, so keeping it
// in f32 moved each matmul's outputs away from llama.cpp's by ~1e-4 relative: at every step of a
// decode, enough to turn near-ties of the greedy choice.
RZ_INLINE float round_to_f16(float v) { return _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT)); }

void quantize_row(const float* x, const QuantizedX& qx, int64_t m) {
  const int64_t K = qx.K, nb = K / kBlock, per_scale = qx.x_block / kBlock, group = qx.group;
  const int64_t m0 = qx.group_start(m), i = m - m0;
  int8_t* q = qx.q + m0 * K + i * kBlock;
  float* d = qx.d + m0 * (K / qx.x_block) + i;
  float* sum32 = qx.sum32 + m * QuantizedX::padded_units(nb);
  float* sum32_q8_1 = qx.sum32_q8_1 ? qx.sum32_q8_1 + m * QuantizedX::padded_units(nb) : nullptr;
  float* sum16 = qx.sum16 + m * QuantizedX::padded_units(K / 16);
  std::fill(sum32 + nb, sum32 + QuantizedX::padded_units(nb), 0.0f);
  if (sum32_q8_1) std::fill(sum32_q8_1 + nb, sum32_q8_1 + QuantizedX::padded_units(nb), 0.0f);
  std::fill(sum16 + K / 16, sum16 + QuantizedX::padded_units(K / 16), 0.0f);
  static const float zero_block[kBlock] = {};
  float scale = 0, rounded_scale = 0;
  __m256 inverse = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x ? x + b * kBlock : zero_block;
    if (b % per_scale == 0) {
      const float amax = x ? max_abs(x + b * kBlock, qx.x_block) : 0.0f;
      scale = amax / 127.0f;
      rounded_scale = qx.x_block == kBlock ? round_to_f16(scale) : scale;
      inverse = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
      d[b / per_scale * group] = rounded_scale;
    }
    __m256i i32[4];
    for (int j = 0; j < 4; ++j) {
      const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xb + 8 * j), inverse);
      i32[j] = _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    const int32_t low_sum = hsum_i32(_mm256_add_epi32(i32[0], i32[1]));
    const int32_t high_sum = hsum_i32(_mm256_add_epi32(i32[2], i32[3]));
    // packs interleaves 128-bit lanes; the permute restores element order.
    __m256i i8 = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
    store(q + b * group * kBlock, _mm256_permutevar8x32_epi32(i8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    sum16[2 * b] = rounded_scale * static_cast<float>(low_sum);
    sum16[2 * b + 1] = rounded_scale * static_cast<float>(high_sum);
    sum32[b] = rounded_scale * static_cast<float>(low_sum + high_sum);
    if (sum32_q8_1) sum32_q8_1[b] = round_to_f16(scale * static_cast<float>(low_sum + high_sum));
  }
}

// Row m of qx (quantized, 32-element blocks) into the paired layout.
void pair_row(const QuantizedX& qx, int64_t m) {
  const int64_t m0 = qx.group_start(m), i = m - m0, group = qx.group;
  const int8_t* q = qx.q_group(m0) + i * kBlock;
  const float* d = qx.d_group(m0) + i;
  for (int64_t p = 0; p < qx.K / 64; ++p) {
    const __m256i b0 = load(q + 2 * p * group * kBlock), b1 = load(q + (2 * p + 1) * group * kBlock);
    int8_t* out = qx.pq + m0 * qx.K + (p * group + i) * 64;
    store(out, _mm256_permute2x128_si256(b0, b1, 0x20));
    store(out + 32, _mm256_permute2x128_si256(b0, b1, 0x31));
    float* scales = qx.pd + m0 * (qx.K / 64) * 8 + (p * group + i) * 8;
    _mm256_storeu_ps(scales, _mm256_set_m128(_mm_set1_ps(d[(2 * p + 1) * group]), _mm_set1_ps(d[2 * p * group])));
  }
}

// Panel p of qx's rows (quantized) into the panel layout; rows past the quantized ones (M
// rounded up to kRowGroup) are zeros.
void panel(const QuantizedX& qx, int64_t p, int64_t M) {
  const int64_t K = qx.K, rows = QuantizedX::padded_rows(M), n_scales = K / qx.x_block;
  int32_t* q = reinterpret_cast<int32_t*>(qx.panel_q + p * K * kLanes);
  float* d = qx.panel_f + p * qx.panel_floats();
  float* sum32 = d + n_scales * kLanes;
  float* sum16 = sum32 + K / kBlock * kLanes;
  float* sum32_q8_1 = qx.sum32_q8_1 ? sum16 + K / 16 * kLanes : nullptr;
  for (int64_t i = 0; i < kLanes; ++i) {
    const int64_t m = p * kLanes + i;
    if (m >= rows) {
      for (int64_t t = 0; t < K / 4; ++t) q[t * kLanes + i] = 0;
      for (int64_t s = 0; s < n_scales; ++s) d[s * kLanes + i] = 0.0f;
      for (int64_t b = 0; b < K / kBlock; ++b) sum32[b * kLanes + i] = 0.0f;
      for (int64_t b = 0; b < K / 16; ++b) sum16[b * kLanes + i] = 0.0f;
      if (sum32_q8_1) for (int64_t b = 0; b < K / kBlock; ++b) sum32_q8_1[b * kLanes + i] = 0.0f;
      continue;
    }
    const int64_t m0 = qx.group_start(m);
    const int8_t* row = qx.q_group(m0) + (m - m0) * kBlock;
    for (int64_t b = 0; b < K / kBlock; ++b) {
      int32_t quads[kBlock / 4];
      std::memcpy(quads, row + b * qx.group * kBlock, kBlock);
      for (int64_t t = 0; t < kBlock / 4; ++t) q[(b * kBlock / 4 + t) * kLanes + i] = quads[t];
    }
    for (int64_t s = 0; s < n_scales; ++s) d[s * kLanes + i] = qx.d_group(m0)[s * qx.group + (m - m0)];
    for (int64_t b = 0; b < K / kBlock; ++b) sum32[b * kLanes + i] = qx.sums(m, kBlock)[b];
    for (int64_t b = 0; b < K / 16; ++b) sum16[b * kLanes + i] = qx.sums(m, 16)[b];
    if (sum32_q8_1) for (int64_t b = 0; b < K / kBlock; ++b) sum32_q8_1[b * kLanes + i] = qx.block_sums(m, true)[b];
  }
}

// ---------------------------------------------------------------------------------------------
// Weights: a view of a type's arrays (row-major [N, K/block * items]) per type.
//
// 32-block types have
//   for_blocks(n, f): f(b, u) for each 32-block b of row n, u its quants as bytes in element
//     order (unsigned, or two's complement if kSigned);
//   scales_row(n, scales, offsets): each block's float scale and offset: w = scale * u + offset.
// K-quants have
//   for_super(n, s, f): f(j, u) for the 8 sub-blocks j of super-block s of row n;
//   super_row(n, words, offsets, d): each unit's integer sub-scale as an int16 pair (madd's
//     multiplier), each unit's float offset, each super-block's float scale:
//     w = d * word * u + offset, per unit of kUnit (32, or 16 for Q6_K) weights.

// 16 bytes whose low nibbles hold elements 0-15 and high nibbles elements 16-31 -> 32 quants.
RZ_INLINE __m256i nibbles_32(const uint8_t* p) {
  const __m128i t = load_128(p);
  return low_nibbles(_mm256_set_m128i(_mm_srli_epi16(t, 4), t));
}

// Bit i of a 32-bit word -> 0x10 in byte i (the fifth bit of Q5_0/Q5_1 quants).
RZ_INLINE __m256i fifth_bits_32(uint32_t bits) {
  const __m256i shuffle = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int32_t>(bits)), shuffle);
  bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_and_si256(_mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(0x10));
}

// n f16 values times `factor` -> f32. A row's last partial vector overlaps the previous one
// rather than going scalar: rows are short (K/32 = 20 scales for K = 640).
RZ_INLINE void f16_row(const uint16_t* h, int64_t n, float factor, float* out) {
  const __m256 f = _mm256_set1_ps(factor);
  if (n < 8) {
    for (int64_t i = 0; i < n; ++i) out[i] = factor * f16_to_f32(h[i]);
    return;
  }
  for (int64_t i = 0;; i += 8) {
    i = std::min(i, n - 8);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(f, _mm256_cvtph_ps(load_128(h + i))));
    if (i == n - 8) break;
  }
}

// Ask for [p, p + bytes) to be brought into the cache ahead of its use.
RZ_INLINE void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
}

// Each int32 lane of v (a small integer) twice as int16: a madd multiplier.
RZ_INLINE __m256i twice_16(__m256i v) { return _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(v, 16)); }

// Paired types (kPaired) have
//   pair(n, p, lo, hi): blocks 2p and 2p + 1 of row n from one 256-bit load, lo = elements 0-15
//     of each (one block per 128-bit lane), hi = elements 16-31, as unsigned quants;
//   d_row(n): the f16 block scales, read two at a time by pair_scales.

// 32 bytes of two blocks' nibbles -> their low halves (lo) and high halves (hi), a block per lane.
RZ_INLINE void nibble_pair(const uint8_t* q, __m256i& lo, __m256i& hi) {
  const __m256i v = load(q);
  lo = low_nibbles(v);
  hi = high_nibbles(v);
}

// Two f16 block scales -> [d_0 x4, d_1 x4], the lanes of a pair's int32 dots.
RZ_INLINE __m256 pair_scales(const uint16_t* d) {
  const __m128 two = _mm_cvtph_ps(_mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(d)));
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

struct Q4_0W {
  static constexpr bool kSuperBlocks = false;
  static constexpr int64_t kUnit = kBlock;  // per weight scale
  static constexpr bool kSigned = false;
  const uint8_t* qs;
  const uint16_t* d;
  int64_t K;
  template <class F>
  RZ_INLINE void for_blocks(int64_t n, F&& f) const {
    const uint8_t* q = qs + n * K / 2;
    for (int64_t b = 0; b < K / kBlock; ++b) f(b, nibbles_32(q + 16 * b));
  }
  RZ_INLINE __m256i block(int64_t n, int64_t b) const { return nibbles_32(qs + n * K / 2 + 16 * b); }
  static constexpr float kOffsetFactor = -8.0f;
  static constexpr bool kQ8_1 = false;  // meets llama.cpp's Q8_0 activations
  RZ_INLINE const uint16_t* d_row(int64_t n) const { return d + n * (K / kBlock); }
  RZ_INLINE const uint16_t* offset_row(int64_t n) const { return d_row(n); }
  static constexpr bool kPaired = true;
  RZ_INLINE void pair(int64_t n, int64_t p, __m256i& lo, __m256i& hi) const { nibble_pair(qs + n * K / 2 + 32 * p, lo, hi); }
  RZ_INLINE void prefetch_row(int64_t n) const {
    prefetch(qs + n * K / 2, K / 2);
    prefetch(d + n * (K / kBlock), K / kBlock * 2);
  }
  RZ_INLINE void scales_row(int64_t n, float* scales, float* offsets) const {
    f16_row(d + n * (K / kBlock), K / kBlock, 1.0f, scales);
    f16_row(d + n * (K / kBlock), K / kBlock, -8.0f, offsets);
  }
};

struct Q4_1W {
  static constexpr bool kSuperBlocks = false;
  static constexpr int64_t kUnit = kBlock;  // per weight scale
  static constexpr bool kSigned = false;
  const uint8_t* qs;
  const uint16_t* d;
  const uint16_t* mins;
  int64_t K;
  template <class F>
  RZ_INLINE void for_blocks(int64_t n, F&& f) const {
    const uint8_t* q = qs + n * K / 2;
    for (int64_t b = 0; b < K / kBlock; ++b) f(b, nibbles_32(q + 16 * b));
  }
  RZ_INLINE __m256i block(int64_t n, int64_t b) const { return nibbles_32(qs + n * K / 2 + 16 * b); }
  static constexpr float kOffsetFactor = 1.0f;
  static constexpr bool kQ8_1 = true;
  RZ_INLINE const uint16_t* d_row(int64_t n) const { return d + n * (K / kBlock); }
  RZ_INLINE const uint16_t* offset_row(int64_t n) const { return mins + n * (K / kBlock); }
  static constexpr bool kPaired = true;
  RZ_INLINE void pair(int64_t n, int64_t p, __m256i& lo, __m256i& hi) const { nibble_pair(qs + n * K / 2 + 32 * p, lo, hi); }
  RZ_INLINE void prefetch_row(int64_t n) const {
    prefetch(qs + n * K / 2, K / 2);
    prefetch(d + n * (K / kBlock), K / kBlock * 2);
    prefetch(mins + n * (K / kBlock), K / kBlock * 2);
  }
  RZ_INLINE void scales_row(int64_t n, float* scales, float* offsets) const {
    f16_row(d + n * (K / kBlock), K / kBlock, 1.0f, scales);
    f16_row(mins + n * (K / kBlock), K / kBlock, 1.0f, offsets);
  }
};

template <bool kMin>
struct Q5W {  // Q5_0 (offset -16 d) and Q5_1 (offset m)
  static constexpr bool kSuperBlocks = false;
  static constexpr int64_t kUnit = kBlock;  // per weight scale
  static constexpr bool kSigned = false;
  const uint8_t* qs;
  const uint32_t* qh;
  const uint16_t* d;
  const uint16_t* mins;
  int64_t K;
  template <class F>
  RZ_INLINE void for_blocks(int64_t n, F&& f) const {
    const uint8_t* q = qs + n * K / 2;
    const uint32_t* h = qh + n * (K / kBlock);
    for (int64_t b = 0; b < K / kBlock; ++b) f(b, _mm256_or_si256(nibbles_32(q + 16 * b), fifth_bits_32(h[b])));
  }
  RZ_INLINE __m256i block(int64_t n, int64_t b) const {
    return _mm256_or_si256(nibbles_32(qs + n * K / 2 + 16 * b), fifth_bits_32(qh[n * (K / kBlock) + b]));
  }
  static constexpr float kOffsetFactor = kMin ? 1.0f : -16.0f;
  static constexpr bool kQ8_1 = kMin;
  RZ_INLINE const uint16_t* d_row(int64_t n) const { return d + n * (K / kBlock); }
  RZ_INLINE const uint16_t* offset_row(int64_t n) const { return (kMin ? mins : d) + n * (K / kBlock); }
  // As Q4's pair, with the fifth bits of the two blocks' low halves (bits 0-15 of each block's word)
  // and of their high halves (bits 16-31) gathered into one word each.
  static constexpr bool kPaired = true;
  RZ_INLINE void pair(int64_t n, int64_t p, __m256i& lo, __m256i& hi) const {
    nibble_pair(qs + n * K / 2 + 32 * p, lo, hi);
    const uint32_t* h = qh + n * (K / kBlock) + 2 * p;
    lo = _mm256_or_si256(lo, fifth_bits_32((h[0] & 0xFFFFu) | (h[1] << 16)));
    hi = _mm256_or_si256(hi, fifth_bits_32((h[0] >> 16) | (h[1] & 0xFFFF0000u)));
  }
  RZ_INLINE void prefetch_row(int64_t n) const {
    prefetch(qs + n * K / 2, K / 2);
    prefetch(qh + n * (K / kBlock), K / kBlock * 4);
    prefetch(d + n * (K / kBlock), K / kBlock * 2);
    if constexpr (kMin) prefetch(mins + n * (K / kBlock), K / kBlock * 2);
  }
  RZ_INLINE void scales_row(int64_t n, float* scales, float* offsets) const {
    f16_row(d + n * (K / kBlock), K / kBlock, 1.0f, scales);
    if constexpr (kMin) f16_row(mins + n * (K / kBlock), K / kBlock, 1.0f, offsets);
    else f16_row(d + n * (K / kBlock), K / kBlock, -16.0f, offsets);
  }
};

struct Q8_0W {
  static constexpr bool kSuperBlocks = false;
  static constexpr int64_t kUnit = kBlock;  // per weight scale
  static constexpr bool kSigned = true;
  const int8_t* qs;
  const uint16_t* d;
  int64_t K;
  template <class F>
  RZ_INLINE void for_blocks(int64_t n, F&& f) const {
    const int8_t* q = qs + n * K;
    for (int64_t b = 0; b < K / kBlock; ++b) f(b, load(q + kBlock * b));
  }
  RZ_INLINE __m256i block(int64_t n, int64_t b) const { return load(qs + n * K + kBlock * b); }
  static constexpr float kOffsetFactor = 0.0f;
  static constexpr bool kQ8_1 = false;
  RZ_INLINE const uint16_t* d_row(int64_t n) const { return d + n * (K / kBlock); }
  RZ_INLINE const uint16_t* offset_row(int64_t n) const { return d_row(n); }
  // Two loads, their 128-bit halves regathered a block per lane (signed quants): the products of
  // a pair then take two madds, not one (two blocks' int16 sums could overflow), but share one
  // convert, scale and FMA, which is what bounds a step of several rows on the LM head.
  static constexpr bool kPaired = true;
  RZ_INLINE void pair(int64_t n, int64_t p, __m256i& lo, __m256i& hi) const {
    const __m256i a = load(qs + n * K + 64 * p), b = load(qs + n * K + 64 * p + 32);
    lo = _mm256_permute2x128_si256(a, b, 0x20);
    hi = _mm256_permute2x128_si256(a, b, 0x31);
  }
  RZ_INLINE void prefetch_row(int64_t n) const {
    prefetch(qs + n * K, K);
    prefetch(d + n * (K / kBlock), K / kBlock * 2);
  }
  RZ_INLINE void scales_row(int64_t n, float* scales, float*) const { f16_row(d + n * (K / kBlock), K / kBlock, 1.0f, scales); }
};

// Q4_K and Q5_K: w = d * scale * q - dmin * min per 32-element sub-block.
template <bool kFifthBit>
struct QK_W {
  static constexpr bool kPaired = false;
  static constexpr bool kSuperBlocks = true;
  static constexpr bool kQ8_1 = false;
  static constexpr int64_t kUnit = 32;
  const uint8_t* qs;      // K/2, nibble-planar in groups of 64
  const uint8_t* qh;      // K/8, bit-planar in groups of 256 (Q5_K only)
  const uint8_t* scales;  // K/32
  const uint8_t* mins;    // K/32
  const uint16_t* d;      // K/256
  const uint16_t* dmin;   // K/256
  int64_t K;

  template <int kBit>
  static RZ_INLINE __m256i fifth_bit(__m256i h) {
    // Bit kBit of each byte to 0x10; 16-bit shifts are safe because the mask drops what crosses bytes.
    if constexpr (kBit < 4) return _mm256_and_si256(_mm256_slli_epi16(h, 4 - kBit), _mm256_set1_epi8(0x10));
    else if constexpr (kBit == 4) return _mm256_and_si256(h, _mm256_set1_epi8(0x10));
    else return _mm256_and_si256(_mm256_srli_epi16(h, kBit - 4), _mm256_set1_epi8(0x10));
  }

  template <int kPair, class F>
  static RZ_INLINE void pair(const uint8_t* q, __m256i h, F& f) {
    const __m256i v = load(q + 32 * kPair);
    __m256i u0 = low_nibbles(v), u1 = high_nibbles(v);
    if constexpr (kFifthBit) {
      u0 = _mm256_or_si256(u0, fifth_bit<2 * kPair>(h));
      u1 = _mm256_or_si256(u1, fifth_bit<2 * kPair + 1>(h));
    }
    f(2 * kPair, u0);
    f(2 * kPair + 1, u1);
  }

  // Super-block `super` (counted over the whole weight: rows are contiguous) into the cache.
  RZ_INLINE void prefetch_super(int64_t super) const {
    prefetch(qs + super * 128, 128);
    if constexpr (kFifthBit) prefetch(qh + super * 32, 32);
    prefetch(scales + super * 8, 8);
    prefetch(mins + super * 8, 8);
    prefetch(d + super, 2);
    prefetch(dmin + super, 2);
  }

  template <class F>
  RZ_INLINE void for_super(int64_t n, int64_t s, F&& f) const {
    const int64_t super = n * (K / kSuper) + s;
    const uint8_t* q = qs + super * 128;
    const __m256i h = kFifthBit ? load(qh + super * 32) : _mm256_setzero_si256();
    pair<0>(q, h, f);
    pair<1>(q, h, f);
    pair<2>(q, h, f);
    pair<3>(q, h, f);
  }

  RZ_INLINE void super_row(int64_t n, int32_t* words, float* offsets, float* super_d) const {
    const int64_t n_super = K / kSuper;
    for (int64_t s = 0; s < n_super; ++s) {
      const int64_t super = n * n_super + s;
      store(words + 8 * s, twice_16(_mm256_cvtepu8_epi32(load_64(scales + super * 8))));
      const __m256 m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(load_64(mins + super * 8)));
      _mm256_storeu_ps(offsets + 8 * s, _mm256_mul_ps(m, _mm256_set1_ps(-f16_to_f32(dmin[super]))));
      super_d[s] = f16_to_f32(d[super]);
    }
  }
};

// Q6_K: w = d * scale * (q - 32), 6-bit q, one int8 scale per 16 elements.
struct Q6_KW {
  static constexpr bool kPaired = false;
  static constexpr bool kSuperBlocks = true;
  static constexpr bool kQ8_1 = false;
  static constexpr int64_t kUnit = 16;
  const uint8_t* qs;     // K/2, nibble-planar in groups of 128
  const uint8_t* qh;     // K/4, 2-bit planes in groups of 128
  const int8_t* scales;  // K/16
  const uint16_t* d;     // K/256
  int64_t K;

  template <int kPlane>
  static RZ_INLINE __m256i high_bits(__m256i h) {
    // Bits [2 kPlane, 2 kPlane + 2) of each byte to bits 4-5.
    const __m256i mask = _mm256_set1_epi8(0x30);
    if constexpr (kPlane == 0) return _mm256_and_si256(_mm256_slli_epi16(h, 4), mask);
    else if constexpr (kPlane == 1) return _mm256_and_si256(_mm256_slli_epi16(h, 2), mask);
    else if constexpr (kPlane == 2) return _mm256_and_si256(h, mask);
    else return _mm256_and_si256(_mm256_srli_epi16(h, 2), mask);
  }

  RZ_INLINE void prefetch_super(int64_t super) const {  // as QK_W's
    prefetch(qs + super * 128, 128);
    prefetch(qh + super * 64, 64);
    prefetch(scales + super * 16, 16);
    prefetch(d + super, 2);
  }

  template <class F>
  RZ_INLINE void for_super(int64_t n, int64_t s, F&& f) const {
    const int64_t super = n * (K / kSuper) + s;
#pragma GCC unroll 2
    for (int g = 0; g < 2; ++g) {
      const uint8_t* q = qs + super * 128 + g * 64;
      const __m256i q0 = load(q), q1 = load(q + 32);
      const __m256i h = load(qh + super * 64 + g * 32);
      f(4 * g, _mm256_or_si256(low_nibbles(q0), high_bits<0>(h)));
      f(4 * g + 1, _mm256_or_si256(low_nibbles(q1), high_bits<1>(h)));
      f(4 * g + 2, _mm256_or_si256(high_nibbles(q0), high_bits<2>(h)));
      f(4 * g + 3, _mm256_or_si256(high_nibbles(q1), high_bits<3>(h)));
    }
  }

  RZ_INLINE void super_row(int64_t n, int32_t* words, float* offsets, float* super_d) const {
    const int64_t n_super = K / kSuper;
    for (int64_t s = 0; s < n_super; ++s) {
      const int64_t super = n * n_super + s;
      const __m128i sc16 = load_128(scales + super * 16);
      const __m256i low = _mm256_cvtepi8_epi32(sc16), high = _mm256_cvtepi8_epi32(_mm_srli_si128(sc16, 8));
      store(words + 16 * s, twice_16(low));
      store(words + 16 * s + 8, twice_16(high));
      const float dn = f16_to_f32(d[super]);
      const __m256 to_offset = _mm256_set1_ps(-32.0f * dn);
      _mm256_storeu_ps(offsets + 16 * s, _mm256_mul_ps(to_offset, _mm256_cvtepi32_ps(low)));
      _mm256_storeu_ps(offsets + 16 * s + 8, _mm256_mul_ps(to_offset, _mm256_cvtepi32_ps(high)));
      super_d[s] = dn;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// A weight row's scales and offsets, per task.
//   32-block types, few activation rows: none; fused_row reads the f16 scales where it uses them.
//   32-block types, many rows: int16 multipliers relative to the row's largest scale, so that the
//     weight scale rides in the madd and costs nothing in the inner loop (compute_words). 14 bits
//     keep the madd within int32 (|maddubs pair| <= 2 * 128 * 127) and put each scale within
//     2^-15 of the row's largest: below the f16 scales' own precision where it matters, and far
//     below the activations' quantization error.
//   K-quants: their integer sub-scales as multipliers, and float super-block scales (compute_super).

constexpr float kScaleWordMax = 16383.0f;

struct RowScales {
  std::vector<float> scales;   // per 32-block, K/32 + 8 (the tail zeroed to a multiple of 8)
  std::vector<float> offsets;  // per unit (16 or 32 weights), zero-padded to a multiple of 8
  std::vector<int32_t> words;  // per unit: an int16 multiplier, twice
  std::vector<float> super_d;  // per super-block
  float factor = 1;            // weight = factor * word * u + offset (32-block types)

  explicit RowScales(int64_t K) : scales(K / kBlock + 8), offsets(K / 16 + 8, 0.0f), words(K / 16 + 8), super_d(K / kSuper + 1) {}

  template <class W>
  void compute_words(const W& w, int64_t n, int64_t K) {
    w.scales_row(n, scales.data(), offsets.data());
    const int64_t nb = K / kBlock, padded = QuantizedX::padded_units(nb);
    float* s = scales.data();
    std::fill(s + nb, s + padded, 0.0f);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 vmax = _mm256_setzero_ps();
    for (int64_t i = 0; i < padded; i += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(abs_mask, _mm256_loadu_ps(s + i)));
    __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(vmax, 1), _mm256_castps256_ps128(vmax));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float max_scale = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    const __m256 to_word = _mm256_set1_ps(max_scale > 0 ? kScaleWordMax / max_scale : 0.0f);
    factor = max_scale / kScaleWordMax;
    for (int64_t i = 0; i < padded; i += 8) store(words.data() + i, twice_16(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(s + i), to_word))));
  }

  template <class W>
  RZ_INLINE void compute_super(const W& w, int64_t n) {
    w.super_row(n, words.data(), offsets.data(), super_d.data());
  }

  // Block b's madd multipliers: one unit's over the block, or two (kUnit 16) over its halves.
  template <int64_t kUnit>
  RZ_INLINE __m256i block_words(int64_t b) const {
    if constexpr (kUnit == 32) {
      return _mm256_set1_epi32(words[b]);
    } else {
      const __m256i two = _mm256_castsi128_si256(load_64(words.data() + 2 * b));
      return _mm256_permutevar8x32_epi32(two, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    }
  }
};

// ---------------------------------------------------------------------------------------------
// The dot products.

// The int32 dots of weight block u with the group's MT activation blocks at xq, added to dots:
// each pair of products times the weight's int16 multipliers `words` (kWords), or plain.
template <int MT, bool kSigned, bool kWords>
RZ_INLINE void block_dots(__m256i (&dots)[MT], __m256i u, __m256i words, const int8_t* xq) {
  const __m256i magnitude = kSigned ? _mm256_sign_epi8(u, u) : u;
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i) {
    const __m256i xv = load(xq + kBlock * i);
    const __m256i signed_x = kSigned ? _mm256_sign_epi8(xv, u) : xv;
    dots[i] = kWords ? rz_cpu::dot_u8s8_words(dots[i], magnitude, signed_x, words) : rz_cpu::dot_u8s8(dots[i], magnitude, signed_x);
  }
}

// What a row's offsets (zero points, mins) add to its dot with an activation row: the dot of the
// per-unit offsets with the activations' per-unit sums, both zero-padded to a multiple of 8.
RZ_INLINE float offset_dot(const float* offsets, const float* sums, int64_t n_units) {
  __m256 total[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t u = 0;
  for (; u + 16 <= n_units; u += 16) {
    total[0] = _mm256_fmadd_ps(_mm256_loadu_ps(offsets + u), _mm256_loadu_ps(sums + u), total[0]);
    total[1] = _mm256_fmadd_ps(_mm256_loadu_ps(offsets + u + 8), _mm256_loadu_ps(sums + u + 8), total[1]);
  }
  if (u < n_units) total[0] = _mm256_fmadd_ps(_mm256_loadu_ps(offsets + u), _mm256_loadu_ps(sums + u), total[0]);
  return hsum(_mm256_add_ps(total[0], total[1]));
}

// y[m0 + r0 + i, n] = factor * (the lanes of acc[i]) + the offsets' share, for the MT rows.
template <int MT, int64_t kUnit, bool kOffsets>
RZ_INLINE void store_row(const __m256 (&acc)[MT], float factor, const RowScales& rs, const QuantizedX& x, int64_t m0, int64_t r0, int64_t n, float* y, int64_t N) {
  const int64_t n_units = QuantizedX::padded_units(x.K / kUnit);
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i) {
    const int64_t m = m0 + r0 + i;
    y[m * N + n] = factor * hsum(acc[i]) + (kOffsets ? offset_dot(rs.offsets.data(), x.sums(m, kUnit), n_units) : 0.0f);
  }
}

// sum_u f16 h[u] * sums[u] for n units.
RZ_INLINE float offset_dot_f16(const uint16_t* h, const float* sums, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t u = 0;
  for (; u + 8 <= n; u += 8) acc = _mm256_fmadd_ps(_mm256_cvtph_ps(load_128(h + u)), _mm256_loadu_ps(sums + u), acc);
  float total = hsum(acc);
  for (; u < n; ++u) total += f16_to_f32(h[u]) * sums[u];
  return total;
}

// Per-lane partial sums of f16 h[u] * sums[u] over n units (sums zero-padded to a multiple of 8;
// h is not, so its last partial vector comes from a zero-padded copy).
RZ_INLINE __m256 offset_lanes(const uint16_t* h, const float* sums, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t u = 0;
  for (; u + 8 <= n; u += 8) acc = _mm256_fmadd_ps(_mm256_cvtph_ps(load_128(h + u)), _mm256_loadu_ps(sums + u), acc);
  if (u < n && n >= 8) {
    // The last 8 units, their first 8 - (n - u) lanes (counted above) masked off: a copy of the
    // tail into a zeroed buffer stalls on store forwarding, every row.
    static const int32_t kLanes[16] = {0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1};
    const __m256 keep = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLanes + (n - u))));
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(load_128(h + n - 8)), _mm256_and_ps(keep, _mm256_loadu_ps(sums + n - 8)), acc);
  } else if (u < n) {
    alignas(16) uint16_t tail[8] = {};
    for (int64_t t = u; t < n; ++t) tail[t - u] = h[t];
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(load_128(tail)), _mm256_loadu_ps(sums + u), acc);
  }
  return acc;
}

// 32-block types, few activation rows (a decode step): each weight block decoded and used at
// once, the weight scale times the activation block's applied in the FMA. Scales are read from
// their f16s: a float row written just before and read back costs a store-to-load round trip
// per block (2x on a hot 576 x 576 Q4_1).
template <int MT, class W>
RZ_INLINE void fused_row(const W& w, int64_t n, const QuantizedX& x, int64_t m0, float* y, int64_t N) {
  __m256 acc[MT];
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps();
  const int8_t* xq = x.q_group(m0);
  const float* xd = x.d_group(m0);
  const uint16_t* d = w.d_row(n);
  w.for_blocks(n, [&](int64_t b, __m256i u) __attribute__((always_inline)) {
    const __m256 weight_scale = _mm256_set1_ps(f16_to_f32(d[b]));
    const __m256i magnitude = W::kSigned ? _mm256_sign_epi8(u, u) : u;
    const int8_t* xb = xq + b * x.group * kBlock;
    // Each row's dot goes straight into its accumulator: all eight dots computed first, then
    // accumulated, kept 8 dots and 8 accumulators live and spilled three of them.
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) {
      const __m256i xv = load(xb + kBlock * i);
      const __m256i dot = rz_cpu::dot_u8s8(_mm256_setzero_si256(), magnitude, W::kSigned ? _mm256_sign_epi8(xv, u) : xv);
      const __m256 scale = _mm256_mul_ps(weight_scale, _mm256_broadcast_ss(xd + b * x.group + i));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[i]);
    }
  });
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i) {
    float value = hsum(acc[i]);
    if constexpr (!W::kSigned) value += W::kOffsetFactor * offset_dot_f16(w.offset_row(n), x.block_sums(m0 + i, W::kQ8_1), x.K / kBlock);
    y[(m0 + i) * N + n] = value;
  }
}

// Paired types, few activation rows, in pairs of blocks: R weight rows against the MT activation
// rows of the group at m0 (paired layout). For 4- and 5-bit types one load gives two blocks'
// nibbles; their products go through maddubs, add in int16 (|sum| <= 2 * 2 * 31 * 127), one madd
// to int32 (lanes 0-3 block 2p, lanes 4-7 block 2p + 1), and one convert and FMA with the pair's
// scales: per block about two thirds of the instructions of the one-block loop. Q8_0's halves
// take a madd each (their int16 sums could overflow) and share the rest: its LM head at 8 rows
// measured faster than one block at a time.
template <int R, int MT, class W>
RZ_INLINE void paired_tile(const W& w, int64_t n, const QuantizedX& x, int64_t m0, float* y, int64_t N) {
  static_assert((R == 1 && MT <= kRowGroup) || (R <= 4 && MT == 1), "the two shapes the epilogues serve");
  __m256 acc[R][MT];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) acc[r][i] = _mm256_setzero_ps();
  }
  const int8_t* xq = x.pq_group(m0);
  const float* xd = x.pd_group(m0);
  for (int64_t p = 0; p < x.K / 64; ++p, xq += x.group * 64, xd += x.group * 8) {
    __m256i lo[R], hi[R];
    __m256 weight_scales[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      w.pair(n + r, p, lo[r], hi[r]);
      weight_scales[r] = pair_scales(w.d_row(n + r) + 2 * p);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) {
      const __m256i x_lo = load(xq + 64 * i), x_hi = load(xq + 64 * i + 32);
      const __m256 x_scales = _mm256_loadu_ps(xd + 8 * i);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        __m256i dots;
        if constexpr (W::kSigned) {
          // The sign trick per half (the magnitudes are the same for every row: hoisted).
          dots = rz_cpu::dot_u8s8_2<true>(_mm256_sign_epi8(lo[r], lo[r]), _mm256_sign_epi8(x_lo, lo[r]), _mm256_sign_epi8(hi[r], hi[r]), _mm256_sign_epi8(x_hi, hi[r]));
        } else {
          dots = rz_cpu::dot_u8s8_2<false>(lo[r], x_lo, hi[r], x_hi);
        }
        acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_mul_ps(weight_scales[r], x_scales), acc[r][i]);
      }
    }
  }
  // Each output is the lane sum of its accumulator plus its offsets' per-lane share, summed in the
  // same order whatever the shape (so a sequence's logits do not depend on the batch it is in),
  // several outputs per vector: with K = 576 a row is 9 pairs of blocks, and one output at a
  // time (two horizontal sums, a dot) cost about as much as the dots.
  const int64_t nb = x.K / kBlock;
  const __m256 factor = _mm256_set1_ps(W::kOffsetFactor);
  if constexpr (MT > 1) {
    // Lane i: activation row m0 + i.
    const uint16_t* offsets = w.offset_row(n);
    __m256 rows[kRowGroup];
#pragma GCC unroll 8
    for (int i = 0; i < kRowGroup; ++i) {
      if (i >= MT) rows[i] = _mm256_setzero_ps();
      else if constexpr (W::kSigned) rows[i] = acc[0][i];  // no offsets
      else rows[i] = _mm256_fmadd_ps(factor, offset_lanes(offsets, x.block_sums(m0 + i, W::kQ8_1), nb), acc[0][i]);
    }
    alignas(32) float out[kRowGroup];
    _mm256_store_ps(out, hsum_8x8(rows));
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) y[(m0 + i) * N + n] = out[i];
  } else {
    // Lane r: weight row n + r, one activation row. Fewer than 4 rows take the same lanes.
    const float* sums = x.block_sums(m0, W::kQ8_1);
    __m256 rows[4];
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      if (r >= R) rows[r] = _mm256_setzero_ps();
      else if constexpr (W::kSigned) rows[r] = acc[r][0];
      else rows[r] = _mm256_fmadd_ps(factor, offset_lanes(w.offset_row(n + r), sums, nb), acc[r][0]);
    }
    if constexpr (R == 4) {
      _mm_storeu_ps(y + m0 * N + n, hsum_4x8(rows));
    } else {
      alignas(16) float out[4];
      _mm_store_ps(out, hsum_4x8(rows));
      for (int r = 0; r < R; ++r) y[m0 * N + n + r] = out[r];
    }
  }
}

// One weight row against the activation rows [m0, m1) of one group.
template <class W>
RZ_INLINE void paired_row(const W& w, int64_t n, const QuantizedX& x, int64_t m0, int64_t m1, float* y, int64_t N) {
  switch (m1 - m0) {
    case 8: paired_tile<1, 8>(w, n, x, m0, y, N); break;
    case 7: paired_tile<1, 7>(w, n, x, m0, y, N); break;
    case 6: paired_tile<1, 6>(w, n, x, m0, y, N); break;
    case 5: paired_tile<1, 5>(w, n, x, m0, y, N); break;
    case 4: paired_tile<1, 4>(w, n, x, m0, y, N); break;
    case 3: paired_tile<1, 3>(w, n, x, m0, y, N); break;
    case 2: paired_tile<1, 2>(w, n, x, m0, y, N); break;
    default: paired_tile<1, 1>(w, n, x, m0, y, N); break;
  }
}

// Rows [n0, n1) of a paired W against the activation rows [m0, m1) of one group (paired layout).
template <class W>
void paired_rows(const W& w, const QuantizedX& x, int64_t n0, int64_t n1, int64_t m0, int64_t m1, float* y, int64_t N) {
  constexpr int kRows = 4;  // weight rows per pass with one activation row
  int64_t n = n0;
  if (m1 - m0 == 1) {
    for (; n + kRows <= n1; n += kRows) {
      // Rows a few passes ahead: a row is a few cache lines, too short a stream for the hardware
      // prefetcher to ramp up on, and a decode step reads every weight from DRAM.
      for (int64_t r = n + 2 * kRows; r < std::min(n1, n + 3 * kRows); ++r) w.prefetch_row(r);
      paired_tile<kRows, 1>(w, n, x, m0, y, N);
    }
  }
  // Several activation rows: one weight row against all of them (measured faster than 2 x 4
  // or 1 x 4 tiles on a 1536 x 576 Q4_1).
  for (; n < n1; ++n) {
    if (n + 8 < n1) w.prefetch_row(n + 8);
    paired_row(w, n, x, m0, m1, y, N);
  }
}

// 32-block types, one activation row (a batch-1 decode step): R weight rows at a time, so that R
// independent accumulator chains hide the FMA latency (one row alone waits on it every block)
// and each activation block is loaded once for the R rows.
template <int R, class W>
RZ_INLINE void fused_rows_single_x(const W& w, int64_t n, const QuantizedX& x, int64_t m0, float* y, int64_t N) {
  __m256 acc[R];
  const uint16_t* d[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    d[r] = w.d_row(n + r);
  }
  const int8_t* xq = x.q_group(m0);
  const float* xd = x.d_group(m0);
  const int64_t nb = x.K / kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    const __m256 x_scale = _mm256_broadcast_ss(xd + b * x.group);
    const int8_t* xb = xq + b * x.group * kBlock;
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      __m256i dots[1] = {_mm256_setzero_si256()};
      block_dots<1, W::kSigned, false>(dots, w.block(n + r, b), _mm256_setzero_si256(), xb);
      // The scale straight from its f16: a float row written just before and read back here
      // costs a store-to-load round trip per block.
      const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(f16_to_f32(d[r][b])), x_scale);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[0]), scale, acc[r]);
    }
  }
  const float* sums = x.block_sums(m0, W::kQ8_1);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    float value = hsum(acc[r]);
    if constexpr (!W::kSigned) value += W::kOffsetFactor * offset_dot_f16(w.offset_row(n + r), sums, nb);
    y[m0 * N + n + r] = value;
  }
}

// 32-block types, many activation rows: the weight row decoded to bytes u once, then met by the
// groups, the weight scales riding in the madd.
template <int MT, bool kSigned>
RZ_INLINE void decoded_row(const uint8_t* u, const RowScales& rs, int64_t n, const QuantizedX& x, int64_t m0, float* y, int64_t N) {
  __m256 acc[MT];
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps();
  const int8_t* xq = x.q_group(m0);
  const float* xd = x.d_group(m0);
  for (int64_t b = 0; b < x.K / kBlock; ++b, xq += x.group * kBlock, xd += x.group) {
    __m256i dots[MT];
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) dots[i] = _mm256_setzero_si256();
    block_dots<MT, kSigned, true>(dots, load(u + kBlock * b), rs.block_words<kBlock>(b), xq);
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[i]), _mm256_broadcast_ss(xd + i), acc[i]);
  }
  store_row<MT, kBlock, !kSigned>(acc, rs.factor, rs, x, m0, 0, n, y, N);
}

// K-quants: the eight sub-block dots of a super-block add up in int32 (their integer sub-scales
// in the madd), then one convert and FMA with the super-block's scale times the activations'.
// quants(s, g) calls g(j, u) for the sub-blocks j of super-block s: decoded on the fly or loaded.
// The MT <= 4 rows start at row r0 of the group at m0 (at most 4: 2 * MT accumulators must stay
// in registers).
//
// A row's sub-block dots go into 4 / MT chains, summed at the super-block's end: with VNNI each
// dot is a vpdpwssd that accumulates in place, so with one chain per row every dot waits for the
// last one's result. Integer sums: any grouping gives the same bits.
template <int MT, int64_t kUnit, class Quants>
RZ_INLINE void super_row(Quants&& quants, const RowScales& rs, int64_t n, const QuantizedX& x, int64_t m0, int64_t r0, float* y, int64_t N) {
  static_assert(MT <= kSuperRows);
  constexpr int kChains = MT == 1 ? 4 : MT == 2 ? 2 : 1;
  __m256 acc[MT];
#pragma GCC unroll 4
  for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps();
  const int8_t* xq = x.q_group(m0) + r0 * kBlock;
  const float* xd = x.d_group(m0) + r0;
  for (int64_t s = 0; s < x.K / kSuper; ++s) {
    __m256i super_dots[kChains][MT];
#pragma GCC unroll 4
    for (int c = 0; c < kChains; ++c) {
#pragma GCC unroll 4
      for (int i = 0; i < MT; ++i) super_dots[c][i] = _mm256_setzero_si256();
    }
    quants(s, [&](int j, __m256i u) __attribute__((always_inline)) {
      const int64_t b = 8 * s + j;
      block_dots<MT, false, true>(super_dots[j % kChains], u, rs.block_words<kUnit>(b), xq + b * x.group * kBlock);
    });
    const __m256 d = _mm256_broadcast_ss(rs.super_d.data() + s);
#pragma GCC unroll 4
    for (int i = 0; i < MT; ++i) {
      __m256i dots = super_dots[0][i];
#pragma GCC unroll 4
      for (int c = 1; c < kChains; ++c) dots = _mm256_add_epi32(dots, super_dots[c][i]);
      const __m256 scale = _mm256_mul_ps(d, _mm256_broadcast_ss(xd + s * x.group + i));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), scale, acc[i]);
    }
  }
  store_row<MT, kUnit, true>(acc, 1.0f, rs, x, m0, r0, n, y, N);
}

// Per-task buffers for one weight row (a task's own: thread_local would cost a TLS lookup in a
// shared library's hot loop).
struct RowBuffers {
  RowScales scales;
  std::vector<uint8_t> u;
  explicit RowBuffers(int64_t K) : scales(K), u(K) {}
};

// The dots of weight row n with the MT rows of the activation group at m0.
template <int MT, class W>
RZ_INLINE void group_dot(const W& w, const RowBuffers& rb, int64_t n, const QuantizedX& x, int64_t m0, float* y, int64_t N, bool fused) {
  if constexpr (W::kSuperBlocks) {
    auto decoded = [&](int64_t s, auto&& g) __attribute__((always_inline)) {
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) g(j, load(rb.u.data() + kSuper * s + kBlock * j));
    };
    if constexpr (MT <= kSuperRows) {
      if (fused) {
        super_row<MT, W::kUnit>([&](int64_t s, auto&& g) __attribute__((always_inline)) {
          // Past the weight's last super-block this asks for lines no one reads: a prefetch never faults.
          w.prefetch_super(n * (x.K / kSuper) + s + kPrefetchSupers);
          w.for_super(n, s, g);
        }, rb.scales, n, x, m0, 0, y, N);
      } else {
        super_row<MT, W::kUnit>(decoded, rb.scales, n, x, m0, 0, y, N);
      }
    } else {
      super_row<kSuperRows, W::kUnit>(decoded, rb.scales, n, x, m0, 0, y, N);
      super_row<MT - kSuperRows, W::kUnit>(decoded, rb.scales, n, x, m0, kSuperRows, y, N);
    }
  } else {
    if (fused) fused_row<MT>(w, n, x, m0, y, N);
    else decoded_row<MT, W::kSigned>(rb.u.data(), rb.scales, n, x, m0, y, N);
  }
}

// Rows [n0, n1) of W against activation rows [m0, m1), m0 the first row of one of x's groups. With few
// activation rows, each weight block is decoded where it is used (measured faster up to a group
// of 8; for K-quants up to one pass of 4); beyond, each weight row is decoded to bytes once and
// met by the groups.
constexpr int kSingleXRows = 4;  // weight rows per pass of fused_rows_single_x
constexpr int kPrefetchRows = 8;  // how far ahead it prefetches

template <class W>
void matmul_tile(const W& w, const QuantizedX& x, int64_t n0, int64_t n1, int64_t m0, int64_t m1, float* y, int64_t N) {
  if constexpr (W::kPaired) {
    if (x.pq != nullptr && m1 - m0 <= kRowGroup) {
      paired_rows(w, x, n0, n1, m0, m1, y, N);
      return;
    }
  }
  if constexpr (!W::kSuperBlocks) {
    if (m1 - m0 == 1) {
      int64_t n = n0;
      for (; n + kSingleXRows <= n1; n += kSingleXRows) {
        // Rows a few passes ahead: a row is a few cache lines, too short a stream for the
        // hardware prefetcher to ramp up on, and a decode step reads every weight from DRAM.
        for (int64_t r = n + kPrefetchRows; r < std::min(n1, n + kPrefetchRows + kSingleXRows); ++r) w.prefetch_row(r);
        fused_rows_single_x<kSingleXRows>(w, n, x, m0, y, N);
      }
      for (; n < n1; ++n) fused_rows_single_x<1>(w, n, x, m0, y, N);
      return;
    }
  }
  RowBuffers rb(x.K);
  const bool fused = m1 - m0 <= (W::kSuperBlocks ? kSuperRows : kRowGroup);
  for (int64_t n = n0; n < n1; ++n) {
    if constexpr (W::kSuperBlocks) {
      rb.scales.compute_super(w, n);
      if (!fused) {
        for (int64_t s = 0; s < x.K / kSuper; ++s) {
          w.for_super(n, s, [&](int j, __m256i u) __attribute__((always_inline)) { store(rb.u.data() + kSuper * s + kBlock * j, u); });
        }
      }
    } else if (fused) {
      if (n + kPrefetchRows < n1) w.prefetch_row(n + kPrefetchRows);
    } else {
      rb.scales.compute_words(w, n, x.K);
      w.for_blocks(n, [&](int64_t b, __m256i u) __attribute__((always_inline)) { store(rb.u.data() + kBlock * b, u); });
    }
    for (int64_t m = m0; m < m1; m += x.group) {
      switch (std::min(x.group, m1 - m)) {
        case 8: group_dot<8>(w, rb, n, x, m, y, N, fused); break;
        case 7: group_dot<7>(w, rb, n, x, m, y, N, fused); break;
        case 6: group_dot<6>(w, rb, n, x, m, y, N, fused); break;
        case 5: group_dot<5>(w, rb, n, x, m, y, N, fused); break;
        case 4: group_dot<4>(w, rb, n, x, m, y, N, fused); break;
        case 3: group_dot<3>(w, rb, n, x, m, y, N, fused); break;
        case 2: group_dot<2>(w, rb, n, x, m, y, N, fused); break;
        default: group_dot<1>(w, rb, n, x, m, y, N, fused); break;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Prefill: many activation rows (a prompt). A register tile of kTileW weight rows by kTileX
// activation rows: per 32-element block, kTileW decoded weight vectors and kTileX activation
// vectors meet in kTileW * kTileX int8 dots, so each load serves several dots. (The decoded_row
// path loads an activation vector per dot and, at 512 rows, was bound by those loads from L2.)
// The weight rows are decoded to bytes once per tile of activation rows (prefill_tile), with
// their scales as madd multipliers (RowScales), as decoded_row reads them.
#if defined(__AVX512VL__)
constexpr int kTileW = 2, kTileX = 4;  // 32 vector registers: 2 * 8 accumulators and the operands
#else
constexpr int kTileW = 2, kTileX = 2;  // 16 vector registers
#endif
static_assert(kRowGroup % kTileX == 0, "a tile's activation rows lie in one group");

// y at the tile's outputs: each accumulator's lane sum, times `factors` (32-block types' word
// scale), plus the row's offsets met by the activation row's sums (kQ8_1: llama.cpp's Q8_1 block
// sums, as Q4_1 and Q5_1 meet them); rows past n1 or m1 dropped.
template <int64_t kUnit, bool kOffsets, bool kQ8_1>
RZ_INLINE void store_tile(const __m256 (&acc)[kTileW][kTileX], const RowBuffers* rb, const QuantizedX& x, int64_t n, int64_t n1, int64_t m, int64_t m1, float* y, int64_t N) {
  const int64_t n_units = QuantizedX::padded_units(x.K / kUnit);
#pragma GCC unroll 4
  for (int r = 0; r < kTileW; ++r) {
    if (n + r >= n1) break;
#pragma GCC unroll 4
    for (int c = 0; c < kTileX; ++c) {
      if (m + c >= m1) break;
      const float* sums = kUnit == kBlock ? x.block_sums(m + c, kQ8_1) : x.sums(m + c, kUnit);
      const float offset = kOffsets ? offset_dot(rb[r].scales.offsets.data(), sums, n_units) : 0.0f;
      y[(m + c) * N + n + r] = rb[r].scales.factor * hsum(acc[r][c]) + offset;
    }
  }
}

// K-quants: the tile's int32 dots add up over a super-block's eight sub-blocks (the weights'
// integer sub-scales in the madd), then one convert and FMA per super-block with the product of
// the two scales. Activation rows m .. m + kTileX of the group at m0.
template <int64_t kUnit>
RZ_INLINE void super_tile(const RowBuffers* rb, const QuantizedX& x, int64_t m0, int64_t m, __m256 (&acc)[kTileW][kTileX]) {
  const int8_t* xq = x.q_group(m0) + (m - m0) * kBlock;
  const float* xd = x.d_group(m0) + (m - m0);
  for (int64_t s = 0; s < x.K / kSuper; ++s) {
    __m256i dots[kTileW][kTileX];
#pragma GCC unroll 4
    for (int r = 0; r < kTileW; ++r) {
#pragma GCC unroll 4
      for (int c = 0; c < kTileX; ++c) dots[r][c] = _mm256_setzero_si256();
    }
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const int64_t b = 8 * s + j;
      __m256i u[kTileW], words[kTileW];
#pragma GCC unroll 4
      for (int r = 0; r < kTileW; ++r) {
        u[r] = load(rb[r].u.data() + kBlock * b);
        words[r] = rb[r].scales.block_words<kUnit>(b);
      }
#pragma GCC unroll 4
      for (int c = 0; c < kTileX; ++c) {
        const __m256i xv = load(xq + (b * x.group + c) * kBlock);
#pragma GCC unroll 4
        for (int r = 0; r < kTileW; ++r) dots[r][c] = rz_cpu::dot_u8s8_words(dots[r][c], u[r], xv, words[r]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < kTileW; ++r) {
      const __m256 d = _mm256_broadcast_ss(rb[r].scales.super_d.data() + s);
#pragma GCC unroll 4
      for (int c = 0; c < kTileX; ++c) {
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r][c]), _mm256_mul_ps(d, _mm256_broadcast_ss(xd + s * x.group + c)), acc[r][c]);
      }
    }
  }
}

// 32-block types: each block's int32 dots (the weight scales riding in the madd as words
// relative to the row's largest, RowScales::compute_words) converted and FMA'd with the
// activation block's scale.
template <bool kSigned>
RZ_INLINE void block_tile(const RowBuffers* rb, const QuantizedX& x, int64_t m0, int64_t m, __m256 (&acc)[kTileW][kTileX]) {
  const int8_t* xq = x.q_group(m0) + (m - m0) * kBlock;
  const float* xd = x.d_group(m0) + (m - m0);
  for (int64_t b = 0; b < x.K / kBlock; ++b) {
    __m256i u[kTileW], words[kTileW];
#pragma GCC unroll 4
    for (int r = 0; r < kTileW; ++r) {
      u[r] = load(rb[r].u.data() + kBlock * b);
      words[r] = rb[r].scales.template block_words<kBlock>(b);
    }
#pragma GCC unroll 4
    for (int c = 0; c < kTileX; ++c) {
      const __m256i xv = load(xq + (b * x.group + c) * kBlock);
      const __m256 x_scale = _mm256_broadcast_ss(xd + b * x.group + c);
#pragma GCC unroll 4
      for (int r = 0; r < kTileW; ++r) {
        // Signed weights (Q8_0): |w| against x with w's sign, as block_dots.
        const __m256i magnitude = kSigned ? _mm256_sign_epi8(u[r], u[r]) : u[r];
        const __m256i dots = rz_cpu::dot_u8s8_words(_mm256_setzero_si256(), magnitude, kSigned ? _mm256_sign_epi8(xv, u[r]) : xv, words[r]);
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), x_scale, acc[r][c]);
      }
    }
  }
}

// Weight row n decoded into rb: its quants as bytes and its scales.
template <class W>
RZ_INLINE void decode_row(const W& w, int64_t n, int64_t K, RowBuffers& rb) {
  uint8_t* u = rb.u.data();
  if constexpr (W::kSuperBlocks) {
    rb.scales.compute_super(w, n);
    for (int64_t s = 0; s < K / kSuper; ++s) {
      w.for_super(n, s, [&](int j, __m256i v) __attribute__((always_inline)) { store(u + kSuper * s + kBlock * j, v); });
    }
  } else {
    rb.scales.compute_words(w, n, K);
    w.for_blocks(n, [&](int64_t b, __m256i v) __attribute__((always_inline)) { store(u + kBlock * b, v); });
  }
}

#if defined(__AVX512VNNI__)
// A prompt in panels (kPanels): kPanelW weight rows against a panel's kLanes activation rows. Per
// four elements, one load of the panel's quants ([kLanes][4] bytes) meets each weight row's four
// bytes broadcast in one vpdpbusd, whose int32 lanes are the panel's rows: no lane sums, and a
// 64-element dot per instruction (the 256-bit tiles take a maddubs and a madd per 32). A unit's
// int32 dots are converted and FMA'd with the weight's unit scale: for K-quants the super-block
// scale times the integer sub-scale, with a super-block's sums FMA'd with the activations'
// scales; for 32-block types the block scale times the activation block's.
constexpr int kPanelW = 8;  // 32 vector registers: 3 * 8 accumulators and the operands

// kPanelW decoded weight rows, interleaved so that panel_tile reads them from one pointer: per
// four elements, each row's four bytes in turn; per unit, each row's scale and offset in turn.
struct PanelWeights {
  std::vector<int32_t> quads;  // [K/4][kPanelW]
  std::vector<float> scales, offsets;  // [K/unit][kPanelW]
  RowBuffers row;  // one row, decoded
  explicit PanelWeights(int64_t K) : quads(K / 4 * kPanelW), scales(K / 16 * kPanelW), offsets(K / 16 * kPanelW), row(K) {}
};

// Weight row n decoded into slot r of pw: w = scale * u + offset per unit, u unsigned. Q8_0's
// signed quants q go in as u = q + 128 with the offset -128 * scale (vpdpbusd's weight operand is
// unsigned); the int32 dots stay exact, and the offset meets the activations' block sums.
template <class W>
RZ_INLINE void interleave_row(const W& w, int64_t n, int64_t K, int r, PanelWeights& pw) {
  RowScales& rs = pw.row.scales;
  uint8_t* u = pw.row.u.data();
  if constexpr (W::kSuperBlocks) {
    constexpr int64_t kUnits = kSuper / W::kUnit;  // per super-block
    decode_row(w, n, K, pw.row);
    for (int64_t unit = 0; unit < K / W::kUnit; ++unit) {
      // words: the integer sub-scale as an int16, twice.
      pw.scales[unit * kPanelW + r] = rs.super_d[unit / kUnits] * static_cast<float>(static_cast<int16_t>(rs.words[unit] & 0xFFFF));
      pw.offsets[unit * kPanelW + r] = rs.offsets[unit];
    }
  } else {
    w.scales_row(n, rs.scales.data(), rs.offsets.data());
    const __m256i to_unsigned = _mm256_set1_epi8(W::kSigned ? -128 : 0);
    w.for_blocks(n, [&](int64_t b, __m256i v) __attribute__((always_inline)) { store(u + kBlock * b, _mm256_xor_si256(v, to_unsigned)); });
    for (int64_t b = 0; b < K / kBlock; ++b) {
      pw.scales[b * kPanelW + r] = rs.scales[b];
      pw.offsets[b * kPanelW + r] = W::kSigned ? -128.0f * rs.scales[b] : rs.offsets[b];
    }
  }
  for (int64_t t = 0; t < K / 4; ++t) std::memcpy(&pw.quads[t * kPanelW + r], u + 4 * t, 4);
}

// The int32 dots of the kPanelW weight rows with panel quants xq over one unit of kUnit elements
// starting at quad `quad`.
template <int64_t kUnit>
RZ_INLINE void unit_dots(const int32_t* wq, const int8_t* xq, int64_t quad, __m512i (&dots)[kPanelW]) {
#pragma GCC unroll 8
  for (int r = 0; r < kPanelW; ++r) dots[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
  for (int64_t t = 0; t < kUnit / 4; ++t) {
    const __m512i xv = _mm512_loadu_si512(xq + 64 * (quad + t));
#pragma GCC unroll 8
    for (int r = 0; r < kPanelW; ++r) dots[r] = _mm512_dpbusd_epi32(dots[r], _mm512_set1_epi32(wq[(quad + t) * kPanelW + r]), xv);
  }
}

// y at weight rows n + r (r < kPanelW, n + r < n1) and panel p's rows below M, from the rows'
// dots plus their offsets met by the activations' sums.
template <class W>
RZ_INLINE void panel_tile(const PanelWeights& pw, const QuantizedX& x, int64_t p, int64_t n, int64_t n1, int64_t M, float* y, int64_t N) {
  constexpr int64_t kUnit = W::kUnit;
  const int8_t* xq = x.panel_quants(p);
  const float* xd = x.panel_d(p);
  const int32_t* wq = pw.quads.data();
  const float* w_scales = pw.scales.data();
  __m512 acc[kPanelW];
#pragma GCC unroll 8
  for (int r = 0; r < kPanelW; ++r) acc[r] = _mm512_setzero_ps();
  __m512i dots[kPanelW];
  if constexpr (W::kSuperBlocks) {
    constexpr int64_t kUnits = kSuper / kUnit;  // per super-block
    for (int64_t s = 0; s < x.K / kSuper; ++s) {
      __m512 super_acc[kPanelW];
#pragma GCC unroll 8
      for (int r = 0; r < kPanelW; ++r) super_acc[r] = _mm512_setzero_ps();
      for (int64_t j = 0; j < kUnits; ++j) {
        const int64_t unit = s * kUnits + j;
        unit_dots<kUnit>(wq, xq, unit * kUnit / 4, dots);
#pragma GCC unroll 8
        for (int r = 0; r < kPanelW; ++r) {
          super_acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[r]), _mm512_set1_ps(w_scales[unit * kPanelW + r]), super_acc[r]);
        }
      }
      const __m512 d = _mm512_loadu_ps(xd + s * kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < kPanelW; ++r) acc[r] = _mm512_fmadd_ps(super_acc[r], d, acc[r]);
    }
  } else {
    for (int64_t b = 0; b < x.K / kBlock; ++b) {
      unit_dots<kBlock>(wq, xq, b * kBlock / 4, dots);
      const __m512 d = _mm512_loadu_ps(xd + b * kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < kPanelW; ++r) {
        acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dots[r]), d), _mm512_set1_ps(w_scales[b * kPanelW + r]), acc[r]);
      }
    }
  }
  const float* sums = x.panel_sums(p, kUnit, W::kQ8_1);
  for (int64_t unit = 0; unit < x.K / kUnit; ++unit) {
    const __m512 sum = _mm512_loadu_ps(sums + unit * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < kPanelW; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(pw.offsets[unit * kPanelW + r]), sum, acc[r]);
  }
  alignas(64) float out[kPanelW][kLanes];
#pragma GCC unroll 8
  for (int r = 0; r < kPanelW; ++r) _mm512_store_ps(out[r], acc[r]);
  const int64_t rows = std::min(kLanes, M - p * kLanes), cols = std::min<int64_t>(kPanelW, n1 - n);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t r = 0; r < cols; ++r) y[(p * kLanes + i) * N + n + r] = out[r][i];
  }
}

// Rows [n0, n1) of W against activation rows [m0, m1) (m0 a multiple of kLanes), in panels. A
// ragged last tile repeats a weight row; those outputs are not stored.
template <class W>
void panel_rows(const W& w, const QuantizedX& x, int64_t n0, int64_t n1, int64_t m0, int64_t m1, float* y, int64_t N) {
  PanelWeights pw(x.K);
  for (int64_t n = n0; n < n1; n += kPanelW) {
    for (int r = 0; r < kPanelW; ++r) interleave_row(w, std::min(n + r, n1 - 1), x.K, r, pw);
    for (int64_t p = m0 / kLanes; p * kLanes < m1; ++p) panel_tile<W>(pw, x, p, n, n1, m1, y, N);
  }
}
#endif

// Rows [n0, n1) of W against activation rows [m0, m1) (m0 the first row of one of x's groups), in register
// tiles. A ragged last tile repeats a weight row, or meets the group's zero padding rows; those
// outputs are not stored.
template <class W>
void prefill_tile(const W& w, const QuantizedX& x, int64_t n0, int64_t n1, int64_t m0, int64_t m1, float* y, int64_t N) {
#if defined(__AVX512VNNI__)
  panel_rows(w, x, n0, n1, m0, m1, y, N);
  return;
#endif
  std::vector<RowBuffers> rb(kTileW, RowBuffers(x.K));
  for (int64_t n = n0; n < n1; n += kTileW) {
    for (int r = 0; r < kTileW; ++r) decode_row(w, std::min(n + r, n1 - 1), x.K, rb[r]);
    for (int64_t m = m0; m < m1; m += kTileX) {
      const int64_t group = x.group_start(m);
      __m256 acc[kTileW][kTileX] = {};
      if constexpr (W::kSuperBlocks) {
        super_tile<W::kUnit>(rb.data(), x, group, m, acc);
        store_tile<W::kUnit, true, false>(acc, rb.data(), x, n, n1, m, m1, y, N);
      } else {
        block_tile<W::kSigned>(rb.data(), x, group, m, acc);
        store_tile<kBlock, !W::kSigned, W::kQ8_1>(acc, rb.data(), x, n, n1, m, m1, y, N);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Threads and tiling.

// Scratch for the quantized activations, reused across calls on the calling thread.
struct Scratch {
  std::vector<int8_t> q, pq, panel_q;
  std::vector<float> f, pd, panel_f;
};
thread_local Scratch scratch[2];  // one per activation block size (32, 256): a call may need both
Scratch& rz_scratch(int64_t x_block) { return scratch[x_block == kBlock ? 0 : 1]; }

// q8_1: a weight of the call meets llama.cpp's Q8_1 sums (Q4_1, Q5_1); else they are not computed.
QuantizedX quantize(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, int64_t x_block, int64_t n_threads, bool paired, bool q8_1) {
  Scratch& scratch = rz_scratch(x_block);
  const int64_t rows = QuantizedX::padded_rows(M);
  scratch.q.resize(rows * K);
  q8_1 = q8_1 && x_block == kBlock;
  scratch.f.resize(rows * (K / x_block + (q8_1 ? 2 : 1) * QuantizedX::padded_units(K / kBlock) + QuantizedX::padded_units(K / 16)));
  QuantizedX qx;
  qx.K = K;
  qx.group = QuantizedX::group_rows(M);
  qx.x_block = x_block;
  qx.q = scratch.q.data();
  qx.d = scratch.f.data();
  qx.sum32 = qx.d + rows * (K / x_block);
  qx.sum16 = qx.sum32 + rows * QuantizedX::padded_units(K / kBlock);
  if (q8_1) qx.sum32_q8_1 = qx.sum16 + rows * QuantizedX::padded_units(K / 16);
  const int64_t x_threads = M * K >= (1 << 16) ? n_threads : 1;
  rz_cpu::parallel_for(pool, rows, x_threads, [&](int64_t m) { quantize_row(m < M ? x + m * K : nullptr, qx, m); });
  if (kPanels && M > kSmallM) {
    const int64_t panels = QuantizedX::panels(M);
    scratch.panel_q.resize(panels * kLanes * K);
    scratch.panel_f.resize(panels * qx.panel_floats());
    qx.panel_q = scratch.panel_q.data();
    qx.panel_f = scratch.panel_f.data();
    rz_cpu::parallel_for(pool, panels, x_threads, [&](int64_t p) { panel(qx, p, M); });
  }
  if (paired && x_block == kBlock && M <= kRowGroup && K % 64 == 0) {
    scratch.pq.resize(rows * K);
    scratch.pd.resize(rows * (K / 64) * 8);
    qx.pq = scratch.pq.data();
    qx.pd = scratch.pd.data();
    for (int64_t m = 0; m < M; ++m) pair_row(qx, m);
  }
  return qx;
}

// Tiling. A decode step (small M, kSmallM) splits rows of W only, so each weight byte is read
// once; a prefill also splits rows of x, in tiles whose int8 rows fit in L2 with a W tile in L1.
// The tile of x rows is as many rows as fit kPrefillBytesX (half an L2 of 2 MiB), 64 to 256: each
// task decodes its weight rows once per tile, so more rows spread that cost.
constexpr int64_t kPrefillBytesX = 1 << 20;
int64_t prefill_rows_x(int64_t K) { return std::clamp<int64_t>(kPrefillBytesX / K / 64 * 64, 64, 256); }
constexpr int64_t kPrefillRowsW = 16;
constexpr int64_t kMinWeightBytesPerThread = 32 << 10;  // below, handing work to a worker costs more than it saves

// One weight of a call, its type erased: several weights that read the same x (q/k/v, gate/up)
// go through one call, so they share its fixed costs and its threads share their rows.
struct Part {
  int64_t N = 0;
  int64_t x_block = kBlock;
  double bytes = 0;
  int64_t column = 0;  // where its outputs start in a row of y
  bool paired = false;  // reads the activations' paired layout when there is one
  bool q8_1 = false;  // meets llama.cpp's Q8_1 block sums
  using Tile = std::function<void(const QuantizedX&, int64_t, int64_t, int64_t, int64_t, float*, int64_t)>;
  Tile tile;     // few activation rows (a decode step)
  Tile prefill;  // many (a prompt): register tiles
};

template <class W>
Part make_part(const W& w, int64_t N, double bytes) {
  Part part;
  part.N = N;
  part.x_block = W::kSuperBlocks ? kSuper : kBlock;
  part.bytes = bytes;
  part.paired = W::kPaired;
  if constexpr (!W::kSuperBlocks) part.q8_1 = W::kQ8_1;
  part.tile = [w](const QuantizedX& x, int64_t n0, int64_t n1, int64_t m0, int64_t m1, float* y, int64_t ld) {
    matmul_tile(w, x, n0, n1, m0, m1, y, ld);
  };
  part.prefill = [w](const QuantizedX& x, int64_t n0, int64_t n1, int64_t m0, int64_t m1, float* y, int64_t ld) {
    prefill_tile(w, x, n0, n1, m0, m1, y, ld);
  };
  return part;
}

// y[M, ld] = x @ [W_0; W_1; ...].T, part p writing columns [column, column + N_p).
void matmul(ffi::ThreadPool& pool, int64_t threads, const std::vector<Part>& parts, const float* x, int64_t M, int64_t K, float* y, int64_t ld) {
  QuantizedX by_block[2];
  bool quantized[2] = {false, false};
  double total_bytes = 0;
  bool paired = false, q8_1 = false;
  for (const Part& part : parts) {
    paired |= part.paired;
    q8_1 |= part.q8_1;
  }
  for (const Part& part : parts) {
    const int i = part.x_block == kBlock ? 0 : 1;
    if (!quantized[i]) by_block[i] = quantize(pool, x, M, K, part.x_block, threads, paired, q8_1);
    quantized[i] = true;
    total_bytes += part.bytes;
  }
  auto x_for = [&](const Part& part) -> const QuantizedX& { return by_block[part.x_block == kBlock ? 0 : 1]; };
  if (M <= kSmallM) {
    // Every part's rows in chunks, all chunks shared by the threads.
    const int64_t useful_threads = std::max<int64_t>(1, std::min<int64_t>(threads, static_cast<int64_t>(total_bytes * std::min<int64_t>(M, 4) / kMinWeightBytesPerThread)));
    struct Task { const Part* part; int64_t n0, n1; };
    std::vector<Task> tasks;
    for (const Part& part : parts) {
      const int64_t share = std::max<int64_t>(1, static_cast<int64_t>(4 * useful_threads * part.bytes / total_bytes + 0.5));
      const int64_t rows = (part.N + std::min(part.N, share) - 1) / std::min(part.N, share);
      for (int64_t n0 = 0; n0 < part.N; n0 += rows) tasks.push_back({&part, n0, std::min(part.N, n0 + rows)});
    }
    rz_cpu::parallel_for(pool, static_cast<int64_t>(tasks.size()), useful_threads, [&](int64_t t) {
      const Task& task = tasks[t];
      task.part->tile(x_for(*task.part), task.n0, task.n1, 0, M, y + task.part->column, ld);
    });
    return;
  }
  for (const Part& part : parts) {
    const int64_t rows_x = prefill_rows_x(K);
    const int64_t tiles_x = (M + rows_x - 1) / rows_x;
    const int64_t tiles_w = (part.N + kPrefillRowsW - 1) / kPrefillRowsW;
    const QuantizedX& qx = x_for(part);
    rz_cpu::parallel_for(pool, tiles_x * tiles_w, threads, [&](int64_t t) {
      // Consecutive tasks share a tile of x, so a thread walks W while x stays in its L2.
      const int64_t tx = t / tiles_w, tw = t % tiles_w;
      part.prefill(qx, tw * kPrefillRowsW, std::min(part.N, (tw + 1) * kPrefillRowsW), tx * rows_x, std::min(M, (tx + 1) * rows_x), y + part.column, ld);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// The entry points: rz_cpu::quantized_matmul (qmatmul.h) and the XLA FFI handler, x f32 [M, K],
// then the weight's arrays in the order of rz_kernels.quantized_matmul.CPU_FFI_ARRAYS, -> y f32
// [M, N]. Attributes: the GGML type, and a cap on the threads (0: the pool's).

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

// The part for one weight from its arrays; an empty tile when the type or K does not fit.
Part part_of(int32_t ggml_type, const void* const* a, int64_t N, int64_t K, double bytes) {
  switch (ggml_type) {
    case Q4_0:  // d, qs
      if (K % kBlock) break;
      return make_part(Q4_0W{data<uint8_t>(a[1]), data<uint16_t>(a[0]), K}, N, bytes);
    case Q4_1:  // d, m, qs
      if (K % kBlock) break;
      return make_part(Q4_1W{data<uint8_t>(a[2]), data<uint16_t>(a[0]), data<uint16_t>(a[1]), K}, N, bytes);
    case Q5_0:  // d, qh, qs
      if (K % kBlock) break;
      return make_part(Q5W<false>{data<uint8_t>(a[2]), data<uint32_t>(a[1]), data<uint16_t>(a[0]), nullptr, K}, N, bytes);
    case Q5_1:  // d, m, qh, qs
      if (K % kBlock) break;
      return make_part(Q5W<true>{data<uint8_t>(a[3]), data<uint32_t>(a[2]), data<uint16_t>(a[0]), data<uint16_t>(a[1]), K}, N, bytes);
    case Q8_0:  // d, qs
      if (K % kBlock) break;
      return make_part(Q8_0W{data<int8_t>(a[1]), data<uint16_t>(a[0]), K}, N, bytes);
    case Q4_K:  // d, dmin, scales, mins, qs
      if (K % kSuper) break;
      return make_part(QK_W<false>{data<uint8_t>(a[4]), nullptr, data<uint8_t>(a[2]), data<uint8_t>(a[3]), data<uint16_t>(a[0]), data<uint16_t>(a[1]), K}, N, bytes);
    case Q5_K:  // d, dmin, scales, mins, qh, qs
      if (K % kSuper) break;
      return make_part(QK_W<true>{data<uint8_t>(a[5]), data<uint8_t>(a[4]), data<uint8_t>(a[2]), data<uint8_t>(a[3]), data<uint16_t>(a[0]), data<uint16_t>(a[1]), K}, N, bytes);
    case Q6_K:  // qs, qh, scales, d
      if (K % kSuper) break;
      return make_part(Q6_KW{data<uint8_t>(a[0]), data<uint8_t>(a[1]), data<int8_t>(a[2]), data<uint16_t>(a[3]), K}, N, bytes);
    default:
      break;
  }
  return Part{};
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
  std::vector<rz_cpu::QuantizedWeight> parts;
  size_t next = 0;
  int64_t column = 0;
  for (const int32_t ggml_type : ggml_types) {
    const int n_arrays = rz_cpu::quantized_arrays(ggml_type);
    if (n_arrays == 0) return ffi::Error::InvalidArgument("rz_qmatmul: unsupported ggml_type");
    if (next + n_arrays > arrays.size()) return ffi::Error::InvalidArgument("rz_qmatmul: fewer weight arrays than the types need");
    rz_cpu::QuantizedWeight weight;
    weight.ggml_type = ggml_type;
    weight.N = arrays[next].rows;
    for (int i = 0; i < n_arrays; ++i) {
      if (arrays[next + i].rows != weight.N) return ffi::Error::InvalidArgument("rz_qmatmul: a weight's arrays disagree on N");
      weight.arrays.push_back(arrays[next + i].data);
      weight.bytes += arrays[next + i].bytes;
    }
    column += weight.N;
    next += n_arrays;
    parts.push_back(std::move(weight));
  }
  if (next != arrays.size() || column != ld) return ffi::Error::InvalidArgument("rz_qmatmul: the weights' rows do not add up to y's columns");
  if (!rz_cpu::quantized_matmul(pool, rz_cpu::pool_threads(pool, max_threads), parts, x.typed_data(), M, K, y->typed_data(), ld)) {
    return ffi::Error::InvalidArgument("rz_qmatmul: K is not a multiple of a weight's block");
  }
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

// QMatmulImpl on one layer's weights, chosen at run time: x, the layer's index (an int32 scalar),
// then every layer's weights' arrays, layer-major, or one layer's worth of arrays each stacked over
// the layers [L, N, items] -> y [M, sum of one layer's N]. So a model's layers run in one scan (one
// compiled layer body): nothing is sliced or copied. Attributes: the types (every layer's,
// layer-major, which may differ between layers; or, stacked, one layer's), how many weights a layer
// has, and the cap on the threads.
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

namespace rz_cpu {

int quantized_arrays(int32_t ggml_type) { return arrays_of(ggml_type); }

bool quantized_matmul(ffi::ThreadPool& pool, int64_t threads, const std::vector<QuantizedWeight>& weights, const float* x,
                      int64_t M, int64_t K, float* y, int64_t ld) {
  std::vector<Part> parts;
  int64_t column = 0;
  for (const QuantizedWeight& weight : weights) {
    Part part = part_of(weight.ggml_type, weight.arrays.data(), weight.N, K, weight.bytes);
    if (!part.tile) return false;
    part.column = column;
    column += weight.N;
    parts.push_back(std::move(part));
  }
  if (M > 0 && ld > 0) matmul(pool, threads, parts, x, M, K, y, ld);
  return true;
}

}  // namespace rz_cpu
