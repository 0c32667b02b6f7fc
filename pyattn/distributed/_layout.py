"""Sequence layouts of context parallelism: which global positions each rank holds, and the
differentiable shard / unshard of a whole sequence (docs/design.md, "Context parallelism").

- ``"zigzag"`` (default): the sequence is cut into 2P equal chunks and rank r holds chunks r and
  2P-1-r (head and tail). Under causal attention each rank then has the same number of visible
  (query, key) pairs, so no rank waits on another. Needs L divisible by 2P.
- ``"contiguous"``: rank r holds one run of the sequence, the first L % P ranks one row more
  than the others (``torch.tensor_split``'s sizes), so any L works.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops.errors import InputError, InputTypeError

LAYOUTS = ("zigzag", "contiguous")


def check_layout(fn: str, layout) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise InputTypeError(f"{fn}: 'layout' must be one of {LAYOUTS}, got {layout!r}")
    return layout


def group_info(group) -> tuple[int, int]:
    """(rank in the group, group size); (0, 1) when torch.distributed is not initialised and no
    group is given (a single process runs plain attention)."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def runs(L: int, P: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """The [start, end) runs of global positions that ``rank`` of ``P`` holds, in shard order."""
    if layout == "zigzag":
        if L % (2 * P) != 0:
            raise InputError(
                f"layout 'zigzag' cuts the sequence into 2 x {P} ranks = {2 * P} equal chunks: the "
                f"sequence length must be a multiple of {2 * P}, got {L} (use layout='contiguous' "
                f"for any length)"
            )
        c = L // (2 * P)
        return [(rank * c, (rank + 1) * c), ((2 * P - 1 - rank) * c, (2 * P - rank) * c)]
    base, extra = divmod(L, P)
    start = rank * base + min(rank, extra)
    return [(start, start + base + (1 if rank < extra else 0))]


def shard_lengths(L: int, P: int, layout: str) -> list[int]:
    return [sum(b - a for a, b in runs(L, P, r, layout)) for r in range(P)]


def positions(L: int, P: int, rank: int, layout: str, device=None) -> Tensor:
    """The global positions (int64, ascending) of the rows ``rank`` holds."""
    parts = [torch.arange(a, b, device=device) for a, b in runs(L, P, rank, layout)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def shard_positions(length: int, group=None, layout: str = "zigzag", device=None) -> Tensor:
    """The global positions (int64, ascending) of the rows this rank holds of a sequence of
    ``length`` in ``layout`` (e.g. a model's position ids under context parallelism)."""
    check_layout("pyattn.distributed.shard_positions", layout)
    rank, P = group_info(group)
    return positions(length, P, rank, layout if P > 1 else "contiguous", device=device)


def _dim(fn: str, x: Tensor, dim: int) -> int:
    if not isinstance(x, Tensor):
        raise InputTypeError(f"{fn}: 'x' must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(dim, int) or not -x.dim() <= dim < max(x.dim(), 1):
        raise InputError(f"{fn}: 'dim' must be an int in [{-x.dim()}, {x.dim() - 1}], got {dim!r}")
    return dim % x.dim()


def shard_sequence(x: Tensor, dim: int, group=None, layout: str = "zigzag") -> Tensor:
    """This rank's shard of the whole sequence ``x`` along ``dim`` (differentiable: a slice).

    Arguments:
        x: the whole sequence, the same on every rank, e.g. (B, H, L, D) with dim=2.
        dim: the sequence dim.
        group: the process group (default: the world; a single process without
            torch.distributed returns ``x``).
        layout: "zigzag" (chunks r and 2P-1-r of 2P; L a multiple of 2P) or "contiguous".
    Returns:
        the rows of this rank in layout order: (..., L/P, ...).
    """
    fn = "pyattn.distributed.shard_sequence"
    check_layout(fn, layout)
    dim = _dim(fn, x, dim)
    rank, P = group_info(group)
    if P == 1:
        return x
    try:
        pieces = [x.narrow(dim, a, b - a) for a, b in runs(x.shape[dim], P, rank, layout)]
    except InputError as exc:
        raise InputError(f"{fn}: {exc}") from None
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


class _AllGather(torch.autograd.Function):
    """All-gather of shards (zero-padded to the longest) along ``dim``; the backward sums the
    gradient of the whole sequence over the ranks (each rank may use its copy) and keeps this
    rank's rows, as torch.distributed.nn's all_gather does."""

    @staticmethod
    def forward(ctx, x, dim, group, layout, lengths):
        rank, P = group_info(group)
        L = sum(lengths)
        ctx.dim, ctx.group, ctx.layout, ctx.rank, ctx.P = dim, group, layout, rank, P
        n = max(lengths)
        if x.shape[dim] < n:
            pad = list(x.shape)
            pad[dim] = n - x.shape[dim]
            x = torch.cat([x, x.new_zeros(pad)], dim)
        bufs = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(P)]
        dist.all_gather(bufs, x.contiguous(), group=group)
        whole = x.new_empty((*x.shape[:dim], L, *x.shape[dim + 1 :]))
        for r in range(P):
            off = 0
            for a, b in runs(L, P, r, layout):
                whole.narrow(dim, a, b - a).copy_(bufs[r].narrow(dim, off, b - a))
                off += b - a
        return whole

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        L = grad.shape[ctx.dim]
        pieces = [grad.narrow(ctx.dim, a, b - a) for a, b in runs(L, ctx.P, ctx.rank, ctx.layout)]
        return torch.cat(pieces, ctx.dim), None, None, None, None


def unshard_sequence(x: Tensor, dim: int, group=None, layout: str = "zigzag") -> Tensor:
    """The whole sequence from every rank's shard ``x`` (an all-gather; differentiable: the
    backward sums the whole sequence's gradient over the ranks and returns this rank's rows).

    Arguments:
        x: this rank's shard in ``layout``, e.g. (B, H, L/P, D) with dim=2; shards may differ in
            length only as the contiguous layout cuts them (the first L % P ranks one row more).
        dim: the sequence dim.
        group, layout: as :func:`shard_sequence`.
    Returns:
        the whole sequence in order, (..., L, ...), on every rank.
    """
    fn = "pyattn.distributed.unshard_sequence"
    check_layout(fn, layout)
    dim = _dim(fn, x, dim)
    rank, P = group_info(group)
    if P == 1:
        return x
    meta = torch.tensor([x.shape[dim]], dtype=torch.long, device=_meta_device(x, group))
    got = [torch.empty_like(meta) for _ in range(P)]
    dist.all_gather(got, meta, group=group)
    lengths = [int(t.item()) for t in got]
    L = sum(lengths)
    try:
        expected = shard_lengths(L, P, layout)
    except InputError as exc:
        raise InputError(f"{fn}: {exc}") from None
    if lengths != expected:
        raise InputError(
            f"{fn}: layout {layout!r} over {P} ranks cuts a sequence of {L} into shards of "
            f"{expected}, got shards of {lengths}"
        )
    return _AllGather.apply(x, dim, group, layout, lengths)


def _meta_device(x: Tensor, group) -> torch.device:
    """Where a small collective's tensor must live: CPU for gloo, the tensor's device else."""
    backend = dist.get_backend(group)
    return torch.device("cpu") if backend == "gloo" else x.device
