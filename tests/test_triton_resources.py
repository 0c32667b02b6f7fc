"""The headline Triton configs compiled for sm_90 without a GPU (bench/triton_resources.py):
no stack frame (spills) and shared memory within the 227 KB a block may have.

Headline: every op, forward and every autotuned backward kernel, fp16/bf16, sdpa head dims 64
and 128, varlen (sdpa's kernels with VARLEN) at 128, additive T = 512, H = Dv = 512, and sdpa and
varlen at 128 with every attention variant on (fp16). Per launch it compiles the fixed config (the first kept
one, what PYATTN_TRITON_AUTOTUNE=0 and bench/gpu_check.sh's correctness stage use) and, for
fp16, the largest kept one (bf16 compiles to nearly the same code); the tool itself
(``make triton-resources``) compiles every kept config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_headline_configs_fit_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pyattn.bench.triton_resources", "--pick", "ci", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.exists(), f"the tool wrote no rows (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    rows = json.loads(out.read_text())
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "spilling or oversized configs:\n" + proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(r["stack"] == 0 and r["shared"] <= 227 * 1024 and r["arch"] == 90 for r in rows)
    # the table covers what the headline promises
    kernels = {(r["case"].split()[0], r["kernel"]) for r in rows}
    assert kernels >= {
        ("sdpa", "_fwd_kernel"),
        ("sdpa", "_bwd_dq_kernel"),
        ("sdpa", "_bwd_dkdv_kernel"),
        ("varlen", "_fwd_kernel"),
        ("varlen", "_bwd_dq_kernel"),
        ("varlen", "_bwd_dkdv_kernel"),
        ("additive", "_fwd_kernel"),
        ("additive", "_bwd_dvalue_kernel"),
        ("additive", "_bwd_dk_kernel"),
        ("additive", "_bwd_dq_kernel"),
    }, kernels
    cases = {r["case"] for r in rows}
    for dt in ("fp16", "bf16"):
        for d in (64, 128):
            assert any(c.startswith(f"sdpa bwd {dt}") and f"D={d}" in c for c in cases), (dt, d)
    variant_kernels = {(r["case"].split()[0], r["kernel"]) for r in rows if "variants" in r["case"].split()}
    assert variant_kernels == {
        (op, k) for op in ("sdpa", "varlen") for k in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")
    }, variant_kernels
