"""Results out: the printed table, JSON and CSV files, PNG plots, and the comparison against an
earlier JSON."""

from __future__ import annotations

import csv
import json
import math
import os
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field

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


def time_summary(rows: list[dict], meta: dict) -> str:
    """Where the run's time went: the wall time, the load average, and per op the cases' wall
    and CPU seconds (the CPU seconds move less with other jobs on the machine)."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        g = groups.setdefault(r["kernel"], [0, 0.0, 0.0])
        g[0] += 1
        g[1] += r.get("case_s") or 0.0
        g[2] += r.get("cpu_s") or 0.0
    load = " -> ".join(
        "/".join(f"{x:.1f}" for x in meta[k]) for k in ("loadavg_start", "loadavg_end") if meta.get(k)
    )
    lines = [
        f"wall time {meta.get('wall_s', 0):.1f} s"
        + (f"; load average (1/5/15 min) {load} on {os.cpu_count()} cores" if load else "")
    ]
    total = [sum(g[i] for g in groups.values()) for i in range(3)]
    for name, (n, wall, cpu) in [*groups.items(), ("all cases", total)]:
        lines.append(f"  {name:<20} {int(n):>3} cases  {wall:7.1f} s wall  {cpu:7.1f} s CPU")
    return "\n".join(lines)


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
#
# The rows become panels first (figure_panels), and the PNGs are drawn from the panels: one
# panel per comparison a user makes. Where a comparison has one shape, its panel holds grouped
# bars (a group per mode, a bar per provider); where it runs over the sequence length with every
# other size fixed, lines over L. A series is one provider in one mode at one set of sizes: it
# never joins two shapes (say B=4 and B=1, or a padded batch with an unpadded one) into a line.

# the models: compared at one shape per mode, on one panel per baseline
MODEL_KERNELS = ("bert", "transformer", "seq2seq")
# the x axis of a line panel: the dim that equals the row's seq_len
X_DIMS = ("L", "T")
# the batch dim a token-constant grid (B = tokens / L, as in the flash-attention paper) derives
TOKENS_DIM = "B"


@dataclass
class Series:
    """One provider in one mode at one set of sizes: ``fixed`` holds every dim but the x one
    (for a token-constant grid, ``B*L`` stands for B), and ``points`` are (x, row) pairs with
    unique x. In a bar panel x is the group label."""

    provider: str
    mode: str
    fixed: tuple[tuple[str, str], ...]
    label: str
    points: list[tuple] = field(default_factory=list)


@dataclass
class Panel:
    """One comparison: rows against one baseline, as lines over ``x`` or as grouped bars."""

    title: str
    kind: str  # "lines" or "bars"
    x: str  # the x dim of a line panel ("L", "T"); "" for bars
    baseline: str
    series: list[Series] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # bars: group labels, in order

    def rows(self) -> list[dict]:
        return [r for s in self.series for _, r in s.points]


def _dims(shape: str) -> list[tuple[str, str]]:
    return [tuple(part.partition("=")[::2]) for part in shape.split()]


def _x_dim(row: dict) -> str | None:
    dims = dict(_dims(row["shape"]))
    for name in X_DIMS:
        if name in dims and row.get("seq_len") is not None and dims[name] == str(row["seq_len"]):
            return name
    return None


def _fmt_dims(dims: Iterable[tuple[str, str]]) -> str:
    out = []
    for k, v in dims:
        if k == "causal":
            out.append("causal" if v == "1" else "non-causal")
        elif k == "pad":
            out.append("padded keys" if v == "1" else "")
        elif "*" in k:  # a token-constant grid: B*L=16384 reads B=16384/L
            b, x = k.split("*")
            out.append(f"{b}={v}/{x}")
        else:
            out.append(f"{k}={v}")
    return " ".join(o for o in out if o)


def _common(dim_sets: list[tuple[tuple[str, str], ...]]) -> tuple[tuple[str, str], ...]:
    """The (name, value) pairs every set shares, in the first set's order."""
    if not dim_sets:
        return ()
    return tuple(kv for kv in dim_sets[0] if all(kv in s for s in dim_sets[1:]))


def _line_families(rows: list[dict]) -> tuple[dict, list[dict]]:
    """Splits one op's rows into line families (mode + fixed dims -> rows over x, at least two
    x values) and the rows left for bars."""
    fams: dict[tuple, list[dict]] = {}
    for r in rows:
        x = _x_dim(r)
        if x is None:
            fams.setdefault(("bars", r["mode"], r["shape"]), []).append(r)
            continue
        rest = tuple(kv for kv in _dims(r["shape"]) if kv[0] != x)
        fams.setdefault((x, r["mode"], rest), []).append(r)
    # a token-constant grid: rows that differ only in x and B, with B*x the same for all
    by_tokens: dict[tuple, list[dict]] = {}
    for (x, mode, rest), rs in list(fams.items()):
        # only single-point families join one: a B that has a line of its own keeps it
        if x == "bars" or TOKENS_DIM not in dict(rest) or len({r["seq_len"] for r in rs}) > 1:
            continue
        b = int(dict(rest)[TOKENS_DIM])
        tokens = b * int(rs[0]["seq_len"])
        key = (
            x,
            mode,
            tuple(kv if kv[0] != TOKENS_DIM else (f"{TOKENS_DIM}*{x}", str(tokens)) for kv in rest),
        )
        by_tokens.setdefault(key, []).append((x, mode, rest))
    for key, members in by_tokens.items():
        xs = {int(r["seq_len"]) for m in members for r in fams[m]}
        if len(members) > 1 and len(xs) == len(members):
            fams[key] = [r for m in members for r in fams.pop(m)]
    lines, bars = {}, []
    for key, rs in fams.items():
        if key[0] != "bars" and len({r["seq_len"] for r in rs}) > 1:
            lines[key] = rs
        else:
            bars += rs
    return lines, bars


def _bar_panel(title: str, baseline: str, rows: list[dict], label_kernel: bool) -> Panel:
    shapes = [tuple(_dims(r["shape"])) for r in rows]
    common = _common(shapes)
    groups: dict[tuple, str] = {}
    for r, shape in zip(rows, shapes, strict=True):
        own = _fmt_dims(kv for kv in shape if kv not in common)
        head = " ".join(p for p in ((r["kernel"] if label_kernel else ""), r["mode"]) if p)
        name = "\n".join([head, *textwrap.wrap(own, 18, break_on_hyphens=False)])
        groups.setdefault((r["kernel"], r["mode"], r["shape"]), name)
    panel = Panel(
        title=f"{title}\n{_fmt_dims(common)}".rstrip(),
        kind="bars",
        x="",
        baseline=baseline,
        groups=list(groups.values()),
    )
    by_provider: dict[str, Series] = {}
    for r in rows:
        s = by_provider.setdefault(r["provider"], Series(r["provider"], "", (), r["provider"]))
        s.points.append((groups[(r["kernel"], r["mode"], r["shape"])], r))
    panel.series = list(by_provider.values())
    return panel


def _line_panel(title: str, baseline: str, fams: dict) -> Panel:
    x = next(iter(fams))[0]
    fixed_sets = [key[2] for key in fams]
    common = _common(fixed_sets)
    modes = {key[1] for key in fams}
    panel = Panel(title="", kind="lines", x=x, baseline=baseline)
    for (_, mode, rest), rs in fams.items():
        own = _fmt_dims(kv for kv in rest if kv not in common)
        by_provider: dict[str, Series] = {}
        for r in sorted(rs, key=lambda r: int(r["seq_len"])):
            label = " ".join(p for p in (r["provider"], mode if len(modes) > 1 else "", own) if p)
            s = by_provider.setdefault(r["provider"], Series(r["provider"], mode, rest, label))
            s.points.append((int(r["seq_len"]), r))
        panel.series += list(by_provider.values())
    head = f"{title}, {next(iter(modes))}" if len(modes) == 1 else title
    panel.title = f"{head}\n{_fmt_dims(common)}".rstrip()
    return panel


def figure_panels(rows: list[dict]) -> list[Panel]:
    """The panels both PNGs draw, from a run's rows (those with status "ok").

    Per op and baseline: a line panel per set of fixed sizes where rows run over the sequence
    length (each mode a line per provider), one bar panel for the rest (comparisons at a single
    shape, each mode a group).
    The models share one bar panel per baseline (a group per model and mode)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    panels: list[Panel] = []
    ops: dict[tuple, list[dict]] = {}
    models: dict[tuple, list[dict]] = {}
    for r in ok:
        key = (r["baseline"], r["dtype"], r["device"])
        if r["kernel"] in MODEL_KERNELS:
            models.setdefault(key, []).append(r)
        else:
            ops.setdefault((r["kernel"], *key), []).append(r)
    for (kernel, baseline, dtype, _device), rs in ops.items():
        lines, bars = _line_families(rs)
        title = f"{kernel} vs {baseline} ({dtype})"
        # one line panel per set of fixed sizes (sdpa: causal and not apart), its modes together
        by_fixed: dict[tuple, dict] = {}
        for key, fam in lines.items():
            by_fixed.setdefault(key[2], {})[key] = fam
        for fams in by_fixed.values():
            panels.append(_line_panel(title, baseline, fams))
        if bars:
            panels.append(_bar_panel(title, baseline, bars, label_kernel=False))
    for (baseline, dtype, _device), rs in models.items():
        kernels = sorted({r["kernel"] for r in rs}, key=MODEL_KERNELS.index)
        what = "models" if len(kernels) > 1 else kernels[0]
        panels.append(
            _bar_panel(f"{what} vs {baseline} ({dtype})", baseline, rs, label_kernel=len(kernels) > 1)
        )
    return panels


def figure_title(what: str, rows: list[dict], meta: dict | None = None) -> str:
    """The machine (and for a CPU its ISA), torch and pyattn: a figure read without its files."""
    meta = meta or {}
    device = meta.get("device_name") or (rows[0]["device_name"] if rows else "")
    isa = meta.get("isa")
    head = f"pyattn bench: {what} - {device}" + (f", {isa}" if isa and isa not in device else "")
    tail = ", ".join(
        p
        for p in (
            f"torch {meta['torch_version']}" if meta.get("torch_version") else "",
            f"pyattn {meta['pyattn_version']} {meta.get('git_commit', '')}".strip()
            if meta.get("pyattn_version")
            else "",
            f"{meta['suite']} suite" if meta.get("suite") else "",
            meta.get("started", "")[:10],
        )
        if p
    )
    return head + ("\n" + tail if tail else "")


def _style(provider: str, providers: list[str]):
    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors
    return colors[providers.index(provider) % len(colors)]


def plot(rows: list[dict], out_dir: str, prefix: str = "bench", meta: dict | None = None) -> list[str]:
    """Speed-up and peak memory, one PNG each, drawn from figure_panels(rows): the same panels
    in both. Speed-up panels show each rival's ratio to the baseline (dashed line at 1); memory
    panels every provider's peak, the baseline's included. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = figure_panels(rows)
    providers = sorted({s.provider for p in panels for s in p.series})
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for what, field_, ylabel in (
        ("speedup", "speedup", "speed-up vs baseline (x, higher is better)"),
        ("memory", "peak_mem_mb", "peak memory (MiB, log; lower is better)"),
    ):
        slots = _layout([2 if len(p.groups) > 3 else 1 for p in panels], columns=3)
        cols = max([c + w for _, c, w in slots], default=1)
        nrows = max([r + 1 for r, _, _ in slots], default=1)
        fig = plt.figure(figsize=(5.6 * cols, 4.2 * nrows + 0.6), layout="constrained")
        grid = fig.add_gridspec(nrows, cols)
        for (r, c, w), panel in zip(slots, panels, strict=True):
            _draw_panel(fig.add_subplot(grid[r, c : c + w]), panel, what, field_, ylabel, providers)
        if not panels:
            fig.add_subplot(grid[0, 0]).text(0.5, 0.5, "no successful rows", ha="center", va="center")
        fig.suptitle(
            figure_title("speed-up" if what == "speedup" else "peak memory", rows, meta), fontsize=10
        )
        path = os.path.join(out_dir, f"{prefix}-{what}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _layout(widths: list[int], columns: int) -> list[tuple[int, int, int]]:
    """(row, column, width) per panel, in order, on a grid ``columns`` wide (a wide panel
    takes two slots; it starts a new row where it does not fit)."""
    cols = min(columns, max([sum(widths)] + [w for w in widths], default=1))
    out, r, c = [], 0, 0
    for w in widths:
        w = min(w, cols)
        if c + w > cols:
            r, c = r + 1, 0
        out.append((r, c, w))
        c += w
    return out


def _value(row: dict, field_: str) -> float | None:
    v = row.get(field_)
    # a log axis cannot show 0 (a run below the page granularity of the RSS reading)
    if v is None or (field_ == "peak_mem_mb" and v <= 0):
        return None
    return float(v)


def _draw_panel(ax, panel: Panel, what: str, field_: str, ylabel: str, providers: list[str]) -> None:
    # speed-up: the baseline is 1 by definition, drawn as the dashed line, not as a series
    series = [s for s in panel.series if what != "speedup" or s.provider != panel.baseline]
    if panel.kind == "lines":
        dashes = {"fwd": "-", "fwd+bwd": "--", "train": "--", "decode": ":"}
        markers = "osD^v<>"
        variants = sorted({s.label.removeprefix(s.provider) for s in series})
        for s in series:
            pts = [(x, _value(r, field_)) for x, r in s.points]
            pts = [(x, y) for x, y in pts if y is not None]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            ax.plot(
                xs,
                ys,
                color=_style(s.provider, providers),
                ls=dashes.get(s.mode, "-"),
                marker=markers[variants.index(s.label.removeprefix(s.provider)) % len(markers)],
                label=s.label + (" (baseline)" if s.provider == panel.baseline else ""),
            )
        ax.set_xscale("log", base=2)
        xs_all = sorted({x for s in panel.series for x, _ in s.points})
        ax.set_xticks(xs_all, [str(x) for x in xs_all])
        ax.minorticks_off()
        ax.set_xlabel(f"sequence length {panel.x}")
    else:
        # each group's bars side by side, centred on the group: a provider that one group
        # lacks (torch.nn.Transformer beside BERT) leaves no hole
        at = [{g: _value(r, field_) for g, r in s.points} for s in series]
        width = 0.8 / max(1, max((sum(a.get(g) is not None for a in at) for g in panel.groups), default=1))
        placed: dict[int, tuple[list, list]] = {i: ([], []) for i in range(len(series))}
        for j, g in enumerate(panel.groups):
            present = [i for i, a in enumerate(at) if a.get(g) is not None]
            for k, i in enumerate(present):
                placed[i][0].append(j + (k - (len(present) - 1) / 2) * width)
                placed[i][1].append(at[i][g])
        fmt = "{:.2f}x" if what == "speedup" else "{:.3g}"
        for i, s in enumerate(series):
            xs, ys = placed[i]
            bars = ax.bar(
                xs,
                ys,
                width,
                color=_style(s.provider, providers),
                label=s.label + (" (baseline)" if s.provider == panel.baseline else ""),
            )
            ax.bar_label(bars, [fmt.format(y) for y in ys], fontsize=6, padding=1)
        ax.set_xticks(range(len(panel.groups)), panel.groups, fontsize=7)
        ax.margins(y=0.12)
    if what == "speedup":
        ax.axhline(1.0, color="grey", lw=0.8, ls="--", label=f"{panel.baseline} (baseline) = 1")
    elif not any(_value(r, field_) is not None for s in series for _, r in s.points):
        # every reading of this panel fell below the RSS page granularity: nothing to put on a
        # log axis (matplotlib refuses one with no positive value)
        ax.text(0.5, 0.5, "no memory above the reading's granularity", ha="center", va="center", fontsize=7)
    else:
        from matplotlib import ticker

        ax.set_yscale("log")
        plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        low, high = ax.get_ylim()
        ax.yaxis.set_minor_formatter(plain if high / low < 10 else ticker.NullFormatter())
    ax.set_title(panel.title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


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
