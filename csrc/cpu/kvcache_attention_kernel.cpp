// KV-cache attention on the CPU (split-K decoding), compiled once per instruction set like
// cpu/sdpa_kernel.cpp (setup.py; csrc/kvcache_attention.cpp picks the build at run time).
//
// A decode step reads the whole cache once and does little arithmetic per byte, so this kernel
// is built around reading K and V once, from wherever they are (dense or paged), at the speed of
// memory:
// - one task per (batch, kv head, split): the task's query rows are all Hq/Hkv query heads of
//   that kv head times the Lq new positions (GQA packing), so each K/V row is read once per task,
//   not once per query head; threads take tasks one at a time from a shared counter;
// - the task streams its chunk of the cache in blocks of kBlockK keys: scores of every row for
//   the block (vectorised dot products on rows read in place; half rows are widened to float32
//   in registers as they are loaded), the online softmax per row, then P V into float32
//   accumulators;
// - splits of one sequence write partial (m, l, acc) rows, merged exactly by the log-sum-exp
//   (kvcache::SplitMerge) in a second, cheap pass that also applies the sink and rounds once.
// The new tokens are written into the cache first (the op's in-place append).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../kvcache_attention_math.h"
#include "kvcache_attention_kernel.h"
#include "vec_util.h"

namespace pyattn {
namespace cpu {
namespace CPU_CAPABILITY {

namespace {

// Keys per block: the (rows x kBlockK) scores and a block of widened half rows stay in L1.
constexpr int64_t kBlockK = 32;

// The sum of a vector's lanes (reduce_add is an intrinsic only in the float AVX2/AVX512 builds).
template <typename T>
inline T hsum(const Vec<T>& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return v.reduce_add();
#endif
  {
    T buf[Vec<T>::size()];
    v.store(buf);
    T s = 0;
    for (int64_t i = 0; i < Vec<T>::size(); ++i) s += buf[i];
    return s;
  }
}

// out[k] = sum of the lanes of v[k], k = 0 .. 7, for the 4 rows x 2 keys of block_scores: on
// AVX512 / AVX2 one transpose-and-add tree for all eight (about half the shuffles of eight
// separate reductions, which were a third of the scores' instructions).
template <typename T>
inline void hsum8(const Vec<T>* v, T* out) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    auto fold = [](__m512 a, __m512 b) {  // 128-bit lanes [a02, a13, b02, b13]
      return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    };
    auto pick = [](__m512 x, __m512 y) {  // lane k: 4 partial sums of source k of (x: 0, 1; y: 2, 3)
      return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
    };
    const __m512 lo = pick(fold(v[0], v[1]), fold(v[2], v[3]));
    const __m512 hi = pick(fold(v[4], v[5]), fold(v[6], v[7]));
    const __m512 z = _mm512_add_ps(_mm512_unpacklo_ps(lo, hi), _mm512_unpackhi_ps(lo, hi));
    const __m512 f = _mm512_add_ps(z, _mm512_permute_ps(z, 0x4E));  // lane k: [s_k, s_k+4, ..]
    alignas(64) float tmp[16];
    _mm512_store_ps(tmp, f);
    for (int k = 0; k < 4; ++k) {
      out[k] = tmp[4 * k];
      out[k + 4] = tmp[4 * k + 1];
    }
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
    return;
  }
#endif
  for (int k = 0; k < 8; ++k) out[k] = hsum(v[k]);
}

template <typename in_t>
inline int64_t page_of(const KVCacheParams<in_t>& p, int64_t b, int64_t j) {
  return p.block_table ? p.block_table[b * p.bt_stride + j / p.page_size] : b;
}

template <typename in_t>
inline in_t* cache_row(in_t* base, const int64_t* stride, int64_t page, int64_t h, int64_t row) {
  return base + page * stride[0] + h * stride[1] + row * stride[2];
}

// n <= Vec<T>::size() elements of a cache row as a Vec<T>: half rows are widened in registers
// as they are loaded (no widened copy of the block to write and read back).
template <typename T, typename in_t>
inline Vec<T> load_acc(const in_t* src, int64_t n) {
  if constexpr (std::is_same_v<in_t, T>) {
    return Vec<T>::loadu(src, n);
  } else {
    if (n == Vec<T>::size()) {
      Vec<T> out;
      at::vec::load_to_float<in_t>(src, out);
      return out;
    }
    T buf[Vec<T>::size()] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<T>(src[i]);
    return Vec<T>::loadu(buf);
  }
}

// The in-place append: new token t of sequence b goes to position cache_seqlens[b] + t. Serial:
// a few rows of D elements, less than one parallel region's wake-up (on a loaded machine a
// region waits for every thread to be scheduled: milliseconds).
template <typename in_t>
void append(const KVCacheParams<in_t>& p) {
  if (p.k_new == nullptr) return;
  for (int64_t bh = 0; bh < p.B * p.Hkv; ++bh) {
    const int64_t b = bh / p.Hkv, h = bh % p.Hkv;
    for (int64_t t = 0; t < p.Lq; ++t) {
      const int64_t j = p.cache_seqlens[b] + t, page = page_of(p, b, j), row = j % p.page_size;
      std::memcpy(cache_row(p.k_cache, p.k_stride, page, h, row), p.k_new + (bh * p.Lq + t) * p.D,
                  sizeof(in_t) * p.D);
      std::memcpy(cache_row(p.v_cache, p.v_stride, page, h, row),
                  p.v_new + (bh * p.Lq + t) * p.Dv, sizeof(in_t) * p.Dv);
    }
  }
}

// Per-thread buffers of one task.
template <typename T, typename in_t>
struct Work {
  std::vector<T> q;            // (R, D): scaled query rows
  std::vector<T> s;            // (R, kBlockK): scores, then probabilities
  std::vector<T> m, l, alpha;  // (R,)
  std::vector<const in_t*> kp, vp;  // the block's cache rows
  Work(int64_t R, int64_t D) : q(R * D), s(R * kBlockK), m(R), l(R), alpha(R), kp(kBlockK), vp(kBlockK) {}
};

// S[r][jj] = q_r . K_jj for rows [0, R), keys [0, nb): four rows times two keys at a time, so
// each q load serves two keys and each K load four rows, with eight independent FMA chains.
// Half K rows are widened in registers.
template <typename T, typename in_t>
void block_scores(const T* q, int64_t R, int64_t D, const in_t* const* kp, int64_t nb, T* s) {
  constexpr int64_t W = Vec<T>::size();
  const int64_t Dw = D / W * W, tail = D - Dw;
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    const T *q0 = q + r * D, *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
    int64_t jj = 0;
    for (; jj + 2 <= nb; jj += 2) {
      const in_t *k = kp[jj], *k2 = kp[jj + 1];
      Vec<T> a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0)), b0(T(0)), b1(T(0)), b2(T(0)), b3(T(0));
      auto step = [&](int64_t c, int64_t n) {
        const Vec<T> kv = load_acc<T>(k + c, n), kw = load_acc<T>(k2 + c, n);
        const Vec<T> x0 = Vec<T>::loadu(q0 + c, n), x1 = Vec<T>::loadu(q1 + c, n);
        const Vec<T> x2 = Vec<T>::loadu(q2 + c, n), x3 = Vec<T>::loadu(q3 + c, n);
        a0 = at::vec::fmadd(x0, kv, a0);
        b0 = at::vec::fmadd(x0, kw, b0);
        a1 = at::vec::fmadd(x1, kv, a1);
        b1 = at::vec::fmadd(x1, kw, b1);
        a2 = at::vec::fmadd(x2, kv, a2);
        b2 = at::vec::fmadd(x2, kw, b2);
        a3 = at::vec::fmadd(x3, kv, a3);
        b3 = at::vec::fmadd(x3, kw, b3);
      };
      for (int64_t c = 0; c < Dw; c += W) step(c, W);
      if (tail) step(Dw, tail);
      const Vec<T> all[8] = {a0, a1, a2, a3, b0, b1, b2, b3};
      T sums[8];
      hsum8(all, sums);
      T* o = s + r * kBlockK + jj;
      for (int k = 0; k < 4; ++k) {
        o[k * kBlockK] = sums[k];
        o[k * kBlockK + 1] = sums[k + 4];
      }
    }
    for (; jj < nb; ++jj) {
      const in_t* k = kp[jj];
      Vec<T> a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
      auto step = [&](int64_t c, int64_t n) {
        const Vec<T> kv = load_acc<T>(k + c, n);
        a0 = at::vec::fmadd(Vec<T>::loadu(q0 + c, n), kv, a0);
        a1 = at::vec::fmadd(Vec<T>::loadu(q1 + c, n), kv, a1);
        a2 = at::vec::fmadd(Vec<T>::loadu(q2 + c, n), kv, a2);
        a3 = at::vec::fmadd(Vec<T>::loadu(q3 + c, n), kv, a3);
      };
      for (int64_t c = 0; c < Dw; c += W) step(c, W);
      if (tail) step(Dw, tail);
      s[r * kBlockK + jj] = hsum(a0);
      s[(r + 1) * kBlockK + jj] = hsum(a1);
      s[(r + 2) * kBlockK + jj] = hsum(a2);
      s[(r + 3) * kBlockK + jj] = hsum(a3);
    }
  }
  for (; r < R; ++r) {
    const T* q0 = q + r * D;
    for (int64_t jj = 0; jj < nb; ++jj) {
      const in_t* k = kp[jj];
      Vec<T> a0(T(0));
      for (int64_t c = 0; c < Dw; c += W) a0 = at::vec::fmadd(Vec<T>::loadu(q0 + c), load_acc<T>(k + c, W), a0);
      if (tail) a0 = at::vec::fmadd(Vec<T>::loadu(q0 + Dw, tail), load_acc<T>(k + Dw, tail), a0);
      s[r * kBlockK + jj] = hsum(a0);
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// bfloat16 scores on CPUs with AVX512-BF16: VDPBF16PS multiplies bf16 pairs exactly into float32
// and accumulates in float32, so q . k needs no widened copy of K and half the multiply
// instructions; the result is the float32 path's up to summation order (and denormal flushing).
// q holds the raw (unscaled, bf16) query rows; scale is applied to the sums. D % 32 == 0.
inline bool have_avx512_bf16() {
  static const bool yes = __builtin_cpu_supports("avx512bf16");
  return yes;
}

__attribute__((target("avx512bf16"), always_inline)) inline __m512 dot(__m512 acc, const c10::BFloat16* a,
                                                                       const c10::BFloat16* b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a), (__m512bh)_mm512_loadu_si512(b));
}

__attribute__((target("avx512bf16"))) void block_scores_bf16(const c10::BFloat16* q, int64_t R, int64_t D,
                                                              const c10::BFloat16* const* kp, int64_t nb,
                                                              float scale, float* s) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    const c10::BFloat16 *q0 = q + r * D, *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
    int64_t jj = 0;
    for (; jj + 2 <= nb; jj += 2) {
      const c10::BFloat16 *k = kp[jj], *k2 = kp[jj + 1];
      Vec<float> v[8];
      for (auto& x : v) x = Vec<float>(0.f);
      __m512 a0 = v[0], a1 = v[0], a2 = v[0], a3 = v[0], b0 = v[0], b1 = v[0], b2 = v[0], b3 = v[0];
      for (int64_t c = 0; c < D; c += 32) {
        a0 = dot(a0, q0 + c, k + c);
        b0 = dot(b0, q0 + c, k2 + c);
        a1 = dot(a1, q1 + c, k + c);
        b1 = dot(b1, q1 + c, k2 + c);
        a2 = dot(a2, q2 + c, k + c);
        b2 = dot(b2, q2 + c, k2 + c);
        a3 = dot(a3, q3 + c, k + c);
        b3 = dot(b3, q3 + c, k2 + c);
      }
      v[0] = a0, v[1] = a1, v[2] = a2, v[3] = a3, v[4] = b0, v[5] = b1, v[6] = b2, v[7] = b3;
      float sums[8];
      hsum8<float>(v, sums);
      float* o = s + r * kBlockK + jj;
      for (int k4 = 0; k4 < 4; ++k4) {
        o[k4 * kBlockK] = sums[k4] * scale;
        o[k4 * kBlockK + 1] = sums[k4 + 4] * scale;
      }
    }
    for (; jj < nb; ++jj) {
      for (int64_t rr = r; rr < r + 4; ++rr) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t c = 0; c < D; c += 32) a = dot(a, q + rr * D + c, kp[jj] + c);
        s[rr * kBlockK + jj] = _mm512_reduce_add_ps(a) * scale;
      }
    }
  }
  for (; r < R; ++r) {
    for (int64_t jj = 0; jj < nb; ++jj) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t c = 0; c < D; c += 32) a = dot(a, q + r * D + c, kp[jj] + c);
      s[r * kBlockK + jj] = _mm512_reduce_add_ps(a) * scale;
    }
  }
}
#endif

// acc_r = alpha_r acc_r + sum_jj P[r][jj] V_jj, four rows at a time share each V load. Full
// groups of kGroup vectors of Dv keep 4 x kGroup accumulators in registers across the block's
// keys, so each probability is broadcast once per group instead of once per vector (AVX512:
// 16 accumulators + 4 broadcasts + 4 V vectors of 32 registers; AVX2: half, of 16). Half V rows
// are widened as they are loaded.
template <typename T, typename in_t>
void block_pv(const T* pr, const T* alpha, int64_t R, int64_t Dv, const in_t* const* vp, int64_t nb, T* acc) {
  constexpr int64_t W = Vec<T>::size();
  constexpr int kGroup = Vec<float>::size() >= 16 ? 4 : 2;
  const int64_t Dg = Dv / (W * kGroup) * (W * kGroup);
  const int64_t Dw = Dv / W * W, tail = Dv - Dw;
  int64_t r = 0;
  auto rows4_group = [&](int64_t c) {
    Vec<T> a[4][kGroup];
    const T* p[4];
    for (int i = 0; i < 4; ++i) {
      const Vec<T> al(alpha[r + i]);
      for (int g = 0; g < kGroup; ++g) a[i][g] = Vec<T>::loadu(acc + (r + i) * Dv + c + g * W) * al;
      p[i] = pr + (r + i) * kBlockK;
    }
    for (int64_t jj = 0; jj < nb; ++jj) {
      Vec<T> vv[kGroup];
      for (int g = 0; g < kGroup; ++g) vv[g] = load_acc<T>(vp[jj] + c + g * W, W);
      for (int i = 0; i < 4; ++i) {
        const Vec<T> pi(p[i][jj]);
        for (int g = 0; g < kGroup; ++g) a[i][g] = at::vec::fmadd(pi, vv[g], a[i][g]);
      }
    }
    for (int i = 0; i < 4; ++i)
      for (int g = 0; g < kGroup; ++g) a[i][g].store(acc + (r + i) * Dv + c + g * W);
  };
  auto rows4 = [&](int64_t c, int64_t n) {
    T *c0 = acc + r * Dv + c, *c1 = c0 + Dv, *c2 = c1 + Dv, *c3 = c2 + Dv;
    Vec<T> a0 = Vec<T>::loadu(c0, n) * Vec<T>(alpha[r]), a1 = Vec<T>::loadu(c1, n) * Vec<T>(alpha[r + 1]),
           a2 = Vec<T>::loadu(c2, n) * Vec<T>(alpha[r + 2]), a3 = Vec<T>::loadu(c3, n) * Vec<T>(alpha[r + 3]);
    const T *p0 = pr + r * kBlockK, *p1 = p0 + kBlockK, *p2 = p1 + kBlockK, *p3 = p2 + kBlockK;
    for (int64_t jj = 0; jj < nb; ++jj) {
      const Vec<T> vv = load_acc<T>(vp[jj] + c, n);
      a0 = at::vec::fmadd(Vec<T>(p0[jj]), vv, a0);
      a1 = at::vec::fmadd(Vec<T>(p1[jj]), vv, a1);
      a2 = at::vec::fmadd(Vec<T>(p2[jj]), vv, a2);
      a3 = at::vec::fmadd(Vec<T>(p3[jj]), vv, a3);
    }
    a0.store(c0, n);
    a1.store(c1, n);
    a2.store(c2, n);
    a3.store(c3, n);
  };
  auto row1 = [&](int64_t c, int64_t n) {
    T* c0 = acc + r * Dv + c;
    Vec<T> a0 = Vec<T>::loadu(c0, n) * Vec<T>(alpha[r]);
    const T* p0 = pr + r * kBlockK;
    for (int64_t jj = 0; jj < nb; ++jj) a0 = at::vec::fmadd(Vec<T>(p0[jj]), load_acc<T>(vp[jj] + c, n), a0);
    a0.store(c0, n);
  };
  for (; r + 4 <= R; r += 4) {
    for (int64_t c = 0; c < Dg; c += W * kGroup) rows4_group(c);
    for (int64_t c = Dg; c < Dw; c += W) rows4(c, W);
    if (tail) rows4(Dw, tail);
  }
  for (; r < R; ++r) {
    for (int64_t c = 0; c < Dw; c += W) row1(c, W);
    if (tail) row1(Dw, tail);
  }
}

// The online softmax of one row over a block of scores s[0 .. nb) (keys j0 ..): variants, masks,
// then s <- exp(s - m_new) in place; returns alpha = exp(m_old - m_new) and updates (m, l).
template <typename T>
T row_softmax(T* s, int64_t nb, int64_t j0, int64_t d, int64_t rb, int64_t re,
              T softcap, T slope, T& m, T& l) {
  constexpr int64_t W = Vec<T>::size();
  const bool variant = softcap > T(0) || slope != T(0);
  const bool masked = j0 < rb || j0 + nb > re;
  T bmax = neg_inf<T>();
  if (variant || masked) {
    for (int64_t jj = 0; jj < nb; ++jj) {
      const int64_t j = j0 + jj;
      T x = (j < rb || j >= re) ? neg_inf<T>() : kvcache::transform_score<T>(s[jj], T(1), softcap, slope, d, j);
      s[jj] = x;
      bmax = softmax::nan_max(bmax, x);
    }
  } else {
    // vector maxima, then one reduction: the scalar chain of compares over the block was a
    // third of the kernel's time on a cached K/V (at::vec::maximum propagates NaN as nan_max)
    int64_t jj = 0;
    if (nb >= W) {
      Vec<T> vm = Vec<T>::loadu(s);
      for (jj = W; jj + W <= nb; jj += W) vm = at::vec::maximum(vm, Vec<T>::loadu(s + jj));
      bmax = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, vm);
    }
    for (; jj < nb; ++jj) bmax = softmax::nan_max(bmax, s[jj]);
  }
  const T m_new = softmax::nan_max(m, bmax);
  if (m_new == neg_inf<T>()) {  // nothing attendable yet: P = 0, sums stay 0
    for (int64_t jj = 0; jj < nb; ++jj) s[jj] = T(0);
    return T(1);
  }
  const T alpha = m == neg_inf<T>() ? T(0) : softmax::exp_(m - m_new);
  const Vec<T> mv(m_new);
  Vec<T> sum(T(0));
  int64_t jj = 0;
  for (; jj + W <= nb; jj += W) {
    const Vec<T> e = (Vec<T>::loadu(s + jj) - mv).exp();
    e.store(s + jj);
    sum = sum + e;
  }
  T tail = hsum(sum);
  for (; jj < nb; ++jj) {
    const T e = softmax::exp_(s[jj] - m_new);
    s[jj] = e;
    tail += e;
  }
  l = l * alpha + tail;
  m = m_new;
  return alpha;
}

// The cache rows of keys [j0, j0 + nb) of sequence b, kv head h: one block_table lookup per
// page the block touches, then consecutive rows of that page.
template <typename in_t>
void block_rows(const KVCacheParams<in_t>& p, int64_t b, int64_t h, int64_t j0, int64_t nb, const in_t** kr,
                const in_t** vr) {
  const in_t* kc = p.k_cache;
  const in_t* vc = p.v_cache;
  for (int64_t jj = 0; jj < nb;) {
    const int64_t j = j0 + jj, page = page_of(p, b, j), row = j % p.page_size;
    const int64_t run = std::min(p.page_size - row, nb - jj);
    const in_t* k = cache_row(kc, p.k_stride, page, h, row);
    const in_t* v = cache_row(vc, p.v_stride, page, h, row);
    for (int64_t i = 0; i < run; ++i, ++jj) {
      kr[jj] = k + i * p.k_stride[2];
      vr[jj] = v + i * p.v_stride[2];
    }
  }
}

// One task: sequence b, kv head h, split `split` of `n_split`; writes the unnormalised partial
// rows (R x Dv) and their (m, l).
template <typename in_t>
void attend_split(const KVCacheParams<in_t>& p, int64_t b, int64_t h, int64_t split, int64_t n_split,
                  Work<acc_t<in_t>, in_t>& w, acc_t<in_t>* acc, acc_t<in_t>* pm, acc_t<in_t>* pl) {
  using T = acc_t<in_t>;
  const int64_t G = p.Hq / p.Hkv, R = G * p.Lq, D = p.D, Dv = p.Dv;
  const int64_t Lk = p.cache_seqlens[b] + (p.k_new ? p.Lq : 0);
  const int64_t d0 = Lk - p.Lq;  // diagonal of row i is d0 + i
  const int64_t begin = kvcache::key_begin(d0, p.window_left);
  const int64_t end = kvcache::key_end(d0 + p.Lq - 1, Lk, p.causal, p.window_right);
  int64_t lo, hi;
  kvcache::split_range(begin, end, split, n_split, kBlockK, &lo, &hi);
  std::fill(acc, acc + R * Dv, T(0));
  for (int64_t r = 0; r < R; ++r) {
    pm[r] = neg_inf<T>();
    pl[r] = T(0);
  }
  if (lo >= hi) return;
  // the rows of query heads h*G .. h*G + G - 1, positions 0 .. Lq - 1: contiguous in q
  const in_t* q_rows = p.q + (b * p.Hq + h * G) * p.Lq * D;
  to_acc(q_rows, w.q.data(), R * D);
  for (int64_t i = 0; i < R * D; ++i) w.q[i] *= p.scale;
#if defined(CPU_CAPABILITY_AVX512)
  bool dp_bf16 = false;
  if constexpr (std::is_same_v<in_t, c10::BFloat16>) dp_bf16 = D % 32 == 0 && have_avx512_bf16();
#endif
  for (int64_t j0 = lo; j0 < hi; j0 += kBlockK) {
    const int64_t nb = std::min(kBlockK, hi - j0);
    block_rows(p, b, h, j0, nb, w.kp.data(), w.vp.data());
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<in_t, c10::BFloat16>) {
      if (dp_bf16) {
        block_scores_bf16(q_rows, R, D, w.kp.data(), nb, p.scale, w.s.data());
      } else {
        block_scores<T>(w.q.data(), R, D, w.kp.data(), nb, w.s.data());
      }
    } else {
      block_scores<T>(w.q.data(), R, D, w.kp.data(), nb, w.s.data());
    }
#else
    block_scores<T>(w.q.data(), R, D, w.kp.data(), nb, w.s.data());
#endif
    for (int64_t r = 0; r < R; ++r) {
      const int64_t g = r / p.Lq, i = r % p.Lq, d = d0 + i;
      const T slope = p.alibi ? p.alibi[b * p.alibi_b_stride + h * G + g] : T(0);
      w.alpha[r] = row_softmax<T>(w.s.data() + r * kBlockK, nb, j0, d, kvcache::key_begin(d, p.window_left),
                                  kvcache::key_end(d, Lk, p.causal, p.window_right), p.softcap, slope, pm[r],
                                  pl[r]);
    }
    block_pv<T>(w.s.data(), w.alpha.data(), R, Dv, w.vp.data(), nb, acc);
  }
}

template <typename in_t>
void run(const KVCacheParams<in_t>& p, const KVCacheOut<in_t>& o) {
  using T = acc_t<in_t>;
  append(p);
  const int64_t G = p.Hq / p.Hkv, R = G * p.Lq, S = std::max<int64_t>(p.num_splits, 1);
  const int64_t tasks = p.B * p.Hkv * S;
  std::vector<T> acc(tasks * R * p.Dv), m(tasks * R), l(tasks * R);
  // Tasks are handed out one at a time from a shared counter rather than in fixed shares: on a
  // shared machine one thread is often descheduled for a while, and the others then take its
  // remaining tasks instead of waiting for it. Each task writes only its own partials, so the
  // result does not depend on which thread ran what.
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), tasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Work<T, in_t> w(R, p.D);
    for (int64_t t = next++; t < tasks; t = next++) {
      const int64_t bh = t / S;
      attend_split(p, bh / p.Hkv, bh % p.Hkv, t % S, S, w, acc.data() + t * R * p.Dv, m.data() + t * R,
                   l.data() + t * R);
    }
  });
  // merge the splits of each row (sink included), normalise and round once: O(splits x rows x
  // Dv), in parallel only when that is worth a second parallel region
  const int64_t merge_work = tasks * R * p.Dv;
  at::parallel_for(0, p.B * p.Hkv, merge_work >= (int64_t{1} << 18) ? 1 : p.B * p.Hkv + 1,
                   [&](int64_t begin, int64_t end) {
    std::vector<T> row(p.Dv);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.Hkv, h = bh % p.Hkv;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t g = r / p.Lq, i = r % p.Lq, hq = h * G + g;
        kvcache::SplitMerge<T> mg;
        mg.init(p.sinks != nullptr, p.sinks ? p.sinks[hq] : T(0));
        for (int64_t s = 0; s < S; ++s) mg.add(m[(bh * S + s) * R + r], l[(bh * S + s) * R + r]);
        std::fill(row.begin(), row.end(), T(0));
        for (int64_t s = 0; s < S; ++s) {
          const T wgt = mg.weight(m[(bh * S + s) * R + r]);
          if (wgt == T(0)) continue;
          const T* a = acc.data() + ((bh * S + s) * R + r) * p.Dv;
          at::vec::map2<T>([wgt](Vec<T> x, Vec<T> y) { return at::vec::fmadd(y, Vec<T>(wgt), x); }, row.data(),
                           row.data(), a, p.Dv);
        }
        const int64_t orow = (b * p.Hq + hq) * p.Lq + i;
        store_scaled<in_t>(row.data(), T(1), o.out + orow * p.Dv, p.Dv);
        o.lse[orow] = mg.lse();
      }
    }
  });
}

}  // namespace

void kvcache_attention_kernel(const KVCacheParams<float>& p, const KVCacheOut<float>& o) {
  run(p, o);
}
void kvcache_attention_kernel(const KVCacheParams<double>& p, const KVCacheOut<double>& o) {
  run(p, o);
}
void kvcache_attention_kernel(const KVCacheParams<c10::Half>& p, const KVCacheOut<c10::Half>& o) {
  run(p, o);
}
void kvcache_attention_kernel(const KVCacheParams<c10::BFloat16>& p, const KVCacheOut<c10::BFloat16>& o) {
  run(p, o);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace pyattn
