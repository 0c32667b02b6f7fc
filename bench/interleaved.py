"""Time one comparison of the registry with its providers interleaved, round-robin.

    python -m pyattn.bench.interleaved --ops bert --suite full --shape "B=8 L=512 lengths" --mode fwd

On a shared, loaded CPU the providers of a comparison measured one after another see different
loads; here every repeat runs each provider once in turn, so load drifts hit them alike. Prints
each provider's median and min and the ratio baseline / provider (the cases' baseline, from
bench/cases.py). CPU only (host clock); the GPU figures come from ``pyattn bench``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from .cases import build_cases


def add_comparison_args(ap: argparse.ArgumentParser, suite: str, mode: str) -> None:
    """--ops, --suite, --shape and --mode: the arguments that pick one comparison of the registry
    (this tool's and bench/profile_step.py's)."""
    ap.add_argument("--ops", default="bert", help="comma list of registry ops (bench/cases.py GROUPS)")
    ap.add_argument("--suite", default=suite)
    ap.add_argument("--shape", required=True, help="substring of the shape string, e.g. 'B=8 L=512 lengths'")
    ap.add_argument("--mode", default=mode)


def comparison_cases(args: argparse.Namespace) -> list:
    """The CPU cases (one per provider) of the comparison the arguments pick; [] after saying why
    when they pick none or several."""
    cases = [
        c
        for c in build_cases("cpu", args.suite, args.ops.split(","))
        if args.shape in c.shape_str and c.mode == args.mode
    ]
    keys = {c.key for c in cases}
    if len(keys) != 1:
        print(f"--shape/--mode must pick one comparison, got {len(keys)}: {sorted(k[2] for k in keys)}")
        return []
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pyattn.bench.interleaved", description=__doc__.split("\n\n")[0]
    )
    add_comparison_args(ap, suite="full", mode="fwd")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)
    cases = comparison_cases(args)
    if not cases:
        return 2
    steps = {c.provider: c.make() for c in cases}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {p: [] for p in steps}
    for _ in range(args.repeats):
        for p, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[p].append(time.perf_counter() - t0)
    baseline = cases[0].baseline
    base = statistics.median(times[baseline]) if baseline in times else None
    c = cases[0]
    print(f"{c.kernel} {c.mode} {c.shape_str} {c.dtype} {c.device}, {args.repeats} interleaved repeats")
    for p, ts in times.items():
        med = statistics.median(ts)
        ratio = f"{base / med:5.2f}x vs {baseline}" if base else ""
        print(f"  {p:22s} median {med * 1e3:10.1f} ms  min {min(ts) * 1e3:10.1f} ms  {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
