// A chunk's keys, values and positions into a KV cache's block pool, in place (rz_kernels.cache_write).
//
//   RzWriteRows:      pool [N, H, S, W] (any type), rows [B, T, H, W] of the same type,
//                     blocks, slots s32 [B, T]
//                     -> the pool (aliased), pool[blocks[b, t], h, slots[b, t]] = rows[b, t, h]
//   RzWritePositions: pool s32 [N, S], positions s32 [B, T], blocks, slots, started s32 [B, T]
//                     -> the pool (aliased), first every slot of each block in `started` set to
//                     the attribute `empty`, then pool[blocks[b, t], slots[b, t]] = positions[b, t]
//
// A block or slot outside the pool is dropped, as a scatter with mode="drop" drops it
// (rz.kv_cache.DROPPED marks a padding token's write). XLA:CPU's classic emitters turn a scatter
// into a loop that runs a few small kernels per token, per layer; its MLIR emitters handle the
// scatter but cost a step's compilation tens of MiB more. Here a token is a memcpy per head.

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The pool in the output buffer: XLA aliases them, and copies only where it could not.
unsigned char* in_place(const ffi::AnyBuffer& pool, ffi::Result<ffi::AnyBuffer>& out) {
  auto* data = static_cast<unsigned char*>(out->untyped_data());
  if (data != pool.untyped_data()) std::memcpy(data, pool.untyped_data(), pool.size_bytes());
  return data;
}

bool inside(int32_t index, int64_t bound) { return index >= 0 && index < bound; }

ffi::Error WriteRowsImpl(ffi::AnyBuffer pool, ffi::AnyBuffer rows, ffi::Buffer<ffi::S32> blocks, ffi::Buffer<ffi::S32> slots,
                         ffi::Result<ffi::AnyBuffer> out) {
  const auto pool_dims = pool.dimensions();
  const auto row_dims = rows.dimensions();
  const auto index_dims = blocks.dimensions();
  if (pool_dims.size() != 4 || row_dims.size() != 4 || index_dims.size() != 2 || slots.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("rz_write_rows: pool [N, H, S, W], rows [B, T, H, W], blocks and slots [B, T]");
  }
  const int64_t n_blocks = pool_dims[0], heads = pool_dims[1], block_size = pool_dims[2], width = pool_dims[3];
  const int64_t batch = index_dims[0], length = index_dims[1];
  if (pool.element_type() != rows.element_type() || row_dims[0] != batch || row_dims[1] != length || row_dims[2] != heads ||
      row_dims[3] != width || slots.dimensions()[0] != batch || slots.dimensions()[1] != length) {
    return ffi::Error::InvalidArgument("rz_write_rows: rows must be [B, T, H, W] of the pool's type, blocks and slots [B, T]");
  }
  unsigned char* dst = in_place(pool, out);
  const int64_t elements = pool.element_count();
  const int64_t row_bytes = elements == 0 ? 0 : width * static_cast<int64_t>(pool.size_bytes() / elements);
  const auto* src = static_cast<const unsigned char*>(rows.untyped_data());
  const int32_t* block = blocks.typed_data();
  const int32_t* slot = slots.typed_data();
  for (int64_t i = 0; i < batch * length; ++i) {
    if (!inside(block[i], n_blocks) || !inside(slot[i], block_size)) continue;
    for (int64_t h = 0; h < heads; ++h) {
      std::memcpy(dst + ((block[i] * heads + h) * block_size + slot[i]) * row_bytes, src + (i * heads + h) * row_bytes, row_bytes);
    }
  }
  return ffi::Error::Success();
}

ffi::Error WritePositionsImpl(ffi::AnyBuffer pool, ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> blocks,
                              ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::S32> started, ffi::Result<ffi::AnyBuffer> out,
                              int32_t empty) {
  const auto pool_dims = pool.dimensions();
  const auto dims = positions.dimensions();
  if (pool.element_type() != ffi::DataType::S32 || pool_dims.size() != 2 || dims.size() != 2) {
    return ffi::Error::InvalidArgument("rz_write_positions: pool s32 [N, S], positions, blocks, slots and started [B, T]");
  }
  for (const auto& other : {blocks.dimensions(), slots.dimensions(), started.dimensions()}) {
    if (other.size() != 2 || other[0] != dims[0] || other[1] != dims[1]) {
      return ffi::Error::InvalidArgument("rz_write_positions: blocks, slots and started must be [B, T], as positions");
    }
  }
  const int64_t n_blocks = pool_dims[0], block_size = pool_dims[1], n = dims[0] * dims[1];
  auto* dst = reinterpret_cast<int32_t*>(in_place(pool, out));
  const int32_t* position = positions.typed_data();
  const int32_t* block = blocks.typed_data();
  const int32_t* slot = slots.typed_data();
  const int32_t* first = started.typed_data();
  for (int64_t i = 0; i < n; ++i) {
    if (!inside(first[i], n_blocks)) continue;
    for (int64_t s = 0; s < block_size; ++s) dst[first[i] * block_size + s] = empty;
  }
  for (int64_t i = 0; i < n; ++i) {
    if (inside(block[i], n_blocks) && inside(slot[i], block_size)) dst[block[i] * block_size + slot[i]] = position[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RzWriteRows, WriteRowsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RzWritePositions, WritePositionsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("empty"));
