// Decode attention for x86-64 CPUs with AVX2: few queries per sequence over a KV cache, K and V
// streamed once. Shapes and mask contract as rz_kernels/causal_attention.py:
//
//   q [B, Hq, T, D] f32, k [B, Hkv, S, D] and v [B, Hkv, S, Dv] as one of the cache types
//   (f32, f16, bf16, or q8_0: int8 quants with k_scales [B, Hkv, S, D / 32] f16, one scale per 32
//   elements; a float type's scales buffer is empty), K and V independently,
//   q_positions [B, T] int32, k_positions [B, S] int32 (-1: empty) -> o [B, Hq, T, Dv] f32;
//   or K/V a paged pool read in place through a block table (attention_kv.h's Operands).
//
// A task is one (sequence, KV head, split of the slots): it holds the G * T query rows of the
// KV head's group (query head h reads KV head h / G), less those of padded steps, and walks its
// slots in blocks of 32 with an online softmax (running max, running sum, unnormalized output per
// row). The splits of a head are merged at the end (attention_decode.h). XLA:CPU's dots take a
// slow path at these shapes (4 query rows against thousands of keys), far below the memory's
// rate; this reads K and V at memory speed.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "attention_decode.h"
#include "attention_kv.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;


namespace {

using rz_cpu::hsum;
using rz_cpu::hmax;
using rz_cpu::kElemBytes;
using rz_cpu::kQ8Block;
using rz_cpu::Kv;
using rz_cpu::Rows;

constexpr int64_t kKeyBlock = 32;

// exp(x) for 8 floats: Cephes' range reduction and polynomial (relative error ~2e-7); x below
// -87.3 gives 0, so exp(-inf) = 0.
RZ_INLINE __m256 exp_ps(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(exponent)));
}

// Elements i..i+7 of the run's slot j's row as f32.
template <Kv T>
RZ_INLINE __m256 load8(const Rows& rows, int64_t j, int64_t i) {
  const auto* bytes = rows.data[j] + i * kElemBytes<T>;
  if constexpr (T == Kv::F32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(bytes));
  } else if constexpr (T == Kv::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  } else if constexpr (T == Kv::BF16) {  // bf16 is an f32's upper half
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes))), 16));
  } else {
    const __m256 quants = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes))));
    return _mm256_mul_ps(quants, _mm256_set1_ps(_cvtsh_ss(rows.scales[j][i / kQ8Block])));
  }
}

using Problem = rz_cpu::Operands;
using rz_cpu::Partial;

// Lane j of the result: the sum of the lanes of a[j] (8 dot products finished at once).
RZ_INLINE __m256 hsum8(const __m256 (&a)[8]) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// Query rows that share each K and V row loaded (and converted from the cache type): with
// AVX-512's 32 registers, 3 rows' 8 score chains (24) or 3 rows x 32 value lanes (12) stay in
// registers; AVX2's 16 hold one row's scores and two rows' values. A row's arithmetic is the same
// in any group, so its result is too.
#if defined(__AVX512F__)
constexpr int kScoreRows = 3;
constexpr int kValueRows = 3;
#else
constexpr int kScoreRows = 1;
constexpr int kValueRows = 2;
#endif

// The scores of RG query rows against the run's 32 keys, -inf where masked (bit j of row r's mask:
// key j visible), row r's into scores + r * kKeyBlock.
template <int RG, Kv KT>
RZ_INLINE void block_scores(const Problem& p, const float* const* q, const Rows& keys, const uint32_t* masks, float* scores) {
  for (int64_t j0 = 0; j0 < kKeyBlock; j0 += 8) {
    uint32_t group_masks[RG], any = 0;
#pragma GCC unroll 4
    for (int r = 0; r < RG; ++r) any |= group_masks[r] = (masks[r] >> j0) & 0xFF;
    if (!any) {
#pragma GCC unroll 4
      for (int r = 0; r < RG; ++r) _mm256_storeu_ps(scores + r * kKeyBlock + j0, _mm256_set1_ps(-INFINITY));
      continue;
    }
    __m256 acc[RG][8];
#pragma GCC unroll 4
    for (int r = 0; r < RG; ++r) {
#pragma GCC unroll 8
      for (int jj = 0; jj < 8; ++jj) acc[r][jj] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < p.D; i += 8) {
      __m256 qv[RG];
#pragma GCC unroll 4
      for (int r = 0; r < RG; ++r) qv[r] = _mm256_loadu_ps(q[r] + i);
#pragma GCC unroll 8
      for (int jj = 0; jj < 8; ++jj) {
        const __m256 kv = load8<KT>(keys, j0 + jj, i);
#pragma GCC unroll 4
        for (int r = 0; r < RG; ++r) acc[r][jj] = _mm256_fmadd_ps(qv[r], kv, acc[r][jj]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < RG; ++r) {
      __m256 s = _mm256_mul_ps(hsum8(acc[r]), _mm256_set1_ps(p.scale));
      if (p.softcap > 0) {
        // softcap * tanh(s / softcap), tanh(y) = 1 - 2 / (exp(2y) + 1)
        const __m256 e = exp_ps(_mm256_mul_ps(s, _mm256_set1_ps(2.0f / p.softcap)));
        const __m256 tanh = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
        s = _mm256_mul_ps(tanh, _mm256_set1_ps(p.softcap));
      }
      const __m256i bits = _mm256_and_si256(_mm256_set1_epi32(static_cast<int32_t>(group_masks[r])), _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128));
      const __m256 seen = _mm256_castsi256_ps(_mm256_cmpeq_epi32(bits, _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128)));
      _mm256_storeu_ps(scores + r * kKeyBlock + j0, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), s, seen));
    }
  }
}

// out[r] = out[r] * correction[r] + sum_j weights[r, j] v_j for RG rows and NV * 8 output lanes
// at lane i, the RG * NV accumulators kept in registers while the block's V rows stream by. Each
// accumulator is an FMA chain over the keys: RG * NV = 8 chains keep both FMA units busy (with
// fewer, every key waits on the FMA latency).
template <int RG, int NV, Kv VT>
RZ_INLINE void value_tile(const Problem& p, const Rows& values, int64_t n, const float* weights, const float* correction, float* out, int64_t i) {
  __m256 acc[RG][NV];
#pragma GCC unroll 4
  for (int r = 0; r < RG; ++r) {
    const __m256 c = _mm256_set1_ps(correction[r]);
#pragma GCC unroll 8
    for (int u = 0; u < NV; ++u) acc[r][u] = _mm256_mul_ps(c, _mm256_loadu_ps(out + r * p.Dv + i + 8 * u));
  }
  for (int64_t j = 0; j < n; ++j) {
    __m256 vv[NV];
#pragma GCC unroll 8
    for (int u = 0; u < NV; ++u) vv[u] = load8<VT>(values, j, i + 8 * u);
#pragma GCC unroll 4
    for (int r = 0; r < RG; ++r) {
      const __m256 w = _mm256_broadcast_ss(weights + r * kKeyBlock + j);
#pragma GCC unroll 8
      for (int u = 0; u < NV; ++u) acc[r][u] = _mm256_fmadd_ps(w, vv[u], acc[r][u]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RG; ++r) {
#pragma GCC unroll 8
    for (int u = 0; u < NV; ++u) _mm256_storeu_ps(out + r * p.Dv + i + 8 * u, acc[r][u]);
  }
}

// value_tile over the first n_rows rows and all lanes: rows in groups of kValueRows, 32 lanes at a
// time; the rows left 64 lanes at a time, one by one; head dims that are not multiples of those
// finish 8 lanes at a time.
template <Kv VT>
RZ_INLINE void block_values(const Problem& p, int64_t n_rows, const Rows& values, int64_t n, const float* weights, const float* correction,
                            float* out) {
  int64_t r = 0;
  for (; r + kValueRows <= n_rows; r += kValueRows) {
    const float* w = weights + r * kKeyBlock;
    int64_t i = 0;
    for (; i + 32 <= p.Dv; i += 32) value_tile<kValueRows, 4, VT>(p, values, n, w, correction + r, out + r * p.Dv, i);
    for (; i < p.Dv; i += 8) value_tile<kValueRows, 1, VT>(p, values, n, w, correction + r, out + r * p.Dv, i);
  }
  for (; r < n_rows; ++r) {
    const float* w = weights + r * kKeyBlock;
    int64_t i = 0;
    for (; i + 64 <= p.Dv; i += 64) value_tile<1, 8, VT>(p, values, n, w, correction + r, out + r * p.Dv, i);
    for (; i < p.Dv; i += 8) value_tile<1, 1, VT>(p, values, n, w, correction + r, out + r * p.Dv, i);
  }
}

// Per-thread scratch that outlives a call: the query row pointers, softmax weights and
// corrections, and masks of one task.
struct TaskScratch {
  std::vector<const float*> q_rows;
  std::vector<float> weights, correction;
  std::vector<uint32_t> masks, row_masks;
  std::vector<float> scores;  // [R][kKeyBlock]
};

// The task's softmax state and scratch hold its rows in the order of `rows` (sequence b's live
// rows, rz_cpu::live_rows): row i of the task is the group's row rows[i].
template <Kv KT, Kv VT>
void attend_split(const Problem& p, int64_t b, int64_t kv, const int64_t* rows, int64_t n_rows, int64_t s0, int64_t s1, Partial& part) {
  const int32_t* q_pos = p.q_positions + b * p.T;
  thread_local TaskScratch scratch;
  auto& q_rows = scratch.q_rows;
  auto& weights = scratch.weights;
  auto& correction = scratch.correction;
  auto& masks = scratch.masks;
  auto& row_masks = scratch.row_masks;
  auto& scores = scratch.scores;
  q_rows.resize(n_rows);
  row_masks.resize(n_rows);
  scores.resize(n_rows * kKeyBlock);
  weights.resize(n_rows * kKeyBlock);
  correction.resize(n_rows);
  masks.resize(p.T);
  for (int64_t r = 0; r < n_rows; ++r) q_rows[r] = p.q + rz_cpu::query_row(p, b, kv, rows[r]) * p.D;
  int32_t k_pos[kKeyBlock];
  Rows keys, values;
  for (int64_t start = s0; start < s1; start += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, s1 - start);
    rz_cpu::slot_positions(p, b, start, n, k_pos);
    // Which of the block's keys each query step sees: bit j of masks[t].
    uint32_t any = 0;
    for (int64_t t = 0; t < p.T; ++t) {
      const int32_t position = q_pos[t];
      uint32_t mask = 0;
      for (int64_t j = 0; j < n; ++j) {
        const int32_t key = k_pos[j];
        mask |= static_cast<uint32_t>(key >= 0 && key <= position && (p.window == 0 || key > position - p.window)) << j;
      }
      masks[t] = mask;
      any |= mask;
    }
    if (!any) continue;
    rz_cpu::slot_rows<KT>(p, p.k, p.k_scales, p.D, b, kv, start, n, keys);
    rz_cpu::slot_rows<VT>(p, p.v, p.v_scales, p.Dv, b, kv, start, n, values);
    // Row r's mask is its time step's; its scores go to scores[r].
    for (int64_t r = 0; r < n_rows; ++r) row_masks[r] = masks[rows[r] % p.T];
    int64_t g = 0;
    for (; g + kScoreRows <= n_rows; g += kScoreRows) {
      block_scores<kScoreRows, KT>(p, q_rows.data() + g, keys, row_masks.data() + g, scores.data() + g * kKeyBlock);
    }
    for (; g < n_rows; ++g) block_scores<1, KT>(p, q_rows.data() + g, keys, row_masks.data() + g, scores.data() + g * kKeyBlock);
    for (int64_t r = 0; r < n_rows; ++r) {
      const float* row_scores = scores.data() + r * kKeyBlock;
      // Online softmax: the row's state moves to the new running max, then takes the block.
      __m256 block_max = _mm256_set1_ps(-INFINITY);
      for (int64_t j = 0; j < kKeyBlock; j += 8) block_max = _mm256_max_ps(block_max, _mm256_loadu_ps(row_scores + j));
      const float new_max = std::max(part.max[r], hmax(block_max));
      float* w = weights.data() + r * kKeyBlock;
      if (new_max == -INFINITY) {
        std::fill(w, w + kKeyBlock, 0.0f);
        correction[r] = 1.0f;
        continue;
      }
      correction[r] = std::exp(part.max[r] - new_max);
      part.max[r] = new_max;
      __m256 total = _mm256_setzero_ps();
      for (int64_t j = 0; j < kKeyBlock; j += 8) {
        const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(row_scores + j), _mm256_set1_ps(new_max)));
        _mm256_storeu_ps(w + j, e);
        total = _mm256_add_ps(total, e);
      }
      part.sum[r] = part.sum[r] * correction[r] + hsum(total);
    }
    block_values<VT>(p, n_rows, values, n, weights.data(), correction.data(), part.out);
  }
}

ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer k_scales, ffi::AnyBuffer v,
                         ffi::AnyBuffer v_scales, ffi::Buffer<ffi::S32> q_positions, ffi::Buffer<ffi::S32> k_positions,
                         ffi::Buffer<ffi::S32> block_table, ffi::ResultBuffer<ffi::F32> o, int32_t window, float scale, float softcap, bool keys_in_order) {
  Problem p{};
  if (ffi::Error error = rz_cpu::read_operands("rz_attention", 8, q, k, k_scales, v, v_scales, q_positions, k_positions, block_table,
                                                window, scale, softcap, keys_in_order, p);
      error.failure()) {
    return error;
  }
  if (p.B == 0 || p.Hq == 0 || p.T == 0) return ffi::Error::Success();

  rz_cpu::decode_attention(pool, p, o->typed_data(), [&](int64_t b, int64_t kv, const int64_t* rows, int64_t n_rows, int64_t s0, int64_t s1,
                                                        Partial& part) {
    rz_cpu::with_kv_types(p.k_type, p.v_type, [&](auto kt, auto vt) {
      attend_split<decltype(kt)::value, decltype(vt)::value>(p, b, kv, rows, n_rows, s0, s1, part);
    });
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RzAttention, AttentionImpl,
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
                                  .Attr<bool>("keys_in_order"));
