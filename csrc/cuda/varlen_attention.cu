// pyattn::varlen_attention_{fwd,bwd} for CUDA tensors: attention over packed variable-length
// sequences, on the flash-attention kernels of flash.cuh (shared with sdpa.cu).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "flash.cuh"
#include "varlen_attention.h"

namespace pyattn {
namespace flash_cuda {

// ---- packed variable-length sequences (pyattn::varlen_attention_*) ---------------------------
// The same kernels with Params::cu_q set: the grid is that of the padded (B, H, max_seqlen)
// batch, each block narrows itself to its sequence (seq_bounds) and a block past the sequence's
// end returns at once, so a sequence costs its own tiles. The packed (total, H, D) tensors are
// laid out (H, total, D) for the kernels (one O(total H D) copy), so a sequence's rows of one
// head are contiguous.

namespace {

at::Tensor heads_first(const at::Tensor& t) {
  return t.transpose(0, 1).contiguous();  // (total, H, D) -> (H, total, D)
}

Params make_varlen_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                          const at::Tensor& cu_k, int64_t max_q, int64_t max_k, double dropout_p, int64_t causal,
                          double scale, int64_t seed, int64_t offset) {
  // q, k, v: (H, total, D) contiguous
  Params p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.B = cu_q.numel() - 1;
  p.Hq = q.size(0);
  p.Hkv = k.size(0);
  p.Lq = max_q;
  p.Lk = max_k;
  p.D = static_cast<int>(q.size(2));
  p.Dv = static_cast<int>(v.size(2));
  p.scale = static_cast<float>(scale);
  p.dropout_p = static_cast<float>(dropout_p);
  p.causal = causal != flash::kNoCausal;
  p.lower_right = causal == flash::kLowerRight;
  p.causal_off = 0;
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  p.drop_lq = max_q;
  p.drop_lk = max_k;
  p.cu_q = cu_q.data_ptr<int32_t>();
  p.cu_k = cu_k.data_ptr<int32_t>();
  p.total_q = q.size(1);
  p.total_k = k.size(1);
  p.mask_kind = flash::kNoMask;
  return p;
}

void check_varlen_cuda(const at::Tensor& query, const at::Tensor& value, const at::Tensor& cu_q,
                       const at::Tensor& cu_k) {
  PYATTN_CHECK_ARG(query.is_cuda(), "varlen_attention (cuda)", "query", "expected CUDA tensors, got ", query.device());
  PYATTN_CHECK_ARG(std::max(query.size(2), value.size(2)) <= kMaxHeadDim, "varlen_attention (cuda)", "query/value",
                   "expected head dims up to ", kMaxHeadDim, ", got D=", query.size(2), ", Dv=", value.size(2));
  PYATTN_CHECK_ARG(cu_q.is_contiguous() && cu_k.is_contiguous(), "varlen_attention (cuda)", "cu_seqlens_q/cu_seqlens_k",
                   "expected contiguous tensors, got strides ", cu_q.strides(), " / ", cu_k.strides());
}

}  // namespace

// cu_seqlens' values are validated in Python (pyattn/ops/varlen_attention.py): reading them
// here would synchronise the stream.
std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, int64_t causal,
    double scale, int64_t seed, int64_t offset, int64_t window_left, int64_t window_right, double softcap,
    const c10::optional<at::Tensor>& sinks, const c10::optional<at::Tensor>& alibi_slopes) {
  check_varlen_inputs(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal);
  check_varlen_cuda(query, value, cu_seqlens_q, cu_seqlens_k);
  const at::cuda::OptionalCUDAGuard guard(query.device());
  const auto q = heads_first(query), k = heads_first(key), v = heads_first(value);
  Params p = make_varlen_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal,
                                scale, seed, offset);
  at::Tensor sinks_holder, alibi_holder;
  // the slopes' batch is the sequences'; the band and ALiBi's Lk - Lq are each sequence's own
  const bool var = set_variants(p, query, causal, window_left, window_right, softcap, sinks, alibi_slopes, p.B,
                                sinks_holder, alibi_holder, "varlen_attention (cuda)");
  at::Tensor out = at::zeros({p.Hq, p.total_q, p.Dv}, q.options());
  at::Tensor lse = at::full({p.Hq, p.total_q}, std::numeric_limits<float>::infinity(), q.options().dtype(at::kFloat));
  // no key at all: rows keep zeros and lse +inf, unless a sink gives them lse = the sink (the kernel)
  if (p.B * p.Hq * p.Lq * p.total_q == 0 || (p.Lk == 0 && p.sinks == nullptr)) {
    return {out.transpose(0, 1).contiguous(), lse};
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
           p.n_blocks * p.B * p.Hq, p, "sdpa_fwd_kernel (varlen)");
  });
  return {out.transpose(0, 1).contiguous(), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, const at::Tensor& out, const at::Tensor& lse,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, int64_t causal, double scale, int64_t seed,
    int64_t offset, int64_t window_left, int64_t window_right, double softcap,
    const c10::optional<at::Tensor>& alibi_slopes) {
  check_varlen_inputs(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal);
  check_varlen_backward_inputs(query, value, grad_out, out, lse);
  check_varlen_cuda(query, value, cu_seqlens_q, cu_seqlens_k);
  const at::cuda::OptionalCUDAGuard guard(query.device());
  const auto q = heads_first(query), k = heads_first(key), v = heads_first(value);
  const auto dout = heads_first(grad_out.to(query.scalar_type())), o = heads_first(out.to(query.scalar_type()));
  const auto l = lse.to(at::kFloat).contiguous();
  Params p = make_varlen_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal,
                                scale, seed, offset);
  at::Tensor sinks_holder, alibi_holder;
  const bool var = set_variants(p, query, causal, window_left, window_right, softcap, c10::nullopt, alibi_slopes, p.B,
                                sinks_holder, alibi_holder, "varlen_attention (cuda)");
  // zeros: rows of sequences without queries or keys get no block
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  auto packed = [](const at::Tensor& g) { return g.transpose(0, 1).contiguous(); };
  if (p.B * p.Hq * p.Lq * p.total_q == 0 || p.Lk == 0 || p.total_k == 0) return {packed(dq), packed(dk), packed(dv)};
  at::Tensor delta = at::empty({p.Hq, p.total_q}, q.options().dtype(at::kFloat));
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
    // Delta over every packed row: the (Hq, total_q) rows as one batch entry
    Params pd = p;
    pd.B = 1;
    pd.Lq = p.total_q;
    launch(sdpa_bwd_delta_kernel<T>, 0, ceil_div(p.Hq * p.total_q, kWarps), pd, "sdpa_bwd_delta_kernel (varlen)");
    using TKV = Tiles<Kernel::kBwdKV, T, Dp>;
    p.n_blocks = ceil_div(p.Lk, TKV::BN);
    launch(var ? sdpa_bwd_kv_kernel<T, Dp, true> : sdpa_bwd_kv_kernel<T, Dp, false>,
           smem_bytes<Kernel::kBwdKV, T, Dp>(), p.n_blocks * p.B * p.Hkv, p, "sdpa_bwd_kv_kernel (varlen)");
    using TQ = Tiles<Kernel::kBwdQ, T, Dp>;
    p.n_blocks = ceil_div(p.Lq, TQ::BM);
    launch(var ? sdpa_bwd_q_kernel<T, Dp, true> : sdpa_bwd_q_kernel<T, Dp, false>,
           smem_bytes<Kernel::kBwdQ, T, Dp>(), p.n_blocks * p.B * p.Hq, p, "sdpa_bwd_q_kernel (varlen)");
  });
  return {packed(dq), packed(dk), packed(dv)};
}

}  // namespace flash_cuda
}  // namespace pyattn

TORCH_LIBRARY_IMPL(pyattn, CUDA, m) {
  m.impl("varlen_attention_fwd", &pyattn::flash_cuda::varlen_attention_fwd_cuda);
  m.impl("varlen_attention_bwd", &pyattn::flash_cuda::varlen_attention_bwd_cuda);
}
