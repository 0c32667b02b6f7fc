"""The benchmark cases of varlen attention (group "varlen_attention"): packed sequences against
pyattn's and torch's SDPA on the padded batch with a key padding mask."""

from __future__ import annotations

import itertools

import torch
from pyattn.bench._case import (
    DTYPES,
    Case,
    input_sets,
    op_step,
    pyattn_providers,
)


def varlen_lengths(B: int, L: int) -> list[int]:
    """The case's B sequence lengths, uniform in [L/4, L], the same in every run and process."""
    g = torch.Generator().manual_seed(1000 * B + L)
    return torch.randint(L // 4, L + 1, (B,), generator=g).tolist()


def build_varlen(case: Case):
    import torch.nn.functional as F

    import pyattn

    d = case.dims
    B, H, L, D, causal = d["B"], d["H"], d["L"], d["D"], bool(d["causal"])
    dtype, dev = DTYPES[case.dtype], case.device
    lens = varlen_lengths(B, L)
    total = sum(lens)
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=dev)
    p = case.provider
    padded = p in ("torch", "pyattn-sdpa")
    if padded:
        valid = torch.arange(L, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]  # (B, L)
        mask = valid[:, None, None, :]  # (B, 1, 1, L): key padding, True = attend
        if causal:
            mask = mask & torch.ones(L, L, dtype=torch.bool, device=dev).tril()

        def make_one():
            return tuple(torch.randn(B, H, L, D, device=dev, dtype=dtype) for _ in range(3))

        nbytes = 3 * B * H * L * D * dtype.itemsize
        if p == "torch":

            def fn(q, k, v):
                return F.scaled_dot_product_attention(q, k, v, mask)

        else:

            def fn(q, k, v):
                return pyattn.scaled_dot_product_attention(q, k, v, mask)

    else:

        def make_one():
            return tuple(torch.randn(total, H, D, device=dev, dtype=dtype) for _ in range(3))

        nbytes = 3 * total * H * D * dtype.itemsize
        backend = p.removeprefix("pyattn-")

        def fn(q, k, v):
            return pyattn.varlen_attention(q, k, v, cu, cu, L, L, is_causal=causal, backend=backend)

    return op_step(fn, input_sets(make_one, nbytes, dev), case.mode, range(3))


def varlen_cases(device: str, suite: str, dtypes: list[str]) -> list[Case]:
    if device == "cpu":
        providers = ["torch", "pyattn-sdpa"] + pyattn_providers(device)
        dtypes = dtypes or ["fp32"]
        grid = [(2, 2, 32, 16, False)] if suite == "quick" else [(8, 12, L, 64, False) for L in (128, 512)]
    else:
        providers = ["torch", "pyattn-sdpa"] + pyattn_providers(device)
        dtypes = dtypes or ["bf16"]
        if suite == "quick":
            grid = [(2, 2, 128, 64, False)]
        else:
            lengths = (2048,) if suite == "default" else (512, 2048, 8192)
            grid = [(16384 // L, 16, L, 128, c) for L in lengths for c in (False, True)]
    cases = []
    combos = itertools.product(dtypes, grid, ("fwd", "fwd+bwd"), providers)
    for dt, (B, H, L, D, causal), mode, prov in combos:
        useful = sum(4.0 * H * n * n * D * (0.5 if causal else 1.0) for n in varlen_lengths(B, L))
        cases.append(
            Case(
                group="varlen_attention",
                provider=prov,
                baseline="torch",
                mode=mode,
                shape=(("B", B), ("H", H), ("L", L), ("D", D), ("causal", causal)),
                dtype=dt,
                device=device,
                seq_len=L,
                flops=useful * (1.0 if mode == "fwd" else 3.5),
                builder=build_varlen,
            )
        )
    return cases


# -- the pytest-benchmark entry: `pytest bench/` (bench/conftest.py parametrises `case` from
# each test's `cases`: the case functions of this file)


def test_varlen_attention(benchmark, case):
    from pyattn.bench._pytest_bench import run_case

    run_case(benchmark, case)


test_varlen_attention.cases = (varlen_cases,)
