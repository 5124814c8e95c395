"""
Tests of train_rm.py: its batching and metrics against plain references, and end-to-end runs (subprocess, tiny
model, a small copy of the built-in task): held-out accuracy well above chance, the bias normalisation, exact
resume, over-long records counted, bad input refused before anything is written.
"""

import json
import math
import random
import shutil
import sys

import numpy as np
import pytest
import torch

from scripts import ROOT, frozen_stage, read_metrics, script, track_checkpoint_dicts, without_timings

sys.path.insert(0, ROOT)  # train_rm.py is a top-level script

import train_rm
from nanorlhf import tasks, train_common, utils
from nanorlhf.data import encode_prefs, read_sft
from nanorlhf.losses import kwise_ranking_loss
from nanorlhf.model import GPTConfig, ScalarGPT
from nanorlhf.tokenizer import Tokenizer
from nanorlhf.utils import Runtime

SFT_TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "48", "--block_size", "64", "--batch_size", "32",
            "--lr", "3e-3", "--warmup", "10", "--max_steps", "80", "--eval_interval", "1000", "--log_interval", "40",
            "--device", "cpu"]
RM_TINY = ["--batch_size", "16", "--lr", "3e-3", "--min_lr", "5e-4", "--warmup", "5", "--max_steps", "150",
           "--val_frac", "0.2", "--eval_interval", "75", "--log_interval", "25", "--ckpt_interval", "75",
           "--norm_samples", "200", "--device", "cpu",
           "--dtype", "float32"]  # the bias test below checks the shift in float32, so train in float32 too


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A small copy of the built-in task and a tiny SFT checkpoint trained on it."""
    d = tmp_path_factory.mktemp("rm")
    tasks.generate_task(str(d / "data"), n_sft=1000, n_prefs=600, n_prefs_eval=10, n_prompts=10, n_eval=10)
    script("train_sft.py", "--data", str(d / "data/sft.jsonl"), "--out_dir", str(d / "sft"), *SFT_TINY)
    return d


def rm_args(d, out):
    return ["--data", str(d / "data/prefs.jsonl"), "--sft_data", str(d / "data/sft.jsonl"), "--init_from",
            str(d / "sft"), "--out_dir", str(out), *RM_TINY]


@pytest.fixture(scope="module")
def rm(sft):
    script("train_rm.py", *rm_args(sft, sft / "rm"))
    return sft / "rm"


def test_short_run_beats_chance(rm):
    rows = read_metrics(rm)
    assert rows[0]["step"] == 0 and rows[0]["val_acc"] == 0.5  # the zero-initialised head ties every pair
    final = rows[-1]
    assert final["final"] and final["step"] == 150
    assert final["val_acc"] > 0.62, final  # 0.67-0.73 with --seed 0, 1, 2, with or without --share_prompts
    assert final["val_margin"] > 0 and 0 <= final["val_ece"] <= 0.5
    # built-in task: the annotator's ceiling on the same pairs is reported beside the accuracy
    assert 0.8 < final["annotator_agreement"] < 1 and final["val_gold_acc"] > 0.62


def test_bias_normalisation_gives_mean_zero_on_the_demonstrations(rm, sft):
    model, tok, ckpt = utils.load_model(str(rm), kind="scalar")
    assert ckpt["stage"] == "rm" and ckpt["model_kind"] == "scalar"
    records = read_sft(str(sft / "data/sft.jsonl"))[:200]
    seqs = [tok.render(r["prompt"], r["response"])[0] for r in records]
    T = max(map(len, seqs))
    idx = torch.tensor([s + [tok.pad_id] * (T - len(s)) for s in seqs])  # right padding: causal attention keeps
    with torch.no_grad():  # the real positions as they are alone; the score is the value at the EOS
        values = model(idx)  # (200, T)
    scores = [values[i, len(s) - 1].double().item() for i, s in enumerate(seqs)]
    assert abs(np.mean(scores)) < 1e-4
    assert abs(ckpt["reward_mean"]) < 1e-4
    assert ckpt["reward_std"] == pytest.approx(np.std(scores, ddof=1), rel=1e-3)
    assert np.std(scores) > 1e-3  # a trained head, not a constant


def test_resume_gives_the_same_run(sft, tmp_path):
    # rows at steps 4, 8, 10 (an evaluation), 12, 16, 20 and checkpoints at 6, 12, 18: stopped at 6, between two
    # rows, the resumed run's first row (step 8) averages steps 5-8 as the uninterrupted run's does
    short = ["--max_steps", "20", "--eval_interval", "10", "--log_interval", "4", "--ckpt_interval", "6"]
    script("train_rm.py", *rm_args(sft, tmp_path / "full"), *short)
    script("train_rm.py", *rm_args(sft, tmp_path / "rm"), *short, "--stop_at", "6")
    state = torch.load(tmp_path / "rm/train_state.pt", weights_only=True)
    assert state["step"] == 6 and state["window"]["steps"] == 2
    script("train_rm.py", "--out_dir", str(tmp_path / "rm"), "--resume")  # the saved flags are reused
    got, want = read_metrics(tmp_path / "rm"), read_metrics(tmp_path / "full")
    assert [r["step"] for r in got] == [0, 4, 6, 8, 10, 12, 16, 20, 20]  # the stop's row too; the last: "final"
    got = [r for r in got if r["step"] != 6]
    assert without_timings(got) == without_timings(want)
    a = torch.load(tmp_path / "full/ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "rm/ckpt.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["reward_std"] == b["reward_std"]


def test_resume_in_another_stage_s_directory_says_so(sft, tmp_path):
    """
    --resume with --out_dir at the SFT run and a flag given: the directory is named as another stage's, not the flag
    as differing from the SFT run's (which the saved flags were checked for first); nothing is written.
    """
    before = sorted(p.name for p in (sft / "sft").iterdir())
    p = script("train_rm.py", "--out_dir", str(sft / "sft"), "--resume", "--data", str(sft / "data/prefs.jsonl"),
               check=False)
    assert p.returncode == 2 and f"--out_dir {sft / 'sft'} holds a checkpoint of the 'sft' stage" in p.stderr, p.stderr
    assert sorted(p.name for p in (sft / "sft").iterdir()) == before


def test_shared_prompts_train_the_same_run(sft, tmp_path):
    """Each prompt once with its K responses (the default) or a row per response: the same run up to rounding."""
    short = ["--max_steps", "20", "--eval_interval", "10", "--log_interval", "5", "--ckpt_interval", "10"]
    runs = []
    for share in ("true", "false"):
        script("train_rm.py", *rm_args(sft, tmp_path / share), *short, "--share_prompts", share)
        runs.append(read_metrics(tmp_path / share))
    assert len(runs[0]) == len(runs[1]) > 4
    for a, b in zip(*runs):
        for key in ("loss", "val_loss", "val_margin", "reward_std"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-3), (a["step"], key)
        for key, pairs in (("acc", 0.01), ("val_acc", 0.005)):  # a pair whose scores nearly tie may flip (seen:
            if key in a:                                           # one of 720 held-out pairs on an AVX2 CPU)
                assert a[key] == pytest.approx(b[key], abs=pairs), (a["step"], key)
        if "pad_frac" in a:  # ... from fewer token slots: the prompts ran once
            assert a["tok_per_s"] > 0 and a["pad_frac"] != b["pad_frac"]


def write_prefs(path, extra=()):
    """A preference file of 8 short records that fit in the tiny model's 64 tokens, then `extra`."""
    records = [{"prompt": f"sort {i} 1", "chosen": "1 2", "rejected": "2 1"} for i in range(8)] + list(extra)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


OVER_LONG = [{"prompt": "sort 1 2", "responses": ["x" * 100, "y" * 100], "ranking": [0, 1]},  # none fits: dropped
             {"prompt": "p" * 80, "responses": ["a", "b"], "ranking": [1, 0]},  # its prompt cut for both: one prompt
             {"prompt": "sort 3 4", "responses": ["a", "b", "z" * 100], "ranking": [2, 0, 1]}]  # loses its best


def test_encode_prefs_counts_each_cut_prompt_once_and_each_dropped_response():
    tok = Tokenizer.byte_level()
    out, n_truncated, n_dropped = encode_prefs(OVER_LONG, tok, 64)
    assert len(out) == 2  # the first record is dropped whole, and counted by the caller, not here
    assert n_truncated == 1  # one prompt, cut for its 2 responses
    assert n_dropped == 1 and out[1]["ranking"] == [0, 1]  # "z" * 100 ranked first is gone: "a" above "b"
    assert [len(ids) for ids in out[0]["ids"]] == [64, 64]


def test_over_long_records_are_counted(sft, tmp_path):
    p = script("train_rm.py", "--data", write_prefs(tmp_path / "prefs.jsonl", OVER_LONG), "--val_data",
               write_prefs(tmp_path / "val.jsonl"), "--init_from", str(sft / "sft"), "--out_dir", str(tmp_path / "rm"),
               "--sft_data", "", "--batch_size", "4", "--max_steps", "1", "--eval_batches", "1", "--device", "cpu")
    assert ("too long for 64 tokens: 1 prompts cut from the left, 1 records dropped (fewer than 2 responses fit), "
            "1 responses dropped from the records kept") in p.stdout, p.stdout


def test_lora_resume_keeps_no_checkpoint_dict_and_gives_the_same_run(sft, tmp_path, monkeypatch, one_thread):
    """
    The checkpoint dicts load_model and load_run return, CPU copies of the weights, are gone by the first step, also
    when a LoRA run resumes from the adapters its checkpoint holds; the resumed run ends where the uninterrupted one
    does.
    """
    alive, refs = track_checkpoint_dicts(monkeypatch, train_rm, "kwise_ranking_loss")
    short = ["--lora_rank", "4", "--max_steps", "2", "--eval_batches", "2", "--norm_samples", "20"]
    for out, extra in (("full", []), ("part", ["--stop_at", "1"]), ("part", ["--resume", "on"])):
        monkeypatch.setattr(sys, "argv", ["train_rm.py", *rm_args(sft, tmp_path / out), *short, *extra])
        train_rm.main()
    assert len(refs) == 4 and alive and not any(alive), alive  # 3 load_model and 1 load_run
    a, b = (torch.load(tmp_path / out / "ckpt.pt", weights_only=True)["model"] for out in ("full", "part"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_bad_input_is_one_line_and_writes_nothing(sft, tmp_path):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"prompt": "sort 2 1", "chosen": "1 2", "rejected": "2 1"}\n'
                   '{"prompt": "sort 3 1", "responses": ["1 3", "3 1", "1"], "ranking": [0, 1, 1]}\n')
    out = tmp_path / "out"
    p = script("train_rm.py", "--data", str(bad), "--sft_data", str(sft / "data/sft.jsonl"), "--init_from",
               str(sft / "sft"), "--out_dir", str(out), check=False)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert f"{bad}:2" in p.stderr and "ranking" in p.stderr
    assert not out.exists()
    p = script("train_rm.py", "--data", str(sft / "data/prefs.jsonl"), "--init_from", str(tmp_path / "nope"),
               "--sft_data", str(sft / "data/sft.jsonl"), "--out_dir", str(out), check=False)
    assert p.returncode == 2 and "nope" in p.stderr and not out.exists()


# -----------------------------------------------------------------------------
# the pieces, against plain references


@pytest.mark.parametrize("share_prompts", [False, True])
def test_score_batch_reads_each_response_at_its_last_token(share_prompts):
    torch.manual_seed(0)
    model = ScalarGPT(GPTConfig(block_size=32, vocab_size=258, n_layer=2, n_head=2, n_embd=32)).eval()
    torch.nn.init.normal_(model.head.bias)
    torch.nn.init.normal_(model.head.weight)
    rng = random.Random(0)
    examples = []
    for k in (2, 4, 3):  # K responses after a shared prompt (empty for the first record)
        prompt = [rng.randrange(256) for _ in range(0 if k == 2 else rng.randint(3, 9))]
        examples.append({"ids": [prompt + [rng.randrange(256) for _ in range(rng.randint(3, 11))] for _ in range(k)],
                         "ranking": rng.sample(range(k), k)})
    batch = train_rm.make_batch(examples, pad_id=257, max_len=32, share_prompts=share_prompts)
    assert batch["idx"].shape == (9, 24)  # 9 responses, padded to a multiple of 8
    with torch.no_grad():
        scores = train_rm.score_batch(model, batch, Runtime(torch.device("cpu"), "cpu", "float32"))  # (3, 4)
        for b, ex in enumerate(examples):
            for k in range(4):
                if k < len(ex["ids"]):  # the same response alone, unpadded: the value at its last token
                    want = model(torch.tensor([ex["ids"][k]]))[0, -1]
                    assert torch.allclose(scores[b, k], want, atol=1e-5), (b, k)
                else:
                    assert scores[b, k] == 0 and not batch["k_mask"][b, k]
    assert batch["ranking"][1].tolist() == examples[1]["ranking"]


def test_shared_prompts_give_the_ranking_loss_and_gradients_of_a_row_per_response():
    torch.manual_seed(0)
    model = ScalarGPT(GPTConfig(block_size=32, vocab_size=258, n_layer=2, n_head=2, n_embd=32)).double()
    torch.nn.init.normal_(model.head.weight)
    rng = random.Random(1)
    examples = []
    for k in (4, 2, 3, 4):
        prompt = [rng.randrange(256) for _ in range(rng.randint(1, 12))]
        examples.append({"ids": [prompt + [rng.randrange(256) for _ in range(rng.randint(1, 9))] for _ in range(k)],
                         "ranking": rng.sample(range(k), k)})
    rt = Runtime(torch.device("cpu"), "cpu", "float32")
    results = []
    for share in (False, True):
        model.zero_grad()
        batch = train_rm.make_batch(examples, pad_id=257, max_len=32, share_prompts=share)
        loss = kwise_ranking_loss(train_rm.score_batch(model, batch, rt), batch["ranking"], batch["k_mask"])
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, rel=1e-12) and l0 > 0.1
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_pair_diffs_and_calibration_match_plain_references():
    assert train_rm.pair_diffs([3.0, 1.0, 2.0], [0, 2, 1]) == [1.0, 2.0, 1.0]
    assert train_rm.calibration([2.0, -2.0])[0] == pytest.approx(1 / (1 + math.exp(-2)) - 0.5)
    rng = np.random.default_rng(0)
    d = np.round(rng.normal(0.5, 2.0, size=500), 1)  # rounding makes some exact ties (d == 0)
    conf = 1 / (1 + np.exp(-np.abs(d)))
    right = np.where(d > 0, 1.0, np.where(d == 0, 0.5, 0.0))
    which = np.minimum(((conf - 0.5) * 10).astype(int), 4)
    want = sum((which == b).sum() / len(d) * abs(conf[which == b].mean() - right[which == b].mean())
               for b in range(5) if (which == b).any())
    ece, table = train_rm.calibration(d.tolist())
    assert ece == pytest.approx(want, abs=1e-12)
    assert sum(n for _, _, n in table) == len(d)


def test_gold_agreement_counts_only_the_pairs_gold_orders():
    # gold of 'sort 2 1': "1 2" -> 1, "2 1" -> 0, "hello" -> 0 (a tie with "2 1", not counted)
    records = [{"prompt": "sort 2 1", "responses": ["1 2", "2 1", "hello"]}]
    assert train_rm.gold_agreement(records, [[3.0, 1.0, 2.0]]) == 1.0
    assert train_rm.gold_agreement(records, [[0.0, 1.0, 0.0]]) == 0.25  # wrong on (1 2, 2 1); a score tie counts 1/2
    # gold ties every pair: a prompt its judge cannot parse (0 for any response), or two wrong answers. There is
    # nothing to agree on: None, not an agreement of 0
    assert train_rm.gold_agreement([{"prompt": "hi", "responses": ["a", "b"]}], [[1.0, 0.0]]) is None
    assert train_rm.gold_agreement([{"prompt": "sort 2 1", "responses": ["2 1", "x"]}], [[1.0, 0.0]]) is None


def test_nothing_left_names_the_flag_and_file_of_the_split():
    with_val = train_rm.Config(data="a.jsonl", val_data="b.jsonl")
    assert train_common.nothing_left("train", with_val, "record") == "--data a.jsonl: no record"
    assert train_common.nothing_left("val", with_val, "record") == "--val_data b.jsonl: no record"
    split = train_rm.Config(data="a.jsonl", val_frac=0.2)
    assert train_common.nothing_left("train", split, "record") == "--data a.jsonl: no training record"
    assert train_common.nothing_left("val", split, "record") == "--data a.jsonl: no held-out record (--val_frac 0.2)"


def test_drop_ties_keeps_the_better_ranked_copy():
    records = [{"prompt": "p", "responses": ["a", "b", "a"], "ranking": [2, 1, 0]},
               {"prompt": "q", "responses": ["x", "x"], "ranking": [1, 0]}]
    out, n = train_rm.drop_ties(records)
    assert out == [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]}] and n == 2


def test_nan_loss_stops_before_the_step_and_keeps_the_checkpoint(sft, tmp_path, monkeypatch, capsys, one_thread):
    """A NaN ranking loss at step 3: one line naming step 3, exit status 2, the checkpoint of step 2 kept."""
    real, calls = train_rm.kwise_ranking_loss, [0]

    def nan_at_step_3(*a, **kw):
        loss = real(*a, **kw)
        if torch.is_grad_enabled():  # the training loss, not the held-out evaluation
            calls[0] += 1
            if calls[0] == 3:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(train_rm, "kwise_ranking_loss", nan_at_step_3)
    out = tmp_path / "rm"
    monkeypatch.setattr(sys, "argv", ["train_rm.py", *rm_args(sft, out), "--ckpt_interval", "1", "--max_steps", "10",
                                      "--eval_batches", "2"])
    with pytest.raises(SystemExit) as e:
        utils.run(train_rm.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: step 3: non-finite loss nan"), err
    for name in ("ckpt.pt", "train_state.pt"):
        assert torch.load(out / name, weights_only=True)["step"] == 2, name
    model = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in model.values())


def run_rm(monkeypatch, capsys, argv):
    """train_rm.py's main(argv) as utils.run calls it -> (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["train_rm.py", *argv])
    try:
        utils.run(train_rm.main)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def short_rm_args(sft, data, out, *extra, val_data=None):
    """Two steps on a small preference file (its own directory, so that its meta.json is the test's)."""
    return ["--data", str(data), "--init_from", str(sft / "sft"), "--out_dir", str(out), "--sft_data",
            str(sft / "data/sft.jsonl"), "--norm_samples", "20", "--batch_size", "4", "--max_steps", "2",
            "--eval_batches", "1", *(["--val_data", str(val_data)] if val_data else ["--val_frac", "0.25"]),
            "--device", "cpu", *extra]


def test_a_meta_json_that_is_not_the_task_s_is_not_built_in_data(sft, tmp_path, monkeypatch, capsys, one_thread):
    """
    A meta.json of the user's own beside the data (not the task's keys, or not JSON) means no built-in metrics, and
    the run ends with its normalised checkpoint; one that claims to be the task's but is broken stops the run at the
    start, in one line naming the file and the field, with nothing written.
    """
    data = tmp_path / "mydata"
    data.mkdir()
    prefs = write_prefs(data / "prefs.jsonl")
    for i, text in enumerate(['{"dataset": "mine"}', "not json", "[1, 2]"]):
        (data / "meta.json").write_text(text)
        out = tmp_path / f"rm{i}"
        code, err = run_rm(monkeypatch, capsys, short_rm_args(sft, prefs, out))
        assert code == 0, (text, err)
        final = read_metrics(out)[-1]
        assert final["final"] and "annotator_agreement" not in final and math.isfinite(final["reward_std"])
        assert math.isfinite(torch.load(out / "ckpt.pt", weights_only=True)["reward_std"])
    meta = {k: 0.5 for k in tasks.META_KEYS}
    for field, value in (("annotator_beta", None), ("gold_perfect", "1.0")):
        broken = {k: v for k, v in {**meta, field: value}.items() if v is not None}
        (data / "meta.json").write_text(json.dumps(broken))
        out = tmp_path / "broken"
        code, err = run_rm(monkeypatch, capsys, short_rm_args(sft, prefs, out))
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: {data / 'meta.json'}: field '{field}': "), err
        assert not out.exists()


def test_too_few_demonstrations_for_the_normalisation_are_refused(sft, tmp_path, monkeypatch, capsys, one_thread):
    """
    The reward's std needs 2 scores: --norm_samples 1, or --sft_data whose records do not fit the context but one,
    stops before anything is written, in one line naming the flag or the file and the count.
    """
    prefs = write_prefs(tmp_path / "prefs.jsonl")
    out = tmp_path / "rm"
    code, err = run_rm(monkeypatch, capsys, short_rm_args(sft, prefs, out, "--norm_samples", "1"))
    assert code == 2 and err == "error: --norm_samples must be at least 2, got 1\n", err
    assert not out.exists()
    long_sft = tmp_path / "long_sft.jsonl"
    long_sft.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "x" * 100}) + "\n" for i in range(3))
                        + json.dumps({"prompt": "sort 2 1", "response": "1 2"}) + "\n")
    code, err = run_rm(monkeypatch, capsys, short_rm_args(sft, prefs, out, "--sft_data", str(long_sft)))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {long_sft}: 1 of its first 4 demonstrations fit in 64 tokens"), err
    assert not out.exists()


@pytest.mark.parametrize("mixed", [False, True])
def test_gold_numbers_only_when_every_held_out_prompt_is_the_task_s(sft, tmp_path, monkeypatch, capsys, one_thread,
                                                                    mixed):
    """
    A comparison file of the user's own beside the task's meta.json (out/data/ after make): the gold judge gives 0 to
    any prompt that is not the task's, so the run logged made-up numbers (the annotator's agreement 0.5, the RM
    agreeing with gold on 0.000 of the pairs); now it logs no gold line and no gold fields. mixed: a held-out file of
    half the task's records and half the user's, whose numbers would be made up as much (some prompts the task's is
    not enough: every one must be).
    """
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(sft / "data/meta.json", data / "meta.json")
    mine = [json.dumps({"prompt": f"What is the capital of country {i}?", "chosen": f"City {i}.",
                        "rejected": f"I do not know {i}"}) + "\n" for i in range(40)]
    prefs = data / "my_prefs.jsonl"
    prefs.write_text("".join(mine))
    val = None
    if mixed:
        task = (sft / "data/prefs_eval.jsonl").read_text().splitlines(keepends=True)[:4]
        assert len(task) == 4 and all(tasks.parse_prompt(json.loads(r)["prompt"]) is not None for r in task)
        val = data / "mixed_eval.jsonl"
        val.write_text("".join(r for pair in zip(task, mine[:4]) for r in pair))
    out = tmp_path / "rm"
    monkeypatch.setattr(sys, "argv", ["train_rm.py", *short_rm_args(sft, prefs, out, val_data=val)])
    train_rm.main()
    stdout = capsys.readouterr().out
    final = read_metrics(out)[-1]
    assert final["final"] and "annotator_agreement" not in final and "val_gold_acc" not in final, final
    line = next(x for x in stdout.splitlines() if x.startswith("held-out pairwise accuracy"))
    assert " vs " not in line and "gold" not in line, line


@pytest.mark.parametrize("files, flags, message", [
    (("prefs", "long"), [], "--val_data {long}: no record keeps 2 responses that fit in 64 tokens"),
    (("long", "prefs"), [], "--data {long}: no record keeps 2 responses that fit in 64 tokens"),
    (("ties", None), ["--allow_ties"],
     "--data {ties}: no training record is left once ties are dropped (--allow_ties)"),
    (("prefs", "ties"), ["--allow_ties"], "--val_data {ties}: no record is left once ties are dropped (--allow_ties)"),
])
def test_a_split_with_nothing_left_names_its_file_and_the_reason(sft, tmp_path, monkeypatch, capsys, one_thread,
                                                                  files, flags, message):
    """
    Every record of one split too long, or (--allow_ties) every one a tie: one line naming the flag and the file, and
    for ties that they were dropped as ties (it said "no record keeps 2 responses that fit", of neither file).
    """
    paths = {"prefs": write_prefs(tmp_path / "prefs.jsonl"), "long": str(tmp_path / "long.jsonl"),
             "ties": str(tmp_path / "ties.jsonl")}
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"prompt": f"sort {i} 1", "chosen": "x" * 100,
                                                             "rejected": "y" * 100}) + "\n" for i in range(8)))
    (tmp_path / "ties.jsonl").write_text("".join(json.dumps({"prompt": f"sort {i} 1", "chosen": "1 2",
                                                             "rejected": "1 2"}) + "\n" for i in range(8)))
    data, val = files
    out = tmp_path / "rm"
    code, err = run_rm(monkeypatch, capsys, ["--data", paths[data], *(["--val_data", paths[val]] if val else []),
                                             "--init_from", str(sft / "sft"), "--out_dir", str(out), "--sft_data", "",
                                             "--batch_size", "4", "--max_steps", "1", "--eval_batches", "1",
                                             "--device", "cpu", *flags])
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: " + message.format(**paths)), err
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--sft_data", "", "--norm_samples", "3"],
     "--norm_samples does nothing with --sft_data '' (the held-out responses set the reward's mean and std)"),
    (["--lora_rank", "2", "--lora_targets", "head"],
     "--lora_targets 'head' matches head: the reward model's head trains in full, leave it out of the targets"),
    (["--lora_rank", "2", "--lora_targets", ""],
     "--lora_targets '' matches head: the reward model's head trains in full, leave it out of the targets"),
])
def test_flags_that_would_do_nothing_or_train_the_head_twice_are_refused(sft, tmp_path, monkeypatch, capsys, flags,
                                                                         message):
    """
    --norm_samples only slices --sft_data; an adapter on the head that trains in full added a redundant copy of it
    (lora.trainable held head.weight, head.bias, head.lora_A, head.lora_B), as train_ppo.py refuses for its critic.
    One line, exit 2, nothing written.
    """
    out = tmp_path / "rm"
    code, err = run_rm(monkeypatch, capsys, short_rm_args(sft, write_prefs(tmp_path / "prefs.jsonl"), out, *flags))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: " + message), err
    assert not out.exists()


def test_norm_samples_with_sft_data_and_lora_with_other_targets_pass():
    parse = lambda *argv: train_common.parse_stage_flags(train_rm.Config, list(argv))  # noqa: E731
    train_rm.check_flags(parse("--sft_data", "", "--lora_rank", "2"))  # the default targets leave the head out
    train_rm.check_flags(parse("--norm_samples", "3", "--lora_rank", "2", "--lora_targets", r"c_attn|c_fc"))
    train_rm.check_flags(train_rm.Config(sft_data="", norm_samples=3))  # built in code (a resumed run's): no _given


def test_pair_accuracy_matches_a_plain_count():
    random.seed(0)
    for _ in range(20):
        diffs = [random.choice([-1.5, 0.0, 0.25, 2.0]) for _ in range(random.randint(1, 9))]
        right = 0.0
        for d in diffs:  # the labelled winner above: 1, a tie: 1/2, below: 0
            if d > 0:
                right += 1.0
            elif d == 0:
                right += 0.5
        assert train_rm.pair_accuracy(diffs) == pytest.approx(right / len(diffs))
    assert train_rm.pair_accuracy([1.0, 0.0, -2.0, 3.0]) == 0.625


def test_drop_ties_matches_a_plain_walk_down_the_ranking():
    """
    Random records (K 2..5, some texts repeated, random rankings, some without ties) against a plain loop: walk the
    ranking best first and keep a response unless its text is already kept; the kept ones come out best first.
    """
    rng = random.Random(0)
    records = []
    for n in range(200):
        k = rng.randint(2, 5)
        texts = "abcde"[:rng.randint(1, k)] if n % 3 else "abcde"[:k]  # every third record has no tie
        responses = [rng.choice(texts) for _ in range(k)] if n % 3 else rng.sample(texts, k)
        records.append({"prompt": f"p{n}", "responses": responses, "ranking": rng.sample(range(k), k)})
    want, want_removed = [], 0
    for r in records:
        kept, seen = [], set()
        for i in r["ranking"]:
            if r["responses"][i] not in seen:
                seen.add(r["responses"][i])
                kept.append(i)
        want_removed += len(r["responses"]) - len(kept)
        if len(kept) >= 2:
            want.append({"prompt": r["prompt"], "responses": [r["responses"][i] for i in kept],
                         "ranking": list(range(len(kept)))})
    out, n_removed = train_rm.drop_ties(records)
    assert out == want and n_removed == want_removed
    assert 0 < want_removed and len(want) < len(records)  # ties were there, and some records lost all but one
    assert any(len(set(r["responses"])) == len(r["responses"]) for r in records)  # and records without one


def test_training_accuracy_is_the_mean_over_the_step_s_micro_batches(sft, tmp_path, monkeypatch, one_thread):
    """
    --grad_accum 2: the logged training acc averages the micro-batches (their sum would be 1.0 at the first step).
    The scalar head starts at zero, so every pair of the first step ties: acc 1/2 exactly.
    """
    out = tmp_path / "rm"
    monkeypatch.setattr(sys, "argv", ["train_rm.py", *short_rm_args(sft, write_prefs(tmp_path / "prefs.jsonl"), out,
                                                                     "--grad_accum", "2", "--log_interval", "1",
                                                                     "--max_steps", "1")])
    train_rm.main()
    rows = [r for r in read_metrics(out) if "acc" in r]
    assert [r["step"] for r in rows] == [1] and rows[0]["acc"] == 0.5, rows


def test_evaluate_matches_a_plain_loop_over_the_records():
    """
    Held-out loss, accuracy and margin over batches of unequal sizes and K, against a float64 loop over each record
    alone: r from each unpadded response's last token; a record's loss is the mean over its pairs of
    -log sigma(r_w - r_l), the loss the mean over records (not over batches); the margin the mean signed r_w - r_l.
    """
    torch.manual_seed(0)
    model = ScalarGPT(GPTConfig(block_size=32, vocab_size=258, n_layer=1, n_head=2, n_embd=16)).double()
    torch.nn.init.normal_(model.head.weight)
    rng = random.Random(2)
    examples = []
    for k in (2, 5, 3, 2, 2, 4, 2):
        prompt = [rng.randrange(256) for _ in range(rng.randint(1, 8))]
        examples.append({"ids": [prompt + [rng.randrange(256) for _ in range(rng.randint(1, 9))] for _ in range(k)],
                         "ranking": rng.sample(range(k), k)})
    rt = Runtime(torch.device("cpu"), "cpu", "float32")
    batches = [train_rm.make_batch(examples[a:b], 257, 32) for a, b in ((0, 1), (1, 3), (3, 7))]
    got, record_scores = train_rm.evaluate(model, batches, rt)
    losses, diffs = [], []
    with torch.no_grad():
        for ex in examples:
            r = [model(torch.tensor([ids]))[0, -1].item() for ids in ex["ids"]]
            rank = ex["ranking"]
            d = [r[rank[a]] - r[rank[b]] for a in range(len(rank)) for b in range(a + 1, len(rank))]
            losses.append(sum(math.log1p(math.exp(-x)) for x in d) / len(d))
            diffs += d
    assert got["val_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-9)
    assert got["val_margin"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-9, abs=1e-12)
    assert got["val_acc"] == pytest.approx(sum(x > 0 for x in diffs) / len(diffs), abs=1e-12)
    assert len(record_scores) == len(examples) and [len(s) for s in record_scores] == [len(e["ids"]) for e in examples]
    assert sum(diffs) / len(diffs) < sum(map(abs, diffs)) / len(diffs) - 0.1  # signed and absolute margins differ


def random_tiny_rm(tmp_path, seed):
    """A 1-layer reward model on the byte tokenizer with every weight (the head too) random, saved as a checkpoint."""
    torch.manual_seed(seed)
    tok = Tokenizer.byte_level()
    model = ScalarGPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    torch.nn.init.normal_(model.head.weight, std=1.0)  # scores a few units apart: confidences across the bins
    utils.save_checkpoint(str(tmp_path / "init"), utils.model_payload(model, tok, "rm", train_rm.Config(), 0))
    return model, tok


def random_prefs(rng, n, start):
    """n records of K = 2..4 short responses under a ranking (response indices, best first)."""
    words = ["sort", "the", "a", "1 2", "fox", "dog", "3"]
    out = []
    for i in range(n):
        k = rng.randint(2, 4)
        responses = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) + f" {start + i}.{j}"
                     for j in range(k)]
        out.append({"prompt": f"p{start + i} " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 3))),
                    "responses": responses, "ranking": rng.sample(range(k), k)})
    return out


def plain_record(model, tok, record):
    """float64 r of each response of a record alone (unpadded, the value at its last token) -> (r, r_w - r_l list)."""
    r = [model(torch.tensor([tok.render(record["prompt"], y)[0]]))[0, -1] for y in record["responses"]]
    rank = record["ranking"]
    return r, [r[rank[a]] - r[rank[b]] for a in range(len(rank)) for b in range(a + 1, len(rank))]


def plain_calibration(diffs, n_bins=5):
    """Expected calibration error over equal-width bins of sigma(|d|) on [0.5, 1] -> (ece, table), plainly."""
    bins = {}
    for d in diffs:
        conf = 1 / (1 + math.exp(-abs(d)))
        b = n_bins - 1 if conf >= 1 else math.floor((conf - 0.5) / (0.5 / n_bins))
        bins.setdefault(b, []).append((conf, 1.0 if d > 0 else 0.5 if d == 0 else 0.0))
    table = [[sum(c for c, _ in v) / len(v), sum(a for _, a in v) / len(v), len(v)] for _, v in sorted(bins.items())]
    return sum(n / len(diffs) * abs(c - a) for c, a, n in table), table


def test_calibration_table_matches_a_plain_binning_also_at_certainty():
    """
    The table's rows are [mean confidence, accuracy, count] per non-empty bin, low bins first; a difference so large
    that sigma(|d|) rounds to 1.0 goes to the last bin (not a sixth one).
    """
    rng = np.random.default_rng(1)
    diffs = np.round(rng.normal(0.3, 2.5, size=300), 2).tolist() + [0.0, 40.0, -55.0, 80.0]
    ece, table = train_rm.calibration(diffs)
    want_ece, want_table = plain_calibration(diffs)
    assert ece == pytest.approx(want_ece, abs=1e-12)
    assert len(table) == len(want_table) == 5
    for got, want in zip(table, want_table):
        assert got[:2] == pytest.approx(want[:2], abs=1e-4) and got[2] == want[2], (got, want)
    assert all(abs(c - a) > 1e-3 for c, a, _ in want_table)  # confidence and accuracy differ in every bin


def test_metrics_rows_and_the_normalisation_match_a_plain_recount(tmp_path, monkeypatch, capsys, one_thread):
    """
    Every number of the metrics rows and of the final normalisation against a plain float64 recount, on a run whose
    weights do not move (the optimizer is handed lr 0) and whose clock ticks 0.5 s a step: --grad_accum 2 over
    micro-batches of 2 and 1 prompts (7 prompts, batches of 2), a row per response (--share_prompts false), rows at the
    log steps 3 and 6, the evaluation step 5 (which starts a new window) and the last step 7. A row averages its
    window's steps (loss: the mean over the step's prompts; acc: the mean over its micro-batches), gives tokens and
    FLOPs over the window's time, the lr of its step (warmup + cosine) and the epoch; the held-out metrics are over
    every held-out record. With --sft_data '' the held-out responses set the reward's mean (0 after the shift) and
    std (of the same scores: the shift moves none of them apart).
    """
    model, tok = random_tiny_rm(tmp_path, 0)
    rng = random.Random(0)
    records, val_records = random_prefs(rng, 7, 0), random_prefs(rng, 5, 100)
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val_records))
    lrs = frozen_stage(monkeypatch, train_rm)
    out = tmp_path / "rm"
    lr, min_lr, warmup, max_steps = 1e-3, 1e-4, 2, 7
    monkeypatch.setattr(sys, "argv", [
        "train_rm.py", "--data", str(tmp_path / "prefs.jsonl"), "--val_data", str(tmp_path / "val.jsonl"),
        "--init_from", str(tmp_path / "init"), "--out_dir", str(out), "--sft_data", "", "--share_prompts", "false",
        "--batch_size", "2", "--grad_accum", "2", "--lr", str(lr), "--min_lr", str(min_lr), "--warmup", str(warmup),
        "--max_steps", str(max_steps), "--log_interval", "3", "--eval_interval", "5", "--ckpt_interval", "4",
        "--eval_batches", "3", "--device", "cpu", "--dtype", "float32"])
    train_rm.main()
    stdout = capsys.readouterr().out
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 3, 5, 6, 7, 7] and rows[-1]["final"]

    def want_lr(step):  # linear warmup to lr over `warmup` steps, then cosine from lr down to min_lr at max_steps
        if step < warmup:
            return lr * (step + 1) / warmup
        return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (max_steps - warmup))) / 2

    assert lrs == pytest.approx([want_lr(s) for s in range(max_steps)], rel=1e-12)
    model = model.double()
    sampler = train_rm.LengthGroupedSampler([max(len(tok.render(r["prompt"], y)[0]) for y in r["responses"])
                                             for r in records], 2, seed=0)
    drawn = [b for epoch in range(4) for b in sampler.batches(epoch)]
    steps = []  # per step: loss, grad norm, acc, real tokens, FLOPs, padding fraction
    for s in range(max_steps):
        micro = [[records[i] for i in b] for b in drawn[2 * s:2 * s + 2]]
        model.zero_grad()
        losses, accs, tokens, flops, pads = [], [], 0, 0.0, 0.0
        for m in micro:
            diffs = []
            for r in m:
                _, d = plain_record(model, tok, r)
                losses.append(sum(torch.nn.functional.softplus(-x) for x in d) / len(d))  # -log sigma(d), mean
                diffs += [x.item() for x in d]
            accs.append(sum(1.0 if x > 0 else 0.5 if x == 0 else 0.0 for x in diffs) / len(diffs))
            lengths = [len(tok.render(r["prompt"], y)[0]) for r in m for y in r["responses"]]
            width = 8 * math.ceil(max(lengths) / 8)  # padded to a multiple of 8
            tokens += sum(lengths)
            flops += model.flops_per_token(width) * sum(lengths)
            pads += (1 - sum(lengths) / (len(lengths) * width)) / 2
        loss = sum(losses) / len(losses)  # over the step's prompts, whichever micro-batch holds them
        loss.backward()
        norm = math.sqrt(sum((p.grad ** 2).sum().item() for p in model.parameters()))
        steps.append((loss.item(), norm, sum(accs) / 2, tokens, flops, pads))
    assert {len(b) for b in drawn[:2 * max_steps]} == {1, 2}  # some steps have micro-batches of unequal size
    val_diffs, val_losses, val_scores = [], [], []
    with torch.no_grad():
        for r in val_records:
            scores, d = plain_record(model, tok, r)
            val_scores += [x.item() for x in scores]
            val_diffs += [x.item() for x in d]
            val_losses.append(sum(math.log1p(math.exp(-x.item())) for x in d) / len(d))
    want_ece, want_table = plain_calibration(val_diffs)
    first = 0
    for row in rows[1:-1]:
        window = steps[first:row["step"]]
        n = len(window)
        assert row["loss"] == pytest.approx(sum(w[0] for w in window) / n, rel=1e-5), row
        assert row["grad_norm"] == pytest.approx(window[-1][1], rel=1e-4), row
        assert row["acc"] == pytest.approx(sum(w[2] for w in window) / n, rel=1e-5), row
        assert row["tok_per_s"] == pytest.approx(sum(w[3] for w in window) / (0.5 * n), rel=1e-5), row
        assert row["mfu"] == pytest.approx(sum(w[4] for w in window) / (0.5 * n) / 1e9, rel=1e-5), row
        assert row["pad_frac"] == pytest.approx(sum(w[5] for w in window) / n, rel=1e-5), row
        assert row["lr"] == pytest.approx(want_lr(row["step"] - 1), rel=1e-5), row
        assert row["epoch"] == pytest.approx(row["step"] * 2 / 4, rel=1e-5), row
        assert ("val_loss" in row) == (row["step"] in (5, 7)), row
        first = row["step"]
    for row in (rows[0], rows[2], rows[4], rows[5]):
        assert row["val_loss"] == pytest.approx(sum(val_losses) / len(val_losses), rel=1e-5), row
        assert row["val_acc"] == pytest.approx(sum(x > 0 for x in val_diffs) / len(val_diffs), rel=1e-5), row
        assert row["val_margin"] == pytest.approx(sum(val_diffs) / len(val_diffs), rel=1e-5), row
        assert row["val_ece"] == pytest.approx(want_ece, rel=1e-4), row
        assert [c for _, _, c in row["val_calibration"]] == [c for _, _, c in want_table], row
        for got, want in zip(row["val_calibration"], want_table):
            assert got[:2] == pytest.approx(want[:2], abs=2e-4), row
    assert len({round(s[0], 6) for s in steps}) == max_steps and len({round(s[5], 6) for s in steps}) > 2
    assert len({round(s[2], 6) for s in steps}) > 2 and len(want_table) > 1
    # the normalisation: the held-out responses, scored by the saved model, have mean 0 and the std of the scores
    final, ckpt = rows[-1], torch.load(out / "ckpt.pt", weights_only=True)
    want_std = float(np.std(val_scores, ddof=1))
    assert abs(final["reward_mean"]) < 1e-5 and abs(ckpt["reward_mean"]) < 1e-5
    for std in (final["reward_std"], ckpt["reward_std"]):
        assert std == pytest.approx(want_std, rel=1e-5)
    assert ckpt["model"]["head.bias"].item() == pytest.approx(model.head.bias.item() - np.mean(val_scores), abs=1e-5)
    # the progress lines: the row's numbers and the latest held-out metrics; the last lines: accuracy and the
    # normalisation over the held-out responses (their number, not the records')

    def val_line(r):
        return f"val acc {r['val_acc']:.3f} margin {r['val_margin']:.2f} ece {r['val_ece']:.3f}"

    lines = stdout.splitlines()
    steps_said = [x for x in lines if x.startswith("step ")]
    assert steps_said[0] == f"step 0/{max_steps} | {val_line(rows[0])}" and len(steps_said) == len(rows) - 1
    latest = rows[0]
    for row, line in zip(rows[1:-1], steps_said[1:]):
        latest = row if "val_acc" in row else latest
        assert line.startswith(f"step {row['step']}/{max_steps} | loss {row['loss']:.3f} | acc {row['acc']:.3f} | "
                               f"{val_line(latest)} | {train_common.fmt_count(row['tok_per_s'])} tok/s | "
                               f"mfu {100 * row['mfu']:.1f}% | ") and line.endswith(" left"), (line, row)
    n_responses = sum(len(r["responses"]) for r in val_records)
    assert n_responses > len(val_records) and lines[-2] == f"held-out pairwise accuracy {final['val_acc']:.3f}"
    assert lines[-1].startswith(f"done: step {max_steps}; rewards on {n_responses} held-out responses: mean "
                                f"{final['reward_mean']:.2e}, std {want_std:.3f}; "), lines[-1]


def frozen_rm_run(monkeypatch, argv):
    """train_rm.main on argv with the optimizer handed lr 0: the weights stay those of --init_from (but the bias)."""
    real_step = train_rm.optimizer_step
    monkeypatch.setattr(train_rm, "optimizer_step", lambda model, opt, lr, *a, **kw: real_step(model, opt, 0.0, *a,
                                                                                               **kw))
    monkeypatch.setattr(sys, "argv", ["train_rm.py", *argv])
    train_rm.main()


def test_gold_numbers_match_a_plain_count_over_the_held_out_records(tmp_path, monkeypatch, capsys, one_thread):
    """
    The built-in task: the final row's val_gold_acc is the fraction of the held-out pairs gold orders strictly on
    which the (fixed, random) RM agrees with gold, each record's responses scored alone, a score tie 1/2; and
    annotator_agreement the mean over all held-out pairs of sigma(beta |g_a - g_b|), a gold tie 1/2. Over 12 held-out
    records in 3 batches that the sampler does not keep in file order.
    """
    tasks.generate_task(str(tmp_path / "data"), n_sft=10, n_prefs=16, n_prefs_eval=12, n_prompts=16, n_eval=10)
    model, tok = random_tiny_rm(tmp_path, 1)
    val_path = tmp_path / "data/prefs_eval.jsonl"
    frozen_rm_run(monkeypatch, ["--data", str(tmp_path / "data/prefs.jsonl"), "--val_data", str(val_path),
                                "--init_from", str(tmp_path / "init"), "--out_dir", str(tmp_path / "rm"),
                                "--sft_data", "", "--batch_size", "4", "--max_steps", "1", "--eval_batches", "100",
                                "--device", "cpu", "--dtype", "float32"])
    final = read_metrics(tmp_path / "rm")[-1]
    records = train_rm.read_prefs(str(val_path))
    beta = json.loads((tmp_path / "data/meta.json").read_text())["annotator_beta"]
    agree, n, annot = 0.0, 0, []
    with torch.no_grad():
        for r in records:
            scores = [model(torch.tensor([tok.render(r["prompt"], y)[0]]))[0, -1].item() for y in r["responses"]]
            gold = [tasks.gold(r["prompt"], y) for y in r["responses"]]
            for a in range(len(gold)):
                for b in range(a + 1, len(gold)):
                    annot.append(0.5 if gold[a] == gold[b] else 1 / (1 + math.exp(-beta * abs(gold[a] - gold[b]))))
                    if gold[a] != gold[b]:
                        n += 1
                        same = (scores[a] > scores[b]) == (gold[a] > gold[b])
                        agree += 0.5 if scores[a] == scores[b] else float(same)
    assert len(records) == 12 and n > 10 and 0 < agree < n
    assert final["val_gold_acc"] == pytest.approx(agree / n, rel=1e-5)
    assert final["annotator_agreement"] == pytest.approx(sum(annot) / len(annot), rel=1e-5)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("held-out pairwise accuracy"))
    assert line == (f"held-out pairwise accuracy {final['val_acc']:.3f} vs the annotator's agreement with gold on the "
                    f"same pairs {final['annotator_agreement']:.3f}; RM agrees with gold on {agree / n:.3f} of the "
                    f"pairs gold does not tie"), line
    assert f"{agree / n:.3f}" != f"{final['annotator_agreement']:.3f}"


def test_a_lora_run_trains_the_head_in_full_and_the_adapters_only(tmp_path, monkeypatch, one_thread):
    """
    --lora_rank 2: after two steps the merged checkpoint's head (trained in full) and the adapted layers (the merged
    update) have moved, the embeddings (frozen, not a target) have not.
    """
    model, _ = random_tiny_rm(tmp_path, 2)
    rng = random.Random(2)
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in random_prefs(rng, 12, 0)))
    monkeypatch.setattr(sys, "argv", ["train_rm.py", "--data", str(tmp_path / "prefs.jsonl"), "--val_frac", "0.25",
                                      "--init_from", str(tmp_path / "init"), "--out_dir", str(tmp_path / "rm"),
                                      "--sft_data", "", "--lora_rank", "2", "--lr", "1e-2", "--warmup", "1",
                                      "--batch_size", "4", "--max_steps", "2", "--device", "cpu", "--dtype", "float32"])
    train_rm.main()
    got, init = torch.load(tmp_path / "rm/ckpt.pt", weights_only=True)["model"], model.state_dict()
    assert (got["head.weight"] - init["head.weight"]).abs().max() > 1e-3
    assert (got["transformer.h.0.attn.c_attn.weight"] - init["transformer.h.0.attn.c_attn.weight"]).abs().max() > 1e-4
    assert torch.equal(got["transformer.wte.weight"], init["transformer.wte.weight"])


def test_a_lora_run_resumed_after_its_adapters_moved_ends_where_the_uninterrupted_one_does(tmp_path, monkeypatch,
                                                                                            one_thread):
    """
    --lora_rank 2 from a reward model whose head is not zero (so the adapters train from the first step), stopped at
    step 2 and resumed: the resumed run starts again from --init_from's weights with the saved adapters, so its
    merged checkpoint equals the uninterrupted run's (the old LoRA resume test stops at step 1, where a zero head
    leaves the adapters at 0 and a resume from the merged ckpt.pt looks the same).
    """
    model, _ = random_tiny_rm(tmp_path, 3)
    rng = random.Random(3)
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in random_prefs(rng, 12, 0)))
    common = ["train_rm.py", "--data", str(tmp_path / "prefs.jsonl"), "--val_frac", "0.25", "--init_from",
              str(tmp_path / "init"), "--sft_data", "", "--lora_rank", "2", "--lr", "1e-2", "--warmup", "1",
              "--batch_size", "4", "--max_steps", "4", "--ckpt_interval", "2", "--device", "cpu", "--dtype", "float32"]
    for out, extra in (("full", []), ("part", ["--stop_at", "2"]), ("part", ["--resume", "on"])):
        monkeypatch.setattr(sys, "argv", [*common, "--out_dir", str(tmp_path / out), *extra])
        train_rm.main()
    a, b = (torch.load(tmp_path / out / "ckpt.pt", weights_only=True) for out in ("full", "part"))
    key = "transformer.h.0.attn.c_attn.weight"
    assert (a["model"][key] - model.state_dict()[key]).abs().max() > 1e-4  # the adapters moved it
    assert all(torch.allclose(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-7) for k in a["model"])


def test_score_sequences_puts_each_score_in_its_place():
    """
    score_sequences (the normalisation's scorer) batches by length, not in input order: each returned score is still
    its own sequence's value at its last token, as scored alone and unpadded.
    """
    torch.manual_seed(5)
    model = ScalarGPT(GPTConfig(block_size=32, vocab_size=258, n_layer=1, n_head=2, n_embd=16))
    torch.nn.init.normal_(model.head.weight)
    torch.nn.init.normal_(model.head.bias)
    rng = random.Random(5)
    seqs = [[rng.randrange(256) for _ in range(rng.randint(2, 30))] for _ in range(11)]
    got = train_rm.score_sequences(model, seqs, 257, 3, 32, Runtime(torch.device("cpu"), "cpu", "float32"))
    with torch.no_grad():
        want = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])
    assert got.shape == (11,) and torch.allclose(got, want, atol=1e-5), (got, want)
    batches = train_rm.LengthGroupedSampler([len(s) for s in seqs], 3, shuffle=False).batches(0)
    assert any(b != sorted(b) for b in batches)  # a batch's sequences are not in input order
    assert want.std() > 0.1


def test_center_coef_and_the_normalisation_on_demonstrations_match_a_plain_recount(tmp_path, monkeypatch, one_thread):
    """
    --center_coef 0.5, one step over every training prompt (one micro-batch): the logged loss and gradient norm are
    those of a float64 recount of L = mean over prompts of the mean over their pairs of -log sigma(r_w - r_l)
    + 0.5 * mean over prompts of the mean over their pairs of (r_a + r_b)^2. --sft_data with --norm_samples 4 of its
    6 demonstrations: the head's bias shifts by the mean of the first 4 demonstrations' scores (prompt + response +
    EOS, each alone), and the checkpoint stores mean 0 and their std.
    """
    model, tok = random_tiny_rm(tmp_path, 4)
    rng = random.Random(4)
    records, val_records = random_prefs(rng, 5, 0), random_prefs(rng, 3, 100)
    demos = [{"prompt": f"d{i} sort 3 1", "response": " ".join(rng.choice(["1", "3", "fox", "the"])
                                                            for _ in range(rng.randint(1, 5)))} for i in range(6)]
    for name, rows in (("prefs", records), ("val", val_records), ("sft", demos)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm"
    frozen_rm_run(monkeypatch, ["--data", str(tmp_path / "prefs.jsonl"), "--val_data", str(tmp_path / "val.jsonl"),
                                "--init_from", str(tmp_path / "init"), "--out_dir", str(out), "--sft_data",
                                str(tmp_path / "sft.jsonl"), "--norm_samples", "4", "--center_coef", "0.5",
                                "--batch_size", "8", "--max_steps", "1", "--log_interval", "1", "--device", "cpu",
                                "--dtype", "float32"])
    row = [r for r in read_metrics(out) if "loss" in r][0]
    model = model.double()
    bt, center = [], []
    for r in records:
        scores, d = plain_record(model, tok, r)
        bt.append(sum(torch.nn.functional.softplus(-x) for x in d) / len(d))
        k = len(scores)
        sums = [(scores[a] + scores[b]) ** 2 for a in range(k) for b in range(a + 1, k)]
        center.append(sum(sums) / len(sums))
    bt_loss, center_loss = sum(bt) / len(bt), sum(center) / len(center)
    loss = bt_loss + 0.5 * center_loss
    loss.backward()
    norm = math.sqrt(sum((p.grad ** 2).sum().item() for p in model.parameters()))
    assert center_loss.item() > 0.1 * bt_loss.item()  # the centering term weighs in
    assert row["step"] == 1 and row["loss"] == pytest.approx(loss.item(), rel=1e-5), row
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-4), row
    with torch.no_grad():
        demo_scores = [model(torch.tensor([tok.render(d["prompt"], d["response"])[0]]))[0, -1].item() for d in demos]
    first4 = demo_scores[:4]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert abs(ckpt["reward_mean"]) < 1e-5
    assert ckpt["reward_std"] == pytest.approx(float(np.std(first4, ddof=1)), rel=1e-5)
    assert ckpt["model"]["head.bias"].item() == pytest.approx(model.head.bias.item() - np.mean(first4), abs=1e-5)
    assert abs(np.mean(first4) - np.mean(demo_scores[:3])) > 1e-3 and abs(np.mean(first4) - np.mean(demo_scores)) > 1e-3


def test_allow_ties_counts_the_ties_of_both_files_and_eval_batches_limits_the_held_out_metrics(tmp_path, monkeypatch,
                                                                                              capsys, one_thread):
    """
    --allow_ties with ties in both files: the training file's record loses 1 response, the held-out file's 3 (a record
    of two identical responses, dropped whole, and one of 4 with 3 copies of its best): the data line says 4 (counted by
    hand). --eval_batches 1 of the 2 held-out batches: the step-0 held-out loss is the plain mean over the records of
    the first batch only. The one checkpoint of the last step is the normalised one.
    """
    model, tok = random_tiny_rm(tmp_path, 6)
    rng = random.Random(6)
    train = random_prefs(rng, 6, 0) + [{"prompt": "t1", "responses": ["a b", "c", "a b"], "ranking": [2, 1, 0]}]
    val = random_prefs(rng, 3, 100) + [{"prompt": "t2", "responses": ["x", "x"], "ranking": [0, 1]},
                                       {"prompt": "t3", "responses": ["y", "z", "y", "y"], "ranking": [0, 1, 2, 3]}]
    for name, rows in (("prefs", train), ("val", val)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm"
    real_save, saved = train_rm.save_run, []  # the last step is saved once, normalised: no plain checkpoint before it

    def save_run(out_dir, payload, *a, **kw):
        saved.append((payload["step"], "reward_std" in payload))
        return real_save(out_dir, payload, *a, **kw)

    monkeypatch.setattr(train_rm, "save_run", save_run)
    frozen_rm_run(monkeypatch, ["--data", str(tmp_path / "prefs.jsonl"), "--val_data", str(tmp_path / "val.jsonl"),
                                "--init_from", str(tmp_path / "init"), "--out_dir", str(out), "--sft_data", "",
                                "--allow_ties", "--batch_size", "2", "--eval_batches", "1", "--max_steps", "1",
                                "--device", "cpu", "--dtype", "float32"])
    data_line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("data: "))
    assert data_line.endswith("; 4 tied responses dropped"), data_line
    assert saved == [(1, True)], saved
    kept = val[:3] + [{"prompt": "t3", "responses": ["y", "z"], "ranking": [0, 1]}]  # as drop_ties leaves them
    lengths = [max(len(tok.render(r["prompt"], y)[0]) for y in r["responses"]) for r in kept]
    first = train_rm.LengthGroupedSampler(lengths, 2, seed=0).batches(0)[0]
    model = model.double()
    with torch.no_grad():
        losses = [sum(math.log1p(math.exp(-x.item())) for x in plain_record(model, tok, r)[1])
                  / len(plain_record(model, tok, r)[1]) for r in kept]
    want = sum(losses[i] for i in first) / len(first)
    assert abs(want - sum(losses) / len(losses)) > 1e-3  # the other batch would show
    assert read_metrics(out)[0]["val_loss"] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--norm_samples", "1"], "--norm_samples must be at least 2, got 1"),
    (["--center_coef", "-0.01"], "--center_coef must be >= 0, got -0.01"),
])
def test_check_flags_refuses_norm_samples_and_center_coef_just_past_their_bounds(argv, message):
    with pytest.raises(utils.UserError) as e:
        train_rm.check_flags(train_common.parse_stage_flags(train_rm.Config, argv))
    assert str(e.value) == message
    train_rm.check_flags(train_common.parse_stage_flags(train_rm.Config, ["--norm_samples", "2", "--center_coef", "0"]))


def test_out_dir_that_is_init_from_is_refused(tmp_path, monkeypatch, capsys):
    # a run pointed at the checkpoint it starts from would overwrite it: refused before anything is read or written
    random_tiny_rm(tmp_path, 7)
    init = tmp_path / "init"
    before = (init / "ckpt.pt").read_bytes()
    code, err = run_rm(monkeypatch, capsys, ["--data", str(tmp_path / "none.jsonl"), "--init_from", str(init),
                                             "--out_dir", str(init) + "/", "--device", "cpu"])
    assert code == 2 and err == (f"error: --out_dir {init}/ is also --init_from: the run would overwrite the "
                                 f"checkpoint it starts from; pick another --out_dir\n"), err
    assert sorted(p.name for p in init.iterdir()) == ["ckpt.pt"] and (init / "ckpt.pt").read_bytes() == before
