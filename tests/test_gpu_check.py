"""bench/gpu_check.sh's control flow, here on CPU (GPU_CHECK_TINY=1: interpreter, small shapes,
no build): every stage runs in order, streams into its named file, and at most 8 files are left
in $OUT (what a device call brings back); a failing stage does not stop the ones after it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
STAGES = ("env", "build", "correctness", "sanitizer", "bench")


def _run(tmp_path: Path, **env_over) -> tuple[subprocess.CompletedProcess, str]:
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_TINY": "1", "PYTHON": sys.executable, **env_over}
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    log = (tmp_path / "gpu_check.log").read_text()
    return proc, log


def _ends(log: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"END (\w+) rc=(\d+)", log)}


def test_tiny_run_passes_every_stage(tmp_path):
    proc, log = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    ends = _ends(log)
    assert list(ends) == list(STAGES), log
    assert all(rc == 0 for rc in ends.values()), log
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8, files
    for name in ("gpu_check.log", "build.log", "correctness.log", "sanitizer.log", "bench.log"):
        assert name in files, files
    correctness = (tmp_path / "correctness.log").read_text()
    assert re.search(r"\d+ passed", correctness) and "PASSED" in correctness  # -v names each test
    assert "0 case(s) failed" in (tmp_path / "sanitizer.log").read_text()
    rows = json.loads((tmp_path / "bench-cpu.json").read_text())["rows"]
    assert rows and {r["kernel"] for r in rows} == {"additive_attention", "sdpa"}


def test_a_failing_stage_does_not_stop_the_rest(tmp_path):
    # an interpreter that fails every command: each stage still starts, ends and is logged
    proc, log = _run(tmp_path, PYTHON="false")
    assert proc.returncode == 0, proc.stderr
    ends = _ends(log)
    assert list(ends) == list(STAGES), log
    assert all(ends[s] != 0 for s in ("build", "correctness", "sanitizer", "bench")), log
    assert "done in" in log


def test_stage_selection_and_budget(tmp_path):
    proc, log = _run(tmp_path, GPU_CHECK_STAGES="env,sanitizer", GPU_CHECK_BUDGET_S="540")
    assert proc.returncode == 0, proc.stderr
    assert list(_ends(log)) == ["env", "sanitizer"], log
    assert "SKIP build: not in GPU_CHECK_STAGES" in log and "SKIP bench: not in GPU_CHECK_STAGES" in log
    # a budget already spent skips every stage rather than starting one it cannot finish
    proc, log = _run(tmp_path / "spent", GPU_CHECK_BUDGET_S="5")
    assert proc.returncode == 0
    assert not _ends(log) and log.count("no time left") == len(STAGES), log
