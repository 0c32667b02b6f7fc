"""pyattn.models.bert against Hugging Face transformers (random init, no download), padded and
padding-free (the real tokens only; padding positions are zeros there)."""

from __future__ import annotations

import pytest
import torch

from pyattn.models import _packing
from pyattn.models.bert import BertConfig, BertForPreTraining, BertModel

transformers = pytest.importorskip("transformers")

TIGHT = {"rtol": 1e-9, "atol": 1e-10}
SMALL = {
    "vocab_size": 50,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 32,
    "type_vocab_size": 2,
}


def _hf(cls_name="BertModel", **kw):
    cfg = transformers.BertConfig(**SMALL, **kw)
    cfg._attn_implementation = "eager"
    model = getattr(transformers, cls_name)(cfg).double().eval()
    return cfg, model


def _inputs(B=3, L=9):
    ids = torch.randint(1, SMALL["vocab_size"], (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    for b in range(1, B):
        n = int(torch.randint(1, L, ()))  # at least one real token per sequence
        mask[b, n:] = 0
    types = torch.randint(0, 2, (B, L))
    return ids, mask, types


def _real(h, mask):
    """The real tokens' rows (T, H) of a (B, L, H) output."""
    return h[mask.bool()]


@pytest.mark.parametrize("padding_free", [True, False])
@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_bert_matches_transformers(hidden_act, padding_free):
    cfg, hf = _hf(hidden_act=hidden_act)
    ours = BertModel(BertConfig.from_dict({**cfg.to_dict(), "padding_free": padding_free})).double().eval()
    ours.load_state_dict(hf.state_dict())
    ids, mask, types = _inputs()
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    out = ours(ids, attention_mask=mask, token_type_ids=types)
    if padding_free:
        # only real tokens are computed; HF's padding rows are values nothing reads
        torch.testing.assert_close(
            _real(out.last_hidden_state, mask), _real(ref.last_hidden_state, mask), **TIGHT
        )
        assert not out.last_hidden_state[~mask.bool()].any()
    else:
        torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, **TIGHT)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, **TIGHT)
    # No mask and no token types: defaults agree too.
    torch.testing.assert_close(ours(ids).last_hidden_state, hf(input_ids=ids).last_hidden_state, **TIGHT)


def test_bert_state_dict_variants_load():
    cfg, hf = _hf("BertForPreTraining")
    sd = hf.state_dict()
    # A pretraining checkpoint ("bert." prefix, cls.* heads) into a BertModel.
    bare = BertModel(BertConfig.from_dict(cfg.to_dict()))
    result = bare.load_state_dict(dict(sd))
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(
        bare.embeddings.word_embeddings.weight, sd["bert.embeddings.word_embeddings.weight"].float()
    )
    # Legacy gamma/beta names.
    legacy = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in hf.bert.state_dict().items()
    }
    m = BertModel(BertConfig.from_dict(cfg.to_dict()))
    assert not m.load_state_dict(legacy).missing_keys
    torch.testing.assert_close(
        m.encoder.layer[1].output.LayerNorm.bias, hf.bert.encoder.layer[1].output.LayerNorm.bias.float()
    )
    # Pretraining heads: same logits as transformers, decoder tied to the word embeddings.
    ours = BertForPreTraining(BertConfig.from_dict(cfg.to_dict())).double().eval()
    result = ours.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    ids, mask, types = _inputs()
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    out = ours(ids, mask, types)
    torch.testing.assert_close(
        _real(out.prediction_logits, mask), _real(ref.prediction_logits, mask), **TIGHT
    )
    torch.testing.assert_close(out.seq_relationship_logits, ref.seq_relationship_logits, **TIGHT)


def test_bert_from_pretrained(tmp_path):
    cfg, hf = _hf()
    hf.float().save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ours = BertModel.from_pretrained(str(tmp_path))
    ids, mask, types = _inputs(2, 6)
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    out = ours(ids, mask, types)
    torch.testing.assert_close(
        _real(out.last_hidden_state, mask), _real(ref.last_hidden_state, mask), rtol=1e-4, atol=1e-5
    )
    # pytorch_model.bin works too.
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours2 = BertModel.from_pretrained(str(tmp_path), attn_backend="reference")
    assert ours2.config.attn_backend == "reference"
    torch.testing.assert_close(ours2(ids, mask, types).pooler_output, ref.pooler_output, rtol=1e-4, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="config.json"):
        BertModel.from_pretrained(str(tmp_path / "nowhere"))


def test_bert_config_presets_and_errors():
    base, large = BertConfig.base(), BertConfig.large()
    assert (base.num_hidden_layers, base.hidden_size, base.num_attention_heads) == (12, 768, 12)
    assert (large.num_hidden_layers, large.hidden_size, large.num_attention_heads) == (24, 1024, 16)
    assert (
        BertConfig.from_dict(
            {"hidden_size": 64, "num_attention_heads": 4, "architectures": ["X"]}
        ).hidden_size
        == 64
    )
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="attn_backend"):
        BertConfig(attn_backend="fast")
    m = BertModel(BertConfig(**SMALL), add_pooling_layer=False)
    assert m(torch.randint(0, 50, (2, 5))).pooler_output is None
    with pytest.raises(ValueError, match="attention_mask"):
        m(torch.randint(0, 50, (2, 5)), attention_mask=torch.ones(2, 4))


def _count_varlen(monkeypatch):
    """Count the packed attention calls of the models (pyattn/models/_packing.py)."""
    calls = []
    real = _packing.varlen_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(_packing, "varlen_attention", counting)
    return calls


@pytest.mark.parametrize("attn_backend", ["fused", "reference"])
def test_bert_padding_free_gradients_match_transformers(attn_backend, monkeypatch):
    """Same weights, a padding mask with lengths 1 .. L and holes: the packed path's outputs on
    real tokens and every parameter's gradient equal HF's (eager) in float64."""
    calls = _count_varlen(monkeypatch)
    cfg, hf = _hf()
    ours = BertModel(BertConfig.from_dict({**cfg.to_dict(), "attn_backend": attn_backend})).double().eval()
    ours.load_state_dict(hf.state_dict())
    B, L = 4, 9
    ids, types = torch.randint(1, SMALL["vocab_size"], (B, L)), torch.randint(0, 2, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 1:] = 0  # length 1
    mask[2, int(torch.randint(2, L, ())) :] = 0
    mask[3, torch.randint(1, L, (3,))] = 0  # holes; position 0 (the pooler's) stays real
    w = torch.randn(B, L, SMALL["hidden_size"], dtype=torch.float64) * mask[..., None]
    outs, grads = [], []
    for model in (hf, ours):
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        objective = (out.last_hidden_state * w).sum() + out.pooler_output.sum()
        outs.append(_real(out.last_hidden_state, mask))
        grads.append(dict(zip([n for n, _ in model.named_parameters()],
                              torch.autograd.grad(objective, list(model.parameters())), strict=True)))  # fmt: skip
    assert len(calls) == SMALL["num_hidden_layers"] and calls[0][0] == int(mask.sum())
    torch.testing.assert_close(outs[1], outs[0], **TIGHT)
    for name, g in grads[1].items():
        torch.testing.assert_close(g, grads[0][name], **TIGHT, msg=lambda m, n=name: f"grad {n}: {m}")


def test_bert_no_padding_takes_the_padded_path(monkeypatch):
    calls = _count_varlen(monkeypatch)
    model = BertModel(BertConfig(**SMALL)).eval()
    ids = torch.randint(1, SMALL["vocab_size"], (2, 7))
    out = model(ids, attention_mask=torch.ones(2, 7, dtype=torch.long)).last_hidden_state
    assert not calls
    model.config.padding_free = False
    torch.testing.assert_close(out, model(ids).last_hidden_state, rtol=0, atol=0)


def test_bert_forward_packed_matches_forward():
    """forward_packed on packed ids (positions within each sequence, an empty sequence too)
    gives forward's real rows; its pooler reads each sequence's first token."""
    model = BertModel(BertConfig(**SMALL)).double().eval()
    lengths = [5, 0, 1, 8]
    B, L = len(lengths), max(lengths)
    ids, types = torch.randint(1, SMALL["vocab_size"], (B, L)), torch.randint(0, 2, (B, L))
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]  # (B, L) right padding
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = model.forward_packed(ids[mask], cu, L, types[mask])
    padded = model(ids, attention_mask=mask.long(), token_type_ids=types)
    torch.testing.assert_close(packed.last_hidden_state, padded.last_hidden_state[mask], **TIGHT)
    real = torch.tensor(lengths) > 0
    torch.testing.assert_close(packed.pooler_output[real], padded.pooler_output[real], **TIGHT)
    assert not packed.pooler_output[~real].any()
    with pytest.raises(ValueError, match="input_ids"):
        model.forward_packed(ids, cu, L)
