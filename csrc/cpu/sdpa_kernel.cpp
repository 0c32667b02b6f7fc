// Fused scaled-dot-product attention on the CPU (flash-attention style), compiled once per
// instruction set (setup.py builds this file with -DCPU_CAPABILITY=DEFAULT / AVX2 / AVX512 and
// the matching -m flags; csrc/sdpa.cpp picks one at run time). Only at::vec and
// at::parallel_for come from ATen here; block matrix products go through flash_gemm (ATen's
// BLAS, defined on the ATen side).
//
// Forward: one task per (batch, head, block of 64 or 256 queries). The task streams key blocks
// of kFwdBlockK keys: S = scale Q K^T on the GEMM, masks applied in place, an online softmax per
// row (flash::RowSoftmax) turns S into exp(S - m) in place, and the running output (kept in the
// output tensor itself) is rescaled and accumulates P V on the GEMM. Causal: key blocks past the
// block's last query are never visited, and only blocks crossing the diagonal are masked per
// element (the two-stage loop); the diagonal is shifted by
// FlashParams::causal_off for the lower-right alignment. Scores never exist beyond one (queries x keys) block.
// Backward: one task per (batch, kv head), so dK and dV of that head and dQ of its query heads
// belong to one task: no atomics, no partial buffers, and a fixed summation order (bitwise
// reproducible); with fewer (batch, kv head) pairs than threads, dK/dV and dQ run as two passes
// over finer tasks instead (see backward()). P is recomputed from the saved lse;
// Delta = rowsum(dO * O) comes precomputed.
// float16 / bfloat16 inputs run the same code in float32: blocks are converted as they are loaded
// (load_block), the output row is rounded once (store_scaled), gradients accumulate in float32
// buffers the caller rounds (docs/design.md, "Half precision on CPU").
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "../sdpa_math.h"
#include "sdpa_kernel.h"
#include "philox_lanes.h"
#include "vec_util.h"

namespace pyattn {
namespace cpu {
namespace CPU_CAPABILITY {

namespace {

// Block sizes: large enough that each GEMM call (through the dispatcher-free at::cpu::addmm_out,
// a few microseconds of overhead) does megaflops of work, small enough that a (queries x keys)
// block of scores and its dP twin stay in L2.
constexpr int64_t kFwdBlockQ = 64;
// Long non-causal rows take 256-query blocks: each key block is packed for the GEMM once per
// query block, and at 64 queries that packing cost ~10% of the forward (L=1024: 0.84x -> 0.96x
// torch's kernel). Causal attention keeps 64: a taller block wastes more of its diagonal block.
constexpr int64_t kFwdBlockQLong = 256;
constexpr int64_t kFwdLongRows = 768;
// Shorter non-causal float32/float64 rows take 128: at L=128 and 512 (D 64, 128) the forward ran
// 3-9% faster than at 64 (one thread, interleaved subprocess rounds); bfloat16 measured no better.
constexpr int64_t kFwdBlockQMid = 128;
constexpr int64_t kFwdBlockK = 512;
constexpr int64_t kBwdBlockK = 256;
// The backward's query blocks: 256 rows for float32 / float64, whose five products per tile ran
// 2-8% faster than at 128 (fwd+bwd, L 512-4096, D 64/128, causal and not; one thread), 128 for
// half inputs, where 256 measured no better.
template <typename in_t>
constexpr int64_t kBwdBlockQ = kHalf<in_t> ? 128 : 256;

// Half inputs (float16 / bfloat16) run the same blocked algorithm in float32: each block of Q, K,
// V or dO is converted to float32 as it is loaded (into a per-task buffer; cheap beside the block
// GEMMs that read it), the output is rounded to the input dtype once, at the end of its row.
// Float32 / float64 inputs are read in place (load_block returns the pointer itself).
// (Vec, kHalf, to_acc, store_scaled: cpu/vec_util.h.)

// n elements at src, as acc_t: src itself for float32 / float64, else converted into buf.
template <typename in_t>
inline const acc_t<in_t>* load_block(const in_t* src, int64_t n, acc_t<in_t>* buf) {
  if constexpr (kHalf<in_t>) {
    to_acc(src, buf, n);
    return buf;
  } else {
    (void)buf;
    (void)n;
    return src;
  }
}

// The score mods of the variants on one row of n scaled scores, keys j0 .. j0 + n - 1 of query i
// (docs/design.md, "Attention variants"): softcap c tanh(s / c) (its derivative 1 - tanh^2 into g
// when g is given, for the backward), then ALiBi -slope |i + Lk - Lq - j|.
template <typename in_t, typename T>
inline void variant_row(const FlashParams<in_t>& p, int64_t b, int64_t h, int64_t i, int64_t j0,
                        int64_t n, T* s, T* g) {
  if (p.softcap > T(0)) {
    const T c = p.softcap, inv = T(1) / c;
    at::vec::map<T>([c, inv](Vec<T> x) { return (x * Vec<T>(inv)).tanh() * Vec<T>(c); }, s, s, n);
    if (g != nullptr) {
      at::vec::map<T>([inv](Vec<T> x) {
        const Vec<T> t = x * Vec<T>(inv);
        return Vec<T>(T(1)) - t * t;
      }, g, s, n);
    }
  }
  if (p.alibi != nullptr) {
    const T slope = p.alibi[b * p.alibi_bstride + h];
    const int64_t d = i + p.alibi_off - j0;  // the bias of column c is -slope |d - c|
    for (int64_t c = 0; c < n; ++c) s[c] -= slope * static_cast<T>(d > c ? d - c : c - d);
  }
}

template <typename in_t>
inline bool has_score_mods(const FlashParams<in_t>& p) {
  return p.softcap > acc_t<in_t>(0) || p.alibi != nullptr;
}

// Applies the causal and window band (banded: the block cuts some row's band) and the user mask
// to one row of n scores for keys j0 .. j0 + n - 1 of query i.
template <typename in_t, typename T>
inline void mask_row(const FlashParams<in_t>& p, int64_t b, int64_t h, int64_t i, int64_t j0,
                     int64_t n, bool banded, T* s) {
  if (banded) {
    // keys outside [lo, hi) are masked (an empty band, hi <= lo, masks the whole row)
    const int64_t lo = std::max<int64_t>(0, std::min<int64_t>(n, p.band.lo(i) - j0));
    const int64_t hi = std::max<int64_t>(0, std::min<int64_t>(n, p.band.hi(i) - j0));
    std::fill(s, s + lo, neg_inf<T>());
    std::fill(s + std::max(hi, lo), s + n, neg_inf<T>());
    if (hi < lo) std::fill(s, s + n, neg_inf<T>());
  }
  if (p.mask_kind == flash::kNoMask) return;
  const int64_t base = b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2];
  const int64_t sj = p.mask_stride[3];
  if (p.mask_kind == flash::kBoolMask) {
    const bool* mrow = p.bool_mask + base + j0 * sj;
    for (int64_t c = 0; c < n; ++c) s[c] = flash::apply_bool_mask(s[c], mrow[c * sj]);
    return;
  }
  if constexpr (kHalf<in_t>) {
    if (p.add_mask_float != nullptr) {
      const float* mrow = p.add_mask_float + base + j0 * sj;
      if (sj == 1) {
        at::vec::map2<float>([](Vec<float> x, Vec<float> y) { return x + y; }, s, s, mrow, n);
      } else {
        for (int64_t c = 0; c < n; ++c) s[c] += mrow[c * sj];
      }
      return;
    }
    const in_t* mrow = p.add_mask + base + j0 * sj;
    for (int64_t c = 0; c < n; ++c) s[c] += static_cast<float>(mrow[c * sj]);
  } else {
    const T* mrow = p.add_mask + base + j0 * sj;
    if (sj == 1) {
      at::vec::map2<T>([](Vec<T> x, Vec<T> y) { return x + y; }, s, s, mrow, n);
    } else {
      for (int64_t c = 0; c < n; ++c) s[c] += mrow[c * sj];
    }
  }
}

// The largest of n scores; NaN wins (flash::nan_max), so a NaN poisons its row. Four running
// maxima: one chain of maximum() (max, then NaN test and or) per vector was latency-bound.
template <typename T>
inline T row_max(const T* s, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> lowest(neg_inf<T>());
  Vec<T> a0 = lowest, a1 = lowest, a2 = lowest, a3 = lowest;
  int64_t c = 0;
  for (; c + 4 * W <= n; c += 4 * W) {
    a0 = at::vec::maximum(a0, Vec<T>::loadu(s + c));
    a1 = at::vec::maximum(a1, Vec<T>::loadu(s + c + W));
    a2 = at::vec::maximum(a2, Vec<T>::loadu(s + c + 2 * W));
    a3 = at::vec::maximum(a3, Vec<T>::loadu(s + c + 3 * W));
  }
  for (; c + W <= n; c += W) a0 = at::vec::maximum(a0, Vec<T>::loadu(s + c));
  a0 = at::vec::maximum(at::vec::maximum(a0, a1), at::vec::maximum(a2, a3));
  T mx = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, a0);
  for (; c < n; ++c) mx = flash::nan_max(mx, s[c]);
  return mx;
}

// s = exp(s - ref) in place; returns the sum. -inf scores (masked) give exactly 0.
template <typename T>
inline T exp_sub_sum(T* s, T ref, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vref(ref);
  Vec<T> acc0(T(0)), acc1(T(0));  // two sums: one add chain was latency-bound
  int64_t c = 0;
  for (; c + 2 * W <= n; c += 2 * W) {
    const Vec<T> e0 = (Vec<T>::loadu(s + c) - vref).exp();
    const Vec<T> e1 = (Vec<T>::loadu(s + c + W) - vref).exp();
    e0.store(s + c);
    e1.store(s + c + W);
    acc0 = acc0 + e0;
    acc1 = acc1 + e1;
  }
  for (; c + W <= n; c += W) {
    const Vec<T> e = (Vec<T>::loadu(s + c) - vref).exp();
    e.store(s + c);
    acc0 = acc0 + e;
  }
  T sum = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, acc0 + acc1);
  for (; c < n; ++c) {
    s[c] = flash::exp_(s[c] - ref);
    sum += s[c];
  }
  return sum;
}

// s = exp(s - ref) in place, where ref may be +inf (an empty row: every P is 0).
template <typename T>
inline void exp_sub(T* s, T ref, int64_t n) {
  if (ref == pos_inf<T>()) {
    std::fill(s, s + n, T(0));
    return;
  }
  at::vec::map<T>([ref](Vec<T> x) { return (x - Vec<T>(ref)).exp(); }, s, s, n);
}

#if defined(CPU_CAPABILITY_AVX512)
// e^d for 16 float32 lanes, for the float32 softmax (d = s - max <= 0): n = round(d log2(e)),
// r = d - n ln2 in two steps (Cody-Waite: ln2's high part is exact in 16 bits), e^r by a
// degree-6 polynomial on [-ln2/2, ln2/2] fitted here for relative error (1.9e-9; 1.6 ulp after
// float32 Horner), scaled by 2^n with vscalefps. Twelve instructions where Sleef's 1-ulp exp takes
// about thirty, within the float32 tests' budget, which exp2_poly's 2.7e-6 (45 ulp) was not.
// Lanes below -104 (e^d under float32's smallest denormal; masked -inf scores) give exactly 0;
// NaN stays NaN.
inline __m512 exp_f32(__m512 d) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(d, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), d);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.0013836845755577087f), r,
                             _mm512_set1_ps(0.008374815806746483f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.04166822507977486f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.16666419804096222f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.49999991059303284f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __mmask16 zero = _mm512_cmp_ps_mask(d, _mm512_set1_ps(-104.0f), _CMP_LT_OQ);
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~zero), p, n);
}

// exp_sub_sum and exp_sub for float32 on AVX512, with exp_f32 (the template versions above
// serve float64 and the other builds). A row's tail goes through masked loads: its missing
// lanes read -inf, whose weight is 0.
inline __mmask16 lanes_left(int64_t k) {
  return k >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << k) - 1u);
}

inline float exp_sub_sum(float* s, float ref, int64_t n) {
  const __m512 vref = _mm512_set1_ps(ref), ninf = _mm512_set1_ps(neg_inf<float>());
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    const __m512 e0 = exp_f32(_mm512_sub_ps(_mm512_loadu_ps(s + c), vref));
    const __m512 e1 = exp_f32(_mm512_sub_ps(_mm512_loadu_ps(s + c + 16), vref));
    _mm512_storeu_ps(s + c, e0);
    _mm512_storeu_ps(s + c + 16, e1);
    acc0 = _mm512_add_ps(acc0, e0);
    acc1 = _mm512_add_ps(acc1, e1);
  }
  for (; c < n; c += 16) {
    const __mmask16 m = lanes_left(n - c);
    const __m512 e = exp_f32(_mm512_sub_ps(_mm512_mask_loadu_ps(ninf, m, s + c), vref));
    _mm512_mask_storeu_ps(s + c, m, e);
    acc0 = _mm512_add_ps(acc0, e);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

inline void exp_sub(float* s, float ref, int64_t n) {
  if (ref == pos_inf<float>()) {
    std::fill(s, s + n, 0.0f);
    return;
  }
  const __m512 vref = _mm512_set1_ps(ref), ninf = _mm512_set1_ps(neg_inf<float>());
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 m = lanes_left(n - c);
    _mm512_mask_storeu_ps(s + c, m, exp_f32(_mm512_sub_ps(_mm512_mask_loadu_ps(ninf, m, s + c), vref)));
  }
}
#endif

#if defined(CPU_CAPABILITY_AVX2)
// exp_f32 for 8 float32 lanes (the AVX2 build): the same reduction and polynomial, so the same
// 1.6 ulp; AVX2 has no vscalefps, so 2^n is built in the exponent field, in two halves (2^(n/2)
// twice) so that n from -150 to 128 scales as vscalefps does: denormal results near -104,
// infinity past 88.7. Lanes below -104 (masked -inf scores) give exactly 0; NaN stays NaN.
// Sleef's 1-ulp exp, which at::vec's exp() runs here, takes about twice the instructions.
inline __m256 exp_f32(__m256 d) {
  // past 89 every result is infinity; vminps returns its second operand where either is NaN
  const __m256 dc = _mm256_min_ps(_mm256_set1_ps(89.0f), d);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(dc, _mm256_set1_ps(1.4426950408889634f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), dc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(0.0013836845755577087f), r,
                             _mm256_set1_ps(0.008374815806746483f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.04166822507977486f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.16666419804096222f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.49999991059303284f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  const __m256 e = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  return _mm256_andnot_ps(_mm256_cmp_ps(d, _mm256_set1_ps(-104.0f), _CMP_LT_OQ), e);
}

// The first k of 8 lanes, as an AVX2 load / store mask.
inline __m256i lanes_left8(int64_t k) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(k, 8))), idx);
}

// 8 scores from s, the lanes past k reading -inf (whose weight is 0 and which leave a max alone).
inline __m256 load_left8(const float* s, int64_t k) {
  if (k >= 8) return _mm256_loadu_ps(s);
  const __m256i m = lanes_left8(k);
  return _mm256_blendv_ps(_mm256_set1_ps(neg_inf<float>()), _mm256_maskload_ps(s, m),
                          _mm256_castsi256_ps(m));
}

inline float reduce_add8(__m256 x) {
  __m128 v = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}

// exp_sub_sum and exp_sub for float32 in the AVX2 build, with the AVX2 exp_f32.
inline float exp_sub_sum(float* s, float ref, int64_t n) {
  const __m256 vref = _mm256_set1_ps(ref);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m256 e0 = exp_f32(_mm256_sub_ps(_mm256_loadu_ps(s + c), vref));
    const __m256 e1 = exp_f32(_mm256_sub_ps(_mm256_loadu_ps(s + c + 8), vref));
    _mm256_storeu_ps(s + c, e0);
    _mm256_storeu_ps(s + c + 8, e1);
    acc0 = _mm256_add_ps(acc0, e0);
    acc1 = _mm256_add_ps(acc1, e1);
  }
  for (; c < n; c += 8) {
    const __m256 e = exp_f32(_mm256_sub_ps(load_left8(s + c, n - c), vref));
    _mm256_maskstore_ps(s + c, lanes_left8(n - c), e);
    acc0 = _mm256_add_ps(acc0, e);
  }
  return reduce_add8(_mm256_add_ps(acc0, acc1));
}

inline void exp_sub(float* s, float ref, int64_t n) {
  if (ref == pos_inf<float>()) {
    std::fill(s, s + n, 0.0f);
    return;
  }
  const __m256 vref = _mm256_set1_ps(ref);
  for (int64_t c = 0; c < n; c += 8) {
    _mm256_maskstore_ps(s + c, lanes_left8(n - c),
                        exp_f32(_mm256_sub_ps(load_left8(s + c, n - c), vref)));
  }
}
#endif

// The native half path's row pass (no mask on the row): s = scale * s in place; returns the max
// (four running maxima, as row_max).
inline float scale_max(float* s, float scale, int64_t n) {
  using V = Vec<float>;
  constexpr int64_t W = V::size();
  const V vs(scale), lowest(neg_inf<float>());
  V a0 = lowest, a1 = lowest, a2 = lowest, a3 = lowest;
  int64_t c = 0;
  for (; c + 4 * W <= n; c += 4 * W) {
    const V x0 = V::loadu(s + c) * vs, x1 = V::loadu(s + c + W) * vs;
    const V x2 = V::loadu(s + c + 2 * W) * vs, x3 = V::loadu(s + c + 3 * W) * vs;
    x0.store(s + c);
    x1.store(s + c + W);
    x2.store(s + c + 2 * W);
    x3.store(s + c + 3 * W);
    a0 = at::vec::maximum(a0, x0);
    a1 = at::vec::maximum(a1, x1);
    a2 = at::vec::maximum(a2, x2);
    a3 = at::vec::maximum(a3, x3);
  }
  for (; c + W <= n; c += W) {
    const V x = V::loadu(s + c) * vs;
    x.store(s + c);
    a0 = at::vec::maximum(a0, x);
  }
  a0 = at::vec::maximum(at::vec::maximum(a0, a1), at::vec::maximum(a2, a3));
  float mx = at::vec::vec_reduce_all<float>([](V& a, V& b) { return at::vec::maximum(a, b); }, a0);
  for (; c < n; ++c) {
    s[c] *= scale;
    mx = flash::nan_max(mx, s[c]);
  }
  return mx;
}

constexpr float kLog2e = 1.4426950408889634f;

#if defined(CPU_CAPABILITY_AVX512)
// 2^t for 16 float32 lanes, for the half paths' weights (rounded to 8 or 11 bits of mantissa
// right after, or meeting rounded operands): t = n + f with n = floor(t), f = t - n in [0, 1) from
// one vreduceps, 2^f by a polynomial fitted here for relative error on [0, 1], and p * 2^n by
// vscalefps (which floors its exponent itself). Degree 4: 2.7e-6 in float32 (as ATen's exp_u20),
// for every weight that takes part in float32 arithmetic after (the backward's P, the widened
// path, float16). Degree 3: 7.5e-5, 4% of bfloat16's half ulp, for the weights that are rounded
// to bfloat16 at once and summed (weights_bf16_hw): one FMA less on the pass that costs as much as
// the AMX products. Lanes with t < -126 (masked scores' -inf among them) give exactly 0, so no
// denormal reaches the sums; NaN stays NaN. About nine instructions where exp_u20 takes 25.
template <int kDeg = 4>
inline __m512 exp2_poly(__m512 t) {
  static_assert(kDeg == 3 || kDeg == 4, "exp2_poly: degree 3 or 4");
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p;
  if constexpr (kDeg == 4) {
    p = _mm512_fmadd_ps(_mm512_set1_ps(0.013541007414460182f), f,
                        _mm512_set1_ps(0.051998406648635864f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24145016074180603f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6930027008056641f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000026226043701f));
  } else {
    p = _mm512_fmadd_ps(_mm512_set1_ps(0.07802452892065048f), f,
                        _mm512_set1_ps(0.22606714069843292f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6958335638046265f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999251961708069f));
  }
  const __mmask16 zero = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.0f), _CMP_LT_OQ);
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~zero), p, t);
}

// 2^(s * a - b) for 16 scores at s (a = scale * log2(e), b = max * log2(e)).
inline __m512 weights16(const float* s, __m512 a, __m512 b) {
  return exp2_poly(_mm512_fmsub_ps(_mm512_loadu_ps(s), a, b));
}

// exp_sum_round's loop for bfloat16 on CPUs with AVX512-BF16: vcvtne2ps2bf16 rounds 32 floats to
// nearest-even in one instruction, where at::vec's portable conversion takes about ten integer
// ops (it flushes float32 denormals to zero: weights below 1e-38 of the row's largest become 0).
// Compiled for that extension alone (the AVX512 build has BW, VL and DQ, which the tail's masked
// 16-bit store and exp2_poly's vreduceps use) and called only where cpu_has_bf16_convert(): the
// AVX512 build's other code must run on every AVX512 CPU.
template <bool kMax>
__attribute__((target("avx512bf16"))) float weights_bf16_hw(const float* s, float a, float b,
                                                            int64_t n, c10::BFloat16* p,
                                                            float* raw_max) {
  const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  __m512 mx0 = _mm512_set1_ps(neg_inf<float>()), mx1 = mx0;
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    const __m512 x0 = _mm512_loadu_ps(s + c), x1 = _mm512_loadu_ps(s + c + 16);
    if constexpr (kMax) {
      mx0 = _mm512_max_ps(mx0, x0);
      mx1 = _mm512_max_ps(mx1, x1);
    }
    const __m512 lo = exp2_poly<3>(_mm512_fmsub_ps(x0, va, vb));
    const __m512 hi = exp2_poly<3>(_mm512_fmsub_ps(x1, va, vb));
    acc0 = _mm512_add_ps(acc0, lo);
    acc1 = _mm512_add_ps(acc1, hi);
    const __m512bh r = _mm512_cvtne2ps_pbh(hi, lo);
    _mm512_storeu_si512(reinterpret_cast<void*>(p + c), reinterpret_cast<const __m512i&>(r));
  }
  // the tail (causal and window rows end anywhere) through masked loads that read -inf, whose
  // weight is exactly 0 and which leave the max alone
  const __m512 ninf = _mm512_set1_ps(neg_inf<float>());
  for (; c < n; c += 16) {
    const __mmask16 m = lanes_left(n - c);
    const __m512 x = _mm512_mask_loadu_ps(ninf, m, s + c);
    if constexpr (kMax) mx0 = _mm512_max_ps(mx0, x);
    const __m512 e = exp2_poly<3>(_mm512_fmsub_ps(x, va, vb));
    acc0 = _mm512_add_ps(acc0, e);
    const __m256bh r = _mm512_cvtneps_pbh(e);
    _mm256_mask_storeu_epi16(reinterpret_cast<void*>(p + c), m, reinterpret_cast<const __m256i&>(r));
  }
  if constexpr (kMax) *raw_max = _mm512_reduce_max_ps(_mm512_max_ps(mx0, mx1));
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

inline bool cpu_has_bf16_convert() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}
#endif

// The native half path's softmax pass: P = exp(s * in_scale - ref) rounded to the half dtype
// into p (the float32 row is not kept); returns the float32 sum, taken before rounding as torch
// does (in_scale: 1 for scores already scaled, else the softmax scale, folded in here). With
// raw_max, the same pass also finds the largest of the n scores as read (before in_scale; NaN
// need not win: a NaN score makes the sum NaN anyway). The AVX512 build uses exp2_poly, the
// others ATen's exp_u20 (both a few ulp of float32, far below the half rounding that follows;
// torch's CPU flash kernel uses exp_u20).
template <typename in_t>
inline float exp_sum_round(const float* s, float in_scale, float ref, int64_t n, in_t* p,
                           float* raw_max = nullptr) {
  int64_t c = 0;
  float sum = 0.0f, mx = neg_inf<float>();
#if defined(CPU_CAPABILITY_AVX512)
  const float a = in_scale * kLog2e, b = ref * kLog2e;
  if constexpr (std::is_same_v<in_t, c10::BFloat16>) {
    if (cpu_has_bf16_convert()) {
      // the whole row, tail included: nothing left for the loops below (whose set-up and
      // reductions had been ~7% of this pass at 512 keys)
      if (raw_max != nullptr) return weights_bf16_hw<true>(s, a, b, n, p, raw_max);
      return weights_bf16_hw<false>(s, a, b, n, p, nullptr);
    }
  }
  {
    using V = Vec<float>;
    const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m512 mx0 = _mm512_set1_ps(mx);
    for (; c + 32 <= n; c += 32) {
      if (raw_max != nullptr) {
        mx0 = _mm512_max_ps(mx0, _mm512_max_ps(_mm512_loadu_ps(s + c), _mm512_loadu_ps(s + c + 16)));
      }
      const __m512 lo = weights16(s + c, va, vb), hi = weights16(s + c + 16, va, vb);
      acc0 = _mm512_add_ps(acc0, lo);
      acc1 = _mm512_add_ps(acc1, hi);
      at::vec::convert_from_float<in_t>(V(lo), V(hi)).store(p + c);
    }
    sum += _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    mx = _mm512_reduce_max_ps(mx0);
  }
#else
  {
    using V = Vec<float>;
    constexpr int64_t W = Vec<in_t>::size();  // two float vectors
    const V vref(ref), vs(in_scale);
    V acc0(0.0f), acc1(0.0f), mx0(mx);
    for (; c + W <= n; c += W) {
      const V x0 = V::loadu(s + c), x1 = V::loadu(s + c + V::size());
      if (raw_max != nullptr) mx0 = at::vec::maximum(mx0, at::vec::maximum(x0, x1));
      const V lo = (x0 * vs - vref).exp_u20();
      const V hi = (x1 * vs - vref).exp_u20();
      acc0 = acc0 + lo;
      acc1 = acc1 + hi;
      at::vec::convert_from_float<in_t>(lo, hi).store(p + c);
    }
    sum = at::vec::vec_reduce_all<float>([](V& x, V& y) { return x + y; }, acc0 + acc1);
    mx = at::vec::vec_reduce_all<float>([](V& x, V& y) { return at::vec::maximum(x, y); }, mx0);
  }
#endif
  for (; c < n; ++c) {
    const float e = flash::exp_(s[c] * in_scale - ref);
    sum += e;
    mx = std::max(mx, s[c]);
    p[c] = static_cast<in_t>(e);
  }
  if (raw_max != nullptr) *raw_max = mx;
  return sum;
}

// The float32 forward's lazy row pass (softmax_row_lazy): p = exp(s - ref) into a separate
// buffer (s stays, for the rare pass that moves the reference and redoes the row), the sum
// returned and, with raw_max, the largest score found in the same pass. exp_f32 in the AVX512 and
// AVX2 builds, ATen's 1-ulp exp in the others: the weights keep float32's accuracy.
inline float exp_sum_store(const float* s, float ref, int64_t n, float* p, float* raw_max) {
  int64_t c = 0;
  float sum = 0.0f, mx = neg_inf<float>();
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  {
    using V = Vec<float>;
    constexpr int64_t W = V::size();
    // exp_f32 of this build's register; clamp_min(x, m) is a plain vmaxps (a NaN score need not
    // win the max: its weight makes the sum NaN)
    auto exp_v = [](V d) { return V(exp_f32(d)); };
    const V vref(ref), ninf(neg_inf<float>());
    V acc0(0.0f), acc1(0.0f), mx0 = ninf, mx1 = ninf;
    for (; c + 2 * W <= n; c += 2 * W) {
      const V x0 = V::loadu(s + c), x1 = V::loadu(s + c + W);
      mx0 = at::vec::clamp_min(x0, mx0);
      mx1 = at::vec::clamp_min(x1, mx1);
      const V e0 = exp_v(x0 - vref), e1 = exp_v(x1 - vref);
      e0.store(p + c);
      e1.store(p + c + W);
      acc0 = acc0 + e0;
      acc1 = acc1 + e1;
    }
    for (; c < n; c += W) {
      const int64_t k = std::min(W, n - c);  // the lanes past k read -inf: weight 0
      const V x = k == W ? V::loadu(s + c) : V::set(ninf, V::loadu(s + c, k), k);
      mx0 = at::vec::clamp_min(x, mx0);
      const V e = exp_v(x - vref);
      e.store(p + c, static_cast<int>(k));
      acc0 = acc0 + e;
    }
    sum = at::vec::vec_reduce_all<float>([](V& a, V& b) { return a + b; }, acc0 + acc1);
    mx = at::vec::vec_reduce_all<float>([](V& a, V& b) { return at::vec::clamp_min(a, b); },
                                        at::vec::clamp_min(mx0, mx1));
  }
#endif
  for (; c < n; ++c) {
    p[c] = flash::exp_(s[c] - ref);
    sum += p[c];
    mx = std::max(mx, s[c]);
  }
  if (raw_max != nullptr) *raw_max = mx;
  return sum;
}

// exp_sub_sum / exp_sub for float32 scores, on AVX512 with exp2_poly (about ten instructions a
// vector where Sleef's 1-ulp exp takes about thirty; the tail through exp_f32), else ATen's exp:
// for the widened half path.
inline float exp_sub_sum_fast(float* s, float ref, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 va = _mm512_set1_ps(kLog2e), vb = _mm512_set1_ps(ref * kLog2e);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    const __m512 e0 = weights16(s + c, va, vb), e1 = weights16(s + c + 16, va, vb);
    _mm512_storeu_ps(s + c, e0);
    _mm512_storeu_ps(s + c + 16, e1);
    acc0 = _mm512_add_ps(acc0, e0);
    acc1 = _mm512_add_ps(acc1, e1);
  }
  float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  return sum + exp_sub_sum(s + c, ref, n - c);
#else
  return exp_sub_sum(s, ref, n);
#endif
}

inline void exp_sub_fast(float* s, float ref, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  if (ref == pos_inf<float>()) {
    std::fill(s, s + n, 0.0f);
    return;
  }
  const __m512 va = _mm512_set1_ps(kLog2e), vb = _mm512_set1_ps(ref * kLog2e);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) _mm512_storeu_ps(s + c, weights16(s + c, va, vb));
  exp_sub(s + c, ref, n - c);
#else
  exp_sub(s, ref, n);
#endif
}

// The softmax exp of a row of acc_t scores: exp2_poly where the weights meet half inputs (the
// widened half path: the output is rounded to 8 or 11 bits of mantissa); for float32 inputs
// exp_f32 on AVX512 (exp2_poly's 2.7e-6 put a float32 gradient past the test rule's 3x the
// float32 reference's error), ATen's 1-ulp exp in the other builds and for float64.
template <typename in_t, typename T = acc_t<in_t>>
inline T row_exp_sum(T* s, T ref, int64_t n) {
  if constexpr (kHalf<in_t>) {
    return exp_sub_sum_fast(s, ref, n);
  } else {
    return exp_sub_sum(s, ref, n);
  }
}
template <typename in_t, typename T = acc_t<in_t>>
inline void row_exp(T* s, T ref, int64_t n) {
  if constexpr (kHalf<in_t>) {
    exp_sub_fast(s, ref, n);
  } else {
    exp_sub(s, ref, n);
  }
}

// exp(s - ref) in place (the native half path's backward; ref may be +inf): exp2_poly on AVX512,
// else exp_u20, as exp_sum_round.
inline void exp_sub_u20(float* s, float ref, int64_t n) {
  if (ref == pos_inf<float>()) {
    std::fill(s, s + n, 0.0f);
    return;
  }
  int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 va = _mm512_set1_ps(kLog2e), vb = _mm512_set1_ps(ref * kLog2e);
  for (; c + 16 <= n; c += 16) _mm512_storeu_ps(s + c, weights16(s + c, va, vb));
#endif
  at::vec::map<float>([ref](Vec<float> x) { return (x - Vec<float>(ref)).exp_u20(); }, s + c, s + c,
                      n - c);
}

template <typename T>
inline void scale_row(T* y, T alpha, int64_t n) {
  at::vec::map<T>([alpha](Vec<T> x) { return x * Vec<T>(alpha); }, y, y, n);
}

// Dropout multipliers of scores (bh, i, j0 .. j0 + n - 1): 0 or 1 / (1 - p), with the keep test
// of flash::dropout_scale but the multiplier in T (exact in float64). Half inputs draw the same
// counters as float32 ones, so their keep-masks are identical.
template <typename in_t, typename T>
inline void dropout_row(const FlashParams<in_t>& p, T keep_scale, int64_t bh, int64_t i, int64_t j0,
                        int64_t n, T* z) {
  philox_dropout_row(p.seed,
                     p.offset + flash::dropout_index(p.drop_bh0 + bh, i, j0, p.drop_lq, p.drop_lk),
                     static_cast<float>(p.dropout_p), keep_scale, n, z);
}

// Native half path (N = true; HalfGemm kMkl / kAmx): half blocks are multiplied as they are
// stored, with float32 products; the probabilities (and dS) are rounded to the input dtype before
// the products that read them, as torch's CPU flash kernel does. Otherwise (N = false) operands
// are acc_t: float32 / float64 in place, half blocks widened on load.
template <typename in_t, bool N>
using op_t = std::conditional_t<N, in_t, acc_t<in_t>>;

template <typename in_t, bool N>
inline const op_t<in_t, N>* operand(const in_t* src, int64_t n, acc_t<in_t>* buf) {
  if constexpr (N) {
    (void)n;
    (void)buf;
    return src;
  } else {
    return load_block(src, n, buf);
  }
}

// The block product on the path chosen for the call (csrc/cpu/blas.cpp).
template <typename T>
inline void block_gemm(HalfGemm, bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha,
                       const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  flash_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
template <typename H, typename = std::enable_if_t<!std::is_floating_point_v<H>>>
inline void block_gemm(HalfGemm path, bool ta, bool tb, int64_t m, int64_t n, int64_t k,
                       float alpha, const H* a, int64_t lda, const H* b, int64_t ldb, float beta,
                       float* c, int64_t ldc) {
  flash_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, path);
}

// The path for a half call. Rounding P to the half dtype is what torch's CPU flash kernel does,
// and it takes that kernel only when D == Dv; otherwise torch computes in float32 (its math
// path) and so does this kernel (widened blocks), so that neither is less accurate than torch's.
template <typename in_t>
inline HalfGemm native_path(const FlashParams<in_t>& p, bool forward) {
  const HalfGemm path = half_gemm_path(std::is_same_v<in_t, c10::BFloat16>, forward);
  return p.D == p.Dv ? path : HalfGemm::kWiden;
}

// Per-task buffers: scores (and dP) of one block, dropout multipliers, the float32 copies of
// half blocks (widened path only), and the rounded P and dS of the native half path.
// A vector whose data starts on a cache line (64 bytes): the kernels' blocks are read and written
// in 64-byte vectors and AMX tile rows, each of which then touches one line, not two (malloc
// aligns to 16 bytes only).
template <typename T>
struct LineAllocator {
  using value_type = T;
  LineAllocator() = default;
  template <typename U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const LineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAllocator<U>&) const { return false; }
};
template <typename T>
using LineVector = std::vector<T, LineAllocator<T>>;

template <typename in_t>
struct Work {
  using T = acc_t<in_t>;
  LineVector<T> S, dP, Z, Q, dO, K, V, acc, G;  // G: softcap's 1 - tanh^2 (backward)
  LineVector<in_t> Ph, dSh;
  Work(int64_t s, int64_t dp, int64_t z, bool widen, bool native, int64_t q, int64_t dout,
       int64_t k, int64_t v, int64_t a)
      : S(s), dP(dp), Z(z), Q(widen ? q : 0), dO(widen ? dout : 0), K(widen ? k : 0),
        V(widen ? v : 0), acc(kHalf<in_t> ? a : 0), Ph(native ? s : 0), dSh(native ? dp : 0) {}
};

// A row stride for S and P of at least `elems` (a multiple of per_line, the elements in a 64-byte
// line) that spans an odd number of lines: with 512 keys the rows would sit 2 KiB (S) or 1 KiB
// (P) apart, and the 16 rows of an AMX tile would share 2 or 4 of L1's 64 sets, evicting each
// other while the tiles store and load them. Interleaved, one thread, AVX512-BF16 + AMX: the
// bfloat16 forward ran 1.09-1.15x faster at D = 64 (L = 1024, 4096; causal and not) and 0.97-1.04x
// at D = 128. perf had shown the products' tile stores to S stalling.
inline int64_t amx_row_stride(int64_t elems, int64_t per_line) {
  return (elems / per_line) % 2 == 0 ? elems + per_line : elems;
}

// The float32 backward's brgemm operands (docs/design.md, "float32 on oneDNN's brgemm"): a key
// block's K^T (scaled) and V^T, read in place by every tile's S and dP products; a query block's
// Q^T and dO^T; and dK^T, dV^T of the key block, accumulated as dK^T += Q^T dS and
// dV^T += dO^T (Z P) (brgemm's A operand is row-major, so the products that read dS^T and P^T
// run transposed) and added into dK, dV once the block is done. All row strides an odd number
// of cache lines (amx_row_stride).
struct BrgemmBwd {
  int64_t ld, ldq;  // of the key-block operands (>= kBwdBlockK) and of the query-block ones
  LineVector<float> KT, VT, QT, dOT, dKT, dVT;
  BrgemmBwd(int64_t D, int64_t Dv)
      : ld(amx_row_stride(kBwdBlockK, 16)), ldq(amx_row_stride(kBwdBlockQ<float>, 16)),
        KT(D * ld), VT(Dv * ld), QT(D * ldq), dOT(Dv * ldq), dKT(D * ld), dVT(Dv * ld) {}
};

// out (cols x ld) = scale * in^T for rows x cols at row stride rs: the brgemm paths' K^T (the
// softmax scale goes in here, once per key, instead of on every score: brgemm has no alpha), V^T,
// Q^T and dO^T.
inline void transpose_rows(const float* in, int64_t rs, int64_t rows, int64_t cols, float scale,
                           float* out, int64_t ld) {
#if defined(CPU_CAPABILITY_AVX2)
  // ATen's dynamic transpose is scalar below AVX512: its 8 x 8 register kernel, then the edges
  const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  for (int64_t i = 0; i < r8; i += 8) {
    for (int64_t j = 0; j < c8; j += 8) {
      at::vec::transpose_mxn<float, 8, 8>(in + i * rs + j, rs, out + j * ld + i, ld);
    }
    at::vec::transpose_mxn<float>(in + i * rs + c8, rs, out + c8 * ld + i, ld, 8,
                                  static_cast<int>(cols - c8));
  }
  at::vec::transpose_mxn<float>(in + r8 * rs, rs, out + r8, ld, static_cast<int>(rows - r8),
                                static_cast<int>(cols));
#else
  // AVX512: 16 x 16 register blocks with masked edges; DEFAULT: scalar
  at::vec::transpose_mxn<float>(in, rs, out, ld, static_cast<int>(rows), static_cast<int>(cols));
#endif
  if (scale != 1.0f) {
    for (int64_t d = 0; d < cols; ++d) {
      at::vec::map<float>([scale](Vec<float> x) { return x * Vec<float>(scale); }, out + d * ld,
                          out + d * ld, rows);
    }
  }
}

// dst (rows x cols, row stride rs) += src^T for src (cols x ld), through a 16 x 16 block.
inline void add_transposed(const float* src, int64_t ld, int64_t rows, int64_t cols, float* dst,
                           int64_t rs) {
  alignas(64) float t[16 * 16];
  for (int64_t j0 = 0; j0 < rows; j0 += 16) {
    const int64_t nj = std::min<int64_t>(16, rows - j0);
    for (int64_t d0 = 0; d0 < cols; d0 += 16) {
      const int64_t nd = std::min<int64_t>(16, cols - d0);
      transpose_rows(src + d0 * ld + j0, ld, nd, nj, 1.0f, t, 16);
      for (int64_t j = 0; j < nj; ++j) {
        float* row = dst + (j0 + j) * rs + d0;
        at::vec::map2<float>([](Vec<float> x, Vec<float> y) { return x + y; }, row, row, t + j * 16,
                             nd);
      }
    }
  }
}

// Rounds n float32 values to the half dtype (the native path's P and dS).
template <typename in_t>
inline void round_block(const float* src, in_t* dst, int64_t n) {
  if constexpr (kHalf<in_t>) store_scaled(src, 1.0f, dst, n);
}

// How far (in natural-log units) a key block's largest score may rise above a row's running
// max before the native half path moves the reference (softmax_row_lazy): the weights then stay
// below e^8 (about 3000), which float32 sums and bfloat16 / float16 weights hold at full relative
// precision, and the output and lse come out the same (lse = m + log l for any reference m).
constexpr float kLazyMargin = 8.0f;
// A row's first key block takes its reference from its first kLazyPrefix keys only (a max pass
// over 64 of its up to 512 scores), the rest of the block is checked as every later block is.
constexpr int64_t kLazyPrefix = 64;

// The lazy pass's weights: rounded to the half dtype with the scale folded in (the native half
// path's scores come unscaled from the product), or float32 for float32 inputs, whose scores the
// product has scaled already (in_scale is 1 there).
template <typename in_t>
inline float lazy_weights(const float* s, float in_scale, float ref, int64_t n, in_t* p,
                          float* raw_max = nullptr) {
  if constexpr (kHalf<in_t>) {
    return exp_sum_round(s, in_scale, ref, n, p, raw_max);
  } else {
    static_assert(std::is_same_v<in_t, float>, "lazy_weights: float32 or a half dtype");
    (void)in_scale;
    return exp_sum_store(s, ref, n, p, raw_max);
  }
}

// The row pass of the native half path and of float32 where nothing but the band (causal,
// window) comes between the product and the softmax: the allowed keys of the row are one run [lo, hi) of the block (the
// rest of prow gets zeros, no masking pass), its weights are taken against the row's running max
// as it stands, and the same pass finds the block's largest score. Only when that score is more
// than kLazyMargin above the reference does the row move its max (rescaling its sum and
// accumulator) and redo the pass. The first block a row sees takes a max pass over its first
// kLazyPrefix keys for a starting reference. Where the row max rarely moves far after its first
// keys, this saves the max pass and the accumulator rescale of nearly every block. The scores
// come unscaled from the product: the max of the raw scores gives the scaled max (scale > 0 and
// rounding is monotonic: fl(scale max s) = max fl(scale s)), and the exp pass folds the scale
// in. Returns whether the row has any weight in this block.
template <typename in_t>
inline bool softmax_row_lazy(const FlashParams<in_t>& p, int64_t i, int64_t j0, int64_t n,
                             bool banded, const float* s, in_t* prow,
                             flash::RowSoftmax<float>& sm, float* acc_row) {
  int64_t lo = 0, hi = n;
  if (banded) {
    lo = std::max<int64_t>(0, std::min<int64_t>(n, p.band.lo(i) - j0));
    hi = std::max<int64_t>(0, std::min<int64_t>(n, p.band.hi(i) - j0));
  }
  if (hi <= lo) {
    std::fill(prow, prow + n, in_t(0));
    return false;
  }
  std::fill(prow, prow + lo, in_t(0));
  std::fill(prow + hi, prow + n, in_t(0));
  const float* sr = s + lo;
  in_t* pr = prow + lo;
  const int64_t len = hi - lo;
  const float scale = kHalf<in_t> ? static_cast<float>(p.scale) : 1.0f;
  if (sm.m == neg_inf<float>()) {
    // The row's first keys: its reference is the max of the first kLazyPrefix of them (l and
    // the accumulator are still 0), and the pass below moves it if the rest rise far above.
    sm.rescale(scale * row_max(sr, std::min(len, kLazyPrefix)));
    if (sm.m == neg_inf<float>()) sm.rescale(scale * row_max(sr, len));
    if (sm.m == neg_inf<float>()) {  // every score -inf (infinite inputs): no weight
      std::fill(pr, pr + len, in_t(0));
      return false;
    }
    if (len <= kLazyPrefix) {
      sm.l += lazy_weights(sr, scale, sm.m, len, pr);
      return true;
    }
  }
  float raw = 0.0f;
  float sum = lazy_weights(sr, scale, sm.m, len, pr, &raw);
  const float mx = scale * raw;
  if (!(mx <= sm.m + kLazyMargin)) {  // far above the reference, or NaN
    const float alpha = sm.rescale(mx);
    if (alpha != 1.0f) scale_row(acc_row, alpha, p.Dv);
    sum = lazy_weights(sr, scale, sm.m, len, pr);
  }
  sm.l += sum;
  return true;
}

// One row of a forward tile: the scores s (n keys from j0 of query i) are scaled (native half
// path; softmax_row_lazy where only the band applies), modded, masked and turned into the
// block's weights: exp(s - m) in place (N = false) or rounded to the half dtype into prow
// (N = true); the running sums move to the new max and the
// row's accumulator acc_row is rescaled. Returns whether the row has an allowed key so far (else
// its weights are zeros).
template <typename in_t, bool N, typename T = acc_t<in_t>>
inline bool softmax_row(const FlashParams<in_t>& p, int64_t b, int64_t h, int64_t i, int64_t bh,
                        int64_t j0, int64_t n, bool causal_block, bool mods, T* s, in_t* prow, T* Z,
                        flash::RowSoftmax<T>& sm, T* acc_row) {
  const bool dropout = p.dropout_p > 0.0;
  if constexpr (N) {
    if (!dropout && p.mask_kind == flash::kNoMask && !mods && p.scale > T(0))
      return softmax_row_lazy(p, i, j0, n, causal_block, s, prow, sm, acc_row);
  } else if constexpr (std::is_same_v<in_t, float>) {
    // float32: forward_block gives a weights row where lazy_fp32 holds
    if (prow != nullptr) return softmax_row_lazy(p, i, j0, n, causal_block, s, prow, sm, acc_row);
  }
  T mx;
  if constexpr (N) {
    // dropout or a scale <= 0 without a mask or mod: one pass scales and finds the max
    if (p.mask_kind == flash::kNoMask && !causal_block && !mods) {
      mx = scale_max(s, p.scale, n);
    } else {
      scale_row(s, p.scale, n);
      if (mods) variant_row<in_t, T>(p, b, h, i, j0, n, s, nullptr);
      mask_row(p, b, h, i, j0, n, causal_block, s);
      mx = row_max(s, n);
    }
  } else {
    if (mods) variant_row<in_t, T>(p, b, h, i, j0, n, s, nullptr);
    mask_row(p, b, h, i, j0, n, causal_block, s);
    mx = row_max(s, n);
  }
  const T alpha = sm.rescale(mx);
  if (sm.m == neg_inf<T>()) {
    // nothing allowed so far in this row: its weights are 0 (and exp(-inf - -inf) is NaN)
    std::fill(s, s + n, T(0));
    if constexpr (N) std::fill(prow, prow + n, in_t(0));
    return false;
  }
  const T keep_scale = T(1) / (T(1) - T(p.dropout_p));
  if constexpr (N) {
    if (!dropout) {
      sm.l += exp_sum_round(s, T(1), sm.m, n, prow);
    } else {
      // the softmax sum is taken before dropout: dropout scales normalised weights
      sm.l += row_exp_sum<in_t>(s, sm.m, n);
      dropout_row(p, keep_scale, bh, i, j0, n, Z);
      at::vec::map2<T>([](Vec<T> x, Vec<T> z) { return x * z; }, s, s, Z, n);
      round_block(s, prow, n);
    }
  } else {
    sm.l += row_exp_sum<in_t>(s, sm.m, n);
    if (dropout) {
      // the softmax sum above is taken before dropout: dropout scales normalised weights
      dropout_row(p, keep_scale, bh, i, j0, n, Z);
      at::vec::map2<T>([](Vec<T> x, Vec<T> z) { return x * z; }, s, s, Z, n);
    }
  }
  if (alpha != T(1)) scale_row(acc_row, alpha, p.Dv);
  return true;
}

// The row stride of a forward block's accumulator: the output's own rows for float32 / float64
// (it accumulates in place), the workspace's dense ones for half inputs.
template <typename in_t>
inline int64_t acc_ld(const FlashParams<in_t>& p) {
  return kHalf<in_t> ? p.Dv : p.o_rs;
}

// The end of a forward block: each row's output is its accumulator over the softmax sum (a sink
// joins the denominator only, flash::close_with_sink; lse includes it), rounded once for half
// inputs, and its lse is saved.
template <typename in_t, typename T = acc_t<in_t>>
void close_rows(const FlashParams<in_t>& p, const FlashFwdOut<in_t>& o, int64_t bh, int64_t i0,
                int64_t m, T* acc, const std::vector<flash::RowSoftmax<T>>& sm) {
  const int64_t h = bh % p.Hq, Dv = p.Dv;
  in_t* out = o.out + bh * p.o_hs + i0 * p.o_rs;
  const int64_t ald = acc_ld(p);
  for (int64_t r = 0; r < m; ++r) {
    T f, lse;
    if (p.sinks != nullptr) {
      f = flash::close_with_sink(sm[r].m, sm[r].l, p.sinks[h], &lse);
    } else {
      f = sm[r].inv_sum();
      lse = sm[r].lse();
    }
    if constexpr (kHalf<in_t>) {
      store_scaled(acc + r * ald, f, out + r * p.o_rs, Dv);
    } else {
      scale_row(acc + r * ald, f, Dv);
    }
    o.lse[bh * p.l_hs + i0 + r] = lse;
  }
}

// KT (float32 only; nullptr otherwise): the query head's kv head's keys transposed and scaled
// (transpose_rows, row stride ldkt): the block products then run on oneDNN's brgemm, which reads
// Q, K^T, P and V in place (forward_f32_brgemm).
template <typename in_t, bool N>
void forward_block(const FlashParams<in_t>& p, const FlashFwdOut<in_t>& o, HalfGemm path,
                   int64_t bh, int64_t i0, int64_t m, Work<in_t>& w,
                   std::vector<flash::RowSoftmax<acc_t<in_t>>>& sm,
                   const float* KT = nullptr, int64_t ldkt = 0) {
  using T = acc_t<in_t>;
  const int64_t b = bh / p.Hq, h = bh % p.Hq;
  const int64_t kvh = flash::kv_head(h, p.Hq, p.Hkv);
  const int64_t D = p.D, Dv = p.Dv, Lk = p.Lk;
  const auto* Q = operand<in_t, N>(p.q + bh * p.q_hs + i0 * p.q_rs, m * D, w.Q.data());
  const in_t* K = p.k + (b * p.Hkv + kvh) * p.k_hs;
  const in_t* V = p.v + (b * p.Hkv + kvh) * p.v_hs;
  // float32 / float64: the running output lives in the output tensor itself
  T* acc;
  if constexpr (kHalf<in_t>) {
    acc = w.acc.data();
  } else {
    acc = o.out + bh * p.o_hs + i0 * p.o_rs;
  }
  const int64_t ald = acc_ld(p);
  T* S = w.S.data();
  T* Z = w.Z.data();
  for (int64_t r = 0; r < m; ++r) {
    std::fill(acc + r * ald, acc + r * ald + Dv, T(0));
    sm[r].init();
  }

  // the keys some row of the block sees: the blocks outside every row's band are never visited
  const int64_t key_begin = p.band.on() ? p.band.lo(i0) : 0;
  const int64_t key_end = p.band.on() ? std::max(key_begin, p.band.hi(i0 + m - 1)) : Lk;
  const bool mods = has_score_mods(p);
  // float32 rows with nothing but the band between product and softmax take the lazy pass
  // (softmax_row_lazy): one pass over the scores instead of a max pass and an exp pass, and
  // the accumulator rescaled only when the max moves far; its weights go to w.Ph.
  const bool lazy_fp32 = std::is_same_v<in_t, float> && p.mask_kind == flash::kNoMask && !mods &&
                         p.dropout_p == 0.0;
  for (int64_t j0 = key_begin; j0 < key_end; j0 += kFwdBlockK) {
    const int64_t n = std::min(kFwdBlockK, key_end - j0);
    bool brgemm = false;
    if constexpr (!N && std::is_same_v<T, float>) {
      if (KT != nullptr) {
        f32_brgemm(m, n, D, p.q_rs, ldkt, n, false, Q, KT + j0, S);  // the scale is in KT
        brgemm = true;
      }
    }
    if (!brgemm) {
      const auto* Kb = operand<in_t, N>(K + j0 * p.k_rs, n * D, w.K.data());
      // The native path scales in its row pass (fused with the max where no mask comes between).
      block_gemm(path, false, true, m, n, D, N ? T(1) : p.scale, Q, p.q_rs, Kb, p.k_rs, T(0), S,
                 n);
    }
    const bool causal_block = p.band.cuts(i0, i0 + m, j0, j0 + n);
    bool any = false;
    for (int64_t r = 0; r < m; ++r) {
      in_t* prow = nullptr;
      if (N || lazy_fp32) prow = w.Ph.data() + r * n;
      any |= softmax_row<in_t, N>(p, b, h, i0 + r, bh, j0, n, causal_block, mods, S + r * n, prow,
                                  Z, sm[r], acc + r * ald);
    }
    if (any) {
      const auto* Vb = operand<in_t, N>(V + j0 * p.v_rs, n * Dv, w.V.data());
      if constexpr (N) {
        block_gemm(path, false, false, m, Dv, n, T(1), w.Ph.data(), n, Vb, p.v_rs, T(1), acc, ald);
      } else {
        const T* P = S;
        if constexpr (std::is_same_v<in_t, float>) {
          if (lazy_fp32) P = w.Ph.data();
        }
        if (brgemm) {
          if constexpr (std::is_same_v<T, float>) {
            f32_brgemm(m, Dv, n, n, p.v_rs, ald, true, P, Vb, acc);
          }
        } else {
          block_gemm(path, false, false, m, Dv, n, T(1), P, n, Vb, p.v_rs, T(1), acc, ald);
        }
      }
    }
  }
  close_rows(p, o, bh, i0, m, acc, sm);
}

// The query block of forward_impl (and forward_f32_brgemm).
template <typename in_t>
int64_t forward_block_q(const FlashParams<in_t>& p) {
  // Banded attention keeps 64 (a taller block widens every row's key range by its height), but
  // long float32/float64 rows without a left window take 128, where only the diagonal blocks
  // waste: 4-6% faster causal at L=1024 and 4096 (one thread, interleaved subprocess rounds).
  int64_t block_q = kFwdBlockQ;
  if (!p.band.on()) {
    if (p.Lq >= kFwdLongRows) {
      block_q = kFwdBlockQLong;
    } else if (!kHalf<in_t>) {
      block_q = kFwdBlockQMid;
    }
  } else if (!kHalf<in_t> && p.band.left < 0 && p.Lq >= kFwdLongRows) {
    block_q = kFwdBlockQMid;
  }
  return block_q;
}

// A forward task's buffers. Ph: the native half path's rounded weights, float32's lazy ones
// (forward_block).
template <typename in_t, bool N>
Work<in_t> forward_work(const FlashParams<in_t>& p, int64_t block_q) {
  return Work<in_t>(block_q * kFwdBlockK, 0, kFwdBlockK, kHalf<in_t> && !N,
                    N || std::is_same_v<in_t, float>, block_q * p.D, 0, kFwdBlockK * p.D,
                    kFwdBlockK * p.Dv, block_q * p.Dv);
}

template <typename in_t, bool N>
void forward_impl(const FlashParams<in_t>& p, const FlashFwdOut<in_t>& o, HalfGemm path) {
  using T = acc_t<in_t>;
  const int64_t block_q = forward_block_q(p);
  const int64_t q_blocks = (p.Lq + block_q - 1) / block_q;
  at::parallel_for(0, p.B * p.Hq * q_blocks, 1, [&](int64_t begin, int64_t end) {
    Work<in_t> w = forward_work<in_t, N>(p, block_q);
    std::vector<flash::RowSoftmax<T>> sm(block_q);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / q_blocks, i0 = (t % q_blocks) * block_q;
      forward_block<in_t, N>(p, o, path, bh, i0, std::min(block_q, p.Lq - i0), w, sm);
    }
  });
}

// ---- the AMX forward: K and V packed once per call (docs/design.md, "Half precision on CPU") ----

// Rows of a query block go through the tile products in strips of kAmxRows: a strip's scores
// (kAmxRows x kFwdBlockK float32, 264 KiB with amx_row_stride's padding) stay in L2 between the
// product that writes them, the row passes and the product that reads their rounded weights. 128
// measured faster than 16, 32 and 64 rows (fewer brgemm calls, each with its kernel lookup) at
// L = 1024 and 4096, D = 64 and 128.
constexpr int64_t kAmxRows = 128;
constexpr int64_t kAmxBlockQ = 128;
// The AMX forward packs per task (forward_amx) where a (batch, kv head) unit's packed K and V
// fit in this much of L2, and there are at least kAmxUnitsPerThread units per thread (the units
// are equal, so the split stays even within a quarter).
constexpr int64_t kAmxUnitBytes = 256 * 1024;
constexpr int64_t kAmxUnitsPerThread = 4;

// Whether the call packs K and V for the AMX forward: each packed element must be read by enough
// query rows (its kv head's query heads times Lq) to pay for its packing.
template <typename in_t>
inline bool amx_prepack_pays(const FlashParams<in_t>& p) {
  return p.Lq * (p.Hq / p.Hkv) >= 32 && p.Lk >= 16;
}

// An AMX forward task's blocks: S (block_q rows of up to kFwdBlockK scores at amx_row_stride),
// P (the strip's rounded weights, the same way, then Q padded for an odd D: p_size elements in
// all) and the accumulator, in the thread's task_scratch; Z, dropout's multipliers for a row.
template <typename in_t>
struct AmxTask {
  float* S;
  in_t* P;
  int64_t p_size;
  float* acc;
  std::vector<float> Z;
  AmxTask(int64_t block_q, int64_t D, int64_t Dv) : Z(kFwdBlockK) {
    const int64_t Dp = (D + 1) & ~int64_t(1);
    const int64_t s_size = block_q * amx_row_stride(kFwdBlockK, 16);
    p_size = block_q * amx_row_stride(kFwdBlockK, 32) + block_q * Dp;
    auto pages = [](int64_t bytes) { return (bytes + 4095) / 4096 * 4096; };
    const int64_t s_bytes = pages(s_size * 4), p_bytes = pages(p_size * int64_t(sizeof(in_t)));
    char* mem = task_scratch(static_cast<size_t>(s_bytes + p_bytes + block_q * Dv * 4));
    S = reinterpret_cast<float*>(mem);
    P = reinterpret_cast<in_t*>(mem + s_bytes);
    acc = reinterpret_cast<float*>(mem + s_bytes + p_bytes);
  }
};

template <typename in_t>
void forward_block_amx(const FlashParams<in_t>& p, const FlashFwdOut<in_t>& o,
                       const in_t* Kp, const in_t* Vp, int64_t bh, int64_t i0, int64_t m,
                       AmxTask<in_t>& w, std::vector<flash::RowSoftmax<float>>& sm) {
  // Kp, Vp: the query head's kv head packed (amx_pack_keys, amx_pack_values)
  const int64_t b = bh / p.Hq, h = bh % p.Hq;
  const int64_t D = p.D, Dv = p.Dv, Lk = p.Lk;
  const int64_t Dp = (D + 1) & ~int64_t(1), Lke = (Lk + 1) & ~int64_t(1);
  // Q as (m x Dp) rows: in place for an even D, else padded with a zero column
  const in_t* Q = p.q + bh * p.q_hs + i0 * D;  // dense rows (half)
  if (Dp != D) {
    in_t* buf = w.P + w.p_size - m * Dp;  // past the strip's P rows
    for (int64_t r = 0; r < m; ++r) {
      std::copy(Q + r * D, Q + (r + 1) * D, buf + r * Dp);
      buf[r * Dp + D] = in_t(0);
    }
    Q = buf;
  }
  float* acc = w.acc;
  float* S = w.S;
  float* Z = w.Z.data();
  std::fill(acc, acc + m * Dv, 0.0f);
  for (int64_t r = 0; r < m; ++r) sm[r].init();
  // Key blocks start on a strip: the band's first and last keys round out to whole strips, whose
  // extra keys the band masks (causal_block below).
  int64_t key_begin = 0, key_end = Lk;
  if (p.band.on()) {
    key_begin = p.band.lo(i0) / kAmxStrip * kAmxStrip;
    const int64_t hi = std::max(p.band.lo(i0), p.band.hi(i0 + m - 1));
    key_end = std::min(Lk, (hi + kAmxStrip - 1) / kAmxStrip * kAmxStrip);
    if (hi <= p.band.lo(i0)) key_end = key_begin;  // no row of the block sees any key
  }
  const bool mods = has_score_mods(p);
  for (int64_t j0 = key_begin; j0 < key_end; j0 += kFwdBlockK) {
    const int64_t n = std::min(kFwdBlockK, key_end - j0);
    const int64_t ne = (n + 1) & ~int64_t(1);  // P's columns: a zero one meets V's zero row
    // S's and P's row strides: an odd number of cache lines (amx_row_stride)
    const int64_t lds = amx_row_stride((n + 15) / 16 * 16, 16);
    const int64_t ldp = amx_row_stride((n + 31) / 32 * 32, 32);
    const bool causal_block = p.band.cuts(i0, i0 + m, j0, j0 + n);
    for (int64_t r0 = 0; r0 < m; r0 += kAmxRows) {
      const int64_t mr = std::min<int64_t>(kAmxRows, m - r0);
      float* Sr = S + r0 * lds;
      for (int64_t js = 0; js < n; js += kAmxStrip) {
        const int64_t nb = std::min(kAmxStrip, n - js);
        amx_brgemm(mr, nb, Dp, Dp, amx_ld(nb), lds, false, Q + r0 * Dp,
                   Kp + ((j0 + js) / kAmxStrip) * Dp * kAmxStrip, Sr + js);
      }
      bool any = false;
      in_t* P = w.P;
      for (int64_t r = 0; r < mr; ++r) {
        in_t* prow = P + r * ldp;
        any |= softmax_row<in_t, true>(p, b, h, i0 + r0 + r, bh, j0, n, causal_block, mods,
                                       Sr + r * lds, prow, Z, sm[r0 + r], acc + (r0 + r) * Dv);
        if (ne != n) prow[n] = in_t(0);
      }
      if (!any) continue;
      for (int64_t c = 0; c < Dv; c += kAmxStrip) {
        const int64_t nb = std::min(kAmxStrip, Dv - c);
        amx_brgemm(mr, nb, ne, ldp, amx_ld(nb), Dv, true, P,
                   Vp + (c / kAmxStrip) * Lke * kAmxStrip + j0 * amx_ld(nb), acc + r0 * Dv + c);
      }
    }
  }
  close_rows(p, o, bh, i0, m, acc, sm);
}

template <typename in_t>
void forward_amx(const FlashParams<in_t>& p, const FlashFwdOut<in_t>& o) {
  const int64_t k_size = amx_keys_size(p.Lk, p.D), v_size = amx_values_size(p.Lk, p.Dv);
  // Query blocks: 256 rows for long rows without a band, 64 with a left window (a taller block
  // widens every row's key range by its height), else 128: causal rows lose only the diagonal
  // tiles' products (softmax_row_lazy skips their masked keys), and short rows run fewer,
  // taller products. At L = 128-4096, D = 64 and 128 (one thread, interleaved rounds,
  // AVX512-BF16 + AMX) 128 ran 1.00-1.22x faster than 64 for causal and for non-causal L <= 512,
  // and 1.03-1.12x faster than 256 for causal.
  int64_t block_q = kAmxBlockQ;
  if (p.band.on() && p.band.left >= 0) block_q = kFwdBlockQ;
  if (!p.band.on() && p.Lq >= kFwdLongRows) block_q = kFwdBlockQLong;
  const int64_t q_blocks = (p.Lq + block_q - 1) / block_q;
  const int64_t group = p.Hq / p.Hkv, units = p.B * p.Hkv;
  const bool unit_fits = (k_size + v_size) * static_cast<int64_t>(sizeof(in_t)) <= kAmxUnitBytes;
  if (unit_fits && units >= kAmxUnitsPerThread * at::get_num_threads()) {
    // Short rows and enough (batch, kv head) units to share out: each task packs its unit's K
    // and V into its own buffer and runs every query block of the unit's query heads on them
    // while they sit in L2. No call-wide packed copy is written to memory and read back: at
    // L = 128 that round trip had been a fifth of the forward (1.72x torch's vs 1.35x at D = 128).
    // Longer rows pack once per call below: with a unit past L2 either way, that measured
    // 1.05-1.25x faster (L = 1024-4096 non-causal, one thread, interleaved rounds).
    at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
      std::unique_ptr<in_t[]> kvbuf(new in_t[k_size + v_size]);  // one block: K, then V
      in_t* kbp = kvbuf.get();
      in_t* vbp = kvbuf.get() + k_size;
      AmxTask<in_t> w(block_q, p.D, p.Dv);
      std::vector<flash::RowSoftmax<float>> sm(block_q);
      for (int64_t t = begin; t < end; ++t) {
        amx_pack_keys(p.k + t * p.k_hs, p.Lk, p.D, kbp);
        amx_pack_values(p.v + t * p.v_hs, p.Lk, p.Dv, vbp);
        const int64_t b = t / p.Hkv, kvh = t % p.Hkv;
        for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
          for (int64_t i0 = 0; i0 < p.Lq; i0 += block_q) {
            forward_block_amx<in_t>(p, o, kbp, vbp, b * p.Hq + h, i0,
                                    std::min(block_q, p.Lq - i0), w, sm);
          }
        }
      }
      amx_release();
    });
    return;
  }
  // Long rows, or few units (B = 1 with few kv heads, MQA): K and V packed once per call, in
  // parallel, then tasks of one query block each keep every thread busy.
  // written whole by the packing below: no zero fill first
  std::unique_ptr<in_t[]> kbuf(new in_t[units * k_size]);
  std::unique_ptr<in_t[]> vbuf(new in_t[units * v_size]);
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      amx_pack_keys(p.k + t * p.k_hs, p.Lk, p.D, kbuf.get() + t * k_size);
      amx_pack_values(p.v + t * p.v_hs, p.Lk, p.Dv, vbuf.get() + t * v_size);
    }
  });
  at::parallel_for(0, p.B * p.Hq * q_blocks, 1, [&](int64_t begin, int64_t end) {
    AmxTask<in_t> w(block_q, p.D, p.Dv);
    std::vector<flash::RowSoftmax<float>> sm(block_q);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / q_blocks, i0 = (t % q_blocks) * block_q;
      const int64_t unit = (bh / p.Hq) * p.Hkv + flash::kv_head(bh % p.Hq, p.Hq, p.Hkv);
      forward_block_amx<in_t>(p, o, kbuf.get() + unit * k_size, vbuf.get() + unit * v_size, bh,
                              i0, std::min(block_q, p.Lq - i0), w, sm);
    }
    amx_release();
  });
}

// ---- the float32 forward on oneDNN's brgemm (docs/design.md, "float32 on oneDNN's brgemm") ----

// K^T's row stride for Lk keys: whole cache lines, an odd number of them, so that the D rows a
// product reads down a column block spread over L1's sets (amx_row_stride).
inline int64_t keys_t_ld(int64_t Lk) { return amx_row_stride((Lk + 15) / 16 * 16, 16); }

// Keys transposed per thread up to this size are kept in the thread's task_scratch between calls;
// a longer unit's go in a block allocated for the task.
constexpr int64_t kKeysTScratchBytes = 4 << 20;

// The float32 forward with its block products on oneDNN's brgemm: a task transposes and scales
// its unit's keys (a (batch, kv head)) once, when its run of query blocks reaches a new unit
// (consecutive tasks share one: a head's query blocks, then a GQA group's heads), and the
// products read Q, K^T, P and V in place; MKL's sgemm had copied the key block and the query
// block for every product. Not a call-wide transposed copy written in a pass of its own and read
// back (as forward_amx packs): that ran slower than MKL's path at D = 128, L = 1024 (one thread,
// interleaved), where transposing per task ran level or faster.
template <typename in_t>
void forward_f32_brgemm(const FlashParams<in_t>& p, const FlashFwdOut<in_t>& o) {
  const int64_t block_q = forward_block_q(p);
  const int64_t q_blocks = (p.Lq + block_q - 1) / block_q;
  const int64_t ld = keys_t_ld(p.Lk);
  const int64_t kt_bytes = p.D * ld * static_cast<int64_t>(sizeof(float));
  at::parallel_for(0, p.B * p.Hq * q_blocks, 1, [&](int64_t begin, int64_t end) {
    Work<in_t> w = forward_work<in_t, false>(p, block_q);
    std::vector<flash::RowSoftmax<float>> sm(block_q);
    LineVector<float> own;
    float* kt;
    if (kt_bytes <= kKeysTScratchBytes) {
      kt = reinterpret_cast<float*>(task_scratch(static_cast<size_t>(kt_bytes)));
    } else {
      own.resize(p.D * ld);
      kt = own.data();
    }
    int64_t have = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / q_blocks, i0 = (t % q_blocks) * block_q;
      const int64_t unit = (bh / p.Hq) * p.Hkv + flash::kv_head(bh % p.Hq, p.Hq, p.Hkv);
      if (unit != have) {
        const in_t* k = p.k + unit * p.k_hs;
        if constexpr (kHalf<in_t>) {
          // widened a key block at a time through the task's K buffer (dense rows)
          for (int64_t j0 = 0; j0 < p.Lk; j0 += kFwdBlockK) {
            const int64_t n = std::min(kFwdBlockK, p.Lk - j0);
            const float* kb = load_block(k + j0 * p.D, n * p.D, w.K.data());
            transpose_rows(kb, p.D, n, p.D, p.scale, kt + j0, ld);
          }
        } else {
          transpose_rows(k, p.k_rs, p.Lk, p.D, p.scale, kt, ld);  // the scale too
        }
        have = unit;
      }
      forward_block<in_t, false>(p, o, HalfGemm::kWiden, bh, i0, std::min(block_q, p.Lq - i0), w,
                                 sm, kt, ld);
    }
  });
}

// Half blocks are widened, rounded and packed as contiguous runs of rows (FlashParams' layout).
template <typename in_t>
void check_layout(const FlashParams<in_t>& p) {
  if constexpr (kHalf<in_t>) {
    TORCH_CHECK(p.q_rs == p.D && p.k_rs == p.D && p.v_rs == p.Dv && p.o_rs == p.Dv,
                "pyattn cpu sdpa kernel: half-precision inputs need dense rows");
  }
}

template <typename in_t>
void forward(const FlashParams<in_t>& p, const FlashFwdOut<in_t>& o) {
  check_layout(p);
  if constexpr (kHalf<in_t>) {
    const HalfGemm fwd = native_path(p, true);
    if (fwd == HalfGemm::kAmx && amx_prepack_pays(p)) return forward_amx(p, o);
    // too few query rows to pay for packing: the per-product path (auto: MKL's; forced: AMX's)
    const HalfGemm path = fwd == HalfGemm::kAmx ? native_path(p, false) : fwd;
    if (path != HalfGemm::kWiden) return forward_impl<in_t, true>(p, o, path);
  }
  // float32, and half inputs on the widened path (float32 blocks, float32 products)
  if constexpr (std::is_same_v<acc_t<in_t>, float>) {
    if (p.D > 0 && p.Dv > 0 && p.Lk > 0 &&
        f32_gemm_path(true, std::max(p.D, p.Dv)) == F32Gemm::kBrgemm) {
      return forward_f32_brgemm(p, o);
    }
  }
  forward_impl<in_t, false>(p, o, HalfGemm::kWiden);
}

// One (query block, key block) tile of query head h: P from the saved lse, then dS (into dP)
// and Z P (into S), the middle every backward GEMM reads. Q and dO are the block's rows
// i0 .. i0 + m - 1 and Kb, Vb the key block's rows j0 .. j0 + n - 1, all as acc_t.
// bt (float32 on the brgemm path; null otherwise): the key block's K^T (scaled) and V^T, which
// the S and dP products read in place; dS then comes out scaled (brgemm has no alpha).
template <typename in_t, bool N, typename T = acc_t<in_t>, typename O = op_t<in_t, N>>
void backward_tile(const FlashParams<in_t>& p, const FlashBwdArgs<in_t>& a, HalfGemm path,
                   int64_t b, int64_t h, int64_t i0, int64_t m, int64_t j0, int64_t n, const O* Q,
                   const O* dO, const O* Kb, const O* Vb, Work<in_t>& w,
                   const BrgemmBwd* bt = nullptr) {
  T* S = w.S.data();
  T* dP = w.dP.data();
  T* Z = w.Z.data();
  const int64_t D = p.D, Dv = p.Dv;
  const int64_t bh = b * p.Hq + h;
  const T* lse = a.lse + bh * p.l_hs + i0;
  const T* delta = a.delta + bh * p.l_hs + i0;
  const bool dropout = p.dropout_p > 0.0;
  const T keep_scale = T(1) / (T(1) - T(p.dropout_p));
  T ds_mul = T(1);
  bool brgemm = false;
  if constexpr (std::is_same_v<in_t, float>) {
    if (bt != nullptr) {
      f32_brgemm(m, n, D, p.q_rs, bt->ld, n, false, Q, bt->KT.data(), S);
      f32_brgemm(m, n, Dv, p.o_rs, bt->ld, n, false, dO, bt->VT.data(), dP);
      ds_mul = p.scale;
      brgemm = true;
    }
  }
  if (!brgemm) {
    block_gemm(path, false, true, m, n, D, p.scale, Q, p.q_rs, Kb, p.k_rs, T(0), S, n);
    block_gemm(path, false, true, m, n, Dv, T(1), dO, p.o_rs, Vb, p.v_rs, T(0), dP, n);
  }
  const bool causal_block = p.band.cuts(i0, i0 + m, j0, j0 + n);
  const bool mods = has_score_mods(p);
  T* G = p.softcap > T(0) ? w.G.data() : nullptr;
  for (int64_t r = 0; r < m; ++r) {
    T* s = S + r * n;
    T* dp = dP + r * n;
    const int64_t i = i0 + r;
    if (mods) variant_row<in_t, T>(p, b, h, i, j0, n, s, G != nullptr ? G + r * n : nullptr);
    mask_row(p, b, h, i, j0, n, causal_block, s);
    if constexpr (N) {
      exp_sub_u20(s, lse[r], n);  // P
    } else {
      row_exp<in_t>(s, lse[r], n);  // P
    }
    const T dl = delta[r];
    if (dropout) {
      dropout_row(p, keep_scale, bh, i, j0, n, Z);
      // dS = P (Z dP - Delta) (flash::dscore), then s becomes Z P, what multiplied V
      at::vec::map3<T>(
          [dl, ds_mul](Vec<T> pp, Vec<T> d, Vec<T> z) {
            return pp * (z * d - Vec<T>(dl)) * Vec<T>(ds_mul);
          },
          dp, s, dp, Z, n);
      at::vec::map2<T>([](Vec<T> pp, Vec<T> z) { return pp * z; }, s, s, Z, n);
    } else {
      at::vec::map2<T>([dl, ds_mul](Vec<T> pp, Vec<T> d) { return pp * (d - Vec<T>(dl)) * Vec<T>(ds_mul); },
                       dp, s, dp, n);
    }
    if (G != nullptr) {
      // through the softcap: dS_raw = dS (1 - tanh^2)
      at::vec::map2<T>([](Vec<T> d, Vec<T> g) { return d * g; }, dp, dp, G + r * n, n);
    }
  }
  if constexpr (N) {
    // dS is rounded with the softmax scale applied (the products that read it then take
    // alpha = 1, ds_alpha), one rounding either way.
    round_block(S, w.Ph.data(), m * n);
    if constexpr (kHalf<in_t>) store_scaled(dP, p.scale, w.dSh.data(), m * n);
  }
}

// The tile's Z P and dS as the operands of the products that follow it: the float32 blocks, or
// their rounded copies on the native half path.
template <typename in_t, bool N>
inline const op_t<in_t, N>* tile_p(Work<in_t>& w) {
  if constexpr (N) {
    return w.Ph.data();
  } else {
    return w.S.data();
  }
}
// The scale of the dQ and dK products: 1 where the rounded dS carries it already.
template <typename in_t, bool N>
inline acc_t<in_t> ds_alpha(const FlashParams<in_t>& p) {
  return N ? acc_t<in_t>(1) : p.scale;
}
template <typename in_t, bool N>
inline const op_t<in_t, N>* tile_ds(Work<in_t>& w) {
  if constexpr (N) {
    return w.dSh.data();
  } else {
    return w.dP.data();
  }
}

// Where a task's gradient products accumulate: the caller's acc_t tensors, or (half inputs with
// FlashBwdArgs::dq_out) the task's float32 blocks, rounded into the outputs once complete.
template <typename T>
struct GradDst {
  T* dq;  // query head g of the task's kv group (g = h - kvh * group) at dq + g * dq_hs
  int64_t dq_hs, dq_rs;
  T* dk;  // the key block's rows
  int64_t dk_rs;
  T* dv;
  int64_t dv_rs;
};

// Calls f(h, bh, i0, m) for every query block (i0, m rows) of every query head h of kv head
// (b, kvh) that meets key block j0 of n keys: with causal or a window, only the queries whose
// band meets it.
template <typename in_t, typename F>
inline void for_query_blocks(const FlashParams<in_t>& p, int64_t b, int64_t kvh, int64_t j0,
                             int64_t n, F&& f) {
  const int64_t group = p.Hq / p.Hkv;
  const int64_t i_begin = p.band.on() ? p.band.query_begin(j0) : 0;
  const int64_t i_end = p.band.on() ? p.band.query_end(j0 + n) : p.Lq;
  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    for (int64_t i0 = i_begin; i0 < i_end; i0 += kBwdBlockQ<in_t>) {
      f(h, b * p.Hq + h, i0, std::min(kBwdBlockQ<in_t>, i_end - i0));
    }
  }
}

// backward_key_block's loop with every product on oneDNN's brgemm (float32).
// Kb, Vb: the key block's rows of K and V.
void backward_key_block_brgemm(const FlashParams<float>& p, const FlashBwdArgs<float>& a,
                               int64_t b, int64_t kvh, int64_t j0, int64_t n, const float* Kb,
                               const float* Vb, bool with_dq, Work<float>& w,
                               const GradDst<float>& g, BrgemmBwd& bt) {
  const int64_t D = p.D, Dv = p.Dv;
  const int64_t group = p.Hq / p.Hkv;
  transpose_rows(Kb, p.k_rs, n, D, p.scale, bt.KT.data(), bt.ld);
  transpose_rows(Vb, p.v_rs, n, Dv, 1.0f, bt.VT.data(), bt.ld);
  std::fill(bt.dKT.begin(), bt.dKT.end(), 0.0f);
  std::fill(bt.dVT.begin(), bt.dVT.end(), 0.0f);
  const float* S = w.S.data();    // Z P after the tile
  const float* dS = w.dP.data();  // scaled
  for_query_blocks(p, b, kvh, j0, n, [&](int64_t h, int64_t bh, int64_t i0, int64_t m) {
    const float* Q = p.q + bh * p.q_hs + i0 * p.q_rs;
    const float* dO = a.grad_out + bh * p.o_hs + i0 * p.o_rs;
    backward_tile<float, false>(p, a, HalfGemm::kWiden, b, h, i0, m, j0, n, Q, dO, Kb, Vb, w,
                                &bt);
    transpose_rows(Q, p.q_rs, m, D, 1.0f, bt.QT.data(), bt.ldq);
    transpose_rows(dO, p.o_rs, m, Dv, 1.0f, bt.dOT.data(), bt.ldq);
    // dV^T += dO^T (Z P);  dQ += dS K;  dK^T += Q^T dS  (dS carries the scale)
    f32_brgemm(Dv, n, m, bt.ldq, n, bt.ld, true, bt.dOT.data(), S, bt.dVT.data());
    if (with_dq) {
      float* dQ = g.dq + (h - kvh * group) * g.dq_hs + i0 * g.dq_rs;
      f32_brgemm(m, D, n, n, p.k_rs, g.dq_rs, true, dS, Kb, dQ);
    }
    f32_brgemm(D, n, m, bt.ldq, n, bt.ld, true, bt.QT.data(), dS, bt.dKT.data());
  });
  add_transposed(bt.dKT.data(), bt.ld, n, D, g.dk, g.dk_rs);
  add_transposed(bt.dVT.data(), bt.ld, n, Dv, g.dv, g.dv_rs);
}

// Key block j0 of kv head (b, kvh), against every query of every query head of its group:
// dK and dV of the block's keys into g.dk, g.dv, and (with_dq) the block's share of dQ.
template <typename in_t, bool N>
void backward_key_block(const FlashParams<in_t>& p, const FlashBwdArgs<in_t>& a, HalfGemm path,
                        int64_t b, int64_t kvh, int64_t j0, bool with_dq, Work<in_t>& w,
                        const GradDst<acc_t<in_t>>& g, BrgemmBwd* bt = nullptr) {
  using T = acc_t<in_t>;
  const int64_t D = p.D, Dv = p.Dv, Lk = p.Lk;
  const int64_t group = p.Hq / p.Hkv;
  const int64_t n = std::min(kBwdBlockK, Lk - j0);
  const int64_t k_off = (b * p.Hkv + kvh) * p.k_hs + j0 * p.k_rs;
  const int64_t v_off = (b * p.Hkv + kvh) * p.v_hs + j0 * p.v_rs;
  const auto* Kb = operand<in_t, N>(p.k + k_off, n * D, w.K.data());
  const auto* Vb = operand<in_t, N>(p.v + v_off, n * Dv, w.V.data());
  if constexpr (std::is_same_v<in_t, float>) {
    if (bt != nullptr) {
      return backward_key_block_brgemm(p, a, b, kvh, j0, n, Kb, Vb, with_dq, w, g, *bt);
    }
  }
  for_query_blocks(p, b, kvh, j0, n, [&](int64_t h, int64_t bh, int64_t i0, int64_t m) {
    const auto* Q = operand<in_t, N>(p.q + bh * p.q_hs + i0 * p.q_rs, m * D, w.Q.data());
    const auto* dO = operand<in_t, N>(a.grad_out + bh * p.o_hs + i0 * p.o_rs, m * Dv, w.dO.data());
    backward_tile<in_t, N>(p, a, path, b, h, i0, m, j0, n, Q, dO, Kb, Vb, w);
    const auto* P = tile_p<in_t, N>(w);
    const auto* dS = tile_ds<in_t, N>(w);
    // dV += (Z P)^T dO;  dQ += scale dS K;  dK += scale dS^T Q
    block_gemm(path, true, false, n, Dv, m, T(1), P, n, dO, p.o_rs, T(1), g.dv, g.dv_rs);
    if (with_dq) {
      T* dQ = g.dq + (h - kvh * group) * g.dq_hs + i0 * g.dq_rs;
      block_gemm(path, false, false, m, D, n, ds_alpha<in_t, N>(p), dS, n, Kb, p.k_rs, T(1), dQ, g.dq_rs);
    }
    block_gemm(path, true, false, n, D, m, ds_alpha<in_t, N>(p), dS, n, Q, p.q_rs, T(1), g.dk, g.dk_rs);
  });
}

// dQ of query block i0 of head (b, h), over every key block it sees, into dQ (the block's rows,
// row stride dq_rs).
template <typename in_t, bool N>
void backward_query_block(const FlashParams<in_t>& p, const FlashBwdArgs<in_t>& a, HalfGemm path,
                          int64_t b, int64_t h, int64_t i0, Work<in_t>& w, acc_t<in_t>* dQ,
                          int64_t dq_rs) {
  using T = acc_t<in_t>;
  const int64_t D = p.D, Dv = p.Dv, Lq = p.Lq, Lk = p.Lk;
  const int64_t kvh = flash::kv_head(h, p.Hq, p.Hkv);
  const in_t* K = p.k + (b * p.Hkv + kvh) * p.k_hs;
  const in_t* V = p.v + (b * p.Hkv + kvh) * p.v_hs;
  const int64_t m = std::min(kBwdBlockQ<in_t>, Lq - i0);
  const int64_t bh = b * p.Hq + h;
  const auto* Q = operand<in_t, N>(p.q + bh * p.q_hs + i0 * p.q_rs, m * D, w.Q.data());
  const auto* dO = operand<in_t, N>(a.grad_out + bh * p.o_hs + i0 * p.o_rs, m * Dv, w.dO.data());
  const int64_t key_begin = p.band.on() ? p.band.lo(i0) : 0;
  const int64_t key_end = p.band.on() ? std::max(key_begin, p.band.hi(i0 + m - 1)) : Lk;
  for (int64_t j0 = key_begin; j0 < key_end; j0 += kBwdBlockK) {
    const int64_t n = std::min(kBwdBlockK, key_end - j0);
    const auto* Kb = operand<in_t, N>(K + j0 * p.k_rs, n * D, w.K.data());
    const auto* Vb = operand<in_t, N>(V + j0 * p.v_rs, n * Dv, w.V.data());
    backward_tile<in_t, N>(p, a, path, b, h, i0, m, j0, n, Q, dO, Kb, Vb, w);
    block_gemm(path, false, false, m, D, n, ds_alpha<in_t, N>(p), tile_ds<in_t, N>(w), n, Kb,
               p.k_rs, T(1), dQ, dq_rs);
  }
}

// rows x cols float32 at src (dense) rounded to out (row stride ld); then src is zeroed for the
// task's next block.
template <typename in_t>
inline void round_rows(float* src, int64_t rows, int64_t cols, in_t* out, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) store_scaled(src + r * cols, 1.0f, out + r * ld, cols);
  std::fill(src, src + rows * cols, 0.0f);
}

// Delta_i = dO_i . O_i in float32 for every row (FlashBwdArgs::delta left to the kernel), laid
// out as lse (row i of head bh at bh * l_hs + i).
template <typename in_t>
std::vector<float> half_delta(const FlashParams<in_t>& p, const FlashBwdArgs<in_t>& a) {
  std::vector<float> delta(p.B * p.Hq * p.l_hs, 0.0f);
  at::parallel_for(0, p.B * p.Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> x(p.Dv), y(p.Dv);
    for (int64_t bh = begin; bh < end; ++bh) {
      for (int64_t i = 0; i < p.Lq; ++i) {
        const int64_t off = bh * p.o_hs + i * p.o_rs;
        to_acc(a.grad_out + off, x.data(), p.Dv);
        to_acc(a.out + off, y.data(), p.Dv);
        delta[bh * p.l_hs + i] = at::vec::map2_reduce_all<float>(
            [](Vec<float> u, Vec<float> v) { return u * v; },
            [](Vec<float> u, Vec<float> v) { return u + v; }, x.data(), y.data(), p.Dv);
      }
    }
  });
  return delta;
}

// Two schemes, neither with atomics or partial buffers, each with a fixed summation order:
// - one task per (batch, kv head) walks its key blocks and accumulates dK, dV and dQ: the least
//   work (five GEMMs per tile), but only B * Hkv tasks;
// - with fewer such tasks than threads (B = 1 with few heads, MQA), one task per (batch, kv head,
//   key block) for dK and dV, then one per (batch, head, query block) for dQ, which recomputes
//   S and dP (seven GEMMs per tile) but keeps every thread busy.
// With half outputs (FlashBwdArgs::dq_out) each task accumulates into its own float32 blocks:
// a key block's dK and dV (complete when the block is done), its group's dQ (first scheme; the
// whole rows) or its query block's dQ (second scheme), rounded into the outputs once complete.
template <typename in_t, bool N>
void backward_impl(const FlashParams<in_t>& p, const FlashBwdArgs<in_t>& args, HalfGemm path,
                   bool f32_brgemm_path = false) {
  using T = acc_t<in_t>;
  const int64_t pairs = p.B * p.Hkv;
  const int64_t key_blocks = (p.Lk + kBwdBlockK - 1) / kBwdBlockK;
  const int64_t threads = at::get_num_threads();
  const int64_t rounds = (pairs + threads - 1) / threads;  // of the first scheme
  // the second costs ~1.5x the work, spread over every thread
  const bool split = key_blocks > 1 && 3 * pairs < 2 * rounds * threads;
  const int64_t group = p.Hq / p.Hkv;
  const int64_t D = p.D, Dv = p.Dv;
  bool direct = false;
  FlashBwdArgs<in_t> a = args;
  std::vector<float> delta;
  if constexpr (kHalf<in_t>) {
    direct = a.dq_out != nullptr;
    if (a.delta == nullptr) {
      delta = half_delta(p, a);
      a.delta = delta.data();
    }
  }
  // the task's float32 blocks (direct) and the GradDst of a key block / a query block
  struct Acc {
    LineVector<T> dq, dk, dv;
    std::unique_ptr<BrgemmBwd> bt;  // float32 on the brgemm path: the key blocks' operands
  };
  auto key_dst = [&](Acc& acc, int64_t b, int64_t kvh, int64_t j0) {
    if (direct) return GradDst<T>{acc.dq.data(), p.Lq * D, D, acc.dk.data(), D, acc.dv.data(), Dv};
    const int64_t k_off = (b * p.Hkv + kvh) * p.k_hs + j0 * p.k_rs;
    const int64_t v_off = (b * p.Hkv + kvh) * p.v_hs + j0 * p.v_rs;
    return GradDst<T>{a.dq + (b * p.Hq + kvh * group) * p.q_hs, p.q_hs, p.q_rs, a.dk + k_off,
                      p.k_rs, a.dv + v_off, p.v_rs};
  };
  // a direct key block's dK and dV, rounded into the outputs
  auto flush_key_block = [&](Acc& acc, int64_t b, int64_t kvh, int64_t j0) {
    if constexpr (kHalf<in_t>) {
      const int64_t n = std::min(kBwdBlockK, p.Lk - j0);
      round_rows(acc.dk.data(), n, D, a.dk_out + (b * p.Hkv + kvh) * p.k_hs + j0 * p.k_rs, p.k_rs);
      round_rows(acc.dv.data(), n, Dv, a.dv_out + (b * p.Hkv + kvh) * p.v_hs + j0 * p.v_rs, p.v_rs);
    }
  };
  auto run = [&](int64_t tasks, int64_t dq_rows, bool key_blocks_task, auto&& body) {
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      constexpr int64_t bq = kBwdBlockQ<in_t>;
      Work<in_t> w(bq * kBwdBlockK, bq * kBwdBlockK, kBwdBlockK, kHalf<in_t> && !N, N, bq * p.D,
                   bq * p.Dv, kBwdBlockK * p.D, kBwdBlockK * p.Dv, 0);
      if (p.softcap > acc_t<in_t>(0)) w.G.resize(bq * kBwdBlockK);
      Acc acc;
      if (f32_brgemm_path && key_blocks_task) acc.bt = std::make_unique<BrgemmBwd>(p.D, p.Dv);
      if (direct) {
        acc.dq.assign(dq_rows * D, T(0));
        acc.dk.assign(kBwdBlockK * D, T(0));
        acc.dv.assign(kBwdBlockK * Dv, T(0));
      }
      for (int64_t t = begin; t < end; ++t) body(t, w, acc);
    });
  };
  if (!split) {
    run(pairs, group * p.Lq, true, [&](int64_t t, Work<in_t>& w, Acc& acc) {
      const int64_t b = t / p.Hkv, kvh = t % p.Hkv;
      for (int64_t j0 = 0; j0 < p.Lk; j0 += kBwdBlockK) {
        backward_key_block<in_t, N>(p, a, path, b, kvh, j0, true, w, key_dst(acc, b, kvh, j0),
                                    acc.bt.get());
        if (direct) flush_key_block(acc, b, kvh, j0);
      }
      if constexpr (kHalf<in_t>) {
        if (direct) {
          for (int64_t g = 0; g < group; ++g) {
            const int64_t bh = b * p.Hq + kvh * group + g;
            round_rows(acc.dq.data() + g * p.Lq * D, p.Lq, D, a.dq_out + bh * p.q_hs, p.q_rs);
          }
        }
      }
    });
    return;
  }
  run(pairs * key_blocks, 0, true, [&](int64_t t, Work<in_t>& w, Acc& acc) {
    const int64_t pair = t / key_blocks, b = pair / p.Hkv, kvh = pair % p.Hkv;
    const int64_t j0 = (t % key_blocks) * kBwdBlockK;
    backward_key_block<in_t, N>(p, a, path, b, kvh, j0, false, w, key_dst(acc, b, kvh, j0),
                                acc.bt.get());
    if (direct) flush_key_block(acc, b, kvh, j0);
  });
  const int64_t q_blocks = (p.Lq + kBwdBlockQ<in_t> - 1) / kBwdBlockQ<in_t>;
  run(p.B * p.Hq * q_blocks, kBwdBlockQ<in_t>, false, [&](int64_t t, Work<in_t>& w, Acc& acc) {
    const int64_t bh = t / q_blocks, i0 = (t % q_blocks) * kBwdBlockQ<in_t>;
    if (!direct) {
      backward_query_block<in_t, N>(p, a, path, bh / p.Hq, bh % p.Hq, i0, w,
                                    a.dq + bh * p.q_hs + i0 * p.q_rs, p.q_rs);
      return;
    }
    if constexpr (kHalf<in_t>) {
      backward_query_block<in_t, N>(p, a, path, bh / p.Hq, bh % p.Hq, i0, w, acc.dq.data(), D);
      const int64_t m = std::min(kBwdBlockQ<in_t>, p.Lq - i0);
      round_rows(acc.dq.data(), m, D, a.dq_out + bh * p.q_hs + i0 * p.q_rs, p.q_rs);
    }
  });
}

template <typename in_t>
void backward(const FlashParams<in_t>& p, const FlashBwdArgs<in_t>& a) {
  check_layout(p);
  if constexpr (kHalf<in_t>) {
    const HalfGemm path = native_path(p, false);
    if (path != HalfGemm::kWiden) return backward_impl<in_t, true>(p, a, path);
  }
  bool brgemm = false;
  if constexpr (std::is_same_v<in_t, float>) {
    brgemm = p.D > 0 && p.Dv > 0 && p.Lk > 0 && p.Lq > 0 &&
             f32_gemm_path(false, std::max(p.D, p.Dv)) == F32Gemm::kBrgemm;
  }
  backward_impl<in_t, false>(p, a, HalfGemm::kWiden, brgemm);
}

}  // namespace

void sdpa_fwd_kernel(const FlashParams<float>& p, const FlashFwdOut<float>& o) {
  forward(p, o);
}
void sdpa_fwd_kernel(const FlashParams<double>& p, const FlashFwdOut<double>& o) {
  forward(p, o);
}
void sdpa_bwd_kernel(const FlashParams<float>& p, const FlashBwdArgs<float>& a) {
  backward(p, a);
}
void sdpa_bwd_kernel(const FlashParams<double>& p, const FlashBwdArgs<double>& a) {
  backward(p, a);
}
void sdpa_fwd_kernel(const FlashParams<c10::Half>& p, const FlashFwdOut<c10::Half>& o) {
  forward(p, o);
}
void sdpa_fwd_kernel(const FlashParams<c10::BFloat16>& p, const FlashFwdOut<c10::BFloat16>& o) {
  forward(p, o);
}
void sdpa_bwd_kernel(const FlashParams<c10::Half>& p, const FlashBwdArgs<c10::Half>& a) {
  backward(p, a);
}
void sdpa_bwd_kernel(const FlashParams<c10::BFloat16>& p, const FlashBwdArgs<c10::BFloat16>& a) {
  backward(p, a);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace pyattn
