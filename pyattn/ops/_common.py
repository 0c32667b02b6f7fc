"""What the ops share (pyattn/ops/<op>.py import from here, never from each other): the causal
codes of the kernels, argument checks that read the same for every op, the log-sum-exp dtype,
autocast, and dropout's philox seed/offset and keep mask."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from .. import _backend, reference
from .errors import InputError, InputTypeError

# The ops' `causal` argument (csrc/registration.cpp): the values of
# torch.nn.attention.bias.CausalVariant, 0 for none.
CAUSAL_NONE, CAUSAL_UPPER_LEFT, CAUSAL_LOWER_RIGHT = 0, 1, 2


def fail(op: str, msg: str, cls: type[InputError] = InputError):
    """Raise ``cls`` (the InputError family, pyattn/ops/errors.py) as ``"<op>: <msg>"``; every
    message names the argument, what was expected and what came."""
    raise cls(f"{op}: {msg}")


def compiling() -> bool:
    return torch.compiler.is_compiling()


def known_true(cond) -> bool:
    """``bool(cond)`` for plain values; for a symbolic condition, True only where it holds on
    every size (no guard): a check on a data-dependent (unbacked) size, as torch.export traces
    one, must not ask for its value (it fails with "Could not guard on data-dependent
    expression"). Used where False is the safe answer (e.g. "the inputs are empty": the kernels
    take empty inputs too)."""
    return bool(guard_or_false(cond))


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The row statistics' dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensors(op: str, named: dict[str, Tensor], optional: dict[str, Tensor | None] = None) -> None:
    """Every tensor argument is a torch.Tensor (an optional one may be None)."""
    for name, t in named.items():
        if not isinstance(t, Tensor):
            fail(op, f"'{name}' must be a torch.Tensor, got {type(t).__name__}", InputTypeError)
    for name, t in (optional or {}).items():
        if t is not None and not isinstance(t, Tensor):
            fail(op, f"'{name}' must be a torch.Tensor or None, got {type(t).__name__}", InputTypeError)


def check_same_dtype_and_device(op: str, named: dict[str, Tensor]) -> None:
    """The inputs ``named`` are floating point, of the first one's dtype and on its device: an
    InputTypeError naming the argument for a dtype, an InputError for a device."""
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if not t.is_floating_point():
            fail(op, f"'{name}' must be a floating-point tensor, got {t.dtype}", InputTypeError)
        if t.dtype != first.dtype:
            fail(op, f"'{name}' must have {first_name}'s dtype {first.dtype}, got {t.dtype}", InputTypeError)
        if t.device != first.device:
            fail(op, f"'{name}' is on {t.device} but {first_name} is on {first.device}")


def check_bool(op: str, name: str, x) -> None:
    if not isinstance(x, bool):
        fail(op, f"'{name}' must be a bool, got {type(x).__name__}", InputTypeError)


def number(op: str, name: str, x, expected: str = "a float") -> float:
    """A float argument as torch's argument parser takes it: a Python number or a 1-element
    tensor (not a string or None)."""
    if isinstance(x, Tensor) and x.numel() == 1:
        return float(x)
    if isinstance(x, (bool, int, float)):
        return float(x)
    fail(op, f"'{name}' must be {expected}, got {type(x).__name__}", InputTypeError)


def check_scale(op: str, scale) -> float | None:
    """``scale`` as a float (None stays None); refused when it is not finite: NaN or inf makes
    every output NaN, a caller's bug (torch returns garbage for NaN and NaN for inf)."""
    if scale is None:
        return None
    s = number(op, "scale", scale, "a float or None")
    if not math.isfinite(s):
        fail(op, f"'scale' must be a finite float or None, got {s!r}")
    return s


def check_dropout(op: str, dropout_p) -> float:
    p = number(op, "dropout_p", dropout_p)
    if not 0.0 <= p <= 1.0:
        fail(op, f"'dropout_p' must be in [0, 1], got {dropout_p!r}")
    return p


def default_scale(scale: float | None, head_dim: int) -> float:
    # head dim 0: every score is an empty dot product, 0 whatever the scale (as torch)
    if scale is not None:
        return float(scale)
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def autocast(*tensors):
    """Under ``torch.autocast`` for the first input's device, floating inputs in its dtype, as
    torch's attention (a lower-precision op there), so a model's float32 parameters meet its half
    activations in one dtype; otherwise the inputs unchanged. A CausalBias stays what it is."""
    from torch.nn.attention.bias import CausalBias

    first = tensors[0]
    if not isinstance(first, Tensor) or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dt = torch.get_autocast_dtype(first.device.type)
    return tuple(
        t.to(dt) if isinstance(t, Tensor) and not isinstance(t, CausalBias) and t.is_floating_point() else t
        for t in tensors
    )


def dropout_seed_offset() -> tuple[int, int]:
    """A philox (seed, offset) drawn from torch's default CPU generator, so torch.manual_seed
    makes fused dropout reproducible. The offset stays below 2**32 so that offset + element index
    cannot wrap 64 bits."""
    draw = torch.randint(0, 2**62, (2,), dtype=torch.int64)
    seed, offset = draw.tolist()
    return int(seed), int(offset) % 2**32


def dropout_keep_mask(seed: int, offset: int, shape: tuple[int, ...], p: float, device) -> Tensor:
    """The (B, H, Lq, Lk) keep mask every backend draws for (seed, offset): for the reference
    path, so that it drops what the kernels would."""
    if _backend._C() is not None:
        keep = torch.ops.pyattn.dropout_keep_mask(seed, offset, list(shape), float(p))
    else:
        keep = reference.dropout_keep_mask(seed, offset, shape, p)
    return keep.to(device)


def is_half_cpu(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16)
