// Decode attention for aarch64 CPUs with NEON: attention.cc's algorithm and FFI handler
// (RzAttention, same buffers and attributes), in 128-bit vectors. Shapes and mask contract as
// rz_kernels/causal_attention.py:
//
//   q [B, Hq, T, D] f32, k [B, Hkv, S, D] and v [B, Hkv, S, Dv] as one of the cache types
//   (f32, f16, bf16, or q8_0 with f16 scales [B, Hkv, S, D / 32]), K and V independently,
//   q_positions [B, T] int32, k_positions [B, S] int32 (-1: empty) -> o [B, Hq, T, Dv] f32;
//   or K/V a paged pool read in place through a block table (attention_kv.h's Operands).
//
// A task is one (sequence, KV head, split of the slots): it holds the G * T query rows of the KV
// head's group, less those of padded steps, and walks its slots in blocks of 32 with an online
// softmax (running max, running sum, unnormalized output per row); the splits of a head are merged
// at the end (attention_decode.h).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "attention_decode.h"
#include "attention_kv.h"
#include "simd_neon.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using rz_cpu::kElemBytes;
using rz_cpu::kQ8Block;
using rz_cpu::Kv;
using rz_cpu::Rows;

constexpr int64_t kKeyBlock = 32;

// exp(x) for 4 floats: Cephes' range reduction and polynomial (relative error ~2e-7); x below
// -87.3 gives 0, so exp(-inf) = 0.
RZ_INLINE float32x4_t exp_f32x4(float32x4_t x) {
  const uint32x4_t underflow = vcltq_f32(x, vdupq_n_f32(-87.3f));
  x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.3f)), vdupq_n_f32(88.3f));
  const float32x4_t n = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
  float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
  r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
  float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
  p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
  p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
  p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
  p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
  p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
  const int32x4_t exponent = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
  const float32x4_t e = vmulq_f32(p, vreinterpretq_f32_s32(exponent));
  return vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(e), underflow));
}

// Elements i..i+3 of the run's slot j's row as f32.
template <Kv T>
RZ_INLINE float32x4_t load4(const Rows& rows, int64_t j, int64_t i) {
  const auto* bytes = rows.data[j] + i * kElemBytes<T>;
  if constexpr (T == Kv::F32) {
    return vld1q_f32(reinterpret_cast<const float*>(bytes));
  } else if constexpr (T == Kv::F16) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(bytes))));
  } else if constexpr (T == Kv::BF16) {  // bf16 is an f32's upper half
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(bytes)), 16));
  } else {
    int32_t four;  // 4 quants: a wider load could pass the buffer's end
    std::memcpy(&four, bytes, 4);
    const int16x4_t quants = vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(four))));
    const float16x4_t scale = vreinterpret_f16_u16(vdup_n_u16(rows.scales[j][i / kQ8Block]));
    return vmulq_f32(vcvtq_f32_s32(vmovl_s16(quants)), vcvt_f32_f16(scale));
  }
}

using Problem = rz_cpu::Operands;
using rz_cpu::Partial;

// The scores of query row q against the run's 32 keys, -inf where masked (mask bit j: visible).
template <Kv KT>
RZ_INLINE void block_scores(const Problem& p, const float* q, const Rows& keys, uint32_t mask, float* scores) {
  for (int64_t j0 = 0; j0 < kKeyBlock; j0 += 4) {
    const uint32_t group_mask = (mask >> j0) & 0xF;
    if (!group_mask) {
      vst1q_f32(scores + j0, vdupq_n_f32(-INFINITY));
      continue;
    }
    float32x4_t acc[4];
    for (int jj = 0; jj < 4; ++jj) acc[jj] = vdupq_n_f32(0.0f);
    for (int64_t i = 0; i < p.D; i += 4) {
      const float32x4_t qv = vld1q_f32(q + i);
#pragma GCC unroll 4
      for (int jj = 0; jj < 4; ++jj) acc[jj] = vfmaq_f32(acc[jj], qv, load4<KT>(keys, j0 + jj, i));
    }
    float32x4_t s = vmulq_n_f32(vpaddq_f32(vpaddq_f32(acc[0], acc[1]), vpaddq_f32(acc[2], acc[3])), p.scale);
    if (p.softcap > 0) {
      // softcap * tanh(s / softcap), tanh(y) = 1 - 2 / (exp(2y) + 1)
      const float32x4_t e = exp_f32x4(vmulq_n_f32(s, 2.0f / p.softcap));
      const float32x4_t tanh = vsubq_f32(vdupq_n_f32(1.0f), vdivq_f32(vdupq_n_f32(2.0f), vaddq_f32(e, vdupq_n_f32(1.0f))));
      s = vmulq_n_f32(tanh, p.softcap);
    }
    const uint32x4_t bits = {1, 2, 4, 8};
    const uint32x4_t seen = vtstq_u32(vdupq_n_u32(group_mask), bits);
    vst1q_f32(scores + j0, vbslq_f32(seen, s, vdupq_n_f32(-INFINITY)));
  }
}

// out[r] = out[r] * correction[r] + sum_j weights[r, j] v_j for one row and NV * 4 output lanes
// at lane i, the accumulators kept in registers while the block's V rows stream by.
template <int NV, Kv VT>
RZ_INLINE void value_tile(const Problem& p, const Rows& values, int64_t n, const float* weights, float correction, float* out, int64_t i) {
  float32x4_t acc[NV];
#pragma GCC unroll 8
  for (int u = 0; u < NV; ++u) acc[u] = vmulq_n_f32(vld1q_f32(out + i + 4 * u), correction);
  for (int64_t j = 0; j < n; ++j) {
#pragma GCC unroll 8
    for (int u = 0; u < NV; ++u) acc[u] = vfmaq_n_f32(acc[u], load4<VT>(values, j, i + 4 * u), weights[j]);
  }
#pragma GCC unroll 8
  for (int u = 0; u < NV; ++u) vst1q_f32(out + i + 4 * u, acc[u]);
}

// value_tile over the first n_rows rows and all lanes: 32 lanes at a time, head dims that are not
// multiples of 32 finish 8 at a time.
template <Kv VT>
RZ_INLINE void block_values(const Problem& p, int64_t n_rows, const Rows& values, int64_t n, const float* weights, const float* correction,
                            float* out) {
  for (int64_t r = 0; r < n_rows; ++r) {
    int64_t i = 0;
    for (; i + 32 <= p.Dv; i += 32) value_tile<8, VT>(p, values, n, weights + r * kKeyBlock, correction[r], out + r * p.Dv, i);
    for (; i < p.Dv; i += 8) value_tile<2, VT>(p, values, n, weights + r * kKeyBlock, correction[r], out + r * p.Dv, i);
  }
}

// Per-thread scratch that outlives a call: the query row pointers, softmax weights and
// corrections, and masks of one task.
struct TaskScratch {
  std::vector<const float*> q_rows;
  std::vector<float> weights, correction;
  std::vector<uint32_t> masks;
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
  q_rows.resize(n_rows);
  weights.resize(n_rows * kKeyBlock);
  correction.resize(n_rows);
  masks.resize(p.T);
  for (int64_t r = 0; r < n_rows; ++r) q_rows[r] = p.q + rz_cpu::query_row(p, b, kv, rows[r]) * p.D;
  alignas(16) float scores[kKeyBlock];
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
    for (int64_t r = 0; r < n_rows; ++r) {
      block_scores<KT>(p, q_rows[r], keys, masks[rows[r] % p.T], scores);
      // Online softmax: the row's state moves to the new running max, then takes the block.
      float32x4_t block_max = vdupq_n_f32(-INFINITY);
      for (int64_t j = 0; j < kKeyBlock; j += 4) block_max = vmaxq_f32(block_max, vld1q_f32(scores + j));
      const float new_max = std::max(part.max[r], vmaxvq_f32(block_max));
      float* w = weights.data() + r * kKeyBlock;
      if (new_max == -INFINITY) {
        std::fill(w, w + kKeyBlock, 0.0f);
        correction[r] = 1.0f;
        continue;
      }
      correction[r] = std::exp(part.max[r] - new_max);
      part.max[r] = new_max;
      float32x4_t total = vdupq_n_f32(0.0f);
      for (int64_t j = 0; j < kKeyBlock; j += 4) {
        const float32x4_t e = exp_f32x4(vsubq_f32(vld1q_f32(scores + j), vdupq_n_f32(new_max)));
        vst1q_f32(w + j, e);
        total = vaddq_f32(total, e);
      }
      part.sum[r] = part.sum[r] * correction[r] + vaddvq_f32(total);
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
