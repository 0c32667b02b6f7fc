"""pyattn.additive_attention: fused Bahdanau attention as a PyTorch custom op with autograd.

    e_ij = v . tanh(q_i + k_j),   a_ij = softmax_j(e_ij),   c_i = sum_j a_ij value_j

The fused kernels (C++ for CPU, CUDA C++, Triton) stream key blocks with an online softmax and
never build the (B, Tq, Tk, H) tanh tensor; the backward recomputes tanh from the saved row
log-sum-exp. Ops (schemas in csrc/registration.cpp):

    pyattn::additive_attention_fwd(query, key, value, v, key_padding_mask, return_weights)
        -> (out, lse, weights)
    pyattn::additive_attention_bwd(grad_out, query, key, value, v, key_padding_mask, out, lse,
        grad_weights, weights) -> (grad_query, grad_key, grad_value, grad_v)

and their Triton twins ``*_triton`` (kernels/additive_attention.py). This module gives them fake
(meta) implementations and autograd, validates inputs once for every backend, and picks the
backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, reference
from ._glue import FusedOp, shape_str

OP = "additive_attention"


def _lse_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # The CPU kernels keep lse in float64 (csrc/cpu/additive_attention_kernel.h); the GPU
    # backends in float32, as flash-attention does.
    return torch.float64 if dtype == torch.float64 or device.type == "cpu" else torch.float32


# -- input validation (one function, every backend) --------------------------------------------


def check_inputs(
    query: Tensor, key: Tensor, value: Tensor, v: Tensor, key_padding_mask: Tensor | None
) -> None:
    """Raise a TypeError/ValueError naming the argument, what was expected and what came."""
    named = {"query": query, "key": key, "value": value, "v": v}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"additive_attention: '{name}' must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"additive_attention: '{name}' must be a floating-point tensor, got {t.dtype}")
    for name, rank in (("query", 3), ("key", 3), ("value", 3), ("v", 1)):
        t = named[name]
        if t.dim() != rank:
            dims = {"query": "(B, Tq, H)", "key": "(B, Tk, H)", "value": "(B, Tk, Dv)", "v": "(H,)"}[name]
            raise ValueError(
                f"additive_attention: '{name}' must be {rank}-D {dims}, got {t.dim()}-D {shape_str(t)}"
            )
    B, Tq, H = query.shape
    if key.shape[0] != B:
        raise ValueError(
            f"additive_attention: 'key' batch size must match query's B={B}, got key {shape_str(key)}"
        )
    if key.shape[2] != H:
        raise ValueError(
            f"additive_attention: 'key' last dim must match query's H={H}, got key {shape_str(key)}"
        )
    Tk = key.shape[1]
    if value.shape[0] != B or value.shape[1] != Tk:
        raise ValueError(
            f"additive_attention: 'value' must be (B={B}, Tk={Tk}, Dv) to match query and key, got {shape_str(value)}"
        )
    if v.shape[0] != H:
        raise ValueError(
            f"additive_attention: 'v' must have length H={H} (query's last dim), got {shape_str(v)}"
        )
    for name, t in named.items():
        if t.dtype != query.dtype:
            raise TypeError(
                f"additive_attention: '{name}' dtype {t.dtype} differs from query's {query.dtype}; "
                "all inputs must share one dtype"
            )
        if t.device != query.device:
            raise ValueError(
                f"additive_attention: '{name}' is on {t.device} but query is on {query.device}; "
                "all inputs must be on one device"
            )
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise TypeError(
                f"additive_attention: 'key_padding_mask' must be a bool tensor or None, got {type(key_padding_mask).__name__}"
            )
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"additive_attention: 'key_padding_mask' must be a bool tensor (True = padding), got {key_padding_mask.dtype}"
            )
        if tuple(key_padding_mask.shape) != (B, Tk):
            raise ValueError(
                f"additive_attention: 'key_padding_mask' must be (B={B}, Tk={Tk}), got {shape_str(key_padding_mask)}"
            )
        if key_padding_mask.device != query.device:
            raise ValueError(
                f"additive_attention: 'key_padding_mask' is on {key_padding_mask.device} but query is on {query.device}"
            )


# -- fake (meta) implementations and autograd, shared by the C++ op and its Triton twin ----------


def _fake_fwd(query, key, value, v, key_padding_mask, return_weights):
    B, Tq, _ = query.shape
    Tk, Dv = value.shape[1], value.shape[2]
    out = query.new_empty((B, Tq, Dv))
    lse = query.new_empty((B, Tq), dtype=_lse_dtype(query.dtype, query.device))
    weights = query.new_empty((B, Tq, Tk) if return_weights else (0,))
    return out, lse, weights


def _fake_bwd(grad_out, query, key, value, v, key_padding_mask, out, lse, grad_weights, weights):
    return (
        torch.empty_like(query, memory_format=torch.contiguous_format),
        torch.empty_like(key, memory_format=torch.contiguous_format),
        torch.empty_like(value, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    query, key, value, v, key_padding_mask, return_weights = inputs
    out, lse, weights = output
    ctx.return_weights = return_weights
    ctx.save_for_backward(query, key, value, v, key_padding_mask, out, lse, weights)


def _make_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse, grad_weights):
        query, key, value, v, key_padding_mask, out, lse, weights = ctx.saved_tensors
        if not any(ctx.needs_input_grad[:4]):
            return None, None, None, None, None, None
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if ctx.return_weights and grad_weights is not None:
            gw, w = grad_weights, weights
        else:
            gw, w = None, None
        dq, dk, dvalue, dv = bwd_op(
            grad_out.contiguous(), query, key, value, v, key_padding_mask, out, lse, gw, w
        )
        needs = ctx.needs_input_grad
        return (
            dq if needs[0] else None,
            dk if needs[1] else None,
            dvalue if needs[2] else None,
            dv if needs[3] else None,
            None,
            None,
        )

    return backward


_OPS = FusedOp(
    OP,
    fake_fwd=_fake_fwd,
    fake_bwd=_fake_bwd,
    setup_context=_setup_context,
    make_backward=_make_backward,
)
_OPS.load()


# -- public API ------------------------------------------------------------------------------------


def additive_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    *,
    return_weights: bool = False,
    backend: str | None = None,
):
    """Fused additive (Bahdanau) attention.

    ``e_ij = v . tanh(query_i + key_j)``, ``a_ij = softmax_j(e_ij)`` over the keys that are not
    padding, ``context_i = sum_j a_ij value_j``. A query whose keys are all padding gets a zero
    context (and zero weights), not NaN.

    Arguments:
        query: (B, Tq, H), the projected decoder states ``W_s s``.
        key: (B, Tk, H), the projected encoder states ``W_h h``.
        value: (B, Tk, Dv), the vectors averaged (usually the encoder states ``h``).
        v: (H,), the score vector.
        key_padding_mask: optional (B, Tk) bool, True where a key is padding (ignored).
        return_weights: also return the attention weights.
        backend: None (best for the device; env PYATTN_BACKEND overrides), "cpu", "cuda",
            "triton" or "reference".
    Returns:
        context (B, Tq, Dv); with ``return_weights`` also weights (B, Tq, Tk).
    """
    query, key, value, v = _autocast(query, key, value, v)
    check_inputs(query, key, value, v, key_padding_mask)
    dtype = query.dtype
    chosen = _backend.resolve(OP, backend, query.device, dtype)
    if chosen == "reference" and query.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        # the naive graph in float32, rounded once: a half (B, Tq, Tk, H) tanh tensor would lose
        # accuracy and overflow its sums (the cpu kernel takes half inputs itself)
        up = [t.float() for t in (query, key, value, v)]
        result = _run(chosen, *up, key_padding_mask, return_weights)
        if return_weights:
            return result[0].to(dtype), result[1].to(dtype)
        return result.to(dtype)
    return _run(chosen, query, key, value, v, key_padding_mask, return_weights)


def _autocast(*tensors):
    """Under ``torch.autocast`` for the inputs' device, floating inputs in its dtype (as torch
    treats its own attention, a lower-precision op), so a model's float32 parameters meet its
    half activations in one dtype; otherwise the inputs unchanged."""
    first = tensors[0]
    if not isinstance(first, Tensor) or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dt = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dt) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors)


def _run(chosen, query, key, value, v, key_padding_mask, return_weights):
    """The validated call on backend ``chosen``."""
    if chosen == "reference":
        return reference.additive_attention(
            query, key, value, v, key_padding_mask, return_weights=return_weights
        )
    out, _lse, weights = _OPS.forward_op(chosen)(query, key, value, v, key_padding_mask, return_weights)
    return (out, weights) if return_weights else out
