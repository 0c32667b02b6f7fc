"""Naive attention: the ground truth that every pyattn test and benchmark trusts.

Everything here is plain PyTorch that materialises the full score tensor, works in any floating
dtype (tests run it in float64), and is differentiable by autograd. It is deliberately simple:
no blocking, no online softmax, no fused anything.

Conventions shared with the fused ops:
- A query row with no key to attend to (every key masked) gives zeros, not NaN, and zero
  gradients. ``torch.nn.functional.scaled_dot_product_attention`` gives NaN there.
- ``key_padding_mask`` is True where a key is padding (ignored), as in
  ``torch.nn.MultiheadAttention``; a bool ``attn_mask`` is True where attention is allowed, as in
  ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "additive_attention",
    "additive_attention_scores",
    "masked_softmax",
    "scaled_dot_product_attention",
    "sdpa_scores",
    "sink_softmax",
    "varlen_attention",
    "kvcache_attention",
    "philox_uniform",
    "dropout_keep_mask",
]


def masked_softmax(scores: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Softmax over the last dim where rows with nothing allowed (or all -inf) become zeros.

    Arguments:
        scores: (..., Tk) float scores; -inf entries get weight 0.
        allowed: optional bool, broadcastable to ``scores``: False entries get weight 0.
    Returns:
        weights of the shape of ``scores``; a row without an attendable entry is all zeros.
    """
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if scores.shape[-1] == 0:  # no keys at all: every row is empty (amax needs a non-empty dim)
        return scores
    row_max = scores.amax(dim=-1, keepdim=True)
    # An all -inf row has max -inf; subtracting it would give NaN. Use 0 there: exp(-inf) = 0.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    return e / torch.where(denom > 0, denom, torch.ones_like(denom))


def additive_attention_scores(query: Tensor, key: Tensor, v: Tensor) -> Tensor:
    """``e_ij = v . tanh(q_i + k_j)`` with the (B, Tq, Tk, H) tanh tensor materialised.

    Arguments:
        query: (B, Tq, H), already projected (``W_s s``).
        key: (B, Tk, H), already projected (``W_h h``).
        v: (H,).
    Returns:
        scores (B, Tq, Tk).
    """
    t = torch.tanh(query[:, :, None, :] + key[:, None, :, :])  # (B, Tq, Tk, H)
    return t @ v


def additive_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    *,
    return_weights: bool = False,
):
    """Bahdanau (additive) attention, naive.

    Arguments:
        query: (B, Tq, H); key: (B, Tk, H); value: (B, Tk, Dv); v: (H,).
        key_padding_mask: optional (B, Tk) bool, True = padding (ignored).
        return_weights: also return the attention weights.
    Returns:
        context (B, Tq, Dv), and weights (B, Tq, Tk) when ``return_weights``.
    """
    scores = additive_attention_scores(query, key, v)  # (B, Tq, Tk)
    allowed = None if key_padding_mask is None else ~key_padding_mask[:, None, :]
    weights = masked_softmax(scores, allowed)
    context = weights @ value  # (B, Tq, Dv)
    return (context, weights) if return_weights else context


def sink_softmax(scores: Tensor, allowed: Tensor | None, sinks: Tensor) -> Tensor:
    """Softmax over the last dim with one extra logit per head (``sinks`` (Hq,), heads at dim
    -3) in the denominator and no value: the weights of the real keys, which sum to less than 1.
    A row with every key masked puts all its mass on the sink: zeros."""
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    sink = sinks.to(scores.dtype)[:, None, None].expand(*scores.shape[:-1], 1)  # (..., Hq, Lq, 1)
    w = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.nan_to_num(w, nan=0.0)  # a -inf sink over an empty row


def _causal_bias_mask(bias, device) -> Tensor:
    """A torch CausalBias as the bool (seq_len_q, seq_len_kv) mask it stands for."""
    from torch.nn.attention.bias import CausalVariant

    sq, skv = bias.seq_len_q, bias.seq_len_kv
    diagonal = skv - sq if bias.variant == CausalVariant.LOWER_RIGHT else 0
    return torch.ones(sq, skv, dtype=torch.bool, device=device).tril(diagonal=diagonal)


def sdpa_scores(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool | int = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Scaled, masked scores of scaled-dot-product attention, and where attention is allowed.

    ``is_causal``: False / 0 none, True / 1 upper-left (query i sees keys j <= i, torch's),
    2 lower-right (j <= i + Lk - Lq: the diagonal ends at the last key; the values of
    torch.nn.attention.bias.CausalVariant). A CausalBias ``attn_mask`` is its bool mask.

    The variants (docs/design.md, "Attention variants"), in this order: scale, then
    ``softcap`` (s -> softcap * tanh(s / softcap); 0 = off), then ALiBi (``alibi_slopes`` (Hq,)
    or (B, Hq) with 4-D inputs: s -= slope * |i + Lk - Lq - j|), then the masks: the window
    ``(left, right)`` around the diagonal d (d = i with upper-left causality, i + Lk - Lq
    otherwise; -1 = unbounded) allows d - left <= j <= d + right, then causality, then attn_mask.

    Returns ``(scores, allowed)``: scores (..., Hq, Lq, Lk) with float masks added, and a bool
    tensor broadcastable to them (or None) that is False where a bool mask, the window or
    causality forbids.
    """
    from torch.nn.attention.bias import CausalBias

    if isinstance(attn_mask, CausalBias):
        attn_mask = _causal_bias_mask(attn_mask, query.device)
    L, S, E = query.shape[-2], key.shape[-2], query.shape[-1]
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    if enable_gqa and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(rep, dim=-3)
    scores = (query @ key.transpose(-2, -1)) * scale  # (..., Hq, Lq, Lk)
    if softcap > 0.0:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(L, device=query.device)[:, None]  # (Lq, 1)
    j = torch.arange(S, device=query.device)[None, :]  # (1, Lk)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(scores.dtype)[..., None, None]  # (Hq, 1, 1) or (B, Hq, 1, 1)
        scores = scores - slopes * (i + S - L - j).abs().to(scores.dtype)
    allowed = None
    left, right = window_size
    if left >= 0 or right >= 0:
        d = i if int(is_causal) == 1 else i + S - L  # the window's diagonal
        allowed = torch.ones(L, S, dtype=torch.bool, device=query.device)
        if left >= 0:
            allowed = allowed & (j >= d - left)
        if right >= 0:
            allowed = allowed & (j <= d + right)
    if is_causal:
        # upper-left (torch's is_causal): j <= i; lower-right: j <= i + S - L
        diagonal = S - L if int(is_causal) == 2 else 0
        tri = torch.ones(L, S, dtype=torch.bool, device=query.device).tril(diagonal=diagonal)
        allowed = tri if allowed is None else allowed & tri
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask if allowed is None else allowed & attn_mask
        else:
            scores = scores + attn_mask
    return scores, allowed


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool | int = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    dropout_mask: Tensor | None = None,
    return_weights: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
):
    """``torch.nn.functional.scaled_dot_product_attention``, naive, with zeros for empty rows.

    Arguments:
        query: (..., Hq, Lq, D); key: (..., Hkv, Lk, D); value: (..., Hkv, Lk, Dv).
        attn_mask: bool (True = attend) or float (added to the scores), broadcastable to
            (..., Hq, Lq, Lk), or a torch CausalBias.
        dropout_p: dropout probability on the attention weights (1: every weight dropped).
        is_causal: False / 0, True / 1 (upper-left, as torch) or 2 (lower-right), as in
            ``sdpa_scores``.
        scale: score scale, default ``1/sqrt(D)``.
        enable_gqa: Hq may be a multiple of Hkv (grouped-query attention).
        dropout_mask: explicit keep-mask (bool, broadcastable to the scores) used instead of a
            random one, so a fused dropout can be checked exactly; kept weights are scaled by
            ``1 / (1 - dropout_p)``.
        return_weights: also return the (post-dropout) attention weights.
        window_size, softcap, alibi_slopes: the variants, as ``sdpa_scores``.
        sinks: (Hq,) one logit per head that joins each row's softmax denominator and has no
            value (differentiable); a row whose keys are all masked gives zeros.
    Returns:
        output (..., Hq, Lq, Dv), and weights (..., Hq, Lq, Lk) when ``return_weights``.
    """
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal cannot both be set (as in torch)")
    scores, allowed = sdpa_scores(
        query, key, attn_mask, is_causal, scale, enable_gqa,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
    )  # fmt: skip
    if sinks is None:
        weights = masked_softmax(scores, allowed)
    else:
        weights = sink_softmax(scores, allowed, sinks)
    if dropout_p >= 1.0:
        weights = weights * 0.0
    elif dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(weights) >= dropout_p
        weights = weights * dropout_mask / (1.0 - dropout_p)
    if enable_gqa and value.dim() >= 3 and value.shape[-3] != query.shape[-3]:
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
    if weights.dtype != value.dtype:
        # a float32 mask beside a half query promoted the scores; the output keeps the inputs'
        # dtype, as torch's does (products in float32, rounded once)
        out = (weights @ value.to(weights.dtype)).to(value.dtype)
    else:
        out = weights @ value
    return (out, weights) if return_weights else out


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
    is_causal: bool | int = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    dropout_mask: Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
) -> Tensor:
    """Attention over packed variable-length sequences, naive: ``scaled_dot_product_attention``
    above run on each sequence by itself.

    Arguments:
        query: (total_q, Hq, D); key: (total_k, Hkv, D); value: (total_k, Hkv, Dv).
        cu_seqlens_q, cu_seqlens_k: (B + 1,) cumulative lengths from 0: sequence b is rows
            cu_seqlens_q[b] .. cu_seqlens_q[b + 1] of query (and likewise of key and value).
        max_seqlen_q, max_seqlen_k: the padded lengths ``dropout_mask`` is laid out for (only
            read with it).
        dropout_p, scale, enable_gqa: as ``scaled_dot_product_attention``.
        is_causal: per sequence, as ``sdpa_scores`` (1 upper-left, 2 lower-right).
        dropout_mask: keep-mask of the padded batch, (B, Hq, max_seqlen_q, max_seqlen_k) bool;
            sequence b uses its top-left (Lq_b, Lk_b) corner.
        window_size, softcap, sinks: the variants, per sequence, as
            ``scaled_dot_product_attention``; alibi_slopes (Hq,) or (B, Hq) (row b for sequence b).
    Returns:
        (total_q, Hq, Dv).
    """
    cq = [int(c) for c in cu_seqlens_q.tolist()]
    ck = [int(c) for c in cu_seqlens_k.tolist()]
    outs = []
    for b in range(len(cq) - 1):
        q = query[cq[b] : cq[b + 1]].transpose(0, 1)  # (Hq, Lq_b, D)
        k = key[ck[b] : ck[b + 1]].transpose(0, 1)  # (Hkv, Lk_b, D)
        v = value[ck[b] : ck[b + 1]].transpose(0, 1)  # (Hkv, Lk_b, Dv)
        keep = None
        if dropout_mask is not None:
            keep = dropout_mask[b, :, : q.shape[1], : k.shape[1]]  # (Hq, Lq_b, Lk_b)
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        o = scaled_dot_product_attention(
            q,
            k,
            v,
            None,
            dropout_p,
            is_causal,
            scale,
            enable_gqa,
            dropout_mask=keep,
            window_size=window_size,
            softcap=softcap,
            sinks=sinks,
            alibi_slopes=slopes,
        )  # (Hq, Lq_b, Dv)
        outs.append(o.transpose(0, 1))
    if not outs:
        return query.new_zeros((0, query.shape[1], value.shape[2]))
    return torch.cat(outs, dim=0)  # (total_q, Hq, Dv)


def kvcache_attention(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    key: Tensor | None = None,
    value: Tensor | None = None,
    *,
    block_table: Tensor | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
) -> Tensor:
    """KV-cache attention, naive: append ``key``/``value`` to the caches in place (as the fused
    op does), gather each sequence's keys, and attend with the full score matrix.

    Arguments:
        query: (B, Hq, Lq, D).
        k_cache, v_cache: dense (B, Hkv, L_max, D) / (B, Hkv, L_max, Dv), or paged
            (num_pages, Hkv, page_size, D) with ``block_table``.
        cache_seqlens: (B,) filled length of each sequence before the new tokens.
        key, value: (B, Hkv, Lq, D) / (B, Hkv, Lq, Dv) new tokens written at cache_seqlens[b] + t,
            or None (attend to the cache as it is).
        block_table: (B, max_pages) int: page block_table[b, j // page_size] holds position j.
        is_causal: query i sees keys j <= d_i = i + Lk_b - Lq (lower-right).
        scale: score scale, default ``1/sqrt(D)``.
        window_size: (left, right): keys d_i - left <= j <= d_i + right; -1 unbounded.
        softcap: scores s -> softcap * tanh(s / softcap) after scaling (0: off).
        sinks: (Hq,) a logit per head joining the softmax denominator, with no value.
        alibi_slopes: (Hq,) or (B, Hq): scores -= slope * |d_i - j|.
    Returns:
        (B, Hq, Lq, Dv); a row with no key gives zeros.
    """
    B, Hq, Lq, D = query.shape
    Hkv = k_cache.shape[1]
    ps = k_cache.shape[2]
    seqlens = [int(n) for n in cache_seqlens.tolist()]
    bt = block_table.tolist() if block_table is not None else None

    def where(b: int, j: int) -> tuple[int, int]:  # (page, row) of position j of sequence b
        return (bt[b][j // ps], j % ps) if bt is not None else (b, j)

    if key is not None:
        for b in range(B):
            for t in range(Lq):
                page, row = where(b, seqlens[b] + t)
                k_cache[page, :, row] = key[b, :, t]
                v_cache[page, :, row] = value[b, :, t]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    left, right = window_size
    outs = []
    for b in range(B):
        lk = seqlens[b] + (Lq if key is not None else 0)
        idx = [where(b, j) for j in range(lk)]
        pages = torch.tensor([i[0] for i in idx], dtype=torch.long, device=query.device)
        rows = torch.tensor([i[1] for i in idx], dtype=torch.long, device=query.device)
        k = k_cache[pages, :, rows].transpose(0, 1).to(query.dtype)  # (Hkv, Lk_b, D)
        v = v_cache[pages, :, rows].transpose(0, 1).to(query.dtype)  # (Hkv, Lk_b, Dv)
        k = k.repeat_interleave(Hq // Hkv, dim=0)  # (Hq, Lk_b, D)
        v = v.repeat_interleave(Hq // Hkv, dim=0)
        s = (query[b] @ k.transpose(-1, -2)) * scale  # (Hq, Lq, Lk_b)
        if softcap > 0.0:
            s = softcap * torch.tanh(s / softcap)
        d = torch.arange(Lq, device=query.device)[:, None] + (lk - Lq)  # (Lq, 1) diagonals
        j = torch.arange(lk, device=query.device)[None, :]  # (1, Lk_b)
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
            s = s - slopes.to(s.dtype)[:, None, None] * (d - j).abs().to(s.dtype)
        allowed = torch.ones(Lq, lk, dtype=torch.bool, device=query.device)
        if is_causal:
            allowed &= j <= d
        if left >= 0:
            allowed &= j >= d - left
        if right >= 0:
            allowed &= j <= d + right
        s = s.masked_fill(~allowed, float("-inf"))
        if sinks is not None:
            sink = sinks.to(s.dtype)[:, None, None].expand(Hq, Lq, 1)
            w = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
        else:
            w = masked_softmax(s, allowed.expand_as(s))
        outs.append(torch.nan_to_num(w, nan=0.0) @ v)  # (Hq, Lq, Dv)
    if not outs:
        return query.new_zeros((0, Hq, Lq, v_cache.shape[-1]))
    return torch.stack(outs)  # (B, Hq, Lq, Dv)


# -- dropout random numbers -------------------------------------------------------------------
# A NumPy twin of csrc/philox.h (and so of triton.language.rand), written independently so the
# compiled generator is checked against it.

_M32 = np.uint64(0xFFFFFFFF)


def philox_uniform(seed: int, counters) -> np.ndarray:
    """Uniform floats in [0, 1) drawn by Philox-4x32-10 for each 64-bit counter.

    Arguments:
        seed: 64-bit key.
        counters: array-like of non-negative integers.
    Returns:
        float32 array of the shape of ``counters``.
    """
    ctr = np.asarray(counters, dtype=np.uint64)
    c0 = ctr & _M32
    c1 = ctr >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0 = np.uint64(seed & 0xFFFFFFFF)
    k1 = np.uint64((seed >> 32) & 0xFFFFFFFF)
    ra, rb = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        a0, a2 = c0, c2
        c0 = ((rb * a2) >> np.uint64(32)) ^ c1 ^ k0
        c2 = ((ra * a0) >> np.uint64(32)) ^ c3 ^ k1
        c1 = (rb * a2) & _M32
        c3 = (ra * a0) & _M32
        k0 = (k0 + np.uint64(0x9E3779B9)) & _M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _M32
    x = c0.astype(np.uint32).view(np.int32)
    x = np.where(x < 0, ~x, x)
    return x.astype(np.float32) * np.float32(4.6566127342e-10)


def dropout_keep_mask(seed: int, offset: int, shape, p: float) -> Tensor:
    """The (B, H, Lq, Lk) keep-mask the fused kernels draw: element e kept when
    ``philox_uniform(seed, offset + e) >= p``."""
    n = int(np.prod(shape)) if len(shape) else 1
    u = philox_uniform(seed, np.arange(n, dtype=np.uint64) + np.uint64(offset))
    return torch.from_numpy(u >= np.float32(p)).reshape(tuple(shape))
