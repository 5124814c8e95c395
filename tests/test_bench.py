"""
bench.py's flag checks: a size that would fail deep inside a part (or after minutes of the parts before it) is
refused right after parsing, in one line with exit status 2, before anything runs.
"""

import sys

import pytest

from scripts import ROOT

sys.path.insert(0, ROOT)  # bench.py is a top-level script

import bench  # noqa: E402
from nanorlhf import utils  # noqa: E402

# a tiny workload, so that a check that is missing fails the test quickly instead of benchmarking for minutes
TINY = ["--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--block_size", "32", "--prompt_len", "4",
        "--new_tokens", "4", "--ppo_batch_size", "4", "--response_length", "4", "--steps", "1", "--ppo_iters", "1",
        "--batch_size", "2", "--device", "cpu"]


@pytest.mark.parametrize("flags, message", [
    (["--n_head", "0"], "--n_head must be at least 1, got 0"),
    (["--n_embd", "-4"], "--n_embd must be at least 1, got -4"),
    (["--n_head", "3"], "--n_embd 16 must be divisible by --n_head 3"),
    (["--parts", ","], "--parts ',': expected a comma-separated subset of"),
    (["--prompt_len", "0"], "--prompt_len must be at least 1, got 0"),
    (["--new_tokens", "0", "--parts", "generate"], "--new_tokens must be at least 1, got 0"),
    (["--response_length", "0", "--parts", "ppo"], "--response_length must be at least 1, got 0"),
    (["--ppo_batch_size", "0"], "--ppo_batch_size must be at least 1, got 0"),
    (["--ppo_batch_size", "6"], "--ppo_batch_size 6 must be divisible by train_ppo's num_minibatches (4)"),
])
def test_bad_flags_are_one_line_and_exit_2_before_anything_runs(capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        utils.run(lambda: bench.main(TINY + flags))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: " + message), err
    assert out == ""  # no part ran
