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
  TORCH_CHECK(q.dim() == 4 && kc.dim() == 4 && vc.dim() == 4,
              "pyattn::kvcache_attention: query, k_cache, v_cache must be 4-D");
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
  TORCH_CHECK(kc.size(3) == d.D && vc.size(0) == kc.size(0) && vc.size(1) == d.Hkv && vc.size(2) == kc.size(2),
              "pyattn::kvcache_attention: k_cache ", kc.sizes(), " / v_cache ", vc.sizes(), " do not match query ",
              q.sizes());
  TORCH_CHECK(d.Hkv > 0 && d.Hq % d.Hkv == 0, "pyattn::kvcache_attention: Hq must be a multiple of Hkv");
  TORCH_CHECK(kc.scalar_type() == q.scalar_type() && vc.scalar_type() == q.scalar_type() &&
                  kc.device() == q.device() && vc.device() == q.device(),
              "pyattn::kvcache_attention: query and the caches must share dtype and device");
  TORCH_CHECK((kc.size(3) <= 1 || kc.stride(3) == 1) && (vc.size(3) <= 1 || vc.stride(3) == 1),
              "pyattn::kvcache_attention: the caches' last dim must be contiguous");
  TORCH_CHECK(seqlens.scalar_type() == at::kInt && seqlens.dim() == 1 && seqlens.size(0) == d.B &&
                  seqlens.device() == q.device(),
              "pyattn::kvcache_attention: cache_seqlens must be int32 (B,) on query's device");
  TORCH_CHECK(key.has_value() == value.has_value(), "pyattn::kvcache_attention: key and value go together");
  if (key.has_value()) {
    const std::vector<int64_t> ks{d.B, d.Hkv, d.Lq, d.D}, vs{d.B, d.Hkv, d.Lq, d.Dv};
    TORCH_CHECK(key->sizes() == c10::IntArrayRef(ks) && value->sizes() == c10::IntArrayRef(vs) &&
                    key->scalar_type() == q.scalar_type() && value->scalar_type() == q.scalar_type() &&
                    key->device() == q.device() && value->device() == q.device(),
                "pyattn::kvcache_attention: key/value must be (B, Hkv, Lq, D) of query's dtype and device");
  }
  if (d.paged) {
    TORCH_CHECK(block_table->scalar_type() == at::kInt && block_table->dim() == 2 && block_table->size(0) == d.B &&
                    block_table->device() == q.device(),
                "pyattn::kvcache_attention: block_table must be int32 (B, max_pages) on query's device");
    TORCH_CHECK(d.page_size > 0, "pyattn::kvcache_attention: pages must hold at least one row");
    d.capacity = block_table->size(1) * d.page_size;
  } else {
    TORCH_CHECK(kc.size(0) == d.B, "pyattn::kvcache_attention: a dense cache must be (B, Hkv, L_max, D)");
    d.capacity = d.page_size;
  }
  if (sinks.has_value()) {
    TORCH_CHECK(sinks->dim() == 1 && sinks->size(0) == d.Hq && sinks->device() == q.device(),
                "pyattn::kvcache_attention: sinks must be (Hq,) on query's device");
  }
  if (alibi.has_value()) {
    TORCH_CHECK((alibi->dim() == 1 && alibi->size(0) == d.Hq) ||
                    (alibi->dim() == 2 && alibi->size(0) == d.B && alibi->size(1) == d.Hq),
                "pyattn::kvcache_attention: alibi_slopes must be (Hq,) or (B, Hq)");
    TORCH_CHECK(alibi->device() == q.device(), "pyattn::kvcache_attention: alibi_slopes on query's device");
  }
  return d;
}

// The split count of a call: num_splits when > 0, else kvcache::choose_splits for `workers` and
// the longest sequence, max_keys (the capacity where the lengths are not known on the host).
inline int64_t resolve_splits(const KVCacheDims& d, int64_t num_splits, int64_t max_keys, int64_t workers,
                              int64_t min_keys) {
  TORCH_CHECK(num_splits >= 0, "pyattn::kvcache_attention: num_splits must be >= 0");
  if (num_splits > 0) return num_splits;
  return kvcache::choose_splits(d.B, d.Hkv, (d.Hq / d.Hkv) * d.Lq, max_keys, workers, min_keys);
}

}  // namespace pyattn
