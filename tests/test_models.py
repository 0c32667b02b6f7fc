"""The attn_backend switch of every model: the same weights through "fused" (pyattn's best
backend) and "reference" give the same outputs, parameter gradients (tests/helpers.py rule,
float64 reference) and training losses step by step; torch.compile(fullgraph=True) compiles
each model's forward. The padding-free paths of BERT and the Transformer against their padded
paths (same real-token outputs and gradients, dropout draws included), and their packed entry
points under torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from helpers import assert_close_to_ref

import pyattn.models._packing as _packing
from pyattn.models import BertConfig, BertForPreTraining, BertModel, Seq2Seq, Seq2SeqConfig, Transformer
from pyattn.ops.errors import InputError

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


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_attn_backend_takes_the_ops_backend_names(kind):
    """One vocabulary: a model's attn_backend takes the ops' backend names ("cpu" here is what
    "fused" picks on CPU tensors: the same numbers); anything else is refused by name."""
    model = BUILDERS[kind]().eval()
    kw, objective = _inputs(kind)
    with torch.no_grad():
        model.set_attn_backend("fused")
        fused = objective(model(**kw))
        model.set_attn_backend("cpu")
        assert model.config.attn_backend == "cpu"
        torch.testing.assert_close(objective(model(**kw)), fused, rtol=0, atol=0)
    with pytest.raises(InputError, match=r"attn_backend must be one of 'fused', 'cpu', .*got 'gpu'"):
        model.set_attn_backend("gpu")


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


# -- padding-free (packed) paths of BERT and the Transformer ----------------------------------------


def _lengths(B, L):
    """B lengths in [1, L] with 1 and L among them (right padding)."""
    lengths = torch.randint(1, L + 1, (B,))
    lengths[0], lengths[1] = L, 1
    return lengths


def _packable_inputs(kind, B=4, L=9, hole=True):
    """Padded inputs, the (B, T_out) real-token mask of the output and an objective that reads
    only real tokens (the padded path's padding rows are values nothing else reads)."""
    if kind == "bert":
        keep = torch.arange(L)[None] < _lengths(B, L)[:, None]  # (B, L)
        if hole:
            keep[2, int(torch.randint(1, L, ()))] = False  # position 0 (the pooler's) stays real
        kw = {"input_ids": torch.randint(1, 40, (B, L)), "attention_mask": keep.long(),
              "token_type_ids": torch.randint(0, 2, (B, L))}  # fmt: skip
        w = torch.randn(B, L, 32) * keep[..., None]
        return (
            kw,
            keep,
            lambda out: (
                (out.last_hidden_state * w.to(out.last_hidden_state.dtype)).sum() + (out.pooler_output.sum())
            ),
        )
    S, T = L, L - 2
    src_pad = torch.arange(S)[None] >= _lengths(B, S)[:, None]  # (B, S)
    tgt_pad = torch.arange(T)[None] >= _lengths(B, T)[:, None]  # (B, T)
    kw = {"src": torch.randn(B, S, 16), "tgt": torch.randn(B, T, 16),
          "tgt_mask": Transformer.generate_square_subsequent_mask(T), "tgt_is_causal": True,
          "src_key_padding_mask": src_pad, "memory_key_padding_mask": src_pad,
          "tgt_key_padding_mask": tgt_pad}  # fmt: skip
    w = torch.randn(B, T, 16) * (~tgt_pad)[..., None]
    return kw, ~tgt_pad, lambda out: (out * w.to(out.dtype)).sum()


def _set_padding_free(model, on: bool):
    model.config.padding_free = on


def _run(model, kw, objective):
    out = model(**kw)
    obj = objective(out)
    params = [p for p in model.parameters() if p.requires_grad]
    return out, obj.detach(), torch.autograd.grad(obj, params, allow_unused=True)


def _hidden(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


@pytest.mark.parametrize("attn_backend", ["fused", "reference"])
@pytest.mark.parametrize("kind", ["bert", "transformer"])
def test_padding_free_matches_padded_path(kind, attn_backend, monkeypatch):
    """float32, lengths 1 .. L (and a hole): the packed path's real-token outputs and every
    parameter's gradient are the padded path's under the tests/helpers.py rule (float64 truth:
    the padded path on the reference backend); padding positions are zeros."""
    calls = []
    real_varlen = _packing.varlen_attention
    monkeypatch.setattr(_packing, "varlen_attention", lambda *a, **k: calls.append(1) or real_varlen(*a, **k))
    model = BUILDERS[kind]().eval()
    model.set_attn_backend(attn_backend)
    model64 = copy.deepcopy(model).double()
    model64.set_attn_backend("reference")
    _set_padding_free(model64, False)
    kw, keep, objective = _packable_inputs(kind)
    _set_padding_free(model, False)
    out_pad, obj_pad, g_pad = _run(model, kw, objective)
    assert not calls
    _set_padding_free(model, True)
    out, obj, g = _run(model, kw, objective)
    assert calls, "the packed path was not taken"
    out64, obj64, g64 = _run(model64, _cast(kw, torch.float64), objective)
    assert not _hidden(out)[~keep].any()
    assert_close_to_ref("real tokens", _hidden(out)[keep], _hidden(out_pad)[keep], _hidden(out64)[keep])
    assert_close_to_ref("objective", obj, obj_pad, obj64)
    for (name, _), a, b, c in zip(model.named_parameters(), g, g_pad, g64, strict=True):
        assert_close_to_ref(f"grad {name}", a, b, c, factor=3.0)


@pytest.mark.parametrize("kind", ["bert", "transformer"])
def test_padding_free_without_padding_is_the_padded_path(kind, monkeypatch):
    calls = []
    monkeypatch.setattr(_packing, "varlen_attention", lambda *a, **k: calls.append(1))
    model = BUILDERS[kind]().eval()
    kw, keep, objective = _packable_inputs(kind)
    for k in list(kw):
        if k.endswith("padding_mask"):
            kw[k] = torch.zeros_like(kw[k])
        elif k == "attention_mask":
            kw[k] = torch.ones_like(kw[k])
    out = _hidden(model(**kw))
    assert not calls
    _set_padding_free(model, False)
    torch.testing.assert_close(out, _hidden(model(**kw)), rtol=0, atol=0)


@pytest.mark.parametrize("attn_backend", ["fused", "reference"])
@pytest.mark.parametrize("kind", ["bert", "transformer"])
def test_padding_free_attention_dropout_matches_padded_path(kind, attn_backend):
    """Training mode with attention dropout (hidden dropout off: its draws depend on how many
    rows there are), right padding: from one seed the packed path draws the padded path's
    dropout mask (max_seqlen is the padded length, and a token's position in its sequence is its
    padded position), so outputs and gradients agree in float64."""
    model = BUILDERS[kind](dropout=0.3).double().train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.set_attn_backend(attn_backend)
    kw, keep, objective = _packable_inputs(kind, hole=False)
    kw = _cast(kw, torch.float64)
    seed = int(torch.randint(0, 2**31, ()))
    results = []
    for on in (False, True):
        _set_padding_free(model, on)
        torch.manual_seed(seed)
        out, obj, g = _run(model, kw, objective)
        results.append((_hidden(out)[keep], obj, g))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-9, atol=1e-10)
    for a, b in zip(results[1][2], results[0][2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # and dropout is on: a different seed gives different outputs
    torch.manual_seed(seed + 1)
    assert not torch.allclose(_hidden(model(**kw))[keep], results[1][0])


def test_padding_free_hidden_dropout_trains():
    """Hidden and attention dropout on: a training step on packed tokens runs, padding stays
    zero, and the dropout masks differ from step to step."""
    model = _bert(dropout=0.2).train()
    kw, keep, objective = _packable_inputs("bert")
    a = model(**kw).last_hidden_state
    b = model(**kw).last_hidden_state
    assert not a[~keep].any() and not b[~keep].any()
    assert not torch.allclose(a[keep], b[keep])
    objective(model(**kw)).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.encoder.parameters())


@pytest.mark.parametrize("kind", ["bert", "transformer"])
def test_forward_packed_compiles_fullgraph(kind):
    """The packed entry points (cu_seqlens and max_seqlen given: no data-dependent unpadding
    inside) compile with fullgraph=True and match eager, and eager matches the padded forward
    on real tokens."""
    torch._dynamo.reset()
    model = BUILDERS[kind](layers=1).eval()
    B, L = 3, 6
    lengths = _lengths(B, L)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    keep = torch.arange(L)[None] < lengths[:, None]  # (B, L)
    if kind == "bert":
        ids = torch.randint(1, 40, (B, L))
        args = (ids[keep], cu, L)
        padded = model(ids, attention_mask=keep.long()).last_hidden_state[keep]
    else:
        src, tgt = torch.randn(B, L, 16), torch.randn(B, L, 16)
        args = (src[keep], tgt[keep], cu, L, cu, L, False, True)
        padded = model(src, tgt, tgt_mask=Transformer.generate_square_subsequent_mask(L), tgt_is_causal=True,
                       src_key_padding_mask=~keep, memory_key_padding_mask=~keep,
                       tgt_key_padding_mask=~keep)[keep]  # fmt: skip
    eager = _hidden(model.forward_packed(*args))
    torch.testing.assert_close(eager, padded, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(model.forward_packed, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(_hidden(compiled(*args)), eager, rtol=1e-5, atol=1e-5)
