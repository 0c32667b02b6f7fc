"""Attention layers on pyattn's fused ops."""

from .bahdanau import BahdanauAttention
from .multihead_attention import MultiheadAttention

__all__ = ["BahdanauAttention", "MultiheadAttention"]
