// Memory-safety guards of pyattn::varlen_attention_{fwd,bwd}, shared by the CPU and CUDA
// implementations. Users' inputs are validated once, in Python (pyattn/ops/varlen_attention.py,
// with messages naming the argument); these only keep a direct torch.ops call from reading or
// writing out of bounds through inconsistent shapes.
#pragma once

#include <ATen/ATen.h>

#include "common.h"

namespace pyattn {

inline void check_varlen_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                                int64_t max_k, int64_t causal) {
  PYATTN_CHECK_ARG(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "varlen_attention", "query/key/value",
                   "expected 3-D (total, H, D), got ", q.sizes(), " / ", k.sizes(), " / ", v.sizes());
  PYATTN_CHECK_ARG(k.size(2) == q.size(2) && v.size(0) == k.size(0) && v.size(1) == k.size(1), "varlen_attention",
                   "key/value", "expected (total_k, Hkv, D) / (total_k, Hkv, Dv) for query ", q.sizes(), ", got ",
                   k.sizes(), " / ", v.sizes());
  PYATTN_CHECK_ARG(k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0, "varlen_attention", "key",
                   "expected a number of heads dividing query's ", q.size(1), ", got ", k.size(1));
  PYATTN_CHECK_ARG(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                       k.device() == q.device() && v.device() == q.device(),
                   "varlen_attention", "key/value", "expected query's dtype and device ", q.scalar_type(), " ",
                   q.device(), ", got ", k.scalar_type(), " ", k.device(), " / ", v.scalar_type(), " ", v.device());
  PYATTN_CHECK_ARG(cu_q.scalar_type() == at::kInt && cu_k.scalar_type() == at::kInt && cu_q.dim() == 1 &&
                       cu_k.dim() == 1 && cu_q.numel() == cu_k.numel() && cu_q.numel() >= 1 &&
                       cu_q.device() == q.device() && cu_k.device() == q.device(),
                   "varlen_attention", "cu_seqlens_q/cu_seqlens_k", "expected int32 (B + 1,) on query's device, got ",
                   cu_q.scalar_type(), " ", cu_q.sizes(), " / ", cu_k.scalar_type(), " ", cu_k.sizes());
  PYATTN_CHECK_ARG(causal >= 0 && causal <= 2, "varlen_attention", "causal", "expected 0, 1 or 2, got ", causal);
  PYATTN_CHECK_ARG(max_q >= 0 && max_k >= 0, "varlen_attention", "max_seqlen_q/max_seqlen_k",
                   "expected >= 0, got ", max_q, " / ", max_k);
}

inline void check_varlen_backward_inputs(const at::Tensor& q, const at::Tensor& v, const at::Tensor& grad_out,
                                         const at::Tensor& out, const at::Tensor& lse) {
  const std::vector<int64_t> o{q.size(0), q.size(1), v.size(2)}, l{q.size(1), q.size(0)};
  PYATTN_CHECK_ARG(grad_out.sizes() == c10::IntArrayRef(o) && out.sizes() == c10::IntArrayRef(o) &&
                       lse.sizes() == c10::IntArrayRef(l),
                   "varlen_attention_bwd", "grad_out/out/lse",
                   "expected (total_q, Hq, Dv) / (total_q, Hq, Dv) / (Hq, total_q), got ", grad_out.sizes(), " / ",
                   out.sizes(), " / ", lse.sizes());
  PYATTN_CHECK_ARG(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
                   "varlen_attention_bwd", "grad_out/out/lse", "expected query's device ", q.device(), ", got ",
                   grad_out.device(), " / ", out.device(), " / ", lse.device());
}

}  // namespace pyattn
