"""Sequence-to-sequence with Bahdanau attention (Bahdanau, Cho and Bengio, 2015) on pyattn.

    encoder:  h_j = [GRU_fwd(x_1..x_j); GRU_bwd(x_j..x_S)]               (bidirectional)
    decoder:  e_ij = v . tanh(W_s s_{i-1} + W_h h_j),  a_ij = softmax_j(e_ij),  c_i = sum_j a_ij h_j
              s_i = GRU(s_{i-1}, [emb(y_{i-1}); c_i]),   p(y_i) = softmax(W_o [s_i; c_i; emb(y_{i-1})])

``W_h h`` is projected once per source sentence; each decoder step runs the fused additive
attention op (``attn_backend="fused"``) or ``pyattn.reference`` (``"reference"``), with the
source padding (``pad_id``) as the key padding mask. The attention weights come back for
heatmaps.

The backward GRU reads each sentence reversed within its own length (a gather, not
pack_padded_sequence), so padding never reaches a real position and torch.compile traces it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.bahdanau import BahdanauAttention
from ..nn.multihead_attention import check_attn_backend


@dataclass
class Seq2SeqConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    embed_dim: int = 128
    hidden_dim: int = 256
    attn_dim: int = 128
    num_layers: int = 1
    dropout: float = 0.1
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    attn_backend: str = "fused"

    def __post_init__(self) -> None:
        if self.hidden_dim % 2 != 0:
            raise ValueError(
                f"Seq2SeqConfig: hidden_dim must be even (two GRU directions), got {self.hidden_dim}"
            )
        if self.num_layers < 1:
            raise ValueError(f"Seq2SeqConfig: num_layers must be >= 1, got {self.num_layers}")
        check_attn_backend(self.attn_backend)


@dataclass
class Seq2SeqOutput:
    logits: Tensor  # (B, T-1, V): predictions of tgt[:, 1:]
    attention: Tensor  # (B, T-1, S)


def _reverse_within_length(x: Tensor, lengths: Tensor) -> Tensor:
    """x (B, S, F) with each row's first ``lengths[b]`` steps reversed; padding stays last."""
    S = x.shape[1]
    j = torch.arange(S, device=x.device)[None, :]  # (1, S)
    idx = torch.where(j < lengths[:, None], lengths[:, None] - 1 - j, j)  # (B, S)
    return x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[2]))


class Encoder(nn.Module):
    """Embedding + bidirectional GRU: (B, S) ids -> states (B, S, hidden_dim) and a summary."""

    def __init__(self, c: Seq2SeqConfig) -> None:
        super().__init__()
        half = c.hidden_dim // 2
        self.embedding = nn.Embedding(c.src_vocab_size, c.embed_dim, padding_idx=c.pad_id)
        self.fwd = nn.ModuleList(
            [
                nn.GRU(c.embed_dim if i == 0 else c.hidden_dim, half, batch_first=True)
                for i in range(c.num_layers)
            ]
        )
        self.bwd = nn.ModuleList(
            [
                nn.GRU(c.embed_dim if i == 0 else c.hidden_dim, half, batch_first=True)
                for i in range(c.num_layers)
            ]
        )
        self.dropout = nn.Dropout(c.dropout)
        self.pad_id = c.pad_id

    def forward(self, src: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns states h (B, S, hidden_dim), the final [fwd; bwd] state (B, hidden_dim) of
        the top layer, and the source padding mask (B, S) (True = padding)."""
        pad = src == self.pad_id  # (B, S)
        # A sentence of only padding still gets one step so the gathers stay in range.
        lengths = (~pad).sum(1).clamp(min=1)  # (B,)
        x = self.dropout(self.embedding(src))  # (B, S, E)
        for i, (f, b) in enumerate(zip(self.fwd, self.bwd, strict=True)):
            if i > 0:
                x = self.dropout(x)
            out_f, _ = f(x)  # (B, S, hidden/2)
            out_b = _reverse_within_length(
                b(_reverse_within_length(x, lengths))[0], lengths
            )  # (B, S, hidden/2)
            x = torch.cat([out_f, out_b], dim=-1)  # (B, S, hidden)
        last = (lengths - 1)[:, None, None].expand(-1, 1, out_f.shape[2])  # (B, 1, hidden/2)
        final = torch.cat([out_f.gather(1, last)[:, 0], out_b[:, 0]], dim=-1)  # (B, hidden)
        return x, final, pad


class AttnDecoder(nn.Module):
    """GRU decoder with Bahdanau attention; :meth:`step` advances every sentence one token."""

    def __init__(self, c: Seq2SeqConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(c.tgt_vocab_size, c.embed_dim, padding_idx=c.pad_id)
        self.bridge = nn.Linear(c.hidden_dim, c.hidden_dim)
        self.attention = BahdanauAttention(
            c.hidden_dim, c.hidden_dim, c.attn_dim, attn_backend=c.attn_backend
        )
        self.cells = nn.ModuleList(
            [
                nn.GRUCell(c.embed_dim + c.hidden_dim if i == 0 else c.hidden_dim, c.hidden_dim)
                for i in range(c.num_layers)
            ]
        )
        self.out = nn.Linear(2 * c.hidden_dim + c.embed_dim, c.tgt_vocab_size)
        self.dropout = nn.Dropout(c.dropout)

    def init_state(self, final: Tensor) -> list[Tensor]:
        """s_0 of each layer from the encoder's final state (B, hidden)."""
        s0 = torch.tanh(self.bridge(final))  # (B, hidden)
        return [s0 for _ in self.cells]

    def step(
        self, y_prev: Tensor, state: list[Tensor], enc: Tensor, keys: Tensor, pad: Tensor
    ) -> tuple[Tensor, list[Tensor], Tensor]:
        """One decoder step.

        Arguments:
            y_prev: (N,) previous tokens; state: per layer (N, hidden); N = B x K, the K
                hypotheses (beams) of each source next to each other.
            enc: (B, S, hidden) encoder states; keys: ``attention.project_keys(enc)``;
            pad: (B, S) source padding mask.
        Returns:
            logits (N, V), the new state, attention weights (N, S).
        """
        N, B = y_prev.shape[0], enc.shape[0]
        emb = self.dropout(self.embedding(y_prev))  # (N, E)
        # the K hypotheses of a source are K query rows over its one copy of the keys: beams
        # share the projected keys without an expand (which a kernel would copy) or a recompute
        query = state[-1].view(B, N // B, -1)  # (B, K, hidden)
        context, weights = self.attention(
            query, enc, key_padding_mask=pad, precomputed_keys=keys
        )  # (B, K, hidden), (B, K, S)
        context, weights = context.reshape(N, -1), weights.reshape(N, -1)  # (N, hidden), (N, S)
        x = torch.cat([emb, context], dim=-1)  # (N, E + hidden)
        new_state = []
        for i, cell in enumerate(self.cells):
            s = cell(x if i == 0 else self.dropout(x), state[i])  # (N, hidden)
            new_state.append(s)
            x = s
        logits = self.out(self.dropout(torch.cat([x, context, emb], dim=-1)))  # (N, V)
        return logits, new_state, weights


class Seq2Seq(nn.Module):
    """Encoder + attention decoder, with teacher forcing, greedy decoding and beam search."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = AttnDecoder(config)

    def set_attn_backend(self, name: str) -> None:
        """Route the attention through "fused" (pyattn's best backend) or "reference"."""
        self.decoder.attention.set_attn_backend(name)
        self.config.attn_backend = name

    def _encode(self, src: Tensor):
        if src.dim() != 2:
            raise ValueError(f"Seq2Seq: 'src' must be (B, S) token ids, got shape {tuple(src.shape)}")
        enc, final, pad = self.encoder(src)
        keys = self.decoder.attention.project_keys(enc)  # (B, S, attn_dim), once per sentence
        return enc, keys, pad, self.decoder.init_state(final)

    def forward(self, src: Tensor, tgt: Tensor, teacher_forcing_ratio: float = 1.0) -> Seq2SeqOutput:
        """Arguments:
            src: (B, S) source ids padded with pad_id.
            tgt: (B, T) target ids starting with bos_id (padded with pad_id).
            teacher_forcing_ratio: probability of feeding the true previous token (per sentence
                and step) instead of the model's own prediction.
        Returns:
            Seq2SeqOutput(logits (B, T-1, V) predicting tgt[:, 1:], attention (B, T-1, S)).
        """
        if tgt.dim() != 2 or tgt.shape[0] != src.shape[0] or tgt.shape[1] < 2:
            raise ValueError(
                f"Seq2Seq: 'tgt' must be (B={src.shape[0]}, T>=2) token ids, got shape {tuple(tgt.shape)}"
            )
        enc, keys, pad, state = self._encode(src)
        y = tgt[:, 0]
        logits, attn = [], []
        for i in range(1, tgt.shape[1]):
            out, state, w = self.decoder.step(y, state, enc, keys, pad)
            logits.append(out)
            attn.append(w)
            if teacher_forcing_ratio >= 1.0:
                y = tgt[:, i]
            else:
                use_truth = torch.rand(tgt.shape[0], device=tgt.device) < teacher_forcing_ratio
                y = torch.where(use_truth, tgt[:, i], out.argmax(-1))
        return Seq2SeqOutput(torch.stack(logits, 1), torch.stack(attn, 1))  # (B, T-1, V), (B, T-1, S)

    def loss(self, output: Seq2SeqOutput, tgt: Tensor) -> Tensor:
        """Token-level cross-entropy of ``output`` against tgt[:, 1:], padding ignored."""
        return F.cross_entropy(
            output.logits.reshape(-1, output.logits.shape[-1]),
            tgt[:, 1:].reshape(-1),
            ignore_index=self.config.pad_id,
        )

    @torch.no_grad()
    def greedy_decode(self, src: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
        """Returns tokens (B, L) without bos, each ending at eos then pad_id, and the attention
        (B, L, S); L <= max_len (decoding stops once every sentence has ended)."""
        c = self.config
        enc, keys, pad, state = self._encode(src)
        B = src.shape[0]
        y = torch.full((B,), c.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        tokens, attn = [], []
        for _ in range(max_len):
            logits, state, w = self.decoder.step(y, state, enc, keys, pad)
            y = logits.argmax(-1)
            y = torch.where(done, torch.full_like(y, c.pad_id), y)
            tokens.append(y)
            attn.append(torch.where(done[:, None], torch.zeros_like(w), w))
            done = done | (y == c.eos_id)
            if bool(done.all()):
                break
        return torch.stack(tokens, 1), torch.stack(attn, 1)

    @torch.no_grad()
    def beam_search(self, src: Tensor, beam_size: int = 4, max_len: int = 50) -> list[list[int]]:
        """Beam search per sentence; the best hypothesis by length-normalised log-probability
        (mean per token, eos included), without bos/eos. The encoder states and projected keys
        of a sentence are computed once and read by all its hypotheses (``AttnDecoder.step``)."""
        if beam_size < 1:
            raise ValueError(f"Seq2Seq.beam_search: beam_size must be >= 1, got {beam_size}")
        c = self.config
        enc_all, keys_all, pad_all, state_all = self._encode(src)
        results = []
        for b in range(src.shape[0]):
            enc, keys, pad = enc_all[b : b + 1], keys_all[b : b + 1], pad_all[b : b + 1]
            state = [s[b : b + 1] for s in state_all]
            hyps: list[list[int]] = [[]]
            scores = torch.zeros(1, device=src.device)
            finished: list[tuple[float, list[int]]] = []
            for _ in range(max_len):
                y = torch.tensor([h[-1] if h else c.bos_id for h in hyps], device=src.device)
                logits, state, _ = self.decoder.step(y, state, enc, keys, pad)  # k hypotheses, 1 source
                cand = (scores[:, None] + F.log_softmax(logits.float(), -1)).flatten()  # (k * V,)
                top, idx = cand.topk(min(2 * beam_size, cand.numel()))
                V = logits.shape[-1]
                keep_rows, new_hyps, new_scores = [], [], []
                for score, i in zip(top.tolist(), idx.tolist(), strict=True):
                    row, tok = divmod(i, V)
                    if tok == c.eos_id:
                        finished.append((score / (len(hyps[row]) + 1), hyps[row]))
                    else:
                        keep_rows.append(row)
                        new_hyps.append(hyps[row] + [tok])
                        new_scores.append(score)
                    if len(new_hyps) == beam_size:
                        break
                if len(finished) >= beam_size or not new_hyps:
                    break
                rows = torch.tensor(keep_rows, device=src.device)
                state = [s[rows] for s in state]
                hyps, scores = new_hyps, torch.tensor(new_scores, device=src.device)
            if not finished:
                finished = [(s / max(len(h), 1), h) for s, h in zip(scores.tolist(), hyps, strict=True)]
            results.append(max(finished, key=lambda t: t[0])[1])
        return results
