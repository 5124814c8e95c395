"""
train_dpo.py: dpo_loss and its gradient against float64 references, the pairs of a K-wise ranking, the sequence
log-probabilities, and the script end to end on a tiny random SFT checkpoint (subprocess): log 2 at step 0,
resume, over-long and bad preference files.
"""

import itertools
import json
import math
import random
import re
import sys

import pytest
import torch

from scripts import ROOT, read_metrics, script, track_checkpoint_dicts, without_timings

sys.path.insert(0, ROOT)  # train_dpo.py is a top-level script

from nanorlhf import tasks, train_common, utils
from nanorlhf.data import encode_prefs, ranked_pairs
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.tokenizer import Tokenizer

import train_dpo
from train_dpo import dpo_loss, make_batch, sequence_logprobs

TINY = dict(block_size=64, vocab_size=258, n_layer=2, n_head=2, n_embd=32)


def log_sigmoid(x):
    """log(1 / (1 + e^-x)) in float64, stable on both sides."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def random_logps(rng, P, ties=0):
    """Four lists of P sequence log-probs; the first `ties` pairs have equal implicit rewards."""
    pc = [rng.uniform(-40, -1) for _ in range(P)]
    pr = [rng.uniform(-40, -1) for _ in range(P)]
    rc = [x + rng.gauss(0, 3) for x in pc]
    rr = [x + rng.gauss(0, 3) for x in pr]
    for i in range(ties):
        pr[i] = rr[i] + (pc[i] - rc[i])  # pi/pi_ref the same for both responses
    return pc, pr, rc, rr


# -----------------------------------------------------------------------------
# the loss


def test_dpo_loss_and_stats_match_float64_loop():
    rng = random.Random(0)
    for P, beta in ((1, 0.1), (7, 0.5), (40, 2.0)):
        pc, pr, rc, rr = random_logps(rng, P, ties=min(P, 3))
        loss, stats = dpo_loss(*(torch.tensor(x, dtype=torch.float64) for x in (pc, pr, rc, rr)), beta)
        margins = [beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])) for i in range(P)]
        want = sum(-log_sigmoid(m) for m in margins) / P
        acc = sum(1.0 if m > 1e-12 else 0.5 if abs(m) <= 1e-12 else 0.0 for m in margins) / P
        assert loss.item() == pytest.approx(want, rel=1e-12)
        assert stats["margin"].item() == pytest.approx(sum(margins) / P, rel=1e-9, abs=1e-12)
        assert stats["chosen_reward"].item() == pytest.approx(sum(beta * (pc[i] - rc[i]) for i in range(P)) / P, rel=1e-9)
        assert stats["rejected_reward"].item() == pytest.approx(sum(beta * (pr[i] - rr[i]) for i in range(P)) / P,
                                                                rel=1e-9)
        # the constructed ties are exact only up to float rounding: compare with ties counted 1/2 when the
        # float64 margin came out exactly 0, which is what dpo_loss sees
        exact = [(torch.tensor(pc[i], dtype=torch.float64) - rc[i]) - (torch.tensor(pr[i], dtype=torch.float64) - rr[i])
                 for i in range(P)]
        acc_exact = sum(1.0 if e > 0 else 0.5 if e == 0 else 0.0 for e in exact) / P
        assert stats["accuracy"].item() == pytest.approx(acc_exact)
        assert abs(acc_exact - acc) <= 0.5 * min(P, 3) / P


def test_dpo_loss_at_initialisation_is_log_2_with_ties_counted_half():
    logps = torch.randn(16, dtype=torch.float64) * 10 - 20
    other = torch.randn(16, dtype=torch.float64) * 10 - 20
    loss, stats = dpo_loss(logps, other, logps, other, beta=0.1)  # pi = pi_ref
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert stats["accuracy"].item() == 0.5 and stats["margin"].item() == 0.0


def test_dpo_loss_gradient_matches_the_analytic_formula():
    """d L / d log pi(y_w)_i = -beta sigma(-m_i) / P and d L / d log pi(y_l)_i = +beta sigma(-m_i) / P."""
    rng = random.Random(1)
    for P, beta in ((3, 0.1), (25, 1.0)):
        pc, pr, rc, rr = random_logps(rng, P)
        tc = torch.tensor(pc, dtype=torch.float64, requires_grad=True)
        tr = torch.tensor(pr, dtype=torch.float64, requires_grad=True)
        loss, _ = dpo_loss(tc, tr, torch.tensor(rc, dtype=torch.float64), torch.tensor(rr, dtype=torch.float64), beta)
        loss.backward()
        for i in range(P):
            m = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
            assert tc.grad[i].item() == pytest.approx(-beta * sigmoid(-m) / P, rel=1e-10, abs=1e-15)
            assert tr.grad[i].item() == pytest.approx(beta * sigmoid(-m) / P, rel=1e-10, abs=1e-15)


def test_dpo_loss_is_finite_for_huge_margins():
    big = torch.tensor([1e4, -1e4], requires_grad=True)
    zero = torch.zeros(2)
    loss, stats = dpo_loss(big, zero, zero, zero, beta=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(1e4 / 2) and torch.isfinite(big.grad).all()
    assert stats["accuracy"].item() == 0.5


# -----------------------------------------------------------------------------
# pairs, batches, sequence log-probs


def test_ranked_pairs_are_every_pair_ordered_by_rank():
    rng = random.Random(2)
    for K in (2, 3, 4, 6):
        ranking = list(range(K))
        rng.shuffle(ranking)
        pairs = ranked_pairs(ranking)
        assert len(pairs) == math.comb(K, 2) == len(set(pairs))
        position = {r: p for p, r in enumerate(ranking)}
        want = {(a, b) for a, b in itertools.permutations(range(K), 2) if position[a] < position[b]}
        assert set(pairs) == want
    assert ranked_pairs([0, 2, 1]) == [(0, 2), (0, 1), (2, 1)]


def tiny_gpt(seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY)).eval()


@pytest.mark.parametrize("share_prompts", [False, True])
def test_sequence_logprobs_match_float64_loop_per_row(share_prompts):
    tok = Tokenizer.byte_level()
    model = tiny_gpt(0)
    records = [{"prompt": "sort 3 1 2", "responses": ["1 2 3", "3 2 1 !", "1 3"], "ranking": [0, 2, 1]},
               {"prompt": "sort 9 8 7 6 5 4", "responses": ["4 5 6 7 8 9 !", "x"], "ranking": [1, 0]}]
    examples = encode_prefs(records, tok, 64)[0]
    b = make_batch(examples, None, tok.pad_id, 64, share_prompts=share_prompts)
    assert ("unpack" in b) == share_prompts
    got = sequence_logprobs(model, b)
    m64 = tiny_gpt(0).double()
    rows = [tok.render(r["prompt"], y) for r in records for y in r["responses"]]
    for i, (ids, mask) in enumerate(rows):
        with torch.no_grad():
            lp = torch.log_softmax(m64(torch.tensor([ids]))[0].double(), dim=-1)  # (T, V), unpadded row
        want = sum(lp[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t])
        assert got[i].item() == pytest.approx(want, rel=1e-5)


def test_shared_prompt_logprobs_have_the_gradients_of_a_row_per_response():
    tok = Tokenizer.byte_level()
    records = [{"prompt": "sort 3 1 2", "responses": ["1 2 3", "3 2 1 !", "1 3"], "ranking": [0, 2, 1]},
               {"prompt": "sort 9 8 7", "responses": ["7 8 9 !", "x"], "ranking": [1, 0]}]
    examples = encode_prefs(records, tok, 64)[0]
    weights = torch.randn(5, dtype=torch.float64)
    grads = []
    for share in (False, True):
        model = tiny_gpt(0).double()
        (sequence_logprobs(model, make_batch(examples, None, tok.pad_id, 64, share)) * weights).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert any(g.abs().max() > 0 for g in grads[1])


def test_make_batch_pairs_point_at_the_ranked_responses():
    tok = Tokenizer.byte_level()
    records = [{"prompt": "sort 2 1", "responses": ["a", "bb", "ccc", "dddd"], "ranking": [2, 0, 3, 1]},
               {"prompt": "sort 5 4", "responses": ["x", "yy"], "ranking": [1, 0]}]
    examples = encode_prefs(records, tok, 64)[0]
    ref = [torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([10.0, 11.0])]
    b = make_batch(examples, ref, tok.pad_id, 64)
    assert len(b["winner"]) == 6 + 1
    flat = [r for rec in records for r in rec["responses"]]
    rank_of = {r: p for rec in records for p, r in enumerate(rec["responses"][i] for i in rec["ranking"])}
    for w, l in zip(b["winner"].tolist(), b["loser"].tolist()):
        assert (w < 4) == (l < 4)  # a pair never crosses prompts
        assert rank_of[flat[w]] < rank_of[flat[l]]
        assert b["ref_logps"][w].item() == (w if w < 4 else 10 + w - 4)


# -----------------------------------------------------------------------------
# end to end (subprocess)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    tasks.generate_task(str(d / "data"), n_sft=10, n_prefs=48, n_prefs_eval=16, n_prompts=10, n_eval=10)
    tok = Tokenizer.byte_level()
    utils.save_checkpoint(str(d / "sft"), utils.model_payload(tiny_gpt(3), tok, "sft", {"seed": 0}, 1))
    return d


def dpo_cmd(d, out, *extra, gold=True):
    """gold: the gold score on a few short samples (8 prompts, 8 tokens); else --gold off (which refuses them)."""
    return ["train_dpo.py", "--data", str(d / "data/prefs.jsonl"), "--val_data", str(d / "data/prefs_eval.jsonl"),
            "--sft", str(d / "sft"), "--out_dir", str(out), "--batch_size", "4", "--max_steps", "6", "--warmup", "2",
            "--eval_interval", "3", "--eval_batches", "2", "--log_interval", "1", "--ckpt_interval", "3",
            *(["--gold_prompts", "8", "--response_length", "8"] if gold else ["--gold", "off"]), "--lr", "1e-3", *extra]


def test_script_starts_at_log_2_learns_and_resumes(tiny_run):
    # rows at steps 2, 3 (an evaluation), 4 and 6, checkpoints at 3 and 6
    out = tiny_run / "run"
    script(*dpo_cmd(tiny_run, out, "--log_interval", "2"))
    rows = read_metrics(str(out))
    assert rows[0]["step"] == 0
    assert rows[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-5) and rows[0]["val_acc"] == 0.5
    assert [r["step"] for r in rows[1:]] == [2, 3, 4, 6]
    assert rows[-1]["loss"] < math.log(2) - 0.005  # it fits the training pairs (6 steps at lr 1e-3)
    assert all(0 <= r["gold"] <= 1 for r in rows if "val_loss" in r)  # the built-in task: gold is logged
    policy, _, ckpt = utils.load_model(str(out), kind="gpt")  # a policy, as evaluate.py loads it
    assert ckpt["stage"] == "dpo" and ckpt["step"] == 6 and ckpt["models_resident"] == 1
    # --resume auto, as a job scheduler reruns one command: an empty out_dir starts fresh (this job stops at 1,
    # before the first row)...
    out2 = tiny_run / "resumed"
    cmd = dpo_cmd(tiny_run, out2, "--log_interval", "2", "--resume", "auto")
    script(*cmd, "--stop_at", "1")
    state = torch.load(out2 / "train_state.pt", weights_only=True)
    assert state["step"] == 1 and state["window"]["steps"] == 1
    stop_row = read_metrics(str(out2))[1]  # the row and evaluation of the stop: step 1 alone
    assert stop_row["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1's loss is taken before its update
    script(*cmd)  # ... and the same command continues from the checkpoint: the same rows as the uninterrupted run,
    resumed = read_metrics(str(out2))  # the first (step 2) averaging steps 1 and 2 as well
    assert resumed[1] == stop_row and "gold" in stop_row  # but for the stop's row, with its evaluation
    assert without_timings(resumed[:1] + resumed[2:]) == without_timings(rows)
    # that evaluation's samples came from their own generator: the RNG states train_state.pt saves are the same
    a, b = (torch.load(d / "train_state.pt", weights_only=True)["rng"] for d in (out, out2))
    assert torch.equal(a["torch"], b["torch"]) and a["python"] == b["python"] and a["numpy"] == b["numpy"]
    # a bare --resume is on; the run's saved flags come back, so it has nothing left to do, which it says before
    # the reference pass (minutes on a real model) rather than after it
    stdout = script("train_dpo.py", "--out_dir", str(out2), "--resume").stdout
    assert "nothing to do" in stdout and "reference log-probs" not in stdout


def test_resume_in_another_stage_s_directory_says_so(tiny_run, tmp_path):
    """
    --resume with --out_dir at the SFT model and a flag given: the directory is named as another stage's before
    anything else is read of it.
    """
    p = script(*dpo_cmd(tiny_run, tiny_run / "sft", "--resume"), check=False)
    assert p.returncode == 2 and f"--out_dir {tiny_run / 'sft'} holds a checkpoint of the 'sft' stage" in p.stderr, \
        p.stderr


def test_shared_prompts_train_the_same_run(tiny_run):
    """Each prompt once with its K responses (the default) or a row per response: the same run up to rounding."""
    runs = []
    for share in ("true", "false"):  # in float32: bf16 would round the two layouts' matmuls differently
        script(*dpo_cmd(tiny_run, tiny_run / f"share_{share}", "--share_prompts", share, "--dtype", "float32"))
        runs.append(read_metrics(str(tiny_run / f"share_{share}")))
    shared, unshared = runs
    assert [r["step"] for r in shared] == [r["step"] for r in unshared]
    for a, b in zip(shared, unshared):
        for key in ("loss", "margin", "val_loss", "val_margin", "gold"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
        if a["step"] > 0:  # ... from fewer tokens: the prompts ran once
            assert 0 < a["tokens"] < b["tokens"] and 0 <= a["pad_frac"] < 1 and 0 <= b["pad_frac"] < 1, a["step"]


def write_prefs(path, extra=()):
    """A preference file of 8 short records that fit in TINY's 64 tokens, then `extra`."""
    records = [{"prompt": f"sort {i} 1", "chosen": "1 2", "rejected": "2 1"} for i in range(8)] + list(extra)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


OVER_LONG = [{"prompt": "sort 1 2", "chosen": "x" * 100, "rejected": "y" * 100},  # no response fits: dropped
             {"prompt": "p" * 80, "chosen": "a", "rejected": "b"},  # the prompt is cut for both responses: one prompt
             {"prompt": "sort 3 4", "responses": ["a", "b", "z" * 100], "ranking": [2, 0, 1]}]  # loses its best


def test_over_long_records_are_counted_and_a_gold_sample_must_fit_the_context(tiny_run, tmp_path):
    cmd = ["train_dpo.py", "--data", write_prefs(tmp_path / "prefs.jsonl", OVER_LONG), "--val_data",
           write_prefs(tmp_path / "val.jsonl"), "--sft", str(tiny_run / "sft"), "--batch_size", "4", "--max_steps",
           "1", "--eval_batches", "1"]
    p = script(*cmd, "--out_dir", str(tmp_path / "off"), "--gold", "off")
    assert ("too long for 64 tokens: 1 prompts cut from the left, 1 records dropped (fewer than 2 responses fit), "
            "1 responses dropped from the records kept") in p.stdout, p.stdout
    # block_size 64: no room for a gold sample's prompt
    p = script(*cmd, "--out_dir", str(tmp_path / "on"), "--gold", "on", "--response_length", "64", check=False)
    assert p.returncode == 2 and "--response_length 64 must be < block_size 64" in p.stderr, p.stderr
    assert "reference log-probs" not in p.stdout  # refused before the reference pass
    assert not (tmp_path / "on").exists()


def test_gold_on_with_prompts_the_judge_cannot_parse_is_refused(tiny_run, tmp_path, monkeypatch, capsys, one_thread):
    """
    Held-out prompts that are not the built-in task's (as a TRL-style file's): --gold on logged gold 0.000 at every
    evaluation; it is refused in one line, as train_ppo.py and train_grpo.py refuse it. --gold auto turns gold off.
    """
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"hello {i}", "chosen": f"yes {i}", "rejected": "no"}) + "\n"
                            for i in range(8)))
    out = tmp_path / "out"
    cmd = ["train_dpo.py", "--data", str(data), "--sft", str(tiny_run / "sft"), "--out_dir", str(out), "--batch_size",
           "2", "--max_steps", "1", "--eval_batches", "1", "--gold_prompts", "2", "--response_length", "8"]
    monkeypatch.setattr(sys, "argv", cmd + ["--gold", "on"])
    with pytest.raises(SystemExit) as e:
        utils.run(train_dpo.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --gold on: {data} holds prompts that are not the built-in task's, e.g. 'hello "), err
    assert not out.exists()
    monkeypatch.setattr(sys, "argv", cmd)  # --gold auto: no gold for these prompts
    train_dpo.main()
    assert not any("gold" in r for r in read_metrics(str(out)))


@pytest.mark.parametrize("flags, named", [
    (["--gold_prompts", "5", "--response_length", "500", "--temperature", "0.5"],
     "--gold_prompts and --response_length and --temperature do"),
    (["--temperature", "1.0"], "--temperature does"),  # named at its default: it still does nothing
])
def test_gold_sampling_flags_with_gold_off_are_refused(flags, named):
    # accepted and ignored before (with --gold on, --response_length 500 is refused for the block size)
    args = train_common.parse_stage_flags(train_dpo.Config, ["--gold", "off", *flags])
    with pytest.raises(utils.UserError) as e:
        train_dpo.check_flags(args)
    assert str(e.value) == f"{named} nothing with --gold off (no gold score's samples are drawn)"


def test_gold_sampling_flags_pass_with_gold_and_in_a_resumed_run_s_flags():
    parse = lambda *argv: train_common.parse_stage_flags(train_dpo.Config, list(argv))  # noqa: E731
    train_dpo.check_flags(parse("--gold_prompts", "5", "--response_length", "12", "--temperature", "0.5"))  # auto
    train_dpo.check_flags(parse("--gold", "on", "--temperature", "0.5"))
    train_dpo.check_flags(parse("--gold", "off"))
    train_dpo.check_flags(train_dpo.Config(gold="off", temperature=0.5))  # built in code: no _given


def test_gold_off_with_its_sampling_flags_exits_2_and_writes_nothing(tiny_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", dpo_cmd(tiny_run, out, "--gold", "off", "--temperature", "0.5", gold=False))
    with pytest.raises(SystemExit) as e:
        utils.run(train_dpo.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == "error: --temperature does nothing with --gold off (no gold score's " \
                                        "samples are drawn)\n", err
    assert not out.exists()


@pytest.mark.parametrize("data, val, message", [
    ("prefs", "long", "--val_data {d}/long.jsonl: no record keeps 2 responses that fit in 64 tokens"),
    ("long", "prefs", "--data {d}/long.jsonl: no record keeps 2 responses that fit in 64 tokens"),
    ("long", None, "--data {d}/long.jsonl: no training record keeps 2 responses that fit in 64 tokens"),
])
def test_a_split_with_no_record_that_fits_names_its_file(tiny_run, tmp_path, monkeypatch, capsys, one_thread, data,
                                                         val, message):
    # it said "no record keeps 2 responses that fit", of neither file: one line naming the flag and the file
    write_prefs(tmp_path / "prefs.jsonl")
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"prompt": f"sort {i} 1", "chosen": "x" * 100,
                                                             "rejected": "y" * 100}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["train_dpo.py", "--data", str(tmp_path / f"{data}.jsonl"),
                                      *(["--val_data", str(tmp_path / f"{val}.jsonl")] if val else []),
                                      "--sft", str(tiny_run / "sft"), "--out_dir", str(out), "--batch_size", "2",
                                      "--max_steps", "1", "--eval_batches", "1", "--gold", "off"])
    with pytest.raises(SystemExit) as e:
        utils.run(train_dpo.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: " + message.format(d=tmp_path)), err
    assert not out.exists()


def test_no_checkpoint_dict_is_kept_while_training(tiny_run, tmp_path, monkeypatch, one_thread):
    """The checkpoint dicts load_model and load_run return, CPU copies of the weights, are gone by the first step."""
    alive, refs = track_checkpoint_dicts(monkeypatch, train_dpo, "batch_loss")
    for extra in (["--stop_at", "1"], ["--resume", "on"]):  # a fresh run, then a resumed one
        monkeypatch.setattr(sys, "argv", dpo_cmd(tiny_run, tmp_path / "out", "--max_steps", "2", "--eval_batches", "1",
                                                 *extra, gold=False))
        train_dpo.main()
    assert len(refs) == 5 and alive and not any(alive), alive  # 2 load_model, then load_run and 2 load_model


@pytest.mark.parametrize("records, message", [
    ([{"prompt": "sort 1 2", "chosen": "1 2", "rejected": "2 1"}, {"prompt": "sort 3 4", "chosen": "3 4", "rejected": "3 4"}],
     "prefs.jsonl:2: field 'rejected'"),
    ([{"prompt": "sort 1 2", "responses": ["1 2"], "ranking": [0]}], "prefs.jsonl:1: field 'responses'"),
    ([{"prompt": "sort 1 2", "responses": ["1 2", "2 1", "1 2"], "ranking": [0, 1, 2]}], "prefs.jsonl:1: field 'responses'"),
])
def test_bad_preference_file_exits_2_and_writes_nothing(tiny_run, tmp_path, records, message):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    p = script("train_dpo.py", "--data", str(bad), "--val_data", str(bad), "--sft", str(tiny_run / "sft"),
               "--out_dir", str(out), check=False)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_beta_exits_2(tiny_run, tmp_path):
    p = script(*dpo_cmd(tiny_run, tmp_path / "out", "--beta", "0"), check=False)
    assert p.returncode == 2 and "--beta" in p.stderr
    assert not (tmp_path / "out").exists()


def test_nan_loss_stops_before_the_step_and_keeps_the_checkpoint(tiny_run, tmp_path, monkeypatch, capsys, one_thread):
    """
    A NaN training loss at step 4 stops the run with one line naming step 4 and the loss, exit status 2, before the
    optimizer step: the checkpoint of step 3 (and its train_state.pt) stays, with finite weights.
    """
    real, calls = train_dpo.batch_loss, [0]

    def nan_at_step_4(*a, **kw):
        loss, stats = real(*a, **kw)
        if torch.is_grad_enabled():  # the training loss, not the held-out evaluation
            calls[0] += 1
            if calls[0] == 4:
                return loss * float("nan"), stats
        return loss, stats

    monkeypatch.setattr(train_dpo, "batch_loss", nan_at_step_4)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", dpo_cmd(tiny_run, out, "--ckpt_interval", "1", gold=False))
    with pytest.raises(SystemExit) as e:
        utils.run(train_dpo.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: step 4: non-finite loss nan"), err
    for name in ("ckpt.pt", "train_state.pt"):
        assert torch.load(out / name, weights_only=True)["step"] == 3, name
    model = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in model.values())


def test_grad_clip_clips_the_gradient_the_optimizer_steps_on(tiny_run, tmp_path, monkeypatch, one_thread):
    """
    One step at lr 1e-3 (--warmup 1). --grad_clip 1e-12: the gradient AdamW takes has norm <= 1e-12, so its first
    step, lr * g / (|g| + 1e-8) per weight, moves no weight by more than lr * 1e-4. Unclipped (0), the same step
    moves weights by about lr.
    """
    sft = torch.load(tiny_run / "sft" / "ckpt.pt", weights_only=True)["model"]
    moved = {}
    for clip in ("1e-12", "0"):
        out = tmp_path / clip
        monkeypatch.setattr(sys, "argv", dpo_cmd(tiny_run, out, "--max_steps", "1", "--warmup", "1", "--eval_batches",
                                                 "1", "--grad_clip", clip, gold=False))
        train_dpo.main()
        model = torch.load(out / "ckpt.pt", weights_only=True)["model"]
        moved[clip] = max((v.float() - sft[k].float()).abs().max().item() for k, v in model.items())
    assert moved["1e-12"] <= 1e-2 * 1e-3 and moved["0"] > 0.5e-3, moved  # (1e-2: float32 rounds a weight near 1)


def test_evaluate_is_the_mean_over_all_pairs():
    """
    Held-out loss, accuracy and margin over batches of 6 pairs (K = 4) and of 2 (K = 2, twice): the float64 means
    over all 8 pairs of the per-pair terms, from log-probs of unpadded rows (a mean over batches weighs them 1:1).
    """
    tok = Tokenizer.byte_level()
    records = [{"prompt": "sort 3 1 2", "responses": ["1 2 3", "3 2 1 !", "1 3", "2"], "ranking": [0, 2, 3, 1]},
               {"prompt": "sort 9 8 7", "responses": ["7 8 9", "x"], "ranking": [1, 0]},
               {"prompt": "sort 5 4", "responses": ["4 5", "5 4 4"], "ranking": [0, 1]}]
    examples = encode_prefs(records, tok, 64)[0]
    policy, ref, beta = tiny_gpt(0).double(), tiny_gpt(1).double(), 0.5

    def logp(model, ids, mask):  # log pi(y|x) of one unpadded row, in float64
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)  # (T, V)
        return sum(lp[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t])

    rewards = []  # per example, r_hat of each response
    for ex in examples:
        rewards.append([beta * (logp(policy, ids, m) - logp(ref, ids, m)) for ids, m in zip(ex["ids"], ex["masks"])])
    ref_logps = [torch.tensor([logp(ref, ids, m) for ids, m in zip(ex["ids"], ex["masks"])], dtype=torch.float64)
                 for ex in examples]
    batches = [make_batch([examples[i] for i in b], [ref_logps[i] for i in b], tok.pad_id, 64) for b in ([0], [1, 2])]
    got = train_dpo.evaluate(policy, batches, beta, utils.Runtime(torch.device("cpu"), "cpu", "float32"))
    margins = [r[w] - r[l] for r, ex in zip(rewards, examples) for w, l in ranked_pairs(ex["ranking"])]
    assert len(margins) == 8 and all(m != 0 for m in margins)
    assert got["val_loss"] == pytest.approx(sum(-log_sigmoid(m) for m in margins) / 8, rel=1e-9)
    assert got["val_acc"] == pytest.approx(sum(m > 0 for m in margins) / 8, rel=1e-6)  # float32 per batch
    assert got["val_margin"] == pytest.approx(sum(margins) / 8, rel=1e-9)


def test_rows_average_the_steps_since_the_last_row_over_the_pairs_of_each_step(tiny_run, tmp_path, monkeypatch,
                                                                               capsys, one_thread):
    """
    6 steps of 2 micro-batches of prompts with K = 2, 3 or 4 responses (1, 3 or 6 pairs: the micro-batches of a step
    hold different numbers of pairs), stopped after step 5 (--stop_at) and resumed, rows at steps 2, 3 (an
    evaluation), 4, 5 (the stop's evaluation, off the schedule: the resumed run carries its sums on, so that the row
    of step 6 averages steps 5 and 6 as the uninterrupted run's would) and 6 (an evaluation). Each row recomputed
    from the training batches and batch_loss's numbers captured in the run: loss, acc, margin, chosen_reward and
    rejected_reward are the means over the steps since the last row of each step's mean over its pairs; tokens the
    mean over those steps of the real tokens of the step's rows (no shared prompts), pad_frac the mean of the step's
    mean padding fraction; lr the textbook schedule at the row's step (linear warmup to --lr over --warmup steps,
    then cosine to --min_lr at --max_steps, not at --stop_at). Every evaluation runs the first --eval_batches
    held-out batches.
    """
    records = [{"prompt": f"sort {i} {i + 1}", "responses": ["1 2", "2 1", "1 1 2", "2"][:2 + i % 3],
                "ranking": list(range(2 + i % 3))[::-1]} for i in range(24)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    real_loss, real_eval, calls, evals = train_dpo.batch_loss, train_dpo.evaluate, [], []

    def keep_loss(model, batch, beta, rt):
        loss, stats = real_loss(model, batch, beta, rt)
        if torch.is_grad_enabled():  # a training micro-batch, not the evaluation
            calls.append((batch, loss.item(), {k: v.item() for k, v in stats.items()}))
        return loss, stats

    def keep_eval(model, batches, beta, rt):
        evals.append([b["winner"].tolist() for b in batches])
        return real_eval(model, batches, beta, rt)

    monkeypatch.setattr(train_dpo, "batch_loss", keep_loss)
    monkeypatch.setattr(train_dpo, "evaluate", keep_eval)
    out = tmp_path / "out"
    argv = dpo_cmd(tiny_run, out, "--data", str(data), "--grad_accum", "2", "--log_interval", "2", "--share_prompts",
                   "false", "--dtype", "float32", "--min_lr", "2e-4", gold=False)
    monkeypatch.setattr(sys, "argv", argv + ["--stop_at", "5"])
    capsys.readouterr()
    train_dpo.main()
    stopped = capsys.readouterr().out.splitlines()
    (tmp_path / "at_stop").mkdir()
    (tmp_path / "at_stop" / "ckpt.pt").write_bytes((out / "ckpt.pt").read_bytes())
    monkeypatch.setattr(sys, "argv", ["train_dpo.py", "--out_dir", str(out), "--resume"])
    train_dpo.main()
    resumed = capsys.readouterr().out.splitlines()
    rows = read_metrics(str(out))
    assert [r["step"] for r in rows] == [0, 2, 3, 4, 5, 6] and len(calls) == 12
    # the progress lines: the step of the whole schedule (--max_steps, not --stop_at), the held-out numbers where the
    # row has them; the budget line's prompts per step are --batch_size x --grad_accum; the last line how it ended
    progress = {int(line.split("/")[0][5:]): line for line in stopped + resumed if line.startswith("step ")}
    assert sorted(progress) == [0, 2, 3, 4, 5, 6] and all(progress[s].startswith(f"step {s}/6 | ") for s in progress)
    for r in rows:
        val = f"val loss {r['val_loss']:.4f} acc {r['val_acc']:.3f} margin {r['val_margin']:.3f}" if "val_loss" in r \
            else "val -"
        assert f"| {val} |" in progress[r["step"]] + " |", progress[r["step"]]
    assert sum(", 6 steps x 8 prompts, models in memory while training: 1," in line for line in stopped) == 1
    assert stopped[-1] == "stopped at step 5 (--stop_at); continue with --resume"
    assert re.fullmatch(rf"done: step 6; \d+m\d\ds; saved {re.escape(str(out))}/ckpt\.pt", resumed[-1]), resumed[-1]
    # the resumed run trains the policy of the stop's checkpoint: step 6's first loss is that policy's on its batch
    policy = utils.load_model(str(tmp_path / "at_stop"), kind="gpt")[0]
    batch, loss, _ = calls[10]
    rt = utils.Runtime(torch.device("cpu"), "cpu", "float32")
    assert real_loss(policy, batch, 0.1, rt)[0].item() == pytest.approx(loss, rel=1e-6)
    assert [("val_loss" in r) for r in rows] == [True, False, True, False, True, True]
    assert len(evals) == 4 and all(e == evals[0] for e in evals) and len(evals[0]) == 2  # --eval_batches 2

    steps = []  # per step: the means over its pairs, its real tokens, its mean padding fraction
    for s in range(6):
        micro = calls[2 * s:2 * s + 2]
        pairs = [len(b["winner"]) for b, _, _ in micro]
        assert all(p >= 1 for p in pairs)
        mean = lambda values: sum(v * p for v, p in zip(values, pairs)) / sum(pairs)  # noqa: E731
        step = {"loss": mean([loss for _, loss, _ in micro])}
        for key, stat in (("acc", "accuracy"), ("margin", "margin"), ("chosen_reward", "chosen_reward"),
                          ("rejected_reward", "rejected_reward")):
            step[key] = mean([stats[stat] for _, _, stats in micro])
        real = [sum(sum(row) for row in b["attention_mask"].tolist()) for b, _, _ in micro]
        step["tokens"] = sum(real)
        step["pad_frac"] = sum(1 - r / b["attention_mask"].numel() for r, (b, _, _) in zip(real, micro)) / 2
        steps.append(step)
    assert len({sum(len(b["winner"]) for b, _, _ in calls[2 * s:2 * s + 2]) for s in range(6)} |
               {len(b["winner"]) for b, _, _ in calls}) > 2  # the pairs differ between micro-batches and steps

    def lr_at(s):  # s: the 0-based index of the step
        if s < 2:
            return 1e-3 * (s + 1) / 2
        return 2e-4 + 0.5 * (1 + math.cos(math.pi * (s - 2) / (6 - 2))) * (1e-3 - 2e-4)

    for row, (first, last) in zip(rows[1:], [(1, 2), (3, 3), (4, 4), (5, 5), (5, 6)]):
        window = steps[first - 1:last]
        for key in ("loss", "acc", "margin", "chosen_reward", "rejected_reward", "tokens", "pad_frac"):
            want = sum(s[key] for s in window) / len(window)
            assert row[key] == pytest.approx(want, rel=1e-5, abs=1e-6), (row["step"], key)
        assert row["lr"] == pytest.approx(lr_at(row["step"] - 1), rel=1e-5), row["step"]  # logged to 6 digits
    assert len({r["lr"] for r in rows[1:]}) == 4  # the peak at steps 2 and 3


@pytest.mark.parametrize("flags, message", [
    ({"beta": 0.0}, "--beta must be > 0, got 0.0"),
    ({"beta": -0.1}, "--beta must be > 0, got -0.1"),
    ({"gold": "yes"}, "--gold 'yes': expected auto, on or off"),
    ({"gold_prompts": 0}, "--gold_prompts and --response_length must be >= 1 and --temperature > 0"),
    ({"response_length": 0}, "--gold_prompts and --response_length must be >= 1 and --temperature > 0"),
    ({"temperature": 0.0}, "--gold_prompts and --response_length must be >= 1 and --temperature > 0"),
])
def test_check_flags_refuses_each_bad_value_in_one_message(flags, message):
    with pytest.raises(utils.UserError) as e:
        train_dpo.check_flags(train_dpo.Config(**flags))
    assert str(e.value) == message
    # the smallest values allowed pass
    train_dpo.check_flags(train_dpo.Config(beta=1e-9, gold_prompts=1, response_length=1, temperature=1e-9))


def test_gold_on_names_the_held_out_file_its_prompts_come_from(tiny_run, tmp_path, monkeypatch, capsys, one_thread):
    """
    The gold score samples the held-out prompts: with --val_data, those of that file. The task's prompts in --data
    and others in --val_data: --gold on is refused naming --val_data's file, before anything is written.
    """
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"prompt": f"hello {i}", "chosen": f"yes {i}", "rejected": "no"}) + "\n"
                           for i in range(4)))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["train_dpo.py", "--data", write_prefs(tmp_path / "prefs.jsonl"), "--val_data",
                                      str(val), "--sft", str(tiny_run / "sft"), "--out_dir", str(out), "--gold", "on"])
    with pytest.raises(SystemExit) as e:
        utils.run(train_dpo.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: --gold on: {val} holds prompts that are not the built-in "
                                                f"task's, e.g. 'hello 0'"), err
    assert not out.exists()


def test_resume_refuses_a_changed_held_out_file(tiny_run, tmp_path, monkeypatch, one_thread):
    """--val_data is one of the inputs train_state.pt records: edited after the run started, --resume is refused."""
    val = write_prefs(tmp_path / "val.jsonl")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["train_dpo.py", "--data", write_prefs(tmp_path / "prefs.jsonl"), "--val_data",
                                      val, "--sft", str(tiny_run / "sft"), "--out_dir", str(out), "--batch_size", "4",
                                      "--max_steps", "2", "--stop_at", "1", "--eval_batches", "1", "--gold", "off"])
    train_dpo.main()
    write_prefs(tmp_path / "val.jsonl", [{"prompt": "sort 9 1", "chosen": "1 9", "rejected": "9 1"}])
    monkeypatch.setattr(sys, "argv", ["train_dpo.py", "--out_dir", str(out), "--resume"])
    changed = re.escape(f"--resume: --val_data {val} is not what the run started from")
    with pytest.raises(utils.UserError, match=changed):
        train_dpo.main()
