"""Fixtures that more than one test file uses."""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each
    torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """In-process runs of a stage on one thread, as the subprocess ones (tests/scripts.py): no thread thrashing."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
