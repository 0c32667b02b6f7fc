// Which build of the per-instruction-set CPU kernels (csrc/cpu/*_kernel.cpp) to run here.
// Host side only: compiled once, without any -m flags.
#pragma once

#include <ATen/Version.h>

#include <string>

namespace pyattn {
namespace cpu {

enum class Capability { DEFAULT, AVX2, AVX512 };

// ATen's own choice (it honours ATEN_CPU_CAPABILITY), so pyattn and torch agree.
inline Capability capability() {
  static const Capability cap = [] {
    const std::string name = at::get_cpu_capability();
    if (name.rfind("AVX512", 0) == 0) return Capability::AVX512;
    if (name.rfind("AVX2", 0) == 0) return Capability::AVX2;
    return Capability::DEFAULT;
  }();
  return cap;
}

// Calls NAME from the namespace of the kernel build this CPU runs: DEFAULT, AVX2 or AVX512.
#define PYATTN_CPU_DISPATCH(NAME, ...)                                          \
  do {                                                                          \
    switch (::pyattn::cpu::capability()) {                                      \
      case ::pyattn::cpu::Capability::AVX512: ::pyattn::cpu::AVX512::NAME(__VA_ARGS__); break; \
      case ::pyattn::cpu::Capability::AVX2: ::pyattn::cpu::AVX2::NAME(__VA_ARGS__); break;     \
      default: ::pyattn::cpu::DEFAULT::NAME(__VA_ARGS__); break;                \
    }                                                                           \
  } while (0)

}  // namespace cpu
}  // namespace pyattn
