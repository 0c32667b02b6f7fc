"""Run Hugging Face ``transformers`` models on pyattn's fused attention.

    import pyattn.integrations.transformers as pt
    pt.register()                     # adds attn_implementation="pyattn"
    model = transformers.BertModel.from_pretrained(folder, attn_implementation="pyattn")

transformers (>= 4.48, with ``AttentionInterface``; this file follows the 5.x sources) looks the
attention function up by ``config._attn_implementation`` in ``AttentionInterface``, and, in a
separate step, builds the attention mask with the function registered under the same name in
``masking_utils.AttentionMaskInterface``. A name missing from the mask interface makes
``_preprocess_mask_arguments`` return no mask at all (meant for servers that handle masking
themselves), so registering only the attention function would silently attend to padding.
pyattn's op has the semantics of ``torch.nn.functional.scaled_dot_product_attention``, so the
mask function is transformers' ``sdpa_mask``: a boolean (B, 1, Tq, Tk) mask, True = attend, or
None when nothing is masked.

Decode steps of a left-padded batch (one query row, a mask that only hides each sequence's
leading padding) run the KV-cache kernel, which takes no mask: each sequence's real keys,
``start_b .. Tk - 1``, become a paged cache of one-row pages over transformers' own tensors (no
copy) with ``block_table[b, t] = start_b + t`` and ``cache_seqlens[b] = Tk - start_b``
(docs/design.md, "Generation with a KV cache"). Unpadded decode steps carry no mask and reach
that kernel through ``pyattn.scaled_dot_product_attention``'s own route.

Decoder variants (docs/design.md, "Attention variants"): the modules pass ``sliding_window``
(a key is seen when ``q_idx - sliding_window < kv_idx``: window (sliding_window - 1, 0) around
the lower-right diagonal), ``softcap`` (Gemma 2) and ``s_aux`` (gpt-oss sinks, (Hq,)) as keyword
arguments; they go to the fused op. transformers still builds the dense mask of a sliding or
causal layer where it cannot skip it; where that mask is exactly the fused band (no padding),
it is dropped and the kernel's band runs alone (compared once per mask object, see
``_band_equivalent``), and the band's blocks outside the window are skipped either way.
"""

from __future__ import annotations

import functools
import warnings
import weakref

import torch

import pyattn

NAME = "pyattn"


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function calling ``pyattn.scaled_dot_product_attention``.

    Arguments:
        module: the attention module (read for ``is_causal`` and ``num_key_value_groups``).
        query: (B, Hq, Tq, D); key, value: (B, Hkv, Tk, D).
        attention_mask: from the "pyattn" mask function: bool (B, 1, Tq, Tk), True = attend,
            or a float additive mask, or None.
        dropout, scaling, is_causal: as transformers' sdpa_attention_forward.
        backend: pyattn backend (None = the best for the device).
    Returns:
        (attn_output (B, Tq, Hq, D), None): transformers' layout; no attention weights.
    """
    if kwargs.get("position_bias") is not None:
        raise ValueError(
            f"pyattn attention does not support position_bias={kwargs['position_bias']!r}; use eager or sdpa"
        )
    if kwargs.get("output_attentions", False):
        warnings.warn(
            "pyattn attention returns no attention weights (output_attentions ignored)", stacklevel=2
        )
    q_length = query.shape[2]
    module_causal = getattr(module, "is_causal", True)
    sliding_window = kwargs.get("sliding_window")
    left = -1
    if sliding_window is not None:
        if not isinstance(sliding_window, int) or isinstance(sliding_window, bool) or sliding_window < 1:
            raise ValueError(f"pyattn attention takes an int sliding_window >= 1, got {sliding_window!r}")
        if not module_causal:
            raise ValueError("pyattn attention supports sliding_window in causal (decoder) attention only")
        left = sliding_window - 1
    softcap = kwargs.get("softcap") or 0.0
    sinks = kwargs.get("s_aux")
    causal = is_causal if is_causal is not None else module_causal
    # As sdpa_attention_forward: a given mask already holds causality; is_causal only
    # applies to an unmasked self-attention over more than one query.
    causal = bool(q_length > 1 and attention_mask is None and causal)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    window = (left, 0) if left >= 0 else (-1, -1)
    if module_causal and _band_equivalent(attention_mask, q_length, key.shape[2], left):
        # the mask is the lower-right causal band itself: the fused window does it alone
        attention_mask, causal, window = None, False, (left, 0)
    if backend in (None, "cpu"):
        out = _left_padded_decode(
            query, key, value, attention_mask, dropout, scaling, window, float(softcap), sinks
        )
        if out is not None:
            return out.transpose(1, 2).contiguous(), None  # (B, Tq, Hq, D)
    out = pyattn.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        is_causal=causal,
        scale=scaling,
        enable_gqa=gqa,
        window_size=window,
        softcap=float(softcap),
        sinks=sinks,
        backend=backend,
    )  # (B, Hq, Tq, D)
    return out.transpose(1, 2).contiguous(), None  # (B, Tq, Hq, D)


def _left_padded_decode(
    query, key, value, mask, dropout, scaling, window=(-1, -1), softcap=0.0, sinks=None
) -> torch.Tensor | None:
    """A CPU decode step whose mask hides only leading (left) padding, on the KV-cache kernel
    (module doc), with the layer's window, softcap and sinks; None when the call is not one (then
    the sdpa path runs it)."""
    from pyattn.ops import sdpa

    if (
        query.device.type != "cpu"
        or dropout
        or not isinstance(mask, torch.Tensor)
        or mask.dtype != torch.bool
        or query.dim() != 4
        or query.shape[2] != 1
        or torch.compiler.is_compiling()
    ):
        return None
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return None
    B, Hq, _, _ = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    if Hkv == 0 or Hq % Hkv or Hq // Hkv > sdpa.DECODE_MAX_ROWS or Lk < sdpa.DECODE_MIN_KEYS:
        return None
    if tuple(mask.shape) != (B, 1, 1, Lk) or key.shape[0] != B or value.shape[:3] != key.shape[:3]:
        return None
    # one-row pages: page p sits at row p of a (rows, Hkv, 1, D) view with the row stride, so
    # sequence b's position j is page b * (batch stride / row stride) + j, for K and V alike
    strides = [(t.stride(0), t.stride(2), t.stride(3)) for t in (key, value)]
    (sb, sl, sd), (sbv, slv, sdv) = strides
    if sd != 1 or sdv != 1 or sl <= 0 or slv <= 0 or sb % sl or sbv % slv or sb // sl != sbv // slv:
        return None
    keep = mask[:, 0, 0]  # (B, Lk), True = attend
    n = keep.sum(1)  # (B,) real keys
    start = Lk - n  # (B,)
    pos = torch.arange(Lk, device=keep.device)
    if not bool((n > 0).all()) or not torch.equal(keep, pos[None, :] >= start[:, None]):
        return None  # not left padding alone (or a row with nothing to attend to)
    per_b = sb // sl
    n_pages = (B - 1) * per_b + Lk
    pages = [
        t.as_strided((n_pages, Hkv, 1, t.shape[3]), (t.stride(2), t.stride(1), t.stride(2), 1))
        for t in (key, value)
    ]  # (n_pages, Hkv, 1, D) views of transformers' tensors
    table = torch.arange(B, device=keep.device)[:, None] * per_b + start[:, None] + pos[None, :]  # (B, Lk)
    table = table.clamp_(max=n_pages - 1).to(torch.int32)  # entries past n[b] are never read
    return pyattn.kvcache_attention(
        query, pages[0], pages[1], n.to(torch.int32), block_table=table, is_causal=False, scale=scaling,
        window_size=window, softcap=softcap, sinks=sinks, backend="cpu",
    )  # fmt: skip


# The last mask compared, per window: (weak reference, version, answer). transformers passes one
# mask object to every layer of a kind, so a forward compares it once, not once per layer.
_BAND_CACHE: dict[int, tuple[weakref.ref, int, bool]] = {}


def _band_equivalent(mask, q_length: int, kv_length: int, left: int) -> bool:
    """Whether a bool (B, 1, Tq, Tk) mask allows exactly the keys lower-right causal attention with
    window (left, 0) allows (no padding, no other pattern): then the fused band gives the same
    answer without reading it. Eager only (the comparison reads tensor data)."""
    if mask is None or not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        return False
    if torch.compiler.is_compiling() or mask.dim() != 4 or tuple(mask.shape[-2:]) != (q_length, kv_length):
        return False
    hit = _BAND_CACHE.get(left)
    if hit is not None and hit[0]() is mask and hit[1] == mask._version:
        return hit[2]
    i = torch.arange(q_length, device=mask.device)[:, None]
    j = torch.arange(kv_length, device=mask.device)[None, :]
    d = i + kv_length - q_length
    band = j <= d
    if left >= 0:
        band = band & (j >= d - left)
    same = bool((mask == band).all())
    _BAND_CACHE[left] = (weakref.ref(mask), mask._version, same)
    return same


def register(name: str = NAME, backend: str | None = None) -> str:
    """Make ``attn_implementation=name`` run on pyattn in transformers models.

    Arguments:
        name: the implementation name to register ("pyattn").
        backend: pin a pyattn backend ("cpu", "triton", "cuda", "reference"); None = automatic.
    Returns:
        The registered name.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:
        raise RuntimeError(
            "pyattn.integrations.transformers needs transformers with AttentionInterface and "
            f"masking_utils.AttentionMaskInterface (>= 4.53): {exc}"
        ) from exc
    fn = attention_forward if backend is None else functools.partial(attention_forward, backend=backend)
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
