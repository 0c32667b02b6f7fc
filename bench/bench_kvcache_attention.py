"""KV-cache attention, one decode step: pyattn.kvcache_attention against torch SDPA on the same step
and against the machine's read bandwidth, every figure a ratio of timings taken in the same run
(docs/design.md, "KV-cache attention").

A step: query (B, Hq=32, 1, D=128), a cache of Lk keys per sequence (Hkv=8) in the dtype, one new
token appended. Providers, timed interleaved (round-robin, so load drifts on a shared machine hit
them alike):
- ``pyattn``: ``pyattn.kvcache_attention`` on a dense (B, Hkv, L_max, D) cache (append included);
- ``pyattn_paged``: the same cache in shuffled 256-row pages with a block_table;
- ``torch``: ``torch.nn.functional.scaled_dot_product_attention(enable_gqa=True)`` over the
  filled (B, Hkv, Lk, D) part, what transformers' sdpa path runs per step (append not included:
  that favours torch);
- ``sweep``: ``torch.sum`` over a tensor of the cache's size (K and V: 2 B Hkv Lk D elements),
  a read-only pass at the speed of memory: the physical limit of a step.
Reported: times, ``vs_torch`` = torch / pyattn, the cache bytes per second each step reads, and
``of_sweep`` = sweep time / pyattn time (the share of the read bandwidth pyattn reaches).

Run: ``python -m pyattn.bench.bench_kvcache_attention [--B 1,8] [--lk 1024,4096,16384,65536]
[--dtypes fp32,bf16] [--repeats 7] [--threads N] [--no-paged] [--out rows.json]``. Prints one line per case and writes the
rows as JSON (one object per case).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HQ, HKV, D, PAGE = 32, 8, 128, 256


def _isa() -> str:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return platform.machine()
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    if "avx512f" in flags:
        return "AVX512"
    return "AVX2" if "avx2" in flags else platform.machine()


def _providers(B: int, Lk: int, dtype: torch.dtype, with_paged: bool) -> dict:
    import pyattn

    L_max = Lk + 16
    q = torch.randn(B, HQ, 1, D, dtype=dtype)
    kc = torch.randn(B, HKV, L_max, D, dtype=dtype)
    vc = torch.randn(B, HKV, L_max, D, dtype=dtype)
    k_new = torch.randn(B, HKV, 1, D, dtype=dtype)
    v_new = torch.randn(B, HKV, 1, D, dtype=dtype)
    # every step writes the same position, so the cache stays Lk long: a steady state
    seqlens = torch.full((B,), Lk - 1, dtype=torch.int32)
    k_view, v_view = kc[:, :, :Lk], vc[:, :, :Lk]
    flat = torch.randn(2 * B * HKV * Lk * D, dtype=dtype)
    steps = {
        "pyattn": lambda: pyattn.kvcache_attention(q, kc, vc, seqlens, k_new, v_new, backend="cpu"),
        "torch": lambda: F.scaled_dot_product_attention(q, k_view, v_view, enable_gqa=True),
        "sweep": lambda: flat.sum(),
    }
    if with_paged:
        per_seq = -(-L_max // PAGE)
        n_pages = B * per_seq
        table = torch.randperm(n_pages).view(B, per_seq).to(torch.int32)
        kp = torch.empty(n_pages, HKV, PAGE, D, dtype=dtype)
        vp = torch.empty(n_pages, HKV, PAGE, D, dtype=dtype)
        for b in range(B):
            for i in range(per_seq):
                n = min(PAGE, L_max - i * PAGE)
                kp[table[b, i], :, :n] = kc[b, :, i * PAGE : i * PAGE + n]
                vp[table[b, i], :, :n] = vc[b, :, i * PAGE : i * PAGE + n]
        steps["pyattn_paged"] = lambda: pyattn.kvcache_attention(
            q, kp, vp, seqlens, k_new, v_new, block_table=table, backend="cpu"
        )
    return steps


def run_case(B: int, Lk: int, name: str, repeats: int, with_paged: bool = True) -> dict:
    dtype = DTYPES[name]
    steps = _providers(B, Lk, dtype, with_paged)
    times: dict[str, list[float]] = {p: [] for p in steps}
    with torch.inference_mode():
        for step in steps.values():  # warm-up
            step()
        for _ in range(repeats):
            for p, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[p].append(time.perf_counter() - t0)
    med = {p: statistics.median(ts) * 1e3 for p, ts in times.items()}
    # the fastest repeat too: on a shared machine the medians carry the other tenants' load
    best = {p: min(ts) * 1e3 for p, ts in times.items()}
    cache_bytes = 2 * B * HKV * Lk * D * torch.finfo(dtype).bits // 8
    row = dict(
        kernel="kvcache_attention", mode="fwd", provider="pyattn", baseline="torch_sdpa(enable_gqa)",
        shape=f"B{B} Hq{HQ} Hkv{HKV} D{D} Lq1 Lk{Lk}", dtype=name, device="cpu", isa=_isa(),
        threads=torch.get_num_threads(), cache_mb=cache_bytes / 2**20,
        **{f"{p}_ms": t for p, t in med.items()},
        vs_torch=med["torch"] / med["pyattn"],
        pyattn_gbs=cache_bytes / med["pyattn"] / 1e6,
        sweep_gbs=cache_bytes / med["sweep"] / 1e6,
        of_sweep=med["sweep"] / med["pyattn"],
        torch_of_sweep=med["sweep"] / med["torch"],
        **{f"{p}_min_ms": t for p, t in best.items()},
        of_sweep_min=best["sweep"] / best["pyattn"],
        vs_torch_min=best["torch"] / best["pyattn"],
    )  # fmt: skip
    if "pyattn_paged" in med:
        row["paged_vs_dense"] = med["pyattn"] / med["pyattn_paged"]
        row["paged_of_sweep"] = med["sweep"] / med["pyattn_paged"]
    return row


def _print(row: dict) -> None:
    paged = (
        f"  paged {row['pyattn_paged_ms']:8.2f} ms ({row['paged_of_sweep']:4.0%})"
        if "pyattn_paged_ms" in row
        else ""
    )
    print(
        f"{row['dtype']:<5} {row['shape']:<36} pyattn {row['pyattn_ms']:8.2f} ms  torch {row['torch_ms']:8.2f} ms "
        f"({row['vs_torch']:5.2f}x)  sweep {row['sweep_ms']:8.2f} ms  pyattn {row['pyattn_gbs']:5.1f} GB/s "
        f"= {row['of_sweep']:4.0%} of the sweep (torch {row['torch_of_sweep']:4.0%}){paged}"
        f"  [fastest repeats: {row['vs_torch_min']:5.2f}x torch, {row['of_sweep_min']:4.0%} of the sweep]",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyattn.bench.bench_kvcache_attention",
                                 description=__doc__.split("\n\n")[0])  # fmt: skip
    ap.add_argument("--B", default="1,8", help="batch sizes, comma list")
    ap.add_argument("--lk", default="1024,4096,16384,65536", help="cache lengths, comma list")
    ap.add_argument("--dtypes", default="fp32,bf16", help=f"comma list of {', '.join(DTYPES)}")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-paged", action="store_true", help="skip the paged provider")
    ap.add_argument("--out", default=None, help="write the rows here as JSON")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(
        f"kvcache_attention decode step, cpu {_isa()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    for name in args.dtypes.split(","):
        for B in (int(b) for b in args.B.split(",")):
            for Lk in (int(n) for n in args.lk.split(",")):
                rows.append(run_case(B, Lk, name, args.repeats, not args.no_paged))
                _print(rows[-1])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
