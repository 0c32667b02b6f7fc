"""Differential conformance: pyattn against torch, torch is the oracle.

``pyattn.scaled_dot_product_attention`` claims the semantics of
``torch.nn.functional.scaled_dot_product_attention`` and ``pyattn.nn.MultiheadAttention`` those of
``torch.nn.MultiheadAttention``. Over a hypothesis-generated space of valid and invalid calls
(ranks 1 to 5, empty dims, every mask kind and dtype including torch's CausalBias, scales of
either sign, GQA, dropout 0 and 1, non-contiguous and expanded tensors) both run side by side:
either both return, ours within the tolerance rule of tests/helpers.py (torch in float64 is the
truth, torch's own error in the input dtype the allowance), or both raise, ours an instance of
torch's exception class. Then one named test per defect this file was written against, the
module's tests, and ``pyattn.patch_torch`` on models nobody here wrote (torch's
TransformerEncoder, Hugging Face's BertModel).

The differences README.md's behaviour table lists are kept out of the generated space: torch's
exact dropout random stream (0 < dropout_p < 1), a value length that differs from the key length
(torch's CPU kernel takes it), GQA with zero key heads, a negative dropout_p (torch's math path
takes it as 0, its CPU flash kernel raises), and invalid inputs that are also empty (torch returns
an empty result for some of them without checking); pyattn raises for all of these.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import SESSION_SEED
from helpers import FLOOR, assert_close_to_ref
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right, causal_upper_left

import pyattn
from pyattn import reference
from pyattn.ops.errors import InputError

_SETTINGS = dict(
    deadline=None,
    database=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
_NIGHTLY = os.environ.get("PYATTN_HYPOTHESIS_PROFILE") == "nightly"
CPU_EXAMPLES = 2000 if _NIGHTLY else 250
# the interpreter runs ~0.1-0.3 s an example here: few and small
TRITON_EXAMPLES = 300 if _NIGHTLY else 25

BACKENDS = [b for b in ("cpu", "triton") if b in pyattn.backends()]


# -- the generated calls --------------------------------------------------------------------------


class Call:
    """One sdpa call: positional tensors, keyword arguments, and a description for failures."""

    def __init__(self, q, k, v, kwargs, note):
        self.q, self.k, self.v, self.kwargs, self.note = q, k, v, kwargs, note

    def __repr__(self) -> str:
        def d(t):
            if isinstance(t, CausalBias):
                return f"CausalBias({t.variant.name}, {t.seq_len_q}, {t.seq_len_kv})"
            if isinstance(t, torch.Tensor):
                return f"{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}:{tuple(t.stride())}"
            return repr(t)

        kw = {n: d(x) for n, x in self.kwargs.items()}
        return f"Call(q={d(self.q)}, k={d(self.k)}, v={d(self.v)}, {kw}, {self.note})"


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values through other strides: transposed storage, or a stride-0 expand."""
    if how == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "expanded" and t.dim() >= 4 and t.shape[0] == 1:  # a batch dim, never the heads
        return t[:1].expand(3, *t.shape[1:])
    return t


@st.composite
def calls(draw, dtypes, small=False):
    dtype = draw(st.sampled_from(dtypes))
    # invalid on purpose, sometimes (then with no empty dim: see the module docstring)
    bad = draw(st.sampled_from(["none"] * 10 + ["dtype", "head_dim", "dropout_big", "int", "mask_shape"]))
    gqa = draw(st.booleans())
    rank = draw(st.sampled_from([1, 2, 3, 3, 4, 4, 4, 5]))
    ranks = [rank, rank, rank]
    if draw(st.integers(0, 5)) == 0:
        ranks = [draw(st.integers(1, 5)) for _ in range(3)]
    mask_kind = draw(
        st.sampled_from(
            ["none", "none", "bool", "float32", "query", "causal", "upper_left", "lower_right", "lower_right_other",
             "float64", "int"]
        )
    )  # fmt: skip
    risky = bad != "none" or min(ranks) < 3 or len(set(ranks)) > 1 or mask_kind == "lower_right_other"
    lo = 1 if risky else 0
    n = 5 if small else 9
    Lq, Lk = draw(st.integers(lo, n)), draw(st.integers(lo, n))
    E, Dv = draw(st.integers(lo, 8)), draw(st.integers(lo, 8))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.integers(1, 3)) if gqa else draw(st.integers(lo, 3))
    Hk = Hkv if gqa else draw(st.sampled_from([Hq, 1]))
    lead = [draw(st.integers(max(lo, 1) if small else lo, 2)) for _ in range(max(0, max(ranks) - 3))]

    def shape(H, L, D, r):
        full = [*lead, H, L, D]
        return full[len(full) - r :] if r <= len(full) else full

    q = torch.randn(shape(Hq, Lq, E, ranks[0]), dtype=torch.float64)
    k = torch.randn(shape(Hk, Lk, E, ranks[1]), dtype=torch.float64)
    v = torch.randn(shape(Hk, Lk, Dv, ranks[2]), dtype=torch.float64)
    # torch's Lq/Lk/E, also for rank-1 inputs (then an error)
    Lq_, Lk_ = (q.shape[-2] if q.dim() >= 2 else 1), (k.shape[-2] if k.dim() >= 2 else 1)
    if rank == 1:
        Lq_, Lk_ = Lq, Lk
    q, k, v = (t.to(dtype) for t in (q, k, v))
    note = []

    kwargs = {}
    if gqa:
        kwargs["enable_gqa"] = True
    if bad == "dtype":
        k = k.to(torch.float64 if dtype != torch.float64 else torch.float32)
    elif bad == "head_dim" and k.dim() >= 1:
        k = torch.randn(*k.shape[:-1], k.shape[-1] + 1, dtype=dtype)
    elif bad == "int":
        q, k, v = (t.round().to(torch.int64) for t in (q, k, v))
    note.append(bad)

    mshape = draw(st.sampled_from(["full", "2d", "row", "bcast"]))
    mask_dims = {"full": [*lead, Hq, Lq_, Lk_], "2d": [Lq_, Lk_], "row": [1, Lk_], "bcast": [Hq, 1, Lk_]}[
        mshape
    ]
    if bad == "mask_shape":
        mask_dims = [Lq_ + 1, Lk_]  # not broadcastable
    if mask_kind == "bool":
        kwargs["attn_mask"] = torch.rand(mask_dims) < 0.7
    elif mask_kind in ("float32", "query", "float64", "int"):
        mdt = {"float32": torch.float32, "query": q.dtype if q.is_floating_point() else torch.float32,
               "float64": torch.float64, "int": torch.int32}[mask_kind]  # fmt: skip
        m = torch.randn(mask_dims)
        m = m.masked_fill(torch.rand(mask_dims) < 0.2, float("-inf"))
        kwargs["attn_mask"] = m.to(mdt) if mdt.is_floating_point else m.clamp(-3, 3).to(mdt)
    elif mask_kind == "causal":
        kwargs["is_causal"] = True
    elif mask_kind == "upper_left":
        kwargs["attn_mask"] = causal_upper_left(Lq_, Lk_)
    elif mask_kind == "lower_right":
        kwargs["attn_mask"] = causal_lower_right(Lq_, Lk_)
    elif mask_kind == "lower_right_other":
        kwargs["attn_mask"] = causal_lower_right(draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    if mask_kind != "causal" and draw(st.integers(0, 7)) == 0:
        kwargs["is_causal"] = True  # with a mask: an error in torch
    if isinstance(kwargs.get("attn_mask"), torch.Tensor) and not isinstance(kwargs["attn_mask"], CausalBias):
        kwargs["attn_mask"] = _layout(kwargs["attn_mask"], draw(st.sampled_from(["plain", "transposed"])))
    note.append(f"mask={mask_kind}/{mshape}")

    if draw(st.booleans()):
        kwargs["scale"] = draw(st.floats(-3.0, 3.0, allow_nan=False))
    if bad == "dropout_big":
        kwargs["dropout_p"] = 1.5
    else:
        kwargs["dropout_p"] = draw(st.sampled_from([0.0, 0.0, 0.0, 1.0]))
    how = draw(st.sampled_from(["plain", "plain", "transposed", "expanded"]))
    q, k, v = (_layout(t, how) for t in (q, k, v))
    note.append(how)
    return Call(q, k, v, kwargs, ", ".join(note))


# -- running both -----------------------------------------------------------------------------------


def _run(fn):
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - the class is what is compared
        return None, exc


def _f64(x):
    if isinstance(x, CausalBias) or not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return x
    return x.detach().double()


def _grad_floor(g: torch.Tensor, g64: torch.Tensor) -> float:
    # as helpers.GRAD_FLOOR: a fused backward's dS = P (dP - Delta) cancels
    return 6 * FLOOR[g.dtype] * max(1.0, g64.abs().max().item() if g64.numel() else 0.0)


_TORCH = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def _crashes_torch(call: Call) -> bool:
    """torch < 2.14 (seen on 2.11) divides by the head count: zero heads (with or without
    enable_gqa) kill the process (SIGFPE) instead of returning or raising, so such a call has
    no oracle there. Conservatively: any zero batch or head dim."""
    if _TORCH >= (2, 14):
        return False
    return any(isinstance(t, torch.Tensor) and 0 in t.shape[:-2] for t in (call.q, call.k, call.v))


def check_against_torch(call: Call, backend: str, grads: bool = False):
    """Both raise (ours an instance of torch's class) or both return the same values."""
    assume(not _crashes_torch(call))
    theirs, their_exc = _run(lambda: F.scaled_dot_product_attention(call.q, call.k, call.v, **call.kwargs))
    ours, our_exc = _run(
        lambda: pyattn.scaled_dot_product_attention(call.q, call.k, call.v, **call.kwargs, backend=backend)
    )
    if their_exc is not None:
        assert our_exc is not None, f"torch raised {their_exc!r}, pyattn returned: {call}"
        assert isinstance(our_exc, type(their_exc)), (
            f"torch raised {type(their_exc).__name__}, pyattn {type(our_exc).__mro__}: {our_exc}: {call}"
        )
        return None
    if our_exc is not None:
        raise AssertionError(f"torch returned, pyattn raised {our_exc!r}: {call}") from our_exc
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, (ours.shape, theirs.shape, call)
    kw64 = {n: _f64(x) for n, x in call.kwargs.items()}
    truth = F.scaled_dot_product_attention(_f64(call.q), _f64(call.k), _f64(call.v), **kw64)
    # a torch row that is not finite (an overflow, inf scale) carries no allowance: compare the rest
    finite = torch.isfinite(theirs) & torch.isfinite(truth)
    assert_close_to_ref(f"out {call}", ours[finite], theirs[finite], truth[finite])
    if grads and ours.numel() and call.q.dtype in (torch.float32, torch.float64):
        ins = [t.detach().clone().requires_grad_() for t in (call.q, call.k, call.v)]
        ins64 = [t.detach().double().requires_grad_() for t in (call.q, call.k, call.v)]
        ins_t = [t.detach().clone().requires_grad_() for t in (call.q, call.k, call.v)]
        g = torch.randn(ours.shape, dtype=torch.float64)
        o = pyattn.scaled_dot_product_attention(*ins, **call.kwargs, backend=backend)
        o64 = F.scaled_dot_product_attention(*ins64, **kw64)
        ot = F.scaled_dot_product_attention(*ins_t, **call.kwargs)
        mine = torch.autograd.grad(o, ins, g.to(o.dtype), allow_unused=True)
        true = torch.autograd.grad(o64, ins64, g, allow_unused=True)
        torch_g = torch.autograd.grad(ot, ins_t, g.to(ot.dtype), allow_unused=True)
        for name, a, b, c in zip(("query", "key", "value"), mine, torch_g, true, strict=True):
            if c is None or not torch.isfinite(c).all() or not torch.isfinite(b).all():
                continue
            a = torch.zeros_like(c, dtype=o.dtype) if a is None else a
            assert_close_to_ref(f"grad {name} {call}", a, b, c, factor=3.0, floor=_grad_floor(a, c))
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_conformance_generated(backend):
    triton = backend == "triton"
    dtypes = (
        [torch.float32, torch.float16]
        if triton
        else [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    )

    @seed(SESSION_SEED)
    @settings(max_examples=TRITON_EXAMPLES if triton else CPU_EXAMPLES, **_SETTINGS)
    @given(call=calls(dtypes, small=triton), grads=st.booleans())
    def run(call, grads):
        check_against_torch(call, backend, grads=grads and not triton)

    run()


# -- one test per defect ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("E", [0, 3])
def test_float32_mask_beside_half_query_on_the_reference_path(backend, dtype, E):
    # empty sizes run pyattn.reference, where the float32 mask promoted the weights and the last
    # product raised ("expected scalar type Float but found Half"); torch returns the query's dtype
    q, k = torch.randn(1, 1, E, dtype=dtype), torch.randn(1, 1, E, dtype=dtype)
    v, mask = torch.randn(1, 1, 1, dtype=dtype), torch.randn(1, 1, 1)
    out = check_against_torch(Call(q, k, v, {"attn_mask": mask, "enable_gqa": True}, ""), backend)
    assert out.dtype == dtype
    q, k, v = (torch.randn(2, 3, L, 4, dtype=dtype) for L in (5, 7, 7))
    ref = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=torch.randn(5, 7), backend="reference")
    assert ref.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Lq,Lk", [(4, 9), (9, 4), (70, 300)])
def test_defect1_causal_bias_runs_fused_and_matches_torch(backend, dtype, Lq, Lk):
    if backend == "triton" and Lk > 64:
        Lq, Lk = 20, 45  # the interpreter is slow
    q, k, v = (torch.randn(2, 3, L, 16, dtype=dtype) for L in (Lq, Lk, Lk))
    for bias in (causal_lower_right(Lq, Lk), causal_upper_left(Lq, Lk)):
        call = Call(q, k, v, {"attn_mask": bias}, "")
        check_against_torch(call, backend)
    # fused: the op sees no mask tensor, only the lower-right causal flag (2)
    seen = []
    fwd = pyattn.ops.sdpa._OPS.forward_ops[backend]

    def spy(*args):
        seen.append((args[3], args[5]))
        return fwd(*args)

    pyattn.ops.sdpa._OPS.forward_ops[backend] = spy
    try:
        pyattn.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Lq, Lk), backend=backend)
    finally:
        pyattn.ops.sdpa._OPS.forward_ops[backend] = fwd
    assert seen == [(None, 2)]
    with pytest.raises(ValueError, match="CausalBias"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Lq, Lk), is_causal=True)
    with pytest.raises(ValueError, match="CausalBias"):
        pyattn.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Lq, Lk), is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_defect1_lower_right_gradients_match_reference(backend):
    # rows with no visible key (Lq > Lk) give zeros and zero gradients; block skipping honours
    # the offset (long enough for several key blocks on the CPU kernel)
    Lq, Lk = (40, 23) if backend == "triton" else (700, 530)
    ins = [
        torch.randn(1, 2, L, 16, dtype=torch.float64 if backend == "cpu" else torch.float32)
        for L in (Lq, Lk, Lk)
    ]
    ins = [t.requires_grad_() for t in ins]
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    ins_l = [t.detach().clone().requires_grad_() for t in ins]
    out = pyattn.scaled_dot_product_attention(*ins, attn_mask=causal_lower_right(Lq, Lk), backend=backend)
    ref64 = reference.scaled_dot_product_attention(*ins64, is_causal=2)
    ref_l = reference.scaled_dot_product_attention(*ins_l, is_causal=2)
    assert (out[:, :, : Lq - Lk] == 0).all()
    assert_close_to_ref("out", out, ref_l, ref64)
    g = torch.randn_like(ref64)
    for name, a, b, c in zip(
        ("query", "key", "value"),
        torch.autograd.grad(out, ins, g.to(out.dtype)),
        torch.autograd.grad(ref_l, ins_l, g.to(out.dtype)),
        torch.autograd.grad(ref64, ins64, g),
        strict=True,
    ):
        assert_close_to_ref(f"grad {name}", a, b, c, factor=3.0, floor=_grad_floor(a, c))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_defect2_float32_mask_with_half_query(dtype):
    q, k, v = (torch.randn(2, 2, L, 8, dtype=dtype) for L in (5, 7, 7))
    mask = torch.randn(5, 7)
    check_against_torch(Call(q, k, v, {"attn_mask": mask}, ""), "cpu")
    out = pyattn.scaled_dot_product_attention(q, k, v, mask)
    assert out.dtype == dtype


@pytest.mark.parametrize("scale", [-0.5, -3.0, 0.0, 7.0])
def test_defect3_any_finite_scale(scale):
    q, k, v = (torch.randn(2, 2, L, 8) for L in (5, 7, 7))
    check_against_torch(Call(q, k, v, {"scale": scale}, ""), "cpu", grads=True)


@pytest.mark.parametrize(
    "shapes",
    [
        pytest.param(
            [(2, 0, 10, 64)] * 3,
            marks=pytest.mark.skipif(_TORCH < (2, 14), reason="torch < 2.14 crashes (SIGFPE) on zero heads"),
        ),  # zero heads
        [(0, 0, 0, 0)] * 3,  # all zero
        [(2, 3, 4, 0), (2, 3, 5, 0), (2, 3, 5, 6)],  # head dim 0, scale=None
        [(2, 3, 4, 8), (2, 3, 0, 8), (2, 3, 0, 8)],  # no keys
        [(2, 3, 0, 8), (2, 3, 5, 8), (2, 3, 5, 8)],  # no queries
    ],
)
def test_defect4_empty_sizes_give_torch_results_with_gradients(shapes):
    ins = [torch.randn(s, requires_grad=True) for s in shapes]
    ins_t = [t.detach().clone().requires_grad_() for t in ins]
    out = pyattn.scaled_dot_product_attention(*ins)
    want = F.scaled_dot_product_attention(*ins_t)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(want, ins_t, g), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda q, k, v: dict(
                query=q, key=k, value=v, attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True
            ),
            marks=pytest.mark.skipif(
                _TORCH < (2, 14), reason="torch < 2.14 (seen on 2.11) accepts attn_mask with is_causal"
            ),
        ),
        lambda q, k, v: dict(query=q, key=k.double(), value=v),
        lambda q, k, v: dict(query=q[0, 0, 0], key=k[0, 0, 0], value=v[0, 0, 0]),
        lambda q, k, v: dict(query=q, key=k[..., :7], value=v),
        lambda q, k, v: dict(query=q, key=k, value=v, attn_mask=torch.ones(5, 7, dtype=torch.float64)),
        lambda q, k, v: dict(query=q, key=k, value=v, dropout_p=-0.5),
        lambda q, k, v: dict(query=q, key=k, value=v, attn_mask=causal_lower_right(5, 7), is_causal=True),
        lambda q, k, v: dict(query=q[0, 0], key=k[0, 0], value=v[0, 0], enable_gqa=True),
        lambda q, k, v: dict(query=q, key=k, value=v, attn_mask=[1.0]),
        lambda q, k, v: dict(query=q.long(), key=k.long(), value=v.long()),
    ],
)
def test_defect5_exception_classes_are_torchs(make):
    q, k, v = (torch.randn(2, 2, L, 8) for L in (5, 7, 7))
    kw = make(q, k, v)
    with pytest.raises(Exception) as theirs:
        F.scaled_dot_product_attention(**kw)
    with pytest.raises(InputError) as ours:
        pyattn.scaled_dot_product_attention(**kw)
    assert isinstance(ours.value, theirs.type), (theirs.value, ours.value)
    assert "scaled_dot_product_attention" in str(ours.value) and "got" in str(ours.value)


def test_defect6_half_cpu_computes_in_float32(monkeypatch):
    x = torch.full((1, 32, 23, 80), 256.0, dtype=torch.half)
    out = pyattn.scaled_dot_product_attention(x, x, x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(x, x, x))
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = (torch.randn(2, 4, L, 64, dtype=dtype) for L in (50, 70, 70))
        mask = torch.rand(50, 70) < 0.8
        mask[3] = False  # a fully masked row
        check_against_torch(Call(q, k, v, {"attn_mask": mask}, ""), "cpu")
        # the widened path (float32 blocks) rounds once: within one rounding of the float64
        # result. The bf16 product paths round P to bf16 as torch's flash kernel does, so they
        # are held to the tolerance rule instead (above; tests/test_cpu_microkernels.py)
        monkeypatch.setenv("PYATTN_CPU_HALF_GEMM", "widen")
        ours = pyattn.scaled_dot_product_attention(q, k, v, mask)
        monkeypatch.delenv("PYATTN_CPU_HALF_GEMM")
        exact = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask)
        assert (ours.double() - exact).abs().max() <= 1.01 * (
            exact.to(dtype).double() - exact
        ).abs().max() + 1e-6


def test_defect6_half_gradients_on_fully_masked_rows():
    q, k, v = (torch.randn(1, 2, L, 16, dtype=torch.half, requires_grad=True) for L in (6, 9, 9))
    mask = torch.rand(6, 9) < 0.7
    mask[2] = False
    out = pyattn.scaled_dot_product_attention(q, k, v, mask)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert (out[:, :, 2] == 0).all() and (grads[0][:, :, 2] == 0).all()
    ins64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ins_l = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o64 = reference.scaled_dot_product_attention(*ins64, mask)
    o_l = F.scaled_dot_product_attention(*ins_l, mask)
    for name, a, b, c in zip(
        ("query", "key", "value"),
        grads,
        torch.autograd.grad(o_l.float().sum(), ins_l),
        torch.autograd.grad(o64.sum(), ins64),
        strict=True,
    ):
        finite = torch.isfinite(b)
        assert_close_to_ref(f"grad {name}", a[finite], b[finite], c[finite], factor=3.0)


# -- nn.MultiheadAttention --------------------------------------------------------------------------


def _pair(*args, **kwargs):
    theirs = torch.nn.MultiheadAttention(*args, **kwargs)
    ours = pyattn.nn.MultiheadAttention(*args, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def test_defect7_mha_nested_tensor_inputs():
    theirs, ours = _pair(16, 4, batch_first=True)
    theirs.eval(), ours.eval()
    x = torch.nested.nested_tensor([torch.randn(3, 16), torch.randn(6, 16)])
    with torch.no_grad():
        for need_weights in (False, True):
            a, wa = theirs(x, x, x, need_weights=need_weights)
            b, wb = ours(x, x, x, need_weights=need_weights)
            assert b.is_nested
            for ta, tb in zip(a.unbind(), b.unbind(), strict=True):
                torch.testing.assert_close(tb, ta)
            if need_weights:
                torch.testing.assert_close(wb, wa)
    # as torch: outside inference (grad, training) nested inputs are refused
    with pytest.raises(AssertionError) as their_exc:
        theirs(x, x, x)
    with pytest.raises(AssertionError):
        ours(x, x, x)
    assert their_exc.type is AssertionError


def test_defect7_mha_half_in_proj_bias_with_double_query():
    theirs, ours = _pair(4, 4, batch_first=True, dtype=torch.double)
    for m in (theirs, ours):
        m.eval()
        m.in_proj_bias = torch.nn.Parameter(theirs.in_proj_bias.detach().to(torch.half))
    q = torch.randn(4, 4, 4, dtype=torch.double)
    with torch.no_grad():
        a, wa = theirs(q, q, q)
        b, wb = ours(q, q, q)
    assert b.dtype == a.dtype
    torch.testing.assert_close(b, a)
    torch.testing.assert_close(wb, wa)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(query=torch.randn(3, 2, 7)),  # embed dim
        dict(key=torch.randn(4, 2, 8), value=torch.randn(5, 2, 8)),  # key/value lengths
        dict(query=torch.randn(3, 8)),  # unbatched query, batched key
        dict(query=torch.randn(2, 3, 2, 8), key=torch.randn(2, 3, 2, 8), value=torch.randn(2, 3, 2, 8)),
        dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
        dict(attn_mask=torch.zeros(4, 4, dtype=torch.bool)),
        dict(attn_mask=torch.zeros(5, 3, 3, dtype=torch.bool)),
        dict(attn_mask=torch.zeros(1, 1, 3, 3, dtype=torch.bool)),
        dict(attn_mask=torch.zeros(3, 3, dtype=torch.long)),
        dict(key_padding_mask=torch.zeros(2, 3, dtype=torch.long)),
        dict(is_causal=True),
    ],
)
def test_defect7_mha_bad_inputs_raise_torchs_class(kwargs):
    theirs, ours = _pair(8, 2)
    x = torch.randn(3, 2, 8)
    kw = dict(query=x, key=x, value=x) | kwargs
    with pytest.raises(Exception) as their_exc:
        theirs(**kw)
    with pytest.raises(InputError) as our_exc:
        ours(**kw)
    assert isinstance(our_exc.value, their_exc.type), (their_exc.value, our_exc.value)


@st.composite
def mha_calls(draw):
    E, H = draw(st.sampled_from([(8, 2), (12, 3), (16, 4)]))
    kw = dict(
        batch_first=draw(st.booleans()),
        bias=draw(st.booleans()),
        add_bias_kv=draw(st.booleans()),
        add_zero_attn=draw(st.booleans()),
    )
    if draw(st.booleans()):
        kw["kdim"], kw["vdim"] = draw(st.integers(3, 9)), draw(st.integers(3, 9))
    B, L, S = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    batched = draw(st.booleans())
    self_attn = "kdim" not in kw and draw(st.booleans())
    if self_attn:
        S = L

    def x(n, d):
        if not batched:
            return torch.randn(n, d)
        return torch.randn(B, n, d) if kw["batch_first"] else torch.randn(n, B, d)

    q = x(L, E)
    k = q if self_attn else x(S, kw.get("kdim", E))
    v = k if self_attn and "vdim" not in kw else x(S, kw.get("vdim", E))
    fwd = dict(need_weights=draw(st.booleans()), average_attn_weights=draw(st.booleans()))
    if draw(st.booleans()):
        pad = torch.rand(B, S) < 0.3
        pad[:, 0] = False  # no fully masked row: torch gives NaN there
        fwd["key_padding_mask"] = pad if batched else pad[0]
        if draw(st.booleans()):
            kpm = fwd["key_padding_mask"]
            fwd["key_padding_mask"] = torch.zeros(kpm.shape).masked_fill(kpm, float("-inf"))
    mask = draw(st.sampled_from(["none", "bool", "float", "causal", "3d"]))
    if mask == "bool":
        m = torch.rand(L, S) < 0.3
        m[:, 0] = False
        fwd["attn_mask"] = m
    elif mask == "float":
        fwd["attn_mask"] = torch.randn(L, S)
    elif mask == "causal" and L == S:
        fwd["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(L)
        fwd["is_causal"] = draw(st.booleans())
    elif mask == "3d":
        fwd["attn_mask"] = torch.randn(B * H if batched else H, L, S)
    return (E, H, kw), (q, k, v), fwd


@seed(SESSION_SEED)
@settings(max_examples=400 if _NIGHTLY else 60, **_SETTINGS)
@given(call=mha_calls(), train=st.booleans())
def test_mha_matches_torch_generated(call, train):
    (E, H, kw), (q, k, v), fwd = call
    theirs, ours = _pair(E, H, **kw)
    theirs.train(train), ours.train(train)  # dropout 0: train and eval agree
    a, wa = theirs(q, k, v, **fwd)
    b, wb = ours(q, k, v, **fwd)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=lambda m: f"{m}\n{call}")
    assert (wa is None) == (wb is None)
    if wa is not None:
        torch.testing.assert_close(wb, wa, rtol=1e-5, atol=1e-5)


# -- patch_torch --------------------------------------------------------------------------------


def test_patch_torch_undo_and_context_manager():
    torch_sdpa, torch_mha = F.scaled_dot_product_attention, torch.nn.MultiheadAttention
    handle = pyattn.patch_torch(mha=True)
    assert F.scaled_dot_product_attention is not torch_sdpa
    assert torch.nn.MultiheadAttention is pyattn.nn.MultiheadAttention
    handle.undo()
    assert F.scaled_dot_product_attention is torch_sdpa and torch.nn.MultiheadAttention is torch_mha
    handle.undo()  # idempotent
    q = torch.randn(1, 2, 5, 8)
    with pyattn.patch_torch() as patch:
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        assert patch.calls == 1
        with sdpa_kernel([SDPBackend.MATH]):  # asks for torch's own
            F.scaled_dot_product_attention(q, q, q)
        assert patch.calls == 1
    assert F.scaled_dot_product_attention is torch_sdpa
    torch.testing.assert_close(out, torch_sdpa(q, q, q, is_causal=True))


@pytest.mark.parametrize("mha", [False, True])
def test_patch_torch_on_stock_transformer_encoder(mha):
    torch.manual_seed(0)

    def build():
        layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        return torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    model = build()
    x = torch.randn(3, 10, 32)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[1, 7:] = True
    mask = torch.nn.Transformer.generate_square_subsequent_mask(10)
    want = model(x, mask=mask, src_key_padding_mask=pad, is_causal=True)
    with pyattn.patch_torch(mha=mha) as patch:
        if mha:
            patched = build()
            assert isinstance(patched.layers[0].self_attn, pyattn.nn.MultiheadAttention)
            patched.load_state_dict(model.state_dict())
            calls = []
            fwd = pyattn.ops.sdpa._OPS.forward_ops["cpu"]
            pyattn.ops.sdpa._OPS.forward_ops["cpu"] = lambda *a: calls.append(1) or fwd(*a)
            try:
                got = patched(x, mask=mask, src_key_padding_mask=pad, is_causal=True)
            finally:
                pyattn.ops.sdpa._OPS.forward_ops["cpu"] = fwd
            assert len(calls) == 2  # one fused call per layer
        else:
            got = model(x, mask=mask, src_key_padding_mask=pad, is_causal=True)
            assert patch.calls == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_patch_torch_on_transformers_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 12))
    attention = torch.ones(2, 12, dtype=torch.long)
    attention[1, 9:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=attention).last_hidden_state
        with pyattn.patch_torch() as patch:
            got = model(input_ids=ids, attention_mask=attention).last_hidden_state
    assert patch.calls == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- torch.export with data-dependent (unbacked) sizes -----------------------------------------------


class _Unbacked(torch.nn.Module):
    """Attention whose key length (``where="key"``) or query length (``"query"``) is read from
    the data: torch.export traces it as an unbacked symbol, which checks must not guard on."""

    def __init__(self, sdpa, where: str, mask: bool):
        super().__init__()
        self.sdpa, self.where, self.mask = sdpa, where, mask

    def forward(self, q, k, v, keep):
        n = keep.sum().item()
        torch._check(n >= 0)
        if self.where == "key":
            torch._check(n <= k.shape[2])
            k, v = k[:, :, :n], v[:, :, :n]
        else:
            torch._check(n <= q.shape[2])
            q = q[:, :, :n]
        m = torch.ones(1, q.shape[2], k.shape[2], dtype=torch.bool) if self.mask else None
        return self.sdpa(q, k, v, attn_mask=m)


@pytest.mark.parametrize("where,mask", [("key", True), ("key", False), ("query", True), ("query", False)])
def test_export_with_an_unbacked_length(where, mask):
    """torch exports a mask of data-dependent width (as torch's SDPA does); the exported program
    gives eager's values, for other lengths (0 included) too."""
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    keep = torch.tensor([1, 0, 1, 1, 0, 1])
    ours = _Unbacked(pyattn.scaled_dot_product_attention, where, mask)
    if where == "key" and mask:  # torch's own SDPA exports this one: the differential check
        theirs = torch.export.export(_Unbacked(F.scaled_dot_product_attention, where, mask), (q, k, v, keep))
        torch.testing.assert_close(theirs.module()(q, k, v, keep), ours(q, k, v, keep))
    ep = torch.export.export(ours, (q, k, v, keep))
    for other in (keep, torch.tensor([1, 1, 0, 0, 0, 0]), torch.tensor([1] * 6)):
        torch.testing.assert_close(ep.module()(q, k, v, other), ours(q, k, v, other))
    if where == "key":  # no key at all: zeros, as pyattn's fully masked rows
        torch.testing.assert_close(
            ep.module()(q, k, v, torch.zeros(6, dtype=torch.long)), torch.zeros(1, 2, 6, 8)
        )


def _torch_words(exc: BaseException) -> str:
    # torch prefixes some messages with the C++ function's name; the words after it are what
    # its tests match on
    return str(exc).split("\n")[0].split(": ", 1)[-1] if str(exc).startswith("_") else str(exc).split("\n")[0]


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            "mask and is_causal",
            marks=pytest.mark.skipif(
                _TORCH < (2, 14), reason="torch < 2.14 (seen on 2.11) accepts attn_mask with is_causal"
            ),
        ),
        "causal bias and is_causal",
        "nested mha in training",
    ],
)
def test_messages_carry_torchs_words_for_the_same_mistake(case):
    """torch's own tests match some messages by their text: ours keep the argument / expected /
    got form and include torch's words where torch has words for the same mistake."""
    q, k, v = (torch.randn(2, 2, L, 8) for L in (5, 7, 7))
    if case == "nested mha in training":
        x = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)], layout=torch.jagged)
        theirs_m = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        ours_m = pyattn.nn.MultiheadAttention(8, 2, batch_first=True)

        def theirs():
            theirs_m(x, x, x)

        def ours():
            ours_m(x, x, x)
    else:
        mask = (
            torch.ones(5, 7, dtype=torch.bool) if case == "mask and is_causal" else causal_lower_right(5, 7)
        )

        def theirs():
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)

        def ours():
            pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)

    with pytest.raises(Exception) as t:
        theirs()
    with pytest.raises(InputError) as o:
        ours()
    assert isinstance(o.value, t.type)
    words = _torch_words(t.value)
    if case == "nested mha in training":
        words = words.split(". ")[0]  # then torch says why its fast path was not hit
    assert words in str(o.value), (words, str(o.value))
    assert "got" in str(o.value)
