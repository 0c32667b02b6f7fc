// pyattn::sdpa_{fwd,bwd} for CUDA tensors: fused scaled-dot-product attention. The kernels and
// their structure are in flash.cuh (shared with varlen_attention.cu); this file is the host
// code of the dense (B, H, L, D) op.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "flash.cuh"

namespace pyattn {
namespace flash_cuda {

std::tuple<at::Tensor, at::Tensor> sdpa_fwd_cuda(const at::Tensor& query, const at::Tensor& key,
                                                            const at::Tensor& value,
                                                            const c10::optional<at::Tensor>& attn_mask,
                                                            double dropout_p, int64_t causal, double scale,
                                                            int64_t seed, int64_t offset, int64_t window_left,
                                                            int64_t window_right, double softcap,
                                                            const c10::optional<at::Tensor>& sinks,
                                                            const c10::optional<at::Tensor>& alibi_slopes) {
  check_inputs(query, key, value, attn_mask, causal);
  const at::cuda::OptionalCUDAGuard guard(query.device());
  const auto q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  at::Tensor mask_holder, sinks_holder, alibi_holder;
  Params p = make_params(q, k, v, attn_mask, dropout_p, causal, scale, seed, offset, mask_holder);
  const bool var = set_variants(p, q, causal, window_left, window_right, softcap, sinks, alibi_slopes, p.B,
                                sinks_holder, alibi_holder, "sdpa (cuda)");
  at::Tensor out = at::empty({p.B, p.Hq, p.Lq, p.Dv}, q.options());
  at::Tensor lse = at::empty({p.B, p.Hq, p.Lq}, q.options().dtype(at::kFloat));
  if (p.B * p.Hq * p.Lq == 0) return {out, lse};
  // no key at all: every row is empty (with sinks the kernel runs: lse = the sink, zeros)
  if (p.Lk == 0 && p.sinks == nullptr) {
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.vec_ok = vec_ok(p, q.element_size(), {p.q, p.k, p.v});
  dispatch(q.scalar_type(), std::max(p.D, p.Dv), [&](auto tag, auto dp) {
    using T = typename decltype(tag)::type;
    constexpr int Dp = decltype(dp)::value;
    using Tl = Tiles<Kernel::kFwd, T, Dp>;
    p.n_blocks = ceil_div(p.Lq, Tl::BM);
    launch(var ? sdpa_fwd_kernel<T, Dp, true> : sdpa_fwd_kernel<T, Dp, false>, smem_bytes<Kernel::kFwd, T, Dp>(),
           p.n_blocks * p.B * p.Hq, p, "sdpa_fwd_kernel");
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const c10::optional<at::Tensor>& attn_mask, const at::Tensor& out, const at::Tensor& lse, double dropout_p,
    int64_t causal, double scale, int64_t seed, int64_t offset, int64_t window_left, int64_t window_right,
    double softcap, const c10::optional<at::Tensor>& alibi_slopes) {
  check_inputs(query, key, value, attn_mask, causal);
  check_sdpa_backward_inputs(query, value, grad_out, out, lse);

  const at::cuda::OptionalCUDAGuard guard(query.device());
  const auto q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  // read as T by the kernels: same dtype as query, whatever the caller passed
  const auto dout = grad_out.to(q.scalar_type()).contiguous(), o = out.to(q.scalar_type()).contiguous();
  const auto l = lse.to(at::kFloat).contiguous();
  at::Tensor mask_holder, sinks_holder, alibi_holder;
  Params p = make_params(q, k, v, attn_mask, dropout_p, causal, scale, seed, offset, mask_holder);
  // no sinks: the saved lse includes them already, and their gradient is taken in Python
  const bool var = set_variants(p, q, causal, window_left, window_right, softcap, c10::nullopt, alibi_slopes, p.B,
                                sinks_holder, alibi_holder, "sdpa (cuda)");
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (p.B * p.Hq * p.Lq == 0 || p.Lk == 0) {  // nothing attends: all gradients are zero
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  at::Tensor delta = at::empty({p.B, p.Hq, p.Lq}, q.options().dtype(at::kFloat));
  p.o = o.data_ptr();
  p.dout = dout.data_ptr();
  p.lse_in = l.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.vec_ok = vec_ok(p, q.element_size(), {p.q, p.k, p.v, p.dout});
  dispatch(q.scalar_type(), std::max(p.D, p.Dv), [&](auto tag, auto dp) {
    using T = typename decltype(tag)::type;
    constexpr int Dp = decltype(dp)::value;
    launch(sdpa_bwd_delta_kernel<T>, 0, ceil_div(p.B * p.Hq * p.Lq, kWarps), p,
           "sdpa_bwd_delta_kernel");
    using TKV = Tiles<Kernel::kBwdKV, T, Dp>;
    p.n_blocks = ceil_div(p.Lk, TKV::BN);
    launch(var ? sdpa_bwd_kv_kernel<T, Dp, true> : sdpa_bwd_kv_kernel<T, Dp, false>,
           smem_bytes<Kernel::kBwdKV, T, Dp>(), p.n_blocks * p.B * p.Hkv, p, "sdpa_bwd_kv_kernel");
    using TQ = Tiles<Kernel::kBwdQ, T, Dp>;
    p.n_blocks = ceil_div(p.Lq, TQ::BM);
    launch(var ? sdpa_bwd_q_kernel<T, Dp, true> : sdpa_bwd_q_kernel<T, Dp, false>,
           smem_bytes<Kernel::kBwdQ, T, Dp>(), p.n_blocks * p.B * p.Hq, p, "sdpa_bwd_q_kernel");
  });
  return {dq, dk, dv};
}

}  // namespace flash_cuda
}  // namespace pyattn

TORCH_LIBRARY_IMPL(pyattn, CUDA, m) {
  m.impl("sdpa_fwd", &pyattn::flash_cuda::sdpa_fwd_cuda);
  m.impl("sdpa_bwd", &pyattn::flash_cuda::sdpa_bwd_cuda);
}
