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
"""

from __future__ import annotations

import functools
import warnings

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
    for unsupported in ("softcap", "position_bias", "sliding_window", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(
                f"pyattn attention does not support {unsupported}={kwargs[unsupported]!r}; use eager or sdpa"
            )
    if kwargs.get("output_attentions", False):
        warnings.warn(
            "pyattn attention returns no attention weights (output_attentions ignored)", stacklevel=2
        )
    q_length = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As sdpa_attention_forward: a given mask already holds causality; is_causal only
    # applies to an unmasked self-attention over more than one query.
    causal = bool(q_length > 1 and attention_mask is None and causal)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    out = pyattn.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        is_causal=causal,
        scale=scaling,
        enable_gqa=gqa,
        backend=backend,
    )  # (B, Hq, Tq, D)
    return out.transpose(1, 2).contiguous(), None  # (B, Tq, Hq, D)


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
