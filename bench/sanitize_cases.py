"""Small calls of every C++/CUDA kernel, forward and backward, for compute-sanitizer.

    compute-sanitizer --tool memcheck python bench/sanitize_cases.py --device cuda

bench/gpu_check.sh runs it under memcheck and racecheck. Shapes are tiny (the sanitizer slows
kernels a hundredfold) but ragged: lengths that are not multiples of any block, an odd head dim,
fully padded rows, GQA, causal, masks and dropout, the attention variants (window, softcap,
sinks, ALiBi), so every bounds check and tail path runs.
Exits non-zero when a call raises or returns a non-finite value.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch


def _cases(device: str):
    import pyattn

    backend = "cuda" if device == "cuda" else "cpu"
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if device == "cuda" else (torch.float32,)
    for dt in dtypes:

        def r(*shape, dt=dt):
            return torch.randn(*shape, device=device, dtype=dt, requires_grad=True)

        # additive: B=2, Tq=5, Tk=37, H=24, Dv=19, one row with every key padded
        q, k, val, v = r(2, 5, 24), r(2, 37, 24), r(2, 37, 19), r(24)
        pad = torch.zeros(2, 37, dtype=torch.bool, device=device)
        pad[0, 20:] = True
        pad[1, :] = True
        for mask, weights in ((None, False), (pad, True)):
            name = f"additive {dt} mask={mask is not None} weights={weights}"
            yield (
                name,
                partial(
                    pyattn.additive_attention, q, k, val, v, mask, return_weights=weights, backend=backend
                ),
            )

        # sdpa: B=2, Hq=4, Hkv=2 (GQA), Lq=33, Lk=45, D=59
        qs, ks, vs = r(2, 4, 33, 59), r(2, 2, 45, 59), r(2, 2, 45, 59)
        bmask = torch.rand(2, 4, 33, 45, device=device) < 0.7
        bmask[0, 0, :3] = False  # rows with no key
        fmask = torch.randn(2, 1, 33, 45, device=device, dtype=dt)
        sinks = torch.randn(4, device=device, requires_grad=True)
        slopes = torch.rand(2, 4, device=device)
        for kw in (
            dict(is_causal=True),
            dict(attn_mask=bmask),
            dict(attn_mask=fmask, dropout_p=0.2),
            dict(),
            # the variants' kernels: a window that skips key blocks, every score mod, the sink
            dict(is_causal=True, window_size=(7, 0), softcap=5.0, sinks=sinks, alibi_slopes=slopes),
            dict(attn_mask=bmask, window_size=(3, 11), sinks=sinks),
        ):
            name = f"sdpa {dt} " + ",".join(f"{k}" for k in kw)
            yield (
                name,
                partial(
                    pyattn.scaled_dot_product_attention, qs, ks, vs, enable_gqa=True, backend=backend, **kw
                ),
            )


def _varlen_cases(device: str, backend: str, dtypes):
    import pyattn

    # packed sequences of lengths 0, 1 and ragged ones, Lq != Lk, one sequence without keys
    lens_q, lens_k = [5, 0, 33, 1], [9, 3, 40, 0]

    def cu(lens):
        return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)

    for dt in dtypes:

        def r(*shape, dt=dt):
            return torch.randn(*shape, device=device, dtype=dt, requires_grad=True)

        q, k, v = r(sum(lens_q), 4, 59), r(sum(lens_k), 2, 59), r(sum(lens_k), 2, 59)
        cq, ck = cu(lens_q), cu(lens_k)
        variants = dict(
            window_size=(6, 2),
            softcap=4.0,
            sinks=torch.randn(4, device=device, requires_grad=True),
            alibi_slopes=torch.rand(len(lens_q), 4, device=device),
        )
        for kw in (dict(), dict(is_causal=True, dropout_p=0.2), dict(is_causal=True, **variants)):
            name = f"varlen {dt} " + ",".join(f"{k}" for k in kw)
            yield (
                name,
                partial(pyattn.varlen_attention, q, k, v, cq, ck, enable_gqa=True, backend=backend, **kw),
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    failed = 0
    backend = "cuda" if args.device == "cuda" else "cpu"
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if args.device == "cuda" else (torch.float32,)
    cases = list(_cases(args.device)) + list(_varlen_cases(args.device, backend, dtypes))
    for name, call in cases:
        try:
            out = call()
            outs = out if isinstance(out, tuple) else (out,)
            loss = sum(o.float().sum() for o in outs)
            loss.backward()
            if args.device == "cuda":
                torch.cuda.synchronize()
            ok = bool(torch.isfinite(loss))
            print(f"{'ok  ' if ok else 'FAIL'} {name}: sum {loss.item():.4g}", flush=True)
            failed += not ok
        except Exception as exc:  # every case runs; the sanitizer's report names the kernel
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
            failed += 1
    print(f"{failed} case(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
