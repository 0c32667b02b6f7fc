"""float16 / bfloat16 on CPU: pyattn's cpu kernels against torch's own CPU kernels in the same
dtype, every figure a ratio of two timings taken in the same run (docs/design.md, "Half
precision on CPU").

Cases:
- sdpa: B=4 H=8 D=64, L in {256, 1024, 2048}, causal and not, forward and forward+backward,
  pyattn ``backend="cpu"`` vs ``torch.nn.functional.scaled_dot_product_attention``.
- additive: bf16 B=16 H=Dv=256 T=256, forward+backward, the cpu kernel vs the naive path
  (pyattn.reference in bf16, the (B, Tq, Tk, H) tanh graph).
- bert: BERT-base forward in bf16, B=8 L=512, pyattn's BertModel vs transformers' BertModel
  (attn_implementation="sdpa") on the same weights.

Run: ``python -m pyattn.bench.bench_half_cpu [--only sdpa,additive,bert] [--dtypes bf16,fp16]
[--lengths 256,1024,2048] [--out results.json]``. Prints one line per case (times in ms and
the speed-up, torch or naive time / pyattn time) and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform

import torch
import torch.nn.functional as F

try:
    from . import timing
except ImportError:  # run as a script
    import timing

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BUDGET = timing.Budget(warmup=1, warmup_s=0.0, min_repeats=3, max_repeats=7, target_s=2.0)


def _time(step) -> float:
    t, _mem = timing.time_cpu(step, BUDGET)
    return t.median_ms


def _step(fn, inputs, mode):
    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    def fwdbwd():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
        return out

    return fwd if mode == "fwd" else fwdbwd


def sdpa_rows(dtypes, lengths, modes=("fwd", "fwd+bwd")):
    import pyattn

    rows = []
    B, H, D = 4, 8, 64
    for name in dtypes:
        dt = DTYPES[name]
        for L in lengths:
            for causal in (False, True):
                for mode in modes:
                    ins = [torch.randn(B, H, L, D, dtype=dt).requires_grad_(mode != "fwd") for _ in range(3)]

                    def ours_fn(q, k, v, causal=causal):
                        return pyattn.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="cpu")

                    def torch_fn(q, k, v, causal=causal):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                    ours = _time(_step(ours_fn, ins, mode))
                    theirs = _time(_step(torch_fn, ins, mode))
                    flops = 4 * B * H * L * L * D / (2 if causal else 1) * (3.5 if mode != "fwd" else 1)
                    rows.append(dict(
                        kernel="sdpa", baseline="torch", mode=mode, dtype=name, causal=causal,
                        shape=f"B{B} H{H} L{L} D{D}", pyattn_ms=ours, baseline_ms=theirs,
                        speedup=theirs / ours, pyattn_gflops=flops / ours / 1e6,
                    ))  # fmt: skip
                    _print(rows[-1])
    return rows


def additive_rows(dtypes=("bf16",)):
    import pyattn
    from pyattn import reference

    rows = []
    B, T, H = 16, 256, 256
    for name in dtypes:
        dt = DTYPES[name]
        ins = [torch.randn(*s, dtype=dt).requires_grad_() for s in ((B, T, H), (B, T, H), (B, T, H), (H,))]
        for mode in ("fwd", "fwd+bwd"):
            ours = _time(_step(lambda q, k, val, v: pyattn.additive_attention(q, k, val, v, backend="cpu"),
                               ins, mode))  # fmt: skip
            naive = _time(_step(reference.additive_attention, ins, mode))
            rows.append(dict(
                kernel="additive_attention", baseline="naive", mode=mode, dtype=name, causal=False,
                shape=f"B{B} T{T} H{H} Dv{H}", pyattn_ms=ours, baseline_ms=naive, speedup=naive / ours,
            ))  # fmt: skip
            _print(rows[-1])
    return rows


def bert_rows(B=8, L=512, repeats=2):
    """BERT-base forward in bf16: pyattn.models.bert vs transformers (sdpa), same weights. Slow on
    a few cores: each side runs ``repeats`` times after one warm-up, alternating."""
    import time

    import transformers

    from pyattn.models.bert import BertConfig, BertModel

    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(attn_implementation="sdpa")
    hf = transformers.BertModel(hf_cfg, add_pooling_layer=False).to(torch.bfloat16).eval()
    ours = BertModel(BertConfig.base(), add_pooling_layer=False).to(torch.bfloat16).eval()
    missing = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing.missing_keys, missing.missing_keys
    ids = torch.randint(0, hf_cfg.vocab_size, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    times = {"pyattn": [], "transformers": []}
    with torch.no_grad():
        for i in range(repeats + 1):
            for side, model in (("pyattn", ours), ("transformers", hf)):
                t0 = time.perf_counter()
                _ = model(ids, attention_mask=mask).last_hidden_state
                if i:  # the first round is the warm-up
                    times[side].append((time.perf_counter() - t0) * 1e3)
    ours_ms, hf_ms = (sorted(times[s])[len(times[s]) // 2] for s in ("pyattn", "transformers"))
    row = dict(
        kernel="bert_base", baseline="transformers(sdpa)", mode="fwd", dtype="bf16", causal=False,
        shape=f"B{B} L{L}", pyattn_ms=ours_ms, baseline_ms=hf_ms, speedup=hf_ms / ours_ms,
    )  # fmt: skip
    _print(row)
    return [row]


def _print(row):
    extra = f"  {row['pyattn_gflops']:.0f} GFLOP/s" if "pyattn_gflops" in row else ""
    causal = " causal" if row["causal"] else ""
    print(
        f"{row['kernel']:<18} {row['dtype']:<5} {row['mode']:<8} {row['shape']:<22}{causal:<7} "
        f"pyattn {row['pyattn_ms']:9.1f} ms  {row['baseline']} {row['baseline_ms']:9.1f} ms  "
        f"{row['speedup']:5.2f}x{extra}",
        flush=True,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="sdpa,additive,bert")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--lengths", default="256,1024,2048")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--bert-repeats", type=int, default=2, help="timed BERT forwards per side")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    dtypes = [d for d in args.dtypes.split(",") if d]
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}")  # fmt: skip
    rows = []
    if "sdpa" in only:
        rows += sdpa_rows(dtypes, [int(x) for x in args.lengths.split(",")], tuple(args.modes.split(",")))
    if "additive" in only:
        rows += additive_rows()
    if "bert" in only:
        rows += bert_rows(repeats=args.bert_repeats)
    geo = [r["speedup"] for r in rows if r["kernel"] == "sdpa"]
    if geo:
        print(f"sdpa geometric mean speed-up: {math.exp(sum(map(math.log, geo)) / len(geo)):.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
