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


def _naive_beam(m, src, beam_size, max_len):
    """The beam search before the shared keys: each hypothesis gets its own copy of the encoder
    states and keys (and the keys are recomputed per sentence), one decoder call per step."""
    c = m.config
    results = []
    for b in range(src.shape[0]):
        enc, final, pad = m.encoder(src[b : b + 1])
        state = m.decoder.init_state(final)
        hyps, scores, finished = [[]], torch.zeros(1, dtype=torch.float64), []
        for _ in range(max_len):
            k = len(hyps)
            keys = m.decoder.attention.project_keys(enc.repeat(k, 1, 1))  # (k, S, A): a copy each
            y = torch.tensor([h[-1] if h else c.bos_id for h in hyps])
            logits, state, _ = m.decoder.step(y, state, enc.repeat(k, 1, 1), keys, pad.repeat(k, 1))
            cand = (scores[:, None] + torch.log_softmax(logits.float(), -1)).flatten()
            top, idx = cand.topk(min(2 * beam_size, cand.numel()))
            rows, new_hyps, new_scores = [], [], []
            for score, i in zip(top.tolist(), idx.tolist(), strict=True):
                row, tok = divmod(i, logits.shape[-1])
                if tok == c.eos_id:
                    finished.append((score / (len(hyps[row]) + 1), hyps[row]))
                else:
                    rows.append(row)
                    new_hyps.append(hyps[row] + [tok])
                    new_scores.append(score)
                if len(new_hyps) == beam_size:
                    break
            if len(finished) >= beam_size or not new_hyps:
                break
            state = [s[torch.tensor(rows)] for s in state]
            hyps, scores = new_hyps, torch.tensor(new_scores, dtype=torch.float64)
        if not finished:
            finished = [(s / max(len(h), 1), h) for s, h in zip(scores.tolist(), hyps, strict=True)]
        results.append(max(finished, key=lambda t: t[0])[1])
    return results


@pytest.mark.parametrize("attn_backend", ["fused", "reference"])
def test_beam_search_matches_a_naive_beam_with_copied_keys(attn_backend, monkeypatch):
    """Hypotheses read one copy of their sentence's keys (no expand, no recompute) and decode
    the tokens of a beam search that copies them per hypothesis."""
    m = _model(num_layers=2, attn_backend=attn_backend).eval()
    # a spread-out output layer: hypotheses end at different steps
    torch.nn.init.normal_(m.decoder.out.weight, std=1.0)
    src, _ = _batch(B=4, S=9)
    projected = []
    real = m.decoder.attention.project_keys
    monkeypatch.setattr(
        m.decoder.attention, "project_keys", lambda h: projected.append(h.shape[0]) or real(h)
    )
    shapes = []
    real_fwd = m.decoder.attention.forward

    def spy(query, keys, *a, precomputed_keys=None, **kw):
        shapes.append((tuple(query.shape), tuple(precomputed_keys.shape), precomputed_keys.stride()))
        return real_fwd(query, keys, *a, precomputed_keys=precomputed_keys, **kw)

    monkeypatch.setattr(m.decoder.attention, "forward", spy)
    with torch.no_grad():
        got = m.beam_search(src, beam_size=3, max_len=10)
    assert projected == [4], "the keys are projected once, for the whole batch"
    # every step: k hypotheses as query rows over one sentence's (1, S, A) keys, never expanded
    assert shapes and all(k[0] == 1 and q[0] == 1 and 0 not in st for q, k, st in shapes)
    assert any(q[1] > 1 for q, _, _ in shapes)
    monkeypatch.undo()
    with torch.no_grad():
        want = _naive_beam(m, src, 3, 10)
    assert got == want


def test_seq2seq_bad_inputs():
    m = _model()
    with pytest.raises(ValueError, match="src"):
        m(torch.zeros(3, dtype=torch.long), torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="tgt"):
        m(torch.ones(3, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden_dim"):
        Seq2SeqConfig(5, 5, hidden_dim=7)
