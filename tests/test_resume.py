"""
The checkpoint files that every stage shares (train_common.save_files, complete_files, load_run) and what a fresh run
does to an earlier run's files in its --out_dir: each stage run in this process, killed where a SIGKILL could land.
"""

import dataclasses
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from scripts import ROOT, kill_at_rename, read_metrics, without_timings

sys.path.insert(0, ROOT)  # the stages are top-level scripts

from nanorlhf import tasks, train_common, utils
from nanorlhf.model import GPT, GPTConfig, ScalarGPT
from nanorlhf.tokenizer import Tokenizer

import train_dpo
import train_grpo
import train_ppo
import train_rm
import train_sft


def dead_pid():
    """The id of a process that has exited (and been reaped)."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def save(out, step, **extra):
    """A pair as save_run writes it, with tiny payloads: {"step": step, **extra} in both files."""
    train_common.save_files(str(out), {"train_state.pt": {"step": step, **extra}, "ckpt.pt": {"step": step, **extra}})


def load(path):
    return torch.load(path, weights_only=True)


# -----------------------------------------------------------------------------
# the files of one save


def test_the_files_of_two_saves_at_the_same_step_are_not_taken_for_a_pair(tmp_path, capsys):
    """
    Run A saved at step 10; run B, started afresh in the same directory, saved at step 10 too and was killed between
    its renames of train_state.pt and ckpt.pt: A's ckpt.pt, B's train_state.pt, and A's train_state.prev.pt that B's
    save kept (as a fresh run left them before it removed A's train_state.pt first). The step alone paired A's
    weights and flags with B's optimizer and random state, with no note; the save_id that every file of one save
    carries pairs A's ckpt.pt with A's kept train_state.
    """
    out = tmp_path / "out"
    save(out, 10, run="A")
    a = {n: (out / n).read_bytes() for n in ("ckpt.pt", "train_state.pt")}
    save(out, 10, run="B")
    (out / "ckpt.pt").write_bytes(a["ckpt.pt"])  # B's last rename never happened...
    (out / "train_state.prev.pt").write_bytes(a["train_state.pt"])  # ... and A's kept version is still there
    ckpt, state = train_common.load_run(str(out))
    assert (ckpt["run"], state["run"]) == ("A", "A")
    assert "resuming from step 10 with train_state.prev.pt" in capsys.readouterr().out
    # without the kept version: refused, naming the two saves of one step
    save(out, 10, run="B")
    (out / "ckpt.pt").write_bytes(a["ckpt.pt"])
    with pytest.raises(utils.UserError, match="ckpt.pt is at step 10 but train_state.pt at step 10 of another save"):
        train_common.load_run(str(out))


def test_files_of_an_older_version_without_a_save_id_pair_by_their_step(tmp_path):
    out = tmp_path / "out"
    for name in ("ckpt.pt", "train_state.pt"):
        utils.save_checkpoint(str(out), {"step": 3}, name)
    ckpt, state = train_common.load_run(str(out))
    assert ckpt["step"] == state["step"] == 3
    save(out, 4)  # the run resumed by this version: its files carry one save_id
    ckpt, state = train_common.load_run(str(out))
    assert ckpt["save_id"] == state["save_id"] and len(ckpt["save_id"]) == 16


def test_a_saves_id_leaves_the_random_state_of_the_run_alone(tmp_path):
    """The save_id is drawn from the OS, not from a generator whose state train_state.pt saves for the resumed run."""
    torch.manual_seed(0)
    before = utils.rng_state()
    save(tmp_path, 1)
    after = utils.rng_state()
    assert torch.equal(before.pop("torch"), after.pop("torch")) and before == after


def test_a_fresh_run_makes_the_earlier_run_impossible_to_resume_before_it_writes(tmp_path):
    """
    A fresh run's logger is the first thing it writes: before that, the earlier run's train_state.pt and the .prev.pt
    files of an interrupted save go, so that no --resume continues the earlier run under the new run's metrics. The
    earlier model and the metrics.jsonl that describes it stay until the new run's first save replaces them both:
    the new rows go to metrics.jsonl.tmp<pid> until then.
    """
    out = tmp_path / "out"
    save(out, 10)
    for name in ("train_state.prev.pt", "critic.prev.pt"):
        (out / name).write_bytes((out / "train_state.pt").read_bytes())
    (out / "metrics.jsonl").write_text('{"step": 10}\n')
    logger = utils.MetricsLogger(str(out), resume=False)
    logger.log({"step": 0})
    assert sorted(os.listdir(out)) == ["ckpt.pt", "metrics.jsonl", f"metrics.jsonl.tmp{os.getpid()}"]
    assert (out / "metrics.jsonl").read_text() == '{"step": 10}\n'
    assert not train_common.wants_resume("auto", str(out))  # --resume auto starts afresh
    with pytest.raises(utils.UserError, match="train_state.pt not found \\(nothing to resume\\)"):
        train_common.load_run(str(out))
    save(out, 2)  # the first save: the new model and its rows, together
    logger.log({"step": 3})  # the open file goes on under its new name
    logger.f.close()
    assert sorted(os.listdir(out)) == ["ckpt.pt", "metrics.jsonl", "train_state.pt"]
    assert (out / "metrics.jsonl").read_text() == '{"step": 0}\n{"step": 3}\n'


def test_a_fresh_runs_samples_and_memory_report_wait_for_its_first_save(tmp_path):
    """
    A fresh PPO or GRPO rerun removed the earlier run's samples at its start and wrote its own in place: stopped before
    its first save, it left them beside the earlier run's model. They wait under pending names now, as its metrics do,
    and the first save puts them in place; an earlier run's file that the new run has not written by then goes.
    """
    from nanorlhf.rollout import write_samples

    out = tmp_path / "out"
    save(out, 10)
    row = {"prompt": "sort 2 1", "response": "1 2", "score": 0.5, "gold": 1.0}
    write_samples(str(out), 10, [row])
    utils.write_text(str(out / "memory.json"), '{"run": "A"}')
    a = {n: (out / n).read_bytes() for n in ("samples.jsonl", "samples.txt", "memory.json")}
    logger = utils.MetricsLogger(str(out), resume=False)
    train_common.keep_samples_until(str(out), 0)
    write_samples(str(out), 1, [{**row, "score": 0.25}])
    assert {n: (out / n).read_bytes() for n in a} == a
    assert (out / f"samples.txt.tmp{os.getpid()}").exists()
    save(out, 2)  # the new run's first save: its samples replace A's; A's memory.json, which it has no own of, goes
    logger.f.close()
    assert sorted(os.listdir(out)) == ["ckpt.pt", "metrics.jsonl", "samples.jsonl", "samples.txt", "train_state.pt"]
    assert [json.loads(line)["iter"] for line in open(out / "samples.jsonl")] == [1]
    write_samples(str(out), 2, [row])  # after the first save: in place
    assert [json.loads(line)["iter"] for line in open(out / "samples.jsonl")] == [1, 2]


def test_a_fresh_runs_first_save_removes_the_earlier_model_before_its_renames(tmp_path, monkeypatch):
    """
    Killed between its renames, a fresh run's first save leaves its train_state.pt and no ckpt.pt, which --resume
    auto starts afresh from, rather than the earlier run's ckpt.pt beside it.
    """
    out = tmp_path / "out"
    save(out, 10, run="A")
    (out / "train_state.pt").unlink()  # what the fresh run's logger did
    kill_at_rename(monkeypatch, "ckpt.pt")
    with pytest.raises(KeyboardInterrupt):
        save(out, 10, run="B")
    assert sorted(os.listdir(out)) == ["train_state.pt"] and load(out / "train_state.pt")["run"] == "B"
    assert not train_common.wants_resume("auto", str(out))
    with pytest.raises(utils.UserError, match="ckpt.pt not found \\(nothing to resume\\)"):
        train_common.load_run(str(out))


def test_resume_removes_the_kept_versions_that_its_set_does_not_use(tmp_path):
    """
    A save killed after its renames and before it removed its .prev.pt files left them in the directory for good;
    loading the run removes them once the set is complete without them, and keeps one that completes it.
    """
    out = tmp_path / "out"
    save(out, 1)
    old = (out / "train_state.pt").read_bytes()
    save(out, 2)
    (out / "train_state.prev.pt").write_bytes(old)
    (out / "critic.prev.pt").write_bytes(old)  # of a file that is not in this set: not this function's
    ckpt, state = train_common.load_run(str(out))
    assert ckpt["step"] == state["step"] == 2
    assert sorted(os.listdir(out)) == ["ckpt.pt", "critic.prev.pt", "train_state.pt"]
    # a save of step 3 killed before its last rename: the kept version completes ckpt.pt's set, and stays
    at_2 = {n: (out / n).read_bytes() for n in ("ckpt.pt", "train_state.pt")}
    save(out, 3)
    (out / "ckpt.pt").write_bytes(at_2["ckpt.pt"])
    (out / "train_state.prev.pt").write_bytes(at_2["train_state.pt"])
    ckpt, state = train_common.load_run(str(out))
    assert ckpt["step"] == state["step"] == 2 and (out / "train_state.prev.pt").exists()


def test_a_torch_file_that_holds_no_dict_is_one_line_naming_it(tmp_path):
    """It was a traceback: AttributeError: 'Tensor' object has no attribute 'get'."""
    out = tmp_path / "out"
    out.mkdir()
    torch.save(torch.zeros(3), out / "ckpt.pt")
    with pytest.raises(utils.UserError, match=f"^{out}/ckpt.pt: not a nanorlhf checkpoint \\(it holds a Tensor"):
        train_common.check_out_dir(str(out), "sft", {})
    save(out, 2)
    torch.save([1, 2], out / "train_state.pt")
    with pytest.raises(utils.UserError, match=f"^{out}/train_state.pt: not a nanorlhf checkpoint \\(it holds a list"):
        train_common.load_run(str(out))


def test_resume_removes_the_samples_directory_of_a_killed_resume(tmp_path):
    """
    keep_samples_until rebuilds the samples in samples.tmp<pid>/: a kill inside it left that directory for good. Those
    of processes that are gone are removed; a running process's (another run's) is left alone.
    """
    dead, alive = dead_pid(), os.getppid()
    for pid in (dead, alive):
        (tmp_path / f"samples.tmp{pid}").mkdir()
        (tmp_path / f"samples.tmp{pid}" / "samples.jsonl").write_text("{}\n")
    rows = [{"iter": i, "prompt": "p", "response": "r", "score": 0.0, "gold": None} for i in (1, 2)]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_common.keep_samples_until(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == sorted([f"samples.tmp{alive}", "samples.jsonl", "samples.txt"])
    assert [json.loads(line)["iter"] for line in open(tmp_path / "samples.jsonl")] == [1]


# -----------------------------------------------------------------------------
# a fresh run into a directory that holds an earlier run, killed before its first save is complete (every stage)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The built-in task's files, small, and random tiny SFT and reward models (byte tokenizer)."""
    d = tmp_path_factory.mktemp("inputs")
    tasks.generate_task(str(d / "data"), n_sft=200, n_prefs=48, n_prefs_eval=16, n_prompts=40, n_eval=10)
    tok = Tokenizer.byte_level()
    config = GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    utils.save_checkpoint(str(d / "sft"), utils.model_payload(GPT(config), tok, "sft", {"seed": 0}, 1))
    utils.save_checkpoint(str(d / "rm"), utils.model_payload(ScalarGPT(config), tok, "rm", {"seed": 0}, 1))
    return d


LOOP = ["--max_steps", "4", "--warmup", "1", "--eval_interval", "2", "--eval_batches", "1", "--log_interval", "1",
        "--ckpt_interval", "2", "--device", "cpu", "--dtype", "float32"]
ROLLOUT = ["--num_iterations", "4", "--batch_size", "4", "--num_minibatches", "1", "--response_length", "4",
           "--save_interval", "2", "--sample_interval", "1", "--device", "cpu", "--dtype", "float32"]
STAGES = {  # (module, its flags but --out_dir); each stage's checkpoints at steps 2 and 4
    "sft": (train_sft, lambda d: ["--data", str(d / "data/sft.jsonl"), "--n_layer", "2", "--n_head", "2",
                                  "--n_embd", "32", "--block_size", "64", "--batch_size", "8", *LOOP]),
    "rm": (train_rm, lambda d: ["--data", str(d / "data/prefs.jsonl"), "--sft_data", str(d / "data/sft.jsonl"),
                                "--init_from", str(d / "sft"), "--batch_size", "4", "--norm_samples", "16", *LOOP]),
    "dpo": (train_dpo, lambda d: ["--data", str(d / "data/prefs.jsonl"), "--val_data",
                                  str(d / "data/prefs_eval.jsonl"), "--sft", str(d / "sft"), "--batch_size", "4",
                                  "--gold_prompts", "4", "--response_length", "4", *LOOP]),
    "ppo": (train_ppo, lambda d: ["--data", str(d / "data/prompts.jsonl"), "--sft", str(d / "sft"), "--rm",
                                  str(d / "rm"), "--ppo_epochs", "1", *ROLLOUT]),
    "grpo": (train_grpo, lambda d: ["--data", str(d / "data/prompts.jsonl"), "--sft", str(d / "sft"), "--rm",
                                    str(d / "rm"), "--group_size", "2", "--num_epochs", "1", *ROLLOUT]),
}


def numbers(rows):
    """The metrics rows without the times, which differ between two runs of the same computation."""
    return [{k: v for k, v in r.items() if not k.startswith("t_")} for r in without_timings(rows)]


def run_stage(monkeypatch, stage, argv):
    """The stage's main() on argv, in this process (SFT's, RM's and DPO's main() read sys.argv)."""
    module = STAGES[stage][0]
    with monkeypatch.context() as m:
        m.setattr(sys, "argv", [module.__name__ + ".py", *argv])
        module.main()


def kill_in_first_save(monkeypatch, where):
    """
    Make the next save stop as a SIGKILL would: "write", while it writes its first temporary (nothing of the save is
    in place); "rename", after train_state.pt (and PPO's critic.pt) was renamed into place, before ckpt.pt was.
    """
    real_save, real_replace = torch.save, os.replace

    def save(obj, f, *a, **kw):
        if where == "write" and os.path.basename(str(f)).startswith("train_state.pt.tmp"):
            raise KeyboardInterrupt("killed in the first save")
        return real_save(obj, f, *a, **kw)

    def replace(src, dst):
        if where == "rename" and os.path.basename(dst) == "ckpt.pt":
            raise KeyboardInterrupt("killed in the first save")
        return real_replace(src, dst)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("where", ["write", "rename"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_a_fresh_run_killed_in_its_first_save_never_resumes_the_earlier_run(inputs, tmp_path, monkeypatch, stage,
                                                                             where, one_thread):
    """
    Run A stopped at step 2 in out; run B, another learning rate, started afresh in out (a rerun overwrites), and
    was killed in its first save, at step 2 too. --resume used to continue A under B's metrics rows (killed while
    writing), or A's weights and flags with B's optimizer and random state (killed between the renames), without a
    word. Now --resume finds nothing to resume, and --resume auto with B's command starts B afresh: its metrics are
    those of B run whole.
    """
    flags = STAGES[stage][1](inputs)
    out = tmp_path / "out"
    run_stage(monkeypatch, stage, flags + ["--out_dir", str(out), "--stop_at", "2"])
    b = flags + ["--lr", "0.01"]
    with monkeypatch.context() as m:
        kill_in_first_save(m, where)
        with pytest.raises(KeyboardInterrupt):
            run_stage(monkeypatch, stage, b + ["--out_dir", str(out)])
    with pytest.raises(utils.UserError, match="not found \\(nothing to resume\\)"):
        run_stage(monkeypatch, stage, ["--out_dir", str(out), "--resume"])
    run_stage(monkeypatch, stage, b + ["--out_dir", str(out), "--resume", "auto"])
    run_stage(monkeypatch, stage, b + ["--out_dir", str(tmp_path / "whole")])
    assert numbers(read_metrics(str(out))) == numbers(read_metrics(str(tmp_path / "whole")))
    assert load(out / "ckpt.pt")["args"]["lr"] == 0.01
    assert not [f for f in os.listdir(out) if ".prev." in f or ".tmp" in f]


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_fresh_rerun_that_fails_before_its_first_save_leaves_the_earlier_run_whole(inputs, tmp_path, monkeypatch,
                                                                                    stage, one_thread):
    """
    Run A saved at step 2 in out; run B, started afresh in out, hit a NaN at step 2, before its first save. out held
    A's ckpt.pt beside a metrics.jsonl of B's rows only (evaluate.py read the wrong curve for A's model), and the
    message sent the user to resume a checkpoint that --resume did not find. Now A's model and its metrics.jsonl stay
    as they were, B's rows wait in metrics.jsonl.tmp<pid>, and the message says what out_dir holds.
    """
    module, flags = STAGES[stage][0], STAGES[stage][1](inputs)
    out = tmp_path / "out"
    run_stage(monkeypatch, stage, flags + ["--out_dir", str(out), "--stop_at", "2"])
    a = {n: (out / n).read_bytes() for n in os.listdir(out) if n != "train_state.pt"}
    assert stage not in ("ppo", "grpo") or {"samples.jsonl", "samples.txt"} <= set(a)
    real = train_common.check_finite

    def nan_at_2(where, **values):  # the step (PPO, GRPO: the iteration) before the first save, at 2
        if where.startswith(("step 2", "iteration 2")):
            values = {**values, "loss": float("nan")}
        return real(where, **values)

    monkeypatch.setattr(train_common, "check_finite", nan_at_2)
    if hasattr(module, "C"):
        monkeypatch.setattr(module.C, "check_finite", nan_at_2)
    with pytest.raises(train_common.NonFiniteError) as e:
        run_stage(monkeypatch, stage, flags + ["--lr", "0.01", "--out_dir", str(out)])
    assert "out_dir holds this run's last good checkpoint if it saved one" in str(e.value)
    assert "else what was there before the run started" in str(e.value)
    # A's files as they were (PPO's and GRPO's samples, PPO's critic.pt and memory.json too), B's waiting beside them
    assert {n: (out / n).read_bytes() for n in os.listdir(out) if ".tmp" not in n} == a
    assert (out / f"metrics.jsonl.tmp{os.getpid()}").exists()  # B's rows, until the next run in out removes them
    if stage in ("ppo", "grpo"):  # B's samples of iteration 1
        assert (out / f"samples.jsonl.tmp{os.getpid()}").exists()
    with pytest.raises(utils.UserError, match="not found \\(nothing to resume\\)"):
        run_stage(monkeypatch, stage, ["--out_dir", str(out), "--resume"])


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("case", ["a file", "under a file", "empty"])
def test_an_out_dir_that_cannot_be_one_is_refused_before_anything_is_read(tmp_path, monkeypatch, stage, case):
    # it failed after the data and models were loaded (DPO: after its reference pass), "error: D/afile: File exists";
    # the inputs here do not exist, so a stage that reads anything before the check fails on them instead
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    out = {"a file": str(afile), "under a file": str(afile / "sub"), "empty": ""}[case]
    flags = STAGES[stage][1](tmp_path / "missing")
    with pytest.raises(utils.UserError, match="^--out_dir.*(not a directory|empty)"):
        run_stage(monkeypatch, stage, flags + ["--out_dir", out])
    assert sorted(os.listdir(tmp_path)) == ["afile"] and afile.read_text() == "mine\n"


@pytest.mark.parametrize("stage", list(STAGES))
def test_resume_from_a_checkpoint_without_saved_flags_is_one_line_naming_it(tmp_path, monkeypatch, stage):
    """A ckpt.pt and train_state.pt of one save, but no flags in ckpt.pt: it was KeyError: 'args'."""
    out = tmp_path / "out"
    save(out, 2)
    with pytest.raises(utils.UserError, match=f"^{out}/ckpt.pt: holds no saved flags \\(no 'args' dict\\)"):
        run_stage(monkeypatch, stage, ["--out_dir", str(out), "--resume"])


# -----------------------------------------------------------------------------
# the inputs of a resumed run: the files it started from (train_common.input_digests)


def test_input_digests_are_the_sha256_of_what_the_loaders_read(tmp_path):
    """A file: its bytes; a run directory: its ckpt.pt; a directory without one (an HF export): its files, by name."""
    (tmp_path / "data.jsonl").write_bytes(b'{"prompt": "sort 2 1"}\n')
    run_dir, export = tmp_path / "sft", tmp_path / "hf"
    run_dir.mkdir()
    export.mkdir()
    (run_dir / "ckpt.pt").write_bytes(b"weights")
    (run_dir / "metrics.jsonl").write_bytes(b"not read by the loaders")
    (export / "model.safetensors").write_bytes(b"tensors")
    (export / "config.json").write_bytes(b"{}")
    import hashlib
    plain = lambda *parts: hashlib.sha256(b"".join(parts)).hexdigest()  # noqa: E731
    got = train_common.input_digests({"--data": str(tmp_path / "data.jsonl"), "--sft": str(run_dir),
                                       "--init_from": str(export), "--val_data": None, "--ptx_data": ""})
    assert got == {"--data": plain(b'{"prompt": "sort 2 1"}\n'), "--sft": plain(b"weights"),
                   "--init_from": plain(b"{}", b"tensors")}  # config.json before model.safetensors
    # resuming: the same files pass, a changed one is refused by its flag, a state of an older version is not checked
    inputs = {"--data": str(tmp_path / "data.jsonl"), "--sft": str(run_dir)}
    state = {"inputs": train_common.input_digests(inputs)}
    assert train_common.input_digests(inputs, state) == state["inputs"]
    (run_dir / "ckpt.pt").write_bytes(b"retrained")
    with pytest.raises(utils.UserError, match=f"^--resume: --sft {run_dir} is not what the run started from"):
        train_common.input_digests(inputs, state)
    train_common.input_digests(inputs, {"step": 2})


def test_an_input_that_cannot_be_read_names_its_flag_and_where_its_path_came_from(tmp_path, monkeypatch):
    """
    A missing input the user never typed was reported by its path alone: train_rm.py's --sft_data default from a
    directory without out/, or a resumed run's saved relative --data from another working directory.
    """
    monkeypatch.chdir(tmp_path)
    with pytest.raises(utils.UserError) as e:  # a fresh run: given, the flags on its command line
        train_common.input_digests({"--data": None, "--sft_data": "out/data/sft.jsonl"}, None, {"data", "init_from"})
    assert str(e.value) == "--sft_data out/data/sft.jsonl (its default): No such file or directory"
    with pytest.raises(utils.UserError) as e:  # typed, or who typed it not known
        train_common.input_digests({"--data": "my.jsonl"}, None, {"data"})
    assert str(e.value) == "--data my.jsonl: No such file or directory"
    with pytest.raises(utils.UserError) as e:
        train_common.input_digests({"--data": "my.jsonl"})
    assert str(e.value) == "--data my.jsonl: No such file or directory"
    with pytest.raises(utils.UserError) as e:  # resumed: the run's saved flag
        train_common.input_digests({"--data": "d/sft.jsonl"}, {"step": 2, "inputs": {"--data": "3f2a"}})
    assert str(e.value) == ("--data d/sft.jsonl (the resumed run's saved flag, read from the current directory): "
                            "No such file or directory")
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "ckpt.pt").write_bytes(b"weights")

    def deny(path, *args, **kwargs):  # as a mode-000 file is to a user other than root
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(train_common, "open", deny, raising=False)
    with pytest.raises(utils.UserError) as e:  # a file read inside the directory the flag names: named too
        train_common.input_digests({"--sft": "sft"}, None, set())
    assert str(e.value) == "--sft sft (its default): sft/ckpt.pt: Permission denied"


DEFAULT_DATA = {"sft": "sft.jsonl", "rm": "prefs.jsonl", "dpo": "prefs.jsonl", "ppo": "prompts.jsonl",
                "grpo": "prompts.jsonl"}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_missing_default_data_file_names_its_flag(tmp_path, monkeypatch, capsys, stage):
    """
    From a directory without out/, a stage run without --data: PPO read its prompts before the digests and said
    "error: out/data/prompts.jsonl: no such file"; every stage now names the flag and that the path is its default.
    """
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        utils.run(lambda: run_stage(monkeypatch, stage, ["--out_dir", "o", "--device", "cpu"]))
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: --data out/data/{DEFAULT_DATA[stage]} (its default): No such file or "
                                       f"directory\n")
    assert os.listdir(tmp_path) == []


CHANGED = {  # per stage: the input changed between a run's stop and its resume, and how
    "sft": ("--data", lambda d: (d / "data/sft.jsonl").write_text(
        "".join(reversed(open(d / "data/sft.jsonl").readlines())))),  # the same records in another order
    "rm": ("--sft_data", lambda d: (d / "data/sft.jsonl").write_text(
        "".join(reversed(open(d / "data/sft.jsonl").readlines())))),
    "dpo": ("--sft", lambda d: utils.save_checkpoint(str(d / "sft"), utils.model_payload(
        GPT(GPTConfig(block_size=64, vocab_size=258, n_layer=2, n_head=2, n_embd=32)), Tokenizer.byte_level(),
        "sft", {"seed": 1}, 1))),  # a retrained SFT model
    "ppo": ("--rm", lambda d: utils.save_checkpoint(str(d / "rm"), utils.model_payload(
        ScalarGPT(GPTConfig(block_size=64, vocab_size=258, n_layer=2, n_head=2, n_embd=32)), Tokenizer.byte_level(),
        "rm", {"seed": 1}, 1))),
    "grpo": ("--data", lambda d: (d / "data/prompts.jsonl").write_text(
        "".join(reversed(open(d / "data/prompts.jsonl").readlines())))),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_resume_refuses_inputs_that_changed_since_the_run_started(inputs, tmp_path, monkeypatch, stage, one_thread):
    """
    A run stopped at step 2; one of its inputs changed (the same number of records in another order, or a retrained
    model), then --resume. It went on silently from the new input, which the uninterrupted run never saw; now it is
    one line naming the flag, and the run's files stay as they were. With the input put back it resumes.
    """
    import shutil
    d = tmp_path / "in"
    shutil.copytree(inputs, d)
    out = tmp_path / "out"
    run_stage(monkeypatch, stage, STAGES[stage][1](d) + ["--out_dir", str(out), "--stop_at", "2"])
    before = {n: (out / n).read_bytes() for n in os.listdir(out) if os.path.isfile(out / n)}
    flag_name, change = CHANGED[stage]
    kept = tmp_path / "kept"
    shutil.copytree(d, kept)
    torch.manual_seed(1)
    change(d)
    with pytest.raises(utils.UserError, match=f"^--resume: {flag_name} .* is not what the run started from"):
        run_stage(monkeypatch, stage, ["--out_dir", str(out), "--resume"])
    assert {n: (out / n).read_bytes() for n in os.listdir(out) if os.path.isfile(out / n)} == before
    shutil.rmtree(d)
    shutil.copytree(kept, d)
    run_stage(monkeypatch, stage, ["--out_dir", str(out), "--resume"])
    assert load(out / "ckpt.pt")["step"] == 4


@dataclasses.dataclass
class RunFlags:
    """A stage's flags, as start_run and resumed_flags see them."""
    out_dir: str = "out"
    resume: str = "off"
    stop_at: int | None = None
    sft: str = "out/sft"
    lr: float = 0.1
    eval_interval: int = 10


def test_a_resumed_run_checks_its_saved_inputs_not_the_command_lines_defaults(tmp_path):
    """
    start_run: a fresh run whose --sft is its --out_dir is refused; a resumed run is not checked against the inputs of
    its command line, whose defaults (--sft out/sft) may name its out_dir: its saved flags are the ones it runs with.
    """
    out = tmp_path / "sft"
    saved = dataclasses.asdict(RunFlags(out_dir=str(out), sft=str(tmp_path / "base"), lr=0.5))
    train_common.save_files(str(out), {"train_state.pt": {"step": 2}, "ckpt.pt": {"step": 2, "stage": "dpo",
                                                                                  "args": saved}})
    fresh = RunFlags(out_dir=str(out), sft=str(out))
    with pytest.raises(utils.UserError, match=f"^--out_dir {out} is also --sft"):
        train_common.start_run(fresh, "dpo", {"--sft": fresh.sft})
    resumed = dataclasses.replace(fresh, resume="on", stop_at=3)
    resumed._given = {"out_dir", "resume", "stop_at"}
    args, state, lora = train_common.start_run(resumed, "dpo", {"--sft": resumed.sft})
    assert (args.sft, args.lr, args.stop_at, state["step"], lora) == (str(tmp_path / "base"), 0.5, 3, 2, None)


def test_restoring_a_run_keeps_no_second_copy_of_its_optimizer_state():
    """
    restore_run (SFT, RM, DPO) and train_ppo.restore put the optimizers' states back and take them out of the
    train_state.pt dict that the run keeps: on a GPU that dict's tensors are a CPU copy, twice the weights' size.
    """
    def trained_optimizer(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.randn(4, 3)).square().sum().backward()
        opt.step()
        return opt

    def same_state(a, b):
        sa, sb = a.state_dict()["state"], b.state_dict()["state"]
        return sa.keys() == sb.keys() and all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])

    class Sampler:
        def load_state_dict(self, d):
            self.d = d

    saved = trained_optimizer(0)
    opt, sampler = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1), Sampler()
    state = {"optimizer": saved.state_dict(), "data": {"epoch": 1, "pos": 2}, "rng": utils.rng_state(), "step": 4}
    assert train_common.restore_run(state, opt, sampler) == 4 and sampler.d == {"epoch": 1, "pos": 2}
    assert same_state(opt, saved) and "optimizer" not in state

    actor, critic = trained_optimizer(1), trained_optimizer(2)
    kl_ctl = train_ppo.FixedKLController(0.1)
    for critic_saved in (critic, None):  # --critic shared: no critic optimizer
        state = {"actor_optimizer": actor.state_dict(), "kl_coef": 0.3, "rng": utils.rng_state(), "step": 7,
                 "data": {"epoch": 0, "pos": 5}}
        if critic_saved is not None:
            state["critic_optimizer"] = critic_saved.state_dict()
        new_actor = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
        new_critic = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1) if critic_saved else None
        assert train_ppo.restore(state, new_actor, new_critic, kl_ctl) == (7, {"epoch": 0, "pos": 5})
        assert same_state(new_actor, actor) and kl_ctl.value == 0.3
        assert critic_saved is None or same_state(new_critic, critic)
        assert not {"actor_optimizer", "critic_optimizer"} & set(state)


def test_restore_run_puts_back_the_saved_random_states():
    """The draws after restore_run are those that followed the save: torch's, python's and numpy's generators."""
    class Sampler:
        def load_state_dict(self, d):
            self.d = d

    utils.setup_runtime("cpu", "float32", seed=11)
    torch.rand(2), random.random(), np.random.randn(3)
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    state = {"optimizer": opt.state_dict(), "data": {"epoch": 0, "pos": 1}, "rng": utils.rng_state(), "step": 3}
    want = (torch.rand(4), random.random(), np.random.randn(3).tolist())
    torch.rand(5), random.random(), np.random.rand(7)
    assert train_common.restore_run(state, opt, Sampler()) == 3
    got = (torch.rand(4), random.random(), np.random.randn(3).tolist())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


def test_start_run_gives_a_resumed_lora_run_its_trained_tensors(tmp_path):
    """A LoRA run's ckpt.pt holds its adapters under "lora": start_run hands them to the resumed run as saved."""
    out = tmp_path / "sft"
    lora = {"h.0.attn.c_attn.lora_A": torch.randn(2, 8), "h.0.attn.c_attn.lora_B": torch.randn(24, 2)}
    train_common.save_files(str(out), {"train_state.pt": {"step": 2}, "ckpt.pt": {
        "step": 2, "stage": "sft", "args": dataclasses.asdict(RunFlags(out_dir=str(out))), "lora": lora}})
    resumed = RunFlags(out_dir=str(out), resume="on")
    resumed._given = {"out_dir", "resume"}
    args, state, got = train_common.start_run(resumed, "sft", {})
    assert state["step"] == 2 and got.keys() == lora.keys() and all(torch.equal(got[k], lora[k]) for k in lora)


def test_an_out_dir_that_is_an_input_under_another_spelling_is_refused(tmp_path):
    """The same directory by a symlink, a "..", or a trailing "/" is the input's: its checkpoint would be lost."""
    sft = tmp_path / "sft"
    sft.mkdir()
    os.symlink(sft, tmp_path / "link")
    for out in (tmp_path / "link", tmp_path / "x" / ".." / "sft", f"{sft}/"):
        with pytest.raises(utils.UserError, match="is also --sft"):
            train_common.check_out_dir(str(out), "dpo", {"--sft": str(sft)})
    train_common.check_out_dir(str(tmp_path / "dpo"), "dpo", {"--sft": str(sft)})


def test_resumed_flags_of_args_built_in_code_take_the_fields_off_their_default_as_given(tmp_path):
    """
    Without _given, a field that differs from its default counts as given: a flag of what the run computes must then
    equal the saved one, and a free one (eval_interval) is taken from the args; fields at their default are the run's.
    """
    out = tmp_path / "sft"
    ckpt = {"args": dataclasses.asdict(RunFlags(out_dir=str(out), lr=0.5, eval_interval=3, sft="base"))}
    args = train_common.resumed_flags(RunFlags(out_dir=str(out), resume="on", eval_interval=7), ckpt)
    assert (args.lr, args.sft, args.eval_interval, args.resume) == (0.5, "base", 7, "on")
    args = train_common.resumed_flags(RunFlags(out_dir=str(out), resume="on"), ckpt)
    assert (args.lr, args.eval_interval) == (0.5, 3)
    with pytest.raises(utils.UserError, match="--lr 0.25 differs from the run's 0.5"):
        train_common.resumed_flags(RunFlags(out_dir=str(out), lr=0.25), ckpt)


def test_resume_refuses_a_kept_version_of_another_save(tmp_path):
    """
    train_state.pt of a later save than ckpt.pt is mended only by a train_state.prev.pt of ckpt.pt's own save; one
    of a third save (another step, another save_id) is no pair for it: one line, not a resume from the wrong state.
    """
    out = tmp_path / "run"
    save(out, 2)
    torch.save({"step": 3, "save_id": "a third save"}, out / "train_state.prev.pt")
    torch.save({"step": 4, "save_id": "a later save"}, out / "train_state.pt")
    with pytest.raises(utils.UserError, match=f"^--resume: {out}/ckpt.pt is at step 2 but train_state.pt at step 4 "):
        train_common.load_run(str(out))


def test_resumed_samples_keep_the_rows_up_to_the_checkpoints_iteration_and_drop_a_cut_line(tmp_path):
    """
    samples.jsonl and samples.txt rebuilt from the rows of iterations 1..k, a last line that a kill cut short gone,
    against the two files written out by hand from those rows.
    """
    rng = random.Random(9)
    rows = [{"iter": it, "prompt": f"p{it}.{j}", "response": f"r{rng.random():.4f}", "score": rng.uniform(-2, 2),
             "gold": rng.choice([None, rng.random()])} for it in range(1, 6) for j in range(rng.randint(1, 3))]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iter": 6, "pro')
    train_common.keep_samples_until(str(tmp_path), 3)
    kept = [r for r in rows if r["iter"] <= 3]
    assert (tmp_path / "samples.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in kept)
    txt = ""
    for r in kept:
        gold = "" if r["gold"] is None else "  gold %.3f" % r["gold"]
        txt += "=== iter %d  score %.3f%s\nPROMPT: %s\nRESPONSE: %s\n\n" % (r["iter"], r["score"], gold, r["prompt"],
                                                                          r["response"])
    assert (tmp_path / "samples.txt").read_text() == txt


def test_a_save_killed_before_its_last_rename_resumes_from_the_previous_pair(tmp_path, monkeypatch):
    """
    A kill between train_state.pt's rename and ckpt.pt's leaves the new train_state.pt beside the old ckpt.pt: the
    save kept the old train_state.pt as train_state.prev.pt, and load_run pairs it with ckpt.pt (both of step 2).
    """
    out = tmp_path / "run"
    save(out, 2, x=torch.tensor([2.0]))
    kill_at_rename(monkeypatch, "ckpt.pt")
    with pytest.raises(KeyboardInterrupt):
        save(out, 4, x=torch.tensor([4.0]))
    monkeypatch.undo()
    assert load(out / "train_state.pt")["step"] == 4
    ckpt, state = train_common.load_run(str(out))
    assert (ckpt["step"], state["step"], state["x"].item(), ckpt["save_id"]) == (2, 2, 2.0, state["save_id"])


# -----------------------------------------------------------------------------
# from mutation testing of save_files, resumed_flags, wants_resume and input_digests


def test_a_second_interrupted_save_keeps_the_first_ones_kept_version(tmp_path, monkeypatch):
    """
    Saves at steps 2, 4 (killed before ckpt.pt's rename), then 6 (the resumed run's, killed there too): the step-4
    train_state.pt is of no complete set, so the 6 save must keep train_state.prev.pt of step 2, the one that pairs
    with ckpt.pt, not link the step-4 file over it. Resuming then finds the step-2 pair.
    """
    out = tmp_path / "run"
    save(out, 2)
    kill_at_rename(monkeypatch, "ckpt.pt")
    for step in (4, 6):
        with pytest.raises(KeyboardInterrupt):
            save(out, step)
    monkeypatch.undo()
    assert load(out / "train_state.pt")["step"] == 6 and load(out / "train_state.prev.pt")["step"] == 2
    ckpt, state = train_common.load_run(str(out))
    assert (ckpt["step"], state["step"], ckpt["save_id"]) == (2, 2, state["save_id"])


def test_a_save_on_a_file_system_without_hard_links_keeps_a_copy(tmp_path, monkeypatch):
    """os.link failing (FAT, some network mounts): the previous train_state.pt is kept as a copy, and a kill before
    ckpt.pt's rename still resumes from the previous pair."""
    out = tmp_path / "run"
    save(out, 2)

    def no_link(src, dst):
        raise OSError(1, "Operation not permitted", src)

    monkeypatch.setattr(os, "link", no_link)
    kill_at_rename(monkeypatch, "ckpt.pt")
    with pytest.raises(KeyboardInterrupt):
        save(out, 4)
    monkeypatch.undo()
    ckpt, state = train_common.load_run(str(out))
    assert (ckpt["step"], state["step"]) == (2, 2)


def test_a_flag_that_the_saved_run_did_not_have_takes_its_default(tmp_path):
    """A checkpoint of an older version lacks a flag added since: the resumed run gets that flag's default, not None."""
    args = RunFlags(out_dir=str(tmp_path), resume="on")
    ckpt = {"args": {"out_dir": str(tmp_path), "resume": "off", "sft": "out/sft", "lr": 0.5}}  # no eval_interval
    merged = train_common.resumed_flags(args, ckpt)
    assert (merged.lr, merged.eval_interval, merged.sft) == (0.5, 10, "out/sft")


@pytest.mark.parametrize("mode", ["yes", "ON", ""])
def test_wants_resume_refuses_a_mode_other_than_on_off_auto(tmp_path, mode):
    with pytest.raises(utils.UserError, match=f"--resume '{mode}': expected on, off or auto"):
        train_common.wants_resume(mode, str(tmp_path))


def test_a_saved_state_without_a_flags_digest_does_not_check_that_flag(tmp_path):
    """
    A train_state.pt whose "inputs" lack a flag (one it did not read, or one a later version added) checks the
    others only; a digest it has must match. Reference: hashlib.sha256 of each file's bytes.
    """
    import hashlib

    (tmp_path / "a").write_text("a\n")
    (tmp_path / "b").write_text("b\n")
    inputs = {"--data": str(tmp_path / "a"), "--val_data": str(tmp_path / "b")}
    fresh = {"--data": hashlib.sha256(b"a\n").hexdigest(), "--val_data": hashlib.sha256(b"b\n").hexdigest()}
    assert train_common.input_digests(inputs) == fresh
    assert train_common.input_digests(inputs, state={"inputs": {"--data": fresh["--data"]}}) == fresh
    with pytest.raises(utils.UserError, match="--data .* is not what the run started from"):
        train_common.input_digests(inputs, state={"inputs": {"--data": fresh["--val_data"]}})


# -----------------------------------------------------------------------------
# from mutation testing round 7: check_finite's message, load_run's note, input_digests of a large file


def test_check_finite_names_the_step_only_when_there_is_one():
    """The message starts with `where: ` when a step is named, with "non-finite" itself when where is ""."""
    nan, inf = torch.tensor(float("nan")), float("inf")
    with pytest.raises(train_common.NonFiniteError) as e:
        train_common.check_finite("", loss=nan, grad_norm=1.5)
    assert str(e.value).startswith("non-finite loss nan, grad_norm 1.5; stopped before the optimizer step")
    with pytest.raises(train_common.NonFiniteError) as e:
        train_common.check_finite("iter 7", grad_norm=inf)
    assert str(e.value).startswith("iter 7: non-finite grad_norm inf; stopped before the optimizer step")
    train_common.check_finite("", loss=torch.tensor(2.0), grad_norm=0.0)  # finite: nothing


def test_load_run_says_nothing_of_a_save_that_was_not_interrupted(tmp_path, capsys):
    """The note of a kept .prev.pt version is printed only when load_run uses one (then it names it)."""
    out = tmp_path / "run"
    save(out, 2)
    save(out, 4)
    ckpt, state = train_common.load_run(str(out))
    assert (ckpt["step"], state["step"]) == (4, 4) and capsys.readouterr().out == ""
    torch.save({"step": 6, "save_id": "a later save"}, out / "train_state.pt.tmp")
    os.link(out / "train_state.pt", out / "train_state.prev.pt")  # as save_files keeps it ...
    os.replace(out / "train_state.pt.tmp", out / "train_state.pt")  # ... before a rename killed before ckpt.pt's
    ckpt, state = train_common.load_run(str(out))
    assert (ckpt["step"], state["step"]) == (4, 4)
    assert capsys.readouterr().out == (f"note: a save in {out} was interrupted before ckpt.pt was replaced: resuming "
                                       f"from step 4 with train_state.prev.pt\n")


def test_input_digests_hash_every_byte_of_a_file_larger_than_a_read(tmp_path):
    """input_digests reads in 1 MiB chunks: a file of 2.5 MiB, changed only in its last byte, has another digest."""
    import hashlib

    data = bytes(random.Random(5).getrandbits(8) for _ in range(1000)) * 2621 + b"a"
    path = tmp_path / "big.jsonl"
    path.write_bytes(data)
    got = train_common.input_digests({"--data": str(path)})
    assert got == {"--data": hashlib.sha256(data).hexdigest()}
    path.write_bytes(data[:-1] + b"b")
    with pytest.raises(utils.UserError, match=f"^--resume: --data {path} is not what the run started from"):
        train_common.input_digests({"--data": str(path)}, {"inputs": got})


def test_an_input_that_fails_while_being_read_is_named_by_its_flag_alone(tmp_path, monkeypatch):
    """An OSError that names no file (EIO from a read) is said after the flag and path, without a "None: " in it."""
    (tmp_path / "d.jsonl").write_text("x\n")

    class Failing:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, n):
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(train_common, "open", lambda *a, **kw: Failing(), raising=False)
    with pytest.raises(utils.UserError) as e:
        train_common.input_digests({"--data": str(tmp_path / "d.jsonl")})
    assert str(e.value) == f"--data {tmp_path / 'd.jsonl'}: Input/output error"


def test_keep_samples_until_removes_both_files_when_no_row_is_kept(tmp_path):
    """
    A fresh run in a directory whose earlier model is gone (no metrics pending: the samples are not kept for a first
    save), or a checkpoint older than every sample row: samples.jsonl and samples.txt both go, not left as they were.
    """
    from nanorlhf.rollout import write_samples

    row = {"prompt": "sort 2 1", "response": "1 2", "score": 0.5, "gold": None}
    for iteration, iters in ((0, (1, 2)), (1, (2, 3))):
        out = tmp_path / f"from_{iteration}"
        out.mkdir()
        for it in iters:
            write_samples(str(out), it, [row])
        assert sorted(os.listdir(out)) == ["samples.jsonl", "samples.txt"]
        train_common.keep_samples_until(str(out), iteration)
        assert os.listdir(out) == [], iteration
