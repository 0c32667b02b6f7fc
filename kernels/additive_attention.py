"""Fused additive (Bahdanau) attention in Triton, forward and backward.

    e_ij = v . tanh(q_i + k_j)      a_ij = softmax_j(e_ij) = exp(e_ij - lse_i)      c_i = sum_j a_ij value_j

over the keys that are not padding. The (B, Tq, Tk, H) tanh tensor is never built: a program
holds a [BLOCK_Q, BLOCK_K] score tile, accumulated over chunks of H through a
[BLOCK_Q, BLOCK_K, BLOCK_H] broadcast, and streams the key blocks with an online softmax
(base 2, log2(e) folded into the scores), as in flash-attention.

Backward (t = tanh(q_i + k_j), the formulas of csrc/additive_attention_math.h):

    dP_ij = dO_i . value_j [+ dW_ij]      dS_ij = a_ij (dP_ij - Delta_i)      Delta_i = sum_j a_ij dP_ij
    dvalue_j = sum_i a_ij dO_i            dv = sum_ij dS_ij t_ij
    dq_i = v * sum_j dS_ij (1 - t_ij^2)   dk_j = v * sum_i dS_ij (1 - t_ij^2)

Delta_i equals dO_i . c_i [+ sum_j a_ij dW_ij], but it is summed here from the very dP and a the
kernel uses, with a renormalised to sum to 1 over the row (as softmax's own backward does):
then dP - Delta cancels exactly where it should, e.g. a row with one attendable key (a = 1) gets
dS = 0, not rounding noise times v (1 - t^2). Four kernels, none with atomics (results are
bitwise reproducible):
1. ``_bwd_dvalue_kernel`` (key-block programs): recomputes the scores, accumulates dvalue, and
   writes a_ij and dP_ij, fp32 (B, Tq, Tk) each: the only quadratic buffers, the size of the
   attention weights. Keeping them avoids holding a full-H dk accumulator per program (H is the
   large dimension).
2. ``_bwd_dscore_kernel`` (query-row programs): Delta, then dS in place of dP.
3. ``_bwd_dk_kernel`` (key-block x H-chunk programs): dk, and per-key partial sums of dv that
   torch reduces in a fixed order.
4. ``_bwd_dq_kernel`` (query-block x H-chunk programs): dq.

The forward writes the raw scores (fp32) only when the weights are asked for; a second kernel
normalises them with the row's lse. Memory: the backward holds two fp32 (B, Tq, Tk) buffers and an
fp32 (B, Tk, H) one (dv partials), never (B, Tq, Tk, H).

Ops (glue at the end): ``pyattn::additive_attention_{fwd,bwd}_triton``, the schemas of the C++
ops. On a GPU they are ``torch.library.triton_op``s (torch.compile sees the kernels); under the
interpreter (TRITON_INTERPRET=1) they are opaque ``custom_op``s, because a triton_op's traced
decomposition would lose the interpreted kernels (see kernels/_glue.py).

Conventions (csrc/registration.cpp): lse is float32, natural log, +inf for a row whose keys are
all padding (its context, weights and gradients are 0); out and the gradients have the input
dtype; fp32, fp16 and bf16 inputs, fp32 statistics and accumulation.

References: Bahdanau, Cho, Bengio, "Neural Machine Translation by Jointly Learning to Align and
Translate" (ICLR 2015); Dao et al., "FlashAttention" (NeurIPS 2022) and the Triton tutorial
06-fused-attention (online softmax with exp2, split backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._glue import DTYPES as _DTYPES
from ._glue import INTERPRET as _INTERPRET
from ._glue import Tuned, define_op, launch_kernel
from ._math import tanh as _tanh

# -- constants ---------------------------------------------------------------------------------

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# -- kernels -----------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST_DOT (the interpreter with bf16, whose tl.dot returns
    garbage there) multiplies the already-rounded operands in fp32: the same products."""
    if UPCAST_DOT:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=DOT_PRECISION)
    return c


@triton.jit
def _score_tile(
    q_ptr, k_ptr, v_ptr, offs_q, q_ok, offs_k, k_ok, H, sqt, sqh, skt, skh, sv,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """e_ij for a [BLOCK_Q, BLOCK_K] tile, fp32, summed over H in chunks of BLOCK_H."""
    s = tl.zeros([BLOCK_Q, BLOCK_K], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        q = tl.load(
            q_ptr + offs_q[:, None] * sqt + offs_h[None, :] * sqh,
            mask=q_ok[:, None] & h_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        k = tl.load(
            k_ptr + offs_k[:, None] * skt + offs_h[None, :] * skh,
            mask=k_ok[:, None] & h_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        # v is 0 on the padded H lanes, so they add nothing.
        vv = tl.load(v_ptr + offs_h * sv, mask=h_ok, other=0.0).to(tl.float32)
        t = _tanh(q[:, None, :] + k[None, :, :])
        s += tl.sum(t * vv[None, None, :], axis=2)
    return s


@triton.jit
def _key_allowed(mask_ptr, offs_k, k_ok, smt, HAS_MASK: tl.constexpr):
    """True for the keys of the block that exist and are not padding."""
    allowed = k_ok
    if HAS_MASK:
        pad = tl.load(mask_ptr + offs_k * smt, mask=k_ok, other=1).to(tl.int32)
        allowed = allowed & (pad == 0)
    return allowed


@triton.jit
def _key_extent(EXTENT, b, Tk, HAS_MASK: tl.constexpr):
    """[lo, hi): the keys of batch row b from its first to its last one that is not padding
    (empty for a row of padding only). Key blocks outside it hold padding only and are skipped,
    not masked: a seq2seq batch of varied source lengths spends no tanh on its padding. Only the
    loop bounds change, not the loop bodies (a branch in them cost registers and spills)."""
    if HAS_MASK:
        lo = tl.load(EXTENT + 2 * b)
        hi = tl.load(EXTENT + 2 * b + 1)
    else:
        lo = 0
        hi = Tk
    return lo, hi


@triton.jit
def _fwd_kernel(
    Q, K, VAL, V, MASK, EXTENT, OUT, LSE, SCORES,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svd, sv, smb, smt,
    Tq, Tk, H, Dv,
    HAS_MASK: tl.constexpr, WRITE_SCORES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    pid_q = tl.program_id(0)
    # 64-bit batch offsets: B * Tk * H overflows int32 for large inputs.
    b = tl.program_id(1).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < Tq
    offs_d = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < Dv
    q_ptr = Q + b * sqb
    k_ptr = K + b * skb
    val_ptr = VAL + b * svb
    mask_ptr = MASK + b * smb

    m = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)  # running max, base-2 units
    l_sum = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_DV], dtype=tl.float32)
    # skipped blocks' scores (WRITE_SCORES) keep the -inf the launcher filled them with
    lo, hi = _key_extent(EXTENT, b, Tk, HAS_MASK)
    for k0 in range((lo // BLOCK_K) * BLOCK_K, hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < Tk
        s = _score_tile(
            q_ptr, k_ptr, V, offs_q, q_ok, offs_k, k_ok, H, sqt, sqh, skt, skh, sv,
            BLOCK_Q, BLOCK_K, BLOCK_H,
        )  # fmt: skip
        allowed = _key_allowed(mask_ptr, offs_k, k_ok, smt, HAS_MASK)
        s = tl.where(allowed[None, :], s, float("-inf"))
        if WRITE_SCORES:
            s_ptrs = SCORES + (b * Tq + offs_q[:, None]) * Tk + offs_k[None, :]
            tl.store(s_ptrs, s, mask=q_ok[:, None] & k_ok[None, :])
        s2 = s * LOG2E
        m_new = tl.maximum(m, tl.max(s2, axis=1))
        # A row with every key so far masked keeps m = -inf; exp2(-inf - 0) = 0 then, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_ref)
        p = tl.math.exp2(s2 - m_ref[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        val = tl.load(
            val_ptr + offs_k[:, None] * svt + offs_d[None, :] * svd,
            mask=k_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + _dot(p.to(val.dtype), val, DOT_PRECISION, UPCAST_DOT)
        m = m_new

    has_key = l_sum > 0.0
    inv = tl.where(has_key, 1.0 / tl.where(has_key, l_sum, 1.0), 0.0)
    out = acc * inv[:, None]
    lse = tl.where(has_key, (m + tl.math.log2(tl.where(has_key, l_sum, 1.0))) * LN2, float("inf"))
    o_ptrs = OUT + (b * Tq + offs_q[:, None]) * Dv + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b * Tq + offs_q, lse, mask=q_ok)


@triton.jit
def _weights_kernel(
    SCORES, LSE, W, Tq, Tk,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # a_ij = exp(e_ij - lse_i): masked scores (-inf) and empty rows (lse = +inf) give 0.
    pid_q = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < Tq
    lse2 = tl.load(LSE + b * Tq + offs_q, mask=q_ok, other=float("inf")) * LOG2E
    for k0 in range(0, Tk, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        io_mask = q_ok[:, None] & (offs_k < Tk)[None, :]
        ptrs = (b * Tq + offs_q[:, None]) * Tk + offs_k[None, :]
        s = tl.load(SCORES + ptrs, mask=io_mask, other=float("-inf"))
        w = tl.math.exp2(s * LOG2E - lse2[:, None])
        tl.store(W + ptrs, w.to(W.dtype.element_ty), mask=io_mask)


@triton.jit
def _bwd_dvalue_kernel(
    Q, K, VAL, V, MASK, DO, GW, LSE, P, DP, DVAL,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svd, sv, smb, smt,
    sdob, sdot, sdod, sgwb, sgwt, sgwk,
    Tq, Tk, H, Dv,
    HAS_MASK: tl.constexpr, HAS_GW: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    pid_k = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < Tk
    offs_d = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < Dv
    q_ptr = Q + b * sqb
    k_ptr = K + b * skb
    allowed = _key_allowed(MASK + b * smb, offs_k, k_ok, smt, HAS_MASK)
    val = tl.load(
        VAL + b * svb + offs_k[:, None] * svt + offs_d[None, :] * svd,
        mask=k_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    dval = tl.zeros([BLOCK_K, BLOCK_DV], dtype=tl.float32)
    # Not skipped here: any data-dependent bound or branch around this loop made the kept configs
    # spill on sm_90 (docs/design.md); padding keys get a = 0 from `allowed`.
    for q0 in range(0, Tq, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        q_ok = offs_q < Tq
        s = _score_tile(
            q_ptr, k_ptr, V, offs_q, q_ok, offs_k, k_ok, H, sqt, sqh, skt, skh, sv,
            BLOCK_Q, BLOCK_K, BLOCK_H,
        )  # fmt: skip
        # Rows without a key have lse = +inf: exp2(-inf) = 0, so they contribute nothing.
        lse2 = tl.load(LSE + b * Tq + offs_q, mask=q_ok, other=float("inf")) * LOG2E
        p = tl.math.exp2(s * LOG2E - lse2[:, None])
        p = tl.where(allowed[None, :], p, 0.0)
        do = tl.load(
            DO + b * sdob + offs_q[:, None] * sdot + offs_d[None, :] * sdod,
            mask=q_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        dval += _dot(tl.trans(p.to(do.dtype)), do, DOT_PRECISION, UPCAST_DOT)
        dp = _dot(do, tl.trans(val.to(do.dtype)), DOT_PRECISION, UPCAST_DOT)
        io_mask = q_ok[:, None] & k_ok[None, :]
        if HAS_GW:
            gw = tl.load(
                GW + b * sgwb + offs_q[:, None] * sgwt + offs_k[None, :] * sgwk, mask=io_mask, other=0.0
            )
            dp += gw.to(tl.float32)
        pg_offs = (b * Tq + offs_q[:, None]) * Tk + offs_k[None, :]
        tl.store(P + pg_offs, p, mask=io_mask)
        tl.store(DP + pg_offs, dp, mask=io_mask)
    dval_ptrs = DVAL + (b * Tk + offs_k[:, None]) * Dv + offs_d[None, :]
    tl.store(dval_ptrs, dval.to(DVAL.dtype.element_ty), mask=k_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_dscore_kernel(
    P, DP, Tq, Tk,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Three passes over a row block: r = sum_j a_ij, Delta = sum_j (a_ij / r) dP_ij, then dS.
    pid_q = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < Tq
    row = (b * Tq + offs_q[:, None]) * Tk
    r = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for k0 in range(0, Tk, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        io_mask = q_ok[:, None] & (offs_k < Tk)[None, :]
        r += tl.sum(tl.load(P + row + offs_k[None, :], mask=io_mask, other=0.0), axis=1)
    # a row without a key has r = 0: its dS is 0
    inv_r = tl.where(r > 0.0, 1.0 / tl.where(r > 0.0, r, 1.0), 0.0)
    delta = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for k0 in range(0, Tk, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        io_mask = q_ok[:, None] & (offs_k < Tk)[None, :]
        p = tl.load(P + row + offs_k[None, :], mask=io_mask, other=0.0) * inv_r[:, None]
        dp = tl.load(DP + row + offs_k[None, :], mask=io_mask, other=0.0)
        delta += tl.sum(p * dp, axis=1)
    # dS overwrites dP, which the passes above read: order their reads before these writes.
    tl.debug_barrier()
    for k0 in range(0, Tk, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        io_mask = q_ok[:, None] & (offs_k < Tk)[None, :]
        p = tl.load(P + row + offs_k[None, :], mask=io_mask, other=0.0) * inv_r[:, None]
        dp = tl.load(DP + row + offs_k[None, :], mask=io_mask, other=0.0)
        tl.store(DP + row + offs_k[None, :], p * (dp - delta[:, None]), mask=io_mask)


@triton.jit
def _bwd_dk_kernel(
    Q, K, V, DS, DK, DV_PART,
    sqb, sqt, sqh, skb, skt, skh, sv,
    Tq, Tk, H,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    pid_k = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < Tk
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    kh_mask = k_ok[:, None] & h_ok[None, :]
    k = tl.load(K + b * skb + offs_k[:, None] * skt + offs_h[None, :] * skh, mask=kh_mask, other=0.0)
    k = k.to(tl.float32)
    vv = tl.load(V + offs_h * sv, mask=h_ok, other=0.0).to(tl.float32)
    gk = tl.zeros([BLOCK_K, BLOCK_H], dtype=tl.float32)  # sum_i dS_ij (1 - t^2)
    gv = tl.zeros([BLOCK_K, BLOCK_H], dtype=tl.float32)  # sum_i dS_ij t
    # not skipped, as in the dvalue kernel: dS is 0 for padding keys
    for q0 in range(0, Tq, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        q_ok = offs_q < Tq
        q = tl.load(
            Q + b * sqb + offs_q[:, None] * sqt + offs_h[None, :] * sqh,
            mask=q_ok[:, None] & h_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        # dS is 0 outside the valid tile (and for padding keys), so padded lanes add nothing.
        ds = tl.load(
            DS + (b * Tq + offs_q[:, None]) * Tk + offs_k[None, :],
            mask=q_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        t = _tanh(q[:, None, :] + k[None, :, :])
        gk += tl.sum(ds[:, :, None] * (1.0 - t * t), axis=0)
        gv += tl.sum(ds[:, :, None] * t, axis=0)
    rows = b * Tk + offs_k[:, None]
    tl.store(DK + rows * H + offs_h[None, :], (gk * vv[None, :]).to(DK.dtype.element_ty), mask=kh_mask)
    tl.store(DV_PART + rows * H + offs_h[None, :], gv, mask=kh_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, EXTENT, DS, DQ,
    sqb, sqt, sqh, skb, skt, skh, sv,
    Tq, Tk, H,
    HAS_MASK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    pid_q = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < Tq
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    qh_mask = q_ok[:, None] & h_ok[None, :]
    q = tl.load(Q + b * sqb + offs_q[:, None] * sqt + offs_h[None, :] * sqh, mask=qh_mask, other=0.0)
    q = q.to(tl.float32)
    vv = tl.load(V + offs_h * sv, mask=h_ok, other=0.0).to(tl.float32)
    gq = tl.zeros([BLOCK_Q, BLOCK_H], dtype=tl.float32)
    lo, hi = _key_extent(EXTENT, b, Tk, HAS_MASK)  # dS is 0 outside it
    for k0 in range((lo // BLOCK_K) * BLOCK_K, hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < Tk
        k = tl.load(
            K + b * skb + offs_k[:, None] * skt + offs_h[None, :] * skh,
            mask=k_ok[:, None] & h_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        ds = tl.load(
            DS + (b * Tq + offs_q[:, None]) * Tk + offs_k[None, :],
            mask=q_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        t = _tanh(q[:, None, :] + k[None, :, :])
        gq += tl.sum(ds[:, :, None] * (1.0 - t * t), axis=1)
    ptrs = DQ + (b * Tq + offs_q[:, None]) * H + offs_h[None, :]
    tl.store(ptrs, (gq * vv[None, :]).to(DQ.dtype.element_ty), mask=qh_mask)


# -- autotune configs ----------------------------------------------------------------------------
# The 3-D tanh tile [BLOCK_Q, BLOCK_K, BLOCK_H] lives in registers: configs keep it at 4K-8K
# elements. The interpreter gets one config: benchmarking configs there would only cost time,
# and fewer, larger blocks run faster through numpy.

# Largest fp32 [rows, BLOCK_DV] accumulator (forward context, backward dvalue) a config may hold:
# compiled for sm_90 with Dv = 512 (cuobjdump --dump-resource-usage), 32 x 512 spills to the
# stack (2 KB in the dvalue kernel) while 16 x 512 does not, so long value vectors get short
# row blocks.
_MAX_ACC = 8192


def _configs(tiles, warps=(4, 8), stages=(2,), exclude=()):
    """Every tile x warps x stages, less the (BLOCK_Q, BLOCK_K, BLOCK_H, warps) in ``exclude``."""
    return [
        triton.Config(dict(t), num_warps=w, num_stages=s)
        for t in tiles
        for w in warps
        for s in stages
        if (t["BLOCK_Q"], t["BLOCK_K"], t["BLOCK_H"], w) not in exclude
    ]


# Configs that left a stack frame on sm_90 (bench/triton_resources.py), 8-24 bytes each: the
# forward's 16 x 16 x 16 tile with 4 warps (bf16, Dv = 64) and 16 x 32 x 8 with 8 warps (Dv = 512);
# dvalue's 16-row tiles with 4 warps (fp16, Dv = 128) and 16 x 16 x 16 at any warp count
# (Dv = 512, 384 bytes), where 16 x 32 x 8 with 8 warps compiles clean.
_FWD_EXCLUDE = {(16, 16, 16, 4), (16, 32, 8, 8)}
_DVALUE_EXCLUDE = {(16, 32, 8, 4), (16, 16, 16, 4), (16, 16, 16, 8)}
# triton 3.6 (the GPU machine's) leaves an 8-byte stack frame here at T = H = Dv = 512; 3.8 does not
_DK_EXCLUDE = {(32, 32, 8, 4)}


def _prune(acc_rows: str | None = None):
    """Drops configs whose blocks exceed the (power-of-two rounded, at least 16) problem, or whose
    [acc_rows, BLOCK_DV] accumulator exceeds _MAX_ACC; keeps at least the smallest config."""
    sizes = {"BLOCK_Q": "Tq", "BLOCK_K": "Tk", "BLOCK_H": "H"}

    def prune(configs, named_args, **kwargs):
        # 16: the smallest block of a tl.dot operand, and of every config
        limits = {name: max(16, triton.next_power_of_2(int(named_args[arg]))) for name, arg in sizes.items()}
        kept = [c for c in configs if all(c.kwargs[name] <= limits[name] for name in limits)]
        if acc_rows is not None:
            dv_block = kwargs.get("BLOCK_DV", named_args.get("BLOCK_DV", 16))
            kept = [c for c in kept if c.kwargs[acc_rows] * dv_block <= _MAX_ACC]
        if not kept:
            kept = [
                min(configs, key=lambda c: c.kwargs["BLOCK_Q"] * c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_H"])
            ]
        return kept

    return prune


# the interpreter's one config: fewer, larger blocks run faster through numpy
_INTERPRET_CONFIG = triton.Config({"BLOCK_Q": 16, "BLOCK_K": 32, "BLOCK_H": 32}, num_warps=4, num_stages=1)

_SCORE_TILES = [
    {"BLOCK_Q": 64, "BLOCK_K": 32, "BLOCK_H": 4},
    {"BLOCK_Q": 32, "BLOCK_K": 32, "BLOCK_H": 8},
    {"BLOCK_Q": 64, "BLOCK_K": 64, "BLOCK_H": 2},
    {"BLOCK_Q": 16, "BLOCK_K": 32, "BLOCK_H": 8},
    {"BLOCK_Q": 16, "BLOCK_K": 16, "BLOCK_H": 16},
]
_GRAD_TILES = [
    {"BLOCK_Q": 32, "BLOCK_K": 32, "BLOCK_H": 8},
    {"BLOCK_Q": 16, "BLOCK_K": 32, "BLOCK_H": 16},
    {"BLOCK_Q": 32, "BLOCK_K": 16, "BLOCK_H": 16},
    {"BLOCK_Q": 64, "BLOCK_K": 32, "BLOCK_H": 4},
]


def _tuned(fn, tiles, key, prune, exclude=()) -> Tuned:
    return Tuned(
        fn, _configs(tiles, exclude=exclude), key=key, prune=prune, interpret_config=_INTERPRET_CONFIG
    )


_fwd = _tuned(
    _fwd_kernel,
    _SCORE_TILES,
    ["Tq", "Tk", "H", "Dv", "HAS_MASK", "WRITE_SCORES"],
    _prune("BLOCK_Q"),
    _FWD_EXCLUDE,
)
_bwd_dvalue = _tuned(
    _bwd_dvalue_kernel,
    _SCORE_TILES,
    ["Tq", "Tk", "H", "Dv", "HAS_MASK", "HAS_GW"],
    _prune("BLOCK_K"),
    _DVALUE_EXCLUDE,
)
_bwd_dk = _tuned(_bwd_dk_kernel, _GRAD_TILES, ["Tq", "Tk", "H"], _prune(), _DK_EXCLUDE)
_bwd_dq = _tuned(_bwd_dq_kernel, _GRAD_TILES, ["Tq", "Tk", "H", "HAS_MASK"], _prune())

# Elementwise/row kernels: fixed blocks, memory bound.
_ROW_BLOCK_Q = 16
_ROW_BLOCK = 64


# -- launchers -----------------------------------------------------------------------------------


def _launch(kernel, grid, *args, **kwargs) -> None:
    # a Tuned kernel (autotuned, or its one fixed config) or a plain jit kernel; both skip the
    # fake tensors of a traced call under the interpreter (kernels/_glue.py)
    if isinstance(kernel, Tuned):
        kernel[grid](*args, **kwargs)
    else:
        launch_kernel(kernel, grid, *args, **kwargs)


def _check(query: Tensor, key: Tensor, value: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> None:
    """What the kernels need beyond pyattn.ops' shared checks (the ops may be called directly)."""
    if query.dtype not in _DTYPES:
        raise TypeError(
            f"additive_attention (triton): 'query' must be float32, float16 or bfloat16, got {query.dtype}"
        )
    for name, t in (("key", key), ("value", value), ("v", v)):
        if t.dtype != query.dtype:
            raise TypeError(
                f"additive_attention (triton): '{name}' dtype {t.dtype} differs from query's {query.dtype}"
            )
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3 or v.dim() != 1:
        raise ValueError(
            "additive_attention (triton): expected query (B, Tq, H), key (B, Tk, H), "
            "value (B, Tk, Dv), v (H,), "
            f"got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}, {tuple(v.shape)}"
        )
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        raise TypeError(
            f"additive_attention (triton): 'key_padding_mask' must be bool, got {key_padding_mask.dtype}"
        )


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not drop to tf32 in tl.dot: the tests hold them to fp32 accuracy.
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast_dot(dtype: torch.dtype) -> bool:
    return _INTERPRET and dtype == torch.bfloat16


def _mask_args(key_padding_mask: Tensor | None, query: Tensor) -> tuple[Tensor, int, int]:
    if key_padding_mask is None:
        return query, 0, 0  # any pointer: HAS_MASK=False never reads it
    return key_padding_mask, key_padding_mask.stride(0), key_padding_mask.stride(1)


def _key_extents(key_padding_mask: Tensor | None, query: Tensor) -> Tensor:
    """(B, 2) int32 [lo, hi) per batch row: its first and one past its last non-padding key, (0, 0)
    for a row of padding only (kernels' _key_extent). Computed on the device, no host sync."""
    if key_padding_mask is None:
        return query  # any pointer: HAS_MASK=False never reads it
    keep = ~key_padding_mask
    Tk = keep.shape[1]
    lo = keep.to(torch.int32).argmax(1)  # the first maximum: the first kept key
    hi = Tk - keep.flip(1).to(torch.int32).argmax(1)
    any_key = keep.any(1)
    return torch.stack([lo * any_key, hi * any_key], 1).to(torch.int32).contiguous()


def additive_attention_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    return_weights: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launches the fused forward.

    Arguments:
        query: (B, Tq, H); key: (B, Tk, H); value: (B, Tk, Dv); v: (H,); one dtype out of
            float32, float16, bfloat16, any strides.
        key_padding_mask: optional (B, Tk) bool, True = padding.
        return_weights: also compute the attention weights.
    Returns:
        out (B, Tq, Dv) in the input dtype; lse (B, Tq) float32, natural log, +inf for a row with
        no key; weights (B, Tq, Tk) in the input dtype when ``return_weights``, else shape (0,).
    """
    _check(query, key, value, v, key_padding_mask)
    B, Tq, H = query.shape
    Tk, Dv = value.shape[1], value.shape[2]
    dev = query.device
    out = torch.empty((B, Tq, Dv), dtype=query.dtype, device=dev)
    lse = torch.empty((B, Tq), dtype=torch.float32, device=dev)
    weights = torch.empty((B, Tq, Tk) if return_weights else (0,), dtype=query.dtype, device=dev)
    if B * Tq == 0:
        return out, lse, weights
    if Tk == 0:  # no key at all: the empty-row convention, without launching an empty loop
        out.zero_()
        lse.fill_(float("inf"))
        return out, lse, weights

    # skipped key blocks (outside a row's key extent) leave their scores at this -inf
    scores = torch.full(
        (B, Tq, Tk) if return_weights else (1,), float("-inf"), dtype=torch.float32, device=dev
    )
    mask, smb, smt = _mask_args(key_padding_mask, query)
    extent = _key_extents(key_padding_mask, query)
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_Q"]), B)  # noqa: E731
    _launch(
        _fwd, grid,
        query, key, value, v, mask, extent, out, lse, scores,
        *query.stride(), *key.stride(), *value.stride(), v.stride(0), smb, smt,
        Tq, Tk, H, Dv,
        HAS_MASK=key_padding_mask is not None, WRITE_SCORES=return_weights,
        DOT_PRECISION=_dot_precision(query.dtype), UPCAST_DOT=_upcast_dot(query.dtype),
        BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
    )  # fmt: skip
    if return_weights:
        rows = (triton.cdiv(Tq, _ROW_BLOCK_Q), B)
        _launch(_weights_kernel, rows, scores, lse, weights, Tq, Tk, BLOCK_Q=_ROW_BLOCK_Q, BLOCK_K=_ROW_BLOCK)
    return out, lse, weights


def additive_attention_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    grad_weights: Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launches the backward (no atomics: bitwise reproducible).

    Arguments:
        grad_out: (B, Tq, Dv), the gradient of ``out``.
        query, key, value, v, key_padding_mask: the forward's inputs.
        out: (B, Tq, Dv) and lse: (B, Tq) float32, from the forward.
        grad_weights, weights: optional (B, Tq, Tk), the gradient of the returned weights and
            the weights; both or neither.
    Returns:
        grad_query (B, Tq, H), grad_key (B, Tk, H), grad_value (B, Tk, Dv), grad_v (H,), in the
        input dtype.
    """
    _check(query, key, value, v, key_padding_mask)
    if (grad_weights is None) != (weights is None):
        raise ValueError("additive_attention (triton): 'grad_weights' and 'weights' must be given together")
    B, Tq, H = query.shape
    Tk, Dv = value.shape[1], value.shape[2]
    dev, dtype = query.device, query.dtype
    if tuple(grad_out.shape) != (B, Tq, Dv) or tuple(out.shape) != (B, Tq, Dv):
        raise ValueError(
            f"additive_attention (triton): 'grad_out' and 'out' must be (B={B}, Tq={Tq}, Dv={Dv}), "
            f"got {tuple(grad_out.shape)} and {tuple(out.shape)}"
        )
    if grad_weights is not None and tuple(grad_weights.shape) != (B, Tq, Tk):
        raise ValueError(
            f"additive_attention (triton): 'grad_weights' must be (B={B}, Tq={Tq}, Tk={Tk}), "
            f"got {tuple(grad_weights.shape)}"
        )
    if tuple(lse.shape) != (B, Tq):
        raise ValueError(
            f"additive_attention (triton): 'lse' must be (B={B}, Tq={Tq}), got {tuple(lse.shape)}"
        )
    if B * Tq == 0 or Tk == 0:
        return (
            torch.zeros((B, Tq, H), dtype=dtype, device=dev),
            torch.zeros((B, Tk, H), dtype=dtype, device=dev),
            torch.zeros((B, Tk, Dv), dtype=dtype, device=dev),
            torch.zeros((H,), dtype=dtype, device=dev),
        )
    lse = lse.to(torch.float32).contiguous()
    has_gw = grad_weights is not None
    # The weights themselves are not needed: their term of Delta is summed from dP (see top).
    gw = grad_weights if has_gw else grad_out
    gw_strides = grad_weights.stride() if has_gw else (0, 0, 0)
    mask, smb, smt = _mask_args(key_padding_mask, query)
    extent = _key_extents(key_padding_mask, query)

    prob = torch.empty((B, Tq, Tk), dtype=torch.float32, device=dev)
    ds = torch.empty((B, Tq, Tk), dtype=torch.float32, device=dev)  # dP, then dS in place
    dvalue = torch.empty((B, Tk, Dv), dtype=dtype, device=dev)
    _launch(
        _bwd_dvalue, lambda meta: (triton.cdiv(Tk, meta["BLOCK_K"]), B),
        query, key, value, v, mask, grad_out, gw, lse, prob, ds, dvalue,
        *query.stride(), *key.stride(), *value.stride(), v.stride(0), smb, smt,
        *grad_out.stride(), *gw_strides,
        Tq, Tk, H, Dv,
        HAS_MASK=key_padding_mask is not None, HAS_GW=has_gw,
        DOT_PRECISION=_dot_precision(dtype), UPCAST_DOT=_upcast_dot(dtype),
        BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
    )  # fmt: skip

    rows = (triton.cdiv(Tq, _ROW_BLOCK_Q), B)
    _launch(_bwd_dscore_kernel, rows, prob, ds, Tq, Tk, BLOCK_Q=_ROW_BLOCK_Q, BLOCK_K=_ROW_BLOCK)
    del prob

    dkey = torch.empty((B, Tk, H), dtype=dtype, device=dev)
    dquery = torch.empty((B, Tq, H), dtype=dtype, device=dev)
    # Per-key partial sums of dv, reduced below by torch in a fixed order (deterministic); by
    # key rather than by key block, so their layout does not depend on the autotuned block.
    dv_part = torch.empty((B, Tk, H), dtype=torch.float32, device=dev)
    if H > 0:  # H = 0 leaves nothing to compute, and would be an empty grid
        _launch(
            _bwd_dk, lambda meta: (triton.cdiv(Tk, meta["BLOCK_K"]), triton.cdiv(H, meta["BLOCK_H"]), B),
            query, key, v, ds, dkey, dv_part,
            *query.stride(), *key.stride(), v.stride(0),
            Tq, Tk, H,
        )  # fmt: skip
        _launch(
            _bwd_dq, lambda meta: (triton.cdiv(Tq, meta["BLOCK_Q"]), triton.cdiv(H, meta["BLOCK_H"]), B),
            query, key, v, extent, ds, dquery,
            *query.stride(), *key.stride(), v.stride(0),
            Tq, Tk, H,
            HAS_MASK=key_padding_mask is not None,
        )  # fmt: skip
    dv = dv_part.sum(dim=(0, 1)).to(dtype)
    return dquery, dkey, dvalue, dv


# -- glue: the custom ops (the schemas of csrc/registration.cpp, kernels/_glue.py) ---------------


@define_op("additive_attention_fwd")
def additive_attention_fwd_triton(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    return_weights: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return additive_attention_forward(query, key, value, v, key_padding_mask, return_weights)


@define_op("additive_attention_bwd")
def additive_attention_bwd_triton(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    grad_weights: Tensor | None,
    weights: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return additive_attention_backward(
        grad_out, query, key, value, v, key_padding_mask, out, lse, grad_weights, weights
    )
