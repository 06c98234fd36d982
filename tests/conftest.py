"""Shared test setup.

Triton's interpreter is chosen when a kernel is *decorated* (import time), so the
interpreted kernel tests live in tests/interpret/ and run in their own process with
TRITON_INTERPRET=1 (see test_interpreted_kernels.py). The main process never sets it,
so the CPU fallbacks of the custom ops and the GPU-compile tests run here.
"""
import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Collected only by the subprocess that sets TRITON_INTERPRET=1.
collect_ignore = [] if INTERPRETED else ["interpret"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
