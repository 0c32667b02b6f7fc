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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    import pyattn.distributed, pyattn.integrations, pyattn.models.bert, pyattn.models.seq2seq
    import pyattn.models.transformer
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


def _makefile_variable(name: str) -> list[str]:
    """The words of a ``NAME := ...`` line of the Makefile (continued lines joined)."""
    text = open(os.path.join(ROOT, "Makefile")).read().replace("\\\n", " ")
    match = re.search(rf"^{name} :=(.*)$", text, re.M)
    assert match, f"the Makefile has no {name} variable"
    return match.group(1).split()


def _makefile_packages() -> set[str]:
    """The packages the Makefile's venv step pip-installs."""
    return {re.split(r"[=<>\[]", w)[0] for w in _makefile_variable("DEPS")}


def _pins() -> dict[str, str]:
    pins = {}
    for line in open(os.path.join(ROOT, "constraints.txt")):
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not a NAME==VERSION pin"
            pins[_canonical(name)] = version
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_make_test_installs_what_the_tests_need():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    wanted |= set(project["optional-dependencies"]["apps"]) | set(project["optional-dependencies"]["bench"])
    wanted = {re.split(r"[=<>\[ ]", w)[0] for w in wanted} - {"torch"}  # torch: its own pinned line
    missing = wanted - _makefile_packages() - {"torch"}
    assert not missing, f"the Makefile's venv step does not install {sorted(missing)}"


def test_every_package_make_installs_is_pinned():
    """constraints.txt pins what the venv step installs, build tools included; under `make test`
    (PYATTN_TEST_PINNED=1) every distribution in this environment is at its pinned version, so a
    fresh machine runs the set that was tested. `make test-latest` installs the newest instead."""
    pins = _pins()
    wanted = _makefile_packages() | set(_makefile_variable("BUILD_TOOLS"))
    unpinned = sorted(n for n in wanted if _canonical(n) not in pins)
    assert not unpinned, f"constraints.txt does not pin {unpinned}"
    if os.environ.get("PYATTN_TEST_PINNED") == "1":
        import importlib.metadata as md
        import sysconfig

        # the environment's own site-packages (setuptools puts its vendored copies on sys.path)
        site = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
        installed = {_canonical(d.metadata["Name"]): d.version for d in md.distributions(path=site)}
        installed.pop("pyattn", None)
        off = {n: (v, pins.get(n)) for n, v in installed.items() if pins.get(n) != v}
        assert not off, f"installed (version, pin) differ from constraints.txt: {off}"


def _run_in_checkout(code: str, *args: str) -> subprocess.CompletedProcess:
    """``python -c code`` started in the checkout's root, as a user would: ``-c`` puts the working
    directory first on sys.path (PYTHONSAFEPATH, which the Makefile sets, is dropped here)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def _top_level_names() -> set[str]:
    names = set()
    for entry in os.listdir(ROOT):
        stem = entry[:-3] if entry.endswith(".py") else entry
        if stem.isidentifier() and (entry.endswith(".py") or os.path.isdir(os.path.join(ROOT, entry))):
            names.add(stem)
    return names


def test_no_top_level_folder_shadows_an_installed_package():
    """A folder (or module) at the checkout's root named like a package that an installed
    distribution provides must not answer its import when Python starts in the root: today
    transformers imports Hugging Face's `kernels`, and the root has kernels/."""
    import importlib.metadata as md

    provided = md.packages_distributions()
    clashes = sorted(n for n in _top_level_names() & set(provided) if n != "pyattn")
    probe = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    m = importlib.import_module(name)\n"
        "    print(name, getattr(m, '__file__', None) or list(m.__path__)[0])\n"
    )
    proc = _run_in_checkout(probe, *clashes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert set(found) == set(clashes), proc.stdout

    def ours(name: str, path: str) -> bool:  # the checkout's own folder or module (not .venv/)
        own = os.path.realpath(os.path.join(ROOT, name))
        path = os.path.realpath(path)
        return path.startswith(own + os.sep) or path == own + ".py"

    shadowed = {n: p for n, p in found.items() if ours(n, p)}
    assert not shadowed, (
        f"the checkout's root answers these imports instead of the installed packages: {shadowed}"
    )


def test_only_pyattn_is_a_regular_package_at_the_root():
    """kernels/ and bench/ install as pyattn.kernels and pyattn.bench; without an __init__.py they
    are never more than namespace portions at the root, which lose to any installed package of
    the same name (pyattn/_source_tree.py)."""
    regular = sorted(
        n
        for n in _top_level_names()
        if os.path.isfile(os.path.join(ROOT, n, "__init__.py"))
        or os.path.isfile(os.path.join(ROOT, n + ".py"))
    )
    assert regular in (["pyattn"], ["pyattn", "setup"]), regular
    import pyattn.bench.cli
    import pyattn.kernels

    # as a wheel installs them (pyattn/kernels/) or as an editable install maps them (kernels/)
    assert os.path.basename(os.path.dirname(pyattn.bench.cli.__file__)) == "bench"
    assert any(os.path.isfile(os.path.join(p, "_glue.py")) for p in pyattn.kernels.__path__)


def test_transformers_hub_kernels_imports_from_the_checkout_root():
    pytest.importorskip("transformers")
    proc = _run_in_checkout("import transformers.integrations.hub_kernels as h; print(h.__name__)")
    assert proc.returncode == 0, proc.stderr[-3000:]
