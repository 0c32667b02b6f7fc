"""pyattn.patch_torch: run models nobody here wrote on pyattn's kernels, without editing them.

    with pyattn.patch_torch():            # or: handle = pyattn.patch_torch(); ...; handle.undo()
        out = model(x)                    # every F.scaled_dot_product_attention call is pyattn's

``sdpa=True`` replaces ``torch.nn.functional.scaled_dot_product_attention`` (which
``torch.nn.MultiheadAttention``, ``torch.nn.Transformer*`` and Hugging Face's "sdpa" attention
call) by a function that runs ``pyattn.scaled_dot_product_attention``, except while the caller
restricted torch to its math backend (``torch.nn.attention.sdpa_kernel([SDPBackend.MATH])``,
which is how one asks for torch's own reference): those calls go to torch's function.
``mha=True`` also makes ``torch.nn.MultiheadAttention`` (and the name ``torch.nn.Transformer*``
layers build it from) ``pyattn.nn.MultiheadAttention``, for modules constructed while the patch
is on: same constructor, state-dict keys and outputs. torch's Transformer layers in eval mode
without grad take their own fused fast path, which calls neither.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["TorchPatch", "patch_torch"]


def _math_only() -> bool:
    """True while torch's SDPA is restricted to its math backend (sdpa_kernel([MATH]))."""
    b = torch.backends.cuda
    fused = b.flash_sdp_enabled() or b.mem_efficient_sdp_enabled()
    cudnn = getattr(b, "cudnn_sdp_enabled", None)
    if cudnn is not None:
        fused = fused or cudnn()
    return b.math_sdp_enabled() and not fused


class TorchPatch:
    """The handle ``patch_torch`` returns: ``undo()`` restores what it replaced; also a context
    manager (undone on exit). ``calls`` counts the SDPA calls routed to pyattn."""

    def __init__(self, sdpa: bool, mha: bool) -> None:
        self.calls = 0
        self._saved: list[tuple[object, str, object]] = []
        if sdpa:
            from .ops.sdpa import scaled_dot_product_attention as pyattn_sdpa

            torch_sdpa = F.scaled_dot_product_attention

            @functools.wraps(torch_sdpa)
            def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                        scale=None, enable_gqa=False):  # fmt: skip
                if _math_only():
                    return torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                      enable_gqa=enable_gqa)  # fmt: skip
                self.calls += 1
                return pyattn_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

            self._set(F, "scaled_dot_product_attention", patched)
        if mha:
            import torch.nn.modules.activation as activation
            import torch.nn.modules.transformer as transformer

            from .nn import MultiheadAttention

            for owner in (torch.nn, activation, transformer):
                if hasattr(owner, "MultiheadAttention"):
                    self._set(owner, "MultiheadAttention", MultiheadAttention)

    def _set(self, owner, name: str, value) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def undo(self) -> None:
        """Restore torch's functions and classes (idempotent)."""
        while self._saved:
            owner, name, old = self._saved.pop()
            setattr(owner, name, old)

    def __enter__(self) -> TorchPatch:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def patch_torch(sdpa: bool = True, mha: bool = False) -> TorchPatch:
    """Route torch's ``F.scaled_dot_product_attention`` (and, with ``mha``,
    ``torch.nn.MultiheadAttention``) to pyattn.

    Arguments:
        sdpa: replace ``torch.nn.functional.scaled_dot_product_attention``; calls made under
            ``sdpa_kernel([SDPBackend.MATH])`` still go to torch's.
        mha: replace ``torch.nn.MultiheadAttention`` for modules built while patched.
    Returns:
        a TorchPatch: ``undo()`` it, or use it as a context manager.
    """
    return TorchPatch(sdpa=sdpa, mha=mha)
