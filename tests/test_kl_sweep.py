"""
kl_sweep.py's two train_ppo.py commands: beta0 runs with beta 0 and the default run with the default beta, whatever
--ppo_flags adds; --ppo_flags that would override a flag the sweep sets, --adaptive_kl, and prompts that are not the
built-in task's (no gold) are refused before anything runs.
"""

import json
import sys
import types

import pytest

from scripts import ROOT

sys.path.insert(0, ROOT)  # kl_sweep.py and train_ppo.py are top-level scripts

import kl_sweep
import train_ppo
from nanorlhf import utils


def sweep(monkeypatch, capsys, *argv):
    """kl_sweep.py as its __main__ runs it, the train_ppo.py runs recorded, not run -> (exit status, stderr, cmds)."""
    cmds = []
    monkeypatch.setattr(kl_sweep.subprocess, "run", lambda cmd, *a, **kw: cmds.append(cmd) or
                        types.SimpleNamespace(returncode=0))
    monkeypatch.setattr(kl_sweep, "sweep_section", lambda *a: "the section")
    monkeypatch.setattr(sys, "argv", ["kl_sweep.py", *argv])
    code = 0
    try:
        utils.run(kl_sweep.main)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err, cmds


def task_prompts(tmp_path, *prompts):
    """A prompts file; by default two of the built-in task's."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts or ("sort 3 1 2", "sort 9 4")))
    return str(path)


def test_ppo_flags_reach_both_runs_and_beta0_stays_0(tmp_path, monkeypatch, capsys):
    code, _, cmds = sweep(monkeypatch, capsys, "--ppo_flags=--lr 2e-4 --kl_estimator k3", "--kl_coef", "0.2",
                          "--out_dir", str(tmp_path), "--data", task_prompts(tmp_path))
    assert code == 0 and len(cmds) == 2
    runs = [utils.parse_flags(train_ppo.Args, cmd[2:]) for cmd in cmds]
    assert [(a.out_dir, a.kl_coef, a.lr, a.kl_estimator, a.gold) for a in runs] == [
        (str(tmp_path / "beta0"), 0.0, 2e-4, "k3", "on"), (str(tmp_path / "default"), 0.2, 2e-4, "k3", "on")]


def test_prompts_without_gold_are_refused_before_any_run(tmp_path, monkeypatch, capsys):
    # train_ppo.py --gold on refuses them, so the beta0 run failed; before that refusal the sweep reported a gold of 0
    data = task_prompts(tmp_path, "sort 3 1 2", "Summarise this post.")
    code, err, cmds = sweep(monkeypatch, capsys, "--data", data, "--out_dir", str(tmp_path / "sweep"))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --data {data}: kl_sweep.py needs the built-in task's prompts"), err
    assert "'Summarise this post.' is not one" in err
    assert not cmds and not (tmp_path / "sweep").exists()


def test_adaptive_kl_is_refused_for_the_beta0_run(tmp_path, monkeypatch, capsys):
    # train_ppo.py refuses --adaptive_kl from beta 0 (the controller multiplies beta: 0 stays 0)
    code, err, cmds = sweep(monkeypatch, capsys, "--ppo_flags=--adaptive_kl --target_kl 1", "--data",
                            task_prompts(tmp_path), "--out_dir", str(tmp_path / "sweep"))
    assert code == 2 and err.startswith("error: --ppo_flags: --adaptive_kl cannot apply to the beta0 run"), err
    assert not cmds and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("ppo_flags, named", [
    ("--kl_coef 0.1", "--kl_coef"),
    ("--lr 2e-4 --kl_coef=0.1", "--kl_coef"),
    ("--seed 1 --num_iterations 3", "--seed, --num_iterations"),
    ("--out_dir elsewhere", "--out_dir"),
    ("--data d.jsonl --sft s --rm r", "--data, --sft, --rm"),
    ("--gold off", "--gold"),
])
def test_ppo_flags_that_the_sweep_sets_are_refused(tmp_path, monkeypatch, capsys, ppo_flags, named):
    # they come after the sweep's own flags, so they would win: --kl_coef 0.1 made "beta0" a beta 0.1 run
    out = tmp_path / "sweep"
    code, err, cmds = sweep(monkeypatch, capsys, f"--ppo_flags={ppo_flags}", "--out_dir", str(out))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --ppo_flags: kl_sweep.py sets {named} itself")
    assert not cmds and not out.exists()
