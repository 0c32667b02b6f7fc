"""Context parallelism in the models (docs/design.md, "Context parallelism"): the sequence of
every batch is sharded over a process group, each rank runs the layers on its shard, and
attention runs as pyattn.distributed.ring_attention. Kept free of torch.distributed imports, so
that importing a model does not load it."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from ..ops.errors import InputError


class ContextParallel(NamedTuple):
    """A process group and the sequence layout of its shards ("zigzag" or "contiguous")."""

    group: object
    layout: str


def check(owner: str, group, layout: str) -> ContextParallel | None:
    """The ContextParallel of ``group`` (None: off), with the layout checked."""
    if group is None:
        return None
    from ..distributed import LAYOUTS

    if layout not in LAYOUTS:
        raise InputError(f"{owner}: 'layout' must be one of {LAYOUTS}, got {layout!r}")
    return ContextParallel(group, layout)


def attention(cp: ContextParallel, q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, scale, backend):
    """Ring attention of this rank's (B, H, L/P, D) shards."""
    from ..distributed import ring_attention

    return ring_attention(q, k, v, group=cp.group, layout=cp.layout, is_causal=is_causal, scale=scale,
                          backend=backend)  # fmt: skip


def whole_length(cp: ContextParallel, n: int, device) -> int:
    """The whole sequence's length from this rank's ``n`` rows (one small all-reduce)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.long, device=device if dist.get_backend(cp.group) != "gloo" else "cpu")
    dist.all_reduce(t, group=cp.group)
    return int(t.item())


def positions(cp: ContextParallel, n: int, device) -> Tensor:
    """(1, n) global positions of this rank's rows."""
    from ..distributed import shard_positions

    return shard_positions(whole_length(cp, n, device), cp.group, cp.layout, device=device)[None]


def holds_first(cp: ContextParallel) -> bool:
    """Whether this rank holds position 0 (rank 0 in both layouts)."""
    import torch.distributed as dist

    return dist.get_rank(cp.group) == 0


def no_dropout(owner: str, training: bool, p: float) -> None:
    if training and p > 0:
        raise InputError(
            f"{owner}: context-parallel attention runs without attention dropout, got dropout "
            f"p={p} in training mode (set it to 0 or call .eval())"
        )
