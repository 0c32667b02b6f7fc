"""One ring step's attention: which part of the (query shard, key shard) block is visible, the
fused op that computes it, and the log-sum-exp merge (docs/design.md, "Context parallelism").

The fused ops are called through :class:`Kernels` only, so a change of the ops' Python glue
(pyattn/ops/) does not reach here; their schemas are csrc/registration.cpp's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _backend

# sdpa's `causal` argument (csrc/registration.cpp): none, upper-left, lower-right
from ..ops._common import CAUSAL_LOWER_RIGHT, CAUSAL_NONE, CAUSAL_UPPER_LEFT  # noqa: E402,F401

_FAR = 2**62  # an unbounded window side, as a position bound


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merge and gradient accumulators: float32 (float64 for float64 inputs, for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Block(NamedTuple):
    """The part of a (query shard, key shard) pair a step computes: query rows q0:q1 against
    key rows k0:k1, with the op's ``causal`` code and/or a (q1-q0, k1-k0) bool mask (True =
    attend) built from global positions. Rows and keys outside those ranges see nothing."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: int
    mask: Tensor | None


def plan_block(qpos: Tensor, kpos: Tensor, causal: bool, window: tuple[int, int], shift: int):
    """The Block of query positions ``qpos`` against key positions ``kpos`` (both int64,
    ascending), or None when no query sees any key (the step is skipped).

    Query at position i sees key j when ``d - left <= j <= d + right`` (a -1 side unbounded) and,
    causal, ``j <= i``; ``d = i`` causal, else ``i + shift`` (shift = Lk - Lq of the whole
    sequences, flash-attention's window convention).
    """
    nq, nk = qpos.numel(), kpos.numel()
    left, right = window
    if nq == 0 or nk == 0:
        return None
    if not causal and left < 0 and right < 0:
        return Block(0, nq, 0, nk, CAUSAL_NONE, None)
    d = qpos if causal else qpos + shift
    lo = d - left if left >= 0 else torch.full_like(d, -_FAR)
    hi = d + right if right >= 0 else torch.full_like(d, _FAR)
    if causal:
        hi = torch.minimum(hi, qpos)
    # lo and hi grow with the row, so each row sees a run of keys and each key a run of rows
    seen = torch.searchsorted(kpos, hi, right=True) - torch.searchsorted(kpos, lo)  # (nq,)
    rows = torch.nonzero(seen > 0).flatten()
    if rows.numel() == 0:
        return None
    first = torch.searchsorted(hi, kpos)  # first row with hi >= j
    last = torch.searchsorted(lo, kpos, right=True)  # rows before it have lo <= j
    cols = torch.nonzero(first < last).flatten()
    q0, q1 = int(rows[0]), int(rows[-1]) + 1
    k0, k1 = int(cols[0]), int(cols[-1]) + 1
    if bool((seen[q0:q1] == k1 - k0).all()):
        return Block(q0, q1, k0, k1, CAUSAL_NONE, None)
    if causal and left < 0 and right < 0 and q1 - q0 == k1 - k0 and torch.equal(qpos[q0:q1], kpos[k0:k1]):
        return Block(q0, q1, k0, k1, CAUSAL_UPPER_LEFT, None)  # the diagonal block
    kp = kpos[k0:k1]
    mask = (kp[None, :] >= lo[q0:q1, None]) & (kp[None, :] <= hi[q0:q1, None])  # (nq', nk')
    return Block(q0, q1, k0, k1, CAUSAL_NONE, mask)


class Kernels:
    """The forward and backward of one block on the chosen backend: pyattn's fused ops
    (``cpu``/``cuda``: ``pyattn::sdpa_fwd``/``sdpa_bwd``; ``triton``: their ``_triton`` twins)
    or the naive float32 graph below (``reference``). Canonical (B, H, L, D) tensors; GQA by
    head counts, as the ops take it; ``mask`` (Lq, Lk) bool or None."""

    def __init__(self, backend: str | None, device: torch.device, dtype: torch.dtype, head_dims=()):
        self.name = _backend.resolve("sdpa", backend, device, dtype, head_dims)
        # the ops of the backend's record (pyattn/_backend.py), or the naive graph below
        self._fwd, self._bwd = _backend.kernel_ops("sdpa", self.name) or (naive_fwd, naive_bwd)

    @staticmethod
    def _mask(mask, q, k):
        if mask is None:
            return None
        # a stride-0 view over batch and heads: the ops read masks through their strides
        return mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])

    def fwd(self, q, k, v, causal, mask, scale):
        return self._fwd(q, k, v, self._mask(mask, q, k), 0.0, causal, scale, 0, 0)

    def bwd(self, do, q, k, v, causal, mask, out, lse, scale):
        return self._bwd(do, q, k, v, self._mask(mask, q, k), out, lse, 0.0, causal, scale, 0, 0)


def _scores(q, k, causal, mask, scale):
    acc = acc_dtype(q.dtype)
    g = q.shape[1] // k.shape[1]
    kf = k.to(acc).repeat_interleave(g, dim=1)  # (B, Hq, Lk, D)
    s = torch.matmul(q.to(acc), kf.transpose(-1, -2)) * scale  # (B, Hq, Lq, Lk)
    Lq, Lk = s.shape[-2:]
    allowed = None
    if causal != CAUSAL_NONE:
        off = 0 if causal == CAUSAL_UPPER_LEFT else Lk - Lq
        allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(off)
    if mask is not None:
        allowed = mask if allowed is None else allowed & mask
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s, g


def naive_fwd(q, k, v, attn_mask, dropout_p, causal, scale, seed, offset):
    """(out, lse) of one block as the ops return them, from the full score matrix."""
    s, g = _scores(q, k, causal, None if attn_mask is None else attn_mask[0, 0], scale)
    lse = torch.logsumexp(s, dim=-1)  # (B, Hq, Lq); -inf where a row sees nothing
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.matmul(p, v.to(s.dtype).repeat_interleave(g, dim=1))
    return out.to(q.dtype), lse.masked_fill(lse == float("-inf"), float("inf"))


def naive_bwd(do, q, k, v, attn_mask, out, lse, dropout_p, causal, scale, seed, offset):
    """(dq, dk, dv) of one block given the row's final (out, lse): flash-attention's backward."""
    s, g = _scores(q, k, causal, None if attn_mask is None else attn_mask[0, 0], scale)
    acc = s.dtype
    p = torch.exp(s - lse.to(acc)[..., None]).nan_to_num(0.0)  # (B, Hq, Lq, Lk)
    dof = do.to(acc)
    vf = v.to(acc).repeat_interleave(g, dim=1)
    dp = torch.matmul(dof, vf.transpose(-1, -2))
    delta = (dof * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = torch.matmul(ds, k.to(acc).repeat_interleave(g, dim=1))
    B, Hkv, Lk = k.shape[0], k.shape[1], k.shape[2]
    dk = torch.matmul(ds.transpose(-1, -2), q.to(acc)).view(B, Hkv, g, Lk, -1).sum(2)
    dv = torch.matmul(p.transpose(-1, -2), dof).view(B, Hkv, g, Lk, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def merge(out: Tensor, lse: Tensor, o: Tensor, lse_b: Tensor) -> None:
    """Fold a block's (o, lse_b) into the running (out, lse) in place (accumulator dtype):
    ``lse' = log(e^lse + e^lse_b)``, ``out' = e^(lse - lse') out + e^(lse_b - lse') o``. A row the
    block left empty (the ops' lse = +inf) adds nothing."""
    lse_b = lse_b.to(lse.dtype)
    lse_b = lse_b.masked_fill(lse_b == float("inf"), float("-inf"))
    new = torch.logaddexp(lse, lse_b)
    some = new > float("-inf")
    a = torch.where(some, torch.exp(lse - new), 0.0)
    b = torch.where(some, torch.exp(lse_b - new), 0.0)
    out.mul_(a[..., None]).addcmul_(o.to(out.dtype), b[..., None])
    lse.copy_(torch.where(some, new, lse))
