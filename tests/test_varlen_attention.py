"""pyattn.varlen_attention (packed variable-length sequences) against the float64 reference run
on each sequence by itself, and against pyattn's and torch's sdpa on the padded batch with a key
padding mask, on every backend usable here (triton through the interpreter on CPU tensors, so
its shapes stay small; cuda on a GPU only).
"""

from __future__ import annotations

import importlib
import random

import pytest
import torch
import torch.nn.functional as F
from helpers import HAS_CUDA, assert_close_to_ref, assert_grads_close, backend_params

import pyattn
from pyattn import reference

BACKENDS = backend_params(cpu=True, triton=True, cuda=True)
# the module (pyattn.ops.varlen_attention the attribute is the function of that name)
vl = importlib.import_module("pyattn.ops.varlen_attention")
FWD, BWD = torch.ops.pyattn.varlen_attention_fwd, torch.ops.pyattn.varlen_attention_bwd


def dtypes_for(backend):
    if backend == "cpu":
        return [torch.float32, torch.float16, torch.bfloat16]  # the fused half CPU kernels
    if not HAS_CUDA:
        return [torch.float32]
    return [torch.float32, torch.float16, torch.bfloat16]


def cu_of(lengths, device="cpu") -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def random_lengths(B, lo, hi, specials=(0, 1)) -> list[int]:
    """B lengths in [lo, hi], with each of ``specials`` at a random place (when B allows)."""
    lens = [random.randint(lo, hi) for _ in range(B)]
    slots = random.sample(range(B), min(B, len(specials)))
    for slot, n in zip(slots, specials, strict=False):
        lens[slot] = n
    return lens


def packed(total, H, D, contiguous=True):
    if contiguous:
        return torch.randn(total, H, D, dtype=torch.float64)
    # the query of a fused (total, 3, H, D) QKV projection: a strided view
    return torch.randn(total, 3, H, D, dtype=torch.float64)[:, 1]


def run_case(backend, device, dtype, lens_q, lens_k, Hq, Hkv, D, Dv, causal=0, contiguous=True, scale=None):
    """Output and q/k/v gradients of the op (``causal`` as the ops': 0, 1, 2) against the float64
    reference and the reference in ``dtype``."""
    q = packed(sum(lens_q), Hq, D, contiguous)
    k = packed(sum(lens_k), Hkv, D, contiguous)
    v = packed(sum(lens_k), Hkv, Dv, contiguous)
    cq, ck = cu_of(lens_q), cu_of(lens_k)
    mq, mk = max(lens_q), max(lens_k)
    ins64 = [t.clone().requires_grad_() for t in (q, k, v)]
    ins_l = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    ins = [t.detach().to(device=device, dtype=dtype) for t in (q, k, v)]
    if not contiguous:
        ins = [torch.stack([t, t], 1)[:, 1] for t in ins]  # (total, 2, H, D) storage
        assert not ins[0].is_contiguous()
    ins = [t.requires_grad_() for t in ins]
    kw = dict(is_causal=causal, scale=scale, enable_gqa=Hq != Hkv)
    out = vl._varlen(*ins, cq.to(device), ck.to(device), mq, mk, 0.0, causal, scale, backend)
    out_l = reference.varlen_attention(*ins_l, cq, ck, **kw)
    out64 = reference.varlen_attention(*ins64, cq, ck, **kw)
    assert out.dtype == dtype and out.shape == (sum(lens_q), Hq, Dv)
    assert torch.isfinite(out).all()
    assert_close_to_ref("out", out, out_l, out64)
    g = torch.randn_like(out64)
    grads = torch.autograd.grad(out, ins, g.to(device, dtype), allow_unused=True)
    grads_l = torch.autograd.grad(out_l, ins_l, g.to(dtype), allow_unused=True)
    grads64 = torch.autograd.grad(out64, ins64, g, allow_unused=True)

    def z(gs, ts):  # the reference leaves a tensor no sequence reads without a gradient
        return [torch.zeros_like(t) if gr is None else gr for gr, t in zip(gs, ts, strict=True)]

    assert_grads_close(["query", "key", "value"], z(grads, ins), z(grads_l, ins_l), z(grads64, ins64))
    return out, grads


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("causal", [0, 1, 2], ids=["full", "causal", "lower_right"])
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_self_attention_length_mixes(backend, device, causal, gqa):
    # lengths 0 and 1 among random ones, spanning more than one kernel block
    hi = 40 if backend == "triton" and not HAS_CUDA else 150
    lens = random_lengths(5, 2, hi)
    Hq, Hkv = (4, 2) if gqa else (2, 2)
    for dtype in dtypes_for(backend):
        run_case(backend, device, dtype, lens, lens, Hq, Hkv, 16, 16, causal=causal)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("causal", [0, 1, 2], ids=["full", "causal", "lower_right"])
def test_cross_attention_lengths_differ(backend, device, causal):
    # Lq_b != Lk_b per sequence, one sequence without keys (its queries get zeros), one without
    # queries (its keys get zero gradients); causal rows with no key (lower-right, Lq_b > Lk_b)
    hi = 30 if backend == "triton" and not HAS_CUDA else 90
    lens_q = random_lengths(5, 1, hi, specials=(0, 7, 3))
    lens_k = random_lengths(5, 1, hi, specials=(5, 0, 1))
    for dtype in dtypes_for(backend):
        run_case(backend, device, dtype, lens_q, lens_k, 2, 1, 16, 8, causal=causal)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_odd_head_dim_and_scale(backend, device):
    lens = random_lengths(3, 1, 20)
    run_case(backend, device, torch.float32, lens, lens, 2, 2, 59, 24, causal=1, scale=-0.3)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    lens = random_lengths(3, 1, 25)
    run_case(backend, device, torch.float32, lens, lens, 2, 2, 16, 16, causal=1, contiguous=False)


def test_cpu_long_sequences():
    # several of the CPU kernels' query / key blocks per sequence (64 / 256 / 512 rows)
    lens_q = [random.randint(300, 700), random.randint(1, 64), random.randint(500, 800)]
    lens_k = [random.randint(300, 700), random.randint(600, 900), lens_q[2]]
    for causal in (0, 2):
        run_case("cpu", "cpu", torch.float32, lens_q, lens_k, 2, 1, 32, 32, causal=causal)


def test_all_sequences_empty_or_without_keys():
    q, k = torch.randn(4, 2, 8, requires_grad=True), torch.randn(0, 2, 8, requires_grad=True)
    v = torch.randn(0, 2, 8, requires_grad=True)
    for backend in ("cpu", "reference"):
        out = pyattn.varlen_attention(q, k, v, cu_of([0, 4, 0]), cu_of([0, 0, 0]), backend=backend)
        assert torch.equal(out, torch.zeros(4, 2, 8))
        (gq,) = torch.autograd.grad(out.sum(), [q])
        assert torch.equal(gq, torch.zeros_like(q))
    # no query at all
    out = pyattn.varlen_attention(q[:0], q, q, cu_of([0]), cu_of([4]))
    assert out.shape == (0, 2, 8)


# -- the padded batch: pyattn's and torch's sdpa with a key padding mask ----------------------------


def pad(t: torch.Tensor, lengths, L: int) -> torch.Tensor:
    """(total, H, D) packed -> (B, H, L, D) padded with zeros."""
    out = t.new_zeros(len(lengths), t.shape[1], L, t.shape[2])
    s = 0
    for b, n in enumerate(lengths):
        out[b, :, :n] = t[s : s + n].transpose(0, 1)
        s += n
    return out


def unpad(t: torch.Tensor, lengths) -> torch.Tensor:
    """(B, H, L, D) -> (total, H, D), the first lengths[b] rows of each entry."""
    return torch.cat([t[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)])


def key_padding_mask(lens_k, Lk):
    return (torch.arange(Lk)[None, :] < torch.tensor(lens_k)[:, None])[:, None, None, :]  # (B, 1, 1, Lk)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_equals_sdpa_on_padded_batch(backend, device, causal):
    # the same torch.manual_seed draws the same philox counters: packed == padded + key padding
    # mask, element for element of every valid row, forward and gradients
    small = backend == "triton" and not HAS_CUDA
    lens_q = random_lengths(4, 1, 20 if small else 70, specials=(0,))
    lens_k = lens_q if causal else random_lengths(4, 1, 20 if small else 70, specials=(1,))
    Hq, Hkv, D, p = 4, 2, 16, 0.3
    mq, mk = max(lens_q) + 3, max(lens_k) + 2  # any max_seqlen at least the longest: the padded L
    q, k, v = (
        torch.randn(sum(n), h, D, device=device) for n, h in ((lens_q, Hq), (lens_k, Hkv), (lens_k, Hkv))
    )
    ins = [t.requires_grad_() for t in (q, k, v)]
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    out = pyattn.varlen_attention(
        *ins, cu_of(lens_q, device), cu_of(lens_k, device), mq, mk, dropout_p=p, is_causal=causal,
        enable_gqa=True, backend=backend,
    )  # fmt: skip
    padded = [
        pad(t.detach(), n, L).requires_grad_()
        for t, n, L in ((q, lens_q, mq), (k, lens_k, mk), (v, lens_k, mk))
    ]
    mask = key_padding_mask(lens_k, mk).to(device)
    if causal:
        mask = mask & torch.ones(mq, mk, dtype=torch.bool, device=device).tril()
    torch.manual_seed(seed)
    out_p = pyattn.scaled_dot_product_attention(*padded, mask, dropout_p=p, enable_gqa=True, backend=backend)
    torch.testing.assert_close(out, unpad(out_p, lens_q), rtol=1e-5, atol=1e-5)
    plain = pyattn.varlen_attention(*ins, cu_of(lens_q, device), cu_of(lens_k, device), is_causal=causal,
                                    enable_gqa=True, backend=backend)  # fmt: skip
    assert not torch.allclose(out, plain), "dropout was not applied"
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, ins, g)
    grads_p = torch.autograd.grad(out_p, padded, pad(g, lens_q, mq))
    for name, a, b, n in zip("qkv", grads, grads_p, (lens_q, lens_k, lens_k), strict=True):
        torch.testing.assert_close(
            a, unpad(b, n), rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}"
        )


def test_dropout_matches_reference_with_the_padded_keep_mask():
    # the op's draws are the keep-mask of the padded (B, Hq, max_q, max_k) batch, in float64
    lens_q, lens_k = random_lengths(3, 1, 30), random_lengths(3, 1, 30, specials=(2,))
    Hq, D, p, seed, offset = 2, 8, 0.4, random.randrange(2**40), random.randrange(2**30)
    mq, mk = max(lens_q) + 1, max(lens_k)
    q, k, v = (torch.randn(sum(n), Hq, D, dtype=torch.float64) for n in (lens_q, lens_k, lens_k))
    for causal in (0, 1, 2):
        out, _ = FWD(q, k, v, cu_of(lens_q), cu_of(lens_k), mq, mk, p, causal, 0.5, seed, offset)
        keep = reference.dropout_keep_mask(seed, offset, (3, Hq, mq, mk), p)
        ref = reference.varlen_attention(
            q, k, v, cu_of(lens_q), cu_of(lens_k), dropout_p=p, is_causal=causal, scale=0.5, dropout_mask=keep
        )
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_matches_torch_sdpa_on_padded_batch():
    # torch as the oracle: its SDPA in float64 on the padded batch with the key padding mask
    lens_q = random_lengths(4, 1, 60, specials=())
    lens_k = random_lengths(4, 1, 60, specials=())
    mq, mk = max(lens_q), max(lens_k)
    q, k, v = (torch.randn(sum(n), 3, 16, dtype=torch.float64) for n in (lens_q, lens_k, lens_k))
    ins = [t.clone().float().requires_grad_() for t in (q, k, v)]
    out = pyattn.varlen_attention(*ins, cu_of(lens_q), cu_of(lens_k))
    t64 = [pad(t, n, L).requires_grad_() for t, n, L in ((q, lens_q, mq), (k, lens_k, mk), (v, lens_k, mk))]
    ot = F.scaled_dot_product_attention(*t64, key_padding_mask(lens_k, mk))
    out_l = reference.varlen_attention(*(t.float() for t in (q, k, v)), cu_of(lens_q), cu_of(lens_k))
    assert_close_to_ref("out vs torch", out, out_l, unpad(ot, lens_q))


# -- autograd, registration, compile ------------------------------------------------------------


@pytest.mark.parametrize("variant", ["plain", "causal_gqa", "lower_right_cross", "dropout"])
def test_gradcheck_float64(variant):
    lens_q, lens_k, Hq, Hkv, causal, p = [3, 0, 4, 1], [3, 0, 4, 1], 2, 2, 0, 0.0
    if variant == "causal_gqa":
        Hkv, causal = 1, 1
    elif variant == "lower_right_cross":
        lens_k, causal = [2, 3, 5, 0], 2
    elif variant == "dropout":
        p = 0.3
    ins = [
        torch.randn(sum(lens_q), Hq, 4, dtype=torch.float64, requires_grad=True),
        torch.randn(sum(lens_k), Hkv, 4, dtype=torch.float64, requires_grad=True),
        torch.randn(sum(lens_k), Hkv, 3, dtype=torch.float64, requires_grad=True),
    ]
    cq, ck = cu_of(lens_q), cu_of(lens_k)

    def f(q, k, v):  # a fixed dropout seed, so every evaluation draws the same mask
        return FWD(q, k, v, cq, ck, max(lens_q), max(lens_k), p, causal, 0.7, 42, 7)[0]

    assert torch.autograd.gradcheck(f, ins)
    if p == 0.0 and causal != 2:
        assert torch.autograd.gradcheck(
            lambda *a: pyattn.varlen_attention(
                *a, cq, ck, is_causal=bool(causal), enable_gqa=True, backend="cpu"
            ),
            ins,
        )


def _opcheck_args(Hkv=1, p=0.2, causal=1, device="cpu"):
    lens_q, lens_k = [3, 0, 5], [4, 2, 5]
    q = torch.randn(sum(lens_q), 2, 8, device=device, requires_grad=True)
    k = torch.randn(sum(lens_k), Hkv, 8, device=device, requires_grad=True)
    v = torch.randn(sum(lens_k), Hkv, 6, device=device, requires_grad=True)
    return (q, k, v, cu_of(lens_q, device), cu_of(lens_k, device), 5, 6, p, causal, 0.35, 5, 11)


@pytest.mark.parametrize("variant", ["plain", "causal_gqa_dropout"])
def test_opcheck(variant):
    args = _opcheck_args(2, 0.0, 0) if variant == "plain" else _opcheck_args()
    torch.library.opcheck(FWD, args)
    out, lse = FWD(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    q, k, v, cq, ck = (a.detach() for a in args[:5])
    torch.library.opcheck(BWD, (torch.randn_like(out), q, k, v, cq, ck, out, lse, *args[5:]))


@pytest.mark.skipif(not pyattn._backend.have_triton(), reason="needs triton")
def test_opcheck_triton():
    device = "cuda" if HAS_CUDA else "cpu"
    import pyattn.kernels.varlen_attention  # noqa: F401  (registers the Triton twins)

    fwd, bwd = torch.ops.pyattn.varlen_attention_fwd_triton, torch.ops.pyattn.varlen_attention_bwd_triton
    args = _opcheck_args(device=device)
    # under the interpreter the AOT/compile checks cannot run (as for sdpa's Triton ops)
    utils = None if HAS_CUDA else ("test_schema", "test_autograd_registration", "test_faketensor")
    kw = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(fwd, args, **kw)
    out, lse = fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    q, k, v, cq, ck = (a.detach() for a in args[:5])
    torch.library.opcheck(bwd, (torch.randn_like(out), q, k, v, cq, ck, out, lse, *args[5:]), **kw)


def test_torch_compile_fullgraph():
    def f(q, k, v, cq, ck):
        out = pyattn.varlen_attention(torch.tanh(q), k, v, cq, ck, 9, 11, is_causal=True, enable_gqa=True,
                                      backend="cpu")  # fmt: skip
        return out * 2

    lens_q, lens_k = [4, 0, 9, 1], [6, 3, 11, 1]
    cq, ck = cu_of(lens_q), cu_of(lens_k)
    ins = [torch.randn(sum(lens_q), 4, 16), torch.randn(sum(lens_k), 2, 16), torch.randn(sum(lens_k), 2, 8)]
    ins = [t.requires_grad_() for t in ins]
    for backend in ("aot_eager", "inductor"):
        compiled = torch.compile(f, fullgraph=True, backend=backend)
        out_c, out_e = compiled(*ins, cq, ck), f(*ins, cq, ck)
        torch.testing.assert_close(out_c, out_e)
        g = torch.randn_like(out_e)
        for a, b in zip(torch.autograd.grad(out_c, ins, g), torch.autograd.grad(out_e, ins, g), strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_on_cpu_is_sdpa_per_sequence(dtype):
    # The cpu backend runs half inputs through the fused half kernels (float32 statistics and
    # accumulators), the same as pyattn's sdpa on each sequence alone; lse is float32.
    lens = random_lengths(4, 1, 40)
    ins = [torch.randn(sum(lens), 4, 16, dtype=dtype, requires_grad=True) for _ in range(3)]
    cq = cu_of(lens)
    out = pyattn.varlen_attention(*ins, cq, cq, is_causal=True, backend="cpu")
    assert out.dtype == dtype
    _, lse = FWD(*(t.detach() for t in ins), cq, cq, max(lens), max(lens), 0.0, 1, 0.25, 0, 0)
    assert lse.dtype == torch.float32
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, ins, g)
    for b in range(len(lens)):
        s, e = int(cq[b]), int(cq[b + 1])
        if e == s:
            continue
        seq = [t.detach()[s:e].transpose(0, 1).unsqueeze(0).requires_grad_() for t in ins]  # (1, H, L, D)
        ref = pyattn.scaled_dot_product_attention(*seq, is_causal=True, backend="cpu")
        torch.testing.assert_close(out[s:e], ref[0].transpose(0, 1), rtol=0, atol=0)
        ref_g = torch.autograd.grad(ref, seq, g[s:e].transpose(0, 1).unsqueeze(0))
        for got, want in zip(grads, ref_g, strict=True):
            torch.testing.assert_close(got[s:e], want[0].transpose(0, 1), rtol=2e-2, atol=2e-3)


def test_max_seqlen_beyond_the_longest_changes_nothing_without_dropout():
    lens = random_lengths(3, 1, 30)
    q, k, v = (torch.randn(sum(lens), 2, 8) for _ in range(3))
    cq = cu_of(lens)
    a = pyattn.varlen_attention(q, k, v, cq, cq)
    b = pyattn.varlen_attention(q, k, v, cq, cq, max(lens) + 17, max(lens) + 5)
    assert torch.equal(a, b)


# -- bad input ---------------------------------------------------------------------------------------


def _good():
    lens_q, lens_k = [3, 5], [4, 2]
    return dict(
        query=torch.randn(8, 4, 8), key=torch.randn(6, 4, 8), value=torch.randn(6, 4, 6),
        cu_seqlens_q=cu_of(lens_q), cu_seqlens_k=cu_of(lens_k),
    )  # fmt: skip


@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        (dict(query=torch.randn(8, 32)), ValueError, r"'query' must be 3-D \(total, H, D\) packed tokens, got 2-D \(8, 32\)"),
        (dict(key=torch.randn(6, 4, 9)), ValueError, r"'key' head dim must match query's D=8, got key \(6, 4, 9\)"),
        (dict(value=torch.randn(5, 4, 6)), ValueError, r"'value' must have key's \(total_k, Hkv\) = \(6, 4\), got value \(5, 4, 6\)"),
        (dict(key=torch.randn(6, 2, 8), value=torch.randn(6, 2, 6)), ValueError, r"query has 4 heads and key/value 2: pass enable_gqa=True"),
        (dict(key=torch.randn(6, 3, 8), value=torch.randn(6, 3, 6), enable_gqa=True), ValueError, r"key/value heads must divide query's: got Hq=4, Hkv=3"),
        (dict(value=torch.randn(6, 4, 6, dtype=torch.float64)), TypeError, r"must share one dtype, got query torch.float32, key torch.float32, value torch.float64"),
        (dict(query=torch.ones(8, 4, 8, dtype=torch.long)), TypeError, r"must be floating-point tensors, got torch.int64"),
        (dict(key=torch.randn(6, 4, 8, device="meta")), RuntimeError, r"must be on one device, got query on cpu, key on meta"),
        (dict(query=[[1.0]]), TypeError, r"'query' must be a torch.Tensor, got list"),
        (dict(cu_seqlens_q=[0, 3, 8]), TypeError, r"'cu_seqlens_q' must be a torch.Tensor, got list"),
        (dict(cu_seqlens_q=cu_of([3, 5]).long()), TypeError, r"'cu_seqlens_q' must be int32, got torch.int64"),
        (dict(cu_seqlens_k=cu_of([4, 2])[None]), ValueError, r"'cu_seqlens_k' must be 1-D \(B \+ 1,\), got \(1, 3\)"),
        (dict(cu_seqlens_k=cu_of([4, 1, 1])), ValueError, r"must hold one entry per sequence plus one .* got \(3\) and \(4\)"),
        (dict(cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError, r"'cu_seqlens_q' must start at 0, got cu_seqlens_q\[0\] = 1"),
        (dict(cu_seqlens_q=torch.tensor([0, 5, 3, 8], dtype=torch.int32), cu_seqlens_k=cu_of([4, 0, 2])), ValueError, r"'cu_seqlens_q' must be non-decreasing .* cu_seqlens_q\[1\] = 5 > cu_seqlens_q\[2\] = 3"),
        (dict(cu_seqlens_k=cu_of([4, 1])), ValueError, r"'cu_seqlens_k' must end at the packed length 6, got cu_seqlens_k\[-1\] = 5"),
        (dict(cu_seqlens_k=cu_of([4, 2], "meta")), RuntimeError, r"'cu_seqlens_k' is on meta but query is on cpu"),
        (dict(max_seqlen_q=4), ValueError, r"'max_seqlen_q' must be at least the longest sequence, 5, got 4"),
        (dict(max_seqlen_k=2.0), TypeError, r"'max_seqlen_k' must be an int or None, got float"),
        (dict(dropout_p=1.5), ValueError, r"'dropout_p' must be in \[0, 1\], got 1.5"),
        (dict(dropout_p="0.1"), TypeError, r"'dropout_p' must be a float, got str"),
        (dict(scale="1"), TypeError, r"'scale' must be a float or None, got str"),
        (dict(is_causal=1), TypeError, r"'is_causal' must be a bool, got int"),
    ],
)  # fmt: skip
def test_bad_inputs(change, exc, pattern):
    args = {**_good(), **change}
    with pytest.raises(exc, match=r"^varlen_attention: (.* )?" + pattern):
        pyattn.varlen_attention(**args)


def test_backend_names_and_error_classes():
    with pytest.raises(ValueError, match="not a pyattn backend"):
        pyattn.varlen_attention(**_good(), backend="tpu")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="'cuda' cannot run here"):
            pyattn.varlen_attention(**_good(), backend="cuda")
    # every input error is both of torch's usual classes
    with pytest.raises(ValueError) as e:
        pyattn.varlen_attention(**{**_good(), "max_seqlen_q": 1})
    assert isinstance(e.value, RuntimeError)


@pytest.mark.parametrize(
    "cq,ck,pattern",
    [
        ([1, 3, 8], [0, 4, 6], r"argument 'cu_seqlens_q': expected cu_seqlens_q\[0\] = 0, got 1"),
        ([0, 3, 9], [0, 4, 6], r"expected cu_seqlens_q\[-1\] = the packed length 8, got 9"),
        (
            [0, 4, 3, 8],
            [0, 4, 4, 6],
            r"'cu_seqlens_q': expected non-decreasing .* cu_seqlens_q\[1\] = 4 > cu_seqlens_q\[2\] = 3",
        ),
        ([0, 3, 8], [0, 4], r"'cu_seqlens_q/cu_seqlens_k': expected int32 \(B \+ 1,\)"),
    ],
)
def test_op_checks_direct_calls(cq, ck, pattern):
    g = _good()
    args = (
        g["query"],
        g["key"],
        g["value"],
        torch.tensor(cq, dtype=torch.int32),
        torch.tensor(ck, dtype=torch.int32),
    )
    with pytest.raises(RuntimeError, match=pattern):
        FWD(*args, 8, 8, 0.0, 0, 1.0, 0, 0)


def test_op_refuses_max_seqlen_below_a_length():
    g = _good()
    with pytest.raises(RuntimeError, match="longer than max_seqlen"):
        FWD(*g.values(), 4, 8, 0.0, 0, 1.0, 0, 0)


def test_cpu_work_split_inference_mode_and_thread_counts():
    # many (sequence, head) units go to the threads as tasks, few run one sequence at a time over
    # every thread: both give the reference's result, under inference_mode too
    lens = random_lengths(8, 1, 90)
    q, k, v = (torch.randn(sum(lens), 4, 16, dtype=torch.float64) for _ in range(3))
    cq = cu_of(lens)
    ref = reference.varlen_attention(q, k, v, cq, cq, is_causal=True)
    threads = torch.get_num_threads()
    try:
        for n in {1, 2, threads}:
            torch.set_num_threads(n)
            with torch.inference_mode():
                out = pyattn.varlen_attention(q, k, v, cq, cq, is_causal=True)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
            ins = [t.clone().requires_grad_() for t in (q, k, v)]
            grads = torch.autograd.grad(pyattn.varlen_attention(*ins, cq, cq, is_causal=True).sum(), ins)
            ins_r = [t.clone().requires_grad_() for t in (q, k, v)]
            grads_r = torch.autograd.grad(
                reference.varlen_attention(*ins_r, cq, cq, is_causal=True).sum(), ins_r
            )
            for a, b in zip(grads, grads_r, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    finally:
        torch.set_num_threads(threads)
