"""kernels/_glue.py: the Triton ops' schemas are the C++ ops' (csrc/registration.cpp), and the
autotune switch PYATTN_TRITON_AUTOTUNE gives one fixed, pruned config per kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

glue = pytest.importorskip("pyattn.kernels._glue")
pytest.importorskip("pyattn.kernels.sdpa")
pytest.importorskip("pyattn.kernels.additive_attention")


def _normalised(schema) -> str:
    # torch releases before pytorch#188722 ignore triton_op's schema= and infer one: SymInt for
    # int, unnamed outputs. Same calls, same types at run time; compare modulo that.
    text = str(schema).split("(", 1)[1].replace("SymInt", "int")
    args, rets = text.split(" -> ")
    return args + " -> " + ", ".join(r.split()[0].strip("()") for r in rets.split(","))


@pytest.mark.parametrize("name", sorted(glue.SCHEMAS))
def test_schema_text_is_the_cpp_schema(name):
    import pyattn._C  # noqa: F401  (registers the C++ schemas)

    cpp = getattr(torch.ops.pyattn, name).default._schema
    ours = torch._C.parse_schema(f"pyattn::{name}{glue.SCHEMAS[name]}")
    assert str(ours) == str(cpp)


@pytest.mark.parametrize("name", sorted(glue.SCHEMAS))
def test_triton_op_has_the_cpp_schema(name):
    import pyattn._C  # noqa: F401

    cpp = getattr(torch.ops.pyattn, name).default._schema
    tri = getattr(torch.ops.pyattn, name + "_triton").default._schema
    assert _normalised(tri) == _normalised(cpp), f"{tri} != {cpp}"


def test_every_cpp_op_has_a_triton_twin_schema():
    import pyattn._C  # noqa: F401

    cpp_ops = {n for n in dir(torch.ops.pyattn) if n.endswith(("_fwd", "_bwd"))}
    assert cpp_ops & set(glue.SCHEMAS) == set(glue.SCHEMAS)
    for n in cpp_ops - set(glue.SCHEMAS):
        assert not hasattr(torch.ops.pyattn, n + "_triton"), n


_PROBE = """
import os, json
from pyattn.kernels import _glue, sdpa, additive_attention as add
args = dict(BLOCK_D=128, BLOCK_DV=128, DOT_PREC=None, Lq=4096, Lk=4096)
out = dict(
    autotune=_glue.AUTOTUNE,
    tuners=[type(k.tuner).__name__ for k in (sdpa._fwd, sdpa._bwd_dq, sdpa._bwd_dkdv, add._fwd, add._bwd_dk)],
    fixed=str(sdpa._fwd.fixed(args)),
    first_kept=str(sdpa._fwd.kept(args)[0]),
    kept=len(sdpa._fwd.kept(args)),
)
print(json.dumps(out))
"""


@pytest.mark.parametrize("switch", ["0", "1"])
def test_autotune_switch(switch):
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYATTN_TRITON_AUTOTUNE"] = switch
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["autotune"] is (switch == "1")
    # off: no autotuner, the first kept config; on: an autotuner over the kept ones
    assert set(got["tuners"]) == ({"NoneType"} if switch == "0" else {"Autotuner"})
    assert got["fixed"] == got["first_kept"]
    assert got["kept"] >= 1


def test_this_process_launch_mode():
    # the interpreter: one config per kernel, launched directly; a GPU: autotuners unless switched off
    from pyattn.kernels import additive_attention, sdpa

    for k in (sdpa._fwd, sdpa._bwd_dq, sdpa._bwd_dkdv, additive_attention._fwd, additive_attention._bwd_dq):
        assert (k.tuner is None) == (glue.INTERPRET or not glue.AUTOTUNE)
        if glue.INTERPRET:
            assert k.fixed({}) is k.interpret_config
