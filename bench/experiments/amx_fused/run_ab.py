"""Build fused_forward.cpp and time its kernels against pyattn's cpu forward and torch's CPU SDPA.

bf16, D = 64, not causal, B*L = 8192, H = 8, one thread, the process's CPU time, every provider
interleaved per repeat with a torch.mm 2048^3 sample (the GEMM rate the grid divides by), best of
--repeats. Needs a CPU with AMX-BF16 and g++ >= 11. A measurement for docs/design.md ("Half
precision on CPU"), not part of the package: run it with the installed pyattn,

    python bench/experiments/amx_fused/run_ab.py --lengths 1024,4096
"""

import argparse
import ctypes
import pathlib
import subprocess
import tempfile
import time

import torch
import torch.nn.functional as F

import pyattn
from pyattn import reference

KERNELS = {0: "fused", 1: "pipelined", 2: "o_in_tiles", 3: "products", 4: "row_pass"}
FLAGS = "-O2 -std=c++17 -shared -fPIC -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mamx-tile -mamx-bf16"


def build(out_dir: pathlib.Path) -> ctypes.CDLL:
    src = pathlib.Path(__file__).with_name("fused_forward.cpp")
    lib = out_dir / "libfused.so"
    subprocess.run(["g++", *FLAGS.split(), "-o", str(lib), str(src)], check=True)
    so = ctypes.CDLL(str(lib))
    so.fused_forward.restype = ctypes.c_double
    so.fused_forward.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3
    so.overlap.restype = ctypes.c_double
    so.overlap.argtypes = [ctypes.c_long, ctypes.c_int]
    return so


def cpu_seconds(f) -> float:
    t0 = time.process_time()
    f()
    return time.process_time() - t0


def measure(so: ctypes.CDLL, L: int, repeats: int, a: torch.Tensor) -> None:
    B, H, D = max(1, 8192 // L), 8, 64
    q, k, v = (torch.randn(B, H, L, D).bfloat16() for _ in range(3))
    out = torch.empty(B, H, L, D)

    def kernel(i):
        return so.fused_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B * H, L, i)

    exact = reference.scaled_dot_product_attention(*(t[:1, :1].double() for t in (q, k, v)))
    for i in (0, 1, 2):
        kernel(i)
        err = (out[:1, :1].double() - exact).abs().max().item()
        print(f"L={L} {KERNELS[i]}: max |error| against the float64 reference {err:.2e}")
    ours = pyattn.scaled_dot_product_attention(q, k, v, backend="cpu")
    print(f"L={L} pyattn: max |error| {(ours[:1, :1].double() - exact).abs().max().item():.2e}")
    times = {name: [] for name in ["pyattn", "torch", *KERNELS.values(), "mm"]}
    for _ in range(repeats):
        times["pyattn"].append(
            cpu_seconds(lambda: pyattn.scaled_dot_product_attention(q, k, v, backend="cpu"))
        )
        times["torch"].append(cpu_seconds(lambda: F.scaled_dot_product_attention(q, k, v)))
        for i, name in KERNELS.items():
            times[name].append(kernel(i))
        times["mm"].append(cpu_seconds(lambda: torch.mm(a, a)))
    gemm = 2 * 2048**3 / min(times.pop("mm")) / 1e9
    flops = 4 * B * H * L * L * D
    print(f"L={L} B={B} H={H} D={D}, torch.mm 2048^3 bf16 {gemm:.0f} GFLOP/s")
    for name, ts in times.items():
        t = min(ts)
        rate = flops / t / 1e9
        print(f"  {name:10s} {t * 1e3:7.1f} ms  {rate:5.0f} GFLOP/s  {rate / gemm:4.0%} of the GEMM rate")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        so = build(pathlib.Path(tmp))
        n = 2_000_000
        t_tdp, t_fma, t_both = (so.overlap(n, m) for m in (1, 2, 3))
        if t_tdp < 0:
            raise SystemExit("AMX is not available to this process")
        print(f"overlap, {n} rounds: tdpbf16ps x4 {t_tdp:.3f}s ({t_tdp / n / 4 * 1e9:.1f} ns each), "
              f"64 FMAs {t_fma:.3f}s, both {t_both:.3f}s (sum {t_tdp + t_fma:.3f}s)")  # fmt: skip
        a = torch.randn(2048, 2048).bfloat16()
        for L in (int(x) for x in args.lengths.split(",")):
            measure(so, L, args.repeats, a)


if __name__ == "__main__":
    main()
