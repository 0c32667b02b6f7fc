"""Token vocabularies, the (source, target) task container and padded batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3: the Seq2SeqConfig defaults pad 0, bos 1, eos 2


class Vocab:
    """Token <-> id, specials first (pad 0, bos 1, eos 2, unk 3)."""

    def __init__(self, tokens):
        self.itos = list(SPECIALS) + sorted(set(tokens) - set(SPECIALS))
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: list[str]) -> list[int]:
        return [self.stoi.get(t, 3) for t in tokens]

    def decode(self, ids: list[int]) -> list[str]:
        out = []
        for i in ids:
            if i == 2:  # eos
                break
            if i >= 4:
                out.append(self.itos[i])
        return out


@dataclass
class Task:
    name: str
    src_vocab: Vocab
    tgt_vocab: Vocab
    train: list[tuple[list[str], list[str]]]
    test: list[tuple[list[str], list[str]]]
    joiner: str  # how target tokens join back into text


def batchify(pairs, src_vocab: Vocab, tgt_vocab: Vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """(src (B, S) padded with 0, tgt (B, T) = bos + ids + eos, padded with 0)."""
    srcs = [src_vocab.encode(s) + [2] for s, _ in pairs]
    tgts = [[1] + tgt_vocab.encode(t) + [2] for _, t in pairs]
    src = torch.zeros(len(pairs), max(map(len, srcs)), dtype=torch.long)
    tgt = torch.zeros(len(pairs), max(map(len, tgts)), dtype=torch.long)
    for i, (s, t) in enumerate(zip(srcs, tgts, strict=True)):
        src[i, : len(s)] = torch.tensor(s)
        tgt[i, : len(t)] = torch.tensor(t)
    return src, tgt
