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


def _cpp_ops() -> list[str]:
    import pyattn._C  # noqa: F401  (registers the C++ schemas)

    names = (n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("pyattn::"))
    return sorted({n.split(".")[0] for n in names if n.endswith(("_fwd", "_bwd"))})


@pytest.mark.parametrize("name", _cpp_ops())
def test_triton_op_has_the_cpp_schema(name):
    """Every C++ forward/backward op has a Triton twin, whose schema is read from it (kernels/
    _glue.py cpp_schema): the same arguments and named outputs."""
    cpp = getattr(torch.ops.pyattn, name).default._schema
    assert glue.cpp_schema(name) == str(cpp)[str(cpp).index("(") :]
    tri = getattr(torch.ops.pyattn, name + "_triton").default._schema
    assert _normalised(tri) == _normalised(cpp), f"{tri} != {cpp}"


def test_every_registered_op_is_a_cpp_op():
    import pyattn

    want = set()
    for name, op in pyattn.ops._glue.OPS.items():
        want.add(f"{name}_fwd")
        if op.has_autograd:
            want.add(f"{name}_bwd")
    assert want == set(_cpp_ops())


_PROBE = """
import os, json
from pyattn.kernels import _glue, _flash, additive_attention as add
args = dict(BLOCK_D=128, BLOCK_DV=128, DOT_PREC=None, Lq=4096, Lk=4096)
out = dict(
    autotune=_glue.AUTOTUNE,
    tuners=[type(k.tuner).__name__ for k in (_flash.fwd, _flash.bwd_dq, _flash.bwd_dkdv, add._fwd, add._bwd_dk)],
    fixed=str(_flash.fwd.fixed(args)),
    first_kept=str(_flash.fwd.kept(args)[0]),
    kept=len(_flash.fwd.kept(args)),
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
    from pyattn.kernels import _flash, additive_attention

    for k in (
        _flash.fwd,
        _flash.bwd_dq,
        _flash.bwd_dkdv,
        additive_attention._fwd,
        additive_attention._bwd_dq,
    ):
        assert (k.tuner is None) == (glue.INTERPRET or not glue.AUTOTUNE)
        if glue.INTERPRET:
            assert k.fixed({}) is k.interpret_config
