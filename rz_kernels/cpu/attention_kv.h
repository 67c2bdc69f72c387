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

// Slots read together: the decode kernels' key block, the prompt kernel's conversion block.
constexpr int64_t kRun = 32;

// Where up to kRun slots' K or V rows of one KV head are, as stored: slot j's `width` elements at
// data[j], and for q8_0 its width / 32 f16 scales at scales[j]. Row pointers per slot, so that a
// kernel reads a slab and a paged pool (a run may cross pool blocks) through the same code.
struct Rows {
  const uint8_t* data[kRun];
  const uint16_t* scales[kRun];
};

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

// The operands of every attention kernel, read from its FFI buffers: q [B, Hq, T, D], and K and V
// of a cache type in one of two layouts:
//   - a slab, [B' >= B, Hkv, S, D or Dv] with k_positions [B', S] (a cache may hold idle sequences
//     past the batch in use: the first B are read);
//   - a paged pool, [N, Hkv, block_size, D or Dv] with k_positions [N, block_size] (the pool's),
//     and block_table [B' >= B, n_table]: sequence b's slot s lives in pool block
//     block_table[b, s / block_size] at s % block_size; an entry -1 is absent (never dereferenced:
//     its slots read as empty, position -1, K and V zero). S = n_table * block_size.
// A slab is the pool of B' blocks of S slots whose table row b is [b]: one addressing serves both,
// so a paged call computes exactly what the slab of the same slots (rz_kernels paged_as_slab) does.
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
  const int32_t* k_positions;  // per block of block_size slots
  const int32_t* block_table;  // [B', n_table], or nullptr: a slab
  int64_t n_table, block_size;
  int32_t window;
  float scale, softcap;
};

// Row r of KV head kv's group of sequence b (query head kv * G + r / T, step r % T) as an index
// into q's [B, Hq, T] rows (and o's).
inline int64_t query_row(const Operands& p, int64_t b, int64_t kv, int64_t r) {
  return ((b * p.Hq) + kv * p.G + r / p.T) * p.T + r % p.T;
}

// What an absent block's slots read as: zeros, as wide as the widest row a kernel takes (f32
// elements, or q8_0 quants and their f16 scales).
constexpr int64_t kMaxWidth = 4096;
alignas(64) inline constexpr uint8_t kZeroRow[kMaxWidth * 4] = {};

// The pool block holding entry `entry` of sequence b's table, or -1 where absent.
inline int64_t table_block(const Operands& p, int64_t b, int64_t entry) {
  return p.block_table ? p.block_table[b * p.n_table + entry] : b;
}

// Calls fn(j, block, offset, n) for each piece of sequence b's slots [start, start + count) that
// lies in one pool block: slots start + j .. start + j + n - 1 are that block's offset .. offset + n - 1.
template <class F>
inline void for_each_piece(const Operands& p, int64_t b, int64_t start, int64_t count, F&& fn) {
  for (int64_t j = 0; j < count;) {
    const int64_t slot = start + j, offset = slot % p.block_size;
    const int64_t n = std::min(p.block_size - offset, count - j);
    fn(j, table_block(p, b, slot / p.block_size), offset, n);
    j += n;
  }
}

// The positions of sequence b's slots [start, start + count) into out: -1 where empty or absent.
inline void slot_positions(const Operands& p, int64_t b, int64_t start, int64_t count, int32_t* out) {
  for_each_piece(p, b, start, count, [&](int64_t j, int64_t block, int64_t offset, int64_t n) {
    if (block < 0) {
      std::fill(out + j, out + j + n, -1);
    } else {
      std::copy_n(p.k_positions + block * p.block_size + offset, n, out + j);
    }
  });
}

// Where KV head kv's rows of sequence b's slots [start, start + count) (count <= kRun) are, in a K
// or V buffer of rows `width` wide (its data and q8_0 scales). An absent block's slots, and the
// run's slots past count (which a kernel's vector of keys may load, masked), read kZeroRow.
template <Kv T>
inline void slot_rows(const Operands& p, const void* data, const uint16_t* scales, int64_t width, int64_t b, int64_t kv,
                      int64_t start, int64_t count, Rows& out) {
  // A float type's scales are never read: only q8_0 fills them (this runs once per 32 slots).
  constexpr bool kScales = T == Kv::Q8_0;
  const auto* bytes = static_cast<const uint8_t*>(data);
  const auto* zero_scales = reinterpret_cast<const uint16_t*>(kZeroRow);
  auto zero = [&](int64_t j, int64_t n) {
    std::fill(out.data + j, out.data + j + n, kZeroRow);
    if constexpr (kScales) std::fill(out.scales + j, out.scales + j + n, zero_scales);
  };
  if (count < kRun) zero(count, kRun - count);
  for_each_piece(p, b, start, count, [&](int64_t j, int64_t block, int64_t offset, int64_t n) {
    if (block < 0) return zero(j, n);
    const int64_t first = ((block * p.Hkv + kv) * p.block_size + offset) * width;
    const uint8_t* row = bytes + first * kElemBytes<T>;
    for (int64_t i = 0; i < n; ++i, row += width * kElemBytes<T>) out.data[j + i] = row;
    if constexpr (kScales) {
      const uint16_t* row_scales = scales + first / kQ8Block;
      for (int64_t i = 0; i < n; ++i, row_scales += width / kQ8Block) out.scales[j + i] = row_scales;
    }
  });
}

// Checks the operands (head dims multiples of `head_dim_multiple`) and reads them into `out`;
// block_table is empty ([0]) for a slab, [B', n_table] for a pool. An error's message starts with
// the kernel's name.
inline xla::ffi::Error read_operands(const std::string& kernel, int64_t head_dim_multiple, xla::ffi::Buffer<xla::ffi::F32> q,
                                     xla::ffi::AnyBuffer k, xla::ffi::AnyBuffer k_scales, xla::ffi::AnyBuffer v,
                                     xla::ffi::AnyBuffer v_scales, xla::ffi::Buffer<xla::ffi::S32> q_positions,
                                     xla::ffi::Buffer<xla::ffi::S32> k_positions, xla::ffi::Buffer<xla::ffi::S32> block_table,
                                     int32_t window, float scale, float softcap, bool keys_in_order, Operands& out) {
  using xla::ffi::Error;
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const auto qpd = q_positions.dimensions(), kpd = k_positions.dimensions(), td = block_table.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4) return Error::InvalidArgument(kernel + ": q, k, v must be 4-D");
  const std::optional<Kv> k_type = kv_type(k.element_type()), v_type = kv_type(v.element_type());
  if (!k_type || !v_type) return Error::InvalidArgument(kernel + ": k and v must each be f32, f16, bf16 or q8_0 (s8 quants)");
  if (!scales_fit(*k_type, k, k_scales) || !scales_fit(*v_type, v, v_scales)) {
    return Error::InvalidArgument(kernel + ": q8_0 needs head dims that are multiples of 32 and f16 scales [B, Hkv, S, D / 32]");
  }
  const bool paged = td.size() == 2;
  if (!paged && !(td.size() == 1 && td[0] == 0)) {
    return Error::InvalidArgument(kernel + ": block_table must be [B, n_table] int32 (a pool), or empty [0] (a slab)");
  }
  Operands& p = out;
  p.B = qd[0], p.Hq = qd[1], p.T = qd[2], p.D = qd[3], p.Hkv = kd[1], p.Dv = vd[3];
  p.block_size = kd[2];
  p.n_table = paged ? td[1] : 1;
  p.S = p.n_table * p.block_size;
  const int64_t rows = paged ? td[0] : kd[0];  // sequences the layout holds
  if (rows < p.B || vd[0] != kd[0] || kd[3] != p.D || vd[2] != kd[2] || p.Hkv == 0 || p.Hq % p.Hkv ||
      p.D % head_dim_multiple || p.Dv % head_dim_multiple || qpd.size() != 2 || qpd[0] != p.B || qpd[1] != p.T ||
      kpd.size() != 2 || kpd[0] != kd[0] || kpd[1] != kd[2]) {
    return Error::InvalidArgument(kernel + ": shapes do not match (or head dims not multiples of " +
                                  std::to_string(head_dim_multiple) + ")");
  }
  p.block_table = paged ? block_table.typed_data() : nullptr;
  if (std::max(p.D, p.Dv) > kMaxWidth) {
    return Error::InvalidArgument(kernel + ": head dims up to " + std::to_string(kMaxWidth));
  }
  if (paged) {
    // An entry past the pool would read outside it: checked, as a table is built on the host.
    for (int64_t i = 0; i < p.B * p.n_table; ++i) {
      if (p.block_table[i] < -1 || p.block_table[i] >= kd[0]) {
        return Error::InvalidArgument(kernel + ": block_table entry " + std::to_string(p.block_table[i]) + " is outside the pool of " +
                                      std::to_string(kd[0]) + " blocks (-1: absent)");
      }
    }
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
