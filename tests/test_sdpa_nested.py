"""pyattn.scaled_dot_product_attention on jagged nested tensors, differentially against torch's
F.scaled_dot_product_attention on the same nested inputs: values (tests/helpers.py rule, torch
in float64 as the truth), gradients, output shape/offsets/layout, and the errors torch raises.
Where torch's CPU nested path refuses (is_causal, non-contiguous layouts) each sequence is checked
against torch's dense sdpa instead."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_ref, assert_grads_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyattn

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")

BACKENDS = ["cpu", "reference"]


def _nested(values: list[torch.Tensor], requires_grad=False) -> torch.Tensor:
    """(B, H, j, D) jagged from per-sequence (L_b, H, D) tensors, as torch's tutorial builds it."""
    return torch.nested.nested_tensor(values, layout=torch.jagged, requires_grad=requires_grad).transpose(
        1, 2
    )


def _qkv(lq, lk, H, D, Dv, dtype, requires_grad=False, self_attn=False):
    """Per-sequence dense q/k/v lists (float64 masters) and nested q/k/v in ``dtype``."""
    qs = [torch.randn(n, H, D, dtype=torch.float64) for n in lq]
    ks = qs if self_attn else [torch.randn(n, H, D, dtype=torch.float64) for n in lk]
    vs = [torch.randn(n, H, Dv, dtype=torch.float64) for n in (lq if self_attn else lk)]
    return qs, ks, vs


def _make(ts, dtype, rg):
    return _nested([t.to(dtype) for t in ts], rg)


def _run(fn, qs, ks, vs, dtype, **kw):
    q, k, v = (_make(t, dtype, True) for t in (qs, ks, vs))
    out = fn(q, k, v, **kw)
    g = torch.randn(out.values().shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(out.values(), [q, k, v], g.to(dtype))
    return out, [x.values() for x in grads], q


def _torch_sdpa(q, k, v, scale=None):
    """torch's nested sdpa; where its CPU math path breaks on a pattern of empty sequences (it
    converts to a strided nested tensor, which fails on some), torch's dense sdpa per sequence."""
    try:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    except RuntimeError:
        if q.transpose(1, 2).offsets().diff().min() > 0 and k.transpose(1, 2).offsets().diff().min() > 0:
            raise  # no empty sequence: a real refusal
    outs = []
    for qb, kb, vb in zip(*(t.transpose(1, 2).unbind() for t in (q, k, v)), strict=True):
        o = F.scaled_dot_product_attention(
            qb.transpose(0, 1), kb.transpose(0, 1), vb.transpose(0, 1), scale=scale
        )
        outs.append(o.transpose(0, 1))  # (L_b, H, Dv)
    return torch.nested.nested_tensor_from_jagged(torch.cat(outs), q.transpose(1, 2).offsets()).transpose(
        1, 2
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    B=st.integers(1, 4),
    H=st.integers(1, 3),
    D=st.integers(1, 9),
    Dv=st.integers(1, 9),
    cross=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    backend=st.sampled_from(BACKENDS),
    scale=st.one_of(st.none(), st.floats(-2.0, 2.0).filter(lambda s: abs(s) > 1e-3)),
)
def test_nested_sdpa_matches_torch(data, B, H, D, Dv, cross, dtype, backend, scale):
    # empty sequences, but not all of them: torch's math path fails on an all-empty batch
    lengths = st.lists(st.integers(0, 7), min_size=B, max_size=B).filter(lambda ls: sum(ls) > 0)
    lq = data.draw(lengths, label="q lengths")
    lk = data.draw(lengths, label="k lengths") if cross else lq
    qs, ks, vs = _qkv(lq, lk, H, D, Dv, dtype)
    ours, g_ours, q = _run(
        lambda q, k, v: pyattn.scaled_dot_product_attention(q, k, v, scale=scale, backend=backend),
        qs, ks, vs, dtype,
    )  # fmt: skip
    theirs, g_theirs, _ = _run(lambda q, k, v: _torch_sdpa(q, k, v, scale), qs, ks, vs, dtype)
    truth, g_truth, _ = _run(lambda q, k, v: _torch_sdpa(q, k, v, scale), qs, ks, vs, torch.float64)
    assert ours.is_nested and ours.layout == torch.jagged and ours.dtype == dtype
    assert ours.dim() == theirs.dim() == 4 and ours._ragged_idx == theirs._ragged_idx == 2
    assert (ours.shape[0], ours.shape[1], ours.shape[3]) == (B, H, Dv)
    assert ours.shape[2] == q.shape[2]  # ragged like the query (the same nested int)
    torch.testing.assert_close(ours.transpose(1, 2).offsets(), theirs.transpose(1, 2).offsets())
    assert_close_to_ref("out", ours.values(), theirs.values(), truth.values())
    assert_grads_close(["q", "k", "v"], g_ours, g_theirs, g_truth)


def test_nested_output_combines_with_query():
    """The result shares the query's ragged size: nested arithmetic with the query works."""
    qs, ks, vs = _qkv([3, 1, 4], [3, 1, 4], 2, 5, 5, torch.float32, self_attn=True)
    q = _make(qs, torch.float32, False)
    out = pyattn.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape
    ref = F.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close((out + q).values(), (ref + q).values(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_sdpa_causal_per_sequence(backend):
    """is_causal within each sequence, upper-left as dense sdpa (torch's CPU nested path refuses
    it), self- and cross-attention with Lq != Lk."""
    lq, lk = [4, 1, 6, 0], [2, 5, 6, 3]
    for self_attn in (True, False):
        qs, ks, vs = _qkv(lq, lq if self_attn else lk, 3, 8, 4, torch.float64, self_attn=self_attn)
        q, k, v = (_make(t, torch.float64, False) for t in (qs, ks, vs))
        out = pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
        for b, (qb, kb, vb) in enumerate(zip(qs, ks, vs, strict=True)):
            ref = pyattn.reference.scaled_dot_product_attention(
                qb.transpose(0, 1), kb.transpose(0, 1), vb.transpose(0, 1), None, 0.0, 1
            ).transpose(0, 1)  # (L_b, H, Dv); a row with no key is zeros
            if kb.shape[0] > 0 and qb.shape[0] > 0:
                dense = F.scaled_dot_product_attention(
                    qb.transpose(0, 1), kb.transpose(0, 1), vb.transpose(0, 1), is_causal=True
                ).transpose(0, 1)
                keys = torch.arange(qb.shape[0]) < kb.shape[0]  # rows with a key to see
                torch.testing.assert_close(ref[keys], dense[keys])
            torch.testing.assert_close(out.transpose(1, 2)[b], ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_sdpa_dropout_is_the_padded_batchs(backend):
    """Dropout draws the mask sdpa draws on the padded batch (B, H, max_len, max_len) from the
    same seed, so the nested result is the padded call's real rows."""
    lens = [5, 2, 7]
    qs, ks, vs = _qkv(lens, lens, 2, 8, 8, torch.float64)
    q, k, v = (_make(t, torch.float64, False) for t in (qs, ks, vs))
    L = max(lens)
    pad = [torch.stack([F.pad(t, (0, 0, 0, 0, 0, L - t.shape[0])) for t in ts]).transpose(1, 2)
           for ts in (qs, ks, vs)]  # fmt: skip
    keep = torch.arange(L)[None] < torch.tensor(lens)[:, None]  # (B, L)
    torch.manual_seed(11)
    out = pyattn.scaled_dot_product_attention(q, k, v, dropout_p=0.4, backend=backend)
    torch.manual_seed(11)
    ref = pyattn.scaled_dot_product_attention(*pad, keep[:, None, None, :], 0.4, backend=backend)
    torch.testing.assert_close(out.transpose(1, 2).values(), ref.transpose(1, 2)[keep])
    no_drop = pyattn.scaled_dot_product_attention(q, k, v, backend=backend)
    assert not torch.allclose(out.values(), no_drop.values())


def test_nested_ragged_head_dim_matches_torch():
    """Nested (B, j, H, D) passed untransposed is ragged at dim 1: dense attention over H per
    token, as torch."""
    qs, ks, vs = _qkv([3, 5, 2], [3, 5, 2], 4, 8, 6, torch.float64)
    q, k, v = (_nested(t) for t in (qs, ks, vs))  # (B, H, j, D)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, j, H, D)
    ours = pyattn.scaled_dot_product_attention(q, k, v)
    theirs = F.scaled_dot_product_attention(q, k, v)
    assert ours.shape == theirs.shape and ours._ragged_idx == 1
    torch.testing.assert_close(ours.values(), theirs.values())


def test_nested_noncontiguous_and_holes():
    """A non-contiguous nested layout and one with holes between the sequences (``lengths``):
    each sequence as dense sdpa computes it."""
    lens = [3, 5, 2]
    base = [torch.randn(n, 6, 3, dtype=torch.float64) for n in lens]
    q = torch.nested.nested_tensor(base, layout=torch.jagged).transpose(2, 3).transpose(1, 2)  # (B, 3, j, 6)
    assert not q.transpose(1, 2).is_contiguous()
    out = pyattn.scaled_dot_product_attention(q, q, q)
    vals = torch.randn(20, 2, 4, dtype=torch.float64)
    offsets, lengths = torch.tensor([0, 5, 10, 20]), torch.tensor([3, 2, 6])
    h = torch.nested.nested_tensor_from_jagged(vals, offsets, lengths=lengths).transpose(1, 2)
    out_h = pyattn.scaled_dot_product_attention(h, h, h)
    for b, t in enumerate(base):
        x = t.transpose(1, 2).transpose(0, 1)  # (3, L_b, 6)
        ref = F.scaled_dot_product_attention(x, x, x).transpose(0, 1)
        torch.testing.assert_close(out.transpose(1, 2)[b], ref)
        s = vals[offsets[b] : offsets[b] + lengths[b]].transpose(0, 1)  # (2, L_b, 4)
        torch.testing.assert_close(
            out_h.transpose(1, 2)[b], F.scaled_dot_product_attention(s, s, s).transpose(0, 1)
        )


def _bad_cases():
    def nt(lens, H=2, D=4, dtype=torch.float32):
        return _nested([torch.randn(n, H, D, dtype=dtype) for n in lens])

    q = nt([3, 2])
    return {
        "attn_mask": ((q, q, q), {"attn_mask": torch.ones(1, dtype=torch.bool)}),
        "dense key": ((q, torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)), {}),
        "dtype": ((nt([3, 2], dtype=torch.float64), q, q), {}),
        "heads": ((q, nt([3, 2], H=1), nt([3, 2], H=1)), {}),
        "gqa heads": ((q, nt([3, 2], H=1), nt([3, 2], H=1)), {"enable_gqa": True}),
        "head dim": ((q, nt([3, 2], D=3), nt([3, 2], D=3)), {}),
        "batch": ((q, nt([3]), nt([3])), {}),
        "ragged dims": ((q, q.transpose(1, 2), q.transpose(1, 2)), {}),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_nested_sdpa_rejects_what_torch_rejects(case):
    args, kwargs = _bad_cases()[case]
    with pytest.raises(Exception) as theirs:
        F.scaled_dot_product_attention(*args, **kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        pyattn.scaled_dot_product_attention(*args, **kwargs)
    assert "scaled_dot_product_attention" in str(ours.value)


def test_patched_torch_sdpa_takes_nested():
    qs, ks, vs = _qkv([3, 0, 4], [2, 5, 1], 2, 8, 8, torch.float32)
    q, k, v = (_make(t, torch.float32, False) for t in (qs, ks, vs))
    ref = F.scaled_dot_product_attention(q, k, v)
    with pyattn.patch_torch() as patch:
        out = F.scaled_dot_product_attention(q, k, v)
    assert patch.calls == 1 and out.shape == ref.shape
    torch.testing.assert_close(out.values(), ref.values(), rtol=1e-5, atol=1e-5)


def test_nested_all_empty_and_triton():
    """An all-empty batch gives an empty nested result (torch's CPU math path fails there); the
    Triton backend (interpreter on CPU here) agrees with the CPU one."""
    q = _nested([torch.randn(0, 2, 4) for _ in range(3)])
    out = pyattn.scaled_dot_product_attention(q, q, q)
    assert out.is_nested and out.shape[:2] == (3, 2) and out.transpose(1, 2).values().shape == (0, 2, 4)
    qs, ks, vs = _qkv([3, 0, 2], [1, 4, 2], 2, 8, 8, torch.float32)
    q, k, v = (_make(t, torch.float32, False) for t in (qs, ks, vs))
    triton = pyattn.scaled_dot_product_attention(q, k, v, backend="triton")
    ref = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(triton.values(), ref.values(), rtol=1e-5, atol=1e-5)
