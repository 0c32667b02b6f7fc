"""The exceptions pyattn raises for bad user input.

Code written against torch catches torch's classes: ``torch.nn.functional.scaled_dot_product_attention``
raises RuntimeError for most bad inputs (dtype or shape mismatches, attn_mask with is_causal, ...),
ValueError for some (a CausalBias with is_causal=True), TypeError for an argument of the wrong
Python type and IndexError in one corner (enable_gqa on 2-D inputs); ``torch.nn.MultiheadAttention``
checks most shapes with ``assert`` (AssertionError). pyattn's messages name the
argument, what was expected and what came, and are raised as classes that are instances of every
class torch uses for the same mistake, so ``except RuntimeError`` or ``except ValueError`` catches
ours wherever it catches torch's.
"""

from __future__ import annotations

__all__ = ["InputAssertionError", "InputError", "InputIndexError", "InputTypeError"]


class InputError(ValueError, RuntimeError):
    """A user input pyattn cannot take (a ValueError and a RuntimeError)."""


class InputTypeError(InputError, TypeError):
    """An input of the wrong type or dtype (also a TypeError)."""


class InputIndexError(InputError, IndexError):
    """A dim that the inputs do not have (also an IndexError, as torch's)."""


class InputAssertionError(InputError, AssertionError):
    """A module input torch checks with ``assert`` (shapes of nn.MultiheadAttention's inputs)."""
