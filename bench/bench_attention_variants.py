"""The attention variants on CPU (docs/design.md, "Attention variants"): pyattn's fused window,
softcap and sinks against what a user runs without them, every figure a ratio of timings taken
in the same run, interleaved (round-robin, so load drifts on a shared machine hit every
provider alike).

Cases (B=1, H=8, D=64, causal):
- ``window``: sliding window w, L in {4096, 16384}, w in {256, 1024}: ``pyattn`` (window_size
  (w - 1, 0), is_causal) against ``torch`` (torch SDPA with the equivalent dense bool mask) and
  ``pyattn_causal`` (pyattn's own full causal attention, what the window saves);
- ``softcap``: Gemma 2's softcap 50 (window off), L=2048, against ``hf_eager``:
  transformers' own ``gemma2`` eager attention function (the full score matrix in torch ops,
  what transformers runs on a CPU for Gemma 2, which cannot use SDPA);
- ``sinks``: gpt-oss sinks with window 128, L=4096, against transformers' ``gpt_oss`` eager
  attention function with its sliding-window additive mask.
Modes ``fwd`` (inference) and ``fwd+bwd``. Reported: median milliseconds per provider and
``speedup`` = baseline / pyattn (and vs pyattn's own causal for the window).

Run: ``python -m pyattn.bench.bench_attention_variants [--cases window,softcap,sinks]
[--lengths 4096,16384] [--windows 256,1024] [--dtypes fp32,bf16] [--modes fwd,fwd+bwd]
[--repeats 5] [--out rows.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from pyattn.bench._case import isa_name

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
B, H, D = 1, 8, 64


def _load() -> float:
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except OSError:
        return float("nan")


def _band(L: int, left: int) -> torch.Tensor:
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    return (j <= i) & (j >= i - left)


class _HFModule(torch.nn.Module):
    """What transformers' attention functions read from their module."""

    def __init__(self, sinks=None):
        super().__init__()
        self.num_key_value_groups = 1
        self.head_dim = D
        self.training = False
        if sinks is not None:
            self.sinks = sinks


def _providers(case: str, L: int, w: int, dtype: torch.dtype, grad: bool) -> dict:
    import pyattn

    q, k, v = (torch.randn(B, H, L, D, dtype=dtype, requires_grad=grad) for _ in range(3))
    do = torch.randn(B, H, L, D, dtype=dtype)

    def run(fn, layout_bthd=False):
        def step():
            out = fn()
            if layout_bthd:
                out = out.transpose(1, 2)
            if grad:
                torch.autograd.grad(out, (q, k, v), do)

        return step

    if case == "window":
        mask = _band(L, w - 1)
        return {
            "pyattn": run(
                lambda: pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, window_size=(w - 1, 0))
            ),
            "torch": run(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
            "pyattn_causal": run(lambda: pyattn.scaled_dot_product_attention(q, k, v, is_causal=True)),
        }
    if case == "softcap":
        from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

        add = torch.zeros(L, L, dtype=dtype).masked_fill(~_band(L, L), torch.finfo(dtype).min)
        module = _HFModule()
        return {
            "pyattn": run(lambda: pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, softcap=50.0)),
            "hf_eager": run(
                lambda: eager_attention_forward(module, q, k, v, add, scaling=D**-0.5, softcap=50.0)[0], True
            ),
        }
    if case == "sinks":
        from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

        sinks = torch.randn(H, dtype=dtype, requires_grad=grad)
        add = torch.zeros(L, L, dtype=dtype).masked_fill(~_band(L, w - 1), torch.finfo(dtype).min)
        module = _HFModule(sinks)
        return {
            "pyattn": run(lambda: pyattn.scaled_dot_product_attention(
                q, k, v, is_causal=True, window_size=(w - 1, 0), sinks=sinks)),
            "hf_eager": run(lambda: eager_attention_forward(module, q, k, v, add, scaling=D**-0.5)[0], True),
        }  # fmt: skip
    raise ValueError(case)


def run_case(case: str, L: int, w: int, name: str, mode: str, repeats: int) -> dict:
    dtype = DTYPES[name]
    grad = mode == "fwd+bwd"
    steps = _providers(case, L, w, dtype, grad)
    times: dict[str, list[float]] = {p: [] for p in steps}
    ctx = torch.enable_grad() if grad else torch.inference_mode()
    with ctx:
        for step in steps.values():  # warm-up
            step()
        for _ in range(repeats):
            for p, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[p].append(time.perf_counter() - t0)
    med = {p: statistics.median(ts) * 1e3 for p, ts in times.items()}
    base = "torch" if "torch" in med else "hf_eager"
    row = dict(
        kernel=f"sdpa_{case}", mode=mode, provider="pyattn", baseline=base,
        shape=f"B{B} H{H} D{D} L{L}" + (f" w{w}" if case != "softcap" else " softcap50"), dtype=name,
        device="cpu", isa=isa_name(), threads=torch.get_num_threads(), load=_load(), torch=torch.__version__,
        **{f"{p}_ms": t for p, t in med.items()},
        speedup=med[base] / med["pyattn"],
    )  # fmt: skip
    if "pyattn_causal" in med:
        row["vs_own_causal"] = med["pyattn_causal"] / med["pyattn"]
    return row


def _print(row: dict) -> None:
    extra = f"  vs own causal {row['vs_own_causal']:5.2f}x" if "vs_own_causal" in row else ""
    print(
        f"{row['kernel']:<13} {row['mode']:<8} {row['dtype']:<5} {row['shape']:<28} pyattn {row['pyattn_ms']:9.2f} ms  "
        f"{row['baseline']} {row[row['baseline'] + '_ms']:9.2f} ms ({row['speedup']:5.2f}x){extra}  load {row['load']:.1f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyattn.bench.bench_attention_variants",
                                 description=__doc__.split("\n\n")[0])  # fmt: skip
    ap.add_argument("--cases", default="window,softcap,sinks")
    ap.add_argument("--lengths", default="4096,16384", help="window case lengths, comma list")
    ap.add_argument("--windows", default="256,1024", help="window sizes, comma list")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the rows here as JSON")
    args = ap.parse_args(argv)
    print(
        f"attention variants, cpu {isa_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    rows = []
    for name in args.dtypes.split(","):
        for mode in args.modes.split(","):
            for case in args.cases.split(","):
                if case == "window":
                    shapes = [
                        (int(L), int(w)) for L in args.lengths.split(",") for w in args.windows.split(",")
                    ]
                elif case == "softcap":
                    shapes = [(2048, 0)]
                else:
                    shapes = [(4096, 128)]
                for L, w in shapes:
                    rows.append(run_case(case, L, w, name, mode, args.repeats))
                    _print(rows[-1])
                    if args.out:  # after every row: a long run stopped early keeps what it measured
                        with open(args.out, "w") as f:
                            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
