"""Fused multi-head scaled-dot-product attention in Triton (flash attention), forward and backward:
the launchers and the custom ops of pyattn::sdpa_fwd / sdpa_bwd on canonical (B, H, L, D)
tensors. The kernels, their formulas (forward, backward, the dropout counters) and their
autotune configs are in kernels/_flash.py, shared with varlen attention.

References: Triton tutorial 06-fused-attention; Dao, "FlashAttention-2: Faster Attention with
Better Parallelism and Work Partitioning" (2023), algorithms 1-2.
"""

import math

import torch
import triton
from torch import Tensor

from ._flash import (
    LOG2E,
    MASK_ADD,
    MASK_BOOL,
    MASK_NONE,
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


def _expandable(shape, to) -> bool:
    return len(shape) <= len(to) and all(
        s in (1, t) for s, t in zip(reversed(shape), reversed(to), strict=False)
    )


def _check(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, causal: int, sinks=None,
           alibi_slopes=None):  # fmt: skip
    """Memory-safety guards only (users' inputs are validated in pyattn/ops/sdpa.py): shapes that
    keep every load in bounds; returns (B, Hq, Hkv, Lq, Lk, D, Dv)."""
    if not query.dim() == key.dim() == value.dim() == 4:
        raise ValueError("sdpa (triton): inputs are not canonical (B, H, L, D) tensors the kernels can take")
    B, Hq, Lq, D = query.shape
    Hkv, Lk, Dv = key.shape[1], key.shape[2], value.shape[3]
    ok = key.shape == (B, Hkv, Lk, D) and value.shape[:3] == (B, Hkv, Lk) and query.dtype in DTYPES
    ok = ok and key.dtype == value.dtype == query.dtype and (Hq % Hkv == 0 if Hkv else Hq == 0)
    ok = ok and D <= MAX_HEAD_DIM and Dv <= MAX_HEAD_DIM and causal in (0, 1, 2)
    ok = ok and (attn_mask is None or _expandable(attn_mask.shape, (B, Hq, Lq, Lk)))
    ok = ok and (sinks is None or sinks.shape == (Hq,))
    ok = ok and (alibi_slopes is None or alibi_slopes.shape in ((Hq,), (B, Hq)))
    if not ok:
        raise ValueError("sdpa (triton): inputs are not canonical (B, H, L, D) tensors the kernels can take")
    check_slice("query", query, Lq, D)
    check_slice("key", key, Lk, D)
    check_slice("value", value, Lk, Dv)
    return B, Hq, Hkv, Lq, Lk, D, Dv


def _mask_args(attn_mask: Tensor | None, query: Tensor, shape) -> tuple:
    """(tensor, strides, kind, row-broadcast) of the mask as the kernels read it."""
    if attn_mask is None:
        # never read (MASK_KIND = 0); any pointer will do
        return query, (0, 0, 0, 0), MASK_NONE, False
    m = attn_mask.expand(shape)  # size-1 dims become stride 0: read by strides, never copied
    kind = MASK_BOOL if m.dtype == torch.bool else MASK_ADD
    if kind == MASK_BOOL:
        m = m.view(torch.uint8)  # same bytes; a plain integer pointer in every Triton version
    check_slice("attn_mask", m, shape[2], shape[3])
    return m, m.stride(), kind, m.stride(2) == 0


# the launchers allocate their outputs and stop before launching on a traced (fake) call
_traced = is_traced


def _not_varlen(query: Tensor, Lq: int, Lk: int) -> tuple:
    """The kernels' packed-sequence arguments (CuSeqQ, CuSeqK, total_q, total_k, drop_lq,
    drop_lk) for a padded batch: no cu_seqlens (never read without VARLEN), the dropout counters
    laid out by the batch's own (Lq, Lk)."""
    return (query, query, 0, 0, Lq, Lk)


def sdpa_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
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
    """Fused attention forward.

    Arguments:
        query: (B, Hq, Lq, D); key: (B, Hkv, Lk, D); value: (B, Hkv, Lk, Dv), any strides,
            float16/bfloat16/float32, CUDA (or CPU under TRITON_INTERPRET=1); Hq % Hkv == 0.
        attn_mask: None, bool (True = attend) or of the query's dtype (added to the scores),
            (B, Hq, Lq, Lk) or broadcastable to it (size-1 / stride-0 dims are not copied).
        dropout_p: dropout probability on the attention weights.
        causal: 0 none, 1 upper-left (query i sees keys j <= i, torch's is_causal), 2
            lower-right (j <= i + Lk - Lq; a row with no such key gives 0).
        scale: score scale, default 1/sqrt(D).
        seed, offset: dropout keeps element e = ((b*Hq + h)*Lq + i)*Lk + j when
            ``tl.rand(seed, offset + e) >= dropout_p``.
        window_left, window_right, softcap, sinks, alibi_slopes: the attention variants
            (docs/design.md, "Attention variants"): query i sees keys d - left <= j <= d + right
            (d = i with upper-left causality, i + Lk - Lq otherwise; -1 unbounded); scores
            s -> softcap tanh(s / softcap) (0 off), then -= slope |i + Lk - Lq - j| with
            alibi_slopes (Hq,) or (B, Hq); sinks (Hq,) one more logit per head in the softmax
            denominator, with no value.
    Returns:
        out (B, Hq, Lq, Dv) in the query's dtype, lse (B, Hq, Lq) float32 (including the sink;
        +inf for rows with no allowed key and no sink, whose output is 0).
    """
    B, Hq, Hkv, Lq, Lk, D, Dv = _check(query, key, value, attn_mask, causal, sinks, alibi_slopes)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    causal_off = Lk - Lq if causal == 2 else 0
    out = torch.empty((B, Hq, Lq, Dv), dtype=query.dtype, device=query.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=query.device)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))
    mask, ms, kind, row = _mask_args(attn_mask, query, (B, Hq, Lq, Lk))
    var, var_consts = variant_args(query, Lq, Lk, window_left, window_right, softcap, sinks, alibi_slopes)
    if _traced(query):
        return out, lse

    def grid(meta):
        return (triton.cdiv(Lq, meta["BLOCK_M"]), B, Hq)

    fwd[grid](
        query, key, value, mask, out, lse,
        *query.stride(), *key.stride(), *value.stride(), *ms, *out.stride(),
        Hq, Hq // Hkv, Lq, Lk, scale * LOG2E, float(dropout_p), drop_scale(dropout_p),
        int(seed), int(offset), causal_off, *_not_varlen(query, Lq, Lk), *var,
        **common_constexprs(query, value, D, Dv, causal, kind, row, dropout_p), **var_consts,
        HAS_SINKS=sinks is not None,
    )  # fmt: skip
    return out, lse


def sdpa_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
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
    """Fused attention backward: Delta preprocess, dK/dV pass over key blocks, dQ pass.

    Arguments:
        grad_out: (B, Hq, Lq, Dv), the gradient of ``out``.
        query, key, value, attn_mask, dropout_p, causal, scale, seed, offset, window_left,
            window_right, softcap, alibi_slopes: as given to ``sdpa_forward`` (the sinks need
            nothing here: lse includes them; their own gradient is pyattn/ops/_common.py's
            ``sink_grad``).
        out: (B, Hq, Lq, Dv) and lse: (B, Hq, Lq) float32, as it returned.
    Returns:
        grad_query (B, Hq, Lq, D), grad_key (B, Hkv, Lk, D), grad_value (B, Hkv, Lk, Dv),
        contiguous, in the inputs' dtype; grad_key/grad_value summed over each GQA group.
    """
    B, Hq, Hkv, Lq, Lk, D, Dv = _check(query, key, value, attn_mask, causal, None, alibi_slopes)
    if grad_out.shape != (B, Hq, Lq, Dv) or out.shape != (B, Hq, Lq, Dv) or lse.shape != (B, Hq, Lq):
        raise ValueError("sdpa (triton): grad_out/out must be (B, Hq, Lq, Dv) and lse (B, Hq, Lq)")
    causal_off = Lk - Lq if causal == 2 else 0
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dq = torch.empty((B, Hq, Lq, D), dtype=query.dtype, device=query.device)
    dk = torch.empty((B, Hkv, Lk, D), dtype=key.dtype, device=query.device)
    dv = torch.empty((B, Hkv, Lk, Dv), dtype=value.dtype, device=query.device)
    if dq.numel() == 0 or dk.numel() == 0 or dv.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.float().contiguous()
    # tl.dot needs both operands in one dtype (an fp32 gradient of a half output, say)
    grad_out = grad_out.to(query.dtype)
    mask, ms, kind, row = _mask_args(attn_mask, query, (B, Hq, Lq, Lk))
    check_slice("grad_out", grad_out, Lq, Dv)
    check_slice("out", out, Lq, Dv)
    var, var_consts = variant_args(query, Lq, Lk, window_left, window_right, softcap, None, alibi_slopes)
    consts = {**common_constexprs(query, value, D, Dv, causal, kind, row, dropout_p), **var_consts}
    if _traced(query):
        return dq, dk, dv

    delta = torch.empty((B, Hq, Lq), dtype=torch.float32, device=query.device)
    launch_kernel(
        bwd_preprocess_kernel, (triton.cdiv(Lq, PREPROCESS_BLOCK_M), B, Hq), out, grad_out, delta, *out.stride(), *grad_out.stride(), Hq, Lq,
        HEAD_DIM_V=Dv, BLOCK_DV=consts["BLOCK_DV"], BLOCK_M=PREPROCESS_BLOCK_M,
    )  # fmt: skip
    scalars = (
        float(dropout_p), drop_scale(dropout_p), int(seed), int(offset), causal_off,
        *_not_varlen(query, Lq, Lk), *var,
    )  # fmt: skip

    def grid_kv(meta):
        return (triton.cdiv(Lk, meta["BLOCK_N"]), B, Hkv)

    bwd_dkdv[grid_kv](
        query, key, value, mask, grad_out, lse, delta, dk, dv,
        *query.stride(), *key.stride(), *value.stride(), *ms, *grad_out.stride(),
        Hq, Hkv, Hq // Hkv, Lq, Lk, scale * LOG2E, scale, *scalars, **consts,
    )  # fmt: skip

    def grid_q(meta):
        return (triton.cdiv(Lq, meta["BLOCK_M"]), B, Hq)

    bwd_dq[grid_q](
        query, key, value, mask, grad_out, lse, delta, dq,
        *query.stride(), *key.stride(), *value.stride(), *ms, *grad_out.stride(),
        Hq, Hq // Hkv, Lq, Lk, scale * LOG2E, scale, *scalars, **consts,
    )  # fmt: skip
    return dq, dk, dv


# -- glue: the custom ops (the schemas of the C++ pyattn::sdpa_fwd/_bwd, kernels/_glue.py) ------
# triton_op + wrap_triton on a GPU: torch traces the launchers for the fake (meta) impls and sees
# the kernels, so torch.compile can fuse around them. Autograd is registered by
# pyattn/ops/sdpa.py, for these and the C++ ops alike.


@define_op("sdpa_fwd")
def sdpa_fwd_triton(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
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
    var = (window_left, window_right, softcap, sinks, alibi_slopes)
    if interpreter_bf16(query):
        out, lse = sdpa_forward(
            up(query), up(key), up(value), up(attn_mask), dropout_p, causal, scale, seed, offset, *var
        )
        return out.to(torch.bfloat16), lse
    return sdpa_forward(query, key, value, attn_mask, dropout_p, causal, scale, seed, offset, *var)


@define_op("sdpa_bwd")
def sdpa_bwd_triton(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
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
    var = (window_left, window_right, softcap, alibi_slopes)
    if interpreter_bf16(query):
        grads = sdpa_backward(
            *(up(t) for t in (grad_out, query, key, value, attn_mask, out)),
            lse,
            dropout_p,
            causal,
            scale,
            seed,
            offset,
            *var,
        )
        return tuple(g.to(torch.bfloat16) for g in grads)
    return sdpa_backward(
        grad_out, query, key, value, attn_mask, out, lse, dropout_p, causal, scale, seed, offset, *var
    )
