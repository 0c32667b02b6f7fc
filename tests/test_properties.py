"""Property tests (hypothesis): both ops, on every CPU-runnable backend, against the float64
reference with the reference-error rule of tests/helpers.py, forward and gradients.

Each example draws a tiny shape (length 1 and odd head dims included), a mask (key padding with
fully padded rows; for sdpa bool / float / broadcast / causal / -inf rows), a memory layout per
input (contiguous, transposed storage, every other element of a wider tensor, a stride-0
expanded batch), a dtype the backend takes and a seed for the values.

Profiles (registered here, chosen by env PYATTN_HYPOTHESIS_PROFILE):
    default: 300 examples per op per backend (the normal test run)
    nightly: 3000
Examples are drawn from the session seed (conftest.py: PYATTN_TEST_SEED reproduces a run), and
no example database is kept, so every run explores fresh cases.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import FLOOR, HAS_CUDA, SESSION_SEED, assert_close_to_ref, backend_params
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import pyattn
from pyattn import reference

_COMMON = dict(
    deadline=None,
    database=None,
    derandomize=False,
    print_blob=True,
    # the autouse seeding fixture is function scoped; examples build their own values from a
    # drawn seed, so it does not leak state between them
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
# Not named "default": that would replace hypothesis' own default profile for other test files.
settings.register_profile("pyattn-default", max_examples=300, **_COMMON)
settings.register_profile("pyattn-nightly", max_examples=3000, **_COMMON)
PROFILE = settings.get_profile("pyattn-" + os.environ.get("PYATTN_HYPOTHESIS_PROFILE", "default"))
# Triton's interpreter costs ~0.2-0.3 s per example (forward and backward) on these 2 shared
# cores, where the C++ kernels take ~10 ms: 300 examples per op took 58 s (additive) + 96 s
# (sdpa) under load, over the file's 150 s budget, so it runs half the examples (nightly: 1500)
# on smaller shapes (B <= 2).
INTERP_PROFILE = settings(PROFILE, max_examples=PROFILE.max_examples // 2)


def profile_for(backend: str, device: str) -> settings:
    return INTERP_PROFILE if backend == "triton" and device == "cpu" else PROFILE


# The CPU-runnable backends present here (cpu; triton through the interpreter), and cuda on a GPU.
BACKENDS = [
    p
    for p in backend_params(cpu=True, triton=True, cuda=True)
    if p.values[0] in pyattn.backends() or p.id == "cuda"
]


def dtypes_for(backend: str, device: str, op: str) -> list[torch.dtype]:
    if backend == "cpu":
        return [torch.float32, torch.float64]
    if backend == "triton" and device == "cpu":
        # fp32 mostly; the interpreter also runs fp16/bf16 (fp32 statistics)
        return [torch.float32, torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float16, torch.bfloat16]


# -- layouts: the same values seen through different strides, built differentiably from a leaf ----

LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]


def storage_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "transposed":
        return tuple(reversed(shape))
    if layout == "expanded":
        return (1, *shape[1:])
    return shape


def view(leaf: torch.Tensor, shape: tuple[int, ...], layout: str) -> torch.Tensor:
    """The op's input of ``shape`` built from ``leaf`` (of ``storage_shape``) with ``layout``."""
    if layout == "transposed":  # reversed storage: no unit stride on the last dim
        return leaf.permute(*reversed(range(leaf.dim())))
    if layout == "sliced":  # every other element of a wider tensor: last stride 2
        wide = leaf.new_zeros(*shape[:-1], 2 * shape[-1])
        wide[..., ::2] = leaf
        return wide[..., ::2]
    if layout == "expanded":  # one batch entry seen B times: batch stride 0
        return leaf.expand(*shape)
    return leaf


class Inputs:
    """Float64 values plus three differentiable copies: the backend's, the reference's in the
    input dtype (it sets the tolerance) and the float64 truth, all through the same layout."""

    def __init__(self, gen, device, dtype, specs):
        self.names = [name for name, _, _ in specs]
        base = [
            torch.randn(storage_shape(shape, lay), generator=gen, dtype=torch.float64)
            for _, shape, lay in specs
        ]
        self.leaves = {
            "out": [b.to(device=device, dtype=dtype).requires_grad_() for b in base],
            "low": [b.to(dtype=dtype).requires_grad_() for b in base],
            "f64": [b.clone().requires_grad_() for b in base],
        }
        self.views = {
            key: [view(leaf, shape, lay) for leaf, (_, shape, lay) in zip(leaves, specs, strict=True)]
            for key, leaves in self.leaves.items()
        }


def floor_for(dtype: torch.dtype, magnitude: float) -> float:
    """helpers.FLOOR, but at least one ulp of the largest value in half precision: rounding the
    result to fp16/bf16 costs up to half an ulp, and on a tiny output the reference in that dtype
    can be luckier than that (seen: bf16 grad value, Tq=1, Tk=2: 3.6e-3 error vs 5.9e-4)."""
    return max(FLOOR[dtype], torch.finfo(dtype).eps) * max(1.0, magnitude)


def check_grads(names, outs, weights_out, inputs, floors, recompute=1.0):
    """Gradients of sum(out * w) on every leaf, each path against float64 with the rule; floors
    holds, per leaf, the size of the terms that cancel in that gradient (see callers), and
    ``recompute`` widens every floor by a fused backward's error in P (see run_sdpa)."""
    grads = {}
    for key in ("out", "low", "f64"):
        loss = sum((o * w.to(o.device, o.dtype)).sum() for o, w in zip(outs[key], weights_out, strict=True))
        grads[key] = torch.autograd.grad(loss, inputs.leaves[key], allow_unused=True)
    for i, name in enumerate(names):
        g, gl, g64 = grads["out"][i], grads["low"][i], grads["f64"][i]
        if g64 is None:
            g64 = torch.zeros_like(inputs.leaves["f64"][i])
        g = torch.zeros_like(inputs.leaves["out"][i]) if g is None else g
        gl = torch.zeros_like(inputs.leaves["low"][i]) if gl is None else gl
        assert torch.isfinite(g).all(), f"grad {name} has non-finite values"
        floor = recompute * floor_for(g.dtype, max(g64.abs().max().item() if g64.numel() else 0.0, floors[i]))
        assert_close_to_ref(f"grad {name}", g, gl, g64, factor=3.0, floor=floor)


# -- additive attention -------------------------------------------------------------------------


@st.composite
def additive_cases(draw, backend, device):
    interp = backend == "triton" and device == "cpu"
    B = draw(st.integers(1, 2 if interp else 3))
    Tq = draw(st.integers(1, 5 if interp else 9))
    Tk = draw(st.integers(1, 7 if interp else 17))
    H = draw(st.integers(1, 9 if interp else 19))
    Dv = draw(st.integers(1, 7 if interp else 13))
    return dict(
        B=B,
        Tq=Tq,
        Tk=Tk,
        H=H,
        Dv=Dv,
        dtype=draw(st.sampled_from(dtypes_for(backend, device, "additive"))),
        mask=draw(st.sampled_from([None, "random", "lengths", "full_row", "all"])),
        mask_transposed=draw(st.booleans()),
        layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(3)]
        + [draw(st.sampled_from(["contiguous", "sliced"]))],
        return_weights=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def run_additive(backend, device, case):
    B, Tq, Tk, H, Dv = case["B"], case["Tq"], case["Tk"], case["H"], case["Dv"]
    gen = torch.Generator().manual_seed(case["seed"])
    specs = [
        ("query", (B, Tq, H), case["layouts"][0]),
        ("key", (B, Tk, H), case["layouts"][1]),
        ("value", (B, Tk, Dv), case["layouts"][2]),
        ("v", (H,), case["layouts"][3]),
    ]
    ins = Inputs(gen, device, case["dtype"], specs)
    mask = None
    if case["mask"] is not None:
        mask = torch.rand(B, Tk, generator=gen) < 0.4
        if case["mask"] == "lengths":
            lengths = torch.randint(0, Tk + 1, (B,), generator=gen)
            mask = torch.arange(Tk)[None, :] >= lengths[:, None]
        elif case["mask"] == "full_row":
            mask[torch.randint(0, B, (1,), generator=gen)] = True
        elif case["mask"] == "all":
            mask[:] = True
        if case["mask_transposed"]:
            mask = mask.t().contiguous().t()
    rw = case["return_weights"]
    outs = {}
    for key in ("out", "low", "f64"):
        m = None if mask is None else (mask.to(device) if key == "out" else mask)
        if key == "out":
            res = pyattn.additive_attention(*ins.views[key], m, return_weights=rw, backend=backend)
        else:
            res = reference.additive_attention(*ins.views[key], m, return_weights=rw)
        outs[key] = list(res) if rw else [res]
    for name, o, ol, o64 in zip(["context", "weights"], outs["out"], outs["low"], outs["f64"], strict=False):
        assert o.dtype == case["dtype"] and o.device.type == torch.device(device).type
        assert torch.isfinite(o).all(), f"{name} has non-finite values"
        assert_close_to_ref(
            name, o, ol, o64, floor=floor_for(o.dtype, o64.abs().max().item() if o64.numel() else 0.0)
        )
    if mask is not None:
        empty = mask.all(dim=1).to(outs["out"][0].device)  # (B,) batches with every key padded
        assert (outs["out"][0][empty] == 0).all(), "fully padded rows must give a zero context"
    weights_out = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs["f64"]]
    # dS = P o (dP - Delta) cancels (exactly 0 with one key): floor on the size of the terms
    dp = (
        (weights_out[0] @ ins.views["f64"][2].detach().transpose(-1, -2)).abs().max().item()
        if Tq * Tk * B
        else 0.0
    )
    if rw:
        dp += weights_out[1].abs().max().item()
    vmax = ins.views["f64"][3].detach().abs().max().item()
    floors = [dp * vmax * math.sqrt(Tk), dp * vmax * math.sqrt(B * Tq), 0.0, dp * math.sqrt(B * Tq * Tk)]
    check_grads(["query", "key", "value", "v"], outs, weights_out, ins, floors)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_additive_attention_properties(backend, device):
    @seed(SESSION_SEED + 1)
    @settings(profile_for(backend, device))
    @given(case=additive_cases(backend, device))
    def prop(case):
        run_additive(backend, device, case)

    prop()


# -- scaled-dot-product attention -----------------------------------------------------------------

SDPA_MASKS = [
    None,
    "causal",
    "bool",  # (B, Hq, Lq, Lk), may leave rows with no key
    "bool_padding",  # (B, 1, 1, Lk) key padding, broadcast over heads and queries
    "bool_2d",  # (Lq, Lk), broadcast over batch and heads
    "float",  # (B, Hq, Lq, Lk) additive
    "float_bcast",  # (1, 1, Lq, Lk) additive
    "float_neginf",  # additive with -inf entries and whole -inf rows
]


@st.composite
def sdpa_cases(draw, backend, device):
    interp = backend == "triton" and device == "cpu"
    Hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 1, 2, 3]))
    return dict(
        B=draw(st.integers(1, 2)),
        Hkv=Hkv,
        Hq=Hkv * group,
        gqa=group > 1,
        Lq=draw(st.integers(1, 6 if interp else 11)),
        Lk=draw(st.integers(1, 7 if interp else 17)),
        E=draw(st.integers(1, 9 if interp else 21)),
        Dv=draw(st.integers(1, 9 if interp else 21)),
        dtype=draw(st.sampled_from(dtypes_for(backend, device, "sdpa"))),
        mask=draw(st.sampled_from(SDPA_MASKS)),
        mask_grad=draw(st.booleans()),  # a float mask that requires grad (reference fallback)
        scale=draw(st.one_of(st.none(), st.floats(0.0, 2.0))),
        layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(3)],
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def sdpa_mask(case, gen):
    B, Hq, Lq, Lk = case["B"], case["Hq"], case["Lq"], case["Lk"]
    kind = case["mask"]
    if kind in (None, "causal"):
        return None
    if kind == "bool":
        return torch.rand(B, Hq, Lq, Lk, generator=gen) < 0.7
    if kind == "bool_padding":
        lengths = torch.randint(0, Lk + 1, (B,), generator=gen)
        return (torch.arange(Lk)[None, :] < lengths[:, None])[:, None, None, :]
    if kind == "bool_2d":
        return torch.rand(Lq, Lk, generator=gen) < 0.7
    if kind == "float":
        return torch.randn(B, Hq, Lq, Lk, generator=gen, dtype=torch.float64)
    if kind == "float_bcast":
        return torch.randn(1, 1, Lq, Lk, generator=gen, dtype=torch.float64)
    m = torch.randn(B, Hq, Lq, Lk, generator=gen, dtype=torch.float64)
    m[torch.rand(B, Hq, Lq, Lk, generator=gen) < 0.3] = float("-inf")
    m[0, -1, torch.randint(0, Lq, (1,), generator=gen)] = float("-inf")
    return m


def run_sdpa(backend, device, case):
    B, Hq, Hkv, Lq, Lk, E, Dv = (case[k] for k in ("B", "Hq", "Hkv", "Lq", "Lk", "E", "Dv"))
    dtype = case["dtype"]
    gen = torch.Generator().manual_seed(case["seed"])
    specs = [
        ("query", (B, Hq, Lq, E), case["layouts"][0]),
        ("key", (B, Hkv, Lk, E), case["layouts"][1]),
        ("value", (B, Hkv, Lk, Dv), case["layouts"][2]),
    ]
    ins = Inputs(gen, device, dtype, specs)
    mask64 = sdpa_mask(case, gen)
    is_float_mask = mask64 is not None and mask64.dtype != torch.bool
    mask_grad = is_float_mask and case["mask_grad"]
    masks = {}
    for key in ("out", "low", "f64"):
        if mask64 is None or not is_float_mask:
            masks[key] = None if mask64 is None else mask64.to(device if key == "out" else "cpu")
            continue
        m = mask64.to(
            dtype=torch.float64 if key == "f64" else dtype, device=device if key == "out" else "cpu"
        )
        masks[key] = m.requires_grad_() if mask_grad else m
    causal, scale, gqa = case["mask"] == "causal", case["scale"], case["gqa"]
    outs = {}
    for key in ("out", "low", "f64"):
        args = (*ins.views[key], masks[key], 0.0, causal, scale, gqa)
        if key == "out":
            outs[key] = [pyattn.scaled_dot_product_attention(*args, backend=backend)]
        else:
            outs[key] = [reference.scaled_dot_product_attention(*args)]
    out = outs["out"][0]
    assert out.dtype == dtype and out.shape == (B, Hq, Lq, Dv)
    assert torch.isfinite(out).all(), "output has non-finite values"
    o64 = outs["f64"][0]
    assert_close_to_ref("out", out, outs["low"][0], o64, floor=floor_for(dtype, o64.abs().max().item()))

    weights_out = [torch.randn(B, Hq, Lq, Dv, generator=gen, dtype=torch.float64)]
    # dS = P o (dP - Delta) cancels (exactly 0 with one key): floor on the size of the terms
    val = ins.views["f64"][2].detach().repeat_interleave(Hq // Hkv, 1)
    dp = (weights_out[0] @ val.transpose(-1, -2)).abs().max().item()
    s = 1.0 / math.sqrt(E) if scale is None else scale
    kmax = ins.views["f64"][1].detach().abs().max().item()
    qmax = ins.views["f64"][0].detach().abs().max().item()
    floors = [dp * s * kmax * math.sqrt(Lk), dp * s * qmax * math.sqrt(Lq * Hq // Hkv), 0.0]
    names = ["query", "key", "value"]
    if mask_grad:
        for key in ("out", "low", "f64"):
            ins.leaves[key] = [*ins.leaves[key], masks[key]]
        names.append("attn_mask")
        floors.append(dp)
    # A fused backward recomputes P = exp(S - lse) from the scores and the saved lse, each rounded
    # to float32 at its own magnitude: P's relative error grows as eps32 * |S|, which the float32
    # reference (exp(S - max) / sum, no lse) does not pay. Seen: float32, scale 1.6, E=16
    # (|S| ~ 20): grad value 1.46e-5 against a bound of 1.39e-5 (3 x 7.9e-7 + floor 1.15e-5).
    key64 = ins.views["f64"][1].detach().repeat_interleave(Hq // Hkv, 1)
    s_max = s * (ins.views["f64"][0].detach() @ key64.transpose(-1, -2)).abs().max().item()
    recompute = 1.0 + s_max * torch.finfo(torch.float32).eps / max(FLOOR[dtype], torch.finfo(dtype).eps)
    check_grads(names, outs, weights_out, ins, floors, recompute)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sdpa_properties(backend, device):
    @seed(SESSION_SEED + 2)
    @settings(profile_for(backend, device))
    @given(case=sdpa_cases(backend, device))
    def prop(case):
        run_sdpa(backend, device, case)

    prop()


def test_profiles():
    # 300 cases per op per backend in the normal run (150 through Triton's
    # interpreter, see INTERP_PROFILE); nightly is 10x
    assert settings.get_profile("pyattn-default").max_examples >= 300
    assert settings.get_profile("pyattn-nightly").max_examples >= 3000
    assert PROFILE.max_examples >= 300
    assert INTERP_PROFILE.max_examples >= 150
    assert not HAS_CUDA or any(p.id == "cuda" for p in BACKENDS)
