"""pyattn.kvcache_attention: one decoding step (or a short block of new tokens) against a key/value
cache, with the new tokens appended to the cache in place, as a PyTorch custom op.

The op (schema and conventions in csrc/registration.cpp)::

    pyattn::kvcache_attention_fwd(query, k_cache!, v_cache!, cache_seqlens, key, value, block_table,
        sinks, alibi_slopes, causal, scale, window_left, window_right, softcap, num_splits)
        -> (out, lse)

mutates k_cache and v_cache (``Tensor(a!)``, so torch.compile and opcheck know), and has a Triton
twin ``*_triton`` (kernels/kvcache_attention.py) where Triton is usable. It is forward only:
decoding is inference. The kernels cut each sequence's cache into splits run in parallel and
merge them exactly through the log-sum-exp (flash-decoding), and read each K/V row once for all
the query heads that share it (GQA packing); docs/design.md, "KV-cache attention".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference
from ._common import check_bool, check_scale, default_scale, fail, is_half_cpu, lse_dtype
from ._common import compiling as _compiling
from ._glue import FusedOp, shape_str
from .errors import InputError, InputTypeError

OP = "kvcache_attention"


def _fail(msg: str, cls: type[InputError] = InputError):
    fail(OP, msg, cls)


def _is_int(x) -> bool:
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


def check_inputs(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    key: Tensor | None,
    value: Tensor | None,
    block_table: Tensor | None,
    is_causal: bool,
    scale: float | None,
    window_size,
    softcap: float,
    sinks: Tensor | None,
    alibi_slopes: Tensor | None,
    num_splits: int,
) -> tuple[int, int]:
    """Raise an InputError (InputTypeError for a wrong type or dtype) naming the argument, what
    was expected and what came, before anything is written: a refused call leaves the caches
    untouched. Returns the window as (left, right) ints.

    The checks of cache_seqlens' and block_table's values read tensor data and run in eager mode
    only; under torch.compile the CPU op still refuses positions outside the cache."""
    tensors = {"query": query, "k_cache": k_cache, "v_cache": v_cache, "cache_seqlens": cache_seqlens}
    optional = {
        "key": key,
        "value": value,
        "block_table": block_table,
        "sinks": sinks,
        "alibi_slopes": alibi_slopes,
    }
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            _fail(f"'{name}' must be a torch.Tensor, got {type(t).__name__}", InputTypeError)
    for name, t in optional.items():
        if t is not None and not isinstance(t, Tensor):
            _fail(f"'{name}' must be a torch.Tensor or None, got {type(t).__name__}", InputTypeError)
    check_bool(OP, "is_causal", is_causal)
    check_scale(OP, scale)
    if not _is_int(num_splits):
        _fail(f"'num_splits' must be an int, got {type(num_splits).__name__}", InputTypeError)
    if num_splits < 0:
        _fail(f"'num_splits' must be >= 0 (0 chooses), got {num_splits}")
    if not (
        isinstance(window_size, (tuple, list)) and len(window_size) == 2 and all(map(_is_int, window_size))
    ):
        _fail(f"'window_size' must be a pair of ints (left, right), got {window_size!r}", InputTypeError)
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        _fail(f"'window_size' entries must be >= -1 (-1 = unbounded), got {window_size!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        _fail(f"'softcap' must be a float, got {type(softcap).__name__}", InputTypeError)
    if not (math.isfinite(softcap) and softcap >= 0.0):
        _fail(f"'softcap' must be finite and >= 0 (0 = off), got {softcap!r}")

    for name in ("query", "k_cache", "v_cache"):
        t = tensors[name]
        if t.dim() != 4:
            _fail(f"'{name}' must be 4-D, got {t.dim()}-D {shape_str(t)}")
    if not query.is_floating_point():
        _fail(f"'query' must be a floating-point tensor, got {query.dtype}", InputTypeError)
    new = {"key": key, "value": value}
    if (key is None) != (value is None):
        _fail("'key' and 'value' (the new tokens) must be given together or both be None")
    for name, t in {"k_cache": k_cache, "v_cache": v_cache, **new}.items():
        if t is None:
            continue
        if t.dtype != query.dtype:
            _fail(f"'{name}' must have query's dtype {query.dtype}, got {t.dtype}", InputTypeError)
        if t.device != query.device:
            _fail(f"'{name}' is on {t.device} but query is on {query.device}")
    B, Hq, Lq, D = query.shape
    paged = block_table is not None
    layout = "(num_pages, Hkv, page_size, D)" if paged else "(B, Hkv, L_max, D)"
    if k_cache.shape[-1] != D:
        _fail(f"'k_cache' must be {layout} with query's D={D}, got {shape_str(k_cache)}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        _fail(
            f"'v_cache' must share k_cache's first three dims {tuple(k_cache.shape[:3])}, got {shape_str(v_cache)}"
        )
    if not paged and k_cache.shape[0] != B:
        _fail(f"'k_cache' must be (B, Hkv, L_max, D) with query's B={B}, got {shape_str(k_cache)}")
    Hkv = k_cache.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        _fail(
            f"the caches' kv heads must divide query's heads: got Hq={Hq}, Hkv={Hkv} (k_cache {shape_str(k_cache)})"
        )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            _fail(
                f"'{name}' must have a contiguous last dim (it is written in place), got strides {t.stride()}"
            )
    if key is not None:
        Dv = v_cache.shape[-1]
        for name, t, last in (("key", key, D), ("value", value, Dv)):
            want = (B, Hkv, Lq, last)
            if tuple(t.shape) != want:
                _fail(
                    f"'{name}' (the new tokens) must be (B, Hkv, Lq, {'D' if name == 'key' else 'Dv'}) = {want}, got {shape_str(t)}"
                )
    if cache_seqlens.dtype != torch.int32:
        _fail(f"'cache_seqlens' must be int32, got {cache_seqlens.dtype}", InputTypeError)
    if cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != B:
        _fail(f"'cache_seqlens' must be (B,) = ({B},), got {shape_str(cache_seqlens)}")
    if cache_seqlens.device != query.device:
        _fail(f"'cache_seqlens' is on {cache_seqlens.device} but query is on {query.device}")
    if paged:
        if block_table.dtype != torch.int32:
            _fail(f"'block_table' must be int32, got {block_table.dtype}", InputTypeError)
        if block_table.dim() != 2 or block_table.shape[0] != B:
            _fail(f"'block_table' must be (B, max_pages) with B={B}, got {shape_str(block_table)}")
        if block_table.device != query.device:
            _fail(f"'block_table' is on {block_table.device} but query is on {query.device}")
        if k_cache.shape[2] == 0:
            _fail(f"a paged cache's pages must hold at least one row, got k_cache {shape_str(k_cache)}")
    for name, t in (("sinks", sinks), ("alibi_slopes", alibi_slopes)):
        if t is None:
            continue
        if not t.is_floating_point():
            _fail(f"'{name}' must be a floating-point tensor, got {t.dtype}", InputTypeError)
        if t.device != query.device:
            _fail(f"'{name}' is on {t.device} but query is on {query.device}")
    if sinks is not None and tuple(sinks.shape) != (Hq,):
        _fail(f"'sinks' must be (Hq,) = ({Hq},), got {shape_str(sinks)}")
    if alibi_slopes is not None and tuple(alibi_slopes.shape) not in ((Hq,), (B, Hq)):
        _fail(
            f"'alibi_slopes' must be (Hq,) = ({Hq},) or (B, Hq) = ({B}, {Hq}), got {shape_str(alibi_slopes)}"
        )
    if torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad
        for t in (query, k_cache, v_cache, key, value, sinks, alibi_slopes)
    ):
        _fail(
            "it is forward only (inference): call it under torch.no_grad() or on tensors that do not require grad"
        )
    if not _compiling():
        _check_values(
            cache_seqlens, block_table, Lq if key is not None else 0, k_cache.shape[0], k_cache.shape[2]
        )
    return left, right


def _check_values(cache_seqlens: Tensor, block_table: Tensor | None, new: int, num_pages: int, rows: int):
    """Eager-only checks of the data: every sequence (after the append) fits its cache, and every
    page it uses exists."""
    lens = cache_seqlens.tolist()
    capacity = rows if block_table is None else block_table.shape[1] * rows
    for b, n in enumerate(lens):
        if n < 0:
            _fail(f"'cache_seqlens' must be >= 0, got cache_seqlens[{b}] = {n}")
        if n + new > capacity:
            what = (
                f"{new} new tokens at cache_seqlens[{b}] = {n}" if new else f"cache_seqlens[{b}] = {n} keys"
            )
            where = "L_max" if block_table is None else "max_pages * page_size"
            _fail(f"the cache is too short: {what} need {n + new} rows, the cache holds {where} = {capacity}")
    if block_table is None:
        return
    table = block_table.tolist()
    for b, n in enumerate(lens):
        for page in range(-(-(n + new) // rows)):
            if not 0 <= table[b][page] < num_pages:
                _fail(
                    f"'block_table'[{b}, {page}] = {table[b][page]} is not a page of the cache "
                    f"(k_cache has {num_pages} pages)"
                )


# -- the ops ---------------------------------------------------------------------------------------


def _fake_fwd(query, k_cache, v_cache, cache_seqlens, key, value, block_table, sinks, alibi_slopes, causal,
              scale, window_left, window_right, softcap, num_splits):  # fmt: skip
    B, Hq, Lq, _ = query.shape
    out = query.new_empty((B, Hq, Lq, v_cache.shape[-1]))
    lse = query.new_empty((B, Hq, Lq), dtype=lse_dtype(query.dtype))
    return out, lse


# forward only (decoding is inference): no backward op, no autograd
_OPS = FusedOp(OP, public="kvcache_attention", fake_fwd=_fake_fwd)
_OPS.load()


# -- public API ------------------------------------------------------------------------------------


def kvcache_attention(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    key: Tensor | None = None,
    value: Tensor | None = None,
    *,
    block_table: Tensor | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    num_splits: int = 0,
    backend: str | None = None,
) -> Tensor:
    """Attention of a few new query positions over a key/value cache, appending the new keys and
    values to the cache in place first (flash-attention's ``flash_attn_with_kvcache``).

    Sequence b holds ``Lk_b = cache_seqlens[b] + Lq`` keys after the append (``cache_seqlens[b]``
    without key/value); query row i sits on the lower-right diagonal ``d = i + Lk_b - Lq``. The
    cache is read once per step: split-K over its length (merged exactly by the log-sum-exp) and
    the Hq/Hkv query heads of one kv head in one tile. A row with no key to attend to gives zeros.
    Forward only. The caches are not touched when the inputs are refused.

    Arguments:
        query: (B, Hq, Lq, D).
        k_cache, v_cache: dense (B, Hkv, L_max, D) / (B, Hkv, L_max, Dv) (transformers' cache
            layout), or paged (num_pages, Hkv, page_size, D) / (.., Dv) with ``block_table``;
            any strides but a contiguous last dim. Written in place at the new positions.
        cache_seqlens: int32 (B,): how many positions of each sequence are filled (before the
            new tokens).
        key, value: the new tokens, (B, Hkv, Lq, D) / (B, Hkv, Lq, Dv), written at positions
            cache_seqlens[b] .. cache_seqlens[b] + Lq - 1; or None (attend to the cache as is).
        block_table: int32 (B, max_pages): sequence b's position j is row j % page_size of page
            block_table[b, j // page_size]; any page size. None: a dense cache.
        is_causal: query i sees keys j <= d (lower-right across the new block).
        scale: score scale, default ``1 / sqrt(D)``.
        window_size: (left, right): keys d - left <= j <= d + right; -1 = unbounded.
        softcap: scores s -> softcap * tanh(s / softcap) after scaling, before masks (0 = off).
        sinks: (Hq,): one extra logit per head in the softmax denominator, with no value.
        alibi_slopes: (Hq,) or (B, Hq): scores -= slope * |d - j|.
        num_splits: split-K count per sequence; 0 chooses from the shape and the thread count.
        backend: None (best for the device; env PYATTN_BACKEND overrides), "cpu", "cuda",
            "triton" or "reference".
    Returns:
        (B, Hq, Lq, Dv) in query's dtype (float32 statistics).
    """
    left, right = check_inputs(
        query, k_cache, v_cache, cache_seqlens, key, value, block_table, is_causal, scale, window_size,
        softcap, sinks, alibi_slopes, num_splits,
    )  # fmt: skip
    D = query.shape[-1]
    scale_f = default_scale(scale, D)
    chosen = _OPS.resolve(backend, query.device, query.dtype, (D, v_cache.shape[-1]))
    if chosen == "reference":
        # a half score matrix overflows (and CPU half matmuls are slow): float32, rounded once
        q = query.float() if is_half_cpu(query) else query
        out = reference.kvcache_attention(
            q, k_cache, v_cache, cache_seqlens, key, value, block_table=block_table, is_causal=is_causal,
            scale=scale_f, window_size=(left, right), softcap=float(softcap), sinks=sinks,
            alibi_slopes=alibi_slopes,
        )  # fmt: skip
        return out.to(query.dtype)
    op = _OPS.forward_op(chosen)
    out, _lse = op(
        query, k_cache, v_cache, cache_seqlens, key, value, block_table, sinks, alibi_slopes, is_causal,
        scale_f, left, right, float(softcap), int(num_splits),
    )  # fmt: skip
    return out
