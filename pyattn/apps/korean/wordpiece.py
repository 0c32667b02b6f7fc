"""A cased Korean WordPiece vocabulary, trained here on the konlpy corpora.

A multilingual BERT vocabulary tokenises 고양이 as ``[CLS] 고 ##양 ##이 [SEP]``; this one does too
(tests/apps/test_korean.py checks it). The vocabulary is trained locally, from data inside
installed wheels, so nothing is downloaded from a model hub:

- corpus: konlpy's kolaw (the constitution) and kobill (ten bills), about 65k characters,
  read with ``konlpy.corpus.*.open`` (plain files; no Java needed);
- alphabet: the 2,350 Hangul syllables of KS X 1001 (the euc-kr codec's rows 0xB0-0xC8), so
  every common syllable is a token even when the small corpus never shows it;
- ``lowercase=False`` and ``strip_accents=False``: accent stripping runs NFD, which splits each
  Hangul syllable into its jamo (고 -> ᄀ + ᅩ) and the vocabulary would be of jamo;
- ``vocab_size`` above what the corpus can support, so training stops when no pair occurs
  ``min_frequency`` times: the vocabulary is every merge the text justifies, no more.

Why 고양이 splits as 고 ##양 ##이: WordPiece merges only pairs seen in the corpus, and neither
고양 nor 양이 occurs in these legal texts (tests/test_korean.py checks the counts). So no piece
longer than one syllable can cover any part of 고양이, and greedy longest-match-first falls back
to the syllables: the word-initial 고 and the continuation pieces ##양 and ##이. A vocabulary
trained on text that contains 고양이 would learn a longer piece, which is the point of training.

After training, the continuation form ``##X`` of every alphabet syllable is appended where the
corpus did not produce it (as Google's BERT vocabularies carry ``##`` forms of their characters),
so a Korean word made of KS X 1001 syllables never becomes ``[UNK]``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ._cache import atomic_write_bytes, cache_dir

# Bump when the corpus, alphabet or settings change, so an old cached vocabulary is not reused.
VERSION = "v1"
VOCAB_SIZE = 8000  # above the ~6k merges the corpus supports at min_frequency=2
MIN_FREQUENCY = 2
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4: padding is id 0


def hangul_alphabet() -> list[str]:
    """The 2,350 precomposed Hangul syllables of KS X 1001, in code order (가 ... 힝).

    Returns:
        The syllables, decoded from euc-kr bytes 0xB0-0xC8 (lead) x 0xA1-0xFE (trail).
    """
    return [
        bytes((lead, trail)).decode("euc-kr") for lead in range(0xB0, 0xC9) for trail in range(0xA1, 0xFF)
    ]


def korean_corpus() -> list[str]:
    """The konlpy kolaw + kobill documents, one string each."""
    from konlpy.corpus import kobill, kolaw

    docs = []
    for reader in (kolaw, kobill):
        for fileid in sorted(reader.fileids()):
            with reader.open(fileid) as f:
                docs.append(f.read())
    return docs


def train_vocab(folder: Path) -> Path:
    """Train the vocabulary and write ``folder/vocab.txt`` (one token per line, id = line).

    Arguments:
        folder: where vocab.txt goes.
    Returns:
        The path of vocab.txt.
    """
    from tokenizers import BertWordPieceTokenizer

    alphabet = hangul_alphabet()
    tok = BertWordPieceTokenizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
    )
    tok.train_from_iterator(
        korean_corpus(),
        vocab_size=VOCAB_SIZE,
        min_frequency=MIN_FREQUENCY,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        # The trainer keeps only the `limit_alphabet` most frequent characters; the initial
        # alphabet counts as most frequent, so the limit must exceed it or syllables are lost.
        limit_alphabet=len(alphabet) + 2000,
        wordpieces_prefix="##",
        show_progress=False,
    )
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    tokens += ["##" + s for s in alphabet if "##" + s not in vocab]
    path = folder / "vocab.txt"
    atomic_write_bytes(path, ("\n".join(tokens) + "\n").encode("utf-8"))
    return path


def vocab_file() -> Path:
    """The cached vocab.txt, trained on first use (a few seconds)."""
    folder = cache_dir(f"korean-wordpiece-{VERSION}")
    path = folder / "vocab.txt"
    if not path.exists():
        train_vocab(folder)
    return path


def wordpiece_tokenizer():
    """The Korean WordPiece tokenizer as a ``transformers.BertTokenizer``.

    Cased, no accent stripping (keeps Hangul syllables whole), ``[CLS] ... [SEP]`` around each
    sentence, ``[PAD]`` = id 0.

    Returns:
        A ``transformers.BertTokenizer`` over the cached vocab.txt (read with
        ``from_pretrained`` on the local folder: no network).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import BertTokenizer

    # tokenize_chinese_chars only splits CJK ideographs (Hanja in these texts) into single
    # characters, as the trainer's handle_chinese_chars did; Hangul is outside those ranges.
    return BertTokenizer.from_pretrained(
        str(vocab_file().parent),
        do_lower_case=False,
        strip_accents=False,
        tokenize_chinese_chars=True,
    )
