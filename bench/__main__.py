"""``python -m bench`` from a source checkout that is not installed (pyattn on PYTHONPATH)."""

import argparse
import sys

from .cli import add_arguments, run

parser = argparse.ArgumentParser(prog="python -m bench", description="pyattn's benchmark suite")
add_arguments(parser)
sys.exit(run(parser.parse_args()))
