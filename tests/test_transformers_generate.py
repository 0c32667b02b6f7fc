"""transformers causal LMs generating on pyattn (attn_implementation="pyattn"): the tokens of eager
on the same random weights (tiny configs, no download), left-padded batches, transformers'
dense (dynamic) KV cache; and which decode steps reach the KV-cache kernel."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from helpers import need

from pyattn.integrations import transformers as pt
from pyattn.ops import sdpa

transformers = need("transformers")

VOCAB, NEW = 97, 8


def _config(family: str):
    # GQA (4 query heads on 2 kv heads), 2 layers, head dim 16
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if family == "llama":
        return transformers.LlamaConfig(**common)
    return transformers.Qwen2Config(**common, use_sliding_window=False)


def _models(family: str):
    """The same random weights under eager and pyattn, in float32: transformers' eager path
    gives NaN on a left-padded float64 batch (its fully masked padding rows are NaN there, and
    0 x NaN reaches the real rows through P V), so float32 is where eager is an oracle. Two
    float32 paths differ by ~1e-6 in the logits; a near-tie that flips a token is ~1e-5 likely."""
    pt.register()
    cls = transformers.LlamaForCausalLM if family == "llama" else transformers.Qwen2ForCausalLM
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    eager = cls._from_config(_config(family), attn_implementation="eager").eval()
    ours = cls._from_config(_config(family), attn_implementation="pyattn").eval()
    ours.load_state_dict(eager.state_dict())
    assert ours.config._attn_implementation == "pyattn"
    return eager, ours


def _batch(B: int, T: int, padded: bool):
    ids = torch.randint(3, VOCAB, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    if padded:
        for b in range(1, B):
            n = int(torch.randint(1, T - 1, ()))  # left padding, as generation needs
            ids[b, :n], mask[b, :n] = 0, 0
    return ids, mask


def _spy_routes(monkeypatch):
    """Per attention call: (query rows, keys, a mask given, how it ran): "left-padded" (the
    integration's paged view onto the KV-cache kernel), "route" (sdpa's own route to it) or
    "prefill"."""
    seen = []
    real_route, real_left = sdpa._decode_step, pt._left_padded_decode

    def route(chosen, q, k, v, mask, dropout_p, causal, *variants):
        hit = real_route(chosen, q, k, v, mask, dropout_p, causal, *variants)
        seen.append((q.shape[2], k.shape[2], mask is not None, "route" if hit else "prefill"))
        return hit

    def left(query, key, value, mask, dropout, scaling, *variants):
        out = real_left(query, key, value, mask, dropout, scaling, *variants)
        if out is not None:
            seen.append((query.shape[2], key.shape[2], True, "left-padded"))
        return out

    monkeypatch.setattr(sdpa, "_decode_step", route)
    monkeypatch.setattr(pt, "_left_padded_decode", left)
    return seen


def _generate(model, ids, mask):
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
            num_beams=1, pad_token_id=0,
        )  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("padded", [True, False])
def test_generate_on_pyattn_gives_eager_tokens(family, padded, monkeypatch):
    eager, ours = _models(family)
    ids, mask = _batch(3, 12, padded)
    want = _generate(eager, ids, mask)
    # the route's key bound, lowered so that this tiny model's short caches qualify
    monkeypatch.setattr(sdpa, "DECODE_MIN_KEYS", 1)
    seen = _spy_routes(monkeypatch)
    got = _generate(ours, ids, mask)
    assert want.shape == (3, 12 + NEW)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    layers = ours.config.num_hidden_layers
    prefill, decode = seen[:layers], seen[layers:]
    assert len(decode) == (NEW - 1) * layers and all(lq == 1 for lq, *_ in decode)
    assert all(how == "prefill" for *_, how in prefill)
    # every decode step runs the KV-cache kernel: a padded batch's steps carry the padding as a
    # mask, which the integration turns into a paged view (module doc of
    # pyattn/integrations/transformers.py); an unpadded batch's carry none and take sdpa's route
    want = (True, "left-padded") if padded else (False, "route")
    assert all((has_mask, how) == want for _, _, has_mask, how in decode), decode


def test_left_padded_decode_step_matches_the_reference():
    """The paged view of a left-padded step on its own, GQA, against the float64 reference sdpa
    with the mask; a mask that is not left padding alone is left to the sdpa path."""
    from helpers import assert_close_to_ref

    from pyattn import reference

    B, Hq, Hkv, Lk, D = 3, 8, 2, 300, 32
    # K and V slices of (B, L, H, D) buffers: strided, as a static cache's views are
    kbuf, vbuf = (torch.randn(B, Lk + 9, Hkv, D, dtype=torch.float64) for _ in range(2))
    k64, v64 = (t[:, :Lk].transpose(1, 2) for t in (kbuf, vbuf))  # (B, Hkv, Lk, D)
    q64 = torch.randn(B, Hq, 1, D, dtype=torch.float64)
    start = torch.tensor([0, int(torch.randint(1, Lk - 1, ())), Lk - 1])
    mask = (torch.arange(Lk)[None, :] >= start[:, None])[:, None, None, :]  # (B, 1, 1, Lk)
    ref64 = reference.scaled_dot_product_attention(q64, k64, v64, mask, scale=0.2, enable_gqa=True)
    q = q64.float()
    k, v = (t.float()[:, :Lk].transpose(1, 2) for t in (kbuf, vbuf))  # the same layout in float32
    ref32 = reference.scaled_dot_product_attention(q, k, v, mask, scale=0.2, enable_gqa=True)
    out = pt._left_padded_decode(q, k, v, mask, 0.0, 0.2)
    assert out is not None
    assert_close_to_ref("left-padded decode", out, ref32, ref64)
    holes = mask.clone()
    # a hole among row 0's keys (it has no padding, so the hole is never in padding already: a
    # hole at a fixed position of row 1 fell inside its random padding for 3 starts in 297)
    holes[0, 0, 0, Lk // 2] = False
    assert pt._left_padded_decode(q, k, v, holes, 0.0, 0.2) is None
    assert pt._left_padded_decode(q, k, v, mask, 0.1, 0.2) is None  # dropout
    # K and V in different layouts cannot share one block table
    assert pt._left_padded_decode(q, k, v.contiguous(), mask, 0.0, 0.2) is None


def test_left_padded_decode_step_takes_the_layers_variants():
    """A sliding-window / softcap / sinks layer (Mistral, Gemma 2, gpt-oss) on the left-padded
    route: the KV-cache kernel gets the layer's variants, and the step equals the reference sdpa
    with the padding mask and the same variants."""
    from helpers import assert_close_to_ref

    from pyattn import reference

    B, Hq, Hkv, Lk, D = 3, 4, 2, 96, 16
    k64, v64 = (torch.randn(B, Hkv, Lk, D, dtype=torch.float64) for _ in range(2))
    q64 = torch.randn(B, Hq, 1, D, dtype=torch.float64)
    sinks64 = torch.randn(Hq, dtype=torch.float64)
    start = torch.tensor([0, 40, Lk - 3])
    mask = (torch.arange(Lk)[None, :] >= start[:, None])[:, None, None, :]  # (B, 1, 1, Lk)
    var = dict(window_size=(31, 0), softcap=5.0)
    ref64 = reference.scaled_dot_product_attention(
        q64, k64, v64, mask, scale=0.3, enable_gqa=True, sinks=sinks64, **var
    )
    q, k, v, sinks = (t.float() for t in (q64, k64, v64, sinks64))
    ref32 = reference.scaled_dot_product_attention(
        q, k, v, mask, scale=0.3, enable_gqa=True, sinks=sinks, **var
    )
    out = pt._left_padded_decode(q, k, v, mask, 0.0, 0.3, (31, 0), 5.0, sinks)
    assert out is not None
    assert_close_to_ref("left-padded decode with variants", out, ref32, ref64)
