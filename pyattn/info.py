"""``pyattn info``: what is usable here and how this pyattn was built."""

from __future__ import annotations

import platform

import torch


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def half_cpu_paths(capability: str) -> str:
    """How the cpu backend runs float16 / bfloat16 here (docs/design.md, "Half precision on
    CPU"): blocks converted to float32 on load, by the kernel build for this CPU, and which of
    the CPU's half-precision features that build uses."""
    flags = _cpu_flags()
    conv = {
        "DEFAULT": "scalar conversions",
        "AVX2": "F16C / AVX2 vector conversions",
    }.get(capability.split("_")[0] if capability else "", "AVX512 vector conversions")
    feats = [name for name in ("f16c", "avx512_bf16", "avx512_fp16", "amx_bf16") if name in flags]
    return (
        f"float16, bfloat16 (fused: blocks converted to float32 on load with {conv}, float32 GEMMs "
        f"and statistics; CPU half features: {', '.join(feats) or 'none'})"
    )


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
    if c is not None:
        print(f"half on CPU: {half_cpu_paths(c.cpu_capability())}")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
    for backend, error in _backend.IMPORT_ERRORS.items():
        print(f"{backend} failed to load: {error}")
    return 0
