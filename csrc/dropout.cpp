// CPU implementation of pyattn::dropout_keep_mask: the keep-mask every backend's fused dropout
// draws (csrc/philox.h), materialised for tests and for the reference path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"
#include "philox.h"

namespace pyattn {

at::Tensor dropout_keep_mask_cpu(int64_t seed, int64_t offset, c10::IntArrayRef shape, double p) {
  PYATTN_CHECK_ARG(p >= 0.0 && p < 1.0, "dropout_keep_mask", "dropout_p", "expected a probability in [0, 1), got ", p);
  for (auto s : shape) PYATTN_CHECK_ARG(s >= 0, "dropout_keep_mask", "shape", "expected non-negative sizes, got ", shape);
  at::Tensor mask = at::empty(shape, at::TensorOptions().dtype(at::kBool));
  bool* data = mask.data_ptr<bool>();
  const float pf = static_cast<float>(p);
  const uint64_t useed = static_cast<uint64_t>(seed);
  const uint64_t uoffset = static_cast<uint64_t>(offset);
  at::parallel_for(0, mask.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) data[e] = dropout_keep(useed, uoffset + e, pf);
  });
  return mask;
}

}  // namespace pyattn

TORCH_LIBRARY_IMPL(pyattn, CompositeExplicitAutograd, m) {
  m.impl("dropout_keep_mask", &pyattn::dropout_keep_mask_cpu);
}
