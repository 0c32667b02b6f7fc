"""The cpu backend's half-precision block-product paths (csrc/cpu/blas.cpp; docs/design.md,
"Half precision on CPU"), each forced with PYATTN_CPU_HALF_GEMM so that every path this machine
can run is tested here, whichever one `auto` picks:

- ``widen``: blocks converted to float32, float32 GEMMs (every CPU);
- ``mkl``: MKL's bfloat16 GEMM with float32 products (CPUs with AVX512-BF16);
- ``amx``: oneDNN's AMX micro-kernel through torch's cpublas::brgemm (AMX-BF16 / AMX-FP16).

Each case runs test_half_cpu's rule (float64 reference, 2x / 3x the float32-accumulation
baseline, no worse than torch's CPU sdpa) on shapes that reach the paths' edge cases: odd head
dims and key counts (the AMX path pads k to even), tails of key and query blocks, GQA, masks,
causal, dropout; and varlen, which runs the same kernels.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_to_ref, assert_grads_close, f32_accumulation_baseline
from test_half_cpu import run_sdpa_case

import pyattn
from pyattn import info, reference

PATHS = ["widen", "mkl", "amx"]
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


# The (path, dtype) pairs this CPU runs, decided at collection: the tests below exist for each of
# them and for no other (the native half paths need the CPU's instructions; the others are not
# collected here rather than skipped).
AVAILABLE = [
    pytest.param(path, p.values[0], id=f"{path}-{p.id}")
    for path in PATHS
    for p in DTYPES
    if info.half_gemm_available(path, p.values[0])
]
# for the tests that take the half_path fixture: the path goes to it, the dtype to the test
EACH_PATH = pytest.mark.parametrize("half_path, dtype", AVAILABLE, indirect=["half_path"])


@pytest.fixture
def half_path(request, monkeypatch):
    """Forces the test's path (one of AVAILABLE's, so this CPU has it)."""
    path = request.param
    dtype = request.node.callspec.params["dtype"]
    monkeypatch.setenv("PYATTN_CPU_HALF_GEMM", path)
    assert info.half_gemm_path(dtype) == path
    return path


SHAPES = [
    # B, Hq, Hkv, Lq, Lk, D, Dv
    (2, 4, 2, 97, 130, 64, 64),  # GQA, key and query block tails
    (1, 2, 2, 300, 601, 59, 59),  # odd head dim and key count, a 256-query block
    (1, 3, 1, 1, 37, 128, 128),  # one query, MQA, D = 128 (two AMX strips)
    (1, 2, 2, 1025, 1025, 128, 128),  # several forward / backward key blocks, D = 128
    (2, 2, 1, 50, 97, 59, 24),  # Dv != D: every path runs widened there (torch: float32)
    # 8 (batch, kv head) units of short rows: the AMX forward packs per task (4 units per thread
    # or more, at up to 2 threads, each under 256 KiB packed); the shapes above pack once per call
    (4, 4, 2, 200, 300, 64, 64),
    # head dims of three 32-wide k steps (D = 96), one (D = 32) with a key count short of a
    # 16-key tile, and D = 80; S's and P's padded row strides under each
    (1, 2, 2, 70, 333, 96, 96),
    (2, 2, 1, 33, 47, 32, 32),
    (1, 2, 2, 64, 100, 80, 80),
]


@EACH_PATH
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sdpa_each_path(half_path, dtype, shape):
    run_sdpa_case(dtype, *shape)


@EACH_PATH
@pytest.mark.parametrize("mask_kind", ["bool", "add_f32"])
@pytest.mark.parametrize("causal", [0, 2], ids=["full", "lower_right"])
def test_sdpa_each_path_masks_and_causal(half_path, dtype, mask_kind, causal):
    run_sdpa_case(dtype, 2, 2, 2, 70, 133, 64, 64, mask_kind=mask_kind if causal == 0 else None,
                  causal=causal)  # fmt: skip


@EACH_PATH
def test_sdpa_each_path_fully_masked_rows(half_path, dtype):
    out, grads = run_sdpa_case(dtype, 2, 2, 2, 40, 30, 32, 32, mask_kind="bool", full_row=True,
                               against_torch=False)  # fmt: skip
    assert (out[0, :, 0] == 0).all()
    assert (grads[0][0, :, 0] == 0).all()


@EACH_PATH
def test_dropout_draws_the_same_on_every_path(half_path, dtype, monkeypatch):
    # Every path draws the same philox counters: the dropped weights agree with the widened path
    # (zeros of the output's contribution are where they are), so the outputs differ by the
    # block products' rounding only.
    q, k, v = (torch.randn(1, 2, 50, 64).to(dtype) for _ in range(3))
    torch.manual_seed(0)
    out = pyattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend="cpu")
    monkeypatch.setenv("PYATTN_CPU_HALF_GEMM", "widen")
    torch.manual_seed(0)
    want = pyattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend="cpu")
    torch.testing.assert_close(out, want, rtol=3e-2, atol=3e-2)


@EACH_PATH
def test_varlen_each_path_is_sdpa_per_sequence(half_path, dtype):
    lens = [37, 0, 130, 1, 64]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    ins = [torch.randn(sum(lens), 4, 64).to(dtype).requires_grad_() for _ in range(3)]
    out = pyattn.varlen_attention(*ins, cu, cu, is_causal=True, backend="cpu")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, ins, g)
    for b in range(len(lens)):
        s, e = int(cu[b]), int(cu[b + 1])
        if e == s:
            continue
        seq = [t.detach()[s:e].transpose(0, 1).unsqueeze(0).requires_grad_() for t in ins]
        ref = pyattn.scaled_dot_product_attention(*seq, is_causal=True, backend="cpu")
        torch.testing.assert_close(out[s:e], ref[0].transpose(0, 1), rtol=0, atol=0)
        ref_g = torch.autograd.grad(ref, seq, g[s:e].transpose(0, 1).unsqueeze(0))
        for got, want in zip(grads, ref_g, strict=True):
            torch.testing.assert_close(got[s:e], want[0].transpose(0, 1), rtol=2e-2, atol=2e-3)


def test_unknown_or_unavailable_path_is_an_error(monkeypatch):
    q = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    monkeypatch.setenv("PYATTN_CPU_HALF_GEMM", "fastest")
    assert info.half_gemm_path(torch.bfloat16).startswith("error: ")
    with pytest.raises(RuntimeError, match="PYATTN_CPU_HALF_GEMM"):
        pyattn.scaled_dot_product_attention(q, q, q, backend="cpu")
    # float16 never has the MKL path (MKL's float16 GEMM is no faster than sgemm)
    monkeypatch.setenv("PYATTN_CPU_HALF_GEMM", "mkl")
    assert not info.half_gemm_available("mkl", torch.float16)
    with pytest.raises(RuntimeError, match="not available"):
        pyattn.scaled_dot_product_attention(q.half(), q.half(), q.half(), backend="cpu")


def test_auto_picks_an_available_path(monkeypatch):
    monkeypatch.delenv("PYATTN_CPU_HALF_GEMM", raising=False)
    for dtype in (torch.bfloat16, torch.float16):
        path = info.half_gemm_path(dtype)
        assert path in PATHS and info.half_gemm_available(path, dtype)
    # the native bfloat16 path wherever MKL's needs (AVX512-BF16) are met
    if "avx512_bf16" in info._cpu_flags():
        assert info.half_gemm_path(torch.bfloat16) != "widen"
    # the bfloat16 forward packs K and V for AMX wherever oneDNN offers it; the backward keeps MKL
    if info.half_gemm_available("amx", torch.bfloat16):
        assert info.half_gemm_path(torch.bfloat16, forward=True) == "amx"
        assert info.half_gemm_path(torch.bfloat16) == "mkl"
    assert "bfloat16: " in info.half_cpu_paths("AVX512")


def _jumping_scores(dtype, Lq, Lk, D, jumps):
    """q, k, v whose scores rise by about ``rise`` (natural-log units, after the softmax scale)
    at key ``start`` for each (start, rise) in jumps: a later key block far above the first one
    the rows see, which makes the forward (native half paths and float32) move its reference mid-row
    (softmax_row_lazy; a rise under kLazyMargin = 8 keeps the old reference)."""
    q = torch.randn(1, 2, Lq, D) / 2
    q[..., 0] = 1.0  # every query has a unit component along the first axis
    k = torch.randn(1, 2, Lk, D)
    for start, rise in jumps:
        k[:, :, start:, 0] += rise * D**0.5  # `rise` more score after the 1 / sqrt(D) scale
    v = torch.randn(1, 2, Lk, D)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


# float32 takes the same lazy pass (its weights in float32, csrc/cpu/sdpa_kernel.cpp
# forward_block) on every CPU: no half path to force there
@pytest.mark.parametrize("path, dtype", [*AVAILABLE, pytest.param(None, torch.float32, id="fp32")])
@pytest.mark.parametrize(
    "jumps, causal, window",
    [
        ([(600, 12.0)], False, (-1, -1)),  # past kLazyMargin in the second key block: a redo
        ([(600, 5.0), (1100, 6.0)], False, (-1, -1)),  # under it twice: the old reference holds
        ([(600, 30.0)], True, (-1, -1)),  # causal: the rows past 600 redo on their diagonal block
        ([(700, 20.0)], False, (400, 0)),  # sliding window: rows' runs start mid-block
        ([(600, 100.0)], False, (-1, -1)),  # e^100 overflows float32: only a redo gets it right
        # within a row's first key block, past the first 64 keys its starting reference comes from
        ([(100, 100.0)], False, (-1, -1)),
    ],
    ids=["redo", "keep", "causal", "window", "overflow", "first_block"],
)
def test_forward_reference_moves_with_later_blocks(path, dtype, jumps, causal, window, monkeypatch):
    if path is not None:
        monkeypatch.setenv("PYATTN_CPU_HALF_GEMM", path)
    q, k, v = _jumping_scores(dtype, 700, 1300, 64, jumps)
    kw = dict(is_causal=causal, window_size=window)
    out = pyattn.scaled_dot_product_attention(q, k, v, backend="cpu", **kw)
    g = torch.randn(out.shape)
    # The value gradient P^T dO reads P recomputed from the forward's lse, which checks the lse
    # the moved reference leaves. dQ and dK are not compared: the keys' large shared component
    # (rise * sqrt(D) along one axis) cancels in them (the rows of dS sum to 0), so any kernel
    # that rounds dS, torch's among them, is off there by far more than the float32 baseline.
    (grad_v,) = torch.autograd.grad(out, (v,), g.to(dtype))

    def ref(q, k, v):
        return reference.scaled_dot_product_attention(q, k, v, **kw)

    ins64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = ref(*ins64)
    (grad_v64,) = torch.autograd.grad(out64, (ins64[2],), g.double())
    base, base_grads = f32_accumulation_baseline(ref, [q, k, v], grad_out=g)
    assert torch.isfinite(out).all()
    assert_close_to_ref("out", out, base, out64)
    assert_grads_close(["value"], [grad_v], base_grads[2:], [grad_v64])
