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

// sum_h v_h * tanh(q_h + k_h)
template <typename scalar_t>
inline scalar_t additive_score(const scalar_t* q, const scalar_t* k, const scalar_t* v, int64_t H) {
  constexpr int64_t W = Vec<scalar_t>::size();
  Vec<scalar_t> acc(scalar_t(0));
  int64_t h = 0;
  for (; h + W <= H; h += W) {
    const Vec<scalar_t> t = (Vec<scalar_t>::loadu(q + h) + Vec<scalar_t>::loadu(k + h)).tanh();
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
    const Vec<scalar_t> th = (Vec<scalar_t>::loadu(q + h) + Vec<scalar_t>::loadu(k + h)).tanh();
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

template <typename scalar_t>
void forward_row(
    const AdditiveParams<scalar_t>& p, const AdditiveFwdOut<scalar_t>& o, int64_t b, int64_t i) {
  const int64_t H = p.H, Dv = p.Dv, Tk = p.Tk;
  const scalar_t* q = p.q + (b * p.Tq + i) * H;
  const bool* mask = p.mask ? p.mask + b * Tk : nullptr;
  scalar_t* acc = o.out + (b * p.Tq + i) * Dv;
  scalar_t* wrow = o.weights ? o.weights + (b * p.Tq + i) * Tk : nullptr;
  std::fill(acc, acc + Dv, scalar_t(0));

  RowSoftmax<scalar_t> sm;
  sm.init();
  scalar_t s[kBlockK];
  // Each block's weighted values are summed on their own, then folded into the row: blocked
  // summation keeps the float32 error of long rows at the level of a matrix product's.
  std::vector<scalar_t> block_acc(Dv);
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
    std::fill(block_acc.begin(), block_acc.end(), scalar_t(0));
    scalar_t block_sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (s[j] == neg_inf<scalar_t>()) continue;  // padding: its value row is never read
      const scalar_t w = sm.weight(s[j]);
      block_sum += w;
      axpy(block_acc.data(), w, p.val + (b * Tk + j0 + j) * Dv, Dv);
    }
    sm.l += block_sum;
    scale_add(acc, alpha, scalar_t(1), block_acc.data(), Dv);
  }
  const scalar_t inv = sm.inv_sum();
  scale_add(acc, inv, scalar_t(0), acc, Dv);
  const scalar_t lse = sm.lse();
  o.lse[b * p.Tq + i] = lse;
  if (wrow) {
    for (int64_t j = 0; j < Tk; ++j) wrow[j] = additive::prob(wrow[j], lse);
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

template <typename scalar_t>
void backward(const AdditiveParams<scalar_t>& p, const AdditiveBwdArgs<scalar_t>& a) {
  const int64_t B = p.B, Tq = p.Tq, Tk = p.Tk, H = p.H, Dv = p.Dv;
  const int64_t chunks = a.chunks;
  const int64_t rows_per_chunk = (Tq + chunks - 1) / chunks;

  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> t(H), g(H);
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

      const int64_t i_end = std::min(Tq, (c + 1) * rows_per_chunk);
      for (int64_t i = c * rows_per_chunk; i < i_end; ++i) {
        const int64_t row = b * Tq + i;
        const scalar_t* q = p.q + row * H;
        const scalar_t* dO = a.grad_out + row * Dv;
        scalar_t* dq = a.dq + row * H;
        std::fill(dq, dq + H, scalar_t(0));
        const scalar_t lse = p.lse[row];
        if (lse == pos_inf<scalar_t>()) continue;  // no attendable key: zero gradients
        const scalar_t* gw = a.grad_weights ? a.grad_weights + row * Tk : nullptr;
        scalar_t delta = dot(dO, p.out + row * Dv, Dv);
        if (gw) delta += dot(a.weights + row * Tk, gw, Tk);

        for (int64_t j = 0; j < Tk; ++j) {
          if (mask && mask[j]) continue;
          const scalar_t* k = p.k + (b * Tk + j) * H;
          const scalar_t* vj = p.val + (b * Tk + j) * Dv;
          const scalar_t e = additive_score_keep(q, k, p.v, t.data(), H);
          const scalar_t pr = additive::prob(e, lse);
          scalar_t dp = dot(dO, vj, Dv);
          if (gw) dp += gw[j];
          const scalar_t ds = additive::dscore(pr, dp, delta);
          axpy(dval + j * Dv, pr, dO, Dv);
          if (ds == scalar_t(0)) continue;
          // g_h = ds * v_h * (1 - t_h^2): the same vector feeds dq_i and dk_j
          constexpr int64_t W = Vec<scalar_t>::size();
          const Vec<scalar_t> vds(ds), one(scalar_t(1));
          scalar_t* dkj = dk + j * H;
          int64_t h = 0;
          for (; h + W <= H; h += W) {
            const Vec<scalar_t> th = Vec<scalar_t>::loadu(t.data() + h);
            const Vec<scalar_t> gh = vds * Vec<scalar_t>::loadu(p.v + h) * (one - th * th);
            (Vec<scalar_t>::loadu(dq + h) + gh).store(dq + h);
            (Vec<scalar_t>::loadu(dkj + h) + gh).store(dkj + h);
            at::vec::fmadd(vds, th, Vec<scalar_t>::loadu(dv + h)).store(dv + h);
          }
          for (; h < H; ++h) {
            const scalar_t gh = ds * p.v[h] * additive::dtanh(t[h]);
            dq[h] += gh;
            dkj[h] += gh;
            dv[h] += ds * t[h];
          }
        }
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
