"""Where a benchmark case's time goes, by kind of op: torch.profiler's self CPU time per op,
summed into buckets (linear layers, attention, dropout, ...), for each provider of one comparison.

    python -m pyattn.bench.profile_step --ops bert --shape lengths --mode train

CPU only. The profiler adds its own overhead, so read the buckets' shares and the providers'
ratio from one run, not the absolute times; the speed figures come from bench/interleaved.py.
"""

from __future__ import annotations

import argparse
import collections

from .interleaved import add_comparison_args, comparison_cases

# (bucket, substrings of the op name, lower case); the first match wins, the rest is "other"
BUCKETS = (
    ("attention", ("pyattn::", "scaled_dot_product", "flash_attention", "attention")),
    (
        "linear layers (mm, addmm, bmm)",
        ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul"),
    ),
    ("layer norm", ("layer_norm",)),
    ("gelu", ("gelu",)),
    ("dropout rng", ("dropout", "bernoulli")),
    ("gather / scatter", ("index", "gather", "scatter", "nonzero", "masked")),
    ("embedding", ("embedding",)),
    ("optimizer and grad accumulation", ("sgd", "add_", "_foreach", "zero_grad")),
    ("copies", ("copy", "contiguous", "clone", "aten::cat")),
)


def bucket(name: str) -> str:
    n = name.lower()
    for label, keys in BUCKETS:
        if any(k in n for k in keys):
            return label
    return "other"


def profile(step, steps: int) -> tuple[float, dict[str, float], list[tuple[str, float]]]:
    """(ms per step, ms per step by bucket, the five heaviest ops) of ``steps`` calls of step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    by = collections.Counter()
    ops = []
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3 / steps
        by[bucket(e.key)] += ms
        ops.append((e.key, ms))
    ops.sort(key=lambda t: -t[1])
    return sum(by.values()), dict(by), ops[:5]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pyattn.bench.profile_step", description=__doc__.split("\n\n")[0]
    )
    add_comparison_args(ap, suite="default", mode="train")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    cases = comparison_cases(args)
    if not cases:
        return 2
    print(f"{cases[0].group} {args.mode} {cases[0].shape_str} {cases[0].dtype} cpu, self CPU time per step")
    for c in cases:
        step = c.make()
        for _ in range(args.warmup):
            step()
        total, by, top = profile(step, args.steps)
        print(f"  {c.provider}: {total:.1f} ms")
        for label, ms in sorted(by.items(), key=lambda t: -t[1]):
            print(f"    {label:34s} {ms:8.1f} ms {100 * ms / total:5.1f}%")
        print("    heaviest ops: " + ", ".join(f"{n} {ms:.1f} ms" for n, ms in top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
