// pyattn::varlen_attention_{fwd,bwd} for CPU tensors: packed variable-length sequences run
// through the fused CPU sdpa kernels (csrc/cpu/sdpa_kernel.cpp), each (sequence, kv-head group)
// unit as a batch of one, so a sequence costs its own Lq_b x Lk_b tiles and nothing is padded
// (run_units says how the units share the threads). A unit is pointer offsets into the packed
// (total, H, D) tensors with their row and head strides (FlashParams' layout): float32/float64
// are read and written in place; half inputs, whose blocks the kernels widen or pack as
// contiguous rows, are moved once per call to heads-first storage (kernel_view). Dropout counters
// follow the padded (B, Hq, max_seqlen_q, max_seqlen_k) layout through FlashParams::drop_* (see
// docs/design.md, "Variable-length attention").
#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/capability.h"
#include "cpu/sdpa_kernel.h"
#include "sdpa_math.h"
#include "sdpa.h"
#include "varlen_attention.h"

namespace pyattn {

namespace {

// The sequence bounds, checked so that every row range lies inside the packed tensors.
std::vector<int32_t> seq_bounds(const at::Tensor& cu, int64_t total, const char* name) {
  const at::Tensor c = cu.contiguous();
  const int32_t* d = c.data_ptr<int32_t>();
  std::vector<int32_t> out(d, d + c.numel());
  PYATTN_CHECK_ARG(out[0] == 0, "varlen_attention", name, "expected ", name, "[0] = 0, got ", out[0]);
  for (size_t b = 1; b < out.size(); ++b) {
    PYATTN_CHECK_ARG(out[b] >= out[b - 1], "varlen_attention", name, "expected non-decreasing cumulative lengths, got ",
                     name, "[", b - 1, "] = ", out[b - 1], " > ", name, "[", b, "] = ", out[b]);
  }
  PYATTN_CHECK_ARG(out.back() == total, "varlen_attention", name, "expected ", name, "[-1] = the packed length ",
                   total, ", got ", out.back());
  return out;
}

bool is_half(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

// The kernels' view of a packed (total, H, D) tensor, still indexed (row, head, d) with unit
// stride on d: the tensor itself for float32/float64 (contiguous, so that the gradients
// allocated contiguous share its layout), heads-first storage for half inputs (dense rows).
at::Tensor kernel_view(const at::Tensor& t) {
  if (is_half(t.scalar_type())) return t.transpose(0, 1).contiguous().transpose(0, 1);
  return t.contiguous();
}

// A zero tensor of shape (total, H, D) with options o, in the layout kernel_view gives inputs
// of dtype `like`.
at::Tensor zeros_like_view(int64_t total, int64_t H, int64_t D, at::ScalarType like, const at::TensorOptions& o) {
  if (is_half(like)) return at::zeros({H, total, D}, o).transpose(0, 1);
  return at::zeros({total, H, D}, o);
}

// Where row r, head h of a (row, head, d) view starts.
template <typename T>
T* at_row(const at::Tensor& t, int64_t r, int64_t h) {
  return t.data_ptr<T>() + r * t.stride(0) + h * t.stride(1);
}

// One unit of work: sequence b (query rows q0 .. q0 + lq, key rows k0 .. k0 + lk of the packed
// tensors) with kv heads [kv0, kv0 + nkv) and their query heads [h0, h0 + nh).
struct Unit {
  int64_t b, q0, lq, k0, lk, kv0, nkv, h0, nh, cost;
};

// The units of a call and how to run them. Many sequences (or heads) against few threads: one
// task per unit of min(Hkv, threads) kv heads, pulled by the threads in order of decreasing cost
// (balanced whatever the length mix, and robust to a thread that starts late), each unit running
// the kernels serially (a parallel_for inside a parallel region runs inline). Few units: one
// sequence at a time with all heads, the kernels spreading each over every thread. A per-sequence
// parallel region for many short sequences costs more in thread wake-ups than the attention
// itself on a busy machine (B=8, L=128: 20x the serial time). Units of at least `threads` kv
// heads also keep the backward on its one-pass scheme (see backward() in cpu/sdpa_kernel.cpp).
template <typename Fn>
void run_units(const std::vector<int32_t>& cq, const std::vector<int32_t>& ck, int64_t Hkv, int64_t group,
               Fn&& fn) {
  const int64_t threads = at::get_num_threads();
  const int64_t B = static_cast<int64_t>(cq.size()) - 1;
  int64_t busy = 0;
  for (int64_t b = 0; b < B; ++b) busy += cq[b + 1] > cq[b] && ck[b + 1] > ck[b];
  const int64_t per = std::min<int64_t>(Hkv, std::max<int64_t>(threads, 1));
  const int64_t fine = busy * ((Hkv + per - 1) / per);
  const bool outer = threads > 1 && fine >= 2 * threads;
  const int64_t step = outer ? per : Hkv;
  std::vector<Unit> units;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lq = cq[b + 1] - cq[b], lk = ck[b + 1] - ck[b];
    if (lq == 0 || lk == 0) continue;
    for (int64_t kv0 = 0; kv0 < Hkv; kv0 += step) {
      const int64_t nkv = std::min(step, Hkv - kv0);
      units.push_back({b, cq[b], lq, ck[b], lk, kv0, nkv, kv0 * group, nkv * group, lq * lk * nkv});
    }
  }
  if (!outer) {
    for (const Unit& u : units) fn(u);
    return;
  }
  std::stable_sort(units.begin(), units.end(), [](const Unit& a, const Unit& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  // the workers reach ATen (the kernels' block products go through at::cpu::addmm_out): with
  // the caller's thread-local state (inference mode, dispatch key sets), as at::launch does
  const at::ThreadLocalState state;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(state);
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t i = next++; i < static_cast<int64_t>(units.size()); i = next++) fn(units[i]);
    }
  });
}

// q, k, v and out: kernel_view layouts, (row, head, d); the lse (Hq, total_q) is laid out alike
// for every dtype.
template <typename T>
cpu::FlashParams<T> seq_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                               const Unit& u, int64_t max_q, int64_t max_k, double dropout_p, int64_t causal,
                               double scale, int64_t seed, int64_t offset, int64_t window_left,
                               int64_t window_right, double softcap, const at::Tensor& sinks,
                               const at::Tensor& alibi) {
  const int64_t Hq_all = q.size(1);
  cpu::FlashParams<T> p;
  p.q = at_row<T>(q, u.q0, u.h0);
  p.k = at_row<T>(k, u.k0, u.kv0);
  p.v = at_row<T>(v, u.k0, u.kv0);
  p.mask_kind = flash::kNoMask;
  p.bool_mask = nullptr;
  p.add_mask = nullptr;
  p.add_mask_float = nullptr;
  for (int d = 0; d < 4; ++d) p.mask_stride[d] = 0;
  p.B = 1;
  p.Hq = u.nh;
  p.Lq = u.lq;
  p.D = q.size(2);
  p.Hkv = u.nkv;
  p.Lk = u.lk;
  p.Dv = v.size(2);
  p.scale = static_cast<cpu::acc_t<T>>(scale);
  p.causal = causal != flash::kNoCausal;
  // per sequence: lower-right ends the diagonal at the sequence's own last key
  p.causal_off = flash::causal_offset(static_cast<int>(causal), p.Lq, p.Lk);
  p.dropout_p = dropout_p;
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  // the counters of (sequence b, heads h0 ..)'s slice of the padded (B, Hq, max_q, max_k) scores
  p.drop_bh0 = u.b * Hq_all + u.h0;
  p.drop_lq = max_q;
  p.drop_lk = max_k;
  // the unit's heads h0 .. of sequence b; the band and ALiBi's Lk - Lq are the sequence's own
  using acc = cpu::acc_t<T>;
  const int64_t a_row = alibi.defined() && alibi.numel() != Hq_all ? u.b * Hq_all : 0;
  cpu::set_variants(p, causal, window_left, window_right, softcap,
                    sinks.defined() ? sinks.data_ptr<acc>() + u.h0 : nullptr,
                    alibi.defined() ? alibi.data_ptr<acc>() + a_row + u.h0 : nullptr, 0);
  // the packed layout
  p.q_hs = q.stride(1);
  p.q_rs = q.stride(0);
  p.k_hs = k.stride(1);
  p.k_rs = k.stride(0);
  p.v_hs = v.stride(1);
  p.v_rs = v.stride(0);
  p.o_hs = out.stride(1);
  p.o_rs = out.stride(0);
  p.l_hs = q.size(0);
  return p;
}

// The dtypes of the CPU sdpa kernels (csrc/cpu/sdpa_kernel.h): float16/bfloat16 inputs with
// float32 statistics and accumulators (lse, Delta, the gradient blocks), outputs rounded once.
#define PYATTN_VARLEN_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

at::ScalarType acc_dtype_of(at::ScalarType t) {
  return is_half(t) ? at::kFloat : t;
}

void check_lengths(const std::vector<int32_t>& cq, const std::vector<int32_t>& ck, int64_t max_q, int64_t max_k) {
  for (size_t b = 0; b + 1 < cq.size(); ++b) {
    PYATTN_CHECK_ARG(cq[b + 1] - cq[b] <= max_q && ck[b + 1] - ck[b] <= max_k, "varlen_attention",
                     "max_seqlen_q/max_seqlen_k", "expected at least every sequence's length, got ", max_q, " / ",
                     max_k, " where sequence ", b, " is ", cq[b + 1] - cq[b], " / ", ck[b + 1] - ck[b],
                     " long (longer than max_seqlen)");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p,
    int64_t causal, double scale, int64_t seed, int64_t offset, int64_t window_left, int64_t window_right,
    double softcap, const c10::optional<at::Tensor>& sinks_opt, const c10::optional<at::Tensor>& alibi_opt) {
  check_varlen_inputs(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal);
  PYATTN_CHECK_ARG(query.device().is_cpu(), "varlen_attention (cpu)", "query", "expected CPU tensors, got ",
                   query.device());
  const int64_t nseq = cu_seqlens_q.size(0) - 1;
  const at::ScalarType acc_t0 = acc_dtype_of(query.scalar_type());
  const at::Tensor sinks = variant_tensor(sinks_opt, query, acc_t0, nseq, query.size(1), false, "sinks");
  const at::Tensor alibi = variant_tensor(alibi_opt, query, acc_t0, nseq, query.size(1), true, "alibi_slopes");
  const auto cq = seq_bounds(cu_seqlens_q, query.size(0), "cu_seqlens_q");
  const auto ck = seq_bounds(cu_seqlens_k, key.size(0), "cu_seqlens_k");
  check_lengths(cq, ck, max_seqlen_q, max_seqlen_k);
  const int64_t total_q = query.size(0), Hq = query.size(1), Hkv = key.size(1), Dv = value.size(2);
  const auto acc_opts = query.options().dtype(acc_t0);
  // rows with no key keep output 0 and lse +inf (zero gradients in the backward)
  at::Tensor lse = at::full({Hq, total_q}, std::numeric_limits<double>::infinity(), acc_opts);
  if (Hq == 0 || Dv == 0) return {at::zeros({total_q, Hq, Dv}, query.options()), lse};
  const at::Tensor q = kernel_view(query), k = kernel_view(key), v = kernel_view(value);
  const at::Tensor out = zeros_like_view(total_q, Hq, Dv, query.scalar_type(), query.options());
  const int64_t group = Hq / Hkv;
  run_units(cq, ck, Hkv, group, [&](const Unit& u) {
    PYATTN_VARLEN_DISPATCH(q.scalar_type(), "varlen_attention_fwd_cpu", [&] {
      const auto p = seq_params<scalar_t>(q, k, v, out, u, max_seqlen_q, max_seqlen_k, dropout_p, causal, scale,
                                          seed, offset, window_left, window_right, softcap, sinks, alibi);
      const cpu::FlashFwdOut<scalar_t> fo{at_row<scalar_t>(out, u.q0, u.h0),
                                          lse.data_ptr<cpu::acc_t<scalar_t>>() + u.h0 * total_q + u.q0};
      PYATTN_CPU_DISPATCH(sdpa_fwd_kernel, p, fo);
    });
  });
  return {out.contiguous(), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, const at::Tensor& out,
    const at::Tensor& lse, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, int64_t causal,
    double scale, int64_t seed, int64_t offset, int64_t window_left, int64_t window_right, double softcap,
    const c10::optional<at::Tensor>& alibi_opt) {
  check_varlen_inputs(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal);
  check_varlen_backward_inputs(query, value, grad_out, out, lse);
  const at::Tensor alibi = variant_tensor(alibi_opt, query, acc_dtype_of(query.scalar_type()),
                                          cu_seqlens_q.size(0) - 1, query.size(1), true, "alibi_slopes");
  PYATTN_CHECK_ARG(query.device().is_cpu(), "varlen_attention (cpu)", "query", "expected CPU tensors, got ",
                   query.device());
  const auto cq = seq_bounds(cu_seqlens_q, query.size(0), "cu_seqlens_q");
  const auto ck = seq_bounds(cu_seqlens_k, key.size(0), "cu_seqlens_k");
  check_lengths(cq, ck, max_seqlen_q, max_seqlen_k);
  const int64_t Hq = query.size(1), Hkv = key.size(1), D = query.size(2), Dv = value.size(2);
  const int64_t total_q = query.size(0), total_k = key.size(0);
  const auto dt = query.scalar_type();
  if (Hq == 0 || Dv == 0 || D == 0) {
    return {at::zeros(query.sizes(), query.options()), at::zeros(key.sizes(), key.options()),
            at::zeros(value.sizes(), value.options())};
  }
  const at::ScalarType acc = acc_dtype_of(dt);
  const at::Tensor g = grad_out.to(dt);
  // Delta_i = dO_i . O_i for every packed row, (Hq, total_q), in the accumulation type
  const at::Tensor delta = (g.to(acc) * out.to(acc)).sum(-1).t().contiguous();
  const at::Tensor lse_t = lse.to(acc).contiguous();
  const at::Tensor q = kernel_view(query), k = kernel_view(key), v = kernel_view(value), gv = kernel_view(g);
  // The gradients in their input's layout; every unit writes rows no other unit writes. float32 /
  // float64 accumulate in place; half ones are written rounded by the kernel from its own
  // float32 blocks (cpu::FlashBwdArgs::dq_out). Rows no unit covers stay zero.
  const auto ga = is_half(dt) ? query.options() : query.options().dtype(acc);
  const at::Tensor dq = zeros_like_view(total_q, Hq, D, dt, ga), dk = zeros_like_view(total_k, Hkv, D, dt, ga),
                   dv = zeros_like_view(total_k, Hkv, Dv, dt, ga);
  const int64_t group = Hq / Hkv;
  run_units(cq, ck, Hkv, group, [&](const Unit& u) {
    PYATTN_VARLEN_DISPATCH(dt, "varlen_attention_bwd_cpu", [&] {
      const auto p = seq_params<scalar_t>(q, k, v, gv, u, max_seqlen_q, max_seqlen_k, dropout_p, causal, scale,
                                          seed, offset, window_left, window_right, softcap, at::Tensor(), alibi);
      using acc_t = cpu::acc_t<scalar_t>;
      const int64_t lrow = u.h0 * total_q + u.q0;
      cpu::FlashBwdArgs<scalar_t> a{at_row<scalar_t>(gv, u.q0, u.h0), lse_t.data_ptr<acc_t>() + lrow,
                                    delta.data_ptr<acc_t>() + lrow, nullptr, nullptr, nullptr};
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        a.dq = at_row<acc_t>(dq, u.q0, u.h0);
        a.dk = at_row<acc_t>(dk, u.k0, u.kv0);
        a.dv = at_row<acc_t>(dv, u.k0, u.kv0);
      } else {
        a.dq_out = at_row<scalar_t>(dq, u.q0, u.h0);
        a.dk_out = at_row<scalar_t>(dk, u.k0, u.kv0);
        a.dv_out = at_row<scalar_t>(dv, u.k0, u.kv0);
      }
      PYATTN_CPU_DISPATCH(sdpa_bwd_kernel, p, a);
    });
  });
  // half gradients back to the packed layout, one pass (none for float32/float64)
  auto packed = [&](const at::Tensor& t) {
    return t.scalar_type() == dt && t.is_contiguous() ? t : at::empty(t.sizes(), t.options().dtype(dt)).copy_(t);
  };
  return {packed(dq), packed(dk), packed(dv)};
}

}  // namespace pyattn

TORCH_LIBRARY_IMPL(pyattn, CPU, m) {
  m.impl("varlen_attention_fwd", &pyattn::varlen_attention_fwd_cpu);
  m.impl("varlen_attention_bwd", &pyattn::varlen_attention_bwd_cpu);
}
