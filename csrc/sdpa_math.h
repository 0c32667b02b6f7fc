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
