"""The cpu backend's float32 block-product paths (csrc/cpu/blas.cpp; docs/design.md, "float32 on
oneDNN's brgemm"), each forced with PYATTN_CPU_F32_GEMM so that every path this machine can run is
tested here, whichever one `auto` picks:

- ``blas``: MKL's sgemm through ATen (every CPU);
- ``brgemm``: oneDNN's JIT brgemm through torch's cpublas::brgemm, the keys transposed and
  scaled once per task in the forward, each key block's K^T and V^T once in the backward, whose
  dK and dV accumulate transposed (CPUs with AVX2 and FMA, oneDNN enabled).

Each case runs test_sdpa's rule (float64 reference, 2x / 3x the float32 reference's error) on
shapes that reach the brgemm forward's edges: odd head dims and key counts (K^T's padded row
stride), key and query block tails, GQA and MQA (a task's run of query blocks crosses units),
masks, the attention variants, non-contiguous inputs, varlen's packed rows, and keys too long for
the thread's kept scratch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import assert_close_to_ref
from test_half_cpu import run_sdpa_case
from test_sdpa import run_case

import pyattn
from pyattn import info, reference

AVAILABLE = [p for p in info.F32_GEMM_PATHS if info.f32_gemm_available(p)]


@pytest.fixture(params=AVAILABLE)
def f32_path(request, monkeypatch):
    """Forces one of the float32 paths this machine runs."""
    monkeypatch.setenv("PYATTN_CPU_F32_GEMM", request.param)
    assert info.f32_gemm_path() == request.param
    return request.param


SHAPES = [
    # B, Hq, Hkv, Lq, Lk, D, Dv
    (2, 4, 2, 97, 130, 64, 64),  # GQA, key and query block tails
    (1, 2, 2, 300, 601, 59, 59),  # odd head dim and key count: K^T's row stride padded
    (1, 3, 1, 1, 37, 128, 128),  # one query, MQA
    (1, 2, 2, 1025, 1100, 128, 128),  # several key blocks, 256-query blocks and their tail
    (2, 2, 1, 50, 97, 59, 24),  # Dv != D
    (3, 4, 1, 20, 1, 16, 8),  # one key
    (1, 2, 2, 33, 47, 1, 3),  # D = 1
    # one (batch, kv head) on two threads: the backward splits into key-block tasks (dK, dV) and
    # query-block tasks (dQ, on MKL's path either way)
    (1, 1, 1, 600, 900, 40, 40),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sdpa_each_f32_path(f32_path, shape):
    run_case("cpu", "cpu", torch.float32, *shape)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_each_f32_path_masks_and_causal(f32_path, mask_kind, causal):
    run_case("cpu", "cpu", torch.float32, 2, 2, 2, 70, 133, 64, 64,
             mask_kind=mask_kind if not causal else None, causal=causal)  # fmt: skip


def test_sdpa_each_f32_path_non_contiguous_and_scale(f32_path):
    # rows of q, k, v a head apart (strided rows into the products) and a scale that is not a
    # power of two (it goes into the transposed keys, rounded once)
    run_case("cpu", "cpu", torch.float32, 2, 4, 2, 130, 77, 48, 48, contiguous=False, scale=0.3)


@pytest.mark.parametrize(
    "kw",
    [
        dict(window_size=(40, 0)),
        dict(window_size=(20, 30), softcap=5.0),
        dict(is_causal=True, sinks=True),
        dict(alibi_slopes=True),
    ],
    ids=["window", "window_softcap", "causal_sinks", "alibi"],
)
def test_variants_each_f32_path(f32_path, kw):
    B, H, Lq, Lk, D = 2, 3, 90, 150, 40
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64) for L in (Lq, Lk, Lk))
    kw = dict(kw)
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(H, dtype=torch.float64)
    if kw.pop("alibi_slopes", False):
        kw["alibi_slopes"] = torch.rand(H, dtype=torch.float64)
    kw32 = {n: (t.float() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    out = pyattn.scaled_dot_product_attention(q.float(), k.float(), v.float(), backend="cpu", **kw32)
    out_l = reference.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw32)
    out64 = reference.scaled_dot_product_attention(q, k, v, **kw)
    assert_close_to_ref("out", out, out_l, out64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 97, 601, 59, 59), (1, 2, 2, 300, 1100, 64, 64)], ids=str)
def test_widened_half_forward_each_f32_path(f32_path, dtype, shape, monkeypatch):
    # half inputs on the widened path run float32 products: their forward takes the float32 path
    # too, the keys widened a block at a time into the transposed copy
    monkeypatch.setenv("PYATTN_CPU_HALF_GEMM", "widen")
    run_sdpa_case(dtype, *shape, causal=1)


def test_long_keys_past_the_kept_scratch(f32_path):
    # D x Lk float32 keys over 4 MiB: the brgemm forward transposes them into a block of the task's
    # own instead of the thread's kept scratch
    q = torch.randn(1, 2, 9, 256)
    k, v = torch.randn(1, 2, 4200, 256), torch.randn(1, 2, 4200, 256)
    out = pyattn.scaled_dot_product_attention(q, k, v, backend="cpu")
    ins64 = [t.double() for t in (q, k, v)]
    assert_close_to_ref(
        "out", out, reference.scaled_dot_product_attention(q, k, v),
        reference.scaled_dot_product_attention(*ins64),
    )  # fmt: skip


def test_varlen_each_f32_path_is_sdpa_per_sequence(f32_path):
    lens = [37, 0, 130, 1, 300]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lens), 4, 40) for _ in range(3))
    out = pyattn.varlen_attention(q, k, v, cu, cu, is_causal=True, backend="cpu")
    for b in range(len(lens)):
        s, e = int(cu[b]), int(cu[b + 1])
        if e == s:
            continue
        seq = [t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        ref = pyattn.scaled_dot_product_attention(*seq, is_causal=True, backend="cpu")
        torch.testing.assert_close(out[s:e], ref[0].transpose(0, 1), rtol=0, atol=0)


def test_paths_agree():
    if len(AVAILABLE) < 2:
        pytest.skip(f"one float32 path here ({AVAILABLE}): nothing to compare")
    q, k, v = (torch.randn(2, 4, 300, 64) for _ in range(3))
    outs = {}
    for path in AVAILABLE:
        os.environ["PYATTN_CPU_F32_GEMM"] = path
        try:
            outs[path] = pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu")
        finally:
            del os.environ["PYATTN_CPU_F32_GEMM"]
    torch.testing.assert_close(outs["brgemm"], outs["blas"], rtol=1e-5, atol=1e-5)


def test_unknown_path_is_an_error(monkeypatch):
    q = torch.randn(1, 1, 4, 8)
    monkeypatch.setenv("PYATTN_CPU_F32_GEMM", "fastest")
    assert info.f32_gemm_path().startswith("error: ")
    with pytest.raises(RuntimeError, match="PYATTN_CPU_F32_GEMM"):
        pyattn.scaled_dot_product_attention(q, q, q, backend="cpu")


def test_auto_follows_onednn(monkeypatch):
    monkeypatch.delenv("PYATTN_CPU_F32_GEMM", raising=False)
    flags = info._cpu_flags()
    want = "brgemm" if {"avx2", "fma"} <= flags else "blas"
    assert info.f32_gemm_path() == want
    # the backward takes it up to head dim 64 (measured slower than MKL's at 128)
    assert info.f32_gemm_path(False, 64) == want
    assert info.f32_gemm_path(False, 65) == "blas"
    monkeypatch.setenv("PYATTN_CPU_F32_GEMM", "brgemm" if want == "brgemm" else "blas")
    assert info.f32_gemm_path(False, 128) == want  # forced: both directions, every head dim
    monkeypatch.delenv("PYATTN_CPU_F32_GEMM")
    # with oneDNN switched off in torch the forward keeps MKL's path, and brgemm is refused
    # (the flags' context also sets oneDNN's TF32 switch, which warns on a torch without XPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with torch.backends.mkldnn.flags(enabled=False):
            assert info.f32_gemm_path() == "blas"
            assert not info.f32_gemm_available("brgemm")
            q = torch.randn(1, 2, 40, 16)
            out = pyattn.scaled_dot_product_attention(q, q, q, backend="cpu")
            torch.testing.assert_close(out, reference.scaled_dot_product_attention(q, q, q))
    assert info.f32_gemm_path() == want


def test_onednn_capped_below_avx2_keeps_blas():
    # oneDNN capped under AVX2 (its float32 brgemm's least ISA): auto keeps MKL's path and a forced
    # brgemm is an error naming the variable
    code = (
        "import os, torch, pyattn\n"
        "from pyattn import info\n"
        "assert info.f32_gemm_path() == 'blas', info.f32_gemm_path()\n"
        "os.environ['PYATTN_CPU_F32_GEMM'] = 'brgemm'\n"
        "assert info.f32_gemm_path().startswith('error: PYATTN_CPU_F32_GEMM=brgemm'), info.f32_gemm_path()\n"
        "q = torch.randn(1, 1, 4, 8)\n"
        "try:\n"
        "    pyattn.scaled_dot_product_attention(q, q, q, backend='cpu')\n"
        "except RuntimeError as e:\n"
        "    assert 'not available' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX"}
    env.pop("PYATTN_CPU_F32_GEMM", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
