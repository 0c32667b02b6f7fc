// Raw-pointer interface between csrc/kvcache_attention.cpp (ATen side, compiled once) and the
// per-instruction-set kernels of csrc/cpu/kvcache_attention_kernel.cpp (DEFAULT, AVX2, AVX512).
// The cache is a set of pages, each (Hkv, page_size, D) with D contiguous and the page, head and
// row strides given: a dense cache (B, Hkv, L_max, D) is B pages of L_max rows, page b for
// sequence b (block_table null); a paged one (num_pages, Hkv, page_size, D) maps position j of
// sequence b to page block_table[b, j / page_size], row j % page_size (page_size = L_max for a
// dense cache). Statistics, sinks and
// slopes are of acc_t<scalar_t> (cpu/sdpa_kernel.h): float32 for half inputs.
#pragma once

#include <cstdint>

#include "sdpa_kernel.h"

namespace pyattn {
namespace cpu {

template <typename scalar_t>
struct KVCacheParams {
  const scalar_t* q;      // (B, Hq, Lq, D), contiguous
  scalar_t* k_cache;      // pages, see above (written at the new positions)
  scalar_t* v_cache;      // pages of Dv-wide rows
  int64_t k_stride[3];    // page, head, row strides of k_cache, in elements
  int64_t v_stride[3];    // same for v_cache
  const scalar_t* k_new;  // (B, Hkv, Lq, D) contiguous, or null: nothing to append
  const scalar_t* v_new;  // (B, Hkv, Lq, Dv) contiguous
  const int32_t* cache_seqlens;  // (B,): filled length before the new tokens
  const int32_t* block_table;    // (B, bt_stride) or null for a dense cache
  int64_t bt_stride;
  int64_t page_size;
  const acc_t<scalar_t>* sinks;  // (Hq,) or null
  const acc_t<scalar_t>* alibi;  // (B, Hq) with row stride alibi_b_stride (0: (Hq,)), or null
  int64_t alibi_b_stride;
  int64_t B, Hq, Hkv, Lq, D, Dv;
  acc_t<scalar_t> scale;
  acc_t<scalar_t> softcap;  // 0: off
  bool causal;
  int64_t window_left, window_right;  // -1: unbounded
  int64_t num_splits;                 // >= 1 (the ATen side resolves 0)
};

template <typename scalar_t>
struct KVCacheOut {
  scalar_t* out;         // (B, Hq, Lq, Dv), each element rounded once
  acc_t<scalar_t>* lse;  // (B, Hq, Lq): log of the softmax denominator (sink included)
};

#define PYATTN_DECLARE_KVCACHE_KERNELS(CAP)                                                            \
  namespace CAP {                                                                                      \
  void kvcache_attention_kernel(const KVCacheParams<float>&, const KVCacheOut<float>&);                \
  void kvcache_attention_kernel(const KVCacheParams<double>&, const KVCacheOut<double>&);              \
  void kvcache_attention_kernel(const KVCacheParams<c10::Half>&, const KVCacheOut<c10::Half>&);        \
  void kvcache_attention_kernel(const KVCacheParams<c10::BFloat16>&, const KVCacheOut<c10::BFloat16>&); \
  }

PYATTN_DECLARE_KVCACHE_KERNELS(DEFAULT)
PYATTN_DECLARE_KVCACHE_KERNELS(AVX2)
PYATTN_DECLARE_KVCACHE_KERNELS(AVX512)

}  // namespace cpu
}  // namespace pyattn
