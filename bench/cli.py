"""``pyattn bench``: every op, backend and model against its baselines, on this machine's device.

pyattn bench                      # the default suite (minutes on a 2-core CPU)
pyattn bench --full --device cuda # every shape, dtype and provider, on the GPU
pyattn bench --headline           # the few minutes of GPU figures of bench/gpu_check.sh
pyattn bench --ops additive_attention,sdpa --json new.json --compare old.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import cases as cases_mod
from . import report, runner, timing


def _default_out() -> str:
    # bench/out/ inside a source checkout; ./pyattn-bench-out from an installed copy
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(os.path.dirname(here), ".git")) or os.path.exists(
        os.path.join(os.path.dirname(here), "setup.py")
    ):
        return os.path.join(here, "out")
    return os.path.join(os.getcwd(), "pyattn-bench-out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true", help="every shape, dtype and provider (slow)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few repeats (plumbing checks)")
    parser.add_argument(
        "--headline",
        action="store_true",
        help="the headline GPU figures in a few minutes (bench/gpu_check.sh); --quick on CPU",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when present"
    )
    parser.add_argument(
        "--ops",
        default=",".join(cases_mod.GROUPS),
        help=f"comma list of {','.join(cases_mod.GROUPS)} (default: all)",
    )
    parser.add_argument(
        "--dtype", default="", help=f"comma list of {','.join(cases_mod.DTYPES)} (default: per op and device)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder for the JSON, CSV and PNG files (default: bench/out or ./pyattn-bench-out)",
    )
    parser.add_argument("--json", default=None, help="JSON path (default: OUT/bench-<device>.json)")
    parser.add_argument("--csv", default=None, help="CSV path (default: OUT/bench-<device>.csv)")
    parser.add_argument(
        "--plots", action=argparse.BooleanOptionalAction, default=True, help="draw PNG plots (default: on)"
    )
    parser.add_argument(
        "--compare", default=None, metavar="OLD.json", help="show the change against an earlier run"
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="S",
        help="record cases not started within S seconds as skipped",
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")


def _device(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("pyattn bench: --device cuda, but torch sees no CUDA device")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def run(args: argparse.Namespace) -> int:
    if sum((args.full, args.quick, args.headline)) > 1:
        print("pyattn bench: --full, --quick and --headline exclude each other", file=sys.stderr)
        return 2
    suite = "full" if args.full else "quick" if args.quick else "headline" if args.headline else "default"
    device = _device(args.device)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    try:
        cases = cases_mod.build_cases(device, suite, ops, dtypes)
    except ValueError as exc:
        print(f"pyattn bench: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for c in cases:
            print(c.id)
        return 0
    old_rows = None
    if args.compare:
        _, old_rows = report.read_json(args.compare)  # fail before the run, not after it

    out = args.out or _default_out()
    json_path = args.json or os.path.join(out, f"bench-{device}.json")
    csv_path = args.csv or os.path.join(out, f"bench-{device}.csv")
    argv = sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "bench" else []
    meta = runner.metadata(device, suite, argv)
    print(
        f"pyattn bench: {len(cases)} cases ({suite} suite) on {meta['device_name']}; "
        f"torch {meta['torch_version']}, pyattn {meta['pyattn_version']} {meta['git_commit']}; "
        f"backends {','.join(meta['pyattn_backends'])}",
        flush=True,
    )

    def save(rows):
        report.write_json(json_path, meta, rows)
        report.write_csv(csv_path, rows)

    t0 = time.perf_counter()
    rows = runner.run_cases(cases, meta, timing.BUDGETS[suite], time_budget_s=args.time_budget, on_row=save)
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["loadavg_end"] = runner.load_average()
    save(rows)
    print()
    print(report.table(rows))
    print(f"\n{report.time_summary(rows, meta)}")
    print(f"peak memory: {meta['memory_method']}")
    print(f"wrote {json_path}\nwrote {csv_path}")
    if args.plots:
        try:
            for p in report.plot(
                rows, os.path.dirname(os.path.abspath(json_path)), prefix=f"bench-{device}", meta=meta
            ):
                print(f"wrote {p}")
        except ImportError as exc:
            print(f"no plots: {exc} (pip install matplotlib)")
    if old_rows is not None:
        print(f"\nchange against {args.compare}:")
        print(report.compare(old_rows, rows))
    return 0
