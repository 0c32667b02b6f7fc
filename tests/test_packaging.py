"""What installs what. The kernel library needs torch and numpy only: in a fresh interpreter where
every optional package (the `apps` extra, the test and bench tools, triton) is hidden, pyattn
imports, both ops run forward and backward on the C++ CPU backend and the reference, the
library's modules import, and an application's subcommand says what to install instead of
raising. And `make test` installs every package the tests and extras name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

import pyattn.apps

# Everything but torch, numpy and the standard library (triton is the optional Triton backend,
# which pyattn must do without as well).
BLOCKED = sorted(set(pyattn.apps.OPTIONAL) | {"hypothesis", "pytest", "pytest_benchmark", "triton", "tqdm"})

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, importlib.util, sys

    BLOCKED = set(sys.argv[1].split(","))

    class Hide(importlib.abc.MetaPathFinder):
        # sys.path's finder, blind to BLOCKED: as if those packages were not installed

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            return importlib.machinery.PathFinder.find_spec(name, path, target)

    sys.meta_path = [Hide() if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    assert importlib.util.find_spec("sacrebleu") is None

    import torch
    import pyattn
    import pyattn.integrations, pyattn.models.bert, pyattn.models.seq2seq, pyattn.models.transformer
    import pyattn.nn, pyattn.reference
    import pyattn.bench.cli, pyattn.bench.cases, pyattn.bench.report, pyattn.bench.runner

    assert "cpu" in pyattn.backends() and "reference" in pyattn.backends(), pyattn.backends()
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for backend in ("cpu", "reference"):
        out = pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
        ref = pyattn.reference.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(out, ref)
        g = torch.autograd.grad(out.sum(), (q, k, v))
        torch.testing.assert_close(g, torch.autograd.grad(ref.sum(), (q, k, v)))
    qa, ka, va = (torch.randn(2, n, 4, dtype=torch.float64, requires_grad=True) for n in (3, 6, 6))
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    for backend in ("cpu", "reference"):
        out = pyattn.additive_attention(qa, ka, va, w, backend=backend)
        ref = pyattn.reference.additive_attention(qa, ka, va, w)
        torch.testing.assert_close(out, ref)
        g = torch.autograd.grad(out.sum(), (qa, ka, va, w))
        torch.testing.assert_close(g, torch.autograd.grad(ref.sum(), (qa, ka, va, w)))

    from pyattn.cli import main
    assert main(["info"]) == 0
    assert main(["translate", "--steps", "1"]) == 2
    assert main(["embed", "x"]) == 2
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("core ok")
    """
)


def test_library_runs_without_optional_packages():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, ",".join(BLOCKED)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "core ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the missing extra is named on stderr, with the command to install it
    assert 'pip install "pyattn[apps]"' in proc.stderr and "sacrebleu" in proc.stderr, proc.stderr[-2000:]


def _makefile_packages() -> set[str]:
    """The packages the Makefile's venv step pip-installs (its continued `pip install` lines)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "Makefile")).read().replace("\\\n", " ")
    names = set()
    for line in text.splitlines():
        # the dependency lines: not the pinned torch, not the build of pyattn itself, not lint's
        if "-m pip install" in line and not any(w in line for w in ("torch==", "-e .", "ruff --version")):
            for word in line.split("-m pip install", 1)[1].split():
                if not word.startswith(("-", '"pip', '"setuptools')):
                    names.add(re.split(r"[=<>\[]", word.strip('"'))[0])
    return names


def test_make_test_installs_what_the_tests_need():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    wanted |= set(project["optional-dependencies"]["apps"]) | set(project["optional-dependencies"]["bench"])
    wanted = {re.split(r"[=<>\[ ]", w)[0] for w in wanted} - {"torch"}  # torch: its own pinned line
    missing = wanted - _makefile_packages()
    assert not missing, f"the Makefile's venv step does not install {sorted(missing)}"
