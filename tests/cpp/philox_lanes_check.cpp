// Bit-identity of the SIMD dropout draws (csrc/cpu/philox_lanes.h) with the scalar generator
// (csrc/philox.h), outside PyTorch, for one CPU capability build. tests/test_philox_lanes.py
// compiles it with each capability's flags from setup.py and runs it:
//   philox_lanes_check SEED BASE P [--corrupt]
// draws 2^22 counters from BASE on (the test makes them cross a 2^32 boundary, exercising the
// high word's carry) in rows of 500 (the vector tails) and exits 0 only when every draw matches.
// --corrupt flips one draw first, which must then be reported: the check can fail. Also prints
// the cost per draw of both, for information (no timing is asserted).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/philox_lanes.h"
#include "philox.h"

#define PYATTN_STR2(x) #x
#define PYATTN_STR(x) PYATTN_STR2(x)

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s SEED BASE P [--corrupt]\n", argv[0]);
    return 2;
  }
  const uint64_t seed = std::strtoull(argv[1], nullptr, 10), base = std::strtoull(argv[2], nullptr, 10);
  const float p = std::strtof(argv[3], nullptr), keep_scale = 1.f / (1.f - p);
  const bool corrupt = argc > 4 && std::strcmp(argv[4], "--corrupt") == 0;
  using clock = std::chrono::steady_clock;
  const int64_t n = int64_t(1) << 22, row = 500;
  std::vector<float> scalar(n), lanes(n);
  auto t0 = clock::now();
  for (int64_t c = 0; c < n; ++c) scalar[c] = pyattn::dropout_keep(seed, base + c, p) ? keep_scale : 0.f;
  auto t1 = clock::now();
  for (int64_t c = 0; c < n; c += row)
    pyattn::cpu::CPU_CAPABILITY::philox_dropout_row<float>(seed, base + c, p, keep_scale, std::min(row, n - c),
                                                           lanes.data() + c);
  auto t2 = clock::now();
  if (corrupt) lanes[n / 2 + 7] = lanes[n / 2 + 7] == 0.f ? keep_scale : 0.f;
  int64_t mismatches = 0;
  for (int64_t c = 0; c < n; ++c) mismatches += scalar[c] != lanes[c];
  const double ns = 1e9 / double(n);
  std::printf("%s: scalar %.2f ns/draw, lanes %.2f ns/draw, mismatches %lld\n", PYATTN_STR(CPU_CAPABILITY),
              std::chrono::duration<double>(t1 - t0).count() * ns,
              std::chrono::duration<double>(t2 - t1).count() * ns, static_cast<long long>(mismatches));
  return mismatches != 0;
}
