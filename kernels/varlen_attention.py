"""Attention over packed variable-length sequences in Triton: the flash-attention kernels of
kernels/sdpa.py with their ``VARLEN`` constexpr on.

    sequence b: query rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] of (total_q, Hq, D),
                key/value rows cu_seqlens_k[b] .. cu_seqlens_k[b + 1] of (total_k, Hkv, D / Dv)
    O_b = dropout(softmax(scale * Q_b K_b^T [causal per sequence])) V_b,  lse (Hq, total_q)

The grid is that of a padded (B, Hq, max_seqlen_q) batch, but each program reads its sequence's
bounds from cu_seqlens and a program past its sequence's end returns at once, so a sequence
costs its own Lq_b x Lk_b tiles (key loops stop at Lk_b). Tensors are read in place through
their strides: the packed (total, H, D) tensor is a (1, H, total, D) view. Dropout element
(b, h, i, j) uses counter offset + ((b * Hq + h) * max_seqlen_q + i) * max_seqlen_k + j, the
counter sdpa draws for the padded batch (docs/design.md, "Variable-length attention").
"""

import math

import torch
import triton
from torch import Tensor

from ._flash import (
    LOG2E,
    MAX_HEAD_DIM,
    PREPROCESS_BLOCK_M,
    bwd_dkdv,
    bwd_dq,
    bwd_preprocess_kernel,
    check_slice,
    common_constexprs,
    drop_scale,
    fwd,
    interpreter_bf16,
    up,
    variant_args,
)
from ._glue import DTYPES, define_op, is_traced, launch_kernel

# -- launchers ----------------------------------------------------------------------------------


def _heads_view(t: Tensor) -> Tensor:
    """(total, H, D) as the (1, H, total, D) view the sdpa kernels index (no copy)."""
    return t.unsqueeze(0).transpose(1, 2)


def _st(view: Tensor) -> tuple:
    """The strides of a (1, H, total, D) view as the kernels take them: batch stride 0, so that
    program b's base is its sequence's first row (cu_seqlens[b] * row stride), not entry b."""
    return (0, *view.stride()[1:])


def _check(query, key, value, cu_q, cu_k, max_q, max_k, causal, sinks=None, alibi_slopes=None):
    """Memory-safety guards only (users' inputs are validated in pyattn/ops/varlen_attention.py);
    returns (B, Hq, Hkv, D, Dv)."""
    ok = query.dim() == key.dim() == value.dim() == 3 and query.dtype in DTYPES
    ok = ok and key.dtype == value.dtype == query.dtype and cu_q.dtype == cu_k.dtype == torch.int32
    ok = ok and cu_q.dim() == cu_k.dim() == 1 and cu_q.shape[0] == cu_k.shape[0] >= 1
    if ok:
        Hq, D, Hkv, Dv = query.shape[1], query.shape[2], key.shape[1], value.shape[2]
        ok = key.shape[2] == D and value.shape[:2] == key.shape[:2] and (Hq % Hkv == 0 if Hkv else Hq == 0)
        ok = ok and D <= MAX_HEAD_DIM and Dv <= MAX_HEAD_DIM and causal in (0, 1, 2)
        ok = ok and max_q >= 0 and max_k >= 0
        ok = ok and (sinks is None or sinks.shape == (Hq,))
        B = cu_q.shape[0] - 1
        ok = ok and (alibi_slopes is None or alibi_slopes.shape in ((Hq,), (B, Hq)))
    if not ok:
        raise ValueError(
            "varlen_attention (triton): inputs are not packed (total, H, D) tensors the kernels take"
        )
    for name, t, rows, cols in (
        ("query", query, max_q, D),
        ("key", key, max_k, D),
        ("value", value, max_k, Dv),
    ):
        check_slice(name, _heads_view(t), rows, cols)
    return cu_q.shape[0] - 1, Hq, Hkv, D, Dv


def _varlen_args(cu_q, cu_k, total_q, total_k, max_q, max_k):
    # (CuSeqQ, CuSeqK, total_q, total_k, drop_lq, drop_lk) of the kernels
    return (cu_q, cu_k, total_q, total_k, max_q, max_k)


def varlen_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    causal: int = 0,
    scale: float | None = None,
    seed: int = 0,
    offset: int = 0,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused variable-length attention forward.

    Arguments:
        query: (total_q, Hq, D); key: (total_k, Hkv, D); value: (total_k, Hkv, Dv), any strides,
            float16/bfloat16/float32, CUDA (or CPU under TRITON_INTERPRET=1); Hq % Hkv == 0.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) cumulative lengths from 0, on query's device.
        max_seqlen_q, max_seqlen_k: at least every sequence's length (the grid, the dropout
            counters' layout).
        dropout_p, scale, seed, offset: as kernels/sdpa.py's sdpa_forward, the counters of the
            padded (B, Hq, max_seqlen_q, max_seqlen_k) batch.
        causal: 0 none, 1 upper-left, 2 lower-right, per sequence.
        window_left, window_right, softcap, sinks, alibi_slopes: the variants of
            kernels/sdpa.py's sdpa_forward, per sequence (its own Lq_b, Lk_b); alibi_slopes
            (Hq,) or (B, Hq), row b for sequence b.
    Returns:
        out (total_q, Hq, Dv) in the query's dtype, lse (Hq, total_q) float32 (including the
        sink; +inf for rows with no key and no sink).
    """
    B, Hq, Hkv, D, Dv = _check(
        query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, sinks, alibi_slopes
    )
    total_q, total_k = query.shape[0], key.shape[0]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    # rows no program writes (a sequence with no keys still has its programs: they write 0, +inf)
    out = torch.empty((total_q, Hq, Dv), dtype=query.dtype, device=query.device)
    lse = torch.empty((Hq, total_q), dtype=torch.float32, device=query.device)
    if out.numel() == 0 or B == 0 or max_seqlen_q == 0:
        return out.zero_(), lse.fill_(float("inf"))
    var, var_consts = variant_args(
        query, max_seqlen_q, max_seqlen_k, window_left, window_right, softcap, sinks, alibi_slopes
    )
    if is_traced(query):
        return out, lse
    q, k, v, o = (_heads_view(t) for t in (query, key, value, out))

    def grid(meta):
        return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), B, Hq)

    fwd[grid](
        q, k, v, q, o, lse,
        *_st(q), *_st(k), *_st(v), 0, 0, 0, 0, *_st(o),
        Hq, Hq // Hkv, max_seqlen_q, max_seqlen_k, scale * LOG2E, float(dropout_p), drop_scale(dropout_p),
        int(seed), int(offset), 1 if causal == 2 else 0,
        *_varlen_args(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q, max_seqlen_k), *var,
        **common_constexprs(query, value, D, Dv, causal, 0, False, dropout_p, varlen=True), **var_consts,
        HAS_SINKS=sinks is not None,
    )  # fmt: skip
    return out, lse


def varlen_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    out: Tensor,
    lse: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    causal: int = 0,
    scale: float | None = None,
    seed: int = 0,
    offset: int = 0,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused variable-length attention backward: Delta over every packed row, then sdpa's dK/dV
    and dQ passes with VARLEN (the variants as given to ``varlen_forward``, less the sinks).

    Returns:
        grad_query (total_q, Hq, D), grad_key (total_k, Hkv, D), grad_value (total_k, Hkv, Dv),
        contiguous, in the inputs' dtype; rows of keys no query sees are 0.
    """
    B, Hq, Hkv, D, Dv = _check(
        query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, None, alibi_slopes
    )
    total_q, total_k = query.shape[0], key.shape[0]
    if grad_out.shape != (total_q, Hq, Dv) or out.shape != (total_q, Hq, Dv) or lse.shape != (Hq, total_q):
        raise ValueError(
            "varlen_attention (triton): grad_out/out must be (total_q, Hq, Dv) and lse (Hq, total_q)"
        )
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    # the kernels write (H, total, D) rows; returned as (total, H, D)
    dq = torch.zeros((Hq, total_q, D), dtype=query.dtype, device=query.device)
    dk = torch.zeros((Hkv, total_k, D), dtype=key.dtype, device=query.device)
    dv = torch.zeros((Hkv, total_k, Dv), dtype=value.dtype, device=query.device)

    def packed(g):
        return g.transpose(0, 1).contiguous()

    if dq.numel() == 0 and dk.numel() == 0 and dv.numel() == 0 or B == 0:
        return packed(dq), packed(dk), packed(dv)
    lse = lse.float().contiguous()
    grad_out = grad_out.to(query.dtype)
    var, var_consts = variant_args(
        query, max_seqlen_q, max_seqlen_k, window_left, window_right, softcap, None, alibi_slopes
    )
    consts = {
        **common_constexprs(query, value, D, Dv, causal, 0, False, dropout_p, varlen=True),
        **var_consts,
    }
    if is_traced(query):
        return packed(dq), packed(dk), packed(dv)
    q, k, v, do, o = (_heads_view(t) for t in (query, key, value, grad_out, out))
    check_slice("grad_out", do, max_seqlen_q, Dv)
    # Delta of every packed row, (Hq, total_q) as the lse: the preprocess kernel over the
    # (1, Hq, total_q, Dv) view
    delta = torch.empty((Hq, total_q), dtype=torch.float32, device=query.device)
    if total_q > 0:
        launch_kernel(
            bwd_preprocess_kernel, (triton.cdiv(total_q, PREPROCESS_BLOCK_M), 1, Hq), o, do, delta,
            *o.stride(), *do.stride(), Hq, total_q,
            HEAD_DIM_V=Dv, BLOCK_DV=consts["BLOCK_DV"], BLOCK_M=PREPROCESS_BLOCK_M,
        )  # fmt: skip
    scalars = (
        float(dropout_p), drop_scale(dropout_p), int(seed), int(offset), 1 if causal == 2 else 0,
        *_varlen_args(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q, max_seqlen_k), *var,
    )  # fmt: skip

    if max_seqlen_k > 0:

        def grid_kv(meta):
            return (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), B, Hkv)

        bwd_dkdv[grid_kv](
            q, k, v, q, do, lse, delta, dk, dv,
            *_st(q), *_st(k), *_st(v), 0, 0, 0, 0, *_st(do),
            Hq, Hkv, Hq // Hkv, max_seqlen_q, max_seqlen_k, scale * LOG2E, scale, *scalars, **consts,
        )  # fmt: skip

    if max_seqlen_q > 0:

        def grid_q(meta):
            return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), B, Hq)

        bwd_dq[grid_q](
            q, k, v, q, do, lse, delta, dq,
            *_st(q), *_st(k), *_st(v), 0, 0, 0, 0, *_st(do),
            Hq, Hq // Hkv, max_seqlen_q, max_seqlen_k, scale * LOG2E, scale, *scalars, **consts,
        )  # fmt: skip
    return packed(dq), packed(dk), packed(dv)


# -- glue: the custom ops (the schemas of the C++ pyattn::varlen_attention_fwd/_bwd) ---------------
# Autograd is registered by pyattn/ops/varlen_attention.py, for these and the C++ ops alike.


@define_op("varlen_attention_fwd")
def varlen_attention_fwd_triton(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    causal: int,
    scale: float,
    seed: int,
    offset: int,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    args = (
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal, scale, seed, offset,
        window_left, window_right, softcap, sinks, alibi_slopes,
    )  # fmt: skip
    if interpreter_bf16(query):
        out, lse = varlen_forward(up(query), up(key), up(value), *args)
        return out.to(torch.bfloat16), lse
    return varlen_forward(query, key, value, *args)


@define_op("varlen_attention_bwd")
def varlen_attention_bwd_triton(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    out: Tensor,
    lse: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    causal: int,
    scale: float,
    seed: int,
    offset: int,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    args = (
        max_seqlen_q, max_seqlen_k, dropout_p, causal, scale, seed, offset, window_left, window_right, softcap,
        alibi_slopes,
    )  # fmt: skip
    if interpreter_bf16(query):
        grads = varlen_backward(
            up(grad_out), up(query), up(key), up(value), cu_seqlens_q, cu_seqlens_k, up(out), lse, *args
        )
        return tuple(g.to(torch.bfloat16) for g in grads)
    return varlen_backward(grad_out, query, key, value, cu_seqlens_q, cu_seqlens_k, out, lse, *args)
