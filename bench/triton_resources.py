"""Registers, shared memory and spills of every kept Triton autotune config, without a GPU.

    python -m pyattn.bench.triton_resources                    # headline cases, sm_90
    python -m pyattn.bench.triton_resources --cases all --arch 90 --arch 80
    make triton-resources                                     # the same as the first

Each case calls a real launcher (kernels/sdpa.py, kernels/varlen_attention.py,
kernels/additive_attention.py) on fake CUDA
tensors; the launches are caught before they run, and every config the autotuner would try for
those arguments (after its pruning; ``--all``: before it) is compiled for the target with
``triton.compile`` and ``GPUTarget("cuda", arch, 32)``. Registers and the stack frame come from
the cubin through the cuobjdump inside the Triton package, shared memory from the compiled
kernel's metadata (Triton's dynamic shared memory). A config with a stack frame (spilled
registers or a local array) or more shared memory than a block may have is reported as bad.

Specialisation follows Triton's launcher: pointers and integers divisible by 16 are marked so,
integers equal to 1 become constants, so the code compiled here is the code a launch compiles
for contiguous inputs of the case's shape.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch

# per-block shared memory limits (bytes): sm_90 and sm_80 opt-in maxima
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}

_TL_DTYPE = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.uint8: "u8",
    torch.int8: "i8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "i1",
}
DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Case:
    """One launcher call: op, direction, dtype and the sizes that matter."""

    op: str  # "sdpa" | "varlen" | "additive"
    direction: str  # "fwd" | "bwd"
    dtype: str
    dims: tuple[tuple[str, int], ...]
    flags: tuple[tuple[str, bool], ...] = ()

    @property
    def name(self) -> str:
        parts = [self.op, self.direction, self.dtype] + [f"{k}={v}" for k, v in self.dims]
        parts += [k for k, v in self.flags if v]
        return " ".join(parts)


def headline_cases(dtypes=("fp16", "bf16")) -> list[Case]:
    """The headline: every op, forward and backward, fp16/bf16; sdpa at head dims 64 and 128,
    varlen (sdpa's kernels with VARLEN) at 128, additive at the benchmark's T = 512, H = Dv = 512;
    sdpa and varlen at 128 with every attention variant on (fp16)."""
    cases = []
    for dt in dtypes:
        for direction in ("fwd", "bwd"):
            for d in (64, 128):
                cases.append(Case("sdpa", direction, dt, (("L", 1024), ("D", d))))
            cases.append(Case("varlen", direction, dt, (("L", 2048), ("D", 128))))
            cases.append(Case("additive", direction, dt, (("T", 512), ("H", 512), ("Dv", 512))))
            # the attention variants all on (the most live state: the softcap's tanh tile in the
            # backward, the window's bounds, the slope, the sink) at the tightest head dim; fp16
            # only (bf16 compiles to nearly the same code; --cases all has it)
            for op, L in (("sdpa", 1024), ("varlen", 2048)):
                if dt == "fp16":
                    cases.append(Case(op, direction, dt, (("L", L), ("D", 128)), VARIANTS))
    return cases


# window (256, 0) (sliding, causal), softcap 30, sinks, ALiBi slopes (Hq,)
VARIANTS = (("causal", True), ("variants", True))


def _variant_kwargs(flags: dict, t, direction: str) -> dict:
    """The launchers' variant arguments of a case: ``variants`` all of them, or each by its flag
    (``window``, ``softcap``, ``sinks``, ``alibi``)."""
    every = bool(flags.get("variants"))
    kw = {}
    if every or flags.get("window"):
        kw.update(window_left=256, window_right=0)
    if every or flags.get("softcap"):
        kw["softcap"] = 30.0
    if every or flags.get("alibi"):
        kw["alibi_slopes"] = t(4, dt=torch.float32)
    if (every or flags.get("sinks")) and direction == "fwd":
        kw["sinks"] = t(4, dt=torch.float32)
    return kw


def all_cases() -> list[Case]:
    """Every dtype and head dim the kernels take, causal, masked, with dropout and with the
    attention variants."""
    cases = []
    for dt in ("fp16", "bf16", "fp32"):
        for d in (32, 64, 128, 256):
            for direction in ("fwd", "bwd"):
                for flags in ((), (("causal", True),), (("mask", True), ("dropout", True)), VARIANTS):
                    cases.append(Case("sdpa", direction, dt, (("L", 1024), ("D", d)), flags))
                for flags in ((), (("causal", True), ("dropout", True)), VARIANTS):
                    cases.append(Case("varlen", direction, dt, (("L", 2048), ("D", d)), flags))
        for dv in (64, 128, 512):
            for direction in ("fwd", "bwd"):
                for flags in ((), (("mask", True),)):
                    cases.append(Case("additive", direction, dt, (("T", 512), ("H", 512), ("Dv", dv)), flags))
    return cases


@dataclasses.dataclass
class Launch:
    kernel: object  # kernels._glue.Tuned
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def _caught_launches() -> Iterator[list[Launch]]:
    """Calls of Tuned kernels are recorded instead of launched; plain kernels are dropped."""
    from pyattn.kernels import _glue, additive_attention, sdpa, varlen_attention

    launches: list[Launch] = []

    def getitem(self, grid):
        return lambda *args, **kwargs: launches.append(Launch(self, args, kwargs))

    def launch_kernel(kernel, grid, *args, **kwargs):
        return None

    mods = (sdpa, additive_attention, varlen_attention)
    saved = (_glue.Tuned.__getitem__, *(m.launch_kernel for m in mods))
    _glue.Tuned.__getitem__ = getitem
    for m in mods:
        m.launch_kernel = launch_kernel
    try:
        yield launches
    finally:
        _glue.Tuned.__getitem__ = saved[0]
        for m, f in zip(mods, saved[1:], strict=True):
            m.launch_kernel = f


def _launches(case: Case) -> list[Launch]:
    from pyattn.kernels import additive_attention, sdpa, varlen_attention
    from torch._subclasses.fake_tensor import FakeTensorMode

    dims, flags, dtype = dict(case.dims), dict(case.flags), DTYPE_NAMES[case.dtype]
    with FakeTensorMode(), _caught_launches() as launches:

        def t(*shape, dt=dtype):
            return torch.empty(shape, dtype=dt, device="cuda")

        if case.op == "sdpa":
            L, D = dims["L"], dims["D"]
            q, k, v = t(2, 4, L, D), t(2, 4, L, D), t(2, 4, L, D)
            mask = t(2, 4, L, L, dt=torch.bool) if flags.get("mask") else None
            p = 0.1 if flags.get("dropout") else 0.0
            causal = bool(flags.get("causal"))
            var = _variant_kwargs(flags, t, case.direction)
            if case.direction == "fwd":
                sdpa.sdpa_forward(q, k, v, mask, p, causal, None, 1, 0, **var)
            else:
                out, lse = t(2, 4, L, D), t(2, 4, L, dt=torch.float32)
                sdpa.sdpa_backward(t(2, 4, L, D), q, k, v, mask, out, lse, p, causal, None, 1, 0, **var)
        elif case.op == "varlen":
            # 4 sequences packed, the longest L (the grid and autotune key), 16-divisible totals
            L, D = dims["L"], dims["D"]
            total = 4 * L // 2
            q, k, v = t(total, 4, D), t(total, 4, D), t(total, 4, D)
            cu = t(5, dt=torch.int32)
            p = 0.1 if flags.get("dropout") else 0.0
            causal = int(bool(flags.get("causal")))
            var = _variant_kwargs(flags, t, case.direction)
            if case.direction == "fwd":
                varlen_attention.varlen_forward(q, k, v, cu, cu, L, L, p, causal, None, 1, 0, **var)
            else:
                out, lse = t(total, 4, D), t(4, total, dt=torch.float32)
                do = t(total, 4, D)
                varlen_attention.varlen_backward(
                    do, q, k, v, cu, cu, out, lse, L, L, p, causal, None, 1, 0, **var
                )
        else:
            T, H, Dv = dims["T"], dims["H"], dims["Dv"]
            q, k, val, vv = t(2, T, H), t(2, T, H), t(2, T, Dv), t(H)
            # with a key padding mask: the kernels' branch that skips blocks of padding
            kpm = t(2, T, dt=torch.bool) if flags.get("mask") else None
            if case.direction == "fwd":
                additive_attention.additive_attention_forward(q, k, val, vv, kpm, False)
            else:
                out, lse = t(2, T, Dv), t(2, T, dt=torch.float32)
                additive_attention.additive_attention_backward(t(2, T, Dv), q, k, val, vv, kpm, out, lse)
    return launches


def _signature(fn, named: dict, config) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as Triton's launcher would specialise these arguments."""
    signature, constexprs, attrs = {}, {}, {}
    values = {**named, **config.kwargs}
    for i, param in enumerate(fn.params):
        name = param.name
        v = values.get(name, param.default if param.has_default else None)
        if param.is_constexpr or v is None:
            signature[name], constexprs[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _TL_DTYPE[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # fresh allocations are 16-byte aligned
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            if v == 1 and not param.do_not_specialize:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={v!r}")
    return signature, constexprs, attrs


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cuobjdump gave no resource usage:\n{text}")
    reg, stack, shared, local = (int(x) for x in m.groups())
    return {"regs": reg, "stack": stack, "static_shared": shared, "local": local}


@dataclasses.dataclass
class Row:
    case: str
    kernel: str
    config: str
    arch: int
    regs: int
    stack: int
    shared: int
    compile_s: float

    @property
    def spills(self) -> bool:
        return self.stack > 0

    def over_limit(self) -> bool:
        return self.shared > SMEM_LIMIT[self.arch]

    @property
    def ok(self) -> bool:
        return not self.spills and not self.over_limit()


def config_str(c) -> str:
    tiles = ",".join(
        f"{k[len('BLOCK_') :] if k.startswith('BLOCK_') else k}={v}" for k, v in c.kwargs.items()
    )
    return f"{tiles} w{c.num_warps} s{c.num_stages}"


_COMPILED: dict = {}


def compile_config(fn, named: dict, config, arch: int) -> tuple[dict, float]:
    """Compile one config for sm_<arch>; (resources, seconds). Cached per process."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _signature(fn, named, config)
    key = (
        fn.__name__,
        repr(sorted(signature.items())),
        repr(sorted(constexprs.items(), key=str)),
        config_str(config),
        arch,
    )
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    t0 = time.perf_counter()
    src = ASTSource(fn, signature, constexprs, attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    res = _resource_usage(compiled.asm["cubin"])
    res["shared"] = max(int(compiled.metadata.shared), res["static_shared"])
    _COMPILED[key] = res
    return res, time.perf_counter() - t0


def _largest(configs: list) -> object:
    def size(c):
        tiles = 1
        for k, v in c.kwargs.items():
            tiles *= v if k.startswith("BLOCK_") else 1
        return (tiles, c.num_stages, -c.num_warps)

    return max(configs, key=size)


def pick_configs(kept: list, pick: str) -> list:
    """``kept``: all of them; ``fixed``: the first; ``ends``: the fixed one (the first, PYATTN_TRITON_AUTOTUNE=0's)
    and the one with the largest tiles and deepest pipeline (the likeliest to spill or overflow)."""
    if pick == "kept":
        return kept
    if pick == "fixed":
        return kept[:1]
    ends = [kept[0], _largest(kept)]
    return ends[:1] if ends[0] is ends[1] else ends


def measure(
    cases: list[Case],
    arch: int = 90,
    every_config: bool = False,
    on_row: Callable[[Row], None] | None = None,
    pick: str = "kept",
) -> list[Row]:
    """Compile the configs of every Tuned launch of the cases; one Row per (case, kernel, config)."""
    rows = []
    for case in cases:
        for launch in _launches(case):
            tuned = launch.kernel
            named = {**dict(zip(tuned.arg_names, launch.args, strict=False)), **launch.kwargs}
            # "ci": both ends for fp16, the fixed config for bf16 (nearly the same code)
            how = pick if pick != "ci" else "ends" if case.dtype == "fp16" else "fixed"
            configs = tuned.gpu_configs if every_config else pick_configs(tuned.kept(named), how)
            for config in configs:
                res, secs = compile_config(tuned.fn, named, config, arch)
                row = Row(
                    case.name, tuned.fn.__name__, config_str(config), arch, res["regs"], res["stack"],
                    res["shared"], round(secs, 2),
                )  # fmt: skip
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


def _format(row: Row) -> str:
    flag = "ok" if row.ok else ("SPILL " if row.spills else "") + ("SMEM>LIMIT" if row.over_limit() else "")
    return (
        f"{row.case:<34} {row.kernel:<20} {row.config:<26} sm_{row.arch} regs {row.regs:>3} "
        f"stack {row.stack:>6} smem {row.shared / 1024:>6.1f}K  {row.compile_s:>5.1f}s  {flag}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SMEM_LIMIT), help="default: 90")
    parser.add_argument("--cases", choices=("headline", "all"), default="headline")
    parser.add_argument("--dtype", default="", help="comma list of fp16,bf16,fp32 (default: per case set)")
    parser.add_argument("--all", action="store_true", help="every config, before pruning")
    parser.add_argument("--grep", default="", help="only cases whose name contains this")
    parser.add_argument(
        "--pick",
        choices=("kept", "ends", "fixed", "ci"),
        default="kept",
        help="kept: every kept config; fixed: the first (PYATTN_TRITON_AUTOTUNE=0's); ends: it and the "
        "largest kept one; ci: ends for fp16, fixed for bf16",
    )
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    from pyattn.kernels import _glue

    if _glue.INTERPRET:
        parser.error("the kernels were imported under TRITON_INTERPRET=1: run without it")
    cases = headline_cases() if args.cases == "headline" else all_cases()
    if args.dtype:
        want = set(args.dtype.split(","))
        cases = [c for c in cases if c.dtype in want]
    cases = [c for c in cases if args.grep in c.name]
    rows = []
    for arch in args.arch or [90]:
        rows += measure(cases, arch, args.all, on_row=lambda r: print(_format(r), flush=True), pick=args.pick)
    bad = sum(not r.ok for r in rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [{**dataclasses.asdict(r), "ok": r.ok, "limit": SMEM_LIMIT[r.arch]} for r in rows],
                f,
                indent=1,
            )
    print(f"{len(rows)} compiles; {bad} config(s) spill or exceed the shared-memory limit")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
