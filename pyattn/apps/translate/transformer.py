"""The Transformer translation model of ``pyattn translate --model transformer``.

``pyattn.models.Transformer`` (encoder-decoder, post-norm, batch first) between token + learned
position embeddings and an output layer. Training is teacher forcing on the whole target (one
causal forward); translation is ``Transformer.generate`` with its KV cache (docs/design.md,
"Generation with a KV cache"). The heatmaps show the last decoder layer's cross-attention,
averaged over heads, from one teacher-forced pass over the generated tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pyattn.models.transformer import Transformer


@dataclass
class TransformerTranslatorConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 128
    nhead: int = 4
    num_layers: int = 2
    dim_feedforward: int = 256
    dropout: float = 0.1
    max_len: int = 512
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    attn_backend: str = "fused"


@dataclass
class TranslatorOutput:
    logits: Tensor  # (B, T-1, V): predictions of tgt[:, 1:]


class _Embed(nn.Module):
    def __init__(self, vocab: int, c: TransformerTranslatorConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, c.d_model, padding_idx=c.pad_id)
        self.pos = nn.Embedding(c.max_len, c.d_model)
        self.scale = c.d_model**0.5
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, tokens: Tensor, start: int = 0) -> Tensor:
        """tokens (B, t) at positions start..start+t-1 -> (B, t, d_model)."""
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)  # (t,)
        return self.dropout(self.tok(tokens) * self.scale + self.pos(pos))


class TransformerTranslator(nn.Module):
    """Embeddings + pyattn.models.Transformer + output layer, with the Seq2Seq model's interface
    (``config.pad_id``, ``forward(src, tgt).logits``, ``greedy_decode``, ``set_attn_backend``)."""

    def __init__(self, config: TransformerTranslatorConfig) -> None:
        super().__init__()
        self.config = c = config
        self.transformer = Transformer(
            c.d_model, c.nhead, c.num_layers, c.num_layers, c.dim_feedforward, c.dropout,
            batch_first=True, attn_backend=c.attn_backend,
        )  # fmt: skip
        self.src_embed = _Embed(c.src_vocab_size, c)
        self.tgt_embed = _Embed(c.tgt_vocab_size, c)
        self.out = nn.Linear(c.d_model, c.tgt_vocab_size)

    def set_attn_backend(self, name: str) -> None:
        self.transformer.set_attn_backend(name)
        self.config.attn_backend = name

    def _check_len(self, name: str, t: Tensor) -> None:
        if t.dim() != 2 or t.shape[1] > self.config.max_len:
            raise ValueError(
                f"TransformerTranslator: '{name}' must be (B, L <= max_len={self.config.max_len}) token "
                f"ids, got shape {tuple(t.shape)}"
            )

    def forward(self, src: Tensor, tgt: Tensor) -> TranslatorOutput:
        """src (B, S) ids padded with pad_id; tgt (B, T) = bos + ids + eos, padded.
        Returns logits (B, T-1, V) predicting tgt[:, 1:]."""
        self._check_len("src", src)
        self._check_len("tgt", tgt)
        c = self.config
        inp = tgt[:, :-1]  # (B, T-1)
        mask = Transformer.generate_square_subsequent_mask(inp.shape[1], device=src.device)
        y = self.transformer(
            self.src_embed(src), self.tgt_embed(inp), tgt_mask=mask, tgt_is_causal=True,
            src_key_padding_mask=src == c.pad_id, memory_key_padding_mask=src == c.pad_id,
            tgt_key_padding_mask=inp == c.pad_id,
        )  # fmt: skip  # (B, T-1, E)
        return TranslatorOutput(self.out(y))

    @torch.no_grad()
    def greedy_decode(self, src: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
        """Tokens (B, L) without bos, each ending at eos then pad_id (Transformer.generate with
        the KV cache), and the cross-attention of the last decoder layer (B, L, S)."""
        self._check_len("src", src)
        c = self.config
        pad = src == c.pad_id  # (B, S)
        max_len = min(max_len, c.max_len)
        tokens = self.transformer.generate(
            self.src_embed(src), self.tgt_embed, self.out, bos_id=c.bos_id, eos_id=c.eos_id,
            pad_id=c.pad_id, max_new_tokens=max_len, src_key_padding_mask=pad,
        )  # fmt: skip
        return tokens, self._cross_attention(src, pad, tokens)

    def _cross_attention(self, src: Tensor, pad: Tensor, tokens: Tensor) -> Tensor:
        """(B, L, S): the last decoder layer's cross-attention weights (mean over heads) in a
        teacher-forced pass over bos + tokens[:, :-1]."""
        c = self.config
        inp = torch.cat([torch.full_like(tokens[:, :1], c.bos_id), tokens[:, :-1]], dim=1)  # (B, L)
        layer = self.transformer.decoder.layers[-1]
        seen = []
        hook = layer.multihead_attn.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            memory = self.transformer.encoder(self.src_embed(src), src_key_padding_mask=pad)  # (B, S, E)
            mask = Transformer.generate_square_subsequent_mask(inp.shape[1], device=src.device)
            self.transformer.decoder(
                self.tgt_embed(inp), memory, tgt_mask=mask, tgt_is_causal=True, memory_key_padding_mask=pad
            )
        finally:
            hook.remove()
        _, weights = layer.multihead_attn(seen[-1], memory, memory, key_padding_mask=pad)  # (B, L, S)
        return weights
