// Throughput and bit-identity of the SIMD dropout draws (csrc/cpu/philox_lanes.h) against the
// scalar generator (csrc/philox.h), outside PyTorch. From the repository root:
//   TI=$(python -c "import torch.utils.cpp_extension as e; print(e.include_paths()[0])")
//   F="-DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512 -mavx512f -mavx512bw -mavx512vl -mavx512dq"
//   g++ -O3 -std=c++20 $F -I$TI -Icsrc bench/philox_lanes_check.cpp -o /tmp/philox_check && /tmp/philox_check
// (-DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 -mavx2 for the AVX2 path, -DCPU_CAPABILITY=DEFAULT
// for the scalar fallback.)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "cpu/philox_lanes.h"
#include "philox.h"

int main() {
  using clock = std::chrono::steady_clock;
  const int64_t n = int64_t(1) << 22, row = 500;  // rows of 500 exercise the vector tails
  std::vector<float> scalar(n), lanes(n);
  // counters that cross a 2^32 boundary, so the high word's carry is exercised
  const uint64_t seed = 0x123456789abcdefull, base = 0xfffffff0ull * 3;
  auto t0 = clock::now();
  for (int64_t c = 0; c < n; ++c) scalar[c] = pyattn::dropout_keep(seed, base + c, 0.1f) ? 1.f / 0.9f : 0.f;
  auto t1 = clock::now();
  for (int64_t c = 0; c < n; c += row)
    pyattn::cpu::CPU_CAPABILITY::philox_dropout_row<float>(seed, base + c, 0.1f, 1.f / 0.9f, std::min(row, n - c),
                                           lanes.data() + c);
  auto t2 = clock::now();
  int64_t mismatches = 0;
  for (int64_t c = 0; c < n; ++c) mismatches += scalar[c] != lanes[c];
  const double ns = 1e9 / double(n);
  std::printf("scalar %.2f ns/draw, lanes %.2f ns/draw, mismatches %lld\n",
              std::chrono::duration<double>(t1 - t0).count() * ns,
              std::chrono::duration<double>(t2 - t1).count() * ns, static_cast<long long>(mismatches));
  return mismatches != 0;
}
