"""Concurrency, memory and determinism of both ops.

- several Python threads calling the C++ ops at once (each call runs its own at::parallel_for)
  get exactly what serial calls get;
- 10,000 small forward+backward calls leave resident memory flat (a leak of one small tensor
  per call would be ~10 MB here);
- the same inputs give bitwise-identical outputs and gradients across reruns (cpu, triton).
"""

from __future__ import annotations

import gc
import os
import threading

import pytest
import torch
from helpers import backend_params

import pyattn

BACKENDS = [
    p
    for p in backend_params(cpu=True, triton=True, cuda=True)
    if p.values[0] in pyattn.backends() or p.id == "cuda"
]


def _additive_inputs(device, B=2, Tq=5, Tk=9, H=8, Dv=6):
    ins = [
        torch.randn(s, device=device, requires_grad=True) for s in ((B, Tq, H), (B, Tk, H), (B, Tk, Dv), (H,))
    ]
    mask = (torch.rand(B, Tk) < 0.3).to(device)
    mask[0] = True  # a fully padded batch entry too
    return ins, mask


def _sdpa_inputs(device, B=2, Hq=4, Hkv=2, Lq=6, Lk=9, E=8, Dv=5):
    ins = [
        torch.randn(s, device=device, requires_grad=True)
        for s in ((B, Hq, Lq, E), (B, Hkv, Lk, E), (B, Hkv, Lk, Dv))
    ]
    mask = (torch.rand(B, 1, Lq, Lk) < 0.7).to(device)
    return ins, mask


def _run(op, backend, ins, mask, grad_seed=0):
    """Output and input gradients of one call (the upstream gradient is drawn from grad_seed)."""
    if op == "additive":
        out = pyattn.additive_attention(*ins, mask, backend=backend)
    else:
        out = pyattn.scaled_dot_product_attention(*ins, mask, enable_gqa=True, backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device)
    return (out.detach(), *torch.autograd.grad(out, ins, g))


@pytest.mark.parametrize("op", ["additive", "sdpa"])
def test_threads_match_serial(op):
    n_threads, calls_per_thread = 6, 8
    make = _additive_inputs if op == "additive" else _sdpa_inputs
    cases = [
        make("cpu", Tk=7 + i) if op == "additive" else make("cpu", Lk=5 + i)
        for i in range(n_threads * calls_per_thread)
    ]
    serial = [_run(op, "cpu", ins, mask, i) for i, (ins, mask) in enumerate(cases)]

    results: dict[int, tuple] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)

    def worker(t):
        try:
            barrier.wait()  # start together so the calls overlap
            for i in range(t, len(cases), n_threads):
                results[i] = _run(op, "cpu", *cases[i], i)
        except BaseException as exc:  # surfaced below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, f"threads raised: {errors!r}"
    assert sorted(results) == list(range(len(cases)))
    for i, expected in enumerate(serial):
        for a, b in zip(results[i], expected, strict=True):
            assert torch.equal(a, b), f"call {i}: threaded result differs from the serial one"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_ten_thousand_calls_leave_rss_flat():
    a_ins, a_mask = _additive_inputs("cpu", B=1, Tq=2, Tk=3, H=4, Dv=2)
    s_ins, s_mask = _sdpa_inputs("cpu", B=1, Hq=2, Hkv=1, Lq=2, Lk=3, E=4, Dv=2)

    def call(i):
        if i % 2:
            out = pyattn.additive_attention(*a_ins, a_mask, backend="cpu")
            ins = a_ins
        else:
            out = pyattn.scaled_dot_product_attention(*s_ins, s_mask, enable_gqa=True, backend="cpu")
            ins = s_ins
        if i % 4 < 2:  # half the calls also run the backward
            torch.autograd.grad(out.sum(), ins)

    for i in range(1000):  # warm-up: allocator pools, dispatcher caches, lazy imports
        call(i)
    gc.collect()
    before = _rss_bytes()
    for i in range(10_000):
        call(i)
    gc.collect()
    growth = _rss_bytes() - before
    assert growth < 20 * 2**20, f"resident memory grew {growth / 2**20:.1f} MiB over 10,000 calls"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("op", ["additive", "sdpa"])
def test_bitwise_deterministic(backend, device, op):
    ins, mask = (_additive_inputs if op == "additive" else _sdpa_inputs)(device)
    runs = [_run(op, backend, ins, mask) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b), f"{op} on {backend}: reruns differ"
    assert all(torch.isfinite(t).all() for t in runs[0])
