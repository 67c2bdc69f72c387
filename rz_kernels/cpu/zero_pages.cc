// Zeros whose whole pages are left to the kernel: a KV cache's block pool (rz_kernels.zero_pages).
//
//   -> out: any array, every byte zero.
//
// Filling a pool with zeros makes every page of it resident at once, though a block's pages are
// read only after a sequence writes into it (attention masks empty slots, and reads them as
// zeros). Instead, the pages the buffer already has are dropped (on Linux, MADV_DONTNEED on
// private anonymous memory, which is what XLA's CPU buffers are), and every page is then read and
// written only where it is not zero. A page never touched reads as the kernel's shared zero page,
// which is not resident memory, so only the blocks a server has used become resident. The scan
// makes the result zeros whatever the memory is (an emulator may ignore the advice, and other
// systems have no such advice); where the advice held, it writes nothing.

#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

bool page_is_zero(const unsigned char* page, uintptr_t size) {
  uint64_t any = 0;
  for (uintptr_t i = 0; i < size; i += sizeof(uint64_t)) {
    uint64_t word;
    std::memcpy(&word, page + i, sizeof(word));
    any |= word;
  }
  return any == 0;
}

void drop_pages(unsigned char* begin, unsigned char* end) {
#if defined(__linux__)
  madvise(begin, end - begin, MADV_DONTNEED);  // a hint: the scan below makes the pages zero either way
#else
  (void)begin;
  (void)end;
#endif
}

ffi::Error ZeroPagesImpl(ffi::Result<ffi::AnyBuffer> out) {
  auto* data = static_cast<unsigned char*>(out->untyped_data());
  const uintptr_t size = out->size_bytes();
#if defined(__linux__)
  const uintptr_t page_size = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
#else
  const uintptr_t page_size = 4096;
#endif
  const uintptr_t start = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first_page = (start + page_size - 1) & ~(page_size - 1);
  const uintptr_t end_page = (start + size) & ~(page_size - 1);
  // Below a few pages the system call costs more than the writes.
  if (end_page < first_page + 4 * page_size) {
    std::memset(data, 0, size);
    return ffi::Error::Success();
  }
  auto* inner_begin = reinterpret_cast<unsigned char*>(first_page);
  auto* inner_end = reinterpret_cast<unsigned char*>(end_page);
  std::memset(data, 0, inner_begin - data);
  std::memset(inner_end, 0, data + size - inner_end);
  drop_pages(inner_begin, inner_end);
  for (unsigned char* page = inner_begin; page < inner_end; page += page_size) {
    if (!page_is_zero(page, page_size)) std::memset(page, 0, page_size);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RzZeroPages, ZeroPagesImpl, ffi::Ffi::Bind().Ret<ffi::AnyBuffer>());
