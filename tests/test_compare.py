"""
compare.py: the matched budget and settings, the table over seeds, and a missing pipeline reported in one line.
"""

import builtins
import dataclasses
import errno
import json
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

from scripts import ROOT, script

sys.path.insert(0, ROOT)  # compare.py is a top-level script

import compare
import evaluate
import train_dpo
import train_grpo
import train_ppo
from nanorlhf.train_common import parse_stage_flags
from nanorlhf.utils import UserError, os_error_line, parse_flags


def test_matched_budget_gives_dpo_as_many_backward_sequences_as_ppo():
    ppo = {"num_iterations": 50, "batch_size": 64, "ppo_epochs": 4, "num_minibatches": 4}
    online, dpo_steps = compare.matched_budget(ppo, 4, 16)
    assert online == {"num_iterations": 50, "batch_size": 64, "num_epochs": 4, "num_minibatches": 4}
    assert dpo_steps == 200 and dpo_steps * 16 * 4 == 50 * 64 * 4
    for iters, bs, epochs, k, dpo_bs in ((20, 64, 4, 4, 16), (7, 32, 2, 3, 8), (1, 8, 1, 2, 64)):
        p = {"num_iterations": iters, "batch_size": bs, "ppo_epochs": epochs, "num_minibatches": 2}
        _, steps = compare.matched_budget(p, k, dpo_bs)
        assert steps == max(1, round(iters * bs * epochs / (dpo_bs * k)))


def test_online_runs_get_the_ppo_run_s_settings_of_the_shared_flags():
    """
    Every shared flag is a flag of both scripts; PPO's values (none of them a default) reach train_grpo.py's parser
    as PPO ran them, a negative number and a false bool included; PPO-only flags and beta stay behind.
    """
    ppo_flags = {f.name for f in dataclasses.fields(train_ppo.Args)}
    grpo_defaults = {f.name: f.default for f in dataclasses.fields(train_grpo.Args)}
    assert set(compare.SHARED_FLAGS) <= ppo_flags & set(grpo_defaults)
    ppo = {"response_length": 16, "temperature": 0.7, "missing_eos_penalty": -1.25, "lr": 3e-5, "anneal_lr": False,
           "weight_decay": 0.1, "beta1": 0.8, "beta2": 0.99, "clip_coef": 0.1, "max_grad_norm": 0.5,
           "kl_coef": 0.05, "gamma": 0.99, "num_iterations": 7}
    shared = compare.shared_settings(ppo)
    assert set(shared) == set(ppo) - {"kl_coef", "gamma", "num_iterations"}  # (the budget is matched_budget's)
    args = parse_stage_flags(train_grpo.Args, compare.as_flags(shared))
    for k in shared:
        assert getattr(args, k) == ppo[k] != grpo_defaults[k], k
    assert args.kl_coef == grpo_defaults["kl_coef"]
    # --grpo_flags, which compare.py puts after them, win; a flag an older run did not record keeps its default
    assert parse_stage_flags(train_grpo.Args, compare.as_flags(shared) + ["--lr", "1e-4"]).lr == 1e-4
    assert compare.shared_settings({"lr": 1e-4, "missing_eos_penalty": None}) == {"lr": 1e-4}


def test_summarize_prints_mean_and_sd_over_pipelines(tmp_path, capsys):
    outs = []
    for i, gold in enumerate((0.5, 0.7)):
        d = tmp_path / f"out{i}" / "compare"
        d.mkdir(parents=True)
        row = {"gold": gold, "win_rate_vs_sft": 0.5, "kl": 1.0, "rm": 0.0, "length": 10.0, "wall_s": 60.0, "models": 3}
        (d / "rows.json").write_text(json.dumps({"grpo": row}))
        outs.append(str(tmp_path / f"out{i}"))
    compare.summarize(outs)
    out = capsys.readouterr().out
    assert "| grpo | 0.600 ± 0.141 | 0.500 ± 0.000 |" in out  # sd of (0.5, 0.7) = 0.1414


def test_a_steps_command_line_pasted_into_a_shell_runs_as_it_ran(tmp_path, capsys):
    """train's "[name] ..." line is the whole command quoted for a shell: pasted into one, it gets the same words."""
    cmd = [sys.executable, "-c", "import sys; print(sys.argv[1:])", "--grpo_flags=--lr 1e-4", "it's", "$HOME"]
    compare.train("grpo", cmd, str(tmp_path / "grpo.log"))
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("[grpo] ")
    pasted = subprocess.run(line.removeprefix("[grpo] "), shell=True, capture_output=True, text=True)
    assert pasted.stdout == (tmp_path / "grpo.log").read_text() == "['--grpo_flags=--lr 1e-4', \"it's\", '$HOME']\n"


def test_missing_pipeline_exits_2(tmp_path):
    p = script("compare.py", "--out", str(tmp_path / "nope"), check=False)
    assert p.returncode == 2 and "run `make` first" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "nope").exists()


def test_a_ppo_checkpoint_without_saved_flags_is_one_line_naming_it(tmp_path, monkeypatch):
    """compare.py reads PPO's budget from its flags in ppo/ckpt.pt: a file without them was KeyError: 'args'."""
    for name in ("prompts", "prefs", "prefs_eval", "eval"):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / f"{name}.jsonl").write_text("")
    for stage in ("sft", "rm", "ppo"):
        (tmp_path / stage).mkdir()
        torch.save({"step": 1, "stage": stage}, tmp_path / stage / "ckpt.pt")
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path)])
    with pytest.raises(UserError, match=f"^{tmp_path}/ppo/ckpt.pt: holds no saved flags"):
        compare.main()


def exit_status_and_error(monkeypatch, capsys, argv):
    """Run compare.py with argv as a user does (utils.run): its exit status and what it printed to stderr."""
    monkeypatch.setattr(sys, "argv", ["compare.py", *argv])
    with pytest.raises(SystemExit) as info:
        compare.run(compare.main)
    return info.value.code, capsys.readouterr().err


def test_dpo_batch_size_below_1_is_one_line(tmp_path, monkeypatch, capsys):
    """--dpo_batch_size 0 was a ZeroDivisionError in matched_budget, after the pipeline's checkpoints were read."""
    code, err = exit_status_and_error(monkeypatch, capsys, ["--out", str(tmp_path), "--dpo_batch_size", "0"])
    assert (code, err) == (2, "error: --dpo_batch_size 0: must be at least 1\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("payload, message", [
    ({"stage": "sft", "args": {"seed": 0, "lr": 1e-5}},
     "ppo/ckpt.pt: holds a checkpoint of the 'sft' stage, not of a PPO run"),
    ({"stage": "ppo", "args": {"num_iterations": 2, "batch_size": 8}},
     "ppo/ckpt.pt: its saved flags lack ppo_epochs, num_minibatches: not a train_ppo.py run's checkpoint"),
    # a run stopped by --stop_at or Ctrl-C: the methods got its 4 iterations' budget against a policy of 1
    ({"stage": "ppo", "step": 1, "args": {"num_iterations": 4, "batch_size": 8, "ppo_epochs": 1, "num_minibatches": 1}},
     "ppo/ckpt.pt: the PPO run stopped at iteration 1 of 4: finish it first (python train_ppo.py --out_dir {d}/ppo "
     "--resume on)"),
])
def test_a_ppo_checkpoint_that_is_not_a_ppo_run_s_is_one_line_naming_it(tmp_path, monkeypatch, capsys, payload,
                                                                        message):
    """An SFT checkpoint copied to ppo/ckpt.pt has saved flags, but not PPO's: it was KeyError: 'num_iterations'."""
    (tmp_path / "data").mkdir()
    for name in ("prompts", "prefs_eval", "eval"):
        (tmp_path / "data" / f"{name}.jsonl").write_text("")
    (tmp_path / "data" / "prefs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    for stage in ("sft", "rm", "ppo"):
        (tmp_path / stage).mkdir()
        torch.save({"step": 1, "stage": stage, "args": {"seed": 0}}, tmp_path / stage / "ckpt.pt")
    torch.save(payload, tmp_path / "ppo" / "ckpt.pt")
    code, err = exit_status_and_error(monkeypatch, capsys, ["--out", str(tmp_path), "--methods", "dpo"])
    message = message.format(d=tmp_path)
    assert code == 2 and err.startswith(f"error: {tmp_path}/{message}") and err.count("\n") == 1, err
    assert not (tmp_path / "compare").exists()


@pytest.mark.parametrize("content, message", [
    (b'{"sft": {"gold": 0.5, "models": 1}\n', "not valid JSON (Expecting ',' delimiter: line 2 column 1"),
    (b"\x80\x04garbage", "not valid JSON ('utf-8' codec can't decode byte 0x80"),
    (b"[1, 2]", "expected an object of {method: its row of numbers}"),
    (b'{"grpo": [0.5]}', "expected an object of {method: its row of numbers}"),
    (b'{"grpo": {"gold": "high", "models": 3}}', 'grpo.gold: expected a number or null, got "high"'),
    # JSON's true is a bool, which Python counts as an int: a mean over it would average 1s
    (b'{"grpo": {"gold": true, "models": 3}}', "grpo.gold: expected a number or null, got true"),
])
def test_summarize_a_malformed_rows_json_is_one_line_naming_it(tmp_path, monkeypatch, capsys, content, message):
    """A rows.json cut short was a JSONDecodeError, a list there an AttributeError, a string a TypeError."""
    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / "rows.json").write_bytes(content)
    code, err = exit_status_and_error(monkeypatch, capsys, ["--summarize", str(tmp_path)])
    assert code == 2 and err.startswith(f"error: {tmp_path}/compare/rows.json: {message}"), err
    assert err.count("\n") == 1 and err.endswith(f"; rerun `python compare.py --out {tmp_path}`\n"), err


@pytest.mark.parametrize("argv, message", [
    (["--grpo_flags", "--out_dir elsewhere_g"], "--grpo_flags: compare.py passes --out_dir to train_grpo.py itself"),
    (["--grpo_flags", "--lr 1e-4 --seed=3 --num_iterations 2"],
     "--grpo_flags: compare.py passes --seed, --num_iterations to train_grpo.py itself"),
    (["--dpo_flags", "--batch_size 4 --max_steps 9"], "--dpo_flags: compare.py passes --batch_size, --max_steps to "
                                                     "train_dpo.py itself"),
    (["--eval_flags", "--n_prompts 3 --out_dir elsewhere"], "--eval_flags: compare.py passes --out_dir to evaluate.py"),
    (["--eval_flags", "--extra x=y"], "--eval_flags: compare.py passes --extra to evaluate.py itself"),
    (["--eval_flags", "--n_prompts '3"], "--eval_flags \"--n_prompts '3\": No closing quotation"),
])
def test_a_flag_compare_sets_itself_is_refused_in_the_flags_strings(tmp_path, monkeypatch, capsys, argv, message):
    """
    They come last, so they won: --grpo_flags "--out_dir elsewhere_g" trained there and then compare evaluated the
    old --out/compare/grpo; --eval_flags "--out_dir x" had it read an old eval/policies.json.
    """
    code, err = exit_status_and_error(monkeypatch, capsys, ["--out", str(tmp_path / "pipe"), *argv])
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["--grpo_flags", "--lr 1e-4 --stop_at 1"], "--grpo_flags: --stop_at: compare.py trains each method to PPO's "
                                               "budget and reports it as such: drop it"),
    (["--dpo_flags=--resume on"], "--dpo_flags: --resume: compare.py trains each method to PPO's budget"),
])
def test_flags_that_cut_a_run_short_are_refused_in_the_flags_strings(tmp_path, monkeypatch, capsys, argv, message):
    # the run stopped at step 1 and the report stated the budget of the whole run for it, exit 0
    code, err = exit_status_and_error(monkeypatch, capsys, ["--out", str(tmp_path / "pipe"), *argv])
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method, flags", [("rloo", {"num_iterations": 2}), ("dpo", {"max_steps": 40})])
def test_a_method_s_run_short_of_its_budget_is_refused_before_the_evaluation(tmp_path, monkeypatch, capsys, method,
                                                                              flags):
    """
    A run killed or stopped part-way (here found by --train false, as after a compare.py that was interrupted) was
    evaluated and reported under the budget of the whole run, exit 0; now one line with the commands that finish it.
    """
    cmds = fake_pipeline(tmp_path, monkeypatch)
    run_dir = tmp_path / "compare" / method
    run_dir.mkdir(parents=True)
    torch.save({"step": 1, "stage": "grpo", "args": {"seed": 0, **flags}}, run_dir / "ckpt.pt")
    code, err = exit_status_and_error(monkeypatch, capsys, ["--out", str(tmp_path), "--methods", method, "--train",
                                                            "false"])
    planned = next(iter(flags.values()))
    script_name = "train_dpo.py" if method == "dpo" else "train_grpo.py"
    assert code == 2 and err.count("\n") == 1, err
    assert err == (f"error: {run_dir}/ckpt.pt: the {method} run stopped at step 1 of {planned}: finish it first "
                   f"(python {script_name} --out_dir {run_dir} --resume on), then compare.py --out {tmp_path} "
                   f"--methods {method} --train false\n"), err
    assert cmds == {} and sorted(os.listdir(tmp_path / "compare")) == [method]


def test_the_scripts_run_in_the_directory_compare_py_was_started_in(tmp_path, monkeypatch, capsys):
    """
    With a relative --out, compare.py read the pipeline where it was started while its scripts ran in the
    repository, so they read (or wrote) another directory of that name, or failed after the first ones had trained.
    Here each script is recorded where a real one would run: the directory subprocess.run would start it in.
    """
    (tmp_path / "pipe").mkdir()
    fake_pipeline(tmp_path / "pipe", monkeypatch)
    record = compare.train
    monkeypatch.setattr(compare, "train", train_real)
    started = []

    def fake_run(cmd, cwd=None, **kwargs):
        started.append((cmd[1], cwd))
        script_name = os.path.basename(cmd[1])
        name = {"train_dpo.py": "dpo", "evaluate.py": "evaluate"}.get(script_name) or cmd[cmd.index("--advantage") + 1]
        here = os.getcwd()
        os.chdir(cwd or here)
        try:
            record(name, cmd, None)
        finally:
            os.chdir(here)
        return mock.Mock(returncode=0)

    monkeypatch.setattr(compare.subprocess, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", "pipe", "--methods", "grpo,dpo"])
    compare.run(compare.main)
    assert [(os.path.basename(s), cwd) for s, cwd in started] == [("train_grpo.py", None), ("train_dpo.py", None),
                                                                  ("evaluate.py", None)]
    assert all(s == os.path.join(ROOT, os.path.basename(s)) for s, _ in started)  # the scripts beside compare.py
    assert (tmp_path / "pipe" / "compare" / "report.md").exists()
    assert not os.path.exists(os.path.join(ROOT, "pipe"))


@pytest.mark.parametrize("argv, named", [
    (["--seed", "7", "--grpo_flags", "--lr 5"], "--seed, --grpo_flags"),
    (["--dpo_batch_size", "4"], "--dpo_batch_size"),
    (["--dpo_flags", "--beta 0.2"], "--dpo_flags"),
])
def test_train_false_refuses_the_training_flags(tmp_path, monkeypatch, capsys, argv, named):
    # --train false trains nothing, yet the report described the runs with them: "(seed 7)", "then --grpo_flags --lr 5"
    code, err = exit_status_and_error(monkeypatch, capsys, ["--out", str(tmp_path), "--train", "false", *argv])
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {named}: only shape the training runs, and --train false trains none"), err
    assert list(tmp_path.iterdir()) == []


train_real = compare.train


def fake_pipeline(tmp_path, monkeypatch, check_flags=False):
    """
    A pipeline directory whose scripts are recorded, not run: train() saves a run's ckpt.pt, evaluate its rows.
    The --*_flags strings are checked by their scripts' parsers (compare.check_flags, a subprocess each) only with
    check_flags.
    """
    (tmp_path / "data").mkdir()
    for name in ("prompts", "eval"):
        (tmp_path / "data" / f"{name}.jsonl").write_text(json.dumps({"prompt": "p"}) + "\n")
    for name in ("prefs", "prefs_eval"):
        (tmp_path / "data" / f"{name}.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
                                                          + "\n")
    ppo = {"num_iterations": 2, "batch_size": 8, "ppo_epochs": 2, "num_minibatches": 2, "lr": 1e-4, "temperature": 0.7}
    for stage, args in (("sft", {"seed": 0}), ("rm", {"seed": 0}), ("ppo", ppo)):
        (tmp_path / stage).mkdir()
        torch.save({"step": 2 if stage == "ppo" else 1, "stage": stage, "args": args}, tmp_path / stage / "ckpt.pt")
    cmds = {}

    def train(name, cmd, log_path):
        cmds[name] = cmd
        out_dir = cmd[cmd.index("--out_dir") + 1]
        os.makedirs(out_dir, exist_ok=True)
        if name != "evaluate":  # the flags the script would record, parsed by its own parser
            stage_args = train_dpo.Config if name == "dpo" else train_grpo.Args
            args = dataclasses.asdict(parse_stage_flags(stage_args, cmd[2:]))
            step = args["max_steps" if name == "dpo" else "num_iterations"]  # a finished run's
            torch.save({"step": step, "models_resident": 3, "args": args}, os.path.join(out_dir, "ckpt.pt"))
            return
        row = {"n": 4, "gold": 0.5, "win_rate_vs_sft": 0.5, "kl": 1.0, "rm": 0.0, "length": 5.0, "wall_s": 1.0}
        names = ["sft", "ppo"] + [x.split("=")[0] for x in cmd[cmd.index("--extra") + 1].split(",")]
        with open(os.path.join(out_dir, "policies.json"), "w") as f:
            json.dump({n: row for n in names}, f)
        with open(os.path.join(out_dir, "report.json"), "w") as f:  # evaluate.py's own parse of its flags
            json.dump({"device": "cpu", "temperature": parse_flags(evaluate.Config, cmd[2:]).temperature}, f)

    monkeypatch.setattr(compare, "train", train)
    monkeypatch.setattr(compare, "plot", lambda *a: None)
    if not check_flags:
        monkeypatch.setattr(compare, "check_flags", lambda extra_flags: None)
    return cmds


def test_own_flags_are_the_flags_each_command_sets(tmp_path, monkeypatch, capsys):
    """
    OWN_FLAGS, what --*_flags may not name, is what each command sets before them (PPO's shared ones aside). The
    flags strings, valid, pass check_flags (each script's parser, with --help).
    """
    cmds = fake_pipeline(tmp_path, monkeypatch, check_flags=True)
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--methods", "grpo,dpo", "--grpo_flags",
                                      "--lr 3e-4", "--dpo_flags", "--beta 0.2", "--eval_flags", "--n_prompts 2"])
    compare.run(compare.main)
    for name, key, extra in (("grpo", "grpo_flags", ["--lr", "3e-4"]), ("dpo", "dpo_flags", ["--beta", "0.2"]),
                             ("evaluate", "eval_flags", ["--n_prompts", "2"])):
        cmd = cmds[name]
        assert cmd[-len(extra):] == extra
        own = {a[2:] for a in cmd[:-len(extra)] if a.startswith("--")} - set(compare.SHARED_FLAGS)
        assert own == set(compare.OWN_FLAGS[key][1]), name


@pytest.mark.parametrize("eval_flags, said", [
    ("", "sampled at temperature 1 with"),
    ("--temperature 0", "decoded greedily (temperature 0) with"),
    ("--temperature=0.7 --n_prompts 2", "sampled at temperature 0.7 with"),
])
def test_the_report_states_the_temperature_evaluate_sampled_at(tmp_path, monkeypatch, capsys, eval_flags, said):
    # --eval_flags "--temperature 0" still said "sampled at temperature 1"
    cmds = fake_pipeline(tmp_path, monkeypatch)
    (tmp_path / "compare" / "dpo").mkdir(parents=True)
    dpo_args = {"seed": 0, "batch_size": 16, "max_steps": 1}
    torch.save({"step": 1, "models_resident": 1, "args": dpo_args}, tmp_path / "compare" / "dpo" / "ckpt.pt")
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--methods", "dpo", "--train", "false",
                                      "--eval_flags", eval_flags])
    compare.run(compare.main)
    assert list(cmds) == ["evaluate"]
    report = (tmp_path / "compare" / "report.md").read_text()
    assert said in report and report.count(" at temperature") + report.count("greedily") == 1, report


@pytest.mark.parametrize("held, cell", [(2, "2"), (None, "-")])
def test_the_models_in_memory_of_ppo_are_what_its_run_held(tmp_path, monkeypatch, capsys, held, cell):
    """PPO's row said 4 models whatever the run held (3 with --critic shared, 2 with LoRA): now its ckpt.pt's count."""
    fake_pipeline(tmp_path, monkeypatch)
    ppo = torch.load(tmp_path / "ppo" / "ckpt.pt", weights_only=True)
    if held is not None:
        torch.save({**ppo, "models_resident": held}, tmp_path / "ppo" / "ckpt.pt")
    (tmp_path / "compare" / "dpo").mkdir(parents=True)
    torch.save({"step": 1, "models_resident": 1, "args": {"seed": 0, "batch_size": 16, "max_steps": 1}},
               tmp_path / "compare" / "dpo" / "ckpt.pt")
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--methods", "dpo", "--train", "false"])
    compare.run(compare.main)
    rows = {line.split(" | ")[0].lstrip("| "): line.rstrip(" |").split(" | ")[-1]
            for line in (tmp_path / "compare" / "report.md").read_text().splitlines() if line.startswith("| ")}
    assert (rows["sft"], rows["ppo"], rows["dpo"]) == ("1", cell, "1"), rows


def test_the_report_names_the_flags_a_run_it_evaluates_was_trained_with_when_they_differ(tmp_path, monkeypatch,
                                                                                         capsys):
    """
    --train false described the runs in --out/compare with the seed and budget it would pass now: a grpo run trained
    earlier with --seed 3 for 10 iterations was reported as seed 0 with the PPO run's 2 iterations, and nothing said.
    """
    fake_pipeline(tmp_path, monkeypatch)  # PPO: 2 x 8 episodes, 2 epochs x 2 minibatches, lr 1e-4, temperature 0.7
    grpo = {"seed": 3, "num_iterations": 10, "batch_size": 8, "num_epochs": 2, "num_minibatches": 2, "lr": 1e-4,
            "temperature": 0.7, "kl_coef": 0.1}  # kl_coef: not a flag compare.py passes, so not compared
    dpo = {"seed": 0, "batch_size": 16, "max_steps": 1}  # 2 x 8 x 2 sequences / (16 prompts x 2 responses)
    for name, args in (("grpo", grpo), ("dpo", dpo)):
        (tmp_path / "compare" / name).mkdir(parents=True)
        step = args["num_iterations" if name == "grpo" else "max_steps"]  # finished runs
        torch.save({"step": step, "models_resident": 3, "args": args}, tmp_path / "compare" / name / "ckpt.pt")
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--methods", "grpo,dpo", "--train", "false"])
    compare.run(compare.main)
    line = "grpo was trained with other flags than those above: --seed 3 (above: 0), --num_iterations 10 (above: 2)"
    report = (tmp_path / "compare" / "report.md").read_text()
    assert line in report and report.count("trained with other flags") == 1, report  # dpo's agree: no line
    assert "(seed 0)" in report and "the PPO run's 2 x 8" in report
    assert line in capsys.readouterr().out


def test_runs_trained_with_the_flags_the_report_states_add_no_line(tmp_path, monkeypatch, capsys):
    """Runs compare.py has just trained agree, a shared flag --grpo_flags overrides included (the report states it)."""
    fake_pipeline(tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--methods", "grpo,rloo,dpo", "--seed",
                                      "5", "--grpo_flags", "--lr=3e-4 --kl_coef 0.2"])
    compare.run(compare.main)
    report = (tmp_path / "compare" / "report.md").read_text()
    assert "then --grpo_flags --lr=3e-4" in report and "trained with other flags" not in report, report
    assert "trained with other flags" not in capsys.readouterr().out


@pytest.mark.parametrize("payload, message", [
    (None, "compare/grpo/ckpt.pt: no such checkpoint file"),
    ({"models_resident": 3}, "compare/grpo/ckpt.pt: holds no saved flags (no 'args' dict)"),
])
def test_train_false_over_a_run_without_saved_flags_is_one_line_before_the_evaluation(tmp_path, monkeypatch, capsys,
                                                                                       payload, message):
    cmds = fake_pipeline(tmp_path, monkeypatch)
    (tmp_path / "compare" / "grpo").mkdir(parents=True)
    if payload is not None:
        torch.save(payload, tmp_path / "compare" / "grpo" / "ckpt.pt")
    code, err = exit_status_and_error(monkeypatch, capsys, ["--out", str(tmp_path), "--methods", "grpo", "--train",
                                                            "false"])
    assert code == 2 and err.startswith(f"error: {tmp_path}/{message}") and err.count("\n") == 1, err
    assert cmds == {} and sorted(os.listdir(tmp_path / "compare")) == ["grpo"]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "grpo", "--grpo_flags", "--lr 1e-4 --betta 0.2"],
     "--grpo_flags: train_grpo.py: error: unknown flag --betta (did you mean"),
    (["--methods", "rloo,dpo", "--dpo_flags", "--beta abc"],
     "--dpo_flags: train_dpo.py: error: argument --beta: invalid float value: 'abc'"),
    (["--eval_flags", "--n_prompt 3"], "--eval_flags: evaluate.py: error: unknown flag --n_prompt (did you mean "
                                       "--n_prompts?)"),
])
def test_a_bad_flag_in_a_flags_string_is_one_line_before_anything_runs(tmp_path, monkeypatch, capsys, argv, message):
    """
    Each script's parser found it only when the script ran, after every method before it had trained and
    out/compare had been written: --eval_flags "--n_prompt 3" after all four methods.
    """
    cmds = fake_pipeline(tmp_path, monkeypatch, check_flags=True)
    code, err = exit_status_and_error(monkeypatch, capsys, ["--out", str(tmp_path), *argv])
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert cmds == {} and not (tmp_path / "compare").exists()


@pytest.mark.parametrize("text, word", [("--lr 1e-4 5", "5"), ("--lr=1e-4 5", "5"), ("--anneal_lr false true", "true"),
                                        ("--help", "--help"), ("-h", "-h"), ("--lr 1 --", "--")])
def test_a_word_no_flag_takes_is_refused_in_a_flags_string(text, word):
    # the script refuses it, but its parser run with --help (check_flags) stops at --help before it gets there
    with pytest.raises(UserError, match=f"^--grpo_flags: unexpected argument '{word}' \\(flags are --name value\\)$"):
        compare.split_flags("grpo_flags", text)
    assert compare.split_flags("grpo_flags", "--anneal_lr --lr 3 --missing_eos_penalty -1 --temperature=0.5") == [
        "--anneal_lr", "--lr", "3", "--missing_eos_penalty", "-1", "--temperature=0.5"]


@pytest.mark.parametrize("argv, message", [
    (["--out", "PIPE", "--methods", "grpo", "--dpo_flags", "--beta 0.2", "--dpo_batch_size", "4"],
     "--dpo_batch_size, --dpo_flags: only shape the dpo runs, and --methods grpo trains none of them; drop them"),
    (["--out", "PIPE", "--methods", "dpo", "--grpo_flags", "--lr 5e-4"],
     "--grpo_flags: only shape the grpo, dr_grpo, rloo runs, and --methods dpo trains none of them; drop them"),
    (["--out", "PIPE", "--methods", "rloo", "--dpo_flags", ""], "--dpo_flags: only shape the dpo runs"),
    (["--summarize", "PIPE", "--methods", "dpo", "--seed", "5", "--grpo_flags", "--lr 1", "--out", "/nonexistent"],
     "--out, --methods, --seed, --grpo_flags: --summarize trains and evaluates nothing"),
    (["--summarize", "PIPE", "--train", "false"], "--train: --summarize trains and evaluates nothing"),
])
def test_a_flag_for_a_method_not_run_is_refused(tmp_path, monkeypatch, capsys, argv, message):
    """
    They exited 0, doing nothing: --methods dpo --grpo_flags "--lr 5e-4" trained dpo and reported "Online methods ...
    then --grpo_flags --lr 5e-4"; --summarize read the rows and ignored every other flag.
    """
    cmds = fake_pipeline(tmp_path, monkeypatch)
    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / "rows.json").write_text(json.dumps({"grpo": {"gold": 0.5, "models": 3}}))
    code, err = exit_status_and_error(monkeypatch, capsys, [a.replace("PIPE", str(tmp_path)) for a in argv])
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert cmds == {} and os.listdir(tmp_path / "compare") == ["rows.json"]


@pytest.mark.parametrize("methods, file, content, message", [
    ("grpo", "eval", {"prompt": 5}, "data/eval.jsonl:1: field 'prompt': expected a non-empty string, got a number"),
    ("rloo", "prompts", {"text": "p"}, "data/prompts.jsonl:1: field 'prompt': missing"),
    ("dpo", "prefs_eval", {"prompt": "p", "chosen": "a", "rejected": "a"},
     "data/prefs_eval.jsonl:1: field 'rejected': identical to chosen (a tie"),
])
def test_a_bad_record_in_a_data_file_a_run_reads_is_one_line_before_anything_is_trained(tmp_path, monkeypatch, capsys,
                                                                                        methods, file, content,
                                                                                        message):
    """compare.py read only prefs.jsonl itself: a bad eval.jsonl stopped evaluate.py after every method had trained."""
    cmds = fake_pipeline(tmp_path, monkeypatch)
    (tmp_path / "data" / f"{file}.jsonl").write_text(json.dumps(content) + "\n")
    code, err = exit_status_and_error(monkeypatch, capsys, ["--out", str(tmp_path), "--methods", f"{methods},dr_grpo"])
    assert code == 2 and err.startswith(f"error: {tmp_path}/{message}"), err
    assert err.count("\n") == 1 and cmds == {} and not (tmp_path / "compare").exists()


def test_a_data_file_no_run_reads_is_not_read(tmp_path, monkeypatch, capsys):
    # --methods dpo trains no online method (prompts.jsonl); --train false trains nothing (prefs_eval.jsonl)
    cmds = fake_pipeline(tmp_path, monkeypatch)
    (tmp_path / "data" / "prompts.jsonl").write_text("")
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--methods", "dpo"])
    compare.run(compare.main)
    assert list(cmds) == ["dpo", "evaluate"]
    (tmp_path / "data" / "prefs_eval.jsonl").write_text("")
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--methods", "dpo", "--train", "false"])
    compare.run(compare.main)


def full_disk(monkeypatch):
    """open() of a temporary (name.tmpPID) for writing gives a file that the first write fills: ENOSPC."""
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if ".tmp" in os.path.basename(str(path)) and "w" in mode else f

    monkeypatch.setattr(builtins, "open", fake_open)


def test_a_full_disk_leaves_no_temporary_report(tmp_path, monkeypatch, capsys):
    # compare.py's own write_text left a 0-byte rows.json.tmp<pid>
    fake_pipeline(tmp_path, monkeypatch)
    full_disk(monkeypatch)
    code, err = exit_status_and_error(monkeypatch, capsys, ["--out", str(tmp_path), "--methods", "dpo"])
    assert (code, err) == (2, f"error: {tmp_path / 'compare' / 'rows.json'}: No space left on device\n")
    assert not [n for n in os.listdir(tmp_path / "compare") if ".tmp" in n]


def test_a_full_disk_leaves_no_temporary_figure(tmp_path, monkeypatch):
    """plot's savefig on a full disk left a gold_vs_kl.png.tmp<pid> (a stand-in for matplotlib, which may be absent)."""
    class Fig:
        def savefig(self, path, **kwargs):
            with open(path, "wb") as f:
                f.write(b"\x89PNG")

    plt = mock.MagicMock()
    plt.subplots.return_value = (Fig(), mock.MagicMock())
    monkeypatch.setattr(compare, "pyplot", lambda: plt)
    row = {"kl": 1.0, "gold": 0.5, "gold_sem": 0.1}
    full_disk(monkeypatch)
    path = str(tmp_path / "gold_vs_kl.png")
    with pytest.raises(OSError) as info:
        compare.plot({"sft": row}, ["sft"], path)
    # the figure's own name, as run() prints it in its one-line error
    assert os_error_line(info.value) == f"{path}: No space left on device"
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# the numbers of the report: each in its own column, against plain references


def plain_cell(x, digits):
    """The reference formatting of one number: '-' for none, a float to `digits` places, an int as it is."""
    if x is None:
        return "-"
    return ("%." + str(digits) + "f") % x if isinstance(x, float) else str(x)


def random_row(rng, with_none=False):
    row = {"gold": rng.random(), "gold_sem": rng.random() / 10, "win_rate_vs_sft": rng.random(),
           "kl": rng.uniform(0, 30), "rm": rng.gauss(0, 1), "length": rng.uniform(1, 64), "wall_s": rng.uniform(1, 900),
           "models": rng.randint(1, 4)}
    if with_none:
        for key in rng.sample(sorted(row), 2):
            row[key] = None
    return row


def table_cells(text):
    """A markdown table -> {first cell: [the other cells]}, the header and the rule left out."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ")]
    return {r[0]: r[1:] for r in rows[1:]}


def test_the_table_puts_each_number_in_its_column():
    import random
    rng = random.Random(0)
    names = ["sft", "ppo", "grpo", "dr_grpo", "rloo", "dpo"]
    rows = {n: random_row(rng, with_none=i % 2 == 1) for i, n in enumerate(names)}
    order = ["sft", "dpo", "ppo", "rloo", "grpo", "dr_grpo"]
    cells = table_cells(compare.table(rows, order))
    assert list(cells) == order
    for n in order:
        r = rows[n]
        gold = plain_cell(r["gold"], 3) + (" ± %.3f" % r["gold_sem"] if r["gold_sem"] is not None else "")
        assert cells[n] == [gold, plain_cell(r["win_rate_vs_sft"], 3), plain_cell(r["kl"], 2), plain_cell(r["rm"], 2),
                            plain_cell(r["length"], 1), plain_cell(r["wall_s"], 0), plain_cell(r["models"], 0)], n


def test_summarize_gives_each_column_its_own_mean_and_sd_over_the_pipelines(tmp_path, capsys):
    """Per column, over the pipelines that have a number there; a method missing from one pipeline is left out."""
    import random
    rng = random.Random(1)
    runs = []
    for i in range(4):
        rows = {n: random_row(rng) for n in ("grpo", "rloo", "dpo")}
        rows["grpo"]["kl"] = None if i == 1 else rows["grpo"]["kl"]  # one pipeline without it: mean of three
        rows["dpo"]["wall_s"] = None if i > 0 else rows["dpo"]["wall_s"]  # one number only: no sd
        if i == 2:
            del rows["rloo"]
        d = tmp_path / f"out{i}" / "compare"
        d.mkdir(parents=True)
        (d / "rows.json").write_text(json.dumps(rows))
        runs.append(rows)
    compare.summarize([str(tmp_path / f"out{i}") for i in range(4)])
    cells = table_cells(capsys.readouterr().out)
    assert list(cells) == ["grpo", "dpo"]

    def mean_sd(xs, digits):
        if not xs:
            return "-"
        m = 0.0
        for x in xs:
            m += x / len(xs)
        if len(xs) == 1:
            return plain_cell(m, digits)
        var = 0.0
        for x in xs:
            var += (x - m) ** 2 / (len(xs) - 1)
        return plain_cell(m, digits) + " ± " + plain_cell(var ** 0.5, digits)

    for n in cells:
        want = [mean_sd([r[n][key] for r in runs if r[n][key] is not None], digits)
                for key, digits in (("gold", 3), ("win_rate_vs_sft", 3), ("kl", 2), ("rm", 2), ("length", 1),
                                    ("wall_s", 0))]
        assert cells[n] == want + [str(runs[0][n]["models"])], n


def test_other_flags_compares_only_the_flags_the_run_recorded():
    # an older run's checkpoint without a flag compare.py passes now: that flag is not compared (no KeyError)
    stated = {"seed": 0, "num_iterations": 50, "anneal_lr": True, "lr": 1e-4}
    assert compare.other_flags("grpo", {"seed": 0, "lr": 1e-4}, stated) is None
    line = compare.other_flags("grpo", {"seed": 3, "anneal_lr": False, "lr": 1e-4}, stated)
    # the values as a command line gives them: the bools as the flag parser reads them
    assert line == "grpo was trained with other flags than those above: --seed 3 (above: 0), --anneal_lr false " \
                   "(above: true)"
    args = parse_stage_flags(train_grpo.Args, compare.as_flags({"anneal_lr": False, "seed": 3}))
    assert (args.anneal_lr, args.seed) == (False, 3)
    args = parse_stage_flags(train_grpo.Args, compare.as_flags({"anneal_lr": True}))
    assert args.anneal_lr is True


def test_matched_budget_keeps_epochs_and_minibatches_apart():
    """PPO's epochs become the online methods' epochs and its minibatches theirs (the older test had 4 of each)."""
    import random
    rng = random.Random(2)
    for _ in range(20):
        ppo = {"num_iterations": rng.randint(1, 100), "batch_size": rng.choice([8, 16, 64]),
               "ppo_epochs": rng.randint(1, 6), "num_minibatches": rng.randint(1, 8)}
        k, dpo_bs = rng.randint(2, 6), rng.randint(1, 32)
        online, steps = compare.matched_budget(ppo, k, dpo_bs)
        assert online == {"num_iterations": ppo["num_iterations"], "batch_size": ppo["batch_size"],
                          "num_epochs": ppo["ppo_epochs"], "num_minibatches": ppo["num_minibatches"]}
        sequences = ppo["num_iterations"] * ppo["batch_size"] * ppo["ppo_epochs"]
        assert steps == max(1, round(sequences / (dpo_bs * k)))


def test_the_commands_and_the_report_state_the_ppo_run_s_budget(tmp_path, monkeypatch, capsys):
    """
    The online runs get PPO's iterations, batch, epochs and minibatches (3 epochs, 4 minibatches here: not equal)
    and the SFT run's seed (7, where the RM's is 0); the report's budget sentence states the same numbers.
    """
    cmds = fake_pipeline(tmp_path, monkeypatch)
    ppo = {"num_iterations": 5, "batch_size": 12, "ppo_epochs": 3, "num_minibatches": 4, "lr": 2e-4,
           "temperature": 0.6, "anneal_lr": False}
    torch.save({"step": 5, "stage": "ppo", "args": ppo}, tmp_path / "ppo" / "ckpt.pt")
    torch.save({"step": 1, "stage": "sft", "args": {"seed": 7}}, tmp_path / "sft" / "ckpt.pt")
    # K = 3 ranked responses per prompt on average: a record of 4 and a pair
    prefs = [{"prompt": "p", "responses": ["a", "b", "c", "d"], "ranking": [2, 0, 3, 1]},
             {"prompt": "q", "chosen": "a", "rejected": "b"}]
    (tmp_path / "data" / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--methods", "grpo,dpo",
                                      "--dpo_batch_size", "3"])
    compare.run(compare.main)
    args = parse_stage_flags(train_grpo.Args, cmds["grpo"][2:])
    assert (args.num_iterations, args.batch_size, args.num_epochs, args.num_minibatches, args.seed) == (5, 12, 3, 4, 7)
    assert (args.lr, args.temperature, args.anneal_lr) == (2e-4, 0.6, False)
    dpo = parse_stage_flags(train_dpo.Config, cmds["dpo"][2:])
    k = (4 + 2) / 2
    assert (dpo.seed, dpo.batch_size, dpo.max_steps) == (7, 3, max(1, round(5 * 12 * 3 / (3 * k))))
    report = (tmp_path / "compare" / "report.md").read_text()
    assert (f"Budget: {5 * 12} sampled episodes per online method (the PPO run's 5 x 12), 3 epochs x 4 minibatches "
            f"per rollout; DPO {dpo.max_steps} steps x 3 prompts x {k:g} ranked responses, as many sequences through "
            f"the policy's backward pass as PPO's actor ({5 * 12 * 3})") in report, report
    assert "(seed 7)" in report and "trained with other flags" not in report


def test_train_false_names_the_flags_runs_were_trained_with_otherwise(tmp_path, monkeypatch, capsys):
    """A grpo run trained with another --lr than PPO's (no --grpo_flags now), a dpo run with more steps: both said."""
    fake_pipeline(tmp_path, monkeypatch)  # PPO: lr 1e-4, temperature 0.7
    grpo = {"seed": 0, "num_iterations": 2, "batch_size": 8, "num_epochs": 2, "num_minibatches": 2, "lr": 3e-4,
            "temperature": 0.7}
    dpo = {"seed": 0, "batch_size": 16, "max_steps": 5}  # the budget: 2 x 8 x 2 sequences / (16 x 2) = 1 step
    for name, args, step in (("grpo", grpo, 2), ("dpo", dpo, 5)):  # each run finished
        (tmp_path / "compare" / name).mkdir(parents=True)
        torch.save({"models_resident": 3, "args": args, "step": step}, tmp_path / "compare" / name / "ckpt.pt")
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--methods", "grpo,dpo", "--train", "false"])
    compare.run(compare.main)
    report = (tmp_path / "compare" / "report.md").read_text()
    assert "grpo was trained with other flags than those above: --lr 0.0003 (above: 0.0001)" in report, report
    assert "dpo was trained with other flags than those above: --max_steps 5 (above: 1)" in report, report


def test_plot_puts_kl_on_x_and_gold_with_its_error_on_y(tmp_path, monkeypatch):
    """The errorbar calls of the picture (matplotlib stood in for: it may be absent)."""
    import random
    rng = random.Random(3)
    plt = mock.MagicMock()
    ax = mock.MagicMock()
    plt.subplots.return_value = (mock.MagicMock(), ax)
    monkeypatch.setattr(compare, "pyplot", lambda: plt)
    monkeypatch.setattr(compare, "save_figure", lambda fig, path: None)
    rows = {n: random_row(rng) for n in ("sft", "ppo", "dpo")}
    rows["dpo"]["gold_sem"] = None
    assert compare.plot(rows, ["sft", "ppo", "dpo"], str(tmp_path / "p.png")) == str(tmp_path / "p.png")
    calls = [(c.args, c.kwargs) for c in ax.errorbar.call_args_list]
    assert [(a, kw["yerr"], kw["label"]) for a, kw in calls] == [
        (([rows[n]["kl"]], [rows[n]["gold"]]), [rows[n]["gold_sem"] or 0.0], n) for n in ("sft", "ppo", "dpo")]


def test_a_standard_error_of_zero_is_shown_not_dropped():
    """All responses judged alike: a gold_sem of 0.0 is a number (± 0.000), only None (one response) shows none."""
    import random
    rng = random.Random(4)
    rows = {n: random_row(rng) for n in ("sft", "ppo", "dpo")}
    rows["sft"]["gold_sem"], rows["ppo"]["gold_sem"] = 0.0, None
    cells = table_cells(compare.table(rows, ["sft", "ppo", "dpo"]))
    for n, r in rows.items():
        want = plain_cell(r["gold"], 3) + ("" if r["gold_sem"] is None else " ± " + plain_cell(r["gold_sem"], 3))
        assert cells[n][0] == want, n
    assert cells["sft"][0].endswith(" ± 0.000")


def test_the_report_s_table_lists_sft_ppo_then_the_methods_in_their_order(tmp_path, monkeypatch, capsys):
    fake_pipeline(tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--methods", "dpo,rloo,grpo"])
    compare.run(compare.main)
    cells = table_cells((tmp_path / "compare" / "report.md").read_text())
    assert list(cells) == ["sft", "ppo", "dpo", "rloo", "grpo"]
    assert list(table_cells(capsys.readouterr().out)) == ["sft", "ppo", "dpo", "rloo", "grpo"]


# -----------------------------------------------------------------------------
# mutation round 6: the budget as printed, flags merged for the online runs, the refusals of --methods and --summarize


def test_the_budget_lines_and_the_grpo_command_state_ppo_s_run_and_the_overrides(tmp_path, monkeypatch, capsys):
    """
    PPO: 3 iterations x 8 episodes, 2 epochs x 4 minibatches, lr 1e-4, temperature 0.7, anneal_lr off. K is not a whole
    number: ranked records of 4, 2 and 2 responses, K = 8/3. By hand: 24 episodes; PPO's actor 24 x 2 = 48
    sequences; DPO at 2 prompts x 8/3 responses = 16/3 sequences a step: 48 / (16/3) = 9 steps, 9 x 16/3 = 48.
    --grpo_flags --lr=3e-4 comes after PPO's shared flags and wins; the others stay PPO's.
    """
    cmds = fake_pipeline(tmp_path, monkeypatch)
    ppo = {"num_iterations": 3, "batch_size": 8, "ppo_epochs": 2, "num_minibatches": 4, "lr": 1e-4, "temperature": 0.7,
           "anneal_lr": False}
    torch.save({"step": 3, "stage": "ppo", "args": ppo}, tmp_path / "ppo" / "ckpt.pt")
    prefs = [{"prompt": "p", "responses": ["a", "b", "c", "d"], "ranking": [1, 0, 3, 2]},
             {"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "r", "chosen": "c", "rejected": "d"}]
    (tmp_path / "data" / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--methods", "grpo,dpo",
                                      "--dpo_batch_size", "2", "--grpo_flags=--lr=3e-4"])
    compare.run(compare.main)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("budget: 24 episodes per online method (PPO's), 2 epochs x 4 minibatches each; DPO 9 steps x 2 "
                      "prompts x 2.66667 responses = 48 sequences (PPO's actor: 48)"), out[0]
    # SHARED_FLAGS' order: temperature before lr before anneal_lr
    assert out[1] == "online methods with PPO's --temperature 0.7 --lr 0.0001 --anneal_lr false, then --grpo_flags " \
                     "--lr=3e-4", out[1]
    grpo = parse_stage_flags(train_grpo.Args, cmds["grpo"][2:])
    assert (grpo.lr, grpo.temperature, grpo.anneal_lr) == (3e-4, 0.7, False)
    assert (grpo.num_iterations, grpo.batch_size, grpo.num_epochs, grpo.num_minibatches) == (3, 8, 2, 4)
    assert parse_stage_flags(train_dpo.Config, cmds["dpo"][2:]).max_steps == 9
    assert "DPO 9 steps x 2 prompts x 2.66667 ranked responses" in (tmp_path / "compare" / "report.md").read_text()


def test_a_failed_step_is_one_line_with_its_exit_status_and_its_log_s_last_line(tmp_path):
    log = tmp_path / "grpo.log"
    cmd = [sys.executable, "-c", "print('loading'); print('error: out of memory'); raise SystemExit(1)"]
    with pytest.raises(UserError) as info:
        compare.train("grpo", cmd, str(log))
    assert str(info.value) == f"grpo failed (exit 1), see {log}: error: out of memory"


def test_check_flags_says_the_last_line_a_script_s_parser_wrote(monkeypatch):
    """
    A stand-in for the scripts (their parsers import torch: seconds each) that writes two lines to stderr and exits 2,
    as a parser does after its usage line; a flags string of one word is checked too, an empty one is not run.
    """
    started = []

    def fake_command(script, *args):
        started.append(script)
        return [sys.executable, "-c", "import sys; print('usage: x', file=sys.stderr); "
                "print('x: error: ' + ' '.join(sys.argv[1:]), file=sys.stderr); sys.exit(2)", *args]

    monkeypatch.setattr(compare, "command", fake_command)
    with pytest.raises(UserError) as info:
        compare.check_flags({"grpo_flags": ["--anneal_lr"], "dpo_flags": [], "eval_flags": []})
    assert str(info.value) == "--grpo_flags: x: error: --anneal_lr --help"
    assert started == ["train_grpo.py"]


def test_summarize_skips_empty_names_and_says_how_many_pipelines(tmp_path, monkeypatch, capsys):
    """The rows hold gold alone (no other column, as a hand-made or older rows.json): that was KeyError in load_rows."""
    for name, gold in (("a", 0.25), ("b", 0.75)):
        (tmp_path / name / "compare").mkdir(parents=True)
        (tmp_path / name / "compare" / "rows.json").write_text(json.dumps({"dpo": {"gold": gold, "models": 1}}))
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setattr(sys, "argv", ["compare.py", "--summarize", f"{a}, ,{b},"])
    compare.run(compare.main)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"2 pipelines ({a}, {b}): mean ± sd over them"
    # mean 0.5, sd = sqrt(2 x 0.25^2 / 1) = 0.354
    assert table_cells("\n".join(out))["dpo"] == ["0.500 ± 0.354", "-", "-", "-", "-", "-", "1"]
    code, err = exit_status_and_error(monkeypatch, capsys, ["--summarize", " , "])
    assert (code, err) == (2, "error: --summarize ' , ': expected pipeline directories, e.g. out,out_s1\n")


@pytest.mark.parametrize("methods, message", [
    ("grpo,rloo,grpo", "--methods: give each method once"),
    (" , ", "--methods: give each method once"),
    ("grpo,ppo", "--methods: unknown method 'ppo' (expected grpo, dr_grpo, rloo, dpo)"),
])
def test_methods_unknown_repeated_or_none_are_refused(tmp_path, monkeypatch, capsys, methods, message):
    code, err = exit_status_and_error(monkeypatch, capsys, ["--out", str(tmp_path), "--methods", methods])
    assert (code, err) == (2, f"error: {message}\n")
    assert list(tmp_path.iterdir()) == []


def test_a_dpo_batch_size_of_1_is_taken(tmp_path, monkeypatch, capsys):
    # the least there is: K = 2 responses a step; 2 x 8 x 2 = 32 sequences -> 16 steps
    cmds = fake_pipeline(tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--methods", "dpo", "--dpo_batch_size", "1"])
    compare.run(compare.main)
    dpo = parse_stage_flags(train_dpo.Config, cmds["dpo"][2:])
    assert (dpo.batch_size, dpo.max_steps) == (1, 16)


def test_only_flag_names_are_matched_against_compare_s_own():
    # a value that reads like one of them once its first two characters are cut ("./sft", "--sft") is a value
    assert compare.split_flags("eval_flags", "--n_prompts 3 --tag ./sft") == ["--n_prompts", "3", "--tag", "./sft"]
    assert compare.split_flags("dpo_flags", "--note xxdata") == ["--note", "xxdata"]


def test_train_false_does_not_read_the_online_methods_prompts(tmp_path, monkeypatch, capsys):
    # the grpo run is already made: a prompts.jsonl changed since is not compare.py's to refuse
    cmds = fake_pipeline(tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--methods", "grpo"])
    compare.run(compare.main)
    (tmp_path / "data" / "prompts.jsonl").write_text("not json\n")
    cmds.clear()
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--methods", "grpo", "--train", "false"])
    compare.run(compare.main)
    assert list(cmds) == ["evaluate"]


def test_the_dpo_batch_size_hint_names_compare_s_own_flag(tmp_path, monkeypatch, capsys):
    code, err = exit_status_and_error(monkeypatch, capsys, ["--out", str(tmp_path), "--dpo_flags", "--batch_size 4"])
    assert (code, err) == (2, "error: --dpo_flags: compare.py passes --batch_size to train_dpo.py itself, and evaluates "
                              "and reports what it passed: drop it; for --batch_size: compare.py's own "
                              "--dpo_batch_size\n")


def test_each_command_reads_the_pipeline_s_files_its_flag_names(tmp_path, monkeypatch, capsys):
    """
    Each command parsed by its own script's parser: train_grpo.py the PPO prompts, train_dpo.py the comparisons and the
    held-out ones, evaluate.py the held-out prompts, SFT, RM and PPO, and no random-init row (its name has no run dir).
    A ppo/ckpt.pt from before the stage was recorded (no "stage") is a PPO run's.
    """
    cmds = fake_pipeline(tmp_path, monkeypatch)
    ppo = torch.load(tmp_path / "ppo" / "ckpt.pt", weights_only=True)
    del ppo["stage"]
    torch.save(ppo, tmp_path / "ppo" / "ckpt.pt")
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path), "--methods", "rloo,dpo"])
    compare.run(compare.main)
    d = str(tmp_path)
    rloo = parse_stage_flags(train_grpo.Args, cmds["rloo"][2:])
    assert (rloo.data, rloo.sft, rloo.rm, rloo.advantage) == (f"{d}/data/prompts.jsonl", f"{d}/sft", f"{d}/rm", "rloo")
    dpo = parse_stage_flags(train_dpo.Config, cmds["dpo"][2:])
    assert (dpo.data, dpo.val_data, dpo.sft) == (f"{d}/data/prefs.jsonl", f"{d}/data/prefs_eval.jsonl", f"{d}/sft")
    ev = parse_flags(evaluate.Config, cmds["evaluate"][2:])
    assert (ev.data, ev.sft, ev.rm, ev.ppo, ev.init_row) == (f"{d}/data/eval.jsonl", f"{d}/sft", f"{d}/rm", f"{d}/ppo",
                                                             False)
    assert ev.extra == f"rloo={d}/compare/rloo,dpo={d}/compare/dpo"
