"""pytest-benchmark cases for bert, transformer, seq2seq (defined once in bench/cases.py)."""

import pytest
from pyattn.bench._pytest_bench import params, run_case


@pytest.mark.parametrize("case", params(["bert", "transformer", "seq2seq"]))
def test_models(benchmark, case):
    run_case(benchmark, case)
