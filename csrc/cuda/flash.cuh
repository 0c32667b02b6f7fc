// The flash-attention kernels of the CUDA backend, shared by pyattn::sdpa_* (sdpa.cu) and
// pyattn::varlen_attention_* (varlen_attention.cu): a packed batch runs the same kernels with
// Params::cu_q set. Included by those two files only; host helpers are inline, kernels templates.
//
//   S = scale * Q K^T + mask     P = softmax(S)     O = dropout(P) V     lse = logsumexp(S)
//
// The score math (masking, causal bounds, online softmax, dropout counters, dS) is the one in
// csrc/sdpa_math.h that the CPU op runs too; this file only tiles it.
//
// Structure: every kernel is a short sequence of block GEMMs on shared-memory tiles
// (block_gemm: C (+)= A B with A and B addressed through strides, so transposes cost nothing)
// and SIMT passes over the float score tiles. block_gemm runs on tensor cores
// (mma.sync.m16n8k16, fp32 accumulate) for fp16/bf16 on sm80+, and as register-tiled SIMT FMA
// for fp32. Accumulators (O, dK, dV, dQ) stay in shared memory as fp32: simpler to get right
// than register fragments whose rows must be rescaled, at the cost of speed.
//
//   forward  grid = (query blocks) x (B*Hq); loops over key blocks (causal: only up to the
//            diagonal), online softmax, saves lse.
//   backward 1) Delta = rowsum(dO * O);  2) dK/dV: grid = (key blocks) x (B*Hkv), looping over
//            the Hq/Hkv query heads of the GQA group and over query blocks (causal: from the
//            diagonal on), so each dK/dV element has one writer: no atomics, deterministic;
//            3) dQ: grid = (query blocks) x (B*Hq), looping over key blocks.
//
// Head dims are templated on three buckets (64, 128, 256): tiles are zero-padded to a multiple
// of 16 along the head dim, so odd sizes (59) are exact; > 256 is rejected.
#pragma once

#define PYATTN_HOST_CHECKS 1

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>
#include <limits>
#include <tuple>

#include "common.h"
#include "sdpa.h"
#include "sdpa_math.h"
#include "philox.h"

namespace pyattn {
namespace flash_cuda {

using flash::MaskKind;

constexpr int kThreads = 128;  // 4 warps per CTA in every kernel
constexpr int kWarps = kThreads / 32;
// Largest dynamic shared memory one CTA may opt into on sm80 (A100: 163 KiB); every tile
// configuration below fits in it, so one build serves sm80 and sm90.
constexpr int kMaxSmemSm80 = 166912;

// ------------------------------------------------------------------------------------------
// Tile configurations and shared-memory layouts
// ------------------------------------------------------------------------------------------

enum class Kernel { kFwd, kBwdKV, kBwdQ };

// (BM query rows, BN key rows) per kernel, element size and head-dim bucket. Chosen so the
// shared-memory tiles (below) fit sm80's 163 KiB.
template <Kernel K, typename T, int Dp>
struct Tiles {
  static constexpr bool kHalf = sizeof(T) == 2;
  static constexpr int BM = K == Kernel::kFwd
                                ? ((kHalf || Dp == 64) ? 64 : 32)
                                : K == Kernel::kBwdKV
                                      ? ((kHalf && Dp == 64) ? 64 : (!kHalf && Dp == 256) ? 16 : 32)
                                      : ((Dp <= 128 && (kHalf || Dp == 64)) ? 64 : (!kHalf && Dp == 256) ? 16 : 32);
  static constexpr int BN = K == Kernel::kFwd
                                ? (kHalf ? (Dp == 256 ? 32 : 64) : (Dp == 64 ? 64 : 32))
                                : BM;
};

// Leading dimensions (in elements) of the shared tiles; the padding of 16 bytes per row
// spreads a warp's fragment loads over all banks.
template <typename T, int Dp, int BM, int BN>
struct Layout {
  static constexpr int kPadT = 16 / static_cast<int>(sizeof(T));
  static constexpr int ldD = Dp + kPadT;  // T tiles over the head dim (Q, K, V, dO)
  static constexpr int ldF = Dp + 4;      // fp32 accumulators over the head dim (O, dK, dV, dQ)
  static constexpr int ldS = BN + 4;      // fp32 score tiles (S, dP), BM x BN
  static constexpr int ldP = BN + kPadT;  // T score tiles (P, dS), BM x BN
  static constexpr int tileD(int rows) { return rows * ldD * static_cast<int>(sizeof(T)); }
  static constexpr int accD(int rows) { return rows * ldF * 4; }
  static constexpr int scoreF() { return BM * ldS * 4; }
  static constexpr int scoreT() { return BM * ldP * static_cast<int>(sizeof(T)); }
  // Every size above is a multiple of 16 bytes (rows are multiples of 16), so carving the
  // buffers one after another keeps each 16-byte aligned for the vectorised tile loads.
  static constexpr int fwd() { return tileD(BM) + 2 * tileD(BN) + scoreF() + scoreT() + accD(BM) + 2 * BM * 4; }
  static constexpr int bwd_kv() {
    return 2 * tileD(BN) + 2 * tileD(BM) + 2 * scoreF() + 2 * scoreT() + 2 * accD(BN) + 2 * BM * 4;
  }
  static constexpr int bwd_q() { return 2 * tileD(BM) + 2 * tileD(BN) + 2 * scoreF() + scoreT() + accD(BM) + 2 * BM * 4; }
};

template <Kernel K, typename T, int Dp>
constexpr int smem_bytes() {
  using Tl = Tiles<K, T, Dp>;
  using L = Layout<T, Dp, Tl::BM, Tl::BN>;
  return K == Kernel::kFwd ? L::fwd() : K == Kernel::kBwdKV ? L::bwd_kv() : L::bwd_q();
}

// Carves consecutive buffers out of dynamic shared memory.
struct SmemCursor {
  char* p;
  template <typename U>
  __device__ U* take(int bytes) {
    U* r = reinterpret_cast<U*>(p);
    p += bytes;
    return r;
  }
};

// ------------------------------------------------------------------------------------------
// Kernel parameters
// ------------------------------------------------------------------------------------------

struct Params {
  const void* q;     // (B, Hq, Lq, D) contiguous
  const void* k;     // (B, Hkv, Lk, D) contiguous
  const void* v;     // (B, Hkv, Lk, Dv) contiguous
  const void* mask;  // bool or T, read through strides; nullptr when mask_kind == kNoMask
  int mask_kind;
  int64_t msb, msh, msi, msj;  // mask strides for (b, h, i, j); 0 where broadcast
  int64_t B, Hq, Hkv, Lq, Lk;
  int D, Dv;
  float scale;
  float dropout_p;
  bool causal;
  int64_t causal_off;  // query i sees keys j <= i + causal_off (flash::causal_offset)
  bool vec_ok;  // every global tile base is 16-byte aligned and D, Dv are multiples of 16 bytes
  uint64_t seed, offset;

  // forward
  void* out;   // (B, Hq, Lq, Dv)
  float* lse;  // (B, Hq, Lq)
  // backward
  const void* o;   // forward output (B, Hq, Lq, Dv)
  const void* dout;  // (B, Hq, Lq, Dv)
  const float* lse_in;  // (B, Hq, Lq)
  float* delta;       // (B, Hq, Lq)
  void* dq;           // (B, Hq, Lq, D)
  void* dk;           // (B, Hkv, Lk, D)
  void* dv;           // (B, Hkv, Lk, Dv)

  int64_t n_blocks;  // query blocks (forward, dQ) or key blocks (dK/dV) per head

  // Dropout counters follow a (B, Hq, drop_lq, drop_lk) score tensor: (Lq, Lk) for sdpa, the
  // padded (max_seqlen_q, max_seqlen_k) for varlen_attention.
  int64_t drop_lq, drop_lk;
  // Packed variable-length sequences (varlen_attention; nullptr for sdpa): batch entry b is
  // sequence b, rows cu_q[b] .. cu_q[b + 1] of q, out, dout, o, dq laid out (Hq, total_q, .),
  // rows cu_k[b] .. of k, v, dk, dv laid out (Hkv, total_k, .), lse and delta (Hq, total_q);
  // Lq and Lk are then the longest lengths (the grid) until seq_bounds() narrows them.
  const int32_t* cu_q;
  const int32_t* cu_k;
  int64_t total_q, total_k;
  bool lower_right;  // varlen causal: the diagonal ends at each sequence's last key

  // Attention variants (docs/design.md, "Attention variants"), read only by the kernels
  // instantiated with kVar = true, so a call without them runs the unchanged code.
  int64_t win_left, win_right;  // query i sees keys d - left <= j <= d + right; -1 = unbounded
  bool win_upper_left;          // the window's diagonal d = i (upper-left causality), else i + Lk - Lq
  float softcap;                // s -> softcap tanh(s / softcap); 0 = off
  float softcap_inv;            // 1 / softcap (a product in the kernels: no division slow path)
  const float* sinks;           // (Hq,) float32 or nullptr: one more logit in each row's denominator
  const float* alibi;           // (B, Hq) or (Hq,) float32 or nullptr: s -= slope |i + Lk - Lq - j|
  int64_t alibi_bstride;        // Hq for (B, Hq) slopes, 0 for (Hq,)
};

// ------------------------------------------------------------------------------------------
// Device helpers
// ------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_f(T x) {
  return static_cast<float>(x);
}
template <typename T>
__device__ __forceinline__ T from_f(float x) {
  return static_cast<T>(x);
}

__device__ __forceinline__ int round16(int n) {
  return (n + 15) / 16 * 16;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// NaN-propagating max (flash::nan_max), so a NaN score poisons its row as on the CPU.
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = flash::nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// dst[r * ld + c] = src[(row0 + r) * D + c] for r < rows, c < cols (cols a multiple of 16),
// zero outside the (L, D) tensor, so padded rows and head-dim columns add nothing to GEMMs.
// src points at row 0 of one (b, h) slice; row offsets are 64-bit.
template <typename T>
__device__ void load_tile(T* dst, int ld, const T* __restrict__ src, int64_t row0, int64_t L, int D,
                          int rows, int cols, bool vec_ok) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  if (vec_ok) {
    // D % kVec == 0 here, so a chunk is either wholly inside the row or wholly padding.
    const int chunks = cols / kVec;
    for (int idx = threadIdx.x; idx < rows * chunks; idx += blockDim.x) {
      const int r = idx / chunks;
      const int c = (idx % chunks) * kVec;
      const int64_t row = row0 + r;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (row < L && c < D) val = *reinterpret_cast<const uint4*>(src + row * D + c);
      *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
    }
  } else {
    for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
      const int r = idx / cols;
      const int c = idx % cols;
      const int64_t row = row0 + r;
      dst[r * ld + c] = (row < L && c < D) ? src[row * D + c] : from_f<T>(0.0f);
    }
  }
}

template <typename T>
__device__ void zero_f(float* dst, int ld, int rows, int cols) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) dst[(idx / cols) * ld + idx % cols] = 0.0f;
}

// dst[(row0 + r) * D + c] = mult * acc[r * ld + c] for rows inside L and c < D.
template <typename T>
__device__ void store_tile(T* __restrict__ dst, int64_t row0, int64_t L, int D, const float* acc, int ld,
                           int rows, float mult) {
  for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const int r = idx / D;
    const int c = idx % D;
    const int64_t row = row0 + r;
    if (row < L) dst[row * D + c] = from_f<T>(acc[r * ld + c] * mult);
  }
}

// ---- block GEMM ---------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ uint16_t bits16(T x);
template <>
__device__ __forceinline__ uint16_t bits16<c10::Half>(c10::Half x) {
  return x.x;
}
template <>
__device__ __forceinline__ uint16_t bits16<c10::BFloat16>(c10::BFloat16 x) {
  return x.x;
}

// Two 16-bit elements in one register, the lower-indexed one in the low half (PTX fragment
// order). When they are adjacent in memory (stride 1) one aligned 32-bit load does it: every
// leading dimension and every k offset used here is even.
template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* base, int64_t idx, int stride) {
  if (stride == 1) return *reinterpret_cast<const uint32_t*>(base + idx);
  return static_cast<uint32_t>(bits16(base[idx])) | (static_cast<uint32_t>(bits16(base[idx + stride])) << 16);
}

template <typename T>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2]);

template <>
__device__ __forceinline__ void mma_16816<c10::Half>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

template <>
__device__ __forceinline__ void mma_16816<c10::BFloat16>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// C[m, n] (+)= sum_k A(m, k) B(k, n) over the whole CTA, with
//   A(m, k) = A[m * ars + k * acs],  B(k, n) = B[k * brs + n * bcs],  C row-major (ldc), fp32.
// M, N, K are multiples of 16 (tile sizes and head dims rounded up to 16). Each output element
// has exactly one owner (a warp on tensor cores, a thread on SIMT), which reads C before it
// writes it: no synchronisation inside; callers __syncthreads() around.
//
// Tensor cores: a warp owns a 16 x 32 strip as four m16n8k16 tiles sharing the A fragment.
// Fragment layout (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
//   A: a0 (g, 2t..2t+1) a1 (g+8, 2t..) a2 (g, 2t+8..) a3 (g+8, 2t+8..)
//   B: b0 (k 2t..2t+1, n g) b1 (k 2t+8.., n g)       C: c0,c1 (g, 2t..) c2,c3 (g+8, 2t..)
template <typename T>
__device__ void block_gemm_mma(const T* A, int ars, int acs, const T* B, int brs, int bcs, float* C, int ldc,
                               int M, int N, int K, bool accumulate) {
  constexpr int WN = 4;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;
  const int mtiles = M / 16, ntiles = (N + 8 * WN - 1) / (8 * WN);
  for (int tile = warp; tile < mtiles * ntiles; tile += kWarps) {
    const int m0 = (tile / ntiles) * 16, n0 = (tile % ntiles) * (8 * WN);
    float c[WN][4];
#pragma unroll
    for (int w = 0; w < WN; ++w) {
      const int n = n0 + 8 * w + 2 * t;
      const bool in = n0 + 8 * w < N;
      c[w][0] = (accumulate && in) ? C[(m0 + g) * ldc + n] : 0.0f;
      c[w][1] = (accumulate && in) ? C[(m0 + g) * ldc + n + 1] : 0.0f;
      c[w][2] = (accumulate && in) ? C[(m0 + g + 8) * ldc + n] : 0.0f;
      c[w][3] = (accumulate && in) ? C[(m0 + g + 8) * ldc + n + 1] : 0.0f;
    }
    for (int k0 = 0; k0 < K; k0 += 16) {
      uint32_t a[4];
      a[0] = load_pair(A, (m0 + g) * ars + (k0 + 2 * t) * acs, acs);
      a[1] = load_pair(A, (m0 + g + 8) * ars + (k0 + 2 * t) * acs, acs);
      a[2] = load_pair(A, (m0 + g) * ars + (k0 + 2 * t + 8) * acs, acs);
      a[3] = load_pair(A, (m0 + g + 8) * ars + (k0 + 2 * t + 8) * acs, acs);
#pragma unroll
      for (int w = 0; w < WN; ++w) {
        if (n0 + 8 * w < N) {  // warp-uniform: every lane takes part in the mma
          const int n = n0 + 8 * w + g;
          uint32_t b[2];
          b[0] = load_pair(B, (k0 + 2 * t) * brs + n * bcs, brs);
          b[1] = load_pair(B, (k0 + 2 * t + 8) * brs + n * bcs, brs);
          mma_16816<T>(c[w], a, b);
        }
      }
    }
#pragma unroll
    for (int w = 0; w < WN; ++w) {
      if (n0 + 8 * w < N) {
        const int n = n0 + 8 * w + 2 * t;
        C[(m0 + g) * ldc + n] = c[w][0];
        C[(m0 + g) * ldc + n + 1] = c[w][1];
        C[(m0 + g + 8) * ldc + n] = c[w][2];
        C[(m0 + g + 8) * ldc + n + 1] = c[w][3];
      }
    }
  }
}

// SIMT: a thread owns a 4 x 4 micro-tile; fp32 FMA (inputs of any type widened to fp32).
template <typename T>
__device__ void block_gemm_simt(const T* A, int ars, int acs, const T* B, int brs, int bcs, float* C, int ldc,
                                int M, int N, int K, bool accumulate) {
  const int mtiles = M / 4, ntiles = N / 4;
  for (int tile = threadIdx.x; tile < mtiles * ntiles; tile += blockDim.x) {
    const int m0 = (tile / ntiles) * 4, n0 = (tile % ntiles) * 4;
    float c[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) c[i][j] = accumulate ? C[(m0 + i) * ldc + n0 + j] : 0.0f;
    for (int k = 0; k < K; ++k) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = to_f(A[(m0 + i) * ars + k * acs]);
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = to_f(B[k * brs + (n0 + j) * bcs]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) c[i][j] = fmaf(a[i], b[j], c[i][j]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) C[(m0 + i) * ldc + n0 + j] = c[i][j];
  }
}

template <typename T>
__device__ __forceinline__ void block_gemm(const T* A, int ars, int acs, const T* B, int brs, int bcs, float* C,
                                           int ldc, int M, int N, int K, bool accumulate) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (sizeof(T) == 2) {
    block_gemm_mma<T>(A, ars, acs, B, brs, bcs, C, ldc, M, N, K, accumulate);
  } else {
    block_gemm_simt<T>(A, ars, acs, B, brs, bcs, C, ldc, M, N, K, accumulate);
  }
#else
  block_gemm_simt<T>(A, ars, acs, B, brs, bcs, C, ldc, M, N, K, accumulate);
#endif
}

// ---- score math (sdpa_math.h) ----------------------------------------------------

// The masked, scaled score of (b, h, i, j) from the raw dot product; -inf where the element is
// outside the tensor, above the causal diagonal (when check_causal) or masked out.
template <typename T>
__device__ __forceinline__ float user_mask(const Params& p, float s, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (p.mask_kind != flash::kNoMask) {
    const int64_t off = b * p.msb + h * p.msh + i * p.msi + j * p.msj;
    if (p.mask_kind == flash::kBoolMask) {
      s = flash::apply_bool_mask(s, static_cast<const bool*>(p.mask)[off]);
    } else {
      s += to_f(static_cast<const T*>(p.mask)[off]);
    }
  }
  return s;
}

template <typename T>
__device__ __forceinline__ float masked_score(const Params& p, float dot, int64_t b, int64_t h, int64_t i,
                                              int64_t j, bool check_causal) {
  if (i >= p.Lq || j >= p.Lk) return -std::numeric_limits<float>::infinity();
  float s = dot * p.scale;
  if (check_causal) s = flash::apply_bool_mask(s, flash::causal_allowed(i, j, p.causal_off));
  return user_mask<T>(p, s, b, h, i, j);
}

// The variants' causal/window band of one tile (query rows q0 + r, keys k0 + c), as bounds on
// c - r: element (r, c) is inside when lo <= c - r <= hi. This is flash::Band's
// lo(i) <= j < hi(i) unrolled (for j inside the tensor: j >= i + win_off - left, j <= i +
// causal_off, j <= i + win_off + right), so a tile costs two 32-bit compares per element and no
// 64-bit band state in registers (|c - r| < BM + BN, so bounds clamped to +-2^30 are exact).
// alibi_d + r - c is ALiBi's i + Lk - Lq - j.
struct TileVar {
  int lo, hi;
  int64_t alibi_d;
};

__device__ __forceinline__ TileVar tile_var(const Params& p, int64_t q0, int64_t k0) {
  constexpr int64_t kBig = int64_t(1) << 30;
  const int64_t rel = k0 - q0;  // j - i = (c - r) + rel
  const int64_t win_off = p.win_upper_left ? 0 : p.Lk - p.Lq;
  int64_t lo = p.win_left >= 0 ? win_off - p.win_left - rel : -kBig;
  int64_t hi = kBig;
  if (p.causal && p.causal_off - rel < hi) hi = p.causal_off - rel;
  if (p.win_right >= 0 && win_off + p.win_right - rel < hi) hi = win_off + p.win_right - rel;
  lo = lo < -kBig ? -kBig : (lo > kBig ? kBig : lo);
  hi = hi < -kBig ? -kBig : (hi > kBig ? kBig : hi);
  return TileVar{static_cast<int>(lo), static_cast<int>(hi), q0 - k0 + p.Lk - p.Lq};
}

// The kVar kernels' score of tile element (r, c) = (i, j), in DESIGN.md's order (as the cpu
// kernel's variant_row + mask_row): scale, softcap, ALiBi, the causal/window band, the user
// mask. *g gets softcap's derivative 1 - tanh^2 (the backward's dS factor; left alone when
// softcap is off).
template <typename T>
__device__ __forceinline__ float variant_score(const Params& p, const TileVar& tv, float slope, float dot, int64_t b,
                                               int64_t h, int r, int c, int64_t i, int64_t j, float* g) {
  if (i >= p.Lq || j >= p.Lk) return -std::numeric_limits<float>::infinity();
  float s = dot * p.scale;
  if (p.softcap > 0.0f) {
    const float t = tanhf(s * p.softcap_inv);
    s = p.softcap * t;
    *g = 1.0f - t * t;
  }
  if (p.alibi != nullptr) {
    const int64_t d = tv.alibi_d + (r - c);
    s -= slope * static_cast<float>(d < 0 ? -d : d);
  }
  if (c - r < tv.lo || c - r > tv.hi) s = -std::numeric_limits<float>::infinity();
  return user_mask<T>(p, s, b, h, i, j);
}

__device__ __forceinline__ float dropout_mult(const Params& p, int64_t bh, int64_t i, int64_t j) {
  return flash::dropout_scale(p.seed, p.offset + flash::dropout_index(bh, i, j, p.drop_lq, p.drop_lk),
                              p.dropout_p);
}

// Narrows p to batch entry b: for packed sequences its own Lq, Lk and causal offset, and the
// first query / key row of the sequence (q_start / k_start; 0 for a padded batch).
__device__ __forceinline__ void seq_bounds(Params& p, int64_t b, int64_t& q_start, int64_t& k_start) {
  if (p.cu_q == nullptr) {
    q_start = k_start = 0;
    return;
  }
  q_start = p.cu_q[b];
  k_start = p.cu_k[b];
  p.Lq = p.cu_q[b + 1] - q_start;
  p.Lk = p.cu_k[b + 1] - k_start;
  p.causal_off = p.lower_right ? p.Lk - p.Lq : 0;
}

// The causal and window band of batch entry b, once seq_bounds has narrowed p to it: a query
// block sees the keys [lo(first row), hi(last row)) and a key block the queries
// [query_begin, query_end), so the blocks wholly outside the band are never visited (the
// elements of the visited ones are masked through TileVar).
__device__ __forceinline__ flash::Band band_of(const Params& p) {
  return flash::Band{p.causal, p.causal_off, p.win_left, p.win_right, p.win_upper_left ? 0 : p.Lk - p.Lq,
                     p.Lq, p.Lk};
}

__device__ __forceinline__ float alibi_slope(const Params& p, int64_t b, int64_t h) {
  return p.alibi != nullptr ? p.alibi[b * p.alibi_bstride + h] : 0.0f;
}

// The keys [k_begin, k_stop) that query rows [q0, q_end) see (q_end > q0).
template <bool kVar>
__device__ __forceinline__ void key_range(const Params& p, const flash::Band& band, int64_t q0, int64_t q_end,
                                          int64_t& k_begin, int64_t& k_stop) {
  if constexpr (kVar) {
    k_begin = band.on() ? band.lo(q0) : 0;
    const int64_t hi = band.hi(q_end - 1);
    k_stop = band.on() ? (hi > k_begin ? hi : k_begin) : p.Lk;
  } else {
    k_begin = 0;
    k_stop = p.causal ? flash::causal_key_end(q_end, p.Lk, p.causal_off) : p.Lk;
  }
}

// The score of tile element (r, c) = (i, j): the plain kernel's (masked_score, the causal
// diagonal checked only where the tile crosses it) or, with kVar, the variants'.
template <typename T, bool kVar>
__device__ __forceinline__ float tile_score(const Params& p, const TileVar& tv, float slope, float dot, int64_t b,
                                            int64_t h, int r, int c, int64_t i, int64_t j, bool check_causal,
                                            float* g) {
  if constexpr (kVar) {
    return variant_score<T>(p, tv, slope, dot, b, h, r, c, i, j, g);
  } else {
    (void)tv;
    (void)slope;
    (void)g;
    return masked_score<T>(p, dot, b, h, i, j, check_causal);
  }
}

// The row of (b, query head h)'s first query in the (rows, D) views of q/out/dq (and of
// lse/delta), and of (b, kv head)'s first key in k/v/dk/dv.
__device__ __forceinline__ int64_t q_row(const Params& p, int64_t b, int64_t h, int64_t q_start) {
  return p.cu_q != nullptr ? h * p.total_q + q_start : (b * p.Hq + h) * p.Lq;
}
__device__ __forceinline__ int64_t k_row(const Params& p, int64_t b, int64_t kvh, int64_t k_start) {
  return p.cu_q != nullptr ? kvh * p.total_k + k_start : (b * p.Hkv + kvh) * p.Lk;
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------

// kVar: the attention variants are on (Params' window, softcap, sinks, ALiBi); the false
// instantiation is the plain kernel, with no variant code in it.
template <typename T, int Dp, bool kVar>
__global__ void __launch_bounds__(kThreads) sdpa_fwd_kernel(const Params p_in) {
  using Tl = Tiles<Kernel::kFwd, T, Dp>;
  constexpr int BM = Tl::BM, BN = Tl::BN;
  using L = Layout<T, Dp, BM, BN>;
  extern __shared__ __align__(16) char smem_raw[];
  SmemCursor cur{smem_raw};
  T* sQ = cur.take<T>(L::tileD(BM));
  T* sK = cur.take<T>(L::tileD(BN));
  T* sV = cur.take<T>(L::tileD(BN));
  float* sS = cur.take<float>(L::scoreF());
  T* sP = cur.take<T>(L::scoreT());
  float* sO = cur.take<float>(L::accD(BM));
  float* row_m = cur.take<float>(BM * 4);
  float* row_l = cur.take<float>(BM * 4);

  Params p = p_in;
  const int64_t qb = blockIdx.x % p.n_blocks;
  const int64_t bh = blockIdx.x / p.n_blocks;
  const int64_t b = bh / p.Hq, h = bh % p.Hq;
  const int64_t kvh = flash::kv_head(h, p.Hq, p.Hkv);
  const int64_t q0 = qb * BM;
  const int Dk = round16(p.D), Dvk = round16(p.Dv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t q_start, k_start;
  seq_bounds(p, b, q_start, k_start);
  if (q0 >= p.Lq) return;  // past a packed sequence's end (block-uniform, before any sync)
  const int64_t qr = q_row(p, b, h, q_start), kr = k_row(p, b, kvh, k_start);

  const T* q = static_cast<const T*>(p.q) + qr * p.D;
  const T* k = static_cast<const T*>(p.k) + kr * p.D;
  const T* v = static_cast<const T*>(p.v) + kr * p.Dv;

  load_tile(sQ, L::ldD, q, q0, p.Lq, p.D, BM, Dk, p.vec_ok);
  zero_f<T>(sO, L::ldF, BM, Dvk);
  for (int r = threadIdx.x; r < BM; r += blockDim.x) {
    flash::RowSoftmax<float> rs;
    rs.init();
    row_m[r] = rs.m;
    row_l[r] = rs.l;
  }

  const int64_t q_end = q0 + BM < p.Lq ? q0 + BM : p.Lq;
  // key blocks wholly outside every row's band (causal, window) are never visited
  const flash::Band band = kVar ? band_of(p) : flash::Band{};
  const float slope = kVar ? alibi_slope(p, b, h) : 0.0f;
  int64_t k_begin, k_stop;
  key_range<kVar>(p, band, q0, q_end, k_begin, k_stop);
  for (int64_t k0 = k_begin; k0 < k_stop; k0 += BN) {
    __syncthreads();  // the previous block's P V product is done with sK, sV, sP
    load_tile(sK, L::ldD, k, k0, p.Lk, p.D, BN, Dk, p.vec_ok);
    load_tile(sV, L::ldD, v, k0, p.Lk, p.Dv, BN, Dvk, p.vec_ok);
    __syncthreads();
    // S = Q K^T: B(k = d, n = j) = K[j, d]
    block_gemm<T>(sQ, L::ldD, 1, sK, 1, L::ldD, sS, L::ldS, BM, BN, Dk, false);
    __syncthreads();

    const int64_t k_end = k0 + BN < p.Lk ? k0 + BN : p.Lk;
    const bool check_causal = !kVar && p.causal && flash::causal_block_needs_mask(q0, k_end, p.causal_off);
    const TileVar tv = kVar ? tile_var(p, q0, k0) : TileVar{};
    // One warp per query row: mask, online-softmax update, P (with dropout), rescale O.
    for (int r = warp; r < BM; r += kWarps) {
      const int64_t i = q0 + r;
      float mx = -std::numeric_limits<float>::infinity();
      for (int c = lane; c < BN; c += 32) {
        float g;
        const float s = tile_score<T, kVar>(p, tv, slope, sS[r * L::ldS + c], b, h, r, c, i, k0 + c, check_causal, &g);
        sS[r * L::ldS + c] = s;
        mx = flash::nan_max(mx, s);
      }
      mx = warp_max(mx);
      flash::RowSoftmax<float> rs;
      rs.m = row_m[r];
      rs.l = row_l[r];
      const float alpha = rs.rescale(mx);
      float sum = 0.0f;
      for (int c = lane; c < BN; c += 32) {
        float w = rs.weight(sS[r * L::ldS + c]);
        sum += w;
        if (p.dropout_p > 0.0f && i < p.Lq && k0 + c < p.Lk) w *= dropout_mult(p, bh, i, k0 + c);
        sP[r * L::ldP + c] = from_f<T>(w);
      }
      rs.l += warp_sum(sum);
      for (int c = lane; c < Dvk; c += 32) sO[r * L::ldF + c] *= alpha;
      __syncwarp();  // every lane has read row_m/row_l before lane 0 overwrites them
      if (lane == 0) {
        row_m[r] = rs.m;
        row_l[r] = rs.l;
      }
    }
    __syncthreads();
    // O += P V: B(k = j, n = c) = V[j, c]
    block_gemm<T>(sP, L::ldP, 1, sV, L::ldD, 1, sO, L::ldF, BM, Dvk, BN, true);
  }
  __syncthreads();

  T* out = static_cast<T*>(p.out) + qr * p.Dv;
  float* lse = p.lse + qr;
  for (int r = warp; r < BM; r += kWarps) {
    const int64_t i = q0 + r;
    if (i >= p.Lq) continue;  // warp-uniform
    flash::RowSoftmax<float> rs;
    rs.m = row_m[r];
    rs.l = row_l[r];
    float inv, row_lse;
    if (kVar && p.sinks != nullptr) {
      // the sink joins the denominator only; lse includes it (a row with only its sink: zeros)
      inv = flash::close_with_sink(rs.m, rs.l, p.sinks[h], &row_lse);
    } else {
      inv = rs.inv_sum();
      row_lse = rs.lse();
    }
    for (int c = lane; c < p.Dv; c += 32) out[i * p.Dv + c] = from_f<T>(sO[r * L::ldF + c] * inv);
    if (lane == 0) lse[i] = row_lse;
  }
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------

// Delta_i = dO_i . O_i in fp32, one warp per (b, h, i) row.
template <typename T>
__global__ void __launch_bounds__(kThreads) sdpa_bwd_delta_kernel(const Params p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t rows = p.B * p.Hq * p.Lq;
  if (row >= rows) return;  // warp-uniform; no block-wide sync below
  const T* o = static_cast<const T*>(p.o) + row * p.Dv;
  const T* dout = static_cast<const T*>(p.dout) + row * p.Dv;
  float acc = 0.0f;
  for (int c = lane; c < p.Dv; c += 32) acc = fmaf(to_f(dout[c]), to_f(o[c]), acc);
  acc = warp_sum(acc);
  if (lane == 0) p.delta[row] = acc;
}

// Recomputes P and dS of one (query block, key block) tile from S = Q K^T and dP = dO V^T (in
// sS, sdP): writes dS (and Z * P when sPZ is given) as T for the following GEMMs.
// kVar: the variants' score (variant_score); softcap's 1 - tanh^2 multiplies dS. The sink needs
// nothing here: the saved lse includes it, and its own gradient is taken from lse and Delta on
// the Python side (pyattn/ops/_common.py, sink_grad).
template <typename T, int BM, int BN, int ldS, int ldP, bool kVar>
__device__ void backward_scores(const Params& p, const float* sS, const float* sdP, const float* s_lse,
                                const float* s_delta, T* sPZ, T* sdS, int64_t b, int64_t h, int64_t bh, int64_t q0,
                                int64_t k0) {
  const int64_t k_end = k0 + BN < p.Lk ? k0 + BN : p.Lk;
  const bool check_causal = !kVar && p.causal && flash::causal_block_needs_mask(q0, k_end, p.causal_off);
  const TileVar tv = kVar ? tile_var(p, q0, k0) : TileVar{};
  const float slope = kVar ? alibi_slope(p, b, h) : 0.0f;
  for (int idx = threadIdx.x; idx < BM * BN; idx += blockDim.x) {
    const int r = idx / BN, c = idx % BN;
    const int64_t i = q0 + r, j = k0 + c;
    float g = 1.0f;
    const float s = tile_score<T, kVar>(p, tv, slope, sS[r * ldS + c], b, h, r, c, i, j, check_causal, &g);
    // Outside the tensor s = -inf and lse is +inf or finite: P = 0 either way, never NaN.
    const float pr = (i < p.Lq && j < p.Lk) ? flash::prob(s, s_lse[r]) : 0.0f;
    const float z = (p.dropout_p > 0.0f && i < p.Lq && j < p.Lk) ? dropout_mult(p, bh, i, j) : 1.0f;
    if (sPZ != nullptr) sPZ[r * ldP + c] = from_f<T>(pr * z);
    float ds = flash::dscore(pr, z * sdP[r * ldS + c], s_delta[r]);
    if constexpr (kVar) ds *= g;  // through the softcap: dS_raw = dS (1 - tanh^2)
    sdS[r * ldP + c] = from_f<T>(ds);
  }
}

template <typename T>
__device__ void load_row_stats(const Params& p, float* s_lse, float* s_delta, int64_t row0, int64_t q0, int rows) {
  // row0: the (b, h) slice's first row of lse / delta (q_row)
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    const int64_t i = q0 + r;
    const bool in = i < p.Lq;
    s_lse[r] = in ? p.lse_in[row0 + i] : std::numeric_limits<float>::infinity();
    s_delta[r] = in ? p.delta[row0 + i] : 0.0f;
  }
}

template <typename T, int Dp, bool kVar>
__global__ void __launch_bounds__(kThreads) sdpa_bwd_kv_kernel(const Params p_in) {
  using Tl = Tiles<Kernel::kBwdKV, T, Dp>;
  constexpr int BM = Tl::BM, BN = Tl::BN;
  using L = Layout<T, Dp, BM, BN>;
  extern __shared__ __align__(16) char smem_raw[];
  SmemCursor cur{smem_raw};
  T* sK = cur.take<T>(L::tileD(BN));
  T* sV = cur.take<T>(L::tileD(BN));
  T* sQ = cur.take<T>(L::tileD(BM));
  T* sdO = cur.take<T>(L::tileD(BM));
  float* sS = cur.take<float>(L::scoreF());
  float* sdP = cur.take<float>(L::scoreF());
  T* sPZ = cur.take<T>(L::scoreT());
  T* sdS = cur.take<T>(L::scoreT());
  float* sdK = cur.take<float>(L::accD(BN));
  float* sdV = cur.take<float>(L::accD(BN));
  float* s_lse = cur.take<float>(BM * 4);
  float* s_delta = cur.take<float>(BM * 4);

  Params p = p_in;
  const int64_t kb = blockIdx.x % p.n_blocks;
  const int64_t bkv = blockIdx.x / p.n_blocks;
  const int64_t b = bkv / p.Hkv, kvh = bkv % p.Hkv;
  const int64_t group = p.Hq / p.Hkv;
  const int64_t k0 = kb * BN;
  const int Dk = round16(p.D), Dvk = round16(p.Dv);
  int64_t q_start, k_start;
  seq_bounds(p, b, q_start, k_start);
  if (k0 >= p.Lk) return;  // past a packed sequence's end
  const int64_t kr = k_row(p, b, kvh, k_start);

  const T* k = static_cast<const T*>(p.k) + kr * p.D;
  const T* v = static_cast<const T*>(p.v) + kr * p.Dv;
  load_tile(sK, L::ldD, k, k0, p.Lk, p.D, BN, Dk, p.vec_ok);
  load_tile(sV, L::ldD, v, k0, p.Lk, p.Dv, BN, Dvk, p.vec_ok);
  zero_f<T>(sdK, L::ldF, BN, Dk);
  zero_f<T>(sdV, L::ldF, BN, Dvk);

  // Causal: query i sees key j only when j <= i + off, so queries before k0 - off contribute
  // nothing (the loop starts at the query block holding the first one that does). With the
  // variants, only the queries [query_begin, query_end) whose band meets this key block.
  const flash::Band band = kVar ? band_of(p) : flash::Band{};
  int64_t q_begin, q_stop;
  if constexpr (kVar) {
    const int64_t k_end = k0 + BN < p.Lk ? k0 + BN : p.Lk;
    q_begin = band.on() ? band.query_begin(k0) : 0;
    q_stop = band.on() ? band.query_end(k_end) : p.Lq;
  } else {
    q_begin = p.causal ? (flash::causal_query_begin(k0, p.Lq, p.causal_off) / BM) * BM : 0;
    q_stop = p.Lq;
  }
  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    const int64_t bh = b * p.Hq + h;
    const int64_t qr = q_row(p, b, h, q_start);
    const T* q = static_cast<const T*>(p.q) + qr * p.D;
    const T* dout = static_cast<const T*>(p.dout) + qr * p.Dv;
    for (int64_t q0 = q_begin; q0 < q_stop; q0 += BM) {
      __syncthreads();  // the previous tile's dV/dK GEMMs are done with sQ, sdO, sPZ, sdS
      load_tile(sQ, L::ldD, q, q0, p.Lq, p.D, BM, Dk, p.vec_ok);
      load_tile(sdO, L::ldD, dout, q0, p.Lq, p.Dv, BM, Dvk, p.vec_ok);
      load_row_stats<T>(p, s_lse, s_delta, qr, q0, BM);
      __syncthreads();
      // S = Q K^T (B(d, j) = K[j, d]); dP = dO V^T (B(c, j) = V[j, c])
      block_gemm<T>(sQ, L::ldD, 1, sK, 1, L::ldD, sS, L::ldS, BM, BN, Dk, false);
      block_gemm<T>(sdO, L::ldD, 1, sV, 1, L::ldD, sdP, L::ldS, BM, BN, Dvk, false);
      __syncthreads();
      backward_scores<T, BM, BN, L::ldS, L::ldP, kVar>(p, sS, sdP, s_lse, s_delta, sPZ, sdS, b, h, bh, q0, k0);
      __syncthreads();
      // dV += (Z P)^T dO: A(j, r) = PZ[r, j];  dK += dS^T Q: A(j, r) = dS[r, j]
      block_gemm<T>(sPZ, 1, L::ldP, sdO, L::ldD, 1, sdV, L::ldF, BN, Dvk, BM, true);
      block_gemm<T>(sdS, 1, L::ldP, sQ, L::ldD, 1, sdK, L::ldF, BN, Dk, BM, true);
    }
  }
  __syncthreads();
  store_tile(static_cast<T*>(p.dk) + kr * p.D, k0, p.Lk, p.D, sdK, L::ldF, BN, p.scale);
  store_tile(static_cast<T*>(p.dv) + kr * p.Dv, k0, p.Lk, p.Dv, sdV, L::ldF, BN, 1.0f);
}

template <typename T, int Dp, bool kVar>
__global__ void __launch_bounds__(kThreads) sdpa_bwd_q_kernel(const Params p_in) {
  using Tl = Tiles<Kernel::kBwdQ, T, Dp>;
  constexpr int BM = Tl::BM, BN = Tl::BN;
  using L = Layout<T, Dp, BM, BN>;
  extern __shared__ __align__(16) char smem_raw[];
  SmemCursor cur{smem_raw};
  T* sQ = cur.take<T>(L::tileD(BM));
  T* sdO = cur.take<T>(L::tileD(BM));
  T* sK = cur.take<T>(L::tileD(BN));
  T* sV = cur.take<T>(L::tileD(BN));
  float* sS = cur.take<float>(L::scoreF());
  float* sdP = cur.take<float>(L::scoreF());
  T* sdS = cur.take<T>(L::scoreT());
  float* sdQ = cur.take<float>(L::accD(BM));
  float* s_lse = cur.take<float>(BM * 4);
  float* s_delta = cur.take<float>(BM * 4);

  Params p = p_in;
  const int64_t qb = blockIdx.x % p.n_blocks;
  const int64_t bh = blockIdx.x / p.n_blocks;
  const int64_t b = bh / p.Hq, h = bh % p.Hq;
  const int64_t kvh = flash::kv_head(h, p.Hq, p.Hkv);
  const int64_t q0 = qb * BM;
  const int Dk = round16(p.D), Dvk = round16(p.Dv);
  int64_t q_start, k_start;
  seq_bounds(p, b, q_start, k_start);
  if (q0 >= p.Lq) return;  // past a packed sequence's end
  const int64_t qr = q_row(p, b, h, q_start), kr = k_row(p, b, kvh, k_start);

  const T* q = static_cast<const T*>(p.q) + qr * p.D;
  const T* dout = static_cast<const T*>(p.dout) + qr * p.Dv;
  const T* k = static_cast<const T*>(p.k) + kr * p.D;
  const T* v = static_cast<const T*>(p.v) + kr * p.Dv;
  load_tile(sQ, L::ldD, q, q0, p.Lq, p.D, BM, Dk, p.vec_ok);
  load_tile(sdO, L::ldD, dout, q0, p.Lq, p.Dv, BM, Dvk, p.vec_ok);
  load_row_stats<T>(p, s_lse, s_delta, qr, q0, BM);
  zero_f<T>(sdQ, L::ldF, BM, Dk);

  const int64_t q_end = q0 + BM < p.Lq ? q0 + BM : p.Lq;
  const flash::Band band = kVar ? band_of(p) : flash::Band{};
  int64_t k_begin, k_stop;
  key_range<kVar>(p, band, q0, q_end, k_begin, k_stop);
  for (int64_t k0 = k_begin; k0 < k_stop; k0 += BN) {
    __syncthreads();  // the previous dQ GEMM is done with sK, sdS
    load_tile(sK, L::ldD, k, k0, p.Lk, p.D, BN, Dk, p.vec_ok);
    load_tile(sV, L::ldD, v, k0, p.Lk, p.Dv, BN, Dvk, p.vec_ok);
    __syncthreads();
    block_gemm<T>(sQ, L::ldD, 1, sK, 1, L::ldD, sS, L::ldS, BM, BN, Dk, false);
    block_gemm<T>(sdO, L::ldD, 1, sV, 1, L::ldD, sdP, L::ldS, BM, BN, Dvk, false);
    __syncthreads();
    backward_scores<T, BM, BN, L::ldS, L::ldP, kVar>(p, sS, sdP, s_lse, s_delta, nullptr, sdS, b, h, bh, q0, k0);
    __syncthreads();
    // dQ += dS K: B(j, d) = K[j, d]
    block_gemm<T>(sdS, L::ldP, 1, sK, L::ldD, 1, sdQ, L::ldF, BM, Dk, BN, true);
  }
  __syncthreads();
  store_tile(static_cast<T*>(p.dq) + qr * p.D, q0, p.Lq, p.D, sdQ, L::ldF, BM, p.scale);
}

// ------------------------------------------------------------------------------------------
// Host side: checks, dispatch, launches
// ------------------------------------------------------------------------------------------

static_assert(smem_bytes<Kernel::kFwd, c10::Half, 256>() <= kMaxSmemSm80, "fwd fp16 d256 tiles too big");
static_assert(smem_bytes<Kernel::kFwd, float, 256>() <= kMaxSmemSm80, "fwd fp32 d256 tiles too big");
static_assert(smem_bytes<Kernel::kFwd, float, 64>() <= kMaxSmemSm80, "fwd fp32 d64 tiles too big");
static_assert(smem_bytes<Kernel::kFwd, c10::Half, 128>() <= kMaxSmemSm80, "fwd fp16 d128 tiles too big");
static_assert(smem_bytes<Kernel::kBwdKV, c10::Half, 64>() <= kMaxSmemSm80, "dkdv fp16 d64 tiles too big");
static_assert(smem_bytes<Kernel::kBwdKV, c10::Half, 256>() <= kMaxSmemSm80, "dkdv fp16 d256 tiles too big");
static_assert(smem_bytes<Kernel::kBwdKV, float, 128>() <= kMaxSmemSm80, "dkdv fp32 d128 tiles too big");
static_assert(smem_bytes<Kernel::kBwdKV, float, 256>() <= kMaxSmemSm80, "dkdv fp32 d256 tiles too big");
static_assert(smem_bytes<Kernel::kBwdQ, c10::Half, 128>() <= kMaxSmemSm80, "dq fp16 d128 tiles too big");
static_assert(smem_bytes<Kernel::kBwdQ, c10::Half, 256>() <= kMaxSmemSm80, "dq fp16 d256 tiles too big");
static_assert(smem_bytes<Kernel::kBwdQ, float, 64>() <= kMaxSmemSm80, "dq fp32 d64 tiles too big");
static_assert(smem_bytes<Kernel::kBwdQ, float, 128>() <= kMaxSmemSm80, "dq fp32 d128 tiles too big");
static_assert(smem_bytes<Kernel::kBwdQ, float, 256>() <= kMaxSmemSm80, "dq fp32 d256 tiles too big");

constexpr int kMaxHeadDim = 256;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Memory-safety guards only (users' inputs are validated in pyattn/ops/sdpa.py): shapes that
// keep every read in bounds, and what these kernels are instantiated for.
inline void check_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                  const c10::optional<at::Tensor>& attn_mask, int64_t causal) {
  check_sdpa_inputs(query, key, value, attn_mask, causal);
  PYATTN_CHECK_ARG(query.is_cuda(), "sdpa (cuda)", "query", "expected CUDA tensors, got ", query.device());
  PYATTN_CHECK_ARG(std::max(query.size(3), value.size(3)) <= kMaxHeadDim, "sdpa (cuda)", "query/value",
                   "expected head dims up to ", kMaxHeadDim, ", got D=", query.size(3), ", Dv=", value.size(3));
  PYATTN_CHECK_ARG(!attn_mask.has_value() || attn_mask->scalar_type() == at::kBool || attn_mask->scalar_type() == query.scalar_type(),
                   "sdpa (cuda)", "attn_mask", "expected bool or query's dtype ", query.scalar_type(), ", got ",
                   attn_mask->scalar_type());
}

inline Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const c10::optional<at::Tensor>& attn_mask, double dropout_p, int64_t causal, double scale,
                   int64_t seed, int64_t offset, at::Tensor& mask_holder) {
  Params p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Lq = q.size(2);
  p.D = static_cast<int>(q.size(3));
  p.Hkv = k.size(1);
  p.Lk = k.size(2);
  p.Dv = static_cast<int>(v.size(3));
  p.scale = static_cast<float>(scale);
  p.dropout_p = static_cast<float>(dropout_p);
  p.causal = causal != flash::kNoCausal;
  p.causal_off = flash::causal_offset(static_cast<int>(causal), p.Lq, p.Lk);
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  p.drop_lq = p.Lq;
  p.drop_lk = p.Lk;
  p.cu_q = p.cu_k = nullptr;
  p.mask_kind = flash::kNoMask;
  if (attn_mask.has_value() && attn_mask->defined()) {
    // expand() gives the broadcast dims stride 0: the kernels read the mask through strides.
    mask_holder = attn_mask->expand({p.B, p.Hq, p.Lq, p.Lk});
    p.mask = mask_holder.data_ptr();
    p.mask_kind = mask_holder.scalar_type() == at::kBool ? flash::kBoolMask : flash::kAddMask;
    p.msb = mask_holder.stride(0);
    p.msh = mask_holder.stride(1);
    p.msi = mask_holder.stride(2);
    p.msj = mask_holder.stride(3);
  }
  return p;
}

// The attention variants into p (docs/design.md, "Attention variants"): sinks and ALiBi slopes as
// float32 copies held by the caller; B the slopes' batch (sequences for varlen). Returns whether
// any is on, i.e. which instantiation (kVar) to launch. The values were validated in Python;
// these are the memory-safety guards (variant_tensor: the tensors' sizes and device).
inline bool set_variants(Params& p, const at::Tensor& q, int64_t causal, int64_t window_left, int64_t window_right,
                         double softcap, const c10::optional<at::Tensor>& sinks,
                         const c10::optional<at::Tensor>& alibi_slopes, int64_t B, at::Tensor& sinks_holder,
                         at::Tensor& alibi_holder, const char* op) {
  PYATTN_CHECK_ARG(window_left >= -1 && window_right >= -1, op, "window_left/window_right",
                   "expected ints >= -1, got (", window_left, ", ", window_right, ")");
  PYATTN_CHECK_ARG(softcap >= 0.0 && std::isfinite(softcap), op, "softcap", "expected a finite float >= 0, got ", softcap);
  p.win_left = window_left;
  p.win_right = window_right;
  p.win_upper_left = causal == flash::kUpperLeft;
  p.softcap = static_cast<float>(softcap);
  p.softcap_inv = softcap > 0.0 ? static_cast<float>(1.0 / softcap) : 0.0f;
  sinks_holder = variant_tensor(sinks, q, at::kFloat, B, p.Hq, false, "sinks");
  alibi_holder = variant_tensor(alibi_slopes, q, at::kFloat, B, p.Hq, true, "alibi_slopes");
  p.sinks = sinks_holder.defined() ? sinks_holder.data_ptr<float>() : nullptr;
  p.alibi = alibi_holder.defined() ? alibi_holder.data_ptr<float>() : nullptr;
  p.alibi_bstride = alibi_holder.defined() && alibi_holder.numel() != p.Hq ? p.Hq : 0;
  return window_left != -1 || window_right != -1 || softcap != 0.0 || p.sinks != nullptr || p.alibi != nullptr;
}

inline bool aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// 16-byte tile loads need rows that are whole 16-byte chunks and 16-byte aligned bases.
inline bool vec_ok(const Params& p, int64_t elt, std::initializer_list<const void*> ptrs) {
  if ((p.D * elt) % 16 != 0 || (p.Dv * elt) % 16 != 0) return false;
  for (const void* ptr : ptrs)
    if (ptr != nullptr && !aligned16(ptr)) return false;
  return true;
}

template <typename KernelFn>
void launch(KernelFn kernel, int smem, int64_t blocks, const Params& p, const char* what) {
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "pyattn: ", what, ": too many blocks (", blocks,
              ") for one launch");
  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(static_cast<size_t>(smem) <= props->sharedMemPerBlockOptin, "pyattn: ", what, " needs ", smem,
              " bytes of shared memory per block, this GPU allows ", props->sharedMemPerBlockOptin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<static_cast<unsigned int>(blocks), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}, std::integral_constant<int, Dp>{}) for the tensor dtype and the
// head-dim bucket Dp (64, 128 or 256): 9 instantiations per kernel.
template <typename Fn>
void dispatch(at::ScalarType dt, int64_t head_dim, Fn&& fn) {
  auto by_dim = [&](auto tag) {
    if (head_dim <= 64) {
      fn(tag, std::integral_constant<int, 64>{});
    } else if (head_dim <= 128) {
      fn(tag, std::integral_constant<int, 128>{});
    } else {
      fn(tag, std::integral_constant<int, 256>{});
    }
  };
  switch (dt) {
    case at::kHalf: by_dim(TypeTag<c10::Half>{}); break;
    case at::kBFloat16: by_dim(TypeTag<c10::BFloat16>{}); break;
    case at::kFloat: by_dim(TypeTag<float>{}); break;
    default: PYATTN_CHECK_ARG(false, "sdpa (cuda)", "query", "expected float16, bfloat16 or float32, got ", dt);
  }
}

}  // namespace flash_cuda
}  // namespace pyattn
