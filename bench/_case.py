"""What every bench file shares: the Case record (one measurement), the suites and dtypes, and
the step builders (input sets, forward / forward+backward / training steps). Knows no op: each
op's cases live in its bench/bench_<op>.py, the models' in bench/bench_models.py, and
bench/cases.py gathers them into the suites (docs/design.md, "Adding an op")."""

from __future__ import annotations

import importlib
import importlib.util
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

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

    group: str  # the op's stem (its bench/bench_<op>.py) or the model's name: the results' kernel
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
        return self.group

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


def pyattn_providers(device: str) -> list[str]:
    """``pyattn-<backend>`` for every kernel backend usable here that a call may pick on
    ``device`` (pyattn/_backend.py records): the bench measures each backend a user gets."""
    from pyattn import _backend

    avail = _backend.backends()
    return [
        f"pyattn-{name}"
        for name, rec in _backend.RECORDS.items()
        if name in avail and device in rec.auto_devices
    ]


def input_sets(make_one: Callable[[], tuple], set_bytes: int, device: str) -> list[tuple]:
    # On a GPU, two input sets alternate when they fit beside the L2 flush so that a run never
    # starts with its inputs already cached (do_bench also clears L2 between runs). The CPU
    # shapes here are far larger than its caches.
    n = 2 if device == "cuda" and set_bytes < (1 << 30) else 1
    return [make_one() for _ in range(n)]


def op_step(fn: Callable[..., torch.Tensor], sets: list[tuple], mode: str, grad_idx: Iterable[int]):
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


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def set_attn_backend(model: torch.nn.Module, provider: str) -> None:
    name = "reference" if provider == "reference" else "fused"
    if hasattr(model, "set_attn_backend"):
        model.set_attn_backend(name)
    else:
        raise RuntimeError(f"{type(model).__name__} has no set_attn_backend(); cannot switch paths")


def train_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]):
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


def baselines_first(cases: list[Case]) -> list[Case]:
    """The cases grouped by comparison (in first-seen order), each comparison's baseline first,
    so a provider's ratio is known when it prints."""
    order = {c.key: i for i, c in reversed(list(enumerate(cases)))}
    return sorted(cases, key=lambda c: (order[c.key], c.provider != c.baseline))


def isa_name() -> str:
    """The CPU kind the figures of a standalone bench script came from, as result file names
    say it: "AVX512-BF16", "AVX512" or "AVX2" (docs/design.md, "Kernels": both kinds appear)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return platform.machine()
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    if "avx512f" in flags:
        return "AVX512"
    return "AVX2" if "avx2" in flags else platform.machine()
