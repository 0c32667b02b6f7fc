"""What the build of pyattn._C registered: every op with a CPU kernel, and, when the extension
says it was built with its CUDA sources, a CUDA kernel too. This runs without a GPU: the
dispatch table is filled when pyattn._C is imported, so CI proves the CUDA file compiled, linked
and registered."""

from __future__ import annotations

import pytest
import torch

import pyattn  # noqa: F401  (importing it loads pyattn._C and runs the registrations)
from pyattn import _backend

# Ops implemented in csrc/ for both CPU and CUDA (csrc/<op>.cpp and csrc/cuda/<op>.cu).
CUDA_OPS = [
    "pyattn::additive_attention_fwd",
    "pyattn::additive_attention_bwd",
    "pyattn::sdpa_fwd",
    "pyattn::sdpa_bwd",
]


def _extension():
    ext = _backend._C()
    assert ext is not None, f"pyattn._C did not import: {_backend.IMPORT_ERRORS.get('cpu')}"
    return ext


@pytest.mark.parametrize("name", CUDA_OPS)
def test_cpu_kernel_registered(name):
    _extension()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), f"{name} has no CPU kernel"


@pytest.mark.parametrize("name", CUDA_OPS)
def test_cuda_kernel_registered_when_built_with_cuda(name):
    ext = _extension()
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    if ext.with_cuda():
        assert has_cuda_kernel, (
            f"pyattn._C says it was built with CUDA, but {name} has no CUDA kernel registered:\n"
            + torch._C._dispatch_dump(name)
        )
    else:
        # A CPU-only build must not claim a CUDA kernel it does not have.
        assert not has_cuda_kernel, f"pyattn._C was built without CUDA, yet {name} has a CUDA kernel"


def test_cpu_kernels_use_every_intra_op_thread():
    # at::parallel_for is inlined from ATen's headers; built without OpenMP it is a serial loop
    # and every CPU kernel silently runs on one core (a 2x loss on a 2-core machine).
    if torch.get_num_threads() < 2:
        pytest.skip("torch runs one intra-op thread here")
    used = _extension().parallel_threads()
    backend = [ln for ln in torch.__config__.parallel_info().splitlines() if "parallel backend" in ln]
    assert used == torch.get_num_threads(), (
        f"pyattn's CPU kernels run on {used} thread(s), torch on {torch.get_num_threads()}:"
        f" was pyattn._C built without -fopenmp? ({backend})"
    )
