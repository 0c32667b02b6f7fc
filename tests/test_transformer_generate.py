"""Transformer.generate: decoding with the KV cache gives the tokens of cache-free decoding (greedy
and beam search, padded sources, both attention backends), its logits meet the tolerance rule
against the float64 reference run teacher-forced on the same tokens, and the cached path really
appends through pyattn.kvcache_attention."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_to_ref
from torch import nn

from pyattn.models import transformer as transformer_mod
from pyattn.models.transformer import Transformer

SMALL = {"d_model": 16, "nhead": 4, "num_encoder_layers": 2, "num_decoder_layers": 2, "dim_feedforward": 32}
V, BOS, EOS, PAD = 13, 1, 2, 0

pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor")


class Embed(nn.Module):
    """Token + learned position embeddings: ``embed(tokens (N, t), start) -> (N, t, E)``."""

    def __init__(self, vocab: int, d: int, max_len: int = 64, dtype=None) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d, dtype=dtype)
        self.pos = nn.Parameter(torch.randn(max_len, d, dtype=dtype))

    def forward(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        return self.tok(tokens) + self.pos[start : start + tokens.shape[1]]


def _model(dtype=torch.float64, **kwargs):
    model = Transformer(**SMALL, dropout=0.0, dtype=dtype, **kwargs).eval()
    embed = Embed(V, SMALL["d_model"], dtype=dtype).eval()
    # a large head spreads the logits: sequences end at different steps, not all at once
    head = nn.Linear(SMALL["d_model"], V, dtype=dtype)
    nn.init.normal_(head.weight, std=2.0)
    return model, embed, head


def _source(B, S, batch_first, dtype=torch.float64, padded=True):
    src = torch.randn(B, S, SMALL["d_model"], dtype=dtype)  # (B, S, E)
    pad = None
    if padded:
        lengths = torch.randint(1, S + 1, (B,))
        lengths[0] = S  # one full row; the others padded at random
        pad = torch.arange(S)[None, :] >= lengths[:, None]  # (B, S), True = padding
    return (src if batch_first else src.transpose(0, 1)), pad


def _count_kvcache(monkeypatch):
    calls = []
    real = transformer_mod.kvcache_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformer_mod, "kvcache_attention", counting)
    return calls


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize(
    ("norm_first", "batch_first", "attn_backend"),
    [(False, False, "fused"), (True, True, "fused"), (False, True, "reference")],
)
def test_generate_cache_gives_cache_free_tokens(
    num_beams, norm_first, batch_first, attn_backend, monkeypatch
):
    calls = _count_kvcache(monkeypatch)
    model, embed, head = _model(norm_first=norm_first, batch_first=batch_first, attn_backend=attn_backend)
    src, pad = _source(4, 7, batch_first)
    kw = dict(
        bos_id=BOS, eos_id=EOS, pad_id=PAD, max_new_tokens=10, src_key_padding_mask=pad, num_beams=num_beams
    )
    # float64: a near-tie between two tokens would take a rounding difference to flip
    cached = model.generate(src, embed, head, **kw)
    steps = len(calls)
    free = model.generate(src, embed, head, use_cache=False, **kw)
    assert len(calls) == steps, "use_cache=False must not touch a cache"
    torch.testing.assert_close(cached, free, rtol=0, atol=0)
    # one append per decoder layer and step, on the model's backend
    assert steps % SMALL["num_decoder_layers"] == 0 and steps >= SMALL["num_decoder_layers"]
    want = None if attn_backend == "fused" else "reference"
    assert set(calls) == {want}
    assert cached.dtype == torch.long and cached.shape[0] == 4 and cached.shape[1] <= 10
    # every row: tokens, then (after its eos) padding only
    for row in cached.tolist():
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1 :])


def _teacher_forced_logits(model, embed, head, src, pad, tokens):
    """Every step's logits from one cache-free forward over bos + tokens[:, :-1] (B, L, V)."""
    B, L = tokens.shape
    inp = torch.cat([torch.full((B, 1), BOS, dtype=torch.long), tokens[:, :-1]], dim=1)  # (B, L)
    tgt = embed(inp, 0)  # (B, L, E)
    if not model.batch_first:
        tgt = tgt.transpose(0, 1)  # (L, B, E)
    mask = Transformer.generate_square_subsequent_mask(L, dtype=tgt.dtype)
    out = model(src, tgt, tgt_mask=mask, src_key_padding_mask=pad, memory_key_padding_mask=pad)
    out = out if model.batch_first else out.transpose(0, 1)  # (B, L, E)
    return head(out)  # (B, L, V)


@pytest.mark.parametrize("batch_first", [False, True])
def test_generate_logits_meet_the_tolerance_rule(batch_first):
    model, embed, head = _model(dtype=torch.float32, batch_first=batch_first)
    src, pad = _source(3, 9, batch_first, dtype=torch.float32)
    with torch.no_grad():
        tokens, logits = model.generate(
            src, embed, head, bos_id=BOS, eos_id=EOS, max_new_tokens=12, src_key_padding_mask=pad,
            return_logits=True,
        )  # fmt: skip
        assert logits.shape == (*tokens.shape, V)
        assert torch.equal(tokens[:, 0], logits[:, 0].argmax(-1))
        model.set_attn_backend("reference")
        ref32 = _teacher_forced_logits(model, embed, head, src, pad, tokens)
        m64, e64, h64 = (m.double() for m in (model, embed, head))
        ref64 = _teacher_forced_logits(m64, e64, h64, src.double(), pad, tokens)
    # rows after their eos keep decoding padding: those logits are compared as well
    assert_close_to_ref("logits", logits, ref32, ref64)


def test_generate_beams_share_the_memory_keys(monkeypatch):
    """The cross-attention reads one (B, H, S, D) copy of each source's keys for all beams."""
    from pyattn.models import transformer as tm

    seen = []
    real = tm.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((tuple(q.shape), tuple(k.shape), k.data_ptr()))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(tm, "scaled_dot_product_attention", spy)
    model, embed, head = _model(batch_first=True)
    src, pad = _source(2, 5, True)
    model.generate(
        src, embed, head, bos_id=BOS, eos_id=EOS, max_new_tokens=4, src_key_padding_mask=pad, num_beams=4
    )
    H, D = SMALL["nhead"], SMALL["d_model"] // SMALL["nhead"]
    assert seen and all(q == (2, H, 4, D) and k == (2, H, 5, D) for q, k, _ in seen)
    # the same key tensors at every step: projected once
    per_layer = {p for _, _, p in seen}
    assert len(per_layer) == SMALL["num_decoder_layers"]


def test_beam_search_of_one_beam_is_greedy():
    """The beam bookkeeping (candidates, eos, reordering the cache) with one beam is greedy."""
    model, embed, head = _model(batch_first=True)
    src, pad = _source(3, 6, True)
    kw = dict(bos_id=BOS, eos_id=EOS, max_new_tokens=9, src_key_padding_mask=pad)
    greedy = model.generate(src, embed, head, **kw)
    with torch.no_grad():
        memory = model.encoder(src, src_key_padding_mask=pad)  # (B, S, E)
        step = model._cached_step(embed, head, model._decoder_cache(memory, pad, 1, 9))
        beam = Transformer._beam(step, 3, 1, src.device, BOS, EOS, PAD, 9)
    torch.testing.assert_close(beam, greedy, rtol=0, atol=0)


def test_generate_bad_input():
    model, embed, head = _model(batch_first=True)
    src, _ = _source(2, 5, True, padded=False)
    kw = dict(bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(src, embed, head, num_beams=0, **kw)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(src, embed, head, max_new_tokens=0, **kw)
    with pytest.raises(ValueError, match="'src'"):
        model.generate(src[0], embed, head, **kw)
    with pytest.raises(ValueError, match="src_key_padding_mask"):
        model.generate(src, embed, head, src_key_padding_mask=torch.zeros(2, 4, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match="return_logits"):
        model.generate(src, embed, head, num_beams=2, return_logits=True, **kw)
