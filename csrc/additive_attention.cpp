// pyattn::additive_attention_{fwd,bwd} for CPU tensors: argument checks, allocation, and the
// choice of the kernel build for this CPU's instruction set (csrc/cpu/additive_attention_kernel.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "additive_attention.h"
#include "additive_attention_math.h"
#include "cpu/additive_attention_kernel.h"
#include "cpu/capability.h"

namespace pyattn {

namespace {

// Half inputs (float16 / bfloat16) run the float32 kernel: each input is widened to float32 once
// on entry (O(B T (H + Dv)) work, nothing beside the kernel's O(B Tq Tk H) tanh), every score,
// statistic and sum is float32 (lse float64), and each output is rounded to the input dtype once.
bool is_half(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

at::Tensor widen(const at::Tensor& t) {
  return is_half(t) ? t.to(at::kFloat) : t;
}

c10::optional<at::Tensor> widen(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return t;
  return widen(*t);
}

void check_dtype(const at::Tensor& query) {
  const auto t = query.scalar_type();
  PYATTN_CHECK_ARG(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, "additive_attention (cpu)", "query",
                   "the cpu backend takes float16, bfloat16, float32 or float64, got ", t);
}

template <typename scalar_t>
cpu::AdditiveParams<scalar_t> make_params(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& val, const at::Tensor& v,
    const c10::optional<at::Tensor>& mask, const at::Tensor* out, const at::Tensor* lse) {
  cpu::AdditiveParams<scalar_t> p;
  p.q = q.data_ptr<scalar_t>();
  p.k = k.data_ptr<scalar_t>();
  p.val = val.data_ptr<scalar_t>();
  p.v = v.data_ptr<scalar_t>();
  p.mask = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  p.out = out ? out->data_ptr<scalar_t>() : nullptr;
  p.lse = lse ? lse->data_ptr<double>() : nullptr;
  p.B = q.size(0);
  p.Tq = q.size(1);
  p.H = q.size(2);
  p.Tk = k.size(1);
  p.Dv = val.size(2);
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> additive_attention_fwd_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& v,
    const c10::optional<at::Tensor>& key_padding_mask, bool return_weights) {
  check_additive_attention_inputs(query, key, value, v, key_padding_mask);
  PYATTN_CHECK_ARG(query.device().is_cpu(), "additive_attention (cpu)", "query", "the cpu backend takes CPU tensors, got ", query.device());
  check_dtype(query);
  if (is_half(query)) {
    const auto dtype = query.scalar_type();
    auto [out, lse, weights] = additive_attention_fwd_cpu(widen(query), widen(key), widen(value), widen(v),
                                                          key_padding_mask, return_weights);
    return {out.to(dtype), lse, weights.to(dtype)};
  }
  const auto q = query.contiguous(), k = key.contiguous(), val = value.contiguous(), vv = v.contiguous();
  c10::optional<at::Tensor> mask;
  if (key_padding_mask.has_value()) mask = key_padding_mask->contiguous();

  const int64_t B = q.size(0), Tq = q.size(1), Tk = k.size(1), Dv = val.size(2);
  at::Tensor out = at::empty({B, Tq, Dv}, q.options());
  // float64 on CPU (see cpu/additive_attention_kernel.h)
  at::Tensor lse = at::empty({B, Tq}, q.options().dtype(at::kDouble));
  at::Tensor weights = return_weights ? at::empty({B, Tq, Tk}, q.options()) : at::empty({0}, q.options());
  if (B * Tq == 0) return {out, lse, weights};

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "additive_attention_fwd_cpu", [&] {
    const auto p = make_params<scalar_t>(q, k, val, vv, mask, nullptr, nullptr);
    const cpu::AdditiveFwdOut<scalar_t> o{
        out.data_ptr<scalar_t>(), lse.data_ptr<double>(),
        return_weights ? weights.data_ptr<scalar_t>() : nullptr};
    PYATTN_CPU_DISPATCH(additive_attention_fwd_kernel, p, o);
  });
  return {out, lse, weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> additive_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& v, const c10::optional<at::Tensor>& key_padding_mask,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_weights,
    const c10::optional<at::Tensor>& weights) {
  check_additive_attention_inputs(query, key, value, v, key_padding_mask);
  check_additive_attention_backward_inputs(query, value, grad_out, out, lse, grad_weights, weights);
  check_dtype(query);
  if (is_half(query)) {
    const auto dtype = query.scalar_type();
    auto [dq, dk, dval, dv] = additive_attention_bwd_cpu(
        widen(grad_out), widen(query), widen(key), widen(value), widen(v), key_padding_mask, widen(out),
        lse, widen(grad_weights), widen(weights));
    return {dq.to(dtype), dk.to(dtype), dval.to(dtype), dv.to(dtype)};
  }
  const auto q = query.contiguous(), k = key.contiguous(), val = value.contiguous(), vv = v.contiguous();
  const auto o = out.contiguous(), l = lse.to(at::kDouble).contiguous(), dO = grad_out.contiguous();
  c10::optional<at::Tensor> mask;
  if (key_padding_mask.has_value()) mask = key_padding_mask->contiguous();
  at::Tensor gw, w;
  if (grad_weights.has_value() && grad_weights->defined()) {
    gw = grad_weights->contiguous();
    w = weights->contiguous();
  }

  const int64_t B = q.size(0), Tq = q.size(1), Tk = k.size(1), H = q.size(2), Dv = val.size(2);
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::zeros_like(k);
  at::Tensor dval = at::zeros_like(val);
  at::Tensor dv = at::zeros_like(vv);
  if (B * Tq == 0 || Tk == 0) {
    dq.zero_();
    return {dq, dk, dval, dv};
  }
  const int64_t chunks = additive::backward_chunks(B, Tq);
  at::Tensor dk_partial = at::empty({B * (chunks - 1), Tk, H}, q.options());
  at::Tensor dval_partial = at::empty({B * (chunks - 1), Tk, Dv}, q.options());
  at::Tensor dv_partial = at::empty({B * chunks, H}, q.options());

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "additive_attention_bwd_cpu", [&] {
    const auto p = make_params<scalar_t>(q, k, val, vv, mask, &o, &l);
    const cpu::AdditiveBwdArgs<scalar_t> a{
        dO.data_ptr<scalar_t>(),
        gw.defined() ? gw.data_ptr<scalar_t>() : nullptr,
        w.defined() ? w.data_ptr<scalar_t>() : nullptr,
        dq.data_ptr<scalar_t>(),
        dk.data_ptr<scalar_t>(),
        dval.data_ptr<scalar_t>(),
        dv.data_ptr<scalar_t>(),
        dk_partial.data_ptr<scalar_t>(),
        dval_partial.data_ptr<scalar_t>(),
        dv_partial.data_ptr<scalar_t>(),
        chunks};
    PYATTN_CPU_DISPATCH(additive_attention_bwd_kernel, p, a);
  });
  return {dq, dk, dval, dv};
}

}  // namespace pyattn

TORCH_LIBRARY_IMPL(pyattn, CPU, m) {
  m.impl("additive_attention_fwd", &pyattn::additive_attention_fwd_cpu);
  m.impl("additive_attention_bwd", &pyattn::additive_attention_bwd_cpu);
}
