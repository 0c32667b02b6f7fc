"""The house rules of docs/design.md ("Adding a backend", "Adding an op"), checked: backends and
ops are data (every record and registration has what it needs), no import cycles, no op reaching
into another op's privates, the sibling ops refuse the same mistakes with the same classes, and
every path docs/design.md names exists."""

from __future__ import annotations

import ast
import glob
import math
import re
from pathlib import Path

import pytest
import torch
from helpers import backend_params, toy_backend

import pyattn
from pyattn import _backend
from pyattn.ops import _glue
from pyattn.ops.errors import InputError, InputTypeError

ROOT = Path(__file__).resolve().parents[1]

# -- backends as data ------------------------------------------------------------------------------


def test_every_backend_record_is_complete():
    assert set(_backend.BACKENDS) == set(_backend.RECORDS)
    for name, rec in _backend.RECORDS.items():
        assert rec.name == name
        assert rec.ran_on, f"{name}: say where it has run on real hardware"
        assert set(rec.auto_devices) <= set(rec.devices), name
        if rec.op_suffix is None:
            assert rec.kernel_module is None and not rec.auto_devices, name
    # one op, several dispatch keys: backends sharing a suffix load their ops the same way
    by_suffix = {}
    for rec in _backend.RECORDS.values():
        if rec.op_suffix is not None:
            by_suffix.setdefault(rec.op_suffix, set()).add((rec.kernel_module, rec.fakes))
    assert all(len(v) == 1 for v in by_suffix.values()), by_suffix


def test_backend_params_cover_every_record():
    ids = [p.id for p in backend_params(reference=True)]
    assert ids == list(_backend.RECORDS)


def test_a_new_record_is_all_it_takes(monkeypatch):
    """A backend added as one record is listed, chosen by preference and named in errors."""
    rec = toy_backend(max_head_dim=8)
    monkeypatch.setitem(_backend.RECORDS, "toy", rec)
    monkeypatch.setattr(_backend, "BACKENDS", (*_backend.BACKENDS, "toy"))
    monkeypatch.setitem(_backend.PREFERENCE, "sdpa", ("toy", "cpu"))
    cpu = torch.device("cpu")
    assert "toy" in _backend.backends()
    assert _backend.resolve("sdpa", None, cpu, torch.float32, (8, 8)) == "toy"
    # past its head-dim limit or dtypes, backend=None moves on; asked for by name, it says why
    assert _backend.resolve("sdpa", None, cpu, torch.float32, (16, 8)) == "cpu"
    assert _backend.resolve("sdpa", None, cpu, torch.float64) == "cpu"
    with pytest.raises(
        InputError,
        match=r"backend 'toy' cannot run here: head dims D, Dv must be in \[1, 8\] for its kernels, got D=16, Dv=8",
    ):
        _backend.resolve("sdpa", "toy", cpu, torch.float32, (16, 8))
    with pytest.raises(RuntimeError, match="backend 'toy' cannot run here: it takes float32 inputs"):
        _backend.resolve("sdpa", "toy", cpu, torch.float64)


def test_head_dim_rule_is_one_rule_for_every_op(monkeypatch):
    """A head wider than a backend's kernels: backend=None falls back; by name it is an
    InputError. The same for every op (it lives in the resolver, not in the ops)."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not _backend.have_triton():
        pytest.skip("needs triton for a backend with a head-dim limit")
    for op in _glue.OPS:
        assert _backend.resolve(op, None, cpu, torch.float32, (512, 64)) == "cpu"
        with pytest.raises(
            InputError, match=r"head dims D, Dv must be in \[1, 256\] for its kernels, got D=512, Dv=64"
        ):
            _backend.resolve(op, "triton", cpu, torch.float32, (512, 64))


# -- ops as data -----------------------------------------------------------------------------------

# The files of one op's stem (docs/design.md, "Adding an op"): every layer, one name.
STEM_FILES = (
    "csrc/{op}.cpp",
    "csrc/{op}.h",
    "csrc/cuda/{op}.cu",
    "kernels/{op}.py",
    "pyattn/ops/{op}.py",
    "tests/test_{op}.py",
    "bench/bench_{op}.py",
)


@pytest.mark.parametrize("op", sorted(_glue.OPS))
def test_every_registered_op_has_its_stem(op):
    fused = _glue.OPS[op]
    missing = [f.format(op=op) for f in STEM_FILES if not (ROOT / f.format(op=op)).is_file()]
    assert not missing, f"{op}: missing {missing}"
    registration = (ROOT / "csrc/registration.cpp").read_text()
    kinds = ("fwd", "bwd") if fused.has_autograd else ("fwd",)
    for kind in kinds:
        assert f'"{op}_{kind}(' in registration, f"{op}_{kind}: no schema in csrc/registration.cpp"
        assert hasattr(torch.ops.pyattn, f"{op}_{kind}")
    # the C++ ops have fakes (and autograd where the op has a backward); the public function,
    # its naive twin and its backend order exist
    for kind in kinds:
        entry = torch._library.simple_registry.singleton.find(f"pyattn::{op}_{kind}")
        assert entry.fake_impl.kernel is not None, f"{op}_{kind}: no fake"
    assert (
        torch._C._dispatch_has_kernel_for_dispatch_key(f"pyattn::{op}_fwd", "Autograd") == fused.has_autograd
    )
    assert fused.public in pyattn.__all__ and callable(getattr(pyattn, fused.public))
    assert callable(getattr(pyattn.reference, fused.public)), f"pyattn.reference.{fused.public}"
    assert _backend.PREFERENCE[op] == fused.preference
    assert set(fused.forward_ops) >= {"cpu"}
    # its tests call it
    assert fused.public in (ROOT / f"tests/test_{op}.py").read_text()


def test_every_op_module_is_registered():
    """A module under pyattn/ops/ that is not shared (``_*``, ``errors``) is an op's stem."""
    stems = {p.stem for p in (ROOT / "pyattn/ops").glob("*.py") if not p.stem.startswith("_")}
    assert stems - {"errors"} == set(_glue.OPS)


# -- imports ---------------------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("kernels", "bench"):
        parts = ["pyattn", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``path`` imports, at any depth of its code."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in modules else base)
    return {m for m in out if m in modules and m != name}


def _graph(folders) -> dict[str, set[str]]:
    paths = [p for f in folders for p in (ROOT / f).rglob("*.py")]
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) for p in paths}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_the_ops_and_kernels():
    """Modules of pyattn/ops, pyattn/_backend and kernels/ import each other without a cycle,
    function-level imports included (a package's ``__init__`` re-exporting its modules is not
    an edge back)."""
    graph = _graph(["pyattn/ops", "kernels"])
    graph["pyattn._backend"] = _imports(ROOT / "pyattn/_backend.py", set(graph) | {"pyattn._backend"})
    graph = {k: {m for m in v if m not in ("pyattn.ops", "pyattn.kernels")} for k, v in graph.items()}
    assert _cycles(graph) == []


def test_no_import_cycle_in_pyattn():
    graph = _graph(["pyattn", "kernels"])
    # `from .. import x` resolves to the package when x is not a module: pyattn/__init__ itself
    # re-exports everything, so edges into it are the package being complete, not a cycle
    graph = {k: {m for m in v if m != "pyattn"} for k, v in graph.items()}
    assert _cycles(graph) == []


def test_ops_take_no_private_name_from_another_op():
    """An op's module imports other ops' public functions at most; what they share lives in
    pyattn/ops/_common.py (kernels/_flash.py, kernels/_glue.py for the Triton layer)."""
    for layer in ("pyattn/ops", "kernels"):
        for op in _glue.OPS:
            path = ROOT / layer / f"{op}.py"
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module in _glue.OPS:
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    assert not private, f"{path.relative_to(ROOT)} imports {private} from {node.module}"
                    assert layer == "pyattn/ops", f"{path.relative_to(ROOT)} imports from {node.module}"


# -- the siblings agree ----------------------------------------------------------------------------


def _calls():
    """(op, call(key=..., scale=...)) for every op, with good arguments and the key-like argument
    replaceable."""
    t = torch.randn

    def sdpa(key=None, scale=None):
        q, v = t(2, 2, 4, 8), t(2, 2, 5, 8)
        return pyattn.scaled_dot_product_attention(q, t(2, 2, 5, 8) if key is None else key, v, scale=scale)

    def varlen(key=None, scale=None):
        cu_q = torch.tensor([0, 2, 6], dtype=torch.int32)
        cu_k = torch.tensor([0, 3, 7], dtype=torch.int32)
        k = t(7, 2, 8) if key is None else key
        return pyattn.varlen_attention(t(6, 2, 8), k, t(7, 2, 8), cu_q, cu_k, scale=scale)

    def additive(key=None, scale=None):
        assert scale is None  # no scale argument: v sets the scores' size
        return pyattn.additive_attention(t(2, 3, 8), t(2, 5, 8) if key is None else key, t(2, 5, 4), t(8))

    def kvcache(key=None, scale=None):
        k = t(2, 2, 8, 8) if key is None else key
        lens = torch.tensor([3, 5], dtype=torch.int32)
        return pyattn.kvcache_attention(t(2, 2, 1, 8), k, t(2, 2, 8, 8), lens, scale=scale)

    good_key = {"sdpa": (2, 2, 5, 8), "varlen_attention": (7, 2, 8), "additive_attention": (2, 5, 8),
                "kvcache_attention": (2, 2, 8, 8)}  # fmt: skip
    fns = {
        "sdpa": sdpa,
        "varlen_attention": varlen,
        "additive_attention": additive,
        "kvcache_attention": kvcache,
    }
    assert set(fns) == set(_glue.OPS), "a new op: add it here"
    return [(op, fns[op], good_key[op]) for op in sorted(fns)]


CALLS = _calls()
MISTAKES = {
    # mistake: (make the bad key from its good shape, the class, what torch's class is)
    "not a tensor": (lambda s: [[0.0] * s[-1]] * s[0], InputTypeError, TypeError),
    "integer dtype": (lambda s: torch.ones(s, dtype=torch.int32), InputTypeError, TypeError),
    "other dtype": (lambda s: torch.randn(s, dtype=torch.float64), InputTypeError, TypeError),
    "other device": (lambda s: torch.randn(s, device="meta"), InputError, RuntimeError),
    "wrong head dim": (lambda s: torch.randn(*s[:-1], s[-1] + 1), InputError, RuntimeError),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_the_ops_refuse_the_same_mistake_with_the_same_class(mistake):
    make, cls, torch_cls = MISTAKES[mistake]
    for op, call, shape in CALLS:
        call()  # the good call runs
        with pytest.raises(cls) as info:
            call(key=make(shape))
        assert type(info.value) is cls, f"{op}: {type(info.value).__name__}"
        assert isinstance(info.value, torch_cls) and isinstance(info.value, ValueError)
        msg = str(info.value)
        arg = "k_cache" if op == "kvcache_attention" else "key"
        assert msg.startswith(f"{op if op != 'sdpa' else 'scaled_dot_product_attention'}: ") and arg in msg, (
            msg
        )


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_a_non_finite_scale_is_refused_by_every_op(scale):
    for op, call, _ in CALLS:
        if op == "additive_attention":
            continue
        call(scale=0.5)
        with pytest.raises(InputError, match=r"'scale' must be a finite float or None, got (nan|inf|-inf)"):
            call(scale=scale)
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(InputError, match="'scale' must be a finite"):
        pyattn.scaled_dot_product_attention(q, q, q, scale=torch.tensor(math.nan))


# -- docs/design.md is true to the tree ------------------------------------------------------------

_PATH = re.compile(
    r"(?<![\w./<>*-])((?:csrc|kernels|pyattn|tests|bench|docs|\.ci)/[\w./<>*-]*[\w*>/]|"
    r"[\w<>-]+\.(?:py|cpp|cuh|cu|h|toml|txt|sh))(?![\w/])"
)


def _exists(token: str) -> bool:
    if "<op>" in token:
        return any(_exists(token.replace("<op>", op)) for op in _glue.OPS)
    if "<model>" in token:
        return any(_exists(token.replace("<model>", m)) for m in ("seq2seq", "transformer", "bert"))
    if "/" not in token:  # a file named inside the layout block: somewhere in the tree
        return any(ROOT.rglob(token))
    return bool(glob.glob(str(ROOT / token)))


def test_every_path_in_design_md_exists():
    text = (ROOT / "docs/design.md").read_text()
    names = sorted(set(_PATH.findall(text)))
    assert len(names) > 30
    missing = [n for n in names if not _exists(n)]
    assert not missing, f"docs/design.md names paths that do not exist: {missing}"


def test_design_md_counts_are_current():
    text = (ROOT / "docs/design.md").read_text()
    words = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
    assert f"{words[len(_glue.OPS)]} ops" in text
    assert "two ops" not in text or len(_glue.OPS) == 2


def test_info_and_readme_say_where_each_backend_has_run(capsys):
    from pyattn import info

    assert info.run(None) == 0
    out = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| has run on |"))
    for name, rec in _backend.RECORDS.items():
        assert f"  {name}: {rec.ran_on}" in out
    # the table's columns follow the records' order: cpu, triton, cuda, reference
    cells = [c.strip() for c in row.strip("|").split("|")[1:]]
    assert len(cells) == len(_backend.RECORDS)
    assert "never run" in cells[list(_backend.RECORDS).index("cuda")]
    assert "never run" in _backend.RECORDS["cuda"].ran_on
