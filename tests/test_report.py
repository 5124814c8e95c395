"""
nanorlhf/report.py on its own: where a run's metrics are, the verdict's boundaries, fmt, sweep_problem's refusals and
the sweep's picture (matplotlib stood in for: it may be absent). The rest of it is tested through evaluate.py
(test_evaluate.py) and kl_sweep.py (test_kl_sweep.py).
"""

import json
import os
import random
from unittest import mock

import pytest
import torch

from nanorlhf import report, utils
from nanorlhf.report import fmt, metrics_path, overoptimisation, sweep_problem, sweep_section
from nanorlhf.train_common import input_digests


def test_metrics_path_of_a_directory_a_checkpoint_or_a_metrics_file(tmp_path):
    run = tmp_path / "rm"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"x")
    (run / "other.jsonl").write_text("{}\n")
    assert metrics_path(str(run)) == os.path.join(str(run), "metrics.jsonl")
    assert metrics_path(str(run / "ckpt.pt")) == os.path.join(str(run), "metrics.jsonl")  # the file beside it
    assert metrics_path(str(run / "other.jsonl")) == str(run / "other.jsonl")  # a .jsonl file is itself
    assert metrics_path(str(run / "absent.pt")) == str(run / "absent.pt")


def test_fmt():
    assert fmt(None) == "-"
    assert fmt(0.12345) == "0.123" and fmt(2.0, 1) == "2.0"
    assert fmt(40) == "40"  # an int (an iteration) is not given decimals


def test_overoptimisation_boundaries_of_tol_and_of_the_rm_score():
    """
    shows = gold fell from its peak by MORE than tol, and the RM score at the end is AT LEAST the one at the peak.
    Under 20 iterations nothing is smoothed (window 1), and the numbers are exact in binary: 1.0 - 0.25 == 0.75.
    """
    def verdict(gold, rm, tol):
        n = len(gold)
        return overoptimisation({"iter": list(range(1, n + 1)), "gold score": gold, "rm score": rm, "KL": [0.0] * n},
                                tol=tol)["shows"]

    assert not verdict([0.5, 1.0, 0.75], [0.0, 1.0, 2.0], tol=0.25)  # fell by exactly tol: not more
    assert verdict([0.5, 1.0, 0.5], [0.0, 1.0, 2.0], tol=0.25)  # fell by 0.5 > tol
    assert verdict([0.5, 1.0, 0.5], [0.0, 1.0, 1.0], tol=0.25)  # the RM score flat from the peak: at least
    assert not verdict([0.5, 1.0, 0.5], [0.0, 1.0, 0.5], tol=0.25)  # the RM score fell too


def finished_run(root, name, step=3, planned=3, inputs=None, ckpt=True):
    """root/name as train_ppo.py leaves it for sweep_problem: metrics.jsonl, ckpt.pt and train_state.pt."""
    (root / name).mkdir(parents=True)
    (root / name / "metrics.jsonl").write_text("{}\n")
    if ckpt:
        torch.save({"step": step, "args": {"num_iterations": planned}}, root / name / utils.CKPT)
    torch.save({"step": step, "inputs": inputs or {}}, root / name / utils.TRAIN_STATE)


def test_sweep_problem_names_a_run_without_its_checkpoint(tmp_path):
    d = tmp_path / "sweep"
    finished_run(d, "beta0")
    finished_run(d, "default", ckpt=False)  # killed before its first save
    assert sweep_problem(str(d)) == f"the default run ({d}/default) has no ckpt.pt"


def test_sweep_problem_compares_the_sft_model_alone_without_an_rm(tmp_path):
    """evaluate.py without --rm: a run trained from another SFT model is still named (its --rm is not compared)."""
    for name in ("sft", "rm"):
        (tmp_path / name).mkdir()
        torch.save({"stage": name, "w": torch.randn(4)}, tmp_path / name / "ckpt.pt")
    sft, rm = str(tmp_path / "sft"), str(tmp_path / "rm")
    d = tmp_path / "sweep"
    for name in ("beta0", "default"):
        finished_run(d, name, inputs=input_digests({"--sft": sft, "--rm": rm}))
    assert sweep_problem(str(d), sft, None) is None
    torch.save({"stage": "sft", "w": torch.randn(4)}, tmp_path / "sft" / "ckpt.pt")  # retrained
    assert sweep_problem(str(d), sft, None) == (f"the beta0 run ({d}/beta0) was trained from another --sft than {sft}: "
                                                "run the sweep again")


def plain_smooth(xs, w):
    """The trailing moving average written out: the mean of the last w values (fewer at the start), in float64."""
    out = []
    for i in range(len(xs)):
        window = [float(x) for x in xs[max(0, i - w + 1):i + 1]]
        out.append(sum(window) / len(window))
    return out


def test_sweep_section_draws_gold_and_rm_against_kl_and_links_the_picture(tmp_path, monkeypatch):
    """
    The picture's calls, against the plain smoothing over a tenth of each run: the left axes gold score against KL,
    the right RM score against KL, one line per run; sweep.png saved in the sweep directory and linked relative to the
    report's.
    """
    rng = random.Random(0)
    sweep_dir, report_dir = tmp_path / "out" / "sweep", tmp_path / "out"
    runs = {}
    for name, n in (("beta0", 37), ("default", 23)):
        rows = [{"iter": i + 1, "rm_score": rng.random(), "gold": rng.random(), "kl": rng.random()} for i in range(n)]
        (sweep_dir / name).mkdir(parents=True)
        (sweep_dir / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs[name] = rows
    plt = mock.MagicMock()
    axes = [mock.MagicMock(), mock.MagicMock()]
    plt.subplots.return_value = (mock.MagicMock(), axes)
    saved = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: saved.append(path))
    md = sweep_section(str(sweep_dir), plt, str(report_dir))
    assert saved == [str(sweep_dir / "sweep.png")]
    assert "![gold and RM score against KL](sweep/sweep.png)" in md
    for ax, key in zip(axes, ("gold", "rm_score")):
        calls = [(c.args, c.kwargs["label"]) for c in ax.plot.call_args_list]
        want = []
        for name, rows in runs.items():
            w = len(rows) // 10  # 3 and 2
            want.append(((plain_smooth([r["kl"] for r in rows], w), plain_smooth([r[key] for r in rows], w)), name))
        assert len(calls) == len(want)
        for (args, label), (want_args, want_label) in zip(calls, want):
            assert label == want_label
            assert [list(a) for a in args] == [pytest.approx(b, abs=1e-12) for b in want_args], key
