// Host-side checks of pyattn::sdpa_{fwd,bwd}, shared by the CPU and CUDA
// implementations. The Python layer (pyattn/ops/sdpa.py) validates first and gives the
// friendlier messages; these keep a direct torch.ops call from reaching a kernel with inputs it
// cannot take (out-of-bounds reads through a wrong shape or mask stride).
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "common.h"

namespace pyattn {

inline void check_sdpa_inputs(const at::Tensor& query, const at::Tensor& key,
                                         const at::Tensor& value,
                                         const c10::optional<at::Tensor>& attn_mask,
                                         double dropout_p, bool is_causal, double scale) {
  PYATTN_CHECK_ARG(query.dim() == 4, "query", "expected 4-D (B, Hq, Lq, D), got ", query.sizes());
  PYATTN_CHECK_ARG(key.dim() == 4, "key", "expected 4-D (B, Hkv, Lk, D), got ", key.sizes());
  PYATTN_CHECK_ARG(value.dim() == 4, "value", "expected 4-D (B, Hkv, Lk, Dv), got ", value.sizes());
  const int64_t B = query.size(0), Hq = query.size(1), Lq = query.size(2), D = query.size(3);
  const int64_t Hkv = key.size(1), Lk = key.size(2);
  PYATTN_CHECK_ARG(key.size(0) == B && key.size(3) == D, "key", "expected (B=", B, ", Hkv, Lk, D=", D,
                   "), got ", key.sizes());
  PYATTN_CHECK_ARG(Hkv > 0 && Hq % Hkv == 0, "key", "query heads Hq=", Hq,
                   " must be a multiple of key heads Hkv=", Hkv);
  PYATTN_CHECK_ARG(value.size(0) == B && value.size(1) == Hkv && value.size(2) == Lk, "value",
                   "expected (B=", B, ", Hkv=", Hkv, ", Lk=", Lk, ", Dv), got ", value.sizes());
  PYATTN_CHECK_ARG(query.is_floating_point(), "query", "expected a floating-point tensor, got ",
                   query.scalar_type());
  for (const at::Tensor* t : {&key, &value}) {
    PYATTN_CHECK_ARG(t->scalar_type() == query.scalar_type(), "key/value", "expected dtype ",
                     query.scalar_type(), ", got ", t->scalar_type());
    PYATTN_CHECK_ARG(t->device() == query.device(), "key/value", "expected device ",
                     query.device(), ", got ", t->device());
  }
  if (attn_mask.has_value()) {
    const at::Tensor& m = *attn_mask;
    PYATTN_CHECK_ARG(!is_causal, "attn_mask", "attn_mask and is_causal cannot both be set");
    PYATTN_CHECK_ARG(m.scalar_type() == at::kBool || m.scalar_type() == query.scalar_type(),
                     "attn_mask", "expected bool or ", query.scalar_type(), ", got ",
                     m.scalar_type());
    PYATTN_CHECK_ARG(m.device() == query.device(), "attn_mask", "expected device ",
                     query.device(), ", got ", m.device());
    PYATTN_CHECK_ARG(at::is_expandable_to(m.sizes(), {B, Hq, Lq, Lk}), "attn_mask",
                     "expected a shape broadcastable to (B, Hq, Lq, Lk) = (", B, ", ", Hq, ", ",
                     Lq, ", ", Lk, "), got ", m.sizes());
  }
  PYATTN_CHECK_ARG(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p",
                   "expected a probability in [0, 1), got ", dropout_p);
  PYATTN_CHECK_ARG(scale >= 0.0 && !std::isnan(scale), "scale",
                   "expected a non-negative number, got ", scale);
}

inline void check_sdpa_backward_inputs(const at::Tensor& query, const at::Tensor& value,
                                                  const at::Tensor& grad_out,
                                                  const at::Tensor& out, const at::Tensor& lse) {
  const int64_t B = query.size(0), Hq = query.size(1), Lq = query.size(2), Dv = value.size(3);
  PYATTN_CHECK_ARG(grad_out.sizes() == at::IntArrayRef({B, Hq, Lq, Dv}), "grad_out", "expected (",
                   B, ", ", Hq, ", ", Lq, ", ", Dv, "), got ", grad_out.sizes());
  PYATTN_CHECK_ARG(out.sizes() == grad_out.sizes(), "out", "expected ", grad_out.sizes(), ", got ",
                   out.sizes());
  PYATTN_CHECK_ARG(lse.sizes() == at::IntArrayRef({B, Hq, Lq}), "lse", "expected (", B, ", ", Hq,
                   ", ", Lq, "), got ", lse.sizes());
  for (const at::Tensor* t : {&grad_out, &out, &lse}) {
    PYATTN_CHECK_ARG(t->device() == query.device(), "grad_out/out/lse", "expected device ",
                     query.device(), ", got ", t->device());
  }
  PYATTN_CHECK_ARG(grad_out.scalar_type() == query.scalar_type(), "grad_out", "expected dtype ",
                   query.scalar_type(), ", got ", grad_out.scalar_type());
}

}  // namespace pyattn
