// Math of fused additive attention shared by the CPU kernels (csrc/cpu/) and the CUDA kernels
// (csrc/cuda/): the online-softmax row state, the probability/gradient formulas and the tiling
// constants, so the CPU tests exercise the same logic the GPU runs.
//
//   e_ij = v . tanh(q_i + k_j)      a_ij = exp(e_ij - lse_i)      c_i = sum_j a_ij value_j
//   backward (t = tanh(q_i + k_j), Delta_i = sum_j a_ij dP_ij, which equals dO_i . c_i
//   [+ sum_j a_ij dW_ij]; the CPU kernel sums it from the recomputed a_ij, see there why):
//     dP_ij = dO_i . value_j [+ dW_ij]        dS_ij = a_ij (dP_ij - Delta_i)
//     dq_i += dS_ij v * (1 - t^2)   dk_j += dS_ij v * (1 - t^2)   dv += dS_ij t
//     dvalue_j += a_ij dO_i
//
// Nothing here includes ATen: the per-capability CPU translation units include it, and ATen's
// inline functions must not be compiled with AVX512 flags into the shared object.
#pragma once

#include <cmath>

#include "common.h"
#include "online_softmax.h"

namespace pyattn {
namespace additive {

// Keys per block of the streaming loop. On the GPU a block is a tile of this many keys; on the
// CPU the online-softmax rescale runs once per block instead of once per key.
constexpr int kBlockK = 64;

using softmax::exp_;
using softmax::log_;
using softmax::nan_max;
using softmax::RowSoftmax;

// a_ij recomputed from the saved lse.
template <typename acc_t>
PYATTN_HD acc_t prob(acc_t e, acc_t lse) {
  return exp_(e - lse);
}

// dS_ij = a_ij (dP_ij - Delta_i)
template <typename acc_t>
PYATTN_HD acc_t dscore(acc_t p, acc_t dp, acc_t delta) {
  return p * (dp - delta);
}

// d tanh(x) / dx written in terms of t = tanh(x).
template <typename acc_t>
PYATTN_HD acc_t dtanh(acc_t t) {
  return acc_t(1) - t * t;
}

// How many query-row chunks each batch element's backward is split into. Each chunk
// accumulates its own partial dK / dvalue / dv, which are then summed in chunk order: no
// atomics, and the split depends only on the shapes (not the thread count), so results are
// bitwise reproducible on any machine with the same instruction set.
PYATTN_HD int64_t backward_chunks(int64_t B, int64_t Tq) {
  const int64_t target_tasks = 64;
  int64_t per_batch = (target_tasks + B - 1) / (B > 0 ? B : 1);
  const int64_t max_chunks = (Tq + 15) / 16;
  if (per_batch > max_chunks) per_batch = max_chunks;
  return per_batch < 1 ? 1 : per_batch;
}

// ---- Added for the CUDA kernels (csrc/cuda/additive_attention.cu) --------------------------------
// tanh of the accumulation type: accurate tanhf / tanh on both host and device. (The hardware
// tanh.approx.f32 has a relative error of about 2^-11, far above the float32 reference's error, so
// the CUDA kernels do not use it.)
PYATTN_HD float tanh_(float x) {
  return tanhf(x);
}
PYATTN_HD double tanh_(double x) {
  return tanh(x);
}
// ---- end of the CUDA additions ---------------------------------------------------------------------

}  // namespace additive
}  // namespace pyattn
