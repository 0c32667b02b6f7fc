// pyattn::kvcache_attention_fwd for CPU tensors: memory-safety guards (including the values of
// cache_seqlens and block_table, which the CPU can read for free), the split count, and the
// choice of the kernel build for this CPU (csrc/cpu/kvcache_attention_kernel.cpp). The op writes
// the new key/value rows into k_cache / v_cache in place (the schema's Tensor(a!) / Tensor(b!)),
// then attends; docs/design.md, "KV-cache attention".
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "cpu/capability.h"
#include "cpu/kvcache_attention_kernel.h"
#include "kvcache_attention.h"

namespace pyattn {

namespace {

// A split must amortise its partial rows and the merge: fewer keys than this are not cut.
constexpr int64_t kMinSplitKeys = 512;

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 ? at::kFloat : t;
}

// The lengths after the append, checked against the cache: the largest is returned.
int64_t check_lengths(const KVCacheDims& d, const at::Tensor& seqlens, bool append,
                      const c10::optional<at::Tensor>& block_table) {
  const at::Tensor s = seqlens.contiguous();
  const int32_t* sl = s.data_ptr<int32_t>();
  int64_t longest = 0;
  at::Tensor bt;
  if (d.paged) bt = block_table->contiguous();
  for (int64_t b = 0; b < d.B; ++b) {
    const int64_t lk = static_cast<int64_t>(sl[b]) + (append ? d.Lq : 0);
    PYATTN_CHECK_ARG(sl[b] >= 0 && lk <= d.capacity, "kvcache_attention", "cache_seqlens", "expected sequence ", b,
                     " to fit the cache's ", d.capacity, " rows, got ", sl[b], " cached + ", lk - sl[b],
                     " new = ", lk, " cache rows");
    longest = std::max(longest, lk);
    if (d.paged) {
      const int32_t* row = bt.data_ptr<int32_t>() + b * bt.size(1);
      for (int64_t pg = 0; pg < (lk + d.page_size - 1) / d.page_size; ++pg) {
        PYATTN_CHECK_ARG(row[pg] >= 0 && row[pg] < d.num_pages, "kvcache_attention", "block_table",
                         "expected page indices in [0, ", d.num_pages, "), got block_table[", b, ", ", pg, "] = ",
                         row[pg], ", not a page of the cache");
      }
    }
  }
  return longest;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kvcache_attention_fwd_cpu(
    const at::Tensor& query, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const c10::optional<at::Tensor>& key, const c10::optional<at::Tensor>& value,
    const c10::optional<at::Tensor>& block_table, const c10::optional<at::Tensor>& sinks,
    const c10::optional<at::Tensor>& alibi_slopes, bool causal, double scale, int64_t window_left,
    int64_t window_right, double softcap, int64_t num_splits) {
  const KVCacheDims d =
      check_kvcache_inputs(query, k_cache, v_cache, cache_seqlens, key, value, block_table, sinks, alibi_slopes);
  PYATTN_CHECK_ARG(query.device().is_cpu(), "kvcache_attention (cpu)", "query", "expected CPU tensors, got ",
                   query.device());
  const bool append = key.has_value();
  const int64_t longest = check_lengths(d, cache_seqlens, append, block_table);
  const int64_t splits = resolve_splits(d, num_splits, longest, at::get_num_threads(), kMinSplitKeys);
  const auto acc = acc_type(query.scalar_type());
  at::Tensor out = at::empty({d.B, d.Hq, d.Lq, d.Dv}, query.options());
  at::Tensor lse = at::empty({d.B, d.Hq, d.Lq}, query.options().dtype(acc));
  if (out.numel() == 0 && !append) return {out, lse};
  const at::Tensor q = query.contiguous();
  const at::Tensor sl = cache_seqlens.contiguous();
  at::Tensor kn, vn, bt, sk, al;
  if (append) {
    kn = key->contiguous();
    vn = value->contiguous();
  }
  if (d.paged) bt = block_table->contiguous();
  if (sinks.has_value()) sk = sinks->to(acc).contiguous();
  if (alibi_slopes.has_value()) al = alibi_slopes->to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "kvcache_attention_fwd_cpu", [&] {
    using T = cpu::acc_t<scalar_t>;
    cpu::KVCacheParams<scalar_t> p;
    p.q = q.data_ptr<scalar_t>();
    p.k_cache = k_cache.data_ptr<scalar_t>();
    p.v_cache = v_cache.data_ptr<scalar_t>();
    for (int i = 0; i < 3; ++i) {
      p.k_stride[i] = k_cache.stride(i);
      p.v_stride[i] = v_cache.stride(i);
    }
    p.k_new = append ? kn.data_ptr<scalar_t>() : nullptr;
    p.v_new = append ? vn.data_ptr<scalar_t>() : nullptr;
    p.cache_seqlens = sl.data_ptr<int32_t>();
    p.block_table = d.paged ? bt.data_ptr<int32_t>() : nullptr;
    p.bt_stride = d.paged ? bt.size(1) : 0;
    p.page_size = d.page_size;
    p.sinks = sk.defined() ? sk.data_ptr<T>() : nullptr;
    p.alibi = al.defined() ? al.data_ptr<T>() : nullptr;
    p.alibi_b_stride = al.defined() && al.dim() == 2 ? d.Hq : 0;
    p.B = d.B;
    p.Hq = d.Hq;
    p.Hkv = d.Hkv;
    p.Lq = d.Lq;
    p.D = d.D;
    p.Dv = d.Dv;
    p.scale = static_cast<T>(scale);
    p.softcap = static_cast<T>(softcap);
    p.causal = causal;
    p.window_left = window_left;
    p.window_right = window_right;
    p.num_splits = splits;
    const cpu::KVCacheOut<scalar_t> o{out.data_ptr<scalar_t>(), lse.data_ptr<T>()};
    PYATTN_CPU_DISPATCH(kvcache_attention_kernel, p, o);
  });
  return {out, lse};
}

}  // namespace pyattn

TORCH_LIBRARY_IMPL(pyattn, CPU, m) {
  m.impl("kvcache_attention_fwd", &pyattn::kvcache_attention_fwd_cpu);
}
