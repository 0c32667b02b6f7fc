"""Which implementations are usable here, and which one a call gets.

Backends:
- ``"cpu"``: the C++ kernels in pyattn._C, for CPU tensors.
- ``"cuda"``: the CUDA C++ kernels in pyattn._C, for CUDA tensors (when compiled in).
- ``"triton"``: the Triton kernels in kernels/, for CUDA tensors, and for CPU tensors when the
  Triton interpreter is on (``TRITON_INTERPRET=1``, how CI checks their numerics).
- ``"reference"``: pyattn.reference (naive PyTorch), always.

``backend=None`` takes ``PYATTN_BACKEND`` from the environment when it is set, else the
preferred backend for the tensors' device (see ``_PREFERENCE``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

BACKENDS = ("cpu", "cuda", "triton", "reference")

# The input dtypes each backend's kernels take (the reference takes any floating dtype).
DTYPES = {
    "cpu": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
    "triton": (torch.float16, torch.bfloat16, torch.float32),
}

# Preferred order on CUDA tensors per op, from the GPU benchmarks (bench/results/); the first
# usable one wins. On CPU tensors the C++ kernels are always preferred to the interpreter.
_PREFERENCE = {
    "additive_attention": ("triton", "cuda"),
    "kvcache_attention": ("triton", "cuda"),
    "sdpa": ("triton", "cuda"),
    "varlen_attention": ("triton", "cuda"),
}


def _load_extension():
    try:
        return importlib.import_module("pyattn._C")
    except ImportError as exc:
        IMPORT_ERRORS["cpu"] = f"{type(exc).__name__}: {exc}"
        return None


# Why an optional backend failed to load, for ``pyattn info`` and error messages.
IMPORT_ERRORS: dict[str, str] = {}

# Decided once at import, so that backend choice is plain attribute reads that torch.compile
# traces without graph breaks.
_EXTENSION = _load_extension()
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _C():
    """The compiled extension, or None when it is missing (a broken or source-only install)."""
    return _EXTENSION


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def have_triton() -> bool:
    return HAVE_TRITON


def cuda_compiled() -> bool:
    c = _C()
    return bool(c is not None and c.with_cuda())


def backends() -> list[str]:
    """The backends usable on this machine, e.g. ``['cpu', 'triton', 'cuda', 'reference']``."""
    out = []
    if _C() is not None:
        out.append("cpu")
    if have_triton() and (torch.cuda.is_available() or triton_interpreter()):
        out.append("triton")
    if cuda_compiled() and torch.cuda.is_available():
        out.append("cuda")
    out.append("reference")
    return out


def usable_on(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None when ``backend`` can take tensors of ``dtype`` on ``device``, else the reason."""
    if backend == "reference":
        return None
    if dtype is not None and backend in DTYPES and dtype not in DTYPES[backend]:
        names = ", ".join(str(d).replace("torch.", "") for d in DTYPES[backend])
        return f"it takes {names} inputs, got {str(dtype).replace('torch.', '')}"
    if backend == "cpu":
        if _C() is None:
            return "the compiled extension pyattn._C is not importable (reinstall pyattn)"
        if device.type != "cpu":
            return f"it takes CPU tensors, got tensors on {device}"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"it takes CUDA tensors, got tensors on {device}"
        if not cuda_compiled():
            return "pyattn was built without its CUDA kernels (no nvcc at build time, or PYATTN_CUDA=0)"
        return None
    if backend == "triton":
        if not have_triton():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if triton_interpreter():
                return None
            return "it takes CPU tensors only under the Triton interpreter (TRITON_INTERPRET=1)"
        return f"it takes CUDA tensors, got tensors on {device}"
    return f"unknown backend; expected one of {', '.join(BACKENDS)}"


def resolve(op: str, backend: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend a call of ``op`` runs on; raises with the reason when the one asked for
    cannot take the inputs. With no backend asked for, falls back to the reference."""
    if backend is None:
        backend = os.environ.get("PYATTN_BACKEND") or None
        source = "PYATTN_BACKEND"
    else:
        source = "backend"
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(
                f"{source}={backend!r} is not a pyattn backend; expected one of {', '.join(BACKENDS)}"
            )
        why = usable_on(backend, device, dtype)
        if why is not None:
            raise RuntimeError(f"pyattn.{op}: backend {backend!r} cannot run here: {why}")
        return backend
    if device.type == "cpu":
        return "cpu" if usable_on("cpu", device, dtype) is None else "reference"
    for candidate in _PREFERENCE.get(op, ()):
        if usable_on(candidate, device, dtype) is None:
            return candidate
    return "reference"


def record_import_error(backend: str, exc: BaseException) -> None:
    IMPORT_ERRORS[backend] = f"{type(exc).__name__}: {exc}"
