"""pyattn.additive_attention against the float64 reference, on every backend usable here.

The cpu backend runs everything; triton runs the same checks (through the interpreter on CPU
tensors without a GPU, so its shapes stay small); cuda runs them on a GPU only.
"""

from __future__ import annotations

import pytest
import torch
from helpers import GPU, HAS_CUDA, assert_close_to_ref, assert_grads_close, backend_params

import pyattn
from pyattn import reference

BACKENDS = backend_params(cpu=True, triton=True, cuda=True)


def dtypes_for(backend):
    if backend == "cpu":
        return [torch.float32]
    return [torch.float32, torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float32]


def make_inputs(B, Tq, Tk, H, Dv, dtype, device, pad=None, contiguous=True):
    def rand(*shape):
        if contiguous:
            return torch.randn(*shape, dtype=torch.float64)
        # a transposed view: same values, non-unit last stride
        return torch.randn(*reversed(shape), dtype=torch.float64).permute(*reversed(range(len(shape))))

    q, k, val = rand(B, Tq, H), rand(B, Tk, H), rand(B, Tk, Dv)
    v = torch.randn(H, dtype=torch.float64)
    mask = None
    if pad == "random":
        mask = torch.rand(B, Tk) < 0.3
    elif pad == "full_row":
        mask = torch.rand(B, Tk) < 0.3
        mask[0] = True  # batch 0 has every key padded: its rows must be zeros, not NaN
    elif pad == "lengths":
        lengths = torch.randint(1, Tk + 1, (B,))
        mask = torch.arange(Tk)[None, :] >= lengths[:, None]
    ins64 = [t.clone().requires_grad_() for t in (q, k, val, v)]
    ins = [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in (q, k, val, v)]
    ins_lowp_ref = [t.detach().to(dtype=dtype).requires_grad_() for t in (q, k, val, v)]
    if mask is not None:
        mask_dev = mask.to(device)
    else:
        mask_dev = None
    return ins, ins_lowp_ref, ins64, mask, mask_dev


def check_against_reference(
    backend, device, dtype, B, Tq, Tk, H, Dv, pad=None, contiguous=True, weights=False
):
    ins, ins_l, ins64, mask, mask_dev = make_inputs(B, Tq, Tk, H, Dv, dtype, device, pad, contiguous)
    res = pyattn.additive_attention(*ins, mask_dev, return_weights=weights, backend=backend)
    res_l = reference.additive_attention(*ins_l, mask, return_weights=weights)
    res64 = reference.additive_attention(*ins64, mask, return_weights=weights)
    outs = res if weights else (res,)
    outs_l = res_l if weights else (res_l,)
    outs64 = res64 if weights else (res64,)
    names = ["context", "weights"]
    for name, o, ol, o64 in zip(names[: len(outs)], outs, outs_l, outs64, strict=True):
        assert o.dtype == dtype and o.device.type == torch.device(device).type
        assert torch.isfinite(o).all(), f"{name} has non-finite values"
        assert_close_to_ref(name, o, ol, o64)
    grads_out = [torch.randn_like(o64) for o64 in outs64]

    def grads(outputs, inputs):
        loss = sum((o * g.to(o.device, o.dtype)).sum() for o, g in zip(outputs, grads_out, strict=True))
        return torch.autograd.grad(loss, inputs)

    assert_grads_close(
        ["query", "key", "value", "v"], grads(outs, ins), grads(outs_l, ins_l), grads(outs64, ins64)
    )
    return outs


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "B,Tq,Tk,H,Dv",
    [(2, 7, 13, 16, 8), (3, 1, 97, 24, 20), (2, 9, 1, 32, 16), (1, 5, 70, 59, 33)],
)
def test_matches_reference(backend, device, B, Tq, Tk, H, Dv):
    for dtype in dtypes_for(backend):
        check_against_reference(backend, device, dtype, B, Tq, Tk, H, Dv)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("pad", ["random", "lengths", "full_row"])
def test_padding_masks(backend, device, pad):
    (out,) = check_against_reference(backend, device, torch.float32, 3, 6, 37, 16, 12, pad=pad)
    if pad == "full_row":
        assert torch.all(out[0] == 0), "a query whose keys are all padding must get a zero context"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_return_weights_and_their_gradient(backend, device):
    ctx, w = check_against_reference(
        backend, device, torch.float32, 2, 5, 23, 16, 8, pad="full_row", weights=True
    )
    assert w.shape == (2, 5, 23)
    assert torch.all(w[0] == 0)
    torch.testing.assert_close(w[1].sum(-1), torch.ones(5, device=w.device), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    check_against_reference(backend, device, torch.float32, 2, 6, 19, 16, 12, pad="random", contiguous=False)


def test_cpu_large_shapes_float32():
    # Beyond the interpreter's comfort: several key blocks, odd sizes, long rows.
    check_against_reference("cpu", "cpu", torch.float32, 2, 33, 1025, 59, 37, pad="lengths")


def test_gradcheck_float64_cpu():
    B, Tq, Tk, H, Dv = 2, 3, 70, 5, 4
    q, k = torch.randn(B, Tq, H, dtype=torch.float64), torch.randn(B, Tk, H, dtype=torch.float64)
    val, v = torch.randn(B, Tk, Dv, dtype=torch.float64), torch.randn(H, dtype=torch.float64)
    mask = torch.rand(B, Tk) < 0.3
    mask[1, :] = True
    ins = [t.requires_grad_() for t in (q, k, val, v)]
    assert torch.autograd.gradcheck(lambda *a: pyattn.additive_attention(*a, mask, backend="cpu"), ins)
    assert torch.autograd.gradcheck(
        lambda *a: pyattn.additive_attention(*a, mask, return_weights=True, backend="cpu")[1], ins
    )


def test_opcheck():
    B, Tq, Tk, H, Dv = 2, 3, 11, 8, 5
    args = [
        torch.randn(B, Tq, H, requires_grad=True),
        torch.randn(B, Tk, H, requires_grad=True),
        torch.randn(B, Tk, Dv, requires_grad=True),
        torch.randn(H, requires_grad=True),
    ]
    mask = torch.rand(B, Tk) < 0.3
    for m in (None, mask):
        for rw in (False, True):
            torch.library.opcheck(torch.ops.pyattn.additive_attention_fwd, (*args, m, rw))
    out, lse, w = torch.ops.pyattn.additive_attention_fwd(*[a.detach() for a in args], mask, True)
    bwd_args = (torch.randn_like(out), *[a.detach() for a in args], mask, out, lse, torch.randn_like(w), w)
    torch.library.opcheck(torch.ops.pyattn.additive_attention_bwd, bwd_args)


def test_torch_compile_fullgraph():
    def f(q, k, val, v, mask):
        return pyattn.additive_attention(torch.tanh(q), k, val, v, mask, backend="cpu") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ins = [torch.randn(2, 4, 8), torch.randn(2, 9, 8), torch.randn(2, 9, 6), torch.randn(8)]
    mask = torch.rand(2, 9) < 0.3
    torch.testing.assert_close(compiled(*ins, mask), f(*ins, mask))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic(backend, device):
    ins, _, _, _, mask = make_inputs(2, 40, 70, 16, 8, torch.float32, device, pad="random")
    g = torch.randn(2, 40, 8, device=device)

    def run():
        out = pyattn.additive_attention(*ins, mask, backend=backend)
        return (out, *torch.autograd.grad(out, ins, g))

    first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b), "same inputs must give bitwise-identical results"


# -- triton only: low precision through the interpreter, op checks, empty sizes, several blocks --

TRITON = backend_params(cpu=False, triton=True, cuda=False)


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_low_precision(backend, device, dtype):
    # On a GPU test_matches_reference covers these; here they run through the interpreter.
    check_against_reference(backend, device, dtype, 2, 7, 40, 24, 20, pad="full_row", weights=True)


@pytest.mark.parametrize("backend,device", TRITON)
def test_triton_several_blocks(backend, device):
    # more than one query block, key block and H chunk at once, with padding and weights
    check_against_reference(backend, device, torch.float32, 2, 20, 45, 40, 24, pad="lengths", weights=True)


@pytest.mark.parametrize("backend,device", TRITON)
def test_triton_opcheck(backend, device):
    B, Tq, Tk, H, Dv = 2, 3, 11, 8, 5
    args = [
        torch.randn(s, device=device, requires_grad=True) for s in ((B, Tq, H), (B, Tk, H), (B, Tk, Dv), (H,))
    ]
    mask = (torch.rand(B, Tk) < 0.3).to(device)
    # two of the four (mask, return_weights) combinations: the interpreter is slow
    for m, rw in ((None, False), (mask, True)):
        torch.library.opcheck(torch.ops.pyattn.additive_attention_fwd_triton, (*args, m, rw))
    out, lse, w = torch.ops.pyattn.additive_attention_fwd_triton(*[a.detach() for a in args], mask, True)
    assert lse.dtype == torch.float32
    bwd_args = (torch.randn_like(out), *[a.detach() for a in args], mask, out, lse, torch.randn_like(w), w)
    torch.library.opcheck(torch.ops.pyattn.additive_attention_bwd_triton, bwd_args)


@pytest.mark.parametrize("backend,device", TRITON)
def test_triton_torch_compile_fullgraph(backend, device):
    def f(q, k, val, v, mask):
        return pyattn.additive_attention(torch.tanh(q), k, val, v, mask, backend=backend) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    shapes = ((2, 4, 8), (2, 9, 8), (2, 9, 6), (8,))
    ins = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
    mask = (torch.rand(2, 9) < 0.3).to(device)
    out, expected = compiled(*ins, mask), f(*ins, mask)
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(expected, ins, g), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("B,Tq,Tk", [(0, 3, 5), (2, 0, 5), (2, 3, 0)])
def test_triton_empty_sizes(backend, device, B, Tq, Tk):
    H, Dv = 8, 4
    ins = [
        torch.randn(s, device=device, requires_grad=True) for s in ((B, Tq, H), (B, Tk, H), (B, Tk, Dv), (H,))
    ]
    out, w = pyattn.additive_attention(*ins, return_weights=True, backend=backend)
    assert out.shape == (B, Tq, Dv) and w.shape == (B, Tq, Tk)
    assert torch.all(out == 0), "no key (or no query) must give a zero context"
    _, lse, _ = torch.ops.pyattn.additive_attention_fwd_triton(*[a.detach() for a in ins], None, False)
    assert lse.shape == (B, Tq) and torch.all(lse == float("inf"))
    grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), ins, allow_unused=True)
    for g, x in zip(grads, ins, strict=True):
        assert g is None or (g.shape == x.shape and torch.all(g == 0))


@GPU
def test_default_backend_on_cuda_is_fused():
    q = torch.randn(2, 3, 8, device="cuda")
    assert pyattn._backend.resolve("additive_attention", None, q.device, q.dtype) in ("triton", "cuda")


# -- bad input: each error names the argument, the expected and the actual ---------------------


def _good():
    return [torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 4), torch.randn(8)]


@pytest.mark.parametrize(
    "mutate,exc,pattern",
    [
        (lambda a: a.__setitem__(0, torch.randn(3, 8)), ValueError, r"'query' must be 3-D"),
        (
            lambda a: a.__setitem__(1, torch.randn(2, 5, 9)),
            ValueError,
            r"'key' last dim must match query's H=8",
        ),
        (lambda a: a.__setitem__(1, torch.randn(3, 5, 8)), ValueError, r"'key' batch size"),
        (lambda a: a.__setitem__(2, torch.randn(2, 6, 4)), ValueError, r"'value' must be \(B=2, Tk=5, Dv\)"),
        (lambda a: a.__setitem__(3, torch.randn(7)), ValueError, r"'v' must have length H=8"),
        (lambda a: a.__setitem__(3, torch.randn(8, 1)), ValueError, r"'v' must be 1-D"),
        (
            lambda a: a.__setitem__(2, torch.randn(2, 5, 4, dtype=torch.float64)),
            TypeError,
            r"'value' must have query's dtype torch.float32, got torch.float64",
        ),
        (
            lambda a: a.__setitem__(0, torch.ones(2, 3, 8, dtype=torch.long)),
            TypeError,
            r"'query' must be a floating",
        ),
        (lambda a: a.__setitem__(0, [[1.0]]), TypeError, r"'query' must be a torch.Tensor"),
    ],
)
def test_bad_inputs(mutate, exc, pattern):
    args = _good()
    mutate(args)
    with pytest.raises(exc, match=pattern):
        pyattn.additive_attention(*args)


@pytest.mark.parametrize(
    "mask,exc,pattern",
    [
        (torch.zeros(2, 4, dtype=torch.bool), ValueError, r"'key_padding_mask' must be \(B=2, Tk=5\)"),
        (torch.zeros(2, 5), TypeError, r"'key_padding_mask' must be a bool tensor"),
        ([[True]], TypeError, r"'key_padding_mask' must be a torch.Tensor or None, got list"),
    ],
)
def test_bad_masks(mask, exc, pattern):
    with pytest.raises(exc, match=pattern):
        pyattn.additive_attention(*_good(), mask)


def test_bad_backend_names():
    with pytest.raises(ValueError, match="not a pyattn backend"):
        pyattn.additive_attention(*_good(), backend="tpu")
    with pytest.raises(RuntimeError, match="'cuda' cannot run here"):
        pyattn.additive_attention(*_good(), backend="cuda")


def test_cpu_half_runs_the_cpu_kernel():
    # backend="cpu" and the default both take half inputs: the kernel widens them to float32 once
    # and rounds each output once (a half reference graph would build its (B, Tq, Tk, H) tanh in
    # half); tests/test_half_cpu.py checks the numerics
    args = [t.half() for t in _good()]
    out = pyattn.additive_attention(*args, backend="cpu")
    assert out.dtype == torch.float16
    assert torch.equal(out, pyattn.additive_attention(*args))
    assert torch.equal(out, pyattn.additive_attention(*[t.float() for t in args], backend="cpu").half())


def test_env_override(monkeypatch):
    monkeypatch.setenv("PYATTN_BACKEND", "reference")
    assert pyattn._backend.resolve("additive_attention", None, torch.device("cpu")) == "reference"
    monkeypatch.setenv("PYATTN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PYATTN_BACKEND='bogus'"):
        pyattn.additive_attention(*_good())


def test_empty_batch_and_single_key():
    q, k, val, v = torch.randn(0, 3, 8), torch.randn(0, 5, 8), torch.randn(0, 5, 4), torch.randn(8)
    assert pyattn.additive_attention(q, k, val, v, backend="cpu").shape == (0, 3, 4)
    q, k, val = torch.randn(2, 3, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 4)
    out = pyattn.additive_attention(q, k, val, v, backend="cpu")
    torch.testing.assert_close(out, val.expand(2, 3, 4))  # one key: weight 1


# -- key blocks of padding only are skipped, not masked -------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["suffix", "middle", "all_but_one"])
def test_padding_blocks_skipped(backend, device, layout):
    # Seq2seq batches: sources of varied lengths leave whole key blocks of padding, which the
    # kernels skip (docs/design.md): trailing ones, padding in the middle (skipped by CUDA, masked
    # by Triton), one key left at the end. The results match, and weights and key gradients are
    # exact zeros on padding.
    B, Tq, Tk, H, Dv = 3, 5, 150, 16, 8
    ins, ins_l, ins64, _, _ = make_inputs(B, Tq, Tk, H, Dv, torch.float32, device)
    j = torch.arange(Tk)
    if layout == "suffix":
        mask = j[None, :] >= torch.tensor([7, 150, 40])[:, None]
    elif layout == "middle":
        mask = ((j >= 20) & (j < 130))[None, :].expand(B, Tk).clone()
    else:
        mask = torch.ones(B, Tk, dtype=torch.bool)
        mask[:, 140] = False
    mask[2] = True  # one batch row with every key padded: zeros, zero gradients
    out, w = pyattn.additive_attention(*ins, mask.to(device), return_weights=True, backend=backend)
    outs_l = reference.additive_attention(*ins_l, mask, return_weights=True)
    outs64 = reference.additive_attention(*ins64, mask, return_weights=True)
    for name, o, ol, o64 in zip(["context", "weights"], (out, w), outs_l, outs64, strict=True):
        assert torch.isfinite(o).all(), f"{name} has non-finite values"
        assert_close_to_ref(name, o, ol, o64)
    assert (w.cpu()[mask[:, None, :].expand(B, Tq, Tk)] == 0).all()
    g = torch.randn(B, Tq, Dv, dtype=torch.float64)
    got = torch.autograd.grad((out * g.to(out)).sum(), ins)
    lowp = torch.autograd.grad((outs_l[0] * g.to(outs_l[0])).sum(), ins_l)
    exact = torch.autograd.grad((outs64[0] * g).sum(), ins64)
    assert_grads_close(["query", "key", "value", "v"], got, lowp, exact)
    assert (got[1].cpu()[mask] == 0).all() and (got[2].cpu()[mask] == 0).all()
    assert (got[0].cpu()[2] == 0).all()
