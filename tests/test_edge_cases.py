"""Edge cases of both ops, the same on every backend usable here: empty sizes, rows with
no key, length and head dim 1, huge logits, NaN propagation, strided inputs, and the error paths
not covered by tests/test_additive_attention.py and tests/test_sdpa.py.

Conventions checked (pyattn.reference, docs/design.md): a row with no key to attend to (Lk = 0, every
key padded / masked) gives zeros and zero gradients, where torch may give NaN.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import FLOOR, assert_close_to_ref, backend_params

import pyattn
from pyattn import reference

BACKENDS = [
    p
    for p in backend_params(cpu=True, triton=True, cuda=True)
    if p.values[0] in pyattn.backends() or p.id == "cuda"
]


def _leaf(t, device):
    return t.detach().to(device).requires_grad_()


def _additive(backend, device, q, k, val, v, mask=None):
    """(out, grads) of the backend, and of the reference in float32 and float64, for the same
    float64 values; the upstream gradient is random."""
    res = {}
    g = torch.randn(q.shape[0], q.shape[1], val.shape[2], dtype=torch.float64)
    for key, dtype, dev in (
        ("out", torch.float32, device),
        ("low", torch.float32, "cpu"),
        ("f64", torch.float64, "cpu"),
    ):
        ins = [_leaf(t.to(dtype), dev) for t in (q, k, val, v)]
        m = None if mask is None else mask.to(dev)
        if key == "out":
            o = pyattn.additive_attention(*ins, m, backend=backend)
        else:
            o = reference.additive_attention(*ins, m)
        grads = (
            torch.autograd.grad((o * g.to(dev, dtype)).sum(), ins, allow_unused=True)
            if o.numel()
            else [None] * 4
        )
        grads = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, ins, strict=True)]
        res[key] = (o.detach(), grads)
    return res


def _sdpa(backend, device, q, k, val, mask=None, **kw):
    res = {}
    g = torch.randn(*q.shape[:-1], val.shape[-1], dtype=torch.float64)
    for key, dtype, dev in (
        ("out", torch.float32, device),
        ("low", torch.float32, "cpu"),
        ("f64", torch.float64, "cpu"),
    ):
        ins = [_leaf(t.to(dtype), dev) for t in (q, k, val)]
        m = None if mask is None else mask.to(dev) if mask.dtype == torch.bool else mask.to(dev, dtype)
        if key == "out":
            o = pyattn.scaled_dot_product_attention(*ins, m, backend=backend, **kw)
        else:
            o = reference.scaled_dot_product_attention(*ins, m, **kw)
        grads = (
            torch.autograd.grad((o * g.to(dev, dtype)).sum(), ins, allow_unused=True)
            if o.numel()
            else [None] * 3
        )
        grads = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, ins, strict=True)]
        res[key] = (o.detach(), grads)
    return res


def _check(res, names, grad_floor=None):
    out, grads = res["out"]
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert_close_to_ref("out", out, res["low"][0], res["f64"][0])
    for i, name in enumerate(names):
        g64 = res["f64"][1][i]
        floor = None
        if grad_floor is not None:
            floor = FLOOR[torch.float32] * max(
                1.0, grad_floor, g64.abs().max().item() if g64.numel() else 0.0
            )
        assert_close_to_ref(f"grad {name}", grads[i], res["low"][1][i], g64, factor=3.0, floor=floor)


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


# -- empty sizes --------------------------------------------------------------------------------


def _grads(out, ins):
    """Gradients of a random projection of ``out``; zeros where autograd has none (no path)."""
    g = (
        torch.autograd.grad((out * torch.randn_like(out)).sum(), ins, allow_unused=True)
        if out.requires_grad
        else [None] * len(ins)
    )
    return [torch.zeros_like(x) if gr is None else gr for gr, x in zip(g, ins, strict=True)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("B,Tq,Tk", [(0, 3, 5), (2, 0, 5), (2, 3, 0), (0, 0, 0)])
def test_additive_empty(backend, device, B, Tq, Tk):
    H, Dv = 6, 3
    ins = [_leaf(t.float(), device) for t in (rand(B, Tq, H), rand(B, Tk, H), rand(B, Tk, Dv), rand(H))]
    out = pyattn.additive_attention(*ins, backend=backend)
    grads = _grads(out, ins)
    assert out.shape == (B, Tq, Dv) and out.device.type == torch.device(device).type
    assert torch.all(out == 0), "no key (or no query) gives zeros"
    for g, shape in zip(grads, [(B, Tq, H), (B, Tk, H), (B, Tk, Dv), (H,)], strict=True):
        assert g.shape == shape and torch.all(g == 0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("B,Lq,Lk", [(0, 3, 5), (2, 0, 5), (2, 3, 0), (0, 0, 0)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sdpa_empty(backend, device, B, Lq, Lk, causal):
    H, E, Dv = 2, 4, 3
    ins = [_leaf(t.float(), device) for t in (rand(B, H, Lq, E), rand(B, H, Lk, E), rand(B, H, Lk, Dv))]
    out = pyattn.scaled_dot_product_attention(*ins, is_causal=causal, backend=backend)
    grads = _grads(out, ins)
    assert out.shape == (B, H, Lq, Dv)
    assert torch.all(out == 0), "no key (or no query) gives zeros (torch: NaN for Lk = 0)"
    for g, shape in zip(grads, [(B, H, Lq, E), (B, H, Lk, E), (B, H, Lk, Dv)], strict=True):
        assert g.shape == shape and torch.all(g == 0)


@pytest.mark.parametrize("op", ["additive", "sdpa"])
def test_reference_backend_no_keys(op):
    if op == "additive":
        out = pyattn.additive_attention(
            torch.randn(2, 3, 4),
            torch.randn(2, 0, 4),
            torch.randn(2, 0, 5),
            torch.randn(4),
            backend="reference",
        )
        assert out.shape == (2, 3, 5) and torch.all(out == 0)
    else:
        q, k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 0, 4), torch.randn(2, 2, 0, 5)
        out = pyattn.scaled_dot_product_attention(q, k, v, backend="reference")
        assert out.shape == (2, 2, 3, 5) and torch.all(out == 0)


# -- rows with no key ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_additive_fully_padded_rows_zero_output_and_grads(backend, device):
    B, Tq, Tk, H, Dv = 3, 4, 6, 5, 3
    mask = torch.rand(B, Tk) < 0.3
    mask[1] = True  # batch 1: every key is padding
    res = _additive(backend, device, rand(B, Tq, H), rand(B, Tk, H), rand(B, Tk, Dv), rand(H), mask)
    _check(res, ["query", "key", "value", "v"])
    out, (dq, dk, dval, _) = res["out"]
    assert torch.all(out[1] == 0) and torch.all(dq[1] == 0)
    assert torch.all(dk[1] == 0) and torch.all(dval[1] == 0)
    padded = mask.to(dk.device)
    assert torch.all(dk[padded] == 0) and torch.all(dval[padded] == 0), "padding keys get no gradient"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_fully_masked_rows_zero_output_and_grads(backend, device, kind):
    B, H, Lq, Lk, E = 2, 2, 5, 6, 4
    allowed = torch.rand(B, H, Lq, Lk) < 0.7
    allowed[0, 1, 2] = False  # one row with no key
    allowed[1, :, :, 3] = False  # one key nobody may see
    mask = (
        allowed
        if kind == "bool"
        else torch.zeros(B, H, Lq, Lk, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    )
    res = _sdpa(backend, device, rand(B, H, Lq, E), rand(B, H, Lk, E), rand(B, H, Lk, E), mask)
    _check(res, ["query", "key", "value"])
    out, (dq, dk, dv) = res["out"]
    empty = ~allowed.any(-1)
    assert torch.all(out[empty.to(out.device)] == 0) and torch.all(dq[empty.to(dq.device)] == 0)
    assert torch.all(dk[1, :, 3] == 0) and torch.all(dv[1, :, 3] == 0), "a key nobody sees gets no gradient"


# -- length 1, head dim 1 -----------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_additive_length_and_head_dim_one(backend, device):
    q, k, val, v = rand(2, 1, 1), rand(2, 1, 1), rand(2, 1, 1), rand(1)
    res = _additive(backend, device, q, k, val, v)
    _check(res, ["query", "key", "value", "v"], grad_floor=1.0)
    # one key: weight exactly 1, so the context is the value and dq, dk, dv are 0
    torch.testing.assert_close(res["out"][0].cpu(), val.float(), rtol=0, atol=1e-6)
    res = _additive(backend, device, rand(2, 3, 1), rand(2, 4, 1), rand(2, 4, 1), rand(1))
    _check(res, ["query", "key", "value", "v"], grad_floor=4.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sdpa_length_and_head_dim_one(backend, device, causal):
    q, k, val = rand(1, 2, 1, 1), rand(1, 2, 1, 1), rand(1, 2, 1, 1)
    res = _sdpa(backend, device, q, k, val, is_causal=causal)
    _check(res, ["query", "key", "value"], grad_floor=1.0)
    torch.testing.assert_close(res["out"][0].cpu(), val.float(), rtol=0, atol=1e-6)
    res = _sdpa(backend, device, rand(2, 2, 3, 1), rand(2, 2, 5, 1), rand(2, 2, 5, 1), is_causal=causal)
    _check(res, ["query", "key", "value"], grad_floor=5.0)


# -- huge logits --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["pos", "neg"])
def test_additive_huge_logits(backend, device, sign):
    # |e_ij| up to ~1e4: the softmax must subtract the row max, never exp() the raw scores
    B, Tq, Tk, H, Dv = 2, 4, 7, 3, 5
    v = torch.full((H,), sign * 1e4 / H, dtype=torch.float64) * (1 + 0.1 * rand(H))
    q, k, val = rand(B, Tq, H), rand(B, Tk, H), rand(B, Tk, Dv)
    res = _additive(backend, device, q, k, val, v)
    out, grads = res["out"]
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    # The floor of test_sdpa_huge_logits, for the same reason: float32 rounds each e_ij ~ 1e4 by
    # ~1e-3, which moves the weights of near-tied keys by ~1e-3 relative however a kernel sums, so
    # two float32 implementations differ by a few ulp(max |e|) x max |value| (the 2x rule alone
    # failed on a near tie where the float32 reference rounded luckily).
    scores = (torch.tanh(q[:, :, None, :] + k[:, None, :, :]) * v).sum(-1)  # (B, Tq, Tk)
    floor = 4 * torch.finfo(torch.float32).eps * scores.abs().max().item() * val.abs().max().item()
    assert_close_to_ref("out", out, res["low"][0], res["f64"][0], floor=floor)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["pos", "neg"])
@pytest.mark.parametrize("mask", [None, "float"])
def test_sdpa_huge_logits(backend, device, sign, mask):
    B, H, Lq, Lk, E = 1, 2, 5, 7, 4
    q = sign * 1e2 * rand(B, H, Lq, E)  # scores ~ +-1e4 with k ~ 1e2 / sqrt(E) scale
    k = 1e2 * rand(B, H, Lk, E)
    m = None if mask is None else 1e4 * rand(B, H, Lq, Lk)
    val = rand(B, H, Lk, E)
    res = _sdpa(backend, device, q, k, val, m)
    out, grads = res["out"]
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    # At |scores| ~ 1e4 float32 rounds each score by ~1e-3, which moves the weights of near-tied
    # keys by ~1e-3 relative however the kernel sums: any two float32 implementations differ by
    # up to a few ulp(max |score|) x max |value|, so that is the floor (seen: 3.5e-4 vs 1.7e-5 from
    # the 2x rule alone, on a near tie the float32 reference happened to round luckily).
    scores = (q @ k.transpose(-2, -1)) / E**0.5 + (0 if m is None else m)
    floor = 4 * torch.finfo(torch.float32).eps * scores.abs().max().item() * val.abs().max().item()
    assert_close_to_ref("out", out, res["low"][0], res["f64"][0], floor=floor)


# -- NaN propagates to the rows it touches and no further ----------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_additive_nan_propagation(backend, device):
    B, Tq, Tk, H, Dv = 2, 4, 5, 3, 2
    q, k, val, v = rand(B, Tq, H), rand(B, Tk, H), rand(B, Tk, Dv), rand(H)
    ref = reference.additive_attention(q, k, val, v)
    # NaN in query row (0, 1): only context row (0, 1)
    qn = q.clone()
    qn[0, 1, 0] = float("nan")
    out = pyattn.additive_attention(*(t.float().to(device) for t in (qn, k, val, v)), backend=backend).cpu()
    nan_rows = torch.isnan(out).any(-1)
    expected = torch.zeros(B, Tq, dtype=torch.bool)
    expected[0, 1] = True
    assert torch.equal(nan_rows, expected), f"NaN rows {nan_rows.tolist()} != {expected.tolist()}"
    torch.testing.assert_close(out[~expected], ref[~expected].float(), rtol=1e-5, atol=1e-5)
    # NaN in (unpadded) key row (1, 2): every query of batch 1 attends to it, batch 0 does not
    kn = k.clone()
    kn[1, 2, 1] = float("nan")
    out = pyattn.additive_attention(*(t.float().to(device) for t in (q, kn, val, v)), backend=backend).cpu()
    assert torch.isnan(out[1]).all(-1).all() and torch.isfinite(out[0]).all()
    torch.testing.assert_close(out[0], ref[0].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sdpa_nan_propagation(backend, device):
    B, H, Lq, Lk, E = 2, 2, 5, 5, 4
    q, k, val = rand(B, H, Lq, E), rand(B, H, Lk, E), rand(B, H, Lk, E)
    ref = reference.scaled_dot_product_attention(q, k, val, is_causal=True)

    def run(q, k):
        return pyattn.scaled_dot_product_attention(
            *(t.float().to(device) for t in (q, k, val)), is_causal=True, backend=backend
        ).cpu()

    qn = q.clone()
    qn[1, 0, 3, 2] = float("nan")
    out = run(qn, k)
    expected = torch.zeros(B, H, Lq, dtype=torch.bool)
    expected[1, 0, 3] = True
    assert torch.equal(torch.isnan(out).any(-1), expected), "NaN in one query row reaches only that row"
    torch.testing.assert_close(out[~expected], ref[~expected].float(), rtol=1e-5, atol=1e-5)
    # NaN in key 2 of (0, 1): causal rows 2.. of that head attend to it, rows 0, 1 do not
    kn = k.clone()
    kn[0, 1, 2, 0] = float("nan")
    out = run(q, kn)
    expected = torch.zeros(B, H, Lq, dtype=torch.bool)
    expected[0, 1, 2:] = True
    assert torch.equal(torch.isnan(out).any(-1), expected), (
        f"NaN key must reach exactly the rows that attend to it: got {torch.isnan(out).any(-1)[0, 1].tolist()}"
    )
    torch.testing.assert_close(out[~expected], ref[~expected].float(), rtol=1e-5, atol=1e-5)


# -- expanded / transposed / sliced inputs --------------------------------------------------------


def _strided(t, layout):
    if layout == "expanded":
        return t[:1].expand_as(t)
    if layout == "transposed":
        return t.permute(*reversed(range(t.dim()))).contiguous().permute(*reversed(range(t.dim())))
    wide = torch.zeros(*t.shape[:-1], 3 * t.shape[-1], dtype=t.dtype)
    wide[..., 1::3] = t
    return wide[..., 1::3]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["expanded", "transposed", "sliced"])
def test_strided_inputs_both_ops(backend, device, layout):
    q, k, val, v = rand(2, 5, 6), rand(2, 7, 6), rand(2, 7, 3), rand(6)
    ins = [_strided(t, layout) for t in (q, k, val)]
    assert not all(t.is_contiguous() for t in ins)
    _check(_additive(backend, device, *ins, v), ["query", "key", "value", "v"])
    q, k, val = rand(2, 2, 5, 7), rand(2, 2, 6, 7), rand(2, 2, 6, 5)
    ins = [_strided(t, layout) for t in (q, k, val)]
    mask = torch.rand(2, 1, 5, 6) < 0.7
    _check(_sdpa(backend, device, *ins, mask), ["query", "key", "value"])


# -- error paths not covered by the ops' own test files ------------------------------------------


def _add_good():
    return [torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 4), torch.randn(8)]


def _sdpa_good():
    return [torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 6)]


@pytest.mark.parametrize(
    "index,bad,exc,pattern",
    [
        (1, torch.ones(2, 5, 8, dtype=torch.int32), TypeError, r"'key' must be a floating-point tensor, got torch.int32"),
        (2, torch.ones(2, 5, 4, dtype=torch.bool), TypeError, r"'value' must be a floating-point tensor, got torch.bool"),
        (3, torch.ones(8, dtype=torch.long), TypeError, r"'v' must be a floating-point tensor, got torch.int64"),
        (1, torch.randn(2, 5, 8, device="meta"), ValueError, r"'key' is on meta but query is on cpu"),
        (2, torch.randn(2, 5, 4, device="meta"), ValueError, r"'value' is on meta but query is on cpu"),
        (3, torch.randn(8, device="meta"), ValueError, r"'v' is on meta but query is on cpu"),
    ],
)  # fmt: skip
def test_additive_bad_inputs(index, bad, exc, pattern):
    args = _add_good()
    args[index] = bad
    with pytest.raises(exc, match=pattern):
        pyattn.additive_attention(*args)


def test_additive_mask_on_other_device():
    mask = torch.zeros(2, 5, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match=r"'key_padding_mask' is on meta but query is on cpu"):
        pyattn.additive_attention(*_add_good(), mask)


@pytest.mark.parametrize(
    "index,bad,kwargs,exc,pattern",
    [
        (1, torch.ones(2, 4, 7, 8, dtype=torch.int64), {}, TypeError, r"must share one dtype, got query torch.float32, key torch.int64"),
        (2, torch.ones(2, 4, 7, 6, dtype=torch.bool), {}, TypeError, r"must share one dtype, got .* value torch.bool"),
        (2, torch.randn(2, 4, 7, 6, device="meta"), {}, RuntimeError, r"must be on one device, got query on cpu, key on cpu, value on meta"),
        (None, None, {"attn_mask": torch.ones(5, 7, dtype=torch.bool, device="meta")}, RuntimeError, r"'attn_mask' is on meta but query is on cpu"),
        (None, None, {"dropout_p": 1.5}, RuntimeError, r"'dropout_p' must be in \[0, 1\], got 1.5"),
        (None, None, {"dropout_p": float("nan")}, RuntimeError, r"'dropout_p' must be in \[0, 1\], got nan"),
        (None, None, {"dropout_p": float("inf")}, RuntimeError, r"'dropout_p' must be in \[0, 1\], got inf"),
        (None, None, {"dropout_p": "0.1"}, TypeError, r"'dropout_p' must be a float, got str"),
        (None, None, {"scale": "2"}, TypeError, r"'scale' must be a float or None, got str"),
    ],
)  # fmt: skip
def test_sdpa_bad_inputs(index, bad, kwargs, exc, pattern):
    args = _sdpa_good()
    if index is not None:
        args[index] = bad
    with pytest.raises(exc, match=pattern):
        pyattn.scaled_dot_product_attention(*args, **kwargs)


def test_unsupported_dtype_names_backend_and_dtypes():
    # triton takes float16/bfloat16/float32: float64 is refused clearly (cpu takes every float
    # dtype: half inputs run in float32 inside the kernel and are rounded once)
    add = [t.double() for t in _add_good()]
    with pytest.raises(RuntimeError, match=r"backend 'triton' cannot run here: it takes .* got float64"):
        pyattn.additive_attention(*add, backend="triton")
    sd = [t.double() for t in _sdpa_good()]
    with pytest.raises(RuntimeError, match=r"backend 'triton' cannot run here: it takes .* got float64"):
        pyattn.scaled_dot_product_attention(*sd, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_kernels_round_once(dtype):
    add = [t.to(dtype) for t in _add_good()]
    ctx, w = pyattn.additive_attention(*add, return_weights=True, backend="cpu")
    assert ctx.dtype == w.dtype == dtype
    ref_low = reference.additive_attention(*add, return_weights=True)
    ref64 = reference.additive_attention(*[t.double() for t in add], return_weights=True)
    # one rounding of a float32 result: well inside the error of the half reference graph
    assert_close_to_ref("context", ctx, ref_low[0], ref64[0])
    assert_close_to_ref("weights", w, ref_low[1], ref64[1])


def test_default_backend_falls_back_for_any_float_dtype():
    # backend=None never refuses a floating dtype: it runs the reference where no kernel takes it
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        out = pyattn.additive_attention(*[t.to(dtype) for t in _add_good()])
        assert out.dtype == dtype and torch.isfinite(out).all()
        out = pyattn.scaled_dot_product_attention(*[t.to(dtype) for t in _sdpa_good()])
        assert out.dtype == dtype and torch.isfinite(out).all()
    assert math.isfinite(FLOOR[torch.float32])


def test_triton_sdpa_head_dim_limit_is_a_clear_error():
    if "triton" not in pyattn.backends():
        pytest.fail("triton is a CPU-runnable backend here (interpreter) and must be listed")
    q, k, v = torch.randn(1, 1, 2, 257), torch.randn(1, 1, 3, 257), torch.randn(1, 1, 3, 4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with pytest.raises(
        ValueError, match=r"head dims D, Dv must be in \[1, 256\] for its kernels, got D=257, Dv=4"
    ):
        pyattn.scaled_dot_product_attention(q.to(device), k.to(device), v.to(device), backend="triton")


def test_triton_sdpa_bfloat16_under_interpreter():
    q, k, v = rand(1, 2, 4, 16), rand(1, 2, 6, 16), rand(1, 2, 6, 8)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = pyattn.scaled_dot_product_attention(
        *(t.to(device, torch.bfloat16) for t in (q, k, v)), backend="triton"
    )
    ref_low = reference.scaled_dot_product_attention(*(t.to(torch.bfloat16) for t in (q, k, v)))
    ref64 = reference.scaled_dot_product_attention(q, k, v)
    assert_close_to_ref(
        "out", out, ref_low, ref64, floor=torch.finfo(torch.bfloat16).eps * max(1.0, ref64.abs().max().item())
    )
