"""``pyattn info``: what is usable here and how this pyattn was built."""

from __future__ import annotations

import ctypes
import os
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


HALF_GEMM_PATHS = ("widen", "mkl", "amx")


def _path_query(symbol: str, argtypes: list, *args: int) -> str:
    """The string a ``pyattn_cpu_*_path`` function of the extension (C arguments of the ctypes
    ``argtypes``) returns for ``args``, or ``"n/a"`` without the compiled extension."""
    from pyattn import _backend

    c = _backend._C()
    if c is None:
        return "n/a"
    fn = getattr(ctypes.CDLL(c.__file__), symbol)
    fn.restype = ctypes.c_char_p
    fn.argtypes = argtypes
    return fn(*args).decode()


def _with_env(var: str, value: str, query):
    """query() with the environment variable ``var`` set to ``value``, then restored."""
    old = os.environ.get(var)
    os.environ[var] = value
    try:
        return query()
    finally:
        if old is None:
            del os.environ[var]
        else:
            os.environ[var] = old


def half_gemm_path(dtype: torch.dtype, forward: bool = False) -> str:
    """The micro-kernel path the cpu backend's float16 / bfloat16 sdpa and varlen kernels take
    now (csrc/cpu/blas.cpp; docs/design.md, "Half precision on CPU"): ``"widen"`` (blocks
    converted to float32, float32 GEMMs), ``"mkl"`` (MKL's bfloat16 GEMM on AVX512-BF16) or
    ``"amx"`` (oneDNN's AMX micro-kernel through torch); ``PYATTN_CPU_HALF_GEMM`` forces one.
    ``forward``: the forward's path, which ``auto`` may choose differently (AMX with K and V
    packed once per call, where the CPU has AMX). Returns ``"error: ..."`` when that variable
    names a path this machine cannot run, and ``"n/a"`` without the compiled extension."""
    c_int = ctypes.c_int
    return _path_query(
        "pyattn_cpu_half_gemm_path", [c_int, c_int], int(dtype == torch.bfloat16), int(forward)
    )


F32_GEMM_PATHS = ("blas", "brgemm")


def f32_gemm_path(forward: bool = True, head_dim: int = 64) -> str:
    """The block-product path of the cpu backend's float32 sdpa / varlen kernels (and of the
    forward of half inputs on the widened path) now
    (csrc/cpu/blas.cpp; docs/design.md, "float32 on oneDNN's brgemm"): ``"brgemm"`` (oneDNN's
    JIT brgemm through torch, the keys transposed once per task; CPUs with AVX2 and FMA, oneDNN
    enabled) or ``"blas"`` (MKL's sgemm through ATen). ``auto`` takes brgemm for the forward at
    every head dim and for the backward (``forward=False``) up to a ``head_dim`` (the larger of D
    and Dv) of 64; ``PYATTN_CPU_F32_GEMM`` forces one path for both. ``"error: ..."`` when that
    variable names a path this machine cannot run, ``"n/a"`` without the compiled extension."""
    return _path_query("pyattn_cpu_f32_gemm_path", [ctypes.c_int, ctypes.c_int64], int(forward), head_dim)


def f32_gemm_available(path: str) -> bool:
    """Whether ``PYATTN_CPU_F32_GEMM=path`` can run here."""
    return _with_env("PYATTN_CPU_F32_GEMM", path, f32_gemm_path) == path


def half_gemm_available(path: str, dtype: torch.dtype) -> bool:
    """Whether ``PYATTN_CPU_HALF_GEMM=path`` can run ``dtype`` here."""
    return _with_env("PYATTN_CPU_HALF_GEMM", path, lambda: half_gemm_path(dtype)) == path


def half_cpu_paths(capability: str) -> str:
    """How the cpu backend runs float16 / bfloat16 here (docs/design.md, "Half precision on
    CPU"): per dtype, the block-product path and the paths this machine could run, and the CPU's
    half-precision features."""
    flags = _cpu_flags()
    conv = {
        "DEFAULT": "scalar conversions",
        "AVX2": "F16C / AVX2 vector conversions",
    }.get(capability.split("_")[0] if capability else "", "AVX512 vector conversions")
    feats = [name for name in ("f16c", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16") if name in flags]
    parts = []
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        avail = [p for p in HALF_GEMM_PATHS if half_gemm_available(p, dtype)]
        fwd, bwd = half_gemm_path(dtype, forward=True), half_gemm_path(dtype)
        chosen = bwd if fwd == bwd else f"{fwd} forward (K, V packed once per call), {bwd} backward"
        parts.append(f"{name}: {chosen} (available: {', '.join(avail)})")
    return (
        f"{'; '.join(parts)} [widen = blocks converted to float32 with {conv}, float32 GEMMs; "
        f"mkl / amx = half blocks multiplied natively, float32 products, statistics in float32; "
        f"CPU half features: {', '.join(feats) or 'none'}]"
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
        avail = [p for p in F32_GEMM_PATHS if f32_gemm_available(p)]
        print(
            f"float32 on CPU: {f32_gemm_path()} forward, {f32_gemm_path(False, 64)} backward at head dims"
            f" <= 64, {f32_gemm_path(False, 128)} above (available: {', '.join(avail)})"
        )
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
    print("where each backend has run on real hardware:")
    for name, rec in _backend.RECORDS.items():
        print(f"  {name}: {rec.ran_on}")
    for backend, error in _backend.IMPORT_ERRORS.items():
        print(f"{backend} failed to load: {error}")
    return 0
