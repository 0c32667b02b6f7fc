"""A stand-in for ``pyattn.varlen_attention`` built from differentiable torch ops (private).

It has the public op's signature and semantics: packed sequences ``query (total_q, Hq, D)``,
``key``/``value (total_k, Hkv, D)``, ``cu_seqlens_*`` int32 ``(B + 1,)``; each sequence attends
only within itself, ``is_causal`` per sequence with upper-left alignment (query i sees keys
j <= i, as sdpa's), a query row with no key gives zeros. It scatters the tokens into a padded
``(B, H, max_seqlen, D)`` batch, runs ``pyattn.scaled_dot_product_attention`` with a key-padding
(and per-sequence causal) bool mask and gathers the real rows back, so dropout draws are sdpa's on
the padded batch ``(B, Hq, max_seqlen_q, max_seqlen_k)``. Every step traces under
``torch.compile`` when the max_seqlen are given as ints.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops.errors import InputError, InputTypeError
from .ops.sdpa import scaled_dot_product_attention


def _fail(msg: str, cls: type[InputError] = InputError):
    raise cls(f"varlen_attention: {msg}")


def _check_cu(name: str, cu: Tensor, total: int, device) -> None:
    if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        got = f"{cu.dtype} {tuple(cu.shape)}" if isinstance(cu, Tensor) else type(cu).__name__
        _fail(f"'{name}' must be a 1-D int32 tensor (B + 1,), got {got}", InputTypeError)
    if cu.device != device:
        _fail(f"'{name}' is on {cu.device} but query is on {device}")


def _layout(cu: Tensor, total: int, max_seqlen: int | None) -> tuple[Tensor, Tensor, int]:
    """(lengths (B,) int64, padded row of each packed token (total,) int64, max_seqlen)."""
    cu = cu.long()
    lengths = cu[1:] - cu[:-1]  # (B,)
    if max_seqlen is None:
        max_seqlen = int(lengths.max()) if lengths.numel() else 0
    tok = torch.arange(total, device=cu.device)
    # sequence of each token: the number of sequence ends at or before it (zero-length ones too)
    seq = torch.searchsorted(cu[1:], tok, right=True)  # (total,)
    row = seq * max_seqlen + (tok - cu[seq.clamp(max=max(cu.numel() - 2, 0))])  # (total,)
    return lengths, row, int(max_seqlen)


def _to_padded(x: Tensor, row: Tensor, B: int, L: int) -> Tensor:
    padded = x.new_zeros((B * L, *x.shape[1:])).index_copy(0, row, x)  # (B*L, H, D)
    return padded.view(B, L, *x.shape[1:]).transpose(1, 2)  # (B, H, L, D)


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
    backend: str | None = None,
) -> Tensor:
    """Attention within each of B packed sequences.

    Arguments:
        query: (total_q, Hq, D); key: (total_k, Hkv, D); value: (total_k, Hkv, Dv).
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,), cumulative lengths from 0.
        max_seqlen_q, max_seqlen_k: upper bounds of the lengths (None: computed, a host sync).
        dropout_p, is_causal, scale, enable_gqa, backend: as pyattn.scaled_dot_product_attention.
    Returns:
        (total_q, Hq, Dv).
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            got = f"{t.dim()}-D {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            _fail(f"'{name}' must be 3-D (total, heads, head_dim), got {got}")
    _check_cu("cu_seqlens_q", cu_seqlens_q, query.shape[0], query.device)
    _check_cu("cu_seqlens_k", cu_seqlens_k, key.shape[0], query.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        _fail(
            f"cu_seqlens_q and cu_seqlens_k must have the same length B + 1, got "
            f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}"
        )
    B = cu_seqlens_q.numel() - 1
    Hq, Dv = query.shape[1], value.shape[2]
    _, row_q, Lq = _layout(cu_seqlens_q, query.shape[0], max_seqlen_q)
    len_k, row_k, Lk = _layout(cu_seqlens_k, key.shape[0], max_seqlen_k)
    q = _to_padded(query, row_q, B, Lq)  # (B, Hq, Lq, D)
    k = _to_padded(key, row_k, B, Lk)  # (B, Hkv, Lk, D)
    v = _to_padded(value, row_k, B, Lk)  # (B, Hkv, Lk, Dv)
    j = torch.arange(Lk, device=query.device)
    allowed = (j[None, :] < len_k[:, None])[:, None, None, :]  # (B, 1, 1, Lk)
    if is_causal:
        i = torch.arange(Lq, device=query.device)
        allowed = allowed & (j[None, :] <= i[:, None])  # (B, 1, Lq, Lk)
    out = scaled_dot_product_attention(
        q, k, v, allowed, dropout_p, scale=scale, enable_gqa=enable_gqa, backend=backend
    )  # (B, Hq, Lq, Dv)
    return out.transpose(1, 2).reshape(B * Lq, Hq, Dv)[row_q]  # (total_q, Hq, Dv)
