"""Training (teacher forcing), greedy translation and held-out scores of the seq2seq model."""

from __future__ import annotations

import math
import random

import torch

from .vocab import Task, batchify


def build_model(
    task: Task, embed_dim=64, hidden_dim=128, attn_dim=64, dropout=0.1, attn_backend="fused", model="seq2seq"
):
    """The Bahdanau seq2seq (``model="seq2seq"``) or the Transformer translator
    (``"transformer"``: d_model = hidden_dim, 4 heads, 2 + 2 layers, feed-forward 2 x d_model;
    it decodes with ``Transformer.generate`` and its KV cache)."""
    if model == "transformer":
        from .transformer import TransformerTranslator, TransformerTranslatorConfig

        cfg = TransformerTranslatorConfig(
            src_vocab_size=len(task.src_vocab), tgt_vocab_size=len(task.tgt_vocab), d_model=hidden_dim,
            dim_feedforward=2 * hidden_dim, dropout=dropout, attn_backend=attn_backend,
        )  # fmt: skip
        return TransformerTranslator(cfg)
    if model != "seq2seq":
        raise ValueError(f"build_model: 'model' must be 'seq2seq' or 'transformer', got {model!r}")
    from pyattn.models.seq2seq import Seq2Seq, Seq2SeqConfig

    cfg = Seq2SeqConfig(
        src_vocab_size=len(task.src_vocab),
        tgt_vocab_size=len(task.tgt_vocab),
        embed_dim=embed_dim,
        hidden_dim=hidden_dim,
        attn_dim=attn_dim,
        dropout=dropout,
        attn_backend=attn_backend,
    )
    return Seq2Seq(cfg)


def train(
    model, task: Task, steps: int, batch_size: int = 64, lr: float = 3e-3, seed: int = 0, log=None
) -> list[float]:
    """Adam with gradient clipping and cosine decay; teacher forcing. Returns the losses."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    rng = random.Random(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    pad = model.config.pad_id
    losses = []
    model.train()
    for step in range(steps):
        src, tgt = batchify(
            rng.sample(task.train, min(batch_size, len(task.train))), task.src_vocab, task.tgt_vocab
        )
        out = model(src, tgt)
        loss = torch.nn.functional.cross_entropy(
            out.logits.reshape(-1, out.logits.shape[-1]), tgt[:, 1:].reshape(-1), ignore_index=pad
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log is not None and (step + 1) % max(1, steps // 10) == 0:
            log(f"step {step + 1:5d}/{steps}  loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    model.eval()
    return losses


@torch.no_grad()
def translate(model, task: Task, sources: list[list[str]], max_len: int = 60, batch_size: int = 256):
    """Greedy translations (token lists) and attention maps (L, S) per sentence (the
    Transformer's: its last decoder layer's cross-attention, mean over heads)."""
    model.eval()
    outs, maps = [], []
    for a in range(0, len(sources), batch_size):
        chunk = [(s, []) for s in sources[a : a + batch_size]]
        src, _ = batchify(chunk, task.src_vocab, task.tgt_vocab)
        tokens, attn = model.greedy_decode(src, max_len)
        for i, (s, _) in enumerate(chunk):
            words = task.tgt_vocab.decode(tokens[i].tolist())
            outs.append(words)
            maps.append(attn[i, : len(words) + 1, : len(s) + 1].clone())  # + eos on both sides
    return outs, maps


def evaluate(model, task: Task) -> dict:
    """Exact match, and chrF / BLEU (sacrebleu) on the held-out pairs."""
    import sacrebleu

    hyps, _ = translate(model, task, [s for s, _ in task.test])
    hyp_text = [task.joiner.join(h) for h in hyps]
    ref_text = [task.joiner.join(t) for _, t in task.test]
    exact = sum(h == r for h, r in zip(hyp_text, ref_text, strict=True)) / len(ref_text)
    chrf = sacrebleu.corpus_chrf(hyp_text, [ref_text]).score
    # BLEU over characters (tokenize="char"): Korean words are long and few, word BLEU on a
    # few hundred short strings is mostly zero.
    bleu = sacrebleu.corpus_bleu(hyp_text, [ref_text], tokenize="char").score
    return {"exact_match": exact, "chrf": chrf, "bleu_char": bleu, "hyps": hyp_text, "refs": ref_text}
