// Memory-safety guards of pyattn::sdpa_{fwd,bwd}, shared by the CPU and CUDA implementations.
// Users' inputs are validated once, in Python (pyattn/ops/sdpa.py, with torch's exception
// classes and messages naming the argument); these only keep a direct torch.ops call from
// reading or writing out of bounds through inconsistent shapes.
#pragma once

#include <ATen/ATen.h>

#include "common.h"

namespace pyattn {

inline void check_sdpa_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const c10::optional<at::Tensor>& attn_mask, int64_t causal) {
  PYATTN_CHECK_ARG(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "sdpa", "query/key/value",
                   "expected 4-D (B, H, L, D), got ", q.sizes(), " / ", k.sizes(), " / ", v.sizes());
  PYATTN_CHECK_ARG(k.size(0) == q.size(0) && k.size(3) == q.size(3) && v.size(0) == q.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2),
                   "sdpa", "key/value", "expected (B, Hkv, Lk, D) / (B, Hkv, Lk, Dv) for query ", q.sizes(), ", got ",
                   k.sizes(), " / ", v.sizes());
  PYATTN_CHECK_ARG(k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0, "sdpa", "key",
                   "expected a number of heads dividing query's ", q.size(1), ", got ", k.size(1));
  PYATTN_CHECK_ARG(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() && k.device() == q.device() && v.device() == q.device(),
                   "sdpa", "key/value", "expected query's dtype and device ", q.scalar_type(), " ", q.device(), ", got ",
                   k.scalar_type(), " ", k.device(), " / ", v.scalar_type(), " ", v.device());
  PYATTN_CHECK_ARG(causal >= 0 && causal <= 2, "sdpa", "causal", "expected 0, 1 or 2, got ", causal);
  PYATTN_CHECK_ARG(!attn_mask.has_value() || (attn_mask->device() == q.device() && at::is_expandable_to(attn_mask->sizes(), {q.size(0), q.size(1), q.size(2), k.size(2)})),
                   "sdpa", "attn_mask", "expected a mask broadcasting to (B, Hq, Lq, Lk) on query's device, got ",
                   attn_mask.has_value() ? attn_mask->sizes() : c10::IntArrayRef{});
}

// The variants' tensors as the kernels read them: sinks (Hq,) and alibi_slopes (Hq,) or
// (B, Hq) in the accumulation dtype, contiguous; undefined when absent.
inline at::Tensor variant_tensor(const c10::optional<at::Tensor>& t, const at::Tensor& q, at::ScalarType acc,
                                 int64_t B, int64_t Hq, bool per_batch, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  PYATTN_CHECK_ARG(t->device() == q.device() && (t->numel() == Hq || (per_batch && t->numel() == B * Hq)), "sdpa",
                   name, "expected (Hq,) = (", Hq, ",)", per_batch ? " or (B, Hq)" : "", " on query's device, got ",
                   t->sizes(), " on ", t->device());
  return t->to(acc).contiguous();
}

inline void check_sdpa_backward_inputs(const at::Tensor& q, const at::Tensor& v, const at::Tensor& grad_out,
                                       const at::Tensor& out, const at::Tensor& lse) {
  const std::vector<int64_t> o{q.size(0), q.size(1), q.size(2), v.size(3)}, l{q.size(0), q.size(1), q.size(2)};
  PYATTN_CHECK_ARG(grad_out.sizes() == c10::IntArrayRef(o) && out.sizes() == c10::IntArrayRef(o) && lse.sizes() == c10::IntArrayRef(l),
                   "sdpa_bwd", "grad_out/out/lse", "expected (B, Hq, Lq, Dv) / (B, Hq, Lq, Dv) / (B, Hq, Lq), got ",
                   grad_out.sizes(), " / ", out.sizes(), " / ", lse.sizes());
  PYATTN_CHECK_ARG(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
                   "sdpa_bwd", "grad_out/out/lse", "expected query's device ", q.device(), ", got ", grad_out.device(),
                   " / ", out.device(), " / ", lse.device());
}

}  // namespace pyattn
