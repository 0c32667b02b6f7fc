"""The Triton flash-attention ops (pyattn::sdpa_{fwd,bwd}_triton), called directly,
against pyattn.reference in float64.

Without a GPU they run through Triton's interpreter on CPU tensors (float32, one float16 case),
so every shape here is small; on a GPU the same cases run compiled on CUDA in fp32/fp16/bf16.
out, lse and the three gradients are checked with the reference-error rule (tests/helpers.py);
dropout is checked exactly against pyattn.reference.dropout_keep_mask.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import FLOOR, HAS_CUDA, assert_close_to_ref, assert_grads_close, backend_params

import pyattn
from pyattn import reference

fa = pytest.importorskip("pyattn.kernels.sdpa")  # registers the *_triton ops

FWD = torch.ops.pyattn.sdpa_fwd_triton
BWD = torch.ops.pyattn.sdpa_bwd_triton
DEVICES = [p.values[1] for p in backend_params(cpu=False, triton=True, cuda=False)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float32]


def _layout(t64, dtype, device, contiguous):
    """The same values in ``dtype`` on ``device``, contiguous or through odd strides."""
    if contiguous:
        return t64.to(device=device, dtype=dtype)
    # (B, L, H, D) storage seen as (B, H, L, D), with every other element of a doubled last dim
    B, H, L, D = t64.shape
    wide = torch.zeros(B, L, H, 2 * D, dtype=dtype, device=device)
    wide[..., ::2] = t64.transpose(1, 2).to(device=device, dtype=dtype)
    return wide[..., ::2].transpose(1, 2)


def _make_mask(kind, B, Hq, Lq, Lk):
    """A float64/bool mask of the given kind, (B, Hq, Lq, Lk) possibly as a stride-0 view."""
    if kind is None:
        return None
    if kind == "bool":
        return torch.rand(B, Hq, Lq, Lk) < 0.7
    if kind == "float":
        m = torch.randn(B, Hq, Lq, Lk, dtype=torch.float64)
        m[torch.rand(B, Hq, Lq, Lk) < 0.2] = float("-inf")
        return m
    if kind == "bool_padding":  # key padding, broadcast over heads and queries (stride 0)
        lengths = torch.randint(1, Lk + 1, (B,))
        return (torch.arange(Lk)[None, :] < lengths[:, None])[:, None, None, :].expand(B, Hq, Lq, Lk)
    if kind == "float_bcast":  # one (Lq, Lk) bias shared by batch and heads (strides 0)
        return torch.randn(1, 1, Lq, Lk, dtype=torch.float64).expand(B, Hq, Lq, Lk)
    if kind == "bool_empty_rows":  # some query rows with no key at all: zeros, lse +inf
        m = torch.rand(B, Hq, Lq, Lk) < 0.7
        m[0, 0, :3] = False
        m[-1, -1, -1] = False
        return m
    if kind == "float_empty_rows":
        m = torch.randn(B, Hq, Lq, Lk, dtype=torch.float64)
        m[0, -1, 1] = float("-inf")
        return m
    raise AssertionError(kind)


def _ref_lse(q, k, mask, causal, scale):
    scores, allowed = reference.sdpa_scores(q, k, mask, causal, scale, enable_gqa=True)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


def run_case(
    device,
    dtype,
    B=1,
    Hq=2,
    Hkv=2,
    Lq=37,
    Lk=37,
    D=16,
    Dv=None,
    mask=None,
    causal=False,
    dropout_p=0.0,
    contiguous=True,
    seed=0,
    offset=0,
):
    Dv = D if Dv is None else Dv
    scale = 1.0 / math.sqrt(D)
    q64 = torch.randn(B, Hq, Lq, D, dtype=torch.float64)
    k64 = torch.randn(B, Hkv, Lk, D, dtype=torch.float64)
    v64 = torch.randn(B, Hkv, Lk, Dv, dtype=torch.float64)
    do64 = torch.randn(B, Hq, Lq, Dv, dtype=torch.float64)
    m64 = _make_mask(mask, B, Hq, Lq, Lk)
    q, k, v, do = (_layout(t, dtype, device, contiguous) for t in (q64, k64, v64, do64))
    m_dev = (
        None if m64 is None else m64.to(device=device, dtype=torch.bool if m64.dtype == torch.bool else dtype)
    )
    keep = None
    if dropout_p > 0.0:
        keep = reference.dropout_keep_mask(seed, offset, (B, Hq, Lq, Lk), dropout_p)

    causal = int(causal)  # 0 none, 1 upper-left, 2 lower-right
    out, lse = FWD(q, k, v, m_dev, dropout_p, causal, scale, seed, offset)
    dq, dk, dv = BWD(do, q, k, v, m_dev, out, lse, dropout_p, causal, scale, seed, offset)
    assert out.shape == (B, Hq, Lq, Dv) and out.dtype == dtype
    assert lse.shape == (B, Hq, Lq) and lse.dtype == torch.float32
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dq.dtype == dk.dtype == dv.dtype == dtype
    for name, t in (("out", out), ("grad_query", dq), ("grad_key", dk), ("grad_value", dv)):
        assert torch.isfinite(t).all(), f"{name} has non-finite values"

    def ref(ins, m):
        ins = [t.detach().clone().requires_grad_() for t in ins]
        o = reference.scaled_dot_product_attention(
            *ins, m, dropout_p, causal, scale, enable_gqa=True, dropout_mask=keep
        )
        grads = torch.autograd.grad((o * do64.to(o.dtype)).sum(), ins)
        return o, _ref_lse(ins[0].detach(), ins[1].detach(), m, causal, scale), grads

    # the reference in the input dtype (on CPU) sets the tolerance; float64 is the truth
    m_low = None if m64 is None or m64.dtype == torch.bool else m64.to(dtype)
    o_l, lse_l, g_l = ref([t.to(dtype) for t in (q64, k64, v64)], m64 if m_low is None else m_low)
    o64, lse64, g64 = ref([q64, k64, v64], m64)

    assert_close_to_ref("out", out, o_l, o64)
    empty = torch.isinf(lse64)
    assert torch.equal(torch.isinf(lse).cpu(), empty), "lse must be +inf exactly on rows with no key"
    assert (lse.cpu()[empty] == float("inf")).all()
    assert_close_to_ref("lse", lse.cpu()[~empty], lse_l.float()[~empty], lse64[~empty])
    assert_grads_close(["value"], (dv,), g_l[2:], g64[2:])
    # dS = P o (dP - Delta) cancels: with one key (P = 1) dQ and dK are exactly 0, and the
    # reference's autograd gets that 0 exactly, leaving no reference error to scale by. The floor
    # for dQ and dK is therefore relative to the terms that cancel, |dP| scale |K| (|Q|), summed
    # over the Lk (Lq) terms as a random walk.
    dp_mag = (do64 @ v64.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)).abs().max().item()
    for name, g, gl, g64_, terms, n in (
        ("query", dq, g_l[0], g64[0], k64, Lk),
        ("key", dk, g_l[1], g64[1], q64, Lq),
    ):
        cancel = dp_mag * scale * terms.abs().max().item() * math.sqrt(n)
        floor = FLOOR[dtype] * max(1.0, g64_.abs().max().item(), cancel)
        assert_close_to_ref(f"grad {name}", g, gl, g64_, factor=3.0, floor=floor)
    return out, lse, (dq, dk, dv), empty


CASES = [
    pytest.param(dict(B=2, D=64), id="plain-D64"),
    pytest.param(dict(Lq=1, Lk=37), id="Lq1"),
    pytest.param(dict(Lq=37, Lk=1, Hq=1, Hkv=1), id="Lk1"),
    pytest.param(dict(Lq=20, Lk=45, D=59, Dv=32, Hq=1, Hkv=1), id="D59-Dv32"),
    pytest.param(dict(Lq=40, Lk=53, causal=True), id="causal-Lq<Lk"),
    pytest.param(dict(Lq=53, Lk=21, causal=True, Dv=24), id="causal-Lq>Lk"),
    pytest.param(dict(Hq=4, Hkv=2, Lq=33, Lk=40, causal=True), id="gqa-causal"),
    # lower-right: the diagonal ends at the last key; Lq > Lk leaves the first rows empty
    pytest.param(dict(Lq=21, Lk=53, causal=2), id="causal-lower-right-Lq<Lk"),
    pytest.param(dict(Lq=50, Lk=19, causal=2, Hq=2, Hkv=1), id="causal-lower-right-Lq>Lk"),
    pytest.param(dict(Hq=3, Hkv=1, Lq=21, Lk=35, mask="bool"), id="mqa-bool"),
    pytest.param(dict(B=2, Lq=30, Lk=41, mask="float"), id="float-mask"),
    pytest.param(dict(B=2, Lq=19, Lk=50, mask="bool_padding"), id="bool-padding-bcast"),
    pytest.param(dict(B=2, Lq=35, Lk=18, mask="float_bcast"), id="float-bcast"),
    pytest.param(dict(B=2, Hq=2, Hkv=1, Lq=20, Lk=37, mask="bool_empty_rows"), id="empty-rows-bool"),
    pytest.param(dict(Lq=20, Lk=33, mask="float_empty_rows"), id="empty-rows-float"),
    pytest.param(dict(Lq=33, Lk=37, D=32, contiguous=False), id="non-contiguous"),
    pytest.param(
        dict(Hq=2, Hkv=1, Lq=35, Lk=40, dropout_p=0.3, seed=2**40 + 123, offset=2**33 + 7), id="dropout"
    ),
    pytest.param(dict(Lq=33, Lk=33, causal=True, dropout_p=0.5, seed=7, offset=11), id="dropout-causal"),
    pytest.param(dict(Lq=21, Lk=36, mask="bool", dropout_p=0.2, seed=99), id="dropout-bool"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_against_reference(case, dtype, device):
    _, _, grads, empty = run_case(device, dtype, **case)
    if empty.any():
        # empty rows: zero output (checked by the rule, the reference gives 0) and zero dQ
        dq = grads[0].cpu()
        assert (dq[empty] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_float16(device):
    # half inputs through the interpreter too (fp16 tl.dot, fp32 statistics)
    run_case(device, torch.float16, Hq=2, Hkv=1, Lq=30, Lk=37, D=32, mask="bool", causal=False)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_backward(device):
    # the GQA dK/dV sum runs inside one program, no atomics: bit-identical reruns
    q = torch.randn(1, 4, 20, 16, device=device)
    k = torch.randn(1, 1, 24, 16, device=device)
    v = torch.randn(1, 1, 24, 16, device=device)
    do = torch.randn(1, 4, 20, 16, device=device)
    out, lse = FWD(q, k, v, None, 0.0, 1, 0.25, 0, 0)
    first = BWD(do, q, k, v, None, out, lse, 0.0, 1, 0.25, 0, 0)
    second = BWD(do, q, k, v, None, out, lse, 0.0, 1, 0.25, 0, 0)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_lengths(device):
    q = torch.randn(1, 2, 3, 16, device=device)
    k = torch.randn(1, 2, 0, 16, device=device)
    out, lse = FWD(q, k, k, None, 0.0, 0, 0.25, 0, 0)
    assert out.shape == (1, 2, 3, 16) and lse.shape == (1, 2, 3)
    assert (out == 0).all() and (lse == float("inf")).all()


def _bad(device, **over):
    args = dict(
        query=torch.randn(1, 4, 8, 16, device=device),
        key=torch.randn(1, 2, 9, 16, device=device),
        value=torch.randn(1, 2, 9, 8, device=device),
        attn_mask=None,
        dropout_p=0.0,
        causal=0,
        scale=0.25,
        seed=0,
        offset=0,
        window_left=-1,
        window_right=-1,
        softcap=0.0,
        sinks=None,
        alibi_slopes=None,
    )
    args.update(over)
    return FWD(*args.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "over",
    [
        dict(query=torch.randn(4, 8, 16)),
        dict(key=torch.randn(1, 3, 9, 16), value=torch.randn(1, 3, 9, 8)),
        dict(key=torch.randn(1, 2, 9, 15)),
        dict(value=torch.randn(1, 2, 7, 8)),
        dict(query=torch.randn(1, 4, 8, 16, dtype=torch.float64)),
        dict(key=torch.randn(1, 2, 9, 16).half()),
        dict(attn_mask=torch.zeros(1, 4, 8, 5, dtype=torch.bool)),
        dict(causal=3),
        dict(sinks=torch.zeros(3)),
        dict(alibi_slopes=torch.zeros(2, 4)),
        dict(alibi_slopes=torch.zeros(5)),
    ],
)
def test_direct_calls_cannot_read_out_of_bounds(device, over):
    # users' inputs are validated by pyattn.scaled_dot_product_attention; a direct op call only
    # meets the launchers' memory-safety guard
    over = {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in over.items()}
    with pytest.raises(ValueError, match="not canonical"):
        _bad(device, **over)


def _normalised(schema) -> str:
    # torch releases before pytorch#188722 ignore triton_op's schema= and infer one: SymInt for
    # int, unnamed outputs. Same calls, same types at run time; compare modulo that.
    text = str(schema).split("(", 1)[1].replace("SymInt", "int")
    args, rets = text.split(" -> ")
    return args + " -> " + ", ".join(r.split()[0].strip("()") for r in rets.split(","))


def test_schemas_match_cpp():
    import pyattn._C  # noqa: F401  (registers the C++ schemas)

    for name in ("sdpa_fwd", "sdpa_bwd"):
        cpp = getattr(torch.ops.pyattn, name).default._schema
        tri = getattr(torch.ops.pyattn, name + "_triton").default._schema
        assert _normalised(tri) == _normalised(cpp), f"{tri} != {cpp}"


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    q = torch.randn(1, 2, 5, 16, device=device)
    k = torch.randn(1, 1, 7, 16, device=device)
    mask = torch.rand(1, 2, 5, 7, device=device) < 0.8
    out, lse = FWD(q, k, k, mask, 0.0, 0, 0.25, 0, 0)
    # Under the interpreter the AOT/compile checks cannot run (wrap_triton hands the bare kernel
    # back there, so tracing never sees it); on a GPU opcheck runs them all.
    utils = None if HAS_CUDA else ("test_schema", "test_autograd_registration", "test_faketensor")
    kw = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(FWD, (q, k, k, mask, 0.0, 0, 0.25, 3, 5), **kw)
    torch.library.opcheck(BWD, (torch.randn_like(out), q, k, k, mask, out, lse, 0.0, 0, 0.25, 3, 5), **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_variants_direct(device):
    """The ops with every attention variant on (lower-right causality, window (4, 1), softcap,
    sinks, (B, Hq) ALiBi slopes, GQA): out against the reference, and lse the log of each row's
    whole softmax denominator, its sink's term included (the autograd's sink_grad and the
    backward's P = exp(S - lse) read it so); rows with no key (Lq > Lk) give 0 and lse = sink.
    opcheck on both ops."""
    B, Hq, Hkv, Lq, Lk, D = 2, 2, 1, 13, 9, 16
    q = torch.randn(B, Hq, Lq, D, device=device)
    k, v = torch.randn(B, Hkv, Lk, D, device=device), torch.randn(B, Hkv, Lk, D, device=device)
    sinks, slopes = torch.randn(Hq, device=device), torch.rand(B, Hq, device=device)
    args = (q, k, v, None, 0.0, 2, 0.3, 0, 0, 4, 1, 5.0, sinks, slopes)
    out, lse = FWD(*args)
    q64, k64, v64, s64, a64 = (t.double() for t in (q, k, v, sinks, slopes))
    var = dict(window_size=(4, 1), softcap=5.0, alibi_slopes=a64)
    scores, allowed = reference.sdpa_scores(q64, k64, None, 2, 0.3, True, **var)
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = s64[:, None, None].expand(B, Hq, Lq, 1)
    lse_ref = torch.logsumexp(torch.cat([scores, sink], dim=-1), dim=-1)
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-5, rtol=1e-5)
    ref = reference.scaled_dot_product_attention(q64, k64, v64, None, 0.0, 2, 0.3, True, sinks=s64, **var)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    empty = Lq - Lk  # rows before the lower-right diagonal's first key
    assert torch.equal(out[:, :, :empty], torch.zeros_like(out[:, :, :empty]))
    # (the kernels' base-2 units: sink log2(e) ln(2), within an ulp)
    torch.testing.assert_close(lse[:, :, :empty], sinks[None, :, None].expand(B, Hq, empty))
    utils = None if HAS_CUDA else ("test_schema", "test_autograd_registration", "test_faketensor")
    kw = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(FWD, args, **kw)
    bwd_args = (torch.randn_like(out), q, k, v, None, out, lse, 0.0, 2, 0.3, 0, 0, 4, 1, 5.0, slopes)
    torch.library.opcheck(BWD, bwd_args, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_head_dim_limit(device):
    q = torch.randn(1, 1, 4, 300, device=device)
    with pytest.raises(
        ValueError,
        match=r"backend 'triton' cannot run here: head dims D, Dv must be in \[1, 256\] for its kernels, got D=300",
    ):
        pyattn.scaled_dot_product_attention(q, q, q, backend="triton")
    with pytest.raises(ValueError, match="not canonical"):
        FWD(q, q, q, None, 0.0, 0, 0.1, 0, 0)
