"""What the Triton kernel modules share: the op schemas, the autotuned-kernel wrapper, the
launch path (compiled GPU, or Triton's interpreter on CPU tensors) and the op definition.

Environment, read once at import:
  TRITON_INTERPRET=1         kernels run on CPU tensors through Triton's interpreter: each kernel
                             launches directly with its one interpreter config (no autotuner, no
                             wrap_triton: both are version-fragile there), and the ops are opaque
                             custom ops whose fake impl is the launcher, launching nothing.
  PYATTN_TRITON_AUTOTUNE=0   every kernel uses one fixed config, the first of its kept (pruned)
                             configs for the call's arguments, with no benchmarking: a bounded,
                             reproducible compile for correctness runs. Default 1: full autotuning.

On a GPU the ops are ``torch.library.triton_op``s and every launch goes through ``wrap_triton``,
so torch.compile traces the kernels themselves; pyattn/ops/_glue.py registers their autograd.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence

import torch
import triton
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
AUTOTUNE = os.environ.get("PYATTN_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def cpp_schema(name: str) -> str:
    """The schema of the C++ op ``pyattn::NAME`` (csrc/registration.cpp, the one place schemas
    are written), less its name: the Triton twin NAME_triton takes the same arguments and returns
    the same named outputs. seed/offset are SymInt there: under torch.compile they are drawn in
    the graph (unbacked), and an ``int`` argument would refuse them."""
    from pyattn import _backend

    if _backend._C() is None:
        raise ImportError(
            "pyattn's Triton ops take their schemas from the C++ ops (csrc/registration.cpp), and "
            "the compiled extension pyattn._C is not importable"
        )
    text = str(getattr(torch.ops.pyattn, name).default._schema)
    return text[text.index("(") :]


def _fix_interpreter_index() -> None:
    """Triton < 3.7's interpreter turns a scalar into an index with ``int(handle.data)``, a
    1-element 1-D array, which numpy >= 2.4 refuses ("only 0-dimensional arrays..."): every loop
    with a tensor bound (``range(lo, hi, BLOCK)``) failed. Newer Triton squeezes first; do the same
    for the older ones, from the one function that installs the patch."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or "int(self.handle.data)" not in inspect.getsource(original):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRET:
    _fix_interpreter_index()


def is_traced(t: Tensor) -> bool:
    """True for the fake tensors with which torch traces an op under the interpreter: there the
    launchers allocate their outputs and launch nothing (the interpreter would copy fake storage
    to the host). On a GPU, wrap_triton turns the launch into a graph node instead."""
    return INTERPRET and isinstance(t, Tensor) and is_fake(t)


def _resolve_grid(grid, meta: dict) -> tuple:
    return tuple(grid(meta)) if callable(grid) else tuple(grid)


class Tuned:
    """A ``@triton.jit`` kernel with its autotune configs, launched as ``kernel[grid](...)``.

    Arguments:
        fn: the jit kernel.
        configs: the GPU configs, in order of preference (with PYATTN_TRITON_AUTOTUNE=0 the first
            one that survives ``prune`` is used).
        key: the autotune key (argument names).
        prune: ``early_config_prune(configs, named_args, **kwargs) -> configs``, or None.
        interpret_config: the one config under TRITON_INTERPRET=1.
    """

    def __init__(
        self,
        fn,
        configs: Sequence[triton.Config],
        *,
        key: Sequence[str],
        prune: Callable | None = None,
        interpret_config: triton.Config,
    ) -> None:
        self.fn = fn
        self.gpu_configs = list(configs)
        self.key = list(key)
        self.prune = prune
        self.interpret_config = interpret_config
        self.arg_names = list(inspect.signature(getattr(fn, "fn", fn)).parameters)
        self.tuner = None
        if not INTERPRET and AUTOTUNE:
            by = {"early_config_prune": prune} if prune is not None else None
            self.tuner = triton.autotune(configs=self.gpu_configs, key=self.key, prune_configs_by=by)(fn)

    def kept(self, named_args: dict) -> list[triton.Config]:
        """The GPU configs autotuning would try for these arguments (names -> values, constexprs
        included), in order."""
        if self.prune is None:
            return list(self.gpu_configs)
        return list(self.prune(self.gpu_configs, named_args))

    def fixed(self, named_args: dict) -> triton.Config:
        """The one config used without autotuning (interpreter, PYATTN_TRITON_AUTOTUNE=0)."""
        return self.interpret_config if INTERPRET else self.kept(named_args)[0]

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.tuner is not None:
                return launch_kernel(self.tuner, grid, *args, **kwargs)
            named = {**dict(zip(self.arg_names, args, strict=False)), **kwargs}
            config = self.fixed(named)
            params = {**kwargs, **config.kwargs}
            resolved = _resolve_grid(grid, {**named, **config.kwargs})
            return launch_kernel(
                self.fn, resolved, *args, num_warps=config.num_warps, num_stages=config.num_stages, **params
            )

        return launch


def launch_kernel(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``: through wrap_triton on a GPU; directly under the
    interpreter (where torch's wrap_triton refuses interpreted autotuners on some releases and
    adds nothing), skipped there on the fake tensors of a traced call."""
    if INTERPRET:
        if any(is_traced(a) for a in args):
            return
        kernel[_resolve_grid(grid, kwargs)](*args, **kwargs)
        return
    wrap_triton(kernel)[grid](*args, **kwargs)


def define_op(name: str, mutates_args: tuple[str, ...] = ()) -> Callable:
    """Decorator: the function becomes the op ``pyattn::NAME_triton`` with the C++ op NAME's schema
    (``mutates_args``: the arguments the schema marks ``Tensor(a!)``, written in place).

    A triton_op on a GPU. Under TRITON_INTERPRET=1 the kernels are invisible to tracing, so a
    triton_op's decomposition would trace to a graph without them (torch.compile and opcheck's AOT
    checks would return empty outputs): there it is an opaque custom_op whose fake impl is the
    function itself, which launches nothing on fake tensors."""
    qualname, schema = f"pyattn::{name}_triton", cpp_schema(name)
    if INTERPRET:

        def define(fn):
            op = torch.library.custom_op(qualname, mutates_args=mutates_args, schema=schema)(fn)
            op.register_fake(fn)
            return op

        return define
    # torch releases whose triton_op takes no schema infer the same one, less the return names
    if "schema" in inspect.signature(triton_op).parameters:
        return triton_op(qualname, mutates_args=mutates_args, schema=schema)
    return triton_op(qualname, mutates_args=mutates_args)
