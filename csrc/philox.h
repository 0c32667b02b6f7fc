// Counter-based random numbers for fused dropout: Philox-4x32-10, bit-for-bit the generator
// behind triton.language.rand, so the CPU, CUDA and Triton backends draw the same dropout mask
// for the same (seed, offset) and a backward pass regenerates it instead of storing it.
//
// Element e of a (B, H, Lq, Lk) score tensor uses counter offset + e (64-bit), key = seed.
#pragma once

#include "common.h"

namespace pyattn {

PYATTN_HD uint32_t philox_umulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// The first of the four 32-bit outputs of Philox-4x32-10 for counter (c0, c1, 0, 0).
PYATTN_HD uint32_t philox_first(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = philox_umulhi(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = philox_umulhi(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Uniform in [0, 1) exactly as triton.language.uint_to_uniform_float maps an int32.
PYATTN_HD float philox_uniform(uint64_t seed, uint64_t counter) {
  int32_t x = static_cast<int32_t>(philox_first(seed, counter));
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Dropout keeps an element when its uniform draw is at least p (so P(keep) = 1 - p).
PYATTN_HD bool dropout_keep(uint64_t seed, uint64_t counter, float p) {
  return philox_uniform(seed, counter) >= p;
}

}  // namespace pyattn
