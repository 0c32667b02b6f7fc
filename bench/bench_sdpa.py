"""The benchmark cases of scaled-dot-product attention (group "sdpa": pyattn's backends against
torch's SDPA, each torch backend on CUDA, flash-attn / xformers where installed, and the naive
reference) and of the nn.MultiheadAttention drop-in built on it (group "multihead_attention")."""

from __future__ import annotations

import itertools

import torch
from pyattn.bench._case import (
    DTYPES,
    TORCH_SDPA_BACKENDS,
    Case,
    importable,
    input_sets,
    op_step,
    pyattn_providers,
)


def _torch_sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, TORCH_SDPA_BACKENDS[name])


def build_sdpa(case: Case):
    import torch.nn.functional as F

    import pyattn

    d = case.dims
    B, H, L, D, causal = d["B"], d["H"], d["L"], d["D"], bool(d["causal"])
    dtype = DTYPES[case.dtype]
    bshd = case.provider in ("flash-attn", "xformers")  # these take (B, L, H, D)

    def make_one():
        shape = (B, L, H, D) if bshd else (B, H, L, D)
        return tuple(torch.randn(shape, device=case.device, dtype=dtype) for _ in range(3))

    sets = input_sets(make_one, 3 * B * H * L * D * dtype.itemsize, case.device)
    p = case.provider
    if p == "reference":

        def fn(q, k, v):
            return pyattn.reference.scaled_dot_product_attention(q, k, v, is_causal=causal)

    elif p.startswith("pyattn-"):
        backend = p.removeprefix("pyattn-")

        def fn(q, k, v):
            return pyattn.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend)

    elif p == "torch":

        def fn(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    elif p in TORCH_SDPA_BACKENDS:
        from torch.nn.attention import sdpa_kernel

        sdp = _torch_sdpa_backend(p)

        def fn(q, k, v):
            with sdpa_kernel(sdp):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    elif p == "flash-attn":
        from flash_attn import flash_attn_func

        def fn(q, k, v):
            return flash_attn_func(q, k, v, causal=causal)

    elif p == "xformers":
        import xformers.ops as xops

        bias = xops.LowerTriangularMask() if causal else None

        def fn(q, k, v):
            return xops.memory_efficient_attention(q, k, v, attn_bias=bias)

    else:
        raise ValueError(f"unknown sdpa provider {p!r}")
    return op_step(fn, sets, case.mode, range(3))


def sdpa_cases(device: str, suite: str, dtypes: list[str]) -> list[Case]:
    if device == "cpu":
        providers = ["torch", "reference"] + pyattn_providers(device)
        dtypes = dtypes or ["fp32"]
        if suite == "quick":
            grid = [(1, 2, 32, 16, False), (1, 2, 64, 16, True)]
        elif suite == "default":
            # one B along L (the lines compare like with like), B=2 (--full: B=4): B*H = 16
            # (batch, head) pairs keep both threads busy; the naive reference stops at L=1024
            grid = [(2, 8, L, 64, c) for L in (256, 1024, 2048) for c in (False, True)]
        else:
            grid = [(4, 8, L, 64, c) for L in (256, 1024, 2048) for c in (False, True)]
    else:
        providers = ["torch", "reference"] + pyattn_providers(device)
        providers += list(TORCH_SDPA_BACKENDS)
        providers += [
            m for m, mod in (("flash-attn", "flash_attn"), ("xformers", "xformers")) if importable(mod)
        ]
        # most wanted first: a run cut short by its time budget keeps the headline rows
        dtypes = dtypes or (["bf16"] if suite != "full" else ["bf16", "fp16"])
        if suite == "quick":
            grid = [(2, 2, 128, 64, c) for c in (False, True)]
        else:
            lengths = (1024, 4096, 16384) if suite == "default" else (512, 1024, 2048, 4096, 8192, 16384)
            heads_dims = ((16, 128),) if suite == "default" else ((16, 128), (32, 64))
            # 16k tokens per batch, H*D = 2048 (the flash-attention paper's benchmark grid)
            grid = [(16384 // L, H, L, D, c) for (H, D) in heads_dims for L in lengths for c in (False, True)]
    cases = []
    for dt, (B, H, L, D, causal), mode, prov in itertools.product(
        dtypes, grid, ("fwd", "fwd+bwd"), providers
    ):
        if suite == "default" and device == "cpu" and prov == "reference" and L > 1024:
            continue  # the naive path at L=2048 (5 s a fwd+bwd run) says what L=1024 says
        if prov == "torch-math" and L > 4096:
            continue  # the math backend is another naive reference; one is enough past 4k
        fwd = 4.0 * B * H * L * L * D * (0.5 if causal else 1.0)
        elt = DTYPES[dt].itemsize
        naive = (3 if mode == "fwd" else 6) * B * H * L * L * max(elt, 4)
        cases.append(
            Case(
                group="sdpa",
                provider=prov,
                baseline="torch",
                mode=mode,
                shape=(("B", B), ("H", H), ("L", L), ("D", D), ("causal", causal)),
                dtype=dt,
                device=device,
                seq_len=L,
                flops=fwd * (1.0 if mode == "fwd" else 3.5),
                mem_estimate=naive if prov in ("reference", "torch-math") else 0.0,
                builder=build_sdpa,
            )
        )
    return cases


def build_mha(case: Case):
    d = case.dims
    B, L, E, heads = d["B"], d["L"], d["E"], d["heads"]
    dtype = DTYPES[case.dtype]
    kw = {"device": case.device, "dtype": dtype}
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(E, heads, batch_first=True, **kw)
    if case.provider == "torch.nn.MHA":
        module = ref
    else:
        from pyattn.nn import MultiheadAttention

        module = MultiheadAttention(E, heads, batch_first=True, **kw)
        module.load_state_dict(ref.state_dict())
    if case.mode == "fwd":
        module.eval()  # lets torch take its inference fast path, as a user's eval() would

    def fn(x):
        return module(x, x, x, need_weights=False)[0]

    sets = input_sets(lambda: (torch.randn(B, L, E, **kw),), B * L * E * dtype.itemsize, case.device)
    return op_step(fn, sets, case.mode, [0])


def mha_cases(device: str, suite: str, dtypes: list[str]) -> list[Case]:
    providers = ["torch.nn.MHA"] + (["pyattn.nn.MHA"] if importable("pyattn.nn") else [])
    if len(providers) == 1:
        print("note: pyattn.nn.MultiheadAttention is not installed here; mha runs torch's alone")
    if device == "cpu":
        dtypes = dtypes or ["fp32"]
        shapes = {"quick": [(2, 32, 32, 2)], "default": [(4, 512, 512, 8)]}.get(
            suite, [(4, L, 512, 8) for L in (256, 512, 1024)]
        )
    else:
        dtypes = dtypes or ["bf16"]
        shapes = {"quick": [(2, 64, 64, 2)], "default": [(8, 2048, 1024, 16)]}.get(
            suite, [(16384 // L, L, 2048, 16) for L in (512, 2048, 8192)]
        )
    cases = []
    for dt, (B, L, E, heads), mode, prov in itertools.product(dtypes, shapes, ("fwd", "fwd+bwd"), providers):
        fwd = 8.0 * B * L * E * E + 4.0 * B * L * L * E
        cases.append(
            Case(
                group="multihead_attention",
                provider=prov,
                baseline="torch.nn.MHA",
                mode=mode,
                shape=(("B", B), ("L", L), ("E", E), ("heads", heads)),
                dtype=dt,
                device=device,
                seq_len=L,
                flops=fwd * (1.0 if mode == "fwd" else 3.0),
                builder=build_mha,
            )
        )
    return cases


# -- the pytest-benchmark entry: `pytest bench/` (bench/conftest.py parametrises `case` from
# each test's `cases`: the case functions of this file)


def test_sdpa(benchmark, case):
    from pyattn.bench._pytest_bench import run_case

    run_case(benchmark, case)


test_sdpa.cases = (sdpa_cases,)


def test_multihead_attention(benchmark, case):
    from pyattn.bench._pytest_bench import run_case

    run_case(benchmark, case)


test_multihead_attention.cases = (mha_cases,)
