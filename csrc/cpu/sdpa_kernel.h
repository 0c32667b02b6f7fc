// Raw-pointer interface between csrc/sdpa.cpp (ATen side, compiled once) and the
// per-instruction-set kernels in csrc/cpu/sdpa_kernel.cpp (compiled for DEFAULT, AVX2
// and AVX512). q, k, v, out, grad_out and the gradients are contiguous (B, H, L, D); the mask is
// read through its (B, Hq, Lq, Lk) strides (broadcast dims have stride 0). Scores, statistics,
// lse, Delta and every accumulator are of the accumulation type acc_t<scalar_t>: the input dtype
// for float32 / float64, float32 for float16 / bfloat16 (whose blocks are converted to float32
// as they are loaded; docs/design.md, "Half precision on CPU").
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../sdpa_math.h"

namespace pyattn {
namespace cpu {

// Row-major C (m x n, leading dim ldc) = alpha * op(A) op(B) + beta * C, where op(A) is (m x k)
// and op(B) is (k x n); trans_a means A is stored (k x m) with leading dim lda (same for B).
// Defined in csrc/cpu/blas.cpp on top of ATen's CPU addmm (MKL here): the per-ISA kernel
// files cannot include ATen's tensor headers, and at::native::cpublas is not exported. beta = 0
// ignores C's old contents (NaN included).
void flash_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                int64_t ldc);
void flash_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
                int64_t ldc);

// How bfloat16 / float16 blocks are multiplied (csrc/cpu/blas.cpp; docs/design.md, "Half
// precision on CPU"): kWiden converts them to float32 and runs the float32 GEMM (every CPU);
// kMkl runs MKL's cblas_gemm_bf16bf16f32 (bfloat16, CPUs with AVX512-BF16); kAmx runs oneDNN's
// AMX micro-kernel through torch's cpublas::brgemm (CPUs with AMX-BF16 / AMX-FP16). The native
// paths take half operands and give float32 products; P and dS are rounded to the input dtype
// before the products that read them, as torch's CPU flash kernel does.
enum class HalfGemm { kWiden = 0, kMkl = 1, kAmx = 2 };
// The path for this dtype here: the best available, or PYATTN_CPU_HALF_GEMM's choice. Called
// once at the start of each half kernel call: it also starts a new call for the AMX path's cache
// of packed B operands, so a B operand of the half flash_gemm must be one of the call's inputs,
// unchanged until the next half_gemm_path (the kernels' B operands are Q, K, V and dO blocks).
// forward: the call is a forward (auto may choose differently for the two directions).
HalfGemm half_gemm_path(bool bf16, bool forward);
const char* half_gemm_name(HalfGemm path);
void flash_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b, int64_t ldb,
                float beta, float* c, int64_t ldc, HalfGemm path);
void flash_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                const c10::Half* a, int64_t lda, const c10::Half* b, int64_t ldb, float beta,
                float* c, int64_t ldc, HalfGemm path);

// float32 block products (csrc/cpu/blas.cpp; docs/design.md, "float32 on oneDNN's brgemm"): kBlas
// is MKL's sgemm through ATen (flash_gemm), which copies both operands of every product; kBrgemm
// is oneDNN's JIT brgemm through torch's cpublas::brgemm, which reads A and B in place, so the
// forward transposes K once per task and reads Q and V where they are. Read from
// PYATTN_CPU_F32_GEMM=auto|blas|brgemm at each call; head_dim: the larger of D and Dv.
enum class F32Gemm { kBlas = 0, kBrgemm = 1 };
constexpr int64_t kF32BrgemmBackwardMaxD = 64;
F32Gemm f32_gemm_path(bool forward, int64_t head_dim);
const char* f32_gemm_name(F32Gemm path);
// C (m x n, ldc) [+]= A (m x k, lda) B (k x n, ldb), all row-major; m, n, k > 0
void f32_brgemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                bool add_c, const float* a, const float* b, float* c);

// The AMX forward's pre-packed operands (csrc/cpu/blas.cpp; docs/design.md, "Half precision on
// CPU"): K and V of a (batch, kv head) are packed once per call into oneDNN's VNNI layout, in
// strips of kAmxStrip keys (K^T) or columns (V), and every query block multiplies them with
// torch's exported brgemm, without per-product packing.
constexpr int64_t kAmxStrip = 64;
inline int64_t amx_ld(int64_t nb) { return (nb + 15) / 16 * 16; }
// elements of the packed K (n keys of D) and V (n keys of Dv)
inline int64_t amx_keys_size(int64_t n, int64_t D) {
  return (n + kAmxStrip - 1) / kAmxStrip * ((D + 1) & ~int64_t(1)) * kAmxStrip;
}
inline int64_t amx_values_size(int64_t n, int64_t Dv) {
  return (Dv + kAmxStrip - 1) / kAmxStrip * ((n + 1) & ~int64_t(1)) * kAmxStrip;
}
void amx_pack_keys(const c10::BFloat16* k, int64_t n, int64_t D, c10::BFloat16* out);
void amx_pack_keys(const c10::Half* k, int64_t n, int64_t D, c10::Half* out);
void amx_pack_values(const c10::BFloat16* v, int64_t n, int64_t Dv, c10::BFloat16* out);
void amx_pack_values(const c10::Half* v, int64_t n, int64_t Dv, c10::Half* out);
// C (m x n, ldc) [+]= A (m x k, lda; k even) B (packed, ldb = amx_ld(n)); n <= kAmxStrip
void amx_brgemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
                const c10::BFloat16* a, const c10::BFloat16* b, float* c);
void amx_brgemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
                const c10::Half* a, const c10::Half* b, float* c);
// Releases this thread's AMX tile configuration (after a task's last brgemm).
void amx_release();

// This thread's scratch memory for one kernel task's blocks (csrc/cpu/blas.cpp): at least
// `bytes`, page-aligned, kept for the thread's later calls (grown when a call needs more). One
// user at a time per thread: a task takes it whole.
char* task_scratch(size_t bytes);

template <typename scalar_t>
struct AccType {
  using type = scalar_t;
};
template <>
struct AccType<c10::Half> {
  using type = float;
};
template <>
struct AccType<c10::BFloat16> {
  using type = float;
};
template <typename scalar_t>
using acc_t = typename AccType<scalar_t>::type;

template <typename scalar_t>
struct FlashParams {
  const scalar_t* q;  // (B, Hq, Lq, D)
  const scalar_t* k;  // (B, Hkv, Lk, D)
  const scalar_t* v;  // (B, Hkv, Lk, Dv)
  // mask_kind: flash::MaskKind (0 none, 1 bool: true = attend, 2 additive). An additive mask is
  // of scalar_t (add_mask) or, beside half inputs, float32 (add_mask_float; add_mask is then null).
  int mask_kind;
  const bool* bool_mask;
  const scalar_t* add_mask;
  const float* add_mask_float;
  int64_t mask_stride[4];  // in elements, for (b, h, i, j); 0 on broadcast dims
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
  acc_t<scalar_t> scale;
  bool causal;
  int64_t causal_off;  // query i sees keys j <= i + causal_off (flash::causal_offset)
  double dropout_p;  // 0: no dropout (the keep test compares in float, as philox.h)
  uint64_t seed, offset;
  // Dropout counter layout: score (bh, i, j) draws counter offset +
  // flash::dropout_index(drop_bh0 + bh, i, j, drop_lq, drop_lk); (0, Lq, Lk) for a plain call.
  int64_t drop_bh0, drop_lq, drop_lk;
  // Attention variants (docs/design.md, "Attention variants"): the causal and window band of
  // every row (flash::Band); softcap (0 = off); sinks[h] (Hq,) or null; ALiBi slope of (b, h) at
  // alibi[b * alibi_bstride + h] or null, bias -slope * |i + alibi_off - j| (alibi_off = Lk - Lq).
  flash::Band band;
  acc_t<scalar_t> softcap;
  const acc_t<scalar_t>* sinks;
  const acc_t<scalar_t>* alibi;
  int64_t alibi_bstride, alibi_off;
  // The layout, in elements: row i of (b, h)'s slice of q starts at q + bh * q_hs + i * q_rs
  // (bh = b * Hq + h; of k: b * Hkv + kvh), each row D contiguous elements; likewise k, v and
  // out (k_*, v_*, o_*), and lse / delta at bh * l_hs + i. The gradients share their input's
  // layout (dq: q's, dk: k's, dv: v's; grad_out: out's). set_dense_layout gives the contiguous
  // (B, H, L, D) one; a fp32/fp64 varlen unit points into the packed (total, H, D) tensors
  // (docs/design.md, "Variable-length attention"). Half inputs need dense rows (q_rs = D, ...):
  // their blocks are widened or packed as contiguous runs.
  int64_t q_hs, q_rs, k_hs, k_rs, v_hs, v_rs, o_hs, o_rs, l_hs;
};

template <typename scalar_t>
void set_dense_layout(FlashParams<scalar_t>& p) {
  p.q_hs = p.Lq * p.D;
  p.q_rs = p.D;
  p.k_hs = p.Lk * p.D;
  p.k_rs = p.D;
  p.v_hs = p.Lk * p.Dv;
  p.v_rs = p.Dv;
  p.o_hs = p.Lq * p.Dv;
  p.o_rs = p.Dv;
  p.l_hs = p.Lq;
}

// Sets p's variant fields once its shapes and causal_off are set (variants off: null pointers,
// window (-1, -1), softcap 0).
template <typename scalar_t>
void set_variants(FlashParams<scalar_t>& p, int64_t causal, int64_t window_left, int64_t window_right,
                  double softcap, const acc_t<scalar_t>* sinks, const acc_t<scalar_t>* alibi,
                  int64_t alibi_bstride) {
  const int64_t win_off = causal == flash::kUpperLeft ? 0 : p.Lk - p.Lq;
  p.band = flash::Band{p.causal, p.causal_off, window_left, window_right, win_off, p.Lq, p.Lk};
  p.softcap = static_cast<acc_t<scalar_t>>(softcap);
  p.sinks = sinks;
  p.alibi = alibi;
  p.alibi_bstride = alibi_bstride;
  p.alibi_off = p.Lk - p.Lq;
}

template <typename scalar_t>
struct FlashFwdOut {
  scalar_t* out;        // (B, Hq, Lq, Dv), each element rounded once
  acc_t<scalar_t>* lse;  // (B, Hq, Lq)
};

template <typename scalar_t>
struct FlashBwdArgs {
  const scalar_t* grad_out;     // (B, Hq, Lq, Dv)
  const acc_t<scalar_t>* lse;    // (B, Hq, Lq)
  const acc_t<scalar_t>* delta;  // (B, Hq, Lq): rowsum(grad_out * out)
  // Gradients accumulate in acc_t (the caller rounds half ones to the input dtype once).
  acc_t<scalar_t>* dq;  // (B, Hq, Lq, D), zeroed by the caller
  acc_t<scalar_t>* dk;  // (B, Hkv, Lk, D), zeroed by the caller
  acc_t<scalar_t>* dv;  // (B, Hkv, Lk, Dv), zeroed by the caller
  // Half inputs may instead take their gradients rounded, written once by the kernel from
  // per-task float32 blocks (dq, dk, dv then unused; each in its input's layout, not zeroed),
  // and leave Delta to the kernel (delta null: computed from out, in the output's layout). This
  // saves the float32 gradient tensors, their rounding pass and Delta's temporaries.
  scalar_t* dq_out = nullptr;
  scalar_t* dk_out = nullptr;
  scalar_t* dv_out = nullptr;
  const scalar_t* out = nullptr;
};

#define PYATTN_DECLARE_FLASH_KERNELS(CAP)                                                       \
  namespace CAP {                                                                               \
  void sdpa_fwd_kernel(const FlashParams<float>&, const FlashFwdOut<float>&);        \
  void sdpa_fwd_kernel(const FlashParams<double>&, const FlashFwdOut<double>&);      \
  void sdpa_bwd_kernel(const FlashParams<float>&, const FlashBwdArgs<float>&);       \
  void sdpa_bwd_kernel(const FlashParams<double>&, const FlashBwdArgs<double>&);     \
  void sdpa_fwd_kernel(const FlashParams<c10::Half>&, const FlashFwdOut<c10::Half>&); \
  void sdpa_fwd_kernel(const FlashParams<c10::BFloat16>&, const FlashFwdOut<c10::BFloat16>&); \
  void sdpa_bwd_kernel(const FlashParams<c10::Half>&, const FlashBwdArgs<c10::Half>&); \
  void sdpa_bwd_kernel(const FlashParams<c10::BFloat16>&, const FlashBwdArgs<c10::BFloat16>&); \
  }

PYATTN_DECLARE_FLASH_KERNELS(DEFAULT)
PYATTN_DECLARE_FLASH_KERNELS(AVX2)
PYATTN_DECLARE_FLASH_KERNELS(AVX512)

}  // namespace cpu
}  // namespace pyattn
