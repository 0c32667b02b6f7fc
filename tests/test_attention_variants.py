"""The attention variants of sdpa and varlen (sliding window, logit softcap, attention sinks,
ALiBi; docs/design.md, "Attention variants") against the float64 reference under the test rule:
each alone and combined, both causal alignments and none, Lq != Lk, odd sizes, GQA, several key
blocks (so the skipped blocks of the window are exercised), varlen with empty sequences, every
dtype of the cpu backend, gradients incl. the sinks'; the backends that do not fuse them refuse
them; bad input gets the InputError family."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_to_ref, assert_grads_close, f32_accumulation_baseline
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention.bias import causal_lower_right

import pyattn
from pyattn import _backend, reference
from pyattn.ops.errors import InputError, InputTypeError

HALF = (torch.float16, torch.bfloat16)


def _inputs(dtype, B, Hq, Hkv, Lq, Lk, D, grad=True):
    q = torch.randn(B, Hq, Lq, D, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, D, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _variants(Hq, B, window, softcap, sinks, alibi, sink_scale=2.0):
    kw = {"window_size": window, "softcap": softcap}
    if sinks:
        kw["sinks"] = (torch.randn(Hq) * sink_scale).requires_grad_(True)
    if alibi == "head":
        kw["alibi_slopes"] = torch.rand(Hq) * 0.5
    elif alibi == "batch":
        kw["alibi_slopes"] = torch.rand(B, Hq) * 0.5
    return kw


def _call(fn, q, k, v, causal, kw, **extra):
    mask = None
    is_causal = causal == "upper"
    if causal == "lower":
        mask = causal_lower_right(q.shape[-2], k.shape[-2])
    gqa = q.shape[1] != k.shape[1]
    return fn(q, k, v, mask, 0.0, is_causal, None, gqa, **kw, **extra)


def _ref(q, k, v, causal, kw):
    """The reference; a lower-right CausalBias goes in as causal code 2."""
    gqa = q.shape[1] != k.shape[1]
    code = {"none": 0, "upper": 1, "lower": 2}[causal]
    return reference.scaled_dot_product_attention(q, k, v, None, 0.0, code, None, gqa, **kw)


def _check(dtype, B, Hq, Hkv, Lq, Lk, D, causal, window, softcap, sinks, alibi, grads=True, sink_scale=2.0):
    q, k, v = _inputs(dtype, B, Hq, Hkv, Lq, Lk, D, grads)
    kw = _variants(Hq, B, window, softcap, sinks, alibi, sink_scale)
    out = _call(pyattn.scaled_dot_product_attention, q, k, v, causal, kw, backend="cpu")
    leaves = [q, k, v] + ([kw["sinks"]] if sinks else [])
    names = ["query", "key", "value"] + (["sinks"] if sinks else [])
    do = torch.randn_like(out)
    kw64 = {n: (t.detach().double().requires_grad_(n == "sinks") if isinstance(t, torch.Tensor) else t)
            for n, t in kw.items()}  # fmt: skip
    up64 = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    ref64 = _ref(*up64, causal, kw64)
    leaves64 = up64 + ([kw64["sinks"]] if sinks else [])

    if dtype in HALF:
        # the half rule: against the reference evaluated in float32 and rounded once
        def fn(qq, kk, vv):
            return _ref(qq, kk, vv, causal, kw)

        ref_lowp, g_lowp = f32_accumulation_baseline(fn, [q, k, v], grad_out=do if grads else None)
        assert_close_to_ref("out", out, ref_lowp, ref64)
        if grads:
            g = torch.autograd.grad(out, [q, k, v], do)
            g64 = torch.autograd.grad(ref64, up64, do.double())
            assert_grads_close(names[:3], g, g_lowp, g64)
        return
    kwl = {
        n: (t.detach().requires_grad_(n == "sinks") if isinstance(t, torch.Tensor) else t)
        for n, t in kw.items()
    }
    ql, kl, vl = (t.detach().requires_grad_(grads) for t in (q, k, v))
    ref_lowp = _ref(ql, kl, vl, causal, kwl)
    assert_close_to_ref("out", out, ref_lowp, ref64)
    if grads:
        g = torch.autograd.grad(out, leaves, do)
        gl = torch.autograd.grad(ref_lowp, [ql, kl, vl] + ([kwl["sinks"]] if sinks else []), do)
        g64 = torch.autograd.grad(ref64, leaves64, do.double())
        assert_grads_close(names, g, gl, g64)


COMBOS = [
    # window, softcap, sinks, alibi
    ((16, -1), 0.0, False, None),
    ((5, 7), 0.0, False, None),
    ((0, 0), 0.0, False, None),
    ((-1, 3), 0.0, False, None),
    ((-1, -1), 3.0, False, None),
    ((-1, -1), 0.0, True, None),
    ((-1, -1), 0.0, False, "head"),
    ((-1, -1), 0.0, False, "batch"),
    ((20, 0), 5.0, True, "head"),
]


@pytest.mark.parametrize("causal", ["none", "upper", "lower"])
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: str(c))
def test_variants_fp32(combo, causal):
    window, softcap, sinks, alibi = combo
    _check(torch.float32, 2, 4, 2, 37, 53, 24, causal, window, softcap, sinks, alibi)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", ["upper", "lower"])
def test_variants_dtypes(dtype, causal):
    _check(dtype, 1, 4, 1, 45, 45, 16, causal, (9, 2), 4.0, True, "head")


@pytest.mark.parametrize(
    "Lq,Lk,causal,window",
    [(700, 700, "upper", (100, 0)), (300, 1100, "none", (130, 60)), (1100, 300, "lower", (40, -1))],
)
def test_window_skips_blocks(Lq, Lk, causal, window):
    """Several forward (512) and backward (256) key blocks: the band's block bounds, the skipped
    blocks and the per-element masking of the blocks it cuts."""
    _check(torch.float32, 1, 2, 1, Lq, Lk, 16, causal, window, 0.0, True, None)


def test_sink_only_row_gives_zeros():
    """A row whose keys are all masked has only its sink: zeros, zero gradients."""
    q, k, v = _inputs(torch.float32, 1, 2, 2, 6, 9, 8)
    mask = torch.ones(6, 9, dtype=torch.bool)
    mask[2] = False
    sinks = torch.tensor([0.5, -1.0], requires_grad=True)
    out = pyattn.scaled_dot_product_attention(q, k, v, mask, sinks=sinks, backend="cpu")
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    ref = reference.scaled_dot_product_attention(q, k, v, mask, sinks=sinks)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))
    # a window that leaves some rows no key at all (Lq > Lk, lower-right)
    _check(torch.float32, 1, 2, 2, 12, 4, 8, "lower", (1, -1), 0.0, True, None)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    Lq=st.integers(1, 40),
    Lk=st.integers(1, 40),
    left=st.integers(-1, 45),
    right=st.integers(-1, 45),
    softcap=st.sampled_from([0.0, 0.5, 2.0, 30.0]),
    sink=st.sampled_from([None, -1e4, -3.0, 0.0, 4.0, 60.0]),
    alibi=st.sampled_from([None, "head", "batch"]),
    causal=st.sampled_from(["none", "upper", "lower"]),
)
def test_variants_hypothesis(Lq, Lk, left, right, softcap, sink, alibi, causal):
    q, k, v = _inputs(torch.float32, 2, 2, 2, Lq, Lk, 8, grad=True)
    kw = _variants(2, 2, (left, right), softcap, False, alibi)
    if sink is not None:
        kw["sinks"] = torch.tensor([sink, sink / 2], requires_grad=True)
    out = _call(pyattn.scaled_dot_product_attention, q, k, v, causal, kw, backend="cpu")
    kw64 = {n: (t.detach().double().requires_grad_(n == "sinks") if isinstance(t, torch.Tensor) else t)
            for n, t in kw.items()}  # fmt: skip
    up64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref64 = _ref(*up64, causal, kw64)
    ref32 = _ref(
        *(t.detach() for t in (q, k, v)),
        causal,
        {n: (t.detach() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()},
    )
    assert_close_to_ref("out", out, ref32, ref64)
    do = torch.randn_like(out)
    leaves = [q, k, v] + ([kw["sinks"]] if sink is not None else [])
    leaves64 = up64 + ([kw64["sinks"]] if sink is not None else [])
    g = torch.autograd.grad(out, leaves, do)
    g64 = torch.autograd.grad(ref64, leaves64, do.double())
    for name, a, b in zip(["q", "k", "v", "sinks"], g, g64, strict=False):
        # float32 against float64: a few ulp of the gradients' size (scores up to softcap/ALiBi)
        tol = 2e-5 * max(1.0, b.abs().max().item())
        assert (a.double() - b).abs().max().item() <= tol, f"grad {name}"


def _packed(lens_q, lens_k, Hq, Hkv, D, dtype=torch.float32):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), Hq, D, dtype=dtype, requires_grad=True)
    k = torch.randn(int(cu_k[-1]), Hkv, D, dtype=dtype, requires_grad=True)
    v = torch.randn(int(cu_k[-1]), Hkv, D, dtype=dtype, requires_grad=True)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_variants(is_causal, dtype):
    lens_q, lens_k = [5, 0, 70, 1, 33], [9, 4, 70, 0, 20]
    Hq, Hkv = 4, 2
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, Hq, Hkv, 16, dtype)
    sinks = torch.randn(Hq, requires_grad=True)
    kw = {"window_size": (11, 3), "softcap": 6.0, "sinks": sinks, "alibi_slopes": torch.rand(len(lens_q), Hq)}
    out = pyattn.varlen_attention(
        q, k, v, cu_q, cu_k, is_causal=is_causal, enable_gqa=True, backend="cpu", **kw
    )
    do = torch.randn_like(out)
    up = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    s64 = sinks.detach().double().requires_grad_(True)
    kw64 = {**kw, "sinks": s64, "alibi_slopes": kw["alibi_slopes"].double()}
    ref64 = reference.varlen_attention(*up, cu_q, cu_k, is_causal=is_causal, enable_gqa=True, **kw64)
    g64 = torch.autograd.grad(ref64, up + [s64], do.double())
    if dtype in HALF:

        def fn(qq, kk, vv):
            return reference.varlen_attention(
                qq, kk, vv, cu_q, cu_k, is_causal=is_causal, enable_gqa=True, **kw
            )

        ref_lowp, g_lowp = f32_accumulation_baseline(fn, [q, k, v], grad_out=do)
        assert_close_to_ref("out", out, ref_lowp, ref64)
        g = torch.autograd.grad(out, [q, k, v], do)
        assert_grads_close(["query", "key", "value"], g, g_lowp, g64[:3])
        return
    sl = sinks.detach().requires_grad_(True)
    ql, kl, vl = (t.detach().requires_grad_(True) for t in (q, k, v))
    ref32 = reference.varlen_attention(
        ql, kl, vl, cu_q, cu_k, is_causal=is_causal, enable_gqa=True, **{**kw, "sinks": sl}
    )
    assert_close_to_ref("out", out, ref32, ref64)
    g = torch.autograd.grad(out, [q, k, v, sinks], do)
    gl = torch.autograd.grad(ref32, [ql, kl, vl, sl], do)
    assert_grads_close(["query", "key", "value", "sinks"], g, gl, g64)


def test_gradcheck_float64():
    q, k, v = _inputs(torch.float64, 1, 2, 1, 7, 11, 4)
    sinks = torch.randn(2, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(2, dtype=torch.float64)

    def f(q, k, v, sinks):
        return pyattn.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True, window_size=(4, 0), softcap=2.0, sinks=sinks,
            alibi_slopes=slopes, backend="cpu",
        )  # fmt: skip

    assert torch.autograd.gradcheck(f, (q, k, v, sinks))


def test_opcheck():
    q, k, v = _inputs(torch.float32, 1, 4, 2, 9, 13, 8, grad=False)
    sinks, slopes = torch.randn(4), torch.rand(1, 4)
    args = (q, k, v, None, 0.0, 2, 0.3, 0, 0, 3, 1, 5.0, sinks, slopes)
    torch.library.opcheck(torch.ops.pyattn.sdpa_fwd, args)
    out, lse = torch.ops.pyattn.sdpa_fwd(*args)
    bwd = (torch.randn_like(out), q, k, v, None, out, lse, 0.0, 2, 0.3, 0, 0, 3, 1, 5.0, slopes)
    torch.library.opcheck(torch.ops.pyattn.sdpa_bwd, bwd)


def test_compile_fullgraph():
    q, k, v = _inputs(torch.float32, 1, 2, 2, 16, 16, 8, grad=False)
    sinks = torch.randn(2)

    def f(q, k, v):
        return pyattn.scaled_dot_product_attention(
            q, k, v, is_causal=True, window_size=(3, 0), softcap=4.0, sinks=sinks, backend="cpu"
        )

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v))


def test_backends_without_variants_refuse(monkeypatch):
    """Triton and CUDA do not fuse the variants yet: asked for by name they refuse with an
    InputError; backend=None on their device falls back to the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    if _backend.have_triton():
        with pytest.raises(InputError, match="attention variants"):
            _backend.resolve("sdpa", "triton", cpu, torch.float32, (8, 8), variants=True)
        assert _backend.resolve("sdpa", "triton", cpu, torch.float32, (8, 8)) == "triton"
    cuda = torch.device("cuda")
    for op in ("sdpa", "varlen_attention"):
        assert _backend.resolve(op, None, cuda, torch.float16, (64, 64), variants=True) == "reference"
        assert _backend.resolve(op, None, cpu, torch.float32, (64, 64), variants=True) == "cpu"
    # kvcache's GPU kernels fuse them
    if _backend.have_triton():
        assert (
            _backend.resolve("kvcache_attention", None, cuda, torch.float16, (64, 64), variants=True)
            != "reference"
        )


@pytest.mark.parametrize(
    "kw,cls,match",
    [
        ({"window_size": (-2, 0)}, InputError, "window_size"),
        ({"window_size": (1.5, 2)}, InputTypeError, "window_size"),
        ({"window_size": 4}, InputTypeError, "window_size"),
        ({"softcap": -1.0}, InputError, "softcap"),
        ({"softcap": float("nan")}, InputError, "softcap"),
        ({"softcap": float("inf")}, InputError, "softcap"),
        ({"softcap": "2"}, InputTypeError, "softcap"),
        ({"sinks": torch.zeros(3)}, InputError, "sinks"),
        ({"sinks": torch.zeros(4, dtype=torch.int64)}, InputTypeError, "sinks"),
        ({"sinks": torch.zeros(4, device="meta")}, InputError, "sinks"),
        ({"alibi_slopes": torch.zeros(4, device="meta")}, InputError, "alibi_slopes"),
        ({"alibi_slopes": torch.zeros(3, 4)}, InputError, "alibi_slopes"),
        ({"alibi_slopes": torch.zeros(4, requires_grad=True)}, InputError, "alibi_slopes"),
    ],
)
def test_bad_variants(kw, cls, match):
    q, k, v = _inputs(torch.float32, 2, 4, 4, 5, 5, 8, grad=False)
    with pytest.raises(cls, match=match):
        pyattn.scaled_dot_product_attention(q, k, v, **kw)
    qp, kp, vp, cu_q, cu_k = _packed([2, 3], [2, 3], 4, 4, 8)
    with pytest.raises(cls, match=match):
        pyattn.varlen_attention(qp, kp, vp, cu_q, cu_k, **kw)


@pytest.mark.parametrize("causal", ["none", "lower"])
def test_decode_step_route(causal):
    """A short query over a long key runs the KV-cache kernel (pyattn/ops/sdpa.py _decode_step),
    which takes the variants too: the lower-right window diagonal, softcap, sinks, ALiBi."""
    q, k, v = _inputs(torch.float32, 2, 8, 2, 1, 300, 16, grad=False)
    kw = _variants(8, 2, (40, 3), 3.0, True, "batch")
    kw["sinks"] = kw["sinks"].detach()
    with torch.no_grad():
        out = _call(pyattn.scaled_dot_product_attention, q, k, v, causal, kw, backend="cpu")
    ref64 = _ref(
        q.double(),
        k.double(),
        v.double(),
        causal,
        {n: (t.double() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()},
    )
    assert_close_to_ref("out", out, _ref(q, k, v, causal, kw), ref64)
