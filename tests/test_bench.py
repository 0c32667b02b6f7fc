"""The benchmark suite's plumbing (pyattn bench): files, columns, plots, comparison, failure
handling. No test here asserts a speed."""

import copy
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from pyattn.bench import bench_additive_attention, report, runner, timing
from pyattn.bench import cases as cases_mod

from pyattn.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: the tiny shapes gain nothing from two, and on a shared, oversubscribed
    machine every parallel region waits for a descheduled thread (plumbing, not speed, is tested)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One tiny CPU run of two ops, shared by the tests that read its files."""
    out = tmp_path_factory.mktemp("bench")
    json_path = out / "r.json"
    csv_path = out / "r.csv"
    capture = pytest.MonkeyPatch()
    import io

    buf = io.StringIO()
    capture.setattr(sys, "stdout", buf)
    try:
        rc = main(
            [
                "bench",
                "--quick",
                "--device",
                "cpu",
                "--ops",
                "additive,sdpa",
                "--out",
                str(out),
                "--json",
                str(json_path),
                "--csv",
                str(csv_path),
            ]
        )
    finally:
        capture.undo()
    return {"rc": rc, "out": out, "json": json_path, "csv": csv_path, "stdout": buf.getvalue()}


def test_quick_run_writes_json_with_every_column(quick_run):
    assert quick_run["rc"] == 0
    payload = json.loads(quick_run["json"].read_text())
    assert payload["schema"] == report.SCHEMA
    meta = payload["meta"]
    for key in ("device_name", "torch_version", "pyattn_version", "git_commit", "memory_method", "wall_s"):
        assert key in meta, key
    rows = payload["rows"]
    expected = cases_mod.build_cases("cpu", "quick", ["additive", "sdpa"])
    assert len(rows) == len(expected)
    assert {r["kernel"] for r in rows} == {"additive_attention", "sdpa"}
    for r in rows:
        assert list(r) == runner.COLUMNS
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
        assert r["repeats"] >= 2
        assert r["tflops"] > 0
        assert r["device"] == "cpu" and r["device_name"] and r["torch_version"]
        assert r["speedup"] is not None  # every comparison has its baseline measured
        if r["provider"] == r["baseline"]:
            assert r["speedup"] == pytest.approx(1.0)
        if timing.cpu_memory_supported():
            assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] >= 0
    modes = {(r["kernel"], r["mode"]) for r in rows}
    assert ("additive_attention", "fwd+bwd") in modes and ("sdpa", "fwd") in modes


def test_quick_run_writes_csv_matching_json(quick_run):
    with open(quick_run["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == runner.COLUMNS
        csv_rows = list(reader)
    json_rows = json.loads(quick_run["json"].read_text())["rows"]
    assert len(csv_rows) == len(json_rows)
    for c, j in zip(csv_rows, json_rows, strict=True):
        assert c["provider"] == j["provider"] and c["shape"] == j["shape"]
        assert float(c["median_ms"]) == pytest.approx(j["median_ms"])


def test_quick_run_draws_png_plots(quick_run):
    for what in ("speedup", "memory"):
        path = quick_run["out"] / f"bench-cpu-{what}.png"
        assert path.exists(), path
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_quick_run_prints_table(quick_run):
    text = quick_run["stdout"]
    header = next(line for line in text.splitlines() if line.startswith("kernel"))
    for col in ("shape", "provider", "median", "GFLOP/s", "speedup", "peak MB"):
        assert col in header
    rows = json.loads(quick_run["json"].read_text())["rows"]
    for r in rows:
        assert any(r["shape"] in line and r["provider"] in line for line in text.splitlines())


def test_compare_reports_changes(quick_run, tmp_path, capsys):
    rows = json.loads(quick_run["json"].read_text())["rows"]
    old = copy.deepcopy(rows)
    old[0]["median_ms"] = rows[0]["median_ms"] * 4  # was 4x slower: now "4.00x faster"
    old[1]["median_ms"] = rows[1]["median_ms"] / 4  # was 4x faster: now "slower"
    dropped = old.pop()  # a row the old run did not have
    text = report.compare(old, rows)
    lines = text.splitlines()
    assert "4.00x faster" in next(
        line
        for line in lines
        if rows[0]["shape"] in line and rows[0]["provider"] in line and rows[0]["mode"] in line
    )
    assert "0.25x slower" in text
    assert "new rows (not in the old run): 1" in text
    assert dropped["provider"]

    # the CLI path: --compare against a doctored copy of a run's JSON
    doctored = tmp_path / "old.json"
    payload = json.loads(quick_run["json"].read_text())
    for r in payload["rows"]:
        r["median_ms"] *= 10
    doctored.write_text(json.dumps(payload))
    rc = main(
        [
            "bench",
            "--quick",
            "--device",
            "cpu",
            "--ops",
            "additive",
            "--no-plots",
            "--out",
            str(tmp_path),
            "--compare",
            str(doctored),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert f"change against {doctored}" in out
    assert "faster" in out
    assert not list(tmp_path.glob("*.png"))  # --no-plots


def test_compare_rejects_a_file_that_is_not_a_result(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="not a pyattn bench result"):
        report.read_json(str(bad))


def test_ratios_are_baseline_over_provider():
    base = {
        "kernel": "k",
        "mode": "fwd",
        "shape": "s",
        "dtype": "fp32",
        "device": "cpu",
        "baseline": "reference",
    }
    rows = [
        dict(base, provider="reference", median_ms=12.0, peak_mem_mb=400.0),
        dict(base, provider="fast", median_ms=3.0, peak_mem_mb=10.0),
        dict(base, provider="broken", median_ms=None, peak_mem_mb=None),
    ]
    runner.add_ratios(rows)
    assert rows[1]["speedup"] == pytest.approx(4.0)
    assert rows[1]["speedup_vs_reference"] == pytest.approx(4.0)
    assert rows[1]["mem_ratio"] == pytest.approx(40.0)
    assert rows[0]["speedup"] == pytest.approx(1.0)
    assert "speedup" not in rows[2]


def _case(**kw):
    d = {
        "group": "additive_attention",
        "provider": "reference",
        "baseline": "reference",
        "mode": "fwd",
        "shape": (("B", 1), ("T", 8), ("H", 4), ("Dv", 4)),
        "dtype": "fp32",
        "device": "cpu",
        "seq_len": 8,
    }
    d.update(kw)
    return cases_mod.Case(**d)


def test_failing_provider_is_recorded_not_raised():
    def broken(case):
        raise RuntimeError("backend exploded")

    cases = [
        _case(builder=bench_additive_attention.build_additive),
        _case(provider="pyattn-broken", builder=broken),
    ]
    meta = runner.metadata("cpu", "quick")
    rows = runner.run_cases(cases, meta, timing.BUDGETS["quick"], progress=lambda line: None)
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"] == "error" and "backend exploded" in rows[1]["note"]
    assert rows[1]["speedup"] is None
    assert report.table(rows).count("error: RuntimeError") == 1


def test_naive_case_too_big_for_host_memory_is_recorded_as_oom():
    huge = _case(mem_estimate=1e18, builder=bench_additive_attention.build_additive)
    row = runner.measure(huge, timing.BUDGETS["quick"])
    assert row["status"] == "oom" and "GiB" in row["note"]


def test_time_budget_skips_the_rest():
    cases = [
        _case(builder=bench_additive_attention.build_additive),
        _case(provider="pyattn-cpu", builder=bench_additive_attention.build_additive),
    ]
    rows = runner.run_cases(
        cases,
        runner.metadata("cpu", "quick"),
        timing.BUDGETS["quick"],
        time_budget_s=0.0,
        progress=lambda line: None,
    )
    assert [r["status"] for r in rows] == ["skipped", "skipped"]


def test_cli_rejects_bad_arguments(capsys):
    assert main(["bench", "--quick", "--device", "cpu", "--ops", "additive,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["bench", "--quick", "--device", "cpu", "--dtype", "fp8"]) == 2
    assert "fp8" in capsys.readouterr().err
    assert main(["bench", "--quick", "--full"]) == 2


def test_registry_full_shapes():
    """The --full CPU suite holds the headline shapes (additive B=16 H=256 T in 64/256/512; sdpa
    L in 256/1024/2048, causal and not), with their baselines."""
    full = cases_mod.build_cases("cpu", "full", ["additive", "sdpa"])
    additive = {(c.dims["B"], c.dims["T"], c.dims["H"]) for c in full if c.group == "additive_attention"}
    assert additive == {(16, t, 256) for t in (64, 256, 512)}
    sdpa = {(c.dims["L"], c.dims["causal"]) for c in full if c.group == "sdpa"}
    assert sdpa == {(L, c) for L in (256, 1024, 2048) for c in (False, True)}
    assert {c.provider for c in full if c.group == "sdpa"} >= {"torch", "reference"}
    # the Triton interpreter (on under the tests) is never benchmarked on CPU
    assert not [c for c in full if c.provider in ("pyattn-triton", "pyattn-cuda")]
    flops = next(c for c in full if c.group == "sdpa" and c.dims["causal"] and c.mode == "fwd")
    assert flops.flops == pytest.approx(4 * 4 * 8 * flops.dims["L"] ** 2 * 64 / 2)


def test_pytest_benchmark_files_collect_from_the_registry():
    """bench/bench_<op>.py are collected with `pytest bench/` (and not by the normal run)."""
    proc = subprocess.run(
        # the pytest console script beside this interpreter: the checkout's root stays off sys.path
        [os.path.join(os.path.dirname(sys.executable), "pytest"), "bench/", "--collect-only", "-q"]
        + ["-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYATTN_BENCH_DEVICE="cpu", PYATTN_BENCH_SUITE="quick"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n_additive = len(cases_mod.build_cases("cpu", "quick", ["additive"]))
    assert proc.stdout.count("bench_additive_attention.py::test_additive_attention[") == n_additive
    assert "bench_sdpa.py::test_sdpa[" in proc.stdout
    assert "bench_sdpa.py::test_multihead_attention[" in proc.stdout


def test_groups_are_the_op_stems_and_old_names_still_work():
    """The bench groups are the ops' stems, each op's cases live in its bench/bench_<op>.py, and
    the CLI's earlier short names are aliases."""
    from pyattn.ops._glue import OPS

    for op in OPS:
        if op in cases_mod.GROUPS:
            assert cases_mod.GROUPS[op].__module__ == f"pyattn.bench.bench_{op}"
    assert {"additive_attention", "sdpa", "varlen_attention"} <= set(cases_mod.GROUPS)
    got = cases_mod.resolve_groups(["mha", "additive", "varlen"])
    assert got == ["additive_attention", "multihead_attention", "varlen_attention"]
    with pytest.raises(ValueError, match="unknown op"):
        cases_mod.resolve_groups(["nope"])


@pytest.mark.parametrize(
    "group", ["multihead_attention", "varlen_attention", "bert", "transformer", "seq2seq"]
)
def test_every_quick_case_of_a_group_builds_and_steps(group):
    # the quick_run fixture covers additive and sdpa; a model case that cannot be built shows
    # up only as an "error" row in a long run, so build and step each one here
    cases = cases_mod.build_cases("cpu", "quick", [group])
    assert cases, f"no quick cases for {group}"
    for case in cases:
        out = case.make()()
        first = out[0] if isinstance(out, tuple) else out
        assert torch.isfinite(first.float()).all(), case.key


# ---------------------------------------------------------------------------------------------
# The plots' panels (report.figure_panels): the data structure both PNGs are drawn from


def _rows_of(cases):
    """Result rows as a run would write them for these cases (every case ok)."""
    rows = []
    for i, c in enumerate(cases):
        rows.append(
            {
                "kernel": c.kernel,
                "provider": c.provider,
                "baseline": c.baseline,
                "mode": c.mode,
                "shape": c.shape_str,
                "seq_len": c.seq_len,
                "dtype": c.dtype,
                "device": c.device,
                "device_name": "test machine",
                "status": "ok",
                "median_ms": 1.0 + i,
                "peak_mem_mb": 2.0 + i,
            }
        )
    runner.add_ratios(rows)
    return rows


def _comparison(r):
    return (r["kernel"], r["mode"], r["shape"], r["dtype"], r["device"])


def _check_panels(rows):
    """Every series has one fixed set of non-x dims and unique x values; every row is drawn
    once; a comparison (kernel, mode, shape, dtype, device) lives in exactly one panel, against
    one baseline. Returns the panels."""
    panels = report.figure_panels(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    drawn = [id(r) for p in panels for r in p.rows()]
    assert sorted(drawn) == sorted(id(r) for r in ok), "every ok row is drawn exactly once"
    home: dict[tuple, set[int]] = {}
    for i, p in enumerate(panels):
        assert p.kind in ("lines", "bars") and p.title
        assert {r["baseline"] for r in p.rows()} == {p.baseline}, p.title
        for r in p.rows():
            home.setdefault(_comparison(r), set()).add(i)
        labels = [s.label for s in p.series]
        assert len(labels) == len(set(labels)), f"two series with one label in {p.title!r}"
        for s in p.series:
            xs = [x for x, _ in s.points]
            assert len(xs) == len(set(xs)), f"{s.label}: x repeats in {p.title!r}"
            assert {r["provider"] for _, r in s.points} == {s.provider}
            if p.kind == "lines":
                assert len(xs) >= 2, f"{s.label}: a line of one point in {p.title!r}"
                assert {r["mode"] for _, r in s.points} == {s.mode}
                assert {r["dtype"] for _, r in s.points} == {s.points[0][1]["dtype"]}
                for x, r in s.points:
                    # the row's shape is the series' fixed dims at this x, nothing else
                    dims = dict(s.fixed)
                    for k in [k for k in dims if "*" in k]:  # a token-constant grid
                        b, xdim = k.split("*")
                        dims[b] = str(int(dims.pop(k)) // x)
                    dims[p.x] = str(x)
                    assert dims == dict(report._dims(r["shape"])), (s.label, r["shape"])
                    assert r["seq_len"] == x
            else:
                assert set(xs) <= set(p.groups)
        if p.kind == "bars":
            for g in p.groups:
                members = [r for s in p.series for x, r in s.points if x == g]
                assert members and len({_comparison(r) for r in members}) == 1, (p.title, g)
    assert all(len(v) == 1 for v in home.values()), "a comparison split across panels"
    return panels


@pytest.mark.parametrize(
    "device,suite",
    [
        ("cpu", "quick"),
        ("cpu", "default"),
        ("cpu", "full"),
        ("cuda", "default"),
        ("cuda", "full"),
        ("cuda", "headline"),
    ],
)
def test_plot_series_are_consistent(device, suite):
    _check_panels(_rows_of(cases_mod.build_cases(device, suite)))


def test_default_cpu_plots_one_panel_per_comparison():
    """The default suite's picture: ops that run over the sequence length at fixed other sizes
    draw lines (additive, sdpa causal and not, varlen), single-shape comparisons draw bars, the
    models share one panel against the reference path, padded BERT has its own against
    transformers and the Transformer's generate its own against cache-free decoding."""
    panels = _check_panels(_rows_of(cases_mod.build_cases("cpu", "default")))
    kinds = {}
    for p in panels:
        kernels = {r["kernel"] for r in p.rows()}
        kinds.setdefault(p.kind, []).append((tuple(sorted(kernels)), p.baseline))
    assert sorted(kinds["lines"]) == [
        (("additive_attention",), "reference"),
        (("sdpa",), "torch"),  # non-causal
        (("sdpa",), "torch"),  # causal
        (("varlen_attention",), "torch"),
    ]
    for p in panels:
        if p.kind == "lines":  # one line per provider and mode, all modes of the op on the panel
            assert len({(s.provider, s.mode) for s in p.series}) == len(p.series)
            assert {s.mode for s in p.series} == {"fwd", "fwd+bwd"}
    assert (("bert", "seq2seq", "transformer"), "reference") in kinds["bars"]
    assert (("bert",), "transformers-sdpa") in kinds["bars"]
    # Transformer.generate with the KV cache against cache-free decoding
    assert (("transformer",), "no-cache") in kinds["bars"]
    assert len(panels) == 9
    # the padded additive batch is not on the unpadded line
    additive = next(p for p in panels if p.kind == "lines" and p.baseline == "reference")
    assert not any("pad=1" in r["shape"] for r in additive.rows())


def test_plot_never_joins_two_shapes():
    """The old default suite's sdpa shapes (B=4 at L=256 and 1024, B=1 at 2048) and its padded
    additive batch: no line joins two batch sizes, or the padded case into the unpadded line."""
    sdpa = [
        _case(
            group="sdpa",
            provider=p,
            baseline="torch",
            mode="fwd+bwd",
            shape=(("B", B), ("H", 8), ("L", L), ("D", 64), ("causal", False)),
            seq_len=L,
        )
        for B, L in ((4, 256), (4, 1024), (1, 2048))
        for p in ("torch", "pyattn-cpu")
    ]
    additive = [
        _case(provider=p, shape=(("B", 4), ("T", T), ("H", 8), ("Dv", 8)) + pad, seq_len=T)
        for T, pad in ((64, ()), (256, ()), (256, (("pad", 1),)))
        for p in ("reference", "pyattn-cpu")
    ]
    panels = _check_panels(_rows_of(sdpa + additive))
    by = {(p.kind, p.baseline): p for p in panels}
    assert len(by) == len(panels) == 4
    line = by[("lines", "torch")]
    assert {x for s in line.series for x, _ in s.points} == {256, 1024}  # B=4 only
    single = by[("bars", "torch")]
    assert single.groups == ["fwd+bwd"] and "B=1 H=8 L=2048" in single.title
    line = by[("lines", "reference")]
    assert all("pad" not in r["shape"] for r in line.rows())
    assert len(by[("bars", "reference")].groups) == 1  # the padded batch, at T=256


def test_plot_token_constant_grid_is_one_line():
    """The GPU grids keep B*L fixed (the flash-attention paper's 16k tokens): one line over L,
    titled B=16384/L, whose every point is the shape its row ran."""
    cases = [
        _case(
            group="sdpa",
            provider=p,
            baseline="torch",
            shape=(("B", 16384 // L), ("H", 16), ("L", L), ("D", 128), ("causal", False)),
            seq_len=L,
        )
        for L in (1024, 4096, 16384)
        for p in ("torch", "pyattn-cuda")
    ]
    (panel,) = _check_panels(_rows_of(cases))
    assert panel.kind == "lines" and "B=16384/L" in panel.title
    assert all(len(s.points) == 3 for s in panel.series)


def test_plot_titles_name_the_machine_and_isa(quick_run):
    meta = json.loads(quick_run["json"].read_text())["meta"]
    assert meta["isa"] and meta["isa"] in meta["device_name"]
    assert meta["loadavg_start"] is None or len(meta["loadavg_start"]) == 3
    rows = json.loads(quick_run["json"].read_text())["rows"]
    title = report.figure_title("speed-up", rows, meta)
    assert meta["device_name"] in title and meta["torch_version"] in title
    assert all(r["case_s"] >= 0 and r["cpu_s"] >= 0 for r in rows)
    _check_panels(rows)


def test_plots_draw_when_a_panel_has_no_memory_reading(tmp_path):
    """A fast case's RSS reading can stay below the page granularity (0 MiB): a memory panel with
    no positive reading at all is drawn empty, not refused by the log axis (a quick run failed on
    the old stack when every sdpa reading was 0)."""
    rows = _rows_of(cases_mod.build_cases("cpu", "quick", ["additive_attention", "sdpa"]))
    for r in rows:
        if r["kernel"] == "sdpa":
            r["peak_mem_mb"] = 0.0
    paths = report.plot(rows, str(tmp_path))
    assert all(os.path.getsize(p) > 0 for p in paths)


def test_profile_step_buckets_every_provider(capsys):
    """bench/profile_step.py: every provider of the comparison gets its buckets; op names map to
    their buckets (the fused attention ops to "attention"); a shape that picks nothing is refused."""
    from pyattn.bench import profile_step

    assert profile_step.bucket("pyattn::varlen_attention_fwd") == "attention"
    assert profile_step.bucket("aten::addmm") == "linear layers (mm, addmm, bmm)"
    assert profile_step.bucket("aten::bernoulli_") == "dropout rng"
    assert profile_step.bucket("aten::relu") == "other"
    rc = profile_step.main(["--ops", "bert", "--suite", "quick", "--shape", "lengths", "--mode", "train",
                            "--steps", "1", "--warmup", "0"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    for provider in ("pyattn-padded", "pyattn-padding-free"):
        assert f"  {provider}: " in out
    assert "attention" in out and "linear layers" in out
    assert profile_step.main(["--ops", "bert", "--suite", "quick", "--shape", "no such shape"]) == 2
