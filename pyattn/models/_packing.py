"""Padding-free model runs: unpad a batch once, run every layer on the real tokens, pad back.

A padded batch (B, L, ...) with a keep mask (B, L) (True = real token) becomes ``T`` packed rows
(T, ...) in batch-major order, plus where each sequence lies: the tokens of sequence b are rows
``cu_seqlens[b]:cu_seqlens[b + 1]``. Linear layers, LayerNorm and the feed-forward act row by
row, so they run on the packed rows unchanged; attention runs through varlen attention, which
keeps each sequence to itself. Packing preserves token order, so a per-sequence causal mask on
the packed rows is exactly the padded causal mask plus the key padding, whatever the padding
pattern (right, left or holes). docs/design.md ("Padding-free models") has the whole path.

``max_seqlen`` is the padded length L, not the longest real sequence: it is an upper bound the
kernels accept, needs no host sync, and makes attention dropout draw the same mask as the padded
path (varlen dropout is sdpa's on the (B, H, max_seqlen_q, max_seqlen_k) batch).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn.multihead_attention import MultiheadAttention, _sdpa_backend
from ..ops.varlen_attention import varlen_attention


class PackedSeqs(NamedTuple):
    """Where each of B sequences lies in a packed batch.

    ``cu_seqlens``: int32 (B + 1,), cumulative lengths from 0; ``max_seqlen``: an upper bound of
    the lengths (a Python int)."""

    cu_seqlens: Tensor
    max_seqlen: int


class Packing(NamedTuple):
    """A padded batch's real tokens: ``indices`` (T,) int64 into the flattened (B * L) positions,
    ``seqs`` their PackedSeqs, and the padded shape (B, L)."""

    indices: Tensor
    seqs: PackedSeqs
    batch: int
    length: int


def packing(keep: Tensor) -> Packing:
    """The Packing of a (B, L) bool mask, True = real token (a host sync: the token count)."""
    B, L = keep.shape
    indices = keep.reshape(-1).nonzero().reshape(-1)  # (T,)
    lengths = keep.sum(dim=1, dtype=torch.int32)  # (B,)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))  # (B + 1,)
    return Packing(indices, PackedSeqs(cu, L), B, L)


def unpad(x: Tensor, p: Packing) -> Tensor:
    """(B, L, ...) -> (T, ...): the real tokens, in batch-major order."""
    return x.reshape(p.batch * p.length, *x.shape[2:])[p.indices]  # (T, ...)


def pad(x: Tensor, p: Packing) -> Tensor:
    """(T, ...) -> (B, L, ...), zeros at the padding positions."""
    out = x.new_zeros((p.batch * p.length, *x.shape[1:])).index_copy(0, p.indices, x)  # (B*L, ...)
    return out.view(p.batch, p.length, *x.shape[1:])  # (B, L, ...)


def positions(seqs: PackedSeqs, total: int) -> Tensor:
    """Each packed token's position within its sequence, (total,) int64 (traces under compile)."""
    cu = seqs.cu_seqlens.long()
    tok = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:], tok, right=True)  # (total,)
    return tok - cu[seq.clamp(max=max(cu.numel() - 2, 0))]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seqs_q: PackedSeqs,
    seqs_k: PackedSeqs,
    *,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    attn_backend: str,
) -> Tensor:
    """Varlen attention on (T, H, D) packed heads, on the models' ``attn_backend``."""
    return varlen_attention(
        q,
        k,
        v,
        seqs_q.cu_seqlens,
        seqs_k.cu_seqlens,
        seqs_q.max_seqlen,
        seqs_k.max_seqlen,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        backend=_sdpa_backend(attn_backend),
    )


def mha_packed(
    mha: MultiheadAttention,
    x: Tensor,
    mem: Tensor | None,
    seqs_q: PackedSeqs,
    seqs_k: PackedSeqs,
    is_causal: bool = False,
) -> Tensor:
    """``pyattn.nn.MultiheadAttention`` on packed rows: self-attention over ``x`` (T, E), or
    attention of ``x`` over ``mem`` (S, E) (cross-attention); returns (T, E). The module's
    weights and dropout; no bias_k/bias_v or zero attention (the Transformer never builds them)."""
    H, D, E = mha.num_heads, mha.head_dim, mha.embed_dim
    src = x if mem is None else mem
    q, k, v = mha._in_projection(x, src, src)  # (T, E), (S, E), (S, E)
    out = attention(
        q.view(-1, H, D),  # (T, H, D)
        k.view(-1, H, D),  # (S, H, D)
        v.view(-1, H, D),  # (S, H, D)
        seqs_q,
        seqs_k,
        dropout_p=mha.dropout if mha.training else 0.0,
        is_causal=is_causal,
        scale=None,
        attn_backend=mha.attn_backend,
    )  # (T, H, D)
    return mha.out_proj(out.reshape(-1, E))  # (T, E)
