"""Custom-op glue: fake implementations, autograd, input checks and backend choice per op."""

from .additive_attention import additive_attention
from .kvcache_attention import kvcache_attention
from .sdpa import scaled_dot_product_attention
from .varlen_attention import varlen_attention

__all__ = ["additive_attention", "kvcache_attention", "scaled_dot_product_attention", "varlen_attention"]
