// Memory-safety guards of pyattn::kvcache_attention_fwd shared by the CPU and CUDA
// implementations, and the choice of the split count. Users' inputs are validated once, in
// Python (pyattn/ops/kvcache_attention.py, with messages naming the argument); these only keep a
// direct torch.ops call from reading or writing out of bounds through inconsistent shapes. The
// values of cache_seqlens and block_table are checked where they can be read without a device
// sync (the CPU op).
#pragma once

#include <ATen/ATen.h>

#include "common.h"
#include "kvcache_attention_math.h"

namespace pyattn {

struct KVCacheDims {
  int64_t B, Hq, Hkv, Lq, D, Dv;
  bool paged;
  int64_t page_size;  // L_max for a dense cache
  int64_t num_pages;  // B for a dense cache
  int64_t capacity;   // the most keys a sequence can hold
};

inline KVCacheDims check_kvcache_inputs(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                                        const at::Tensor& seqlens, const c10::optional<at::Tensor>& key,
                                        const c10::optional<at::Tensor>& value,
                                        const c10::optional<at::Tensor>& block_table,
                                        const c10::optional<at::Tensor>& sinks,
                                        const c10::optional<at::Tensor>& alibi) {
  PYATTN_CHECK_ARG(q.dim() == 4 && kc.dim() == 4 && vc.dim() == 4, "kvcache_attention", "query/k_cache/v_cache",
                   "expected 4-D, got ", q.sizes(), " / ", kc.sizes(), " / ", vc.sizes());
  KVCacheDims d;
  d.B = q.size(0);
  d.Hq = q.size(1);
  d.Lq = q.size(2);
  d.D = q.size(3);
  d.Hkv = kc.size(1);
  d.Dv = vc.size(3);
  d.paged = block_table.has_value();
  d.page_size = kc.size(2);
  d.num_pages = kc.size(0);
  PYATTN_CHECK_ARG(kc.size(3) == d.D && vc.size(0) == kc.size(0) && vc.size(1) == d.Hkv && vc.size(2) == kc.size(2),
                   "kvcache_attention", "k_cache/v_cache", "expected caches matching query ", q.sizes(), " and each other, got ",
                   kc.sizes(), " / ", vc.sizes());
  PYATTN_CHECK_ARG(d.Hkv > 0 && d.Hq % d.Hkv == 0, "kvcache_attention", "k_cache",
                   "expected a number of heads dividing query's ", d.Hq, ", got ", d.Hkv);
  PYATTN_CHECK_ARG(kc.scalar_type() == q.scalar_type() && vc.scalar_type() == q.scalar_type() &&
                       kc.device() == q.device() && vc.device() == q.device(),
                   "kvcache_attention", "k_cache/v_cache", "expected query's dtype and device ", q.scalar_type(), " ",
                   q.device(), ", got ", kc.scalar_type(), " ", kc.device(), " / ", vc.scalar_type(), " ", vc.device());
  PYATTN_CHECK_ARG((kc.size(3) <= 1 || kc.stride(3) == 1) && (vc.size(3) <= 1 || vc.stride(3) == 1),
                   "kvcache_attention", "k_cache/v_cache", "expected a contiguous last dim, got strides ", kc.strides(),
                   " / ", vc.strides());
  PYATTN_CHECK_ARG(seqlens.scalar_type() == at::kInt && seqlens.dim() == 1 && seqlens.size(0) == d.B &&
                       seqlens.device() == q.device(),
                   "kvcache_attention", "cache_seqlens", "expected int32 (B,) = (", d.B, ",) on query's device, got ",
                   seqlens.scalar_type(), " ", seqlens.sizes(), " on ", seqlens.device());
  PYATTN_CHECK_ARG(key.has_value() == value.has_value(), "kvcache_attention", "key/value",
                   "expected both or neither, got key ", key.has_value() ? "given" : "None", " and value ",
                   value.has_value() ? "given" : "None");
  if (key.has_value()) {
    const std::vector<int64_t> ks{d.B, d.Hkv, d.Lq, d.D}, vs{d.B, d.Hkv, d.Lq, d.Dv};
    PYATTN_CHECK_ARG(key->sizes() == c10::IntArrayRef(ks) && value->sizes() == c10::IntArrayRef(vs) &&
                         key->scalar_type() == q.scalar_type() && value->scalar_type() == q.scalar_type() &&
                         key->device() == q.device() && value->device() == q.device(),
                     "kvcache_attention", "key/value", "expected (B, Hkv, Lq, D) / (B, Hkv, Lq, Dv) = ",
                     c10::IntArrayRef(ks), " / ", c10::IntArrayRef(vs), " of query's dtype and device, got ",
                     key->sizes(), " / ", value->sizes());
  }
  if (d.paged) {
    PYATTN_CHECK_ARG(block_table->scalar_type() == at::kInt && block_table->dim() == 2 && block_table->size(0) == d.B &&
                         block_table->device() == q.device(),
                     "kvcache_attention", "block_table", "expected int32 (B, max_pages) on query's device, got ",
                     block_table->scalar_type(), " ", block_table->sizes(), " on ", block_table->device());
    PYATTN_CHECK_ARG(d.page_size > 0, "kvcache_attention", "k_cache", "expected pages of at least one row, got ",
                     kc.sizes());
    d.capacity = block_table->size(1) * d.page_size;
  } else {
    PYATTN_CHECK_ARG(kc.size(0) == d.B, "kvcache_attention", "k_cache",
                     "expected a dense cache (B, Hkv, L_max, D) with B = ", d.B, ", got ", kc.sizes());
    d.capacity = d.page_size;
  }
  if (sinks.has_value()) {
    PYATTN_CHECK_ARG(sinks->dim() == 1 && sinks->size(0) == d.Hq && sinks->device() == q.device(),
                     "kvcache_attention", "sinks", "expected (Hq,) = (", d.Hq, ",) on query's device, got ",
                     sinks->sizes(), " on ", sinks->device());
  }
  if (alibi.has_value()) {
    PYATTN_CHECK_ARG(((alibi->dim() == 1 && alibi->size(0) == d.Hq) ||
                      (alibi->dim() == 2 && alibi->size(0) == d.B && alibi->size(1) == d.Hq)) &&
                         alibi->device() == q.device(),
                     "kvcache_attention", "alibi_slopes", "expected (Hq,) or (B, Hq) on query's device, got ",
                     alibi->sizes(), " on ", alibi->device());
  }
  return d;
}

// The split count of a call: num_splits when > 0, else kvcache::choose_splits for `workers` and
// the longest sequence, max_keys (the capacity where the lengths are not known on the host).
inline int64_t resolve_splits(const KVCacheDims& d, int64_t num_splits, int64_t max_keys, int64_t workers,
                              int64_t min_keys) {
  PYATTN_CHECK_ARG(num_splits >= 0, "kvcache_attention", "num_splits", "expected >= 0, got ", num_splits);
  if (num_splits > 0) return num_splits;
  return kvcache::choose_splits(d.B, d.Hkv, (d.Hq / d.Hkv) * d.Lq, max_keys, workers, min_keys);
}

}  // namespace pyattn
