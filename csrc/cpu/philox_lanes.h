// Dropout multipliers for a run of consecutive Philox counters, W counters at a time in SIMD
// registers. Same generator and keep test as csrc/philox.h (philox_first / dropout_keep), bit for
// bit: the rounds only use 32-bit multiplies, whose high halves come from two vpmuludq (even and
// odd lanes) and a blend, as x86 has no 32-bit multiply-high. The AVX2 and AVX512 builds of the
// CPU kernels (CPU_CAPABILITY_*) get the vector path, DEFAULT the scalar generator. Per draw this
// is 1.7x (AVX512) to 2.1x (AVX2) cheaper than the scalar philox_first. tests/test_philox_lanes.py
// builds tests/cpp/philox_lanes_check.cpp with each capability's flags and checks every lane bit
// for bit against the scalar generator; tests/test_sdpa.py checks the kernels' draws through
// pyattn::dropout_keep_mask.
#pragma once

#include <cstdint>

// Everything here lives in pyattn::cpu::CPU_CAPABILITY, as the kernels do: these inline
// templates differ per instruction set, and one name shared by the DEFAULT, AVX2 and AVX512
// objects would let the linker keep a single copy for all of them (it once kept AVX2's 32-lane
// philox_dropout_vectors<4> for the AVX512 kernel, which then left lanes 32-63 of each block
// unset).
#ifndef CPU_CAPABILITY
#error "philox_lanes.h is for the per-ISA kernel files, compiled with -DCPU_CAPABILITY=..."
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "../philox.h"

namespace pyattn {
namespace cpu {
namespace CPU_CAPABILITY {

#if defined(CPU_CAPABILITY_AVX512)
struct PhiloxSimd {
  using V = __m512i;
  static constexpr int W = 16;
  static V load(const uint32_t* x) { return _mm512_loadu_si512(x); }
  static void store(uint32_t* y, V x) { _mm512_storeu_si512(y, x); }
  static V set1(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
  static V xor3(V a, V b, V c) { return _mm512_xor_si512(_mm512_xor_si512(a, b), c); }
  static V mullo(V a, V m) { return _mm512_mullo_epi32(a, m); }
  // m holds the same 32-bit constant in every lane, so it serves for even and odd lanes alike.
  // The all-lanes maskz forms are the same instructions; GCC 12's unmasked ones pass a
  // self-initialised placeholder that -Wall reports as uninitialised.
  static V mulhi(V a, V m) {
    const V even = _mm512_maskz_srli_epi64(0xFF, _mm512_maskz_mul_epu32(0xFF, a, m), 32);
    const V odd = _mm512_maskz_mul_epu32(0xFF, _mm512_maskz_srli_epi64(0xFF, a, 32), m);
    return _mm512_mask_blend_epi32(0xAAAA, even, odd);
  }
};
#elif defined(CPU_CAPABILITY_AVX2)
struct PhiloxSimd {
  using V = __m256i;
  static constexpr int W = 8;
  static V load(const uint32_t* x) { return _mm256_loadu_si256(reinterpret_cast<const V*>(x)); }
  static void store(uint32_t* y, V x) { _mm256_storeu_si256(reinterpret_cast<V*>(y), x); }
  static V set1(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  static V xor3(V a, V b, V c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static V mullo(V a, V m) { return _mm256_mullo_epi32(a, m); }
  static V mulhi(V a, V m) {
    const V even = _mm256_srli_epi64(_mm256_mul_epu32(a, m), 32);
    const V odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    return _mm256_blend_epi32(even, odd, 0xAA);
  }
};
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// z[c .. c + U * W) for counters base + c ..: U independent vectors at once, since one vector's
// rounds are a serial chain of multiplies whose latency, not throughput, would bound the loop.
template <int U, typename T>
inline void philox_dropout_vectors(uint64_t seed, uint64_t base, float p, T keep_scale, T* z) {
  using S = PhiloxSimd;
  constexpr int W = S::W;
  const S::V m0 = S::set1(0xD2511F53u), m2 = S::set1(0xCD9E8D57u);
  alignas(64) uint32_t lo[U * W], hi[U * W];
  for (int l = 0; l < U * W; ++l) {
    const uint64_t ctr = base + static_cast<uint64_t>(l);
    lo[l] = static_cast<uint32_t>(ctr);
    hi[l] = static_cast<uint32_t>(ctr >> 32);
  }
  S::V c0[U], c1[U], c2[U], c3[U];
  for (int u = 0; u < U; ++u) {
    c0[u] = S::load(lo + u * W);
    c1[u] = S::load(hi + u * W);
    c2[u] = c3[u] = S::set1(0);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const S::V vk0 = S::set1(k0), vk1 = S::set1(k1);
    for (int u = 0; u < U; ++u) {
      const S::V n0 = S::xor3(S::mulhi(c2[u], m2), c1[u], vk0);
      const S::V n2 = S::xor3(S::mulhi(c0[u], m0), c3[u], vk1);
      c1[u] = S::mullo(c2[u], m2);
      c3[u] = S::mullo(c0[u], m0);
      c0[u] = n0;
      c2[u] = n2;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int u = 0; u < U; ++u) S::store(lo + u * W, c0[u]);
  for (int l = 0; l < U * W; ++l) {
    const int32_t x = static_cast<int32_t>(lo[l]);
    const float v = static_cast<float>(x < 0 ? ~x : x) * 4.6566127342e-10f;
    z[l] = v >= p ? keep_scale : T(0);
  }
}
#endif

// z[c] = dropout_keep(seed, base + c, p) ? keep_scale : 0 for c in [0, n).
template <typename T>
inline void philox_dropout_row(uint64_t seed, uint64_t base, float p, T keep_scale, int64_t n, T* z) {
  int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr int W = PhiloxSimd::W;
  for (; c + 4 * W <= n; c += 4 * W) philox_dropout_vectors<4>(seed, base + c, p, keep_scale, z + c);
  for (; c + W <= n; c += W) philox_dropout_vectors<1>(seed, base + c, p, keep_scale, z + c);
#endif
  for (; c < n; ++c) z[c] = dropout_keep(seed, base + static_cast<uint64_t>(c), p) ? keep_scale : T(0);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace pyattn
