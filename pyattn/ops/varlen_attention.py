"""pyattn.varlen_attention: scaled-dot-product attention over packed variable-length sequences
(flash-attention's ``flash_attn_varlen_func`` layout), as a PyTorch custom op with autograd.

B sequences are packed along the first dim, with no padding: query (total_q, Hq, D), key
(total_k, Hkv, D), value (total_k, Hkv, Dv), and int32 cumulative lengths ``cu_seqlens_q`` /
``cu_seqlens_k`` (B + 1,) from 0: sequence b is query rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1]
and key rows cu_seqlens_k[b] .. cu_seqlens_k[b + 1], and attends only within itself. Ops (schemas
and conventions in csrc/registration.cpp):

    pyattn::varlen_attention_fwd(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, dropout_p, causal, scale, seed, offset) -> (out, lse)
    pyattn::varlen_attention_bwd(grad_out, query, key, value, cu_seqlens_q, cu_seqlens_k, out, lse,
        max_seqlen_q, max_seqlen_k, dropout_p, causal, scale, seed, offset)
        -> (grad_query, grad_key, grad_value)

with lse (Hq, total_q), ``causal`` as sdpa's (0 none, 1 upper-left, 2 lower-right, per sequence)
and their Triton twins ``*_triton`` (kernels/varlen_attention.py). Dropout draws the philox
counters of the padded (B, Hq, max_seqlen_q, max_seqlen_k) batch, so this op with dropout equals
``pyattn.scaled_dot_product_attention`` on the padded batch with a key padding mask and the same
(seed, offset) (docs/design.md, "Variable-length attention").
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ._common import (
    CAUSAL_NONE,
    CAUSAL_UPPER_LEFT,
    NO_VARIANTS,
    Variants,
    autocast,
    check_bool,
    check_dropout,
    check_scale,
    check_tensors,
    check_variants,
    default_scale,
    dropout_keep_mask,
    dropout_seed_offset,
    fail,
    is_half_cpu,
    lse_dtype,
    sink_grad,
)
from ._common import compiling as _compiling
from ._glue import FusedOp, shape_str
from .errors import InputError, InputTypeError

OP = "varlen_attention"


def _fail(msg: str, cls: type[InputError] = InputError):
    fail(OP, msg, cls)


def _seqlens_values(name: str, cu: Tensor, total: int) -> list[int]:
    """The values of ``cu`` (eager only: data-dependent), checked: 0 first, non-decreasing, the
    packed length last."""
    vals = cu.tolist()
    if vals[0] != 0:
        _fail(f"'{name}' must start at 0, got {name}[0] = {vals[0]}")
    for b in range(1, len(vals)):
        if vals[b] < vals[b - 1]:
            _fail(
                f"'{name}' must be non-decreasing (cumulative lengths), got {name}[{b - 1}] = "
                f"{vals[b - 1]} > {name}[{b}] = {vals[b]}"
            )
    if vals[-1] != total:
        _fail(f"'{name}' must end at the packed length {total}, got {name}[-1] = {vals[-1]}")
    return vals


def _max_seqlen(name: str, given, lengths: list[int] | None) -> int:
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, (int, torch.SymInt)):
            _fail(f"'{name}' must be an int or None, got {type(given).__name__}", InputTypeError)
        if lengths is not None and not _compiling():
            need = max(lengths, default=0)
            if given < need:
                _fail(f"'{name}' must be at least the longest sequence, {need}, got {given}")
        elif given < 0:
            _fail(f"'{name}' must be >= 0, got {given}")
        return given
    if lengths is None:
        _fail(
            f"'{name}' must be given as an int under torch.compile (computing it from cu_seqlens "
            "reads tensor data)"
        )
    return max(lengths, default=0)


def check_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> tuple[int, int]:
    """Raise an InputError (InputTypeError for a wrong type or dtype) naming the argument, what
    was expected and what came; else return (max_seqlen_q, max_seqlen_k) as ints.

    The checks of cu_seqlens' values (first 0, non-decreasing, last the packed length, the
    max_seqlen bounds) read tensor data and run in eager mode only; under torch.compile the C++
    ops still refuse out-of-range sequences."""
    named = {"query": query, "key": key, "value": value}
    check_tensors(OP, {**named, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k})
    check_bool(OP, "is_causal", is_causal)
    check_bool(OP, "enable_gqa", enable_gqa)
    check_dropout(OP, dropout_p)
    check_scale(OP, scale)
    for name, t in named.items():
        if t.dim() != 3:
            _fail(f"'{name}' must be 3-D (total, H, D) packed tokens, got {t.dim()}-D {shape_str(t)}")
    if not query.is_floating_point():
        _fail(f"query, key and value must be floating-point tensors, got {query.dtype}", InputTypeError)
    for t in named.values():
        if t.dtype != query.dtype:
            _fail(
                f"query, key and value must share one dtype, got query {query.dtype}, key {key.dtype}, "
                f"value {value.dtype}",
                InputTypeError,
            )
        if t.device != query.device:
            _fail(
                f"query, key and value must be on one device, got query on {query.device}, key on "
                f"{key.device}, value on {value.device}"
            )
    if key.shape[2] != query.shape[2]:
        _fail(f"'key' head dim must match query's D={query.shape[2]}, got key {shape_str(key)}")
    if value.shape[:2] != key.shape[:2]:
        _fail(
            f"'value' must have key's (total_k, Hkv) = {tuple(key.shape[:2])}, got value {shape_str(value)}"
        )
    Hq, Hkv = query.shape[1], key.shape[1]
    if Hq != Hkv:
        if not enable_gqa:
            _fail(
                f"query has {Hq} heads and key/value {Hkv}: pass enable_gqa=True for grouped-query "
                f"attention, got query {shape_str(query)}, key {shape_str(key)}"
            )
        if Hkv == 0 or Hq % Hkv != 0:
            _fail(f"with enable_gqa, key/value heads must divide query's: got Hq={Hq}, Hkv={Hkv}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32:
            _fail(f"'{name}' must be int32, got {cu.dtype}", InputTypeError)
        if cu.dim() != 1 or cu.shape[0] < 1:
            _fail(f"'{name}' must be 1-D (B + 1,), got {shape_str(cu)}")
        if cu.device != query.device:
            _fail(f"'{name}' is on {cu.device} but query is on {query.device}")
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        _fail(
            f"cu_seqlens_q and cu_seqlens_k must hold one entry per sequence plus one (B + 1,) alike, got "
            f"{shape_str(cu_seqlens_q)} and {shape_str(cu_seqlens_k)}"
        )
    lq = lk = None
    if not _compiling():
        cq = _seqlens_values("cu_seqlens_q", cu_seqlens_q, query.shape[0])
        ck = _seqlens_values("cu_seqlens_k", cu_seqlens_k, key.shape[0])
        lq = [b - a for a, b in zip(cq[:-1], cq[1:], strict=True)]
        lk = [b - a for a, b in zip(ck[:-1], ck[1:], strict=True)]
    return _max_seqlen("max_seqlen_q", max_seqlen_q, lq), _max_seqlen("max_seqlen_k", max_seqlen_k, lk)


# -- fake (meta) implementations and autograd, shared by the C++ ops and their Triton twins ------


def _fake_fwd(query, key, value, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, seed, offset,
              window_left=-1, window_right=-1, softcap=0.0, sinks=None, alibi_slopes=None):  # fmt: skip
    total_q, Hq, _ = query.shape
    out = query.new_empty((total_q, Hq, value.shape[-1]))
    lse = query.new_empty((Hq, total_q), dtype=lse_dtype(query.dtype))
    return out, lse


def _fake_bwd(grad_out, query, key, value, cu_q, cu_k, out, lse, max_q, max_k, dropout_p, causal, scale,
              seed, offset, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None):  # fmt: skip
    return (
        torch.empty_like(query, memory_format=torch.contiguous_format),
        torch.empty_like(key, memory_format=torch.contiguous_format),
        torch.empty_like(value, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    (query, key, value, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, seed, offset, *variants) = inputs
    left, right, softcap, sinks, alibi = (*variants, *NO_VARIANTS[len(variants) :])
    out, lse = output
    ctx.args = (max_q, max_k, dropout_p, causal, scale, seed, offset, left, right, softcap)
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(query, key, value, cu_q, cu_k, out, lse, sinks, alibi)


def _make_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        query, key, value, cu_q, cu_k, out, lse, sinks, alibi = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = [None] * ctx.n_inputs
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if any(needs[:3]):
            dq, dk, dv = bwd_op(
                grad_out.contiguous(), query, key, value, cu_q, cu_k, out, lse, *ctx.args, alibi
            )
            grads[:3] = [dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None]
        if sinks is not None and needs[15]:
            # lse (Hq, total_q) includes the sink; out and grad_out are (total_q, Hq, Dv)
            grads[15] = sink_grad(sinks, lse, grad_out.transpose(0, 1), out.transpose(0, 1), 0)
        return tuple(grads)

    return backward


_OPS = FusedOp(
    OP,
    public="varlen_attention",
    fake_fwd=_fake_fwd,
    fake_bwd=_fake_bwd,
    setup_context=_setup_context,
    make_backward=_make_backward,
)
_OPS.load()


# -- public API ------------------------------------------------------------------------------------


def varlen_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Scaled-dot-product attention over packed sequences of different lengths, fused.

    Each sequence b attends only within itself: its queries (rows cu_seqlens_q[b] ..
    cu_seqlens_q[b + 1]) to its keys (rows cu_seqlens_k[b] .. cu_seqlens_k[b + 1]); the work of a
    sequence is proportional to its own Lq_b * Lk_b, nothing is padded. A zero-length sequence
    gives nothing; a query row with no key to attend to (Lk_b = 0, or empty under causality)
    gives zeros and zero gradients. Equals ``pyattn.scaled_dot_product_attention`` on the padded
    (B, Hq, max_seqlen_q, D) batch with a key padding mask, dropout included: both draw the same
    philox counters for the same ``torch.manual_seed``.

    Arguments:
        query: (total_q, Hq, D) packed query tokens.
        key: (total_k, Hkv, D) packed key tokens.
        value: (total_k, Hkv, Dv).
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) cumulative lengths from 0 (ending at total_q /
            total_k), on the query's device.
        max_seqlen_q, max_seqlen_k: at least the longest query / key sequence; None computes them
            from cu_seqlens (a read of tensor data: under torch.compile give them as ints). They
            set the dropout counters' padded layout.
        dropout_p: dropout probability on the attention weights, in [0, 1].
        is_causal: per sequence, top-left aligned as sdpa's (query i sees keys j <= i).
        scale: score scale, default ``1 / sqrt(D)``.
        enable_gqa: Hq may be a multiple of Hkv (grouped-query attention).
        window_size: (left, right): query i of a sequence sees its keys d - left <= j <= d +
            right, d = i when causal, i + Lk_b - Lq_b otherwise; -1 = unbounded.
        softcap: scores s -> softcap * tanh(s / softcap) after scaling, before masks (0 = off).
        sinks: (Hq,) one logit per head in every row's softmax denominator, with no value
            (differentiable).
        alibi_slopes: (Hq,) or (B, Hq) (row b for sequence b): scores -= slope * |i + Lk_b -
            Lq_b - j|; constants (no gradient).
        backend: None (best for the device; env PYATTN_BACKEND overrides), "cpu", "cuda",
            "triton" or "reference". Every backend fuses the variants.
    Returns:
        (total_q, Hq, Dv).
    """
    query, key, value = autocast(query, key, value)
    max_q, max_k = check_inputs(
        query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal,
        scale, enable_gqa,
    )  # fmt: skip
    var = check_variants(
        OP, window_size, softcap, sinks, alibi_slopes, query, query.shape[1], cu_seqlens_q.shape[0] - 1
    )
    causal = CAUSAL_UPPER_LEFT if is_causal else CAUSAL_NONE
    return _varlen(
        query, key, value, cu_seqlens_q, cu_seqlens_k, max_q, max_k, float(dropout_p), causal, scale, backend,
        var,
    )  # fmt: skip


def _varlen(query, key, value, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, backend, var=NO_VARIANTS):
    """The validated call, with sdpa's ``causal`` code (0 none, 1 upper-left, 2 lower-right per
    sequence)."""
    D, Dv = query.shape[2], value.shape[2]
    scale_f = default_scale(scale, D)
    dtype = query.dtype
    chosen = _OPS.resolve(backend, query.device, dtype, (D, Dv), var.on)
    # The reference on half CPU tensors runs in float32 and rounds once (a half score matrix
    # overflows); the cpu kernels take float16/bfloat16 themselves.
    if is_half_cpu(query) and chosen == "reference":
        out = _run(chosen, query.float(), key.float(), value.float(), cu_q, cu_k, max_q, max_k, dropout_p,
                   causal, scale_f, var)  # fmt: skip
        return out.to(dtype)
    return _run(chosen, query, key, value, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale_f, var)


def _run(chosen, query, key, value, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, var: Variants):
    empty = query.shape[0] * query.shape[1] * key.shape[0] * query.shape[2] * value.shape[2] == 0
    if chosen == "reference" or dropout_p >= 1.0 or (empty and not _compiling()):
        keep = None
        if 0.0 < dropout_p < 1.0:
            seed, offset = dropout_seed_offset()
            shape = (cu_q.shape[0] - 1, query.shape[1], max_q, max_k)
            keep = dropout_keep_mask(seed, offset, shape, dropout_p, query.device)
        return reference.varlen_attention(
            query, key, value, cu_q, cu_k, max_q, max_k, dropout_p=dropout_p, is_causal=causal, scale=scale,
            enable_gqa=True, dropout_mask=keep, window_size=(var.left, var.right), softcap=var.softcap,
            sinks=var.sinks, alibi_slopes=var.alibi_slopes,
        )  # fmt: skip
    seed, offset = dropout_seed_offset() if dropout_p > 0.0 else (0, 0)
    fwd = _OPS.forward_op(chosen)
    if not var.on:
        # the ops' schema defaults: a call without variants is the ops' old call
        out, _lse = fwd(query, key, value, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, seed, offset)
        return out
    out, _lse = fwd(
        query, key, value, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, seed, offset, *var
    )  # fmt: skip
    return out
