"""
kl_sweep.py's two train_ppo.py commands: beta0 runs with beta 0 and the default run with the default beta, whatever
--ppo_flags adds; --ppo_flags that would override a flag the sweep sets, --adaptive_kl, and prompts that are not the
built-in task's (no gold) are refused before anything runs.
"""

import json
import sys
import types

import pytest
import torch

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


@pytest.mark.parametrize("argv, named", [
    (["--num_iterations", "0", "--kl_coef", "5", "--ppo_flags=--bogus 1", "--data", "/nonexist"],
     "--data, --num_iterations, --kl_coef, --ppo_flags"),
    (["--seed", "0"], "--seed"),  # given at its default value: still a flag --train false would ignore
    (["--sft", "s", "--rm", "r"], "--sft, --rm"),
])
def test_train_false_refuses_the_training_flags(tmp_path, monkeypatch, capsys, argv, named):
    # they only shape the two runs; --train false ran none and exited 0 as if they had applied
    (tmp_path / "beta0").mkdir()
    (tmp_path / "beta0" / "metrics.jsonl").write_text("")
    code, err, cmds = sweep(monkeypatch, capsys, "--train", "false", "--out_dir", str(tmp_path), *argv)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {named}: only shape the two PPO runs, and --train false runs none"), err
    assert not cmds and not (tmp_path / "report.md").exists()


def test_num_iterations_below_1_is_refused(tmp_path, monkeypatch, capsys):
    code, err, cmds = sweep(monkeypatch, capsys, "--num_iterations", "0", "--data", task_prompts(tmp_path),
                            "--out_dir", str(tmp_path / "sweep"))
    assert (code, err) == (2, "error: --num_iterations 0: must be at least 1\n")
    assert not cmds and not (tmp_path / "sweep").exists()


def test_a_failed_run_exits_2_with_one_line_naming_it(tmp_path, monkeypatch, capsys):
    # it was sys.exit("kl_sweep: the beta0 run failed"): exit status 1, not the project's 2 for a run that failed
    monkeypatch.setattr(kl_sweep.subprocess, "run", lambda cmd, *a, **kw: types.SimpleNamespace(returncode=1))
    monkeypatch.setattr(sys, "argv", ["kl_sweep.py", "--data", task_prompts(tmp_path), "--out_dir",
                                      str(tmp_path / "s2")])
    with pytest.raises(SystemExit) as info:
        utils.run(kl_sweep.main)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: the beta0 run ({tmp_path / 's2' / 'beta0'}) failed: train_ppo.py exited with 1")
    assert not (tmp_path / "s2").exists()


@pytest.mark.parametrize("train", ["true", "false"])
def test_an_out_dir_that_is_not_the_sweep_s_is_refused(tmp_path, monkeypatch, capsys, train):
    """
    The pipeline's out/ as --out_dir: the report tabulated out/ppo (any run with metrics) as a sweep run and replaced
    evaluate.py's out/report.md with the sweep's section.
    """
    for name in ("sft", "ppo"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "report.md").write_text("# nanorlhf: the pipeline's report\n")
    data = ["--data", task_prompts(tmp_path)] if train == "true" else []
    code, err, cmds = sweep(monkeypatch, capsys, "--train", train, "--out_dir", str(tmp_path), *data)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --out_dir {tmp_path}: holds runs that are not the sweep's (ppo, sft; "), err
    assert not cmds and (tmp_path / "report.md").read_text() == "# nanorlhf: the pipeline's report\n"
    # without those runs, a report.md that is not the sweep's is still refused, named
    for name in ("sft", "ppo"):
        (tmp_path / name / "metrics.jsonl").unlink()
    code, err, cmds = sweep(monkeypatch, capsys, "--train", train, "--out_dir", str(tmp_path), *data)
    assert code == 2 and err.startswith(f"error: {tmp_path}/report.md: not written by kl_sweep.py"), err
    assert not cmds and (tmp_path / "report.md").read_text() == "# nanorlhf: the pipeline's report\n"


def test_the_sweep_s_own_out_dir_is_rewritten(tmp_path, monkeypatch, capsys):
    # its runs and the report it wrote before: --train false rewrites that report
    for name in kl_sweep.RUNS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("{}\n")
        torch.save({"step": 3, "args": {"num_iterations": 3}}, tmp_path / name / "ckpt.pt")  # finished runs
    (tmp_path / "eval").mkdir()  # evaluate.py's output for the two policies: no run
    (tmp_path / "report.md").write_text("## Over-optimisation: PPO with beta = 0 against the default beta\n")
    code, err, cmds = sweep(monkeypatch, capsys, "--train", "false", "--out_dir", str(tmp_path))
    assert (code, err, cmds) == (0, "", [])
    assert (tmp_path / "report.md").read_text() == "the section\n"


@pytest.mark.parametrize("case", ["a file", "under a file", "empty"])
def test_an_out_dir_that_cannot_be_one_is_refused_before_any_run(tmp_path, monkeypatch, capsys, case):
    # the first train_ppo.py run started (and loaded everything) before the sweep printed two error lines
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    out = {"a file": str(afile), "under a file": str(afile / "sub"), "empty": ""}[case]
    code, err, cmds = sweep(monkeypatch, capsys, "--data", task_prompts(tmp_path), "--out_dir", out)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --out_dir"), err
    assert "not a directory" in err or "empty" in err, err
    assert not cmds and afile.read_text() == "mine\n"


def test_sigterm_ends_the_sweep_and_its_running_child(tmp_path):
    """
    kl_sweep.py killed with SIGTERM (a scheduler's stop) died alone: its train_ppo.py went on as an orphan, writing
    into the sweep's directory. Now the sweep says "terminated", exit status 143, and its child is gone too. The
    sweep runs from a copy beside a stand-in train_ppo.py that says its process id and sleeps.
    """
    import os
    import shutil
    import signal
    import subprocess
    import time

    shutil.copy(os.path.join(ROOT, "kl_sweep.py"), tmp_path / "kl_sweep.py")
    pid_file = tmp_path / "child.pid"
    (tmp_path / "train_ppo.py").write_text(
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.Popen([sys.executable, str(tmp_path / "kl_sweep.py"), "--data", task_prompts(tmp_path),
                          "--out_dir", str(tmp_path / "sweep")], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    child = None
    try:
        deadline = time.time() + 60
        while not (pid_file.exists() and pid_file.read_text()) and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        # a sweep that ended before starting its child (refused its input, say) shows why
        assert p.poll() is None, f"the sweep exited {p.returncode} before its child started:\n{p.communicate()[1]}"
        assert pid_file.exists() and pid_file.read_text(), "no child started within 60 s"
        child = int(pid_file.read_text())
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 143
        assert p.stderr.read() == "terminated\n"
        assert not utils.pid_alive(child)  # killed, and reaped by the sweep before it exited
    finally:
        if p.poll() is None:
            p.kill()
        if child is not None and utils.pid_alive(child):
            os.kill(child, signal.SIGKILL)


# -----------------------------------------------------------------------------
# the report's section (nanorlhf.report) against a plain reference


def plain_verdict(gold, rm, kl, iters, tol=0.03):
    """The over-optimisation numbers the plain way: trailing means over a tenth of the run, the first gold peak."""
    w = max(1, len(gold) // 10)

    def smoothed(xs):
        out = []
        for i in range(len(xs)):
            total, count = 0.0, 0
            for j in range(i, -1, -1):
                if i - j >= w:
                    break
                total += xs[j]
                count += 1
            out.append(total / count)
        return out

    g, r, k = smoothed(gold), smoothed(rm), smoothed(kl)
    peak = 0
    for i in range(len(g)):
        if g[i] > g[peak]:
            peak = i
    return {"gold_start": g[0], "gold_peak": g[peak], "gold_end": g[-1], "rm_start": r[0], "rm_at_peak": r[peak],
            "rm_end": r[-1], "kl_at_peak": k[peak], "kl_end": k[-1], "iter_at_peak": iters[peak],
            "iter_end": iters[-1], "shows": g[-1] < g[peak] - tol and r[-1] >= r[peak]}


def random_curves(rng, n):
    """Random walks: gold rises for a while then drifts either way, the RM score drifts either way, KL grows."""
    gold, rm, kl = [], [], []
    g, r, k, turn = 0.5, 0.0, 0.0, rng.randint(1, n)
    slope_g, slope_r = rng.uniform(-0.01, 0.01), rng.uniform(-0.02, 0.02)
    for i in range(n):
        g += (0.01 if i < turn else slope_g) + rng.gauss(0, 0.005)
        r += slope_r + rng.gauss(0, 0.01)
        k += rng.uniform(0, 0.5)
        gold.append(g)
        rm.append(r)
        kl.append(k)
    return gold, rm, kl


def test_overoptimisation_matches_the_plain_reference():
    import random
    from nanorlhf.report import overoptimisation
    rng = random.Random(0)
    seen = set()
    for trial in range(400):
        n = rng.randint(1, 60)
        gold, rm, kl = random_curves(rng, n)
        iters = list(range(1 + trial % 3, 1 + trial % 3 + n))
        got = overoptimisation({"iter": iters, "gold score": gold, "rm score": rm, "KL": kl})
        want = plain_verdict(gold, rm, kl, iters)
        assert got == pytest.approx(want, abs=1e-12), (trial, got, want)
        drop = want["gold_peak"] - want["gold_end"]
        seen.add((want["shows"], 0.03 < drop < 0.06, want["rm_end"] >= want["rm_at_peak"]))
    # the cases that tell the verdict apart all came up: shown, a drop of just over tol, a drop with the RM falling
    assert {(True, True, True), (False, False, False), (False, True, False), (True, False, True)} <= seen, seen


def test_sweep_section_table_gives_each_run_its_own_numbers(tmp_path):
    """
    The table and the closing sentence, cell by cell, against the plain reference; a run that did not log gold
    (no judge) is left out, and one whose rows lack "iter" counts them from 1.
    """
    import random
    from nanorlhf.report import sweep_section
    rng = random.Random(1)

    def f(x):
        return "%.3f" % x

    runs = {}
    for name, n in (("beta0", 37), ("default", 23), ("lr_high", 12)):
        gold, rm, kl = random_curves(rng, n)
        if name == "beta0":  # a clear hump with the RM score rising: shows
            gold = [0.5 + 0.4 * (i / 18 if i < 18 else (n - i) / 18) for i in range(n)]
            rm = [0.1 * i for i in range(n)]
        rows = [{"iter": i + 1, "rm_score": rm[i], "gold": gold[i], "kl": kl[i]} for i in range(n)]
        if name == "default":
            rows = [{k: v for k, v in r.items() if k != "iter"} for r in rows]
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs[name] = plain_verdict(gold, rm, kl, list(range(1, n + 1)))
    (tmp_path / "no_gold").mkdir()  # a run without the judge's score: nothing to tabulate
    (tmp_path / "no_gold" / "metrics.jsonl").write_text(
        "".join(json.dumps({"iter": i, "rm_score": 0.1, "kl": 0.2}) + "\n" for i in range(1, 5)))
    md = sweep_section(str(tmp_path), None, str(tmp_path))
    cells = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert list(cells) == ["run", "beta0", "default", "lr_high"], md  # the header, then the runs by name
    for name, o in runs.items():
        assert cells[name] == (f"| {name} | {o['iter_end']} | {f(o['kl_end'])} | {f(o['rm_start'])} -> "
                               f"{f(o['rm_end'])} | {f(o['gold_start'])} -> {f(o['gold_peak'])} "
                               f"({f(o['kl_at_peak'])}) -> {f(o['gold_end'])} | {'yes' if o['shows'] else 'no'} |"), name
    shown = ", ".join(name for name in sorted(runs) if runs[name]["shows"])
    assert runs["beta0"]["shows"] and f"**Over-optimisation shows at this size** ({shown})" in md
    b0, bd = runs["beta0"], runs["default"]
    assert (f"With beta = 0 the policy drifted to KL {f(b0['kl_end'])} and ended at gold {f(b0['gold_end'])} "
            f"(RM {f(b0['rm_end'])}); with the default beta it stayed at KL {f(bd['kl_end'])} and ended at gold "
            f"{f(bd['gold_end'])} (RM {f(bd['rm_end'])}).") in md


@pytest.mark.parametrize("argv, ok", [
    (["--kl_coef", "0"], False),  # the default run at beta 0 would be a second beta0 run
    (["--kl_coef", "-0.1"], False),
    (["--kl_coef", "1e-3"], True),
    (["--num_iterations", "1"], True),  # the least there is
])
def test_the_sweep_s_bounds_on_its_flags(tmp_path, monkeypatch, capsys, argv, ok):
    code, err, cmds = sweep(monkeypatch, capsys, *argv, "--data", task_prompts(tmp_path), "--out_dir", str(tmp_path))
    if ok:
        assert (code, err, len(cmds)) == (0, "", 2)
    else:
        assert code == 2 and err.startswith(f"error: --kl_coef {float(argv[1])}: the default run needs a positive"), err
        assert not cmds


def test_seed_and_num_iterations_reach_both_runs(tmp_path, monkeypatch, capsys):
    code, _, cmds = sweep(monkeypatch, capsys, "--seed", "3", "--num_iterations", "7", "--data",
                          task_prompts(tmp_path), "--out_dir", str(tmp_path), "--sft", "s", "--rm", "r")
    assert code == 0
    runs = [utils.parse_flags(train_ppo.Args, cmd[2:]) for cmd in cmds]
    assert [(a.seed, a.num_iterations, a.sft, a.rm, a.data) for a in runs] == [
        (3, 7, "s", "r", str(tmp_path / "prompts.jsonl"))] * 2


@pytest.mark.parametrize("ppo_flags, named", [("--lr 2e-4 --stop_at 1", "--stop_at"), ("--resume=on", "--resume")])
def test_ppo_flags_that_cut_a_run_short_are_refused(tmp_path, monkeypatch, capsys, ppo_flags, named):
    # both runs stopped at iteration 1 and the report gave its verdict on them as on a sweep of --num_iterations
    code, err, cmds = sweep(monkeypatch, capsys, f"--ppo_flags={ppo_flags}", "--out_dir", str(tmp_path / "sweep"),
                            "--data", task_prompts(tmp_path))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --ppo_flags: {named}: the sweep runs both runs to --num_iterations"), err
    assert not cmds and not (tmp_path / "sweep").exists()


def finished_sweep(root, inputs=None, **steps):
    """
    root/beta0 and root/default as train_ppo.py leaves them, for sweep_problem: metrics.jsonl, ckpt.pt at its step of
    num_iterations (steps: {run: (step, num_iterations)}, default (3, 3)) and train_state.pt with the input digests.
    """
    for name in kl_sweep.RUNS:
        step, planned = steps.get(name, (3, 3))
        (root / name).mkdir(parents=True)
        (root / name / "metrics.jsonl").write_text("{}\n")
        torch.save({"step": step, "args": {"num_iterations": planned}}, root / name / "ckpt.pt")
        torch.save({"step": step, "inputs": inputs or {}}, root / name / "train_state.pt")


@pytest.mark.parametrize("steps, message", [
    ({"default": (1, 3)}, "the default run ({d}/default) stopped at iteration 1 of 3: finish it (python train_ppo.py "
                          "--out_dir {d}/default --resume on) or run the sweep again"),
    ({"beta0": (4, 4)}, "the runs in {d} have different lengths (beta0 4, default 3 iterations): run the sweep again"),
])
def test_train_false_over_runs_that_are_not_one_finished_sweep_is_refused(tmp_path, monkeypatch, capsys, steps,
                                                                          message):
    # a rerun killed part-way left its unfinished run beside the other sweep's finished one: --train false reported
    # the two together, exit 0, over the report of the sweep before
    d = tmp_path / "sweep"
    finished_sweep(d, **steps)
    (d / "report.md").write_text(kl_sweep.SWEEP_HEADING + ": the earlier sweep\n")
    code, err, cmds = sweep(monkeypatch, capsys, "--train", "false", "--out_dir", str(d))
    assert (code, err) == (2, f"error: {d}: {message.format(d=d)}\n")
    assert (d / "report.md").read_text() == kl_sweep.SWEEP_HEADING + ": the earlier sweep\n"


def test_sweep_problem_names_a_run_trained_from_other_models(tmp_path):
    """
    evaluate.py put out/sweep into the report of whatever pipeline was in out/ (a `make SEED=1` there retrains SFT
    and RM): the runs' saved digests of --sft and --rm against those of the report's own checkpoints.
    """
    from nanorlhf.report import sweep_problem
    from nanorlhf.train_common import input_digests

    for name in ("sft", "rm"):
        (tmp_path / name).mkdir()
        torch.save({"stage": name, "w": torch.randn(4)}, tmp_path / name / "ckpt.pt")
    sft, rm = str(tmp_path / "sft"), str(tmp_path / "rm")
    finished_sweep(tmp_path / "sweep", inputs=input_digests({"--sft": sft, "--rm": rm, "--data": sft}))
    d = str(tmp_path / "sweep")
    assert sweep_problem(d, sft, rm) is None and sweep_problem(d) is None
    assert sweep_problem(d, sft, None) is None  # evaluate.py without --rm: the SFT model alone is compared
    torch.save({"stage": "rm", "w": torch.randn(4)}, tmp_path / "rm" / "ckpt.pt")  # retrained
    assert sweep_problem(d, sft, rm) == f"the beta0 run ({d}/beta0) was trained from another --rm than {rm}: run " \
                                        f"the sweep again"
    assert sweep_problem(d, sft, None) is None and sweep_problem(d) is None
    torch.save({"stage": "sft", "w": torch.randn(4)}, tmp_path / "sft" / "ckpt.pt")
    assert "trained from another --sft and --rm than " in sweep_problem(d, sft, rm)
    # runs saved before the digests were kept: not compared
    for name in kl_sweep.RUNS:
        torch.save({"step": 3}, tmp_path / "sweep" / name / "train_state.pt")
    assert sweep_problem(d, sft, rm) is None
    assert sweep_problem(str(tmp_path / "nothing"), sft, rm) is None


def test_sweep_section_of_one_run_has_its_row_and_no_comparison(tmp_path):
    """Only the beta0 run logged (the default run not begun): its row, and no sentence comparing it with the other."""
    import random
    from nanorlhf.report import sweep_section
    gold, rm, kl = random_curves(random.Random(5), 15)
    (tmp_path / "beta0").mkdir()
    (tmp_path / "beta0" / "metrics.jsonl").write_text("".join(
        json.dumps({"iter": i + 1, "rm_score": rm[i], "gold": gold[i], "kl": kl[i]}) + "\n" for i in range(15)))
    md = sweep_section(str(tmp_path), None, str(tmp_path))
    o = plain_verdict(gold, rm, kl, list(range(1, 16)))
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 and rows[1].startswith(f"| beta0 | 15 | {o['kl_end']:.3f} | {o['rm_start']:.3f} -> "), md
    assert "With beta = 0" not in md


# -----------------------------------------------------------------------------
# mutation round 6: the default run's beta, the printed commands, the refusals' edges, what the report is made from


def test_without_kl_coef_the_default_run_gets_train_ppo_s_own_beta(tmp_path, monkeypatch, capsys):
    code, _, cmds = sweep(monkeypatch, capsys, "--data", task_prompts(tmp_path), "--out_dir", str(tmp_path))
    assert code == 0 and "--kl_coef" not in cmds[1]
    assert cmds[0][cmds[0].index("--kl_coef") + 1] == "0.0"
    assert utils.parse_flags(train_ppo.Args, cmds[1][2:]).kl_coef == train_ppo.Args.kl_coef > 0


def test_each_printed_command_pasted_into_a_shell_gives_its_words(tmp_path, monkeypatch, capsys):
    import shlex
    d = tmp_path / "it's here"
    d.mkdir()
    cmds = []
    monkeypatch.setattr(kl_sweep.subprocess, "run", lambda cmd, *a, **kw: cmds.append(cmd) or
                        types.SimpleNamespace(returncode=0))
    monkeypatch.setattr(kl_sweep, "sweep_section", lambda *a: "the section")
    monkeypatch.setattr(sys, "argv", ["kl_sweep.py", "--data", task_prompts(d), "--out_dir", str(d)])
    utils.run(kl_sweep.main)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("$ ")]
    assert len(cmds) == 2 and [shlex.split(line[2:]) for line in lines] == cmds
    assert out.splitlines()[-1] == f"wrote {d / 'report.md'}"


def test_unbalanced_quotes_in_ppo_flags_are_one_line(tmp_path, monkeypatch, capsys):
    code, err, cmds = sweep(monkeypatch, capsys, "--ppo_flags=--lr '2e-4", "--out_dir", str(tmp_path / "sweep"))
    assert (code, err) == (2, "error: --ppo_flags \"--lr '2e-4\": No closing quotation\n")
    assert not cmds and not (tmp_path / "sweep").exists()


def test_adaptive_kl_given_a_value_is_refused_too(tmp_path, monkeypatch, capsys):
    code, err, cmds = sweep(monkeypatch, capsys, "--ppo_flags=--adaptive_kl=true", "--data", task_prompts(tmp_path),
                            "--out_dir", str(tmp_path / "sweep"))
    assert code == 2 and err.startswith("error: --ppo_flags: --adaptive_kl cannot apply to the beta0 run"), err
    assert not cmds


@pytest.mark.parametrize("first", [b"## Evaluation of the pipeline\n", b"\xff\xfe\x00binary\n"])
def test_a_report_md_of_another_section_or_not_text_is_refused(tmp_path, monkeypatch, capsys, first):
    # a markdown heading of the same level is not the sweep's; bytes that are not UTF-8 are not its either
    (tmp_path / "report.md").write_bytes(first)
    code, err, cmds = sweep(monkeypatch, capsys, "--train", "false", "--out_dir", str(tmp_path))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {tmp_path}/report.md: not written by kl_sweep.py"), err
    assert (tmp_path / "report.md").read_bytes() == first


def test_the_foreign_runs_are_named_in_sorted_order(tmp_path, monkeypatch, capsys):
    for name in ("c", "a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("{}\n")
    listdir = kl_sweep.os.listdir
    monkeypatch.setattr(kl_sweep.os, "listdir", lambda p: sorted(listdir(p), reverse=True))  # whatever order it gives
    code, err, _ = sweep(monkeypatch, capsys, "--train", "false", "--out_dir", str(tmp_path))
    assert code == 2 and err.startswith(f"error: --out_dir {tmp_path}: holds runs that are not the sweep's (a, b, c; "
                                        "the sweep's are beta0 and default)"), err


def test_the_report_is_made_with_the_figure_when_matplotlib_is_there(tmp_path, monkeypatch, capsys):
    finished_sweep(tmp_path)
    plt = object()
    seen = []
    monkeypatch.setattr(kl_sweep, "pyplot", lambda: plt)
    monkeypatch.setattr(sys, "argv", ["kl_sweep.py", "--train", "false", "--out_dir", str(tmp_path)])
    monkeypatch.setattr(kl_sweep, "sweep_section", lambda *a: seen.append(a) or "the section")
    utils.run(kl_sweep.main)
    assert seen == [(str(tmp_path), plt, str(tmp_path))]


def test_runs_without_the_sweep_s_metrics_are_one_line_and_no_report(tmp_path, monkeypatch, capsys):
    # finished runs whose metrics.jsonl has no rm_score, gold or kl (the real sweep_section, not sweep()'s stand-in)
    finished_sweep(tmp_path)
    monkeypatch.setattr(sys, "argv", ["kl_sweep.py", "--train", "false", "--out_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as info:
        utils.run(kl_sweep.main)
    assert (info.value.code, capsys.readouterr().err) == (
        2, f"error: {tmp_path}: no PPO runs with rm_score, gold and kl in their metrics.jsonl\n")
    assert not (tmp_path / "report.md").exists()
