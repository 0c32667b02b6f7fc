// The block GEMM the per-instruction-set CPU kernels call (flash_gemm, declared in
// csrc/cpu/sdpa_kernel.h): ATen's CPU addmm on views of the kernels' buffers, run on the calling
// thread. It needs ATen's tensor API, which the per-ISA files cannot include, and
// at::native::cpublas is not exported to extensions, so this file is compiled once, without -m
// flags, beside the op glue (setup.py: csrc/cpu/*_kernel.cpp are the per-ISA builds).
#include <ATen/ATen.h>
#include <ATen/CPUFunctions.h>

#include <dlfcn.h>

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

}  // namespace cpu

}  // namespace pyattn
