"""Ring attention: context-parallel scaled-dot-product attention over a torch.distributed group
(docs/design.md, "Context parallelism").

Each of P ranks holds a shard (B, H, L/P, D) of query, key and value in a layout (_layout.py).
Forward: P steps; at step s rank r attends its queries to the key/value shard of rank r - s
while that shard travels on to rank r + 1 (isend/irecv posted before the step's fused attention,
waited after it), and folds the block's (out, lse) into a float32 running result by the
log-sum-exp. Backward: the same ring again, K/V travelling as in the forward, and with them the
float32 dK/dV accumulators of the shard in flight: each rank adds its block's share, computed by
the fused backward from the final (out, lse) of its rows (flash-attention's identity: a block's
gradients under the whole row's statistics are that block's exact share), and passes them on;
after P steps every accumulator is complete and one last hop brings it home.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops._common import check_scale
from ..ops.errors import InputError, InputTypeError
from . import _layout
from ._blocks import Kernels, acc_dtype, merge, plan_block

# Seconds spent waiting for ring transfers (the part a step's attention did not hide), summed over
# calls in this process; the benchmark reads and resets it.
STATS = {"wait_s": 0.0}

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FN = "pyattn.distributed.ring_attention"


class RingError(RuntimeError):
    """A collective or point-to-point transfer of the ring failed: a peer rank raised, died, or
    did not answer within the process group's timeout."""


def _fail(msg: str, cls: type[InputError] = InputError):
    raise cls(f"{_FN}: {msg}")


def check_window(fn: str, window_size) -> tuple[int, int]:
    ok = isinstance(window_size, (tuple, list)) and len(window_size) == 2
    ok = ok and all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)
    if not ok:
        raise InputTypeError(f"{fn}: 'window_size' must be a pair of ints (left, right), got {window_size!r}")
    left, right = window_size
    if left < -1 or right < -1:
        raise InputError(f"{fn}: 'window_size' entries must be >= -1 (-1 = unbounded), got {window_size!r}")
    return left, right


def _check_local(query, key, value, is_causal, scale, enable_gqa) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            _fail(f"'{name}' must be a torch.Tensor, got {type(t).__name__}", InputTypeError)
        if t.dim() != 4:
            _fail(f"'{name}' must be a 4-D shard (B, H, L/P, D), got {t.dim()}-D {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            _fail(f"'{name}' must be float16, bfloat16, float32 or float64, got {t.dtype}", InputTypeError)
        if t.dtype != query.dtype or t.device != query.device:
            _fail(
                f"query, key and value must share one dtype and device, got query {query.dtype} on "
                f"{query.device}, {name} {t.dtype} on {t.device}",
                InputTypeError,
            )
    if not isinstance(is_causal, bool):
        _fail(f"'is_causal' must be a bool, got {type(is_causal).__name__}", InputTypeError)
    check_scale(_FN, scale)
    (B, Hq, _, D), (Bk, Hkv, _, Dk) = query.shape, key.shape
    if key.shape[:3] != value.shape[:3] or Bk != B or Dk != D:
        _fail(
            f"key must be (B={B}, Hkv, Lk, D={D}) and value (B={B}, Hkv, Lk, Dv), got query "
            f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    if Hkv != Hq and not (enable_gqa and Hkv > 0 and Hq % Hkv == 0):
        _fail(
            f"key/value heads ({Hkv}) must equal query heads ({Hq}), or divide them with "
            f"enable_gqa=True (got enable_gqa={enable_gqa})"
        )


class _Ring:
    """This rank's place in the ring and its transfers (errors raised as RingError)."""

    def __init__(self, group, rank: int, P: int):
        self.group, self.rank, self.P = group, rank, P
        to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next, self.prev = to_global((rank + 1) % P), to_global((rank - 1) % P)

    def _error(self, what: str, exc: BaseException) -> RingError:
        return RingError(
            f"{_FN}: rank {self.rank} of {self.P}: {what} failed: a peer rank raised, died or did not "
            f"answer within the process group's timeout ({type(exc).__name__}: {exc})"
        )

    def exchange(self, send: list[Tensor], recv: list[Tensor], what: str):
        """Post sends of ``send`` to the next rank and receives into ``recv`` from the previous."""
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for tag, t in enumerate(send)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag) for tag, t in enumerate(recv)]
        try:
            return dist.batch_isend_irecv(ops), what
        except Exception as exc:
            raise self._error(what, exc) from exc

    def wait(self, pending) -> None:
        works, what = pending
        t0 = time.perf_counter()
        try:
            for w in works:
                w.wait()
        except Exception as exc:
            raise self._error(what, exc) from exc
        finally:
            STATS["wait_s"] += time.perf_counter() - t0


_DTYPE_CODE = {dt: i for i, dt in enumerate(_DTYPES)}


def _agree(fields: list[float], group, device) -> list[list[float]]:
    """Every rank's ``fields`` (one small all-gather, float64: exact for these ints)."""
    mine = torch.tensor(fields, dtype=torch.float64, device=device)
    got = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(got, mine, group=group)
    except Exception as exc:
        raise RingError(
            f"{_FN}: the shape check across ranks (an all-gather) failed: a peer rank raised, died "
            f"or did not answer within the process group's timeout ({type(exc).__name__}: {exc})"
        ) from exc
    return [t.tolist() for t in got]


def agree_or_fail(fn: str, x: Tensor, fields: list, names: list, group, rank: int, local_error):
    """Every rank's ``fields`` (``fields[0] = 1``: this rank took its inputs) once the ranks agree
    on each field ``names`` names (``names[i]`` for ``fields[i + 1]``; None: may differ). The same
    InputError on every rank otherwise, and a rank that refused its inputs raises its own error
    while the others name it: one small all-gather, before any ring transfer."""
    if local_error is None:
        device = _layout._meta_device(x, group)
    else:
        fields = [0] * (len(names) + 1)
        device = torch.device("cpu") if dist.get_backend(group) == "gloo" else torch.device("cuda")
    every = _agree(fields, group, device)
    if local_error is not None:
        raise local_error
    bad = [r for r, f in enumerate(every) if f[0] == 0]
    if bad:
        raise InputError(
            f"{fn}: rank(s) {bad} refused their inputs (see the error there); rank {rank}'s were fine"
        )
    for i, name in enumerate(names, start=1):
        if name is None:
            continue
        vals = [f[i] for f in every]
        if any(v != vals[0] for v in vals):
            if name == "dtype":
                vals = [str(_DTYPES[int(v)]).replace("torch.", "") for v in vals]
            elif name not in ("scale", "cu_seqlens"):
                vals = [int(v) for v in vals]
            raise InputError(
                f"{fn}: every rank must pass the same {name}, got {vals} on ranks 0..{len(every) - 1}"
            )
    return every


class _Config:
    def __init__(self, rank, P, group, layout, causal, window, scale, kernels, q_lens, k_lens):
        self.rank, self.P, self.group, self.layout = rank, P, group, layout
        self.causal, self.window, self.scale, self.kernels = causal, window, scale, kernels
        self.q_lens, self.k_lens = q_lens, k_lens
        Lq, Lk = sum(q_lens), sum(k_lens)
        runs_layout = layout if P > 1 else "contiguous"
        qpos = _layout.positions(Lq, P, rank, runs_layout)
        shift = 0 if causal else Lk - Lq
        # the block of each step: this rank's queries against the keys of rank - s
        self.blocks = [
            plan_block(qpos, _layout.positions(Lk, P, (rank - s) % P, runs_layout), causal, window, shift)
            for s in range(P)
        ]
        self.ring = _Ring(group, rank, P) if P > 1 else None


def _rows(t: Tensor, a: int, b: int) -> Tensor:
    return t[:, :, a:b]


# Key/value heads per ring pass: the ring runs once per group of kv heads, so its buffers (the
# key/value shards in flight, the travelling dK/dV accumulators, a block's gradients) hold one
# group, not every head. A group is the fewest heads whose key shard has CHUNK_BYTES (fewer
# transfers for small shards, less memory for large ones; docs/design.md, "Context parallelism").
CHUNK_BYTES = 1 << 20


def _head_groups(key: Tensor) -> list[tuple[int, int]]:
    B, Hkv, n, D = key.shape
    per_head = max(1, B * n * D * key.element_size())
    g = min(Hkv, max(1, -(-CHUNK_BYTES // per_head)))
    return [(h, min(h + g, Hkv)) for h in range(0, Hkv, g)]


def _ring_forward(cfg: _Config, query, key, value):
    """One ring pass over the heads of ``query``/``key``/``value``: (out, lse) in float32."""
    acc = acc_dtype(query.dtype)
    B, Hq, nq, _ = query.shape
    Hkv, D, Dv = key.shape[1], key.shape[3], value.shape[3]
    out = query.new_zeros((B, Hq, nq, Dv), dtype=acc)
    lse = query.new_full((B, Hq, nq), float("-inf"), dtype=acc)
    k, v = key.contiguous(), value.contiguous()
    for s, blk in enumerate(cfg.blocks):
        pending = None
        if s < cfg.P - 1:
            n = cfg.k_lens[(cfg.rank - s - 1) % cfg.P]
            nk, nv = k.new_empty((B, Hkv, n, D)), v.new_empty((B, Hkv, n, Dv))
            pending = cfg.ring.exchange([k, v], [nk, nv], f"receiving key/value at ring step {s + 1}")
        if blk is not None:
            o, lb = cfg.kernels.fwd(
                _rows(query, blk.q0, blk.q1), _rows(k, blk.k0, blk.k1), _rows(v, blk.k0, blk.k1),
                blk.causal, blk.mask, cfg.scale,
            )  # fmt: skip
            merge(_rows(out, blk.q0, blk.q1), lse[:, :, blk.q0 : blk.q1], o, lb)
            del o, lb
        if pending is not None:
            cfg.ring.wait(pending)
            k, v = nk, nv
    return out, lse


def _ring_backward(cfg: _Config, do, query, key, value, out, lse):
    """The backward ring pass over one group of heads: (dq, dk, dv) in float32."""
    B, Hkv, _, D = key.shape
    Dv = value.shape[3]
    acc = acc_dtype(query.dtype)
    dq = torch.zeros(query.shape, dtype=acc, device=query.device)
    k, v = key.contiguous(), value.contiguous()
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    grads_in = None  # the accumulators of the next step's shard, on their way here
    for s, blk in enumerate(cfg.blocks):
        kv_pending = None
        src_next = (cfg.rank - s - 1) % cfg.P
        if s < cfg.P - 1:
            n = cfg.k_lens[src_next]
            nk, nv = k.new_empty((B, Hkv, n, D)), v.new_empty((B, Hkv, n, Dv))
            kv_pending = cfg.ring.exchange([k, v], [nk, nv], f"receiving key/value at backward step {s + 1}")
        if blk is not None:
            rows = (blk.q0, blk.q1)
            dqb, dkb, dvb = cfg.kernels.bwd(
                _rows(do, *rows), _rows(query, *rows), _rows(k, blk.k0, blk.k1),
                _rows(v, blk.k0, blk.k1), blk.causal, blk.mask, _rows(out, *rows),
                lse[:, :, blk.q0 : blk.q1], cfg.scale,
            )  # fmt: skip
        if grads_in is not None:
            cfg.ring.wait(grads_in[0])
            dk, dv = grads_in[1], grads_in[2]
            grads_in = None
        if blk is not None:
            _rows(dq, *rows).add_(dqb)
            _rows(dk, blk.k0, blk.k1).add_(dkb)
            _rows(dv, blk.k0, blk.k1).add_(dvb)
            del dqb, dkb, dvb
        if cfg.P > 1:
            # pass this shard's accumulators on; after the last step they reach their owner
            n = cfg.k_lens[src_next]
            ndk, ndv = dk.new_empty((B, Hkv, n, D)), dv.new_empty((B, Hkv, n, Dv))
            what = f"receiving dK/dV at backward step {s + 1}"
            grads_in = (cfg.ring.exchange([dk, dv], [ndk, ndv], what), ndk, ndv)
            del ndk, ndv
        if kv_pending is not None:
            cfg.ring.wait(kv_pending)
            k, v = nk, nv
            del nk, nv
    if grads_in is not None:
        cfg.ring.wait(grads_in[0])
        dk, dv = grads_in[1], grads_in[2]
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    """The ring, once per group of kv heads (with their query heads), forward and backward."""

    @staticmethod
    def forward(ctx, query, key, value, cfg: _Config):
        B, Hq, nq, _ = query.shape
        g = Hq // key.shape[1]
        out = query.new_empty((B, Hq, nq, value.shape[3]))
        lse = query.new_empty((B, Hq, nq), dtype=acc_dtype(query.dtype))
        groups = _head_groups(key)
        for h0, h1 in groups:
            qh = slice(h0 * g, h1 * g)
            o, lh = _ring_forward(cfg, query[:, qh], key[:, h0:h1], value[:, h0:h1])
            out[:, qh] = o
            # the ops' convention: a row with no key has lse = +inf (and output 0)
            lse[:, qh] = lh.masked_fill(lh == float("-inf"), float("inf"))
            del o, lh
        ctx.cfg, ctx.groups = cfg, groups
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        cfg = ctx.cfg
        query, key, value, out, lse = ctx.saved_tensors
        g = query.shape[1] // key.shape[1]
        dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        for h0, h1 in ctx.groups:
            qh, kh = slice(h0 * g, h1 * g), slice(h0, h1)
            gq, gk, gv = _ring_backward(
                cfg, grad_out[:, qh], query[:, qh], key[:, kh], value[:, kh], out[:, qh], lse[:, qh]
            )
            dq[:, qh], dk[:, kh], dv[:, kh] = gq, gk, gv
            del gq, gk, gv
        return dq, dk, dv, None


def ring_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    group=None,
    layout: str = "zigzag",
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    backend: str | None = None,
) -> Tensor:
    """Context-parallel attention: this rank's shard of
    ``scaled_dot_product_attention(Q, K, V, is_causal, scale, enable_gqa)`` over the whole
    sequences Q, K, V, whose shards the ranks of ``group`` hold (docs/design.md, "Context
    parallelism"). Differentiable: the backward runs the ring again (every rank of the group must
    call it, as with DDP).

    Arguments:
        query: (B, Hq, Lq/P, D), this rank's rows of the whole query in ``layout``.
        key: (B, Hkv, Lk/P, D), value (B, Hkv, Lk/P, Dv): this rank's rows of the whole key and
            value. With ``is_causal`` or a window, Lq = Lk (self-attention); otherwise the query
            and key sequences may differ in length (cross-attention).
        group: the process group (default: the world). Without torch.distributed initialised, or
            in a group of one, the call is plain attention with no communication.
        layout: "zigzag" (rank r holds chunks r and 2P-1-r of 2P equal chunks; lengths a
            multiple of 2P) or "contiguous" (rank r holds the r-th run; the first L % P ranks
            one row more). See :func:`pyattn.distributed.shard_sequence`.
        is_causal: upper-left causal over the whole sequences (query i sees keys j <= i).
        scale: score scale, default 1/sqrt(D).
        enable_gqa: Hq may be a multiple of Hkv.
        window_size: (left, right): query i sees keys j with i - left <= j <= i + right
            (global positions; Lq = Lk is required with a window); -1 = unbounded. Ring steps
            wholly outside the window are skipped.
        backend: None (best for the device), "cpu", "cuda", "triton" or "reference".
    Returns:
        (B, Hq, Lq/P, Dv): this rank's rows of the output, in ``layout``.
    Raises:
        InputError (a ValueError and RuntimeError) on every rank, before the ring starts, when
        any rank's inputs are bad or the ranks' shards disagree; RingError (a RuntimeError) when
        a peer fails mid-ring.
    """
    _layout.check_layout(_FN, layout)
    window = check_window(_FN, window_size)
    rank, P = _layout.group_info(group)
    local_error = None
    try:
        _check_local(query, key, value, is_causal, scale, enable_gqa)
    except InputError as exc:
        if P == 1:
            raise
        local_error = exc
    if P == 1:
        Lq, Lk = query.shape[2], key.shape[2]
        if (is_causal or window != (-1, -1)) and Lq != Lk:
            _fail(f"with is_causal or a window the query and key lengths must match, got {Lq} and {Lk}")
        q_lens, k_lens = [Lq], [Lk]
    else:
        q_lens, k_lens = _agree_shards(query, key, value, group, rank, P, layout, is_causal, window,
                                       scale, enable_gqa, local_error)  # fmt: skip
    D = query.shape[-1]
    scale_f = (1.0 / math.sqrt(D) if D > 0 else 1.0) if scale is None else float(scale)
    kernels = Kernels(backend, query.device, query.dtype, (query.shape[-1], value.shape[-1]))
    cfg = _Config(rank, P, group, layout, is_causal, window, scale_f, kernels, q_lens, k_lens)
    return _RingAttention.apply(query, key, value, cfg)


def _agree_shards(query, key, value, group, rank, P, layout, is_causal, window, scale, enable_gqa,
                  local_error) -> tuple[list[int], list[int]]:  # fmt: skip
    """Every rank's shard lengths, after checking that the ranks agree on everything else; the
    same InputError on every rank when they do not (before any ring transfer)."""
    fields = []
    if local_error is None:
        B, Hq, nq, D = query.shape
        Hkv, nk, Dv = key.shape[1], key.shape[2], value.shape[3]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        fields = [1, B, Hq, Hkv, nq, nk, D, Dv, _DTYPE_CODE[query.dtype], query.device.type == "cuda",
                  is_causal, _layout.LAYOUTS.index(layout), *window, enable_gqa, scale is None,
                  0.0 if scale is None else float(scale), grad]  # fmt: skip
    names = ["B", "Hq", "Hkv", None, None, "D", "Dv", "dtype", "device type", "is_causal", "layout",
             "window left", "window right", "enable_gqa", "scale", "scale", "requires_grad"]  # fmt: skip
    every = agree_or_fail(_FN, query, fields, names, group, rank, local_error)
    q_lens = [int(f[4]) for f in every]
    k_lens = [int(f[5]) for f in every]
    for what, lens in (("query", q_lens), ("key/value", k_lens)):
        try:
            expected = _layout.shard_lengths(sum(lens), P, layout)
        except InputError as exc:
            _fail(f"{what}: {exc}")
        if lens != expected:
            _fail(
                f"layout {layout!r} over {P} ranks cuts a {what} sequence of {sum(lens)} into shards "
                f"of {expected}, got shards of {lens}"
            )
    if (is_causal or window != (-1, -1)) and q_lens != k_lens:
        _fail(
            f"with is_causal or a window the query and key sequences must be the same (self-"
            f"attention), got query shards {q_lens} and key shards {k_lens}"
        )
    return q_lens, k_lens
