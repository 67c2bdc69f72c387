// The x86 quantized matmul (qmatmul.cc) as other kernels call it: the experts' matmul
// (qmatmul_moe.cc) runs each expert's rows through the same tiles, threads and activation rounding.

#pragma once

#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace rz_cpu {

// One quantized weight W [N, K]: its GGML type (rz_kernels.ggml_types.GGMLType) and its arrays'
// data in the order of rz_kernels.quantized_matmul.CPU_FFI_ARRAYS, each row-major [N, K/block * items].
struct QuantizedWeight {
  int32_t ggml_type = 0;
  std::vector<const void*> arrays;
  int64_t N = 0;
  double bytes = 0;  // the arrays' size: how the work is shared out
};

// How many arrays a weight of this type has (0: a type the kernel does not implement).
int quantized_arrays(int32_t ggml_type);

// y[M, ld] = x[M, K] @ [W_0; W_1; ...].T, weight i writing columns [sum of N before it, + N_i).
// x is quantized once for all of them. False (nothing written) when a weight's block does not divide K.
bool quantized_matmul(xla::ffi::ThreadPool& pool, int64_t threads, const std::vector<QuantizedWeight>& weights,
                      const float* x, int64_t M, int64_t K, float* y, int64_t ld);

}  // namespace rz_cpu
