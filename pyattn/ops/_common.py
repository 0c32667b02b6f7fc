"""What the ops share (pyattn/ops/<op>.py import from here, never from each other): the causal
codes of the kernels, argument checks that read the same for every op, the log-sum-exp dtype,
autocast, and dropout's philox seed/offset and keep mask."""

from __future__ import annotations

import math
from typing import NamedTuple

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


# -- attention variants (docs/design.md, "Attention variants") ------------------------------------


class Variants(NamedTuple):
    """The checked variant arguments of an sdpa-like op: the window as ints (-1 = unbounded),
    softcap as a float (0 = off), sinks (Hq,) and alibi_slopes (Hq,) / (B, Hq) or None."""

    left: int
    right: int
    softcap: float
    sinks: Tensor | None
    alibi_slopes: Tensor | None

    @property
    def on(self) -> bool:
        """Whether any variant is on (the backends that do not fuse them refuse the call)."""
        return (
            self.left >= 0
            or self.right >= 0
            or self.softcap > 0.0
            or self.sinks is not None
            or self.alibi_slopes is not None
        )


NO_VARIANTS = Variants(-1, -1, 0.0, None, None)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_variants(
    op: str,
    window_size,
    softcap,
    sinks,
    alibi_slopes,
    query: Tensor,
    Hq: int,
    batch: int | None,
) -> Variants:
    """The variant arguments checked once for every backend: ``window_size`` a pair of ints >= -1,
    ``softcap`` a finite float >= 0, ``sinks`` a floating (Hq,) tensor and ``alibi_slopes`` a
    floating (Hq,) or (batch, Hq) tensor (batch None: only (Hq,)), both on query's device."""
    if not (
        isinstance(window_size, (tuple, list)) and len(window_size) == 2 and all(map(_is_int, window_size))
    ):
        fail(op, f"'window_size' must be a pair of ints (left, right), got {window_size!r}", InputTypeError)
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        fail(op, f"'window_size' entries must be >= -1 (-1 = unbounded), got {tuple(window_size)!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        fail(op, f"'softcap' must be a float, got {type(softcap).__name__}", InputTypeError)
    softcap = float(softcap)
    if not (math.isfinite(softcap) and softcap >= 0.0):
        fail(op, f"'softcap' must be finite and >= 0 (0 = off), got {softcap!r}")
    for name, t in (("sinks", sinks), ("alibi_slopes", alibi_slopes)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            fail(op, f"'{name}' must be a torch.Tensor or None, got {type(t).__name__}", InputTypeError)
        if not t.is_floating_point():
            fail(op, f"'{name}' must be a floating-point tensor, got {t.dtype}", InputTypeError)
        if t.device != query.device:
            fail(op, f"'{name}' is on {t.device} but query is on {query.device}")
    if sinks is not None and tuple(sinks.shape) != (Hq,):
        fail(op, f"'sinks' must be (Hq,) = ({Hq},), got {tuple(sinks.shape)}")
    if alibi_slopes is not None:
        shapes = [(Hq,)] + ([(batch, Hq)] if batch is not None else [])
        if tuple(alibi_slopes.shape) not in shapes:
            want = " or ".join(str(s) for s in shapes)
            fail(op, f"'alibi_slopes' must be {want} ((Hq,) or (B, Hq)), got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.requires_grad and torch.is_grad_enabled():
            fail(op, "'alibi_slopes' are constants (no gradient): pass them detached")
    return Variants(left, right, softcap, sinks, alibi_slopes)


def sink_grad(sinks: Tensor, lse: Tensor, grad_out: Tensor, out: Tensor, head_dim: int) -> Tensor:
    """d loss / d sinks: the sink's weight in row i is P_i = exp(sink - lse_i) and it carries no
    value, so its gradient is -sum_i P_i Delta_i with Delta_i = dO_i . O_i (the same Delta as the
    keys' dS = P (dP - Delta)). ``lse`` includes the sink; heads sit at ``head_dim`` of lse and
    of ``out`` / ``grad_out`` (whose last dim is Dv)."""
    acc = torch.float64 if lse.dtype == torch.float64 else torch.float32
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1)  # lse's shape
    shape = [1] * lse.dim()
    shape[head_dim] = -1
    p_sink = torch.exp(sinks.to(acc).reshape(shape) - lse.to(acc))  # +inf lse (no key, no sink): 0
    dims = [d for d in range(lse.dim()) if d != head_dim % lse.dim()]
    return (-(p_sink * delta).sum(dims)).to(sinks.dtype)
