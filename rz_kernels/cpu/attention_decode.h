// The frame the decode kernels (attention.cc on x86-64, attention_neon.cc on aarch64) share: which
// query rows a call computes, how it splits each KV head's slots into tasks, each task's online
// softmax state, and the merge of a head's splits into the output. A kernel supplies the task:
// its rows of one (sequence, KV head) over one split of the slots.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "attention_kv.h"
#include "threads.h"
#include "xla/ffi/api/ffi.h"

namespace rz_cpu {

// A split of a head's slots is at least this many keys: below it, merging costs more than a
// second thread gains.
constexpr int64_t kMinKeysPerSplit = 256;
// Key x query-row pairs below which a call runs on one thread: handing tasks to rz's spinning
// workers costs about a microsecond. At 1 << 13 a batch-8 decode step over ~100 positions (5,040
// pairs, tens of microseconds of work per layer) ran on one thread, measured slower than on two.
constexpr int64_t kMinWorkPerThread = 1 << 10;

// One task's online-softmax state for its rows: views into one buffer shared by the call's tasks
// (a heap allocation per task cost as much as a short context's work).
struct Partial {
  float* max;  // [rows]
  float* sum;  // [rows]
  float* out;  // [rows, Dv], unnormalized
  void reset(int64_t rows, int64_t Dv) {
    std::fill(max, max + rows, -INFINITY);
    std::fill(sum, sum + rows, 0.0f);
    std::fill(out, out + rows * Dv, 0.0f);
  }
};

// Sequence b's rows that can see a key, in order, into rows[0, count): those whose step has a
// position. A step at position -1 (a chunk's padding) sees nothing, so its rows are left out of the
// work; their output is zeros. A row's arithmetic does not depend on which rows it is computed
// with, so leaving some out changes no other row's bits.
inline int64_t live_rows(const Operands& p, int64_t b, int64_t* rows) {
  int64_t count = 0;
  for (int64_t r = 0; r < p.R; ++r) {
    if (p.q_positions[b * p.T + r % p.T] >= 0) rows[count++] = r;
  }
  return count;
}

// Runs attend(b, kv, rows, n_rows, s0, s1, part) for every (sequence, KV head, split of its slots
// [s0, s1)) on the pool, then merges each head's splits into o [B, Hq, T, Dv]. The split depends on
// the used slots (S_used), the heads and the pool, never on the rows: a step's rows get the same bits
// in a call of one step or of several over the same slots. With keys_in_order S_used follows the
// latest query, so a verify call and a decode call split alike only while S_used stays below
// 2 * kMinKeysPerSplit (one split).
template <class Attend>
void decode_attention(xla::ffi::ThreadPool pool, const Operands& p, float* o, Attend&& attend) {
  std::vector<int64_t> rows(p.B * p.R), n_rows(p.B);
  int64_t n_live = 0;
  for (int64_t b = 0; b < p.B; ++b) n_live += n_rows[b] = live_rows(p, b, rows.data() + b * p.R);
  const int64_t pool_size = pool_threads(pool, 0);
  // A short context is a few microseconds of work: handing part of it to a worker costs more.
  const int64_t work = p.Hkv * p.S_used * n_live;
  const int64_t threads = work < kMinWorkPerThread ? 1 : pool_size;
  const int64_t heads = p.B * p.Hkv;
  // Splits per head: up to 4 tasks per thread where the slots allow, and as many tasks for every
  // thread where one split fewer gives that (3 KV heads on 2 threads: 6 tasks, not 9).
  const int64_t max_splits = std::max<int64_t>(1, p.S_used / kMinKeysPerSplit);
  int64_t splits = std::min(max_splits, std::max<int64_t>(1, (4 * pool_size + heads - 1) / heads));
  if (splits > 1 && heads * splits % pool_size != 0 && heads * (splits - 1) % pool_size == 0) --splits;
  const int64_t keys_per_split = (p.S_used + splits - 1) / splits;
  // The tasks' softmax states, in one buffer.
  std::vector<float> state(heads * splits * p.R * (2 + p.Dv));
  std::vector<Partial> partials(heads * splits);
  for (int64_t t = 0; t < heads * splits; ++t) {
    float* base = state.data() + t * p.R * (2 + p.Dv);
    partials[t] = Partial{base, base + p.R, base + 2 * p.R};
  }
  parallel_for(pool, heads * splits, threads, [&](int64_t task) {
    const int64_t head = task / splits, split = task % splits, b = head / p.Hkv;
    Partial& part = partials[task];
    part.reset(n_rows[b], p.Dv);
    const int64_t s0 = split * keys_per_split, s1 = std::min(p.S_used, s0 + keys_per_split);
    if (n_rows[b] > 0 && s0 < s1) attend(b, head % p.Hkv, rows.data() + b * p.R, n_rows[b], s0, s1, part);
  });
  // Merge the splits of each head: task row i is row rows[i]; a row that saw nothing gets zeros.
  for (int64_t head = 0; head < heads; ++head) {
    const int64_t b = head / p.Hkv, kv = head % p.Hkv;
    for (int64_t r = 0; r < p.R; ++r) std::fill_n(o + query_row(p, b, kv, r) * p.Dv, p.Dv, 0.0f);
    for (int64_t i = 0; i < n_rows[b]; ++i) {
      float peak = -INFINITY;
      for (int64_t s = 0; s < splits; ++s) peak = std::max(peak, partials[head * splits + s].max[i]);
      if (peak == -INFINITY) continue;
      float* dst = o + query_row(p, b, kv, rows[b * p.R + i]) * p.Dv;
      float total = 0;
      for (int64_t s = 0; s < splits; ++s) {
        const Partial& part = partials[head * splits + s];
        if (part.max[i] == -INFINITY) continue;
        const float weight = std::exp(part.max[i] - peak);
        total += weight * part.sum[i];
        for (int64_t d = 0; d < p.Dv; ++d) dst[d] += weight * part.out[i * p.Dv + d];
      }
      for (int64_t d = 0; d < p.Dv; ++d) dst[d] /= total;
    }
  }
}

}  // namespace rz_cpu
