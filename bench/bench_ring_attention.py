"""Context-parallel ring attention on CPU processes (gloo): peak memory per rank and the time of
one forward+backward, P ranks against one process on the same machine (docs/design.md, "Context
parallelism").

Case: query/key/value (B=1, H, L, D) of the whole sequence, causal, zigzag layout; every rank
holds (B, H, L/P, D). Each configuration runs in fresh spawned processes:
- ``1proc``: ``pyattn.scaled_dot_product_attention`` forward+backward on the whole sequence in one
  process with every core;
- ``ring-P``: ``pyattn.distributed.ring_attention`` on P ranks of a gloo group on the same machine,
  the cores shared out (each rank ``max(1, cores // P)`` threads).
Reported per configuration: the median time of one forward+backward (the slowest rank's, ranks
started together by a barrier), ``wait_share`` (the share of it the ranks spent waiting for ring
transfers not hidden behind their attention, the mean over ranks; on a shared machine that
includes waiting for a slower rank), and the peak memory per rank: the growth of the process's
resident set over the first full-size iteration, inputs included (``VmHWM`` reset through
/proc/self/clear_refs), with ``mem_vs_1proc`` and ``time_vs_1proc`` = ratios to ``1proc`` of the
same run. Every process runs with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` (``--malloc-default``
turns that off): blocks from 64 KiB are then mapped and unmapped, so the resident set follows the
live tensors; by default glibc raises its threshold after the first large free and keeps later
freed MiB-sized buffers in its heap, which counts as memory buffers already freed (both sides
alike, the ring's per-head buffers more). On one machine the ranks share its cores, so ``time_vs_1proc`` shows the ring's
overhead, not a speed-up: that needs P machines (or GPUs).

Run: ``python -m pyattn.bench.bench_ring_attention [--L 16384] [--H 4] [--D 64] [--ranks 2,4]
[--dtype fp32] [--repeats 3] [--out rows.json]``. Prints one line per configuration and writes
the rows as JSON. Not part of ``pyattn bench``: at L=16k it takes minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch
from pyattn.bench._case import isa_name

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set


def _rank_main(rank: int, P: int, cfg: dict, tmp: str) -> None:
    import torch.distributed as dist

    import pyattn
    from pyattn.distributed import ring

    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // P))
    if P > 1:
        store = dist.FileStore(os.path.join(tmp, "store"), P)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=P, timeout=timedelta(minutes=10))
    import pyattn.distributed as pd

    B, H, L, D, dtype = 1, cfg["H"], cfg["L"], cfg["D"], DTYPES[cfg["dtype"]]

    def step(q, k, v, do):
        if P == 1:
            out = pyattn.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = pd.ring_attention(q, k, v, is_causal=True)
        torch.autograd.backward(out, do)

    def inputs(n):
        g = torch.Generator().manual_seed(rank)
        return [torch.randn(B, H, n, D, generator=g, dtype=dtype).requires_grad_(i < 3) for i in range(4)]

    step(*inputs(8 * P))  # warm-up: kernels, the ring's connections
    if P > 1:
        dist.barrier()
    base = _status("VmRSS")
    _reset_peak()
    times, waits, peak = [], [], None
    for it in range(cfg["repeats"]):
        q, k, v, do = inputs(L // P)
        if P > 1:
            dist.barrier()
        ring.STATS["wait_s"] = 0.0
        t0 = time.perf_counter()
        step(q, k, v, do)
        times.append(time.perf_counter() - t0)
        waits.append(ring.STATS["wait_s"])
        if it == 0:
            peak = _status("VmHWM") - base
        del q, k, v, do
    row = {"rank": rank, "times": times, "waits": waits, "peak": peak}
    if P > 1:
        rows = [None] * P
        dist.all_gather_object(rows, row)
        dist.destroy_process_group()
    else:
        rows = [row]
    if rank == 0:
        with open(os.path.join(tmp, "rows.json"), "w") as f:
            json.dump(rows, f)


def run_config(P: int, cfg: dict) -> dict:
    """One configuration in fresh processes: its summary row (without the ratios)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank_main, args=(P, cfg, tmp), nprocs=P, join=True, start_method="spawn")
        rows = json.load(open(os.path.join(tmp, "rows.json")))
    # per iteration: the slowest rank's time; the ranks' mean share of it spent waiting
    per_it = [max(r["times"][i] for r in rows) for i in range(cfg["repeats"])]
    share = [statistics.mean(r["waits"][i] / r["times"][i] for r in rows) for i in range(cfg["repeats"])]
    import pyattn

    flops = 4 * cfg["H"] * cfg["L"] ** 2 * cfg["D"] / 2 * 3.5  # causal forward + 2.5x backward
    t = statistics.median(per_it)
    return {
        "kernel": "ring_attention",
        "provider": "1proc" if P == 1 else f"ring-{P}",
        "mode": "fwd+bwd",
        "shape": {"B": 1, "H": cfg["H"], "L": cfg["L"], "D": cfg["D"], "causal": True, "layout": "zigzag"},
        "dtype": cfg["dtype"],
        "device": "cpu",
        "isa": isa_name(),
        "cores": os.cpu_count(),
        "ranks": P,
        "threads_per_rank": max(1, (os.cpu_count() or 1) // P),
        "version": pyattn.__version__,
        "torch": torch.__version__,
        "time_s": t,
        "times_s": per_it,
        "tflops": flops / t / 1e12,
        "wait_share": statistics.median(share) if P > 1 else 0.0,
        "peak_mem_mb_per_rank": max(r["peak"] for r in rows) / 2**20,
        "loadavg": os.getloadavg()[0],
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--L", type=int, default=16384)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--malloc-default", action="store_true", help="keep glibc's default mmap threshold")
    a = p.parse_args(argv)
    if not a.malloc_default:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the spawned processes at start
    cfg = {"L": a.L, "H": a.H, "D": a.D, "dtype": a.dtype, "repeats": a.repeats}
    rows = []
    for P in [1] + [int(x) for x in a.ranks.split(",")]:
        row = run_config(P, cfg)
        rows.append(row)
        one = rows[0]
        row["time_vs_1proc"] = row["time_s"] / one["time_s"]
        row["mem_vs_1proc"] = row["peak_mem_mb_per_rank"] / one["peak_mem_mb_per_rank"]
        print(
            f"{row['provider']:>7} L={a.L} H={a.H} D={a.D} {a.dtype} causal: {row['time_s']:.2f} s "
            f"({row['time_vs_1proc']:.2f}x 1proc), wait {100 * row['wait_share']:.0f}%, peak "
            f"{row['peak_mem_mb_per_rank']:.0f} MB/rank ({row['mem_vs_1proc']:.2f}x 1proc) "
            f"[{row['isa']}, load {row['loadavg']:.1f}]",
            flush=True,
        )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
