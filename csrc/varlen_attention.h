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
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "pyattn::varlen_attention: query, key, value must be 3-D (total, H, D)");
  TORCH_CHECK(k.size(2) == q.size(2) && v.size(0) == k.size(0) && v.size(1) == k.size(1),
              "pyattn::varlen_attention: key ", k.sizes(), " / value ", v.sizes(), " do not match query ", q.sizes());
  TORCH_CHECK(k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0,
              "pyattn::varlen_attention: Hq must be a multiple of Hkv");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  k.device() == q.device() && v.device() == q.device(),
              "pyattn::varlen_attention: query, key, value must share dtype and device");
  TORCH_CHECK(cu_q.scalar_type() == at::kInt && cu_k.scalar_type() == at::kInt && cu_q.dim() == 1 &&
                  cu_k.dim() == 1 && cu_q.numel() == cu_k.numel() && cu_q.numel() >= 1 &&
                  cu_q.device() == q.device() && cu_k.device() == q.device(),
              "pyattn::varlen_attention: cu_seqlens_q/k must be int32 (B + 1,) on query's device");
  TORCH_CHECK(causal >= 0 && causal <= 2, "pyattn::varlen_attention: causal must be 0, 1 or 2, got ", causal);
  TORCH_CHECK(max_q >= 0 && max_k >= 0, "pyattn::varlen_attention: max_seqlen must be >= 0");
}

inline void check_varlen_backward_inputs(const at::Tensor& q, const at::Tensor& v, const at::Tensor& grad_out,
                                         const at::Tensor& out, const at::Tensor& lse) {
  const std::vector<int64_t> o{q.size(0), q.size(1), v.size(2)}, l{q.size(1), q.size(0)};
  TORCH_CHECK(grad_out.sizes() == c10::IntArrayRef(o) && out.sizes() == c10::IntArrayRef(o) &&
                  lse.sizes() == c10::IntArrayRef(l),
              "pyattn::varlen_attention_bwd: grad_out/out must be (total_q, Hq, Dv) and lse (Hq, total_q)");
  TORCH_CHECK(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
              "pyattn::varlen_attention_bwd: grad_out, out, lse must be on query's device");
}

}  // namespace pyattn
