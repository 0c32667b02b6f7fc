// pyattn::additive_attention_{fwd,bwd} for CUDA tensors: fused additive (Bahdanau) attention.
//
//   e_ij = v . tanh(q_i + k_j)      a_ij = softmax_j(e_ij)      c_i = sum_j a_ij value_j
//
// Same semantics as the CPU op (csrc/additive_attention.cpp): lse of the accumulation type
// (float32, float64 for float64 inputs), +inf for a row whose keys are all padding (zero context,
// zero weights, zero gradients); weights only with return_weights. fp32/fp16/bf16 (and fp64)
// inputs, every sum in the accumulation type. The online softmax, probabilities and gradient
// formulas are the PYATTN_HD helpers of additive_attention_math.h, so the CPU tests exercise them.
//
// Tiling (every kernel: kThreads = 256 threads, tiles of kBlockQ = 16 query rows x kBlockK = 64
// keys; H and Dv are streamed through shared memory in chunks of kChunk = 32 columns):
// - Forward: one CTA per (batch, block of 16 query rows). It streams the keys in blocks of 64;
//   each thread owns 4 (row, key) scores of the 16 x 64 tile and accumulates v_h tanh(q_h + k_h)
//   over the H chunks; one warp per 2 rows folds the tile into the online softmax; the weighted
//   values of the block go to a (16, Dv) float accumulator in shared memory.
// - Backward: Delta_i = dO_i . c_i (+ sum_j W_ij dW_ij) first; then key-block CTAs (one per
//   (batch, 64 keys, chunk of query rows), looping over the rows of their chunk) accumulate dK,
//   dvalue and a per-CTA partial of dv, and query-block CTAs (one per (batch, 16 rows), looping
//   over all keys) accumulate dQ. Each CTA owns the rows it writes, so there are no atomics; the
//   chunk slices and the dv partials are summed in a fixed order afterwards. Results are bitwise
//   reproducible. tanh is recomputed: once for the scores and once for the gradients in each of
//   the two gradient kernels.
#define PYATTN_HOST_CHECKS 1

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "../additive_attention.h"
#include "../additive_attention_math.h"

namespace pyattn {
namespace cuda_kernels {

using additive::kBlockK;
using additive::RowSoftmax;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBlockQ = 16;
constexpr int kChunk = 32;
// Shared tiles are [rows][kChunk] with one column of padding: a warp reading one column across
// 32 rows (the keys of a score tile) then touches 32 different banks.
constexpr int kLd = kChunk + 1;
// Score tile mapping: thread t owns key t % kBlockK and rows t / kBlockK + kRowStep * r.
constexpr int kRowStep = kThreads / kBlockK;
constexpr int kPairs = kBlockQ * kBlockK / kThreads;
// Column-chunk mapping (the gradient passes): thread t owns column t % kChunk, and
// keys/rows t / kChunk + kColStep * r.
constexpr int kColStep = kThreads / kChunk;
constexpr int kRowsPerWarp = kBlockQ / kWarps;

static_assert(kBlockK == 64, "the softmax step reads a key tile as two 32-lane halves");
static_assert(kChunk == 32, "the dv reduction maps a warp's lanes onto the columns of a chunk");
static_assert(kThreads % kBlockK == 0 && kBlockQ % kRowStep == 0, "score tile mapping");
static_assert(kBlockQ % kWarps == 0, "every warp owns the same number of softmax rows");
static_assert(kBlockK % kColStep == 0 && kBlockQ % kColStep == 0, "column-chunk mapping");

// min(full, remaining) as an int: the extent of a tile that may hang over the end of its axis.
__device__ __forceinline__ int tile_extent(int full, int64_t remaining) {
  return remaining < full ? static_cast<int>(remaining) : full;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t to_acc(scalar_t x) {
  return static_cast<acc_t>(x);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  // the butterfly sums in a lane-dependent order: take lane 0's so every lane agrees bitwise
  return __shfl_sync(0xffffffffu, x, 0);
}

template <typename T>
__device__ __forceinline__ T warp_max(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = additive::nan_max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Stages rows [0, ROWS) x columns [0, kChunk) of a row-major matrix (src points at the first
// element, ld its row length) into dst[ROWS][kLd] as acc_t. Rows >= nrows, columns >= ncols and
// rows with keep[r] == 0 read as 0: padding keys and tails are never loaded, so a NaN stored
// there cannot leak into a sum through 0 * NaN.
template <int ROWS, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage(
    acc_t* dst, const scalar_t* src, int64_t ld, int nrows, int ncols, const int* keep) {
  for (int e = threadIdx.x; e < ROWS * kChunk; e += kThreads) {
    const int r = e / kChunk, c = e % kChunk;
    acc_t x = acc_t(0);
    if (r < nrows && c < ncols && (keep == nullptr || keep[r])) {
      x = to_acc<scalar_t, acc_t>(src[static_cast<int64_t>(r) * ld + c]);
    }
    dst[r * kLd + c] = x;
  }
}

// e[r] += sum_c v_c tanh(a[i_r][c] + b[j][c]) over one staged chunk (a: queries, b: keys).
template <typename acc_t>
__device__ __forceinline__ void score_chunk(
    acc_t (&e)[kPairs], const acc_t* a_s, const acc_t* b_s, const acc_t* v_s, int il, int jl) {
#pragma unroll 4
  for (int c = 0; c < kChunk; ++c) {
    const acc_t vc = v_s[c];
    const acc_t kc = b_s[jl * kLd + c];
#pragma unroll
    for (int r = 0; r < kPairs; ++r) e[r] += vc * additive::tanh_(a_s[(il + kRowStep * r) * kLd + c] + kc);
  }
}

// e[r] += sum_c a[i_r][c] b[j][c] over one staged chunk (dP = dO . value).
template <typename acc_t>
__device__ __forceinline__ void dot_chunk(acc_t (&e)[kPairs], const acc_t* a_s, const acc_t* b_s, int il, int jl) {
#pragma unroll 8
  for (int c = 0; c < kChunk; ++c) {
    const acc_t kc = b_s[jl * kLd + c];
#pragma unroll
    for (int r = 0; r < kPairs; ++r) e[r] += a_s[(il + kRowStep * r) * kLd + c] * kc;
  }
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct FwdParams {
  const scalar_t* q;    // (B, Tq, H)
  const scalar_t* k;    // (B, Tk, H)
  const scalar_t* val;  // (B, Tk, Dv)
  const scalar_t* v;    // (H)
  const bool* mask;     // (B, Tk), true = padding; nullptr for none
  scalar_t* out;        // (B, Tq, Dv)
  acc_t* lse;           // (B, Tq)
  acc_t* scores;        // (B, Tq, Tk) raw scores (may alias weights), or nullptr
  scalar_t* weights;    // (B, Tq, Tk) or nullptr
  int64_t Tq, Tk, H, Dv;
  int64_t q_blocks;     // ceil(Tq / kBlockQ)
};

// Shared memory of the forward, in acc_t elements (plus kBlockK ints for the key mask).
constexpr int64_t fwd_smem_elems(int64_t Dv) {
  return kBlockQ * kLd + kBlockK * kLd + kChunk + kBlockQ * kBlockK + 2 * kBlockQ + kBlockQ * Dv;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) additive_attention_fwd_kernel(const FwdParams<scalar_t, acc_t> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* q_s = reinterpret_cast<acc_t*>(smem_raw);  // [kBlockQ][kLd]
  acc_t* k_s = q_s + kBlockQ * kLd;                  // [kBlockK][kLd]
  acc_t* v_s = k_s + kBlockK * kLd;                  // [kChunk]
  acc_t* s_s = v_s + kChunk;                         // [kBlockQ][kBlockK] scores, then exp(e - m)
  acc_t* row_s = s_s + kBlockQ * kBlockK;            // [kBlockQ] rescale factor, then 1 / l
  acc_t* lse_s = row_s + kBlockQ;                    // [kBlockQ]
  acc_t* acc_s = lse_s + kBlockQ;                    // [kBlockQ][Dv] running context
  int* keep_s = reinterpret_cast<int*>(acc_s + kBlockQ * p.Dv);  // [kBlockK] 1 = attendable key

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // 32-bit division: the grid has fewer than 2^31 blocks (checked on the host), and a 64-bit
  // division is a subroutine call whose calling convention costs spills.
  const int64_t b = blockIdx.x / static_cast<unsigned int>(p.q_blocks);
  const int64_t i0 = (blockIdx.x % static_cast<unsigned int>(p.q_blocks)) * kBlockQ;
  const int nq = tile_extent(kBlockQ, p.Tq - i0);
  const int64_t H = p.H, Dv = p.Dv, Tk = p.Tk;
  const scalar_t* q = p.q + (b * p.Tq + i0) * H;
  const scalar_t* k_b = p.k + b * Tk * H;
  const scalar_t* val_b = p.val + b * Tk * Dv;
  const bool* mask_b = p.mask ? p.mask + b * Tk : nullptr;
  const int jl = tid % kBlockK, il = tid / kBlockK;

  for (int64_t e = tid; e < kBlockQ * Dv; e += kThreads) acc_s[e] = acc_t(0);
  RowSoftmax<acc_t> sm[kRowsPerWarp];
#pragma unroll
  for (int w = 0; w < kRowsPerWarp; ++w) sm[w].init();

  for (int64_t j0 = 0; j0 < Tk; j0 += kBlockK) {
    const int nk = tile_extent(kBlockK, Tk - j0);
    __syncthreads();  // the previous block's value pass is done with keep_s, s_s and row_s
    const bool kept = tid < kBlockK && tid < nk && !(mask_b && mask_b[j0 + tid]);
    if (tid < kBlockK) keep_s[tid] = kept;
    // A block of padding keys only is skipped, not masked: no tanh for it (its scores are -inf
    // where they are returned). The barrier's vote is the same for every thread.
    if (!__syncthreads_or(kept)) {
      if (p.scores) {
        for (int64_t e = tid; e < static_cast<int64_t>(nq) * nk; e += kThreads) {
          p.scores[(b * p.Tq + i0 + e / nk) * Tk + j0 + e % nk] = neg_inf<acc_t>();
        }
      }
      continue;
    }

    // Scores of the 16 x 64 tile, H streamed in chunks.
    acc_t e[kPairs];
#pragma unroll
    for (int r = 0; r < kPairs; ++r) e[r] = acc_t(0);
    for (int64_t h0 = 0; h0 < H; h0 += kChunk) {
      const int nh = tile_extent(kChunk, H - h0);
      stage<kBlockQ>(q_s, q + h0, H, nq, nh, static_cast<const int*>(nullptr));
      stage<kBlockK>(k_s, k_b + j0 * H + h0, H, nk, nh, keep_s);
      if (tid < kChunk) v_s[tid] = tid < nh ? to_acc<scalar_t, acc_t>(p.v[h0 + tid]) : acc_t(0);
      __syncthreads();
      score_chunk(e, q_s, k_s, v_s, il, jl);
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < kPairs; ++r) {
      const int i = il + kRowStep * r;
      const acc_t s = keep_s[jl] ? e[r] : neg_inf<acc_t>();
      s_s[i * kBlockK + jl] = s;
      if (p.scores && i < nq && jl < nk) p.scores[(b * p.Tq + i0 + i) * Tk + j0 + jl] = s;
    }
    __syncthreads();

    // Online softmax: warp w folds rows w * kRowsPerWarp + x into its row states.
#pragma unroll
    for (int x = 0; x < kRowsPerWarp; ++x) {
      const int i = warp * kRowsPerWarp + x;
      const acc_t s0 = s_s[i * kBlockK + lane], s1 = s_s[i * kBlockK + lane + 32];
      const acc_t alpha = sm[x].rescale(warp_max(additive::nan_max(s0, s1)));
      const acc_t p0 = sm[x].weight(s0), p1 = sm[x].weight(s1);
      s_s[i * kBlockK + lane] = p0;
      s_s[i * kBlockK + lane + 32] = p1;
      sm[x].l += warp_sum(p0 + p1);
      if (lane == 0) row_s[i] = alpha;
    }
    __syncthreads();

    // Context: each thread owns columns d of all 16 rows; the block's weighted values are summed
    // on their own, then folded in (blocked summation, as the CPU kernel does).
    for (int64_t d = tid; d < Dv; d += kThreads) {
      acc_t part[kBlockQ];
#pragma unroll
      for (int r = 0; r < kBlockQ; ++r) part[r] = acc_t(0);
      const scalar_t* col = val_b + j0 * Dv + d;
      for (int jj = 0; jj < nk; ++jj) {
        if (!keep_s[jj]) continue;  // padding: its value row is never read
        const acc_t x = to_acc<scalar_t, acc_t>(col[jj * Dv]);
#pragma unroll
        for (int r = 0; r < kBlockQ; ++r) part[r] += s_s[r * kBlockK + jj] * x;
      }
#pragma unroll
      for (int r = 0; r < kBlockQ; ++r) acc_s[r * Dv + d] = acc_s[r * Dv + d] * row_s[r] + part[r];
    }
  }

  __syncthreads();  // the last value pass is done with row_s
#pragma unroll
  for (int x = 0; x < kRowsPerWarp; ++x) {
    const int i = warp * kRowsPerWarp + x;
    if (lane == 0) {
      row_s[i] = sm[x].inv_sum();
      lse_s[i] = sm[x].lse();
      if (i < nq) p.lse[b * p.Tq + i0 + i] = lse_s[i];
    }
  }
  __syncthreads();
  scalar_t* out = p.out + (b * p.Tq + i0) * Dv;
  for (int r = 0; r < nq; ++r) {
    for (int64_t d = tid; d < Dv; d += kThreads) out[r * Dv + d] = static_cast<scalar_t>(acc_s[r * Dv + d] * row_s[r]);
  }
  if (p.weights) {
    // The raw scores of these rows were written by this CTA (visible after __syncthreads);
    // normalised now that lse is known. An element is read and written by the same thread, so
    // scores may alias weights.
    for (int r = 0; r < nq; ++r) {
      const int64_t base = (b * p.Tq + i0 + r) * Tk;
      for (int64_t j = tid; j < Tk; j += kThreads) {
        p.weights[base + j] = static_cast<scalar_t>(additive::prob(p.scores[base + j], lse_s[r]));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct BwdParams {
  const scalar_t* q;     // (B, Tq, H)
  const scalar_t* k;     // (B, Tk, H)
  const scalar_t* val;   // (B, Tk, Dv)
  const scalar_t* v;     // (H)
  const bool* mask;      // (B, Tk) or nullptr
  const scalar_t* dout;  // (B, Tq, Dv)
  const scalar_t* dw;    // (B, Tq, Tk) grad of the weights, or nullptr
  const acc_t* lse;      // (B, Tq)
  const acc_t* delta;    // (B, Tq)
  acc_t* dq;             // (B, Tq, H), zero-initialised
  acc_t* dk;             // (chunks, B, Tk, H), zero-initialised: one slice per query chunk
  acc_t* dval;           // (chunks, B, Tk, Dv), zero-initialised
  acc_t* dv_partial;     // (B * k_blocks * chunks, H), zero-initialised: one row per key-block CTA
  int64_t B, Tq, Tk, H, Dv;
  int64_t q_blocks, k_blocks;
  int64_t chunks;            // query-row chunks per key block (parallelism for short Tk)
  int64_t blocks_per_chunk;  // query blocks of kBlockQ rows per chunk
};

// Delta_i = dO_i . c_i + sum_j W_ij dW_ij: one warp per query row.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) additive_attention_bwd_delta_kernel(
    const scalar_t* dout, const scalar_t* out, const scalar_t* w, const scalar_t* dw, acc_t* delta,
    int64_t rows, int64_t Dv, int64_t Tk) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps leave together: the shuffles below stay full-warp
  acc_t s = acc_t(0);
  for (int64_t d = lane; d < Dv; d += 32) {
    s += to_acc<scalar_t, acc_t>(dout[row * Dv + d]) * to_acc<scalar_t, acc_t>(out[row * Dv + d]);
  }
  if (dw) {
    for (int64_t j = lane; j < Tk; j += 32) {
      s += to_acc<scalar_t, acc_t>(w[row * Tk + j]) * to_acc<scalar_t, acc_t>(dw[row * Tk + j]);
    }
  }
  s = warp_sum(s);
  if (lane == 0) delta[row] = s;
}

// Shared state of the two gradient kernels, about 20 KB for float (static shared memory).
template <typename acc_t>
struct BwdSmem {
  acc_t a[kBlockQ * kLd];   // query rows (q or dO chunk)
  acc_t bk[kBlockK * kLd];  // keys (k or value chunk)
  acc_t v[kChunk];
  acc_t p[kBlockQ * kBlockK];   // a_ij of the tile
  acc_t ds[kBlockQ * kBlockK];  // dS_ij of the tile
  acc_t lse[kBlockQ];
  acc_t delta[kBlockQ];
  acc_t red[kWarps * kChunk];  // dv reduction across warps
  int keep[kBlockK];
};

// For the tile at (query rows i0.., keys j0..) of batch b: recomputes the scores, a_ij (into
// s.p and pr) and dS_ij (into s.ds). The keep/lse/delta entries of s must be staged and visible.
// Every thread ends having passed a __syncthreads after its last read of s.a / s.bk.
template <bool kStoreP, typename scalar_t, typename acc_t>
__device__ __forceinline__ void bwd_tile(
    const BwdParams<scalar_t, acc_t>& p, BwdSmem<acc_t>& s, int64_t b, int64_t i0, int nq, int64_t j0,
    int nk, acc_t (&pr)[kPairs], acc_t* dval) {
  const int tid = threadIdx.x;
  const int jl = tid % kBlockK, il = tid / kBlockK;
  const int64_t H = p.H, Dv = p.Dv, Tq = p.Tq, Tk = p.Tk;

  acc_t e[kPairs];
#pragma unroll
  for (int r = 0; r < kPairs; ++r) e[r] = acc_t(0);
  for (int64_t h0 = 0; h0 < H; h0 += kChunk) {
    const int nh = tile_extent(kChunk, H - h0);
    stage<kBlockQ>(s.a, p.q + (b * Tq + i0) * H + h0, H, nq, nh, static_cast<const int*>(nullptr));
    stage<kBlockK>(s.bk, p.k + (b * Tk + j0) * H + h0, H, nk, nh, s.keep);
    if (tid < kChunk) s.v[tid] = tid < nh ? to_acc<scalar_t, acc_t>(p.v[h0 + tid]) : acc_t(0);
    __syncthreads();
    score_chunk(e, s.a, s.bk, s.v, il, jl);
    __syncthreads();
  }

  // a_ij, exactly 0 for padding keys, tail rows and rows without an attendable key (lse = +inf)
#pragma unroll
  for (int r = 0; r < kPairs; ++r) {
    const int i = il + kRowStep * r;
    const bool live = i < nq && s.keep[jl] && s.lse[i] != pos_inf<acc_t>();
    pr[r] = live ? additive::prob(e[r], s.lse[i]) : acc_t(0);
    if (kStoreP) s.p[i * kBlockK + jl] = pr[r];
  }

  // dP_ij = dO_i . value_j over Dv chunks; the key-block kernel also adds a_ij dO_i to dvalue_j
  // from the same staged dO chunk.
  acc_t dp[kPairs];
#pragma unroll
  for (int r = 0; r < kPairs; ++r) dp[r] = acc_t(0);
  for (int64_t d0 = 0; d0 < Dv; d0 += kChunk) {
    const int nd = tile_extent(kChunk, Dv - d0);
    stage<kBlockQ>(s.a, p.dout + (b * Tq + i0) * Dv + d0, Dv, nq, nd, static_cast<const int*>(nullptr));
    stage<kBlockK>(s.bk, p.val + (b * Tk + j0) * Dv + d0, Dv, nk, nd, s.keep);
    __syncthreads();  // also publishes s.p
    dot_chunk(dp, s.a, s.bk, il, jl);
    if (dval) {
      const int c = tid % kChunk;
#pragma unroll
      for (int r = 0; r < kBlockK / kColStep; ++r) {
        const int j = tid / kChunk + kColStep * r;
        acc_t g = acc_t(0);
#pragma unroll
        for (int i = 0; i < kBlockQ; ++i) g += s.p[i * kBlockK + j] * s.a[i * kLd + c];
        if (j < nk && c < nd && s.keep[j]) dval[(b * Tk + j0 + j) * Dv + d0 + c] += g;
      }
    }
    __syncthreads();
  }

  // dS_ij = a_ij (dP_ij [+ dW_ij] - Delta_i)
#pragma unroll
  for (int r = 0; r < kPairs; ++r) {
    const int i = il + kRowStep * r;
    acc_t ds = acc_t(0);
    if (pr[r] != acc_t(0)) {
      acc_t dpv = dp[r];
      if (p.dw) dpv += to_acc<scalar_t, acc_t>(p.dw[(b * Tq + i0 + i) * Tk + j0 + jl]);
      ds = additive::dscore(pr[r], dpv, s.delta[i]);
    }
    s.ds[i * kBlockK + jl] = ds;
  }
  // s.ds is published by the __syncthreads after the caller's next staging.
}

// Stages keep/lse/delta for a tile (between two barriers, so no reader of the old values remains).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void bwd_stage_rows(
    const BwdParams<scalar_t, acc_t>& p, BwdSmem<acc_t>& s, int64_t b, int64_t i0, int nq) {
  const int tid = threadIdx.x;
  if (tid < kBlockQ) {
    s.lse[tid] = tid < nq ? p.lse[b * p.Tq + i0 + tid] : pos_inf<acc_t>();
    s.delta[tid] = tid < nq ? p.delta[b * p.Tq + i0 + tid] : acc_t(0);
  }
}

// Stages the keep flags of a key block and returns whether any key in it is not padding (the
// same answer in every thread). It is a barrier: s.keep is visible when it returns.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ bool bwd_stage_keys(
    const BwdParams<scalar_t, acc_t>& p, BwdSmem<acc_t>& s, int64_t b, int64_t j0, int nk) {
  const int tid = threadIdx.x;
  const bool kept = tid < kBlockK && tid < nk && !(p.mask && p.mask[b * p.Tk + j0 + tid]);
  if (tid < kBlockK) s.keep[tid] = kept;
  return __syncthreads_or(kept);
}

// Key-block CTAs: dK, dvalue and this CTA's dv partial, for 64 keys of one batch element, over
// the query rows of one chunk. CTA index = (b * k_blocks + key block) * chunks + chunk; chunk c
// writes its own slice of p.dk / p.dval, summed over chunks afterwards in a fixed order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) additive_attention_bwd_dkdv_kernel(const BwdParams<scalar_t, acc_t> p) {
  __shared__ BwdSmem<acc_t> s;
  const int tid = threadIdx.x, warp = tid / 32, c = tid % kChunk;
  const unsigned int chunk = blockIdx.x % static_cast<unsigned int>(p.chunks);
  const unsigned int bk = blockIdx.x / static_cast<unsigned int>(p.chunks);
  const int64_t b = bk / static_cast<unsigned int>(p.k_blocks);
  const int64_t j0 = (bk % static_cast<unsigned int>(p.k_blocks)) * static_cast<int64_t>(kBlockK);
  const int nk = tile_extent(kBlockK, p.Tk - j0);
  const int64_t H = p.H, Tk = p.Tk;
  acc_t* dv_part = p.dv_partial + static_cast<int64_t>(blockIdx.x) * H;
  acc_t* dk = p.dk + chunk * (p.B * Tk * H);
  acc_t* dval = p.dval + chunk * (p.B * Tk * p.Dv);
  const int64_t i_begin = chunk * p.blocks_per_chunk * kBlockQ;
  const int64_t i_end = min(p.Tq, i_begin + p.blocks_per_chunk * kBlockQ);

  // dS is 0 for padding keys: a block of them has zero gradients (the buffers start at zero)
  if (!bwd_stage_keys(p, s, b, j0, nk)) return;
  for (int64_t i0 = i_begin; i0 < i_end; i0 += kBlockQ) {
    const int nq = tile_extent(kBlockQ, p.Tq - i0);
    __syncthreads();  // the previous tile's readers of lse/delta are done
    bwd_stage_rows(p, s, b, i0, nq);
    __syncthreads();
    acc_t pr[kPairs];
    bwd_tile<true>(p, s, b, i0, nq, j0, nk, pr, dval);

    // dk_j += v * sum_i dS_ij (1 - t^2),  dv += sum_ij dS_ij t  (tanh recomputed per chunk)
    for (int64_t h0 = 0; h0 < H; h0 += kChunk) {
      const int nh = tile_extent(kChunk, H - h0);
      stage<kBlockQ>(s.a, p.q + (b * p.Tq + i0) * H + h0, H, nq, nh, static_cast<const int*>(nullptr));
      stage<kBlockK>(s.bk, p.k + (b * Tk + j0) * H + h0, H, nk, nh, s.keep);
      if (tid < kChunk) s.v[tid] = tid < nh ? to_acc<scalar_t, acc_t>(p.v[h0 + tid]) : acc_t(0);
      __syncthreads();
      acc_t dv_acc = acc_t(0);
#pragma unroll
      for (int r = 0; r < kBlockK / kColStep; ++r) {
        const int j = tid / kChunk + kColStep * r;
        const acc_t kc = s.bk[j * kLd + c];
        acc_t g = acc_t(0);
#pragma unroll 4
        for (int i = 0; i < kBlockQ; ++i) {
          const acc_t ds = s.ds[i * kBlockK + j];  // the same for the whole warp: no divergence
          if (ds == acc_t(0)) continue;
          const acc_t t = additive::tanh_(s.a[i * kLd + c] + kc);
          g += ds * additive::dtanh(t);
          dv_acc += ds * t;
        }
        if (j < nk && c < nh && s.keep[j]) dk[(b * Tk + j0 + j) * H + h0 + c] += s.v[c] * g;
      }
      s.red[warp * kChunk + c] = dv_acc;
      __syncthreads();
      if (tid < nh) {
        acc_t sum = acc_t(0);
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum += s.red[w * kChunk + tid];
        dv_part[h0 + tid] += sum;
      }
      // the next chunk's staging touches only s.a/s.bk/s.v; s.red is rewritten after its barrier
    }
  }
}

// Query-block CTAs: dQ for 16 query rows of one batch element, over all keys.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) additive_attention_bwd_dq_kernel(const BwdParams<scalar_t, acc_t> p) {
  __shared__ BwdSmem<acc_t> s;
  const int tid = threadIdx.x, c = tid % kChunk;
  const int64_t b = blockIdx.x / static_cast<unsigned int>(p.q_blocks);
  const int64_t i0 = (blockIdx.x % static_cast<unsigned int>(p.q_blocks)) * kBlockQ;
  const int nq = tile_extent(kBlockQ, p.Tq - i0);
  const int64_t H = p.H, Tk = p.Tk;

  bwd_stage_rows(p, s, b, i0, nq);
  for (int64_t j0 = 0; j0 < Tk; j0 += kBlockK) {
    const int nk = tile_extent(kBlockK, Tk - j0);
    __syncthreads();  // the previous tile's readers of keep/ds are done
    if (!bwd_stage_keys(p, s, b, j0, nk)) continue;  // padding only: dS = 0, nothing to add
    acc_t pr[kPairs];
    bwd_tile<false>(p, s, b, i0, nq, j0, nk, pr, static_cast<acc_t*>(nullptr));

    // dq_i += v * sum_j dS_ij (1 - t^2)  (tanh recomputed per chunk)
    for (int64_t h0 = 0; h0 < H; h0 += kChunk) {
      const int nh = tile_extent(kChunk, H - h0);
      stage<kBlockQ>(s.a, p.q + (b * p.Tq + i0) * H + h0, H, nq, nh, static_cast<const int*>(nullptr));
      stage<kBlockK>(s.bk, p.k + (b * Tk + j0) * H + h0, H, nk, nh, s.keep);
      if (tid < kChunk) s.v[tid] = tid < nh ? to_acc<scalar_t, acc_t>(p.v[h0 + tid]) : acc_t(0);
      __syncthreads();
#pragma unroll
      for (int r = 0; r < kBlockQ / kColStep; ++r) {
        const int i = tid / kChunk + kColStep * r;
        const acc_t qc = s.a[i * kLd + c];
        acc_t g = acc_t(0);
#pragma unroll 4
        for (int j = 0; j < kBlockK; ++j) {
          const acc_t ds = s.ds[i * kBlockK + j];  // the same for the whole warp: no divergence
          if (ds == acc_t(0)) continue;
          g += ds * additive::dtanh(additive::tanh_(qc + s.bk[j * kLd + c]));
        }
        if (i < nq && c < nh) p.dq[(b * p.Tq + i0 + i) * H + h0 + c] += s.v[c] * g;
      }
      __syncthreads();
    }
  }
}

// dv = sum over key-block CTAs of their partials, in CTA order (deterministic).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) additive_attention_bwd_dv_kernel(
    const acc_t* dv_partial, scalar_t* dv, int64_t parts, int64_t H) {
  const int64_t h = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (h >= H) return;
  acc_t s = acc_t(0);
  for (int64_t n = 0; n < parts; ++n) s += dv_partial[n * H + h];
  dv[h] = static_cast<scalar_t>(s);
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

unsigned int grid_size(int64_t n, const char* what) {
  PYATTN_CHECK_ARG(n > 0 && n <= std::numeric_limits<int>::max(), "additive_attention (cuda)", "query",
                   "the cuda backend's ", what, " grid would have ", n, " blocks (at most 2^31 - 1)");
  return static_cast<unsigned int>(n);
}

void check_cuda_tensor(const at::Tensor& t, const at::Tensor& query, const char* name) {
  PYATTN_CHECK_ARG(t.device() == query.device(), "additive_attention (cuda)", name, "expected device ", query.device(), ", got ", t.device());
}

}  // namespace cuda_kernels

using namespace cuda_kernels;

std::tuple<at::Tensor, at::Tensor, at::Tensor> additive_attention_fwd_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& v,
    const c10::optional<at::Tensor>& key_padding_mask, bool return_weights) {
  check_additive_attention_inputs(query, key, value, v, key_padding_mask);
  PYATTN_CHECK_ARG(query.is_cuda(), "additive_attention (cuda)", "query", "the cuda backend takes CUDA tensors, got ", query.device());
  const c10::cuda::CUDAGuard guard(query.device());
  const auto q = query.contiguous(), k = key.contiguous(), val = value.contiguous(), vv = v.contiguous();
  c10::optional<at::Tensor> mask;
  if (key_padding_mask.has_value()) mask = key_padding_mask->contiguous();

  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), Tk = k.size(1), Dv = val.size(2);
  const auto acc_type = at::toAccumulateType(q.scalar_type(), /*is_cuda=*/true);
  at::Tensor out = at::empty({B, Tq, Dv}, q.options());
  at::Tensor lse = at::empty({B, Tq}, q.options().dtype(acc_type));
  at::Tensor weights = return_weights ? at::empty({B, Tq, Tk}, q.options()) : at::empty({0}, q.options());
  if (B * Tq == 0) return {out, lse, weights};
  // Raw scores wait in the weights tensor when it has the accumulation type, else in a scratch.
  at::Tensor scores;
  if (return_weights && Tk > 0) {
    scores = q.scalar_type() == acc_type ? weights : at::empty({B, Tq, Tk}, q.options().dtype(acc_type));
  }

  const int64_t q_blocks = ceil_div(Tq, kBlockQ);
  const unsigned int grid = grid_size(B * q_blocks, "forward");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "additive_attention_fwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    FwdParams<scalar_t, acc_t> p;
    p.q = q.data_ptr<scalar_t>();
    p.k = k.data_ptr<scalar_t>();
    p.val = val.data_ptr<scalar_t>();
    p.v = vv.data_ptr<scalar_t>();
    p.mask = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
    p.out = out.data_ptr<scalar_t>();
    p.lse = lse.data_ptr<acc_t>();
    p.scores = scores.defined() ? scores.data_ptr<acc_t>() : nullptr;
    p.weights = scores.defined() ? weights.data_ptr<scalar_t>() : nullptr;
    p.Tq = Tq;
    p.Tk = Tk;
    p.H = H;
    p.Dv = Dv;
    p.q_blocks = q_blocks;

    // The (16, Dv) context accumulator lives in shared memory: large Dv needs the opt-in limit.
    const int64_t smem = fwd_smem_elems(Dv) * static_cast<int64_t>(sizeof(acc_t)) + kBlockK * sizeof(int);
    const int64_t smem_max = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    PYATTN_CHECK_ARG(smem <= smem_max, "additive_attention (cuda)", "value", "the cuda backend's forward keeps 16 rows of Dv=", Dv,
                     " in shared memory: needs ", smem, " bytes, the device has ", smem_max,
                     " (use backend='triton' or a smaller Dv)");
    auto kernel = additive_attention_fwd_kernel<scalar_t, acc_t>;
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    kernel<<<grid, kThreads, static_cast<size_t>(smem), stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse, weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> additive_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& v, const c10::optional<at::Tensor>& key_padding_mask,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_weights,
    const c10::optional<at::Tensor>& weights) {
  check_additive_attention_inputs(query, key, value, v, key_padding_mask);
  check_additive_attention_backward_inputs(query, value, grad_out, out, lse, grad_weights, weights);
  PYATTN_CHECK_ARG(query.is_cuda(), "additive_attention (cuda)", "query", "the cuda backend takes CUDA tensors, got ", query.device());
  check_cuda_tensor(grad_out, query, "grad_out");
  check_cuda_tensor(out, query, "out");
  check_cuda_tensor(lse, query, "lse");
  const bool has_gw = grad_weights.has_value() && grad_weights->defined();
  if (has_gw) {
    check_cuda_tensor(*grad_weights, query, "grad_weights");
    check_cuda_tensor(*weights, query, "weights");
  }
  const c10::cuda::CUDAGuard guard(query.device());

  const auto dtype = query.scalar_type();
  const auto acc_type = at::toAccumulateType(dtype, /*is_cuda=*/true);
  const auto q = query.contiguous(), k = key.contiguous(), val = value.contiguous(), vv = v.contiguous();
  const auto o = out.to(dtype).contiguous(), dO = grad_out.to(dtype).contiguous();
  const auto l = lse.to(acc_type).contiguous();
  c10::optional<at::Tensor> mask;
  if (key_padding_mask.has_value()) mask = key_padding_mask->contiguous();
  at::Tensor gw, w;
  if (has_gw) {
    gw = grad_weights->to(dtype).contiguous();
    w = weights->to(dtype).contiguous();
  }

  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), Tk = k.size(1), Dv = val.size(2);
  if (B * Tq == 0 || Tk == 0) {
    return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(val), at::zeros_like(vv)};
  }
  const auto acc_opts = q.options().dtype(acc_type);
  const int64_t q_blocks = ceil_div(Tq, kBlockQ), k_blocks = ceil_div(Tk, kBlockK);
  at::Tensor delta = at::empty({B, Tq}, acc_opts);
  at::Tensor dq = at::zeros({B, Tq, H}, acc_opts);
  // Short key axes give few key-block CTAs: split the query rows of each key block into chunks
  // until there are about 4 CTAs per SM. Each chunk sums into its own slice (at most 16 slices),
  // reduced afterwards; the split depends only on the shapes and the device, so results are
  // reproducible run to run.
  const int64_t target_ctas = 4 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  int64_t chunks = std::min<int64_t>({ceil_div(target_ctas, B * k_blocks), q_blocks, 16});
  chunks = std::max<int64_t>(chunks, 1);
  const int64_t blocks_per_chunk = ceil_div(q_blocks, chunks);
  chunks = ceil_div(q_blocks, blocks_per_chunk);  // no empty chunk
  at::Tensor dk = at::zeros({chunks, B, Tk, H}, acc_opts);
  at::Tensor dval = at::zeros({chunks, B, Tk, Dv}, acc_opts);
  at::Tensor dv_partial = at::zeros({B * k_blocks * chunks, H}, acc_opts);
  at::Tensor dv = at::empty({H}, q.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "additive_attention_bwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    additive_attention_bwd_delta_kernel<scalar_t, acc_t>
        <<<grid_size(ceil_div(B * Tq, kWarps), "backward Delta"), kThreads, 0, stream>>>(
            dO.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), has_gw ? w.data_ptr<scalar_t>() : nullptr,
            has_gw ? gw.data_ptr<scalar_t>() : nullptr, delta.data_ptr<acc_t>(), B * Tq, Dv, Tk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    BwdParams<scalar_t, acc_t> p;
    p.q = q.data_ptr<scalar_t>();
    p.k = k.data_ptr<scalar_t>();
    p.val = val.data_ptr<scalar_t>();
    p.v = vv.data_ptr<scalar_t>();
    p.mask = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
    p.dout = dO.data_ptr<scalar_t>();
    p.dw = has_gw ? gw.data_ptr<scalar_t>() : nullptr;
    p.lse = l.data_ptr<acc_t>();
    p.delta = delta.data_ptr<acc_t>();
    p.dq = dq.data_ptr<acc_t>();
    p.dk = dk.data_ptr<acc_t>();
    p.dval = dval.data_ptr<acc_t>();
    p.dv_partial = dv_partial.data_ptr<acc_t>();
    p.Tq = Tq;
    p.Tk = Tk;
    p.H = H;
    p.Dv = Dv;
    p.q_blocks = q_blocks;
    p.k_blocks = k_blocks;
    p.B = B;
    p.chunks = chunks;
    p.blocks_per_chunk = blocks_per_chunk;

    additive_attention_bwd_dkdv_kernel<scalar_t, acc_t>
        <<<grid_size(B * k_blocks * chunks, "backward dK/dvalue"), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    additive_attention_bwd_dq_kernel<scalar_t, acc_t>
        <<<grid_size(B * q_blocks, "backward dQ"), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (H > 0) {
      additive_attention_bwd_dv_kernel<scalar_t, acc_t>
          <<<grid_size(ceil_div(H, kThreads), "backward dv"), kThreads, 0, stream>>>(
              dv_partial.data_ptr<acc_t>(), dv.data_ptr<scalar_t>(), B * k_blocks * chunks, H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  // The accumulators have the accumulation type; .to is a no-op for float32/float64.
  if (chunks > 1) {
    // sum over the chunk slices (ATen's reduction: a fixed order, no atomics)
    dk = dk.sum(0);
    dval = dval.sum(0);
  } else {
    dk = dk.select(0, 0);
    dval = dval.select(0, 0);
  }
  return {dq.to(dtype), dk.to(dtype), dval.to(dtype), dv};
}

}  // namespace pyattn

TORCH_LIBRARY_IMPL(pyattn, CUDA, m) {
  m.impl("additive_attention_fwd", &pyattn::additive_attention_fwd_cuda);
  m.impl("additive_attention_bwd", &pyattn::additive_attention_bwd_cuda);
}
