"""Custom-op glue: fake implementations, autograd, input checks and backend choice per op."""

from .additive_attention import additive_attention
from .flash_attention import scaled_dot_product_attention

__all__ = ["additive_attention", "scaled_dot_product_attention"]
