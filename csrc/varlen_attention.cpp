// pyattn::varlen_attention_{fwd,bwd} for CPU tensors: packed variable-length sequences run
// through the fused CPU sdpa kernels (csrc/cpu/sdpa_kernel.cpp) one sequence at a time, as a
// batch of one, so a sequence costs its own Lq_b x Lk_b tiles and nothing is padded. The
// packed (total, H, D) rows of a sequence are copied to the kernels' contiguous (1, H, L, D)
// layout and back (O(L H D) next to the O(L^2 H D) of the attention). Dropout counters follow
// the padded (B, Hq, max_seqlen_q, max_seqlen_k) layout through FlashParams::drop_* (see
// docs/design.md, "Variable-length attention").
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "cpu/capability.h"
#include "cpu/sdpa_kernel.h"
#include "sdpa_math.h"
#include "varlen_attention.h"

namespace pyattn {

namespace {

// The sequence bounds, checked so that every row range lies inside the packed tensors.
std::vector<int32_t> seq_bounds(const at::Tensor& cu, int64_t total, const char* name) {
  const at::Tensor c = cu.contiguous();
  const int32_t* d = c.data_ptr<int32_t>();
  std::vector<int32_t> out(d, d + c.numel());
  TORCH_CHECK(out[0] == 0, "pyattn::varlen_attention: ", name, "[0] must be 0, got ", out[0]);
  for (size_t b = 1; b < out.size(); ++b) {
    TORCH_CHECK(out[b] >= out[b - 1], "pyattn::varlen_attention: ", name, " must be non-decreasing");
  }
  TORCH_CHECK(out.back() == total, "pyattn::varlen_attention: ", name, "[-1] = ", out.back(),
              " must be the packed length ", total);
  return out;
}

// (1, H, L, D) contiguous copy of the packed rows [start, start + len) of t (total, H, D).
at::Tensor rows(const at::Tensor& t, int64_t start, int64_t len) {
  return t.narrow(0, start, len).transpose(0, 1).unsqueeze(0).contiguous();
}

template <typename T>
cpu::FlashParams<T> seq_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t b,
                               int64_t max_q, int64_t max_k, double dropout_p, int64_t causal,
                               double scale, int64_t seed, int64_t offset) {
  cpu::FlashParams<T> p;
  p.q = q.data_ptr<T>();
  p.k = k.data_ptr<T>();
  p.v = v.data_ptr<T>();
  p.mask_kind = flash::kNoMask;
  p.bool_mask = nullptr;
  p.add_mask = nullptr;
  for (int d = 0; d < 4; ++d) p.mask_stride[d] = 0;
  p.B = 1;
  p.Hq = q.size(1);
  p.Lq = q.size(2);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.Lk = k.size(2);
  p.Dv = v.size(3);
  p.scale = static_cast<T>(scale);
  p.causal = causal != flash::kNoCausal;
  // per sequence: lower-right ends the diagonal at the sequence's own last key
  p.causal_off = flash::causal_offset(static_cast<int>(causal), p.Lq, p.Lk);
  p.dropout_p = dropout_p;
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  // the counters of sequence b's slice of the padded (B, Hq, max_q, max_k) score tensor
  p.drop_bh0 = b * p.Hq;
  p.drop_lq = max_q;
  p.drop_lk = max_k;
  return p;
}

// The dtypes of the CPU kernels: extend here (and in pyattn/_backend.py DTYPES["cpu"]) when
// csrc/cpu/sdpa_kernel.h gains more overloads (float16/bfloat16).
#define PYATTN_VARLEN_DISPATCH(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES(TYPE, NAME, __VA_ARGS__)

}  // namespace

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p,
    int64_t causal, double scale, int64_t seed, int64_t offset) {
  check_varlen_inputs(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal);
  TORCH_CHECK(query.device().is_cpu(), "pyattn::varlen_attention (cpu): expected CPU tensors, got ",
              query.device());
  const auto cq = seq_bounds(cu_seqlens_q, query.size(0), "cu_seqlens_q");
  const auto ck = seq_bounds(cu_seqlens_k, key.size(0), "cu_seqlens_k");
  const int64_t total_q = query.size(0), Hq = query.size(1), Dv = value.size(2);
  // rows with no key keep output 0 and lse +inf (zero gradients in the backward)
  at::Tensor out = at::zeros({total_q, Hq, Dv}, query.options());
  at::Tensor lse = at::full({Hq, total_q}, std::numeric_limits<double>::infinity(), query.options());
  for (size_t b = 0; b + 1 < cq.size(); ++b) {
    const int64_t q0 = cq[b], lq = cq[b + 1] - cq[b], k0 = ck[b], lk = ck[b + 1] - ck[b];
    if (lq == 0 || lk == 0 || Hq == 0 || Dv == 0) continue;
    TORCH_CHECK(lq <= max_seqlen_q && lk <= max_seqlen_k,
                "pyattn::varlen_attention: a sequence is longer than max_seqlen_q/k");
    const at::Tensor q = rows(query, q0, lq), k = rows(key, k0, lk), v = rows(value, k0, lk);
    at::Tensor o = at::empty({1, Hq, lq, Dv}, query.options());
    at::Tensor l = at::empty({1, Hq, lq}, query.options());
    PYATTN_VARLEN_DISPATCH(q.scalar_type(), "varlen_attention_fwd_cpu", [&] {
      const auto p = seq_params<scalar_t>(q, k, v, b, max_seqlen_q, max_seqlen_k, dropout_p, causal, scale,
                                          seed, offset);
      const cpu::FlashFwdOut<scalar_t> fo{o.data_ptr<scalar_t>(), l.data_ptr<scalar_t>()};
      PYATTN_CPU_DISPATCH(sdpa_fwd_kernel, p, fo);
    });
    out.narrow(0, q0, lq).copy_(o[0].transpose(0, 1));
    lse.narrow(1, q0, lq).copy_(l[0]);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, const at::Tensor& out,
    const at::Tensor& lse, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, int64_t causal,
    double scale, int64_t seed, int64_t offset) {
  check_varlen_inputs(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal);
  check_varlen_backward_inputs(query, value, grad_out, out, lse);
  TORCH_CHECK(query.device().is_cpu(), "pyattn::varlen_attention (cpu): expected CPU tensors, got ",
              query.device());
  const auto cq = seq_bounds(cu_seqlens_q, query.size(0), "cu_seqlens_q");
  const auto ck = seq_bounds(cu_seqlens_k, key.size(0), "cu_seqlens_k");
  const int64_t Hq = query.size(1), Dv = value.size(2);
  const auto dt = query.scalar_type();
  at::Tensor dq = at::zeros(query.sizes(), query.options());
  at::Tensor dk = at::zeros(key.sizes(), key.options());
  at::Tensor dv = at::zeros(value.sizes(), value.options());
  // Delta_i = dO_i . O_i for every packed row: (total_q, Hq)
  const at::Tensor delta_all = (grad_out.to(dt) * out.to(dt)).sum(-1);
  for (size_t b = 0; b + 1 < cq.size(); ++b) {
    const int64_t q0 = cq[b], lq = cq[b + 1] - cq[b], k0 = ck[b], lk = ck[b + 1] - ck[b];
    if (lq == 0 || lk == 0 || Hq == 0 || Dv == 0 || query.size(2) == 0) continue;
    TORCH_CHECK(lq <= max_seqlen_q && lk <= max_seqlen_k,
                "pyattn::varlen_attention: a sequence is longer than max_seqlen_q/k");
    const at::Tensor q = rows(query, q0, lq), k = rows(key, k0, lk), v = rows(value, k0, lk);
    const at::Tensor dO = rows(grad_out.to(dt), q0, lq);
    const at::Tensor l = lse.narrow(1, q0, lq).to(dt).unsqueeze(0).contiguous();       // (1, Hq, lq)
    const at::Tensor delta = delta_all.narrow(0, q0, lq).t().unsqueeze(0).contiguous();  // (1, Hq, lq)
    at::Tensor gq = at::zeros_like(q), gk = at::zeros_like(k), gv = at::zeros_like(v);
    PYATTN_VARLEN_DISPATCH(dt, "varlen_attention_bwd_cpu", [&] {
      const auto p = seq_params<scalar_t>(q, k, v, b, max_seqlen_q, max_seqlen_k, dropout_p, causal, scale,
                                          seed, offset);
      const cpu::FlashBwdArgs<scalar_t> a{dO.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(),
                                          delta.data_ptr<scalar_t>(), gq.data_ptr<scalar_t>(),
                                          gk.data_ptr<scalar_t>(), gv.data_ptr<scalar_t>()};
      PYATTN_CPU_DISPATCH(sdpa_bwd_kernel, p, a);
    });
    dq.narrow(0, q0, lq).copy_(gq[0].transpose(0, 1));
    dk.narrow(0, k0, lk).copy_(gk[0].transpose(0, 1));
    dv.narrow(0, k0, lk).copy_(gv[0].transpose(0, 1));
  }
  return {dq, dk, dv};
}

}  // namespace pyattn

TORCH_LIBRARY_IMPL(pyattn, CPU, m) {
  m.impl("varlen_attention_fwd", &pyattn::varlen_attention_fwd_cpu);
  m.impl("varlen_attention_bwd", &pyattn::varlen_attention_bwd_cpu);
}
