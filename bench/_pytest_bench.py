"""What the bench_<op>.py files' pytest entries share: their parametrisation (bench/conftest.py
calls ``params`` with a test's case functions) and one runner."""

from __future__ import annotations

import os

import pytest
import torch

from ._case import baselines_first
from .runner import HOST_MEMORY_HEADROOM
from .timing import BUDGETS, available_host_bytes


def bench_device() -> str:
    choice = os.environ.get("PYATTN_BENCH_DEVICE", "auto")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def bench_suite() -> str:
    return os.environ.get("PYATTN_BENCH_SUITE", "default")


def params(case_fns) -> list:
    """pytest params (id = the case id) for the cases that ``case_fns`` (each (device, suite,
    dtypes) -> cases) give in the chosen suite."""
    device, suite = bench_device(), bench_suite()
    if suite == "headline":  # the CLI's GPU selection (bench/cases.py); here its whole suite
        suite = "quick" if device == "cpu" else "full"
    cases = baselines_first([c for fn in case_fns for c in fn(device, suite, [])])
    return [
        pytest.param(c, id=f"{c.provider}-{c.mode}-{c.shape_str.replace(' ', ',')}-{c.dtype}") for c in cases
    ]


def run_case(benchmark, case) -> None:
    if case.device == "cpu" and case.mem_estimate > HOST_MEMORY_HEADROOM * available_host_bytes():
        pytest.skip(f"needs ~{case.mem_estimate / 2**30:.1f} GiB of host memory")
    try:
        step = case.make()
    except ImportError as exc:
        pytest.skip(f"{case.provider} is not importable: {exc}")
    budget = BUDGETS[bench_suite()]
    if case.device == "cuda":
        inner = step

        def step():
            out = inner()
            torch.cuda.synchronize()
            return out

    benchmark.extra_info.update(
        kernel=case.kernel,
        provider=case.provider,
        baseline=case.baseline,
        mode=case.mode,
        shape=case.shape_str,
        dtype=case.dtype,
        flops=case.flops,
    )
    try:
        benchmark.pedantic(step, rounds=budget.min_repeats, warmup_rounds=budget.warmup)
    except torch.OutOfMemoryError:
        pytest.skip("out of memory")
