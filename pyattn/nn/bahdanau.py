"""pyattn.nn.BahdanauAttention: additive attention (Bahdanau et al., 2015) on the fused op.

    e_ij = v . tanh(W_s s_i + W_h h_j),   a_ij = softmax_j(e_ij),   c_i = sum_j a_ij h_j

``W_h h`` does not depend on the decoder step, so a decoder calls :meth:`project_keys` once per
source sentence and passes the result as ``precomputed_keys`` at every step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import additive_attention
from .multihead_attention import _sdpa_backend, _shape, check_attn_backend


class BahdanauAttention(nn.Module):
    """Additive attention with learnt ``W_s`` (no bias), ``W_h`` (with bias) and ``v``.

    Arguments:
        query_dim: size of the decoder state ``s``.
        key_dim: size of the encoder states ``h``.
        attn_dim: size of the hidden layer of the score MLP.
        attn_backend: "fused" (pyattn's best backend for the device) or an op backend ("cpu",
            "triton", "cuda", "reference").
    """

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int, *, attn_backend: str = "fused") -> None:
        super().__init__()
        self.query_dim, self.key_dim, self.attn_dim = query_dim, key_dim, attn_dim
        self.W_s = nn.Linear(query_dim, attn_dim, bias=False)
        self.W_h = nn.Linear(key_dim, attn_dim, bias=True)
        self.v = nn.Parameter(torch.empty(attn_dim).uniform_(-(attn_dim**-0.5), attn_dim**-0.5))
        self.attn_backend = check_attn_backend(attn_backend)

    def set_attn_backend(self, name: str) -> None:
        self.attn_backend = check_attn_backend(name)

    def project_keys(self, keys: Tensor) -> Tensor:
        """``W_h h``: (B, Tk, key_dim) -> (B, Tk, attn_dim); once per source sentence."""
        if keys.dim() != 3 or keys.shape[-1] != self.key_dim:
            raise ValueError(
                f"BahdanauAttention: 'keys' must be (B, Tk, key_dim={self.key_dim}), got {_shape(keys)}"
            )
        return self.W_h(keys)

    def forward(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        precomputed_keys: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Context vectors and attention weights.

        Arguments:
            query: (B, Tq, query_dim), or (B, query_dim) for one decoder step.
            keys: (B, Tk, key_dim), the encoder states ``h``.
            values: (B, Tk, Dv) averaged by the weights; default ``keys``.
            key_padding_mask: (B, Tk) bool, True = padding (ignored).
            precomputed_keys: ``project_keys(keys)`` computed earlier (skips ``W_h``).
        Returns:
            context (B, Tq, Dv) and weights (B, Tq, Tk); without Tq for a 2-D query.
        """
        single = query.dim() == 2
        if query.dim() not in (2, 3) or query.shape[-1] != self.query_dim:
            raise ValueError(
                f"BahdanauAttention: 'query' must be (B, Tq, query_dim={self.query_dim}) or (B, query_dim), got {_shape(query)}"
            )
        if single:
            query = query.unsqueeze(1)  # (B, 1, query_dim)
        values = keys if values is None else values
        k = self.project_keys(keys) if precomputed_keys is None else precomputed_keys  # (B, Tk, A)
        q = self.W_s(query)  # (B, Tq, A)
        context, weights = additive_attention(
            q,
            k,
            values,
            self.v,
            key_padding_mask,
            return_weights=True,
            backend=_sdpa_backend(self.attn_backend),
        )  # (B, Tq, Dv), (B, Tq, Tk)
        if single:
            return context.squeeze(1), weights.squeeze(1)
        return context, weights
