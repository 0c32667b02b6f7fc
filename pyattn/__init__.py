"""pyattn: fused attention kernels for PyTorch (Triton, CUDA C++ and CPU C++).

Usage (docs/design.md describes how a call reaches its kernel)::

    import pyattn
    context = pyattn.additive_attention(query, key, value, v, key_padding_mask)
    out = pyattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = pyattn.kvcache_attention(q, k_cache, v_cache, cache_seqlens, k_new, v_new)  # decoding
    with pyattn.patch_torch():  # torch's F.scaled_dot_product_attention runs pyattn's kernels
        ...
"""

from __future__ import annotations

import sys as _sys

from . import _source_tree

_source_tree.attach(_sys.modules[__name__])

from . import nn, reference  # noqa: E402
from ._backend import backends  # noqa: E402
from ._patch import TorchPatch, patch_torch  # noqa: E402
from .ops import (  # noqa: E402
    additive_attention,
    kvcache_attention,
    scaled_dot_product_attention,
    varlen_attention,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "additive_attention",
    "backends",
    "kvcache_attention",
    "nn",
    "patch_torch",
    "reference",
    "scaled_dot_product_attention",
    "TorchPatch",
    "varlen_attention",
]
