"""float16 and bfloat16 on the cpu backend: the fused kernels' half paths (float32 scores,
statistics and sums; each output rounded once; gradients in the input dtype).

The rule (docs/design.md, "Half precision on CPU"): against the float64 reference on the same
(half) inputs, the error is at most 2x (outputs) / 3x (gradients) that of the reference evaluated
in float32 on those inputs and rounded once (helpers.f32_accumulation_baseline), plus the rule's
floor; and no worse than torch's own CPU scaled_dot_product_attention on the same inputs (run side
by side, margin 1.25x).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import FLOOR, assert_close_to_ref, assert_grads_close, f32_accumulation_baseline
from torch.nn.attention.bias import causal_lower_right
from torch.utils._python_dispatch import TorchDispatchMode

import pyattn
from pyattn import reference
from pyattn.ops import _common

HALF = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
TORCH_MARGIN = 1.25


class OpSpy(TorchDispatchMode):
    """Records every pyattn op that runs, with the dtype of its first tensor argument."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "pyattn":
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            self.calls.append((func._opname, None if first is None else first.dtype))
        return func(*args, **(kwargs or {}))


def _floor(dtype, ref64):
    scale = max(1.0, ref64.abs().nan_to_num(0.0).max().item()) if ref64.numel() else 1.0
    return max(FLOOR[dtype], torch.finfo(dtype).eps) * scale


def _errs(x, ref64):
    e = (x.detach().double() - ref64.detach().double()).abs()
    return e.max().item(), e.mean().item()


def assert_no_worse_than_torch(name, ours, theirs, ref64):
    """Ours vs torch's, both against ref64: max error within TORCH_MARGIN x torch's + one ulp of
    the largest value (both round once, and a max over elements of ~half-ulp roundings is luck);
    on tensors large enough for a mean to be stable, the mean error within TORCH_MARGIN x torch's
    (+ a thousandth of that ulp: where the exact answer is 0, e.g. dQ with one key, torch can be
    exactly right and ours off by a rounding of O carried through Delta)."""
    assert torch.isfinite(theirs).all(), f"{name}: torch's result is not finite"
    m_o, a_o = _errs(ours, ref64)
    m_t, a_t = _errs(theirs, ref64)
    bound = TORCH_MARGIN * m_t + _floor(ours.dtype, ref64)
    assert m_o <= bound, f"{name}: max error {m_o:.3e} > {bound:.3e} (torch's {m_t:.3e})"
    if ours.numel() >= 512:
        bound = TORCH_MARGIN * a_t + 1e-3 * _floor(ours.dtype, ref64)
        assert a_o <= bound, f"{name}: mean error {a_o:.3e} > {bound:.3e} (torch's {a_t:.3e})"


def _half(shape, dtype, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype)


def _mask(kind, B, Hq, Lq, Lk, dtype, full_row=False):
    if kind is None:
        return None
    allowed = torch.rand(B, 1, Lq, Lk) > 0.3
    allowed[..., 0] = True
    if full_row:
        allowed[0, :, 0, :] = False
    if kind == "bool":
        return allowed
    add = torch.randn(B, Hq, Lq, Lk).masked_fill(~allowed, float("-inf"))
    return add.to(dtype if kind == "add_half" else torch.float32)


def _ref_sdpa(causal, gqa):
    def f(q, k, v, mask=None):
        return reference.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=gqa)

    return f


def _pyattn_args(q, k, mask, causal):
    """(attn_mask, is_causal) for pyattn: lower-right as torch's CausalBias (the fused diagonal).
    Built outside any dispatch mode (a tensor subclass cannot be created under one)."""
    if causal == _common.CAUSAL_LOWER_RIGHT:
        return causal_lower_right(q.shape[-2], k.shape[-2]), False
    return mask, causal == 1


def _pyattn_call(q, k, v, mask, causal, gqa, **kw):
    mask, is_causal = _pyattn_args(q, k, mask, causal)
    return pyattn.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, enable_gqa=gqa, **kw)


def _torch_call(q, k, v, mask, causal, gqa):
    Lq, Lk = q.shape[-2], k.shape[-2]
    if causal == _common.CAUSAL_LOWER_RIGHT:
        mask = torch.ones(Lq, Lk, dtype=torch.bool).tril(diagonal=Lk - Lq)
    elif mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal == 1, enable_gqa=gqa)


def run_sdpa_case(dtype, B, Hq, Hkv, Lq, Lk, D, Dv, mask_kind=None, causal=0, against_torch=True,
                  full_row=False, scale=1.0):  # fmt: skip
    gqa = Hq != Hkv
    q = _half((B, Hq, Lq, D), dtype, scale).requires_grad_()
    k = _half((B, Hkv, Lk, D), dtype, scale).requires_grad_()
    v = _half((B, Hkv, Lk, Dv), dtype).requires_grad_()
    mask = _mask(mask_kind, B, Hq, Lq, Lk, dtype, full_row)
    attn_mask, is_causal = _pyattn_args(q, k, mask, causal)
    spy = OpSpy()
    with spy:
        out = pyattn.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=is_causal, enable_gqa=gqa)
    assert ("sdpa_fwd", dtype) in spy.calls, f"the fused cpu op did not run on {dtype}: {spy.calls}"
    assert out.dtype == dtype and out.shape == (B, Hq, Lq, Dv)
    assert torch.isfinite(out).all()
    g = torch.randn(out.shape)
    grads = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    assert all(gr.dtype == dtype for gr in grads)

    ref = _ref_sdpa(causal, gqa)
    ins64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask64 = None if mask is None or mask.dtype == torch.bool else mask.double()
    out64 = ref(*ins64, mask if mask64 is None else mask64)
    grads64 = torch.autograd.grad(out64, ins64, g.double())
    base, base_grads = f32_accumulation_baseline(ref, [q, k, v], [mask], grad_out=g)
    assert_close_to_ref("out", out, base, out64)
    assert_grads_close(["query", "key", "value"], grads, base_grads, grads64)
    if against_torch:
        qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
        ot = _torch_call(qt, kt, vt, mask, causal, gqa)
        assert_no_worse_than_torch("out vs torch", out, ot, out64)
        gt = torch.autograd.grad(ot, (qt, kt, vt), g.to(dtype))
        for name, a, b, r in zip(["query", "key", "value"], grads, gt, grads64, strict=True):
            assert_no_worse_than_torch(f"grad {name} vs torch", a, b, r)
    return out, grads


SHAPES = [
    # B, Hq, Hkv, Lq, Lk, D, Dv
    (2, 4, 4, 64, 97, 64, 64),
    (1, 4, 2, 37, 1, 32, 16),  # Tk = 1, GQA
    (2, 2, 1, 50, 97, 59, 24),  # GQA, odd head dim, Dv != D
    (1, 2, 2, 300, 600, 64, 64),  # several key blocks, a 256-query block
]
MASKS = [None, "bool", "add_half", "add_f32"]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mask_kind", MASKS, ids=["nomask", "bool", "add_half", "add_f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sdpa_matches_reference_and_torch(dtype, mask_kind, shape):
    run_sdpa_case(dtype, *shape, mask_kind=mask_kind)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("causal", [1, 2], ids=["upper_left", "lower_right"])
@pytest.mark.parametrize(
    "shape", [(2, 4, 2, 97, 130, 64, 64), (1, 2, 2, 97, 97, 59, 59), (1, 2, 1, 1, 37, 32, 32)]
)
def test_sdpa_causal(dtype, causal, shape):
    run_sdpa_case(dtype, *shape, causal=causal)


@pytest.mark.parametrize("dtype", HALF)
def test_sdpa_long_rows(dtype):
    # several 512-key forward blocks, 256-key backward blocks and the long-row query blocks
    run_sdpa_case(dtype, 1, 2, 2, 1025, 1025, 64, 64, mask_kind="bool")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", ["bool", "add_half", "add_f32", "lower_right"])
def test_sdpa_fully_masked_rows(dtype, kind):
    B, H, Lq, Lk, D = 2, 2, 40, 30, 32
    if kind == "lower_right":
        # queries 0 .. Lq - Lk - 1 see no key on the lower-right diagonal
        out, grads = run_sdpa_case(dtype, B, H, H, Lq, Lk, D, D, causal=2, against_torch=False)
        empty = slice(0, Lq - Lk)
        assert (out[:, :, empty] == 0).all()
        assert (grads[0][:, :, empty] == 0).all()
        return
    out, grads = run_sdpa_case(
        dtype, B, H, H, Lq, Lk, D, D, mask_kind=kind, full_row=True, against_torch=False
    )
    assert (out[0, :, 0] == 0).all()
    assert (grads[0][0, :, 0] == 0).all()


@pytest.mark.parametrize("dtype", HALF)
def test_sdpa_scores_that_overflow_half(dtype):
    # |q . k| far above float16's 65504: a half score matrix is inf and its softmax NaN; the
    # kernel's float32 scores are finite, as torch's CPU kernel's are
    B, H, L, D = 1, 2, 64, 64
    q = _half((B, H, L, D), dtype, 60.0)
    k = _half((B, H, L, D), dtype, 60.0)
    v = _half((B, H, L, D), dtype)
    if dtype == torch.float16:
        assert not torch.isfinite(q @ k.transpose(-2, -1)).all()
    out = pyattn.scaled_dot_product_attention(q, k, v, backend="cpu")
    theirs = F.scaled_dot_product_attention(q, k, v)
    assert torch.isfinite(out).all() and torch.isfinite(theirs).all()
    ref = _ref_sdpa(0, False)
    out64 = ref(q.double(), k.double(), v.double())
    base, _ = f32_accumulation_baseline(ref, [q, k, v])
    assert_close_to_ref("out", out, base, out64)
    assert_no_worse_than_torch("out vs torch", out, theirs, out64)
    torch.testing.assert_close(out, theirs, atol=2 * torch.finfo(dtype).eps, rtol=0)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("causal", [0, 2])
def test_sdpa_dropout_draws_as_float32(dtype, causal):
    B, Hq, Hkv, Lq, Lk, D, p = 2, 4, 2, 70, 90, 32, 0.3
    q = _half((B, Hq, Lq, D), dtype).requires_grad_()
    k = _half((B, Hkv, Lk, D), dtype).requires_grad_()
    v = _half((B, Hkv, Lk, D), dtype).requires_grad_()
    seed = int(torch.randint(0, 2**30, ()).item())
    torch.manual_seed(seed)
    out = _pyattn_call(q, k, v, None, causal, True, dropout_p=p)
    torch.manual_seed(seed)
    out32 = _pyattn_call(*(t.detach().float() for t in (q, k, v)), None, causal, True, dropout_p=p)
    # the keep-mask those calls drew (the same generator state, the same counters)
    torch.manual_seed(seed)
    philox_seed, offset = _common.dropout_seed_offset()
    keep = torch.ops.pyattn.dropout_keep_mask(philox_seed, offset, [B, Hq, Lq, Lk], p)

    def ref(q, k, v):
        return reference.scaled_dot_product_attention(
            q, k, v, None, p, causal, enable_gqa=True, dropout_mask=keep
        )

    g = torch.randn(out.shape)
    grads = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    ins64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = ref(*ins64)
    grads64 = torch.autograd.grad(out64, ins64, g.double())
    base, base_grads = f32_accumulation_baseline(ref, [q, k, v], grad_out=g)
    assert_close_to_ref("out", out, base, out64)
    assert_close_to_ref("out vs the float32 kernel", out, base, out32.double())
    assert_grads_close(["query", "key", "value"], grads, base_grads, grads64)


def _op_inputs(dtype, variant):
    B, Hq, Hkv, Lq, Lk, D, Dv = 2, 2, 2, 5, 9, 8, 6
    mask, causal, p = None, 0, 0.0
    if variant == "bool":
        mask = torch.rand(B, Hq, Lq, Lk) > 0.3
    elif variant == "add_half":
        mask = torch.randn(Lk).to(dtype).expand(B, Hq, Lq, Lk)  # stride-0 dims
    elif variant == "add_f32":
        mask = torch.randn(B, 1, Lq, Lk).expand(B, Hq, Lq, Lk)
    else:
        Hkv, causal, p = 1, 2, 0.2
    q = _half((B, Hq, Lq, D), dtype)
    k = _half((B, Hkv, Lk, D), dtype)
    v = _half((B, Hkv, Lk, Dv), dtype)
    return (q, k, v, mask, p, causal, 0.35, 5, 11)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("variant", ["bool", "add_half", "add_f32", "gqa_causal_dropout"])
def test_sdpa_opcheck(dtype, variant):
    args = _op_inputs(dtype, variant)
    torch.library.opcheck(torch.ops.pyattn.sdpa_fwd, args)
    out, lse = torch.ops.pyattn.sdpa_fwd(*args)
    assert out.dtype == dtype and lse.dtype == torch.float32
    q, k, v, mask, p, causal, scale, seed, offset = args
    bwd = (torch.randn_like(out), q, k, v, mask, out, lse, p, causal, scale, seed, offset)
    torch.torch.library.opcheck(torch.ops.pyattn.sdpa_bwd, bwd)
    assert all(g.dtype == dtype for g in torch.ops.pyattn.sdpa_bwd(*bwd))


def test_sdpa_torch_compile_fullgraph_bf16():
    def f(q, k, v, mask):
        return pyattn.scaled_dot_product_attention(torch.tanh(q), k, v, mask, backend="cpu") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    dt = torch.bfloat16
    ins = [_half(s, dt).requires_grad_() for s in ((2, 3, 6, 16), (2, 3, 9, 16), (2, 3, 9, 8))]
    mask = torch.randn(3, 6, 9).to(dt)
    out_c, out_e = compiled(*ins, mask), f(*ins, mask)
    assert out_c.dtype == dt
    torch.testing.assert_close(out_c, out_e, atol=0, rtol=0)
    g = torch.randn_like(out_e)
    for a, b in zip(torch.autograd.grad(out_c, ins, g), torch.autograd.grad(out_e, ins, g), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# -- additive attention ------------------------------------------------------------------------


def _ref_additive(q, k, val, v, mask=None):
    return reference.additive_attention(q, k, val, v, mask, return_weights=True)


def run_additive_case(dtype, B, Tq, Tk, H, Dv, padding=False, full_row=False):
    q = _half((B, Tq, H), dtype).requires_grad_()
    k = _half((B, Tk, H), dtype).requires_grad_()
    val = _half((B, Tk, Dv), dtype).requires_grad_()
    v = _half((H,), dtype).requires_grad_()
    ins = (q, k, val, v)
    mask = None
    if padding:
        mask = torch.rand(B, Tk) < 0.3
        mask[:, 0] = False
        if full_row:
            mask[0] = True
    spy = OpSpy()
    with spy:
        out, w = pyattn.additive_attention(*ins, mask, return_weights=True)
    assert ("additive_attention_fwd", dtype) in spy.calls, spy.calls
    assert out.dtype == dtype and w.dtype == dtype
    go, gw = torch.randn(out.shape), torch.randn(w.shape)
    grads = torch.autograd.grad((out, w), ins, (go.to(dtype), gw.to(dtype)))
    assert all(g.dtype == dtype for g in grads)

    ins64 = [t.detach().double().requires_grad_() for t in ins]
    out64, w64 = _ref_additive(*ins64, mask)
    grads64 = torch.autograd.grad((out64, w64), ins64, (go.double(), gw.double()))
    up = [t.detach().float().requires_grad_() for t in ins]
    out32, w32 = _ref_additive(*up, mask)
    grads32 = torch.autograd.grad((out32, w32), up, (go, gw))
    assert_close_to_ref("out", out, out32.to(dtype), out64)
    assert_close_to_ref("weights", w, w32.to(dtype), w64)
    assert_grads_close(["query", "key", "value", "v"], grads, [g.to(dtype) for g in grads32], grads64)
    return out, w, grads


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(2, 7, 97, 32, 16), (3, 5, 1, 59, 8), (1, 40, 130, 64, 64)])
@pytest.mark.parametrize("padding", [False, True])
def test_additive_matches_reference(dtype, shape, padding):
    run_additive_case(dtype, *shape, padding=padding)


@pytest.mark.parametrize("dtype", HALF)
def test_additive_fully_padded_rows(dtype):
    out, w, grads = run_additive_case(dtype, 2, 6, 20, 16, 8, padding=True, full_row=True)
    assert (out[0] == 0).all() and (w[0] == 0).all()
    assert (grads[0][0] == 0).all() and (grads[1][0] == 0).all() and (grads[2][0] == 0).all()


@pytest.mark.parametrize("dtype", HALF)
def test_additive_opcheck(dtype):
    B, Tq, Tk, H, Dv = 2, 3, 5, 8, 4
    q, k, val = _half((B, Tq, H), dtype), _half((B, Tk, H), dtype), _half((B, Tk, Dv), dtype)
    v = _half((H,), dtype)
    mask = torch.rand(B, Tk) < 0.3
    args = (q, k, val, v, mask, True)
    torch.library.opcheck(torch.ops.pyattn.additive_attention_fwd, args)
    out, lse, w = torch.ops.pyattn.additive_attention_fwd(*args)
    assert out.dtype == dtype and w.dtype == dtype
    bwd = (torch.randn_like(out), q, k, val, v, mask, out, lse, torch.randn_like(w), w)
    torch.library.opcheck(torch.ops.pyattn.additive_attention_bwd, bwd)


def test_additive_torch_compile_fullgraph_bf16():
    def f(q, k, val, v):
        return pyattn.additive_attention(torch.tanh(q), k, val, v, backend="cpu") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    dt = torch.bfloat16
    ins = [_half(s, dt).requires_grad_() for s in ((2, 4, 16), (2, 7, 16), (2, 7, 8), (16,))]
    out_c, out_e = compiled(*ins), f(*ins)
    torch.testing.assert_close(out_c, out_e, atol=0, rtol=0)
    g = torch.randn_like(out_e)
    for a, b in zip(torch.autograd.grad(out_c, ins, g), torch.autograd.grad(out_e, ins, g), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# -- the models, under autocast and in bf16 weights ----------------------------------------------


def _model(kind):
    """A small model of each kind, float32, random weights (the same for every call)."""
    from pyattn.models.bert import BertConfig, BertModel
    from pyattn.models.seq2seq import Seq2Seq, Seq2SeqConfig
    from pyattn.models.transformer import Transformer

    torch.manual_seed(1234)
    if kind == "bert":
        cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64)  # fmt: skip
        return BertModel(cfg).eval()
    if kind == "transformer":
        return Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                           dim_feedforward=64, dropout=0.0, batch_first=True).eval()  # fmt: skip
    return Seq2Seq(Seq2SeqConfig(30, 31, embed_dim=16, hidden_dim=32, attn_dim=24, num_layers=1)).eval()


def _model_inputs(kind):
    """(kwargs, the op that must run, a function of the output to compare)."""
    B = 2
    if kind == "bert":
        am = torch.ones(B, 48, dtype=torch.long)
        am[1, 30:] = 0
        return (
            {"input_ids": torch.randint(0, 100, (B, 48)), "attention_mask": am},
            "sdpa_fwd",
            (lambda out: out.last_hidden_state),
        )
    if kind == "transformer":
        S, T = 19, 11
        pad = torch.zeros(B, S, dtype=torch.bool)
        pad[1, 12:] = True
        kw = {"src": torch.randn(B, S, 32), "tgt": torch.randn(B, T, 32),
              "tgt_mask": _transformer_mask(T), "tgt_is_causal": True,
              "src_key_padding_mask": pad, "memory_key_padding_mask": pad}  # fmt: skip
        return kw, "sdpa_fwd", lambda out: out
    src = torch.randint(3, 30, (B, 13))
    src[1, 9:] = 0
    tgt = torch.randint(3, 31, (B, 8))
    tgt[:, 0] = 1
    return {"src": src, "tgt": tgt}, "additive_attention_fwd", lambda out: out.logits


def _transformer_mask(T):
    from pyattn.models.transformer import Transformer

    return Transformer.generate_square_subsequent_mask(T)


@pytest.mark.parametrize("mode", ["autocast", "bf16_weights"])
@pytest.mark.parametrize("kind", ["bert", "transformer", "seq2seq"])
def test_models_run_the_fused_half_kernels(kind, mode):
    kw, op, pick = _model_inputs(kind)
    with torch.no_grad():
        want = pick(_model(kind)(**kw)).double()

    def run(attn_backend):
        model = _model(kind)
        model.set_attn_backend(attn_backend)
        spy = OpSpy()
        with torch.no_grad():
            if mode == "autocast":
                with torch.autocast("cpu", dtype=torch.bfloat16), spy:
                    out = pick(model(**kw))
            else:
                model = model.to(torch.bfloat16)
                kw16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in kw.items()
                        if isinstance(v, torch.Tensor)}  # fmt: skip
                kw16.update({k: v for k, v in kw.items() if not isinstance(v, torch.Tensor)})
                with spy:
                    out = pick(model(**kw16))
        return out, spy.calls

    got, calls = run("fused")
    # with padding, BERT and the Transformer run their padding-free path: varlen attention
    fused = {op, "varlen_attention_fwd"} if kind in ("bert", "transformer") else {op}
    assert any((name, torch.bfloat16) in calls for name in fused), (
        f"the fused bf16 cpu kernel did not run: {calls}"
    )
    assert torch.isfinite(got).all()
    if mode == "bf16_weights":
        assert got.dtype == torch.bfloat16
    # the same bf16 model with its attention on the naive path (float32 inside, rounded once)
    ref, calls_ref = run("reference")
    assert not any(name in fused for name, _ in calls_ref)
    err, err_ref = _errs(got, want), _errs(ref, want)
    assert err[0] <= 1.5 * err_ref[0] + 0.02, f"max error {err[0]:.3e} vs the naive path's {err_ref[0]:.3e}"
    assert err[1] <= 1.5 * err_ref[1] + 1e-3, f"mean error {err[1]:.3e} vs the naive path's {err_ref[1]:.3e}"


def test_bahdanau_layer_under_autocast_runs_the_fused_half_kernel():
    # W_s / W_h give bf16 under autocast while the values (encoder states) and v stay float32:
    # the op casts them to the autocast dtype, as torch's attention does
    B, Tq, Tk, H = 2, 5, 11, 32
    layer = pyattn.nn.BahdanauAttention(H, H, H)
    s, h = torch.randn(B, Tq, H), torch.randn(B, Tk, H)
    with torch.no_grad():
        want = layer(s, h)[0].double()
        spy = OpSpy()
        with torch.autocast("cpu", dtype=torch.bfloat16), spy:
            got = layer(s, h)[0]
    assert ("additive_attention_fwd", torch.bfloat16) in spy.calls, spy.calls
    assert got.dtype == torch.bfloat16
    assert (got.double() - want).abs().max().item() < 0.05


def test_sdpa_autocast_casts_as_torch():
    q, k, v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 8)
    mask = torch.randn(9, 11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = pyattn.scaled_dot_product_attention(q, k, v, mask)
        theirs = F.scaled_dot_product_attention(q, k, v, mask)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    ref = reference.scaled_dot_product_attention(*(t.bfloat16().double() for t in (q, k, v, mask)))
    assert_no_worse_than_torch("out vs torch", ours, theirs, ref)


def test_every_op_casts_under_autocast_as_sdpa():
    """The sibling ops agree: under autocast, float32 inputs meet the autocast dtype (varlen and
    additive as sdpa, as torch's attention), and the result equals the op on cast inputs."""
    q, k, v = torch.randn(6, 2, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    cu_q, cu_k = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([0, 3, 7], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pyattn.varlen_attention(q, k, v, cu_q, cu_k)
    want = pyattn.varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu_q, cu_k)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    qa, ka, va, w = torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 4), torch.randn(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pyattn.additive_attention(qa, ka, va, w)
    assert out.dtype == torch.bfloat16
    want = pyattn.additive_attention(qa.bfloat16(), ka.bfloat16(), va.bfloat16(), w.bfloat16())
    torch.testing.assert_close(out, want, rtol=0, atol=0)
