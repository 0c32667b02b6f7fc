"""pytest-benchmark cases for varlen_attention (defined once in bench/cases.py)."""

import pytest
from pyattn.bench._pytest_bench import params, run_case


@pytest.mark.parametrize("case", params(["varlen"]))
def test_varlen_attention(benchmark, case):
    run_case(benchmark, case)
