// What the attention kernels (attention.cc, attention_neon.cc, attention_prompt.cc) share: how K and
// V are stored (the cache types of rz_kernels/attention_kv.py, read in place) and their operands.

#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace rz_cpu {

enum class Kv { F32, F16, BF16, Q8_0 };
constexpr int64_t kQ8Block = 32;  // elements per q8_0 scale (ggml's QK8_0)

template <Kv T>
constexpr int64_t kElemBytes = T == Kv::F32 ? 4 : T == Kv::Q8_0 ? 1 : 2;

// One KV head's K or V rows as stored: slot s's `width` elements from data + s * width elements,
// and for q8_0 its width / 32 f16 scales from scales + s * width / 32.
struct Rows {
  const uint8_t* data;
  const uint16_t* scales;
  int64_t width;
};

// The rows of KV head `head` (b * Hkv + kv) of a K or V buffer of S slots.
template <Kv T>
Rows head_rows(const void* data, const uint16_t* scales, int64_t head, int64_t S, int64_t width) {
  const int64_t first = head * S * width;
  return Rows{static_cast<const uint8_t*>(data) + first * kElemBytes<T>, T == Kv::Q8_0 ? scales + first / kQ8Block : nullptr, width};
}

// The cache type a buffer's element type stands for (q8_0's quants are s8).
inline std::optional<Kv> kv_type(xla::ffi::DataType type) {
  switch (type) {
    case xla::ffi::DataType::F32: return Kv::F32;
    case xla::ffi::DataType::F16: return Kv::F16;
    case xla::ffi::DataType::BF16: return Kv::BF16;
    case xla::ffi::DataType::S8: return Kv::Q8_0;
    default: return std::nullopt;
  }
}

// A q8_0 buffer's scales must be f16 [B', Hkv, S, width / 32]; a float type's are not read.
inline bool scales_fit(Kv type, const xla::ffi::AnyBuffer& values, const xla::ffi::AnyBuffer& scales) {
  if (type != Kv::Q8_0) return true;
  const auto vd = values.dimensions(), sd = scales.dimensions();
  return scales.element_type() == xla::ffi::DataType::F16 && sd.size() == 4 && vd[3] % kQ8Block == 0 && sd[0] == vd[0] &&
         sd[1] == vd[1] && sd[2] == vd[2] && sd[3] == vd[3] / kQ8Block;
}

// fn(std::integral_constant<Kv, t>{}): a run-time type as a compile-time one.
template <class F>
void with_kv_type(Kv t, F&& fn) {
  switch (t) {
    case Kv::F32: return fn(std::integral_constant<Kv, Kv::F32>{});
    case Kv::F16: return fn(std::integral_constant<Kv, Kv::F16>{});
    case Kv::BF16: return fn(std::integral_constant<Kv, Kv::BF16>{});
    case Kv::Q8_0: return fn(std::integral_constant<Kv, Kv::Q8_0>{});
  }
}

// fn(k, v) with both types as compile-time constants (one instantiation per pair).
template <class F>
void with_kv_types(Kv k, Kv v, F&& fn) {
  with_kv_type(k, [&](auto kt) { with_kv_type(v, [&](auto vt) { fn(kt, vt); }); });
}

// The operands of every attention kernel, read from its FFI buffers: q [B, Hq, T, D], K and V
// [B' >= B, Hkv, S, D or Dv] of a cache type (a cache may hold idle sequences past the batch in use:
// the first B are read), each query's and each slot's position.
struct Operands {
  int64_t B, Hq, Hkv, T, S, D, Dv, G, R;  // R = G * T query rows per KV head
  int64_t S_used;  // slots [S_used, S) are invisible to every query
  const float* q;
  const void* k;
  const void* v;
  const uint16_t* k_scales;  // q8_0 only
  const uint16_t* v_scales;
  Kv k_type, v_type;
  const int32_t* q_positions;
  const int32_t* k_positions;
  int32_t window;
  float scale, softcap;
};

// Checks the operands (head dims multiples of `head_dim_multiple`) and reads them into `out`;
// an error's message starts with the kernel's name.
inline xla::ffi::Error read_operands(const std::string& kernel, int64_t head_dim_multiple, xla::ffi::Buffer<xla::ffi::F32> q,
                                     xla::ffi::AnyBuffer k, xla::ffi::AnyBuffer k_scales, xla::ffi::AnyBuffer v,
                                     xla::ffi::AnyBuffer v_scales, xla::ffi::Buffer<xla::ffi::S32> q_positions,
                                     xla::ffi::Buffer<xla::ffi::S32> k_positions, int32_t window, float scale, float softcap,
                                     bool keys_in_order, Operands& out) {
  using xla::ffi::Error;
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4) return Error::InvalidArgument(kernel + ": q, k, v must be 4-D");
  const std::optional<Kv> k_type = kv_type(k.element_type()), v_type = kv_type(v.element_type());
  if (!k_type || !v_type) return Error::InvalidArgument(kernel + ": k and v must each be f32, f16, bf16 or q8_0 (s8 quants)");
  if (!scales_fit(*k_type, k, k_scales) || !scales_fit(*v_type, v, v_scales)) {
    return Error::InvalidArgument(kernel + ": q8_0 needs head dims that are multiples of 32 and f16 scales [B, Hkv, S, D / 32]");
  }
  Operands& p = out;
  p.B = qd[0], p.Hq = qd[1], p.T = qd[2], p.D = qd[3], p.Hkv = kd[1], p.S = kd[2], p.Dv = vd[3];
  if (kd[0] < p.B || vd[0] != kd[0] || kd[3] != p.D || vd[2] != p.S || p.Hkv == 0 || p.Hq % p.Hkv ||
      p.D % head_dim_multiple || p.Dv % head_dim_multiple) {
    return Error::InvalidArgument(kernel + ": shapes do not match (or head dims not multiples of " +
                                  std::to_string(head_dim_multiple) + ")");
  }
  p.G = p.Hq / p.Hkv;
  p.R = p.G * p.T;
  p.q = q.typed_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.k_scales = static_cast<const uint16_t*>(k_scales.untyped_data());
  p.v_scales = static_cast<const uint16_t*>(v_scales.untyped_data());
  p.k_type = *k_type;
  p.v_type = *v_type;
  p.q_positions = q_positions.typed_data();
  p.k_positions = k_positions.typed_data();
  p.window = window;
  p.scale = scale;
  p.softcap = softcap;
  p.S_used = p.S;
  if (keys_in_order) {
    // Slot s holds position s or nothing: no query sees a slot past the latest query position.
    int64_t last = -1;
    for (int64_t i = 0; i < p.B * p.T; ++i) last = std::max<int64_t>(last, p.q_positions[i]);
    p.S_used = std::min<int64_t>(p.S, last + 1);
  }
  return Error::Success();
}

}  // namespace rz_cpu
