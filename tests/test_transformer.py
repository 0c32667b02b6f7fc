"""pyattn.models.transformer.Transformer against torch.nn.Transformer with one state dict, padded and
padding-free (real target positions only; padding positions are zeros there)."""

from __future__ import annotations

import pytest
import torch

from pyattn.models import _packing
from pyattn.models.transformer import Transformer, TransformerConfig

TIGHT = {"rtol": 1e-9, "atol": 1e-10}
SMALL = {"d_model": 16, "nhead": 4, "num_encoder_layers": 2, "num_decoder_layers": 2, "dim_feedforward": 32}

pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor", "ignore:Support for mismatched")


def _pair(padding_free=True, **kwargs):
    ref = torch.nn.Transformer(**SMALL, dtype=torch.float64, **kwargs).eval()
    ours = Transformer(**SMALL, dtype=torch.float64, padding_free=padding_free, **kwargs).eval()
    result = ours.load_state_dict(ref.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert list(ours.state_dict()) == list(ref.state_dict())
    return ref, ours


def _padding(B, T):
    pad = torch.rand(B, T) < 0.3
    pad[:, 0] = False  # no fully padded sequence: torch gives NaN there
    return pad


def _count_varlen(monkeypatch):
    calls = []
    real = _packing.varlen_attention

    def counting(*args, **kwargs):
        calls.append(kwargs["is_causal"])
        return real(*args, **kwargs)

    monkeypatch.setattr(_packing, "varlen_attention", counting)
    return calls


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize(
    ("masks", "padding_free"),
    [("none", True), ("causal", True)]
    + [(m, pf) for m in ("padding", "causal_padding", "all") for pf in (True, False)],
)
def test_transformer_matches_torch(norm_first, batch_first, masks, padding_free, monkeypatch):
    calls = _count_varlen(monkeypatch)
    B, S, T, E = 3, 7, 5, SMALL["d_model"]
    ref, ours = _pair(
        padding_free,
        norm_first=norm_first,
        batch_first=batch_first,
        activation="gelu" if norm_first else "relu",
    )
    shape = (lambda L: (B, L, E)) if batch_first else (lambda L: (L, B, E))
    src = torch.randn(shape(S), dtype=torch.float64)
    tgt = torch.randn(shape(T), dtype=torch.float64)
    kw = {}
    if masks in ("causal", "causal_padding", "all"):
        kw["tgt_mask"] = Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
        kw["tgt_is_causal"] = True
    if masks in ("padding", "causal_padding", "all"):
        kw["src_key_padding_mask"] = _padding(B, S)
        kw["memory_key_padding_mask"] = kw["src_key_padding_mask"]
        kw["tgt_key_padding_mask"] = _padding(B, T)
    if masks == "all":
        blocked = torch.rand(S, S) < 0.3
        blocked[:, 0] = False  # key 0 is never padding: no fully masked row
        kw["src_mask"] = blocked
        kw["memory_mask"] = torch.randn(T, S, dtype=torch.float64)
    out_ref = ref(src, tgt, **kw)
    out = ours(src, tgt, **kw)
    # packed: key padding and at most the causal mask ("all" has a src_mask and a memory_mask)
    packed = padding_free and masks in ("padding", "causal_padding")
    causal = masks == "causal_padding"
    want = [False] * SMALL["num_encoder_layers"] + [causal, False] * SMALL["num_decoder_layers"]
    assert calls == (want if packed else [])  # encoder self, then decoder self and cross
    w = torch.randn_like(out_ref)
    if padding_free and "tgt_key_padding_mask" in kw:
        # padding target positions: zeros here (on the padded path too: "all" cannot be
        # packed), values nothing reads in torch
        real = ~kw["tgt_key_padding_mask"]  # (B, T)
        real = (real if batch_first else real.T)[..., None]
        assert not out.masked_select(~real).any()
        out, out_ref, w = out * real, out_ref * real, w * real
    torch.testing.assert_close(out, out_ref, **TIGHT)
    # Gradients of every parameter agree as well.
    g_ref = torch.autograd.grad((out_ref * w).sum(), list(ref.parameters()))
    g = torch.autograd.grad((out * w).sum(), list(ours.parameters()))
    for (name, _), a, b in zip(ref.named_parameters(), g, g_ref, strict=True):
        torch.testing.assert_close(a, b, **TIGHT, msg=lambda m, n=name: f"grad {n}: {m}")


def test_transformer_unbatched_and_mask_detection():
    ref, ours = _pair()
    src = torch.randn(6, SMALL["d_model"], dtype=torch.float64)
    tgt = torch.randn(4, SMALL["d_model"], dtype=torch.float64)
    mask = Transformer.generate_square_subsequent_mask(4, dtype=torch.float64)
    # No hint: the causal mask is detected as torch does; the answer is the same either way.
    torch.testing.assert_close(ours(src, tgt, tgt_mask=mask), ref(src, tgt, tgt_mask=mask), **TIGHT)


def test_generate_square_subsequent_mask_is_torchs():
    for n in (1, 5):
        torch.testing.assert_close(
            Transformer.generate_square_subsequent_mask(n),
            torch.nn.Transformer.generate_square_subsequent_mask(n),
        )


def test_transformer_config_and_positional_arguments():
    a = Transformer(TransformerConfig(**SMALL, attn_backend="reference"))
    b = Transformer(16, 4, 2, 2, 32)
    assert a.attn_backend == "reference" and b.attn_backend == "fused"
    assert list(a.state_dict()) == list(b.state_dict())
    assert all(m.attn_backend == "reference" for m in a.modules() if hasattr(m, "in_proj_weight"))
    b.set_attn_backend("reference")
    assert all(m.attn_backend == "reference" for m in b.modules() if hasattr(m, "in_proj_weight"))
    with pytest.raises(ValueError, match="activation"):
        Transformer(**SMALL, activation="tanh")
    with pytest.raises(TypeError, match="unexpected"):
        Transformer(**SMALL, dmodel=3)
    with pytest.raises(RuntimeError, match="batch size"):
        b(torch.randn(5, 2, 16), torch.randn(5, 3, 16))
