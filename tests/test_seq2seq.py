"""pyattn.models.seq2seq: shapes, masking, encoder padding invariance, decoding consistency."""

from __future__ import annotations

import pytest
import torch

from pyattn.models.seq2seq import Seq2Seq, Seq2SeqConfig

TIGHT = {"rtol": 1e-9, "atol": 1e-10}


def _model(**kw):
    c = Seq2SeqConfig(src_vocab_size=20, tgt_vocab_size=23, embed_dim=8, hidden_dim=16, attn_dim=12, **kw)
    return Seq2Seq(c).double()


def _batch(B=3, S=7, T=6, pad=0):
    src = torch.randint(3, 20, (B, S))
    for b in range(1, B):
        src[b, int(torch.randint(1, S, ())) :] = pad
    tgt = torch.randint(3, 23, (B, T))
    tgt[:, 0] = 1
    return src, tgt


@pytest.mark.parametrize("num_layers", [1, 2])
def test_forward_shapes_and_attention_masking(num_layers):
    m = _model(num_layers=num_layers)
    src, tgt = _batch()
    out = m(src, tgt)
    assert out.logits.shape == (3, 5, 23) and out.attention.shape == (3, 5, 7)
    pad = (src == 0)[:, None, :].expand_as(out.attention)
    assert (out.attention[pad] == 0).all()
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(3, 5, dtype=torch.float64), **TIGHT)
    loss = m.loss(out, tgt)
    loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "embedding" not in n)
    # Teacher forcing ratio 0 feeds back predictions: a different but well-formed output.
    assert m(src, tgt, teacher_forcing_ratio=0.0).logits.shape == out.logits.shape


def test_encoder_ignores_padding():
    """Extra padding changes nothing at real positions (the backward GRU reads within length)."""
    m = _model(num_layers=2).eval()
    src, _ = _batch()
    enc, final, pad = m.encoder(src)
    enc2, final2, _ = m.encoder(torch.cat([src, torch.zeros(3, 4, dtype=torch.long)], 1))
    torch.testing.assert_close(enc2[:, :7][~pad], enc[~pad], **TIGHT)
    torch.testing.assert_close(final2, final, **TIGHT)
    # And matches an unpadded run of each sentence alone.
    for b in range(3):
        n = int((~pad[b]).sum())
        e1, f1, _ = m.encoder(src[b : b + 1, :n])
        torch.testing.assert_close(e1[0], enc[b, :n], **TIGHT)
        torch.testing.assert_close(f1[0], final[b], **TIGHT)


def test_greedy_decode_is_consistent_with_forward():
    m = _model().eval()
    src, _ = _batch()
    tokens, attn = m.greedy_decode(src, max_len=8)
    B, L = tokens.shape
    assert L <= 8 and attn.shape == (B, L, 7)
    out = m(src, torch.cat([torch.full((B, 1), 1), tokens], 1))
    for b in range(B):
        eos = (tokens[b] == 2).nonzero()
        n = int(eos[0]) + 1 if len(eos) else L
        assert (tokens[b, n:] == 0).all()
        assert torch.equal(out.logits[b, :n].argmax(-1), tokens[b, :n])
        torch.testing.assert_close(out.attention[b, :n], attn[b, :n], **TIGHT)


def test_beam_search_size_one_is_greedy():
    m = _model().eval()
    src, _ = _batch()
    tokens, _ = m.greedy_decode(src, max_len=6)
    beams = m.beam_search(src, beam_size=1, max_len=6)
    for b, hyp in enumerate(beams):
        row = tokens[b].tolist()
        greedy = row[: row.index(2)] if 2 in row else row
        assert hyp == greedy[: len(hyp)] and (len(hyp) == len(greedy))
    wide = m.beam_search(src, beam_size=3, max_len=6)
    assert len(wide) == 3 and all(isinstance(t, int) and t != 2 for h in wide for t in h)


def test_seq2seq_bad_inputs():
    m = _model()
    with pytest.raises(ValueError, match="src"):
        m(torch.zeros(3, dtype=torch.long), torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="tgt"):
        m(torch.ones(3, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden_dim"):
        Seq2SeqConfig(5, 5, hidden_dim=7)
