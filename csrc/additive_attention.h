// Host-side checks of pyattn::additive_attention_{fwd,bwd}, shared by the CPU and CUDA
// implementations. The Python layer (pyattn/ops/additive_attention.py) validates first and gives
// the friendlier messages; these keep a direct torch.ops call from reaching a kernel with inputs
// it cannot take.
#pragma once

#include <ATen/ATen.h>

#include "common.h"

namespace pyattn {

inline void check_additive_attention_inputs(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& v,
    const c10::optional<at::Tensor>& key_padding_mask) {
  PYATTN_CHECK_ARG(query.dim() == 3, "additive_attention", "query", "expected (B, Tq, H), got ", query.sizes());
  PYATTN_CHECK_ARG(key.dim() == 3, "additive_attention", "key", "expected (B, Tk, H), got ", key.sizes());
  PYATTN_CHECK_ARG(value.dim() == 3, "additive_attention", "value", "expected (B, Tk, Dv), got ", value.sizes());
  PYATTN_CHECK_ARG(v.dim() == 1, "additive_attention", "v", "expected (H,), got ", v.sizes());
  const int64_t B = query.size(0), H = query.size(2), Tk = key.size(1);
  PYATTN_CHECK_ARG(key.size(0) == B && key.size(2) == H, "additive_attention", "key", "expected (B=", B, ", Tk, H=", H, "), got ", key.sizes());
  PYATTN_CHECK_ARG(value.size(0) == B && value.size(1) == Tk, "additive_attention", "value", "expected (B=", B, ", Tk=", Tk, ", Dv), got ", value.sizes());
  PYATTN_CHECK_ARG(v.size(0) == H, "additive_attention", "v", "expected length H=", H, ", got ", v.sizes());
  for (const at::Tensor* t : {&key, &value, &v}) {
    PYATTN_CHECK_ARG(t->scalar_type() == query.scalar_type(), "additive_attention", "key/value/v", "expected dtype ", query.scalar_type(), ", got ", t->scalar_type());
    PYATTN_CHECK_ARG(t->device() == query.device(), "additive_attention", "key/value/v", "expected device ", query.device(), ", got ", t->device());
  }
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    PYATTN_CHECK_ARG(m.scalar_type() == at::kBool, "additive_attention", "key_padding_mask", "expected bool, got ", m.scalar_type());
    PYATTN_CHECK_ARG(m.dim() == 2 && m.size(0) == B && m.size(1) == Tk, "additive_attention", "key_padding_mask",
                     "expected (B=", B, ", Tk=", Tk, "), got ", m.sizes());
    PYATTN_CHECK_ARG(m.device() == query.device(), "additive_attention", "key_padding_mask", "expected device ", query.device(), ", got ", m.device());
  }
}

inline void check_additive_attention_backward_inputs(
    const at::Tensor& query, const at::Tensor& value, const at::Tensor& grad_out,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_weights,
    const c10::optional<at::Tensor>& weights) {
  const int64_t B = query.size(0), Tq = query.size(1), Dv = value.size(2), Tk = value.size(1);
  PYATTN_CHECK_ARG(grad_out.sizes() == at::IntArrayRef({B, Tq, Dv}), "additive_attention", "grad_out", "expected (", B, ", ", Tq, ", ", Dv, "), got ", grad_out.sizes());
  PYATTN_CHECK_ARG(out.sizes() == grad_out.sizes(), "additive_attention", "out", "expected ", grad_out.sizes(), ", got ", out.sizes());
  PYATTN_CHECK_ARG(lse.sizes() == at::IntArrayRef({B, Tq}), "additive_attention", "lse", "expected (", B, ", ", Tq, "), got ", lse.sizes());
  const bool has_gw = grad_weights.has_value() && grad_weights->defined();
  const bool has_w = weights.has_value() && weights->defined();
  PYATTN_CHECK_ARG(has_gw == has_w, "additive_attention", "grad_weights", "grad_weights and weights must be given together");
  if (has_gw) {
    PYATTN_CHECK_ARG(grad_weights->sizes() == at::IntArrayRef({B, Tq, Tk}), "additive_attention", "grad_weights", "expected (", B, ", ", Tq, ", ", Tk, "), got ", grad_weights->sizes());
    PYATTN_CHECK_ARG(weights->sizes() == grad_weights->sizes(), "additive_attention", "weights", "expected ", grad_weights->sizes(), ", got ", weights->sizes());
  }
}

}  // namespace pyattn
