"""Where ``pyattn.kernels`` and ``pyattn.bench`` come from.

The repository keeps the Triton kernels and the benchmark suite in top-level folders, kernels/ and
bench/ (docs/design.md, "Layout"), installed as ``pyattn.kernels`` and ``pyattn.bench``. Neither
folder has an ``__init__.py``: a Python started in a checkout has the checkout on ``sys.path``,
and a regular package there would answer ``import kernels`` before Hugging Face's ``kernels``
package (which transformers imports). Without ``__init__.py`` they are at most namespace
portions, which lose to any installed package of the same name.

A wheel holds them as folders inside ``pyattn/`` and needs nothing from here. An editable install
maps ``pyattn.kernels`` to the top-level folder, but setuptools' editable finder only maps
packages that have an ``__init__.py``; ``attach`` gives those two packages their folders
explicitly in that case.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

# subpackage -> a file that marks the folder as pyattn's own
_FOLDERS = {"kernels": "_glue.py", "bench": "cli.py"}


def attach(package) -> None:
    here = os.path.dirname(os.path.abspath(package.__file__))
    root = os.path.dirname(here)
    for name, marker in _FOLDERS.items():
        full = f"{package.__name__}.{name}"
        if full in sys.modules or os.path.isdir(os.path.join(here, name)):
            continue  # already imported, or an installed wheel's own folder
        folder = os.path.join(root, name)
        if not os.path.isfile(os.path.join(folder, marker)):
            continue
        spec = importlib.machinery.ModuleSpec(full, None, is_package=True)
        spec.submodule_search_locations = [folder]
        module = importlib.util.module_from_spec(spec)
        module.__doc__ = f"pyattn's {name}/ folder (pyattn._source_tree)."
        sys.modules[full] = module
        setattr(package, name, module)
