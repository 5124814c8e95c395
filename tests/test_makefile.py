"""
The Makefile's stage rules, with a stand-in for Python that records each stage it is asked to run and writes the
stage's ckpt.pt (failing after the write when told to, as a stage that stops on a NaN does).
"""

import os
import subprocess

import pytest

from scripts import ROOT

FAKE_PYTHON = """#!/bin/sh
# argv: train_X.py ... --out_dir D ...  or  -m nanorlhf.tasks --out_dir D ...
stage=$1; [ "$1" = -m ] && stage=$2
out=$(echo "$@" | sed 's/.*--out_dir \\([^ ]*\\).*/\\1/')
echo "$stage $*" >> "$CALLS"
mkdir -p "$out"
case $stage in nanorlhf.tasks) touch "$out/meta.json";; *) touch "$out/ckpt.pt";; esac
case " $* " in *" --fail "*) exit 2;; esac
exit 0
"""


@pytest.fixture
def make(tmp_path):
    if subprocess.run(["make", "--version"], capture_output=True).returncode != 0:
        pytest.skip("no make")
    if not os.path.exists(os.path.join(ROOT, ".venv", "stamp")):
        pytest.skip("the virtualenv is not built (make builds it first)")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls"

    def run(*variables, ok=True):
        """Make the PPO stage (and what it needs) in tmp_path/out; returns the stages run, in order."""
        calls.write_text("")
        p = subprocess.run(["make", "-C", ROOT, f"OUT={tmp_path}/out", f"PY={fake}", f"{tmp_path}/out/ppo/done",
                            *variables], env={**os.environ, "CALLS": str(calls)}, capture_output=True, text=True)
        assert (p.returncode == 0) == ok, p.stdout + p.stderr
        return [line.split()[0] for line in calls.read_text().splitlines()]

    return run


def test_a_stage_reruns_when_its_command_changes_and_only_then(make):
    assert make() == ["nanorlhf.tasks", "train_sft.py", "train_rm.py", "train_ppo.py"]
    assert make() == []  # nothing changed
    assert make("PPO_FLAGS=--kl_coef 0.1") == ["train_ppo.py"]
    assert make("PPO_FLAGS=--kl_coef 0.1") == []
    assert make("PPO_FLAGS=--kl_coef 0.1", "RM_FLAGS=--lr 1e-4") == ["train_rm.py", "train_ppo.py"]
    assert make("PPO_FLAGS=--kl_coef 0.1", "RM_FLAGS=--lr 1e-4", "SEED=1") == \
        ["nanorlhf.tasks", "train_sft.py", "train_rm.py", "train_ppo.py"]


def test_a_failed_stage_is_rerun_not_built_on(make, tmp_path):
    # the stage wrote its ckpt.pt and then failed: make stops, and the next make reruns it instead of going on
    # to the reward model with it
    assert make("SFT_FLAGS=--fail", ok=False) == ["nanorlhf.tasks", "train_sft.py"]
    assert (tmp_path / "out/sft/ckpt.pt").exists() and not (tmp_path / "out/sft/done").exists()
    assert make("SFT_FLAGS=--fail", ok=False) == ["train_sft.py"]
    assert make() == ["train_sft.py", "train_rm.py", "train_ppo.py"]
