"""Which implementations are usable here, and which one a call gets: backends as data.

Each backend is one ``Backend`` record in ``RECORDS`` (docs/design.md, "Adding a backend"): the
device types and dtypes its kernels take, its head-dim limit, how its ops are named and loaded,
and where it has run on real hardware. Op glue (pyattn/ops/_glue.py), backend choice (below),
the tests' backend parameters (tests/helpers.py), ``pyattn info`` and the bench's providers all
iterate over the records; nothing else names a backend.

``backend=None`` takes ``PYATTN_BACKEND`` from the environment when it is set, else the first
backend of the op's preference order (``PREFERENCE``, set where the op is registered) that the
record lets a call pick automatically on the tensors' device and that can take the inputs, else
``"reference"``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


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


# -- the records ---------------------------------------------------------------------------------

_HALF_AND_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Backend:
    """One backend.

    Fields:
        name: what ``backend=`` takes.
        devices: the device types its kernels take.
        dtypes: the input dtypes its kernels take (None: any floating dtype).
        max_head_dim: the largest query/key and value head dim its kernels hold (None: any).
        op_suffix: its ops are ``pyattn::<op>_fwd<suffix>`` / ``_bwd<suffix>`` (None: it runs
            pyattn.reference, no custom ops). Backends with the same suffix share their ops
            (cpu and cuda: one C++ op, two dispatch keys).
        kernel_module: the module importing which registers an op's kernels, formatted with the
            op's name (None: the compiled extension registers them).
        requires: the package that module needs; without it the backend is simply absent.
        fakes: whether its ops need pyattn's fake (meta) implementations (the C++ ops do;
            ``torch.library.triton_op`` derives its own).
        auto_devices: device types on which ``backend=None`` may pick it.
        machine: None when it can run on this machine at all, else why not.
        on_device: None when it takes tensors on ``device``, else why not.
        ran_on: where it has run on real hardware (README's backend table, ``pyattn info``).
        variant_ops: the ops whose attention variants (window, softcap, sinks, ALiBi) its
            kernels fuse (None: every op); a call with a variant on goes elsewhere.
    """

    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] | None
    max_head_dim: int | None
    op_suffix: str | None
    kernel_module: str | None
    requires: str | None
    fakes: bool
    auto_devices: tuple[str, ...]
    machine: Callable[[], str | None] = field(compare=False)
    on_device: Callable[[torch.device], str | None] = field(compare=False)
    ran_on: str = ""
    variant_ops: tuple[str, ...] | None = ()


def _cpu_machine() -> str | None:
    if _C() is None:
        return "the compiled extension pyattn._C is not importable (reinstall pyattn)"
    return None


def _cpu_device(device: torch.device) -> str | None:
    return None if device.type == "cpu" else f"it takes CPU tensors, got tensors on {device}"


def _cuda_machine() -> str | None:
    if not cuda_compiled():
        return "pyattn was built without its CUDA kernels (no nvcc at build time, or PYATTN_CUDA=0)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def _cuda_device(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"it takes CUDA tensors, got tensors on {device}"
    if not cuda_compiled():
        return "pyattn was built without its CUDA kernels (no nvcc at build time, or PYATTN_CUDA=0)"
    return None


def _triton_machine() -> str | None:
    if not have_triton():
        return "triton is not installed"
    if not (torch.cuda.is_available() or triton_interpreter()):
        return "no CUDA device is visible and the Triton interpreter is off (TRITON_INTERPRET=1)"
    return None


def _triton_device(device: torch.device) -> str | None:
    if not have_triton():
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if triton_interpreter():
            return None
        return "it takes CPU tensors only under the Triton interpreter (TRITON_INTERPRET=1)"
    return f"it takes CUDA tensors, got tensors on {device}"


# The Triton and CUDA kernels keep a head's row in registers / shared memory: up to 256 wide.
GPU_MAX_HEAD_DIM = 256

RECORDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            name="cpu",
            devices=("cpu",),
            dtypes=(*_HALF_AND_FLOAT, torch.float64),
            max_head_dim=None,
            op_suffix="",
            kernel_module=None,
            requires=None,
            fakes=True,
            auto_devices=("cpu",),
            machine=_cpu_machine,
            on_device=_cpu_device,
            ran_on="x86-64 CPUs (AVX2 and AVX512 builds; CI and every CPU benchmark)",
            variant_ops=("sdpa", "varlen_attention", "kvcache_attention"),
        ),
        Backend(
            name="triton",
            devices=("cuda", "cpu"),
            dtypes=_HALF_AND_FLOAT,
            max_head_dim=GPU_MAX_HEAD_DIM,
            op_suffix="_triton",
            kernel_module="pyattn.kernels.{op}",
            requires="triton",
            fakes=False,
            # on CPU tensors the C++ kernels always beat the interpreter
            auto_devices=("cuda",),
            machine=_triton_machine,
            on_device=_triton_device,
            ran_on="the Triton interpreter on CPU only; compiled for sm_90/sm_80, never run on a GPU",
            variant_ops=("sdpa", "varlen_attention", "kvcache_attention"),
        ),
        Backend(
            name="cuda",
            devices=("cuda",),
            dtypes=_HALF_AND_FLOAT,
            max_head_dim=GPU_MAX_HEAD_DIM,
            op_suffix="",
            kernel_module=None,
            requires=None,
            fakes=True,
            auto_devices=("cuda",),
            machine=_cuda_machine,
            on_device=_cuda_device,
            ran_on="nowhere yet: compiled and linked for sm_90a, never run on a GPU",
            variant_ops=("sdpa", "varlen_attention", "kvcache_attention"),
        ),
        Backend(
            name="reference",
            devices=(),  # any
            dtypes=None,
            max_head_dim=None,
            op_suffix=None,
            kernel_module=None,
            requires=None,
            fakes=False,
            auto_devices=(),  # the fallback, never preferred
            machine=lambda: None,
            on_device=lambda device: None,
            ran_on="everywhere torch runs (naive PyTorch)",
            variant_ops=None,
        ),
    )
}

BACKENDS = tuple(RECORDS)

# Kernel backends only (every record with custom ops), in preference order where an op sets none.
KERNEL_BACKENDS = tuple(name for name, b in RECORDS.items() if b.op_suffix is not None)

# Preferred order per op, set where the op is registered (pyattn/ops/_glue.py) from the
# benchmarks (bench/results/); the first usable backend a call may pick on its device wins.
PREFERENCE: dict[str, tuple[str, ...]] = {}


def backends() -> list[str]:
    """The backends usable on this machine, e.g. ``['cpu', 'triton', 'cuda', 'reference']``."""
    return [name for name, b in RECORDS.items() if b.machine() is None]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def usable_on(
    backend: str, device: torch.device, dtype: torch.dtype | None = None, head_dims: tuple[int, ...] = ()
) -> str | None:
    """None when ``backend`` can take tensors of ``dtype`` on ``device`` with these head dims,
    else the reason."""
    rec = RECORDS.get(backend)
    if rec is None:
        return f"unknown backend; expected one of {', '.join(BACKENDS)}"
    if dtype is not None and rec.dtypes is not None and dtype not in rec.dtypes:
        names = ", ".join(_dtype_name(d) for d in rec.dtypes)
        return f"it takes {names} inputs, got {_dtype_name(dtype)}"
    why = rec.on_device(device)
    if why is not None:
        return why
    return head_dim_reason(backend, head_dims)


def fuses_variants(backend: str, op: str) -> bool:
    """Whether ``backend``'s kernels of ``op`` fuse the attention variants."""
    ops = RECORDS[backend].variant_ops
    return ops is None or op in ops


def head_dim_reason(backend: str, head_dims: tuple[int, ...]) -> str | None:
    """None when ``backend``'s kernels hold heads this wide, else the reason."""
    limit = RECORDS[backend].max_head_dim
    if limit is not None and any(d > limit for d in head_dims):
        names = ("D", "Dv")[: len(head_dims)]
        got = ", ".join(f"{n}={d}" for n, d in zip(names, head_dims, strict=False))
        return f"head dims {', '.join(names)} must be in [1, {limit}] for its kernels, got {got}"
    return None


def resolve(
    op: str,
    backend: str | None,
    device: torch.device,
    dtype: torch.dtype | None = None,
    head_dims: tuple[int, ...] = (),
    variants: bool = False,
) -> str:
    """The backend a call of ``op`` runs on. A backend asked for (``backend=`` or
    ``PYATTN_BACKEND``) that cannot take the inputs raises with the reason (an InputError when
    the inputs are what it refuses: their head dims, or attention variants (``variants``) its
    kernels do not fuse); with none asked for, the op's preferred backends are tried in order
    and the reference is the fallback."""
    if backend is None:
        backend = os.environ.get("PYATTN_BACKEND") or None
        source = "PYATTN_BACKEND"
    else:
        source = "backend"
    if backend is not None:
        if backend not in RECORDS:
            raise ValueError(
                f"{source}={backend!r} is not a pyattn backend; expected one of {', '.join(BACKENDS)}"
            )
        why = usable_on(backend, device, dtype)
        if why is not None:
            raise RuntimeError(f"pyattn.{op}: backend {backend!r} cannot run here: {why}")
        why = head_dim_reason(backend, head_dims)
        if why is not None:
            from .ops.errors import InputError  # the ops' error family; a leaf module

            raise InputError(f"pyattn.{op}: backend {backend!r} cannot run here: {why}")
        if variants and not fuses_variants(backend, op):
            from .ops.errors import InputError

            takes = ", ".join(repr(n) for n in BACKENDS if fuses_variants(n, op))
            raise InputError(
                f"pyattn.{op}: backend {backend!r} cannot take these inputs: its kernels do not fuse the "
                f"attention variants (window_size, softcap, sinks, alibi_slopes) yet; backends that do: "
                f"{takes} (backend=None picks one)"
            )
        return backend
    for candidate in PREFERENCE.get(op, KERNEL_BACKENDS):
        if (
            device.type in RECORDS[candidate].auto_devices
            and usable_on(candidate, device, dtype, head_dims) is None
            and (not variants or fuses_variants(candidate, op))
        ):
            return candidate
    return "reference"


def kernel_ops(op: str, backend: str):
    """The (forward, backward) custom ops of ``op`` on ``backend``, named by its record's suffix,
    for callers that drive the ops themselves (pyattn.distributed); None for a backend without
    ops (the reference); a RuntimeError saying why when they are not registered here."""
    rec = RECORDS[backend]
    if rec.op_suffix is None:
        return None
    names = (f"{op}_fwd{rec.op_suffix}", f"{op}_bwd{rec.op_suffix}")
    if not all(hasattr(torch.ops.pyattn, n) for n in names):
        why = IMPORT_ERRORS.get(backend, "its kernels are not registered")
        raise RuntimeError(f"pyattn.{op}: backend {backend!r} cannot run here: {why}")
    return tuple(getattr(torch.ops.pyattn, n) for n in names)


def record_import_error(backend: str, exc: BaseException) -> None:
    IMPORT_ERRORS[backend] = f"{type(exc).__name__}: {exc}"
