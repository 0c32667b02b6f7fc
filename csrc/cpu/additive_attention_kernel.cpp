// Fused additive attention on the CPU, compiled once per instruction set (setup.py builds this
// file with -DCPU_CAPABILITY=DEFAULT / AVX2 / AVX512 and the matching -m flags; the caller picks
// one at run time). Only at::vec and at::parallel_for come from ATen here.
//
// Forward: one task per block of query rows; each row streams the keys in blocks of
// additive::kBlockK, scores them with a vectorised tanh over H, and folds each block into an
// online softmax and the running context. Nothing of size Tq x Tk x H is ever stored.
// Backward: one task per (batch, chunk of query rows); tanh is recomputed once per (i, j) into a
// row buffer and used for all four gradients; dK, dvalue and dv of a chunk go to its own
// partial buffer, reduced afterwards in chunk order (deterministic, no atomics).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "../additive_attention_math.h"
#include "additive_attention_kernel.h"

namespace pyattn {
namespace cpu {
namespace CPU_CAPABILITY {

namespace {

using additive::kBlockK;
using additive::RowSoftmax;

template <typename scalar_t>
using Vec = at::vec::Vectorized<scalar_t>;

// tanh, vectorised. float: an odd Taylor polynomial (through x^17) below |x| = 0.55 and
// 1 - 2 / (exp(2|x|) + 1) above, with at::vec's fast exp; measured here at <= 2 ulp over
// [-19, 19] and 2.3x the throughput of Sleef's tanh (tanh is most of this kernel's work).
// The series' next term at 0.55 is 3e-9, below an ulp; above 0.55 the result is >= 0.5, so
// the subtraction cancels nothing. double: Sleef (gradcheck wants the accurate one).
inline Vec<double> vtanh(const Vec<double>& x) {
  return x.tanh();
}

inline Vec<float> vtanh(const Vec<float>& x) {
  using V = Vec<float>;
  const V ax = x.abs();
  const V x2 = x * x;
  V poly = at::vec::fmadd(x2, V(6404582.f / 10854718875.f), V(-929569.f / 638512875.f));
  poly = at::vec::fmadd(poly, x2, V(21844.f / 6081075.f));
  poly = at::vec::fmadd(poly, x2, V(-1382.f / 155925.f));
  poly = at::vec::fmadd(poly, x2, V(62.f / 2835.f));
  poly = at::vec::fmadd(poly, x2, V(-17.f / 315.f));
  poly = at::vec::fmadd(poly, x2, V(2.f / 15.f));
  poly = at::vec::fmadd(poly, x2, V(-1.f / 3.f));
  poly = at::vec::fmadd(poly * x2, ax, ax);
  const V e = (ax * V(2.f)).exp_u20();
  V r = V::blendv(V(1.f) - V(2.f) / (e + V(1.f)), poly, ax < V(0.55f));
  r = V::blendv(r, V(1.f), ax > V(9.5f));  // tanh(9.5) rounds to 1 in float
  return r.copysign(x);
}

// sum_h v_h * tanh(q_h + k_h)
template <typename scalar_t>
inline scalar_t additive_score(const scalar_t* q, const scalar_t* k, const scalar_t* v, int64_t H) {
  constexpr int64_t W = Vec<scalar_t>::size();
  Vec<scalar_t> acc(scalar_t(0));
  int64_t h = 0;
  for (; h + W <= H; h += W) {
    const Vec<scalar_t> t = vtanh(Vec<scalar_t>::loadu(q + h) + Vec<scalar_t>::loadu(k + h));
    acc = at::vec::fmadd(t, Vec<scalar_t>::loadu(v + h), acc);
  }
  scalar_t s = at::vec::vec_reduce_all<scalar_t>(
      [](const Vec<scalar_t>& a, const Vec<scalar_t>& b) { return a + b; }, acc);
  for (; h < H; ++h) s += v[h] * std::tanh(q[h] + k[h]);
  return s;
}

// t_h = tanh(q_h + k_h) into t; returns sum_h v_h t_h.
template <typename scalar_t>
inline scalar_t additive_score_keep(
    const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* t, int64_t H) {
  constexpr int64_t W = Vec<scalar_t>::size();
  Vec<scalar_t> acc(scalar_t(0));
  int64_t h = 0;
  for (; h + W <= H; h += W) {
    const Vec<scalar_t> th = vtanh(Vec<scalar_t>::loadu(q + h) + Vec<scalar_t>::loadu(k + h));
    th.store(t + h);
    acc = at::vec::fmadd(th, Vec<scalar_t>::loadu(v + h), acc);
  }
  scalar_t s = at::vec::vec_reduce_all<scalar_t>(
      [](const Vec<scalar_t>& a, const Vec<scalar_t>& b) { return a + b; }, acc);
  for (; h < H; ++h) {
    t[h] = std::tanh(q[h] + k[h]);
    s += v[h] * t[h];
  }
  return s;
}

template <typename scalar_t>
inline scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  constexpr int64_t W = Vec<scalar_t>::size();
  Vec<scalar_t> acc(scalar_t(0));
  int64_t i = 0;
  for (; i + W <= n; i += W) acc = at::vec::fmadd(Vec<scalar_t>::loadu(a + i), Vec<scalar_t>::loadu(b + i), acc);
  scalar_t s = at::vec::vec_reduce_all<scalar_t>(
      [](const Vec<scalar_t>& x, const Vec<scalar_t>& y) { return x + y; }, acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y = alpha * y + beta * x
template <typename scalar_t>
inline void scale_add(scalar_t* y, scalar_t alpha, scalar_t beta, const scalar_t* x, int64_t n) {
  constexpr int64_t W = Vec<scalar_t>::size();
  const Vec<scalar_t> va(alpha), vb(beta);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    (Vec<scalar_t>::loadu(y + i) * va + Vec<scalar_t>::loadu(x + i) * vb).store(y + i);
  }
  for (; i < n; ++i) y[i] = alpha * y[i] + beta * x[i];
}

// y += a * x
template <typename scalar_t>
inline void axpy(scalar_t* y, scalar_t a, const scalar_t* x, int64_t n) {
  constexpr int64_t W = Vec<scalar_t>::size();
  const Vec<scalar_t> va(a);
  int64_t i = 0;
  for (; i + W <= n; i += W) at::vec::fmadd(va, Vec<scalar_t>::loadu(x + i), Vec<scalar_t>::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += a * x[i];
}

// The row's lse in float64: m + log(l) rounded to float32 would carry an absolute error of
// half an ulp of |lse| into every probability recomputed from it.
template <typename scalar_t>
inline double row_lse(const RowSoftmax<scalar_t>& sm) {
  RowSoftmax<double> wide;
  wide.m = static_cast<double>(sm.m);
  wide.l = static_cast<double>(sm.l);
  return wide.lse();
}

// exp(e - lse) with the difference taken in float64 (then rounded once).
template <typename scalar_t>
inline scalar_t prob64(scalar_t e, double lse) {
  return static_cast<scalar_t>(additive::prob<double>(static_cast<double>(e), lse));
}

// y += a * x with y in float64 (plain loop: -O3 vectorises the widening multiply-add).
template <typename scalar_t>
inline void axpy_wide(double* y, scalar_t a, const scalar_t* x, int64_t n) {
  const double ad = static_cast<double>(a);
  for (int64_t i = 0; i < n; ++i) y[i] += ad * static_cast<double>(x[i]);
}

template <typename scalar_t>
void forward_row(
    const AdditiveParams<scalar_t>& p, const AdditiveFwdOut<scalar_t>& o, int64_t b, int64_t i) {
  const int64_t H = p.H, Dv = p.Dv, Tk = p.Tk;
  const scalar_t* q = p.q + (b * p.Tq + i) * H;
  const bool* mask = p.mask ? p.mask + b * Tk : nullptr;
  scalar_t* out = o.out + (b * p.Tq + i) * Dv;
  scalar_t* wrow = o.weights ? o.weights + (b * p.Tq + i) * Tk : nullptr;

  RowSoftmax<scalar_t> sm;
  sm.init();
  scalar_t s[kBlockK];
  // The context is accumulated in float64 (a block's weighted values first, then folded into
  // the row): the backward's Delta = dO . O inherits O's error, and with a float32 sum over
  // long rows that alone made gradients ~3x less accurate than a naive float32 graph.
  std::vector<double> acc(Dv, 0.0), block_acc(Dv);
  for (int64_t j0 = 0; j0 < Tk; j0 += kBlockK) {
    const int64_t n = std::min<int64_t>(kBlockK, Tk - j0);
    scalar_t block_max = neg_inf<scalar_t>();
    for (int64_t j = 0; j < n; ++j) {
      if (mask && mask[j0 + j]) {
        s[j] = neg_inf<scalar_t>();
      } else {
        s[j] = additive_score(q, p.k + (b * Tk + j0 + j) * H, p.v, H);
        block_max = additive::nan_max(block_max, s[j]);
      }
      if (wrow) wrow[j0 + j] = s[j];  // raw scores; normalised once lse is known
    }
    if (block_max == neg_inf<scalar_t>()) continue;
    const scalar_t alpha = sm.rescale(block_max);
    std::fill(block_acc.begin(), block_acc.end(), 0.0);
    scalar_t block_sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (s[j] == neg_inf<scalar_t>()) continue;  // padding: its value row is never read
      const scalar_t w = sm.weight(s[j]);
      block_sum += w;
      axpy_wide(block_acc.data(), w, p.val + (b * Tk + j0 + j) * Dv, Dv);
    }
    sm.l += block_sum;
    for (int64_t d = 0; d < Dv; ++d) acc[d] = acc[d] * alpha + block_acc[d];
  }
  const double inv = static_cast<double>(sm.inv_sum());
  for (int64_t d = 0; d < Dv; ++d) out[d] = static_cast<scalar_t>(acc[d] * inv);
  const double lse = row_lse(sm);
  o.lse[b * p.Tq + i] = lse;
  if (wrow) {
    for (int64_t j = 0; j < Tk; ++j) wrow[j] = prob64(wrow[j], lse);
  }
}

template <typename scalar_t>
void forward(const AdditiveParams<scalar_t>& p, const AdditiveFwdOut<scalar_t>& o) {
  const int64_t rows = p.B * p.Tq;
  // A row costs Tk * H tanh: a grain of a few rows keeps scheduling overhead negligible.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, p.Tk * p.H / 64));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) forward_row(p, o, r / p.Tq, r % p.Tq);
  });
}

// Gradients are sums over up to Tq * Tk terms; they are summed in blocks of kSumBlock terms
// that are then added up (a two-level cascade), which keeps the float32 error at the level of
// the reductions a naive autograd graph does, instead of growing with the sequence length.
constexpr int64_t kSumBlock = 16;

// Rows whose tanh tile (Tk x H) is at most this many elements keep it between the two passes
// of the backward; longer rows recompute it (an L2-sized buffer is cheaper than a second tanh,
// a DRAM-sized one is not).
constexpr int64_t kKeepTanhElems = int64_t(1) << 20;

template <typename scalar_t>
inline void add_to(scalar_t* y, const scalar_t* x, int64_t n) {
  axpy(y, scalar_t(1), x, n);
}

// Backward of one (batch, chunk of query rows) task. Per query row i, two passes over the keys:
//   1. t_j = tanh(q_i + k_j), P_ij, dP_ij = dO_i . value_j (+ dW_ij), Delta_i = sum_j P_ij dP_ij;
//   2. dS_ij = P_ij (dP_ij - Delta_i) and the four gradients.
// Delta is taken from the recomputed P rather than as dO_i . O_i (flash-attention's shortcut):
// O carries its own float32 rounding, and since dS_ij must sum to ~0 over j, that rounding came
// back amplified in dq and dk (3-7x the error of a naive float32 graph in our tests).
template <typename scalar_t>
void backward(const AdditiveParams<scalar_t>& p, const AdditiveBwdArgs<scalar_t>& a) {
  const int64_t B = p.B, Tq = p.Tq, Tk = p.Tk, H = p.H, Dv = p.Dv;
  const int64_t chunks = a.chunks;
  const int64_t rows_per_chunk = (Tq + chunks - 1) / chunks;
  const bool keep_tanh = Tk * H <= kKeepTanhElems;

  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> tt(keep_tanh ? Tk * H : H), qacc(H), vacc(H);
    std::vector<scalar_t> prob(Tk), dprob(Tk);
    // per-row-block sums of dk / dvalue, flushed into the chunk's sums every kSumBlock rows
    std::vector<scalar_t> dk_blk(Tk * H), dval_blk(Tk * Dv);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, c = task % chunks;
      // chunk 0 accumulates straight into the outputs, the others into scratch
      scalar_t* dk = c == 0 ? a.dk + b * Tk * H : a.dk_partial + (b * (chunks - 1) + c - 1) * Tk * H;
      scalar_t* dval = c == 0 ? a.dval + b * Tk * Dv : a.dval_partial + (b * (chunks - 1) + c - 1) * Tk * Dv;
      scalar_t* dv = a.dv_partial + task * H;
      std::fill(dk, dk + Tk * H, scalar_t(0));
      std::fill(dval, dval + Tk * Dv, scalar_t(0));
      std::fill(dv, dv + H, scalar_t(0));
      const bool* mask = p.mask ? p.mask + b * Tk : nullptr;

      const int64_t i_begin = c * rows_per_chunk;
      const int64_t i_end = std::min(Tq, (c + 1) * rows_per_chunk);
      for (int64_t i0 = i_begin; i0 < i_end; i0 += kSumBlock) {
        const int64_t i1 = std::min(i_end, i0 + kSumBlock);
        std::fill(dk_blk.begin(), dk_blk.end(), scalar_t(0));
        std::fill(dval_blk.begin(), dval_blk.end(), scalar_t(0));
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t row = b * Tq + i;
          const scalar_t* q = p.q + row * H;
          const scalar_t* dO = a.grad_out + row * Dv;
          scalar_t* dq = a.dq + row * H;
          std::fill(dq, dq + H, scalar_t(0));
          const double lse = p.lse[row];
          if (lse == pos_inf<double>()) continue;  // no attendable key: zero gradients
          const scalar_t* gw = a.grad_weights ? a.grad_weights + row * Tk : nullptr;

          // pass 1: probabilities, dP and Delta
          double delta = 0.0;
          for (int64_t j = 0; j < Tk; ++j) {
            if (mask && mask[j]) {
              prob[j] = scalar_t(0);
              continue;
            }
            scalar_t* t = keep_tanh ? tt.data() + j * H : tt.data();
            const scalar_t e = additive_score_keep(q, p.k + (b * Tk + j) * H, p.v, t, H);
            prob[j] = prob64(e, lse);
            dprob[j] = dot(dO, p.val + (b * Tk + j) * Dv, Dv) + (gw ? gw[j] : scalar_t(0));
            delta += static_cast<double>(prob[j]) * static_cast<double>(dprob[j]);
          }
          const scalar_t delta_s = static_cast<scalar_t>(delta);

          // pass 2: dS and the gradients
          for (int64_t j0 = 0; j0 < Tk; j0 += kSumBlock) {
            const int64_t j1 = std::min(Tk, j0 + kSumBlock);
            std::fill(qacc.begin(), qacc.end(), scalar_t(0));
            std::fill(vacc.begin(), vacc.end(), scalar_t(0));
            for (int64_t j = j0; j < j1; ++j) {
              if (mask && mask[j]) continue;
              const scalar_t pr = prob[j];
              axpy(dval_blk.data() + j * Dv, pr, dO, Dv);
              const scalar_t ds = additive::dscore(pr, dprob[j], delta_s);
              if (ds == scalar_t(0)) continue;
              scalar_t* t = tt.data();
              if (keep_tanh) {
                t += j * H;
              } else {
                additive_score_keep(q, p.k + (b * Tk + j) * H, p.v, t, H);
              }
              // g_h = ds * v_h * (1 - t_h^2): the same vector feeds dq_i and dk_j
              constexpr int64_t W = Vec<scalar_t>::size();
              const Vec<scalar_t> vds(ds), one(scalar_t(1));
              scalar_t* dkj = dk_blk.data() + j * H;
              int64_t h = 0;
              for (; h + W <= H; h += W) {
                const Vec<scalar_t> th = Vec<scalar_t>::loadu(t + h);
                const Vec<scalar_t> gh = vds * Vec<scalar_t>::loadu(p.v + h) * (one - th * th);
                (Vec<scalar_t>::loadu(qacc.data() + h) + gh).store(qacc.data() + h);
                (Vec<scalar_t>::loadu(dkj + h) + gh).store(dkj + h);
                at::vec::fmadd(vds, th, Vec<scalar_t>::loadu(vacc.data() + h)).store(vacc.data() + h);
              }
              for (; h < H; ++h) {
                const scalar_t gh = ds * p.v[h] * additive::dtanh(t[h]);
                qacc[h] += gh;
                dkj[h] += gh;
                vacc[h] += ds * t[h];
              }
            }
            add_to(dq, qacc.data(), H);
            add_to(dv, vacc.data(), H);
          }
        }
        add_to(dk, dk_blk.data(), Tk * H);
        add_to(dval, dval_blk.data(), Tk * Dv);
      }
    }
  });

  if (chunks > 1) {
    // Fixed-order reduction of the chunk partials: chunk 1, 2, ... added to chunk 0's sums.
    at::parallel_for(0, B * Tk, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / Tk, j = r % Tk;
        for (int64_t c = 1; c < chunks; ++c) {
          const int64_t slot = (b * (chunks - 1) + c - 1) * Tk + j;
          axpy(a.dk + r * H, scalar_t(1), a.dk_partial + slot * H, H);
          axpy(a.dval + r * Dv, scalar_t(1), a.dval_partial + slot * Dv, Dv);
        }
      }
    });
  }
  std::fill(a.dv, a.dv + H, scalar_t(0));
  for (int64_t task = 0; task < B * chunks; ++task) axpy(a.dv, scalar_t(1), a.dv_partial + task * H, H);
}

}  // namespace

void additive_attention_fwd_kernel(const AdditiveParams<float>& p, const AdditiveFwdOut<float>& o) {
  forward(p, o);
}
void additive_attention_fwd_kernel(const AdditiveParams<double>& p, const AdditiveFwdOut<double>& o) {
  forward(p, o);
}
void additive_attention_bwd_kernel(const AdditiveParams<float>& p, const AdditiveBwdArgs<float>& a) {
  backward(p, a);
}
void additive_attention_bwd_kernel(const AdditiveParams<double>& p, const AdditiveBwdArgs<double>& a) {
  backward(p, a);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace pyattn
