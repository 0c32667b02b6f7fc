"""``python -m pyattn.bench``: the same as ``pyattn bench``."""

import argparse
import sys

from .cli import add_arguments, run

parser = argparse.ArgumentParser(prog="python -m pyattn.bench", description="pyattn's benchmark suite")
add_arguments(parser)
sys.exit(run(parser.parse_args()))
