"""The benchmark cases of additive attention (group "additive_attention"): the fused op against
the naive reference on CPU, and its GPU backends, with the padded-batch comparison."""

from __future__ import annotations

import itertools
import math

import torch
from pyattn.bench._case import (
    DTYPES,
    Case,
    input_sets,
    op_step,
    pyattn_providers,
)


def build_additive(case: Case):
    import pyattn

    d = case.dims
    B, T, H, Dv = d["B"], d["T"], d["H"], d["Dv"]
    dtype = DTYPES[case.dtype]

    def make_one():
        kw = {"device": case.device, "dtype": dtype}
        q = torch.randn(B, T, H, **kw) * 0.5
        k = torch.randn(B, T, H, **kw) * 0.5
        value = torch.randn(B, T, Dv, **kw)
        v = torch.randn(H, **kw) / math.sqrt(H)
        return (q, k, value, v)

    sets = input_sets(make_one, (2 * B * T * H + B * T * Dv) * DTYPES[case.dtype].itemsize, case.device)
    mask = None
    if d.get("pad"):
        # a seq2seq batch: source lengths uniform in [T/4, T], the rest padding (a fixed draw)
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None, :] >= lengths[:, None]).to(case.device)
    if case.provider == "reference":

        def fn(q, k, value, v):
            return pyattn.reference.additive_attention(q, k, value, v, mask)
    else:
        backend = case.provider.removeprefix("pyattn-")

        def fn(q, k, value, v):
            return pyattn.additive_attention(q, k, value, v, mask, backend=backend)

    return op_step(fn, sets, case.mode, range(4))


def additive_cases(device: str, suite: str, dtypes: list[str]) -> list[Case]:
    if device == "cpu":
        providers = ["reference"] + pyattn_providers(device)
        dtypes = dtypes or ["fp32"]
        if suite == "quick":
            shapes = [(2, 32, 16, 16), (2, 64, 16, 16)]
        elif suite == "default":
            # One batch size along T, so the lines over T compare like with like; B=2: the speed
            # and memory ratios hardly depend on B (rows are B*Tq, plenty for the threads), while
            # the naive path's (B, T, T, H) tensors grow with it (B=16 at T=512: 9 GB, seconds a
            # run). --full runs B=16. The padded batch (B=4: four lengths) is its own comparison.
            shapes = [(2, t, 256, 256) for t in (64, 256, 512)] + [(4, 256, 256, 256, 1)]
        else:
            shapes = [(16, t, 256, 256) for t in (64, 256, 512)] + [(16, 256, 256, 256, 1)]
    else:
        providers = ["reference"] + pyattn_providers(device)
        dtypes = dtypes or (["fp16"] if suite != "full" else ["fp16", "fp32"])
        if suite == "quick":
            shapes = [(2, 64, 32, 32)]
        elif suite == "default":
            shapes = [(32, t, 512, 512) for t in (128, 512)] + [(32, 512, 512, 512, 1)]
        else:
            shapes = [(32, t, 512, 512) for t in (128, 512, 2048)] + [(32, 512, 512, 512, 1)]
    # a fifth entry 1: keys padded to source lengths uniform in [T/4, T] (blocks of padding are
    # skipped by the kernels; the figures still count the padded problem's work)
    shapes = [s if len(s) == 5 else (*s, 0) for s in shapes]
    cases = []
    for dt, (B, T, H, Dv, pad), mode, prov in itertools.product(
        dtypes, shapes, ("fwd", "fwd+bwd"), providers
    ):
        if suite == "default" and device == "cpu" and T == 512 and mode == "fwd+bwd":
            continue  # the default suite measures the T=512 memory ratio on the forward
        fwd = B * T * T * H + 2 * B * T * T * Dv
        scale = 1.0 if mode == "fwd" else 3.5
        elt = DTYPES[dt].itemsize
        # naive: (q+k) and tanh(q+k) of (B, T, T, H) live together; backward keeps ~4 of them
        naive = (2 if mode == "fwd" else 4) * B * T * T * H * elt
        cases.append(
            Case(
                group="additive_attention",
                provider=prov,
                baseline="reference",
                mode=mode,
                shape=(("B", B), ("T", T), ("H", H), ("Dv", Dv)) + ((("pad", 1),) if pad else ()),
                dtype=dt,
                device=device,
                seq_len=T,
                flops=fwd * scale,
                tanh=B * T * T * H * (1.0 if mode == "fwd" else 2.0),
                mem_estimate=naive if prov == "reference" else 0.0,
                builder=build_additive,
            )
        )
    return cases


# -- the pytest-benchmark entry: `pytest bench/` (bench/conftest.py parametrises `case` from
# each test's `cases`: the case functions of this file)


def test_additive_attention(benchmark, case):
    from pyattn.bench._pytest_bench import run_case

    run_case(benchmark, case)


test_additive_attention.cases = (additive_cases,)
