// Work sharing with XLA's intra-op thread pool, for the CPU kernels' FFI handlers.
//
// A call splits its work into tasks claimed from an atomic counter: by the calling thread and by
// rz's own spinning workers. The caller takes tasks too, so a call completes even if no worker
// ever runs.

#pragma once

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace rz_cpu {

namespace ffi = xla::ffi;

// A spin-wait hint to the core (these headers serve x86-64 and aarch64 variants alike).
inline void spin_pause() {
#if defined(__x86_64__)
  _mm_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

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

// Persistent workers that spin between calls. A decode step makes hundreds of small kernel calls
// a few microseconds apart; waking a sleeping pool thread for each (XLA's pool) costs tens of
// microseconds, as much as the call's work. A worker that finished a job keeps polling for the
// next one for kSpinMicros, then sleeps on a condition variable, so an idle process costs no CPU.
class Workers {
 public:
  static constexpr int64_t kSpinMicros = 500;

  explicit Workers(int64_t n) {
    for (int64_t i = 0; i < n; ++i) std::thread([this] { loop(); }).detach();
  }

  void publish(std::shared_ptr<TaskCounter> job) {
    std::atomic_store(&job_, std::move(job));
    generation_.fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
  }

 private:
  void loop() {
    uint64_t seen = generation_.load();
    for (;;) {
      auto started = std::chrono::steady_clock::now();
      for (uint32_t spins = 1; generation_.load() == seen; ++spins) {
        // Yield now and then: a spinning worker must not keep XLA's own pool threads (which run
        // the step's other ops) off the cores.
        if (spins % 8) {
          spin_pause();
          continue;
        }
        std::this_thread::yield();
        if (spins % 256) continue;
        if (std::chrono::steady_clock::now() - started < std::chrono::microseconds(kSpinMicros)) continue;
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        sleepers_.fetch_sub(1);
      }
      seen = generation_.load();
      if (auto job = std::atomic_load(&job_)) job->work();
    }
  }

  std::shared_ptr<TaskCounter> job_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleepers_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
};

// The process's workers: one fewer than the threads a call may use (the caller is the other).
// Never destroyed, so that exit does not wait for threads that sleep.
inline Workers& workers(int64_t n) {
  static Workers* instance = new Workers(n);
  return *instance;
}

inline int64_t thread_limit();

template <class F>
inline void parallel_for(ffi::ThreadPool& pool, int64_t n_tasks, int64_t n_threads, const F& fn) {
  n_threads = std::min<int64_t>(n_threads, n_tasks);
  if (n_threads <= 1) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(t);
    return;
  }
  // Workers may pick the job up after its last task is done, even after this call returns: they
  // share ownership of the counter and touch fn only through a task they claimed, which we wait
  // for. With more workers than n_threads - 1 the extra ones may claim tasks too: harmless.
  auto counter = std::make_shared<TaskCounter>();
  counter->n_tasks = n_tasks;
  counter->context = &fn;
  counter->run = [](const void* context, int64_t t) { (*static_cast<const F*>(context))(t); };
  workers(thread_limit() - 1).publish(counter);
  counter->work();
  for (int spins = 0; counter->done.load(std::memory_order_acquire) < n_tasks; ++spins) {
    if (spins < 4096) spin_pause();
    else std::this_thread::yield();
  }
}

// The machine's cores, capped by $RZ_CPU_THREADS.
inline int64_t thread_limit() {
  static const int64_t limit = [] {
    int64_t n = std::max<int64_t>(1, std::thread::hardware_concurrency());
    if (const char* env = std::getenv("RZ_CPU_THREADS")) n = std::min<int64_t>(n, std::max(1, std::atoi(env)));
    return n;
  }();
  return limit;
}

// At most the pool's threads, thread_limit() and `requested` (0: no limit).
inline int64_t pool_threads(ffi::ThreadPool& pool, int64_t requested) {
  const int64_t limit = thread_limit();
  const int64_t n = std::min<int64_t>(pool.num_threads(), requested > 0 ? std::min(limit, requested) : limit);
  return std::max<int64_t>(1, n);
}

}  // namespace rz_cpu
