"""pyattn.scaled_dot_product_attention: fused multi-head attention as a PyTorch custom op with
autograd, with the semantics of ``torch.nn.functional.scaled_dot_product_attention``.

    S = scale * Q K^T + mask,   P = softmax(S),   O = dropout(P) V

The fused kernels (C++ for CPU, CUDA C++, Triton) tile queries x keys with an online softmax and
never store S beyond a block; the forward saves the row log-sum-exp and the backward recomputes
P from it (flash-attention). Ops (schemas and conventions in csrc/registration.cpp), on
canonical 4-D (B, H, L, D) tensors:

    pyattn::sdpa_fwd(query, key, value, attn_mask, dropout_p, causal, scale,
        seed, offset) -> (out, lse)
    pyattn::sdpa_bwd(grad_out, query, key, value, attn_mask, out, lse, dropout_p,
        causal, scale, seed, offset) -> (grad_query, grad_key, grad_value)

where ``causal`` is 0 (none), 1 (upper-left, torch's is_causal=True) or 2 (lower-right, the
diagonal ending at the last key: flash-attention's causal when Lq != Lk)

and their Triton twins ``*_triton`` (kernels/sdpa.py). This module gives them fake
(meta) implementations and autograd, validates inputs once for every backend, broadcasts and
flattens torch's (..., H, L, E) inputs to the canonical form, and picks the backend.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.attention.bias import CausalBias, CausalVariant

from .. import reference
from ._common import (
    CAUSAL_LOWER_RIGHT,
    CAUSAL_NONE,
    CAUSAL_UPPER_LEFT,
    NO_VARIANTS,
    Variants,
    autocast,
    check_dropout,
    check_scale,
    check_variants,
    default_scale,
    dropout_keep_mask,
    dropout_seed_offset,
    fail,
    is_half_cpu,
    known_true,
    lse_dtype,
    number,
    sink_grad,
)
from ._glue import FusedOp, shape_str
from ._nested import nested_sdpa
from .errors import InputError, InputIndexError, InputTypeError

OP = "sdpa"

# -- input validation (one function, every backend) --------------------------------------------


def _fail(msg: str, cls: type[InputError] = InputError):
    fail("scaled_dot_product_attention", msg, cls)


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
        _fail(f"the {name} of query, key and value must be broadcastable, got {desc}")


class Plan(NamedTuple):
    """What check_inputs found: how the call broadcasts and which mask it carries.

    ``lead``: the broadcast dims before the head dim; ``Hq`` / ``Hkv``: query and key/value head
    counts; ``gqa``: the kernel runs grouped-query attention (Hq != Hkv); ``out_batch``: the
    output's dims before (Lq, Dv); ``causal``: CAUSAL_NONE / _UPPER_LEFT / _LOWER_RIGHT;
    ``attn_mask``: the mask tensor to apply (None for none, or when a CausalBias became
    ``causal``)."""

    lead: tuple[int, ...]
    Hq: int
    Hkv: int
    gqa: bool
    out_batch: tuple[int, ...]
    causal: int
    attn_mask: Tensor | None


def _causal_bias(attn_mask, is_causal: bool, Lq: int, Lk: int) -> tuple[int, Tensor | None]:
    """(causal, mask) for a torch CausalBias, with torch's choices: upper-left, or any bias whose
    own lengths are equal, is torch's is_causal=True (whatever the inputs' lengths); lower-right
    is the fused offset diagonal when its lengths are the inputs', else torch materialises it
    and broadcasts (so must we)."""
    if is_causal:
        _fail(
            f"a CausalBias attn_mask cannot be used with is_causal=True (torch: CausalBias should not "
            f"be used with causal=True), got {attn_mask.variant.name} ({attn_mask.seq_len_q}, "
            f"{attn_mask.seq_len_kv}) and is_causal=True"
        )
    sq, skv = attn_mask.seq_len_q, attn_mask.seq_len_kv
    if sq == skv or attn_mask.variant == CausalVariant.UPPER_LEFT:
        return CAUSAL_UPPER_LEFT, None
    if attn_mask.variant != CausalVariant.LOWER_RIGHT:
        _fail(f"CausalBias.variant must be a CausalVariant, got {attn_mask.variant!r}")
    if (sq, skv) == (Lq, Lk):
        return CAUSAL_LOWER_RIGHT, None
    # (sq, skv) bool (True = attend), as CausalBias._materialize builds it
    return CAUSAL_NONE, torch.ones(sq, skv, dtype=torch.bool).tril(diagonal=skv - sq)


def check_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> Plan:
    """Raise an InputError (a ValueError and a RuntimeError; InputTypeError also a TypeError)
    naming the argument, what was expected and what came, wherever torch raises; else the Plan.
    """
    named = {"query": query, "key": key, "value": value}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            _fail(f"'{name}' must be a torch.Tensor, got {type(t).__name__}", InputTypeError)
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        _fail(f"'attn_mask' must be a tensor or None, got {type(attn_mask).__name__}", InputTypeError)
    if not isinstance(is_causal, bool):
        _fail(f"'is_causal' must be a bool, got {type(is_causal).__name__}", InputTypeError)
    # its type now, its range where torch checks it (after the dims: enable_gqa on 2-D inputs is
    # an IndexError first)
    dropout_p = number("scaled_dot_product_attention", "dropout_p", dropout_p)
    check_scale("scaled_dot_product_attention", scale)
    bias = isinstance(attn_mask, CausalBias)
    if bias and is_causal:
        _fail(
            f"a CausalBias attn_mask cannot be used with is_causal=True (torch: CausalBias should not "
            f"be used with causal=True), got {attn_mask.variant.name} ({attn_mask.seq_len_q}, "
            f"{attn_mask.seq_len_kv}) and is_causal=True"
        )
    for t in named.values():
        if t.dtype != query.dtype:
            _fail(
                f"query, key and value must share one dtype, got query {query.dtype}, key "
                f"{key.dtype}, value {value.dtype}",
                InputTypeError,
            )
        if t.device != query.device:
            _fail(
                f"query, key and value must be on one device, got query on {query.device}, key on "
                f"{key.device}, value on {value.device}"
            )
    if attn_mask is not None and not bias:
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            _fail(
                f"'attn_mask' must be bool (True = attend), float32 or of query's dtype {query.dtype}, "
                f"got {attn_mask.dtype}",
                InputTypeError,
            )
        if attn_mask.device != query.device:
            _fail(f"'attn_mask' is on {attn_mask.device} but query is on {query.device}")
    for name, t in named.items():
        if t.dim() < 2:
            _fail(
                f"query, key and value must have at least 2 dims (..., L, E), got '{name}' "
                f"{t.dim()}-D {shape_str(t)}"
            )
    if attn_mask is not None and is_causal:
        _fail(
            f"'attn_mask' and 'is_causal' cannot both be set (torch: Explicit attn_mask should not be "
            f"set when is_causal=True; fold the causal mask into attn_mask), got attn_mask "
            f"{shape_str(attn_mask)} and is_causal=True"
        )
    if enable_gqa and not all(t.dim() >= 3 for t in named.values()):
        _fail(
            f"with enable_gqa, query, key and value need a head dim (at least 3-D), got query "
            f"{shape_str(query)}, key {shape_str(key)}, value {shape_str(value)}",
            InputIndexError,
        )
    if not query.is_floating_point():
        _fail(f"query, key and value must be floating-point tensors, got {query.dtype}", InputTypeError)
    check_dropout("scaled_dot_product_attention", dropout_p)
    Lq, E, Lk = query.shape[-2], query.shape[-1], key.shape[-2]
    if key.shape[-1] != E:
        _fail(
            f"'key' head dim must match query's E={E}, got key {shape_str(key)} and query {shape_str(query)}"
        )
    if value.shape[-2] != Lk:
        _fail(
            f"'value' length must match key's Lk={Lk}, got value {shape_str(value)} and key {shape_str(key)}"
        )

    # Heads (dim -3) and the leading dims before them. With enable_gqa and differing head counts
    # the heads stay apart (the kernel maps query head h to kv head h // (Hq // Hkv)); otherwise
    # every dim before (L, E) broadcasts, as torch's matmuls do.
    gqa = bool(enable_gqa) and (query.shape[-3] != key.shape[-3] or query.shape[-3] != value.shape[-3])
    if gqa:
        Hq, Hkv, Hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if Hkv == 0 or Hv == 0 or Hq % Hkv != 0 or Hq % Hv != 0:
            _fail(
                f"with enable_gqa, key and value heads must divide query's: got query "
                f"{shape_str(query)}, key {shape_str(key)}, value {shape_str(value)}"
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
    causal = CAUSAL_UPPER_LEFT if is_causal else CAUSAL_NONE
    if bias:
        causal, attn_mask = _causal_bias(attn_mask, is_causal, Lq, Lk)
        if attn_mask is not None:
            attn_mask = attn_mask.to(query.device)
    out_batch = (*lead, Hq) if gqa or len(batch) else ()
    if attn_mask is not None:
        # added to the scores in place, as torch's: it broadcasts to them, never beyond. The
        # scores are query @ key^T: their batch dims are query's and key's (value's may add more
        # to the output, not to the scores)
        if gqa:
            score_batch = (*_broadcast_shapes(tuple(query.shape[:-3]), tuple(key.shape[:-3])), Hq)
        else:
            score_batch = _broadcast_shapes(tuple(query.shape[:-2]), tuple(key.shape[:-2]))
        target = (*score_batch, Lq, Lk)
        try:
            ok = _broadcast_shapes(tuple(attn_mask.shape), target) == target
        except RuntimeError:
            ok = False
        if not ok:
            _fail(
                f"'attn_mask' must be broadcastable to the scores (..., Hq, Lq, Lk) = {target}, got "
                f"{shape_str(attn_mask)}"
            )
    return Plan(lead, Hq, Hkv, gqa, out_batch, causal, attn_mask)


# -- fake (meta) implementations and autograd, shared by the C++ op and its Triton twin ----------


def _fake_fwd(query, key, value, attn_mask, dropout_p, causal, scale, seed, offset, window_left=-1,
              window_right=-1, softcap=0.0, sinks=None, alibi_slopes=None):  # fmt: skip
    B, Hq, Lq, _ = query.shape
    out = query.new_empty((B, Hq, Lq, value.shape[-1]))
    lse = query.new_empty((B, Hq, Lq), dtype=lse_dtype(query.dtype))
    return out, lse


def _fake_bwd(grad_out, query, key, value, attn_mask, out, lse, dropout_p, causal, scale, seed, offset,
              window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None):  # fmt: skip
    return (
        torch.empty_like(query, memory_format=torch.contiguous_format),
        torch.empty_like(key, memory_format=torch.contiguous_format),
        torch.empty_like(value, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, causal, scale, seed, offset, *variants = inputs
    left, right, softcap, sinks, alibi = (*variants, *NO_VARIANTS[len(variants) :])
    out, lse = output
    ctx.args = (dropout_p, causal, scale, seed, offset, left, right, softcap)
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(query, key, value, attn_mask, out, lse, sinks, alibi)


def _make_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        query, key, value, attn_mask, out, lse, sinks, alibi = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = [None] * ctx.n_inputs
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if any(needs[:3]):
            dq, dk, dv = bwd_op(
                grad_out.contiguous(), query, key, value, attn_mask, out, lse, *ctx.args, alibi
            )  # fmt: skip
            grads[:3] = [dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None]
        if sinks is not None and needs[12]:
            grads[12] = sink_grad(sinks, lse, grad_out, out, 1)  # lse (B, Hq, Lq) includes the sink
        return tuple(grads)

    return backward


_OPS = FusedOp(
    OP,
    public="scaled_dot_product_attention",
    fake_fwd=_fake_fwd,
    fake_bwd=_fake_bwd,
    setup_context=_setup_context,
    make_backward=_make_backward,
)
_OPS.load()


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
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``, fused.

    ``softmax(query key^T * scale + mask) value`` with dropout on the weights. Leading dims
    broadcast as in torch; bad inputs raise where torch raises, as an InputError that is an
    instance of torch's exception class (pyattn/ops/errors.py). Differences from torch (README,
    "Behaviour"): a query row whose keys are all masked gets zeros (and zero gradients), always;
    dropout draws its mask from a counter-based generator (philox) seeded from torch's default
    generator, so ``torch.manual_seed`` reproduces it but the mask differs from torch's. A float
    ``attn_mask`` that requires grad is computed through pyattn.reference (naive, materialised
    scores) so that its gradient is right; so are empty inputs, ``dropout_p=1`` and every call
    with ``backend="reference"``. float16/bfloat16 CPU tensors run the cpu kernel's half path:
    float32 scores, statistics and sums, each output rounded once (docs/design.md, "Half
    precision on CPU").

    Arguments:
        query: (..., Hq, Lq, E).
        key: (..., Hkv, Lk, E).
        value: (..., Hkv, Lk, Dv).
        attn_mask: bool (True = attend), float32 or of query's dtype (added to the scores),
            broadcastable to (..., Hq, Lq, Lk); or a ``torch.nn.attention.bias.CausalBias``
            (``causal_upper_left`` / ``causal_lower_right``), run as the fused causal mask.
            Not together with ``is_causal``.
        dropout_p: dropout probability on the attention weights, in [0, 1].
        is_causal: top-left aligned causal mask (query i sees keys j <= i), as torch.
        scale: score scale (any sign), default ``1 / sqrt(E)``.
        enable_gqa: Hq may be a multiple of Hkv (grouped-query attention).
        window_size: (left, right): query i sees keys d - left <= j <= d + right, where d = i
            with ``is_causal`` / an upper-left CausalBias and d = i + Lk - Lq otherwise; -1 =
            unbounded (docs/design.md, "Attention variants").
        softcap: scores s -> softcap * tanh(s / softcap) after scaling, before masks (0 = off).
        sinks: (Hq,): one logit per head that joins each row's softmax denominator and carries
            no value (differentiable); a row whose keys are all masked gives zeros.
        alibi_slopes: (Hq,), or (B, Hq) for 4-D inputs: scores -= slope * |i + Lk - Lq - j|;
            constants (no gradient).
        backend: None (best for the device; env PYATTN_BACKEND overrides), "cpu", "cuda",
            "triton" or "reference". Every backend fuses the variants.
    Returns:
        (..., Hq, Lq, Dv).

    Jagged nested tensors (``layout=torch.jagged``, (B, H, j, D) as torch takes them) run as
    packed sequences through varlen attention and return nested, as torch (pyattn/ops/_nested.py).
    """
    var = NO_VARIANTS
    if window_size != (-1, -1) or softcap != 0.0 or sinks is not None or alibi_slopes is not None:
        var = _check_variants(query, window_size, softcap, sinks, alibi_slopes)
    if any(isinstance(t, Tensor) and t.is_nested for t in (query, key, value)):
        if var.on:
            _fail("the attention variants (window_size, softcap, sinks, alibi_slopes) take dense tensors")
        return nested_sdpa(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend,
            dense=scaled_dot_product_attention,
        )  # fmt: skip
    query, key, value, attn_mask = autocast(query, key, value, attn_mask)
    lead, Hq, Hkv, _gqa, out_batch, causal, mask = check_inputs(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
    )
    if var.on:
        var = check_variants(
            "scaled_dot_product_attention", window_size, softcap, sinks, alibi_slopes, query, Hq,
            lead[0] if len(lead) == 1 else None,
        )  # fmt: skip
    dropout_p = float(dropout_p)
    if _gqa and key.shape[-3] != value.shape[-3]:
        # key and value grouped differently (as torch allows): each repeated to the query heads
        key = key.repeat_interleave(Hq // key.shape[-3], dim=-3)
        value = value.repeat_interleave(Hq // value.shape[-3], dim=-3)
        Hkv = Hq
    E, Dv = query.shape[-1], value.shape[-1]
    scale_f = default_scale(scale, E)
    dtype = query.dtype
    half_cpu = is_half_cpu(query)
    chosen = _OPS.resolve(backend, query.device, dtype, (E, Dv), var.on)
    float_mask_grad = mask is not None and mask.dtype != torch.bool and mask.requires_grad
    if half_cpu and (chosen == "reference" or float_mask_grad):
        # The naive graph (which these calls take) in float32, rounded once: a half score matrix
        # overflows to NaN and doubles the error. The cpu kernel takes half inputs itself.
        up = [t.float() for t in (query, key, value)]
        fmask = None if mask is None or mask.dtype == torch.bool else mask.float()
        out = _run(chosen, *up, fmask if fmask is not None else mask, dropout_p, causal, scale_f,
                   enable_gqa, lead, Hq, Hkv, out_batch, var)  # fmt: skip
        return out.to(dtype)
    return _run(
        chosen, query, key, value, mask, dropout_p, causal, scale_f, enable_gqa, lead, Hq, Hkv, out_batch, var
    )


def _check_variants(query, window_size, softcap, sinks, alibi_slopes) -> Variants:
    """The variants' own checks before the inputs' (which need them as plain values); the shapes
    against the heads are checked after check_inputs."""
    name = "scaled_dot_product_attention"
    if (sinks is not None or alibi_slopes is not None) and isinstance(query, Tensor) and query.dim() < 3:
        _fail(
            f"'sinks' and 'alibi_slopes' need a head dim: query must be (..., Hq, Lq, E), got {shape_str(query)}"
        )
    v = check_variants(name, window_size, softcap, None, None, query, 0, None)
    return v._replace(sinks=sinks, alibi_slopes=alibi_slopes)


def _run(chosen, query, key, value, mask, dropout_p, causal, scale, enable_gqa, lead, Hq, Hkv, out_batch,
         var: Variants = NO_VARIANTS):  # fmt: skip
    """The validated call on backend ``chosen``."""
    Lq, E, Lk, Dv = query.shape[-2], query.shape[-1], key.shape[-2], value.shape[-1]
    B = math.prod(lead)
    empty = known_true(B * Hq * Lq * Lk * E * Dv == 0)
    float_mask_grad = mask is not None and mask.dtype != torch.bool and mask.requires_grad
    if chosen == "reference" or float_mask_grad or empty or dropout_p >= 1.0:
        if 0.0 < dropout_p < 1.0:
            return _reference_with_fused_dropout(
                query, key, value, mask, dropout_p, causal, scale, enable_gqa, lead, Hq, var
            )
        return reference.scaled_dot_product_attention(
            query, key, value, mask, dropout_p, causal, scale, enable_gqa, **_ref_variants(var)
        )

    q = query.expand(*lead, Hq, Lq, E).reshape(B, Hq, Lq, E)  # (B, Hq, Lq, E)
    k = key.expand(*lead, Hkv, Lk, E).reshape(B, Hkv, Lk, E)  # (B, Hkv, Lk, E)
    v = value.expand(*lead, Hkv, Lk, Dv).reshape(B, Hkv, Lk, Dv)  # (B, Hkv, Lk, Dv)
    if _decode_step(chosen, q, k, v, mask, dropout_p, causal, var):
        # a short query over a long key: the split-K decoding kernel (docs/design.md, "KV-cache
        # attention"), the key/value as a full cache with nothing to append; its window diagonal
        # is the lower-right one, as sdpa's without upper-left causality
        lens = torch.full((B,), Lk, dtype=torch.int32)
        alibi = var.alibi_slopes
        if alibi is not None and alibi.dim() == 2:
            alibi = alibi.expand(B, Hq)
        out, _lse = torch.ops.pyattn.kvcache_attention_fwd(
            q, k, v, lens, None, None, None, var.sinks, alibi, causal == CAUSAL_LOWER_RIGHT, scale,
            var.left, var.right, var.softcap, 0,
        )  # fmt: skip
        return out.reshape(*out_batch, Lq, Dv)  # (..., Hq, Lq, Dv)
    m4 = None
    if mask is not None:
        half_cpu = chosen == "cpu" and query.dtype in (torch.float16, torch.bfloat16)
        if mask.dtype != torch.bool and mask.dtype != query.dtype and chosen != "triton" and not half_cpu:
            # a float32 mask beside a float64 (exact) or half (CUDA) query; the Triton kernels
            # and the cpu kernel's half path read a float32 mask as it is
            mask = _cast_mask(mask, query.dtype)
        # stays a stride-0 view where it broadcasts: the kernels read it through its strides
        m4 = mask.expand(*lead, Hq, Lq, Lk).reshape(B, Hq, Lq, Lk)  # (B, Hq, Lq, Lk)
    seed, offset = dropout_seed_offset() if dropout_p > 0.0 else (0, 0)
    fwd = _OPS.forward_op(chosen)
    if not var.on:
        # the ops' schema defaults: a call without variants is the ops' old call
        out, _lse = fwd(q, k, v, m4, dropout_p, causal, scale, seed, offset)
    else:
        alibi = var.alibi_slopes
        if alibi is not None and alibi.dim() == 2:
            alibi = alibi.reshape(B, Hq)  # (B, Hq) of the flattened batch
        out, _lse = fwd(
            q, k, v, m4, dropout_p, causal, scale, seed, offset, var.left, var.right, var.softcap, var.sinks,
            alibi,
        )  # fmt: skip
    return out.reshape(*out_batch, Lq, Dv)  # (..., Hq, Lq, Dv)


def _ref_variants(var: Variants) -> dict:
    """The variants as pyattn.reference's keyword arguments."""
    return {
        "window_size": (var.left, var.right),
        "softcap": var.softcap,
        "sinks": var.sinks,
        "alibi_slopes": var.alibi_slopes,
    }


# Query rows per kv head (Hq / Hkv x Lq) up to which, and keys from which, a CPU call runs the
# KV-cache kernel: a decode step, where the prefill kernel's 64-row query tiles are mostly empty
# and it reads K/V once per query head. Placed by the sweep of bench/bench_kvcache_attention.py
# (--sweep; docs/design.md, "KV-cache attention"): on AVX512-BF16, fp32 and bf16, 1 and 2
# threads, the route gains most for rows <= 16 from the shortest key length swept (32) up; at
# 32+ rows the prefill kernel's GEMMs win.
DECODE_MAX_ROWS = 16
DECODE_MIN_KEYS = 32


def _decode_step(chosen, q, k, v, mask, dropout_p, causal, var: Variants = NO_VARIANTS) -> bool:
    """True for a CPU inference call (no mask, no dropout, no causality or lower-right, nothing
    requiring grad, eager) with a short query over a long key."""
    if chosen != "cpu" or mask is not None or dropout_p != 0.0 or causal == CAUSAL_UPPER_LEFT:
        return False
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if not known_true(Hkv > 0):
        return False
    if not known_true((Hq // Hkv) * Lq <= DECODE_MAX_ROWS) or not known_true(Lk >= DECODE_MIN_KEYS):
        return False
    if not known_true(B * Hq * Lq > 0):
        return False
    sinks_grad = var.sinks is not None and var.sinks.requires_grad
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or sinks_grad):
        return False
    # the kernel reads rows in place (a contiguous last dim); under torch.compile its declared
    # cache mutation would cost a copy of K and V
    return k.stride(-1) == 1 and v.stride(-1) == 1 and not torch.compiler.is_compiling()


def _cast_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """An additive mask in ``dtype``, finite values clamped to its range so that a large finite
    bias cannot turn into +-inf (and a +inf into NaN) on the way."""
    info = torch.finfo(dtype)
    if torch.finfo(mask.dtype).max > info.max:
        mask = torch.where(mask.isinf(), mask, mask.clamp(-info.max, info.max))
    return mask.to(dtype)


def _reference_with_fused_dropout(
    query, key, value, attn_mask, dropout_p, causal, scale, enable_gqa, lead, Hq, var=NO_VARIANTS
):
    """The reference path with the same philox keep-mask the fused kernels would draw."""
    seed, offset = dropout_seed_offset()
    B = math.prod(lead)
    shape = (B, Hq, query.shape[-2], key.shape[-2])
    keep = dropout_keep_mask(seed, offset, shape, dropout_p, query.device)
    keep = keep.reshape(*lead, *shape[1:])
    return reference.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, causal, scale, enable_gqa, dropout_mask=keep,
        **_ref_variants(var),
    )  # fmt: skip
