"""All-gather context parallelism for packed variable-length batches (docs/design.md, "Context
parallelism", the all-gather variant; the scheme Llama 3's long-context training used).

The packed batch (total, H, D) of B documents is cut into P contiguous row ranges, one per rank
in rank order, whatever the document edges: a document may start on one rank and end on another.
Every rank all-gathers the keys and values (one collective, no ring), then runs varlen attention
of its own query rows against the keys of the documents they belong to; the causal diagonal of a
document cut by a shard edge ends at the rank's last query of it (lower-right causality on the
document's keys up to there). The backward computes the gathered keys' gradients locally and sums
them over the ranks (an all-reduce of the whole (total, Hkv, D) gradient in float32), each rank
keeping its rows. Memory and traffic are O(total) per rank for K/V, against the ring's O(total/P),
in exchange for one collective and free document boundaries.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _backend
from ..ops._common import check_scale
from ..ops.errors import InputError, InputTypeError
from . import _layout
from ._blocks import CAUSAL_LOWER_RIGHT, CAUSAL_NONE, acc_dtype, naive_bwd, naive_fwd
from .ring import _DTYPE_CODE, _DTYPES, RingError, agree_or_fail

_FN = "pyattn.distributed.allgather_varlen_attention"


def _fail(msg: str, cls: type[InputError] = InputError):
    raise cls(f"{_FN}: {msg}")


class _Ops:
    """varlen forward/backward on the chosen backend: ``pyattn::varlen_attention_fwd``/``_bwd``
    (cpu, cuda), their ``_triton`` twins, or per-document naive blocks (reference)."""

    def __init__(self, backend, device, dtype, head_dims=()):
        self.name = _backend.resolve("varlen_attention", backend, device, dtype, head_dims)
        # the ops of the backend's record (pyattn/_backend.py), or per-document naive blocks
        pair = _backend.kernel_ops("varlen_attention", self.name)
        self.fwd, self.bwd = pair or (_naive_varlen_fwd, _naive_varlen_bwd)


def _docs(cu_q, cu_k):
    return [(cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]) for b in range(len(cu_q) - 1)]


def _naive_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, p, causal, scale, seed, offset):
    out = q.new_zeros((*q.shape[:2], v.shape[2]))
    lse = q.new_full((q.shape[1], q.shape[0]), float("inf"), dtype=acc_dtype(q.dtype))
    for a, b, c, d in _docs(cu_q.tolist(), cu_k.tolist()):
        if b > a:
            o, lb = naive_fwd(*(t[x:y].transpose(0, 1)[None] for t, x, y in ((q, a, b), (k, c, d), (v, c, d))),
                             None, 0.0, causal, scale, 0, 0)  # fmt: skip
            out[a:b] = o[0].transpose(0, 1)
            lse[:, a:b] = lb[0]
    return out, lse


def _naive_varlen_bwd(do, q, k, v, cu_q, cu_k, out, lse, max_q, max_k, p, causal, scale, seed, offset):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for a, b, c, d in _docs(cu_q.tolist(), cu_k.tolist()):
        if b > a:
            blk = [t[x:y].transpose(0, 1)[None] for t, x, y in ((do, a, b), (q, a, b), (k, c, d), (v, c, d))]
            g = naive_bwd(
                *blk, None, out[a:b].transpose(0, 1)[None], lse[:, a:b][None], 0.0, causal, scale, 0, 0
            )
            dq[a:b], dk[c:d], dv[c:d] = (x[0].transpose(0, 1) for x in g)
    return dq, dk, dv


class _AllGatherVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, cfg):
        group, lens, rank = cfg["group"], cfg["lens"], cfg["rank"]
        n_max = max(lens)
        kv = torch.cat([key, value], dim=2)  # (n, Hkv, D + Dv): one collective for both
        if kv.shape[0] < n_max:
            kv = torch.cat([kv, kv.new_zeros((n_max - kv.shape[0], *kv.shape[1:]))])
        bufs = [torch.empty_like(kv) for _ in lens]
        try:
            dist.all_gather(bufs, kv.contiguous(), group=group)
        except Exception as exc:
            raise RingError(
                f"{_FN}: rank {rank}: the key/value all-gather failed: a peer rank raised, died or "
                f"did not answer within the process group's timeout ({type(exc).__name__}: {exc})"
            ) from exc
        whole = torch.cat([b[:n] for b, n in zip(bufs, lens, strict=True)])  # (total, Hkv, D + Dv)
        k0, k1 = cfg["keys"]
        D = key.shape[2]
        ks, vs = whole[k0:k1, :, :D].contiguous(), whole[k0:k1, :, D:].contiguous()
        cu_q, cu_k = cfg["cu_q"], cfg["cu_k"]
        out, lse = cfg["ops"].fwd(query, ks, vs, cu_q, cu_k, cfg["max_q"], cfg["max_k"], 0.0,
                                  cfg["causal"], cfg["scale"], 0, 0)  # fmt: skip
        ctx.cfg = cfg
        ctx.save_for_backward(query, ks, vs, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        cfg = ctx.cfg
        query, ks, vs, out, lse = ctx.saved_tensors
        dq, dks, dvs = cfg["ops"].bwd(grad_out.contiguous(), query, ks, vs, cfg["cu_q"], cfg["cu_k"], out, lse,
                                      cfg["max_q"], cfg["max_k"], 0.0, cfg["causal"], cfg["scale"], 0, 0)  # fmt: skip
        total, (k0, k1) = sum(cfg["lens"]), cfg["keys"]
        D, acc = ks.shape[2], acc_dtype(query.dtype)
        whole = query.new_zeros((total, ks.shape[1], D + vs.shape[2]), dtype=acc)
        whole[k0:k1, :, :D] = dks
        whole[k0:k1, :, D:] = dvs
        try:
            dist.all_reduce(whole, group=cfg["group"])
        except Exception as exc:
            raise RingError(
                f"{_FN}: rank {cfg['rank']}: the dK/dV all-reduce failed: a peer rank raised, died "
                f"or did not answer within the process group's timeout ({type(exc).__name__}: {exc})"
            ) from exc
        start, end = cfg["rows"]
        mine = whole[start:end]
        return dq, mine[:, :, :D].to(ks.dtype), mine[:, :, D:].to(vs.dtype), None


def _check_local(query, key, value, cu_seqlens, is_causal, scale, enable_gqa):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            _fail(f"'{name}' must be a torch.Tensor, got {type(t).__name__}", InputTypeError)
        if t.dim() != 3:
            _fail(f"'{name}' must be 3-D packed rows (n, H, D), got {t.dim()}-D {tuple(t.shape)}")
        if t.dtype not in _DTYPES or t.dtype != query.dtype or t.device != query.device:
            _fail(
                f"query, key and value must share one floating dtype and device, got query "
                f"{query.dtype} on {query.device}, {name} {t.dtype} on {t.device}",
                InputTypeError,
            )
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        got = (
            f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
            if isinstance(cu_seqlens, Tensor)
            else type(cu_seqlens).__name__
        )
        _fail(f"'cu_seqlens' must be a 1-D int32 tensor (B + 1,), got {got}", InputTypeError)
    if cu_seqlens.numel() < 1:
        _fail("'cu_seqlens' must have at least one entry (0)")
    if not isinstance(is_causal, bool):
        _fail(f"'is_causal' must be a bool, got {type(is_causal).__name__}", InputTypeError)
    check_scale(_FN, scale)
    n, Hq, D = query.shape
    if key.shape[0] != n or value.shape[0] != n or key.shape[1] != value.shape[1] or key.shape[2] != D:
        _fail(
            f"key must be (n={n}, Hkv, D={D}) and value (n={n}, Hkv, Dv): the same rows as the query, "
            f"got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    Hkv = key.shape[1]
    if Hkv != Hq and not (enable_gqa and Hkv > 0 and Hq % Hkv == 0):
        _fail(f"key/value heads ({Hkv}) must equal query heads ({Hq}), or divide them with enable_gqa=True")


def allgather_varlen_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens: Tensor,
    *,
    group=None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Varlen attention over a packed batch whose rows are split across the ranks of ``group``,
    documents crossing shard edges; keys and values are all-gathered (module doc).

    Arguments:
        query: (n_r, Hq, D): this rank's rows of the packed batch. Rank r holds rows
            n_0 + ... + n_(r-1) up to that plus n_r (any n_r, zero too).
        key: (n_r, Hkv, D), value (n_r, Hkv, Dv): the same rows.
        cu_seqlens: int32 (B + 1,), the whole batch's cumulative document lengths from 0 (the
            same on every rank; checked). Document b is global rows cu_seqlens[b] .. [b + 1].
        group: the process group (default: the world; a single process without
            torch.distributed runs plain varlen attention).
        is_causal: causal within each document.
        scale: score scale, default 1/sqrt(D).
        enable_gqa: Hq may be a multiple of Hkv.
        backend: None (best for the device), "cpu", "cuda", "triton" or "reference".
    Returns:
        (n_r, Hq, Dv): this rank's rows of the output.
    """
    rank, P = _layout.group_info(group)
    local_error = None
    try:
        _check_local(query, key, value, cu_seqlens, is_causal, scale, enable_gqa)
    except InputError as exc:
        if P == 1:
            raise
        local_error = exc
    if P > 1:
        fields = []
        if local_error is None:
            cu = cu_seqlens.long()
            check = float((cu * torch.arange(1, cu.numel() + 1, device=cu.device)).sum())
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
            fields = [1, query.shape[0], query.shape[1], key.shape[1], query.shape[2], value.shape[2],
                      _DTYPE_CODE[query.dtype], is_causal, enable_gqa, scale is None,
                      0.0 if scale is None else float(scale), grad, cu.numel(), check]  # fmt: skip
        names = [None, "Hq", "Hkv", "D", "Dv", "dtype", "is_causal", "enable_gqa", "scale", "scale",
                 "requires_grad", "cu_seqlens", "cu_seqlens"]  # fmt: skip
        every = agree_or_fail(_FN, query, fields, names, group, rank, local_error)
        lens = [int(f[1]) for f in every]
    else:
        lens = [query.shape[0]]
    cu_list = cu_seqlens.tolist()
    total = sum(lens)
    if (
        cu_list[0] != 0
        or cu_list[-1] != total
        or any(b < a for a, b in zip(cu_list, cu_list[1:], strict=False))
    ):
        _fail(
            f"'cu_seqlens' must rise from 0 to the whole batch's {total} rows ({lens} on the ranks), got "
            f"{cu_list if len(cu_list) <= 16 else cu_list[:8] + ['...'] + cu_list[-4:]}"
        )
    start = sum(lens[:rank])
    end = start + lens[rank]
    # the documents with rows here: their local query rows and the keys they read
    cu_q, cu_k, first, kend = [], [], None, start
    for b in range(len(cu_list) - 1):
        qs, qe = max(cu_list[b], start), min(cu_list[b + 1], end)
        if qe <= qs:
            continue
        first = cu_list[b] if first is None else first
        cu_q.append(qs - start)
        cu_k.append(cu_list[b] - first)
        # causal: the document's keys up to this rank's last query of it (lower-right diagonal)
        kend = qe if is_causal else cu_list[b + 1]
    if first is None:
        first = kend = start
    cu_q.append(end - start)
    cu_k.append(kend - first)
    D = query.shape[2]
    scale_f = (1.0 / math.sqrt(D) if D > 0 else 1.0) if scale is None else float(scale)
    dev = query.device
    cfg = {
        "group": group, "rank": rank, "lens": lens, "rows": (start, end), "keys": (first, kend),
        "cu_q": torch.tensor(cu_q, dtype=torch.int32, device=dev),
        "cu_k": torch.tensor(cu_k, dtype=torch.int32, device=dev),
        "max_q": max([b - a for a, b in zip(cu_q, cu_q[1:], strict=False)], default=0),
        "max_k": max([b - a for a, b in zip(cu_k, cu_k[1:], strict=False)], default=0),
        "causal": CAUSAL_LOWER_RIGHT if is_causal else CAUSAL_NONE, "scale": scale_f,
        "ops": _Ops(backend, dev, query.dtype, (query.shape[-1], value.shape[-1])),
    }  # fmt: skip
    if P == 1:
        cfg["group"] = None
        return _single(query, key, value, cfg)
    return _AllGatherVarlen.apply(query, key, value, cfg)


class _Single(torch.autograd.Function):
    """The one-process case: the varlen op, no collective."""

    @staticmethod
    def forward(ctx, query, key, value, cfg):
        out, lse = cfg["ops"].fwd(query, key, value, cfg["cu_q"], cfg["cu_k"], cfg["max_q"], cfg["max_k"], 0.0,
                                  cfg["causal"], cfg["scale"], 0, 0)  # fmt: skip
        ctx.cfg = cfg
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        cfg = ctx.cfg
        q, k, v, out, lse = ctx.saved_tensors
        return (*cfg["ops"].bwd(grad_out.contiguous(), q, k, v, cfg["cu_q"], cfg["cu_k"], out, lse, cfg["max_q"],
                                cfg["max_k"], 0.0, cfg["causal"], cfg["scale"], 0, 0), None)  # fmt: skip


def _single(query, key, value, cfg):
    return _Single.apply(query, key, value, cfg)
