"""The benchmark suites: every op's and model's cases (their bench/bench_<op>.py files, the
models' bench/bench_models.py) gathered by suite, device and dtype, baselines first. The groups
are the ops' stems (the results' "kernel" column); the short names of earlier releases still
work on the command line (ALIASES)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pyattn.bench import bench_additive_attention, bench_models, bench_sdpa, bench_varlen_attention
from pyattn.bench._case import DTYPES, SUITES, Case, baselines_first, importable

__all__ = ["ALIASES", "DTYPES", "GROUPS", "SUITES", "Case", "build_cases", "resolve_groups"]

# group -> its case function (device, suite, dtypes) -> cases
GROUPS: dict[str, Callable[[str, str, list[str]], list[Case]]] = {
    "additive_attention": bench_additive_attention.additive_cases,
    "sdpa": bench_sdpa.sdpa_cases,
    "multihead_attention": bench_sdpa.mha_cases,
    "varlen_attention": bench_varlen_attention.varlen_cases,
    "bert": lambda device, suite, dtypes: (
        bench_models.model_cases(device, suite, dtypes, ["bert"])
        + (bench_models.padded_bert_cases(device, suite, dtypes) if importable("pyattn.models.bert") else [])
    ),
    "transformer": lambda device, suite, dtypes: bench_models.model_cases(
        device, suite, dtypes, ["transformer"]
    ),
    "seq2seq": lambda device, suite, dtypes: bench_models.model_cases(device, suite, dtypes, ["seq2seq"]),
}
# the short names the CLI took before the groups were the ops' stems
ALIASES = {"additive": "additive_attention", "mha": "multihead_attention", "varlen": "varlen_attention"}


def resolve_groups(ops: Iterable[str] | None) -> list[str]:
    """The groups named (stems or aliases), in the registry's order; ValueError for unknown ones."""
    if ops is None:
        return list(GROUPS)
    names = [ALIASES.get(o, o) for o in ops]
    unknown = [o for o, n in zip(ops, names, strict=True) if n not in GROUPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; expected some of {', '.join(GROUPS)}")
    return [g for g in GROUPS if g in names]


def build_cases(
    device: str, suite: str = "default", ops: Iterable[str] | None = None, dtypes: Iterable[str] | None = None
) -> list[Case]:
    """Every case of ``suite`` for ``ops`` (GROUPS keys; all when None) on ``device``.

    Arguments:
        device: "cpu" or "cuda".
        suite: "quick" (tiny shapes, for tests), "default" (the subset that runs in minutes on
            a 2-core CPU), "full" (every shape of the headline grids) or "headline" (the few
            minutes of GPU figures bench/gpu_check.sh takes; "quick" on CPU).
        ops: GROUPS keys to include.
        dtypes: DTYPES keys; None takes each op's own default for the device.
    Returns:
        the cases, baselines first within each comparison.
    """
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")
    if suite == "headline":
        return _headline_cases(device, ops, dtypes)
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    ops = resolve_groups(ops)
    dtypes = list(dtypes or [])
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"unknown dtype(s) {bad}; expected some of {', '.join(DTYPES)}")
    cases: list[Case] = []
    for group in ops:
        cases += GROUPS[group](device, suite, dtypes)
    return baselines_first(cases)


# ---------------------------------------------------------------------------------------------
# The headline selection: what one bounded GPU call measures (bench/gpu_check.sh)

# (op, mode, shape, dtype) kept from each op's full suite, most wanted first; every provider of
# a kept comparison runs (for sdpa: torch's default, pyattn's backends and each torch backend).
_HEADLINE_SDPA_LENGTHS = (1024, 2048, 4096, 8192)
# the naive providers materialise (B, H, L, L) scores: only at the short lengths
_HEADLINE_NAIVE_MAX_L = 2048


def _headline_cases(device: str, ops: Iterable[str] | None, dtypes: Iterable[str] | None) -> list[Case]:
    ops = resolve_groups(ops)
    if device != "cuda":
        return build_cases(device, "quick", ops, dtypes)
    want = list(dtypes or [])
    # the small comparisons first: sdpa's autotuning (one compile per config, head dim and
    # causality) takes most of the time, and a run cut short by its budget keeps these rows
    cases: list[Case] = []
    if "additive_attention" in ops:
        cases += [
            c
            for c in bench_additive_attention.additive_cases(device, "full", want or ["fp16"])
            if c.dims["T"] == 512 and c.dims["H"] == 512
        ]
    if "multihead_attention" in ops:
        cases += [c for c in bench_sdpa.mha_cases(device, "default", want or ["bf16"]) if c.mode == "fwd"]
    cases += [
        c
        for c in bench_models.model_cases(device, "full", want or ["bf16"], [o for o in ops if o == "bert"])
        if c.mode == "fwd" and c.dims["L"] == 512
    ]
    if "varlen_attention" in ops:
        # packed vs padded at L = 2048 (B = 8), plain and causal: before sdpa's long autotuning
        cases += bench_varlen_attention.varlen_cases(device, "default", want or ["bf16"])
    if "sdpa" in ops:
        for c in bench_sdpa.sdpa_cases(device, "full", want or ["bf16"]):
            d = c.dims
            if d["L"] not in _HEADLINE_SDPA_LENGTHS or c.provider in ("flash-attn", "xformers"):
                continue
            if c.provider in ("reference", "torch-math") and d["L"] > _HEADLINE_NAIVE_MAX_L:
                continue
            cases.append(c)
    return baselines_first(cases)
