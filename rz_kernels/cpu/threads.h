// Work sharing with XLA's intra-op thread pool, for the CPU kernels' FFI handlers.
//
// A call splits its work into tasks claimed from an atomic counter: by the calling thread and by
// helpers it schedules on XLA's pool. The caller takes tasks too, so a call completes even if no
// pool thread ever runs (XLA's FFI makes no promise that they do).

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace rz_cpu {

namespace ffi = xla::ffi;

struct TaskCounter {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n_tasks = 0;
  void (*run)(const void*, int64_t) = nullptr;
  const void* context = nullptr;

  void work() {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < n_tasks;) {
      run(context, t);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

template <class F>
inline void parallel_for(ffi::ThreadPool& pool, int64_t n_tasks, int64_t n_threads, const F& fn) {
  n_threads = std::min<int64_t>(n_threads, n_tasks);
  if (n_threads <= 1) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(t);
    return;
  }
  // Helpers may start after the last task is done, even after this call returns: they share
  // ownership of the counter and touch fn only through a task they claimed, which we wait for.
  auto counter = std::make_shared<TaskCounter>();
  counter->n_tasks = n_tasks;
  counter->context = &fn;
  counter->run = [](const void* context, int64_t t) { (*static_cast<const F*>(context))(t); };
  for (int64_t i = 1; i < n_threads; ++i) pool.Schedule([counter] { counter->work(); });
  counter->work();
  for (int spins = 0; counter->done.load(std::memory_order_acquire) < n_tasks; ++spins) {
    if (spins < 4096) _mm_pause();
    else std::this_thread::yield();
  }
}

// At most the pool's threads, the machine's cores, $RZ_CPU_THREADS and `requested` (0: no limit).
inline int64_t pool_threads(ffi::ThreadPool& pool, int64_t requested) {
  static const int64_t limit = [] {
    int64_t n = std::max<int64_t>(1, std::thread::hardware_concurrency());
    if (const char* env = std::getenv("RZ_CPU_THREADS")) n = std::min<int64_t>(n, std::max(1, std::atoi(env)));
    return n;
  }();
  const int64_t n = std::min<int64_t>(pool.num_threads(), requested > 0 ? std::min(limit, requested) : limit);
  return std::max<int64_t>(1, n);
}

}  // namespace rz_cpu
