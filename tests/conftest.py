"""Fixtures that more than one test file uses."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """In-process runs of a stage on one thread, as the subprocess ones (tests/scripts.py): no thread thrashing."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
