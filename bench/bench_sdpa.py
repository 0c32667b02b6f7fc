"""pytest-benchmark cases for sdpa, mha (defined once in bench/cases.py)."""

import pytest
from pyattn.bench._pytest_bench import params, run_case


@pytest.mark.parametrize("case", params(["sdpa", "mha"]))
def test_sdpa(benchmark, case):
    run_case(benchmark, case)
