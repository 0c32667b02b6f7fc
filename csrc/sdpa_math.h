// Math of fused scaled-dot-product attention shared by the CPU kernels (csrc/cpu/) and the CUDA
// kernels (csrc/cuda/): score masking, the causal block bounds, the online-softmax row state,
// the dropout element index, and the backward's dS formula. No ATen here (see
// additive_attention_math.h for why).
//
//   S = scale * Q K^T + mask     P = softmax(S) (rows without an allowed key: P = 0)
//   O = dropout(P) V             lse_i = log sum_j exp(S_ij)   (+inf for an empty row)
//   backward: Delta_i = dO_i . O_i,  dP = dO V^T,  dS_ij = P_ij (Z_ij dP_ij - Delta_i)
//   (Z = dropout keep / (1 - p)),  dQ = scale dS K,  dK = scale dS^T Q,  dV = (Z P)^T dO
#pragma once

#include <cmath>

#include "common.h"
#include "online_softmax.h"
#include "philox.h"

namespace pyattn {
namespace flash {

using softmax::exp_;
using softmax::log_;
using softmax::nan_max;
using softmax::RowSoftmax;

// Causal masking: query i sees keys j <= i + off, where off = causal_offset(...) is 0 for the
// upper-left diagonal (torch's is_causal) and Lk - Lq for the lower-right one (the diagonal ends
// at the last key). A row with no such key (i + off < 0) is empty: zeros, zero gradients.
enum Causal : int { kNoCausal = 0, kUpperLeft = 1, kLowerRight = 2 };

PYATTN_HD int64_t causal_offset(int causal, int64_t Lq, int64_t Lk) {
  return causal == kLowerRight ? Lk - Lq : 0;
}

PYATTN_HD bool causal_allowed(int64_t i, int64_t j, int64_t off) {
  return j <= i + off;
}

// Keys [0, causal_key_end(q_end, Lk, off)) can be seen by some query in [q_begin, q_end): the
// blocks past it are skipped entirely (the two-stage causal loop).
PYATTN_HD int64_t causal_key_end(int64_t q_end, int64_t Lk, int64_t off) {
  const int64_t e = q_end + off;
  return e < 0 ? 0 : (e < Lk ? e : Lk);
}

// Queries [causal_query_begin(k_begin, Lq, off), Lq) can see some key in [k_begin, ...).
PYATTN_HD int64_t causal_query_begin(int64_t k_begin, int64_t Lq, int64_t off) {
  const int64_t b = k_begin - off;
  return b < 0 ? 0 : (b < Lq ? b : Lq);
}

// A key block [k_begin, k_end) needs per-element causal masking for queries [q_begin, q_end)
// only when some key in it lies right of some query's diagonal: k_end - 1 > q_begin + off.
PYATTN_HD bool causal_block_needs_mask(int64_t q_begin, int64_t k_end, int64_t off) {
  return k_end - 1 > q_begin + off;
}

// Attention variants (docs/design.md, "Attention variants"): a sliding window (left, right)
// around the diagonal d = i + win_off (win_off = 0 for upper-left causality, Lk - Lq otherwise;
// -1 = unbounded) and causality leave query i the keys of one band [lo, hi). Both bounds grow
// with i, so a block of queries [i0, i1) sees keys [band(i0).lo, band(i1 - 1).hi) and a key
// block is visited only where some row's band meets it: work L x window, not L^2.
struct Band {
  bool causal;
  int64_t causal_off, left, right, win_off, Lq, Lk;

  PYATTN_HD bool on() const { return causal || left >= 0 || right >= 0; }
  // the first allowed key of row i (may exceed hi: an empty row)
  PYATTN_HD int64_t lo(int64_t i) const {
    const int64_t l = left >= 0 ? i + win_off - left : 0;
    return l < 0 ? 0 : (l < Lk ? l : Lk);
  }
  // one past the last allowed key of row i
  PYATTN_HD int64_t hi(int64_t i) const {
    int64_t h = Lk;
    if (causal && i + causal_off + 1 < h) h = i + causal_off + 1;
    if (right >= 0 && i + win_off + right + 1 < h) h = i + win_off + right + 1;
    return h < 0 ? 0 : h;
  }
  // The rows [query_begin(k0), query_end(k1)) see some key of [k0, k1).
  PYATTN_HD int64_t query_begin(int64_t k0) const {
    int64_t b = 0;
    if (causal && k0 - causal_off > b) b = k0 - causal_off;
    if (right >= 0 && k0 - win_off - right > b) b = k0 - win_off - right;
    return b < Lq ? b : Lq;
  }
  PYATTN_HD int64_t query_end(int64_t k1) const {
    if (left < 0) return Lq;
    const int64_t e = k1 - win_off + left;
    return e < 0 ? 0 : (e < Lq ? e : Lq);
  }
  // Whether rows [i0, i1) need per-element masking in key block [j0, j1).
  PYATTN_HD bool cuts(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    return on() && (lo(i1 - 1) > j0 || hi(i0) < j1);
  }
};

// Softcap: s -> c tanh(s / c); its derivative 1 - tanh^2 = 1 - (capped / c)^2.
template <typename acc_t>
PYATTN_HD acc_t softcap_grad(acc_t capped, acc_t inv_cap) {
  const acc_t t = capped * inv_cap;
  return acc_t(1) - t * t;
}

// The row's softmax closed with a sink logit (one more term in the denominator, no value):
// returns the factor of the unnormalised output, and the row's lse (with the sink) in *lse. An
// empty row puts all its mass on the sink: factor 0, lse = sink.
template <typename acc_t>
PYATTN_HD acc_t close_with_sink(acc_t m, acc_t l, acc_t sink, acc_t* lse) {
  const acc_t M = nan_max(m, sink);
  if (M == neg_inf<acc_t>()) {  // no key and a -inf sink: nothing at all
    *lse = pos_inf<acc_t>();
    return acc_t(0);
  }
  const acc_t a = m == neg_inf<acc_t>() ? acc_t(0) : exp_(m - M);
  const acc_t total = l * a + exp_(sink - M);
  *lse = M + log_(total);
  return a / total;
}

// A score with its mask applied. mask_kind: 0 none, 1 bool (true = attend), 2 additive.
enum MaskKind : int { kNoMask = 0, kBoolMask = 1, kAddMask = 2 };

template <typename acc_t>
PYATTN_HD acc_t apply_bool_mask(acc_t s, bool attend) {
  return attend ? s : neg_inf<acc_t>();
}


// P_ij recomputed in the backward from the saved lse.
template <typename acc_t>
PYATTN_HD acc_t prob(acc_t s, acc_t lse) {
  return exp_(s - lse);
}

// Linear index of score element (b, h, i, j) in a (B, Hq, Lq, Lk) tensor: the dropout counter
// is offset + this (csrc/philox.h), identical on every backend.
PYATTN_HD uint64_t dropout_index(int64_t bh, int64_t i, int64_t j, int64_t Lq, int64_t Lk) {
  return (static_cast<uint64_t>(bh) * static_cast<uint64_t>(Lq) + static_cast<uint64_t>(i)) *
             static_cast<uint64_t>(Lk) +
         static_cast<uint64_t>(j);
}

// Dropout multiplier Z_ij: 0 for a dropped element, 1 / (1 - p) for a kept one.
PYATTN_HD float dropout_scale(uint64_t seed, uint64_t counter, float p) {
  return dropout_keep(seed, counter, p) ? 1.0f / (1.0f - p) : 0.0f;
}

// dS_ij = P_ij (Z_ij dP_ij - Delta_i), Z = 1 without dropout.
template <typename acc_t>
PYATTN_HD acc_t dscore(acc_t p, acc_t dp, acc_t delta) {
  return p * (dp - delta);
}

// GQA: query head h reads key/value head h / (Hq / Hkv).
PYATTN_HD int64_t kv_head(int64_t h, int64_t Hq, int64_t Hkv) {
  return h / (Hq / Hkv);
}

}  // namespace flash
}  // namespace pyattn
