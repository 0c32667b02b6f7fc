"""Shared test set-up: Triton's interpreter on machines without a GPU, a fresh random seed per
run (printed in the header, reproducible with PYATTN_TEST_SEED), and device parametrisation."""

import hashlib
import os
import random

import numpy as np
import pytest
import torch
from helpers import HAS_CUDA, SESSION_SEED

# Must be decided before triton is first imported (by pyattn): without a GPU, the Triton
# backend runs on CPU tensors through the interpreter; with one, it runs compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config):
    return (
        f"pyattn: PYATTN_TEST_SEED={SESSION_SEED}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
    )


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Every test gets new random inputs each run, derived from the session seed and its id."""
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()
    seed = (SESSION_SEED + int(digest[:8], 16)) % (2**31)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None:
        for key, value in item.user_properties:
            if key == "seed":
                item.add_report_section(
                    call.when, "seed", f"PYATTN_TEST_SEED={SESSION_SEED} (test seed {value})"
                )


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
