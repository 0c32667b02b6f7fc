"""transformers' decoder LLM families on pyattn (``attn_implementation="pyattn"``) against
``"eager"`` on the same weights: tiny random configs (no downloads), padded batches, logits under
the test rule (float64 eager as the ground truth) and equal greedy tokens from ``generate()``
with the KV cache. And differential tests of the variants against transformers' own eager
attention functions (sliding window, Gemma 2's softcap, gpt-oss's sinks): there transformers'
eager code, not torch, is the oracle (docs/design.md, "Attention variants")."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_to_ref, need

transformers = need("transformers")

import pyattn.integrations.transformers as pt  # noqa: E402

SMALL = {
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}

# family: (config class, its extra settings). Windows of 5 keys on 12-token prompts, and a
# softcap low enough to bend random scores, so the variants change the answer.
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 5}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "gemma2": (
        "Gemma2Config",
        {"head_dim": 8, "sliding_window": 5, "attn_logit_softcapping": 0.5, "query_pre_attn_scalar": 8},
    ),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 8, "sliding_window": 5, "query_pre_attn_scalar": 8}),
    "gpt_oss": (
        "GptOssConfig",
        {"head_dim": 8, "sliding_window": 5, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "phi3": ("Phi3Config", {"sliding_window": 5, "pad_token_id": 0}),
    "falcon": (
        "FalconConfig",
        {"alibi": True, "num_kv_heads": 4, "new_decoder_architecture": False, "multi_query": False},
    ),
}


def _config(family: str):
    cls_name, extra = FAMILIES[family]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    kw = {**SMALL, **extra}
    if family == "falcon":
        kw = {"vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, **extra}
    return cls(**kw)


def _models(family: str):
    pt.register()
    config = _config(family)
    # MoE experts as plain loops: the grouped GEMM takes no float64 (the ground truth's dtype)
    extra = {"experts_implementation": "eager"} if family == "gpt_oss" else {}
    auto = transformers.AutoModelForCausalLM
    eager = auto.from_config(config, attn_implementation="eager", **extra).eval()
    ours = auto.from_config(config, attn_implementation="pyattn", **extra).eval()
    ours.load_state_dict(eager.state_dict())
    return eager, ours


def _batch(vocab: int):
    ids = torch.randint(1, vocab, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding, as generate() wants it
    return ids, mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_logits_and_greedy(family):
    eager, ours = _models(family)
    ids, mask = _batch(eager.config.vocab_size)
    with torch.no_grad():
        e32 = eager(input_ids=ids, attention_mask=mask).logits
        o32 = ours(input_ids=ids, attention_mask=mask).logits
        e64 = copy.deepcopy(eager).double()(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()  # logits at padding positions are not compared (eager's are arbitrary there)
    assert_close_to_ref(f"{family} logits", o32[keep], e32[keep], e64[keep], floor=2e-5)
    gen = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        te = eager.generate(input_ids=ids, attention_mask=mask, **gen)
        to = ours.generate(input_ids=ids, attention_mask=mask, **gen)
    assert torch.equal(te, to), f"{family}: greedy tokens differ\neager {te}\npyattn {to}"


class _Module(torch.nn.Module):
    """What transformers' attention functions read from their module."""

    def __init__(self, groups: int, head_dim: int, sinks=None):
        super().__init__()
        self.num_key_value_groups = groups
        self.head_dim = head_dim
        self.is_causal = True
        if sinks is not None:
            self.sinks = torch.nn.Parameter(sinks)


def _qkv(B=2, Hq=4, Hkv=2, L=19, D=8, dtype=torch.float64):
    return [torch.randn(B, h, L, D, dtype=dtype, requires_grad=True) for h in (Hq, Hkv, Hkv)]


def _sliding_mask(B, L, window):
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    return sdpa_mask(
        batch_size=B, q_length=L, kv_length=L, mask_function=sliding_window_causal_mask_function(window),
        allow_is_causal_skip=False,
    )  # fmt: skip


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


# float64 inputs on both sides, but transformers' Mistral and Gemma 2 eager functions take their
# softmax in float32 (``softmax(..., dtype=torch.float32)``): a few float32 ulp apart, not more.
TOL = {"atol": 2e-6, "rtol": 1e-5}


def _compare(ours, theirs, leaves):
    """Outputs and input gradients equal (float64 inputs on both sides)."""
    torch.testing.assert_close(ours, theirs, **TOL)
    do = torch.randn_like(ours)
    g1 = torch.autograd.grad(ours, leaves, do)
    g2 = torch.autograd.grad(theirs, leaves, do)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("window", [1, 4, 30])
def test_sliding_window_matches_transformers_eager(window):
    from transformers.models.mistral.modeling_mistral import eager_attention_forward

    q, k, v = _qkv()
    module = _Module(2, 8)
    mask = _sliding_mask(2, q.shape[2], window)
    theirs, _ = eager_attention_forward(module, q, k, v, _additive(mask, q.dtype), scaling=0.3)
    # no mask: the window alone (is_causal), and with transformers' mask as the integration gets it
    ours, _ = pt.attention_forward(module, q, k, v, None, scaling=0.3, sliding_window=window, backend="cpu")
    _compare(ours, theirs, [q, k, v])
    ours, _ = pt.attention_forward(module, q, k, v, mask, scaling=0.3, sliding_window=window, backend="cpu")
    torch.testing.assert_close(ours, theirs, **TOL)


def test_softcap_matches_gemma2_eager():
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    q, k, v = _qkv()
    module = _Module(2, 8)
    mask = _sliding_mask(2, q.shape[2], 6)
    theirs, _ = eager_attention_forward(module, q, k, v, _additive(mask, q.dtype), scaling=0.7, softcap=1.5)
    ours, _ = pt.attention_forward(
        module, q, k, v, None, scaling=0.7, softcap=1.5, sliding_window=6, backend="cpu"
    )
    _compare(ours, theirs, [q, k, v])


def test_sinks_match_gpt_oss_eager():
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    q, k, v = _qkv()
    module = _Module(2, 8, sinks=torch.randn(4, dtype=torch.float64) * 2)
    mask = _sliding_mask(2, q.shape[2], 5)
    theirs, _ = eager_attention_forward(module, q, k, v, _additive(mask, q.dtype), scaling=0.4)
    ours, _ = pt.attention_forward(
        module, q, k, v, None, scaling=0.4, s_aux=module.sinks, sliding_window=5, backend="cpu"
    )
    _compare(ours, theirs, [q, k, v, module.sinks])


def test_dense_band_mask_is_dropped():
    """transformers' sliding-window mask without padding is the fused band (dropped, the kernel's
    band runs alone); with padding, or another window, it is not."""
    mask = _sliding_mask(2, 19, 5)
    assert pt._band_equivalent(mask, 19, 19, 4)
    assert not pt._band_equivalent(mask, 19, 19, 5)
    assert pt._band_equivalent(_sliding_mask(2, 19, 40), 19, 19, -1)  # wider than the sequence: causal
    padded = mask.clone()
    padded[1, :, :, 0] = False
    assert not pt._band_equivalent(padded, 19, 19, 4)
    # the same object edited in place is compared again
    mask[0, :, 3, 3] = False
    assert not pt._band_equivalent(mask, 19, 19, 4)
