"""``pyattn info``: what is usable here and how this pyattn was built."""

from __future__ import annotations

import platform

import torch


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    import pyattn
    from pyattn import _backend

    c = _backend._C()
    print(f"pyattn {pyattn.__version__}, torch {torch.__version__}, python {platform.python_version()}")
    print(f"backends here: {', '.join(pyattn.backends())}")
    print(f"compiled extension: {'yes' if c is not None else 'MISSING'}", end="")
    if c is not None:
        print(
            f" (CPU kernels: {c.cpu_capability()} on {c.parallel_threads()} of"
            f" {torch.get_num_threads()} threads, CUDA kernels: {'yes' if c.with_cuda() else 'no'})"
        )
    else:
        print()
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
    for backend, error in _backend.IMPORT_ERRORS.items():
        print(f"{backend} failed to load: {error}")
    return 0
