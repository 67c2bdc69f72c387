// Prompt attention for every CPU: many queries per sequence over a KV cache, as a flash attention
// whose scores never leave a span-sized buffer. Shapes, cache types and the mask contract as
// rz_kernels/causal_attention.py and the decode kernel (attention.cc):
//
//   q [B, Hq, T, D] f32, k [B', Hkv, S, D] and v [B', Hkv, S, Dv] as one of the cache types (f32,
//   f16, bf16, or q8_0: int8 quants with f16 scales [B', Hkv, S, D / 32]), K and V independently,
//   q_positions [B, T] int32, k_positions [B', S] int32 (-1: empty) -> o [B, Hq, T, Dv] f32.
//   B' >= B: sequence b reads row b. Or K/V a paged pool read in place through a block table
//   (attention_kv.h's Operands). Head dims must be multiples of 16.
//
// Two phases. First every used slot's K and V are converted to f32 once (and its position copied), K transposed in blocks
// of kBlock slots ([D][kBlock] per block) so that a query row's scores are an FMA chain per lane. Then
// a task is one (sequence, KV head, tile of the group's query rows): it walks spans of kSpanBlocks
// blocks; a few rows at a time (a register tile) score a span's blocks as register-tiled matrix
// products, fold them into each row's online softmax at once, and add them to the rows'
// unnormalized output (again a register-tiled product). A block no row of a register tile sees is
// skipped, so causal chunks do half the work of a square. With bf16 values
// (on a CPU with AVX-512 BF16, for an f16 or bf16 V) phase one stores V as bf16 pairs instead and the
// output's product multiplies bf16 numerators by them. With int16 scores (in an AVX-512 VNNI build,
// for an f16 or bf16 K) phase one stores K as int16 pairs with a scale per slot, each task
// quantizes its query rows alike, and a score is an exact int32 sum of products times both scales.
//
// A row's result does not depend on the other rows of the call: its scores are sums over the head
// dim in order, and its softmax walks the same spans of slots, so a query gets the same bits
// whether its prompt ran in one chunk or several. Written with GCC/Clang vector extensions, so the
// one source compiles to AVX-512 or AVX2 on x86-64 and to NEON on aarch64.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "attention_kv.h"
#include "threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using rz_cpu::Kv;
using rz_cpu::kElemBytes;
using rz_cpu::kQ8Block;
using rz_cpu::Rows;

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float Vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t Vi __attribute__((vector_size(kLanes * sizeof(float))));

// Slots per block, the unit of a row's mask, of phase one's layout and of the causal skip. 64-slot
// blocks beat 32-slot ones on x86-64 (AVX-512 and AVX2, benchmarks/results/prompt-attention-session32.md)
// when each row's softmax paid a fixed cost per block, which it now pays per span (kSpanBlocks);
// NEON, not measured, keeps 32.
constexpr int64_t kBlock = kLanes >= 8 ? 2 * rz_cpu::kRun : rz_cpu::kRun;
constexpr int kBlockVecs = kBlock / kLanes;
using BlockMask = uint64_t;  // bit j: the row sees the block's slot j
static_assert(kBlock <= 64, "a block's mask is 64 bits");
// Rows scored together, and key (or value) lanes per register tile: kRows * kTileVecs accumulators
// are independent FMA chains, each loaded K or V vector shared by kRows rows and each broadcast query
// or weight by kTileVecs vectors (16 of AVX-512's 32 registers, 12 of AVX2's 16, 8 of NEON's 32). On
// AVX2, 6 rows of 16 lanes load 8 operands per 12 FMAs where 2 rows of 32 loaded 10 per 8: the
// kernel was bound by its loads (benchmarks/results/prompt-attention-session21.md).
constexpr int kRows = kLanes == 16 ? 8 : kLanes == 8 ? 6 : 1;
constexpr int kTileVecs = kLanes == 4 ? 8 : 2;
constexpr int kTileLanes = kTileVecs * kLanes;
static_assert(kBlock % kTileLanes == 0, "a block is a whole number of score tiles");
// Query rows per task: enough to amortize a block's loads, few enough to give both threads work
// when a chunk has one KV head; a whole number of register tiles.
constexpr int64_t kRowTile = 64 / kRows * kRows;

// A broadcast. Vf{} + x costs a scalar add before it, in the loops that broadcast once per FMA pair.
inline Vf splat(float x) {
#if defined(__AVX512F__)
  return (Vf)_mm512_set1_ps(x);
#elif defined(__AVX__)
  return (Vf)_mm256_set1_ps(x);
#else
  return Vf{} + x;
#endif
}
inline Vf load(const float* p) {
  Vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, Vf v) { std::memcpy(p, &v, sizeof v); }
inline Vf select(Vi mask, Vf a, Vf b) { return (Vf)(((Vi)a & mask) | ((Vi)b & ~mask)); }
// Halves of a vector folded onto each other, log2(kLanes) times, as shuffles: a scalar loop over
// the lanes cost as much as a row's scores for a 64-wide head.
template <class Fold>
inline float fold_lanes(Vf v, Fold fold) {
#if defined(__AVX512F__)
  v = fold(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = fold(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = fold(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = fold(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
#elif defined(__AVX__)
  v = fold(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
  v = fold(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
  v = fold(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
#else
  v = fold(v, __builtin_shufflevector(v, v, 2, 3, 0, 1));
  v = fold(v, __builtin_shufflevector(v, v, 1, 0, 3, 2));
#endif
  return v[0];
}
inline float lane_max(Vf v) {
  return fold_lanes(v, [](Vf a, Vf b) { return select(a > b, a, b); });
}
inline bool any_lane(Vi mask) {
#if defined(__AVX512F__)
  return _mm512_test_epi32_mask((__m512i)mask, (__m512i)mask) != 0;
#elif defined(__AVX__)
  return _mm256_movemask_ps((__m256)mask) != 0;
#else
  bool any = false;
  for (int l = 0; l < kLanes; ++l) any |= mask[l] != 0;
  return any;
#endif
}
inline float lane_sum(Vf v) {
  return fold_lanes(v, [](Vf a, Vf b) { return a + b; });
}

// exp(x) per lane: Cephes' range reduction and polynomial (relative error ~2e-7), as the decode
// kernel's; x below -87.3 (and -inf) gives 0. The rounding to the nearest integer adds and
// subtracts 1.5 * 2^23, which needs no ISA-specific instruction. The softmax's numerators pass
// kMayOverflow false: their x <= 0 never needs the clamp at 88.3.
template <bool kMayOverflow = true>
inline Vf exp_lanes(Vf x) {
#if defined(__AVX512F__)
  // AVX-512 scales by 2^n in one instruction (vscalefps), so the softmax's numerators (x <= 0)
  // take 11 vector operations instead of 20; on AVX-512 vector ALU work shares the FMA ports.
  // 2^f for f = x log2(e) - n in [-1/2, 1/2] by a degree-5 polynomial fitted for relative error
  // (at most 7.5e-8 on the interval, where the degree-6 Taylor polynomial's is 1.2e-7); f is one
  // fused rounding from x. Below -87.3 (and -inf) gives 0, and NaN stays NaN, as below (a NaN is
  // not below -87.3, and vmaxps returns its second operand when one is NaN).
  if constexpr (!kMayOverflow) {
    const __m512 v = (__m512)x;
    const __mmask16 kept = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-87.3f), _CMP_NLT_UQ);
    const __m512 clamped = _mm512_max_ps(_mm512_set1_ps(-87.3f), v);
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_fmsub_ps(clamped, log2e, n);
    __m512 p = _mm512_set1_ps(0.0013276467608136612f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.00967554206046195f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.055507132936796016f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402211971072656f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931469670482632f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000000716572124f));
    return (Vf)_mm512_maskz_scalef_ps(kept, p, n);
  }
#endif
  const Vi underflow = x < splat(-87.3f);
  if constexpr (kMayOverflow) x = select(x > splat(88.3f), splat(88.3f), x);
  x = select(underflow, splat(-87.3f), x);
  const Vf magic = splat(12582912.0f);
  const Vf n = (x * splat(1.44269504088896341f) + magic) - magic;
  Vf r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  Vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * (r * r) + (r + splat(1.0f));
  const Vi exponent = (__builtin_convertvector(n, Vi) + 127) << 23;
  return select(underflow, splat(0.0f), p * (Vf)exponent);
}

// x rounded to the nearest bf16 (ties to even) and widened back: the value vcvtneps2bf16 gives,
// in plain vector operations. For the softmax's numerators, in [0, 1] or NaN.
inline Vf bf16_rounded(Vf x) {
  typedef uint32_t Vu __attribute__((vector_size(kLanes * sizeof(float))));
  Vu bits = (Vu)x;
  bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  return (Vf)bits;
}

inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  __fp16 value;
  std::memcpy(&value, &h, sizeof h);
  return static_cast<float>(value);
#endif
}

// Elements [0, width) of the run's slot j's row as f32.
template <Kv T>
void row_f32(const Rows& rows, int64_t j, int64_t width, float* out) {
  const uint8_t* bytes = rows.data[j];
  int64_t i = 0;
#if defined(__AVX512F__)
  // f16 16 at a time (an exact conversion, as the scalar one): one at a time, phase one took a
  // visible share of a chat turn's prompt attention over its history.
  if constexpr (T == Kv::F16) {
    for (; i + 16 <= width; i += 16) {
      _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + 2 * i))));
    }
  }
#endif
  for (; i < width; ++i) {
    if constexpr (T == Kv::F32) {
      std::memcpy(out + i, bytes + 4 * i, 4);
    } else if constexpr (T == Kv::F16) {
      uint16_t h;
      std::memcpy(&h, bytes + 2 * i, 2);
      out[i] = f16_to_f32(h);
    } else if constexpr (T == Kv::BF16) {  // bf16 is an f32's upper half
      uint16_t h;
      std::memcpy(&h, bytes + 2 * i, 2);
      const uint32_t bits = static_cast<uint32_t>(h) << 16;
      std::memcpy(out + i, &bits, 4);
    } else {
      out[i] = static_cast<float>(static_cast<int8_t>(bytes[i])) * f16_to_f32(rows.scales[j][i / kQ8Block]);
    }
  }
}

#if defined(__AVX512F__)
// bf16 values: vdpbf16ps multiplies pairs of bf16s and adds both products to an f32 lane, twice the
// multiply-adds of an f32 FMA per instruction. The softmax's weights times the values take it: as
// llama.cpp's own P.V (which keeps its output rows in f16 between slots) they lose their lowest
// bits, but the sums stay f32. The scores never take bf16: they are exponentiated, and bf16 queries
// and keys as well moved Gemma 3 measurably further from the float64 reference
// (benchmarks/results/chat-attention-session34.md); they take int16 products instead. AVX-512 BF16 (Zen 4, Cooper Lake, Sapphire Rapids
// and later) is outside the variant's flags, so these functions are compiled for it alone and run
// only where the CPU has it (PromptAttentionImpl checks).
#define RZ_BF16 __attribute__((target("avx512bf16")))

// 16 f32s as bf16s, each rounded to the nearest (ties to even); a NaN stays a NaN.
RZ_BF16 inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// The halves of a vector of 32 16-bit elements interleaved: (e0, o0, e1, o1, ...) from
// (e0..e15, o0..o15), so that word c holds element c of both halves.
inline __m512i interleave_halves(__m512i both) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5,
                                         20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(order, both);
}

// Phase one's V for bf16 values: f32 rows 2i and 2i + 1 (`even`, `odd`, Dv each) as Dv words of
// bf16 pairs, word c holding lane c of both, so that an output tile multiplies a broadcast pair of
// weights by 16 lanes' pairs of slots. Rounding an f16 to bf16 drops its three lowest significand
// bits; a bf16 cache converts exactly.
RZ_BF16 void value_pairs_bf16(const float* even, const float* odd, int64_t Dv, uint32_t* words) {
  for (int64_t c = 0; c < Dv; c += 16) {
    _mm512_storeu_si512(words + c, interleave_halves((__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(odd + c), _mm512_loadu_ps(even + c))));
  }
}

// value_pairs_bf16 straight from two slots' rows of an f16 or bf16 cache, without f32 rows between.
template <Kv T>
RZ_BF16 void value_pairs_bf16(const uint8_t* even, const uint8_t* odd, int64_t Dv, uint32_t* words) {
  static_assert(T == Kv::F16 || T == Kv::BF16);
  for (int64_t c = 0; c < Dv; c += 16) {
    const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + 2 * c));
    const __m256i o = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(odd + 2 * c));
    __m512i both;
    if constexpr (T == Kv::F16) {
      both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_cvtph_ps(o), _mm512_cvtph_ps(e));
    } else {  // a bf16 cache's elements are the pairs' halves already
      both = _mm512_inserti64x4(_mm512_castsi256_si512(e), o, 1);
    }
    _mm512_storeu_si512(words + c, interleave_halves(both));
  }
}
#endif

// The converted K and V start on a cache line, so that every vector load of them is one line: a
// std::vector's 16-byte alignment split each 64-byte load of them over two.
constexpr int64_t kCacheLineFloats = 64 / sizeof(float);
inline float* cache_line_aligned(float* p) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(p);
  return p + ((64 - address % 64) % 64) / sizeof(float);
}

#if defined(__AVX512VNNI__)
// int16 scores: vpdpwssd multiplies pairs of int16s and adds both products to an int32 lane, twice
// the multiply-adds of an f32 FMA per instruction, exactly. Each query row and each key slot is
// scaled to integers of at most int16_limit(D) in magnitude, so that a row's D products cannot
// overflow the int32 sum; the score is that exact sum times the two scales. Each element is within
// half a step of its value, a step being 1/5,792 of its row's largest element for a 64-wide head:
// errors the size of llama.cpp's own f16 queries (2^-11 of each element), where bf16 (2^-9 of each)
// moved Gemma 3 measurably further from the float64 reference (chat-attention-session34.md and
// chat-attention-session35.md in benchmarks/results).
inline float int16_limit(int64_t D) { return static_cast<float>(std::floor(std::sqrt(2147483647.0 / static_cast<double>(D)))); }

// x[0, D) as D / 2 words of int16 pairs (word i holds elements 2i and 2i + 1, rounded to the
// nearest), word i written at words[i * stride]; returns the scale that multiplies them back. A row
// with a NaN or an inf gets zeros and a NaN scale, so that every score it takes part in is NaN.
inline float int16_pairs(const float* x, int64_t D, float limit, int32_t* words, int64_t stride) {
  __m512 peak = _mm512_setzero_ps();
  __mmask16 finite = 0xffff;
  for (int64_t d = 0; d < D; d += 16) {
    const __m512 magnitude = _mm512_abs_ps(_mm512_loadu_ps(x + d));
    finite &= _mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(INFINITY), _CMP_LT_OQ);
    peak = _mm512_max_ps(peak, magnitude);
  }
  const float largest = _mm512_reduce_max_ps(peak);
  const bool usable = finite == 0xffff;
  const __m512 inverse = _mm512_set1_ps(usable && largest > 0 ? limit / largest : 0.0f);
  for (int64_t d = 0; d < D; d += 16) {
    // Sixteen elements as int16s in order are eight pair words.
    const __m256i pairs = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + d), inverse)));
    if (stride == 1) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + d / 2), pairs);
    } else {
      alignas(32) int32_t eight[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(eight), pairs);
      for (int i = 0; i < 8; ++i) words[(d / 2 + i) * stride] = eight[i];
    }
  }
  return usable ? (largest > 0 ? largest / limit : 0.0f) : NAN;
}

// A 16 x 16 matrix of 32-bit words transposed: row i of `from` (at from + i * from_stride) becomes
// column i of `to`, of which rows [0, rows) are written (at to + r * to_stride). Phase one's int16 K
// goes through it 16 slots at a time instead of storing each word to its place alone.
inline void transpose_words16(const int32_t* from, int64_t from_stride, int32_t* to, int64_t to_stride, int64_t rows) {
  __m512i a[16], b[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm512_loadu_si512(from + i * from_stride);
  // Interleaved by words, then by word pairs: a[4g + m]'s 128-bit lane L then holds column 4L + m
  // of rows 4g to 4g + 3.
  for (int i = 0; i < 16; i += 2) {
    b[i] = _mm512_unpacklo_epi32(a[i], a[i + 1]);
    b[i + 1] = _mm512_unpackhi_epi32(a[i], a[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {
    a[g] = _mm512_unpacklo_epi64(b[g], b[g + 2]);
    a[g + 1] = _mm512_unpackhi_epi64(b[g], b[g + 2]);
    a[g + 2] = _mm512_unpacklo_epi64(b[g + 1], b[g + 3]);
    a[g + 3] = _mm512_unpackhi_epi64(b[g + 1], b[g + 3]);
  }
  // Then the four groups' lanes gathered: column 4L + m is lane L of a[m], a[4 + m], a[8 + m], a[12 + m].
  for (int m = 0; m < 4; ++m) {
    const __m512i low01 = _mm512_shuffle_i32x4(a[m], a[4 + m], 0x44), high01 = _mm512_shuffle_i32x4(a[m], a[4 + m], 0xee);
    const __m512i low23 = _mm512_shuffle_i32x4(a[8 + m], a[12 + m], 0x44), high23 = _mm512_shuffle_i32x4(a[8 + m], a[12 + m], 0xee);
    const __m512i column[4] = {_mm512_shuffle_i32x4(low01, low23, 0x88), _mm512_shuffle_i32x4(low01, low23, 0xdd),
                               _mm512_shuffle_i32x4(high01, high23, 0x88), _mm512_shuffle_i32x4(high01, high23, 0xdd)};
    for (int L = 0; L < 4; ++L)
      if (4 * L + m < rows) _mm512_storeu_si512(to + (4 * L + m) * to_stride, column[L]);
  }
}
#endif

struct Problem : rz_cpu::Operands {
  int64_t n_blocks;  // ceil(S_used / kBlock)
  bool bf16_values;  // weights times values in bf16 products (value_pairs_bf16), not f32 FMAs
  bool int16_scores;  // queries times keys as int16 pairs (int16_pairs), not f32 FMAs
  // Phase one's output, per (sequence, KV head): K as [block][D][kBlock] (or, with int16 scores, as
  // key_scales_offset says), V as [block * kBlock][Dv]
  // (or, with bf16 values, [block * kBlock / 2][Dv] words of bf16 pairs), slots past S_used zero;
  // per sequence, each slot's position [n_blocks * kBlock] (-1 past S_used).
  float* keys;
  float* values;
  int32_t* positions;
  int64_t value_block_floats() const { return bf16_values ? kBlock * Dv / 2 : kBlock * Dv; }
  const float* head_keys(int64_t head) const { return keys + head * n_blocks * kBlock * D; }
  // With int16 scores a block of K is [D / 2][kBlock] words of int16 pairs, then each slot's scale
  // [kBlock], within the f32 block's room.
  static int64_t key_scales_offset(int64_t D) { return kBlock * D / 2; }
  const float* head_values(int64_t head) const { return values + head * n_blocks * value_block_floats(); }
};

#if defined(__AVX512VNNI__)
// Phase one's int16 K for one run of kRun slots at `first` of block `kt`: each slot's pair words
// in order into `words` (room for kRun * D / 2 + 16), then 16 slots at a time transposed into place.
template <Kv T>
void key_run_int16(const Problem& p, const Rows& keys, int64_t first, float* kt, float* row, int32_t* words) {
  static_assert(rz_cpu::kRun % 16 == 0, "a run is whole transposes");
  const int64_t pairs = p.D / 2;
  const float limit = int16_limit(p.D);
  for (int64_t i = 0; i < rz_cpu::kRun; ++i) {
    row_f32<T>(keys, i, p.D, row);  // a slot past the run's count reads zeros
    kt[Problem::key_scales_offset(p.D) + first + i] = int16_pairs(row, p.D, limit, words + i * pairs, 1);
  }
  // A head dim that is not a multiple of 32 leaves a last transpose of fewer than 16 words per
  // slot: it reads past each slot's words (into the next one's, or the padding) and writes only its own.
  int32_t* kw = reinterpret_cast<int32_t*>(kt);
  for (int64_t s = 0; s < rz_cpu::kRun; s += 16)
    for (int64_t c = 0; c < pairs; c += 16)
      transpose_words16(words + s * pairs + c, pairs, kw + c * kBlock + first + s, kBlock, std::min<int64_t>(16, pairs - c));
}
#endif

// Phase one for one block of one head: K transposed into [D][kBlock] (or as int16 pairs), V as rows
// or bf16 pairs (read through the block table where there is one), and with the first KV head the
// block's positions. `row`: room for max(D, 2 * Dv) f32s; `words`: for int16 K, as key_run_int16's.
template <Kv KT, Kv VT>
void convert_block(const Problem& p, int64_t head, int64_t block, float* row, int32_t* words) {
  const int64_t b = head / p.Hkv, kv = head % p.Hkv, first = block * kBlock;
  const int64_t n = std::min(kBlock, p.S_used - first);
  if (kv == 0) {
    int32_t* positions = p.positions + b * p.n_blocks * kBlock + first;
    rz_cpu::slot_positions(p, b, first, n, positions);
    std::fill(positions + n, positions + kBlock, -1);
  }
  float* kt = p.keys + (head * p.n_blocks + block) * kBlock * p.D;
  float* vb = p.values + (head * p.n_blocks + block) * p.value_block_floats();
  // Rows are looked up kRun slots at a time (attention_kv.h's Rows holds one run); a slot past
  // the run's count reads zeros.
  for (int64_t run = 0; run < kBlock; run += rz_cpu::kRun) {
    const int64_t in_run = std::clamp<int64_t>(n - run, 0, rz_cpu::kRun);
    Rows keys, values;
    rz_cpu::slot_rows<KT>(p, p.k, p.k_scales, p.D, b, kv, first + run, in_run, keys);
    rz_cpu::slot_rows<VT>(p, p.v, p.v_scales, p.Dv, b, kv, first + run, in_run, values);
#if defined(__AVX512VNNI__)
    if (p.int16_scores) {
      key_run_int16<KT>(p, keys, run, kt, row, words);
    } else
#endif
    {
      for (int64_t i = 0; i < rz_cpu::kRun; ++i) {
        row_f32<KT>(keys, i, p.D, row);
        for (int64_t d = 0; d < p.D; ++d) kt[d * kBlock + run + i] = row[d];
      }
    }
#if defined(__AVX512F__)
    if (p.bf16_values) {
      uint32_t* vw = reinterpret_cast<uint32_t*>(vb) + run / 2 * p.Dv;
      for (int64_t i = 0; i < rz_cpu::kRun; i += 2) {
        if constexpr (VT == Kv::F16 || VT == Kv::BF16) {
          value_pairs_bf16<VT>(values.data[i], values.data[i + 1], p.Dv, vw + i / 2 * p.Dv);
        } else {
          row_f32<VT>(values, i, p.Dv, row);
          row_f32<VT>(values, i + 1, p.Dv, row + p.Dv);
          value_pairs_bf16(row, row + p.Dv, p.Dv, vw + i / 2 * p.Dv);
        }
      }
      continue;
    }
#endif
    for (int64_t i = 0; i < rz_cpu::kRun; ++i) row_f32<VT>(values, i, p.Dv, vb + (run + i) * p.Dv);
  }
}

// What a block's slots hold, so that most rows get their mask without a look at each slot.
struct BlockKeys {
  int32_t lowest, highest;  // over its slots, empty ones included
  bool full;  // all kBlock slots used and none empty
};

inline BlockKeys block_keys(const Problem& p, const int32_t* k_pos, int64_t block) {
  const int64_t first = block * kBlock, n = std::min<int64_t>(kBlock, p.S_used - first);
  BlockKeys keys{k_pos[first], k_pos[first], n == kBlock};
  for (int64_t j = 0; j < n; ++j) {
    keys.lowest = std::min(keys.lowest, k_pos[first + j]);
    keys.highest = std::max(keys.highest, k_pos[first + j]);
  }
  keys.full &= keys.lowest >= 0;
  return keys;
}

// Which of block `block`'s slots a query at `position` sees: bit j for slot block * kBlock + j.
inline BlockMask visible_mask(const Problem& p, const int32_t* k_pos, int64_t block, const BlockKeys& keys, int32_t position) {
  const bool window_clear = p.window == 0 || keys.lowest > position - p.window;
  if (keys.highest < 0 || keys.lowest > position || (p.window > 0 && keys.highest <= position - p.window)) return 0;
  if (keys.full && keys.highest <= position && window_clear) return ~BlockMask{0};
  BlockMask mask = 0;
  const int64_t first = block * kBlock, n = std::min<int64_t>(kBlock, p.S_used - first);
  for (int64_t j = 0; j < n; ++j) {
    const int32_t key = k_pos[first + j];
    mask |= static_cast<BlockMask>(key >= 0 && key <= position && (p.window == 0 || key > position - p.window)) << j;
  }
  return mask;
}

// Blocks per span. A register tile of rows scores all of a span's blocks, folds them into its
// online softmax at once (one max, correction and sum update per row and span), then multiplies
// them by V with its output rows loaded and stored once per span instead of once per block, where
// those loads and stores were a visible share of a deep chunk's time. 8 blocks measured best of
// 4, 8 and 16 (benchmarks/results/chat-attention-session36.md); the tile's scores over a span
// (kRows * kSpanSlots floats) stay within L1.
constexpr int64_t kSpanBlocks = 8;
constexpr int64_t kSpanSlots = kSpanBlocks * kBlock;

// The online-softmax state of one task's rows, and the span being folded in by one register tile.
struct RowState {
  std::vector<float> max;  // [rows]
  // [rows][kLanes]: each row's sum kept per lane and folded once its blocks are done, since a
  // fold of shuffles per row and block was a large part of the softmax's time.
  std::vector<float> sum;
  float* out = nullptr;  // [rows, Dv] (unnormalized)
  float* weights = nullptr;  // [kRows][kSpanSlots]: the tile's scores over the span, then its softmax numerators
  std::vector<float> buffer;  // out and weights, each from a cache line (cache_line_aligned)
  BlockMask masks[kRows][kSpanBlocks];  // the tile's rows', per block of the span
  float correction[kRows];  // what the tile's rows' earlier sums and outputs are scaled by
  void reset(int64_t rows, int64_t Dv) {
    max.assign(rows, -INFINITY);
    sum.assign(rows * kLanes, 0.0f);
    // Dv is a multiple of 16 floats, so weights starts on a line too.
    buffer.assign(rows * Dv + kRows * kSpanSlots + kCacheLineFloats, 0.0f);
    out = cache_line_aligned(buffer.data());
    weights = out + rows * Dv;
  }
};

// The blocks of a span that some row of a register tile sees, as offsets in the span.
struct SpanBlocks {
  int64_t first;  // the span's first block
  int64_t seen[kSpanBlocks];
  int count = 0;
};

// Scores of rows [r, r + n) (n <= kRows) against one block, scaled, into `scores` (row i at
// scores + i * kSpanSlots): each a chain of FMAs over the head dim in order, so a row's scores do
// not depend on its tile. The register tile always holds kRows rows (the last one repeated when n
// is smaller).
void score_block(const Problem& p, const float* const* q_rows, const float* kt, int64_t r, int n, float* scores) {
  const float* q[kRows];
  for (int i = 0; i < kRows; ++i) q[i] = q_rows[r + std::min(i, n - 1)];
  for (int key = 0; key < kBlock; key += kTileLanes) {
    Vf acc[kRows][kTileVecs];
    for (int i = 0; i < kRows; ++i)
      for (int u = 0; u < kTileVecs; ++u) acc[i][u] = splat(0.0f);
    for (int64_t d = 0; d < p.D; ++d) {
      Vf k[kTileVecs];
      for (int u = 0; u < kTileVecs; ++u) k[u] = load(kt + d * kBlock + key + u * kLanes);
      for (int i = 0; i < kRows; ++i) {
        const Vf qd = splat(q[i][d]);
        for (int u = 0; u < kTileVecs; ++u) acc[i][u] += qd * k[u];
      }
    }
    for (int i = 0; i < n; ++i)
      for (int u = 0; u < kTileVecs; ++u) store(scores + i * kSpanSlots + key + u * kLanes, acc[i][u] * splat(p.scale));
  }
}

#if defined(__AVX512VNNI__)
// score_block with int16 scores: q_words [rows][D / 2] and q_scales [rows] (the call's scale
// folded in) the rows' int16 pairs, kt a block of K's (Problem::key_scales_offset). Exact int32
// sums, so a row's scores do not depend on its tile either.
void score_block_int16(const Problem& p, const int32_t* q_words, const float* q_scales, const float* kt, int64_t r, int n,
                       float* scores) {
  const int64_t pairs = p.D / 2;
  const int32_t* q[kRows];
  for (int i = 0; i < kRows; ++i) q[i] = q_words + (r + std::min(i, n - 1)) * pairs;
  const int32_t* kw = reinterpret_cast<const int32_t*>(kt);
  const float* k_scales = kt + Problem::key_scales_offset(p.D);
  for (int key = 0; key < kBlock; key += kTileLanes) {
    __m512i acc[kRows][kTileVecs];
    for (int i = 0; i < kRows; ++i)
      for (int u = 0; u < kTileVecs; ++u) acc[i][u] = _mm512_setzero_si512();
    for (int64_t d = 0; d < pairs; ++d) {
      __m512i k[kTileVecs];
      for (int u = 0; u < kTileVecs; ++u) k[u] = _mm512_loadu_si512(kw + d * kBlock + key + u * kLanes);
      for (int i = 0; i < kRows; ++i) {
        const __m512i qd = _mm512_set1_epi32(q[i][d]);
        for (int u = 0; u < kTileVecs; ++u) acc[i][u] = _mm512_dpwssd_epi32(acc[i][u], qd, k[u]);
      }
    }
    for (int i = 0; i < n; ++i) {
      const __m512 row_scale = _mm512_set1_ps(q_scales[r + i]);
      for (int u = 0; u < kTileVecs; ++u) {
        const __m512 block_scores = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[i][u]), row_scale), _mm512_loadu_ps(k_scales + key + u * kLanes));
        _mm512_storeu_ps(scores + i * kSpanSlots + key + u * kLanes, block_scores);
      }
    }
  }
}
#endif

// Rows [r, r + n)'s scores over the span's seen blocks (st.weights) capped, masked and folded into
// their online softmax: st.weights becomes the numerators (zeros in the blocks a row does not
// see), st.correction what the earlier blocks' sums and outputs are scaled by, for accumulate_values.
template <bool kBf16Weights = false>
void softmax_span(const Problem& p, int64_t r, int n, const SpanBlocks& span, RowState& st) {
  Vi lane_bit;
  for (int l = 0; l < kLanes; ++l) lane_bit[l] = 1 << l;
  for (int i = 0; i < n; ++i) {
    const int64_t row = r + i;
    float* w = st.weights + i * kSpanSlots;
    Vf peak = splat(-INFINITY);
    bool sees = false;
    for (int s = 0; s < span.count; ++s) {
      const BlockMask mask = st.masks[i][span.seen[s]];
      float* wb = w + span.seen[s] * kBlock;
      if (!mask) {
        std::fill(wb, wb + kBlock, 0.0f);
        continue;
      }
      sees = true;
      if (p.softcap == 0 && mask == ~BlockMask{0}) {
        for (int u = 0; u < kBlockVecs; ++u) peak = select(load(wb + u * kLanes) > peak, load(wb + u * kLanes), peak);
        continue;
      }
      for (int u = 0; u < kBlockVecs; ++u) {
        Vf x = load(wb + u * kLanes);
        if (p.softcap > 0) {
          // softcap * tanh(x / softcap), tanh(y) = 1 - 2 / (exp(2y) + 1)
          const Vf e = exp_lanes(x * splat(2.0f / p.softcap));
          x = (splat(1.0f) - splat(2.0f) / (e + splat(1.0f))) * splat(p.softcap);
        }
        if (mask != ~BlockMask{0}) {
          const Vi seen = ((Vi{} + static_cast<int32_t>(mask >> (u * kLanes))) & lane_bit) != 0;
          x = select(seen, x, splat(-INFINITY));
        }
        store(wb + u * kLanes, x);  // capped and masked, for the numerators below
        peak = select(x > peak, x, peak);
      }
    }
    if (!sees) {
      st.correction[i] = 1.0f;
      continue;
    }
    // The lanes' max (a fold of shuffles) only when some score passes the row's max; at depth most
    // spans do not move it.
    const float new_max = any_lane(peak > splat(st.max[row])) ? std::max(st.max[row], lane_max(peak)) : st.max[row];
    st.correction[i] = new_max == st.max[row] ? 1.0f : std::exp(st.max[row] - new_max);
    st.max[row] = new_max;
    Vf total = splat(0.0f);
    for (int s = 0; s < span.count; ++s) {
      if (!st.masks[i][span.seen[s]]) continue;
      float* wb = w + span.seen[s] * kBlock;
      for (int u = 0; u < kBlockVecs; ++u) {
        Vf e = exp_lanes<false>(load(wb + u * kLanes) - splat(new_max));
        // bf16 values multiply by the numerators as bf16s, so the sum adds those same values.
        if constexpr (kBf16Weights) e = bf16_rounded(e);
        store(wb + u * kLanes, e);
        total += e;
      }
    }
    float* sum = &st.sum[row * kLanes];
    store(sum, load(sum) * splat(st.correction[i]) + total);
  }
}

// Slots of block `block` in use.
inline int64_t block_slots(const Problem& p, int64_t block) { return std::min<int64_t>(kBlock, p.S_used - block * kBlock); }

// out[row][lane, lane + VECS * kLanes) = out * correction + sum_j weights[row, j] * v_j[...] over
// the span's seen blocks, for rows [r, r + n); kRows rows in registers as in score_block.
template <int VECS>
void accumulate_lanes(const Problem& p, const float* values, const SpanBlocks& span, int64_t r, int n, int64_t lane, RowState& st) {
  int64_t rows[kRows];
  for (int i = 0; i < kRows; ++i) rows[i] = r + std::min(i, n - 1);
  Vf acc[kRows][VECS];
  for (int i = 0; i < kRows; ++i) {
    const Vf c = splat(st.correction[std::min(i, n - 1)]);
    for (int u = 0; u < VECS; ++u) acc[i][u] = c * load(st.out + rows[i] * p.Dv + lane + u * kLanes);
  }
  for (int s = 0; s < span.count; ++s) {
    const int64_t block = span.first + span.seen[s], n_keys = block_slots(p, block);
    const float* vb = values + block * p.value_block_floats();
    const float* weights = st.weights + span.seen[s] * kBlock;
    for (int64_t j = 0; j < n_keys; ++j) {
      Vf v[VECS];
      for (int u = 0; u < VECS; ++u) v[u] = load(vb + j * p.Dv + lane + u * kLanes);
      for (int i = 0; i < kRows; ++i) {
        const Vf w = splat(weights[std::min(i, n - 1) * kSpanSlots + j]);
        for (int u = 0; u < VECS; ++u) acc[i][u] += w * v[u];
      }
    }
  }
  for (int i = 0; i < n; ++i)
    for (int u = 0; u < VECS; ++u) store(st.out + rows[i] * p.Dv + lane + u * kLanes, acc[i][u]);
}

void accumulate_values(const Problem& p, const float* values, const SpanBlocks& span, int64_t r, int n, RowState& st) {
  int64_t lane = 0;
  for (; lane + kTileLanes <= p.Dv; lane += kTileLanes) accumulate_lanes<kTileVecs>(p, values, span, r, n, lane, st);
  for (; lane < p.Dv; lane += kLanes) accumulate_lanes<1>(p, values, span, r, n, lane, st);
}

#if defined(__AVX512F__)
// accumulate_lanes with bf16 values: weight_words holds the tile's numerators as bf16 pairs
// [kRows][kSpanSlots / 2], V's blocks are words of pairs of slots (value_pairs_bf16).
template <int VECS>
RZ_BF16 void accumulate_lanes_bf16(const Problem& p, const float* values, const SpanBlocks& span, int64_t r, int n, int64_t lane,
                                   const uint32_t* weight_words, RowState& st) {
  int64_t rows[kRows];
  for (int i = 0; i < kRows; ++i) rows[i] = r + std::min(i, n - 1);
  __m512 acc[kRows][VECS];
  for (int i = 0; i < kRows; ++i) {
    const __m512 c = _mm512_set1_ps(st.correction[std::min(i, n - 1)]);
    for (int u = 0; u < VECS; ++u) acc[i][u] = _mm512_mul_ps(c, _mm512_loadu_ps(st.out + rows[i] * p.Dv + lane + u * kLanes));
  }
  for (int s = 0; s < span.count; ++s) {
    const int64_t block = span.first + span.seen[s];
    const int64_t n_pairs = (block_slots(p, block) + 1) / 2;  // an odd block's last pair has a zero slot
    const uint32_t* vw = reinterpret_cast<const uint32_t*>(values + block * p.value_block_floats());
    const uint32_t* words = weight_words + span.seen[s] * kBlock / 2;
    for (int64_t j = 0; j < n_pairs; ++j) {
      __m512bh v[VECS];
      for (int u = 0; u < VECS; ++u) v[u] = (__m512bh)_mm512_loadu_si512(vw + j * p.Dv + lane + u * kLanes);
      for (int i = 0; i < kRows; ++i) {
        const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(words[std::min(i, n - 1) * (kSpanSlots / 2) + j]));
        for (int u = 0; u < VECS; ++u) acc[i][u] = _mm512_dpbf16_ps(acc[i][u], w, v[u]);
      }
    }
  }
  for (int i = 0; i < n; ++i)
    for (int u = 0; u < VECS; ++u) _mm512_storeu_ps(st.out + rows[i] * p.Dv + lane + u * kLanes, acc[i][u]);
}

RZ_BF16 void accumulate_values_bf16(const Problem& p, const float* values, const SpanBlocks& span, int64_t r, int n,
                                    uint32_t* weight_words, RowState& st) {
  // The numerators are bf16 values already (softmax_span<true>), so this conversion is exact.
  for (int i = 0; i < n; ++i) {
    for (int s = 0; s < span.count; ++s) {
      const int64_t at = i * kSpanSlots + span.seen[s] * kBlock;
      uint16_t* to = reinterpret_cast<uint16_t*>(weight_words) + at;
      for (int64_t c = 0; c < kBlock; c += kLanes) _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + c), to_bf16(_mm512_loadu_ps(st.weights + at + c)));
    }
  }
  int64_t lane = 0;
  for (; lane + kTileLanes <= p.Dv; lane += kTileLanes) accumulate_lanes_bf16<kTileVecs>(p, values, span, r, n, lane, weight_words, st);
  for (; lane < p.Dv; lane += kLanes) accumulate_lanes_bf16<1>(p, values, span, r, n, lane, weight_words, st);
}

#endif

// A thread's buffers for its tasks, kept between calls.
struct TaskState {
  RowState rows;
  std::vector<const float*> q_rows;
  std::vector<uint32_t> weight_words;  // bf16 values' numerators, [kRows][kSpanSlots / 2]
  std::vector<int32_t> q_words;  // int16 scores' query rows, [rows][D / 2]
  std::vector<float> q_scales;  // [rows], times the call's scale
};

// Found through a call the compiler cannot repeat: in a shared library each use of a thread_local
// is a __tls_get_addr call, and GCC re-derived the state's address from it once per row in the
// softmax, spilling 16 vector registers around each call.
__attribute__((noinline)) TaskState& task_state() {
  static thread_local TaskState state;
  return state;
}

// Phase two for one task: query rows [r0, r1) of head (b, kv), written to o normalized; with bf16
// values (kBf16), inlined into attend_rows_bf16, which is compiled for them.
template <bool kBf16>
__attribute__((always_inline)) inline void attend_rows(const Problem& p, int64_t b, int64_t kv, int64_t r0, int64_t r1, float* o) {
  const int64_t head = b * p.Hkv + kv, rows = r1 - r0;
  const int32_t* k_pos = p.positions + b * p.n_blocks * kBlock;
  const int32_t* q_pos = p.q_positions + b * p.T;
  TaskState& task = task_state();
  RowState& st = task.rows;
  std::vector<const float*>& q_rows = task.q_rows;
  st.reset(rows, p.Dv);
  q_rows.resize(rows);
  for (int64_t r = 0; r < rows; ++r) q_rows[r] = p.q + rz_cpu::query_row(p, b, kv, r0 + r) * p.D;
  if constexpr (kBf16) task.weight_words.resize(kRows * kSpanSlots / 2);
#if defined(__AVX512VNNI__)
  if (p.int16_scores) {
    task.q_words.resize(rows * p.D / 2);
    task.q_scales.resize(rows);
    const float limit = int16_limit(p.D);
    for (int64_t r = 0; r < rows; ++r) task.q_scales[r] = int16_pairs(q_rows[r], p.D, limit, task.q_words.data() + r * p.D / 2, 1) * p.scale;
  }
#endif
  const float* keys = p.head_keys(head);
  const float* values = p.head_values(head);
  for (int64_t first = 0; first < p.n_blocks; first += kSpanBlocks) {
    const int64_t blocks = std::min(kSpanBlocks, p.n_blocks - first);
    BlockKeys keys_here[kSpanBlocks];
    for (int64_t s = 0; s < blocks; ++s) keys_here[s] = block_keys(p, k_pos, first + s);
    for (int64_t r = 0; r < rows; r += kRows) {
      const int n = static_cast<int>(std::min<int64_t>(kRows, rows - r));
      SpanBlocks span;
      span.first = first;
      for (int64_t s = 0; s < blocks; ++s) {
        BlockMask any = 0;
        for (int i = 0; i < n; ++i) any |= st.masks[i][s] = visible_mask(p, k_pos, first + s, keys_here[s], q_pos[(r0 + r + i) % p.T]);
        if (any) span.seen[span.count++] = s;
      }
      if (!span.count) continue;
      for (int s = 0; s < span.count; ++s) {
        const float* kt = keys + (first + span.seen[s]) * kBlock * p.D;
        float* scores = st.weights + span.seen[s] * kBlock;
#if defined(__AVX512VNNI__)
        if (p.int16_scores) {
          score_block_int16(p, task.q_words.data(), task.q_scales.data(), kt, r, n, scores);
        } else {
          score_block(p, q_rows.data(), kt, r, n, scores);
        }
#else
        score_block(p, q_rows.data(), kt, r, n, scores);
#endif
      }
      softmax_span<kBf16>(p, r, n, span, st);
      if constexpr (kBf16) {
#if defined(__AVX512F__)
        accumulate_values_bf16(p, values, span, r, n, task.weight_words.data(), st);
#endif
      } else {
        accumulate_values(p, values, span, r, n, st);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = o + rz_cpu::query_row(p, b, kv, r0 + r) * p.Dv;
    const float* src = st.out + r * p.Dv;
    const float sum = lane_sum(load(&st.sum[r * kLanes]));
    const float inverse = sum > 0 ? 1.0f / sum : 0.0f;  // a row that saw nothing gets zeros
    for (int64_t i = 0; i < p.Dv; ++i) dst[i] = src[i] * inverse;
  }
}

void attend_rows_f32(const Problem& p, int64_t b, int64_t kv, int64_t r0, int64_t r1, float* o) { attend_rows<false>(p, b, kv, r0, r1, o); }
#if defined(__AVX512F__)
RZ_BF16 void attend_rows_bf16(const Problem& p, int64_t b, int64_t kv, int64_t r0, int64_t r1, float* o) { attend_rows<true>(p, b, kv, r0, r1, o); }
#endif

// Query rows per task: kRowTile, or fewer (whole register tiles) while that leaves fewer than four
// tasks per thread. A short chunk (a chat turn's last few tokens) has one tile per KV head
// otherwise, and three heads kept one of two threads idle half the time.
int64_t task_rows(int64_t rows, int64_t heads, int64_t threads) {
  int64_t tile = kRowTile;
  while (tile > kRows && heads * ((rows + tile - 1) / tile) < 4 * threads) tile -= kRows;
  return tile;
}

// Whether this build and CPU can take bf16 values.
bool bf16_values_available() {
#if defined(__AVX512F__)
  static const bool available = __builtin_cpu_supports("avx512bf16");
  return available;
#else
  return false;
#endif
}

// Whether this build can take int16 scores (every CPU that runs an AVX-512 VNNI build can).
constexpr bool int16_scores_available() {
#if defined(__AVX512VNNI__)
  return true;
#else
  return false;
#endif
}

ffi::Error PromptAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer k_scales,
                               ffi::AnyBuffer v, ffi::AnyBuffer v_scales, ffi::Buffer<ffi::S32> q_positions,
                               ffi::Buffer<ffi::S32> k_positions, ffi::Buffer<ffi::S32> block_table,
                               ffi::ResultBuffer<ffi::F32> o, int32_t window, float scale, float softcap, bool keys_in_order,
                               bool bf16_values, bool int16_scores) {
  Problem p{};
  if (ffi::Error error = rz_cpu::read_operands("rz_prompt_attention", 16, q, k, k_scales, v, v_scales, q_positions, k_positions, block_table,
                                                window, scale, softcap, keys_in_order, p);
      error.failure()) {
    return error;
  }
  if (bf16_values && !bf16_values_available()) {
    return ffi::Error::InvalidArgument("rz_prompt_attention: bf16 values need AVX-512 BF16, which this CPU or build lacks");
  }
  if (int16_scores && !int16_scores_available()) {
    return ffi::Error::InvalidArgument("rz_prompt_attention: int16 scores need an AVX-512 VNNI build");
  }
  if (p.B == 0 || p.Hq == 0 || p.T == 0) return ffi::Error::Success();
  p.n_blocks = (p.S_used + kBlock - 1) / kBlock;
  p.bf16_values = bf16_values;
  p.int16_scores = int16_scores;
  const int64_t heads = p.B * p.Hkv;
  thread_local std::vector<float> converted;
  thread_local std::vector<int32_t> positions;
  converted.resize(heads * p.n_blocks * (kBlock * p.D + p.value_block_floats()) + kCacheLineFloats);
  positions.resize(p.B * p.n_blocks * kBlock);
  p.keys = cache_line_aligned(converted.data());
  p.values = p.keys + heads * p.n_blocks * kBlock * p.D;
  p.positions = positions.data();
  const int64_t threads = rz_cpu::pool_threads(pool, 0);

  rz_cpu::parallel_for(pool, heads * p.n_blocks, threads, [&](int64_t task) {
    thread_local std::vector<float> row;
    thread_local std::vector<int32_t> words;
    row.resize(std::max(p.D, 2 * p.Dv));
    words.resize(rz_cpu::kRun * p.D / 2 + 16);
    rz_cpu::with_kv_types(p.k_type, p.v_type, [&](auto kt, auto vt) {
      convert_block<decltype(kt)::value, decltype(vt)::value>(p, task / p.n_blocks, task % p.n_blocks, row.data(), words.data());
    });
  });
  const int64_t row_tile = task_rows(p.R, heads, threads), tiles = (p.R + row_tile - 1) / row_tile;
  float* out = o->typed_data();
  rz_cpu::parallel_for(pool, heads * tiles, threads, [&](int64_t task) {
    const int64_t head = task / tiles, tile = task % tiles;
    const int64_t r0 = tile * row_tile, r1 = std::min(p.R, (tile + 1) * row_tile);
#if defined(__AVX512F__)
    if (p.bf16_values) return attend_rows_bf16(p, head / p.Hkv, head % p.Hkv, r0, r1, out);
#endif
    attend_rows_f32(p, head / p.Hkv, head % p.Hkv, r0, r1, out);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RzPromptAttention, PromptAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("window")
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<bool>("keys_in_order")
                                  .Attr<bool>("bf16_values")
                                  .Attr<bool>("int16_scores"));
