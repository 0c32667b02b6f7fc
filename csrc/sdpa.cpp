// pyattn::sdpa_{fwd,bwd} for CPU tensors: memory-safety guards, allocation, Delta, and the
// choice of the kernel build for this CPU's instruction set (csrc/cpu/sdpa_kernel.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "cpu/capability.h"
#include "cpu/sdpa_kernel.h"
#include "sdpa.h"
#include "sdpa_math.h"

namespace pyattn {

namespace {

// float32 statistics and accumulators for half inputs; float32 / float64 keep their own.
at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 ? at::kFloat : t;
}

void check_cpu(const at::Tensor& query) {
  PYATTN_CHECK_ARG(query.device().is_cpu(), "sdpa (cpu)", "query", "expected CPU tensors, got ", query.device());
}

template <typename T>
cpu::FlashParams<T> make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& mask, double dropout_p, int64_t causal,
                                double scale, int64_t seed, int64_t offset, int64_t window_left,
                                int64_t window_right, double softcap, const at::Tensor& sinks,
                                const at::Tensor& alibi) {
  cpu::FlashParams<T> p;
  p.q = q.data_ptr<T>();
  p.k = k.data_ptr<T>();
  p.v = v.data_ptr<T>();
  p.mask_kind = flash::kNoMask;
  p.bool_mask = nullptr;
  p.add_mask = nullptr;
  p.add_mask_float = nullptr;
  for (int d = 0; d < 4; ++d) p.mask_stride[d] = 0;
  if (mask.defined()) {
    if (mask.scalar_type() == at::kBool) {
      p.mask_kind = flash::kBoolMask;
      p.bool_mask = mask.data_ptr<bool>();
    } else {
      p.mask_kind = flash::kAddMask;
      const bool half = !std::is_same_v<T, cpu::acc_t<T>>;
      PYATTN_CHECK_ARG(mask.scalar_type() == q.scalar_type() || (half && mask.scalar_type() == at::kFloat),
                       "sdpa (cpu)", "attn_mask", "expected bool or query's dtype", half ? " or float32" : "",
                       ", got ", mask.scalar_type());
      if (mask.scalar_type() == q.scalar_type()) {
        p.add_mask = mask.data_ptr<T>();
      } else {
        p.add_mask_float = mask.data_ptr<float>();
      }
    }
    for (int d = 0; d < 4; ++d) p.mask_stride[d] = mask.stride(d);
  }
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Lq = q.size(2);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.Lk = k.size(2);
  p.Dv = v.size(3);
  p.scale = static_cast<cpu::acc_t<T>>(scale);
  p.causal = causal != flash::kNoCausal;
  p.causal_off = flash::causal_offset(static_cast<int>(causal), p.Lq, p.Lk);
  p.dropout_p = dropout_p;
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  p.drop_bh0 = 0;
  p.drop_lq = p.Lq;
  p.drop_lk = p.Lk;
  using acc = cpu::acc_t<T>;
  cpu::set_variants(p, causal, window_left, window_right, softcap,
                    sinks.defined() ? sinks.data_ptr<acc>() : nullptr,
                    alibi.defined() ? alibi.data_ptr<acc>() : nullptr,
                    alibi.defined() && alibi.numel() != p.Hq ? p.Hq : 0);
  cpu::set_dense_layout(p);  // q, k, v and out are contiguous (B, H, L, D)
  return p;
}

// The mask as a (B, Hq, Lq, Lk) view whose broadcast dims have stride 0 (no copy); a mask with
// a negative or odd stride is made contiguous first.
at::Tensor mask_view(const c10::optional<at::Tensor>& attn_mask, const at::Tensor& q,
                     const at::Tensor& k) {
  if (!attn_mask.has_value() || !attn_mask->defined()) return at::Tensor();
  at::Tensor m = attn_mask->expand({q.size(0), q.size(1), q.size(2), k.size(2)});
  for (int d = 0; d < 4; ++d) {
    if (m.stride(d) < 0) return m.contiguous();
  }
  return m;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sdpa_fwd_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const c10::optional<at::Tensor>& attn_mask, double dropout_p, int64_t causal, double scale,
    int64_t seed, int64_t offset, int64_t window_left, int64_t window_right, double softcap,
    const c10::optional<at::Tensor>& sinks_opt, const c10::optional<at::Tensor>& alibi_opt) {
  check_sdpa_inputs(query, key, value, attn_mask, causal);
  check_cpu(query);
  const at::ScalarType acc_dtype = acc_type(query.scalar_type());
  const at::Tensor sinks = variant_tensor(sinks_opt, query, acc_dtype, query.size(0), query.size(1), false, "sinks");
  const at::Tensor alibi =
      variant_tensor(alibi_opt, query, acc_dtype, query.size(0), query.size(1), true, "alibi_slopes");
  const auto q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  const at::Tensor mask = mask_view(attn_mask, q, k);
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), Dv = v.size(3);
  at::Tensor out = at::empty({B, Hq, Lq, Dv}, q.options());
  at::Tensor lse = at::empty({B, Hq, Lq}, q.options().dtype(acc_type(q.scalar_type())));
  if (lse.numel() == 0) return {out, lse};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sdpa_fwd_cpu", [&] {
    using acc = cpu::acc_t<scalar_t>;
    const auto p =
        make_params<scalar_t>(q, k, v, mask, dropout_p, causal, scale, seed, offset, window_left,
                              window_right, softcap, sinks, alibi);
    const cpu::FlashFwdOut<scalar_t> o{out.data_ptr<scalar_t>(), lse.data_ptr<acc>()};
    PYATTN_CPU_DISPATCH(sdpa_fwd_kernel, p, o);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const c10::optional<at::Tensor>& attn_mask, const at::Tensor& out,
    const at::Tensor& lse, double dropout_p, int64_t causal, double scale, int64_t seed,
    int64_t offset, int64_t window_left, int64_t window_right, double softcap,
    const c10::optional<at::Tensor>& alibi_opt) {
  check_sdpa_inputs(query, key, value, attn_mask, causal);
  check_sdpa_backward_inputs(query, value, grad_out, out, lse);
  check_cpu(query);
  const at::Tensor alibi = variant_tensor(alibi_opt, query, acc_type(query.scalar_type()), query.size(0),
                                          query.size(1), true, "alibi_slopes");
  const auto q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  const auto dO = grad_out.contiguous();
  const at::ScalarType acc_dtype = acc_type(q.scalar_type());
  const auto l = lse.to(acc_dtype).contiguous();
  const at::Tensor mask = mask_view(attn_mask, q, k);
  const auto dtype = q.scalar_type();
  if (q.size(0) * q.size(1) * q.size(2) == 0 || k.size(2) == 0) {
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()),
            at::zeros(v.sizes(), v.options())};
  }
  // float32 / float64: Delta_i = dO_i . O_i here, and the gradients accumulate in place. Half
  // inputs: the kernel computes Delta from out and writes the rounded gradients itself, from
  // per-task float32 blocks (cpu::FlashBwdArgs::dq_out): no float32 gradient tensors.
  const bool half = at::isReducedFloatingType(dtype);
  const at::Tensor o = half ? out.to(dtype).contiguous() : out;
  const at::Tensor delta =
      half ? at::Tensor() : (dO.to(acc_dtype) * out.to(acc_dtype)).sum(-1).contiguous();
  const auto grad_opts = half ? q.options() : q.options().dtype(acc_dtype);
  at::Tensor dq = half ? at::empty(q.sizes(), grad_opts) : at::zeros(q.sizes(), grad_opts);
  at::Tensor dk = half ? at::empty(k.sizes(), grad_opts) : at::zeros(k.sizes(), grad_opts);
  at::Tensor dv = half ? at::empty(v.sizes(), grad_opts) : at::zeros(v.sizes(), grad_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sdpa_bwd_cpu", [&] {
    using acc = cpu::acc_t<scalar_t>;
    const auto p =
        make_params<scalar_t>(q, k, v, mask, dropout_p, causal, scale, seed, offset, window_left,
                              window_right, softcap, at::Tensor(), alibi);
    cpu::FlashBwdArgs<scalar_t> a{dO.data_ptr<scalar_t>(), l.data_ptr<acc>(), nullptr,
                                  nullptr, nullptr, nullptr};
    if constexpr (std::is_same_v<scalar_t, acc>) {
      a.delta = delta.data_ptr<acc>();
      a.dq = dq.data_ptr<acc>();
      a.dk = dk.data_ptr<acc>();
      a.dv = dv.data_ptr<acc>();
    } else {
      a.out = o.data_ptr<scalar_t>();
      a.dq_out = dq.data_ptr<scalar_t>();
      a.dk_out = dk.data_ptr<scalar_t>();
      a.dv_out = dv.data_ptr<scalar_t>();
    }
    PYATTN_CPU_DISPATCH(sdpa_bwd_kernel, p, a);
  });
  return {dq, dk, dv};
}

}  // namespace pyattn

TORCH_LIBRARY_IMPL(pyattn, CPU, m) {
  m.impl("sdpa_fwd", &pyattn::sdpa_fwd_cpu);
  m.impl("sdpa_bwd", &pyattn::sdpa_bwd_cpu);
}
