"""What every fused op shares: its registration (ops as data), fake impls and autograd on its
forward/backward custom-op pair for every backend record (pyattn/_backend.py), and the lookup
of the forward op of the backend a call chose.

An op NAME has, for each backend record with ops, ``pyattn::NAME_fwd<suffix>`` and, when it
has autograd, ``pyattn::NAME_bwd<suffix>``: the C++ ops (suffix "", csrc/registration.cpp, one
op for the CPU and CUDA dispatch keys) and the Triton twins (suffix "_triton", defined by
importing ``pyattn.kernels.NAME``). Constructing a ``FusedOp`` is the op's one registration
(docs/design.md, "Adding an op"): it enters ``OPS``, sets the op's backend preference order, and
``load()`` registers what this install has.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor

from .. import _backend


def shape_str(t: Tensor) -> str:
    """``(2, 3, 4)`` for a tensor of that shape, for error messages."""
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


# Every registered op by name (its stem): the op's files are found from it (tests/test_house.py).
OPS: dict[str, FusedOp] = {}


class FusedOp:
    """The forward ops of one fused op, per backend, with fake impls and autograd registered.

    Arguments:
        name: the op's stem: its name in the ``pyattn`` library without ``_fwd``/``_bwd``, and
            the stem of its files (csrc/NAME.cpp, kernels/NAME.py, tests/test_NAME.py, ...).
        public: the public function's name (``pyattn.<public>``).
        fake_fwd, fake_bwd: meta implementations of the forward and backward ops (the C++ ops
            need them; triton_op derives its own). No ``fake_bwd``: a forward-only op.
        setup_context: autograd setup_context for the forward op (None: forward only).
        make_backward: builds the autograd backward from the backward op it should call.
        preference: the kernel backends in the order ``backend=None`` tries them (each only on
            the device types its record allows), from the benchmarks.
    """

    def __init__(
        self,
        name: str,
        *,
        public: str,
        fake_fwd: Callable,
        fake_bwd: Callable | None = None,
        setup_context: Callable | None = None,
        make_backward: Callable[[object], Callable] | None = None,
        preference: tuple[str, ...] = ("cpu", "triton", "cuda"),
    ) -> None:
        if name in OPS:
            raise RuntimeError(f"pyattn op {name!r} is registered twice")
        unknown = [b for b in preference if b not in _backend.KERNEL_BACKENDS]
        if unknown:
            raise ValueError(f"{name}: preference names unknown backends {unknown}")
        self.name, self.public = name, public
        self._fake_fwd, self._fake_bwd = fake_fwd, fake_bwd
        self._setup_context, self._make_backward = setup_context, make_backward
        self.preference = preference
        self.forward_ops: dict[str, object] = {}
        OPS[name] = self
        _backend.PREFERENCE[name] = preference

    @property
    def has_autograd(self) -> bool:
        return self._make_backward is not None

    def _register(self, suffix: str, fake: bool):
        fwd_name, bwd_name = f"{self.name}_fwd{suffix}", f"{self.name}_bwd{suffix}"
        if fake:
            torch.library.register_fake(f"pyattn::{fwd_name}")(self._fake_fwd)
            if self.has_autograd:
                torch.library.register_fake(f"pyattn::{bwd_name}")(self._fake_bwd)
        if self.has_autograd:
            bwd_op = getattr(torch.ops.pyattn, bwd_name)
            torch.library.register_autograd(
                f"pyattn::{fwd_name}", self._make_backward(bwd_op), setup_context=self._setup_context
            )
        return getattr(torch.ops.pyattn, fwd_name)

    def load(self) -> None:
        """Registers what this install has, for every backend record with ops: the C++ ops when
        pyattn._C imported, a kernel module's ops when its import works (a failing import is
        recorded, not raised, so a broken Triton install cannot break ``import pyattn``)."""
        by_suffix: dict[str, object] = {}
        for rec in _backend.RECORDS.values():
            if rec.op_suffix is None:
                continue
            if rec.op_suffix in by_suffix:  # one op, several dispatch keys
                if by_suffix[rec.op_suffix] is not None:
                    self.forward_ops[rec.name] = by_suffix[rec.op_suffix]
                continue
            by_suffix[rec.op_suffix] = None
            if rec.kernel_module is None:
                if _backend._C() is None:
                    continue
            else:
                module = rec.kernel_module.format(op=self.name)
                if rec.requires and importlib.util.find_spec(rec.requires) is None:
                    continue
                try:
                    importlib.import_module(module)
                except Exception as exc:  # noqa: BLE001  (a broken Triton must not break import pyattn)
                    _backend.record_import_error(rec.name, exc)
                    continue
            op = self._register(rec.op_suffix, fake=rec.fakes)
            by_suffix[rec.op_suffix] = op
            self.forward_ops[rec.name] = op

    def resolve(
        self, backend: str | None, device: torch.device, dtype: torch.dtype, head_dims=(), variants=False
    ) -> str:
        """The backend a call runs on (pyattn/_backend.py ``resolve``)."""
        return _backend.resolve(self.name, backend, device, dtype, head_dims, variants)

    def forward_op(self, backend: str):
        """The forward op of ``backend``, or a RuntimeError saying why it cannot run here."""
        op = self.forward_ops.get(backend)
        if op is None:
            why = _backend.IMPORT_ERRORS.get(backend, "its kernels are not registered")
            raise RuntimeError(f"pyattn.{self.name}: backend {backend!r} cannot run here: {why}")
        return op
