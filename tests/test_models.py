"""The attn_backend switch of every model: the same weights through "fused" (pyattn's best
backend) and "reference" give the same outputs, parameter gradients (tests/helpers.py rule,
float64 reference) and training losses step by step; torch.compile(fullgraph=True) compiles
each model's forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from helpers import assert_close_to_ref

from pyattn.models import BertConfig, BertForPreTraining, BertModel, Seq2Seq, Seq2SeqConfig, Transformer

pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor", "ignore:Support for mismatched")


def _transformer(dropout=0.0, layers=2):
    return Transformer(
        d_model=16, nhead=4, num_encoder_layers=layers, num_decoder_layers=layers, dim_feedforward=32,
        dropout=dropout, batch_first=True,
    )  # fmt: skip


def _bert(dropout=0.0, layers=2):
    return BertModel(
        BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=dropout,
                   attention_probs_dropout_prob=dropout)
    )  # fmt: skip


def _seq2seq(dropout=0.0, layers=2):
    return Seq2Seq(
        Seq2SeqConfig(20, 23, embed_dim=8, hidden_dim=16, attn_dim=12, num_layers=layers, dropout=dropout)
    )


def _padding(B, L):
    pad = torch.rand(B, L) < 0.3
    pad[:, 0] = False
    return pad


def _inputs(kind, B=3, T=6):
    """Model inputs (a dict of kwargs) and a function of the output to differentiate."""
    if kind == "transformer":
        S, T = 7, 5
        kw = {
            "src": torch.randn(B, S, 16),
            "tgt": torch.randn(B, T, 16),
            "tgt_mask": Transformer.generate_square_subsequent_mask(T),
            "tgt_is_causal": True,
            "src_key_padding_mask": _padding(B, S),
        }
        kw["memory_key_padding_mask"] = kw["src_key_padding_mask"]
        w = torch.randn(B, T, 16)
        return kw, lambda out: (out * w.to(out.dtype)).sum()
    if kind == "bert":
        L = 9
        mask = (~_padding(B, L)).long()
        kw = {"input_ids": torch.randint(1, 40, (B, L)), "attention_mask": mask,
              "token_type_ids": torch.randint(0, 2, (B, L))}  # fmt: skip
        w = torch.randn(B, L, 32)
        return (
            kw,
            lambda out: (
                (out.last_hidden_state * w.to(out.last_hidden_state.dtype)).sum() + out.pooler_output.sum()
            ),
        )
    src = torch.randint(3, 20, (B, 7))
    src[1:, 4:] = 0
    tgt = torch.randint(3, 23, (B, T))
    tgt[:, 0] = 1
    w = torch.randn(B, T - 1, 23)
    return {
        "src": src,
        "tgt": tgt,
    }, lambda out: (out.logits * w.to(out.logits.dtype)).sum() + out.attention.square().sum()


def _cast(kw, dtype):
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}


BUILDERS = {"transformer": _transformer, "bert": _bert, "seq2seq": _seq2seq}


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_fused_and_reference_paths_agree(kind):
    model = BUILDERS[kind]().eval()
    model64 = copy.deepcopy(model).double()
    model64.set_attn_backend("reference")
    kw, objective = _inputs(kind)
    results = {}
    for name in ("fused", "reference"):
        model.set_attn_backend(name)
        out = model(**kw)
        grads = torch.autograd.grad(objective(out), list(model.parameters()), allow_unused=True)
        results[name] = (objective(out).detach(), grads)
    out64 = model64(**_cast(kw, torch.float64))
    g64 = torch.autograd.grad(objective(out64), list(model64.parameters()), allow_unused=True)
    assert_close_to_ref("objective", results["fused"][0], results["reference"][0], objective(out64).detach())
    for (pname, _), gf, gr, g in zip(
        model.named_parameters(), results["fused"][1], results["reference"][1], g64, strict=True
    ):
        if g is None:
            assert gf is None and gr is None
            continue
        assert_close_to_ref(f"grad {pname}", gf, gr, g, factor=3.0)


def _train_losses(kind, backend, seed, steps=3):
    torch.manual_seed(seed)
    model = BUILDERS[kind](dropout=0.1).double().train()
    # Attention dropout off: the fused kernels draw their own (Philox) masks, the reference
    # draws from torch's generator, so only hidden dropout can be shared step by step.
    for m in model.modules():
        if hasattr(m, "in_proj_bias"):
            m.dropout = 0.0
        if hasattr(m, "dropout_p"):
            m.dropout_p = 0.0
    model.set_attn_backend(backend)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        kw, objective = _inputs(kind)
        kw = _cast(kw, torch.float64)
        out = model(**kw)
        if kind == "seq2seq":
            loss = model.loss(out, kw["tgt"])
        else:
            loss = objective(out).square() * 1e-3
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_training_steps_agree_across_backends(kind):
    """From one seed, with hidden dropout on, the losses agree step by step (float64)."""
    seed = int(torch.randint(0, 2**31, ()))
    fused = _train_losses(kind, "fused", seed)
    ref = _train_losses(kind, "reference", seed)
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(ref), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_torch_compile_fullgraph(kind):
    torch._dynamo.reset()
    # One layer and three target steps: compile time grows with every unrolled layer and step.
    model = BUILDERS[kind](layers=1).eval()
    kw, objective = _inputs(kind, B=2, T=3)
    eager = objective(model(**kw))
    # nn.GRU is traced only with allow_rnn (the seq2seq encoder).
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        out = objective(compiled(**kw))
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_bert_for_pretraining_backward_through_both_paths():
    cfg = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    model = BertForPreTraining(cfg).double()
    ids = torch.randint(1, 40, (2, 8))
    labels = torch.where(torch.rand(2, 8) < 0.3, ids, torch.full_like(ids, -100))
    labels[:, 0] = ids[:, 0]
    losses = []
    for name in ("fused", "reference"):
        model.set_attn_backend(name)
        losses.append(model(ids, labels=labels, next_sentence_label=torch.tensor([0, 1])).loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-9, atol=1e-10)
