// The block GEMM the per-instruction-set CPU kernels call (flash_gemm, declared in
// csrc/cpu/sdpa_kernel.h): ATen's CPU addmm on views of the kernels' buffers, run on the calling
// thread. It needs ATen's tensor API, which the per-ISA files cannot include, and
// at::native::cpublas is not exported to extensions, so this file is compiled once, without -m
// flags, beside the op glue (setup.py: csrc/cpu/*_kernel.cpp are the per-ISA builds).
//
// bfloat16 / float16 blocks times each other with float32 results (flash_gemm's half overloads)
// run on one of three paths, chosen at run time (half_gemm_path; docs/design.md, "Half
// precision on CPU"): oneDNN's AMX micro-kernel through torch's cpublas::brgemm, MKL's
// cblas_gemm_bf16bf16f32 (AVX512-BF16 dot products), or none (the kernels widen blocks to float32).
#include <ATen/ATen.h>
#include <ATen/CPUFunctions.h>
#include <ATen/native/CPUBlas.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <dlfcn.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/sdpa_kernel.h"

namespace pyattn {

namespace cpu {

namespace {

// torch builds with MKL call mkl_set_dynamic(false), so an MKL GEMM inside our at::parallel_for
// tasks opens a nested OpenMP team: on a loaded machine its spin-waiting threads made the forward
// 10x slower than single-threaded. Each task is one thread's work, so its GEMMs run on that
// thread: MKL_Set_Num_Threads_Local (the C API; lower-case mkl_set_num_threads_local is the
// Fortran one, taking a pointer), looked up at run time (absent without MKL: a no-op). Set on
// every call: at::in_parallel_region() read false inside these tasks here, and one block is too
// small for a second thread to pay off anyway.
using MklSetLocal = int (*)(int);

MklSetLocal mkl_set_num_threads_local_fn() {
  static const MklSetLocal fn = [] {
    void* sym = dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local");
    if (sym == nullptr) {
      if (void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) {
        sym = dlsym(lib, "MKL_Set_Num_Threads_Local");
      }
    }
    return reinterpret_cast<MklSetLocal>(sym);
  }();
  return fn;
}

struct SingleThreadedBlas {
  MklSetLocal fn = nullptr;
  int previous = 0;
  SingleThreadedBlas() : fn(mkl_set_num_threads_local_fn()) {
    if (fn) previous = fn(1);
  }
  ~SingleThreadedBlas() {
    if (fn) fn(previous);
  }
};

template <typename T>
void gemm_impl(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  // Views over the caller's buffers; op(X) is a transposed view when X is stored transposed.
  at::Tensor A = trans_a ? at::from_blob(const_cast<T*>(a), {k, m}, {lda, 1}, opts).t()
                         : at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opts);
  at::Tensor Bm = trans_b ? at::from_blob(const_cast<T*>(b), {n, k}, {ldb, 1}, opts).t()
                          : at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, opts);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  // at::cpu:: calls the CPU kernel directly: no dispatcher, no autograd, and no Python
  // dispatch mode (opcheck, fake tensors) can intercept these internal products.
  const SingleThreadedBlas single;
  at::cpu::addmm_out(C, C, A, Bm, beta, alpha);
}

}  // namespace

// ---- half blocks, float32 results ----

namespace {

// MKL's CBLAS enums and its LP64 integer (torch links MKL's lp64 interface).
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;
using MklHalfGemm = void (*)(int, int, int, int, int, int, float, const void*, int, const void*, int,
                             float, float*, int);

MklHalfGemm mkl_symbol(const char* name) {
  void* sym = dlsym(RTLD_DEFAULT, name);
  if (sym == nullptr) {
    if (void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) sym = dlsym(lib, name);
  }
  return reinterpret_cast<MklHalfGemm>(sym);
}

MklHalfGemm mkl_bf16_gemm() {
  static const MklHalfGemm fn = mkl_symbol("cblas_gemm_bf16bf16f32");
  return fn;
}

// CPUID leaf 7 subleaf 1, EAX bit 5: AVX512-BF16 (vdpbf16ps). MKL's bf16 GEMM runs on any AVX512
// CPU, but without these dot products it converts to float32 and is no faster than sgemm.
bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return false;
  return (eax >> 5) & 1u;
#else
  return false;
#endif
}

// oneDNN's own verdict (it checks CPUID, the OS's AMX permission and ONEDNN_MAX_CPU_ISA): AMX
// tiles for this dtype, used through torch's exported brgemm / pack (VNNI-packed B operands).
bool amx_usable(bool bf16) {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  return at::native::cpublas::could_pack(bf16 ? at::kBFloat16 : at::kHalf);
#else
  (void)bf16;
  return false;
#endif
}

bool path_available(HalfGemm path, bool bf16) {
  switch (path) {
    case HalfGemm::kWiden: return true;
    // MKL's float16 GEMM measured no faster than sgemm on an AVX512-FP16 CPU: not offered.
    case HalfGemm::kMkl: return bf16 && mkl_bf16_gemm() != nullptr && cpu_has_avx512_bf16();
    case HalfGemm::kAmx: return amx_usable(bf16);
  }
  return false;
}

// The default: MKL's bfloat16 GEMM where the CPU has AVX512-BF16 (on AMX CPUs MKL runs it on the
// AMX tiles itself). The AMX path through torch's brgemm is correct and packs each B operand once
// per call, but measured slower than MKL on a Sapphire Rapids VM (docs/design.md), so it is
// taken only when asked for (PYATTN_CPU_HALF_GEMM=amx), also for float16 on AMX-FP16 CPUs.
HalfGemm best_path(bool bf16) {
  static const HalfGemm best = path_available(HalfGemm::kMkl, true) ? HalfGemm::kMkl : HalfGemm::kWiden;
  return bf16 ? best : HalfGemm::kWiden;
}

// Bumped at the start of every half kernel call (half_gemm_path): the packed B operands cached
// below belong to one call, whose inputs do not change while it runs.
std::atomic<uint64_t> g_call{0};

// Per-thread scratch of the AMX path: oneDNN's micro-kernel takes A as (m x k) rows, B as
// (k x n) packed in VNNI strips of at most 64 columns, k even. Packing B costs about as much as
// the product at these block sizes, and the kernels multiply the same input block (a key or
// value block, a query or dO block) by many others in one call, so packed B operands are kept
// per thread for the rest of the call, keyed by where they came from.
struct PackedB {
  const void* src;
  bool trans;
  int64_t k, n, ld;
  std::vector<uint16_t> data;
};

struct AmxScratch {
  std::vector<uint16_t> a, b;
  std::vector<float> c;
  uint64_t call = ~uint64_t(0);
  std::vector<PackedB> cache;
  size_t next = 0;  // the entry to replace when the cache is full
};

constexpr size_t kPackedCacheEntries = 96;

template <typename T>
const T* packed_b(AmxScratch& w, bool trans_b, int64_t k, int64_t n, const T* b, int64_t ldb) {
  const uint64_t call = g_call.load(std::memory_order_relaxed);
  if (w.call != call) {
    w.cache.clear();
    w.next = 0;
    w.call = call;
  }
  for (const PackedB& e : w.cache) {
    if (e.src == b && e.trans == trans_b && e.k == k && e.n == n && e.ld == ldb)
      return reinterpret_cast<const T*>(e.data.data());
  }
  const at::ScalarType dt = std::is_same_v<T, c10::BFloat16> ? at::kBFloat16 : at::kHalf;
  const int64_t kp = (k + 1) & ~int64_t(1);  // VNNI pairs: an odd k gets one zero row
  // B as (kp x n) rows, then packed strip by strip.
  const T* B = b;
  int64_t ld_b = ldb;
  if (trans_b || kp != k) {
    w.b.assign(kp * n, 0);
    T* buf = reinterpret_cast<T*>(w.b.data());
    if (trans_b) {
      for (int64_t j = 0; j < n; ++j)
        for (int64_t l = 0; l < k; ++l) buf[l * n + j] = b[j * ldb + l];
    } else {
      for (int64_t l = 0; l < k; ++l) std::memcpy(buf + l * n, b + l * ldb, n * sizeof(T));
    }
    B = buf;
    ld_b = n;
  }
  PackedB* e;
  if (w.cache.size() < kPackedCacheEntries) {
    w.cache.emplace_back();
    e = &w.cache.back();
  } else {
    e = &w.cache[w.next];
    w.next = (w.next + 1) % kPackedCacheEntries;
  }
  e->src = b;
  e->trans = trans_b;
  e->k = k;
  e->n = n;
  e->ld = ldb;
  e->data.resize(kp * ((n + 63) / 64) * 64);
  T* packed = reinterpret_cast<T*>(e->data.data());
  for (int64_t j = 0; j < n; j += 64) {
    const int64_t nb = std::min<int64_t>(64, n - j);
    const int64_t ld_out = (nb + 15) / 16 * 16;  // oneDNN packs into 16, 32, 48 or 64 columns
    at::native::cpublas::pack(kp, nb, ld_b, ld_out, dt, dt, B + j, packed + j * kp);
  }
  return packed;
}

template <typename T>
void amx_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const T* a,
              int64_t lda, const T* b, int64_t ldb, float beta, float* c, int64_t ldc) {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  thread_local AmxScratch w;
  static_assert(sizeof(T) == sizeof(uint16_t));
  const int64_t kp = (k + 1) & ~int64_t(1);
  // A as (m x kp) rows: in place when it already is.
  const T* A = a;
  int64_t ld_a = lda;
  if (trans_a || kp != k) {
    w.a.assign(m * kp, 0);
    T* buf = reinterpret_cast<T*>(w.a.data());
    if (trans_a) {
      for (int64_t l = 0; l < k; ++l)
        for (int64_t i = 0; i < m; ++i) buf[i * kp + l] = a[l * lda + i];
    } else {
      for (int64_t i = 0; i < m; ++i) std::memcpy(buf + i * kp, a + i * lda, k * sizeof(T));
    }
    A = buf;
    ld_a = kp;
  }
  const T* packed = packed_b(w, trans_b, k, n, b, ldb);
  // beta 0 or 1 writes C directly (alpha applied after, in place, when beta is 0); alpha != 1
  // with beta != 0 goes through a float32 block.
  const bool direct = beta == 0.0f || (beta == 1.0f && alpha == 1.0f);
  float* C = c;
  int64_t ld_c = ldc;
  if (!direct) {
    w.c.resize(m * n);
    C = w.c.data();
    ld_c = n;
  }
  for (int64_t j = 0; j < n; j += 64) {
    const int64_t nb = std::min<int64_t>(64, n - j);
    const int64_t ld_out = (nb + 15) / 16 * 16;
    at::native::cpublas::brgemm(m, nb, kp, ld_a, ld_out, ld_c, direct && beta == 1.0f, A,
                                packed + j * kp, C + j, /*is_vnni=*/true);
  }
  // The tile configuration stays per thread otherwise; other code on this thread may use AMX.
  at::native::cpublas::brgemm_release(true);
  if (direct) {
    if (beta == 0.0f && alpha != 1.0f) {
      for (int64_t i = 0; i < m; ++i) {
        float* crow = c + i * ldc;
        for (int64_t j = 0; j < n; ++j) crow[j] *= alpha;
      }
    }
  } else {
    for (int64_t i = 0; i < m; ++i) {
      float* crow = c + i * ldc;
      const float* t = C + i * n;
      for (int64_t j = 0; j < n; ++j) crow[j] = alpha * t[j] + beta * crow[j];
    }
  }
#else
  (void)trans_a, (void)trans_b, (void)m, (void)n, (void)k, (void)alpha, (void)a, (void)lda;
  (void)b, (void)ldb, (void)beta, (void)c, (void)ldc;
  TORCH_CHECK(false, "pyattn: this torch has no cpublas::brgemm");
#endif
}

void mkl_bf16_gemm_call(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                        const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b, int64_t ldb,
                        float beta, float* c, int64_t ldc) {
  const MklHalfGemm fn = mkl_bf16_gemm();
  TORCH_CHECK(fn != nullptr, "pyattn: MKL's cblas_gemm_bf16bf16f32 is not in this torch");
  const SingleThreadedBlas single;
  fn(kCblasRowMajor, trans_a ? kCblasTrans : kCblasNoTrans, trans_b ? kCblasTrans : kCblasNoTrans,
     static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a, static_cast<int>(lda),
     b, static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

// The degenerate shapes, so that the libraries only see m, n, k >= 1; true when handled.
bool trivial_gemm(int64_t m, int64_t n, int64_t k, float beta, float* c, int64_t ldc) {
  if (m > 0 && n > 0 && k > 0) return false;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
  return true;
}

// ---- the AMX forward's pre-packed operands (csrc/cpu/sdpa_kernel.cpp, forward_amx) ----

// The VNNI layout of a (k x nb) B operand with leading dim ld = round16(nb), as oneDNN's brgemm
// reads it (and cpublas::pack writes it): rows in pairs, element (r, c) at
// (r / 2) * 2 * ld + 2 * c + r % 2; the columns past nb are zeros. Written here directly from K
// and V (a transpose of 32-bit pairs for K^T, an interleave of row pairs for V), which saves the
// scratch copy cpublas::pack needs (its input must be a dense (k x nb) block).

// The packings' inner loops on AVX512 (every AMX CPU has it; checked at run time all the same,
// this file being compiled without -m flags): a 16 x 16 transpose of 32-bit pairs for the keys,
// a 16-bit interleave of two rows for the values. The scalar loops below do the rest.
bool cpu_has_avx512bw() {
#if defined(__x86_64__)
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return has;
#else
  return false;
#endif
}

#if defined(__x86_64__)
// dst row c (stride ld) = column c of the 16 x 16 block of 32-bit words at src (row stride ls).
__attribute__((target("avx512f"))) void transpose16_u32(const uint32_t* src, int64_t ls,
                                                        uint32_t* dst, int64_t ld) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * ls);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + i * ld, r[i]);
}

// o[2q] = a[q], o[2q + 1] = b[q] for q < 32 * (n / 32); returns how many q it did.
__attribute__((target("avx512f,avx512bw"))) int64_t interleave_u16(const uint16_t* a,
                                                                   const uint16_t* b, int64_t n,
                                                                   uint16_t* o) {
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t hi_idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                  24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i il = _mm512_load_si512(lo_idx), ih = _mm512_load_si512(hi_idx);
  int64_t q = 0;
  for (; q + 32 <= n; q += 32) {
    const __m512i x = _mm512_loadu_si512(a + q), y = _mm512_loadu_si512(b + q);
    _mm512_storeu_si512(o + 2 * q, _mm512_permutex2var_epi16(x, il, y));
    _mm512_storeu_si512(o + 2 * q + 32, _mm512_permutex2var_epi16(x, ih, y));
  }
  return q;
}
#endif

// K (n rows of D) as the B operand of Q K^T: per strip of kAmxStrip keys, K^T (Dp x nb, a zero
// row when D is odd) at out + strip * Dp * kAmxStrip.
template <typename T>
void amx_pack_keys_impl(const T* k, int64_t n, int64_t D, T* out) {
  const int64_t Dp = (D + 1) & ~int64_t(1), pairs = Dp / 2;
  const uint16_t* src = reinterpret_cast<const uint16_t*>(k);
  for (int64_t j = 0; j < n; j += kAmxStrip) {
    const int64_t nb = std::min<int64_t>(kAmxStrip, n - j), ld = amx_ld(nb);
    uint32_t* dst = reinterpret_cast<uint32_t*>(out + (j / kAmxStrip) * Dp * kAmxStrip);
    int64_t r = 0;
#if defined(__x86_64__)
    // whole 16-key by 16-pair blocks transposed in registers (even D, a multiple of 32)
    if (Dp == D && pairs % 16 == 0 && cpu_has_avx512bw()) {
      const uint32_t* src32 = reinterpret_cast<const uint32_t*>(k);
      for (; r + 16 <= nb; r += 16)
        for (int64_t t = 0; t < pairs; t += 16)
          transpose16_u32(src32 + (j + r) * pairs + t, pairs, dst + t * ld + r, ld);
    }
#endif
    for (; r < nb; ++r) {
      const uint16_t* row = src + (j + r) * D;
      if (Dp == D) {
        for (int64_t t = 0; t < pairs; ++t) std::memcpy(dst + t * ld + r, row + 2 * t, 4);
      } else {
        for (int64_t t = 0; t < pairs; ++t) {
          const uint32_t lo = row[2 * t], hi = 2 * t + 1 < D ? row[2 * t + 1] : 0;
          dst[t * ld + r] = lo | (hi << 16);
        }
      }
    }
    for (int64_t t = 0; t < pairs; ++t)
      std::fill(dst + t * ld + nb, dst + (t + 1) * ld, uint32_t(0));
  }
}

// V (n rows of Dv) as the B operand of P V: per strip of kAmxStrip columns, the (ne x nb) block
// (ne = n rounded up to even, a zero row when n is odd) at out + strip * ne * kAmxStrip. Keys from
// an even j0 on start at + j0 * amx_ld(nb).
template <typename T>
void amx_pack_values_impl(const T* v, int64_t n, int64_t Dv, T* out) {
  const int64_t ne = (n + 1) & ~int64_t(1);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(v);
  for (int64_t c = 0; c < Dv; c += kAmxStrip) {
    const int64_t nb = std::min<int64_t>(kAmxStrip, Dv - c), ld = amx_ld(nb);
    uint16_t* dst = reinterpret_cast<uint16_t*>(out + (c / kAmxStrip) * ne * kAmxStrip);
    for (int64_t r = 0; r < ne; r += 2) {
      const uint16_t* a = src + r * Dv + c;
      const uint16_t* b = r + 1 < n ? a + Dv : nullptr;
      uint16_t* o = dst + r * ld;
      int64_t q = 0;
#if defined(__x86_64__)
      if (b != nullptr && cpu_has_avx512bw()) q = interleave_u16(a, b, nb, o);
#endif
      for (; q < nb; ++q) {
        o[2 * q] = a[q];
        o[2 * q + 1] = b != nullptr ? b[q] : uint16_t(0);
      }
      std::fill(o + 2 * nb, o + 2 * ld, uint16_t(0));
    }
  }
}

template <typename T>
void amx_brgemm_impl(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                     bool add_c, const T* a, const T* b, float* c) {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add_c, a, b, c, /*is_vnni=*/true);
#else
  (void)m, (void)n, (void)k, (void)lda, (void)ldb, (void)ldc, (void)add_c, (void)a, (void)b, (void)c;
  TORCH_CHECK(false, "pyattn: this torch has no cpublas::brgemm");
#endif
}

}  // namespace

HalfGemm half_gemm_path(bool bf16, bool forward) {
  // PYATTN_CPU_HALF_GEMM=auto|widen|mkl|amx (read on every call, so tests can switch paths in
  // one process); a path this CPU or this torch cannot run is an error, not a silent fallback.
  g_call.fetch_add(1, std::memory_order_relaxed);
  const char* env = std::getenv("PYATTN_CPU_HALF_GEMM");
  if (env == nullptr || *env == 0 || std::strcmp(env, "auto") == 0) {
    // auto: the bfloat16 forward runs on AMX where oneDNN offers it (K and V packed once per call,
    // csrc/cpu/sdpa_kernel.cpp forward_amx); the backward keeps MKL, measured faster there
    // (docs/design.md, "Half precision on CPU"). float16 on AMX-FP16 stays opt-in: no CPU here
    // has had it.
    if (forward && bf16 && path_available(HalfGemm::kAmx, true)) return HalfGemm::kAmx;
    return best_path(bf16);
  }
  HalfGemm want;
  if (std::strcmp(env, "widen") == 0) {
    want = HalfGemm::kWiden;
  } else if (std::strcmp(env, "mkl") == 0) {
    want = HalfGemm::kMkl;
  } else if (std::strcmp(env, "amx") == 0) {
    want = HalfGemm::kAmx;
  } else {
    TORCH_CHECK(false, "PYATTN_CPU_HALF_GEMM: expected auto, widen, mkl or amx, got '", env, "'");
  }
  TORCH_CHECK(path_available(want, bf16), "PYATTN_CPU_HALF_GEMM=", env, ": not available for ",
              bf16 ? "bfloat16" : "float16", " on this CPU / torch");
  return want;
}

const char* half_gemm_name(HalfGemm path) {
  switch (path) {
    case HalfGemm::kWiden: return "widen";
    case HalfGemm::kMkl: return "mkl";
    case HalfGemm::kAmx: return "amx";
  }
  return "?";
}

void flash_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b, int64_t ldb,
                float beta, float* c, int64_t ldc, HalfGemm path) {
  if (trivial_gemm(m, n, k, beta, c, ldc)) return;
  if (path == HalfGemm::kAmx) {
    amx_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  } else {
    mkl_bf16_gemm_call(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

void flash_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                const c10::Half* a, int64_t lda, const c10::Half* b, int64_t ldb, float beta,
                float* c, int64_t ldc, HalfGemm path) {
  if (trivial_gemm(m, n, k, beta, c, ldc)) return;
  (void)path;  // float16 has the AMX path only
  amx_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void flash_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                int64_t ldc) {
  gemm_impl(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void flash_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                const double* a, int64_t lda, const double* b, int64_t ldb, double beta,
                double* c, int64_t ldc) {
  gemm_impl(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void amx_pack_keys(const c10::BFloat16* k, int64_t n, int64_t D, c10::BFloat16* out) {
  amx_pack_keys_impl(k, n, D, out);
}
void amx_pack_keys(const c10::Half* k, int64_t n, int64_t D, c10::Half* out) {
  amx_pack_keys_impl(k, n, D, out);
}
void amx_pack_values(const c10::BFloat16* v, int64_t n, int64_t Dv, c10::BFloat16* out) {
  amx_pack_values_impl(v, n, Dv, out);
}
void amx_pack_values(const c10::Half* v, int64_t n, int64_t Dv, c10::Half* out) {
  amx_pack_values_impl(v, n, Dv, out);
}
void amx_brgemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
                const c10::BFloat16* a, const c10::BFloat16* b, float* c) {
  amx_brgemm_impl(m, n, k, lda, ldb, ldc, add_c, a, b, c);
}
void amx_brgemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
                const c10::Half* a, const c10::Half* b, float* c) {
  amx_brgemm_impl(m, n, k, lda, ldb, ldc, add_c, a, b, c);
}
char* task_scratch(size_t bytes) {
  // Page-aligned, so the blocks carved from it start on cache lines: AMX tile rows (64 bytes at
  // a multiple of 64 apart) then touch one line each. malloc's 16-byte alignment had split every
  // tile row across two lines (docs/design.md, "Half precision on CPU"). Kept between calls: no
  // allocation, page faults or zero fill per call.
  struct Scratch {
    void* p = nullptr;
    size_t cap = 0;
    ~Scratch() { std::free(p); }
  };
  thread_local Scratch s;
  if (bytes > s.cap) {
    constexpr size_t kPage = 4096;
    const size_t cap = (bytes + kPage - 1) / kPage * kPage;
    std::free(s.p);
    s.p = nullptr;
    s.cap = 0;
    void* mem = nullptr;
    TORCH_CHECK(posix_memalign(&mem, kPage, cap) == 0, "pyattn: could not allocate ", cap,
                " bytes of task scratch");
    s.p = mem;
    s.cap = cap;
  }
  return static_cast<char*>(s.p);
}

// ---- float32 block products on oneDNN's brgemm ----

namespace {

// CPUID: AVX2 and FMA with the OS saving YMM state, the least oneDNN's float32 brgemm JIT needs
// (below it torch's cpublas::brgemm falls back to its gemm, correct but with a copy per product).
bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  const bool fma = (ecx >> 12) & 1u, osxsave = (ecx >> 27) & 1u, avx = (ecx >> 28) & 1u;
  if (!(fma && osxsave && avx)) return false;
  unsigned xlo = 0, xhi = 0;
  __asm__("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  if ((xlo & 6u) != 6u) return false;  // XMM and YMM state
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  return (ebx >> 5) & 1u;
#else
  return false;
#endif
}

// ONEDNN_MAX_CPU_ISA capped below AVX2 (oneDNN reads it once, at its first kernel)
bool onednn_capped_below_avx2() {
  const char* env = std::getenv("ONEDNN_MAX_CPU_ISA");
  if (env == nullptr) env = std::getenv("DNNL_MAX_CPU_ISA");
  if (env == nullptr) return false;
  std::string v(env);
  for (auto& ch : v) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  return v == "SSE41" || v == "AVX" || v == "DEFAULT";
}

bool f32_brgemm_available() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  static const bool isa = cpu_has_avx2_fma() && !onednn_capped_below_avx2();
  return isa && at::globalContext().userEnabledMkldnn();
#else
  return false;
#endif
}

}  // namespace

F32Gemm f32_gemm_path(bool forward, int64_t head_dim) {
  // PYATTN_CPU_F32_GEMM=auto|blas|brgemm, read on every call as PYATTN_CPU_HALF_GEMM; a path this
  // CPU or torch cannot run is an error. auto (docs/design.md, "float32 on oneDNN's brgemm"): the
  // brgemm where oneDNN has it, for the forward at every head dim and for the backward up to
  // kF32BrgemmBackwardMaxD; past it the backward measured 0.95-1.03x MKL's (D = 128), below it
  // 1.07-1.34x (D = 64).
  const char* env = std::getenv("PYATTN_CPU_F32_GEMM");
  if (env == nullptr || *env == 0 || std::strcmp(env, "auto") == 0) {
    const bool fits = forward || head_dim <= kF32BrgemmBackwardMaxD;
    return fits && f32_brgemm_available() ? F32Gemm::kBrgemm : F32Gemm::kBlas;
  }
  if (std::strcmp(env, "blas") == 0) return F32Gemm::kBlas;
  TORCH_CHECK(std::strcmp(env, "brgemm") == 0,
              "PYATTN_CPU_F32_GEMM: expected auto, blas or brgemm, got '", env, "'");
  TORCH_CHECK(f32_brgemm_available(), "PYATTN_CPU_F32_GEMM=brgemm: not available on this CPU / torch",
              " (needs AVX2 and FMA, oneDNN enabled and not capped below AVX2)");
  return F32Gemm::kBrgemm;
}

const char* f32_gemm_name(F32Gemm path) {
  return path == F32Gemm::kBrgemm ? "brgemm" : "blas";
}

void f32_brgemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                bool add_c, const float* a, const float* b, float* c) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add_c, a, b, c, /*is_vnni=*/false);
#else
  (void)m, (void)n, (void)k, (void)lda, (void)ldb, (void)ldc, (void)add_c, (void)a, (void)b, (void)c;
  TORCH_CHECK(false, "pyattn: this torch has no float32 cpublas::brgemm");
#endif
}

void amx_release() {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  at::native::cpublas::brgemm_release(true);
#endif
}

}  // namespace cpu

}  // namespace pyattn

// For `pyattn info`, the benchmarks and the tests (pyattn/info.py reads it through ctypes): the
// half GEMM path a call in this dtype (1 = bfloat16, 0 = float16) takes now, or "error: " and why
// (PYATTN_CPU_HALF_GEMM names a path that is not available here).
extern "C" __attribute__((visibility("default"))) const char* pyattn_cpu_half_gemm_path(int bf16,
                                                                                      int forward) {
  thread_local std::string answer;
  try {
    answer = pyattn::cpu::half_gemm_name(pyattn::cpu::half_gemm_path(bf16 != 0, forward != 0));
  } catch (const c10::Error& e) {
    answer = std::string("error: ") + e.what_without_backtrace();
  }
  return answer.c_str();
}

// The float32 block-product path (f32_gemm_path) a call takes now in this direction at this head
// dim (the larger of D and Dv): "blas", "brgemm", or "error: ".
extern "C" __attribute__((visibility("default"))) const char* pyattn_cpu_f32_gemm_path(
    int forward, int64_t head_dim) {
  thread_local std::string answer;
  try {
    answer = pyattn::cpu::f32_gemm_name(pyattn::cpu::f32_gemm_path(forward != 0, head_dim));
  } catch (const c10::Error& e) {
    answer = std::string("error: ") + e.what_without_backtrace();
  }
  return answer.c_str();
}
