"""pytest-benchmark front end over the cases of each bench_<op>.py file.

    pytest bench/ --benchmark-only              # the default suite (the console script:
                                                # the checkout root stays off sys.path)
    PYATTN_BENCH_SUITE=full pytest bench/ --benchmark-only --benchmark-json out.json

The files are named bench_<op>.py (one stem per op), which pytest does not collect by itself;
this hook collects them when bench/ is named on the command line, so the normal test run
(testpaths = tests) never sees them.
"""

from __future__ import annotations

import pytest


def pytest_generate_tests(metafunc):
    """A bench_<op>.py test names its case functions in ``.cases``: one param per case."""
    fns = getattr(metafunc.function, "cases", None)
    if fns is not None and "case" in metafunc.fixturenames:
        from pyattn.bench._pytest_bench import params

        metafunc.parametrize("case", params(fns))


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
