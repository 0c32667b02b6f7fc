"""The CPU kernels' lower builds, tested on whichever machine runs the tests.

pyattn's CPU kernels are compiled three times (DEFAULT, AVX2, AVX512) and run the build ATen
picks, which ATEN_CPU_CAPABILITY caps (csrc/cpu/capability.h). A test run executes one build
only: on an AVX512 machine, the AVX2 build's own code (its exp, its masked row tails) would
never run, and an AVX2-only machine never runs the AVX512 build. Here every build below the one
this CPU runs repeats a selection of the kernel tests in a subprocess with ATen capped to it
(and oneDNN capped to AVX2, so neither torch nor pyattn reaches AMX code the capped build would
not dispatch to), on the session's seed. The child checks that the cap took (test_capped_build).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import SESSION_SEED

from pyattn import _backend

HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ["DEFAULT", "AVX2", "AVX512"]
CAPPED = os.environ.get("PYATTN_TEST_CAPPED")  # set in the child: the build it must run

# The selection: every half path's cases, and the float32 / float64 sdpa cases of the cpu
# backend (shapes, head dims, long rows past a key block, masks, causal, empty rows).
SELECTION = [
    "test_cpu_microkernels.py",
    "test_cpu_f32_paths.py",
    "test_sdpa.py::test_matches_reference_and_torch",
    "test_sdpa.py::test_head_dims",
    "test_sdpa.py::test_cpu_long_rows",
    "test_sdpa.py::test_cpu_causal_rectangular",
    "test_sdpa.py::test_fully_masked_rows_give_zeros",
    "test_sdpa.py::test_empty_and_single_key",
    "test_sdpa.py::test_cpu_backward_both_schemes",
]


def _running_build() -> str:
    ext = _backend._C()
    assert ext is not None, f"pyattn._C did not import: {_backend.IMPORT_ERRORS.get('cpu')}"
    return ext.cpu_capability()


def _lower_builds() -> list[str]:
    """The builds below the one this CPU runs."""
    cap = _running_build()
    top = max(i for i, name in enumerate(ORDER) if cap.startswith(name))
    return ORDER[:top]


if not CAPPED:

    @pytest.mark.parametrize("build", _lower_builds())
    def test_lower_build_passes_the_kernel_tests(build):
        env = dict(os.environ)
        env.update(
            ATEN_CPU_CAPABILITY=build.lower(),
            ONEDNN_MAX_CPU_ISA="AVX2",
            PYATTN_TEST_CAPPED=build,
            PYATTN_TEST_SEED=str(SESSION_SEED),
        )
        env.pop("PYATTN_CPU_HALF_GEMM", None)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
               os.path.join(HERE, "test_cpu_capabilities.py"), *(os.path.join(HERE, s) for s in SELECTION)]  # fmt: skip
        r = subprocess.run(cmd, cwd=os.getcwd(), env=env, capture_output=True, text=True, timeout=1200)
        tail = (r.stdout + r.stderr)[-4000:]
        assert r.returncode == 0, f"the {build} build failed its tests:\n{tail}"
        assert " passed" in r.stdout.strip().splitlines()[-1], tail


else:

    def test_capped_build():
        # the child's own check that ATen's cap reached pyattn's dispatch (collected there only)
        assert _running_build() == CAPPED
