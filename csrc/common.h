// Shared by every pyattn C++ and CUDA source: the host/device marker, index types, and the
// small checks the C++ ops repeat after the Python validation layer (which gives the friendly
// messages; these only guard the kernels against misuse through torch.ops directly).
#pragma once

#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define PYATTN_HD __host__ __device__ __forceinline__
#else
#define PYATTN_HD inline
#endif

namespace pyattn {

// Offsets into tensors are 64-bit everywhere: B * T * T overflows 32 bits at realistic sizes.
using index_t = int64_t;

template <typename T>
PYATTN_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
PYATTN_HD T pos_inf() {
  return std::numeric_limits<T>::infinity();
}

}  // namespace pyattn

#if !defined(__CUDACC__) || defined(PYATTN_HOST_CHECKS)
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

// One message form for every op's guards, as the Python checks (argument, expected, got):
//   pyattn::<op>: argument '<arg>': expected ..., got ...
// (op may name the backend too: "sdpa (cuda)").
#define PYATTN_CHECK_ARG(cond, op, arg, ...) \
  TORCH_CHECK(cond, "pyattn::", op, ": argument '", arg, "': ", __VA_ARGS__)
#endif
