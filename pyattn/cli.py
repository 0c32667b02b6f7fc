"""The ``pyattn`` console script (also ``python -m pyattn``).

Subcommands live in their own modules and are imported only when used, so ``pyattn --help``
is fast and a missing optional dependency breaks only its own subcommand. Each module named in
SUBCOMMANDS defines ``add_arguments(parser)`` and ``run(args) -> int``. ``bench`` and ``info``
are the library's; ``train``, ``embed`` and ``translate`` are applications (pyattn.apps, the
``apps`` extra): where a package they need is missing they say which to install and exit with 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "bench": ("pyattn.bench.cli", "run the benchmark suite on this machine's device (the main job)"),
    "train": ("pyattn.apps.train", "train a tiny seq2seq / Transformer / BERT on CPU"),
    "embed": ("pyattn.apps.korean", "sentence embeddings (Korean and English) and their cosine matrix"),
    "translate": ("pyattn.apps.translate", "train and evaluate the seq2seq translation demos"),
    "info": ("pyattn.info", "the backends usable here and how pyattn was built"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyattn", description="Fused attention kernels for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        # Only the name and help here: each subcommand's own parser is built when it runs (main),
        # keeping `pyattn --help` free of heavy imports.
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in SUBCOMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(SUBCOMMANDS)}")
    module_name, help_text = SUBCOMMANDS[name]
    from pyattn.apps import OPTIONAL, MissingPackages

    try:
        module = importlib.import_module(module_name)
        sub = argparse.ArgumentParser(prog=f"pyattn {name}", description=help_text)
        module.add_arguments(sub)
        args = sub.parse_args(argv[1:])
        return int(module.run(args) or 0)
    except MissingPackages as exc:
        print(exc, file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        # an optional import that no `require` call anticipated: still say what to install
        top = (exc.name or "").split(".")[0]
        if top not in OPTIONAL:
            raise
        print(MissingPackages(name, [OPTIONAL[top]]), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
