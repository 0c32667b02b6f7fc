"""What every fused op shares: registering fake impls and autograd on its forward/backward
custom-op pair, once for the C++ ops (CPU and CUDA kernels behind one name) and once for the
Triton twins, and looking up the forward op of the backend that was chosen.

An op NAME has the C++ ops ``pyattn::NAME_fwd`` / ``pyattn::NAME_bwd`` (csrc/registration.cpp)
and the Triton ops ``pyattn::NAME_fwd_triton`` / ``pyattn::NAME_bwd_triton`` defined by importing
``pyattn.kernels.NAME``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import Tensor

from .. import _backend


def shape_str(t: Tensor) -> str:
    """``(2, 3, 4)`` for a tensor of that shape, for error messages."""
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


class FusedOp:
    """The forward ops of one fused op, per backend, with fake impls and autograd registered.

    Arguments:
        name: the op's name in the ``pyattn`` library, without ``_fwd``/``_bwd``.
        fake_fwd, fake_bwd: meta implementations of the forward and backward ops (the C++ ops
            need them; triton_op derives its own).
        setup_context: autograd setup_context for the forward op.
        make_backward: builds the autograd backward from the backward op it should call.
    """

    def __init__(
        self,
        name: str,
        *,
        fake_fwd: Callable,
        fake_bwd: Callable,
        setup_context: Callable,
        make_backward: Callable[[object], Callable],
    ) -> None:
        self.name = name
        self._fake_fwd, self._fake_bwd = fake_fwd, fake_bwd
        self._setup_context, self._make_backward = setup_context, make_backward
        self.forward_ops: dict[str, object] = {}

    def _register(self, suffix: str, fake: bool):
        fwd_name, bwd_name = f"{self.name}_fwd{suffix}", f"{self.name}_bwd{suffix}"
        if fake:
            torch.library.register_fake(f"pyattn::{fwd_name}")(self._fake_fwd)
            torch.library.register_fake(f"pyattn::{bwd_name}")(self._fake_bwd)
        bwd_op = getattr(torch.ops.pyattn, bwd_name)
        torch.library.register_autograd(
            f"pyattn::{fwd_name}", self._make_backward(bwd_op), setup_context=self._setup_context
        )
        return getattr(torch.ops.pyattn, fwd_name)

    def load(self) -> None:
        """Registers what this install has: the C++ ops when pyattn._C imported, the Triton ops
        when Triton is usable (a failing kernel import is recorded, not raised, so a broken
        Triton install cannot break ``import pyattn``)."""
        if _backend._C() is not None:
            fwd = self._register("", fake=True)
            self.forward_ops["cpu"] = fwd
            self.forward_ops["cuda"] = fwd
        if _backend.have_triton():
            try:
                importlib.import_module(f"pyattn.kernels.{self.name}")
            except Exception as exc:
                _backend.record_import_error("triton", exc)
                return
            self.forward_ops["triton"] = self._register("_triton", fake=False)

    def forward_op(self, backend: str):
        """The forward op of ``backend``, or a RuntimeError saying why it cannot run here."""
        op = self.forward_ops.get(backend)
        if op is None:
            why = _backend.IMPORT_ERRORS.get(backend, "its kernels are not registered")
            raise RuntimeError(f"pyattn.{self.name}: backend {backend!r} cannot run here: {why}")
        return op
