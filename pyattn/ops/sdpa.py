"""pyattn.scaled_dot_product_attention: fused multi-head attention as a PyTorch custom op with
autograd, with the semantics of ``torch.nn.functional.scaled_dot_product_attention``.

    S = scale * Q K^T + mask,   P = softmax(S),   O = dropout(P) V

The fused kernels (C++ for CPU, CUDA C++, Triton) tile queries x keys with an online softmax and
never store S beyond a block; the forward saves the row log-sum-exp and the backward recomputes
P from it (flash-attention). Ops (schemas and conventions in csrc/registration.cpp), on
canonical 4-D (B, H, L, D) tensors:

    pyattn::sdpa_fwd(query, key, value, attn_mask, dropout_p, is_causal, scale,
        seed, offset) -> (out, lse)
    pyattn::sdpa_bwd(grad_out, query, key, value, attn_mask, out, lse, dropout_p,
        is_causal, scale, seed, offset) -> (grad_query, grad_key, grad_value)

and their Triton twins ``*_triton`` (kernels/sdpa.py). This module gives them fake
(meta) implementations and autograd, validates inputs once for every backend, broadcasts and
flattens torch's (..., H, L, E) inputs to the canonical form, and picks the backend.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _backend, reference
from ._glue import FusedOp, shape_str

OP = "sdpa"


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- input validation (one function, every backend) --------------------------------------------



def _broadcast_shapes(*shapes) -> tuple[int, ...]:
    """torch.broadcast_shapes, with plain-int shapes done here: torch's version costs ~15 us a
    call (a third of the op's Python overhead on small inputs); symbolic shapes go to torch."""
    if not all(isinstance(d, int) for s in shapes for d in s):
        return tuple(torch.broadcast_shapes(*shapes))
    # a plain loop: torch 2.11's dynamo cannot trace max() over a generator with a default
    n = 0
    for s in shapes:
        n = max(n, len(s))
    out = [1] * n
    for s in shapes:
        for i, d in enumerate(s, n - len(s)):
            if d != 1:
                if out[i] != 1 and out[i] != d:
                    raise RuntimeError(f"shapes {shapes} do not broadcast")
                out[i] = d
    return tuple(out)


def _broadcast(name: str, shapes: list[tuple[str, tuple[int, ...]]]) -> tuple[int, ...]:
    try:
        return _broadcast_shapes(*(tuple(s) for _, s in shapes))
    except RuntimeError:
        desc = ", ".join(f"{n} {tuple(s)}" for n, s in shapes)
        raise ValueError(
            f"scaled_dot_product_attention: the {name} of query, key and value must be "
            f"broadcastable, got {desc}"
        ) from None


def check_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> tuple[tuple[int, ...], int, int, bool]:
    """Raise a TypeError/ValueError naming the argument, what was expected and what came.

    Returns ``(lead, Hq, Hkv, gqa, out_batch)``: the broadcast leading dims (before the head
    dim), the query and key/value head counts, whether the kernel runs grouped-query attention
    (Hq != Hkv), and the output's dims before (Lq, Dv).
    """
    named = {"query": query, "key": key, "value": value}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(
                f"scaled_dot_product_attention: '{name}' must be a torch.Tensor, got {type(t).__name__}"
            )
        if not t.is_floating_point():
            raise TypeError(
                f"scaled_dot_product_attention: '{name}' must be a floating-point tensor, got {t.dtype}"
            )
        if t.dim() < 2:
            raise ValueError(
                f"scaled_dot_product_attention: '{name}' must have at least 2 dims (..., L, E), "
                f"got {t.dim()}-D {shape_str(t)}"
            )
    for name, t in named.items():
        if t.dtype != query.dtype:
            raise TypeError(
                f"scaled_dot_product_attention: '{name}' dtype {t.dtype} differs from query's "
                f"{query.dtype}; query, key and value must share one dtype"
            )
        if t.device != query.device:
            raise ValueError(
                f"scaled_dot_product_attention: '{name}' is on {t.device} but query is on "
                f"{query.device}; all inputs must be on one device"
            )
    E, Lk = query.shape[-1], key.shape[-2]
    if key.shape[-1] != E:
        raise ValueError(
            f"scaled_dot_product_attention: 'key' head dim must match query's E={E}, got key "
            f"{shape_str(key)} and query {shape_str(query)}"
        )
    if value.shape[-2] != Lk:
        raise ValueError(
            f"scaled_dot_product_attention: 'value' length must match key's Lk={Lk}, got value "
            f"{shape_str(value)} and key {shape_str(key)}"
        )
    if not isinstance(dropout_p, (int, float)) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"scaled_dot_product_attention: 'dropout_p' must be in [0, 1), got {dropout_p!r}")
    if scale is not None and (not isinstance(scale, (int, float)) or math.isnan(scale) or scale < 0):
        raise ValueError(
            f"scaled_dot_product_attention: 'scale' must be None or a non-negative number, got {scale!r}"
        )

    # Heads (dim -3) and the leading dims before them. With enable_gqa and differing head counts
    # the heads stay apart (the kernel maps query head h to kv head h // (Hq // Hkv)); otherwise
    # every dim before (L, E) broadcasts, as torch's matmuls do.
    ranks3 = all(t.dim() >= 3 for t in named.values())
    gqa = (
        bool(enable_gqa)
        and ranks3
        and query.shape[-3] != key.shape[-3]
        or bool(enable_gqa)
        and ranks3
        and query.shape[-3] != value.shape[-3]
    )
    if gqa:
        Hq, Hkv = query.shape[-3], key.shape[-3]
        if value.shape[-3] != Hkv:
            raise ValueError(
                f"scaled_dot_product_attention: 'value' heads must match key's Hkv={Hkv}, got "
                f"value {shape_str(value)} and key {shape_str(key)}"
            )
        if Hkv == 0 or Hq % Hkv != 0:
            raise ValueError(
                f"scaled_dot_product_attention: with enable_gqa, query heads Hq={Hq} must be a "
                f"multiple of key/value heads Hkv={Hkv}"
            )
        batch = ()
        lead = _broadcast(
            "leading dims",
            [("query", query.shape[:-3]), ("key", key.shape[:-3]), ("value", value.shape[:-3])],
        )
    else:
        batch = _broadcast(
            "batch and head dims",
            [("query", query.shape[:-2]), ("key", key.shape[:-2]), ("value", value.shape[:-2])],
        )
        lead, H = (batch[:-1], batch[-1]) if batch else ((), 1)
        Hq = Hkv = H
    if attn_mask is not None:
        if is_causal:
            raise ValueError(
                "scaled_dot_product_attention: 'attn_mask' and 'is_causal' cannot both be set "
                "(as in torch); fold the causal mask into attn_mask"
            )
        if not isinstance(attn_mask, Tensor):
            raise TypeError(
                f"scaled_dot_product_attention: 'attn_mask' must be a tensor or None, got {type(attn_mask).__name__}"
            )
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise TypeError(
                f"scaled_dot_product_attention: 'attn_mask' must be bool (True = attend) or of "
                f"query's dtype {query.dtype}, got {attn_mask.dtype}"
            )
        if attn_mask.device != query.device:
            raise ValueError(
                f"scaled_dot_product_attention: 'attn_mask' is on {attn_mask.device} but query is on {query.device}"
            )
        target = (*lead, Hq, query.shape[-2], Lk)
        try:
            ok = _broadcast_shapes(tuple(attn_mask.shape), target) == target
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"scaled_dot_product_attention: 'attn_mask' must be broadcastable to "
                f"(..., Hq, Lq, Lk) = {target}, got {shape_str(attn_mask)}"
            )
    out_batch = (*lead, Hq) if gqa or len(batch) else ()
    return lead, Hq, Hkv, gqa, out_batch


# -- fake (meta) implementations and autograd, shared by the C++ op and its Triton twin ----------


def _fake_fwd(query, key, value, attn_mask, dropout_p, is_causal, scale, seed, offset):
    B, Hq, Lq, _ = query.shape
    out = query.new_empty((B, Hq, Lq, value.shape[-1]))
    lse = query.new_empty((B, Hq, Lq), dtype=_lse_dtype(query.dtype))
    return out, lse


def _fake_bwd(grad_out, query, key, value, attn_mask, out, lse, dropout_p, is_causal, scale, seed, offset):
    return (
        torch.empty_like(query, memory_format=torch.contiguous_format),
        torch.empty_like(key, memory_format=torch.contiguous_format),
        torch.empty_like(value, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, is_causal, scale, seed, offset = inputs
    out, lse = output
    ctx.args = (dropout_p, is_causal, scale, seed, offset)
    ctx.save_for_backward(query, key, value, attn_mask, out, lse)


def _make_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        query, key, value, attn_mask, out, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if not any(needs[:3]):
            return (None,) * 9
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dropout_p, is_causal, scale, seed, offset = ctx.args
        dq, dk, dv = bwd_op(
            grad_out.contiguous(), query, key, value, attn_mask, out, lse,
            dropout_p, is_causal, scale, seed, offset,
        )  # fmt: skip
        return (
            dq if needs[0] else None,
            dk if needs[1] else None,
            dv if needs[2] else None,
            None, None, None, None, None, None,
        )  # fmt: skip

    return backward


_OPS = FusedOp(
    OP,
    fake_fwd=_fake_fwd,
    fake_bwd=_fake_bwd,
    setup_context=_setup_context,
    make_backward=_make_backward,
)
_OPS.load()


def _dropout_seed_offset() -> tuple[int, int]:
    """A philox (seed, offset) drawn from torch's default CPU generator, so torch.manual_seed
    makes fused dropout reproducible. The offset stays below 2**32 so that offset + element index
    cannot wrap 64 bits."""
    draw = torch.randint(0, 2**62, (2,), dtype=torch.int64)
    seed, offset = draw.tolist()
    return int(seed), int(offset) % 2**32


# -- public API ------------------------------------------------------------------------------------


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``, fused.

    ``softmax(query key^T * scale + mask) value`` with dropout on the weights. Leading dims
    broadcast as in torch. Differences from torch: a query row whose keys are all masked gets
    zeros (and zero gradients), always, where torch has given NaN (older versions, some of its
    kernels); dropout draws its mask from a counter-based
    generator (philox) seeded from torch's default generator, so ``torch.manual_seed`` reproduces
    it but the mask differs from torch's. A float ``attn_mask`` that requires grad is computed
    through pyattn.reference (naive, materialised scores) so that its gradient is right; so is
    every call with ``backend="reference"``.

    Arguments:
        query: (..., Hq, Lq, E).
        key: (..., Hkv, Lk, E).
        value: (..., Hkv, Lk, Dv).
        attn_mask: bool (True = attend) or of query's dtype (added to the scores),
            broadcastable to (..., Hq, Lq, Lk). Not together with ``is_causal``.
        dropout_p: dropout probability on the attention weights, in [0, 1).
        is_causal: top-left aligned causal mask (query i sees keys j <= i), as torch.
        scale: score scale, default ``1 / sqrt(E)``; must be non-negative.
        enable_gqa: Hq may be a multiple of Hkv (grouped-query attention).
        backend: None (best for the device; env PYATTN_BACKEND overrides), "cpu", "cuda",
            "triton" or "reference".
    Returns:
        (..., Hq, Lq, Dv).
    """
    lead, Hq, Hkv, _gqa, out_batch = check_inputs(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
    )
    chosen = _backend.resolve(OP, backend, query.device, query.dtype)
    float_mask_grad = attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.requires_grad
    if chosen == "reference" or float_mask_grad:
        if dropout_p > 0.0:
            return _reference_with_fused_dropout(
                query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, lead, Hq
            )
        return reference.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
        )

    Lq, E, Lk, Dv = query.shape[-2], query.shape[-1], key.shape[-2], value.shape[-1]
    B = math.prod(lead)
    q = query.expand(*lead, Hq, Lq, E).reshape(B, Hq, Lq, E)  # (B, Hq, Lq, E)
    k = key.expand(*lead, Hkv, Lk, E).reshape(B, Hkv, Lk, E)  # (B, Hkv, Lk, E)
    v = value.expand(*lead, Hkv, Lk, Dv).reshape(B, Hkv, Lk, Dv)  # (B, Hkv, Lk, Dv)
    mask = None
    if attn_mask is not None:
        # stays a stride-0 view where it broadcasts: the kernels read it through its strides
        mask = attn_mask.expand(*lead, Hq, Lq, Lk).reshape(B, Hq, Lq, Lk)  # (B, Hq, Lq, Lk)
    seed, offset = _dropout_seed_offset() if dropout_p > 0.0 else (0, 0)
    scale_f = 1.0 / math.sqrt(E) if scale is None else float(scale)
    fwd = _OPS.forward_op(chosen)
    out, _lse = fwd(q, k, v, mask, float(dropout_p), bool(is_causal), scale_f, seed, offset)
    return out.reshape(*out_batch, Lq, Dv)  # (..., Hq, Lq, Dv)


def _reference_with_fused_dropout(
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, lead, Hq
):
    """The reference path with the same philox keep-mask the fused kernels would draw."""
    seed, offset = _dropout_seed_offset()
    B = math.prod(lead)
    shape = (B, Hq, query.shape[-2], key.shape[-2])
    if _backend._C() is not None:
        keep = torch.ops.pyattn.dropout_keep_mask(seed, offset, list(shape), float(dropout_p))
    else:
        keep = reference.dropout_keep_mask(seed, offset, shape, dropout_p)
    keep = keep.to(query.device)
    keep = keep.reshape(*lead, *shape[1:])
    return reference.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, dropout_mask=keep
    )
