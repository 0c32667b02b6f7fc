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

namespace pyattn {
namespace additive {

// Keys per block of the streaming loop. On the GPU a block is a tile of this many keys; on the
// CPU the online-softmax rescale runs once per block instead of once per key.
constexpr int kBlockK = 64;

template <typename T>
PYATTN_HD T exp_(T x);
template <>
PYATTN_HD float exp_<float>(float x) {
  return expf(x);
}
template <>
PYATTN_HD double exp_<double>(double x) {
  return exp(x);
}

template <typename T>
PYATTN_HD T log_(T x);
template <>
PYATTN_HD float log_<float>(float x) {
  return logf(x);
}
template <>
PYATTN_HD double log_<double>(double x) {
  return log(x);
}

// max that lets NaN through: a NaN score must poison its row, not be skipped as "masked".
template <typename T>
PYATTN_HD T nan_max(T a, T b) {
  return (b > a || b != b) ? b : a;
}

// Online softmax of one query row: m is the largest score so far, l the sum of exp(e - m).
template <typename acc_t>
struct RowSoftmax {
  acc_t m;
  acc_t l;

  PYATTN_HD void init() {
    m = neg_inf<acc_t>();
    l = acc_t(0);
  }

  // Moves the reference point to include a block whose largest score is block_max and returns
  // the factor by which the sums accumulated so far (l and the context) must be scaled. A block
  // with every key masked (block_max = -inf) changes nothing.
  PYATTN_HD acc_t rescale(acc_t block_max) {
    const acc_t m_new = nan_max(m, block_max);
    if (m_new == neg_inf<acc_t>()) return acc_t(1);
    const acc_t alpha = exp_(m - m_new);  // m = -inf (first block): alpha = 0, sums are 0
    l *= alpha;
    m = m_new;
    return alpha;
  }

  // exp(e - m) for a score of the current block (masked e = -inf gives 0).
  PYATTN_HD acc_t weight(acc_t e) const {
    return m == neg_inf<acc_t>() ? acc_t(0) : exp_(e - m);
  }

  // 1 / l, or 0 for a row without an attendable key: its context is zero, not NaN.
  PYATTN_HD acc_t inv_sum() const {
    return l > acc_t(0) ? acc_t(1) / l : (l == l ? acc_t(0) : l);
  }

  // log-sum-exp of the row; +inf for a row without an attendable key, so that every
  // recomputed probability exp(e - lse) is exactly 0 in the backward.
  PYATTN_HD acc_t lse() const {
    return l > acc_t(0) ? m + log_(l) : (l == l ? pos_inf<acc_t>() : l);
  }
};

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
