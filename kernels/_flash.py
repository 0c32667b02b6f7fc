"""The flash-attention kernels that sdpa (kernels/sdpa.py) and varlen attention
(kernels/varlen_attention.py) both launch, forward and backward, with their autotune configs and
the launch helpers they share (a packed batch is the same kernel with ``VARLEN``).

    S = scale * Q K^T + mask          (bool mask / causality: -inf where attention is forbidden)
    P = softmax_j(S)                  (a row with no allowed key: P = 0, O = 0, lse = +inf)
    O = (Z o P) V                     Z_ij = keep_ij / (1 - p), keep_ij = rand(seed, offset + e) >= p
    lse_i = log sum_j exp(S_ij)       natural log, float32

    backward:  Delta_i = dO_i . O_i     dP = dO V^T
               dS = P o (Z o dP - Delta)
               dQ = scale dS K          dK = scale dS^T Q          dV = (Z o P)^T dO

The attention variants (docs/design.md, "Attention variants"), each behind a constexpr flag:

    S = scale Q K^T -> c tanh(S / c) -> - slope_h |i + Lk - Lq - j| -> masks, and the window:
        d - left <= j <= d + right, d = i (upper-left causal) or i + Lk - Lq (otherwise)
    P = softmax_j over the row and exp(sink_h) (one more term, no value); lse includes it
    backward: dS = P o (Z o dP - Delta) o (1 - tanh^2) with the softcap; the sink's own
        gradient -sum_i P_sink,i Delta_i is pyattn/ops/_common.py's sink_grad (from lse)

where e = ((b * Hq + h) * Lq + i) * Lk + j is the element's index in the (B, Hq, Lq, Lk) score
tensor, so the dropout keep-mask is the one of csrc/philox.h and pyattn.reference.dropout_keep_mask
(``tl.rand`` is the same Philox-4x32-10 with the 64-bit counter split into two words).

The forward streams key blocks with an online softmax in base 2 (``exp2``, with log2(e) folded
into the score scale), saves the row lse, and splits the key loop in two stages: blocks that need
no element masking (fully inside the keys and, when causal, fully left of the diagonal), then the
blocks on the diagonal / the ragged end; blocks right of the diagonal are skipped (with a window,
also the blocks left of the band; the blocks the band cuts on its left join the masked loop). The
backward
computes Delta first, then dK/dV in one pass over key blocks (a program owns a key block of one
kv head and loops over the query heads of its GQA group, so no atomics and a deterministic sum)
and dQ in a second pass over query blocks, recomputing P from the lse and Z from (seed, offset).

References: Triton tutorial 06-fused-attention; Dao, "FlashAttention-2: Faster Attention with
Better Parallelism and Work Partitioning" (2023), algorithms 1-2.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._glue import INTERPRET, Tuned, is_traced
from ._math import tanh as _tanh

# log2(e): scores are kept in base 2 so that the softmax uses exp2 (the kernels spell it out,
# and ln(2) = 0.693..., as literals: a plain Python global cannot be read inside @triton.jit)
LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
# Offsets inside one (batch, head) slice are int32 in the kernels (the batch/head base is int64).
_MAX_SLICE_OFFSET = 2**31 - 1

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


# -- kernels ----------------------------------------------------------------------------------------


@triton.jit
def _masked_scores(
    s,
    mask_base,
    oq,
    ok,
    Lq,
    Lk,
    stride_mm,
    stride_mn,
    causal_off,
    win_off,
    window_left,
    window_right,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_ROW: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """Scores (log2 units) with the attention mask, bounds, causality and the window applied
    (query i sees keys j <= i + causal_off: 0 upper-left, as torch's is_causal; Lk - Lq
    lower-right; and d - window_left <= j <= d + window_right, d = i + win_off; an unbounded side
    comes as a bound longer than the sequences, so no branch on -1 here).

    ``oq`` / ``ok`` are the query / key indices broadcast to the tile's layout ((M, 1)/(1, N) in
    the forward and dQ passes, (1, M)/(N, 1) in the transposed dK/dV pass)."""
    if MASK_KIND != 0:
        if MASK_ROW:
            # the mask does not vary over queries (key padding): load one row of keys
            mt = tl.load(mask_base + ok * stride_mn, mask=ok < Lk, other=0)
        else:
            mt = tl.load(mask_base + oq * stride_mm + ok * stride_mn, mask=(oq < Lq) & (ok < Lk), other=0)
        if MASK_KIND == 1:
            s = tl.where(mt != 0, s, float("-inf"))
        else:
            s = s + mt.to(tl.float32) * 1.4426950408889634
    if MASKED:
        allowed = (oq < Lq) & (ok < Lk)
        if IS_CAUSAL:
            allowed = allowed & (ok <= oq + causal_off)
        if HAS_WINDOW:
            d = oq + win_off
            allowed = allowed & (ok >= d - window_left) & (ok <= d + window_right)
        s = tl.where(allowed, s, float("-inf"))
    return s


@triton.jit
def _variant_scores(
    s, oq, ok, alibi_off, slope2, softcap2, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr
):
    """Scores (log2 units) after the softcap and ALiBi, before the masks (docs/design.md,
    "Attention variants"), and tanh(s / c) for the softcap's backward (1 - tanh^2). In log2 units
    the cap is c log2(e) (``softcap2``) and the slope slope log2(e) (``slope2``): c tanh(s / c)
    scales with s. ALiBi's distance is |i + Lk - Lq - j| (``alibi_off`` = Lk - Lq)."""
    t = s
    if HAS_SOFTCAP:
        t = _tanh(s * (1.0 / softcap2))
        s = softcap2 * t
    if HAS_ALIBI:
        s = s - slope2 * tl.abs(oq + alibi_off - ok).to(tl.float32)
    return s, t


@triton.jit
def _key_range(start_m, Lk, causal_off, win_off, window_left, window_right,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):  # fmt: skip
    """The key blocks of the query block at start_m, as (lo, full_lo, full_end, hi): keys
    [lo, full_lo) and [full_end, hi) need element masking, [full_lo, full_end) none; keys
    outside [lo, hi) are invisible to every row of the block (never visited). Without a window
    lo = full_lo = 0 (the first range is not even compiled)."""
    if IS_CAUSAL:
        # keys past the block's last query's diagonal are invisible to all of it: skipped
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_off, 0), Lk)
        # blocks with every key on or left of the block's first query's diagonal (and inside Lk)
        # need no masking
        full_end = tl.minimum(tl.maximum(start_m + 1 + causal_off, 0) // BLOCK_N, Lk // BLOCK_N) * BLOCK_N
    else:
        hi = Lk
        full_end = (Lk // BLOCK_N) * BLOCK_N
    lo = 0
    full_lo = 0
    if HAS_WINDOW:
        # the band of row i is [i + win_off - left, i + win_off + right]; both ends grow with i,
        # so the block's first row bounds what every row allows, its last row what any row sees
        d_first = start_m + win_off
        d_last = d_first + BLOCK_M - 1
        hi = tl.maximum(tl.minimum(hi, d_last + window_right + 1), 0)
        fe = (tl.maximum(tl.minimum(full_end, d_first + window_right + 1), 0) // BLOCK_N) * BLOCK_N
        lo = (tl.minimum(tl.maximum(d_first - window_left, 0), hi) // BLOCK_N) * BLOCK_N
        fl = tl.cdiv(tl.maximum(d_last - window_left, 0), BLOCK_N) * BLOCK_N
        full_lo = tl.maximum(lo, tl.minimum(fl, fe))
        full_end = tl.maximum(full_lo, fe)
    return lo, full_lo, full_end, hi


@triton.jit
def _variant_setup(Lq, Lk, causal_off, Alibi, stride_alibi_b, b, h, IS_CAUSAL: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr):  # fmt: skip
    """(win_off, alibi_off, slope2) of (batch entry / sequence b, query head h): the window's
    diagonal is d = i + win_off (0 with upper-left causality, Lk - Lq otherwise: lower-right and
    none), ALiBi's i + Lk - Lq; the head's slope in log2 units."""
    win_off = 0
    if HAS_WINDOW:
        if IS_CAUSAL:
            win_off = causal_off
        else:
            win_off = Lk - Lq
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + b * stride_alibi_b + h).to(tl.float32) * 1.4426950408889634
    return win_off, Lk - Lq, slope2


@triton.jit
def _seq_bounds(CuSeqQ, CuSeqK, b, h, bh, L_own, L_other, causal_off, total, VARLEN: tl.constexpr,
                KEYS: tl.constexpr = False):  # fmt: skip
    """(q_start, k_start, Lq, Lk, causal_off, row) of batch entry b: without VARLEN, the
    batch's own lengths and row = bh * L_own (the first row of (b, h) in the lse / gradient
    layouts); with VARLEN, sequence b's rows cu[b] .. cu[b + 1] of the packed tensors, its
    lengths, its lower-right offset (causal_off is then 1 for lower-right, 0 otherwise) and
    row = h * total + start ((H, total) layouts). KEYS: L_own / total / row are the keys'."""
    if VARLEN:
        q_start = tl.load(CuSeqQ + b).to(tl.int64)
        k_start = tl.load(CuSeqK + b).to(tl.int64)
        Lq = tl.load(CuSeqQ + b + 1) - tl.load(CuSeqQ + b)
        Lk = tl.load(CuSeqK + b + 1) - tl.load(CuSeqK + b)
        off = causal_off * (Lk - Lq)
        if KEYS:
            row = h * total + k_start
        else:
            row = h * total + q_start
    else:
        q_start = 0
        k_start = 0
        if KEYS:
            Lq = L_other
            Lk = L_own
        else:
            Lq = L_own
            Lk = L_other
        off = causal_off
        row = bh * L_own
    return q_start, k_start, Lq, Lk, off, row


@triton.jit
def _masked_span(lo, full_lo, full_end, hi, HAS_WINDOW: tl.constexpr):
    """The key range of a query block's masked loop: with a window, the blocks the band cuts on
    the left, [lo, full_lo), and on the right, [full_end, hi), as one loop that jumps over the
    unmasked middle; else the causal diagonal's blocks [full_end, hi)."""
    if HAS_WINDOW:
        m_lo = lo
        m_hi = hi - (full_end - full_lo)
    else:
        m_lo = full_end
        m_hi = hi
    return m_lo, m_hi


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    mask_base,
    offs_m,
    lo,
    hi,
    split,
    gap,
    Lq,
    Lk,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_mm,
    stride_mn,
    qk_scale,
    seed,
    drop_base,
    drop_lk,
    dropout_p,
    causal_off,
    win_off,
    window_left,
    window_right,
    alibi_off,
    slope2,
    softcap2,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_ROW: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        if HAS_WINDOW and MASKED:
            # one loop over both blocks the band cuts: [lo, split) then, past the unmasked
            # middle, [split + gap, ...): as many loops as without a window (a third one spilled
            # the D = 128 dQ kernel on sm_90)
            n0 = start_n + tl.where(start_n >= split, gap, 0)
        else:
            n0 = start_n
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # (D, N)
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd  # (N, Dv)
        if MASKED:
            kt = tl.load(kt_ptrs, mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < HEAD_DIM), other=0.0)
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        else:
            kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        s, _t = _variant_scores(
            s, offs_m[:, None], offs_n[None, :], alibi_off, slope2, softcap2, HAS_SOFTCAP, HAS_ALIBI
        )
        s = _masked_scores(
            s, mask_base, offs_m[:, None], offs_n[None, :], Lq, Lk, stride_mm, stride_mn, causal_off,
            win_off, window_left, window_right, MASKED, IS_CAUSAL, MASK_KIND, MASK_ROW, HAS_WINDOW,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with nothing allowed yet keeps m = -inf; use 0 as its reference so that
        # exp2(-inf - ref) = 0 instead of NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            # l sums the weights before dropout (softmax first, dropout after)
            e = drop_base + offs_m[:, None].to(tl.int64) * drop_lk + offs_n[None, :]
            p = tl.where(tl.rand(seed, e) >= dropout_p, p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    Mask,
    Out,
    Lse,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    Hq,
    GROUP,
    Lq,
    Lk,
    qk_scale,
    dropout_p,
    drop_scale,
    seed,
    offset,
    causal_off,
    CuSeqQ,
    CuSeqK,
    total_q,
    total_k,
    drop_lq,
    drop_lk,
    Sinks,
    Alibi,
    stride_alibi_b,
    softcap2,
    window_left,
    window_right,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_ROW: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr = False,
    HAS_SOFTCAP: tl.constexpr = False,
    HAS_ALIBI: tl.constexpr = False,
    HAS_SINKS: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    hk = h // GROUP  # GQA: query head h reads kv head h // (Hq / Hkv)
    bh = b * Hq + h
    start_m = pid_m * BLOCK_M
    q_start, k_start, Lq, Lk, causal_off, row_q = _seq_bounds(
        CuSeqQ, CuSeqK, b, h, bh, Lq, Lk, causal_off, total_q, VARLEN
    )
    if VARLEN:
        if start_m >= Lq:  # past this sequence's end: nothing to compute
            return
    q_base = Q + b * stride_qb + q_start * stride_qm + h * stride_qh
    k_base = K + b * stride_kb + k_start * stride_kn + hk * stride_kh
    v_base = V + b * stride_vb + k_start * stride_vn + hk * stride_vh
    mask_base = Mask + b * stride_mb + h * stride_mh
    drop_base = offset + bh * drop_lq * drop_lk  # 64-bit: the score tensor may exceed 2^31 elements

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    win_off, alibi_off, slope2 = _variant_setup(
        Lq, Lk, causal_off, Alibi, stride_alibi_b, b, h, IS_CAUSAL, HAS_WINDOW, HAS_ALIBI
    )
    lo, full_lo, full_end, hi = _key_range(
        start_m, Lk, causal_off, win_off, window_left, window_right, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N
    )
    m_lo, m_hi = _masked_span(lo, full_lo, full_end, hi, HAS_WINDOW)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, full_lo, full_end, 0, 0, Lq, Lk,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, qk_scale,
        seed, drop_base, drop_lk, dropout_p, causal_off,
        win_off, window_left, window_right, alibi_off, slope2, softcap2,
        False, IS_CAUSAL, MASK_KIND, MASK_ROW, HAS_DROPOUT, DOT_PREC,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, m_lo, m_hi, full_lo, full_end - full_lo,
        Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, qk_scale,
        seed, drop_base, drop_lk, dropout_p, causal_off,
        win_off, window_left, window_right, alibi_off, slope2, softcap2,
        True, IS_CAUSAL, MASK_KIND, MASK_ROW, HAS_DROPOUT, DOT_PREC,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI,
    )  # fmt: skip

    if HAS_SINKS:
        # the sink closes the row (flash::close_with_sink of csrc/sdpa_math.h): one more term
        # exp(sink) in the denominator, no value; lse includes it, so the backward's
        # P = exp(S - lse) is already right. A row with no key has only its sink: out 0, lse =
        # sink; nothing at all (a -inf sink too): out 0, lse +inf.
        sink2 = tl.load(Sinks + h).to(tl.float32) * 1.4426950408889634
        big = tl.maximum(m_i, sink2)
        ref = tl.where(big == float("-inf"), 0.0, big)
        a = tl.where(m_i == float("-inf"), 0.0, tl.math.exp2(m_i - ref))
        total = l_i * a + tl.math.exp2(sink2 - ref)
        has_mass = total > 0.0
        t_safe = tl.where(has_mass, total, 1.0)
        out = acc * (tl.where(has_mass, drop_scale * a / t_safe, 0.0))[:, None]
        lse = tl.where(has_mass, (ref + tl.math.log2(t_safe)) * 0.6931471805599453, float("inf"))
    else:
        has_key = l_i > 0.0
        l_safe = tl.where(has_key, l_i, 1.0)
        # empty rows: output 0 (acc is 0 there) and lse +inf, so the backward's exp(s - lse) is 0
        out = acc * (tl.where(has_key, drop_scale / l_safe, 0.0))[:, None]
        lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("inf"))
    o_rows = (q_start + offs_m[:, None]) * stride_om
    o_ptrs = Out + b * stride_ob + h * stride_oh + o_rows + offs_dv[None, :] * stride_od
    tl.store(
        o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < HEAD_DIM_V)
    )
    tl.store(Lse + row_q + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def bwd_preprocess_kernel(
    Out,
    DO,
    Delta,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    Hq,
    Lq,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < Lq) & (offs_dv[None, :] < HEAD_DIM_V)
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
        mask=mask,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
        mask=mask,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + (b * Hq + h) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _bwd_dq_inner(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    mask_base,
    offs_m,
    lo,
    hi,
    split,
    gap,
    Lq,
    Lk,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_mm,
    stride_mn,
    qk_scale,
    seed,
    drop_base,
    drop_lk,
    dropout_p,
    drop_scale,
    causal_off,
    win_off,
    window_left,
    window_right,
    alibi_off,
    slope2,
    softcap2,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_ROW: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        if HAS_WINDOW and MASKED:
            # one loop over both blocks the band cuts: [lo, split) then, past the unmasked
            # middle, [split + gap, ...): as many loops as without a window (a third one spilled
            # the D = 128 dQ kernel on sm_90)
            n0 = start_n + tl.where(start_n >= split, gap, 0)
        else:
            n0 = start_n
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # (D, N)
        vt_ptrs = v_base + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd  # (Dv, N)
        if MASKED:
            kt = tl.load(kt_ptrs, mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < HEAD_DIM), other=0.0)
            vt = tl.load(vt_ptrs, mask=(offs_n[None, :] < Lk) & (offs_dv[:, None] < HEAD_DIM_V), other=0.0)
        else:
            kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            vt = tl.load(vt_ptrs, mask=offs_dv[:, None] < HEAD_DIM_V, other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        s, t = _variant_scores(
            s, offs_m[:, None], offs_n[None, :], alibi_off, slope2, softcap2, HAS_SOFTCAP, HAS_ALIBI
        )
        s = _masked_scores(
            s, mask_base, offs_m[:, None], offs_n[None, :], Lq, Lk, stride_mm, stride_mn, causal_off,
            win_off, window_left, window_right, MASKED, IS_CAUSAL, MASK_KIND, MASK_ROW, HAS_WINDOW,
        )  # fmt: skip
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=DOT_PREC)
        if HAS_DROPOUT:
            e = drop_base + offs_m[:, None].to(tl.int64) * drop_lk + offs_n[None, :]
            dp = tl.where(tl.rand(seed, e) >= dropout_p, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)  # through c tanh(s / c)
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    Mask,
    DO,
    Lse,
    Delta,
    DQ,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    Hq,
    GROUP,
    Lq,
    Lk,
    qk_scale,
    scale,
    dropout_p,
    drop_scale,
    seed,
    offset,
    causal_off,
    CuSeqQ,
    CuSeqK,
    total_q,
    total_k,
    drop_lq,
    drop_lk,
    Sinks,
    Alibi,
    stride_alibi_b,
    softcap2,
    window_left,
    window_right,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_ROW: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr = False,
    HAS_SOFTCAP: tl.constexpr = False,
    HAS_ALIBI: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    bh = b * Hq + h
    start_m = pid_m * BLOCK_M
    q_start, k_start, Lq, Lk, causal_off, row_q = _seq_bounds(
        CuSeqQ, CuSeqK, b, h, bh, Lq, Lk, causal_off, total_q, VARLEN
    )
    if VARLEN:
        if start_m >= Lq:
            return
    k_base = K + b * stride_kb + k_start * stride_kn + hk * stride_kh
    v_base = V + b * stride_vb + k_start * stride_vn + hk * stride_vh
    mask_base = Mask + b * stride_mb + h * stride_mh
    drop_base = offset + bh * drop_lq * drop_lk

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq
    q = tl.load(
        Q
        + b * stride_qb
        + h * stride_qh
        + (q_start + offs_m[:, None]) * stride_qm
        + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    do = tl.load(
        DO
        + b * stride_dob
        + h * stride_doh
        + (q_start + offs_m[:, None]) * stride_dom
        + offs_dv[None, :] * stride_dod,
        mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V),
        other=0.0,
    )
    # lse +inf (empty or padding rows) makes every recomputed P 0, hence zero gradients
    lse2 = tl.load(Lse + row_q + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + row_q + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    win_off, alibi_off, slope2 = _variant_setup(
        Lq, Lk, causal_off, Alibi, stride_alibi_b, b, h, IS_CAUSAL, HAS_WINDOW, HAS_ALIBI
    )
    lo, full_lo, full_end, hi = _key_range(
        start_m, Lk, causal_off, win_off, window_left, window_right, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N
    )
    m_lo, m_hi = _masked_span(lo, full_lo, full_end, hi, HAS_WINDOW)
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, full_lo, full_end, 0, 0, Lq, Lk,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, qk_scale,
        seed, drop_base, drop_lk, dropout_p, drop_scale, causal_off,
        win_off, window_left, window_right, alibi_off, slope2, softcap2,
        False, IS_CAUSAL, MASK_KIND, MASK_ROW, HAS_DROPOUT, DOT_PREC,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI,
    )  # fmt: skip
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, m_lo, m_hi, full_lo, full_end - full_lo,
        Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, qk_scale,
        seed, drop_base, drop_lk, dropout_p, drop_scale, causal_off,
        win_off, window_left, window_right, alibi_off, slope2, softcap2,
        True, IS_CAUSAL, MASK_KIND, MASK_ROW, HAS_DROPOUT, DOT_PREC,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI,
    )  # fmt: skip
    dq = dq * scale
    # DQ is contiguous (B, Hq, Lq, D), or (Hq, total_q, D) with VARLEN: row row_q + i
    dq_ptrs = DQ + (row_q + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _bwd_dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    mask_base,
    offs_n,
    lo,
    hi,
    Lq,
    Lk,
    stride_qm,
    stride_qd,
    stride_dom,
    stride_dod,
    stride_mm,
    stride_mn,
    qk_scale,
    seed,
    drop_base,
    drop_lk,
    dropout_p,
    drop_scale,
    causal_off,
    win_off,
    window_left,
    window_right,
    alibi_off,
    slope2,
    softcap2,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_ROW: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qt_ptrs = q_base + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd  # (D, M)
        do_ptrs = do_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod  # (M, Dv)
        if MASKED:
            qt = tl.load(qt_ptrs, mask=(offs_m[None, :] < Lq) & (offs_d[:, None] < HEAD_DIM), other=0.0)
            do = tl.load(do_ptrs, mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
            lse = tl.load(lse_base + offs_m, mask=offs_m < Lq, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < Lq, other=0.0)
        else:
            qt = tl.load(qt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            do = tl.load(do_ptrs, mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        st = tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale  # (N, M): S^T
        st, tt = _variant_scores(
            st, offs_m[None, :], offs_n[:, None], alibi_off, slope2, softcap2, HAS_SOFTCAP, HAS_ALIBI
        )
        st = _masked_scores(
            st, mask_base, offs_m[None, :], offs_n[:, None], Lq, Lk, stride_mm, stride_mn, causal_off,
            win_off, window_left, window_right, MASKED, IS_CAUSAL, MASK_KIND, MASK_ROW, HAS_WINDOW,
        )  # fmt: skip
        pt = tl.math.exp2(st - (lse * 1.4426950408889634)[None, :])
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (N, M): dP^T
        if HAS_DROPOUT:
            e = drop_base + offs_m[None, :].to(tl.int64) * drop_lk + offs_n[:, None]
            keep = tl.rand(seed, e) >= dropout_p
            dv += tl.dot(tl.where(keep, pt * drop_scale, 0.0).to(do.dtype), do, input_precision=DOT_PREC)
            dpt = tl.where(keep, dpt * drop_scale, 0.0)
        else:
            dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        if HAS_SOFTCAP:
            dst = dst * (1.0 - tt * tt)
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    Mask,
    DO,
    Lse,
    Delta,
    DK,
    DV,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    Hq,
    Hkv,
    GROUP,
    Lq,
    Lk,
    qk_scale,
    scale,
    dropout_p,
    drop_scale,
    seed,
    offset,
    causal_off,
    CuSeqQ,
    CuSeqK,
    total_q,
    total_k,
    drop_lq,
    drop_lk,
    Sinks,
    Alibi,
    stride_alibi_b,
    softcap2,
    window_left,
    window_right,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_ROW: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr = False,
    HAS_SOFTCAP: tl.constexpr = False,
    HAS_ALIBI: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    hk = tl.program_id(2).to(tl.int64)
    start_n = pid_n * BLOCK_N
    q_start, k_start, Lq, Lk, causal_off, row_k = _seq_bounds(
        CuSeqQ, CuSeqK, b, hk, b * Hkv + hk, Lk, Lq, causal_off, total_k, VARLEN, True
    )
    if VARLEN:
        if start_n >= Lk:
            return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < Lk
    k = tl.load(
        K
        + b * stride_kb
        + hk * stride_kh
        + (k_start + offs_n[:, None]) * stride_kn
        + offs_d[None, :] * stride_kd,
        mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    v = tl.load(
        V
        + b * stride_vb
        + hk * stride_vh
        + (k_start + offs_n[:, None]) * stride_vn
        + offs_dv[None, :] * stride_vd,
        mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V),
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    win_off, alibi_off, slope2 = _variant_setup(
        Lq, Lk, causal_off, Alibi, stride_alibi_b, b, hk, IS_CAUSAL, HAS_WINDOW, False
    )
    if HAS_WINDOW:
        # the rows that see some key of the block: from the first whose band's right end
        # (causal or window) reaches the block's first key, to the last whose left end reaches
        # its last key (csrc/sdpa_math.h Band::query_begin / query_end); rows outside are never
        # visited. lo..diag_end: rows whose right end cuts the block; diag_end..full_end: whole
        # query blocks that see every key; the rest up to q_end is cut by the left end.
        k_last = start_n + BLOCK_N - 1
        lo = start_n - win_off - window_right
        first_full = k_last - win_off - window_right
        if IS_CAUSAL:
            lo = tl.maximum(lo, start_n - causal_off)
            first_full = tl.maximum(first_full, k_last - causal_off)
        lo = tl.minimum(tl.maximum(lo, 0), Lq)
        q_end = tl.maximum(tl.minimum(k_last + 1 - win_off + window_left, Lq), lo)
        diag_end = tl.minimum(lo + tl.cdiv(tl.maximum(first_full - lo, 0), BLOCK_M) * BLOCK_M, q_end)
        last_full = tl.minimum(start_n - win_off + window_left + 1, Lq)
        full_end = diag_end + (tl.maximum(last_full - diag_end, 0) // BLOCK_M) * BLOCK_M
    else:
        q_end = Lq
        if IS_CAUSAL:
            # queries before the block's first key's diagonal (start_n - causal_off) see none of
            # it; from the first query that sees the block's last key on (start_n + BLOCK_N - 1 -
            # causal_off), no causal masking is needed; lo..diag_end is whole query blocks
            first = start_n - causal_off
            lo = tl.minimum(tl.maximum(first, 0), Lq)
            need = tl.maximum(first + BLOCK_N - 1 - lo, 0)
            diag_end = tl.minimum(lo + ((need + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, Lq)
        else:
            lo = 0
            diag_end = 0
        full_end = diag_end + (tl.maximum(Lq - diag_end, 0) // BLOCK_M) * BLOCK_M
    # Sum over the query heads of the GQA group inside the program: deterministic, no atomics.
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * Hq + h
        q_base = Q + b * stride_qb + q_start * stride_qm + h * stride_qh
        do_base = DO + b * stride_dob + q_start * stride_dom + h * stride_doh
        mask_base = Mask + b * stride_mb + h * stride_mh
        drop_base = offset + bh * drop_lq * drop_lk
        if VARLEN:
            row_q = h * total_q + q_start
        else:
            row_q = bh * Lq
        lse_base = Lse + row_q
        delta_base = Delta + row_q
        if HAS_ALIBI:
            slope_h = tl.load(Alibi + b * stride_alibi_b + h).to(tl.float32) * 1.4426950408889634
        else:
            slope_h = slope2
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, offs_n, lo, diag_end,
            Lq, Lk, stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn, qk_scale,
            seed, drop_base, drop_lk, dropout_p, drop_scale, causal_off,
            win_off, window_left, window_right, alibi_off, slope_h, softcap2,
            True, IS_CAUSAL, MASK_KIND, MASK_ROW, HAS_DROPOUT, DOT_PREC,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI,
        )  # fmt: skip
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, offs_n, diag_end, full_end,
            Lq, Lk, stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn, qk_scale,
            seed, drop_base, drop_lk, dropout_p, drop_scale, causal_off,
            win_off, window_left, window_right, alibi_off, slope_h, softcap2,
            False, IS_CAUSAL, MASK_KIND, MASK_ROW, HAS_DROPOUT, DOT_PREC,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI,
        )  # fmt: skip
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, offs_n,
            tl.maximum(full_end, lo), q_end,
            Lq, Lk, stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn, qk_scale,
            seed, drop_base, drop_lk, dropout_p, drop_scale, causal_off,
            win_off, window_left, window_right, alibi_off, slope_h, softcap2,
            True, IS_CAUSAL, MASK_KIND, MASK_ROW, HAS_DROPOUT, DOT_PREC,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI,
        )  # fmt: skip
    dk = dk * scale
    # DK (B, Hkv, Lk, D) and DV (B, Hkv, Lk, Dv) are contiguous; with VARLEN (Hkv, total_k, D)
    # and (Hkv, total_k, Dv), key j of the sequence at row row_k + j
    tl.store(
        DK + (row_k + offs_n[:, None]) * HEAD_DIM + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
    )
    tl.store(
        DV + (row_k + offs_n[:, None]) * HEAD_DIM_V + offs_dv[None, :],
        dv.to(DV.dtype.element_ty),
        mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V),
    )


# -- autotune configs (beside their kernels) ----------------------------------------------------

_TUNE_KEY = ["Lq", "Lk", "HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_ALIBI"]


# Under TRITON_INTERPRET=1 kernels run on CPU tensors through numpy: one small config, no tuning.
_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)


# Retuned from the sm_90 table of bench/triton_resources.py (`make triton-resources`): the
# estimates below hold the live tiles of a program to what compiled with no spill (stack frame 0)
# and within the 227 KB of shared memory a block may have; tests/test_triton_resources.py
# compiles the headline configs on every CI run.
_SHAPES = {
    # the program owns BLOCK_M queries and streams BLOCK_N keys
    "fwd": [(128, 64), (128, 128), (64, 64), (64, 32), (32, 32)],
    # dQ owns BLOCK_M queries streaming BLOCK_N keys
    "dq": [(64, 64), (32, 64), (64, 32), (128, 64), (32, 32)],
    # dK/dV owns BLOCK_N keys streaming BLOCK_M queries; BLOCK_M = 128 spilled at every head dim
    # and warp count tried (its dk, dv accumulators and transposed tiles)
    "dkdv": [(64, 64), (64, 32), (32, 64), (32, 32)],
}
# fp32 inputs take true fp32 products (FMA, not tensor cores), whose operand layouts hold about
# twice the registers: at D = 64, 32 x 32 tiles compile spill-free in every kernel and 64 x 32
# spill; so BLOCK_M * BLOCK_N * BLOCK_D stays within 32 * 32 * 64, one stage, 4 warps. 32 x 32
# comes last (the fixed config is the first kept): causal dK/dV at D = 32 left a 16-byte stack.
# At D = 128, 32 x 16 spilled in dK/dV (and the forward without mask) while D = 256 at 16 x 16
# compiled clean: from D = 128 on, fp32 tiles are 16 x 16.
_FP32_SHAPES = [(32, 16), (16, 32), (16, 16), (32, 32)]


def _fp32_max_tile(block_d: int) -> int:
    return 32 * 32 * 64 if block_d <= 64 else 16 * 16 * block_d


# fp32 elements per thread the live register tiles of a half-precision config may take: at or
# under it no config spilled on sm_90, over it nearly all did (255 registers and a stack frame)
_REG_BUDGET = 224
# shared memory a config may plan for (the limit is 227 KB; the estimate is within ~3 KB)
_SMEM_BUDGET = 216 * 1024


# The backward kernels with a variant on (the softcap's tanh tile, the band's bounds, the slope)
# at 64 < D <= 128, half precision, compiled for sm_90 (triton 3.8, bench/triton_resources.py):
# (kind, VARLEN) -> (BLOCK_M, BLOCK_N, warps, stages or None for every one) that left a stack
# frame. varlen dQ 64 x 64 w4: 8 bytes; sdpa dK/dV 32 x 32 w4 s2: ptxas held it to 168 registers
# and a 32-byte stack (1 and 3 stages compiled clean at ~200). Under triton 3.6 (the GPU machine's
# stack) also sdpa dK/dV 64 x 32 w4 (8 and 24 bytes at 2 and 3 stages; 254-255 registers under
# 3.8) and varlen dQ 32 x 32 w4 s3 (8 bytes).
_VARIANT_BWD_SPILLS = {
    ("dq", True): {(64, 64, 4, None), (32, 32, 4, 3)},
    ("dkdv", False): {(32, 32, 4, 2), (64, 32, 4, None)},
}
# varlen dK/dV with a variant at 64 < D <= 128: its plain one config (32 x 64 w4) left 8-16 bytes
# at 2-3 stages, 64 x 32 w4 compiled at 248-253 registers (too near the edge), 32 x 32 w4 clean
# at 192-200 at 1-3 stages (3 kept: 2 stages held sdpa's to 168 registers): it alone is kept
_VARIANT_VARLEN_DKDV = (32, 32, 4, 3)
# dQ with a variant at D > 128: 32 x 64 w4 (the plain kernel's) left 16-312 bytes, and every tile
# at 1 stage spilled (16-112 bytes: the unpipelined loads sit in registers); 32 x 32 w4 s2
# compiled clean at 220-232 registers (sdpa and varlen): it alone is kept
_VARIANT_WIDE_DQ = (32, 32, 4, 2)


def _configs(kind: str) -> list:
    half = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn in _SHAPES[kind]
        for w in (4, 8)
        for s in (1, 2, 3, 4)
    ]
    fp32 = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=1) for bm, bn in _FP32_SHAPES
    ]
    return half + fp32


def _footprint(kind: str, bm: int, bn: int, bd: int, bdv: int, stages: int, elt: int, mask_elt: int,
               variants: bool = False):  # fmt: skip
    """(fp32 register elements of the live tiles, shared-memory bytes) of one program."""
    if kind == "fwd":  # acc, scores, q; K and V tiles pipelined through shared memory
        regs = bm * bdv + bm * bn + bm * bd * elt / 4
        smem = stages * bn * (bd + bdv) * elt + bm * bd * elt + stages * bm * bn * mask_elt
    elif kind == "dq":  # dq, scores and dP, q and dO; K and V pipelined
        regs = bm * bd + 2 * bm * bn + bm * (bd + bdv) * elt / 4
        smem = stages * bn * (bd + bdv) * elt + bm * (bd + bdv) * elt + stages * bm * bn * mask_elt
    else:  # dk and dv, k and v, scores and dP, q and dO; Q and dO pipelined
        regs = bn * (bd + bdv) * (1 + elt / 4) + 2 * bn * bm + bm * (bd + bdv) * elt / 4
        smem = stages * bm * (bd + bdv) * elt + bn * (bd + bdv) * elt + stages * bm * bn * mask_elt
    if variants:
        # the variants' score-sized temporaries (the window's and ALiBi's index tiles, the
        # softcap's tanh, which the backward keeps until dS): two more tiles. Measured on sm_90:
        # with one, D = 64's forward 128 x 64 w4 and dK/dV 64 x 64 w4 still spilled 8-56 bytes
        regs += 2 * bm * bn
    return regs, smem + 4096


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        """Keep the configs whose tiles fit the registers, shared memory and the lengths."""
        args = {**named_args, **kwargs}
        bd, bdv = args["BLOCK_D"], args["BLOCK_DV"]
        block_d = max(bd, bdv)
        wide = args["DOT_PREC"] == "ieee"
        elt = 4 if wide else 2
        mask_kind = args.get("MASK_KIND", 0)
        mask_elt = 0 if mask_kind == 0 else 1 if mask_kind == 1 else elt
        lq, lk = args["Lq"], args["Lk"]
        # deep pipelines for small head dims; wide tiles leave shared memory for 1-2 stages only
        stages = (3, 4) if block_d <= 64 else (2, 3) if block_d <= 128 else (1, 2)
        # varlen's dK/dV at head dim 128: the packed sequence bounds take the registers that the
        # estimate leaves: 64 x 32 w4 (2-3 stages) left an 8-byte stack under triton 3.6 and
        # 32 x 32 w4 16 bytes under 3.6 or 3.8 (by stage count), while 32 x 64 w4 compiled clean
        # in 1-4 stages on both (250 registers, over the estimate's budget): it alone is kept
        varlen = bool(args.get("VARLEN"))
        varlen_dkdv = kind == "dkdv" and varlen and 64 < block_d <= 128
        variants = any(args.get(f) for f in ("HAS_WINDOW", "HAS_SOFTCAP", "HAS_ALIBI"))
        variant_bwd = kind != "fwd" and 64 < block_d <= 128 and variants
        spills = _VARIANT_BWD_SPILLS.get((kind, varlen), set()) if variant_bwd else set()
        kept, seen = [], set()
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            is_fp32_config = c.num_stages == 1 and c.num_warps == 4 and (bm, bn) in _FP32_SHAPES
            if wide:
                if not is_fp32_config or bm * bn * block_d > _fp32_max_tile(block_d):
                    continue
                # with a variant, fp32's 32 x 32 tiles left 8-24-byte stacks at D <= 64 on sm_90
                # (varlen forward, sdpa dK/dV) while 32 x 16 and 16 x 32 compiled clean
                if variants and bm * bn > 512:
                    continue
            else:
                if c.num_stages not in stages or (c.num_warps == 8 and max(bm, bn) < 128):
                    continue
                if (bm, bn, c.num_warps, None) in spills or (bm, bn, c.num_warps, c.num_stages) in spills:
                    continue
                if kind == "dq" and variants and block_d > 128:
                    if (bm, bn, c.num_warps, c.num_stages) != _VARIANT_WIDE_DQ:
                        continue
                elif varlen_dkdv and variant_bwd:
                    if (bm, bn, c.num_warps, c.num_stages) != _VARIANT_VARLEN_DKDV:
                        continue
                elif varlen_dkdv:
                    if (bm, bn) != (32, 64) or c.num_warps != 4:
                        continue
                else:
                    regs, smem = _footprint(kind, bm, bn, bd, bdv, c.num_stages, elt, mask_elt, variants)
                    if regs / (32 * c.num_warps) > _REG_BUDGET or smem > _SMEM_BUDGET:
                        continue
            # no block much longer than the sequence
            if bm > max(32, triton.next_power_of_2(lq)) or bn > max(32, triton.next_power_of_2(lk)):
                continue
            ident = (bm, bn, c.num_warps, c.num_stages)
            if ident not in seen:
                seen.add(ident)
                kept.append(c)
        if kept:
            if wide:
                # the half-precision lists hold (32, 32) w4 s1 too: keep _FP32_SHAPES' order, so
                # the fixed config (the first kept) is the smallest-risk fp32 tile
                kept.sort(key=lambda c: _FP32_SHAPES.index((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"])))
            return kept
        # nothing fits the estimates (fp16 at D = 256): the smallest tiles
        pool = [c for c in configs if (c.num_stages == 1) == wide] or configs
        return [
            min(pool, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages, c.num_warps))
        ]

    return prune


def _tuned(fn, kind: str) -> Tuned:
    return Tuned(fn, _configs(kind), key=_TUNE_KEY, prune=_pruner(kind), interpret_config=_INTERPRET_CONFIG)


fwd = _tuned(_fwd_kernel, "fwd")
bwd_dq = _tuned(_bwd_dq_kernel, "dq")
bwd_dkdv = _tuned(_bwd_dkdv_kernel, "dkdv")
PREPROCESS_BLOCK_M = 16 if INTERPRET else 64


# -- launch helpers --------------------------------------------------------------------------


def check_slice(name: str, t: Tensor, rows: int, cols: int) -> None:
    # the kernels index inside one (batch, head) slice with int32
    span = (rows - 1) * abs(t.stride(2)) + (cols - 1) * abs(t.stride(3)) if rows and cols else 0
    if span > _MAX_SLICE_OFFSET:
        raise ValueError(f"sdpa (triton): '{name}' spans {span} elements per (batch, head); at most 2^31 - 1")


def common_constexprs(query, value, D, Dv, causal, mask_kind, mask_row, dropout_p, varlen=False):
    return dict(
        VARLEN=varlen,
        HEAD_DIM=D,
        HEAD_DIM_V=Dv,
        # tl.dot wants every dim >= 16; odd head dims (59) pad to a power of two, masked
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
        IS_CAUSAL=bool(causal),
        MASK_KIND=mask_kind,
        MASK_ROW=bool(mask_row),
        HAS_DROPOUT=dropout_p > 0.0,
        # fp32 inputs: true fp32 products (tf32 would cost ~1e-3 relative error, far beyond the
        # fp32 reference's own); fp16/bf16 take the default (tensor cores)
        DOT_PREC="ieee" if query.dtype == torch.float32 else None,
    )


def variant_args(
    query: Tensor, Lq: int, Lk: int, window_left: int, window_right: int, softcap: float, sinks, alibi_slopes
) -> tuple[tuple, dict]:
    """The kernels' variant arguments ``(Sinks, Alibi, stride_alibi_b, softcap2, window_left,
    window_right)`` and constexprs (``HAS_SINKS`` is the forward's only) for one call; Lq / Lk
    the longest lengths (varlen's max_seqlen). An unbounded window side (-1) becomes Lq + Lk,
    longer than any row's reach, so the kernels need no branch on it; the softcap goes in log2
    units (the kernels' scores are), slopes and sinks as float32 (alibi (Hq,) or (B, Hq): row b
    of batch entry / sequence b)."""
    unbounded = Lq + Lk
    left = unbounded if window_left < 0 else min(window_left, unbounded)
    right = unbounded if window_right < 0 else min(window_right, unbounded)
    alibi = alibi_slopes.float().contiguous() if alibi_slopes is not None else None
    sk = sinks.float().contiguous() if sinks is not None else None
    args = (
        sk if sk is not None else query,  # never read without HAS_SINKS; any pointer will do
        alibi if alibi is not None else query,
        alibi.shape[1] if alibi is not None and alibi.dim() == 2 else 0,
        float(softcap) * LOG2E if softcap > 0.0 else 1.0,
        left,
        right,
    )
    consts = dict(
        HAS_WINDOW=window_left >= 0 or window_right >= 0,
        HAS_SOFTCAP=softcap > 0.0,
        HAS_ALIBI=alibi is not None,
    )
    return args, consts


def drop_scale(dropout_p: float) -> float:
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


# the launchers allocate their outputs and stop before launching on a traced (fake) call
_traced = is_traced


def interpreter_bf16(t: Tensor) -> bool:
    """Triton's interpreter (3.8) computes tl.dot on bfloat16 operands from their raw bits, so
    there the bf16 path runs in float32 and rounds its results back (exact for the inputs,
    more accurate than a bf16 kernel); compiled GPU runs are unaffected."""
    return INTERPRET and t.dtype == torch.bfloat16 and not _traced(t)


def up(t: Tensor | None) -> Tensor | None:
    return t.float() if t is not None and t.dtype == torch.bfloat16 else t
