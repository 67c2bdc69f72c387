// Where one layer's weights lie among the operands of a layer-indexed matmul (RzQMatmulLayer, in
// qmatmul.cc and qmatmul_neon.cc): the call holds every layer's weights, layer-major, weight i of
// type ggml_types[i] with as many arrays as that type has, and multiplies by layer l's only.

#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

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

}  // namespace rz_cpu
