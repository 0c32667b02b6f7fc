"""pyattn.nn.MultiheadAttention: a drop-in for ``torch.nn.MultiheadAttention`` on pyattn's ops.

Same constructor, parameter names (so a torch state dict loads unchanged), forward signature and
outputs as torch's module. The attention itself runs through
``pyattn.scaled_dot_product_attention`` with the key padding mask and ``attn_mask`` merged into
one mask; ``need_weights=True`` needs the full weight matrix, which a fused kernel never builds,
so that case runs ``pyattn.reference`` (still exact, just not fused).

Bad inputs raise where torch's module raises, as classes that are instances of torch's
(AssertionError for shapes, RuntimeError for mask shapes; pyattn/ops/errors.py). Nested-tensor
inputs (batch_first, inference) are padded, run with a key padding mask and returned nested, as
torch's fast path returns them.

Differences from torch, on purpose:
- A query row whose keys are all masked gives zeros (torch gives NaN).
- No ``static_k``/``static_v``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _backend, reference
from ..ops import scaled_dot_product_attention
from ..ops.errors import InputAssertionError, InputError

# A model's or layer's ``attn_backend``: the ops' backend names (pyattn/_backend.py records),
# or "fused", kept as the alias of backend=None: the best pyattn backend for the tensors' device.
ATTN_BACKENDS = ("fused", *_backend.BACKENDS)


def check_attn_backend(name: str) -> str:
    """Validate an ``attn_backend`` switch value: "fused" (the best backend for the device) or
    one of the ops' backends ("cpu", "triton", "cuda", "reference")."""
    if name not in ATTN_BACKENDS:
        raise InputError(f"attn_backend must be one of {', '.join(map(repr, ATTN_BACKENDS))}, got {name!r}")
    return name


def _sdpa_backend(attn_backend: str) -> str | None:
    # "fused" = the best pyattn backend for the tensors' device (backend=None).
    return None if attn_backend == "fused" else attn_backend


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


class _MaskTypeError(InputAssertionError, TypeError):
    """A mask of the wrong type: torch's module asserts (AssertionError); also a TypeError."""


# torch's words for nested inputs its module cannot take (its tests match on them)
_NO_NESTED = "MultiheadAttention does not support NestedTensor outside of its fast path"


def _fail(msg: str, cls: type[InputError] = InputAssertionError):
    raise cls(f"MultiheadAttention: {msg}")


def _check_mask(name: str, mask: Tensor | None) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        _fail(f"'{name}' must be a tensor or None, got {type(mask).__name__}", _MaskTypeError)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        _fail(f"'{name}' must be a bool or floating-point tensor, got {mask.dtype}", _MaskTypeError)


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """F.linear, with a bias of another dtype added by type promotion (as torch's module copes
    with a half in_proj_bias beside a double query) instead of failing inside addmm."""
    if b is not None and b.dtype != x.dtype:
        return F.linear(x, w) + b
    return F.linear(x, w, b)


def _to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A torch-convention mask (bool True = not allowed, or float added) as a float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def kind_of(is_batched: bool) -> str:
    return "batched (3-D)" if is_batched else "unbatched (2-D)"


class MultiheadAttention(nn.Module):
    """Multi-head attention with the interface of ``torch.nn.MultiheadAttention``.

    Arguments (constructor, as torch):
        embed_dim: model width E; num_heads: H (E must divide by H).
        dropout: dropout on the attention weights (training only).
        bias: biases on the input and output projections.
        add_bias_kv: learnt ``bias_k``/``bias_v`` appended to the keys/values.
        add_zero_attn: a zero key/value appended.
        kdim, vdim: key/value feature sizes (default E); when they differ from E the input
            projection is split into ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``.
        batch_first: inputs/outputs are (B, L, E) rather than (L, B, E).
        attn_backend: "fused" (pyattn's best backend for the device) or an op backend ("cpu",
            "triton", "cuda", "reference").
    """

    __constants__ = ["batch_first"]

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        attn_backend: str = "fused",
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            _fail(f"embed_dim and num_heads must be > 0, got embed_dim={embed_dim}, num_heads={num_heads}")
        if embed_dim % num_heads != 0:
            _fail(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.add_zero_attn = add_zero_attn
        self.attn_backend = check_attn_backend(attn_backend)

        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        # (process group, layout) under context parallelism (Transformer.set_context_parallel)
        self.context_parallel = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # torch's initialisation, so a freshly built module is statistically the same.
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            nn.init.xavier_normal_(self.bias_v)

    def set_attn_backend(self, name: str) -> None:
        """Route attention through "fused" (pyattn's best backend) or "reference"."""
        self.attn_backend = check_attn_backend(name)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"batch_first={self.batch_first}, attn_backend={self.attn_backend!r}"
        )

    # -- forward ------------------------------------------------------------------------------

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        E = self.embed_dim
        b = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if b is None else (b[:E], b[E : 2 * E], b[2 * E :])
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if query is key and key is value:
                # Self-attention: one GEMM for q, k and v.
                return _linear(query, w, b).chunk(3, dim=-1)
            w_q, w_k, w_v = w[:E], w[E : 2 * E], w[2 * E :]
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return _linear(query, w_q, b_q), _linear(key, w_k, b_k), _linear(value, w_v, b_v)

    def _nested_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                        average_attn_weights, is_causal):  # fmt: skip
        """Nested (B, L_b, E) inputs: padded, run with a key padding mask, returned nested (as
        torch's fast path, the only path where torch's module takes them)."""
        params_grad = any(p.requires_grad for p in self.parameters())
        inputs_grad = any(t.requires_grad for t in (query, key, value))
        if self.training or (torch.is_grad_enabled() and (params_grad or inputs_grad)):
            _fail(
                f"{_NO_NESTED}: nested tensor inputs are supported in inference only (eval() and no "
                f"grad), got training={self.training}, grad enabled with parameters or inputs requiring grad"
            )
        if not self.batch_first or not all(t.is_nested for t in (query, key, value)):
            _fail(
                f"{_NO_NESTED}: nested tensor inputs need batch_first=True and query, key, value all "
                f"nested, got batch_first={self.batch_first}, nested "
                f"{[t.is_nested for t in (query, key, value)]}"
            )
        if key_padding_mask is not None or attn_mask is not None:
            _fail(
                f"{_NO_NESTED}: nested tensor inputs take no key_padding_mask or attn_mask (their "
                f"lengths are the mask)"
            )
        q_lens = [t.shape[0] for t in query.unbind()]
        k_lens = [t.shape[0] for t in key.unbind()]
        same_kv = key is value
        same_qk = query is key
        q = torch.nested.to_padded_tensor(query, 0.0)  # (B, L, E)
        k = q if same_qk else torch.nested.to_padded_tensor(key, 0.0)  # (B, S, kdim)
        v = k if same_kv else torch.nested.to_padded_tensor(value, 0.0)  # (B, S, vdim)
        S = k.shape[1]
        pad = (
            torch.arange(S, device=q.device)[None, :] >= torch.tensor(k_lens, device=q.device)[:, None]
        )  # (B, S)
        out, weights = self.forward(q, k, v, pad, need_weights, None, average_attn_weights, is_causal)
        out = torch.nested.nested_tensor([o[:n] for o, n in zip(out, q_lens, strict=True)])
        if weights is not None:
            # padding queries get no weights, as torch's fast path
            rows = (
                torch.arange(q.shape[1], device=q.device)[None, :]
                < torch.tensor(q_lens, device=q.device)[:, None]
            )
            weights = weights * (rows[:, None, :, None] if weights.dim() == 4 else rows[:, :, None])
        return out, weights

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention of ``query`` over ``key``/``value``, as ``torch.nn.MultiheadAttention``.

        Arguments:
            query: (L, B, E) ((B, L, E) with batch_first) or unbatched (L, E).
            key: (S, B, kdim) / (B, S, kdim) / (S, kdim); value likewise with vdim.
            key_padding_mask: (B, S) or (S,): bool True = ignore that key, or float (added).
            need_weights: also return the attention weights (runs the reference path).
            attn_mask: (L, S) or (B*H, L, S): bool True = not allowed, or float (added).
            average_attn_weights: average the returned weights over heads.
            is_causal: hint that ``attn_mask`` is the causal mask (which must be given, as in
                torch); used to run the causal kernel when no padding mask or weights are needed.
        Returns:
            (attn_output of the query's layout with E features,
             weights (B, L, S) averaged or (B, H, L, S), unbatched without B; or None).
        """
        if any(isinstance(t, Tensor) and t.is_nested for t in (query, key, value)):
            return self._nested_forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        if getattr(self, "context_parallel", None) is not None:
            return self._context_parallel_forward(
                query, key, value, key_padding_mask, attn_mask, is_causal
            ), None
        _check_mask("key_padding_mask", key_padding_mask)
        _check_mask("attn_mask", attn_mask)
        if query.dim() not in (2, 3):
            _fail(f"'query' must be 3-D (batched) or 2-D (unbatched), got {query.dim()}-D {_shape(query)}")
        is_batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            # torch's wording (code and tests match on it), with the shapes added
            _fail(
                f"For {kind_of(is_batched)} `query`, expected `key` and `value` to be {query.dim()}-D but found "
                f"{key.dim()}-D and {value.dim()}-D tensors respectively (key {_shape(key)}, "
                f"value {_shape(value)})"
            )
        want_kpm = 2 if is_batched else 1
        if key_padding_mask is not None and key_padding_mask.dim() != want_kpm:
            _fail(
                f"For {kind_of(is_batched)} `query`, expected `key_padding_mask` to be `None` or "
                f"{want_kpm}-D but found {key_padding_mask.dim()}-D tensor instead"
            )
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            _fail(
                f"For {kind_of(is_batched)} `query`, expected `attn_mask` to be `None`, 2-D or 3-D "
                f"but found {attn_mask.dim()}-D tensor instead"
            )
        if is_causal and attn_mask is None:
            _fail(
                "is_causal=True needs attn_mask too (as in torch); build it with "
                "Transformer.generate_square_subsequent_mask",
                InputError,
            )

        # Work batch-first internally: (B, L, E).
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            same_kv = key is value
            same_qk = query is key
            query = query.transpose(0, 1)
            key = query if same_qk else key.transpose(0, 1)
            value = key if same_kv else value.transpose(0, 1)

        B, L, E = query.shape
        S = key.shape[1]
        H, D = self.num_heads, self.head_dim
        if E != self.embed_dim:
            _fail(f"'query' must have embed_dim={self.embed_dim} features, got {E}")
        if key.shape[0] != B or value.shape[0] != B or value.shape[1] != S:
            _fail(
                f"batch/length mismatch: query {_shape(query)}, key {_shape(key)}, value {_shape(value)} "
                f"(batch-first view)"
            )
        if key.shape[2] != self.kdim or value.shape[2] != self.vdim:
            _fail(
                f"'key'/'value' must have kdim={self.kdim}/vdim={self.vdim} features, got "
                f"{key.shape[2]}/{value.shape[2]}"
            )
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, S):
            _fail(f"'key_padding_mask' must be (B={B}, S={S}), got {_shape(key_padding_mask)}")
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                # torch's wording for these (its tests match on it)
                if tuple(attn_mask.shape) != (L, S):
                    _fail(f"The shape of the 2D attn_mask is {_shape(attn_mask)}, but should be {(L, S)}.")
            elif attn_mask.dim() == 3:
                if not is_batched and tuple(attn_mask.shape) != (H, L, S):
                    _fail(f"Expected `attn_mask` shape to be {(H, L, S)} but got {_shape(attn_mask)}")
                if tuple(attn_mask.shape) != (B * H, L, S):
                    _fail(
                        f"The shape of the 3D attn_mask is {_shape(attn_mask)}, but should be "
                        f"{(B * H, L, S)} (B*num_heads, L, S)."
                    )
            else:
                _fail(f"'attn_mask' must be 2-D or 3-D, got {attn_mask.dim()}-D")

        # As torch: is_causal is only a hint, and the mask is dropped for the causal kernel
        # only when nothing else (padding, weights) needs an explicit mask.
        use_causal = bool(is_causal) and key_padding_mask is None and not need_weights
        if use_causal:
            attn_mask = None

        q, k, v = self._in_projection(query, key, value)  # (B, L, E), (B, S, E), (B, S, E)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(B, 1, E)], dim=1)  # (B, S+1, E)
            v = torch.cat([v, self.bias_v.expand(B, 1, E)], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
        k = k.view(B, -1, H, D).transpose(1, 2)  # (B, H, S', D)
        v = v.view(B, -1, H, D).transpose(1, 2)  # (B, H, S', D)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, H, 1, D)], dim=2)  # (B, H, S'+1, D)
            v = torch.cat([v, v.new_zeros(B, H, 1, D)], dim=2)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        S2 = k.shape[2]

        mask = self._merge_masks(attn_mask, key_padding_mask, B, L, S2, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            out, weights = reference.scaled_dot_product_attention(
                q, k, v, mask, dropout_p, return_weights=True
            )  # (B, H, L, D), (B, H, L, S')
        else:
            out = scaled_dot_product_attention(
                q, k, v, mask, dropout_p, use_causal, backend=_sdpa_backend(self.attn_backend)
            )  # (B, H, L, D)
            weights = None
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, E))  # (B, L, E)

        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)  # (B, L, S')
        if not is_batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)  # (L, B, E)
        return out, weights

    def _context_parallel_forward(self, query, key, value, key_padding_mask, attn_mask, is_causal) -> Tensor:
        """Batched inputs that are this rank's shards of the sequences (docs/design.md, "Context
        parallelism"): ring attention over ``self.context_parallel``; causality from
        ``is_causal`` alone (no masks), no attention weights (None is returned for them)."""
        from ..distributed import ring_attention

        group, layout = self.context_parallel
        if key_padding_mask is not None or attn_mask is not None:
            _fail(
                "under context parallelism attn_mask and key_padding_mask must be None (causality "
                "comes from is_causal=True), got "
                f"attn_mask {None if attn_mask is None else _shape(attn_mask)}, key_padding_mask "
                f"{None if key_padding_mask is None else _shape(key_padding_mask)}",
                InputError,
            )
        if self.training and self.dropout > 0:
            _fail(
                f"context-parallel attention runs without dropout, got dropout={self.dropout} in training mode",
                InputError,
            )
        if self.bias_k is not None or self.add_zero_attn or query.dim() != 3:
            _fail(
                "context parallelism takes batched inputs, without add_bias_kv or add_zero_attn", InputError
            )
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # (B, L, E)
        q, k, v = self._in_projection(query, key, value)  # (B, L, E), (B, S, E), (B, S, E)
        B, L, E = q.shape
        H, D = self.num_heads, self.head_dim
        q = q.view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
        k = k.view(B, -1, H, D).transpose(1, 2)  # (B, H, S, D)
        v = v.view(B, -1, H, D).transpose(1, 2)  # (B, H, S, D)
        out = ring_attention(q, k, v, group=group, layout=layout, is_causal=bool(is_causal),
                             backend=_sdpa_backend(self.attn_backend))  # fmt: skip
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, E))  # (B, L, E)
        return out if self.batch_first else out.transpose(0, 1)

    @staticmethod
    def _merge_masks(
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        B: int,
        L: int,
        S: int,
        dtype: torch.dtype,
    ) -> Tensor | None:
        """One SDPA mask broadcastable to (B, H, L, S) from torch MHA's two masks.

        Both bool: one bool mask (True = attend, the SDPA convention), which the fused kernels
        can take without reading a float tensor. Otherwise an additive float mask.
        """
        if attn_mask is not None:
            # (L, S) -> (1, 1, L, S); (B*H, L, S) -> (B, H, L, S)
            attn_mask = attn_mask.view(1, 1, L, S) if attn_mask.dim() == 2 else attn_mask.view(B, -1, L, S)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.view(B, 1, 1, S)
        if attn_mask is None and key_padding_mask is None:
            return None
        masks = [m for m in (attn_mask, key_padding_mask) if m is not None]
        if all(m.dtype == torch.bool for m in masks):
            allowed = ~masks[0]
            for m in masks[1:]:
                allowed = allowed & ~m
            return allowed
        merged = _to_additive(masks[0], dtype)
        for m in masks[1:]:
            merged = merged + _to_additive(m, dtype)
        return merged
