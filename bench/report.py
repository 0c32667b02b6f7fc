"""Results out: the printed table, JSON and CSV files, PNG plots, and the comparison against an
earlier JSON."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable

from .runner import COLUMNS

SCHEMA = "pyattn-bench/1"


# ---------------------------------------------------------------------------------------------
# Table


def _fmt(value, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def _time(ms) -> str:
    if ms is None:
        return "-"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms * 1000:.1f} us"


def _ratio(x) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}x" if x >= 100 else f"{x:.3g}x"


def _gflops(tflops) -> str:
    if tflops is None:
        return "-"
    g = tflops * 1e3
    return f"{g:,.0f}" if g >= 100 else f"{g:.3g}"


def _render(header: list[str], body: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def table(rows: Iterable[dict]) -> str:
    """One line per row: shape, provider, mode, median time (+-IQR/2), GFLOP/s, speed-up vs the
    baseline (and vs the naive reference), peak memory and how much less than the baseline's."""
    header = [
        "kernel",
        "mode",
        "dtype",
        "shape",
        "provider",
        "median",
        "+-iqr/2",
        "GFLOP/s",
        "speedup",
        "vs ref",
        "peak MB",
        "mem x",
        "status",
    ]
    body = []
    for r in rows:
        iqr = None if r.get("q3_ms") is None else (r["q3_ms"] - r["q1_ms"]) / 2
        is_base = r["provider"] == r["baseline"]
        body.append(
            [
                r["kernel"],
                r["mode"],
                r["dtype"],
                r["shape"],
                r["provider"] + (" *" if is_base else ""),
                _time(r.get("median_ms")),
                _time(iqr),
                _gflops(r.get("tflops")),
                _fmt(r.get("speedup"), ".2f", "x"),
                _fmt(r.get("speedup_vs_reference"), ".2f", "x"),
                _fmt(r.get("peak_mem_mb"), ".1f"),
                _ratio(r.get("mem_ratio")),
                r["status"] if r["status"] == "ok" else f"{r['status']}: {(r.get('note') or '')[:60]}",
            ]
        )
    return (
        _render(header, body, right={5, 6, 7, 8, 9, 10, 11})
        + "\n(* = the baseline of its comparison; speedup = baseline time / provider time; mem x = baseline peak / provider peak)"
    )


# ---------------------------------------------------------------------------------------------
# Files


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {
        "schema": SCHEMA,
        "meta": meta,
        "columns": COLUMNS,
        "rows": [{c: _clean(r.get(c)) for c in COLUMNS} for r in rows],
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)  # a run killed mid-write leaves the previous complete file


def write_csv(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: "" if r.get(c) is None else r.get(c) for c in COLUMNS})
    os.replace(tmp, path)


def read_json(path: str) -> tuple[dict, list[dict]]:
    with open(path) as f:
        payload = json.load(f)
    if not isinstance(payload, dict) or "rows" not in payload:
        raise ValueError(f"{path} is not a pyattn bench result (expected an object with 'rows')")
    return payload.get("meta", {}), payload["rows"]


# ---------------------------------------------------------------------------------------------
# Plots


def _dim(shape: str, name: str) -> str | None:
    for part in shape.split():
        key, _, value = part.partition("=")
        if key == name:
            return value
    return None


def plot(rows: list[dict], out_dir: str, prefix: str = "bench") -> list[str]:
    """Speed-up and peak memory against sequence length: one PNG each, one panel per
    (kernel, mode, dtype, causal) comparison, one line per provider. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def panel_key(r):
        causal = " causal" if "causal=1" in r["shape"] else ""
        return f"{r['kernel']} {r['mode']} {r['dtype']}{causal}"

    panels: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("seq_len") is not None:
            panels.setdefault(panel_key(r), []).append(r)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for what, field, ylabel, log in (
        ("speedup", "speedup", "speed-up vs baseline (x)", False),
        ("memory", "peak_mem_mb", "peak memory (MiB)", True),
    ):
        names = sorted(panels)
        n = max(1, len(names))
        cols = min(3, n)
        nrows = math.ceil(n / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
        for ax in axes.flat[n:]:
            ax.set_visible(False)
        for ax, name in zip(axes.flat, names, strict=False):
            by_provider: dict[str, list[tuple[int, float]]] = {}
            baseline = panels[name][0]["baseline"]
            for r in panels[name]:
                # log axes cannot show 0 (a run below the page granularity of the RSS reading)
                if r.get(field) is not None and (not log or r[field] > 0):
                    by_provider.setdefault(r["provider"], []).append((r["seq_len"], r[field]))
            for provider, pts in sorted(by_provider.items()):
                pts.sort()
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", label=provider + (" (baseline)" if provider == baseline else ""))
            # the default suite shrinks B at long lengths: say so on the points, not only in the table
            batches = {r["seq_len"]: _dim(r["shape"], "B") for r in panels[name]}
            if len(set(batches.values())) > 1:
                for x, b in batches.items():
                    ax.annotate(
                        f"B={b}", (x, 0.02), xycoords=("data", "axes fraction"), fontsize=7, ha="center"
                    )
            if what == "speedup":
                ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            if log:
                ax.set_yscale("log")
            ax.set_xscale("log", base=2)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("sequence length")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if by_provider:
                ax.legend(fontsize=7)
        if not names:
            axes.flat[0].text(0.5, 0.5, "no successful rows", ha="center", va="center")
        device = rows[0]["device_name"] if rows else ""
        fig.suptitle(f"pyattn bench: {what} ({device})", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{prefix}-{what}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Compare


def _row_key(r: dict) -> tuple:
    return (r["kernel"], r["provider"], r["mode"], r["shape"], r["dtype"], r["device"])


def compare(old_rows: list[dict], new_rows: list[dict]) -> str:
    """Per row present in both runs: old and new median time, the change (old / new time: >1 is
    faster now) and the speed-up vs baseline then and now; rows in only one run are listed."""
    old = {_row_key(r): r for r in old_rows}
    header = [
        "kernel",
        "mode",
        "dtype",
        "shape",
        "provider",
        "old",
        "new",
        "change",
        "old speedup",
        "new speedup",
        "peak MB old->new",
    ]
    body = []
    seen = set()
    for r in new_rows:
        k = _row_key(r)
        o = old.get(k)
        if o is None:
            continue
        seen.add(k)
        t0, t1 = o.get("median_ms"), r.get("median_ms")
        if t0 and t1:
            ratio = t0 / t1
            change = f"{ratio:.2f}x " + (
                "faster" if ratio > 1.05 else "slower" if ratio < 1 / 1.05 else "same"
            )
        else:
            change = f"{o.get('status')} -> {r.get('status')}"
        body.append(
            [
                r["kernel"],
                r["mode"],
                r["dtype"],
                r["shape"],
                r["provider"],
                _time(t0),
                _time(t1),
                change,
                _fmt(o.get("speedup"), ".2f", "x"),
                _fmt(r.get("speedup"), ".2f", "x"),
                f"{_fmt(o.get('peak_mem_mb'), '.1f')} -> {_fmt(r.get('peak_mem_mb'), '.1f')}",
            ]
        )
    text = _render(header, body, right={5, 6, 9, 10})
    only_new = [r for r in new_rows if _row_key(r) not in old]
    only_old = [r for k, r in old.items() if k not in seen]
    if only_new:
        text += f"\nnew rows (not in the old run): {len(only_new)}"
    if only_old:
        text += f"\nrows only in the old run: {len(only_old)}"
    return text + "\n(change = old time / new time)"
