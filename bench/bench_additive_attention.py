"""pytest-benchmark cases for additive (defined once in bench/cases.py)."""

import pytest
from pyattn.bench._pytest_bench import params, run_case


@pytest.mark.parametrize("case", params(["additive"]))
def test_additive_attention(benchmark, case):
    run_case(benchmark, case)
