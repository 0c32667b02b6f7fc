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

from .. import reference
from ._common import autocast, check_same_dtype_and_device, check_tensors, fail, is_half_cpu
from ._glue import FusedOp, shape_str
from .errors import InputError, InputTypeError

OP = "additive_attention"


def _fail(msg: str, cls: type[InputError] = InputError):
    fail(OP, msg, cls)


def _lse_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # The CPU kernels keep lse in float64 (csrc/cpu/additive_attention_kernel.h); the GPU
    # backends in float32, as flash-attention does.
    return torch.float64 if dtype == torch.float64 or device.type == "cpu" else torch.float32


# -- input validation (one function, every backend) --------------------------------------------


def check_inputs(
    query: Tensor, key: Tensor, value: Tensor, v: Tensor, key_padding_mask: Tensor | None
) -> None:
    """Raise an InputError (InputTypeError for a wrong type or dtype: the family of
    pyattn/ops/errors.py, as the other ops) naming the argument, what was expected and what
    came."""
    named = {"query": query, "key": key, "value": value, "v": v}
    check_tensors(OP, named, {"key_padding_mask": key_padding_mask})
    dims = {"query": "(B, Tq, H)", "key": "(B, Tk, H)", "value": "(B, Tk, Dv)", "v": "(H,)"}
    for name, rank in (("query", 3), ("key", 3), ("value", 3), ("v", 1)):
        t = named[name]
        if t.dim() != rank:
            _fail(f"'{name}' must be {rank}-D {dims[name]}, got {t.dim()}-D {shape_str(t)}")
    check_same_dtype_and_device(OP, named)
    B, Tq, H = query.shape
    if key.shape[0] != B:
        _fail(f"'key' batch size must match query's B={B}, got key {shape_str(key)}")
    if key.shape[2] != H:
        _fail(f"'key' last dim must match query's H={H}, got key {shape_str(key)}")
    Tk = key.shape[1]
    if value.shape[0] != B or value.shape[1] != Tk:
        _fail(f"'value' must be (B={B}, Tk={Tk}, Dv) to match query and key, got {shape_str(value)}")
    if v.shape[0] != H:
        _fail(f"'v' must have length H={H} (query's last dim), got {shape_str(v)}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            _fail(
                f"'key_padding_mask' must be a bool tensor (True = padding), got {key_padding_mask.dtype}",
                InputTypeError,
            )
        if tuple(key_padding_mask.shape) != (B, Tk):
            _fail(f"'key_padding_mask' must be (B={B}, Tk={Tk}), got {shape_str(key_padding_mask)}")
        if key_padding_mask.device != query.device:
            _fail(f"'key_padding_mask' is on {key_padding_mask.device} but query is on {query.device}")


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
    public="additive_attention",
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
    query, key, value, v = autocast(query, key, value, v)
    check_inputs(query, key, value, v, key_padding_mask)
    dtype = query.dtype
    chosen = _OPS.resolve(backend, query.device, dtype)
    if chosen == "reference" and is_half_cpu(query):
        # the naive graph in float32, rounded once: a half (B, Tq, Tk, H) tanh tensor would lose
        # accuracy and overflow its sums (the cpu kernel takes half inputs itself)
        up = [t.float() for t in (query, key, value, v)]
        result = _run(chosen, *up, key_padding_mask, return_weights)
        if return_weights:
            return result[0].to(dtype), result[1].to(dtype)
        return result.to(dtype)
    return _run(chosen, query, key, value, v, key_padding_mask, return_weights)


def _run(chosen, query, key, value, v, key_padding_mask, return_weights):
    """The validated call on backend ``chosen``."""
    if chosen == "reference":
        return reference.additive_attention(
            query, key, value, v, key_padding_mask, return_weights=return_weights
        )
    out, _lse, weights = _OPS.forward_op(chosen)(query, key, value, v, key_padding_mask, return_weights)
    return (out, weights) if return_weights else out
