// Math of KV-cache attention (split-K decoding, flash-decoding style) shared by the CPU kernels
// (csrc/cpu/kvcache_attention_kernel.cpp) and the CUDA kernel (csrc/cuda/kvcache_attention.cu):
// which keys a query row sees, the score variants, how the cache is cut into splits, and the
// exact log-sum-exp merge of the splits. No ATen here (compiled by nvcc too).
//
// Sequence b holds Lk_b = cache_seqlens[b] + Lq_new keys once the new tokens are appended
// (Lq_new = Lq when key/value are given, else 0). Query row i (0 <= i < Lq) sits on the
// lower-right diagonal d = i + Lk_b - Lq and sees keys j with
//   causal: j <= d;  window (left, right): d - left <= j <= d + right (-1 = unbounded).
// Scores, in DESIGN.md's order: s = scale q.k, s = softcap tanh(s / softcap), s -= slope |d - j|,
// masks, then a softmax whose denominator also holds exp(sink) (no value). docs/design.md,
// "KV-cache attention", has the whole path.
#pragma once

#include <cmath>

#include "common.h"
#include "online_softmax.h"

namespace pyattn {
namespace kvcache {

using softmax::exp_;
using softmax::log_;
using softmax::nan_max;

PYATTN_HD float tanh_(float x) {
  return tanhf(x);
}
PYATTN_HD double tanh_(double x) {
  return tanh(x);
}

// Keys [key_begin, key_end) of a row on diagonal d out of Lk keys: the causal bound and the
// window, intersected with the sequence. Empty (begin >= end) for a row that sees nothing.
PYATTN_HD int64_t key_begin(int64_t d, int64_t window_left) {
  const int64_t b = window_left >= 0 ? d - window_left : 0;
  return b > 0 ? b : 0;
}

PYATTN_HD int64_t key_end(int64_t d, int64_t Lk, bool causal, int64_t window_right) {
  int64_t e = Lk;
  if (causal) e = d + 1 < e ? d + 1 : e;
  if (window_right >= 0) e = d + window_right + 1 < e ? d + window_right + 1 : e;
  return e > 0 ? e : 0;
}

// The score of key j for a row on diagonal d after scale, softcap and ALiBi (slope 0: none).
template <typename acc_t>
PYATTN_HD acc_t transform_score(acc_t dot, acc_t scale, acc_t softcap, acc_t slope, int64_t d, int64_t j) {
  acc_t s = dot * scale;
  if (softcap > acc_t(0)) s = softcap * tanh_(s / softcap);
  if (slope != acc_t(0)) s -= slope * static_cast<acc_t>(d > j ? d - j : j - d);
  return s;
}

// The chunk of keys split `s` of `n` handles out of [begin, end): equal chunks rounded up to
// `align` keys (the kernels' block), so that only the last one is ragged. Empty chunks are
// allowed (a split past the end contributes m = -inf, l = 0).
PYATTN_HD void split_range(int64_t begin, int64_t end, int64_t s, int64_t n, int64_t align, int64_t* lo,
                           int64_t* hi) {
  const int64_t len = end > begin ? end - begin : 0;
  int64_t chunk = (len + n - 1) / n;
  chunk = (chunk + align - 1) / align * align;
  int64_t a = begin + s * chunk, z = a + chunk;
  if (a > end) a = end;
  if (z > end) z = end;
  *lo = a;
  *hi = z;
}

// Exact merge of split partials: each split s has its own max m_s, sum l_s = sum exp(x - m_s)
// and unnormalised output acc_s. With M = max(m_s, sink), the row's denominator is
// L = sum_s l_s exp(m_s - M) + exp(sink - M), and out = sum_s acc_s exp(m_s - M) / L.
// weight(m_s) gives each split's factor exp(m_s - M) / L; lse = M + log L (+inf for a row with
// no key and no sink: out 0).
template <typename acc_t>
struct SplitMerge {
  acc_t M;
  acc_t L;

  PYATTN_HD void init(bool has_sink, acc_t sink) {
    M = has_sink ? sink : neg_inf<acc_t>();
    L = has_sink ? acc_t(1) : acc_t(0);
  }

  // Folds one split's (m, l) into (M, L).
  PYATTN_HD void add(acc_t m, acc_t l) {
    if (m == neg_inf<acc_t>() && l == acc_t(0)) return;  // an empty split
    const acc_t nm = nan_max(M, m);
    L = L * (M == neg_inf<acc_t>() ? acc_t(0) : exp_(M - nm)) + l * exp_(m - nm);
    M = nm;
  }

  // The factor of a split's unnormalised output in the merged row (0 for an empty split or an
  // empty row).
  PYATTN_HD acc_t weight(acc_t m) const {
    if (m == neg_inf<acc_t>() || !(L > acc_t(0))) return L == L ? acc_t(0) : L;
    return exp_(m - M) / L;
  }

  PYATTN_HD acc_t lse() const {
    return L > acc_t(0) ? M + log_(L) : (L == L ? pos_inf<acc_t>() : L);
  }
};

// num_splits = 0: enough (batch, kv head, split) tasks to keep `workers` busy (4 per worker:
// balance when sequences differ), but no split under `min_keys` keys (each costs a partial
// row of D floats per query row and a merge), and none when the rows are many (a long new
// block is compute-bound: splitting only adds partial traffic).
PYATTN_HD int64_t choose_splits(int64_t B, int64_t Hkv, int64_t rows, int64_t max_keys, int64_t workers,
                                int64_t min_keys) {
  const int64_t pairs = B * Hkv > 0 ? B * Hkv : 1;
  int64_t want = (4 * workers + pairs - 1) / pairs;
  const int64_t by_len = max_keys / (min_keys > 0 ? min_keys : 1);
  if (want > by_len) want = by_len;
  if (rows > 64) want = 1;
  if (want > 256) want = 256;
  return want > 1 ? want : 1;
}

}  // namespace kvcache
}  // namespace pyattn
