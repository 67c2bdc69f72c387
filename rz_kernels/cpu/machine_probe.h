// What the machine probes of every ISA (machine.cc, machine_neon.cc) share: a stopwatch and a
// team of plain threads (the probes measure the machine, not XLA's pool).

#pragma once

#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

namespace rz_cpu {

inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// fn(t) on n_threads threads, t = 0 .. n_threads - 1; returns when all are done.
template <class F>
void on_threads(int32_t n_threads, F&& fn) {
  std::vector<std::thread> threads;
  for (int32_t t = 0; t < n_threads; ++t) threads.emplace_back(fn, t);
  for (auto& thread : threads) thread.join();
}

}  // namespace rz_cpu
