"""The SIMD dropout draws of the CPU kernels (csrc/cpu/philox_lanes.h) are bit-identical to the
scalar philox generator (csrc/philox.h) for every CPU capability build: tests/cpp/
philox_lanes_check.cpp is compiled here with each capability's flags from setup.py (the ones the
shipped extension is built with) and run on fresh seeds, on the builds this CPU can execute."""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import subprocess

import pytest
import torch.utils.cpp_extension

from pyattn import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "tests", "cpp", "philox_lanes_check.cpp")
ORDER = ["DEFAULT", "AVX2", "AVX512"]


def _capability_flags() -> dict[str, list[str]]:
    """setup.py's CPU_CAPABILITIES, read from the file itself (importing it does not build)."""
    spec = importlib.util.spec_from_file_location("_pyattn_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    env = os.environ.get("PYATTN_CUDA")
    os.environ["PYATTN_CUDA"] = "0"  # setup.py looks for nvcc at import; not needed here
    try:
        spec.loader.exec_module(module)
    finally:
        if env is None:
            os.environ.pop("PYATTN_CUDA")
        else:
            os.environ["PYATTN_CUDA"] = env
    return dict(module.CPU_CAPABILITIES)


@pytest.fixture(scope="module")
def binaries(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    assert cxx, "no C++ compiler found (the extension's build needs one too)"
    includes = [f"-I{p}" for p in torch.utils.cpp_extension.include_paths()] + [
        f"-I{os.path.join(ROOT, 'csrc')}"
    ]
    out = {}
    d = tmp_path_factory.mktemp("philox")
    for name, flags in _capability_flags().items():
        exe = d / f"philox_lanes_check_{name.lower()}"
        cmd = [cxx, "-O2", "-std=c++20", *flags, *includes, SOURCE, "-o", str(exe)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{name} build failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}"
        out[name] = exe
    return out


def _runnable_here() -> list[str]:
    """The capability builds this CPU executes: ATen's own choice and every one below it."""
    ext = _backend._C()
    assert ext is not None, f"pyattn._C did not import: {_backend.IMPORT_ERRORS.get('cpu')}"
    cap = ext.cpu_capability()
    top = max(i for i, name in enumerate(ORDER) if cap.startswith(name))
    return ORDER[: top + 1]


def _run(exe, *extra):
    rng = random.Random(random.getrandbits(64))
    seed = rng.getrandbits(64)
    base = rng.randint(1, 2**31) * 2**32 - rng.randint(1, 2**21)  # crosses a 2^32 boundary
    p = rng.choice([0.1, 0.5, rng.uniform(0.01, 0.99)])
    return subprocess.run(
        [str(exe), str(seed), str(base), repr(p), *extra], capture_output=True, text=True, timeout=300
    ), (seed, base, p)


def test_every_capability_compiles(binaries):
    assert sorted(binaries) == sorted(ORDER)


# Only the builds this CPU executes (AVX512 is compile-only on an AVX2 machine: no skip).
@pytest.mark.parametrize("name", _runnable_here())
def test_simd_draws_match_scalar_generator(binaries, name):
    proc, args = _run(binaries[name])
    assert proc.returncode == 0 and "mismatches 0" in proc.stdout, (args, proc.stdout, proc.stderr)


def test_check_reports_a_corrupted_draw(binaries):
    name = _runnable_here()[-1]
    proc, args = _run(binaries[name], "--corrupt")
    assert proc.returncode == 1 and "mismatches 1" in proc.stdout, (args, proc.stdout, proc.stderr)
