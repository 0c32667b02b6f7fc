"""Quick CPU comparison of pyattn's fused scaled-dot-product attention (run once, not a test).

float32, B=4, H=8, D=64, L in {256, 1024, 2048}, causal and not, forward and forward+backward:
pyattn's cpu backend vs torch.nn.functional.scaled_dot_product_attention (torch's own CPU flash
kernel) vs pyattn.reference (naive), all in one run; median of a few runs after warm-up. Ratios
are time(baseline) / time(pyattn), so > 1 means pyattn is faster.

    python bench/flash_attention_cpu_quick.py [--lengths 256 1024 2048] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import pyattn
from pyattn import reference


def median_time(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--D", type=int, default=64)
    args = ap.parse_args()
    B, H, D = args.B, args.H, args.D
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}; float32 B={B} H={H} D={D}; median of {args.reps}")  # fmt: skip
    providers = {
        "pyattn": lambda q, k, v, c: pyattn.scaled_dot_product_attention(q, k, v, is_causal=c, backend="cpu"),
        "torch": lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c),
        "naive": lambda q, k, v, c: reference.scaled_dot_product_attention(q, k, v, is_causal=c),
    }
    header = f"{'L':>5} {'causal':>6} {'mode':>8} | " + " ".join(f"{p + ' ms':>10}" for p in providers)
    header += " | torch/pyattn naive/pyattn | pyattn TFLOP/s"
    print(header)
    for L in args.lengths:
        q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
        g = torch.randn(B, H, L, D)
        for causal in (False, True):
            for mode in ("fwd", "fwd+bwd"):
                times = {}
                for name, fn in providers.items():
                    if mode == "fwd":

                        def run(fn=fn, ins=(q, k, v), causal=causal):
                            with torch.no_grad():
                                fn(*ins, causal)
                    else:
                        ins = [t.clone().requires_grad_() for t in (q, k, v)]

                        def run(fn=fn, ins=ins, causal=causal, g=g):
                            out = fn(*ins, causal)
                            torch.autograd.grad(out, ins, g)

                    reps = args.reps if name != "naive" or L <= 1024 else max(3, args.reps // 2)
                    times[name] = median_time(run, reps)
                flops = 4 * B * H * L * L * D * (0.5 if causal else 1.0) * (1.0 if mode == "fwd" else 3.5)
                row = f"{L:>5} {str(causal):>6} {mode:>8} | " + " ".join(
                    f"{times[p] * 1e3:>10.1f}" for p in providers
                )
                row += (
                    f" | {times['torch'] / times['pyattn']:>12.2f} {times['naive'] / times['pyattn']:>11.2f}"
                )
                row += f" | {flops / times['pyattn'] / 1e12:>8.3f}"
                print(row, flush=True)


if __name__ == "__main__":
    main()
