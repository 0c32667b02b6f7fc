"""The CPU sdpa grid: pyattn's cpu backend against torch's CPU scaled_dot_product_attention in the
same dtype, providers interleaved round-robin (bench/interleaved.py's way: load drifts on a shared
machine hit every provider alike), medians, every figure a ratio of the same run.

Grid (defaults): dtypes fp32, bf16, fp16; L in {128, 512, 1024, 2048, 4096} with B * L = 8192;
H = 8; D in {64, 128}; causal and not; forward and forward+backward. Each row also gives the
attention's GFLOP/s (flash-attention's count: 4 B H L^2 D, halved when causal, x3.5 with the
backward) as a share of the same dtype's GEMM rate (torch.mm, 2048^3 unless --gemm-size says
otherwise), sampled once per repeat of each case, interleaved with the providers.

Providers: ``torch`` (the baseline), ``pyattn`` (the cpu backend as it chooses), and with
``--paths widen,mkl,amx`` pyattn with its half block-product path forced
(PYATTN_CPU_HALF_GEMM; docs/design.md, "Half precision on CPU"), where this machine has it.

Run (outside the checkout's root, which must not be on sys.path):
``python -m pyattn.bench.bench_cpu_grid [--dtypes fp32,bf16] [--lengths 512,1024] [--dims 64]
[--modes fwd,fwd+bwd] [--causal 0,1] [--paths widen,mkl,amx] [--repeats 5] [--threads 1
--clock cpu] [--out rows.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKENS = 8192  # B * L


# Variables that cap the instruction sets ATen (and pyattn's kernels, which follow ATen's choice),
# oneDNN and MKL use: set together, they run an AVX512 machine's libraries on their AVX2 code
# (docs/design.md, "Half precision on CPU", "An AVX2 run on an AVX512 machine").
ISA_CAPS = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "PYATTN_CPU_HALF_GEMM",
    "PYATTN_CPU_F32_GEMM",
)


def cpu_isa() -> str:
    """The CPU's vector / matrix features that matter here, from /proc/cpuinfo, then the kernel
    build that ran (ATen's capability) and any variable above that capped it."""
    from pyattn import info

    flags = info._cpu_flags()
    names = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")
    cpu = "+".join(n for n in names if n in flags) or platform.machine()
    caps = [f"{k}={os.environ[k]}" for k in ISA_CAPS if os.environ.get(k)]
    capped = f" ({', '.join(caps)})" if caps else ""
    return f"{cpu}; kernels {torch.backends.cpu.get_cpu_capability()}{capped}"


def gemm_step(dtype: torch.dtype, n: int = 2048):
    """One torch.mm of n^3 in dtype, warmed up: the GEMM rate's sample."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    return lambda: torch.mm(a, b)


def gemm_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 3, clock=time.perf_counter) -> float:
    step = gemm_step(dtype, n)
    ts = []
    for _ in range(repeats):
        t0 = clock()
        step()
        ts.append(clock() - t0)
    return 2 * n**3 / statistics.median(ts) / 1e9


def _with_path(path, fn, var="PYATTN_CPU_HALF_GEMM"):
    """fn with the path variable (PYATTN_CPU_HALF_GEMM, or PYATTN_CPU_F32_GEMM) set to path for
    its duration (None: as the user left it)."""
    from pyattn import info

    if path is None:
        return fn
    return lambda: info._with_env(var, path, fn)


def _step(attn, ins, causal, mode):
    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                attn(*ins, is_causal=causal)

        return fwd

    def fwdbwd():
        out = attn(*ins, is_causal=causal)
        torch.autograd.grad(out, ins, torch.ones_like(out))

    return fwdbwd


def grid_rows(
    dtypes, lengths, dims, modes, causals, paths, repeats, warmup=1, H=8, clock=time.perf_counter, gemm_n=2048
):
    import pyattn
    from pyattn import info

    def ours(q, k, v, is_causal):
        return pyattn.scaled_dot_product_attention(q, k, v, is_causal=is_causal, backend="cpu")

    isa = cpu_isa()
    rows = []
    for name in dtypes:
        dt = DTYPES[name]
        print(f"{name}: torch.mm {gemm_n}^3 {gemm_gflops(dt, gemm_n, clock=clock):.1f} GFLOP/s", flush=True)
        # each case's share divides by GEMM samples taken among its own repeats, under its load
        mm = gemm_step(dt, gemm_n)
        half = dt in (torch.float16, torch.bfloat16)
        if half:
            forced = [p for p in paths if info.half_gemm_available(p, dt)]
        else:
            forced = [p for p in paths if p in info.F32_GEMM_PATHS and info.f32_gemm_available(p)]
        var = "PYATTN_CPU_HALF_GEMM" if half else "PYATTN_CPU_F32_GEMM"
        if half:
            fwd_path, bwd_path = info.half_gemm_path(dt, forward=True), info.half_gemm_path(dt)
        else:
            fwd_path = f"fp32 {info.f32_gemm_path()}"
        for D in dims:
            if not half:
                bwd_path = f"fp32 {info.f32_gemm_path(False, D)}"
            for L in lengths:
                B = max(1, TOKENS // L)
                for causal in causals:
                    for mode in modes:
                        ins = [torch.randn(B, H, L, D).to(dt).requires_grad_(mode != "fwd") for _ in range(3)]
                        provs = {
                            "torch": _step(F.scaled_dot_product_attention, ins, causal, mode),
                            "pyattn": _step(ours, ins, causal, mode),
                        }
                        for p in forced:
                            provs[f"pyattn[{p}]"] = _with_path(p, _step(ours, ins, causal, mode), var)
                        times = {p: [] for p in provs}
                        for _ in range(warmup):
                            for f in provs.values():
                                f()
                        mm_ts = []
                        for _ in range(repeats):
                            for p, f in provs.items():
                                t0 = clock()
                                f()
                                times[p].append(clock() - t0)
                            t0 = clock()
                            mm()
                            mm_ts.append(clock() - t0)
                        gemm = 2 * gemm_n**3 / statistics.median(mm_ts) / 1e9
                        flops = 4 * B * H * L * L * D / (2 if causal else 1) * (3.5 if mode != "fwd" else 1)
                        base = statistics.median(times["torch"])
                        for p, ts in times.items():
                            med = statistics.median(ts)
                            path = (
                                "torch"
                                if p == "torch"
                                else (
                                    p[7:-1]
                                    if p.startswith("pyattn[")
                                    else (fwd_path if mode == "fwd" else f"{fwd_path}+{bwd_path}")
                                )
                            )
                            rows.append(dict(
                                kernel="sdpa", provider=p, mode=mode, causal=bool(causal),
                                shape=f"B{B} H{H} L{L} D{D}", dtype=name, device="cpu", isa=isa,
                                path=path, threads=torch.get_num_threads(), time_ms=med * 1e3,
                                vs_torch=base / med, gflops=flops / med / 1e9,
                                gemm_gflops=gemm, gemm_share=flops / med / 1e9 / gemm,
                            ))  # fmt: skip
                        _print(rows[-len(times) :])
    return rows


def _print(rows):
    r0 = rows[0]
    head = f"{r0['dtype']:<5} {r0['mode']:<8} {r0['shape']:<18} {'causal' if r0['causal'] else 'full':<7}"
    cells = [
        f"{r['provider']} {r['time_ms']:8.1f} ms {r['vs_torch']:4.2f}x {100 * r['gemm_share']:3.0f}%"
        for r in rows
    ]
    print(head + " | " + " | ".join(cells), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--lengths", default="128,512,1024,2048,4096")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument(
        "--paths",
        default="",
        help="paths to force as extra providers: widen,mkl,amx (half dtypes), blas,brgemm (fp32)",
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: the process's CPU time, with --threads 1 the figure least disturbed by other "
        "jobs on a shared machine (a descheduled process is not charged)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: as is)")
    ap.add_argument(
        "--gemm-size",
        type=int,
        default=2048,
        help="n of the torch.mm n^3 that samples the GEMM rate (smaller where the dtype's GEMM is "
        "slow, e.g. bf16 under ISA caps)",
    )
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    print(
        f"torch {torch.__version__}, {cpu_isa()}, {torch.get_num_threads()} threads, "
        f"ATen capability {torch.backends.cpu.get_cpu_capability()}, {args.clock} clock",
        flush=True,
    )
    rows = grid_rows(
        split(args.dtypes), [int(x) for x in split(args.lengths)], [int(x) for x in split(args.dims)],
        split(args.modes), [bool(int(x)) for x in split(args.causal)], split(args.paths), args.repeats,
        clock=clock, gemm_n=args.gemm_size,
    )  # fmt: skip
    ratios = [r["vs_torch"] for r in rows if r["provider"] == "pyattn"]
    if ratios:
        geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(f"pyattn vs torch: geometric mean {geo:.2f}x, min {min(ratios):.2f}x over {len(ratios)} cases")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
