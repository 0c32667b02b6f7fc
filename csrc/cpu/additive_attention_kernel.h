// Raw-pointer interface between csrc/additive_attention.cpp (ATen side, compiled once) and the
// per-instruction-set kernels in csrc/cpu/additive_attention_kernel.cpp (compiled for DEFAULT,
// AVX2 and AVX512). All tensors are contiguous; lse is float64.
#pragma once

#include <cstdint>

namespace pyattn {
namespace cpu {

template <typename scalar_t>
struct AdditiveParams {
  const scalar_t* q;      // (B, Tq, H)
  const scalar_t* k;      // (B, Tk, H)
  const scalar_t* val;    // (B, Tk, Dv)
  const scalar_t* v;      // (H)
  const bool* mask;       // (B, Tk), true = padding; nullptr for none
  const scalar_t* out;    // (B, Tq, Dv): written by fwd, read by bwd
  const double* lse;      // (B, Tq), float64 (see AdditiveFwdOut::lse)
  int64_t B, Tq, Tk, H, Dv;
};

template <typename scalar_t>
struct AdditiveFwdOut {
  scalar_t* out;      // (B, Tq, Dv)
  // (B, Tq). float64 even for float32 inputs: at |lse| ~ 20 (scores of a wide H) a float32
  // lse is off by ~1e-6 relative, which every recomputed probability of the row inherits.
  double* lse;
  scalar_t* weights;  // (B, Tq, Tk) or nullptr
};

template <typename scalar_t>
struct AdditiveBwdArgs {
  const scalar_t* grad_out;      // (B, Tq, Dv)
  const scalar_t* grad_weights;  // (B, Tq, Tk) or nullptr
  const scalar_t* weights;       // (B, Tq, Tk) or nullptr (given with grad_weights)
  scalar_t* dq;                  // (B, Tq, H)
  scalar_t* dk;                  // (B, Tk, H)
  scalar_t* dval;                // (B, Tk, Dv)
  scalar_t* dv;                  // (H)
  scalar_t* dk_partial;          // (B, chunks - 1, Tk, H) scratch
  scalar_t* dval_partial;        // (B, chunks - 1, Tk, Dv) scratch
  scalar_t* dv_partial;          // (B * chunks, H) scratch
  int64_t chunks;                // additive::backward_chunks(B, Tq)
};

#define PYATTN_DECLARE_ADDITIVE_KERNELS(CAP)                                              \
  namespace CAP {                                                                        \
  void additive_attention_fwd_kernel(const AdditiveParams<float>&, const AdditiveFwdOut<float>&); \
  void additive_attention_fwd_kernel(const AdditiveParams<double>&, const AdditiveFwdOut<double>&); \
  void additive_attention_bwd_kernel(const AdditiveParams<float>&, const AdditiveBwdArgs<float>&); \
  void additive_attention_bwd_kernel(const AdditiveParams<double>&, const AdditiveBwdArgs<double>&); \
  }

PYATTN_DECLARE_ADDITIVE_KERNELS(DEFAULT)
PYATTN_DECLARE_ADDITIVE_KERNELS(AVX2)
PYATTN_DECLARE_ADDITIVE_KERNELS(AVX512)

}  // namespace cpu
}  // namespace pyattn
