"""The benchmark registry: every case is op x provider x mode x shape x dtype x device.

One definition serves both front ends: ``pyattn bench`` (bench/cli.py) and the pytest-benchmark
files (bench/bench_*.py). A case knows its baseline (the provider its speed-up is measured
against, in the same run), its FLOP count, and how to build a ``step()`` that runs it once.

FLOP counts (what TFLOP/s means in every table):
- scaled-dot-product attention: flash-attention's count, ``4*B*H*Lq*Lk*D`` forward, halved
  for causal; backward = 2.5x forward, so forward+backward = 3.5x forward.
- additive attention: ``B*Tq*Tk*H`` tanh evaluations (one FLOP each; the add and the dot with
  ``v`` are not counted) + ``2*B*Tq*Tk*Dv`` for the weighted sum of values; backward = 2.5x
  forward by the same convention. Rows also carry the tanh rate (tanh/s) by itself.
- varlen attention: the sdpa count of the real (unpadded) sequences, ``sum_b 4*H*L_b^2*D``, for
  every provider (padded ones included): TFLOP/s is useful work.
- nn.MultiheadAttention: the four projections ``8*B*L*E^2`` + the attention core above.
- models: not counted (the tables give time, speed-up and memory).
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

# CLI op name -> the kernel/model name written in results.
GROUPS = {
    "additive": "additive_attention",
    "sdpa": "sdpa",
    "mha": "multihead_attention",
    "varlen": "varlen_attention",
    "bert": "bert",
    "transformer": "transformer",
    "seq2seq": "seq2seq",
}
SUITES = ("quick", "default", "full", "headline")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}

# torch SDPA backends measured one by one on CUDA (torch.nn.attention.SDPBackend member names).
TORCH_SDPA_BACKENDS = {
    "torch-flash": "FLASH_ATTENTION",
    "torch-efficient": "EFFICIENT_ATTENTION",
    "torch-cudnn": "CUDNN_ATTENTION",
    "torch-math": "MATH",
}


@dataclass(eq=False)
class Case:
    """One measurement. ``shape`` is an ordered tuple of (name, value) pairs."""

    group: str  # CLI op name (GROUPS key)
    provider: str
    baseline: str  # provider whose time this one is divided into, measured in the same run
    mode: str  # "fwd", "fwd+bwd", "train" or "decode"
    shape: tuple[tuple[str, Any], ...]
    dtype: str
    device: str
    seq_len: int  # the x axis of the plots
    flops: float | None = None
    tanh: float | None = None  # tanh evaluations per step (additive attention)
    mem_estimate: float = 0.0  # bytes a naive path needs, to skip instead of exhausting host RAM
    builder: Callable[[Case], Callable[[], Any]] | None = field(default=None, repr=False)

    @property
    def kernel(self) -> str:
        return GROUPS[self.group]

    @property
    def dims(self) -> dict[str, Any]:
        return dict(self.shape)

    @property
    def shape_str(self) -> str:
        return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.shape)

    @property
    def key(self) -> tuple:
        """Rows with the same key are one comparison (a baseline and its rivals)."""
        return (self.kernel, self.mode, self.shape_str, self.dtype, self.device)

    @property
    def id(self) -> str:
        return f"{self.kernel}|{self.provider}|{self.mode}|{self.shape_str}|{self.dtype}|{self.device}"

    def make(self) -> Callable[[], Any]:
        """Builds the inputs and returns a function that runs the case once."""
        assert self.builder is not None
        return self.builder(self)


# ---------------------------------------------------------------------------------------------
# Step construction shared by the op cases


def _input_sets(make_one: Callable[[], tuple], set_bytes: int, device: str) -> list[tuple]:
    # On a GPU, two input sets alternate when they fit beside the L2 flush so that a run never
    # starts with its inputs already cached (do_bench also clears L2 between runs). The CPU
    # shapes here are far larger than its caches.
    n = 2 if device == "cuda" and set_bytes < (1 << 30) else 1
    return [make_one() for _ in range(n)]


def _op_step(fn: Callable[..., torch.Tensor], sets: list[tuple], mode: str, grad_idx: Iterable[int]):
    grad_idx = list(grad_idx)
    cycle = itertools.cycle(sets)
    if mode == "fwd":

        def step():
            with torch.no_grad():
                return fn(*next(cycle))

        return step
    for inputs in sets:
        for i in grad_idx:
            inputs[i].requires_grad_(True)
    with torch.no_grad():
        out = fn(*sets[0])
    grad_out = torch.randn_like(out)

    def step():
        inputs = next(cycle)
        out = fn(*inputs)
        # autograd.grad, not backward(): gradients do not accumulate in .grad across repeats
        return torch.autograd.grad(out, [inputs[i] for i in grad_idx], grad_out)

    return step


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------
# Additive attention


def _build_additive(case: Case):
    import pyattn

    d = case.dims
    B, T, H, Dv = d["B"], d["T"], d["H"], d["Dv"]
    dtype = DTYPES[case.dtype]

    def make_one():
        kw = {"device": case.device, "dtype": dtype}
        q = torch.randn(B, T, H, **kw) * 0.5
        k = torch.randn(B, T, H, **kw) * 0.5
        value = torch.randn(B, T, Dv, **kw)
        v = torch.randn(H, **kw) / math.sqrt(H)
        return (q, k, value, v)

    sets = _input_sets(make_one, (2 * B * T * H + B * T * Dv) * DTYPES[case.dtype].itemsize, case.device)
    mask = None
    if d.get("pad"):
        # a seq2seq batch: source lengths uniform in [T/4, T], the rest padding (a fixed draw)
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None, :] >= lengths[:, None]).to(case.device)
    if case.provider == "reference":

        def fn(q, k, value, v):
            return pyattn.reference.additive_attention(q, k, value, v, mask)
    else:
        backend = case.provider.removeprefix("pyattn-")

        def fn(q, k, value, v):
            return pyattn.additive_attention(q, k, value, v, mask, backend=backend)

    return _op_step(fn, sets, case.mode, range(4))


def _additive_cases(device: str, suite: str, dtypes: list[str]) -> list[Case]:
    import pyattn

    avail = pyattn.backends()
    if device == "cpu":
        providers = ["reference"] + (["pyattn-cpu"] if "cpu" in avail else [])
        dtypes = dtypes or ["fp32"]
        if suite == "quick":
            shapes = [(2, 32, 16, 16), (2, 64, 16, 16)]
        elif suite == "default":
            # One batch size along T, so the lines over T compare like with like; B=2: the speed
            # and memory ratios hardly depend on B (rows are B*Tq, plenty for the threads), while
            # the naive path's (B, T, T, H) tensors grow with it (B=16 at T=512: 9 GB, seconds a
            # run). --full runs B=16. The padded batch (B=4: four lengths) is its own comparison.
            shapes = [(2, t, 256, 256) for t in (64, 256, 512)] + [(4, 256, 256, 256, 1)]
        else:
            shapes = [(16, t, 256, 256) for t in (64, 256, 512)] + [(16, 256, 256, 256, 1)]
    else:
        providers = ["reference"] + [f"pyattn-{b}" for b in ("triton", "cuda") if b in avail]
        dtypes = dtypes or (["fp16"] if suite != "full" else ["fp16", "fp32"])
        if suite == "quick":
            shapes = [(2, 64, 32, 32)]
        elif suite == "default":
            shapes = [(32, t, 512, 512) for t in (128, 512)] + [(32, 512, 512, 512, 1)]
        else:
            shapes = [(32, t, 512, 512) for t in (128, 512, 2048)] + [(32, 512, 512, 512, 1)]
    # a fifth entry 1: keys padded to source lengths uniform in [T/4, T] (blocks of padding are
    # skipped by the kernels; the figures still count the padded problem's work)
    shapes = [s if len(s) == 5 else (*s, 0) for s in shapes]
    cases = []
    for dt, (B, T, H, Dv, pad), mode, prov in itertools.product(
        dtypes, shapes, ("fwd", "fwd+bwd"), providers
    ):
        if suite == "default" and device == "cpu" and T == 512 and mode == "fwd+bwd":
            continue  # the default suite measures the T=512 memory ratio on the forward
        fwd = B * T * T * H + 2 * B * T * T * Dv
        scale = 1.0 if mode == "fwd" else 3.5
        elt = DTYPES[dt].itemsize
        # naive: (q+k) and tanh(q+k) of (B, T, T, H) live together; backward keeps ~4 of them
        naive = (2 if mode == "fwd" else 4) * B * T * T * H * elt
        cases.append(
            Case(
                group="additive",
                provider=prov,
                baseline="reference",
                mode=mode,
                shape=(("B", B), ("T", T), ("H", H), ("Dv", Dv)) + ((("pad", 1),) if pad else ()),
                dtype=dt,
                device=device,
                seq_len=T,
                flops=fwd * scale,
                tanh=B * T * T * H * (1.0 if mode == "fwd" else 2.0),
                mem_estimate=naive if prov == "reference" else 0.0,
                builder=_build_additive,
            )
        )
    return cases


# ---------------------------------------------------------------------------------------------
# Scaled-dot-product attention


def _torch_sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, TORCH_SDPA_BACKENDS[name])


def _build_sdpa(case: Case):
    import torch.nn.functional as F

    import pyattn

    d = case.dims
    B, H, L, D, causal = d["B"], d["H"], d["L"], d["D"], bool(d["causal"])
    dtype = DTYPES[case.dtype]
    bshd = case.provider in ("flash-attn", "xformers")  # these take (B, L, H, D)

    def make_one():
        shape = (B, L, H, D) if bshd else (B, H, L, D)
        return tuple(torch.randn(shape, device=case.device, dtype=dtype) for _ in range(3))

    sets = _input_sets(make_one, 3 * B * H * L * D * dtype.itemsize, case.device)
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
    return _op_step(fn, sets, case.mode, range(3))


def _sdpa_cases(device: str, suite: str, dtypes: list[str]) -> list[Case]:
    import pyattn

    avail = pyattn.backends()
    if device == "cpu":
        providers = ["torch", "reference"] + (["pyattn-cpu"] if "cpu" in avail else [])
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
        providers = ["torch", "reference"] + [f"pyattn-{b}" for b in ("triton", "cuda") if b in avail]
        providers += list(TORCH_SDPA_BACKENDS)
        providers += [
            m for m, mod in (("flash-attn", "flash_attn"), ("xformers", "xformers")) if _importable(mod)
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
                builder=_build_sdpa,
            )
        )
    return cases


# ---------------------------------------------------------------------------------------------
# Variable-length attention: the packed op against sdpa on the padded batch + key padding mask


def varlen_lengths(B: int, L: int) -> list[int]:
    """The case's B sequence lengths, uniform in [L/4, L], the same in every run and process."""
    g = torch.Generator().manual_seed(1000 * B + L)
    return torch.randint(L // 4, L + 1, (B,), generator=g).tolist()


def _build_varlen(case: Case):
    import torch.nn.functional as F

    import pyattn

    d = case.dims
    B, H, L, D, causal = d["B"], d["H"], d["L"], d["D"], bool(d["causal"])
    dtype, dev = DTYPES[case.dtype], case.device
    lens = varlen_lengths(B, L)
    total = sum(lens)
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=dev)
    p = case.provider
    padded = p in ("torch", "pyattn-sdpa")
    if padded:
        valid = torch.arange(L, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]  # (B, L)
        mask = valid[:, None, None, :]  # (B, 1, 1, L): key padding, True = attend
        if causal:
            mask = mask & torch.ones(L, L, dtype=torch.bool, device=dev).tril()

        def make_one():
            return tuple(torch.randn(B, H, L, D, device=dev, dtype=dtype) for _ in range(3))

        nbytes = 3 * B * H * L * D * dtype.itemsize
        if p == "torch":

            def fn(q, k, v):
                return F.scaled_dot_product_attention(q, k, v, mask)

        else:

            def fn(q, k, v):
                return pyattn.scaled_dot_product_attention(q, k, v, mask)

    else:

        def make_one():
            return tuple(torch.randn(total, H, D, device=dev, dtype=dtype) for _ in range(3))

        nbytes = 3 * total * H * D * dtype.itemsize
        backend = p.removeprefix("pyattn-")

        def fn(q, k, v):
            return pyattn.varlen_attention(q, k, v, cu, cu, L, L, is_causal=causal, backend=backend)

    return _op_step(fn, _input_sets(make_one, nbytes, dev), case.mode, range(3))


def _varlen_cases(device: str, suite: str, dtypes: list[str]) -> list[Case]:
    import pyattn

    avail = pyattn.backends()
    if device == "cpu":
        providers = ["torch", "pyattn-sdpa"] + (["pyattn-cpu"] if "cpu" in avail else [])
        dtypes = dtypes or ["fp32"]
        grid = [(2, 2, 32, 16, False)] if suite == "quick" else [(8, 12, L, 64, False) for L in (128, 512)]
    else:
        providers = ["torch", "pyattn-sdpa"] + [f"pyattn-{b}" for b in ("triton", "cuda") if b in avail]
        dtypes = dtypes or ["bf16"]
        if suite == "quick":
            grid = [(2, 2, 128, 64, False)]
        else:
            lengths = (2048,) if suite == "default" else (512, 2048, 8192)
            grid = [(16384 // L, 16, L, 128, c) for L in lengths for c in (False, True)]
    cases = []
    combos = itertools.product(dtypes, grid, ("fwd", "fwd+bwd"), providers)
    for dt, (B, H, L, D, causal), mode, prov in combos:
        useful = sum(4.0 * H * n * n * D * (0.5 if causal else 1.0) for n in varlen_lengths(B, L))
        cases.append(
            Case(
                group="varlen",
                provider=prov,
                baseline="torch",
                mode=mode,
                shape=(("B", B), ("H", H), ("L", L), ("D", D), ("causal", causal)),
                dtype=dt,
                device=device,
                seq_len=L,
                flops=useful * (1.0 if mode == "fwd" else 3.5),
                builder=_build_varlen,
            )
        )
    return cases


# ---------------------------------------------------------------------------------------------
# nn.MultiheadAttention


def _build_mha(case: Case):
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

    sets = _input_sets(lambda: (torch.randn(B, L, E, **kw),), B * L * E * dtype.itemsize, case.device)
    return _op_step(fn, sets, case.mode, [0])


def _mha_cases(device: str, suite: str, dtypes: list[str]) -> list[Case]:
    providers = ["torch.nn.MHA"] + (["pyattn.nn.MHA"] if _importable("pyattn.nn") else [])
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
                group="mha",
                provider=prov,
                baseline="torch.nn.MHA",
                mode=mode,
                shape=(("B", B), ("L", L), ("E", E), ("heads", heads)),
                dtype=dt,
                device=device,
                seq_len=L,
                flops=fwd * (1.0 if mode == "fwd" else 3.0),
                builder=_build_mha,
            )
        )
    return cases


# ---------------------------------------------------------------------------------------------
# Models: the same weights through the fused ops ("pyattn-fused") or pyattn.reference


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _set_attn_backend(model: torch.nn.Module, provider: str) -> None:
    name = "reference" if provider == "reference" else "fused"
    if hasattr(model, "set_attn_backend"):
        model.set_attn_backend(name)
    else:
        raise RuntimeError(f"{type(model).__name__} has no set_attn_backend(); cannot switch paths")


def _train_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# The default suite's BERT: BERT-base's layer (hidden 768, 12 heads, B=8, L=128), 4 of its 12.
# The layers are identical, so 12 measure what 4 do, three times over (the embeddings, the
# same in both paths, weigh a little more); on a 2-core CPU the 12-layer cases took half the
# suite's time. --full runs BERT-base whole.
_DEFAULT_BERT = (("layers", 4), ("hidden", 768), ("heads", 12))


def _build_bert(case: Case):
    from pyattn.models.bert import BertConfig, BertModel

    d = case.dims
    B, L, layers, hidden, heads = d["B"], d["L"], d["layers"], d["hidden"], d["heads"]
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max(512, L),
    )
    model = BertModel(config).to(device=case.device, dtype=DTYPES[case.dtype])
    _set_attn_backend(model, case.provider)
    ids = torch.randint(0, config.vocab_size, (B, L), device=case.device)
    mask = torch.ones(B, L, dtype=torch.long, device=case.device)
    if case.mode == "fwd":
        model.eval()

        def step():
            with torch.no_grad():
                return model(ids, attention_mask=mask).last_hidden_state

        return step
    return _train_step(
        model, lambda: model(ids, attention_mask=mask).last_hidden_state.float().square().mean()
    )


# BERT on padded batches (lengths uniform in [L/4, L], drawn from a fixed generator seed): pyattn's
# padding-free path against transformers' BertModel on torch's SDPA with the same weights, and
# against pyattn's own padded path. A user with a padded batch would otherwise pick HF + sdpa.
_PADDED_BERT_PROVIDERS = ("transformers-sdpa", "pyattn-padded", "pyattn-padding-free")


def _padded_bert_lengths(B: int, L: int) -> torch.Tensor:
    return torch.randint(L // 4, L + 1, (B,), generator=torch.Generator().manual_seed(0))


def _build_bert_padded_batch(case: Case):
    from pyattn.models.bert import BertConfig, BertModel

    d = case.dims
    B, L, layers, hidden, heads = d["B"], d["L"], d["layers"], d["hidden"], d["heads"]
    dtype = DTYPES[case.dtype]
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max(512, L),
        padding_free=case.provider == "pyattn-padding-free",
    )
    model = BertModel(config)
    if case.provider == "transformers-sdpa":
        import transformers

        hf_config = transformers.BertConfig(
            **{k: v for k, v in config.to_dict().items() if k not in ("attn_backend", "padding_free")},
            attn_implementation="sdpa",
        )
        hf = transformers.BertModel(hf_config)
        missing = hf.load_state_dict(model.state_dict(), strict=False).missing_keys
        if [k for k in missing if not k.endswith("_ids")]:
            raise RuntimeError(f"transformers' BertModel did not take pyattn's weights: {missing[:4]}")
        model = hf
    model = model.to(device=case.device, dtype=dtype)
    ids = torch.randint(1, config.vocab_size, (B, L), device=case.device)
    keep = torch.arange(L)[None] < _padded_bert_lengths(B, L)[:, None]  # (B, L)
    mask = keep.long().to(case.device)
    weight = keep.to(case.device, dtype)[..., None] / keep.sum()  # the loss reads real tokens only

    def forward():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state

    if case.mode == "fwd":
        model.eval()

        def step():
            with torch.no_grad():
                return forward()

        return step
    return _train_step(model, lambda: (forward().float().square() * weight).sum())


def _padded_bert_cases(device: str, suite: str, dtypes: list[str]) -> list[Case]:
    dt = (dtypes or ["fp32" if device == "cpu" else "bf16"])[0]
    base = (("layers", 12), ("hidden", 768), ("heads", 12))
    if suite == "quick":
        grid = [(2, 32, (("layers", 2), ("hidden", 64), ("heads", 2)))]
    elif suite == "default":
        grid = [(8, 128, _DEFAULT_BERT)]
    else:  # BERT-base B=32 L=512 takes many seconds a step on a 2-core CPU
        grid = [(B, L, base) for B in (8, 32) for L in (128, 512)]
    have_hf = _importable("transformers")
    if not have_hf:
        print("note: transformers is not installed here; padded BERT is compared with pyattn's padded path")
    providers = [p for p in _PADDED_BERT_PROVIDERS if have_hf or p != "transformers-sdpa"]
    cases = []
    for (B, L, model_shape), mode in itertools.product(grid, ("fwd", "train")):
        shape = (("B", B), ("L", L), ("lengths", "U[L/4,L]"), *model_shape)
        for prov in providers:
            cases.append(
                Case(
                    group="bert",
                    provider=prov,
                    baseline=providers[0],
                    mode=mode,
                    shape=shape,
                    dtype=dt,
                    device=device,
                    seq_len=L,
                    builder=_build_bert_padded_batch,
                )  # fmt: skip
            )
    return cases


def _build_transformer(case: Case):
    from pyattn.models.transformer import Transformer

    d = case.dims
    B, L, E, heads = d["B"], d["L"], d["d_model"], d["nhead"]
    dtype = DTYPES[case.dtype]
    torch.manual_seed(0)
    layers = d.get("layers", 6)
    kw = {
        "d_model": E,
        "nhead": heads,
        "num_encoder_layers": layers,
        "num_decoder_layers": layers,
        "dim_feedforward": 4 * E,
        "dropout": 0.0,
        "batch_first": True,
    }
    if case.provider == "torch.nn.Transformer":
        model = torch.nn.Transformer(**kw)
    else:
        model = Transformer(**kw)
    model = model.to(device=case.device, dtype=dtype).eval()
    if case.provider != "torch.nn.Transformer":
        _set_attn_backend(model, case.provider)
    src = torch.randn(B, L, E, device=case.device, dtype=dtype)
    tgt = torch.randn(B, L, E, device=case.device, dtype=dtype)
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(L, device=case.device, dtype=dtype)

    def step():
        with torch.no_grad():
            return model(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True)

    return step


def _build_transformer_decode(case: Case):
    """Greedy Transformer.generate of ``new`` tokens (no eos) from a (B, S) source, with the KV
    cache ("kv-cache") or rerunning the decoder over the prefix each step ("no-cache")."""
    from pyattn.models.transformer import Transformer

    d = case.dims
    B, S, E, new, vocab = d["B"], d["S"], d["d_model"], d["new"], d["vocab"]
    dtype = DTYPES[case.dtype]
    torch.manual_seed(0)
    f = {"device": case.device, "dtype": dtype}
    model = Transformer(E, d["nhead"], d["layers"], d["layers"], 4 * E, 0.0, batch_first=True, **f).eval()
    tok = torch.nn.Embedding(vocab, E, **f)
    pos = torch.randn(new + 1, E, **f) * 0.1
    head = torch.nn.Linear(E, vocab, **f)
    src = torch.randn(B, S, E, **f)

    def embed(tokens, start):
        return tok(tokens) + pos[start : start + tokens.shape[1]]

    def step():
        # one thread (the shape says so): a step of this small model is hundreds of tiny ops,
        # and on the shared 2-core VM each parallel region that waits on a descheduled thread
        # costs a scheduler quantum (13 s instead of 0.3 s a call was seen); pyattn translate
        # decodes on one thread for the same reason
        threads = torch.get_num_threads()
        torch.set_num_threads(d["threads"])
        try:
            with torch.no_grad():
                return model.generate(src, embed, head, bos_id=1, eos_id=-1, max_new_tokens=new,
                                      use_cache=case.provider == "kv-cache")  # fmt: skip
        finally:
            torch.set_num_threads(threads)

    return step


def _build_seq2seq(case: Case):
    from pyattn.models.seq2seq import Seq2Seq, Seq2SeqConfig

    d = case.dims
    B, T = d["B"], d["T"]
    torch.manual_seed(0)
    vocab = d["vocab"]
    config = Seq2SeqConfig(src_vocab_size=vocab, tgt_vocab_size=vocab)
    model = Seq2Seq(config).to(device=case.device, dtype=DTYPES[case.dtype]).eval()
    _set_attn_backend(model, case.provider)
    # ids from 4 up keep clear of the special tokens (pad/bos/eos, and one spare)
    src = torch.randint(4, vocab, (B, T), device=case.device)

    def step():
        with torch.no_grad():
            return model.greedy_decode(src, max_len=T)

    return step


def _model_cases(device: str, suite: str, dtypes: list[str], ops: list[str]) -> list[Case]:
    specs = {
        "bert": ("pyattn.models.bert", _build_bert),
        "transformer": ("pyattn.models.transformer", _build_transformer),
        "seq2seq": ("pyattn.models.seq2seq", _build_seq2seq),
    }
    dt = (dtypes or ["fp32" if device == "cpu" else "bf16"])[0]
    cases = []
    for op in ops:
        if op not in specs:
            continue
        module, builder = specs[op]
        if not _importable(module):
            print(f"note: {module} is not installed here; the {op} benchmark is skipped")
            continue
        providers = ["reference", "pyattn-fused"]
        rows: list[tuple[str, tuple, int]] = []
        if op == "bert":
            base = (("layers", 12), ("hidden", 768), ("heads", 12))
            if suite == "quick":
                rows = [
                    (m, (("B", 2), ("L", 32), ("layers", 2), ("hidden", 64), ("heads", 2)), 32)
                    for m in ("fwd", "train")
                ]
            elif suite == "default":
                rows = [(m, (("B", 8), ("L", 128)) + _DEFAULT_BERT, 128) for m in ("fwd", "train")]
            else:
                rows = [(m, (("B", 8), ("L", L)) + base, L) for L in (128, 512) for m in ("fwd", "train")]
        elif op == "transformer":
            providers.append("torch.nn.Transformer")
            # layers: encoder and decoder layers each (6 in Transformer-base; the default suite
            # runs 2 of each: identical layers, as for BERT)
            if suite == "quick":
                rows = [("fwd", (("B", 2), ("L", 16), ("d_model", 32), ("nhead", 2), ("layers", 1)), 16)]
            elif suite == "default":
                rows = [("fwd", (("B", 8), ("L", 128), ("d_model", 512), ("nhead", 8), ("layers", 2)), 128)]
            else:
                rows = [
                    ("fwd", (("B", 8), ("L", L), ("d_model", 512), ("nhead", 8), ("layers", 6)), L)
                    for L in (128, 512)
                ]
        else:
            # a subword-sized vocabulary: the output layer, not attention, dominates a decode step
            if suite == "quick":
                rows = [("decode", (("B", 4), ("T", 8), ("vocab", 64)), 8)]
            else:
                rows = [("decode", (("B", 64), ("T", 50), ("vocab", 8000)), 50)]
        for (mode, shape, seq_len), prov in itertools.product(rows, providers):
            cases.append(
                Case(
                    group=op,
                    provider=prov,
                    baseline="reference",
                    mode=mode,
                    shape=shape,
                    dtype=dt,
                    device=device,
                    seq_len=seq_len,
                    builder=builder,
                )
            )
        if op == "transformer" and suite in ("default", "full"):
            # Transformer.generate with the KV cache against cache-free decoding (a few seconds)
            shape = (("B", 4), ("S", 32), ("new", 32), ("d_model", 256), ("nhead", 8), ("layers", 2),
                     ("vocab", 1000), ("threads", 1))  # fmt: skip
            for prov in ("no-cache", "kv-cache"):
                cases.append(Case(group=op, provider=prov, baseline="no-cache", mode="decode", shape=shape,
                                  dtype=dt, device=device, seq_len=32, builder=_build_transformer_decode))  # fmt: skip
    return cases


# ---------------------------------------------------------------------------------------------


def build_cases(
    device: str, suite: str = "default", ops: Iterable[str] | None = None, dtypes: Iterable[str] | None = None
) -> list[Case]:
    """Every case of ``suite`` for ``ops`` (GROUPS keys; all when None) on ``device``.

    Arguments:
        device: "cpu" or "cuda".
        suite: "quick" (tiny shapes, for tests), "default" (the subset that runs in minutes on
            a 2-core CPU), "full" (every shape of the headline grids) or "headline" (the few
            minutes of GPU figures bench/gpu_check.sh takes; "quick" on CPU).
        ops: GROUPS keys to include.
        dtypes: DTYPES keys; None takes each op's own default for the device.
    Returns:
        the cases, baselines first within each comparison.
    """
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")
    if suite == "headline":
        return _headline_cases(device, ops, dtypes)
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    ops = list(GROUPS) if ops is None else list(ops)
    unknown = [o for o in ops if o not in GROUPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; expected some of {', '.join(GROUPS)}")
    dtypes = list(dtypes or [])
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"unknown dtype(s) {bad}; expected some of {', '.join(DTYPES)}")
    cases: list[Case] = []
    if "additive" in ops:
        cases += _additive_cases(device, suite, dtypes)
    if "sdpa" in ops:
        cases += _sdpa_cases(device, suite, dtypes)
    if "mha" in ops:
        cases += _mha_cases(device, suite, dtypes)
    if "varlen" in ops:
        cases += _varlen_cases(device, suite, dtypes)
    cases += _model_cases(device, suite, dtypes, ops)
    if "bert" in ops and _importable("pyattn.models.bert"):
        cases += _padded_bert_cases(device, suite, dtypes)
    # baselines run first in their comparison, so a provider's ratio is known when it prints
    order = {c.key: i for i, c in reversed(list(enumerate(cases)))}
    cases.sort(key=lambda c: (order[c.key], c.provider != c.baseline))
    return cases


# ---------------------------------------------------------------------------------------------
# The headline selection: what one bounded GPU call measures (bench/gpu_check.sh)

# (op, mode, shape, dtype) kept from each op's full suite, most wanted first; every provider of
# a kept comparison runs (for sdpa: torch's default, pyattn's backends and each torch backend).
_HEADLINE_SDPA_LENGTHS = (1024, 2048, 4096, 8192)
# the naive providers materialise (B, H, L, L) scores: only at the short lengths
_HEADLINE_NAIVE_MAX_L = 2048


def _headline_cases(device: str, ops: Iterable[str] | None, dtypes: Iterable[str] | None) -> list[Case]:
    ops = list(GROUPS) if ops is None else list(ops)
    if device != "cuda":
        return build_cases(device, "quick", ops, dtypes)
    want = list(dtypes or [])
    # the small comparisons first: sdpa's autotuning (one compile per config, head dim and
    # causality) takes most of the time, and a run cut short by its budget keeps these rows
    cases: list[Case] = []
    if "additive" in ops:
        cases += [
            c
            for c in _additive_cases(device, "full", want or ["fp16"])
            if c.dims["T"] == 512 and c.dims["H"] == 512
        ]
    if "mha" in ops:
        cases += [c for c in _mha_cases(device, "default", want or ["bf16"]) if c.mode == "fwd"]
    cases += [
        c
        for c in _model_cases(device, "full", want or ["bf16"], [o for o in ops if o == "bert"])
        if c.mode == "fwd" and c.dims["L"] == 512
    ]
    if "varlen" in ops:
        # packed vs padded at L = 2048 (B = 8), plain and causal: before sdpa's long autotuning
        cases += _varlen_cases(device, "default", want or ["bf16"])
    if "sdpa" in ops:
        for c in _sdpa_cases(device, "full", want or ["bf16"]):
            d = c.dims
            if d["L"] not in _HEADLINE_SDPA_LENGTHS or c.provider in ("flash-attn", "xformers"):
                continue
            if c.provider in ("reference", "torch-math") and d["L"] > _HEADLINE_NAIVE_MAX_L:
                continue
            cases.append(c)
    order = {c.key: i for i, c in reversed(list(enumerate(cases)))}
    cases.sort(key=lambda c: (order[c.key], c.provider != c.baseline))
    return cases
