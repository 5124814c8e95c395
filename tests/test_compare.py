"""compare.py: the matched budget, the table over seeds, and a missing pipeline reported in one line."""

import json
import sys

import pytest

from scripts import ROOT, script

sys.path.insert(0, ROOT)  # compare.py is a top-level script

import compare


def test_matched_budget_gives_dpo_as_many_backward_sequences_as_ppo():
    ppo = {"num_iterations": 50, "batch_size": 64, "ppo_epochs": 4, "num_minibatches": 4}
    online, dpo_steps = compare.matched_budget(ppo, 4, 16)
    assert online == {"num_iterations": 50, "batch_size": 64, "num_epochs": 4, "num_minibatches": 4}
    assert dpo_steps == 200 and dpo_steps * 16 * 4 == 50 * 64 * 4
    for iters, bs, epochs, k, dpo_bs in ((20, 64, 4, 4, 16), (7, 32, 2, 3, 8), (1, 8, 1, 2, 64)):
        p = {"num_iterations": iters, "batch_size": bs, "ppo_epochs": epochs, "num_minibatches": 2}
        _, steps = compare.matched_budget(p, k, dpo_bs)
        assert steps == max(1, round(iters * bs * epochs / (dpo_bs * k)))


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


def test_missing_pipeline_exits_2(tmp_path):
    p = script("compare.py", "--out", str(tmp_path / "nope"), check=False)
    assert p.returncode == 2 and "run `make` first" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "nope").exists()
