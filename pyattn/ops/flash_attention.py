"""pyattn.scaled_dot_product_attention: fused multi-head attention with the exact semantics of
``torch.nn.functional.scaled_dot_product_attention`` (plus ``backend=``).

SKELETON: the fused C++/Triton/CUDA paths are being built (issues 4 and 5); until then every
call runs pyattn.reference. The signature and semantics below are the contract.
"""

from __future__ import annotations

from torch import Tensor

from .. import reference

OP = "flash_attention"


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Arguments:
        query: (..., Hq, Lq, D); key: (..., Hkv, Lk, D); value: (..., Hkv, Lk, Dv).
        attn_mask: bool (True = attend) or float (added), broadcastable to (..., Hq, Lq, Lk).
        dropout_p, is_causal, scale, enable_gqa: as torch.
        backend: None (best for the device; env PYATTN_BACKEND overrides), "cpu", "cuda",
            "triton" or "reference".
    Returns:
        (..., Hq, Lq, Dv). Rows with every key masked are zeros (torch gives NaN).
    """
    return reference.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
    )
