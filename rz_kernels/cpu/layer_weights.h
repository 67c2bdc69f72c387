// Where one layer's weights lie among the operands of a layer-indexed matmul (RzQMatmulLayer, in
// qmatmul.cc and qmatmul_neon.cc). Either the call holds every layer's weights, layer-major, weight i
// of type ggml_types[i] with as many arrays as that type has, and multiplies by layer l's only; or
// it holds one layer's worth of arrays, each stacked over the layers ([L, N, items]), and reads
// layer l's slice of each in place.

#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace rz_cpu {

struct LayerWeights {
  size_t first_type = 0;   // layer l's weights are types [first_type, first_type + weights_per_layer)
  size_t first_array = 0;  // and arrays [first_array, end_array)
  size_t end_array = 0;
};

// Layer l's weights among n_arrays operands, or the error a bad call gets (a layer out of range,
// types that do not split into layers, an unsupported type, arrays that do not match the types).
// arrays_of(type): how many arrays a weight of that type has (0: unsupported).
template <typename ArraysOf>
xla::ffi::Error find_layer(xla::ffi::Span<const int32_t> ggml_types, int32_t weights_per_layer, int64_t l, size_t n_arrays,
                           ArraysOf arrays_of, LayerWeights& found) {
  using xla::ffi::Error;
  if (weights_per_layer <= 0 || ggml_types.size() % weights_per_layer) {
    return Error::InvalidArgument("rz_qmatmul_layer: ggml_types must hold weights_per_layer types for each layer");
  }
  const size_t per_layer = weights_per_layer, n_layers = ggml_types.size() / per_layer;
  if (l < 0 || static_cast<size_t>(l) >= n_layers) {
    return Error::InvalidArgument("rz_qmatmul_layer: layer " + std::to_string(l) + " is outside the " + std::to_string(n_layers) +
                                  " layers [0, " + std::to_string(n_layers) + ")");
  }
  found.first_type = static_cast<size_t>(l) * per_layer;
  size_t total = 0;
  for (size_t i = 0; i < ggml_types.size(); ++i) {
    if (i == found.first_type) found.first_array = total;
    const int arrays = arrays_of(ggml_types[i]);
    if (arrays == 0) return Error::InvalidArgument("rz_qmatmul_layer: unsupported ggml_type");
    total += arrays;
    if (i + 1 == found.first_type + per_layer) found.end_array = total;
  }
  if (total != n_arrays) return Error::InvalidArgument("rz_qmatmul_layer: the weight arrays do not match the layers' types");
  return Error::Success();
}

// One weight array as a kernel reads it: where its data starts, its rows (N) and its bytes.
struct WeightArray {
  const void* data = nullptr;
  int64_t rows = 0;
  double bytes = 0;
};

// The call's arrays [first, end). Each is [N, K/block * items]; or, with `stacked`, each is every
// layer's stacked [L, N, K/block * items], and `layer`'s slice is the array.
inline xla::ffi::Error weight_arrays(const xla::ffi::RemainingArgs& weights, size_t first, size_t end, bool stacked, int64_t layer,
                                     std::vector<WeightArray>& out) {
  using xla::ffi::Error;
  for (size_t i = first; i < end; ++i) {
    auto array = weights.get<xla::ffi::AnyBuffer>(i);
    if (!array.has_value()) return array.error();
    const auto dims = array->dimensions();
    if (dims.size() != (stacked ? 3u : 2u)) {
      return Error::InvalidArgument(stacked ? "rz_qmatmul_layer: every stacked weight array must be [L, N, K/block * items]"
                                            : "rz_qmatmul: every weight array must be [N, K/block * items]");
    }
    WeightArray view{array->untyped_data(), dims[stacked ? 1 : 0], static_cast<double>(array->size_bytes())};
    if (stacked) {
      if (layer < 0 || layer >= dims[0]) {
        return Error::InvalidArgument("rz_qmatmul_layer: layer " + std::to_string(layer) + " is outside the " + std::to_string(dims[0]) +
                                      " stacked layers");
      }
      const size_t layer_bytes = array->size_bytes() / dims[0];
      view.data = static_cast<const char*>(view.data) + layer * layer_bytes;
      view.bytes = static_cast<double>(layer_bytes);
    }
    out.push_back(view);
  }
  return Error::Success();
}

// Whether a layer-indexed call holds its weights stacked: one layer's types, and arrays of rank 3.
inline bool stacked_call(const xla::ffi::RemainingArgs& weights, xla::ffi::Span<const int32_t> ggml_types, int32_t weights_per_layer) {
  if (weights.size() == 0 || static_cast<int64_t>(ggml_types.size()) != weights_per_layer) return false;
  auto array = weights.get<xla::ffi::AnyBuffer>(0);
  return array.has_value() && array->dimensions().size() == 3;
}

}  // namespace rz_cpu
