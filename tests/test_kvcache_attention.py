"""pyattn.kvcache_attention (decoding against a KV cache, appended in place) against the float64
reference, and against the reference sdpa over the concatenated sequence, on every backend usable
here (triton through the interpreter on CPU tensors, so its shapes stay small; cuda on a GPU only).
"""

from __future__ import annotations

import importlib
import random

import pytest
import torch
import torch.utils._python_dispatch
from helpers import HAS_CUDA, assert_close_to_ref, backend_params

import pyattn
from pyattn import reference
from pyattn.ops.errors import InputError, InputTypeError

BACKENDS = backend_params(cpu=True, triton=True, cuda=True)
kv = importlib.import_module("pyattn.ops.kvcache_attention")
FWD = torch.ops.pyattn.kvcache_attention_fwd
HALF = (torch.float16, torch.bfloat16)


def small(backend) -> bool:
    return backend == "triton" and not HAS_CUDA


def dtypes_for(backend):
    if backend == "cpu":
        return [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    return [torch.float32, torch.bfloat16, torch.float16] if HAS_CUDA else [torch.float32]


class Case:
    """One call's inputs in float64 (the master copy): query, new key/value, a dense cache and,
    when ``page_size`` is set, the same cache contents laid out in shuffled pages."""

    def __init__(
        self, B, Hq, Hkv, Lq, D, L_max, seqlens, Dv=None, page_size=None, append=True, extra_pages=3
    ):
        Dv = D if Dv is None else Dv
        self.B, self.Hq, self.Hkv, self.Lq, self.D, self.Dv, self.L_max = B, Hq, Hkv, Lq, D, Dv, L_max
        self.seqlens = torch.tensor(seqlens, dtype=torch.int32)
        self.q = torch.randn(B, Hq, Lq, D, dtype=torch.float64)
        self.key = torch.randn(B, Hkv, Lq, D, dtype=torch.float64) if append else None
        self.value = torch.randn(B, Hkv, Lq, Dv, dtype=torch.float64) if append else None
        self.k_dense = torch.randn(B, Hkv, L_max, D, dtype=torch.float64)
        self.v_dense = torch.randn(B, Hkv, L_max, Dv, dtype=torch.float64)
        self.page_size = page_size
        self.block_table = None
        if page_size is not None:
            per_seq = -(-L_max // page_size)
            n_pages = B * per_seq + extra_pages
            order = torch.randperm(n_pages)
            self.block_table = order[: B * per_seq].view(B, per_seq).to(torch.int32)
            self.k_pages = torch.randn(n_pages, Hkv, page_size, D, dtype=torch.float64)
            self.v_pages = torch.randn(n_pages, Hkv, page_size, Dv, dtype=torch.float64)
            j = torch.arange(L_max)
            for b in range(B):
                pages, rows = self.block_table[b, j // page_size].long(), j % page_size
                self.k_pages[pages, :, rows] = self.k_dense[b].transpose(0, 1)  # (L_max, Hkv, D)
                self.v_pages[pages, :, rows] = self.v_dense[b].transpose(0, 1)

    def caches(self, paged, dtype, device="cpu"):
        k, v = (self.k_pages, self.v_pages) if paged else (self.k_dense, self.v_dense)
        return k.to(device=device, dtype=dtype).clone(), v.to(device=device, dtype=dtype).clone()

    def inputs(self, dtype, device="cpu", paged=False):
        """(query, k_cache, v_cache, cache_seqlens, key, value, block_table) in ``dtype``."""
        kc, vc = self.caches(paged, dtype, device)
        new = [None if t is None else t.to(device=device, dtype=dtype) for t in (self.key, self.value)]
        bt = self.block_table.to(device) if paged else None
        return self.q.to(device=device, dtype=dtype), kc, vc, self.seqlens.to(device), new[0], new[1], bt


def random_seqlens(B, L_max, Lq, specials=(0,)):
    """B filled lengths in [0, L_max - Lq], with 0 and L_max - Lq (a full cache after the append)
    among them when B allows."""
    top = L_max - Lq
    lens = [random.randint(0, top) for _ in range(B)]
    for slot, n in zip(random.sample(range(B), min(B, len(specials) + 1)), (*specials, top), strict=False):
        lens[slot] = n
    return lens


def baseline(case, dtype, **kw):
    """(ref64, ref_lowp): the float64 reference, and the reference in ``dtype`` (half inputs: in
    float32 on the rounded inputs, rounded once: what an ideal float32-accumulating kernel gives)."""
    # the float64 reference depends on the case and the variant only: computed once per test
    key = tuple(
        (n, tuple(t.flatten().tolist()) if isinstance(t, torch.Tensor) else t) for n, t in sorted(kw.items())
    )
    memo = case.__dict__.setdefault("_ref64", {})
    if key not in memo:
        memo[key] = reference.kvcache_attention(*_ref_args(case, torch.float64), **kw)
    ref64 = memo[key]
    if dtype == torch.float64:
        return ref64, ref64
    low = torch.float32 if dtype in HALF else dtype
    args = [
        None if t is None else t.to(dtype).to(low) if t.is_floating_point() else t
        for t in _ref_args(case, dtype)
    ]
    return ref64, reference.kvcache_attention(*args, **kw).to(dtype)


def _ref_args(case, dtype):
    q, kc, vc, sl, k, v, _ = case.inputs(dtype)
    return q, kc, vc, sl, k, v


def check(case, backend, device, dtype, paged=False, **kw):
    """Runs the op, checks it against the reference under the test rule and checks the append;
    returns the output."""
    q, kc, vc, sl, k, v, bt = case.inputs(dtype, device, paged)
    kc0, vc0 = kc.clone(), vc.clone()
    out = pyattn.kvcache_attention(q, kc, vc, sl, k, v, block_table=bt, backend=backend, **kw)
    assert out.dtype == dtype and out.shape == (case.B, case.Hq, case.Lq, case.Dv)
    assert torch.isfinite(out).all()
    rkw = {
        n: kw[n] for n in ("is_causal", "scale", "window_size", "softcap", "sinks", "alibi_slopes") if n in kw
    }
    rkw = {n: (t.cpu().double() if isinstance(t, torch.Tensor) else t) for n, t in rkw.items()}
    ref64, ref_lowp = baseline(case, dtype, **rkw)
    assert_close_to_ref(f"out ({backend}, {dtype}, paged={paged})", out.cpu(), ref_lowp, ref64)
    check_append(case, kc, vc, kc0, vc0, bt)
    return out


def check_append(case, kc, vc, kc0, vc0, bt):
    """The new tokens sit at cache_seqlens[b] + t, bit for bit, and nothing else changed."""
    kc, vc, kc0, vc0 = kc.cpu(), vc.cpu(), kc0.cpu(), vc0.cpu()
    want_k, want_v = kc0.clone(), vc0.clone()
    if case.key is not None:
        for b in range(case.B):
            for t in range(case.Lq):
                j = int(case.seqlens[b]) + t
                page, row = (
                    (int(bt[b, j // case.page_size]), j % case.page_size) if bt is not None else (b, j)
                )
                want_k[page, :, row] = case.key[b, :, t].to(kc.dtype)
                want_v[page, :, row] = case.value[b, :, t].to(vc.dtype)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v), "the caches differ from the expected append"


# -- numerics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("group", [1, 4, 8], ids=["mha", "gqa4", "gqa8"])
@pytest.mark.parametrize("Lq", [1, 3], ids=["decode", "block"])
def test_ragged_batch_against_reference(backend, device, group, Lq):
    # 160: five key blocks of 32 on cpu, partial last blocks at the random lengths
    L_max = 40 if small(backend) else 160
    Hkv = 2 if group < 8 else 1
    B = 3
    case = Case(B, Hkv * group, Hkv, Lq, 32, L_max, random_seqlens(B, L_max, Lq))
    for dtype in dtypes_for(backend):
        check(case, backend, device, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_append_then_attend_is_attention_over_the_concatenation(backend, device):
    # the reference sdpa (lower-right causal, GQA) over cache[:n] ++ new equals the op's output
    L_max = 48 if small(backend) else 700
    B, Hq, Hkv, Lq, D = 3, 8, 2, 4, 64
    case = Case(B, Hq, Hkv, Lq, D, L_max, random_seqlens(B, L_max, Lq))
    for dtype in dtypes_for(backend):
        q, kc, vc, sl, k, v, _ = case.inputs(dtype, device)
        out = pyattn.kvcache_attention(q, kc, vc, sl, k, v, backend=backend).cpu()
        for b in range(B):
            n = int(case.seqlens[b])
            keys = torch.cat([case.k_dense[b, :, :n], case.key[b]], dim=1)  # (Hkv, n + Lq, D)
            vals = torch.cat([case.v_dense[b, :, :n], case.value[b]], dim=1)
            ref64 = reference.scaled_dot_product_attention(
                case.q[b], keys, vals, is_causal=2, enable_gqa=True
            )
            low = torch.float32 if dtype in HALF else dtype
            ins = [t.to(dtype).to(low) for t in (case.q[b], keys, vals)]
            ref_low = reference.scaled_dot_product_attention(*ins, is_causal=2, enable_gqa=True).to(dtype)
            assert_close_to_ref(f"sequence {b} ({dtype})", out[b], ref_low, ref64)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("page_size", [1, 16, 256])
def test_paged_equals_dense(backend, device, page_size):
    # shuffled pages, partial last pages (L_max and the lengths are not multiples of the page)
    L_max = (37 if small(backend) else 301) if page_size < 256 else (270 if small(backend) else 600)
    B, Lq = (2 if small(backend) else 3), 2
    case = Case(B, 8, 2, Lq, 32, L_max, random_seqlens(B, L_max, Lq), page_size=page_size)
    dtypes = [torch.float32] if small(backend) else dtypes_for(backend)[:2]
    for dtype in dtypes:
        dense = check(case, backend, device, dtype, paged=False, num_splits=3)
        paged = check(case, backend, device, dtype, paged=True, num_splits=3)
        if backend == "cpu":
            # the same keys in the same blocks: only the addresses differ
            assert torch.equal(dense, paged)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_every_split_count_equals_no_split(backend, device):
    L_max = 64 if small(backend) else 1100
    B, Lq = 2, 1
    case = Case(B, 4, 1, Lq, 32, L_max, random_seqlens(B, L_max, Lq, specials=(1,)))
    counts = [3] if small(backend) else [2, 5, 17, 200]
    one = check(case, backend, device, torch.float32, num_splits=1)
    for n in counts:
        out = check(case, backend, device, torch.float32, num_splits=n)
        torch.testing.assert_close(out, one, rtol=2e-6, atol=2e-6)
    auto = check(case, backend, device, torch.float32, num_splits=0)
    torch.testing.assert_close(auto, one, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "variant",
    ["window", "window0", "window_right", "softcap", "sinks", "sinks_extreme", "alibi", "alibi_batch", "all",
     "not_causal"],
)  # fmt: skip
def test_variants(backend, device, variant):
    if small(backend) and variant in ("window", "softcap", "sinks", "alibi"):
        # the interpreter is slow: "all" runs these four together there (each alone on cpu, and
        # on a GPU)
        pytest.skip("covered by 'all' under the Triton interpreter")
    L_max = 40 if small(backend) else 200  # 7 key blocks: 3 splits of whole blocks
    B, Hq, Hkv, Lq = 3, 8, 2, 3
    case = Case(B, Hq, Hkv, Lq, 32, L_max, random_seqlens(B, L_max, Lq))
    kw: dict = {}
    if variant == "window":
        kw["window_size"] = (random.randint(1, L_max // 3), -1)
    elif variant == "window0":
        kw["window_size"] = (0, 0)
    elif variant == "window_right":
        kw.update(is_causal=False, window_size=(5, 2))
    elif variant == "softcap":
        kw.update(softcap=random.uniform(0.5, 5.0), scale=1.0)
    elif variant == "sinks":
        kw["sinks"] = torch.randn(Hq, device=device)
    elif variant == "sinks_extreme":
        kw["sinks"] = torch.tensor([30.0, -30.0, 0.0, 1e4, -1e4, 2.0, -2.0, 5.0], device=device)
    elif variant == "alibi":
        kw["alibi_slopes"] = torch.rand(Hq, device=device) * 0.5
    elif variant == "alibi_batch":
        kw["alibi_slopes"] = torch.rand(B, Hq, device=device) * 0.5
    elif variant == "all":
        kw.update(window_size=(7, -1), softcap=3.0, sinks=torch.randn(Hq, device=device),
                  alibi_slopes=torch.rand(Hq, device=device) * 0.2)  # fmt: skip
    elif variant == "not_causal":
        kw["is_causal"] = False
    for dtype in [torch.float32] if small(backend) else dtypes_for(backend)[:2]:
        for n in (3,) if small(backend) else (1, 3):
            check(case, backend, device, dtype, num_splits=n, **kw)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_no_new_tokens_odd_head_dims(backend, device):
    # key/value None: the cache as it is (cache_seqlens keys); a row left of the first key
    # (cache_seqlens < Lq) sees nothing and gives zeros. D = 59, Dv = 24.
    L_max = 30 if small(backend) else 200
    B, Lq = 4, 3
    lens = random_seqlens(B, L_max, 0, specials=(0, 1, 2))
    case = Case(B, 4, 2, Lq, 59, L_max, lens, Dv=24, append=False)
    out = check(case, backend, device, torch.float32, scale=0.3)
    for b in range(B):
        n = int(case.seqlens[b])
        if n < Lq:
            assert (out[b, :, : Lq - n] == 0).all()


def test_transformers_layout_strided_cache():
    # a cache that is a view (a slice of a larger buffer, heads strided): written in place
    B, Hq, Hkv, Lq, D, L_max = 2, 4, 2, 1, 16, 50
    case = Case(B, Hq, Hkv, Lq, D, L_max, random_seqlens(B, L_max, Lq))
    big_k = torch.zeros(B, L_max + 5, Hkv, D)
    big_v = torch.zeros(B, L_max + 5, Hkv, D)
    kc, vc = big_k[:, :L_max].transpose(1, 2), big_v[:, :L_max].transpose(1, 2)  # (B, Hkv, L_max, D)
    kc.copy_(case.k_dense)
    vc.copy_(case.v_dense)
    assert not kc.is_contiguous()
    out = pyattn.kvcache_attention(case.q.float(), kc, vc, case.seqlens, case.key.float(), case.value.float())
    ref64, ref_low = baseline(case, torch.float32)
    assert_close_to_ref("strided cache", out, ref_low, ref64)
    for b in range(B):
        n = int(case.seqlens[b])
        assert torch.equal(big_k[b, n : n + Lq].transpose(0, 1), case.key[b].float())
    assert (big_k[:, L_max:] == 0).all()


def test_lse_includes_every_split_and_the_sink():
    case = Case(2, 4, 2, 1, 16, 900, [700, 899])
    q, kc, vc, sl, k, v, _ = case.inputs(torch.float32)
    sinks = torch.randn(4)
    outs = []
    for n in (1, 4):
        out, lse = FWD(q, kc.clone(), vc.clone(), sl, k, v, None, sinks, None, True, 0.25, -1, -1, 0.0, n)
        outs.append((out, lse))
        full_k = torch.cat([case.k_dense[0, :, :700], case.key[0]], 1).repeat_interleave(2, 0)
        s = (case.q[0] @ full_k.transpose(-1, -2)) * 0.25  # (Hq, 1, 701)
        want = torch.logsumexp(torch.cat([s, sinks.double()[:, None, None]], -1), -1)
        torch.testing.assert_close(lse[0].double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0][0], outs[1][0])


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops a call dispatches."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdpa_decode_step_runs_the_split_k_kernel(dtype):
    # pyattn.scaled_dot_product_attention with a short query over a long key (a decode step,
    # transformers' sdpa path) takes the KV-cache kernel on CPU, with sdpa's semantics
    B, Hq, Hkv, Lk, D = 2, 8, 2, 700, 32
    q64, k64, v64 = (
        torch.randn(B, Hq, 1, D).double(),
        torch.randn(B, Hkv, Lk, D).double(),
        torch.randn(B, Hkv, Lk, D).double(),
    )
    ref64 = reference.scaled_dot_product_attention(q64, k64, v64, enable_gqa=True)
    low = torch.float32 if dtype in HALF else dtype
    ref_low = reference.scaled_dot_product_attention(
        *(t.to(dtype).to(low) for t in (q64, k64, v64)), enable_gqa=True
    )
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    with torch.no_grad(), _OpLog() as log:
        out = pyattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="cpu")
    assert "pyattn.kvcache_attention_fwd.default" in log.names, log.names
    assert_close_to_ref("sdpa decode step", out, ref_low.to(dtype), ref64)
    # torch's is_causal (upper-left: query 0 sees key 0 only) and calls that need a gradient stay
    # on the sdpa kernels
    with torch.no_grad(), _OpLog() as log:
        causal = pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend="cpu")
    assert "pyattn.kvcache_attention_fwd.default" not in log.names
    assert torch.equal(causal[:, :, 0].float(), v[:, :, :1].repeat_interleave(4, 1)[:, :, 0].float())
    with _OpLog() as log:
        pyattn.scaled_dot_product_attention(q.requires_grad_(), k, v, enable_gqa=True, backend="cpu")
    assert "pyattn.kvcache_attention_fwd.default" not in log.names


# -- bad input ---------------------------------------------------------------------------------


def _bad_cases():
    B, Hq, Hkv, Lq, D, L = 2, 4, 2, 2, 8, 10
    good = dict(
        query=torch.randn(B, Hq, Lq, D),
        k_cache=torch.randn(B, Hkv, L, D),
        v_cache=torch.randn(B, Hkv, L, D),
        cache_seqlens=torch.tensor([3, 8], dtype=torch.int32),
        key=torch.randn(B, Hkv, Lq, D),
        value=torch.randn(B, Hkv, Lq, D),
    )
    paged = dict(good, k_cache=torch.randn(5, Hkv, 4, D), v_cache=torch.randn(5, Hkv, 4, D),
                 block_table=torch.tensor([[0, 1, 2], [3, 4, 0]], dtype=torch.int32))  # fmt: skip
    return [
        (
            "too_short",
            dict(good, cache_seqlens=torch.tensor([3, 9], dtype=torch.int32)),
            InputError,
            "too short",
        ),
        (
            "negative_len",
            dict(good, cache_seqlens=torch.tensor([-1, 0], dtype=torch.int32)),
            InputError,
            ">= 0",
        ),
        ("seqlens_int64", dict(good, cache_seqlens=torch.tensor([3, 8])), InputTypeError, "cache_seqlens"),
        (
            "seqlens_shape",
            dict(good, cache_seqlens=torch.tensor([3], dtype=torch.int32)),
            InputError,
            "cache_seqlens",
        ),
        ("cache_dtype", dict(good, k_cache=good["k_cache"].double()), InputTypeError, "k_cache"),
        ("key_dtype", dict(good, key=good["key"].half()), InputTypeError, "key"),
        ("key_shape", dict(good, key=torch.randn(B, Hkv, Lq + 1, D)), InputError, "key"),
        ("key_alone", dict(good, value=None), InputError, "together"),
        (
            "heads",
            dict(
                good,
                k_cache=torch.randn(B, 3, L, D),
                v_cache=torch.randn(B, 3, L, D),
                key=torch.randn(B, 3, Lq, D),
                value=torch.randn(B, 3, Lq, D),
            ),
            InputError,
            "divide",
        ),
        (
            "cache_last_dim",
            dict(good, k_cache=torch.randn(B, Hkv, D, L).transpose(2, 3)),
            InputError,
            "contiguous",
        ),
        (
            "dense_batch",
            dict(good, k_cache=torch.randn(3, Hkv, L, D), v_cache=torch.randn(3, Hkv, L, D)),
            InputError,
            "k_cache",
        ),
        (
            "page_past_end",
            dict(paged, block_table=torch.tensor([[0, 1, 2], [3, 5, 0]], dtype=torch.int32)),
            InputError,
            "block_table",
        ),
        (
            "page_negative",
            dict(paged, block_table=torch.tensor([[0, -1, 2], [3, 4, 0]], dtype=torch.int32)),
            InputError,
            "block_table",
        ),
        (
            "paged_too_short",
            dict(paged, cache_seqlens=torch.tensor([3, 11], dtype=torch.int32)),
            InputError,
            "too short",
        ),
        ("table_dtype", dict(paged, block_table=paged["block_table"].long()), InputTypeError, "block_table"),
        ("window", dict(good, window_size=(-2, 0)), InputError, "window_size"),
        ("softcap", dict(good, softcap=float("inf")), InputError, "softcap"),
        ("sinks_shape", dict(good, sinks=torch.randn(Hq + 1)), InputError, "sinks"),
        ("sinks_dtype", dict(good, sinks=torch.zeros(Hq, dtype=torch.int32)), InputTypeError, "sinks"),
        ("alibi_shape", dict(good, alibi_slopes=torch.randn(Hq, 1)), InputError, "alibi_slopes"),
        ("num_splits", dict(good, num_splits=-1), InputError, "num_splits"),
        ("grad", dict(good, query=torch.randn(B, Hq, Lq, D, requires_grad=True)), InputError, "forward only"),
    ]


@pytest.mark.parametrize("name,kw,cls,words", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_is_refused_and_the_cache_untouched(name, kw, cls, words):
    kc0, vc0 = kw["k_cache"].clone(), kw["v_cache"].clone()
    with pytest.raises(cls, match=words):
        pyattn.kvcache_attention(**kw)
    assert torch.equal(kw["k_cache"], kc0) and torch.equal(kw["v_cache"], vc0)


def test_cpp_op_refuses_out_of_bounds_positions():
    # the one-line guards of the C++ op itself (a direct torch.ops call, no Python validation)
    q, kc, vc = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    with pytest.raises(RuntimeError, match="cache rows"):
        FWD(
            q, kc, vc, torch.tensor([4], dtype=torch.int32), k, v, None, None, None, True, 1.0, -1, -1, 0.0, 0
        )
    bt = torch.tensor([[7]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="not a page"):
        FWD(q, kc, vc, torch.tensor([1], dtype=torch.int32), k, v, bt, None, None, True, 1.0, -1, -1, 0.0, 0)


# -- registration, compile -------------------------------------------------------------------


def _opcheck_args(paged, device="cpu"):
    B, Hq, Hkv, Lq, D = 2, 4, 2, 2, 8
    q = torch.randn(B, Hq, Lq, D, device=device)
    k, v = torch.randn(B, Hkv, Lq, D, device=device), torch.randn(B, Hkv, Lq, D, device=device)
    sl = torch.tensor([3, 0], dtype=torch.int32, device=device)
    if paged:
        kc, vc = torch.randn(6, Hkv, 4, D, device=device), torch.randn(6, Hkv, 4, D, device=device)
        bt = torch.tensor([[5, 2], [0, 3]], dtype=torch.int32, device=device)
    else:
        kc, vc, bt = torch.randn(B, Hkv, 9, D, device=device), torch.randn(B, Hkv, 9, D, device=device), None
    sinks = torch.randn(Hq, device=device)
    return (q, kc, vc, sl, k, v, bt, sinks, None, True, 0.35, 4, -1, 2.0, 2)


def test_registered_for_cpu_and_for_cuda_when_built_with_it():
    name = "pyattn::kvcache_attention_fwd"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    # csrc/cuda/kvcache_attention.cu compiles, links and registers in every CUDA build
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") == pyattn._backend.cuda_compiled()
    # the schema declares the in-place append
    schema = FWD.default._schema
    assert [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write] == [
        "k_cache",
        "v_cache",
    ]


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_opcheck(paged):
    torch.library.opcheck(FWD, _opcheck_args(paged))


@pytest.mark.skipif(not pyattn._backend.have_triton(), reason="needs triton")
def test_opcheck_triton():
    device = "cuda" if HAS_CUDA else "cpu"
    import pyattn.kernels.kvcache_attention  # noqa: F401  (registers the Triton twin)

    # under the interpreter the AOT/compile checks cannot run (as for sdpa's Triton ops)
    utils = None if HAS_CUDA else ("test_schema", "test_autograd_registration", "test_faketensor")
    kw = {} if utils is None else {"test_utils": utils}
    for paged in (False, True):
        torch.library.opcheck(
            torch.ops.pyattn.kvcache_attention_fwd_triton, _opcheck_args(paged, device), **kw
        )


# Compiles the split and combine kernels' headline configs for sm_90 (no GPU needed): the decode
# step of the bench (Hq=32, Hkv=8, D=128, Lq=1: 4 packed rows), fp16 and bf16, dense and paged;
# the fixed and the widest kept split configs and the combine kernel, with no stack frame (spills) and shared memory
# within a block's 227 KB. In a subprocess: the interpreter (TRITON_INTERPRET=1) is off there.
_SM90_PROBE = """
import json, torch, triton
from pyattn.bench.triton_resources import compile_config
from pyattn.kernels import kvcache_attention as kv
rows = []
for dt in (torch.float16, torch.bfloat16):
    for paged in (False, True):
        t = lambda d=dt: torch.empty(16, dtype=d)
        i32, f32 = (lambda: torch.empty(16, dtype=torch.int32)), (lambda: torch.empty(16, dtype=torch.float32))
        named = dict(Q=t(), KC=t(), VC=t(), SEQLENS=i32(), TABLE=i32(), ALIBI=f32(), PART_ACC=f32(), PART_M=f32(),
            PART_L=f32(), stride_kp=8 * 4096 * 128, stride_kh=4096 * 128, stride_kr=128, stride_vp=8 * 4096 * 128,
            stride_vh=4096 * 128, stride_vr=128, stride_bt=64, stride_alibi_b=0, Hq=32, Hkv=8, Lq=1, R=4,
            n_split=4, page_size=256, scale=0.1, softcap=0.0, window_left=-1, window_right=-1, HEAD_DIM=128,
            HEAD_DIM_V=128, NEW_TOKENS=True, PAGED=paged, IS_CAUSAL=True, HAS_SOFTCAP=False, HAS_ALIBI=False,
            UPCAST=False, DOT_PREC=None, BLOCK_R=16, BLOCK_D=128, BLOCK_DV=128)
        kept = kv._split.kept(named)
        # the fixed config (PYATTN_TRITON_AUTOTUNE=0) and, for fp16, the widest kept tile
        picks = kept[:1] + ([max(kept, key=lambda c: c.kwargs["BLOCK_N"] * 8 // c.num_warps)] if dt == torch.float16 else [])
        for cfg in picks:
            res, _ = compile_config(kv._split_kernel, named, cfg, 90)
            rows.append(dict(kernel="split", dtype=str(dt), paged=paged, config=str(cfg), **res))
    named = dict(PART_ACC=torch.empty(16), PART_M=torch.empty(16), PART_L=torch.empty(16), SINKS=torch.empty(16),
        OUT=torch.empty(16, dtype=dt), LSE=torch.empty(16), Hq=32, Hkv=8, Lq=1, R=4, n_split=4, HEAD_DIM_V=128,
        HAS_SINKS=True, BLOCK_S=4, BLOCK_DV=128)
    res, _ = compile_config(kv._combine_kernel, named, triton.Config({}, num_warps=4, num_stages=1), 90)
    rows.append(dict(kernel="combine", dtype=str(dt), paged=False, config="w4", **res))
print(json.dumps(rows))
"""


@pytest.mark.skipif(not pyattn._backend.have_triton(), reason="needs triton")
def test_triton_headline_configs_compile_clean_for_sm90():
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _SM90_PROBE], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in rows} == {"split", "combine"} and len(rows) >= 6
    bad = [r for r in rows if r["stack"] > 0 or r["shared"] > 227 * 1024]
    assert not bad, bad


def test_torch_compile_fullgraph():
    def step(q, kc, vc, sl, k, v):
        out = pyattn.kvcache_attention(torch.tanh(q), kc, vc, sl, k, v, softcap=4.0, backend="cpu")
        return out * 2

    case = Case(2, 8, 2, 1, 16, 64, [10, 63])
    # inductor only: it runs the same functionalised graph as aot_eager, then its own codegen
    for backend in ("inductor",):
        compiled = torch.compile(step, fullgraph=True, backend=backend)
        a, b = case.inputs(torch.float32)[:6], case.inputs(torch.float32)[:6]
        out_c, out_e = compiled(*a), step(*b)
        torch.testing.assert_close(out_c, out_e)
        # the append happened under compile too (the schema declares the mutation)
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
