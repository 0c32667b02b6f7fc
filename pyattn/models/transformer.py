"""The encoder-decoder Transformer (Vaswani et al., 2017) on pyattn.nn.MultiheadAttention.

A drop-in for ``torch.nn.Transformer``: the same constructor arguments, parameter names (so a
torch state dict loads unchanged), forward signature and ``generate_square_subsequent_mask``.
Every attention runs through pyattn's fused scaled-dot-product op (``attn_backend="fused"``) or
``pyattn.reference`` (``"reference"``), with the same weights.

Padding-free (``TransformerConfig.padding_free``, on by default): when a batched call has key
padding masks (bool) and no mask but the causal one, :meth:`Transformer.forward` packs the real
tokens of ``src`` and ``tgt`` once, runs every layer on them (encoder self-attention within each
source, decoder self-attention causal within each target, cross-attention from each target to
its own source, through varlen attention) and pads the output back. Real target positions get
the padded path's outputs (up to rounding); padding positions are zeros (torch's own fast path,
nested tensors in eval, gives zeros there too) on every path while ``padding_free`` is on (also
under torch.compile, which runs the padded path: unpadding is data-dependent, and when the masks
cannot be packed), where the padded path computes values nothing else reads.

Generation (:meth:`Transformer.generate`, greedy or beam search) decodes with a KV cache
(docs/design.md, "Generation with a KV cache"): each decoder layer's self-attention keys and
values go into a dense cache preallocated to the longest output, appended in place one token per
step through ``pyattn.kvcache_attention`` (``pyattn.reference``'s twin under
``attn_backend="reference"``); the cross-attention keys and values are projected once per source
and shared by its beams. ``use_cache=False`` reruns the decoder over the whole prefix each step:
the same tokens, the baseline of the cache.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.multihead_attention import MultiheadAttention, _linear, _sdpa_backend, check_attn_backend
from ..ops import kvcache_attention, scaled_dot_product_attention
from . import _packing
from ._packing import PackedSeqs, Packing

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


@dataclass
class TransformerConfig:
    """The arguments of ``torch.nn.Transformer`` (same names and defaults) + ``attn_backend``."""

    d_model: int = 512
    nhead: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str | Callable[[Tensor], Tensor] = "relu"
    layer_norm_eps: float = 1e-5
    batch_first: bool = False
    norm_first: bool = False
    bias: bool = True
    attn_backend: str = "fused"
    # with key padding, run the layers on the real tokens only (module doc)
    padding_free: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.activation, str) and self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"TransformerConfig: activation must be 'relu', 'gelu' or a callable, got {self.activation!r}"
            )
        if self.d_model % self.nhead != 0:
            raise ValueError(
                f"TransformerConfig: d_model ({self.d_model}) must be divisible by nhead ({self.nhead})"
            )
        check_attn_backend(self.attn_backend)


def _activation(act: str | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return _ACTIVATIONS[act] if isinstance(act, str) else act


def _is_causal(mask: Tensor | None, is_causal: bool | None, size: int) -> bool:
    """torch's ``_detect_is_causal_mask``: an explicit hint wins; else compare with the causal
    mask (skipped under torch.compile: the comparison is data-dependent, and passing the mask
    unchanged gives the same answer, only without the causal kernel's block skipping)."""
    if is_causal is not None:
        return bool(is_causal)
    if mask is None or torch.compiler.is_compiling():
        return False
    causal = Transformer.generate_square_subsequent_mask(size, device=mask.device, dtype=mask.dtype)
    return mask.shape == causal.shape and bool((mask == causal).all())


class TransformerEncoderLayer(nn.Module):
    """Self-attention + feed-forward, post-norm or pre-norm (``norm_first``), torch's names."""

    def __init__(self, c: TransformerConfig, device=None, dtype=None) -> None:
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadAttention(
            c.d_model,
            c.nhead,
            c.dropout,
            bias=c.bias,
            batch_first=c.batch_first,
            attn_backend=c.attn_backend,
            **f,
        )
        self.linear1 = nn.Linear(c.d_model, c.dim_feedforward, bias=c.bias, **f)
        self.dropout = nn.Dropout(c.dropout)
        self.linear2 = nn.Linear(c.dim_feedforward, c.d_model, bias=c.bias, **f)
        self.norm_first = c.norm_first
        self.norm1 = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, bias=c.bias, **f)
        self.norm2 = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, bias=c.bias, **f)
        self.dropout1 = nn.Dropout(c.dropout)
        self.dropout2 = nn.Dropout(c.dropout)
        self.activation = _activation(c.activation)

    def forward(
        self, src: Tensor, src_mask=None, src_key_padding_mask=None, is_causal: bool = False
    ) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff_block(x))

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(
            x,
            x,
            x,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=False,
            is_causal=is_causal,
        )[0]
        return self.dropout1(x)

    def _ff_block(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward_packed(self, x: Tensor, seqs: PackedSeqs, is_causal: bool = False) -> Tensor:
        """The layer on (T, E) packed rows of sequences ``seqs``; attention within each one."""
        if self.norm_first:
            x = x + self._sa_packed(self.norm1(x), seqs, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_packed(x, seqs, is_causal))
        return self.norm2(x + self._ff_block(x))

    def _sa_packed(self, x, seqs, is_causal):
        return self.dropout1(_packing.mha_packed(self.self_attn, x, None, seqs, seqs, is_causal))


class TransformerDecoderLayer(nn.Module):
    """Causal self-attention + encoder-decoder attention + feed-forward, torch's names."""

    def __init__(self, c: TransformerConfig, device=None, dtype=None) -> None:
        super().__init__()
        f = {"device": device, "dtype": dtype}
        mha = {"bias": c.bias, "batch_first": c.batch_first, "attn_backend": c.attn_backend, **f}
        self.self_attn = MultiheadAttention(c.d_model, c.nhead, c.dropout, **mha)
        self.multihead_attn = MultiheadAttention(c.d_model, c.nhead, c.dropout, **mha)
        self.linear1 = nn.Linear(c.d_model, c.dim_feedforward, bias=c.bias, **f)
        self.dropout = nn.Dropout(c.dropout)
        self.linear2 = nn.Linear(c.dim_feedforward, c.d_model, bias=c.bias, **f)
        self.norm_first = c.norm_first
        self.norm1 = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, bias=c.bias, **f)
        self.norm2 = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, bias=c.bias, **f)
        self.norm3 = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, bias=c.bias, **f)
        self.dropout1 = nn.Dropout(c.dropout)
        self.dropout2 = nn.Dropout(c.dropout)
        self.dropout3 = nn.Dropout(c.dropout)
        self.activation = _activation(c.activation)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask=None,
        memory_mask=None,
        tgt_key_padding_mask=None,
        memory_key_padding_mask=None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> Tensor:
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._mha_block(
                self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal
            )
            return x + self._ff_block(self.norm3(x))
        x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
        x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
        return self.norm3(x + self._ff_block(x))

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(
            x,
            x,
            x,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=False,
            is_causal=is_causal,
        )[0]
        return self.dropout1(x)

    def _mha_block(self, x, mem, attn_mask, key_padding_mask, is_causal):
        x = self.multihead_attn(
            x,
            mem,
            mem,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=False,
            is_causal=is_causal,
        )[0]
        return self.dropout2(x)

    def _ff_block(self, x):
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward_packed(
        self, x: Tensor, mem: Tensor, seqs: PackedSeqs, mem_seqs: PackedSeqs, is_causal: bool = False
    ) -> Tensor:
        """The layer on (T, E) packed target rows ``seqs`` over (S, E) packed memory rows
        ``mem_seqs`` (target sequence b attends to memory sequence b)."""
        if self.norm_first:
            x = x + self._sa_packed(self.norm1(x), seqs, is_causal)
            x = x + self._mha_packed(self.norm2(x), mem, seqs, mem_seqs)
            return x + self._ff_block(self.norm3(x))
        x = self.norm1(x + self._sa_packed(x, seqs, is_causal))
        x = self.norm2(x + self._mha_packed(x, mem, seqs, mem_seqs))
        return self.norm3(x + self._ff_block(x))

    def _sa_packed(self, x, seqs, is_causal):
        return self.dropout1(_packing.mha_packed(self.self_attn, x, None, seqs, seqs, is_causal))

    def _mha_packed(self, x, mem, seqs, mem_seqs):
        return self.dropout2(_packing.mha_packed(self.multihead_attn, x, mem, seqs, mem_seqs))

    def forward_step(self, x: Tensor, cache: DecoderCache, i: int) -> Tensor:
        """One new token per sequence: x (N, 1, E) -> (N, 1, E), through layer ``i`` of ``cache``
        (its self-attention keys/values appended in place)."""
        if self.norm_first:
            x = x + self.dropout1(self._sa_step(self.norm1(x), cache, i))
            x = x + self.dropout2(self._mha_step(self.norm2(x), cache, i))
            return x + self._ff_block(self.norm3(x))
        x = self.norm1(x + self.dropout1(self._sa_step(x, cache, i)))
        x = self.norm2(x + self.dropout2(self._mha_step(x, cache, i)))
        return self.norm3(x + self._ff_block(x))

    def _sa_step(self, x: Tensor, cache: DecoderCache, i: int) -> Tensor:
        mha = self.self_attn
        N, E, H = x.shape[0], mha.embed_dim, mha.num_heads
        q, k, v = mha._in_projection(x, x, x)  # (N, 1, E) each
        q, k, v = (t.view(N, 1, H, E // H).transpose(1, 2) for t in (q, k, v))  # (N, H, 1, D)
        # appended at seqlens, then attended: the new token sees the cache and itself
        out = kvcache_attention(
            q, cache.k[i], cache.v[i], cache.seqlens, k, v, backend=_sdpa_backend(mha.attn_backend)
        )  # (N, H, 1, D)
        return mha.out_proj(out.transpose(1, 2).reshape(N, 1, E))  # (N, 1, E)

    def _mha_step(self, x: Tensor, cache: DecoderCache, i: int) -> Tensor:
        mha = self.multihead_attn
        N, E, H = x.shape[0], mha.embed_dim, mha.num_heads
        B, K = cache.mem_k[i].shape[0], N // cache.mem_k[i].shape[0]
        b = mha.in_proj_bias
        q = _linear(x, mha.in_proj_weight[:E], None if b is None else b[:E])  # (N, 1, E)
        # the K beams of a source are K query rows over its one copy of the memory keys
        q = q.view(B, K, H, E // H).transpose(1, 2)  # (B, H, K, D)
        out = scaled_dot_product_attention(
            q, cache.mem_k[i], cache.mem_v[i], cache.mem_mask, backend=_sdpa_backend(mha.attn_backend)
        )  # (B, H, K, D)
        return mha.out_proj(out.transpose(1, 2).reshape(N, 1, E))  # (N, 1, E)


class TransformerEncoder(nn.Module):
    def __init__(self, layer: TransformerEncoderLayer, num_layers: int, norm: nn.Module | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(
        self, src: Tensor, mask=None, src_key_padding_mask=None, is_causal: bool | None = None
    ) -> Tensor:
        seq_dim = 1 if self.layers and self.layers[0].self_attn.batch_first and src.dim() == 3 else 0
        causal = _is_causal(mask, is_causal, src.shape[seq_dim])
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=causal)
        return self.norm(x) if self.norm is not None else x


class TransformerDecoder(nn.Module):
    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, norm: nn.Module | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask=None,
        memory_mask=None,
        tgt_key_padding_mask=None,
        memory_key_padding_mask=None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
    ) -> Tensor:
        seq_dim = 1 if self.layers and self.layers[0].self_attn.batch_first and tgt.dim() == 3 else 0
        causal = _is_causal(tgt_mask, tgt_is_causal, tgt.shape[seq_dim])
        x = tgt
        for layer in self.layers:
            x = layer(
                x,
                memory,
                tgt_mask=tgt_mask,
                memory_mask=memory_mask,
                tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask,
                tgt_is_causal=causal,
                memory_is_causal=memory_is_causal,
            )
        return self.norm(x) if self.norm is not None else x


@dataclass
class DecoderCache:
    """What :meth:`Transformer.generate` keeps between steps, for N = B * K sequences (K beams
    per source, beam-major within a source).

    k, v: per decoder layer (N, H, L_max, D), the self-attention keys/values, filled up to
        ``seqlens`` (int32 (N,)) and appended in place by ``pyattn.kvcache_attention``.
    mem_k, mem_v: per decoder layer (B, H, S, D), the cross-attention keys/values of each source,
        projected once and read by all its beams.
    mem_mask: (B, 1, 1, S) bool, True = a real source token (attended), or None (no padding).
    """

    k: list[Tensor] = field(default_factory=list)
    v: list[Tensor] = field(default_factory=list)
    seqlens: Tensor | None = None
    mem_k: list[Tensor] = field(default_factory=list)
    mem_v: list[Tensor] = field(default_factory=list)
    mem_mask: Tensor | None = None

    def reorder(self, rows: Tensor, filled: int) -> None:
        """Sequence n continues sequence ``rows[n]`` (beam search): the filled part of the
        self-attention caches is gathered in place."""
        for c in (*self.k, *self.v):
            c[:, :, :filled] = c[rows, :, :filled]


_TORCH_ARGS = [f.name for f in fields(TransformerConfig) if f.name not in ("attn_backend", "padding_free")]


class Transformer(nn.Module):
    """``torch.nn.Transformer`` on pyattn's attention.

    Build it from a :class:`TransformerConfig` (``Transformer(config)``) or with torch's
    arguments (``Transformer(d_model=256, nhead=4, ...)``, positional too); ``device``/``dtype``
    as torch. Parameter names are torch's: ``encoder.layers.0.self_attn.in_proj_weight``, ...,
    ``decoder.layers.0.multihead_attn...``, ``encoder.norm``, ``decoder.norm``.
    """

    def __init__(
        self, config: TransformerConfig | int | None = None, *args, device=None, dtype=None, **kwargs
    ):
        super().__init__()
        if isinstance(config, TransformerConfig):
            if args or kwargs:
                raise TypeError("Transformer: give either a TransformerConfig or torch's arguments, not both")
        else:
            if config is not None:
                args = (config, *args)  # torch's first positional argument is d_model
            if len(args) > len(_TORCH_ARGS):
                raise TypeError(
                    f"Transformer: at most {len(_TORCH_ARGS)} positional arguments, got {len(args)}"
                )
            for key in ("custom_encoder", "custom_decoder"):
                if kwargs.pop(key, None) is not None:
                    raise ValueError(
                        f"Transformer: '{key}' is not supported (all attention runs through pyattn)"
                    )
            unknown = set(kwargs) - {f.name for f in fields(TransformerConfig)}
            if unknown:
                raise TypeError(f"Transformer: unexpected arguments {sorted(unknown)}")
            config = TransformerConfig(**dict(zip(_TORCH_ARGS, args, strict=False)), **kwargs)
        self.config = c = config
        f = {"device": device, "dtype": dtype}
        self.encoder = TransformerEncoder(
            TransformerEncoderLayer(c, **f),
            c.num_encoder_layers,
            nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, bias=c.bias, **f),
        )
        self.decoder = TransformerDecoder(
            TransformerDecoderLayer(c, **f),
            c.num_decoder_layers,
            nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, bias=c.bias, **f),
        )
        self.d_model, self.nhead, self.batch_first = c.d_model, c.nhead, c.batch_first
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # torch's initialisation: xavier-uniform on every matrix.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    @property
    def attn_backend(self) -> str:
        return self.config.attn_backend

    def set_attn_backend(self, name: str) -> None:
        """Route every attention through "fused" (pyattn's best backend) or "reference"."""
        self.config.attn_backend = check_attn_backend(name)
        for m in self.modules():
            if isinstance(m, MultiheadAttention):
                m.set_attn_backend(name)

    def set_context_parallel(self, process_group=None, layout: str = "zigzag") -> None:
        """Shard the sequences over ``process_group`` (None: off; docs/design.md, "Context
        parallelism"): ``forward`` then takes this rank's shards of ``src`` and ``tgt`` along
        the sequence dim in ``layout`` (``pyattn.distributed.shard_sequence``) and returns the
        shard of the output; every attention (encoder, decoder, cross) runs as ring attention.
        Causality comes from ``src_is_causal`` / ``tgt_is_causal`` (no masks, no padding masks,
        no attention dropout under it). Positions are the caller's: embed the shard's global
        positions (``pyattn.distributed.shard_positions``)."""
        from ._context_parallel import check

        cp = check("Transformer", process_group, layout)
        for m in self.modules():
            if isinstance(m, MultiheadAttention):
                m.context_parallel = cp

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        src_is_causal: bool | None = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
    ) -> Tensor:
        """As ``torch.nn.Transformer.forward``.

        Arguments:
            src: (S, B, E) ((B, S, E) with batch_first, (S, E) unbatched).
            tgt: (T, B, E) likewise.
            src_mask (S, S), tgt_mask (T, T), memory_mask (T, S): bool (True = not allowed) or
                float (added), or 3-D (B*nhead, ., .).
            *_key_padding_mask: (B, S) / (B, T) / (B, S), True = padding.
            *_is_causal: hints that the matching mask is causal (None: detected, as torch).
        Returns:
            (T, B, E) ((B, T, E) with batch_first). With ``config.padding_free``, zeros at
            the padding positions of a bool ``tgt_key_padding_mask``, whichever path ran.
        """
        is_batched = src.dim() == 3
        if not is_batched and tgt.dim() != 2:
            raise ValueError(
                f"Transformer: unbatched 'src' is 2-D, so 'tgt' must be 2-D too, got {tgt.dim()}-D"
            )
        if is_batched:
            bdim = 0 if self.batch_first else 1
            if src.shape[bdim] != tgt.shape[bdim]:
                raise RuntimeError(
                    f"Transformer: the batch size of src ({src.shape[bdim]}) and tgt ({tgt.shape[bdim]}) must be equal"
                )
        if src.shape[-1] != self.d_model or tgt.shape[-1] != self.d_model:
            raise RuntimeError(
                f"Transformer: the feature size of src ({src.shape[-1]}) and tgt ({tgt.shape[-1]}) must be d_model={self.d_model}"
            )
        plan = self._padding_free_plan(
            src, tgt, src_mask, tgt_mask, memory_mask, src_key_padding_mask, tgt_key_padding_mask,
            memory_key_padding_mask, src_is_causal, tgt_is_causal, memory_is_causal,
        )  # fmt: skip
        if plan is not None:
            return self._forward_packed(src, tgt, *plan)
        memory = self.encoder(
            src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal
        )
        out = self.decoder(
            tgt,
            memory,
            tgt_mask=tgt_mask,
            memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask,
            tgt_is_causal=tgt_is_causal,
            memory_is_causal=memory_is_causal,
        )
        pad = tgt_key_padding_mask
        if self.config.padding_free and is_batched and isinstance(pad, Tensor) and pad.dtype == torch.bool:
            # padding rows are zeros on every path (compiled, unpackable masks), as packed
            out = out.masked_fill((pad if self.batch_first else pad.T)[..., None], 0.0)
        return out

    def _padding_free_plan(self, src, tgt, src_mask, tgt_mask, memory_mask, src_pad, tgt_pad, mem_pad,
                           src_is_causal, tgt_is_causal, memory_is_causal):  # fmt: skip
        """(src causal, tgt causal, src/tgt/memory keep masks (B, L), True = real) when the call
        can run on packed tokens with the padded path's results on real tokens; else None.

        Packable: batched, bool key padding masks with some padding, src_mask and tgt_mask absent
        or the causal mask (compared, not trusted from a hint), no memory_mask, and every memory
        key the decoder reads a real source token (memory padding covers source padding: the
        encoder's outputs at source padding are never computed)."""
        if not self.config.padding_free or src.dim() != 3 or torch.compiler.is_compiling():
            return None
        pads = (src_pad, tgt_pad, mem_pad)
        if any(m is not None and (not isinstance(m, Tensor) or m.dtype != torch.bool) for m in pads):
            return None
        if memory_mask is not None or memory_is_causal or all(m is None for m in pads):
            return None
        sdim = 1 if self.batch_first else 0
        S, T = src.shape[sdim], tgt.shape[sdim]
        causal = []
        for mask, hint, L in ((src_mask, src_is_causal, S), (tgt_mask, tgt_is_causal, T)):
            if mask is not None and not _is_causal(mask, None, L):
                return None
            if mask is None and hint:
                return None  # the padded path raises, as torch: the hint needs its mask
            causal.append(mask is not None)
        B = src.shape[1 - sdim]
        for m, L in ((src_pad, S), (tgt_pad, T), (mem_pad, S)):
            if m is not None and tuple(m.shape) != (B, L):
                return None  # the padded path reports the bad shape
        keep = [torch.ones(B, L, dtype=torch.bool, device=src.device) if m is None else ~m
                for m, L in ((src_pad, S), (tgt_pad, T), (mem_pad, S))]  # fmt: skip
        if not bool((keep[0] | ~keep[2]).all()):
            return None
        if not any(bool((~k).any()) for k in keep):
            return None  # nothing to skip
        return (causal[0], causal[1], *keep)

    def _forward_packed(self, src, tgt, src_causal, tgt_causal, keep_src, keep_tgt, keep_mem) -> Tensor:
        if not self.batch_first:
            src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)  # (B, S, E), (B, T, E)
        ps, pt = _packing.packing(keep_src), _packing.packing(keep_tgt)
        mem = self._encode_packed(_packing.unpad(src, ps), ps.seqs, src_causal)  # (Ts, E)
        pm: Packing = ps
        if not torch.equal(keep_mem, keep_src):
            # the decoder reads fewer memory tokens than the encoder produced
            pm = _packing.packing(keep_mem)
            mem = _packing.unpad(_packing.pad(mem, ps), pm)  # (Tm, E)
        y = self._decode_packed(_packing.unpad(tgt, pt), mem, pt.seqs, pm.seqs, tgt_causal)  # (Tt, E)
        out = _packing.pad(y, pt)  # (B, T, E)
        return out if self.batch_first else out.transpose(0, 1)  # (T, B, E)

    def _encode_packed(self, x: Tensor, seqs: PackedSeqs, causal: bool) -> Tensor:
        for layer in self.encoder.layers:
            x = layer.forward_packed(x, seqs, causal)
        return self.encoder.norm(x) if self.encoder.norm is not None else x

    def _decode_packed(self, y: Tensor, mem: Tensor, seqs: PackedSeqs, mem_seqs: PackedSeqs, causal: bool):
        for layer in self.decoder.layers:
            y = layer.forward_packed(y, mem, seqs, mem_seqs, causal)
        return self.decoder.norm(y) if self.decoder.norm is not None else y

    def forward_packed(
        self,
        src: Tensor,
        tgt: Tensor,
        cu_seqlens_src: Tensor,
        max_seqlen_src: int,
        cu_seqlens_tgt: Tensor,
        max_seqlen_tgt: int,
        src_is_causal: bool = False,
        tgt_is_causal: bool = False,
    ) -> Tensor:
        """Encoder and decoder on packed sequences, no padding anywhere (compiles with
        ``torch.compile(fullgraph=True)``); target b attends to source b.

        Arguments:
            src: (Ts, E) the tokens of B source sequences one after another.
            tgt: (Tt, E) the tokens of B target sequences.
            cu_seqlens_src, cu_seqlens_tgt: int32 (B + 1,), cumulative lengths from 0.
            max_seqlen_src, max_seqlen_tgt: upper bounds of the lengths.
            src_is_causal, tgt_is_causal: causal self-attention within each sequence
                (tgt_is_causal=True is the usual decoder).
        Returns:
            (Tt, E).
        """
        for name, t in (("src", src), ("tgt", tgt)):
            if t.dim() != 2 or t.shape[-1] != self.d_model:
                raise ValueError(
                    f"Transformer.forward_packed: '{name}' must be (T, d_model={self.d_model}), got {tuple(t.shape)}"
                )
        ps = PackedSeqs(cu_seqlens_src, int(max_seqlen_src))
        pt = PackedSeqs(cu_seqlens_tgt, int(max_seqlen_tgt))
        mem = self._encode_packed(src, ps, src_is_causal)  # (Ts, E)
        return self._decode_packed(tgt, mem, pt, ps, tgt_is_causal)  # (Tt, E)

    @torch.no_grad()
    def generate(
        self,
        src: Tensor,
        embed: Callable[[Tensor, int], Tensor],
        head: Callable[[Tensor], Tensor],
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int = 0,
        max_new_tokens: int = 64,
        src_key_padding_mask: Tensor | None = None,
        num_beams: int = 1,
        use_cache: bool = True,
        return_logits: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Decode target tokens for each source, greedily (``num_beams=1``) or by beam search.

        The model has no embeddings or output layer of its own (as ``torch.nn.Transformer``):
        ``embed`` and ``head`` supply them. With ``use_cache`` (the default) each decoder layer
        keeps its self-attention keys/values in a dense cache of ``max_new_tokens`` rows, appended
        in place per step (``pyattn.kvcache_attention``), and the cross-attention keys/values are
        projected once per source; ``use_cache=False`` reruns the decoder over the prefix each
        step (same tokens; the baseline). Beam search keeps the ``num_beams`` best live
        hypotheses, sets aside those that end in ``eos_id``, stops a source once it has
        ``num_beams`` of them, and returns the best by log-probability per token (eos counted),
        or the best live one when none ended.

        Arguments:
            src: the embedded source, (S, B, E) ((B, S, E) with batch_first).
            embed: ``embed(tokens, start)``: tokens (N, t) int64 at positions start..start+t-1
                -> (N, t, E) (batch first, whatever ``batch_first`` says).
            head: decoder outputs (N, E) -> logits (N, V).
            bos_id, eos_id, pad_id: the first input token; the token that ends a sequence; what
                fills a row after its eos.
            max_new_tokens: at most this many tokens per sequence (eos included).
            src_key_padding_mask: (B, S) bool, True = padding.
            num_beams: 1 for greedy decoding.
            use_cache: decode with the KV cache.
            return_logits: greedy only: also return the logits of each step.
        Returns:
            tokens (B, L) int64 without bos, each row ending at its eos then ``pad_id``, L <=
            ``max_new_tokens`` (decoding stops when every row has ended); with
            ``return_logits`` also logits (B, L, V).
        """
        if src.dim() != 3 or src.shape[-1] != self.d_model:
            raise ValueError(
                f"Transformer.generate: 'src' must be (S, B, d_model={self.d_model}) ((B, S, d_model) "
                f"with batch_first), got {tuple(src.shape)}"
            )
        if max_new_tokens < 1:
            raise ValueError(f"Transformer.generate: 'max_new_tokens' must be >= 1, got {max_new_tokens}")
        if num_beams < 1:
            raise ValueError(f"Transformer.generate: 'num_beams' must be >= 1, got {num_beams}")
        if return_logits and num_beams > 1:
            raise ValueError("Transformer.generate: 'return_logits' is for greedy decoding (num_beams=1)")
        for m in self.modules():
            if isinstance(m, MultiheadAttention) and (m.bias_k is not None or m.add_zero_attn):
                raise ValueError("Transformer.generate: bias_k/bias_v and add_zero_attn are not supported")
        src_bf = src if self.batch_first else src.transpose(0, 1)  # (B, S, E)
        B, S = src_bf.shape[:2]
        pad = src_key_padding_mask
        if pad is not None and (pad.dtype != torch.bool or tuple(pad.shape) != (B, S)):
            raise ValueError(
                f"Transformer.generate: 'src_key_padding_mask' must be bool ({B}, {S}), got "
                f"{pad.dtype} {tuple(pad.shape)}"
            )
        memory = self.encoder(src, src_key_padding_mask=pad)
        memory = memory if self.batch_first else memory.transpose(0, 1)  # (B, S, E)
        K = num_beams
        if use_cache:
            cache = self._decoder_cache(memory, pad, K, max_new_tokens)
            step = self._cached_step(embed, head, cache)
        else:
            step = self._uncached_step(embed, head, memory, pad, K)
        if K == 1:
            return self._greedy(step, B, src.device, bos_id, eos_id, pad_id, max_new_tokens, return_logits)
        return self._beam(step, B, K, src.device, bos_id, eos_id, pad_id, max_new_tokens)

    def _decoder_cache(self, memory: Tensor, pad: Tensor | None, K: int, L_max: int) -> DecoderCache:
        B, S, E = memory.shape
        H = self.nhead
        D = E // H
        cache = DecoderCache(seqlens=torch.zeros(B * K, dtype=torch.int32, device=memory.device))
        if pad is not None and bool(pad.any()):
            cache.mem_mask = ~pad[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.decoder.layers:
            for kv in (cache.k, cache.v):
                kv.append(memory.new_zeros(B * K, H, L_max, D))  # (N, H, L_max, D)
            mha = layer.multihead_attn
            w, b = mha.in_proj_weight, mha.in_proj_bias
            for j, out in ((1, cache.mem_k), (2, cache.mem_v)):
                m = _linear(memory, w[j * E : (j + 1) * E], None if b is None else b[j * E : (j + 1) * E])
                out.append(m.view(B, S, H, D).transpose(1, 2))  # (B, H, S, D)
        return cache

    def _cached_step(self, embed, head, cache: DecoderCache):
        def step(last: Tensor, prefix: Tensor, rows: Tensor | None) -> Tensor:
            t = prefix.shape[1] - 1  # the position of ``last``
            if rows is not None:
                cache.reorder(rows, t)
            x = embed(last[:, None], t)  # (N, 1, E)
            for i, layer in enumerate(self.decoder.layers):
                x = layer.forward_step(x, cache, i)
            cache.seqlens += 1
            x = self.decoder.norm(x) if self.decoder.norm is not None else x
            return head(x[:, 0])  # (N, V)

        return step

    def _uncached_step(self, embed, head, memory: Tensor, pad: Tensor | None, K: int):
        mem = memory.repeat_interleave(K, dim=0)  # (N, S, E): a copy per beam, as a naive decoder
        mem_pad = None if pad is None else pad.repeat_interleave(K, dim=0)  # (N, S)
        if not self.batch_first:
            mem = mem.transpose(0, 1)  # (S, N, E)

        def step(last: Tensor, prefix: Tensor, rows: Tensor | None) -> Tensor:
            t = prefix.shape[1]
            x = embed(prefix, 0)  # (N, t, E)
            mask = self.generate_square_subsequent_mask(t, device=x.device, dtype=x.dtype)
            y = self.decoder(
                x if self.batch_first else x.transpose(0, 1),
                mem,
                tgt_mask=mask,
                memory_key_padding_mask=mem_pad,
                tgt_is_causal=True,
            )
            y = y[:, -1] if self.batch_first else y[-1]  # (N, E)
            return head(y)  # (N, V)

        return step

    @staticmethod
    def _greedy(step, B, device, bos_id, eos_id, pad_id, max_new, return_logits):
        prefix = torch.full((B, 1), bos_id, dtype=torch.long, device=device)  # (B, 1 + t)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        logits_all = []
        for _ in range(max_new):
            logits = step(prefix[:, -1], prefix, None)  # (B, V)
            logits_all.append(logits)
            y = torch.where(done, pad_id, logits.argmax(-1))
            prefix = torch.cat([prefix, y[:, None]], dim=1)
            done = done | (y == eos_id)
            if bool(done.all()):
                break
        tokens = prefix[:, 1:]
        return (tokens, torch.stack(logits_all, 1)) if return_logits else tokens

    @staticmethod
    def _beam(step, B, K, device, bos_id, eos_id, pad_id, max_new):
        prefix = torch.full((B * K, 1), bos_id, dtype=torch.long, device=device)  # (N, 1 + t)
        # one live beam per source at first: the others would repeat it
        scores = torch.full((B, K), float("-inf"), device=device)
        scores[:, 0] = 0.0
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        done = [False] * B
        rows = None
        for _ in range(max_new):
            logits = step(prefix[:, -1], prefix, rows)  # (N, V)
            V = logits.shape[-1]
            # float32 scores at least (float64 stays: the uncached baseline must pick alike)
            logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
            logp = logp.view(B, K, V)
            cand = (scores[:, :, None] + logp).view(B, K * V)
            top, idx = cand.topk(min(2 * K, K * V), dim=1)  # (B, 2K)
            parent = torch.arange(B * K, device=device).view(B, K).tolist()  # dead rows stay put
            new_tok = [[pad_id] * K for _ in range(B)]
            new_scores = [[float("-inf")] * K for _ in range(B)]
            for b in range(B):
                if done[b]:
                    continue
                kept = 0
                for score, i in zip(top[b].tolist(), idx[b].tolist(), strict=True):
                    if score == float("-inf"):
                        break
                    row, tok = divmod(i, V)
                    if tok == eos_id:
                        hyp = prefix[b * K + row, 1:].tolist()
                        finished[b].append((score / (len(hyp) + 1), hyp))
                        continue
                    parent[b][kept], new_tok[b][kept], new_scores[b][kept] = b * K + row, tok, score
                    kept += 1
                    if kept == K:
                        break
                if len(finished[b]) >= K or kept == 0:
                    done[b] = True
            rows = torch.tensor(parent, device=device).view(B * K)
            prefix = torch.cat([prefix[rows], torch.tensor(new_tok, device=device).view(B * K, 1)], dim=1)
            scores = torch.tensor(new_scores, dtype=logp.dtype, device=device)
            if all(done):
                break
        best = []
        for b in range(B):
            if not finished[b]:
                hyps = [(s, prefix[b * K + k, 1:].tolist()) for k, s in enumerate(scores[b].tolist())]
                live = [(s / max(len(h), 1), h) for s, h in hyps if s != float("-inf")]
                best.append(max(live, key=lambda h: h[0])[1] if live else [])
            else:
                best.append(max(finished[b], key=lambda h: h[0])[1] + [eos_id])
        L = max(1, max(len(h) for h in best))
        out = torch.full((B, L), pad_id, dtype=torch.long, device=device)
        for b, h in enumerate(best):
            out[b, : len(h)] = torch.tensor(h, dtype=torch.long, device=device)
        return out

    @staticmethod
    def generate_square_subsequent_mask(sz: int, device=None, dtype=None) -> Tensor:
        """The (sz, sz) float causal mask: -inf above the diagonal, 0 elsewhere (as torch)."""
        dtype = torch.get_default_dtype() if dtype is None else dtype
        return torch.triu(torch.full((sz, sz), float("-inf"), dtype=dtype, device=device), diagonal=1)
