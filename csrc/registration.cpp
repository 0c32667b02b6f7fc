// The one place where pyattn's operator schemas live. Backend files (additive_attention.cpp,
// sdpa.cpp, cuda/*.cu) only add TORCH_LIBRARY_IMPL blocks for these schemas; the
// Triton backend registers its own twins (same signatures, suffix _triton) from kernels/.
//
// Conventions shared by every implementation:
// - lse is the natural-log log-sum-exp of each query row's scores, float32 (float64 for float64
//   inputs; the CPU additive op keeps it in float64 always, see cpu/additive_attention_kernel.h);
//   a row with no key to attend to has lse = +inf, output 0 and zero gradients.
// - additive_attention_fwd returns an empty weights tensor unless return_weights is true.
// - sdpa_* take canonical 4-D (B, H, L, D) inputs; attn_mask, when given, is bool
//   (True = attend) or of the query's dtype (added to the scores), broadcast to (B, Hq, Lq, Lk)
//   by strides (a stride may be 0). Dropout keeps score element e = ((b*Hq + h)*Lq + i)*Lk + j
//   when philox_uniform(seed, offset + e) >= dropout_p (csrc/philox.h). causal is 0 (none),
//   1 (upper-left, torch's is_causal: query i sees keys j <= i) or 2 (lower-right:
//   j <= i + Lk - Lq, flash-attention's when Lq != Lk), the values of torch's CausalVariant.
// - The attention variants of sdpa_* and varlen_attention_* (docs/design.md, "Attention
//   variants"; defaults = off): window (window_left, window_right) around the diagonal d = i
//   (causal == 1) or i + Lk - Lq (otherwise), -1 unbounded; softcap (0 = off); sinks (Hq,), one
//   logit per head in the softmax denominator (lse includes it; its gradient is computed in
//   Python from lse and Delta, so the backward ops do not take it); alibi_slopes (Hq,) or
//   (B, Hq), scores -= slope * |i + Lk - Lq - j|. Order: scale, softcap, ALiBi, masks, softmax.
// - Users' inputs are validated in Python (pyattn/ops/); the C++ ops check only what keeps a
//   direct torch.ops call from reading or writing out of bounds.

#include <Python.h>
#include <torch/library.h>

#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <atomic>
#include <string>

TORCH_LIBRARY(pyattn, m) {
  m.def(
      "additive_attention_fwd(Tensor query, Tensor key, Tensor value, Tensor v, "
      "Tensor? key_padding_mask, bool return_weights) -> (Tensor out, Tensor lse, Tensor weights)");
  m.def(
      "additive_attention_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor v, "
      "Tensor? key_padding_mask, Tensor out, Tensor lse, Tensor? grad_weights, Tensor? weights) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_v)");
  m.def(
      "sdpa_fwd(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
      "float dropout_p, int causal, float scale, SymInt seed, SymInt offset, int window_left=-1, "
      "int window_right=-1, float softcap=0.0, Tensor? sinks=None, Tensor? alibi_slopes=None) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "sdpa_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, "
      "Tensor? attn_mask, Tensor out, Tensor lse, float dropout_p, int causal, float scale, "
      "SymInt seed, SymInt offset, int window_left=-1, int window_right=-1, float softcap=0.0, "
      "Tensor? alibi_slopes=None) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
  // Packed variable-length sequences (pyattn/ops/varlen_attention.py): query (total_q, Hq, D),
  // key (total_k, Hkv, D), value (total_k, Hkv, Dv), cu_seqlens_* int32 (B + 1,) cumulative
  // from 0; sequence b is rows cu[b] .. cu[b + 1] and attends only within itself. causal as
  // sdpa's, per sequence (lower-right: off = Lk_b - Lq_b). lse is (Hq, total_q). Dropout keeps
  // element (b, h, i, j) as sdpa does on the padded (B, Hq, max_seqlen_q, max_seqlen_k) batch:
  // counter offset + ((b*Hq + h)*max_seqlen_q + i)*max_seqlen_k + j.
  m.def(
      "varlen_attention_fwd(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float dropout_p, int causal, "
      "float scale, SymInt seed, SymInt offset, int window_left=-1, int window_right=-1, "
      "float softcap=0.0, Tensor? sinks=None, Tensor? alibi_slopes=None) -> (Tensor out, Tensor lse)");
  m.def(
      "varlen_attention_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor out, Tensor lse, SymInt max_seqlen_q, "
      "SymInt max_seqlen_k, float dropout_p, int causal, float scale, SymInt seed, SymInt offset, "
      "int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
  // KV-cache attention (pyattn/ops/kvcache_attention.py; docs/design.md, "KV-cache attention"):
  // query (B, Hq, Lq, D); a dense cache (B, Hkv, L_max, D) or, with block_table int32
  // (B, max_pages), a paged one (num_pages, Hkv, page_size, D); cache_seqlens int32 (B,). key /
  // value (B, Hkv, Lq, D), when given, are written into the caches in place at cache_seqlens[b] +
  // t (hence Tensor(a!) / Tensor(b!)), then query row i of sequence b attends keys up to its
  // lower-right diagonal d = i + Lk_b - Lq (Lk_b = cache_seqlens[b] + Lq with key/value, else
  // cache_seqlens[b]) when causal, within window (left, right) around d (-1 = unbounded), with
  // softcap (0 = off), sinks (Hq,) and alibi_slopes (Hq,) or (B, Hq) as sdpa's variants.
  // num_splits = 0 chooses the split-K count. lse (B, Hq, Lq) includes the sink.
  m.def(
      "kvcache_attention_fwd(Tensor query, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, "
      "Tensor? key, Tensor? value, Tensor? block_table, Tensor? sinks, Tensor? alibi_slopes, bool causal, "
      "float scale, int window_left, int window_right, float softcap, int num_splits) "
      "-> (Tensor out, Tensor lse)");
  // The dropout keep-mask (B, H, Lq, Lk) that the kernels draw for (seed, offset): for tests
  // and for the reference path, so every backend's dropout can be checked exactly.
  m.def("dropout_keep_mask(int seed, int offset, int[] shape, float p) -> Tensor");
}

namespace {

PyObject* with_cuda(PyObject*, PyObject*) {
#if PYATTN_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* cpu_capability(PyObject*, PyObject*) {
  const std::string cap = at::get_cpu_capability();
  return PyUnicode_FromString(cap.c_str());
}

// How many threads an at::parallel_for in this module really runs on: at::parallel_for is header
// code, so a build without the compiler's OpenMP flag gets a serial loop while torch itself runs
// on every intra-op thread.
PyObject* parallel_threads(PyObject*, PyObject*) {
  std::atomic<int> seen{1};
  at::parallel_for(0, 4 * at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const int mine = at::get_thread_num() + 1;
    int cur = seen.load();
    while (mine > cur && !seen.compare_exchange_weak(cur, mine)) {
    }
  });
  return PyLong_FromLong(seen.load());
}

PyMethodDef methods[] = {
    {"with_cuda", with_cuda, METH_NOARGS, "True when the CUDA kernels were compiled in."},
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The CPU instruction set ATen (and so pyattn's CPU kernels) uses: DEFAULT, AVX2, AVX512."},
    {"parallel_threads", parallel_threads, METH_NOARGS,
     "How many threads pyattn's CPU kernels run on (torch.get_num_threads() when built right)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "pyattn's compiled operators", -1, methods};

}  // namespace

// Importing pyattn._C loads this library, which runs the TORCH_LIBRARY registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&module);
}
