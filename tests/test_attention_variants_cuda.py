"""The CUDA backend's attention variants (sliding window, logit softcap, attention sinks, ALiBi;
docs/design.md, "Attention variants") against the float64 reference under the test rule, on a GPU
(every test here is marked gpu and skips without one): sdpa and varlen, forward and backward
(the sinks' gradient too), float16 / bfloat16 / float32, each variant alone and combined, both
causal alignments and none, Lq != Lk, an odd head dim, GQA, windows that skip whole key blocks
of the flash kernels (csrc/cuda/flash.cuh), rows left only their sink. The cpu and triton
backends' twin of these checks is tests/test_attention_variants.py, whose variant arguments
(`_variants`) these tests share."""

from __future__ import annotations

import pytest
import torch
from helpers import GPU, assert_close_to_ref, assert_grads_close, f32_accumulation_baseline
from test_attention_variants import _variants
from torch.nn.attention.bias import causal_lower_right

import pyattn
from pyattn import reference

pytestmark = GPU

DEV = "cuda"
HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _r(*shape, dtype, grad=True):
    return torch.randn(*shape, device=DEV, dtype=dtype).requires_grad_(grad)


def _sdpa(fn, q, k, v, causal, kw, **extra):
    mask = causal_lower_right(q.shape[-2], k.shape[-2]) if causal == "lower" else None
    gqa = q.shape[1] != k.shape[1]
    return fn(q, k, v, mask, 0.0, causal == "upper", None, gqa, **kw, **extra)


def _ref(q, k, v, causal, kw):
    gqa = q.shape[1] != k.shape[1]
    code = {"none": 0, "upper": 1, "lower": 2}[causal]
    return reference.scaled_dot_product_attention(q, k, v, None, 0.0, code, None, gqa, **kw)


def _as(kw, dtype=None):
    """The variants' tensors detached (and cast), the sinks a fresh leaf."""
    out = {}
    for n, t in kw.items():
        if isinstance(t, torch.Tensor):
            t = t.detach().to(dtype or t.dtype).requires_grad_(n == "sinks")
        out[n] = t
    return out


def _check(dtype, B, Hq, Hkv, Lq, Lk, D, causal, window, softcap, sinks, alibi):
    q, k, v = _r(B, Hq, Lq, D, dtype=dtype), _r(B, Hkv, Lk, D, dtype=dtype), _r(B, Hkv, Lk, D, dtype=dtype)
    kw = _variants(Hq, B, window, softcap, sinks, alibi, device=DEV)
    out = _sdpa(pyattn.scaled_dot_product_attention, q, k, v, causal, kw, backend="cuda")
    do = torch.randn_like(out)
    up64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    kw64 = _as(kw, torch.float64)
    ref64 = _ref(*up64, causal, kw64)
    if dtype in HALF:

        def fn(a, b, c):
            return _ref(a, b, c, causal, _as(kw))

        ref_lowp, g_lowp = f32_accumulation_baseline(fn, [q, k, v], grad_out=do)
        assert_close_to_ref("out", out, ref_lowp, ref64)
        g = torch.autograd.grad(out, [q, k, v], do)
        g64 = torch.autograd.grad(ref64, up64, do.double())
        assert_grads_close(["query", "key", "value"], g, g_lowp, g64)
        return
    kwl = _as(kw)
    low = [t.detach().requires_grad_(True) for t in (q, k, v)]
    ref_lowp = _ref(*low, causal, kwl)
    assert_close_to_ref("out", out, ref_lowp, ref64)
    names = ["query", "key", "value"] + (["sinks"] if sinks else [])
    extra = [kw["sinks"]] if sinks else []
    g = torch.autograd.grad(out, [q, k, v, *extra], do)
    gl = torch.autograd.grad(ref_lowp, low + ([kwl["sinks"]] if sinks else []), do)
    g64 = torch.autograd.grad(ref64, up64 + ([kw64["sinks"]] if sinks else []), do.double())
    assert_grads_close(names, g, gl, g64)


COMBOS = [
    # window, softcap, sinks, alibi
    ((40, -1), 0.0, False, None),
    ((17, 23), 0.0, False, None),
    ((-1, 5), 0.0, False, None),
    ((-1, -1), 5.0, False, None),
    ((-1, -1), 0.0, True, None),
    ((-1, -1), 0.0, False, "batch"),
    ((50, 0), 4.0, True, "head"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", ["none", "upper", "lower"])
@pytest.mark.parametrize("combo", COMBOS, ids=str)
def test_sdpa_variants(combo, causal, dtype):
    window, softcap, sinks, alibi = combo
    # several key blocks of every kernel (BN 16..64), Lq != Lk, an odd head dim, GQA 2
    _check(dtype, 2, 4, 2, 150, 213, 59, causal, window, softcap, sinks, alibi)


@pytest.mark.parametrize(
    "Lq,Lk,causal,window",
    [(700, 700, "upper", (100, 0)), (300, 1100, "none", (130, 60)), (1100, 300, "lower", (40, -1))],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_window_skips_blocks(Lq, Lk, causal, window, dtype):
    """Long rows with a narrow band: the per-block key and query ranges, the blocks never
    visited and the elements masked in the ones the band cuts (D = 128)."""
    _check(dtype, 1, 2, 1, Lq, Lk, 128, causal, window, 0.0, True, "head")


def test_sink_only_rows_give_zeros():
    """A row whose keys are all masked keeps only its sink: zeros, zero gradients; a window
    leaving rows no key at all (Lq > Lk, lower-right) likewise."""
    f32 = torch.float32
    q, k, v = _r(1, 2, 6, 64, dtype=f32), _r(1, 2, 9, 64, dtype=f32), _r(1, 2, 9, 64, dtype=f32)
    mask = torch.ones(6, 9, dtype=torch.bool, device=DEV)
    mask[2] = False
    sinks = torch.tensor([0.5, -1.0], device=DEV, requires_grad=True)
    out = pyattn.scaled_dot_product_attention(q, k, v, mask, sinks=sinks, backend="cuda")
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    ref = reference.scaled_dot_product_attention(q, k, v, mask, sinks=sinks)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))
    _check(torch.float32, 1, 2, 2, 12, 4, 8, "lower", (1, -1), 0.0, True, None)


def _packed(lens_q, lens_k, Hq, Hkv, D, dtype):
    def cu(lens):
        return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)

    cu_q, cu_k = cu(lens_q), cu(lens_k)
    q = _r(sum(lens_q), Hq, D, dtype=dtype)
    k, v = _r(sum(lens_k), Hkv, D, dtype=dtype), _r(sum(lens_k), Hkv, D, dtype=dtype)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_variants(is_causal, dtype):
    """Each sequence its own band and ALiBi distances (Lq_b != Lk_b), (B, Hq) slopes, empty
    sequences and one with queries but no keys (its rows: the sink only)."""
    lens_q, lens_k = [5, 0, 130, 1, 33, 7], [9, 4, 170, 0, 20, 0]
    Hq, Hkv = 4, 2
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, Hq, Hkv, 40, dtype)
    sinks = torch.randn(Hq, device=DEV, requires_grad=True)
    slopes = torch.rand(len(lens_q), Hq, device=DEV)
    kw = {"window_size": (21, 3), "softcap": 6.0, "sinks": sinks, "alibi_slopes": slopes}
    out = pyattn.varlen_attention(
        q, k, v, cu_q, cu_k, is_causal=is_causal, enable_gqa=True, backend="cuda", **kw
    )
    do = torch.randn_like(out)
    up = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    kw64 = _as(kw, torch.float64)
    ref64 = reference.varlen_attention(*up, cu_q, cu_k, is_causal=is_causal, enable_gqa=True, **kw64)
    g64 = torch.autograd.grad(ref64, up + [kw64["sinks"]], do.double())

    def ref(qq, kk, vv, kwl):
        return reference.varlen_attention(qq, kk, vv, cu_q, cu_k, is_causal=is_causal, enable_gqa=True, **kwl)

    if dtype in HALF:
        ref_lowp, g_lowp = f32_accumulation_baseline(
            lambda a, b, c: ref(a, b, c, _as(kw)), [q, k, v], grad_out=do
        )
        assert_close_to_ref("out", out, ref_lowp, ref64)
        g = torch.autograd.grad(out, [q, k, v], do)
        assert_grads_close(["query", "key", "value"], g, g_lowp, g64[:3])
        return
    kwl = _as(kw)
    low = [t.detach().requires_grad_(True) for t in (q, k, v)]
    ref32 = ref(*low, kwl)
    assert_close_to_ref("out", out, ref32, ref64)
    g = torch.autograd.grad(out, [q, k, v, sinks], do)
    gl = torch.autograd.grad(ref32, low + [kwl["sinks"]], do)
    assert_grads_close(["query", "key", "value", "sinks"], g, gl, g64)


def test_the_cuda_backend_is_chosen_for_variants():
    """backend=None on CUDA tensors with a variant runs a GPU kernel that fuses it (the record's
    variant_ops), never the reference."""
    from pyattn import _backend

    for op in ("sdpa", "varlen_attention"):
        chosen = _backend.resolve(op, None, torch.device(DEV), torch.float16, (64, 64), variants=True)
        assert chosen != "reference", op
