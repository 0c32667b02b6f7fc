"""BERT (Devlin et al., 2019) on pyattn's fused scaled-dot-product attention.

Parameter names are Hugging Face's ``BertModel`` / ``BertForPreTraining``, so a ``transformers``
state dict (bare, or with the ``bert.`` prefix, or with legacy ``gamma``/``beta`` LayerNorm
names) loads unchanged, and :meth:`BertModel.from_pretrained` reads a local checkpoint folder.
Self-attention runs through ``pyattn.scaled_dot_product_attention`` with the padding mask as a
bool (B, 1, 1, L) mask (``attn_backend="fused"``) or through ``pyattn.reference``.

Padding-free (``BertConfig.padding_free``, on by default): given an ``attention_mask`` with
padding, :meth:`BertModel.forward` embeds only the real tokens, runs every layer on them packed
(projections, LayerNorm and feed-forward over T real rows, attention through varlen attention
within each sequence) and pads back once at the end. Real tokens get the padded path's outputs
(up to rounding); padding positions of ``last_hidden_state`` are zeros. :meth:`forward_packed`
takes packed tokens directly (and compiles with ``torch.compile(fullgraph=True)``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.multihead_attention import _sdpa_backend, check_attn_backend
from ..ops import scaled_dot_product_attention
from . import _context_parallel as _cp
from . import _packing
from ._context_parallel import ContextParallel
from ._packing import PackedSeqs

_ACT = {
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


@dataclass
class BertConfig:
    """Hugging Face's BERT configuration fields (same names and defaults) + ``attn_backend``."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    attn_backend: str = "fused"
    # given an attention_mask with padding, run the layers on the real tokens only (module doc)
    padding_free: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"BertConfig: hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.hidden_act not in _ACT:
            raise ValueError(f"BertConfig: hidden_act must be one of {sorted(_ACT)}, got {self.hidden_act!r}")
        check_attn_backend(self.attn_backend)

    @classmethod
    def base(cls, **overrides) -> BertConfig:
        """BERT-base: L=12, H=768, A=12 (110M parameters)."""
        return cls(**{"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                      "intermediate_size": 3072, **overrides})  # fmt: skip

    @classmethod
    def large(cls, **overrides) -> BertConfig:
        """BERT-large: L=24, H=1024, A=16 (340M parameters)."""
        return cls(**{"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                      "intermediate_size": 4096, **overrides})  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        """From a Hugging Face config.json dict; unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json_file(cls, path: str) -> BertConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BertOutput:
    last_hidden_state: Tensor  # (B, L, H)
    pooler_output: Tensor | None  # (B, H)


@dataclass
class BertForPreTrainingOutput:
    prediction_logits: Tensor  # (B, L, V)
    seq_relationship_logits: Tensor  # (B, 2)
    loss: Tensor | None = None


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(c.max_position_embeddings)[None], persistent=False)

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        """(B, L) ids -> (B, L, H), positions 0..L-1 by default; or packed (T,) ids with their
        (T,) positions -> (T, H)."""
        if position_ids is None:
            position_ids = self.position_ids[:, : input_ids.shape[1]]  # (1, L)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings(token_type_ids)
        )  # (B, L, H) or (T, H)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.num_attention_heads = c.num_attention_heads
        self.attention_head_size = c.hidden_size // c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.dropout_p = c.attention_probs_dropout_prob
        self.attn_backend = c.attn_backend

    def forward(self, x: Tensor, mask: Tensor | PackedSeqs | ContextParallel | None) -> Tensor:
        if isinstance(mask, PackedSeqs):
            return self._forward_packed(x, mask)
        B, L, H = x.shape
        nh, d = self.num_attention_heads, self.attention_head_size
        q = self.query(x).view(B, L, nh, d).transpose(1, 2)  # (B, nh, L, d)
        k = self.key(x).view(B, L, nh, d).transpose(1, 2)  # (B, nh, L, d)
        v = self.value(x).view(B, L, nh, d).transpose(1, 2)  # (B, nh, L, d)
        if isinstance(mask, ContextParallel):
            # this rank's shard of the sequence (BertModel's context parallelism)
            _cp.no_dropout("BertModel", self.training, self.dropout_p)
            out = _cp.attention(mask, q, k, v, is_causal=False, scale=1.0 / math.sqrt(d),
                                backend=_sdpa_backend(self.attn_backend))  # fmt: skip
            return out.transpose(1, 2).reshape(B, L, H)  # (B, L, H)
        out = scaled_dot_product_attention(
            q,
            k,
            v,
            mask,
            self.dropout_p if self.training else 0.0,
            scale=1.0 / math.sqrt(d),
            backend=_sdpa_backend(self.attn_backend),
        )  # (B, nh, L, d)
        return out.transpose(1, 2).reshape(B, L, H)  # (B, L, H)

    def _forward_packed(self, x: Tensor, seqs: PackedSeqs) -> Tensor:
        T, H = x.shape
        nh, d = self.num_attention_heads, self.attention_head_size
        out = _packing.attention(
            self.query(x).view(T, nh, d),  # (T, nh, d)
            self.key(x).view(T, nh, d),  # (T, nh, d)
            self.value(x).view(T, nh, d),  # (T, nh, d)
            seqs,
            seqs,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=False,
            scale=1.0 / math.sqrt(d),
            attn_backend=self.attn_backend,
        )  # (T, nh, d)
        return out.reshape(T, H)  # (T, H)


class BertSelfOutput(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertSelfOutput(c)

    def forward(self, x: Tensor, mask: Tensor | PackedSeqs | None) -> Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act = _ACT[c.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class BertOutputLayer(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.intermediate_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertOutputLayer(c)

    def forward(self, x: Tensor, mask: Tensor | PackedSeqs | None) -> Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(c) for _ in range(c.num_hidden_layers)])

    def forward(self, x: Tensor, mask: Tensor | PackedSeqs | None) -> Tensor:
        """(B, L, H) with a (B, 1, 1, L) mask, or packed (T, H) with their PackedSeqs."""
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertPooler(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, h: Tensor) -> Tensor:
        return self.activation(self.dense(h[:, 0]))


def _normalise_hf_keys(state_dict: dict, prefix: str, drop: tuple[str, ...]) -> None:
    """Rewrite a Hugging Face state dict in place for a module loaded under ``prefix``:
    strip a ``bert.`` prefix, map legacy ``gamma``/``beta`` to ``weight``/``bias``, and drop
    buffers HF once saved (position_ids) and keys under ``drop`` (heads this model lacks)."""
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        new = rest[len("bert.") :] if rest.startswith("bert.") else rest
        if new.endswith(".gamma"):
            new = new[: -len("gamma")] + "weight"
        elif new.endswith(".beta"):
            new = new[: -len("beta")] + "bias"
        value = state_dict.pop(key)
        if new.endswith("embeddings.position_ids") or new.endswith("embeddings.token_type_ids"):
            continue
        if any(new.startswith(d) for d in drop):
            continue
        state_dict[prefix + new] = value


def _set_backend(module: nn.Module, name: str) -> None:
    check_attn_backend(name)
    for m in module.modules():
        if isinstance(m, BertSelfAttention):
            m.attn_backend = name


def _init_weights(module: nn.Module, std: float) -> None:
    # Hugging Face's BERT initialisation: N(0, initializer_range) weights, zero biases.
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _read_checkpoint(folder: str) -> tuple[BertConfig, dict]:
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"from_pretrained: no config.json in {folder!r}")
    config = BertConfig.from_json_file(cfg_path)
    st = os.path.join(folder, "model.safetensors")
    pt = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        state = load_file(st)
    elif os.path.isfile(pt):
        state = torch.load(pt, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(
            f"from_pretrained: neither model.safetensors nor pytorch_model.bin in {folder!r}"
        )
    return config, state


class BertModel(nn.Module):
    """BERT encoder with Hugging Face's parameter names.

    Arguments:
        config: a :class:`BertConfig`.
        add_pooling_layer: build the pooler (``pooler_output`` is None without it).
        process_group: context parallelism over this torch.distributed group (default None:
            off); see :meth:`set_context_parallel`.
        cp_layout: the sequence layout of its shards, "zigzag" or "contiguous".
    """

    def __init__(
        self,
        config: BertConfig,
        add_pooling_layer: bool = True,
        process_group=None,
        cp_layout: str = "zigzag",
    ) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        _init_weights(self, config.initializer_range)
        self._register_load_state_dict_pre_hook(self._load_hook)
        self.set_context_parallel(process_group, cp_layout)

    def set_context_parallel(self, process_group=None, layout: str = "zigzag") -> None:
        """Shard the sequence over ``process_group`` (None: off; docs/design.md, "Context
        parallelism"). Then ``forward`` takes this rank's shard (B, L/P) of the ids in ``layout``
        (``pyattn.distributed.shard_sequence(ids, 1, group, layout)``), embeds the shard's global
        positions, runs self-attention as ``pyattn.distributed.ring_attention`` and returns the
        shard's hidden states; ``pooler_output`` is computed on the rank holding position 0
        (rank 0) and None on the others. No padding mask and no attention dropout (eval, or
        ``attention_probs_dropout_prob=0``) under it: pack batches without padding."""
        self._cp = _cp.check("BertModel", process_group, layout)

    def _load_hook(self, state_dict, prefix, *args) -> None:
        _normalise_hf_keys(
            state_dict, prefix, drop=("cls.",) if self.pooler is not None else ("cls.", "pooler.")
        )

    def set_attn_backend(self, name: str) -> None:
        """Route attention through "fused" (pyattn's best backend) or "reference"."""
        _set_backend(self, name)
        self.config.attn_backend = name

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> BertOutput:
        """Arguments:
            input_ids: (B, L) token ids.
            attention_mask: (B, L), 1/True for tokens, 0/False for padding.
            token_type_ids: (B, L) segment ids (default 0).
        Returns:
            BertOutput(last_hidden_state (B, L, H), pooler_output (B, H) or None). With
            ``config.padding_free`` and padding in ``attention_mask``, the layers run on the
            real tokens only (not under torch.compile, where unpadding would break the graph:
            the padded path runs there) and the padding positions of last_hidden_state are
            zeros (on both paths); the real ones are the padded path's.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"BertModel: 'input_ids' must be (B, L), got {tuple(input_ids.shape)}")
        if self._cp is not None:
            return self._forward_context_parallel(input_ids, attention_mask, token_type_ids)
        B, L = input_ids.shape
        if L > self.config.max_position_embeddings:
            raise ValueError(
                f"BertModel: sequence length {L} exceeds max_position_embeddings={self.config.max_position_embeddings}"
            )
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, L):
                raise ValueError(
                    f"BertModel: 'attention_mask' must be (B={B}, L={L}), got {tuple(attention_mask.shape)}"
                )
            keep = attention_mask.bool()  # (B, L), True = real token
            if self.config.padding_free and not torch.compiler.is_compiling() and not bool(keep.all()):
                return self._forward_unpadded(input_ids, keep, token_type_ids)
            mask = keep[:, None, None, :]  # (B, 1, 1, L), True = attend
        h = self.encoder(self.embeddings(input_ids, token_type_ids), mask)  # (B, L, H)
        if mask is not None and self.config.padding_free:
            # padding rows are zeros on every path (compiled too), as the packed path leaves them
            h = h.masked_fill(~mask[:, 0, 0, :, None], 0.0)
        return BertOutput(h, self.pooler(h) if self.pooler is not None else None)

    def _forward_context_parallel(self, ids: Tensor, attention_mask, token_type_ids) -> BertOutput:
        cp = self._cp
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError(
                "BertModel: under context parallelism 'attention_mask' must be None or all ones "
                "(pack sequences without padding)"
            )
        pos = _cp.positions(cp, ids.shape[1], ids.device)  # (1, L/P) global positions
        if pos.numel() and int(pos.max()) >= self.config.max_position_embeddings:
            raise ValueError(
                f"BertModel: the whole sequence exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings} (position {int(pos.max())} on this rank)"
            )
        h = self.encoder(self.embeddings(ids, token_type_ids, pos), cp)  # (B, L/P, H)
        pooled = self.pooler(h) if self.pooler is not None and _cp.holds_first(cp) else None
        return BertOutput(h, pooled)

    def _forward_unpadded(self, input_ids: Tensor, keep: Tensor, token_type_ids: Tensor | None) -> BertOutput:
        p = _packing.packing(keep)
        types = None if token_type_ids is None else _packing.unpad(token_type_ids, p)  # (T,)
        # absolute positions, as the padded path embeds them (left padding shifts them)
        h = self._encode_packed(_packing.unpad(input_ids, p), p.seqs, types, p.indices % p.length)  # (T, H)
        h = _packing.pad(h, p)  # (B, L, H)
        return BertOutput(h, self.pooler(h) if self.pooler is not None else None)

    def _encode_packed(
        self, input_ids: Tensor, seqs: PackedSeqs, token_type_ids: Tensor | None, position_ids: Tensor | None
    ) -> Tensor:
        if position_ids is None:
            position_ids = _packing.positions(seqs, input_ids.shape[0])  # (T,)
        return self.encoder(self.embeddings(input_ids, token_type_ids, position_ids), seqs)  # (T, H)

    def forward_packed(
        self,
        input_ids: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> BertOutput:
        """The encoder on packed sequences, no padding anywhere (compiles with fullgraph=True).

        Arguments:
            input_ids: (T,) the tokens of B sequences one after another.
            cu_seqlens: int32 (B + 1,), cumulative lengths from 0: sequence b is
                ``input_ids[cu_seqlens[b]:cu_seqlens[b + 1]]``.
            max_seqlen: an upper bound of the lengths (at most max_position_embeddings).
            token_type_ids: (T,) segment ids (default 0).
            position_ids: (T,) positions (default 0, 1, ... within each sequence).
        Returns:
            BertOutput(last_hidden_state (T, H), pooler_output (B, H) from each sequence's first
            token, zeros for an empty sequence; None without a pooler).
        """
        if input_ids.dim() != 1:
            raise ValueError(
                f"BertModel.forward_packed: 'input_ids' must be (T,), got {tuple(input_ids.shape)}"
            )
        if max_seqlen > self.config.max_position_embeddings:
            raise ValueError(
                f"BertModel.forward_packed: max_seqlen {max_seqlen} exceeds "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        h = self._encode_packed(
            input_ids, PackedSeqs(cu_seqlens, int(max_seqlen)), token_type_ids, position_ids
        )
        pooled = None
        if self.pooler is not None:
            first = cu_seqlens[:-1].long().clamp(max=max(h.shape[0] - 1, 0))  # (B,)
            nonempty = (cu_seqlens[1:] > cu_seqlens[:-1])[:, None]  # (B, 1)
            pooled = self.pooler(h[first][:, None]) * nonempty  # (B, H)
        return BertOutput(h, pooled)

    @classmethod
    def from_pretrained(cls, folder: str, **config_overrides) -> BertModel:
        """A model from a local Hugging Face checkpoint folder: config.json + model.safetensors
        (or pytorch_model.bin). ``config_overrides`` (e.g. ``attn_backend``) replace fields."""
        config, state = _read_checkpoint(folder)
        for k, v in config_overrides.items():
            setattr(config, k, v)
        has_pooler = any("pooler." in k for k in state)
        model = cls(config, add_pooling_layer=has_pooler)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise RuntimeError(
                f"from_pretrained: checkpoint in {folder!r} lacks {result.missing_keys[:5]} ..."
            )
        if result.unexpected_keys:
            warnings.warn(f"from_pretrained: ignored keys {result.unexpected_keys[:5]}", stacklevel=2)
        return model.eval()


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.transform_act_fn = _ACT[c.hidden_act]
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, h: Tensor) -> Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(h)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(c)
        self.decoder = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))
        self.decoder.bias = self.bias  # one output bias, under HF's two names

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(self.transform(h))


class BertPreTrainingHeads(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(c)
        self.seq_relationship = nn.Linear(c.hidden_size, 2)

    def forward(self, h: Tensor, pooled: Tensor) -> tuple[Tensor, Tensor]:
        return self.predictions(h), self.seq_relationship(pooled)


class BertForPreTraining(nn.Module):
    """BERT + masked-LM and next-sentence heads (HF names ``bert.*``, ``cls.predictions.*``,
    ``cls.seq_relationship``); the MLM decoder weight is the word-embedding matrix."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        _init_weights(self.cls, config.initializer_range)
        self.cls.predictions.bias.data.zero_()
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self._register_load_state_dict_pre_hook(self._load_hook)

    def _load_hook(self, state_dict, prefix, *args) -> None:
        # Bare BertModel keys (no "bert." prefix) go under "bert.".
        for key in list(state_dict):
            if key.startswith(prefix):
                rest = key[len(prefix) :]
                if not (rest.startswith("bert.") or rest.startswith("cls.")):
                    state_dict[prefix + "bert." + rest] = state_dict.pop(key)
        # The tied decoder weight may be absent from a saved checkpoint (safetensors drops it).
        dec = prefix + "cls.predictions.decoder.weight"
        emb = prefix + "bert.embeddings.word_embeddings.weight"
        if dec not in state_dict and emb in state_dict:
            state_dict[dec] = state_dict[emb]
        if (
            prefix + "cls.predictions.decoder.bias" not in state_dict
            and prefix + "cls.predictions.bias" in state_dict
        ):
            state_dict[prefix + "cls.predictions.decoder.bias"] = state_dict[prefix + "cls.predictions.bias"]

    def set_attn_backend(self, name: str) -> None:
        _set_backend(self, name)
        self.config.attn_backend = name

    def set_context_parallel(self, process_group=None, layout: str = "zigzag") -> None:
        """:meth:`BertModel.set_context_parallel`. Then ``forward`` takes this rank's shards of
        ``input_ids``/``labels`` and its loss is this rank's share: the masked-LM sum over its
        tokens divided by the whole batch's count of labelled tokens, plus the next-sentence loss
        on rank 0, so the ranks' losses sum to the whole batch's loss and the gradients summed
        over the group (an all-reduce) are the whole batch's."""
        self.bert.set_context_parallel(process_group, layout)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        next_sentence_label: Tensor | None = None,
    ) -> BertForPreTrainingOutput:
        """Arguments as :meth:`BertModel.forward`, plus ``labels`` (B, L) MLM targets (-100 =
        ignored) and ``next_sentence_label`` (B,). Returns logits and, with labels, the loss
        (under context parallelism: see :meth:`set_context_parallel`; the next-sentence logits
        are None on ranks other than 0)."""
        out = self.bert(input_ids, attention_mask, token_type_ids)
        h, pooled = out.last_hidden_state, out.pooler_output
        mlm = self.cls.predictions(h)  # (B, L, V)
        nsp = None if pooled is None else self.cls.seq_relationship(pooled)  # (B, 2)
        loss = None
        if labels is not None:
            flat = mlm.reshape(-1, mlm.shape[-1])
            if self.bert._cp is None:
                loss = F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100)
            else:
                count = (labels != -100).sum().reshape(1)
                torch.distributed.all_reduce(count, group=self.bert._cp.group)
                loss = (
                    F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100, reduction="sum") / count[0]
                )
            if next_sentence_label is not None and nsp is not None:
                loss = loss + F.cross_entropy(nsp, next_sentence_label.reshape(-1))
        return BertForPreTrainingOutput(mlm, nsp, loss)

    @classmethod
    def from_pretrained(cls, folder: str, **config_overrides) -> BertForPreTraining:
        config, state = _read_checkpoint(folder)
        for k, v in config_overrides.items():
            setattr(config, k, v)
        model = cls(config)
        model.load_state_dict(state)
        return model.eval()
