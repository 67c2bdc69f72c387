// What the attention kernels of every ISA (attention.cc, attention_neon.cc) share about how K and V
// are stored: the cache types of rz_kernels/attention_kv.py, read in place.

#pragma once

#include <cstdint>
#include <optional>
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

}  // namespace rz_cpu
