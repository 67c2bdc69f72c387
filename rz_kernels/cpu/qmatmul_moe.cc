// The experts' quantized matmul of a mixture-of-experts layer (llama.cpp's ggml_mul_mat_id) on
// x86-64: each (token, chosen expert) pair's activation row against that expert's matrices
// alone, so a decode step reads only the chosen experts' weights and costs in proportion to the
// active parameters, not the total. The experts stay as llama.cpp stores them, 3-D arrays
// [n_expert, N, K/block * items] in rz.quants' planar layout; an expert's matrix is a slice of
// rows, read in place (XLA's dynamic slice of it would copy it first).
//
// The dot products, tiles, threads and activation rounding are qmatmul.cc's (rz_cpu::quantized_matmul):
//   - one token (a batch-1 decode step) whose pairs share x (gate/up): one call over all its
//     experts' weights, so x is quantized once and the threads share every row of them;
//   - otherwise the pairs are grouped by expert, and each expert's rows go through one call: a
//     prompt's tokens that chose the same expert meet its weights in register tiles together.
// The NEON build has no such kernel; aarch64 takes the XLA paths of rz.models.moe.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "qmatmul.h"
#include "threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One weight of the call: its type, and its arrays as [n_expert, N, items] buffers.
struct ExpertWeight {
  int32_t ggml_type = 0;
  std::vector<const uint8_t*> arrays;
  std::vector<int64_t> expert_bytes;  // each array's bytes per expert
  int64_t N = 0;

  rz_cpu::QuantizedWeight expert(int64_t e) const {
    rz_cpu::QuantizedWeight w;
    w.ggml_type = ggml_type;
    w.N = N;
    for (size_t i = 0; i < arrays.size(); ++i) {
      w.arrays.push_back(arrays[i] + e * expert_bytes[i]);
      w.bytes += static_cast<double>(expert_bytes[i]);
    }
    return w;
  }
};

// x f32 [R, K]: R = M rows that all of a token's pairs share (gate/up), or M * k, one per pair
// (down); ids s32 [M, k]: each token's chosen experts; then each weight's arrays in the order of
// rz_kernels.quantized_matmul.CPU_FFI_ARRAYS, each [n_expert, N, K/block * items]
// -> y f32 [M * k, sum of N]: row m * k + j is token m against its j-th expert, the weights'
// outputs side by side. Attributes: each weight's GGML type, and a cap on the threads (0: all).
ffi::Error QMatmulExpertsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> ids, ffi::RemainingArgs weights,
                              ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int32_t> ggml_types, int32_t max_threads) {
  const auto x_dims = x.dimensions(), id_dims = ids.dimensions(), y_dims = y->dimensions();
  if (x_dims.size() != 2 || id_dims.size() != 2 || y_dims.size() != 2) {
    return ffi::Error::InvalidArgument("rz_qmatmul_experts: expected x [R, K], ids [M, k] and y [M * k, N]");
  }
  const int64_t M = id_dims[0], k = id_dims[1], R = x_dims[0], K = x_dims[1], ld = y_dims[1], pairs = M * k;
  if (y_dims[0] != pairs || (R != M && R != pairs)) {
    return ffi::Error::InvalidArgument("rz_qmatmul_experts: x needs a row per token or per pair, y a row per pair");
  }
  std::vector<ExpertWeight> parts;
  int64_t n_expert = -1, column = 0;
  size_t next = 0;
  for (const int32_t ggml_type : ggml_types) {
    const int n_arrays = rz_cpu::quantized_arrays(ggml_type);
    if (n_arrays == 0) return ffi::Error::InvalidArgument("rz_qmatmul_experts: unsupported ggml_type");
    ExpertWeight part;
    part.ggml_type = ggml_type;
    for (int i = 0; i < n_arrays; ++i, ++next) {
      if (next >= weights.size()) return ffi::Error::InvalidArgument("rz_qmatmul_experts: fewer weight arrays than the types need");
      auto array = weights.get<ffi::AnyBuffer>(next);
      if (!array.has_value()) return array.error();
      const auto dims = array->dimensions();
      if (dims.size() != 3) return ffi::Error::InvalidArgument("rz_qmatmul_experts: every weight array must be [n_expert, N, K/block * items]");
      if (n_expert < 0) n_expert = dims[0];
      if (i == 0) part.N = dims[1];
      if (dims[0] != n_expert || dims[1] != part.N) return ffi::Error::InvalidArgument("rz_qmatmul_experts: the weights' arrays disagree on n_expert or N");
      part.arrays.push_back(static_cast<const uint8_t*>(array->untyped_data()));
      part.expert_bytes.push_back(static_cast<int64_t>(array->size_bytes()) / n_expert);
    }
    column += part.N;
    parts.push_back(std::move(part));
  }
  if (next != weights.size() || column != ld) return ffi::Error::InvalidArgument("rz_qmatmul_experts: the weights' rows do not add up to y's columns");
  const int32_t* expert_of = ids.typed_data();
  for (int64_t p = 0; p < pairs; ++p) {
    if (expert_of[p] < 0 || expert_of[p] >= n_expert) return ffi::Error::InvalidArgument("rz_qmatmul_experts: an expert id is out of range");
  }
  if (pairs == 0 || ld == 0) return ffi::Error::Success();
  const int64_t threads = rz_cpu::pool_threads(pool, max_threads);
  const float* xs = x.typed_data();
  float* ys = y->typed_data();
  const ffi::Error misfit = ffi::Error::InvalidArgument("rz_qmatmul_experts: K is not a multiple of a weight's block");

  if (M == 1 && R == 1) {
    // y's k rows side by side are one row of k * ld columns: pair j's weights, in order.
    std::vector<rz_cpu::QuantizedWeight> all;
    for (int64_t j = 0; j < k; ++j) {
      for (const ExpertWeight& part : parts) all.push_back(part.expert(expert_of[j]));
    }
    return rz_cpu::quantized_matmul(pool, threads, all, xs, 1, K, ys, k * ld) ? ffi::Error::Success() : misfit;
  }

  // The pairs in order of expert (a counting sort: stable, so each expert's rows keep token order).
  std::vector<int64_t> start(n_expert + 1, 0), order(pairs);
  for (int64_t p = 0; p < pairs; ++p) ++start[expert_of[p] + 1];
  for (int64_t e = 0; e < n_expert; ++e) start[e + 1] += start[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < pairs; ++p) order[fill[expert_of[p]]++] = p;

  int64_t most = 0;
  for (int64_t e = 0; e < n_expert; ++e) most = std::max(most, start[e + 1] - start[e]);
  std::vector<float> x_rows(most * K), y_rows(most * ld);
  std::vector<rz_cpu::QuantizedWeight> expert_weights;
  for (int64_t e = 0; e < n_expert; ++e) {
    const int64_t count = start[e + 1] - start[e];
    if (count == 0) continue;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t p = order[start[e] + i];
      std::memcpy(x_rows.data() + i * K, xs + (R == pairs ? p : p / k) * K, K * sizeof(float));
    }
    expert_weights.clear();
    for (const ExpertWeight& part : parts) expert_weights.push_back(part.expert(e));
    if (!rz_cpu::quantized_matmul(pool, threads, expert_weights, x_rows.data(), count, K, y_rows.data(), ld)) return misfit;
    for (int64_t i = 0; i < count; ++i) std::memcpy(ys + order[start[e] + i] * ld, y_rows.data() + i * ld, ld * sizeof(float));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RzQMatmulExperts, QMatmulExpertsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int32_t>>("ggml_types")
                                  .Attr<int32_t>("max_threads"));
