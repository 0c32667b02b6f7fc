"""The attention variants of sdpa and varlen (sliding window, logit softcap, attention sinks,
ALiBi; docs/design.md, "Attention variants") against the float64 reference under the test rule:
each alone and combined, both causal alignments and none, Lq != Lk, odd sizes, GQA, several key
blocks (so the skipped blocks of the window are exercised), varlen with empty sequences, every
dtype of each backend, gradients incl. the sinks'; on every backend that fuses them (cpu, and
triton through the interpreter on CPU tensors here, with smaller shapes: it runs each program in
numpy); blocks outside the window are never visited (NaN planted there stays out); the backends
that do not fuse them refuse them; bad input gets the InputError family."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    HAS_CUDA,
    assert_close_to_ref,
    assert_grads_close,
    backend_params,
    f32_accumulation_baseline,
    toy_backend,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention.bias import causal_lower_right

import pyattn
from pyattn import _backend, reference
from pyattn.ops.errors import InputError, InputTypeError

HALF = (torch.float16, torch.bfloat16)

# the backends whose sdpa and varlen kernels fuse the variants (the others refuse them, tested below)
BACKENDS = [
    p
    for p in backend_params(cpu=True, triton=True, cuda=True)
    if _backend.fuses_variants(p.values[0], "sdpa")
]


def _small(backend: str) -> bool:
    """Triton's interpreter (no GPU) runs every program in numpy: smaller batches and heads."""
    return backend == "triton" and not HAS_CUDA


def _inputs(dtype, B, Hq, Hkv, Lq, Lk, D, grad=True, device="cpu"):
    q = torch.randn(B, Hq, Lq, D, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, Lk, D, dtype=dtype, device=device)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _variants(Hq, B, window, softcap, sinks, alibi, sink_scale=2.0, device="cpu"):
    kw = {"window_size": window, "softcap": softcap}
    if sinks:
        kw["sinks"] = (torch.randn(Hq, device=device) * sink_scale).requires_grad_(True)
    if alibi == "head":
        kw["alibi_slopes"] = torch.rand(Hq, device=device) * 0.5
    elif alibi == "batch":
        kw["alibi_slopes"] = torch.rand(B, Hq, device=device) * 0.5
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


def _check(dtype, B, Hq, Hkv, Lq, Lk, D, causal, window, softcap, sinks, alibi, grads=True, sink_scale=2.0,
           backend="cpu", device="cpu"):  # fmt: skip
    q, k, v = _inputs(dtype, B, Hq, Hkv, Lq, Lk, D, grads, device)
    kw = _variants(Hq, B, window, softcap, sinks, alibi, sink_scale, device)
    out = _call(pyattn.scaled_dot_product_attention, q, k, v, causal, kw, backend=backend)
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


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("causal", ["none", "upper", "lower"])
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: str(c))
def test_variants_fp32(combo, causal, backend, device):
    window, softcap, sinks, alibi = combo
    # (B, Hq, Hkv): GQA either way; 37 x 53 is 2 x 4 blocks of the interpreter's 32 x 16 tiles
    B, Hq, Hkv = (2, 2, 1) if _small(backend) else (2, 4, 2)
    if _small(backend) and alibi != "batch":
        B = 1
    _check(
        torch.float32,
        B,
        Hq,
        Hkv,
        37,
        53,
        24,
        causal,
        window,
        softcap,
        sinks,
        alibi,
        backend=backend,
        device=device,
    )


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", ["upper", "lower"])
def test_variants_dtypes(dtype, causal, backend, device):
    if dtype not in _backend.RECORDS[backend].dtypes:
        pytest.skip(f"{backend} takes no {dtype}")
    Hq = 2 if _small(backend) else 4
    _check(dtype, 1, Hq, 1, 45, 45, 16, causal, (9, 2), 4.0, True, "head", backend=backend, device=device)


# (Lq, Lk, causal, window): several key blocks of each backend's kernels (cpu: 512 forward, 256
# backward; the interpreter's Triton tiles: 32 queries x 16 keys), so the band's block bounds,
# the skipped blocks and the per-element masking of the blocks it cuts all run
_SKIP_CASES = {
    "cpu": [(700, 700, "upper", (100, 0)), (300, 1100, "none", (130, 60)), (1100, 300, "lower", (40, -1))],
    "triton": [(150, 150, "upper", (20, 0)), (70, 200, "none", (25, 10)), (200, 70, "lower", (8, -1))],
}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", range(3))
def test_window_skips_blocks(case, backend, device):
    Lq, Lk, causal, window = _SKIP_CASES["triton" if _small(backend) else "cpu"][case]
    _check(
        torch.float32, 1, 2, 1, Lq, Lk, 16, causal, window, 0.0, True, None, backend=backend, device=device
    )


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sink_only_row_gives_zeros(backend, device):
    """A row whose keys are all masked has only its sink: zeros, zero gradients."""
    q, k, v = _inputs(torch.float32, 1, 2, 2, 6, 9, 8, device=device)
    mask = torch.ones(6, 9, dtype=torch.bool, device=device)
    mask[2] = False
    sinks = torch.tensor([0.5, -1.0], requires_grad=True, device=device)
    out = pyattn.scaled_dot_product_attention(q, k, v, mask, sinks=sinks, backend=backend)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    ref = reference.scaled_dot_product_attention(q, k, v, mask, sinks=sinks)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))
    # a window that leaves some rows no key at all (Lq > Lk, lower-right); window 0 and one
    # longer than the sequences
    _check(
        torch.float32, 1, 2, 2, 12, 4, 8, "lower", (1, -1), 0.0, True, None, backend=backend, device=device
    )
    _check(torch.float32, 1, 2, 2, 9, 14, 8, "none", (0, 0), 0.0, True, None, backend=backend, device=device)
    _check(
        torch.float32,
        1,
        2,
        1,
        9,
        14,
        8,
        "upper",
        (40, 100),
        2.0,
        True,
        "head",
        backend=backend,
        device=device,
    )


@pytest.mark.skipif(not _backend.have_triton(), reason="needs triton")
def test_triton_never_visits_blocks_outside_the_window():
    """NaN planted in the key blocks no query's window reaches, and in the query blocks that
    see no key, stays out of every output and gradient: those blocks are never loaded (a
    visited block would bring it in through 0 x NaN in the tile products, masked or not)."""
    from pyattn.kernels._flash import _INTERPRET_CONFIG

    device = "cuda" if HAS_CUDA else "cpu"
    bm, bn = _INTERPRET_CONFIG.kwargs["BLOCK_M"], _INTERPRET_CONFIG.kwargs["BLOCK_N"]
    if HAS_CUDA:
        bm = bn = 128  # blocks of at most 128 on a GPU: plant NaN only where whole ones lie
    # (a) one query block over many keys, no causality: row i sees keys [i + Lk - Lq - 10, i + Lk - Lq]
    Lq, Lk = bm, 10 * max(bm, bn)
    dead = ((Lk - Lq - 10) // bn) * bn  # keys [0, dead) lie in key blocks no row sees
    q, k, v = _inputs(torch.float32, 1, 2, 1, Lq, Lk, 16, grad=False, device=device)
    k[:, :, :dead] = float("nan")
    v[:, :, :dead] = float("nan")
    for t in (q, k, v):
        t.requires_grad_(True)
    out = pyattn.scaled_dot_product_attention(q, k, v, window_size=(10, 0), enable_gqa=True, backend="triton")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not t.isnan().any(), f"{name}: a block outside the window was visited"
    assert torch.equal(dk[:, :, :dead], torch.zeros_like(dk[:, :, :dead]))
    ref = reference.scaled_dot_product_attention(
        q.detach().double(), k.detach().nan_to_num().double(), v.detach().nan_to_num().double(),
        window_size=(10, 0), enable_gqa=True,
    )  # fmt: skip
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # (b) many queries over one key block, lower-right band (0, 5): rows i < Lq - Lk - 5 see no
    # key; NaN in their queries and output gradients must not reach dK / dV
    Lq, Lk = 10 * max(bm, bn), bn
    dead = ((Lq - Lk - 5) // bm) * bm
    q, k, v = _inputs(torch.float32, 1, 2, 1, Lq, Lk, 16, grad=False, device=device)
    q[:, :, :dead] = float("nan")
    for t in (q, k, v):
        t.requires_grad_(True)
    out = pyattn.scaled_dot_product_attention(q, k, v, window_size=(0, 5), enable_gqa=True, backend="triton")
    do = torch.randn_like(out)
    do[:, :, :dead] = float("nan")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    assert torch.equal(out[:, :, :dead], torch.zeros_like(out[:, :, :dead]))
    for name, t in (("dk", dk), ("dv", dv), ("out", out[:, :, dead:]), ("dq", dq[:, :, dead:])):
        assert not t.isnan().any(), f"{name}: a query block outside the window was visited"


_HYPOTHESIS = dict(
    Lq=st.integers(1, 40),
    Lk=st.integers(1, 40),
    left=st.integers(-1, 45),
    right=st.integers(-1, 45),
    softcap=st.sampled_from([0.0, 0.5, 2.0, 30.0]),
    sink=st.sampled_from([None, -1e4, -3.0, 0.0, 4.0, 60.0]),
    alibi=st.sampled_from([None, "head", "batch"]),
    causal=st.sampled_from(["none", "upper", "lower"]),
    # the tensors come from the example, so a failure replays with the same inputs
    seed=st.integers(0, 2**31 - 1),
)


def _hypothesis_case(backend, Lq, Lk, left, right, softcap, sink, alibi, causal, seed):
    device = "cuda" if backend != "cpu" and HAS_CUDA else "cpu"
    torch.manual_seed(seed)
    q, k, v = _inputs(torch.float32, 2, 2, 2, Lq, Lk, 8, grad=True, device=device)
    kw = _variants(2, 2, (left, right), softcap, False, alibi, device=device)
    if sink is not None:
        kw["sinks"] = torch.tensor([sink, sink / 2], requires_grad=True, device=device)
    out = _call(pyattn.scaled_dot_product_attention, q, k, v, causal, kw, backend=backend)
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


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**_HYPOTHESIS)
def test_variants_hypothesis(Lq, Lk, left, right, softcap, sink, alibi, causal, seed):
    _hypothesis_case("cpu", Lq, Lk, left, right, softcap, sink, alibi, causal, seed)


# fewer examples through the interpreter (each runs its programs in numpy)
@pytest.mark.skipif(not _backend.have_triton(), reason="needs triton")
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**_HYPOTHESIS)
def test_variants_hypothesis_triton(Lq, Lk, left, right, softcap, sink, alibi, causal, seed):
    _hypothesis_case("triton", Lq, Lk, left, right, softcap, sink, alibi, causal, seed)


def _packed(lens_q, lens_k, Hq, Hkv, D, dtype=torch.float32):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), Hq, D, dtype=dtype, requires_grad=True)
    k = torch.randn(int(cu_k[-1]), Hkv, D, dtype=dtype, requires_grad=True)
    v = torch.randn(int(cu_k[-1]), Hkv, D, dtype=dtype, requires_grad=True)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_variants(is_causal, dtype, backend, device):
    """Sequences of their own lengths, an empty one on each side, Lq_b != Lk_b, (B, Hq) slopes
    (row b for sequence b), GQA."""
    lens_q, lens_k = [5, 0, 70, 1, 33], [9, 4, 70, 0, 20]
    Hq, Hkv = (2, 1) if _small(backend) else (4, 2)
    q, k, v, cu_q, cu_k = (t.to(device) for t in _packed(lens_q, lens_k, Hq, Hkv, 16, dtype))
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    sinks = torch.randn(Hq, requires_grad=True, device=device)
    kw = {
        "window_size": (11, 3),
        "softcap": 6.0,
        "sinks": sinks,
        "alibi_slopes": torch.rand(len(lens_q), Hq, device=device),
    }
    out = pyattn.varlen_attention(
        q, k, v, cu_q, cu_k, is_causal=is_causal, enable_gqa=True, backend=backend, **kw
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


@pytest.mark.skipif(not _backend.have_triton(), reason="needs triton")
@pytest.mark.parametrize("op", ["sdpa", "varlen"])
def test_triton_variants_with_dropout_match_cpu(op):
    """Dropout draws the same Philox keep-mask on every backend (same seed, same counters), so
    with the variants on (the sink's share of each row included) triton's output and gradients
    equal the cpu backend's within float32 rounding."""
    device = "cuda" if HAS_CUDA else "cpu"
    if op == "sdpa":
        q, k, v = _inputs(torch.float32, 1, 2, 1, 21, 30, 16, grad=False)
        args = ()
    else:
        q, k, v, cu_q, cu_k = _packed([7, 0, 14], [9, 3, 18], 2, 1, 16)
        q, k, v = (t.detach() for t in (q, k, v))
        args = (cu_q, cu_k)
    sinks = torch.randn(2)
    kw = {"window_size": (6, 2), "softcap": 4.0, "alibi_slopes": torch.rand(2) * 0.5}
    fn = pyattn.scaled_dot_product_attention if op == "sdpa" else pyattn.varlen_attention
    results = []
    for backend, dev in (("cpu", "cpu"), ("triton", device)):
        leaves = [t.to(dev).requires_grad_(True) for t in (q, k, v, sinks)]
        extra = {n: (t.to(dev) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
        torch.manual_seed(1234)
        out = fn(*leaves[:3], *(a.to(dev) for a in args), dropout_p=0.3, is_causal=True, enable_gqa=True,
                 sinks=leaves[3], backend=backend, **extra)  # fmt: skip
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        results.append([out, *grads])
    for name, a, b in zip(["out", "dq", "dk", "dv", "dsinks"], *results, strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


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
    """Every backend fuses the variants in sdpa and varlen today; a backend whose record says its
    kernels do not (a toy record here) refuses them asked for by name, with an InputError, and
    backend=None moves on to one that does."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for op in ("sdpa", "varlen_attention", "kvcache_attention"):
        for name in ("cpu", "triton", "cuda"):
            assert _backend.fuses_variants(name, op), (name, op)
    toy = toy_backend(variant_ops=())
    monkeypatch.setitem(_backend.RECORDS, "toy", toy)
    monkeypatch.setattr(_backend, "BACKENDS", (*_backend.BACKENDS, "toy"))
    for op in ("sdpa", "varlen_attention"):
        monkeypatch.setitem(_backend.PREFERENCE, op, ("toy", "cpu"))
        with pytest.raises(InputError, match="attention variants"):
            _backend.resolve(op, "toy", cpu, torch.float32, (8, 8), variants=True)
        assert _backend.resolve(op, None, cpu, torch.float32, (8, 8), variants=True) == "cpu"
        assert _backend.resolve(op, None, cpu, torch.float32, (8, 8)) == "toy"
        on_gpu = _backend.resolve(op, None, cuda, torch.float16, (64, 64), variants=True)
        assert on_gpu == "reference" or _backend.fuses_variants(on_gpu, op)


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
