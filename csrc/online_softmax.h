// The pieces of streaming (online) softmax that both fused ops share, on CPU and GPU alike:
// exp/log for float and double, a NaN-propagating max, and the per-row state that folds in one
// block of scores at a time. csrc/additive_attention_math.h and csrc/sdpa_math.h
// bring these into their own namespaces.
#pragma once

#include <cmath>

#include "common.h"

namespace pyattn {
namespace softmax {

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

// max that lets NaN through: a NaN score must poison its row, not be skipped as masked.
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

}  // namespace softmax
}  // namespace pyattn
