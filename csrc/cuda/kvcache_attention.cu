// pyattn::kvcache_attention_fwd for CUDA tensors: split-K decoding over a dense or paged cache.
// The key bounds, score variants, split ranges and the log-sum-exp merge are the ones in
// csrc/kvcache_attention_math.h that the CPU kernels run; docs/design.md, "KV-cache attention".
//
//   append   grid = B*Hkv*Lq: new key/value row t of (b, h) -> cache position cache_seqlens[b] + t
//   split    grid = (splits, B*Hkv, row groups): one CTA per (split, sequence, kv head) streams its
//            chunk of the cache; its rows are up to kRows of the Hq/Hkv query heads x Lq new
//            positions of that kv head (GQA packing: one group covers a decode step with up to 8
//            query heads per kv head, so each K/V row is read once). Each warp takes every
//            kWarps-th key: a lane holds D/32 elements of the key, the dot products of all rows
//            are warp-reduced, and the warp keeps its own online softmax (m, l, acc in
//            registers); the warps' states are merged in shared memory at the end.
//   combine  grid = B*Hq*Lq: merges a row's splits (and its sink) exactly, rounds once.
// Bound by reading the cache: no tensor cores, every K/V element read once by one warp.
#define PYATTN_HOST_CHECKS 1

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "../kvcache_attention.h"
#include "../kvcache_attention_math.h"

namespace pyattn {
namespace kvcache_cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 8;           // query rows per CTA
constexpr int kMaxPerLane = 8;     // head dims up to 256 = 32 lanes x 8 (the widest instance)
constexpr int64_t kMinSplitKeys = 256;

template <typename T>
struct Params {
  const T* q;  // (B, Hq, Lq, D) contiguous
  T* k_cache;
  T* v_cache;
  int64_t ks[3], vs[3];  // page, head, row strides
  const T* k_new;        // (B, Hkv, Lq, D) contiguous or null
  const T* v_new;
  const int32_t* seqlens;
  const int32_t* table;  // (B, bt_stride) or null
  int64_t bt_stride, page_size;
  const float* sinks;  // (Hq,) or null
  const float* alibi;  // (B or 1, Hq) or null
  int64_t alibi_b_stride;
  int B, Hq, Hkv, Lq, D, Dv, R, splits;
  float scale, softcap;
  bool causal;
  int64_t window_left, window_right;
  float* part_acc;  // (B*Hkv*splits*R, Dv)
  float* part_m;    // (B*Hkv*splits*R)
  float* part_l;
  T* out;      // (B, Hq, Lq, Dv)
  float* lse;  // (B, Hq, Lq)
};

template <typename T>
__device__ __forceinline__ int64_t page_of(const Params<T>& p, int b, int64_t j) {
  return p.table ? static_cast<int64_t>(p.table[b * p.bt_stride + j / p.page_size]) : b;
}

template <typename T>
__global__ void append_kernel(Params<T> p) {
  const int idx = blockIdx.x;  // (b, h, t)
  const int t = idx % p.Lq, bh = idx / p.Lq, h = bh % p.Hkv, b = bh / p.Hkv;
  const int64_t j = static_cast<int64_t>(p.seqlens[b]) + t;
  const int64_t page = page_of(p, b, j), row = j % p.page_size;
  T* kd = p.k_cache + page * p.ks[0] + h * p.ks[1] + row * p.ks[2];
  T* vd = p.v_cache + page * p.vs[0] + h * p.vs[1] + row * p.vs[2];
  const int64_t src = static_cast<int64_t>(idx);
  for (int d = threadIdx.x; d < p.D; d += blockDim.x) kd[d] = p.k_new[src * p.D + d];
  for (int d = threadIdx.x; d < p.Dv; d += blockDim.x) vd[d] = p.v_new[src * p.Dv + d];
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// PER_LANE = ceil(max(D, Dv) / 32) rounded to 2, 4 or 8: registers for the head dims in use only.
template <typename T, int PER_LANE>
__global__ void __launch_bounds__(kThreads) split_kernel(Params<T> p) {
  __shared__ float s_m[kWarps][kRows];
  __shared__ float s_l[kWarps][kRows];
  __shared__ float s_acc[kWarps][kRows][32 * PER_LANE];
  const int split = blockIdx.x, bh = blockIdx.y, r0 = blockIdx.z * kRows;
  const int b = bh / p.Hkv, h = bh % p.Hkv, G = p.Hq / p.Hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nrows = min(kRows, p.R - r0);
  const int64_t Lk = static_cast<int64_t>(p.seqlens[b]) + (p.k_new ? p.Lq : 0);
  const int64_t d0 = Lk - p.Lq;
  const int64_t begin = kvcache::key_begin(d0, p.window_left);
  const int64_t end = kvcache::key_end(d0 + p.Lq - 1, Lk, p.causal, p.window_right);
  int64_t lo, hi;
  kvcache::split_range(begin, end, split, p.splits, 32, &lo, &hi);

  // this lane's slice of every row: q (scaled) and the accumulators, in registers
  float q[kRows][PER_LANE], acc[kRows][PER_LANE], m[kRows], l[kRows], slope[kRows];
  int64_t rb[kRows], re[kRows], dr[kRows];
  const T* qb = p.q + (static_cast<int64_t>(b) * p.Hq + static_cast<int64_t>(h) * G) * p.Lq * p.D;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int rr = r0 + r;
    const bool live = r < nrows;
    const int i = live ? rr % p.Lq : 0;
    dr[r] = d0 + i;
    rb[r] = kvcache::key_begin(dr[r], p.window_left);
    re[r] = live ? kvcache::key_end(dr[r], Lk, p.causal, p.window_right) : 0;
    slope[r] = (p.alibi && live) ? p.alibi[b * p.alibi_b_stride + h * G + rr / p.Lq] : 0.f;
    m[r] = neg_inf<float>();
    l[r] = 0.f;
#pragma unroll
    for (int c = 0; c < PER_LANE; ++c) {
      const int d = lane + 32 * c;
      q[r][c] = (live && d < p.D) ? static_cast<float>(qb[static_cast<int64_t>(rr) * p.D + d]) * p.scale : 0.f;
      acc[r][c] = 0.f;
    }
  }
  for (int64_t j = lo + warp; j < hi; j += kWarps) {
    const int64_t page = page_of(p, b, j), row = j % p.page_size;
    const T* kr = p.k_cache + page * p.ks[0] + h * p.ks[1] + row * p.ks[2];
    const T* vr = p.v_cache + page * p.vs[0] + h * p.vs[1] + row * p.vs[2];
    float kv[PER_LANE], vv[PER_LANE];
#pragma unroll
    for (int c = 0; c < PER_LANE; ++c) {
      const int d = lane + 32 * c;
      kv[c] = d < p.D ? static_cast<float>(kr[d]) : 0.f;
      vv[c] = d < p.Dv ? static_cast<float>(vr[d]) : 0.f;
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float dot = 0.f;
#pragma unroll
      for (int c = 0; c < PER_LANE; ++c) dot += q[r][c] * kv[c];
      dot = warp_sum(dot);
      if (j < rb[r] || j >= re[r]) continue;
      const float s = kvcache::transform_score<float>(dot, 1.f, p.softcap, slope[r], dr[r], j);
      const float m_new = softmax::nan_max(m[r], s);
      const float alpha = m[r] == neg_inf<float>() ? 0.f : softmax::exp_(m[r] - m_new);
      const float pr = softmax::exp_(s - m_new);
      l[r] = l[r] * alpha + pr;
      m[r] = m_new;
#pragma unroll
      for (int c = 0; c < PER_LANE; ++c) acc[r][c] = acc[r][c] * alpha + pr * vv[c];
    }
  }
  // merge the warps' states (each warp saw every kWarps-th key of the chunk)
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (lane == 0) {
      s_m[warp][r] = m[r];
      s_l[warp][r] = l[r];
    }
#pragma unroll
    for (int c = 0; c < PER_LANE; ++c) s_acc[warp][r][lane + 32 * c] = acc[r][c];
  }
  __syncthreads();
  for (int r = warp; r < nrows; r += kWarps) {
    float big = neg_inf<float>();
    for (int w = 0; w < kWarps; ++w) big = softmax::nan_max(big, s_m[w][r]);
    float wt[kWarps], total = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      wt[w] = (s_m[w][r] == neg_inf<float>()) ? 0.f : softmax::exp_(s_m[w][r] - big);
      total += wt[w] * s_l[w][r];
    }
    const int64_t part = (static_cast<int64_t>(bh) * p.splits + split) * p.R + r0 + r;
    for (int d = lane; d < p.Dv; d += 32) {
      float a = 0.f;
      for (int w = 0; w < kWarps; ++w) a += wt[w] * s_acc[w][r][d];
      p.part_acc[part * p.Dv + d] = a;
    }
    if (lane == 0) {
      p.part_m[part] = big;
      p.part_l[part] = total;
    }
  }
}

template <typename T>
__global__ void combine_kernel(Params<T> p) {
  const int64_t row = blockIdx.x;  // (b, hq, i)
  const int i = row % p.Lq, hq = (row / p.Lq) % p.Hq, b = row / (static_cast<int64_t>(p.Lq) * p.Hq);
  const int G = p.Hq / p.Hkv, h = hq / G, r = (hq % G) * p.Lq + i;
  const int64_t base = (static_cast<int64_t>(b) * p.Hkv + h) * p.splits;
  kvcache::SplitMerge<float> mg;
  mg.init(p.sinks != nullptr, p.sinks ? p.sinks[hq] : 0.f);
  for (int s = 0; s < p.splits; ++s) mg.add(p.part_m[(base + s) * p.R + r], p.part_l[(base + s) * p.R + r]);
  for (int d = threadIdx.x; d < p.Dv; d += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < p.splits; ++s) {
      const int64_t part = (base + s) * p.R + r;
      const float w = mg.weight(p.part_m[part]);
      if (w != 0.f) o += w * p.part_acc[part * p.Dv + d];
    }
    p.out[row * p.Dv + d] = static_cast<T>(o);
  }
  if (threadIdx.x == 0) p.lse[row] = mg.lse();
}

template <typename T>
void launch(Params<T>& p, int row_groups) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (p.k_new != nullptr && p.B * p.Hkv * p.Lq > 0) {
    append_kernel<T><<<static_cast<unsigned int>(p.B * p.Hkv * p.Lq), 128, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (p.B * p.Hq * p.Lq == 0) return;
  const dim3 grid(static_cast<unsigned int>(p.splits), static_cast<unsigned int>(p.B * p.Hkv),
                  static_cast<unsigned int>(row_groups));
  const int width = p.D > p.Dv ? p.D : p.Dv;
  if (width <= 64) {
    split_kernel<T, 2><<<grid, kThreads, 0, stream>>>(p);
  } else if (width <= 128) {
    split_kernel<T, 4><<<grid, kThreads, 0, stream>>>(p);
  } else {
    split_kernel<T, 8><<<grid, kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  combine_kernel<T><<<static_cast<unsigned int>(p.B * p.Hq * p.Lq), 128, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kvcache_attention_fwd_cuda(
    const at::Tensor& query, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const c10::optional<at::Tensor>& key, const c10::optional<at::Tensor>& value,
    const c10::optional<at::Tensor>& block_table, const c10::optional<at::Tensor>& sinks,
    const c10::optional<at::Tensor>& alibi_slopes, bool causal, double scale, int64_t window_left,
    int64_t window_right, double softcap, int64_t num_splits) {
  const KVCacheDims d =
      check_kvcache_inputs(query, k_cache, v_cache, cache_seqlens, key, value, block_table, sinks, alibi_slopes);
  PYATTN_CHECK_ARG(query.is_cuda(), "kvcache_attention (cuda)", "query", "expected CUDA tensors, got ", query.device());
  PYATTN_CHECK_ARG(query.scalar_type() != at::kDouble, "kvcache_attention (cuda)", "query",
                   "expected float16, bfloat16 or float32, got ", query.scalar_type());
  PYATTN_CHECK_ARG(d.D <= 32 * kMaxPerLane && d.Dv <= 32 * kMaxPerLane, "kvcache_attention (cuda)", "query/v_cache",
                   "expected head dims up to ", 32 * kMaxPerLane, ", got D=", d.D, ", Dv=", d.Dv);
  const at::cuda::OptionalCUDAGuard guard(query.device());
  const int64_t R = (d.Hq / d.Hkv) * d.Lq;
  // the lengths live on the device: split for the capacity (reading them would synchronise)
  const int64_t workers = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t splits = resolve_splits(d, num_splits, d.capacity, workers, kMinSplitKeys);
  at::Tensor out = at::empty({d.B, d.Hq, d.Lq, d.Dv}, query.options());
  at::Tensor lse = at::empty({d.B, d.Hq, d.Lq}, query.options().dtype(at::kFloat));
  const auto f32 = query.options().dtype(at::kFloat);
  at::Tensor part_acc = at::empty({d.B * d.Hkv * splits * R, d.Dv}, f32);
  at::Tensor part_m = at::empty({d.B * d.Hkv * splits * R}, f32);
  at::Tensor part_l = at::empty({d.B * d.Hkv * splits * R}, f32);
  const at::Tensor q = query.contiguous(), sl = cache_seqlens.contiguous();
  at::Tensor kn, vn, bt, sk, al;
  if (key.has_value()) {
    kn = key->contiguous();
    vn = value->contiguous();
  }
  if (d.paged) bt = block_table->contiguous();
  if (sinks.has_value()) sk = sinks->to(at::kFloat).contiguous();
  if (alibi_slopes.has_value()) al = alibi_slopes->to(at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "kvcache_attention_fwd_cuda", [&] {
    Params<scalar_t> p;
    p.q = q.data_ptr<scalar_t>();
    p.k_cache = k_cache.data_ptr<scalar_t>();
    p.v_cache = v_cache.data_ptr<scalar_t>();
    for (int i = 0; i < 3; ++i) {
      p.ks[i] = k_cache.stride(i);
      p.vs[i] = v_cache.stride(i);
    }
    p.k_new = kn.defined() ? kn.data_ptr<scalar_t>() : nullptr;
    p.v_new = vn.defined() ? vn.data_ptr<scalar_t>() : nullptr;
    p.seqlens = sl.data_ptr<int32_t>();
    p.table = d.paged ? bt.data_ptr<int32_t>() : nullptr;
    p.bt_stride = d.paged ? bt.size(1) : 0;
    p.page_size = d.page_size;
    p.sinks = sk.defined() ? sk.data_ptr<float>() : nullptr;
    p.alibi = al.defined() ? al.data_ptr<float>() : nullptr;
    p.alibi_b_stride = al.defined() && al.dim() == 2 ? d.Hq : 0;
    p.B = static_cast<int>(d.B);
    p.Hq = static_cast<int>(d.Hq);
    p.Hkv = static_cast<int>(d.Hkv);
    p.Lq = static_cast<int>(d.Lq);
    p.D = static_cast<int>(d.D);
    p.Dv = static_cast<int>(d.Dv);
    p.R = static_cast<int>(R);
    p.splits = static_cast<int>(splits);
    p.scale = static_cast<float>(scale);
    p.softcap = static_cast<float>(softcap);
    p.causal = causal;
    p.window_left = window_left;
    p.window_right = window_right;
    p.part_acc = part_acc.data_ptr<float>();
    p.part_m = part_m.data_ptr<float>();
    p.part_l = part_l.data_ptr<float>();
    p.out = out.data_ptr<scalar_t>();
    p.lse = lse.data_ptr<float>();
    launch(p, static_cast<int>((R + kRows - 1) / kRows));
  });
  return {out, lse};
}

}  // namespace kvcache_cuda
}  // namespace pyattn

TORCH_LIBRARY_IMPL(pyattn, CUDA, m) {
  m.impl("kvcache_attention_fwd", &pyattn::kvcache_cuda::kvcache_attention_fwd_cuda);
}
