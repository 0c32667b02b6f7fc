"""Jagged nested tensors in ``pyattn.scaled_dot_product_attention``, as torch takes them.

torch's layout: ``torch.nested.nested_tensor([...(L_b, H, D)], layout=torch.jagged)`` is
(B, j, H, D) with the ragged length j at dim 1; attention wants (B, H, j, D), its
``transpose(1, 2)``. Such q/k/v hold B sequences packed one after another (their ``values()``
are (total, H, D), their ``offsets()`` the cumulative lengths), which is varlen attention's
input: this module hands them to it and wraps its (total_q, H, Dv) result as the jagged nested
tensor torch returns ((B, H, j, Dv), ragged like the query, same offsets). No padded batch is
ever built. A nested tensor ragged at the head dim ((B, j, H, D) passed untransposed) is
attention over heads per token, dense: its values go through sdpa as a batch, as in torch.

What torch rejects is rejected here with an instance of torch's exception class (pyattn's
InputError is a ValueError and a RuntimeError): an ``attn_mask`` (the lengths are the mask),
a mix of nested and dense tensors, dtype/device mismatches, fewer than 3 dims, differing
ragged dims, batch, head or head-dim mismatches. Beyond torch's CPU path: ``is_causal`` (upper-left
within each sequence, sdpa's alignment; torch's CPU path refuses it), sequences with holes
(``lengths``: compacted first) and non-contiguous ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import fail
from .errors import InputTypeError
from .varlen_attention import varlen_attention


def _fail(msg: str, cls=None):
    fail("scaled_dot_product_attention", msg, *(() if cls is None else (cls,)))


def _check(query, key, value, attn_mask) -> None:
    """torch's checks of nested sdpa inputs (torch.nested._internal.sdpa), in pyattn's words."""
    named = {"query": query, "key": key, "value": value}
    if not all(isinstance(t, Tensor) and t.is_nested for t in named.values()):
        got = ", ".join(f"{n}.is_nested={isinstance(t, Tensor) and t.is_nested}" for n, t in named.items())
        _fail(f"query, key and value must all be nested tensors (as in torch) or none, got {got}")
    for name, t in named.items():
        if t.layout != torch.jagged:
            _fail(f"nested '{name}' must have layout=torch.jagged, got {t.layout}")
    if query.dtype != key.dtype or query.dtype != value.dtype:
        _fail(
            f"query, key and value must share one dtype, got query {query.dtype}, key {key.dtype}, "
            f"value {value.dtype}",
            InputTypeError,
        )
    if query.device != key.device or query.device != value.device:
        _fail(
            f"query, key and value must be on one device, got query on {query.device}, key on "
            f"{key.device}, value on {value.device}"
        )
    if min(t.dim() for t in named.values()) < 3:
        _fail(
            f"nested query, key and value must be at least 3-D, got {query.dim()}-D, {key.dim()}-D "
            f"and {value.dim()}-D"
        )
    ragged = [t._ragged_idx for t in named.values()]
    if len(set(ragged)) != 1:
        _fail(f"query, key and value must be ragged on the same dim, got dims {ragged}")
    if attn_mask is not None:
        _fail(
            "'attn_mask' cannot be used with nested query/key/value (torch: Nested tensors for query / "
            "key are not supported when an explicit attn_mask is set): the sequence lengths are the mask"
        )
    if not query.is_floating_point():
        _fail(f"query, key and value must be floating-point tensors, got {query.dtype}", InputTypeError)


def _packed(t: Tensor) -> tuple[Tensor, Tensor, Tensor, int | None]:
    """(B, H, j, D) jagged -> (its (B, j, H, D) view, values (total, H, D), int32 cu_seqlens,
    max length or None)."""
    t = t.transpose(1, 2) if t.dim() == 4 else t  # (B, j, H, D), or (B, j, D) with no head dim
    if t.lengths() is not None:
        t = t.contiguous()  # holes between the sequences: compacted, new offsets
    values = t.values()
    values = values.unsqueeze(1) if values.dim() == 2 else values  # (total, H, D)
    return t, values.contiguous(), t.offsets().to(torch.int32), t._maybe_max_seqlen


def nested_sdpa(
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend, *, dense
) -> Tensor:
    """``scaled_dot_product_attention`` on jagged nested q/k/v (module doc); returns nested.
    ``dense`` is the dense op (pyattn.scaled_dot_product_attention, passed in so that this
    module does not import it)."""
    _check(query, key, value, attn_mask)
    if query.dim() == 4 and query._ragged_idx == 1:
        # ragged at the head dim, (B, j, L, D): dense attention per token over L
        out = dense(
            query.values(), key.values(), value.values(), None, dropout_p, is_causal, scale,
            enable_gqa, backend=backend,
        )  # fmt: skip
        return torch.nested.nested_tensor_from_jagged(
            out, query.offsets(), query.lengths(), min_seqlen=query._maybe_min_seqlen,
            max_seqlen=query._maybe_max_seqlen,
        )  # fmt: skip
    if query._ragged_idx != query.dim() - 2:
        _fail(
            f"nested query, key and value must be ragged at the sequence dim (B, H, j, D), got "
            f"{query.dim()}-D ragged at dim {query._ragged_idx}"
        )
    if query.dim() != key.dim() or query.dim() != value.dim():
        _fail(f"query, key and value must have one rank, got {query.dim()}-D, {key.dim()}-D, {value.dim()}-D")
    B = query.shape[0]
    if key.shape[0] != B or value.shape[0] != B:
        _fail(f"query, key and value must have one batch size, got {B}, {key.shape[0]}, {value.shape[0]}")
    q_t, q, cu_q, max_q = _packed(query)
    _, k, cu_k, max_k = _packed(key)
    _, v, cu_v, _ = _packed(value)
    H = q.shape[1]
    if k.shape[1] != H or v.shape[1] != H:
        # torch's nested path has no grouped-query or broadcast heads
        _fail(
            f"nested query, key and value must have the same number of heads (no enable_gqa or "
            f"broadcasting with nested tensors, as in torch), got {H}, {k.shape[1]}, {v.shape[1]}"
        )
    if k.shape[2] != q.shape[2]:
        _fail(f"'key' head dim must match query's E={q.shape[2]}, got {k.shape[2]}")
    if k.shape[0] != v.shape[0] or (cu_k is not cu_v and not torch.equal(cu_k, cu_v)):
        _fail("nested 'key' and 'value' must have the same sequence lengths")
    out = varlen_attention(
        q, k, v, cu_q, cu_k, max_q, max_k,
        dropout_p=dropout_p, is_causal=is_causal, scale=scale, backend=backend,
    )  # (total_q, H, Dv)  # fmt: skip
    if query.dim() == 3:
        out = out.squeeze(1)  # (total_q, Dv)
    out = torch.nested.nested_tensor_from_jagged(
        out, q_t.offsets(), min_seqlen=q_t._maybe_min_seqlen, max_seqlen=q_t._maybe_max_seqlen
    )  # (B, j, H, Dv)
    return out.transpose(1, 2) if query.dim() == 4 else out  # (B, H, j, Dv)
