"""Runs benchmark cases and turns them into result rows (one dict per case).

A case that cannot run never stops the suite: out of memory is recorded as status "oom" (on
the GPU when the allocator says so; on the CPU before starting, when the naive path's known
footprint exceeds the free RAM, since the OOM killer cannot be caught), an unavailable or
failing provider as "error" with the message, and cases past the time budget as "skipped".
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from . import timing
from ._case import Case

COLUMNS = [
    "kernel",
    "provider",
    "baseline",
    "mode",
    "shape",
    "seq_len",
    "dtype",
    "device",
    "device_name",
    "status",
    "median_ms",
    "q1_ms",
    "q3_ms",
    "repeats",
    "tflops",
    "gtanh_per_s",
    "speedup",
    "speedup_vs_reference",
    "peak_mem_mb",
    "mem_ratio",
    "note",
    "case_s",
    "cpu_s",
    "torch_version",
    "pyattn_version",
    "git_commit",
    "timestamp",
]

# Fraction of the free host RAM a naive case may plan to use.
HOST_MEMORY_HEADROOM = 0.6
# the share of free device memory a naive provider may be estimated to need
DEVICE_MEMORY_HEADROOM = 0.8


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if out.returncode != 0:
            return ""
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_isa() -> str:
    """The ISA pyattn's CPU kernels (and ATen's) run here, and the CPU's bf16 support: the two
    kinds of machine this runs on give different CPU figures (docs/design.md, "Kernels")."""
    try:
        from pyattn import _backend

        c = _backend._C()
        cap = c.cpu_capability() if c is not None else torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError, RuntimeError):
        cap = torch.backends.cpu.get_cpu_capability()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    extra = [name.upper().replace("_", "-") for name in ("avx512_bf16", "amx_bf16") if name in flags]
    return " + ".join([cap, *extra])


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def device_name(device: str) -> str:
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {cpu_isa()})"


def metadata(device: str, suite: str, argv: list[str] | None = None) -> dict:
    import pyattn

    return {
        "suite": suite,
        "device": device,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "pyattn_version": pyattn.__version__,
        "pyattn_backends": pyattn.backends(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "host": platform.node(),
        "command": " ".join(["pyattn", "bench"] + (argv or [])),
        "isa": cpu_isa() if device == "cpu" else device_name(device).rsplit("(", 1)[-1].rstrip(")"),
        "memory_method": timing.GPU_MEMORY_METHOD if device == "cuda" else timing.CPU_MEMORY_METHOD,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # 1/5/15-minute load averages at the start (and "loadavg_end"): a run on a shared machine
        # says how shared it was
        "loadavg_start": load_average(),
    }


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def _free_device(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure(case: Case, budget: timing.Budget) -> dict:
    """Runs one case: its time, FLOP rate and peak memory, or the reason it did not run."""
    row = {"status": "ok", "note": ""}
    if case.device == "cpu" and case.mem_estimate:
        free = timing.available_host_bytes()
        if case.mem_estimate > HOST_MEMORY_HEADROOM * free:
            row.update(
                status="oom",
                note=f"needs ~{case.mem_estimate / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free: not started",
            )
            return row
    if case.device == "cuda" and case.mem_estimate:
        # a naive provider at long L would take the whole device and the cases after it
        free, _total = torch.cuda.mem_get_info()
        if case.mem_estimate > DEVICE_MEMORY_HEADROOM * free:
            row.update(
                status="oom",
                note=f"needs ~{case.mem_estimate / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free on the device: not started",
            )
            return row
    step = None
    try:
        step = case.make()
        if case.device == "cuda":
            t = timing.time_cuda(step, budget)
            mem = timing.peak_memory_cuda(step)  # after timing: compiles and autotuning are done
        else:
            t, mem = timing.time_cpu(step, budget)
        row.update(median_ms=t.median_ms, q1_ms=t.q1_ms, q3_ms=t.q3_ms, repeats=t.repeats)
        if case.flops:
            row["tflops"] = case.flops / (t.median_ms * 1e-3) / 1e12
        if case.tanh:
            row["gtanh_per_s"] = case.tanh / (t.median_ms * 1e-3) / 1e9
        if mem is not None:
            row["peak_mem_mb"] = mem / 2**20
    except Exception as exc:  # a provider's failure is a result, not the end of the run
        row.update(status="oom" if _is_oom(exc) else "error", note=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        del step
        _free_device(case.device)
    return row


def add_ratios(rows: list[dict]) -> None:
    """Speed-up = baseline time / provider time, and memory ratio = baseline peak / provider
    peak, within each comparison (same kernel, mode, shape, dtype, device)."""

    def key(r):
        return (r["kernel"], r["mode"], r["shape"], r["dtype"], r["device"])

    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault(key(r), {})[r["provider"]] = r
    for r in rows:
        group = by_key[key(r)]
        base = group.get(r["baseline"])
        ref = group.get("reference")
        t = r.get("median_ms")
        if t and base and base.get("median_ms"):
            r["speedup"] = base["median_ms"] / t
        if t and ref and ref.get("median_ms"):
            r["speedup_vs_reference"] = ref["median_ms"] / t
        m = r.get("peak_mem_mb")
        if m and base and base.get("peak_mem_mb"):
            r["mem_ratio"] = base["peak_mem_mb"] / m


def run_cases(
    cases: list[Case],
    meta: dict,
    budget: timing.Budget,
    *,
    time_budget_s: float | None = None,
    progress: Callable[[str], None] | None = None,
    on_row: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Measures every case in order and returns the rows (ratios filled in).

    Arguments:
        cases: from cases.build_cases (baselines first within each comparison).
        meta: runner.metadata(...), copied into every row.
        budget: how long to time each case.
        time_budget_s: cases not started within this many seconds are recorded as skipped.
        progress: called with one line per case.
        on_row: called with all rows so far after each case (to save partial results).
    Returns:
        one dict per case with every key in COLUMNS.
    """
    progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    rows: list[dict] = []
    start = time.perf_counter()
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for i, case in enumerate(cases, 1):
        row = {c: None for c in COLUMNS}
        row.update(
            kernel=case.kernel,
            provider=case.provider,
            baseline=case.baseline,
            mode=case.mode,
            shape=case.shape_str,
            seq_len=case.seq_len,
            dtype=case.dtype,
            device=case.device,
            device_name=meta["device_name"],
            torch_version=meta["torch_version"],
            pyattn_version=meta["pyattn_version"],
            git_commit=meta["git_commit"],
            timestamp=stamp,
        )
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            row.update(status="skipped", note=f"time budget of {time_budget_s:.0f} s spent")
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            row.update(measure(case, budget))
            # what the case cost the run, building included: wall and this process's CPU seconds
            # (on a shared machine the CPU seconds are the steadier guide to an idle run's time)
            row.update(case_s=round(time.perf_counter() - t0, 3), cpu_s=round(time.process_time() - c0, 3))
        rows.append(row)
        add_ratios(rows)
        progress(_progress_line(i, len(cases), row, time.perf_counter() - start))
        if on_row is not None:
            on_row(rows)
    return rows


def _progress_line(i: int, n: int, row: dict, elapsed: float) -> str:
    head = f"[{i:>{len(str(n))}}/{n} {elapsed:6.1f}s] {row['kernel']} {row['mode']} {row['shape']} {row['dtype']} {row['provider']}"
    if row["status"] != "ok":
        return f"{head}: {row['status'].upper()} {row['note']}"
    tail = f"{row['median_ms']:.3f} ms"
    if row.get("speedup") is not None and row["provider"] != row["baseline"]:
        tail += f", {row['speedup']:.2f}x vs {row['baseline']}"
    return f"{head}: {tail}"
