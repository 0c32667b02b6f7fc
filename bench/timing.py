"""Timing and peak-memory measurement.

Time: CPU: warm-up runs, then repeated runs timed with ``time.perf_counter``, median and
inter-quartile range. GPU: ``triton.testing.do_bench`` (CUDA events, L2 cleared between runs,
median), or CUDA events directly when Triton is missing.

Peak memory (the extra bytes one run needs beyond what existed before it):
- GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the bytes
  allocated before the run (torch's allocator: every tensor, kernel scratch included).
- CPU (Linux), read during the first warm-up run: the kernel's resident-set high-water mark. ``/proc/self/clear_refs`` (write 5)
  resets ``VmHWM`` to the current RSS, the run executes, and the figure is ``VmHWM`` minus the
  RSS before the run. glibc's mmap threshold is pinned at 64 KiB first (``mallopt``), so tensor
  buffers are mapped and unmapped on each allocation and a freed buffer cannot be silently
  reused from the heap, which would hide it from RSS. This counts all memory the process
  touches (tensors, kernel scratch, allocator slack), at page granularity. Where clear_refs is
  not available the figure is left empty rather than guessed.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

CPU_MEMORY_METHOD = "VmHWM delta (kernel RSS high-water mark, reset via /proc/self/clear_refs)"
GPU_MEMORY_METHOD = "torch.cuda.max_memory_allocated delta"


@dataclass
class Timing:
    median_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int


@dataclass
class Budget:
    """How long to measure one case."""

    warmup: int = 1  # warm-up runs (at least; fast cases warm up for warmup_s)
    warmup_s: float = 0.1
    min_repeats: int = 3
    max_repeats: int = 50
    target_s: float = 1.0  # stop repeating once this much time is measured (after min_repeats)
    gpu_warmup_ms: int = 25
    gpu_rep_ms: int = 100


BUDGETS = {
    "quick": Budget(
        warmup=1, warmup_s=0.0, min_repeats=2, max_repeats=5, target_s=0.05, gpu_warmup_ms=5, gpu_rep_ms=10
    ),
    # half a second of timed runs (at least 3) per case: the medians of the fast cases hardly
    # move past it, and the default suite's ~40 fast cases spent half a minute more at 1 s
    "default": Budget(target_s=0.5),
    "full": Budget(min_repeats=5, target_s=2.0, gpu_warmup_ms=10, gpu_rep_ms=50),
    # one bounded GPU call (bench/gpu_check.sh): short do_bench windows, still medians of many runs
    "headline": Budget(min_repeats=3, target_s=0.5, gpu_warmup_ms=10, gpu_rep_ms=40),
}


def _quartiles(samples: list[float]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[1], q[0], q[2]


def time_cpu(step: Callable[[], Any], budget: Budget) -> tuple[Timing, float | None]:
    """Median wall time of ``step`` after warm-up (host clock; CPU work is synchronous), and
    the peak memory of the first warm-up run (peak_memory_cpu), which saves a slow case a run."""
    start = time.perf_counter()
    peak = peak_memory_cpu(step)
    n = 1
    while n < budget.warmup or time.perf_counter() - start < budget.warmup_s:
        step()
        n += 1
    samples: list[float] = []
    spent = 0.0
    while len(samples) < budget.min_repeats or (
        spent < budget.target_s and len(samples) < budget.max_repeats
    ):
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        samples.append(dt * 1e3)
        spent += dt
    med, q1, q3 = _quartiles(samples)
    return Timing(med, q1, q3, len(samples)), peak


def time_cuda(step: Callable[[], Any], budget: Budget) -> Timing:
    """Median GPU time of ``step``: CUDA events around each run, L2 flushed between runs."""
    try:
        from triton.testing import do_bench

        q1, med, q3 = do_bench(
            step, warmup=budget.gpu_warmup_ms, rep=budget.gpu_rep_ms, quantiles=[0.25, 0.5, 0.75]
        )
        # do_bench does not report its count; estimate it from its own rule (rep / median)
        return Timing(med, q1, q3, max(1, int(budget.gpu_rep_ms / max(med, 1e-3))))
    except ImportError:
        pass
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for _ in range(max(budget.warmup, 3)):
        step()
    torch.cuda.synchronize()
    samples = []
    while len(samples) < budget.min_repeats or (sum(samples) < budget.gpu_rep_ms and len(samples) < 1000):
        flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        samples.append(s.elapsed_time(e))
    med, q1, q3 = _quartiles(samples)
    return Timing(med, q1, q3, len(samples))


# ---------------------------------------------------------------------------------------------
# Peak memory

_MALLOC_PINNED = False


def _pin_malloc_threshold() -> None:
    global _MALLOC_PINNED
    if _MALLOC_PINNED:
        return
    _MALLOC_PINNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
    except OSError:
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_memory_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


def peak_memory_cpu(step: Callable[[], Any]) -> float | None:
    """Extra resident bytes one run of ``step`` reaches (see the module docstring), or None."""
    if not cpu_memory_supported():
        return None
    _pin_malloc_threshold()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    out = step()
    peak = _status_kb("VmHWM")
    del out
    return max(0, peak - before) * 1024.0


def peak_memory_cuda(step: Callable[[], Any]) -> float:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return float(peak - before)


def available_host_bytes() -> float:
    """Host memory a run may take without pushing the machine into the OOM killer: the
    kernel's MemAvailable (free + reclaimable cache), capped by a cgroup limit when one is set."""
    avail = float("inf")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024.0
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            avail = min(avail, float(int(limit) - used))
    except (OSError, ValueError):
        pass
    return avail
