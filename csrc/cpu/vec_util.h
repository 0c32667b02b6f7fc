// Vectorised helpers shared by the CPU kernels (cpu/sdpa_kernel.cpp, cpu/kvcache_attention_kernel.cpp).
// Included inside each per-instruction-set build, so every definition lands in that build's
// CPU_CAPABILITY namespace (setup.py compiles those files once per capability).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#include "sdpa_kernel.h"  // acc_t

namespace pyattn {
namespace cpu {
namespace CPU_CAPABILITY {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Half inputs (float16 / bfloat16) accumulate in float32 (acc_t); float32 / float64 in themselves.
template <typename in_t>
constexpr bool kHalf = !std::is_same_v<in_t, acc_t<in_t>>;

// dst[0 .. n) = src widened to acc_t.
template <typename in_t>
inline void to_acc(const in_t* src, acc_t<in_t>* dst, int64_t n) {
  int64_t i = 0;
  if constexpr (kHalf<in_t>) {
    constexpr int64_t W = Vec<in_t>::size();  // = 2 float vectors
    for (; i + W <= n; i += W) {
      auto [lo, hi] = at::vec::convert_to_float<in_t>(Vec<in_t>::loadu(src + i));
      lo.store(dst + i);
      hi.store(dst + i + Vec<float>::size());
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<acc_t<in_t>>(src[i]);
}

// dst[0 .. n) = src * alpha, rounded once to in_t.
template <typename in_t>
inline void store_scaled(const acc_t<in_t>* src, acc_t<in_t> alpha, in_t* dst, int64_t n) {
  using T = acc_t<in_t>;
  int64_t i = 0;
  if constexpr (kHalf<in_t>) {
    constexpr int64_t W = Vec<in_t>::size();
    const Vec<float> a(alpha);
    for (; i + W <= n; i += W) {
      const Vec<float> lo = Vec<float>::loadu(src + i) * a;
      const Vec<float> hi = Vec<float>::loadu(src + i + Vec<float>::size()) * a;
      at::vec::convert_from_float<in_t>(lo, hi).store(dst + i);
    }
  } else {
    const Vec<T> a(alpha);
    for (; i + Vec<T>::size() <= n; i += Vec<T>::size()) (Vec<T>::loadu(src + i) * a).store(dst + i);
  }
  for (; i < n; ++i) dst[i] = static_cast<in_t>(static_cast<T>(src[i] * alpha));
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace pyattn
