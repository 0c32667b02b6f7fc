"""pyattn.nn: MultiheadAttention against torch.nn.MultiheadAttention (one state dict), and
BahdanauAttention against a hand-written naive module.

Comparisons with torch run in float64, where both sides are exact up to rounding, so a tight
allclose is the right check; fused-vs-reference parity uses the tests/helpers.py rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyattn
from pyattn.nn import BahdanauAttention, MultiheadAttention

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")

TIGHT = {"rtol": 1e-9, "atol": 1e-10}


def _pair(E=16, H=4, **kwargs):
    """torch's module and ours in float64, with one state dict."""
    ref = torch.nn.MultiheadAttention(E, H, dtype=torch.float64, **kwargs)
    ours = MultiheadAttention(E, H, dtype=torch.float64, **kwargs)
    missing = ours.load_state_dict(ref.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys
    assert set(ours.state_dict()) == set(ref.state_dict())
    return ref, ours


def _masks(kind_kpm, kind_attn, B, H, L, S):
    """Random masks that never mask a whole row (torch gives NaN there; tested separately)."""
    kpm = attn = None
    if kind_kpm != "none":
        pad = torch.rand(B, S) < 0.4
        pad[:, 0] = False
        kpm = (
            pad
            if kind_kpm == "bool"
            else torch.randn(B, S, dtype=torch.float64).masked_fill(pad, float("-inf"))
        )
    if kind_attn != "none":
        shape = (L, S) if kind_attn.endswith("2d") else (B * H, L, S)
        blocked = torch.rand(shape) < 0.4
        blocked[..., 0] = False
        if kind_attn.startswith("bool"):
            attn = blocked
        else:
            attn = torch.randn(shape, dtype=torch.float64).masked_fill(blocked, float("-inf"))
    return kpm, attn


def _run(mod, q, k, v, **kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    if kw.pop("self_attn", False):
        k = v = q
    out, w = mod(q, k, v, **kw)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
    if w is not None:
        loss = loss + (w * w).sum()
    grads = torch.autograd.grad(loss, [q, k, v] + [p for p in mod.parameters()], allow_unused=True)
    return out, w, grads


def _compare(ref, ours, q, k, v, **kw):
    out_r, w_r, g_r = _run(ref, q, k, v, **dict(kw))
    out_o, w_o, g_o = _run(ours, q, k, v, **dict(kw))
    torch.testing.assert_close(out_o, out_r, **TIGHT)
    if w_r is None:
        assert w_o is None
    else:
        torch.testing.assert_close(w_o, w_r, **TIGHT)
    names = ["query", "key", "value"] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, g_o, g_r, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, **TIGHT, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("self_attn", [True, False])
@pytest.mark.parametrize("kpm", ["none", "bool", "float"])
@pytest.mark.parametrize("attn", ["none", "bool2d", "float3d"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_matches_torch(batch_first, self_attn, kpm, attn, need_weights):
    B, L, S, E, H = 3, 5, 5 if self_attn else 7, 16, 4
    ref, ours = _pair(E, H, batch_first=batch_first)
    shape = (lambda T: (B, T, E)) if batch_first else (lambda T: (T, B, E))
    q = torch.randn(shape(L), dtype=torch.float64)
    k = torch.randn(shape(S), dtype=torch.float64)
    v = torch.randn(shape(S), dtype=torch.float64)
    key_padding_mask, attn_mask = _masks(kpm, attn, B, H, L, S)
    _compare(
        ref,
        ours,
        q,
        k,
        v,
        self_attn=self_attn,
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
        need_weights=need_weights,
    )


@pytest.mark.parametrize(
    "options",
    [
        {"kdim": 6, "vdim": 10},
        {"add_bias_kv": True},
        {"add_zero_attn": True},
        {"add_bias_kv": True, "add_zero_attn": True, "kdim": 6, "vdim": 6},
        {"bias": False},
    ],
    ids=["kdim_vdim", "bias_kv", "zero_attn", "all", "no_bias"],
)
@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_options_match_torch(options, masks, need_weights):
    B, L, S, E, H = 2, 4, 6, 16, 2
    ref, ours = _pair(E, H, batch_first=True, **options)
    q = torch.randn(B, L, E, dtype=torch.float64)
    k = torch.randn(B, S, options.get("kdim", E), dtype=torch.float64)
    v = torch.randn(B, S, options.get("vdim", E), dtype=torch.float64)
    kpm, attn = _masks("bool", "float3d", B, H, L, S) if masks else (None, None)
    _compare(
        ref,
        ours,
        q,
        k,
        v,
        key_padding_mask=kpm,
        attn_mask=attn,
        need_weights=need_weights,
        average_attn_weights=not masks,
    )


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_mha_is_causal_matches_torch(need_weights, padding):
    B, L, E, H = 2, 6, 16, 4
    ref, ours = _pair(E, H)
    x = torch.randn(L, B, E, dtype=torch.float64)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    kpm = _masks("bool", "none", B, H, L, L)[0] if padding else None
    _compare(
        ref,
        ours,
        x,
        x,
        x,
        self_attn=True,
        attn_mask=causal,
        is_causal=True,
        key_padding_mask=kpm,
        need_weights=need_weights,
    )
    with pytest.raises(RuntimeError, match="attn_mask"):
        ours(x, x, x, is_causal=True)


@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_unbatched_matches_torch(need_weights):
    L, S, E, H = 4, 5, 8, 2
    ref, ours = _pair(E, H)
    q, k, v = (torch.randn(T, E, dtype=torch.float64) for T in (L, S, S))
    kpm = torch.tensor([False, True, False, False, True])
    attn = torch.randn(H, L, S, dtype=torch.float64)
    _compare(
        ref,
        ours,
        q,
        k,
        v,
        key_padding_mask=kpm,
        attn_mask=attn,
        need_weights=need_weights,
        average_attn_weights=False,
    )


def test_mha_float32_against_float64_reference():
    """float32 module vs the same module in float64: within the tolerance rule of the op."""
    from helpers import assert_close_to_ref

    B, L, E, H = 2, 9, 32, 4
    ref, ours64 = _pair(E, H, batch_first=True)
    ours32 = MultiheadAttention(E, H, batch_first=True)
    ours32.load_state_dict(ref.state_dict())
    ref32 = torch.nn.MultiheadAttention(E, H, batch_first=True)
    ref32.load_state_dict(ref.state_dict())
    x = torch.randn(B, L, E, dtype=torch.float64)
    kpm = _masks("bool", "none", B, H, L, L)[0]
    out64 = ours64(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    out32 = ours32(x.float(), x.float(), x.float(), key_padding_mask=kpm, need_weights=False)[0]
    torch_out32 = ref32(x.float(), x.float(), x.float(), key_padding_mask=kpm, need_weights=False)[0]
    assert_close_to_ref("mha float32", out32, torch_out32, out64, factor=2.0, floor=1e-5)


def test_mha_fully_masked_rows_give_zeros():
    """torch gives NaN where every key of a query is masked; pyattn gives zero attention there."""
    B, L, E, H = 2, 4, 8, 2
    ref, ours = _pair(E, H, batch_first=True)
    x = torch.randn(B, L, E, dtype=torch.float64)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1] = True  # sequence 1: every key is padding
    for need_weights in (False, True):
        out, w = ours(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
        torch_out, _ = ref(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
        assert torch.isnan(torch_out[1]).all() or torch.isfinite(torch_out[1]).all()
        # Zero attention, then the output projection: only its bias is left.
        torch.testing.assert_close(out[1], ours.out_proj.bias.expand(L, E), **TIGHT)
        torch.testing.assert_close(out[0], torch_out[0], **TIGHT)
        if need_weights:
            assert (w[1] == 0).all()


def test_mha_dropout_only_in_training():
    E, H = 8, 2
    mod = MultiheadAttention(E, H, dropout=0.5, batch_first=True)
    x = torch.randn(2, 6, E)
    mod.eval()
    a = mod(x, x, x, need_weights=False)[0]
    b = mod(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    mod.train()
    c = mod(x, x, x, need_weights=False)[0]
    assert not torch.allclose(a, c)


def test_mha_bad_inputs_raise_clear_errors():
    mod = MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="key_padding_mask"):
        mod(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        mod(x, x, x, attn_mask=torch.zeros(3, 3, 3))
    with pytest.raises(TypeError, match="attn_mask"):
        mod(x, x, x, attn_mask=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="embed_dim"):
        mod(torch.randn(2, 3, 4), x, x)
    with pytest.raises(ValueError, match="attn_backend"):
        mod.set_attn_backend("fast")


@pytest.mark.parametrize("masks", [False, True])
def test_mha_fused_matches_reference_path(masks):
    """Same weights through attn_backend="fused" and "reference": the tolerance rule."""
    from helpers import assert_close_to_ref

    B, L, E, H = 2, 7, 16, 2
    mod = MultiheadAttention(E, H, batch_first=True)
    mod64 = MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    mod64.load_state_dict(mod.state_dict())
    mod64.set_attn_backend("reference")
    x = torch.randn(B, L, E)
    kpm, attn = _masks("bool", "bool2d", B, H, L, L) if masks else (None, None)
    outs = {}
    for name in ("fused", "reference"):
        mod.set_attn_backend(name)
        xi = x.clone().requires_grad_(True)
        out = mod(xi, xi, xi, key_padding_mask=kpm, attn_mask=attn, need_weights=False)[0]
        grads = torch.autograd.grad(out.square().sum(), [xi, *mod.parameters()])
        outs[name] = (out, grads)
    x64 = x.double().requires_grad_(True)
    out64 = mod64(x64, x64, x64, key_padding_mask=kpm, attn_mask=attn, need_weights=False)[0]
    g64 = torch.autograd.grad(out64.square().sum(), [x64, *mod64.parameters()])
    assert_close_to_ref("output", outs["fused"][0], outs["reference"][0], out64)
    for i, (a, b, c) in enumerate(zip(outs["fused"][1], outs["reference"][1], g64, strict=True)):
        assert_close_to_ref(f"grad {i}", a, b, c, factor=3.0)


# -- BahdanauAttention --------------------------------------------------------------------------


class NaiveBahdanau(torch.nn.Module):
    """The textbook loop-free version, materialising the (B, Tq, Tk, A) tanh tensor."""

    def __init__(self, W_s, W_h, v):
        super().__init__()
        self.W_s, self.W_h, self.v = W_s, W_h, v

    def forward(self, query, keys, values, key_padding_mask=None):
        e = torch.tanh(self.W_s(query)[:, :, None, :] + self.W_h(keys)[:, None, :, :]) @ self.v  # (B, Tq, Tk)
        if key_padding_mask is not None:
            e = e.masked_fill(key_padding_mask[:, None, :], float("-inf"))
        a = F.softmax(e, dim=-1)
        return a @ values, a


@pytest.mark.parametrize("attn_backend", ["fused", "reference"])
@pytest.mark.parametrize("step", [False, True])
def test_bahdanau_matches_naive(attn_backend, step):
    B, Tq, Tk, Dq, Dk, A, Dv = 3, 4, 7, 6, 10, 8, 5
    mod = BahdanauAttention(Dq, Dk, A, attn_backend=attn_backend).double()
    naive = NaiveBahdanau(mod.W_s, mod.W_h, mod.v)
    query = torch.randn(B, Dq, dtype=torch.float64) if step else torch.randn(B, Tq, Dq, dtype=torch.float64)
    keys = torch.randn(B, Tk, Dk, dtype=torch.float64)
    values = torch.randn(B, Tk, Dv, dtype=torch.float64)
    kpm = torch.rand(B, Tk) < 0.4
    kpm[:, 0] = False
    ctx, w = mod(query, keys, values, key_padding_mask=kpm)
    nq = query.unsqueeze(1) if step else query
    ctx_n, w_n = naive(nq, keys, values, kpm)
    if step:
        ctx_n, w_n = ctx_n.squeeze(1), w_n.squeeze(1)
    torch.testing.assert_close(ctx, ctx_n, **TIGHT)
    torch.testing.assert_close(w, w_n, **TIGHT)
    # Gradients of every parameter agree too.
    g = torch.autograd.grad((ctx * ctx_n.detach()).sum() + (w * w_n.detach()).sum(), list(mod.parameters()))
    g_n = torch.autograd.grad(
        (ctx_n * ctx_n.detach()).sum() + (w_n * w_n.detach()).sum(), list(mod.parameters())
    )
    for a, b in zip(g, g_n, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    # Projecting the keys once gives the same answer, and values default to keys.
    pk = mod.project_keys(keys)
    ctx2, w2 = mod(query, keys, values, key_padding_mask=kpm, precomputed_keys=pk)
    torch.testing.assert_close(ctx2, ctx, **TIGHT)
    ctx3, _ = mod(query, keys)
    ctx3_n, _ = naive(nq, keys, keys)
    torch.testing.assert_close(ctx3, ctx3_n.squeeze(1) if step else ctx3_n, **TIGHT)


def test_bahdanau_bad_inputs():
    mod = BahdanauAttention(4, 6, 8)
    with pytest.raises(ValueError, match="query"):
        mod(torch.randn(2, 3, 5), torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="keys"):
        mod(torch.randn(2, 3, 4), torch.randn(2, 3, 5))


def test_nn_is_exported():
    assert pyattn.nn.MultiheadAttention is MultiheadAttention
