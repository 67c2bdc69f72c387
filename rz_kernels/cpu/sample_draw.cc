// The sampler's truncation and draw for every CPU (rz.sampling.Sampler._draw): top-k, top-p and
// min-p over a row's best candidates, then llama.cpp's dist, one uniform number per row.
//
//   penalized [B, V] f32: the logits after bias, penalties and the token mask;
//   frame_logits [B, W] f32 and frame_ids [B, W] s32: the W best of them, best first, ties to the
//     lowest id (XLA's TopK, which runs fast where it is);
//   full_lse [B] f32: the log-sum-exp of each row's penalized logits;
//   temperature, top_p, min_p [B] f32, top_k [B] s32; uniforms [B] f32 in [0, 1)
//   -> tokens [B] s32 (a row whose temperature is not above 0 is greedy elsewhere: its frame's first).
//
// The same steps as the XLA path of rz.sampling, which is the reference: the frame's cut when it
// holds the whole kept set, else the whole vocabulary, unsorted where min-p alone truncates and
// fully sorted otherwise. In XLA that is several hundred instructions in every compiled step that
// samples, a size each executable keeps resident; here it is one call. Plain C++: the work is a
// few hundred candidates per row, and the one source builds for x86-64 and aarch64 alike.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Settings {
  float temperature;
  int32_t top_k;
  float top_p;
  float min_p;
};

// How many of the sorted candidates top-k, top-p and min-p keep, and whether the cut is exact
// (false where the kept set may reach beyond these `width` candidates): rz.sampling._truncation.
struct Cut {
  int64_t keep;
  bool resolved;
};

Cut truncation(const float* sorted, int64_t width, float full_lse, int64_t vocab, const Settings& s) {
  const int64_t k = (s.top_k <= 0 || s.top_k >= vocab) ? vocab : s.top_k;
  const int64_t top_k_keep = std::min(k, width);
  int64_t top_p_keep = width;
  if (s.top_p < 1.0f) {
    // top-p measures mass under the softmax of what top-k left: the top k when they lie in the
    // frame, the whole vocabulary when top-k is off.
    float norm = full_lse;
    if (k <= width) {
      float top = sorted[0];
      float sum = 0.0f;
      for (int64_t i = 0; i < top_k_keep; ++i) sum += std::exp(sorted[i] - top);
      norm = top + std::log(sum);
    }
    float mass = 0.0f;
    for (int64_t i = 0; i < top_k_keep; ++i) {
      mass += std::exp(sorted[i] - norm);
      if (mass >= s.top_p) {
        top_p_keep = i + 1;
        break;
      }
    }
  }
  int64_t min_p_keep = width;
  if (s.min_p > 0.0f) {
    const float threshold = sorted[0] + std::log(s.min_p);
    min_p_keep = 0;
    for (int64_t i = 0; i < width; ++i) min_p_keep += sorted[i] >= threshold;
  }
  const int64_t keep = std::min({top_k_keep, top_p_keep, min_p_keep});
  const bool norm_known = k <= width || k >= vocab || s.top_p >= 1.0f;
  return {keep, k <= width || (keep < width && norm_known)};
}

// llama.cpp's dist over candidates in the given order: the first kept one whose running mass
// reaches u times the total, the weights exp((logit - top) / temperature). kept(i) says which.
template <typename Kept>
int32_t inverse_cdf(const float* logits, const int32_t* ids, int64_t n, Kept kept, float temperature, float u) {
  float top = -INFINITY;
  for (int64_t i = 0; i < n; ++i)
    if (kept(i)) top = std::max(top, logits[i]);
  float total = 0.0f;
  for (int64_t i = 0; i < n; ++i)
    if (kept(i)) total += std::exp((logits[i] - top) / temperature);
  const float target = u * total;
  // The same sums in the same order as the total, so the last kept candidate always qualifies.
  float cdf = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    if (!kept(i)) continue;
    cdf += std::exp((logits[i] - top) / temperature);
    if (cdf >= target) return ids[i];
  }
  return ids[0];  // nothing kept, as XLA's argmax over an all-false row gives
}

int32_t draw_row(const float* penalized, int64_t vocab, const float* frame_logits, const int32_t* frame_ids, int64_t width,
                 float full_lse, const Settings& s, float u) {
  const float temperature = s.temperature > 0.0f ? s.temperature : 1.0f;
  const Cut cut = truncation(frame_logits, width, full_lse, vocab, s);
  if (cut.resolved) {
    return inverse_cdf(frame_logits, frame_ids, width, [&](int64_t i) { return i < cut.keep; }, temperature, u);
  }
  const bool top_k_off = s.top_k <= 0 || s.top_k >= vocab;
  thread_local std::vector<int32_t> ids;
  if (top_k_off && s.top_p >= 1.0f) {
    // Only min-p truncates, and it needs no order: the vocabulary as it is, in id order.
    const float threshold = frame_logits[0] + std::log(s.min_p);
    ids.resize(vocab);
    std::iota(ids.begin(), ids.end(), 0);
    return inverse_cdf(penalized, ids.data(), vocab, [&](int64_t i) { return penalized[i] >= threshold; }, temperature, u);
  }
  // The kept set reaches beyond the frame: the whole vocabulary, sorted best first, ties to the lowest id.
  ids.resize(vocab);
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return penalized[a] > penalized[b]; });
  thread_local std::vector<float> sorted;
  sorted.resize(vocab);
  for (int64_t i = 0; i < vocab; ++i) sorted[i] = penalized[ids[i]];
  const Cut all = truncation(sorted.data(), vocab, full_lse, vocab, s);
  return inverse_cdf(sorted.data(), ids.data(), vocab, [&](int64_t i) { return i < all.keep; }, temperature, u);
}

ffi::Error SampleDrawImpl(ffi::Buffer<ffi::F32> penalized, ffi::Buffer<ffi::F32> frame_logits, ffi::Buffer<ffi::S32> frame_ids,
                          ffi::Buffer<ffi::F32> full_lse, ffi::Buffer<ffi::F32> temperature, ffi::Buffer<ffi::S32> top_k,
                          ffi::Buffer<ffi::F32> top_p, ffi::Buffer<ffi::F32> min_p, ffi::Buffer<ffi::F32> uniforms,
                          ffi::ResultBuffer<ffi::S32> tokens) {
  const auto dims = penalized.dimensions();
  const auto frame_dims = frame_logits.dimensions();
  if (dims.size() != 2 || frame_dims.size() != 2 || frame_dims[0] != dims[0] || frame_dims[1] < 1 || frame_dims[1] > dims[1] ||
      frame_ids.element_count() != frame_logits.element_count()) {
    return ffi::Error::InvalidArgument("rz_sample_draw: penalized [B, V], frame_logits and frame_ids [B, W] with 1 <= W <= V");
  }
  const int64_t rows = dims[0], vocab = dims[1], width = frame_dims[1];
  for (const int64_t n : {full_lse.element_count(), temperature.element_count(), top_k.element_count(), top_p.element_count(),
                          min_p.element_count(), uniforms.element_count(), tokens->element_count()}) {
    if (n != rows) return ffi::Error::InvalidArgument("rz_sample_draw: every per-row operand holds B values");
  }
  for (int64_t b = 0; b < rows; ++b) {
    const float* row_frame = frame_logits.typed_data() + b * width;
    const int32_t* row_ids = frame_ids.typed_data() + b * width;
    const Settings s{temperature.typed_data()[b], top_k.typed_data()[b], top_p.typed_data()[b], min_p.typed_data()[b]};
    tokens->typed_data()[b] =
        s.temperature > 0.0f
            ? draw_row(penalized.typed_data() + b * vocab, vocab, row_frame, row_ids, width, full_lse.typed_data()[b], s, uniforms.typed_data()[b])
            : row_ids[0];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RzSampleDraw, SampleDrawImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // penalized
                                  .Arg<ffi::Buffer<ffi::F32>>()  // frame_logits
                                  .Arg<ffi::Buffer<ffi::S32>>()  // frame_ids
                                  .Arg<ffi::Buffer<ffi::F32>>()  // full_lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // temperature
                                  .Arg<ffi::Buffer<ffi::S32>>()  // top_k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // top_p
                                  .Arg<ffi::Buffer<ffi::F32>>()  // min_p
                                  .Arg<ffi::Buffer<ffi::F32>>()  // uniforms
                                  .Ret<ffi::Buffer<ffi::S32>>());
