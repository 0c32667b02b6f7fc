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
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "pyattn::sdpa: query, key, value must be 4-D (B, H, L, D)");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3) && v.size(0) == q.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2),
              "pyattn::sdpa: key ", k.sizes(), " / value ", v.sizes(), " do not match query ", q.sizes());
  TORCH_CHECK(k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0, "pyattn::sdpa: Hq must be a multiple of Hkv");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() && k.device() == q.device() && v.device() == q.device(),
              "pyattn::sdpa: query, key, value must share dtype and device");
  TORCH_CHECK(causal >= 0 && causal <= 2, "pyattn::sdpa: causal must be 0, 1 or 2, got ", causal);
  TORCH_CHECK(!attn_mask.has_value() || (attn_mask->device() == q.device() && at::is_expandable_to(attn_mask->sizes(), {q.size(0), q.size(1), q.size(2), k.size(2)})),
              "pyattn::sdpa: attn_mask must broadcast to (B, Hq, Lq, Lk) on query's device");
}

// The CUDA flash kernels do not fuse the attention variants yet (pyattn/_backend.py sends such
// calls elsewhere); a direct torch.ops call with one is refused, never computed without it.
inline void check_no_variants(int64_t window_left, int64_t window_right, double softcap,
                              const c10::optional<at::Tensor>& sinks,
                              const c10::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK(window_left == -1 && window_right == -1 && softcap == 0.0 && !sinks.has_value() && !alibi_slopes.has_value(),
              "pyattn::sdpa (cuda): the attention variants (window, softcap, sinks, ALiBi) are not fused in the CUDA kernels yet");
}

// The variants' tensors as the CPU kernels read them: sinks (Hq,) and alibi_slopes (Hq,) or
// (B, Hq) in the accumulation dtype, contiguous; undefined when absent.
inline at::Tensor variant_tensor(const c10::optional<at::Tensor>& t, const at::Tensor& q, at::ScalarType acc,
                                 int64_t B, int64_t Hq, bool per_batch, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->device() == q.device() && (t->numel() == Hq || (per_batch && t->numel() == B * Hq)),
              "pyattn::sdpa: ", name, " must be (Hq,)", per_batch ? " or (B, Hq)" : "", " on query's device");
  return t->to(acc).contiguous();
}

inline void check_sdpa_backward_inputs(const at::Tensor& q, const at::Tensor& v, const at::Tensor& grad_out,
                                       const at::Tensor& out, const at::Tensor& lse) {
  const std::vector<int64_t> o{q.size(0), q.size(1), q.size(2), v.size(3)}, l{q.size(0), q.size(1), q.size(2)};
  TORCH_CHECK(grad_out.sizes() == c10::IntArrayRef(o) && out.sizes() == c10::IntArrayRef(o) && lse.sizes() == c10::IntArrayRef(l),
              "pyattn::sdpa_bwd: grad_out/out must be (B, Hq, Lq, Dv) and lse (B, Hq, Lq)");
  TORCH_CHECK(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
              "pyattn::sdpa_bwd: grad_out, out, lse must be on query's device");
}

}  // namespace pyattn
