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
    """Each CPU sdpa call's routing decision: (query rows, keys, sent to the KV-cache kernel)."""
    seen = []
    real = sdpa._decode_step

    def spy(chosen, q, k, v, mask, dropout_p, causal):
        hit = real(chosen, q, k, v, mask, dropout_p, causal)
        seen.append((q.shape[2], k.shape[2], mask is not None, hit))
        return hit

    monkeypatch.setattr(sdpa, "_decode_step", spy)
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
    assert not any(hit for *_, hit in prefill)
    if padded:
        # transformers passes the padding as a mask to every decode step, and the KV-cache
        # kernel takes none (docs/design.md, "KV-cache attention"): those steps stay on the
        # prefill kernel
        assert all(has_mask and not hit for _, _, has_mask, hit in decode)
    else:
        # no padding: no mask at decode, and every step runs the KV-cache kernel
        assert all(not has_mask and hit for _, _, has_mask, hit in decode)
