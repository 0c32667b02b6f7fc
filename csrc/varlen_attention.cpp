// pyattn::varlen_attention_{fwd,bwd} for CPU tensors: packed variable-length sequences run
// through the fused CPU sdpa kernels (csrc/cpu/sdpa_kernel.cpp), each (sequence, kv-head group)
// unit as a batch of one, so a sequence costs its own Lq_b x Lk_b tiles and nothing is padded
// (run_units says how the units share the threads). The packed (total, H, D) rows of a unit are
// copied to the kernels' contiguous (1, H, L, D) layout and back (O(L H D) next to the O(L^2 H D) of the attention). Dropout counters follow
// the padded (B, Hq, max_seqlen_q, max_seqlen_k) layout through FlashParams::drop_* (see
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

// (1, H, L, D) contiguous copy of the packed rows [start, start + len), heads [h0, h0 + nh), of
// t (total, H, D).
at::Tensor rows(const at::Tensor& t, int64_t start, int64_t len, int64_t h0, int64_t nh) {
  return t.narrow(0, start, len).narrow(1, h0, nh).transpose(0, 1).unsqueeze(0).contiguous();
}

// dst rows [start, start + len), heads [h0, h0 + nh) of a packed (total, H, D) tensor = src (1, nh, len, D).
void put_rows(at::Tensor& dst, const at::Tensor& src, int64_t start, int64_t len, int64_t h0, int64_t nh) {
  dst.narrow(0, start, len).narrow(1, h0, nh).copy_(src[0].transpose(0, 1));
}

// One unit of work: sequence b with kv heads [kv0, kv0 + nkv) and their query heads.
struct Unit {
  int64_t b, kv0, nkv, cost;
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
void run_units(const std::vector<int32_t>& cq, const std::vector<int32_t>& ck, int64_t Hkv, Fn&& fn) {
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
      units.push_back({b, kv0, nkv, lq * lk * nkv});
    }
  }
  if (!outer) {
    for (const Unit& u : units) fn(u);
    return;
  }
  std::stable_sort(units.begin(), units.end(), [](const Unit& a, const Unit& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  // the workers run ATen ops (copies, allocations): with the caller's thread-local state
  // (inference mode, dispatch key sets), as at::launch does
  const at::ThreadLocalState state;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(state);
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t i = next++; i < static_cast<int64_t>(units.size()); i = next++) fn(units[i]);
    }
  });
}

template <typename T>
cpu::FlashParams<T> seq_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t b,
                               int64_t h0, int64_t Hq_all, int64_t max_q, int64_t max_k, double dropout_p,
                               int64_t causal, double scale, int64_t seed, int64_t offset,
                               int64_t window_left, int64_t window_right, double softcap,
                               const at::Tensor& sinks, const at::Tensor& alibi) {
  cpu::FlashParams<T> p;
  p.q = q.data_ptr<T>();
  p.k = k.data_ptr<T>();
  p.v = v.data_ptr<T>();
  p.mask_kind = flash::kNoMask;
  p.bool_mask = nullptr;
  p.add_mask = nullptr;
  p.add_mask_float = nullptr;
  for (int d = 0; d < 4; ++d) p.mask_stride[d] = 0;
  p.B = 1;
  p.Hq = q.size(1);
  p.Lq = q.size(2);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.Lk = k.size(2);
  p.Dv = v.size(3);
  p.scale = static_cast<cpu::acc_t<T>>(scale);
  p.causal = causal != flash::kNoCausal;
  // per sequence: lower-right ends the diagonal at the sequence's own last key
  p.causal_off = flash::causal_offset(static_cast<int>(causal), p.Lq, p.Lk);
  p.dropout_p = dropout_p;
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  // the counters of (sequence b, heads h0 ..)'s slice of the padded (B, Hq, max_q, max_k) scores
  p.drop_bh0 = b * Hq_all + h0;
  p.drop_lq = max_q;
  p.drop_lk = max_k;
  // the unit's heads h0 .. of sequence b; the band and ALiBi's Lk - Lq are the sequence's own
  using acc = cpu::acc_t<T>;
  const int64_t a_row = alibi.defined() && alibi.numel() != Hq_all ? b * Hq_all : 0;
  cpu::set_variants(p, causal, window_left, window_right, softcap,
                    sinks.defined() ? sinks.data_ptr<acc>() + h0 : nullptr,
                    alibi.defined() ? alibi.data_ptr<acc>() + a_row + h0 : nullptr, 0);
  return p;
}

// The dtypes of the CPU sdpa kernels (csrc/cpu/sdpa_kernel.h): float16/bfloat16 inputs with
// float32 statistics and accumulators (lse, Delta, the gradient blocks), outputs rounded once.
#define PYATTN_VARLEN_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

at::ScalarType acc_dtype_of(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 ? at::kFloat : t;
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
  // rows with no key keep output 0 and lse +inf (zero gradients in the backward)
  at::Tensor out = at::zeros({total_q, Hq, Dv}, query.options());
  const auto acc_opts = query.options().dtype(acc_dtype_of(query.scalar_type()));
  at::Tensor lse = at::full({Hq, total_q}, std::numeric_limits<double>::infinity(), acc_opts);
  if (Hq == 0 || Dv == 0) return {out, lse};
  const int64_t group = Hq / Hkv;
  run_units(cq, ck, Hkv, [&](const Unit& u) {
    const int64_t q0 = cq[u.b], lq = cq[u.b + 1] - q0, k0 = ck[u.b], lk = ck[u.b + 1] - k0;
    const int64_t h0 = u.kv0 * group, nh = u.nkv * group;
    const at::Tensor q = rows(query, q0, lq, h0, nh), k = rows(key, k0, lk, u.kv0, u.nkv),
                     v = rows(value, k0, lk, u.kv0, u.nkv);
    at::Tensor o = at::empty({1, nh, lq, Dv}, query.options());
    at::Tensor l = at::empty({1, nh, lq}, acc_opts);
    PYATTN_VARLEN_DISPATCH(q.scalar_type(), "varlen_attention_fwd_cpu", [&] {
      const auto p = seq_params<scalar_t>(q, k, v, u.b, h0, Hq, max_seqlen_q, max_seqlen_k, dropout_p, causal,
                                          scale, seed, offset, window_left, window_right, softcap, sinks, alibi);
      const cpu::FlashFwdOut<scalar_t> fo{o.data_ptr<scalar_t>(), l.data_ptr<cpu::acc_t<scalar_t>>()};
      PYATTN_CPU_DISPATCH(sdpa_fwd_kernel, p, fo);
    });
    put_rows(out, o, q0, lq, h0, nh);
    lse.narrow(0, h0, nh).narrow(1, q0, lq).copy_(l[0]);
  });
  return {out, lse};
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
  const int64_t Hq = query.size(1), Hkv = key.size(1), Dv = value.size(2);
  const auto dt = query.scalar_type();
  at::Tensor dq = at::zeros(query.sizes(), query.options());
  at::Tensor dk = at::zeros(key.sizes(), key.options());
  at::Tensor dv = at::zeros(value.sizes(), value.options());
  if (Hq == 0 || Dv == 0 || query.size(2) == 0) return {dq, dk, dv};
  const at::ScalarType acc = acc_dtype_of(dt);
  const at::Tensor g = grad_out.to(dt);
  // Delta_i = dO_i . O_i for every packed row, (total_q, Hq), in the accumulation type
  const at::Tensor delta_all = (g.to(acc) * out.to(acc)).sum(-1);
  const at::Tensor lse_t = lse.to(acc);
  const int64_t group = Hq / Hkv;
  run_units(cq, ck, Hkv, [&](const Unit& u) {
    const int64_t q0 = cq[u.b], lq = cq[u.b + 1] - q0, k0 = ck[u.b], lk = ck[u.b + 1] - k0;
    const int64_t h0 = u.kv0 * group, nh = u.nkv * group;
    const at::Tensor q = rows(query, q0, lq, h0, nh), k = rows(key, k0, lk, u.kv0, u.nkv),
                     v = rows(value, k0, lk, u.kv0, u.nkv), dO = rows(g, q0, lq, h0, nh);
    const at::Tensor l = lse_t.narrow(0, h0, nh).narrow(1, q0, lq).unsqueeze(0).contiguous();  // (1, nh, lq)
    const at::Tensor delta =
        delta_all.narrow(0, q0, lq).narrow(1, h0, nh).t().unsqueeze(0).contiguous();  // (1, nh, lq)
    // the kernel's gradient blocks are of the accumulation type: each row is rounded once, when
    // its unit (the only one that writes it) puts it back
    const auto ga = q.options().dtype(acc);
    at::Tensor gq = at::zeros(q.sizes(), ga), gk = at::zeros(k.sizes(), ga), gv = at::zeros(v.sizes(), ga);
    PYATTN_VARLEN_DISPATCH(dt, "varlen_attention_bwd_cpu", [&] {
      const auto p = seq_params<scalar_t>(q, k, v, u.b, h0, Hq, max_seqlen_q, max_seqlen_k, dropout_p, causal,
                                          scale, seed, offset, window_left, window_right, softcap, at::Tensor(),
                                          alibi);
      using acc_t = cpu::acc_t<scalar_t>;
      const cpu::FlashBwdArgs<scalar_t> a{dO.data_ptr<scalar_t>(), l.data_ptr<acc_t>(),
                                          delta.data_ptr<acc_t>(), gq.data_ptr<acc_t>(),
                                          gk.data_ptr<acc_t>(), gv.data_ptr<acc_t>()};
      PYATTN_CPU_DISPATCH(sdpa_bwd_kernel, p, a);
    });
    put_rows(dq, gq, q0, lq, h0, nh);
    put_rows(dk, gk, k0, lk, u.kv0, u.nkv);
    put_rows(dv, gv, k0, lk, u.kv0, u.nkv);
  });
  return {dq, dk, dv};
}

}  // namespace pyattn

TORCH_LIBRARY_IMPL(pyattn, CPU, m) {
  m.impl("varlen_attention_fwd", &pyattn::varlen_attention_fwd_cpu);
  m.impl("varlen_attention_bwd", &pyattn::varlen_attention_bwd_cpu);
}
