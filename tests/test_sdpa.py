"""pyattn.scaled_dot_product_attention against the float64 reference and against torch's own
``torch.nn.functional.scaled_dot_product_attention`` (run in float64), on every backend usable
here.

The cpu backend runs everything; triton runs the parametrised checks (through the interpreter on
CPU tensors without a GPU, so those shapes stay small); cuda runs them on a GPU only. Larger and
CPU-specific cases (long rows, gradcheck, opcheck, torch.compile) are separate tests.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import HAS_CUDA, assert_close_to_ref, assert_grads_close, backend_params

import pyattn
from pyattn import reference
from pyattn.ops import _common
from pyattn.ops import sdpa as fa

BACKENDS = backend_params(cpu=True, triton=True, cuda=True)


def dtypes_for(backend):
    if backend == "cpu":
        return [torch.float32]
    return [torch.float32, torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float32]


def _rand(shape, contiguous=True):
    if contiguous:
        return torch.randn(*shape, dtype=torch.float64)
    # (B, L, H, E) storage seen as (B, H, L, E): the layout a fused QKV projection leaves
    t = torch.randn(shape[0], shape[2], shape[1], *shape[3:], dtype=torch.float64)
    return t.transpose(1, 2)


def make_mask(kind, B, Hq, Lq, Lk, full_row=False):
    """A (B, Hq, Lq, Lk)-broadcastable mask in float64 (float kind) or bool, or None."""
    if kind is None:
        return None
    allowed = torch.rand(B, 1, Lq, Lk) > 0.3
    if full_row:
        allowed[0, :, 0, :] = False  # query 0 of batch 0 sees no key
    else:
        allowed[..., 0] = True  # every row keeps a key, so torch's result has no NaN rows
    if kind == "bool":
        return allowed
    add = torch.randn(B, Hq, Lq, Lk, dtype=torch.float64)
    return add.masked_fill(~allowed, float("-inf"))


def run_case(
    backend,
    device,
    dtype,
    B,
    Hq,
    Hkv,
    Lq,
    Lk,
    D,
    Dv,
    mask_kind=None,
    causal=False,
    scale=None,
    contiguous=True,
    full_row=False,
    against_torch=True,
    grad_floor=None,
    grad_floor_mult=1.0,
):
    """Checks output and q/k/v gradients against the float64 reference (and torch's function)."""
    q = _rand((B, Hq, Lq, D), contiguous)
    k = _rand((B, Hkv, Lk, D), contiguous)
    v = _rand((B, Hkv, Lk, Dv), contiguous)
    mask64 = make_mask(mask_kind, B, Hq, Lq, Lk, full_row)
    gqa = Hq != Hkv

    def cast(t):
        if t is None or t.dtype == torch.bool:
            return t
        return t.to(dtype)

    ins64 = [t.clone().requires_grad_() for t in (q, k, v)]
    ins_l = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    ins = [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    if not contiguous:
        # keep the kernel's inputs non-contiguous views
        ins = [t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in ins]
        assert not ins[0].is_contiguous()
    kw = dict(is_causal=causal, scale=scale, enable_gqa=gqa)
    mask_dev = None if mask64 is None else cast(mask64).to(device)
    out = pyattn.scaled_dot_product_attention(*ins, mask_dev, backend=backend, **kw)
    out_l = reference.scaled_dot_product_attention(*ins_l, cast(mask64), **kw)
    out64 = reference.scaled_dot_product_attention(*ins64, mask64, **kw)
    assert out.dtype == dtype and out.shape == (B, Hq, Lq, Dv)
    assert torch.isfinite(out).all(), "output has non-finite values"
    assert_close_to_ref("out", out, out_l, out64)
    g = torch.randn_like(out64)
    grads = torch.autograd.grad(out, ins, g.to(device, dtype))
    grads_l = torch.autograd.grad(out_l, ins_l, g.to(dtype))
    grads64 = torch.autograd.grad(out64, ins64, g)
    names = ["query", "key", "value"]
    _check_grads(names, grads, grads_l, grads64, grad_floor, grad_floor_mult)
    if against_torch:
        # torch's own function, in float64: an independent ground truth
        t64 = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        ot = F.scaled_dot_product_attention(*t64, mask64, **kw)
        assert_close_to_ref("out vs torch", out, out_l, ot)
        names_t = [n + " (vs torch)" for n in names]
        _check_grads(names_t, grads, grads_l, torch.autograd.grad(ot, t64, g), grad_floor, grad_floor_mult)
    return out, grads


def _check_grads(names, grads, grads_l, grads64, floor=None, floor_mult=1.0):
    """helpers.assert_grads_close, or the same 3x rule with an explicit floor where a case's
    cancellation needs one (see test_cpu_long_rows)."""
    if floor is None:
        assert_grads_close(names, grads, grads_l, grads64, floor_mult=floor_mult)
        return
    for name, gr, gl, g64 in zip(names, grads, grads_l, grads64, strict=True):
        assert_close_to_ref(f"grad {name}", gr, gl, g64, factor=3.0, floor=floor)


MASK_CAUSAL = [(None, False), (None, True), ("bool", False), ("float", False)]
SHAPES = [
    # B, Hq, Hkv, Lq, Lk, D, Dv
    (2, 2, 2, 7, 13, 16, 16),
    (1, 4, 2, 1, 37, 64, 64),  # GQA, one query
    (2, 2, 1, 19, 11, 59, 24),  # GQA, Lq > Lk, odd head dim, Dv != D
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mask_kind,causal", MASK_CAUSAL, ids=["nomask", "causal", "bool", "float"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_and_torch(backend, device, mask_kind, causal, shape):
    for dtype in dtypes_for(backend):
        run_case(backend, device, dtype, *shape, mask_kind=mask_kind, causal=causal)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("D", [16, 59, 64, 128])
def test_head_dims(backend, device, D):
    run_case(backend, device, torch.float32, 1, 2, 2, 5, 23, D, D, causal=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("scale", [0.3, 0.0, 1.5])
def test_scale(backend, device, scale):
    # A fused backward recomputes P = exp(S - lse), whose rounding grows with |S|: scale 1.5 makes
    # the scores 6x those of the default 1/sqrt(16), so the float32 gradient floor grows with it
    # (dV missed the default floor by 9% at PYATTN_TEST_SEED=7 on triton).
    run_case(backend, device, torch.float32, 1, 2, 2, 6, 9, 16, 8, mask_kind="float", scale=scale,
             grad_floor_mult=max(1.0, scale * 16**0.5))  # fmt: skip


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    run_case(backend, device, torch.float32, 2, 3, 3, 9, 14, 16, 16, mask_kind="bool", contiguous=False)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_fully_masked_rows_give_zeros(backend, device, mask_kind):
    out, (dq, _, _) = run_case(
        backend, device, torch.float32, 2, 2, 2, 5, 8, 16, 16, mask_kind=mask_kind, full_row=True,
        against_torch=False,
    )  # fmt: skip
    assert torch.all(out[0, :, 0] == 0), "a row with every key masked must be zeros, not NaN"
    assert torch.all(dq[0, :, 0] == 0), "and its query gets a zero gradient"


@pytest.mark.parametrize("L", [1, 97, 1025], ids=lambda L: f"L{L}")
@pytest.mark.parametrize("mask_kind,causal", MASK_CAUSAL, ids=["nomask", "causal", "bool", "float"])
def test_cpu_long_rows(L, mask_kind, causal):
    # Beyond the interpreter's comfort: several query and key blocks, partial last blocks.
    # L = 1: one key, so dQ and dK are exactly 0 in exact arithmetic; the kernel gets them as
    # dP - Delta, two D-long dot products summed in different orders (GEMM vs row sum), which
    # the float32 reference (softmax backward of one element) does not round at all. Allow that
    # cancellation: D float32 roundings of O(1) terms.
    floor = 64 * 2e-7 if L == 1 else None
    run_case(
        "cpu",
        "cpu",
        torch.float32,
        1,
        2,
        1,
        L,
        L,
        64,
        48,
        mask_kind=mask_kind,
        causal=causal,
        grad_floor=floor,
    )


@pytest.mark.parametrize("Lq,Lk", [(300, 1025), (1025, 130)])
def test_cpu_causal_rectangular(Lq, Lk):
    run_case("cpu", "cpu", torch.float32, 1, 2, 2, Lq, Lk, 32, 32, causal=True)


def test_cpu_float64_exact():
    # float64 inputs: the kernel must agree with the float64 reference to rounding.
    run_case("cpu", "cpu", torch.float64, 2, 4, 2, 70, 600, 24, 20, mask_kind="float")


# -- torch's broadcasting semantics ---------------------------------------------------------------


@pytest.mark.parametrize(
    "qs,ks,vs,ms",
    [
        ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 4), (1, 7)),  # mask over keys only
        ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 4), (5, 7)),
        ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 4), (1, 3, 1, 7)),
        ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 4), (2, 1, 5, 7)),
        ((2, 2, 3, 5, 8), (3, 7, 8), (3, 7, 4), (2, 1, 1, 5, 7)),  # leading dims broadcast
        ((3, 5, 8), (3, 7, 8), (3, 7, 4), None),  # 3-D
        ((5, 8), (7, 8), (7, 4), (5, 7)),  # 2-D
        ((2, 4, 5, 8), (2, 1, 7, 8), (2, 1, 7, 4), None),  # one kv head broadcast, no GQA flag
    ],
)
@pytest.mark.parametrize("mask_dtype", ["bool", "float"])
def test_broadcasting_like_torch(qs, ks, vs, ms, mask_dtype):
    q, k, v = (torch.randn(s, dtype=torch.float64) for s in (qs, ks, vs))
    mask = None
    if ms is not None:
        allowed = torch.rand(ms) > 0.3
        allowed[..., 0] = True
        mask = (
            allowed
            if mask_dtype == "bool"
            else torch.randn(ms, dtype=torch.float64).masked_fill(~allowed, -1e4)
        )
    ins = [t.float().requires_grad_() for t in (q, k, v)]
    ins64 = [t.clone().requires_grad_() for t in (q, k, v)]
    ins_l = [t.float().requires_grad_() for t in (q, k, v)]
    mask32 = mask if mask is None or mask.dtype == torch.bool else mask.float()
    out = pyattn.scaled_dot_product_attention(*ins, mask32, backend="cpu")
    ref = F.scaled_dot_product_attention(*ins64, mask)
    ref_l = reference.scaled_dot_product_attention(*ins_l, mask32)
    assert out.shape == ref.shape
    assert_close_to_ref("out", out, ref_l, ref)
    g = torch.randn_like(ref)
    assert_grads_close(
        ["query", "key", "value"],
        torch.autograd.grad(out, ins, g.float()),
        torch.autograd.grad(ref_l, ins_l, g.float()),
        torch.autograd.grad(ref, ins64, g),
    )


def test_float_mask_requiring_grad_falls_back_with_right_gradient():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    mask = torch.randn(1, 2, 4, 6, requires_grad=True)
    mask64 = mask.detach().double().requires_grad_()
    out = pyattn.scaled_dot_product_attention(q, k, v, mask, backend="cpu")
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask64)
    g = torch.randn_like(ref)
    (gm,) = torch.autograd.grad(out, mask, g.float())
    (gm64,) = torch.autograd.grad(ref, mask64, g)
    torch.testing.assert_close(gm.double(), gm64, rtol=1e-4, atol=1e-5)


# -- dropout: checked exactly against the regenerated keep-mask ----------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_matches_reference_with_same_mask(backend, device, causal):
    B, Hq, Hkv, Lq, Lk, D, p = 2, 4, 2, 9, 21, 16, 0.3
    q, k, v = (
        torch.randn(s, dtype=torch.float64) for s in ((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D))
    )
    ins = [t.float().to(device).requires_grad_() for t in (q, k, v)]
    ins_l = [t.float().requires_grad_() for t in (q, k, v)]
    ins64 = [t.clone().requires_grad_() for t in (q, k, v)]
    state = torch.get_rng_state()
    out = pyattn.scaled_dot_product_attention(
        *ins, dropout_p=p, is_causal=causal, enable_gqa=True, backend=backend
    )
    torch.set_rng_state(state)
    seed, offset = _common.dropout_seed_offset()  # what the call above drew
    keep = reference.dropout_keep_mask(seed, offset, (B, Hq, Lq, Lk), p)
    assert 0 < keep.float().mean() < 1
    kw = dict(dropout_p=p, is_causal=causal, enable_gqa=True, dropout_mask=keep)
    out_l = reference.scaled_dot_product_attention(*ins_l, **kw)
    out64 = reference.scaled_dot_product_attention(*ins64, **kw)
    assert_close_to_ref("out", out, out_l, out64)
    g = torch.randn_like(out64)
    assert_grads_close(
        ["query", "key", "value"],
        torch.autograd.grad(out, ins, g.float().to(device)),
        torch.autograd.grad(out_l, ins_l, g.float()),
        torch.autograd.grad(out64, ins64, g),
    )


def test_dropout_reproducible_with_manual_seed_and_varies_without():
    q, k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    torch.manual_seed(123)
    a = pyattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend="cpu")
    torch.manual_seed(123)
    b = pyattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend="cpu")
    c = pyattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend="cpu")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dropout_op_against_keep_mask_float64():
    # The op itself, with a chosen (seed, offset) near a 32-bit counter boundary.
    B, H, Lq, Lk, D, p = 1, 3, 7, 40, 8, 0.25
    seed, offset = 0x1234_5678_9ABC, 2**32 - 100
    q, k, v = (
        torch.randn(B, H, Lq, D, dtype=torch.float64),
        torch.randn(B, H, Lk, D, dtype=torch.float64),
        torch.randn(B, H, Lk, D, dtype=torch.float64),
    )
    out, lse = torch.ops.pyattn.sdpa_fwd(q, k, v, None, p, 0, 0.5, seed, offset)
    keep = torch.ops.pyattn.dropout_keep_mask(seed, offset, [B, H, Lq, Lk], p)
    assert torch.equal(keep, reference.dropout_keep_mask(seed, offset, (B, H, Lq, Lk), p))
    ref = reference.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=0.5, dropout_mask=keep)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        lse, torch.logsumexp(0.5 * q @ k.transpose(-1, -2), -1), rtol=1e-12, atol=1e-12
    )


# -- autograd, op registration, compile, determinism ----------------------------------------------


@pytest.mark.parametrize("variant", ["plain", "causal_gqa", "bool", "float", "dropout"])
def test_gradcheck_float64(variant):
    B, Hq, Hkv, Lq, Lk, D, Dv = 1, 2, 2, 5, 6, 4, 3
    mask, causal, p = None, False, 0.0
    if variant == "causal_gqa":
        Hkv, causal, Lq = 1, True, 7
    elif variant == "bool":
        mask = torch.rand(B, 1, Lq, Lk) > 0.4
        mask[0, 0, 1] = False  # one empty row
    elif variant == "float":
        mask = torch.randn(Lq, Lk, dtype=torch.float64)
    elif variant == "dropout":
        p = 0.3
    ins = [
        torch.randn(B, Hq, Lq, D, dtype=torch.float64, requires_grad=True),
        torch.randn(B, Hkv, Lk, D, dtype=torch.float64, requires_grad=True),
        torch.randn(B, Hkv, Lk, Dv, dtype=torch.float64, requires_grad=True),
    ]
    m4 = None if mask is None else mask.expand(B, Hq, Lq, Lk)

    def f(q, k, v):  # the op with a fixed dropout seed, so every evaluation draws the same mask
        return torch.ops.pyattn.sdpa_fwd(q, k, v, m4, p, int(causal), 0.7, 42, 7)[0]

    assert torch.autograd.gradcheck(f, ins)
    if p == 0.0:
        assert torch.autograd.gradcheck(
            lambda *a: pyattn.scaled_dot_product_attention(
                *a, mask, is_causal=causal, enable_gqa=Hq != Hkv, backend="cpu"
            ),
            ins,
        )


@pytest.mark.parametrize("variant", ["plain", "bool", "float_bcast", "causal_gqa_dropout"])
def test_opcheck(variant):
    B, Hq, Hkv, Lq, Lk, D, Dv = 2, 2, 2, 5, 9, 8, 6
    mask, causal, p = None, False, 0.0
    if variant == "bool":
        mask = torch.rand(B, Hq, Lq, Lk) > 0.3
    elif variant == "float_bcast":
        mask = torch.randn(Lk).expand(B, Hq, Lq, Lk)  # stride-0 dims
    else:
        Hkv, causal, p = 1, True, 0.2
    q = torch.randn(B, Hq, Lq, D, requires_grad=True)
    k = torch.randn(B, Hkv, Lk, D, requires_grad=True)
    v = torch.randn(B, Hkv, Lk, Dv, requires_grad=True)
    args = (q, k, v, mask, p, int(causal), 0.35, 5, 11)
    torch.library.opcheck(torch.ops.pyattn.sdpa_fwd, args)
    out, lse = torch.ops.pyattn.sdpa_fwd(q.detach(), k.detach(), v.detach(), *args[3:])
    bwd = (
        torch.randn_like(out),
        q.detach(),
        k.detach(),
        v.detach(),
        mask,
        out,
        lse,
        p,
        int(causal),
        0.35,
        5,
        11,
    )
    torch.library.opcheck(torch.ops.pyattn.sdpa_bwd, bwd)


def test_torch_compile_fullgraph():
    def f(q, k, v, mask):
        return pyattn.scaled_dot_product_attention(torch.tanh(q), k, v, mask, backend="cpu") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    q, k, v = torch.randn(2, 3, 6, 16), torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 8)
    mask = torch.rand(3, 6, 9) > 0.3
    ins = [t.requires_grad_() for t in (q, k, v)]
    out_c, out_e = compiled(*ins, mask), f(*ins, mask)
    torch.testing.assert_close(out_c, out_e)
    g = torch.randn_like(out_e)
    for a, b in zip(torch.autograd.grad(out_c, ins, g), torch.autograd.grad(out_e, ins, g), strict=True):
        torch.testing.assert_close(a, b)


def test_torch_compile_fullgraph_with_dropout():
    # The dropout seed is drawn inside the graph (an unbacked SymInt under torch.compile); the
    # ops take SymInt seed/offset so the whole training step stays one graph. With inductor's
    # fallback_random the compiled draw equals eager's, so the results must agree exactly.
    import torch._inductor.config as inductor_config

    def f(q, k, v):
        return pyattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True, backend="cpu")

    ins = [torch.randn(2, 3, 12, 8, requires_grad=True) for _ in range(3)]
    g = torch.randn(2, 3, 12, 8)
    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(f, fullgraph=True)
        torch.manual_seed(3)
        out_c = compiled(*ins)
        grads_c = torch.autograd.grad(out_c, ins, g)
    torch.manual_seed(3)
    out_e = f(*ins)
    grads_e = torch.autograd.grad(out_e, ins, g)
    plain = pyattn.scaled_dot_product_attention(*ins, is_causal=True, backend="cpu")
    assert not torch.allclose(out_e, plain), "dropout was not applied"
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    for a, b in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_backward_both_schemes(causal):
    # One (batch, kv head) pair and 3 key blocks: on one thread the backward walks the pair's key
    # blocks in one task; on several it splits dK/dV by key block and dQ by query block (two
    # passes). Both must match the reference, dropout (same keep-mask) and MQA included.
    B, Hq, Hkv, Lq, Lk, D, p = 1, 4, 1, 300, 700, 32, 0.2
    gen = torch.Generator().manual_seed(11)
    q, k, v = (
        torch.randn(s, generator=gen, dtype=torch.float64)
        for s in ((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D))
    )
    g = torch.randn(B, Hq, Lq, D, generator=gen, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        for n in sorted({1, max(2, threads)}):
            torch.set_num_threads(n)
            ins = [t.float().requires_grad_() for t in (q, k, v)]
            state = torch.get_rng_state()
            out = pyattn.scaled_dot_product_attention(
                *ins, dropout_p=p, is_causal=causal, enable_gqa=True, backend="cpu"
            )
            grads = torch.autograd.grad(out, ins, g.float())
            torch.set_rng_state(state)
            seed, offset = _common.dropout_seed_offset()
            keep = reference.dropout_keep_mask(seed, offset, (B, Hq, Lq, Lk), p)
            kw = dict(dropout_p=p, is_causal=causal, enable_gqa=True, dropout_mask=keep)
            ins_l = [t.float().requires_grad_() for t in (q, k, v)]
            ins64 = [t.clone().requires_grad_() for t in (q, k, v)]
            out_l = reference.scaled_dot_product_attention(*ins_l, **kw)
            out64 = reference.scaled_dot_product_attention(*ins64, **kw)
            assert_close_to_ref(f"out ({n} threads)", out, out_l, out64)
            assert_grads_close(
                [f"{name} ({n} threads)" for name in ("query", "key", "value")],
                grads,
                torch.autograd.grad(out_l, ins_l, g.float()),
                torch.autograd.grad(out64, ins64, g),
            )
    finally:
        torch.set_num_threads(threads)


def test_cpu_split_backward_random_float64():
    # The two-pass backward (one (batch, kv head) pair, several key blocks, >= 2 threads) over
    # random head groups, lengths, head dims, masks, causality and dropout, in float64 where the
    # kernel must match the reference to rounding.
    import random

    rng = random.Random(5)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        for _ in range(12):
            g = rng.choice((1, 2, 3))
            Lq, Lk = rng.choice((1, 5, 130, 513)), rng.choice((257, 700))
            D, Dv = rng.choice((1, 7, 32)), rng.choice((1, 16, 33))
            causal = rng.random() < 0.3
            kind = None if causal else rng.choice((None, "bool", "float"))
            p = rng.choice((0.0, 0.25))
            shapes = ((1, g, Lq, D), (1, 1, Lk, D), (1, 1, Lk, Dv))
            q, k, v = (torch.randn(s, dtype=torch.float64) for s in shapes)
            mask = None
            if kind == "bool":
                mask = torch.rand(1, 1, Lq, Lk) > 0.3
            elif kind == "float":
                mask = torch.randn(1, g, 1, Lk, dtype=torch.float64)
            kw = dict(dropout_p=p, is_causal=causal, enable_gqa=g > 1)
            ins = [t.clone().requires_grad_() for t in (q, k, v)]
            state = torch.get_rng_state()
            out = pyattn.scaled_dot_product_attention(*ins, mask, backend="cpu", **kw)
            keep = None
            if p > 0:
                torch.set_rng_state(state)
                seed, offset = _common.dropout_seed_offset()
                keep = reference.dropout_keep_mask(seed, offset, (1, g, Lq, Lk), p)
            ref_ins = [t.clone().requires_grad_() for t in (q, k, v)]
            ref = reference.scaled_dot_product_attention(*ref_ins, mask, dropout_mask=keep, **kw)
            gout = torch.randn_like(ref)
            got = (out, *torch.autograd.grad(out, ins, gout))
            want = (ref, *torch.autograd.grad(ref, ref_ins, gout))
            for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
                # relative to the tensor's scale, at least 1: a one-key row's dQ is 0 up to rounding
                err = ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()
                case = f"g={g} Lq={Lq} Lk={Lk} mask={kind} causal={causal} p={p}"
                assert err < 1e-12, f"{name}: error {err:.2e} ({case})"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_deterministic(backend, device, dropout_p):
    ins = [torch.randn(2, 4, 40, 16, device=device, requires_grad=True) for _ in range(3)]
    ins[1] = torch.randn(2, 2, 70, 16, device=device, requires_grad=True)
    ins[2] = torch.randn(2, 2, 70, 16, device=device, requires_grad=True)
    g = torch.randn(2, 4, 40, 16, device=device)

    def run():
        torch.manual_seed(7)
        out = pyattn.scaled_dot_product_attention(*ins, dropout_p=dropout_p, enable_gqa=True, backend=backend)
        return (out, *torch.autograd.grad(out, ins, g))

    first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b), "same inputs must give bitwise-identical results"


def test_cpu_deterministic_many_heads():
    # more tasks than threads, GQA, causal: still bitwise identical
    ins = [torch.randn(3, 8, 300, 32, requires_grad=True), torch.randn(3, 2, 300, 32, requires_grad=True),
           torch.randn(3, 2, 300, 32, requires_grad=True)]  # fmt: skip
    g = torch.randn(3, 8, 300, 32)

    def run():
        out = pyattn.scaled_dot_product_attention(*ins, is_causal=True, enable_gqa=True, backend="cpu")
        return (out, *torch.autograd.grad(out, ins, g))

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


def test_backend_choice_and_fallbacks():
    q = torch.randn(1, 2, 4, 8)
    assert pyattn._backend.resolve("sdpa", None, q.device, q.dtype) == "cpu"
    # half runs the cpu kernel's half path (float32 inside, rounded once; tests/test_half_cpu.py)
    assert pyattn._backend.resolve("sdpa", None, q.device, torch.float16) == "cpu"
    out = pyattn.scaled_dot_product_attention(q.half(), q.half(), q.half())
    assert out.dtype == torch.float16
    want = pyattn.reference.scaled_dot_product_attention(*(q.half().float(),) * 3).half()
    torch.testing.assert_close(out, want, rtol=0, atol=1e-3)
    explicit = pyattn.scaled_dot_product_attention(q.half(), q.half(), q.half(), backend="cpu")
    torch.testing.assert_close(explicit, out, rtol=0, atol=0)
    ref = pyattn.scaled_dot_product_attention(q, q, q, backend="reference")
    torch.testing.assert_close(pyattn.scaled_dot_product_attention(q, q, q, backend="cpu"), ref)


def test_empty_and_single_key():
    q, k, v = torch.randn(0, 2, 3, 8), torch.randn(0, 2, 5, 8), torch.randn(0, 2, 5, 4)
    assert pyattn.scaled_dot_product_attention(q, k, v, backend="cpu").shape == (0, 2, 3, 4)
    q, k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 4)
    out = pyattn.scaled_dot_product_attention(q, k, v, backend="cpu")
    torch.testing.assert_close(out, v.expand(2, 2, 3, 4))  # one key: weight 1
    out = pyattn.scaled_dot_product_attention(q, k[:, :, :0], v[:, :, :0], backend="cpu")
    assert out.shape == (2, 2, 3, 4) and torch.all(out == 0)  # no key at all: zeros


def test_fully_masked_row_zeros_where_torch_may_give_nan():
    # The documented convention: zeros for a row with no key. torch gave NaN there in older
    # versions (and its result is compared only where it is finite).
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    ours = pyattn.scaled_dot_product_attention(q, k, v, mask, backend="cpu")
    theirs = F.scaled_dot_product_attention(q, k, v, mask)
    assert torch.all(ours[0, 0, 1] == 0)
    finite = torch.isfinite(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite])


# -- bad input: each error names the argument, the expected and the actual ---------------------


def _good():
    return [torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 6)]


@pytest.mark.parametrize(
    "mutate,kwargs,exc,pattern",
    [
        (lambda a: a.__setitem__(0, torch.randn(8)), {}, RuntimeError, r"at least 2 dims .* got 'query' 1-D \(8\)"),
        (lambda a: a.__setitem__(1, torch.randn(2, 4, 7, 9)), {}, ValueError, r"'key' head dim must match query's E=8"),
        (lambda a: a.__setitem__(2, torch.randn(2, 4, 6, 6)), {}, ValueError, r"'value' length must match key's Lk=7"),
        (lambda a: a.__setitem__(1, torch.randn(3, 4, 7, 8)), {}, ValueError, r"batch and head dims .* must be broadcastable.*key \(3, 4\)"),
        (lambda a: (a.__setitem__(1, torch.randn(2, 3, 7, 8)), a.__setitem__(2, torch.randn(2, 3, 7, 6))), {"enable_gqa": True}, RuntimeError, r"with enable_gqa, key and value heads must divide query's: got query \(2, 4, 5, 8\), key \(2, 3, 7, 8\)"),
        (lambda a: (a.__setitem__(1, torch.randn(2, 2, 7, 8)), a.__setitem__(2, torch.randn(2, 2, 7, 6))), {}, ValueError, r"batch and head dims"),
        (lambda a: a.__setitem__(2, torch.randn(2, 3, 7, 6)), {"enable_gqa": True}, RuntimeError, r"key and value heads must divide query's: .* value \(2, 3, 7, 6\)"),
        (lambda a: a.__setitem__(2, torch.randn(2, 4, 7, 6, dtype=torch.float64)), {}, RuntimeError, r"must share one dtype, got query torch.float32, key torch.float32, value torch.float64"),
        (lambda a: a.__setitem__(0, torch.ones(2, 4, 5, 8, dtype=torch.long)), {}, TypeError, r"must share one dtype, got query torch.int64"),
        (lambda a: a.__init__([torch.ones(2, 4, 5, 8, dtype=torch.long)] * 3), {}, RuntimeError, r"must be floating-point tensors, got torch.int64"),
        (lambda a: a.__setitem__(0, [[1.0]]), {}, TypeError, r"'query' must be a torch.Tensor, got list"),
        (lambda a: a.__setitem__(1, torch.randn(2, 4, 7, 8, device="meta")), {}, RuntimeError, r"must be on one device, got query on cpu, key on meta"),
        (lambda a: None, {"dropout_p": -0.1}, RuntimeError, r"'dropout_p' must be in \[0, 1\], got -0.1"),
        (lambda a: None, {"dropout_p": "0.1"}, TypeError, r"'dropout_p' must be a float, got str"),
        (lambda a: None, {"scale": "1"}, TypeError, r"'scale' must be a float or None, got str"),
        (lambda a: None, {"is_causal": 1}, TypeError, r"'is_causal' must be a bool, got int"),
        (lambda a: None, {"attn_mask": torch.ones(5, 7, dtype=torch.bool), "is_causal": True}, RuntimeError, r"'attn_mask' and 'is_causal' cannot both be set"),
        (lambda a: None, {"attn_mask": torch.ones(5, 6, dtype=torch.bool)}, ValueError, r"'attn_mask' must be broadcastable to the scores \(..., Hq, Lq, Lk\) = \(2, 4, 5, 7\), got \(5, 6\)"),
        (lambda a: None, {"attn_mask": torch.ones(5, 7, dtype=torch.float64)}, TypeError, r"'attn_mask' must be bool .* or of query's dtype torch.float32, got torch.float64"),
        (lambda a: None, {"attn_mask": torch.ones(5, 7, dtype=torch.int32)}, TypeError, r"'attn_mask' must be bool .* got torch.int32"),
        (lambda a: None, {"attn_mask": [[True]]}, TypeError, r"'attn_mask' must be a tensor or None, got list"),
    ],
)  # fmt: skip
def test_bad_inputs(mutate, kwargs, exc, pattern):
    args = _good()
    mutate(args)
    with pytest.raises(exc, match=pattern):
        pyattn.scaled_dot_product_attention(*args, **kwargs)


def test_bad_backend_names():
    with pytest.raises(ValueError, match="not a pyattn backend"):
        pyattn.scaled_dot_product_attention(*_good(), backend="tpu")
    with pytest.raises(RuntimeError, match="'cuda' cannot run here"):
        pyattn.scaled_dot_product_attention(*_good(), backend="cuda")


@pytest.mark.parametrize(
    "args,pattern",
    [
        ((torch.randn(2, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 6)), r"argument 'query/key/value': expected 4-D"),
        ((torch.randn(2, 4, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 6)), r"argument 'key': expected a number of heads dividing query's 4, got 3"),
        ((torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 6, 6)), r"argument 'key/value': expected \(B, Hkv, Lk, D\) / \(B, Hkv, Lk, Dv\)"),
    ],
)  # fmt: skip
def test_op_checks_direct_calls(args, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.pyattn.sdpa_fwd(*args, None, 0.0, 0, 1.0, 0, 0)
    q, k, v = _good()
    with pytest.raises(
        RuntimeError, match=r"argument 'attn_mask': expected a mask broadcasting to \(B, Hq, Lq, Lk\)"
    ):
        torch.ops.pyattn.sdpa_fwd(q, k, v, torch.ones(3, 7, dtype=torch.bool), 0.0, 0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match=r"pyattn::sdpa: argument 'causal': expected 0, 1 or 2, got 3"):
        torch.ops.pyattn.sdpa_fwd(q, k, v, None, 0.0, 3, 1.0, 0, 0)


def test_shape_broadcast_matches_torch():
    # the op broadcasts plain-int shapes itself (torch.broadcast_shapes is slow per call)
    import random

    rng = random.Random(0)
    for _ in range(3000):
        shapes = [
            tuple(rng.choice((0, 1, 2, 3)) for _ in range(rng.randint(0, 4)))
            for _ in range(rng.randint(1, 3))
        ]
        try:
            want = tuple(torch.broadcast_shapes(*shapes))
        except RuntimeError:
            with pytest.raises(RuntimeError):
                fa._broadcast_shapes(*shapes)
        else:
            assert fa._broadcast_shapes(*shapes) == want, shapes
