"""KV-cache attention in Triton: split-K decoding (flash-decoding) over a dense or paged cache.

    sequence b: Lk_b = cache_seqlens[b] + Lq keys once the new tokens are appended in place;
    query row i sits on the lower-right diagonal d = i + Lk_b - Lq
    s = scale q.k -> softcap tanh(s / softcap) -> - slope |d - j| -> masks (causal j <= d,
    window d - left <= j <= d + right) -> softmax with exp(sink) in the denominator

Two kernels (flash-attention's ``flash_attn_with_kvcache`` with ``num_splits`` and its
``pack_gqa``; xformers' split-K decoder):
- ``_split_kernel``, grid (splits, B * Hkv): one program per (split, sequence, kv head) streams
  its chunk of the cache in BLOCK_N-key tiles, page by page through ``block_table`` when paged,
  for all Hq/Hkv query heads of the kv head times the Lq new positions at once (GQA packing: the
  rows of one tl.dot, so each K/V element is read once per step). It writes unnormalised partial
  rows and their (max, sum).
- ``_combine_kernel``, grid (B * Hq * Lq,): merges a row's splits exactly through the
  log-sum-exp (the sink joins the denominator there) and rounds once.
The append itself is two indexed copies in the launcher (no host sync). docs/design.md,
"KV-cache attention".
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._glue import DTYPES, INTERPRET, Tuned, define_op, is_traced
from ._math import tanh as _tanh

MAX_HEAD_DIM = 256

# -- kernels ----------------------------------------------------------------------------------------


@triton.jit
def _split_kernel(
    Q, KC, VC, SEQLENS, TABLE, ALIBI, PART_ACC, PART_M, PART_L,
    stride_kp, stride_kh, stride_kr, stride_vp, stride_vh, stride_vr, stride_bt, stride_alibi_b,
    Hq, Hkv, Lq, R, n_split, page_size, scale, softcap, window_left, window_right,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    NEW_TOKENS: tl.constexpr,
    PAGED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    h = bh % Hkv
    G = Hq // Hkv
    Lk = tl.load(SEQLENS + b).to(tl.int32) + (Lq if NEW_TOKENS else 0)
    d0 = Lk - Lq

    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_r < R
    # the key range of the whole tile (first row's left bound .. last row's right bound), cut into
    # n_split chunks of whole BLOCK_N tiles (kvcache::split_range in csrc/kvcache_attention_math.h)
    begin = tl.maximum(tl.where(window_left >= 0, d0 - window_left, 0), 0)
    end = Lk
    if IS_CAUSAL:
        end = tl.minimum(end, d0 + Lq)
    end = tl.where(window_right >= 0, tl.minimum(end, d0 + Lq + window_right), end)
    end = tl.maximum(end, 0)
    length = tl.maximum(end - begin, 0)
    chunk = tl.cdiv(tl.cdiv(length, n_split), BLOCK_N) * BLOCK_N
    lo = tl.minimum(begin + split * chunk, end)
    hi = tl.minimum(lo + chunk, end)

    # row r is query head h * G + r // Lq, position r % Lq: rows of one kv head are contiguous
    q_base = Q + ((b * Hq + h * G) * Lq).to(tl.int64) * HEAD_DIM
    q = tl.load(
        q_base + offs_r[:, None] * HEAD_DIM + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    d_row = d0 + offs_r % Lq
    rb = tl.where(window_left >= 0, tl.maximum(d_row - window_left, 0), 0)
    re = tl.zeros([BLOCK_R], tl.int32) + Lk
    if IS_CAUSAL:
        re = tl.minimum(re, d_row + 1)
    re = tl.where(window_right >= 0, tl.minimum(re, d_row + window_right + 1), re)
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_alibi_b + h * G + offs_r // Lq, mask=row_ok, other=0.0).to(
            tl.float32
        )

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)
        key_ok = offs_n < hi
        if PAGED:
            page = tl.load(TABLE + b * stride_bt + offs_n // page_size, mask=key_ok, other=0).to(tl.int64)
            row = (offs_n % page_size).to(tl.int64)
        else:
            page = tl.zeros([BLOCK_N], tl.int64) + b
            row = offs_n.to(tl.int64)
        k_rows = page * stride_kp + h * stride_kh + row * stride_kr
        v_rows = page * stride_vp + h * stride_vh + row * stride_vr
        k = tl.load(
            KC + k_rows[:, None] + offs_d[None, :],
            mask=key_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
            other=0.0,
        )
        v = tl.load(VC + v_rows[:, None] + offs_dv[None, :], mask=key_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)  # fmt: skip
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
        if HAS_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        if HAS_ALIBI:
            dist = tl.abs(d_row[:, None] - offs_n[None, :]).to(tl.float32)
            s = s - slope[:, None] * dist
        ok = key_ok[None, :] & (offs_n[None, :] >= rb[:, None]) & (offs_n[None, :] < re[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row with nothing attendable yet keeps m = -inf: use 0 as its reference (p = 0)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    part = (bh * n_split + split).to(tl.int64) * R
    tl.store(PART_M + part + offs_r, m_i, mask=row_ok)
    tl.store(PART_L + part + offs_r, l_i, mask=row_ok)
    tl.store(
        PART_ACC + (part + offs_r[:, None]) * HEAD_DIM_V + offs_dv[None, :],
        acc,
        mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V),
    )


@triton.jit
def _combine_kernel(
    PART_ACC, PART_M, PART_L, SINKS, OUT, LSE,
    Hq, Hkv, Lq, R, n_split,
    HEAD_DIM_V: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # (b, hq, i) of the output
    i = row % Lq
    bhq = row // Lq
    hq = bhq % Hq
    b = bhq // Hq
    G = Hq // Hkv
    h = hq // G
    r = (hq % G) * Lq + i
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < n_split
    part = ((b * Hkv + h) * n_split + offs_s).to(tl.int64) * R + r
    m = tl.load(PART_M + part, mask=s_ok, other=float("-inf"))
    l_s = tl.load(PART_L + part, mask=s_ok, other=0.0)
    big = tl.max(m, axis=0)
    if HAS_SINKS:
        sink = tl.load(SINKS + hq).to(tl.float32)
        big = tl.maximum(big, sink)
    ref = tl.where(big == float("-inf"), 0.0, big)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - ref))
    total = tl.sum(l_s * w, axis=0)
    if HAS_SINKS:
        total += tl.exp(sink - ref)
    safe = tl.where(total > 0.0, total, 1.0)  # a row with no key and no sink: out 0, lse +inf
    inv = tl.where(total > 0.0, 1.0 / safe, 0.0)
    acc = tl.load(
        PART_ACC + part[:, None] * HEAD_DIM_V + offs_dv[None, :],
        mask=s_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V),
        other=0.0,
    )
    out = tl.sum(acc * (w * inv)[:, None], axis=0)
    tl.store(
        OUT + row.to(tl.int64) * HEAD_DIM_V + offs_dv, out.to(OUT.dtype.element_ty), mask=offs_dv < HEAD_DIM_V
    )
    lse = tl.where(total > 0.0, ref + tl.log(safe), float("inf"))
    tl.store(LSE + row, lse)


# The split kernel is bound by reading K and V: few warps, tiles of 64 keys; on a GPU the row
# tile is at least 16 (tl.dot's smallest M).
def _split_configs():
    return [
        triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
        for n, w, s in ((64, 4, 2), (64, 4, 3), (128, 4, 2), (32, 2, 2), (128, 8, 2))
    ]


def _prune_split(configs, named_args, **kwargs):
    # the widest tiles hold (BLOCK_R + 2 BLOCK_N) x BLOCK_D registers' worth: keep 128-key tiles
    # for narrow heads and short row tiles only
    args = {**named_args, **kwargs}
    big = args["BLOCK_D"] * max(args["BLOCK_R"], 16)
    kept = [c for c in configs if c.kwargs["BLOCK_N"] * big <= 128 * 128 * 16 or c.kwargs["BLOCK_N"] <= 64]
    return kept or configs[:1]


_split = Tuned(
    _split_kernel,
    _split_configs(),
    key=["R", "HEAD_DIM", "HEAD_DIM_V", "PAGED"],
    prune=_prune_split,
    interpret_config=triton.Config({"BLOCK_N": 16}, num_warps=1, num_stages=1),
)


# -- launcher ---------------------------------------------------------------------------------------


def choose_splits(B: int, Hkv: int, rows: int, max_keys: int, workers: int, min_keys: int) -> int:
    """kvcache::choose_splits (csrc/kvcache_attention_math.h), for the launcher."""
    want = -(-4 * workers // max(B * Hkv, 1))
    want = min(want, max_keys // max(min_keys, 1))
    if rows > 64:
        want = 1
    return max(1, min(want, 256))


def _append(k_cache, v_cache, cache_seqlens, key, value, block_table):
    """Writes the new tokens at cache_seqlens[b] + t, as two indexed copies (no host sync)."""
    B, _, Lq, _ = key.shape
    pos = cache_seqlens.long()[:, None] + torch.arange(Lq, device=key.device)  # (B, Lq)
    if block_table is None:
        page = torch.arange(B, device=key.device)[:, None].expand(B, Lq)
        row = pos
    else:
        ps = k_cache.shape[2]
        page = torch.gather(block_table.long(), 1, pos // ps)
        row = pos % ps
    k_cache[page, :, row] = key.permute(0, 2, 1, 3)  # (B, Lq, Hkv, D)
    v_cache[page, :, row] = value.permute(0, 2, 1, 3)


def kvcache_forward(
    query, k_cache, v_cache, cache_seqlens, key, value, block_table, sinks, alibi_slopes, causal, scale,
    window_left, window_right, softcap, num_splits,
):  # fmt: skip
    """(out, lse) of one call; appends key/value to the caches in place first."""
    ok = query.dim() == k_cache.dim() == v_cache.dim() == 4 and query.dtype in DTYPES
    ok = ok and k_cache.dtype == v_cache.dtype == query.dtype and cache_seqlens.dtype == torch.int32
    ok = ok and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and k_cache.shape[1] > 0
    if not ok:
        raise ValueError("kvcache_attention (triton): unsupported inputs (see pyattn.kvcache_attention)")
    B, Hq, Lq, D = query.shape
    Hkv, Dv = k_cache.shape[1], v_cache.shape[-1]
    if max(D, Dv) > MAX_HEAD_DIM:
        raise ValueError(f"kvcache_attention (triton): head dims must be at most {MAX_HEAD_DIM}")
    G = Hq // Hkv
    R = G * Lq
    out = query.new_empty((B, Hq, Lq, Dv))
    lse = query.new_empty((B, Hq, Lq), dtype=torch.float32)
    if is_traced(query):
        return out, lse
    if key is not None:
        _append(k_cache, v_cache, cache_seqlens, key, value, block_table)
    if out.numel() == 0:
        return out, lse
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[2] if paged else k_cache.shape[2]
    if num_splits <= 0:
        workers = torch.cuda.get_device_properties(query.device).multi_processor_count if query.is_cuda else 4
        num_splits = choose_splits(B, Hkv, R, capacity, workers, 256)
    q = query.contiguous()
    part_acc = torch.empty((B * Hkv * num_splits * R, Dv), device=q.device, dtype=torch.float32)
    part_m = torch.empty((B * Hkv * num_splits * R,), device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    upcast = INTERPRET and q.dtype == torch.bfloat16  # the interpreter's tl.dot misreads bf16
    alibi = alibi_slopes.float().contiguous() if alibi_slopes is not None else None
    table = block_table.contiguous() if paged else None
    block_r = max(16, triton.next_power_of_2(R))  # tl.dot's smallest M on a GPU
    named = dict(
        BLOCK_R=block_r, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
        HEAD_DIM=D, HEAD_DIM_V=Dv, PAGED=paged,
    )  # fmt: skip
    _split[(num_splits, B * Hkv)](
        q, k_cache, v_cache, cache_seqlens, table if paged else cache_seqlens,
        alibi if alibi is not None else part_m, part_acc, part_m, part_l,
        *k_cache.stride()[:3], *v_cache.stride()[:3], table.stride(0) if paged else 0,
        (Hq if alibi.dim() == 2 else 0) if alibi is not None else 0,
        Hq, Hkv, Lq, R, num_splits, k_cache.shape[2], float(scale), float(softcap), int(window_left),
        int(window_right),
        NEW_TOKENS=key is not None, IS_CAUSAL=bool(causal), HAS_SOFTCAP=softcap > 0.0,
        HAS_ALIBI=alibi is not None, UPCAST=upcast,
        DOT_PREC="ieee" if q.dtype == torch.float32 or upcast else None, **named,
    )  # fmt: skip
    sk = sinks.contiguous() if sinks is not None else part_m
    _combine_kernel[(B * Hq * Lq,)](
        part_acc, part_m, part_l, sk, out, lse, Hq, Hkv, Lq, R, num_splits,
        HEAD_DIM_V=Dv, HAS_SINKS=sinks is not None, BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
        BLOCK_DV=named["BLOCK_DV"],
    )  # fmt: skip
    return out, lse


@define_op("kvcache_attention_fwd", mutates_args=("k_cache", "v_cache"))
def kvcache_attention_fwd_triton(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    key: Tensor | None,
    value: Tensor | None,
    block_table: Tensor | None,
    sinks: Tensor | None,
    alibi_slopes: Tensor | None,
    causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    num_splits: int,
) -> tuple[Tensor, Tensor]:
    return kvcache_forward(
        query, k_cache, v_cache, cache_seqlens, key, value, block_table, sinks, alibi_slopes, causal, scale,
        window_left, window_right, softcap, num_splits,
    )  # fmt: skip
