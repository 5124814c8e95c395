"""
The Makefile's rules, with a stand-in for Python that records each stage it is asked to run and writes the
stage's ckpt.pt (failing after the write when told to, as a stage that stops on a NaN does), and a stand-in for
nvidia-smi, so that whether make finds a GPU is the test's choice, not the machine's.
"""

import os
import re
import subprocess

import pytest

from scripts import ROOT

FAKE_PYTHON = """#!/bin/sh
# argv: train_X.py or evaluate.py ... --out_dir D ...  or  -m nanorlhf.tasks --out_dir D ...  or  compare.py --out D
stage=$1; [ "$1" = -m ] && stage=$2
case $stage in
  compare.py) out=$(echo "$@" | sed 's/.*--out \\([^ ]*\\).*/\\1/')/compare;;
  *) out=$(echo "$@" | sed 's/.*--out_dir \\([^ ]*\\).*/\\1/');;
esac
echo "$stage $*" >> "$CALLS"
mkdir -p "$out"
# a training stage writes its ckpt.pt as it goes; the others write their one file last
case $stage in nanorlhf.tasks|compare.py|evaluate.py) ;; *) touch "$out/ckpt.pt";; esac
case " $* " in *" --fail "*) exit 2;; esac
case $stage in nanorlhf.tasks) touch "$out/meta.json";; compare.py|evaluate.py) touch "$out/report.md";; esac
exit 0
"""

# exits 0 (a GPU is found) or 1, as the test says through $GPU_FOUND
FAKE_NVIDIA_SMI = """#!/bin/sh
[ "$GPU_FOUND" = 1 ]
"""

# python3 -m venv DIR makes DIR; -c "import torch" fails (no torch yet) unless $TORCH_PRESENT is 1; -m pip ...
# records its arguments, and fails if $PIP_FAILS is 1
FAKE_PYTHON_FOR_PIP = """#!/bin/sh
case "$1 $2" in
  "-m venv") mkdir -p "$3";;
  "-c import torch") [ "$TORCH_PRESENT" = 1 ] || exit 1;;
  "-m pip") echo "$*" >> "$CALLS"; [ "$PIP_FAILS" = 1 ] && exit 1;;
esac
exit 0
"""

# (make's variables, whether nvidia-smi finds a GPU, whether the GPU configuration is chosen): the values that turn
# it off win over a GPU found, GPU=1 wins over none found, and without GPU make asks nvidia-smi
GPU_CASES = ([([f"GPU={v}"], True, False)
              for v in ("", "0", "false", "False", "FALSE", "no", "No", "NO", "off", "Off", "OFF")]
             + [(["GPU=1"], False, True), ([], False, False), ([], True, True)])


def write_script(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_bin(tmp_path):
    """A directory, first on PATH, with the fake nvidia-smi."""
    if subprocess.run(["make", "--version"], capture_output=True).returncode != 0:
        pytest.skip("no make")
    d = tmp_path / "bin"
    d.mkdir()
    write_script(d / "nvidia-smi", FAKE_NVIDIA_SMI)
    return d


@pytest.fixture
def make(tmp_path, fake_bin):
    if not os.path.exists(os.path.join(ROOT, ".venv", "stamp")):
        pytest.skip("the virtualenv is not built (make builds it first)")
    fake = write_script(tmp_path / "python", FAKE_PYTHON)
    calls = tmp_path / "calls"

    def run(*variables, ok=True, goal="ppo/done", gpu_found=False):
        """
        Make goal (a file under tmp_path/out, or a target such as compare) in tmp_path/out; returns the stages run,
        in order. tmp_path/calls holds their command lines, run.output what make printed.
        """
        calls.write_text("")
        goal = [goal] if goal in ("all", "compare", "help", "clean") else [f"{tmp_path}/out/{goal}"]
        if goal == ["all"]:
            goal = ["all", "-o", ".venv/plots"]  # not the optional matplotlib install into the project's .venv
        env = {**os.environ, "CALLS": str(calls), "PATH": f"{fake_bin}:{os.environ['PATH']}",
               "GPU_FOUND": "1" if gpu_found else "0"}
        p = subprocess.run(["make", "-C", ROOT, f"OUT={tmp_path}/out", f"PY={fake}", *goal, *variables], env=env,
                           capture_output=True, text=True)
        assert (p.returncode == 0) == ok, p.stdout + p.stderr
        assert p.returncode in (0, 2), p.stdout + p.stderr  # 2: make's own error, or a stage's
        run.stdout, run.output = p.stdout, p.stdout + p.stderr
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


def test_a_rerun_that_fails_leaves_no_done_of_its_stage_or_those_after_it(make, tmp_path):
    out = tmp_path / "out"
    make()
    # the RM reruns and fails: its files are the failed run's, and PPO's were trained on the RM now overwritten
    assert make("RM_FLAGS=--fail", ok=False) == ["train_rm.py"]
    assert (out / "rm/ckpt.pt").exists() and (out / "sft/done").exists()
    assert not (out / "rm/done").exists() and not (out / "ppo/done").exists()
    make()
    # the data stage reruns (another seed) and fails: nothing after it is done, nor the data (its meta.json)
    assert make("SEED=1 --fail", ok=False) == ["nanorlhf.tasks"]
    assert not [f for f in ("data/meta.json", "sft/done", "rm/done", "ppo/done") if (out / f).exists()]


def test_compare_uses_the_finished_pipeline_whatever_the_variables_now(make, tmp_path):
    # a pipeline made with other variables than the defaults, then `make compare` without them: compare.py only
    assert make("SEED=1", "SFT_FLAGS=--max_steps 5") == ["nanorlhf.tasks", "train_sft.py", "train_rm.py",
                                                         "train_ppo.py"]
    assert make(goal="compare") == ["compare.py"]
    assert f"--out {tmp_path}/out" in (tmp_path / "calls").read_text()
    assert make(goal="compare") == []
    assert make("PPO_FLAGS=--kl_coef 0.1", goal="compare") == []  # new variables do not retrain it either
    # a new PPO run (made with the pipeline's variables) is compared anew
    assert make("SEED=1", "SFT_FLAGS=--max_steps 5", "PPO_FLAGS=--kl_coef 0.1") == ["train_ppo.py"]
    assert make(goal="compare") == ["compare.py"]
    # no finished pipeline (its RM failed on a rerun): make compare makes it, as make does, with the variables now
    assert make("SEED=1", "SFT_FLAGS=--max_steps 5", "RM_FLAGS=--fail", ok=False) == ["train_rm.py"]
    assert make(goal="compare") == ["nanorlhf.tasks", "train_sft.py", "train_rm.py", "train_ppo.py", "compare.py"]
    assert "--seed 0" in (tmp_path / "out/sft/cmd").read_text()


def test_compare_in_a_new_directory_makes_the_pipeline_first(make):
    assert make("SEED=1", goal="compare") == ["nanorlhf.tasks", "train_sft.py", "train_rm.py", "train_ppo.py",
                                              "compare.py"]


def test_gpu_0_false_no_off_mean_no_gpu_and_help_says_so(make, tmp_path):
    for variables, gpu_found, on in GPU_CASES:
        make(*variables, goal="sft/cmd", gpu_found=gpu_found)  # only the SFT command, written by its stamp rule
        assert ("--n_layer 6" in (tmp_path / "out/sft/cmd").read_text()) == on, (variables, gpu_found)
    for variables, gpu_found, on in GPU_CASES:
        make(*variables, goal="help", gpu_found=gpu_found)
        assert f"now: {'on' if on else 'off'})" in make.stdout, (variables, gpu_found)


def test_the_virtualenv_gets_the_cuda_torch_only_with_gpu_on(fake_bin, tmp_path):
    # the .venv/stamp rule run in an empty directory, with fakes for python3 (on PATH) and the venv's python
    fake = write_script(fake_bin / "python3", FAKE_PYTHON_FOR_PIP)
    calls = tmp_path / "calls"
    for k, (variables, gpu_found, on) in enumerate(GPU_CASES):
        work = tmp_path / f"work{k}"
        work.mkdir()
        (work / "pyproject.toml").write_text("")
        calls.write_text("")
        env = {**os.environ, "CALLS": str(calls), "PATH": f"{fake_bin}:{os.environ['PATH']}",
               "GPU_FOUND": "1" if gpu_found else "0"}
        p = subprocess.run(["make", "-C", str(work), "-f", os.path.join(ROOT, "Makefile"), f"PY={fake}",
                            ".venv/stamp", *variables], env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
        pip = calls.read_text().split()
        assert pip[:2] == ["-m", "pip"], pip
        assert ("torch" in pip) == on and ("torch==2.13.0" in pip) == (not on), (variables, gpu_found, pip)


def error_line(output):
    """make's one line for a $(error) in the Makefile (and nothing else printed but make -C's directory lines)."""
    # "make:" or, under another make (`make test` runs this file), "make[1]:"
    lines = [line for line in output.strip().splitlines()
             if not re.match(r"make(\[\d+\])?: (Entering|Leaving) directory", line)]
    assert len(lines) == 1 and "Makefile:" in lines[0] and "***" in lines[0], output
    return lines[0]


@pytest.mark.parametrize("variable, flag", [("SFT_FLAGS=--max_steps 4 --stop_at 2", "--stop_at"),
                                            ("RM_FLAGS=--stop_at=1", "--stop_at=1"),
                                            ("PPO_FLAGS=--resume on", "--resume"), ("PPO_FLAGS=--resume", "--resume"),
                                            ("SFT_FLAGS=--resume=x", "--resume=x")])
def test_a_flag_that_leaves_a_stage_unfinished_is_refused_before_any_rule_runs(make, tmp_path, variable, flag):
    # a stage stopped by --stop_at exits 0, so it was marked done, the next stage trained on it, and report.md
    # described the part-trained policies as the pipeline's; --resume continued a run the stage's command did not make
    out = tmp_path / "out"
    make()
    finished = ["data/meta.json", "sft/done", "rm/done", "ppo/done"]
    assert make(variable, goal="all", ok=False) == []
    assert f"{flag} in a stage's flags: make runs each stage to the end" in error_line(make.output)
    assert [f for f in finished if (out / f).exists()] == finished


def test_an_empty_or_spaced_or_root_out_is_refused_before_any_rule_runs(make, tmp_path):
    out = tmp_path / "out"
    make()
    finished = ["data/meta.json", "sft/done", "rm/done", "ppo/done"]
    for bad in ("", " ", f"{tmp_path}/my out", "/", "//"):
        # a dry run, which prints every command a rule would run: none, the whole pipeline at /data, /sft, ... before
        assert make(f"OUT={bad}", "-n", goal="all", ok=False) == []
        assert "OUT" in error_line(make.output), bad
    # OUT with a space in it, where the second word is a finished pipeline: it was once told to rerun the data stage,
    # which deleted that pipeline's meta.json and done files before it failed
    assert make(f"OUT={tmp_path}/my {out}", goal="all", ok=False) == []
    assert f"OUT=\"{tmp_path}/my {out}\" has a space in it" in error_line(make.output)
    assert [f for f in finished if (out / f).exists()] == finished
    assert not (tmp_path / "my").exists()


@pytest.mark.parametrize("bad", ["'", '"', ":", "#", "$", ";", "%", "(", "*", "\\", "`"])
def test_an_out_with_a_character_that_breaks_a_rule_or_its_quoting_is_refused(make, tmp_path, bad):
    # it once ran the pipeline with OUT cut short (a$b is a), broke the stamps' '...' quoting (a'b), or stopped on
    # make's own syntax (a:b), after some of the stages' directories were made
    out = f"{tmp_path}/a{bad}b"
    assert make(f"OUT={out}", goal="all", ok=False) == []
    assert f'OUT="{out}" has {bad} in it' in error_line(make.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "calls", "python"]  # no directory made


def test_an_out_of_the_safe_characters_runs_and_a_leading_dash_is_refused(make, tmp_path):
    out = tmp_path / "run-1_a.b+c,d=e@f"
    assert make(f"OUT={out}", goal="all") == ["nanorlhf.tasks", "train_sft.py", "train_rm.py", "train_ppo.py",
                                              "evaluate.py"]
    assert (out / "report.md").exists() and f"--out_dir {out}/data " in (tmp_path / "calls").read_text()
    assert make("OUT=-x", "-n", goal="all", ok=False) == []  # a dry run: mkdir -p -x/data is an unknown option
    assert 'OUT="-x" starts with -' in error_line(make.output)


def test_a_trailing_slash_in_out_is_the_same_out(make, tmp_path):
    assert make(goal="all") == ["nanorlhf.tasks", "train_sft.py", "train_rm.py", "train_ppo.py", "evaluate.py"]
    # the stage commands keep their text (out/data, not out//data), so nothing reruns
    assert make(f"OUT={tmp_path}/out/", goal="all") == []
    assert make(f"OUT={tmp_path}/out//", goal="all") == []
    for given, used in (("out/", "out"), ("./x/", "./x"), (f"{tmp_path}/o//", f"{tmp_path}/o")):
        make(f"OUT={given}", goal="help")
        assert f"output directory (now: {used})" in make.stdout, given


def test_clean_removes_a_pipelines_output_and_refuses_any_other_directory(make, tmp_path):
    out = tmp_path / "out"
    make()
    make(f"OUT={out}/", goal="clean")
    assert not out.exists()
    make(goal="clean")  # already gone: nothing to refuse
    # a dry run, which would print `rm -rf nanorlhf` (the source package), `rm -rf .` or `rm -rf ..`
    for bad, why in (("nanorlhf", "holds no file that the pipeline writes"), (".", "holds this directory"),
                     ("..", "holds this directory"), ("Makefile", "holds no file that the pipeline writes")):
        assert make(f"OUT={bad}", "-n", goal="clean", ok=False) == []
        assert f"not removing {bad}: it {why}" in error_line(make.output), bad
    # a directory of other files is left as it is
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me\n")
    make(f"OUT={notes}", goal="clean", ok=False)
    assert f"not removing {notes}:" in error_line(make.output)
    assert (notes / "todo.txt").read_text() == "keep me\n"


def test_clean_refuses_a_directory_git_tracks_files_in(fake_bin, tmp_path):
    # a pipeline written into a source directory (make OUT=src): its stamps are there, and so are tracked files
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("no git")
    work = tmp_path / "work"
    (work / "src/data").mkdir(parents=True)
    (work / "src/model.py").write_text("")
    (work / "src/data/cmd").write_text("")
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run(["git", "add", "src/model.py"], cwd=work, check=True)
    p = subprocess.run(["make", "-C", str(work), "-f", os.path.join(ROOT, "Makefile"), "clean", "OUT=src"],
                       capture_output=True, text=True)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "not removing src: git tracks files in it" in error_line(p.stdout + p.stderr)
    assert (work / "src/model.py").exists()


def flags(command_line):
    """The --flag value pairs of a command line, the last of a repeated flag winning as with argparse."""
    words = command_line.split()
    return {w: v for w, v in zip(words, words[1:] + [""]) if w.startswith("--")}


def test_each_stage_reads_what_the_stages_before_it_wrote(make, tmp_path):
    # the reference is the dataflow of the module docstrings: nanorlhf/tasks.py writes the five .jsonl files, SFT
    # trains on sft.jsonl, the RM on prefs.jsonl (prefs_eval.jsonl held out) from the SFT model, PPO on prompts.jsonl
    # with the SFT policy and the RM, evaluate.py scores eval.jsonl; every stage gets the one SEED
    d = f"{tmp_path}/out"
    make("SEED=3", goal="all")
    calls = {line.split()[0]: flags(line) for line in (tmp_path / "calls").read_text().splitlines()}
    expected = {
        "nanorlhf.tasks": {"--out_dir": f"{d}/data", "--seed": "3"},
        "train_sft.py": {"--data": f"{d}/data/sft.jsonl", "--out_dir": f"{d}/sft", "--seed": "3"},
        "train_rm.py": {"--data": f"{d}/data/prefs.jsonl", "--val_data": f"{d}/data/prefs_eval.jsonl",
                        "--sft_data": f"{d}/data/sft.jsonl", "--init_from": f"{d}/sft", "--out_dir": f"{d}/rm",
                        "--seed": "3"},
        "train_ppo.py": {"--data": f"{d}/data/prompts.jsonl", "--sft": f"{d}/sft", "--rm": f"{d}/rm",
                         "--out_dir": f"{d}/ppo", "--seed": "3"},
        "evaluate.py": {"--data": f"{d}/data/eval.jsonl", "--sft": f"{d}/sft", "--rm": f"{d}/rm", "--ppo": f"{d}/ppo",
                        "--out_dir": d},
    }
    assert calls == expected


@pytest.mark.parametrize("changed, rerun", [
    ("nanorlhf/tasks.py", ["nanorlhf.tasks", "train_sft.py", "train_rm.py", "train_ppo.py", "evaluate.py"]),
    ("train_sft.py", ["train_sft.py", "train_rm.py", "train_ppo.py", "evaluate.py"]),
    ("nanorlhf/model.py", ["train_sft.py", "train_rm.py", "train_ppo.py", "evaluate.py"]),  # the package's code
    ("train_rm.py", ["train_rm.py", "train_ppo.py", "evaluate.py"]),
    ("train_ppo.py", ["train_ppo.py", "evaluate.py"]),
    ("evaluate.py", ["evaluate.py"]),
    (".venv/plots", ["evaluate.py"]),  # matplotlib installed since: the report is drawn again, with its pictures
    (".venv/stamp", ["nanorlhf.tasks", "train_sft.py", "train_rm.py", "train_ppo.py", "evaluate.py"])])
def test_a_stage_reruns_when_its_script_changes_and_so_do_the_stages_after_it(make, changed, rerun):
    # make -W FILE takes FILE as changed now, without touching the repository's file
    assert make(goal="all") == ["nanorlhf.tasks", "train_sft.py", "train_rm.py", "train_ppo.py", "evaluate.py"]
    assert make("-W", changed, goal="all") == rerun
    assert make(goal="all") == []


@pytest.mark.parametrize("changed", ["train_grpo.py", "train_dpo.py", "compare.py", "evaluate.py"])
def test_compare_reruns_when_one_of_its_scripts_changes(make, changed):
    make(goal="compare")
    assert make("-W", changed, goal="compare") == ["compare.py"]


def test_a_rerun_of_sft_or_ppo_that_fails_leaves_no_done_of_it_or_after_it(make, tmp_path):
    # $(OUT)/ppo/done is there only while the whole pipeline is finished and consistent: `make compare` would
    # otherwise compare a PPO policy trained on an SFT model that a failed rerun has overwritten
    out = tmp_path / "out"
    make()
    assert make("SFT_FLAGS=--fail", ok=False) == ["train_sft.py"]
    assert [f for f in ("sft/done", "rm/done", "ppo/done") if (out / f).exists()] == []
    make()
    assert make("PPO_FLAGS=--fail", ok=False) == ["train_ppo.py"]
    assert (out / "rm/done").exists() and not (out / "ppo/done").exists()
    assert make(goal="compare") == ["train_ppo.py", "compare.py"]  # the pipeline is made first, as make does


def test_the_gpu_model_is_the_larger_one_and_sft_flags_win_over_it(make, tmp_path):
    # the Makefile's comment: with a GPU, 6 layers x 256 with 4 heads at lr 1e-3; flags in SFT_FLAGS come after
    make(goal="sft/cmd", gpu_found=True)
    sft = flags((tmp_path / "out/sft/cmd").read_text())
    assert (sft["--n_layer"], sft["--n_head"], sft["--n_embd"], sft["--lr"]) == ("6", "4", "256", "1e-3")
    make("SFT_FLAGS=--n_layer 2 --n_embd 64", goal="sft/cmd", gpu_found=True)
    sft = flags((tmp_path / "out/sft/cmd").read_text())
    assert (sft["--n_layer"], sft["--n_head"], sft["--n_embd"]) == ("2", "4", "64")


def test_help_shows_the_seed_now(make):
    make("SEED=17", goal="help")
    assert "(now: 17)" in make.stdout


@pytest.mark.parametrize("written", ["sft/cmd", "rm/ckpt.pt", "data/meta.json", "report.md"])
def test_clean_removes_a_directory_that_holds_any_one_file_the_pipeline_writes(make, tmp_path, written):
    # a pipeline stopped early (only its first stamp or ckpt.pt) or a report alone is still the pipeline's output
    out = tmp_path / "out"
    (out / written).parent.mkdir(parents=True)
    (out / written).write_text("")
    make(goal="clean")
    assert not out.exists()


def venv_rule(fake_bin, tmp_path, target, *variables, built=False, **env):
    """
    Make target (.venv/stamp or .venv/plots) in a directory of its own with the fake python3, the virtualenv already
    built there if `built` -> the directory, pip's arguments.
    """
    fake = write_script(fake_bin / "python3", FAKE_PYTHON_FOR_PIP)
    work = tmp_path / "work"
    work.mkdir(parents=True)
    (work / "pyproject.toml").write_text("")
    if built:
        (work / ".venv").mkdir()
        (work / ".venv/stamp").write_text("")
        os.utime(work / "pyproject.toml", (0, 0))  # older than the stamp
    calls = tmp_path / "calls"
    calls.write_text("")
    env = {**os.environ, "CALLS": str(calls), "PATH": f"{fake_bin}:{os.environ['PATH']}", "GPU_FOUND": "0", **env}
    p = subprocess.run(["make", "-C", str(work), "-f", os.path.join(ROOT, "Makefile"), f"PY={fake}", target,
                        *variables], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return work, calls.read_text().split()


def test_the_virtualenv_keeps_a_torch_it_has_and_takes_torch_index(fake_bin, tmp_path):
    work, pip = venv_rule(fake_bin, tmp_path / "a", ".venv/stamp", TORCH_PRESENT="1")
    assert pip[:2] == ["-m", "pip"] and not [w for w in pip if w.startswith("torch")], pip
    assert pip[-2:] == ["-e", ".[test]"]  # the project, with the test extra that `make test` runs on (pytest, xdist)
    assert (work / ".venv/stamp").exists()  # so that the next make does not install again
    index = "https://download.pytorch.org/whl/cpu"
    _, pip = venv_rule(fake_bin, tmp_path / "b", ".venv/stamp", f"TORCH_INDEX={index}")
    assert "torch==2.13.0" in pip and pip[pip.index("--extra-index-url") + 1] == index, pip


def test_matplotlib_that_fails_to_install_does_not_stop_make(fake_bin, tmp_path):
    # pip fails: make goes on (the pictures are optional), with pip's output in .venv/plots.log
    work, pip = venv_rule(fake_bin, tmp_path, ".venv/plots", built=True, PIP_FAILS="1")
    assert "matplotlib" in pip
    assert (work / ".venv/plots").exists() and (work / ".venv/plots.log").exists()


# -c "import xdist" succeeds only if $XDIST is 1; anything else (pytest) records its arguments
FAKE_PYTHON_FOR_TEST = """#!/bin/sh
case "$1 $2" in
  "-c import xdist") [ "$XDIST" = 1 ];;
  *) echo "$*" >> "$CALLS";;
esac
"""


@pytest.mark.parametrize("xdist", [True, False])
def test_make_test_runs_one_test_file_per_worker_on_two_workers_where_xdist_is(fake_bin, tmp_path, xdist):
    # the Makefile's comment: with pytest-xdist, two workers and --dist loadfile (a file's fixtures train their
    # checkpoints once, on one worker); without it, plain pytest
    fake = write_script(fake_bin / "python", FAKE_PYTHON_FOR_TEST)
    calls = tmp_path / "calls"
    calls.write_text("")
    env = {**os.environ, "CALLS": str(calls), "XDIST": "1" if xdist else "0"}
    p = subprocess.run(["make", "-C", ROOT, f"PY={fake}", "test", "-o", ".venv/stamp"], env=env, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    pytest_args = calls.read_text().split()
    assert pytest_args[:2] == ["-m", "pytest"] and pytest_args[-1] == "tests", pytest_args
    options = pytest_args[2:-1]
    assert sorted(options) == sorted(["-q", "-n", "2", "--dist", "loadfile"] if xdist else ["-q"]), options
    if xdist:
        assert options[options.index("-n") + 1] == "2" and options[options.index("--dist") + 1] == "loadfile"
