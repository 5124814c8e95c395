"""
evaluate.py (with nanorlhf/report.py), bench.py and bench_generate.py: the measurements against plain
references, the report's shape, and the scripts end to end on tiny random models (subprocess).
"""

import copy
import json
import math
import os
import random
import statistics
from types import SimpleNamespace

import pytest
import torch

from scripts import script, track_checkpoint_dicts

import evaluate
from nanorlhf import tasks
from nanorlhf.model import GPT, GPTConfig, ScalarGPT
from nanorlhf.report import overoptimisation, pyplot, sweep_section
from nanorlhf.tokenizer import Tokenizer
from nanorlhf.utils import UserError, auto_dtype, model_payload, save_checkpoint, setup_runtime

TINY = dict(block_size=64, n_layer=2, n_head=2, n_embd=32)


def tiny_gpt(seed, eos_boost=0.0):
    """A random tiny byte-level GPT; eos_boost scales the (tied) EOS embedding so EOS gets sampled often."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**TINY))
    if eos_boost:
        with torch.no_grad():
            model.transformer.wte.weight[Tokenizer.byte_level().eos_id] *= eos_boost
    return model.eval()


# -----------------------------------------------------------------------------
# the measurements


def test_win_rate_ties_count_half():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(1, 30)
        a = [rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(n)]  # few values: many ties
        b = [rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(n)]
        wins = ties = 0
        for x, y in zip(a, b):
            wins += x > y
            ties += x == y
        assert evaluate.win_rate(a, b) == pytest.approx((wins + 0.5 * ties) / n, abs=1e-12)
        assert evaluate.win_rate(a, b) + evaluate.win_rate(b, a) == pytest.approx(1.0)
    assert evaluate.win_rate([1.0, 0.5, 0.0], [0.5, 0.5, 0.5]) == 0.5
    assert evaluate.win_rate([0.3, 0.3], [0.3, 0.3]) == 0.5
    for a, b in (([1.0, 0.0], [0.5]), ([0.5], [1.0, 0.0]), ([], [])):  # response i against response i: pairs only
        with pytest.raises(AssertionError):
            evaluate.win_rate(a, b)


def test_summarize_matches_plain_formulas():
    rng = random.Random(0)
    for n in (1, 2, 3, 17):
        rows = {"gold": [rng.choice([0.0, 0.25, 0.5, 0.8, 1.0]) for _ in range(n)],
                "rm": [rng.gauss(0, 1) for _ in range(n)], "kl": [rng.gauss(2, 1) for _ in range(n)],
                "length": [rng.randint(1, 30) for _ in range(n)], "eos": [rng.random() < 0.7 for _ in range(n)]}
        sft = {"gold": [rng.choice([0.0, 0.5, 1.0]) for _ in range(n)]}
        out = evaluate.summarize(rows, sft)
        wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rows["gold"], sft["gold"]))
        expected = {"gold": statistics.fmean(rows["gold"]), "rm": statistics.fmean(rows["rm"]),
                    "kl": statistics.fmean(rows["kl"]), "length": statistics.fmean(rows["length"]),
                    "eos": sum(1 for e in rows["eos"] if e) / n, "win_rate_vs_sft": wins / n}
        for key, value in expected.items():
            assert out[key] == pytest.approx(value, abs=1e-12), (n, key)
        assert out["n"] == n
        # the standard error of the mean: the sample standard deviation (n - 1) / sqrt(n); none for one response
        if n == 1:
            assert out["gold_sem"] is None
        else:
            assert out["gold_sem"] == pytest.approx(statistics.stdev(rows["gold"]) / math.sqrt(n), abs=1e-12), n
    # without gold (a task of one's own) the gold numbers are None, the rest still means
    rows = {"gold": [None] * 3, "rm": [None] * 3, "kl": [1.0, 2.0, 4.0], "length": [3, 4, 5],
            "eos": [True, False, True]}
    out = evaluate.summarize(rows, {"gold": [None] * 3})
    assert out["gold"] is out["gold_sem"] is out["rm"] is out["win_rate_vs_sft"] is None
    assert out["kl"] == pytest.approx(7 / 3) and out["length"] == 4 and out["eos"] == pytest.approx(2 / 3)


def reference_kl(policy, ref, prompt_ids, response_ids, temperature):
    """KL estimate of one response in float64, token by token, on the unpadded sequence."""
    policy, ref = policy.double(), ref.double()
    seq = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        lp = torch.log_softmax(policy(seq)[0].double() / temperature, dim=-1)  # (T, V)
        lr = torch.log_softmax(ref(seq)[0].double() / temperature, dim=-1)
    total = 0.0
    for t in range(len(prompt_ids), len(prompt_ids) + len(response_ids)):
        y = seq[0, t].item()
        total += lp[t - 1, y].item() - lr[t - 1, y].item()  # position t - 1 predicts token t
    return total


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kl_matches_float64_loop(temperature):
    tok = Tokenizer.byte_level()
    policy, ref = tiny_gpt(1, eos_boost=8.0), tiny_gpt(2, eos_boost=8.0)
    prompts = ["sort 3 1 2", "sort 9 8 7 6 5 4", "hi", "sort 1 1"]
    prompt_ids = [tok.render_prompt(p) for p in prompts]
    cfg = SimpleNamespace(samples_per_prompt=2, temperature=temperature, batch_size=5, seed=6, max_new_tokens=12)
    rt = setup_runtime("cpu", "float32", 0)
    rows = evaluate.evaluate_policy(policy, ref, None, tok, prompts, prompt_ids, cfg, rt)
    assert len(rows["kl"]) == len(prompts) * 2
    assert any(rows["eos"]) and any(n < cfg.max_new_tokens for n in rows["length"])  # masking is exercised
    for i, (kl, ids) in enumerate(zip(rows["kl"], rows["response_ids"])):
        assert len(ids) == rows["length"][i] and (tok.eos_id in ids) == rows["eos"][i]
        want = reference_kl(policy, ref, prompt_ids[i // 2], ids, temperature)
        assert kl == pytest.approx(want, abs=1e-4), (i, kl, want)
    # the reference against a copy of itself (not the same object, so both forward passes run): exactly zero
    ref = ref.float()
    rows_sft = evaluate.evaluate_policy(ref, copy.deepcopy(ref), None, tok, prompts, prompt_ids, cfg, rt)
    assert all(kl == 0.0 for kl in rows_sft["kl"])


def test_the_sampling_seed_decides_the_draws_and_nothing_else_does():
    """
    --seed is the evaluation's only source of randomness: the same seed gives the same responses whatever the global
    generators hold, and another seed other responses.
    """
    tok = Tokenizer.byte_level()
    policy = tiny_gpt(3, eos_boost=2.0)
    prompts = ["sort 3 1 2", "sort 9 8 7 6 5 4", "hi"]
    prompt_ids = [tok.render_prompt(p) for p in prompts]
    rt = setup_runtime("cpu", "float32", 0)
    got = {}
    for seed, global_seed in ((6, 0), (6, 123), (7, 0)):
        torch.manual_seed(global_seed)
        random.seed(global_seed)
        cfg = SimpleNamespace(samples_per_prompt=2, temperature=1.0, batch_size=4, seed=seed, max_new_tokens=10)
        rows = evaluate.evaluate_policy(policy, policy, None, tok, prompts, prompt_ids, cfg, rt)
        got[seed, global_seed] = rows["response_ids"]
    assert got[6, 0] == got[6, 123]
    assert got[6, 0] != got[7, 0]


def test_common_random_numbers_hold_in_every_batch():
    # A prompt's response must draw the same random numbers whatever came before it. Here the same prompts follow
    # two different first batches (one prompt each), whose responses end after different numbers of steps; with
    # one stream through all batches, the later batches' draws would depend on that number.
    tok = Tokenizer.byte_level()
    policy = tiny_gpt(4, eos_boost=20.0)
    cfg = SimpleNamespace(samples_per_prompt=1, temperature=1.0, batch_size=1, seed=5, max_new_tokens=16)
    rt = setup_runtime("cpu", "float32", 0)
    tail = ["sort 2 7 1", "sort 9 9 4 0", "hi", "sort 1 1"]
    runs = []
    for head in ("sort 1", "sort 5 6"):
        prompts = [head] + tail
        runs.append(evaluate.evaluate_policy(policy, policy, None, tok, prompts,
                                             [tok.render_prompt(p) for p in prompts], cfg, rt, use_gold=False))
    assert runs[0]["length"][0] != runs[1]["length"][0]  # the first batches took different numbers of steps
    assert runs[0]["response_ids"][1:] == runs[1]["response_ids"][1:]


def test_overoptimisation_verdict():
    n = 40
    iters = list(range(1, n + 1))
    rising = [i / n for i in range(n)]
    hump = [0.5 + 0.4 * (i / 20 if i < 20 else (40 - i) / 20) for i in range(n)]
    c = {"iter": iters, "rm score": rising, "gold score": hump, "KL": rising}
    assert overoptimisation(c)["shows"]
    c = {"iter": iters, "rm score": rising, "gold score": rising, "KL": rising}
    assert not overoptimisation(c)["shows"]


def test_sweep_section_says_whether_it_shows(tmp_path):
    n = 40
    for name, gold in (("beta0", lambda i: 0.5 + 0.4 * (i / 20 if i < 20 else (40 - i) / 20)),
                       ("default", lambda i: 0.5 + 0.2 * i / n)):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"iter": i + 1, "rm_score": i / n, "gold": gold(i), "kl": i / 4}) + "\n")
    md = sweep_section(str(tmp_path), None, str(tmp_path))
    assert "**Over-optimisation shows at this size** (beta0)" in md
    assert "| beta0 | 40 |" in md and "| default | 40 |" in md
    assert sweep_section(str(tmp_path / "nothing"), None, str(tmp_path)) is None


def test_stage_seconds_sums_the_sessions_of_a_resumed_run(tmp_path):
    # train_sft.py --stop_at 20, then --resume to 40: the second process logs "time" from its own start
    rows = [{"step": 0, "val_loss": 5.5}, {"step": 10, "loss": 3.0, "time": 4.55},
            {"step": 20, "loss": 2.0, "time": 6.41, "val_loss": 2.1}, {"step": 30, "loss": 1.5, "time": 0.51},
            {"step": 40, "loss": 1.2, "time": 0.76, "val_loss": 1.3}]
    third = [{"step": 50, "loss": 1.1, "time": 0.3}, {"step": 60, "loss": 1.0, "time": 0.6}]  # resumed once more
    runs = {"resumed": rows, "twice": rows + third, "one_session": rows[:3],
            "ppo": [{"iter": 1, "t_rollout": 1.5, "t_update": 2.0}, {"iter": 2, "t_rollout": 1.25, "t_update": 2.5}],
            "untimed": rows[:1]}
    for name, run_rows in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run_rows))
    seconds = {name: evaluate.stage_seconds(str(tmp_path / name)) for name in runs}
    assert seconds == pytest.approx({"resumed": 6.41 + 0.76, "twice": 6.41 + 0.76 + 0.6, "one_session": 6.41,
                                     "ppo": 7.25, "untimed": None})


def test_report_json_has_exactly_the_keys():
    s = {"gold": 0.5, "gold_sem": 0.1, "rm": 0.1, "kl": 1.0, "win_rate_vs_sft": 0.6, "length": 9.0, "eos": 1.0, "n": 8}
    report = evaluate.report_json({"sft": s, "ppo": s, "init": s}, {"accuracy": 0.7, "annotator_agreement": 0.8},
                                  0, "cpu", "bfloat16", 12.0, 0.7)
    assert set(report) == {"sft", "ppo", "rm", "seed", "device", "dtype", "wall_s", "temperature"}
    assert (report["device"], report["dtype"]) == ("cpu", "bfloat16")
    assert report["temperature"] == 0.7
    assert set(report["sft"]) == set(report["ppo"]) == {"gold", "rm", "kl", "win_rate_vs_sft", "length"}
    assert set(report["rm"]) == {"accuracy", "annotator_agreement"}


# -----------------------------------------------------------------------------
# end to end


def test_evaluate_end_to_end(tmp_path):
    data = tmp_path / "data"
    tasks.generate_task(str(data), seed=0, n_sft=4, n_prefs=4, n_prefs_eval=4, n_prompts=4, n_eval=6)
    tok = Tokenizer.byte_level()
    save_checkpoint(str(tmp_path / "sft"), model_payload(tiny_gpt(1), tok, "sft", {"seed": 3}, 10))
    save_checkpoint(str(tmp_path / "ppo"), model_payload(tiny_gpt(2), tok, "ppo", {"response_length": 10}, 5))
    rm = ScalarGPT(GPTConfig(**TINY))
    with torch.no_grad():  # a constant reward r = 0.7, so the normalised score is (0.7 - 0.2) / 2 exactly
        rm.head.weight.zero_()
        rm.head.bias.fill_(0.7)
    save_checkpoint(str(tmp_path / "rm"), model_payload(rm, tok, "rm", {}, 5, reward_mean=0.2, reward_std=2.0))
    # what the stages log, as far as evaluate.py reads it
    calibration = [[0.55, 0.52, 40], [0.65, 0.70, 30], [0.75, 0.71, 20], [0.86, 0.9, 9], [0.95, 1.0, 1]]
    metrics = {"sft": [{"step": 0, "val_loss": 5.5}, {"step": 5, "loss": 2.0, "time": 5.0},
                       {"step": 10, "loss": 1.0, "val_loss": 1.2, "time": 10.0}],
               "rm": [{"step": 0, "val_acc": 0.5, "val_calibration": [[0.5, 0.5, 100]], "val_ece": 0.0},
                      {"step": 5, "acc": 0.65, "val_acc": 0.6, "time": 4.0},
                      {"step": 5, "final": True, "val_acc": 0.7, "annotator_agreement": 0.8, "val_gold_acc": 0.75,
                       "val_calibration": calibration, "val_ece": 0.04}],
               "ppo": [{"iter": it, "rm_score": 0.1 * it, "gold": 0.5, "kl": 0.2 * it, "t_rollout": 1.0,
                        "t_update": 2.0} for it in range(1, 6)]}
    for stage, rows in metrics.items():
        with open(tmp_path / stage / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    out = tmp_path / "out"
    stdout = script("evaluate.py", "--data", str(data / "eval.jsonl"), "--sft", str(tmp_path / "sft"),
                    "--rm", str(tmp_path / "rm"), "--ppo", str(tmp_path / "ppo"), "--out_dir", str(out),
                    "--n_prompts", "5", "--batch_size", "2", "--temperature", "0.9").stdout
    assert "init" in stdout and "ppo" in stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"sft", "ppo", "rm", "seed", "device", "dtype", "wall_s", "temperature"}
    assert report["temperature"] == 0.9  # compare.py states it in its report
    assert set(report["ppo"]) == {"gold", "rm", "kl", "win_rate_vs_sft", "length"}
    assert report["sft"]["kl"] == 0.0 and report["sft"]["win_rate_vs_sft"] == 0.5
    assert report["seed"] == 3 and report["device"] == "cpu" and report["dtype"] == auto_dtype("cpu")  # --dtype auto
    assert f"cpu {report['dtype']})" in stdout.splitlines()[0]  # the run line says the dtype it samples in too
    assert f"device cpu, {report['dtype']}." in (out / "report.md").read_text()
    assert report["ppo"]["length"] <= 10  # the PPO run's response_length is the default limit
    assert report["ppo"]["rm"] == pytest.approx(0.25) and report["sft"]["rm"] == pytest.approx(0.25)
    assert 29.0 <= report["wall_s"] < 29.0 + 60  # sft 10 + rm 4 + ppo 5 x (1 + 2) + this evaluation
    assert report["rm"] == {"accuracy": 0.7, "annotator_agreement": 0.8}
    md = (out / "report.md").read_text()
    for heading in ("## SFT vs PPO", "## SFT\n", "## Reward model", "## PPO learning curves",
                    "## Responses side by side"):
        assert heading in md
    assert "| init |" in md
    assert "Held-out loss 5.500 at step 0 -> 1.200 at step 10; training loss 1.000" in md
    assert "calibration error over 5 bins of the held-out pairs" in md and "0.040" in md
    assert "0.55 -> 0.52 (40), 0.65 -> 0.70 (30), 0.75 -> 0.71 (20), 0.86 -> 0.90 (9), 0.95 -> 1.00 (1)." in md
    # the pictures: all four beside report.md and linked, or none and one line saying so
    pictures = ("gold_vs_kl.png", "sft_loss.png", "rm.png", "curves.png")
    if pyplot() is None:
        assert md.count("matplotlib is not installed") == 1 and "pip install matplotlib" in md
        assert stdout.count("pictures skipped") == 1
        assert not any((out / p).exists() for p in pictures) and "![" not in md
    else:
        for p in pictures:
            assert f"]({p})" in md and (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
        assert "pictures skipped" not in stdout and "not installed" not in md


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-1"], "--temperature -1.0: must be 0 (greedy) or more"),
    (["--max_new_tokens", "0"], "--max_new_tokens 0: must be at least 1"),
    (["--max_new_tokens", "-40"], "--max_new_tokens -40: must be at least 1"),
    (["--temperature", "0", "--samples_per_prompt", "4"], "--samples_per_prompt 4 with --temperature 0: greedy "
                                                          "decoding gives each prompt one response"),
    (["--sft", "{d}/run/train_state.pt"], "--sft {d}/run/train_state.pt: not a nanorlhf model checkpoint"),
    (["--samples_per_prompt", "0"], "--samples_per_prompt, --batch_size and --n_prompts must be at least 1"),
    (["--batch_size", "0"], "--samples_per_prompt, --batch_size and --n_prompts must be at least 1"),
    (["--n_prompts", "0"], "--samples_per_prompt, --batch_size and --n_prompts must be at least 1"),
    (["--n_show", "-1"], "--n_show -1: must be 0 or more"),
])
def test_bad_flags_and_checkpoints_are_one_line_before_anything_loads(tmp_path, argv, message):
    # a negative temperature sampled the least likely tokens; --max_new_tokens 0 wrote a report of empty responses;
    # greedy decoding k times per prompt counted k copies of one response as k draws (a standard error /sqrt(k)).
    # All are refused before any checkpoint is read: --sft here names a directory that does not exist
    save_checkpoint(str(tmp_path / "run"), {"optimizer": {}, "step": 3}, "train_state.pt")
    argv = [a.format(d=tmp_path) for a in argv]
    with pytest.raises(UserError) as info:
        evaluate.main(["--sft", str(tmp_path / "missing"), "--data", str(tmp_path / "missing.jsonl"), *argv])
    assert str(info.value).startswith(message.format(d=tmp_path)), str(info.value)


def test_flags_at_their_limits_pass(tmp_path):
    """The least of each flag that check_flags takes: greedy (one sample), one token, one of each, no responses."""
    for flags in ({"temperature": 0.0}, {"max_new_tokens": 1}, {"n_show": 0},
                  {"samples_per_prompt": 1, "batch_size": 1, "n_prompts": 1}):
        evaluate.check_flags(evaluate.Config(out_dir=str(tmp_path), **flags))


def exit_status_and_error(capsys, main, argv):
    """Run main(argv) as the script does (utils.run): its exit status and what it printed to stderr."""
    with pytest.raises(SystemExit) as info:
        evaluate.run(lambda: main(argv))
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("out_dir, message", [
    ("{d}/run/train_state.pt", "error: --out_dir {d}/run/train_state.pt: it is not a directory\n"),
    ("{d}/run/train_state.pt/eval", "error: --out_dir {d}/run/train_state.pt/eval: {d}/run/train_state.pt is not "
                                    "a directory\n"),
    ("{d}/read_only/eval", "error: --out_dir {d}/read_only/eval: {d}/read_only is not writable\n"),
])
def test_an_out_dir_that_cannot_be_written_is_one_line_before_sampling(tmp_path, monkeypatch, capsys, out_dir,
                                                                       message):
    # a regular file or a read-only directory as --out_dir was a FileExistsError, NotADirectoryError or
    # PermissionError from os.makedirs, after every policy had been sampled; now it is said before any checkpoint
    # is read (--sft names a directory that does not exist, so reading one would be a different error)
    save_checkpoint(str(tmp_path / "run"), {"optimizer": {}, "step": 3}, "train_state.pt")
    before = (tmp_path / "run" / "train_state.pt").read_bytes()
    (tmp_path / "read_only").mkdir(mode=0o555)
    real_access = os.access
    # root may write a 0o555 directory: there, the OS is told to say what it says to anyone else
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path).endswith("read_only")
                        else real_access(path, mode))
    out_dir, message = out_dir.format(d=tmp_path), message.format(d=tmp_path)
    argv = ["--sft", str(tmp_path / "missing"), "--out_dir", out_dir]
    code, err = exit_status_and_error(capsys, evaluate.main, argv)
    assert (code, err) == (2, message)
    assert (tmp_path / "run" / "train_state.pt").read_bytes() == before
    assert os.listdir(tmp_path / "read_only") == []


def test_an_out_dir_is_not_created_before_the_inputs_are_read(tmp_path, capsys):
    """--out_dir is checked, not made, up front: a missing checkpoint then leaves no empty directory behind."""
    code, err = exit_status_and_error(capsys, evaluate.main, ["--sft", str(tmp_path / "missing"),
                                                              "--out_dir", str(tmp_path / "new" / "eval")])
    assert code == 2 and err.startswith(f"error: --sft {tmp_path}/missing") and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


def test_checkpoint_file_paths_read_the_metrics_of_their_run(tmp_path):
    """
    --sft, --rm, --ppo and --extra take a ckpt.pt file as well as its directory (the loader does): the report then
    reads the metrics.jsonl beside the file. It opened the checkpoint itself as text (UnicodeDecodeError) after
    every policy had been sampled.
    """
    data = tmp_path / "data"
    tasks.generate_task(str(data), seed=0, n_sft=2, n_prefs=2, n_prefs_eval=2, n_prompts=2, n_eval=3)
    tok = Tokenizer.byte_level()
    save_checkpoint(str(tmp_path / "sft"), model_payload(tiny_gpt(1), tok, "sft", {"seed": 3}, 10))
    save_checkpoint(str(tmp_path / "ppo"), model_payload(tiny_gpt(2), tok, "ppo", {"response_length": 4}, 5))
    save_checkpoint(str(tmp_path / "rm"), model_payload(ScalarGPT(GPTConfig(**TINY)), tok, "rm", {}, 5))
    metrics = {"sft": [{"step": 0, "val_loss": 5.5}, {"step": 10, "loss": 1.0, "val_loss": 1.2, "time": 10.0}],
               "rm": [{"step": 5, "final": True, "val_acc": 0.7, "val_gold_acc": 0.75, "time": 4.0}],
               "ppo": [{"iter": it, "rm_score": 0.1, "gold": 0.5, "kl": 0.2, "t_rollout": 1.0, "t_update": 2.0}
                       for it in range(1, 3)]}
    for stage, rows in metrics.items():
        (tmp_path / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = {stage: str(tmp_path / stage / "ckpt.pt") for stage in metrics}
    out = tmp_path / "out"
    evaluate.main(["--data", str(data / "eval.jsonl"), "--sft", ckpt["sft"], "--rm", ckpt["rm"], "--ppo", ckpt["ppo"],
                   "--extra", f"again={ckpt['ppo']}", "--init_row", "false", "--n_prompts", "2",
                   "--out_dir", str(out), "--device", "cpu", "--dtype", "float32"])
    report = json.loads((out / "report.json").read_text())
    assert report["rm"]["accuracy"] == 0.7
    assert 10.0 + 4.0 + 2 * 3.0 <= report["wall_s"] < 10.0 + 4.0 + 2 * 3.0 + 60
    policies = json.loads((out / "policies.json").read_text())
    assert {name: p["wall_s"] for name, p in policies.items()} == {"sft": 10.0, "ppo": 6.0, "again": 6.0}
    md = (out / "report.md").read_text()
    assert "Held-out loss 5.500 at step 0 -> 1.200 at step 10" in md
    assert f"From `{tmp_path}/ppo/metrics.jsonl`" in md


def test_bench_runs_and_prints_its_table():
    stdout = script("bench.py", "--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--block_size", "32",
                    "--batch_size", "2", "--steps", "1", "--prompt_len", "4", "--new_tokens", "4",
                    "--ppo_batch_size", "4", "--response_length", "4", "--ppo_iters", "1", "--rm_batch_size", "2",
                    "--rounds", "1", "--parts", "train,generate,nocache,ppo,rm", "--device", "cpu").stdout
    for row in ("SFT train tokens/s", "SFT MFU", "generate tokens/s, KV cache", "generate tokens/s, no cache",
                "PPO s/iteration", "RM step, each prompt once", "peak memory"):
        assert row in stdout, stdout


def test_bench_rm_runs_the_same_tokens_both_ways(one_thread):
    """bench.py's rm part: the packed rows hold each prompt once, B (P + K R) tokens against B K (P + R)."""
    import bench
    cfg = bench.Config(n_layer=1, n_embd=16, n_head=2, block_size=64, prompt_len=7, response_length=3, steps=1,
                       rounds=2, rm_batch_size=3, rm_responses=4, device="cpu", dtype="float32")
    model_cfg = bench.GPTConfig(block_size=64, vocab_size=cfg.vocab_size, n_layer=1, n_head=2, n_embd=16)
    res = bench.bench_rm(cfg, model_cfg, bench.setup_runtime("cpu", "float32", 0, training=True))
    assert res["rm_tokens"] == {"row per response": 3 * 4 * (7 + 3), "prompt once": 3 * (7 + 4 * 3)}
    assert all(len(t) == 2 and min(t) > 0 for t in res["rm_s_per_step"].values()) and res["rm_speedup"] > 0


def test_bench_generate_runs_and_prints_the_median_ratio():
    stdout = script("bench_generate.py", "--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--batch_size", "2",
                    "--prompt_len", "4", "--new_tokens", "4", "--left_pad", "2", "--rounds", "3",
                    "--repeats", "1", "--device", "cpu").stdout
    rounds = [line for line in stdout.splitlines() if line.startswith("round ")]
    ratios = sorted(float(line.split("speed-up ")[1].split("x")[0]) for line in rounds)
    assert len(rounds) == 3, stdout
    assert f"speed-up: {ratios[1]:.1f}x (median of 3 rounds" in stdout, stdout


def test_series_picks_the_rows_that_logged_the_key():
    rng = random.Random(0)
    rows = []
    for step in range(0, 200, 10):
        row = {"step": step}
        if rng.random() < 0.6:
            row["loss"] = rng.random()
        if rng.random() < 0.3:
            row["val_loss"] = None if rng.random() < 0.2 else rng.random()
        rows.append(row)
    for key in ("loss", "val_loss"):
        xs, ys = [], []
        for row in rows:
            if key in row and row[key] is not None:
                xs.append(row["step"])
                ys.append(row[key])
        assert evaluate.series(rows, key) == (xs, ys)
    assert evaluate.series([{"iter": 1, "kl": 0.5}], "kl", x="iter") == ([1], [0.5])


@pytest.mark.parametrize("with_plots", [False, True])
def test_report_pictures_with_and_without_matplotlib(tmp_path, with_plots):
    """The same report either way; with matplotlib (where installed) the four pictures are drawn and linked."""
    plt = pyplot() if with_plots else None
    if with_plots and plt is None:
        pytest.skip("matplotlib is not installed")
    for stage, rows in {"sft": [{"step": 0, "val_loss": 3.0}, {"step": 10, "loss": 1.5, "val_loss": 1.6}],
                        "rm": [{"step": 10, "acc": 0.7, "val_acc": 0.6, "val_ece": 0.1,
                                "val_calibration": [[0.6, 0.55, 10], [0.8, 0.7, 5]]}],
                        "ppo": [{"iter": i, "rm_score": 0.1 * i, "gold": 0.5 + 0.01 * i, "kl": 0.1 * i}
                                for i in range(1, 30)]}.items():
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = {"gold": 0.5, "gold_sem": 0.02, "rm": 0.1, "kl": 1.0, "win_rate_vs_sft": 0.6, "length": 9.0, "eos": 1.0, "n": 8}
    summaries = {"sft": {**s, "kl": 0.0}, "ppo": s, "init": {**s, "kl": 300.0, "gold": 0.0}}
    rows = {name: {"prompt": ["sort 1 2"], "response": ["1 2"], "gold": [1.0]} for name in summaries}
    cfg = SimpleNamespace(data="eval.jsonl", samples_per_prompt=1, temperature=1.0, max_new_tokens=10, seed=0,
                          sft=str(tmp_path / "sft"), rm=str(tmp_path / "rm"), ppo=str(tmp_path / "ppo"),
                          out_dir=str(tmp_path / "out"), n_show=1)
    os.makedirs(cfg.out_dir)
    rm_info = {"accuracy": 0.6, "annotator_agreement": 0.8, "gold_accuracy": 0.7, "reward_mean": 0.0, "reward_std": 1.0}
    report = {"wall_s": 1.0, "device": "cpu", "dtype": "float32", "seed": 0}
    md = evaluate.report_markdown(cfg, 1, summaries, rows, rm_info, None, {"eval": 1.0}, report, plt)
    drawn = sorted(os.listdir(cfg.out_dir))
    assert "\n\n\n" not in md  # one blank line between blocks, whichever sections are there
    if plt is None:
        assert drawn == [] and "![" not in md and md.count("Pictures skipped") == 1
    else:
        assert drawn == ["curves.png", "gold_vs_kl.png", "rm.png", "sft_loss.png"]
        assert [line for line in md.splitlines() if line.startswith("![")] == [
            "![gold against KL](gold_vs_kl.png)", "![SFT loss](sft_loss.png)",
            "![reward model accuracy and calibration](rm.png)", "![PPO learning curves](curves.png)"]


def test_bench_gen_batch_size_sets_every_generate_part(monkeypatch, capsys):
    """--gen_batch_size is the number of prompts of every generate() call that bench.py times, not only in --parts hf."""
    import bench

    seen, real = [], bench.GPT.generate

    def spy(self, idx, *args, **kwargs):
        seen.append(idx.size(0))
        return real(self, idx, *args, **kwargs)

    monkeypatch.setattr(bench.GPT, "generate", spy)
    bench.main(["--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--block_size", "32", "--batch_size", "2",
                "--gen_batch_size", "3", "--prompt_len", "4", "--new_tokens", "4", "--parts", "generate,nocache",
                "--device", "cpu"])
    assert seen == [3] * 4  # a warm-up and a timed call per part
    assert "batch 3, prompt 4, 4 new tokens" in capsys.readouterr().out


@pytest.mark.parametrize("n_rows", [2, 5, 12])
def test_curves_table_keeps_the_first_and_last_iteration_evenly_spaced(n_rows):
    """
    A run shorter than n_rows lost its end: 2 or 3 iterations showed row 1 only, 5 rows 1-2, 10 rows 1-8 (the rows
    were spaced over n_rows - 1 steps, not over the ones there are).
    """
    for n in range(1, 40):
        c = {"iter": [10 + i for i in range(n)], "rm score": [0.5 * i for i in range(n)], "gold score": [],
             "KL": [0.25 * i for i in range(n)]}
        lines = evaluate.curves_table(c, n_rows).splitlines()
        assert lines[0] == "| iter | rm score | KL |"
        rows = [line.split(" | ") for line in lines[2:]]
        shown = [int(r[0].strip("| ")) - 10 for r in rows]  # the 0-based positions of the rows shown
        # the plain reference: every row when they fit, else n_rows of them from the first to the last, the gaps
        # between neighbours as equal as whole rows allow
        if n <= n_rows:
            assert shown == list(range(n)), (n, shown)
        else:
            gaps = [b - a for a, b in zip(shown, shown[1:])]
            assert len(shown) == n_rows and shown[0] == 0 and shown[-1] == n - 1, (n, shown)
            assert min(gaps) >= 1 and max(gaps) - min(gaps) <= 1, (n, shown)
        for r, i in zip(rows, shown):  # each row's numbers are its own iteration's
            assert r[1:] == [evaluate.fmt(0.5 * i), evaluate.fmt(0.25 * i) + " |"], (n, r)


def test_no_checkpoint_dict_is_held_while_sampling(tmp_path, monkeypatch, one_thread):
    """
    Of the checkpoint dicts (CPU copies of the weights) of the SFT, PPO and reward models, only the flags and the
    reward's mean and std are kept: before, all of them, and the SFT weights twice, were held to the end.
    """
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "hello there"}) + "\n")
    tok = Tokenizer.byte_level()
    save_checkpoint(str(tmp_path / "sft"), model_payload(tiny_gpt(1), tok, "sft", {"seed": 3}, 10))
    save_checkpoint(str(tmp_path / "ppo"), model_payload(tiny_gpt(2), tok, "ppo", {"response_length": 5}, 5))
    rm = ScalarGPT(GPTConfig(**TINY))
    save_checkpoint(str(tmp_path / "rm"), model_payload(rm, tok, "rm", {}, 5, reward_mean=0.2, reward_std=2.0))
    alive, refs = track_checkpoint_dicts(monkeypatch, evaluate, "evaluate_policy")
    evaluate.main(["--data", str(data), "--sft", str(tmp_path / "sft"), "--ppo", str(tmp_path / "ppo"), "--rm",
                   str(tmp_path / "rm"), "--n_show", "0", "--out_dir", str(tmp_path / "out"), "--device", "cpu",
                   "--dtype", "float32"])
    assert len(refs) == 4 and alive == [0, 0, 0], alive  # SFT twice (its flags first), PPO, RM; 3 policies
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["seed"] == 3 and set(report) >= {"sft", "ppo", "rm"}


def prompts_and_sft(tmp_path, prompts):
    """tmp_path/prompts.jsonl of these prompts, and a tiny SFT checkpoint in tmp_path/sft (its run's --seed: 3)."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    save_checkpoint(str(tmp_path / "sft"), model_payload(tiny_gpt(1), Tokenizer.byte_level(), "sft", {"seed": 3}, 10))
    return data


def test_report_without_an_rm_says_nothing_of_one(tmp_path):
    """
    Without --rm, report.md explained the RM score as (r - mean) / std "with the mean 0.000 and std 1.000 ... that
    train_rm.py stored" and printed a "## Reward model" section of "-"; report.json already said null.
    """
    data = prompts_and_sft(tmp_path, ["hello there", "write a poem"])
    out = tmp_path / "out"
    evaluate.main(["--data", str(data), "--sft", str(tmp_path / "sft"), "--init_row", "false", "--n_show", "2",
                   "--max_new_tokens", "4", "--out_dir", str(out), "--device", "cpu", "--dtype", "float32"])
    report = json.loads((out / "report.json").read_text())
    assert report["rm"] == {"accuracy": None, "annotator_agreement": None} and report["sft"]["rm"] is None
    md = (out / "report.md").read_text()
    assert "## Reward model" not in md and "train_rm.py" not in md and "RM score:" not in md, md
    assert "KL to SFT: per response" in md and "## Responses side by side" in md
    assert "\n\n\n" not in md


def test_a_negative_n_show_is_one_line_before_anything_loads(tmp_path, capsys):
    """--n_show -5 was taken as 0: an empty table of responses, after every policy had been sampled."""
    out = tmp_path / "out"
    code, err = exit_status_and_error(capsys, evaluate.main, ["--sft", str(tmp_path / "missing"), "--n_show", "-5",
                                                              "--out_dir", str(out)])
    assert (code, err) == (2, "error: --n_show -5: must be 0 or more\n")
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# each policy's numbers, from its own responses, against plain references


def test_rm_gold_and_eos_of_each_response_match_the_unpadded_sequence(monkeypatch, one_thread):
    """
    The RM score of a response is the reward model's at its last real token (EOS or the length limit), on the
    unpadded prompt + response, normalised as (r - mean) / std; gold is the judge's on its own prompt; eos says
    whether it ended with EOS, at the last allowed position too.
    """
    tok = Tokenizer.byte_level()
    policy = tiny_gpt(5, eos_boost=20.0)
    torch.manual_seed(4)
    rm = ScalarGPT(GPTConfig(**TINY)).eval()
    prompts = ["sort 3 1 2", "sort 9 8 7 6 5 4", "sort 5 5", "sort 1 1", "sort 4 2", "sort 8 1 6"] * 3
    prompt_ids = [tok.render_prompt(p) for p in prompts]
    cfg = SimpleNamespace(samples_per_prompt=2, temperature=1.0, batch_size=7, seed=3, max_new_tokens=4)
    rt = setup_runtime("cpu", "float32", 0)
    reward_norm = (0.3, 2.5)

    def judge(prompt, text):  # tiny random models never sort: a stand-in judge that tells the prompts apart
        return float(7 * len(prompt) + len(text))

    monkeypatch.setattr(evaluate.tasks, "gold", judge)
    rows = evaluate.evaluate_policy(policy, policy, rm, tok, prompts, prompt_ids, cfg, rt, reward_norm)
    lengths = [len(ids) for ids in rows["response_ids"]]
    ends = [ids[-1] == tok.eos_id for ids in rows["response_ids"]]
    # masking and both ways of ending are exercised, EOS at the length limit among them
    assert min(lengths) < 4 and any(n == 4 and e for n, e in zip(lengths, ends))
    assert any(n == 4 and not e for n, e in zip(lengths, ends))
    rm64 = copy.deepcopy(rm).double()
    for i, ids in enumerate(rows["response_ids"]):
        p = prompts[i // 2]
        assert rows["prompt"][i] == p and rows["length"][i] == len(ids)
        assert rows["eos"][i] == (ids[-1] == tok.eos_id) and tok.eos_id not in ids[:-1]
        seq = torch.tensor([prompt_ids[i // 2] + ids])
        with torch.no_grad():
            r = rm64(seq, torch.ones_like(seq))[0, -1].item()
        assert rows["rm"][i] == pytest.approx((r - 0.3) / 2.5, abs=1e-5), i
        assert rows["gold"][i] == judge(p, rows["response"][i]), i


def test_stage_seconds_matches_a_plain_loop_over_the_sessions(tmp_path):
    """A session ends where "time" does not grow (a tie is the same session's clock); PPO rows need both parts."""
    rng = random.Random(0)
    for trial in range(30):
        times = [round(rng.uniform(0, 5), 0) for _ in range(rng.randint(1, 12))]  # few values: ties
        total = 0.0
        for t, later in zip(times, times[1:]):
            if later < t:
                total += t
        total += times[-1]
        rows = [{"step": 10 * i, "loss": 1.0, "time": t} for i, t in enumerate(times)]
        rows.insert(rng.randint(0, len(rows)), {"step": 0, "val_loss": 2.0})  # a row without "time"
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert evaluate.stage_seconds(str(tmp_path)) == pytest.approx(total), (trial, times)
    ppo = [{"iter": 1, "t_rollout": 1.0, "t_update": 2.0}, {"iter": 2, "t_rollout": 1.5}]  # a row cut short
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ppo))
    assert evaluate.stage_seconds(str(tmp_path)) is None


def test_side_by_side_shows_the_first_sample_of_each_prompt_per_policy():
    rng = random.Random(1)
    k, n_prompts = 3, 5
    all_rows = {}
    for name in ("sft", "ppo", "init", "dpo"):
        all_rows[name] = {"prompt": [f"sort {i}" for i in range(n_prompts) for _ in range(k)],
                          "response": [f"{name} {i}.{j}" for i in range(n_prompts) for j in range(k)],
                          "gold": [rng.random() for _ in range(n_prompts * k)]}
    for n_show in (1, 3, 9):
        lines = evaluate.side_by_side(all_rows, n_show, k).splitlines()
        assert lines[0] == "| prompt | sft | ppo | dpo |"
        want = []
        for i in range(min(n_show, n_prompts)):
            cells = [f"`{name} {i}.0` ({all_rows[name]['gold'][i * k]:.2f})" for name in ("sft", "ppo", "dpo")]
            want.append(f"| sort {i} | " + " | ".join(cells) + " |")
        assert lines[2:] == want, n_show


def fake_clock(monkeypatch):
    """evaluate.py's clock, 100 s on at each reading: this evaluation's own seconds are then at least 100."""
    ticks = iter(range(0, 10**6, 100))
    monkeypatch.setattr(evaluate, "time", SimpleNamespace(time=lambda: float(next(ticks))))


def test_the_summaries_are_the_plain_means_of_each_policy_s_responses(tmp_path, monkeypatch, one_thread):
    """
    policies.json, report.json and report.md's table against plain means of the per-response rows that each
    policy's evaluate_policy returned; the win rate is against the SFT model's responses, response by response.
    """
    data = tmp_path / "data"
    meta = tasks.generate_task(str(data), seed=0, n_sft=2, n_prefs=2, n_prefs_eval=2, n_prompts=2, n_eval=5)
    tok = Tokenizer.byte_level()
    save_checkpoint(str(tmp_path / "sft"), model_payload(tiny_gpt(5, eos_boost=20.0), tok, "sft", {"seed": 3}, 10))
    save_checkpoint(str(tmp_path / "ppo"), model_payload(tiny_gpt(3, eos_boost=40.0), tok, "ppo",
                                                         {"response_length": 6}, 5))
    save_checkpoint(str(tmp_path / "dpo"), model_payload(tiny_gpt(4, eos_boost=40.0), tok, "dpo", {}, 5))
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path / "rm"), model_payload(ScalarGPT(GPTConfig(**TINY)), tok, "rm", {}, 5,
                                                        reward_mean=0.1, reward_std=0.5))
    metrics = {"sft": [{"step": 10, "loss": 1.0, "time": 10.0}], "rm": [{"step": 5, "val_acc": 0.7, "time": 4.0}],
               "ppo": [{"iter": 1, "t_rollout": 1.0, "t_update": 2.0}], "dpo": [{"step": 3, "time": 7.5}]}
    for stage, rows in metrics.items():
        (tmp_path / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen, real = {}, evaluate.evaluate_policy

    def spy(policy, *args, **kwargs):
        rows = real(policy, *args, **kwargs)
        seen[len(seen)] = rows
        return rows

    monkeypatch.setattr(evaluate, "evaluate_policy", spy)
    # tiny random models never sort: a stand-in judge by the response's length gives wins, ties and losses
    monkeypatch.setattr(evaluate.tasks, "gold", lambda prompt, text: len(text) % 3 / 2)
    fake_clock(monkeypatch)
    out = tmp_path / "out"
    evaluate.main(["--data", str(data / "eval.jsonl"), "--sft", str(tmp_path / "sft"), "--ppo", str(tmp_path / "ppo"),
                   "--rm", str(tmp_path / "rm"), "--extra", f"dpo={tmp_path / 'dpo'}", "--samples_per_prompt", "3",
                   "--batch_size", "4", "--out_dir", str(out), "--device", "cpu", "--dtype", "float32"])
    names = ["sft", "ppo", "dpo", "init"]
    rows = dict(zip(names, seen.values()))
    policies = json.loads((out / "policies.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert list(policies) == ["sft", "ppo", "dpo"]
    sft_gold = rows["sft"]["gold"]
    cells = {line.split(" | ")[0].lstrip("| "): line for line in (out / "report.md").read_text().splitlines()
             if line.startswith("| ") and " | n |" not in line}
    for name in names:
        r = rows[name]
        n = len(r["kl"])
        assert n == 5 * 3 and max(r["length"]) == 6  # the PPO run's response_length is the limit
        wins = 0.0
        for g, b in zip(r["gold"], sft_gold):
            wins += 1.0 if g > b else 0.5 if g == b else 0.0
        want = {"gold": sum(r["gold"]) / n, "rm": sum(r["rm"]) / n, "kl": sum(r["kl"]) / n,
                "win_rate_vs_sft": wins / n, "length": sum(r["length"]) / n, "eos": sum(map(float, r["eos"])) / n}
        if name != "init":
            assert {k: policies[name][k] for k in want} == pytest.approx(want, abs=1e-12), name
            assert policies[name]["wall_s"] == {"sft": 10.0, "ppo": 3.0, "dpo": 7.5}[name]
        if name in ("sft", "ppo"):  # report.json: to 5 places
            assert {k: report[name][k] for k in ("gold", "rm", "kl", "win_rate_vs_sft", "length")} == pytest.approx(
                {k: want[k] for k in ("gold", "rm", "kl", "win_rate_vs_sft", "length")}, abs=6e-6), name
        gold_sem = statistics.stdev(r["gold"]) / math.sqrt(n)
        assert cells[name] == (f"| {name} | {want['gold']:.3f} ± {gold_sem:.3f} | {want['win_rate_vs_sft']:.3f} | "
                               f"{want['rm']:.3f} | {want['kl']:.3f} | {want['length']:.1f} | {want['eos']:.2f} | "
                               f"{n} |"), name
    assert len({policies[n]["win_rate_vs_sft"] for n in ("ppo", "dpo")} | {0.5}) == 3  # not all ties by construction
    assert 0 < min(policies[n]["eos"] for n in ("ppo", "dpo")) and max(policies[n]["eos"] for n in policies) < 1
    # the RM's metrics lack the annotators' agreement: the task's meta.json gives it
    assert report["rm"] == {"accuracy": 0.7, "annotator_agreement": pytest.approx(meta["annotator_agreement"],
                                                                                  abs=6e-6)}
    # the pipeline's wall time: the three stages' loops plus this evaluation's own (at least one tick of the clock)
    assert report["wall_s"] >= 10.0 + 4.0 + 3.0 + 100


def test_prompts_that_are_not_all_the_task_s_get_no_gold(tmp_path, one_thread):
    """One prompt of one's own among the task's: no gold for anyone (the judge applies to all or none)."""
    data = prompts_and_sft(tmp_path, ["sort 3 1 2", "write a poem", "sort 2 1"])
    out = tmp_path / "out"
    evaluate.main(["--data", str(data), "--sft", str(tmp_path / "sft"), "--init_row", "false", "--n_show", "0",
                   "--max_new_tokens", "3", "--out_dir", str(out), "--device", "cpu", "--dtype", "float32"])
    policies = json.loads((out / "policies.json").read_text())
    assert policies["sft"]["gold"] is None and policies["sft"]["win_rate_vs_sft"] is None
    assert policies["sft"]["n"] == 3


def test_each_batch_draws_its_own_random_numbers():
    """
    Batch b samples from a generator of its own seed: with one prompt per batch, a prompt's samples are independent
    draws, not one response repeated (the same seed for every batch gave each prompt k copies of one response).
    """
    tok = Tokenizer.byte_level()
    policy = tiny_gpt(4)
    prompts = ["sort 2 7 1", "hi"]
    cfg = SimpleNamespace(samples_per_prompt=4, temperature=1.0, batch_size=1, seed=5, max_new_tokens=8)
    rt = setup_runtime("cpu", "float32", 0)
    rows = evaluate.evaluate_policy(policy, policy, None, tok, prompts, [tok.render_prompt(p) for p in prompts], cfg,
                                    rt, use_gold=False)
    for i in range(len(prompts)):
        samples = [tuple(ids) for ids in rows["response_ids"][4 * i:4 * i + 4]]
        assert len(set(samples)) == 4, (i, samples)  # 8 tokens of a 260-token vocabulary: a repeat is no chance


@pytest.mark.parametrize("case", ["finished", "unfinished", "other rm"])
def test_the_report_shows_the_sweep_only_when_it_is_finished_and_from_its_models(tmp_path, monkeypatch, one_thread,
                                                                                  case):
    # out/sweep went into whatever report was written in out/: a sweep killed part-way, or one trained from the SFT
    # and RM that a later `make SEED=1` in the same out/ replaced, was reported as this pipeline's
    from nanorlhf.train_common import input_digests

    data = tmp_path / "data"
    tasks.generate_task(str(data), seed=0, n_sft=2, n_prefs=2, n_prefs_eval=2, n_prompts=2, n_eval=2)
    tok = Tokenizer.byte_level()
    save_checkpoint(str(tmp_path / "sft"), model_payload(tiny_gpt(5, eos_boost=20.0), tok, "sft", {}, 10))
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path / "rm"), model_payload(ScalarGPT(GPTConfig(**TINY)), tok, "rm", {}, 5))
    out = tmp_path / "out"
    digests = input_digests({"--sft": str(tmp_path / "sft"), "--rm": str(tmp_path / "rm")})
    rows = [{"iter": i, "rm_score": 0.1 * i, "gold": 0.5, "kl": 0.2 * i} for i in range(1, 4)]
    for name in ("beta0", "default"):
        run = out / "sweep" / name
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        step = 1 if case == "unfinished" and name == "default" else 3
        torch.save({"step": step, "args": {"num_iterations": 3}}, run / "ckpt.pt")
        torch.save({"step": step, "inputs": digests}, run / "train_state.pt")
    if case == "other rm":
        save_checkpoint(str(tmp_path / "rm"), model_payload(ScalarGPT(GPTConfig(**TINY)), tok, "rm", {}, 6))
    evaluate.main(["--data", str(data / "eval.jsonl"), "--sft", str(tmp_path / "sft"), "--rm", str(tmp_path / "rm"),
                   "--init_row", "false", "--n_prompts", "2", "--max_new_tokens", "8", "--out_dir", str(out),
                   "--device", "cpu", "--dtype", "float32"])
    md = (out / "report.md").read_text()
    section = md[md.index("## Over-optimisation"):].split("\n## ")[0]
    if case == "finished":
        assert "| beta0 | 3 |" in section and "| default | 3 |" in section, section
    else:
        problem = {"unfinished": f"the default run ({out}/sweep/default) stopped at iteration 1 of 3",
                   "other rm": f"the beta0 run ({out}/sweep/beta0) was trained from another --rm than {tmp_path}/rm"}
        assert section.startswith(f"## Over-optimisation\n\nNot shown: {problem[case]}"), section
        assert "| beta0 |" not in md


# -----------------------------------------------------------------------------
# more of the measurements and the report's numbers against plain references


def test_greedy_kl_uses_the_logits_at_temperature_1():
    """--temperature 0 decodes greedily; each response's KL is then the float64 loop's at temperature 1 (not 1/0)."""
    tok = Tokenizer.byte_level()
    policy, ref = tiny_gpt(1, eos_boost=8.0), tiny_gpt(2, eos_boost=8.0)
    prompts = ["sort 3 1 2", "sort 9 8 7 6 5 4", "hi"]
    prompt_ids = [tok.render_prompt(p) for p in prompts]
    cfg = SimpleNamespace(samples_per_prompt=1, temperature=0.0, batch_size=2, seed=6, max_new_tokens=10)
    rt = setup_runtime("cpu", "float32", 0)
    rows = evaluate.evaluate_policy(policy, ref, None, tok, prompts, prompt_ids, cfg, rt, use_gold=False)
    policy64, ref64 = copy.deepcopy(policy), copy.deepcopy(ref)
    for i, ids in enumerate(rows["response_ids"]):
        # greedy: each token is the argmax of the policy's logits at its position (the plain loop, float64)
        seq = list(prompt_ids[i])
        for y in ids:
            with torch.no_grad():
                logits = policy64.double()(torch.tensor([seq]))[0, -1]
            assert y == logits.argmax().item(), (i, ids)
            seq.append(y)
        want = reference_kl(policy64, ref64, prompt_ids[i], ids, 1.0)
        assert math.isfinite(rows["kl"][i]) and rows["kl"][i] == pytest.approx(want, abs=1e-4), (i, rows["kl"][i], want)
    assert any(abs(kl) > 1e-3 for kl in rows["kl"])  # two different models: the check has something to compare


def test_rm_accuracy_reads_the_last_row_that_logged_each_number(tmp_path):
    """Each number from the last metrics.jsonl row that has it (not None), whichever rows the others come from."""
    rng = random.Random(0)
    names = {"accuracy": "val_acc", "annotator_agreement": "annotator_agreement", "gold_accuracy": "val_gold_acc"}
    for trial in range(20):
        rows = []
        for step in range(rng.randint(0, 8)):
            row = {"step": step}
            for key in names.values():
                if rng.random() < 0.5:
                    row[key] = None if rng.random() < 0.2 else round(rng.random(), 4)
            rows.append(row)
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        want = {}
        for out_key, key in names.items():
            want[out_key] = None
            for row in rows:  # the last one wins
                if row.get(key) is not None:
                    want[out_key] = row[key]
        assert evaluate.rm_accuracy(str(tmp_path)) == want, (trial, rows)


def test_text_table_puts_each_number_in_its_column():
    rng = random.Random(2)
    summaries = {}
    for name in ("sft", "ppo", "dpo", "init"):
        summaries[name] = {"gold": rng.random(), "gold_sem": rng.random() / 10, "rm": rng.gauss(0, 1),
                           "kl": rng.uniform(0, 30), "win_rate_vs_sft": rng.random(), "length": rng.uniform(1, 64),
                           "eos": rng.random(), "n": 8}
    summaries["dpo"]["rm"] = summaries["dpo"]["gold"] = summaries["dpo"]["win_rate_vs_sft"] = None  # no RM, no judge

    def cell(x, digits=3):
        return "-" if x is None else ("%." + str(digits) + "f") % x

    lines = evaluate.text_table(summaries).splitlines()
    assert lines[0].split() == ["policy", "gold", "win", "rm", "kl", "length", "eos"]
    for line, (name, s) in zip(lines[1:], summaries.items()):
        assert line.split() == [name, cell(s["gold"]), cell(s["win_rate_vs_sft"]), cell(s["rm"]), cell(s["kl"]),
                                cell(s["length"], 1), cell(s["eos"], 2)], name
    assert len(lines) == 1 + len(summaries)


def test_curves_table_shows_the_rows_nearest_to_even_spacing():
    """Row j of m shown is the iteration nearest to j (n - 1) / (m - 1) (30 iterations: 1, 4, 6, 9, ..., 27, 30)."""
    for n_rows in (2, 5, 12):
        for n in range(n_rows + 1, 60):
            c = {"iter": list(range(1, n + 1)), "rm score": [0.5] * n, "gold score": [], "KL": []}
            lines = evaluate.curves_table(c, n_rows).splitlines()[2:]
            shown = [int(line.split(" | ")[0].strip("| ")) - 1 for line in lines]  # 0-based positions
            assert len(shown) == n_rows, (n, shown)
            for j, i in enumerate(shown):
                ideal = j * (n - 1) / (n_rows - 1)
                assert abs(i - ideal) <= 0.5, (n, n_rows, j, i, ideal)


def test_curves_leave_out_a_key_that_not_every_row_logged():
    """A curve is the key's value in every row, or [] when any row lacks it (never a curve with holes)."""
    from nanorlhf.report import CURVE_KEYS, curves
    rng = random.Random(3)
    for trial in range(30):
        rows = []
        for i in range(rng.randint(0, 6)):
            row = {"iter": i + 1} if rng.random() < 0.8 else {}
            for key in CURVE_KEYS.values():
                if rng.random() < 0.9:
                    row[key] = rng.random()
            rows.append(row)
        c = curves(rows)
        assert c["iter"] == [r.get("iter", i + 1) for i, r in enumerate(rows)]
        for label, key in CURVE_KEYS.items():
            want = []
            if rows and all(key in r for r in rows):
                want = [r[key] for r in rows]
            assert c[label] == want, (trial, label, rows)


def test_read_metrics_skips_a_half_written_line_and_keeps_the_rows_after_it(tmp_path):
    """
    A line that does not parse is skipped alone, the rows after it still read. (MetricsLogger's resume drops a cut
    line first, utils.keep_rows_until, but read_metrics reads whatever file a run directory holds.)
    """
    from nanorlhf.report import read_metrics
    first = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(3)]
    resumed = [{"step": s, "loss": 0.5, "time": 0.1 * s} for s in range(3, 6)]
    text = "".join(json.dumps(r) + "\n" for r in first) + '{"step": 3, "lo' + "".join(
        json.dumps(r) + "\n" for r in resumed)
    (tmp_path / "metrics.jsonl").write_text(text)
    want = []
    for line in text.splitlines():
        try:
            want.append(json.loads(line))
        except ValueError:
            continue
    assert read_metrics(str(tmp_path)) == want == first + resumed[1:]  # the broken line took resumed[0] with it


def test_the_report_states_what_the_run_was_given_and_what_the_stages_recorded(tmp_path, one_thread):
    """
    The pipeline seed is the SFT run's (3), the sampling seed --seed's (9); --n_prompts 2 of 3 prompts evaluates 2;
    the RM section gives each of train_rm.py's numbers from its own key; the RM score's mean and std are the ones
    the RM checkpoint stored; the dtype is --dtype's (bfloat16, which no CPU's auto gives here but one with bf16).
    """
    data = prompts_and_sft(tmp_path, ["sort 3 1 2", "sort 2 1", "sort 5 4"])
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path / "rm"), model_payload(ScalarGPT(GPTConfig(**TINY)), tok, "rm", {}, 5,
                                                        reward_mean=0.125, reward_std=0.75))
    rm_rows = [{"step": 5, "val_acc": 0.61, "val_gold_acc": 0.83, "annotator_agreement": 0.9, "time": 4.0}]
    (tmp_path / "rm" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rm_rows))
    out = tmp_path / "out"
    evaluate.main(["--data", str(data), "--sft", str(tmp_path / "sft"), "--rm", str(tmp_path / "rm"), "--seed", "9",
                   "--n_prompts", "2", "--init_row", "false", "--n_show", "0", "--max_new_tokens", "3",
                   "--out_dir", str(out), "--device", "cpu", "--dtype", "bfloat16"])
    report = json.loads((out / "report.json").read_text())
    assert report["dtype"] == "bfloat16" and "device cpu, bfloat16." in (out / "report.md").read_text()
    policies = json.loads((out / "policies.json").read_text())
    md = (out / "report.md").read_text()
    assert report["seed"] == 3 and "sampling seed 9," in md and "Pipeline seed 3;" in md
    assert policies["sft"]["n"] == 2 and "(2 prompts x 1 sample(s))" in md
    assert report["rm"] == {"accuracy": 0.61, "annotator_agreement": 0.9}
    assert "Held-out pairwise accuracy against the annotators' labels 0.610; the annotators' own agreement with " \
           "the gold judge 0.900" in md, md
    assert "The reward model agrees with gold on 0.830 of the held-out pairs" in md, md
    assert "with the mean 0.125 and std 0.750 of the demonstrations' rewards" in md, md


# -----------------------------------------------------------------------------
# mutation round (session 21): the cells, --extra, the flags' messages, refusals that leave out_dir alone


def test_cell_escapes_pipes_newlines_and_backticks_and_cuts_at_the_width():
    """Escaped first (a pipe becomes two characters), then cut to the width with "..." (never longer than it)."""
    assert evaluate.cell("a|b\nc`d") == "a\\|b⏎c'd"
    for n in (1, 59, 60, 61, 100):
        text = "x" * n
        want = text if n <= 60 else "x" * 57 + "..."
        assert evaluate.cell(text) == want and len(evaluate.cell(text)) <= 60, n
    assert evaluate.cell("|" * 30) == "\\|" * 30  # 60 characters once escaped: fits
    assert evaluate.cell("|" * 31) == ("\\|" * 31)[:57] + "..."
    assert evaluate.cell("abcdef", width=5) == "ab..."


def test_parse_extra_takes_name_path_pairs_and_refuses_the_rest():
    assert evaluate.parse_extra(None) == {}
    assert evaluate.parse_extra(" a = out/x ,, b=out/y=z, ") == {"a": "out/x", "b": "out/y=z"}
    for extra, message in (("a=", "--extra: expected name=path, got 'a='"),
                           ("a= ", "--extra: expected name=path, got 'a= '"),
                           ("=out/x", "--extra: expected name=path, got '=out/x'"),
                           ("b=out/y,out/x", "--extra: expected name=path, got 'out/x'"),
                           ("sft=out/x", "--extra: name 'sft' is taken"),
                           ("ppo=out/x", "--extra: name 'ppo' is taken"),
                           ("init=out/x", "--extra: name 'init' is taken"),
                           ("a=out/x, a =out/y", "--extra: name 'a' is taken")):  # a second a replaced the first
        with pytest.raises(UserError) as info:
            evaluate.parse_extra(extra)
        assert str(info.value) == message, extra


def earlier_report(out):
    """out/report.md, report.json and policies.json of an earlier run -> their bytes, to check a failed run kept."""
    out.mkdir()
    for name in ("report.md", "report.json", "policies.json"):
        (out / name).write_text(f"earlier {name}\n")
    return {name: (out / name).read_bytes() for name in sorted(os.listdir(out))}


def swapped_tokenizer():
    """A byte-level tokenizer of the same size that gives other ids to other bytes."""
    return Tokenizer("byte", {bytes([i]): 255 - i for i in range(256)})


@pytest.mark.parametrize("case", ["ppo tokenizer", "extra tokenizer", "rm tokenizer", "extra missing",
                                  "ppo corrupt", "default length", "rm block", "bad prompts line"])
def test_refusals_name_the_input_and_leave_the_earlier_report(tmp_path, capsys, case):
    """
    Each refusal is one line naming the flag or file at fault (exit status 2), and the earlier report in --out_dir is
    left as it was: a policy or reward model on another tokenizer than the SFT model's (its ids would mean other
    text), an --extra checkpoint that is not there (named by --extra), a --ppo checkpoint that does not load, a
    --max_new_tokens (here the default 64) that leaves no room for a prompt in the smallest block_size (the reward
    model's counts), a bad line of --data.
    """
    data = prompts_and_sft(tmp_path, ["sort 3 1 2", "hello there"])
    tok = Tokenizer.byte_level()
    out = tmp_path / "out"
    before = earlier_report(out)
    argv = ["--data", str(data), "--sft", str(tmp_path / "sft"), "--out_dir", str(out), "--device", "cpu",
            "--dtype", "float32", "--max_new_tokens", "4"]
    other = str(tmp_path / "other")
    if case in ("ppo tokenizer", "extra tokenizer"):
        save_checkpoint(other, model_payload(tiny_gpt(2), swapped_tokenizer(), "ppo", {}, 5))
        argv += ["--ppo", other] if case == "ppo tokenizer" else ["--extra", f"x={other}"]
        message = f"{other}: its tokenizer differs from the SFT checkpoint's"
    elif case == "rm tokenizer":
        torch.manual_seed(0)
        save_checkpoint(other, model_payload(ScalarGPT(GPTConfig(**TINY)), swapped_tokenizer(), "rm", {}, 5))
        argv += ["--rm", other]
        message = f"{other}: its tokenizer differs from the SFT checkpoint's"
    elif case == "extra missing":
        save_checkpoint(str(tmp_path / "ppo"), model_payload(tiny_gpt(2), tok, "ppo", {}, 5))
        argv += ["--ppo", str(tmp_path / "ppo"), "--extra", f"x={other}"]
        message = f"--extra {other}: "
    elif case == "ppo corrupt":
        os.makedirs(other)
        (tmp_path / "other" / "ckpt.pt").write_bytes(b"not a checkpoint\n")
        argv += ["--ppo", other]
        message = f"--ppo {other}/ckpt.pt: cannot load checkpoint ("
    elif case == "default length":
        argv = argv[:-2]  # no --ppo whose response_length to take: 64, all of block_size 64
        message = "--max_new_tokens 64 leaves no room for a prompt in block_size 64"
    elif case == "rm block":
        torch.manual_seed(0)
        save_checkpoint(other, model_payload(ScalarGPT(GPTConfig(**{**TINY, "block_size": 32})), tok, "rm", {}, 5))
        argv = argv[:-1] + ["32", "--rm", other]  # room for a prompt in the policies' 64, none in the RM's 32
        message = "--max_new_tokens 32 leaves no room for a prompt in block_size 32"
    else:
        with open(data, "a") as f:
            f.write('{"prompt": "sort 2 1"}\n{"answer": "1 2"}\n')
        message = f"{data}:4"
    code, err = exit_status_and_error(capsys, evaluate.main, argv)
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert {name: (out / name).read_bytes() for name in sorted(os.listdir(out))} == before


def test_a_prompt_budget_of_one_token_is_enough(tmp_path, capsys, one_thread):
    """--max_new_tokens block_size - 1 leaves one token of each prompt, its last, and says how many were cut."""
    data = prompts_and_sft(tmp_path, ["sort 3 1 2", "hello there", "sort 2 1"])
    out = tmp_path / "out"
    evaluate.main(["--data", str(data), "--sft", str(tmp_path / "sft"), "--init_row", "false", "--n_show", "0",
                   "--max_new_tokens", "63", "--out_dir", str(out), "--device", "cpu", "--dtype", "float32"])
    assert "note: 3 prompts longer than 1 tokens were cut from the left" in capsys.readouterr().out
    policies = json.loads((out / "policies.json").read_text())
    assert policies["sft"]["n"] == 3 and 1 <= policies["sft"]["length"] <= 63
    md = (out / "report.md").read_text()
    assert "## Responses side by side" not in md and "| prompt |" not in md  # --n_show 0: no empty table


def test_load_policies_seeds_init_with_seed_and_puts_every_model_in_eval_mode(tmp_path):
    """
    "init" is GPT(the SFT config) initialised right after torch.manual_seed(--seed), whatever the global generator
    held before; every policy is in eval mode (a checkpoint with dropout would otherwise sample with it).
    """
    tok = Tokenizer.byte_level()
    save_checkpoint(str(tmp_path / "sft"), model_payload(tiny_gpt(1), tok, "sft", {}, 10))
    save_checkpoint(str(tmp_path / "ppo"), model_payload(tiny_gpt(2), tok, "ppo", {}, 5))
    cfg = SimpleNamespace(sft=str(tmp_path / "sft"), ppo=str(tmp_path / "ppo"), extra=f"x={tmp_path / 'ppo'}",
                          init_row=True, seed=7)
    rt = setup_runtime("cpu", "float32", 0)
    torch.manual_seed(7)
    want = GPT(GPTConfig(**TINY)).state_dict()
    for global_seed in (0, 123):
        torch.manual_seed(global_seed)
        models, paths, _, _ = evaluate.load_policies(cfg, rt)
        assert list(models) == ["sft", "ppo", "x", "init"] and list(paths) == ["sft", "ppo", "x"]
        assert not any(m.training for m in models.values())
        got = models["init"].state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), global_seed


def test_report_markdown_states_the_wall_time_the_task_s_scale_and_only_the_sections_there_are(tmp_path):
    """
    The wall time line gives each stage's seconds ("?" where a stage's metrics have none) and this evaluation's;
    the task's meta.json numbers each under its own name; the PPO curves when any is logged (here no gold);
    no responses section with --n_show 0.
    """
    (tmp_path / "ppo").mkdir()
    (tmp_path / "ppo" / "metrics.jsonl").write_text("".join(
        json.dumps({"iter": i, "rm_score": 0.1 * i, "kl": 0.5 * i}) + "\n" for i in range(1, 4)))
    s = {"gold": 0.5, "gold_sem": 0.02, "rm": None, "kl": 1.0, "win_rate_vs_sft": 0.6, "length": 9.0, "eos": 1.0,
         "n": 8}
    summaries = {"sft": {**s, "kl": 0.0, "win_rate_vs_sft": 0.5}, "ppo": s}
    rows = {name: {"prompt": ["sort 1 2"], "response": ["1 2"], "gold": [1.0]} for name in summaries}
    cfg = SimpleNamespace(data="eval.jsonl", samples_per_prompt=1, temperature=1.0, max_new_tokens=10, seed=0,
                          sft=str(tmp_path / "sft"), rm=None, ppo=str(tmp_path / "ppo"), out_dir=str(tmp_path / "out"),
                          n_show=0)
    rm_info = {"accuracy": None, "annotator_agreement": None, "gold_accuracy": None, "reward_mean": 0.0,
               "reward_std": 1.0}
    meta = {"gold_demonstrator": 0.61, "gold_demonstrator_without_habit": 0.72, "gold_perfect": 1.0}
    report = {"wall_s": 14.4, "device": "cpu", "dtype": "float32", "seed": 0}
    md = evaluate.report_markdown(cfg, 1, summaries, rows, rm_info, meta,
                                  {"sft": 10.0, "ppo": None, "eval": 4.4}, report, None)
    assert "wall time 14 s = sft 10 + ppo ? + eval 4 s (each stage's loop" in md, md
    assert ("For scale, from the task's meta.json: the demonstrator scores 0.610, the demonstrator without its habit "
            "0.720, a perfect policy 1.000.") in md, md
    assert "## PPO learning curves" in md and "| iter | rm score | KL |" in md, md
    assert "## Responses side by side" not in md and "| prompt |" not in md


def test_a_stop_while_the_report_is_drawn_leaves_the_earlier_report(tmp_path, monkeypatch, capsys, one_thread):
    """
    A Ctrl-C (or a failed picture) while report.md and its pictures were made, the slowest part of the writing, left
    this run's report.json and policies.json beside the earlier run's report.md: now the three are written together,
    after report.md is made, and the earlier ones are kept whole.
    """
    data = prompts_and_sft(tmp_path, ["sort 3 1 2", "hello there"])
    out = tmp_path / "out"
    before = earlier_report(out)
    real = evaluate.report_markdown

    def made_then_stopped(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "report_markdown", made_then_stopped)
    code, err = exit_status_and_error(capsys, evaluate.main, [
        "--data", str(data), "--sft", str(tmp_path / "sft"), "--init_row", "false", "--max_new_tokens", "4",
        "--out_dir", str(out), "--device", "cpu", "--dtype", "float32"])
    assert (code, err) == (130, "interrupted\n")
    assert {name: (out / name).read_bytes() for name in sorted(os.listdir(out)) if not name.endswith(".png")} == before
