"""Fixtures that more than one test file uses."""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each
    torch.set_num_threads(1)

# The files that take longest (tiny stages trained end to end), longest first (session 13: test_dist.py 230 s of the
# suite's 852, the eight listed 38 s or more each, the others 23 s or less). `make test` hands whole files to its two
# workers in the order of the collection, so the short files fill the end; in pytest-xdist's own order, by number of
# tests, the suite took 8 min 23 s against 7 min 35 s (session 13, one run each).
LONGEST_FIRST = ("test_dist.py", "test_train_ppo.py", "test_train_rm.py", "test_train_sft.py", "test_dpo.py",
                 "test_lora.py", "test_grpo.py", "test_memory.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's --dist loadfile: keep the collection's order
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture
def one_thread():
    """In-process runs of a stage on one thread, as the subprocess ones (tests/scripts.py): no thread thrashing."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
