"""
End-to-end tests of train_sft.py, run as the user runs it (a subprocess) with a tiny model on a small copy of
the built-in task: it learns, bad input is refused before anything is written, --resume continues exactly,
and the checkpoint loads without running code.
"""

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from scripts import ENV, ROOT, frozen_stage, read_metrics, script, track_checkpoint_dicts, without_timings

sys.path.insert(0, ROOT)  # train_sft.py is a top-level script

import export_hf
import train_sft as sft_stage
from nanorlhf import hf, tasks, train_common, utils
from nanorlhf.model import GPT, GPTConfig

TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "48", "--block_size", "64", "--batch_size", "32",
        "--lr", "3e-3", "--min_lr", "3e-4", "--warmup", "10", "--max_steps", "60", "--val_frac", "0.1",
        "--eval_interval", "30", "--eval_batches", "4", "--log_interval", "10", "--ckpt_interval", "30",
        "--dropout", "0.1", "--device", "cpu"]
GPT2_FILE = Path(__file__).resolve().parents[2] / "shared/data/gpt2.tiktoken"
needs_gpt2 = pytest.mark.skipif(not GPT2_FILE.exists(), reason="shared/data/gpt2.tiktoken not present")


def train_sft(*args, check=True):
    return script("train_sft.py", *args, check=check)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    tasks.generate_task(str(d), n_sft=2000, n_prefs=10, n_prefs_eval=10, n_prompts=10, n_eval=10)
    return d


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_full")
    train_sft("--data", str(data / "sft.jsonl"), "--out_dir", str(out), *TINY)
    return out


def test_ctrl_c_stops_a_run_in_one_line_and_it_resumes(data, tmp_path):
    # SIGINT (Ctrl-C) in the middle of training: Python's KeyboardInterrupt traceback before; now the one line
    # "interrupted", exit status 130, and the run goes on from its last checkpoint with --resume
    out = tmp_path / "sft"
    args = ["--data", str(data / "sft.jsonl"), "--out_dir", str(out), *TINY, "--max_steps", "100000",
            "--log_interval", "1", "--ckpt_interval", "5"]
    # Ctrl-C's handler set in the child first: a shell starts a background job with SIGINT ignored, and Python keeps an
    # ignored SIGINT ignored, so under `pytest &` the child would not see the signal at all
    ctrl_c = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    p = subprocess.Popen([sys.executable, "-c", ctrl_c, os.path.join(ROOT, "train_sft.py"), *args], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:  # wait for step 6: the checkpoint of step 5 is saved by then
            if line.startswith("step 6/"):
                break
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130 and err.endswith("interrupted\n") and "Traceback" not in err, err
    saved = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert saved >= 5
    train_sft("--out_dir", str(out), "--resume", "--stop_at", str(saved + 2))
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == saved + 2


def test_short_run_learns(full_run):
    rows = read_metrics(full_run)
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert [s for s, _ in val] == [0, 30, 60]
    start, end = val[0][1], val[-1][1]
    assert start > 4.5  # about log(258) for an untrained byte-level model
    assert end < 0.4 * start, val
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [10, 20, 30, 40, 50, 60]
    assert all(r["tok_per_s"] > 0 and 0 <= r["pad_frac"] < 1 and r["mfu"] > 0 for r in train)


def test_checkpoint_loads_weights_only(full_run):
    ckpt = torch.load(full_run / "ckpt.pt", weights_only=True)
    assert ckpt["stage"] == "sft" and ckpt["step"] == 60 and ckpt["model_kind"] == "gpt"
    assert ckpt["args"]["n_embd"] == 48
    state = torch.load(full_run / "train_state.pt", weights_only=True)
    assert state["step"] == 60 and {"optimizer", "rng", "data", "step", "window"} <= set(state)
    assert state["window"] == {"loss": 0.0, "pad_frac": 0.0, "steps": 0}  # the last row took every step
    model, tok, _ = utils.load_model(str(full_run), kind="gpt")
    assert model.config.n_layer == 2 and tok.name == "byte" and model.config.activation == "gelu"  # the default
    assert not [f for f in os.listdir(full_run) if ".tmp" in f]  # no temporary file left behind


def test_resume_gives_the_same_run(data, full_run, tmp_path):
    out = tmp_path / "sft"
    # --resume auto, as a job scheduler reruns one command: an empty out_dir starts fresh (this job stops at 25,
    # between the rows of steps 20 and 30)...
    cmd = ["--data", str(data / "sft.jsonl"), "--out_dir", str(out), *TINY, "--resume", "auto"]
    lines = train_sft(*cmd, "--stop_at", "25").stdout.splitlines()
    assert lines[-1] == "stopped at step 25 (--stop_at); continue with --resume"  # was "done: step 25, ..."
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 25 and state["window"]["steps"] == 5  # steps 21-25, which the row of step 30 averages
    p = train_sft(*cmd)  # ... and the same command continues from the checkpoint, with the run's saved flags
    assert "step 60/60" in p.stdout
    assert "nothing to do" in train_sft(*cmd).stdout
    want, got = read_metrics(full_run), read_metrics(out)
    assert [r["step"] for r in got] == [0, 10, 20, 25, 30, 40, 50, 60]  # and the row (and evaluation) of the stop
    got = [r for r in got if r["step"] != 25]
    assert without_timings(got) == without_timings(want)  # every loss, val loss, lr and grad norm, at every step
    a = torch.load(full_run / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("lora", [[], ["--lora_rank", "4"]])
def test_a_resumed_run_holds_no_checkpoint_dict_while_training(data, tmp_path, monkeypatch, one_thread, lora):
    """
    The checkpoint dicts load_run and load_model return, CPU copies of every weight, are gone by the first step
    of a resumed run, full or LoRA (before: the one load_run returned was held for the whole run).
    """
    alive, refs = track_checkpoint_dicts(monkeypatch, sft_stage, "sft_loss")
    cmd = ["train_sft.py", "--data", str(data / "sft.jsonl"), "--out_dir", str(tmp_path / "sft"), *TINY, *lora,
           "--max_steps", "4", "--eval_interval", "2", "--eval_batches", "1", "--ckpt_interval", "2"]
    for extra in (["--stop_at", "2"], ["--resume", "on"]):
        monkeypatch.setattr(sys, "argv", cmd + extra)
        sft_stage.main()
    assert torch.load(tmp_path / "sft" / "ckpt.pt", weights_only=True)["step"] == 4
    assert refs and alive and not any(alive[-2:]), alive  # the resumed run's last two steps


def test_resume_refuses_a_changed_flag(full_run):
    p = train_sft("--out_dir", str(full_run), "--resume", "--lr", "0.1", check=False)
    assert p.returncode == 2 and "--lr" in p.stderr


@pytest.mark.parametrize("line, what", [
    ('{"prompt": "sort 2 1", "response": "1 2"', "malformed JSON"),
    ('{"prompt": "sort 2 1", "response": 12}', "field 'response'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, line, what):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "sort 3 1 2", "response": "1 2 3"}\n' + line + "\n")
    out = tmp_path / "out"
    p = train_sft("--data", str(bad), "--out_dir", str(out), *TINY, check=False)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0, p.stderr  # one line, no traceback
    assert p.stderr.startswith("error: ") and f"{bad}:2" in p.stderr and what in p.stderr
    assert not out.exists()


def test_bad_flag_writes_nothing(data, tmp_path):
    out = tmp_path / "out"
    p = train_sft("--data", str(data / "sft.jsonl"), "--out_dir", str(out), *TINY, "--n_head", "5", check=False)
    assert p.returncode == 2 and "divisible" in p.stderr and not out.exists()
    p = train_sft("--data", str(data / "sft.jsonl"), "--out_dir", str(out), *TINY, "--activation", "relu", check=False)
    assert p.returncode == 2 and "--activation must be one of gelu_new, gelu, got 'relu'" in p.stderr
    assert not out.exists()


def test_scratch_only_flags_are_refused_with_init_from(data, full_run, tmp_path):
    # with --init_from a checkpoint, the shape flags and the GELU are the checkpoint's: one named would do nothing,
    # so it is refused (one line, exit 2, nothing written); left out, the checkpoint's are used
    out = tmp_path / "out"
    common = ["--data", str(data / "sft.jsonl"), "--out_dir", str(out), "--init_from", str(full_run)]
    p = train_sft(*common, "--activation", "gelu_new", "--n_layer", "3", check=False)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert "--n_layer, --activation: only for a model from scratch" in p.stderr and not out.exists()
    p = train_sft(*common, "--max_steps", "2", "--eval_interval", "2", "--batch_size", "4")
    model, _, _ = utils.load_model(str(out), kind="gpt")
    assert model.config.n_layer == 2 and model.config.dropout == 0.1  # the checkpoint's (TINY's), not the defaults


@pytest.mark.parametrize("argv, named", [
    (["--dropout", "0.0"], "--dropout"),  # the defaults were taken for "not given" and silently ignored
    (["--activation", "gelu"], "--activation"),
    (["--n_layer", "4", "--n_head", "4", "--n_embd", "128"], "--n_layer, --n_head, --n_embd"),
    (["--dropout", "0.1", "--activation", "gelu_new"], "--dropout, --activation"),  # the checkpoint's own values
])
def test_scratch_only_flags_named_with_init_from_are_refused_at_any_value(argv, named):
    args = train_common.parse_stage_flags(sft_stage.Config, ["--init_from", "out/sft", *argv])
    with pytest.raises(utils.UserError, match=f"^{named}: only for a model from scratch; --init_from out/sft keeps "
                                              f"the checkpoint's; leave {'them' if ', ' in named else 'it'} out$"):
        sft_stage.check_flags(args)
    # a resumed run's saved flags (built in code, no _given) were checked when it started
    sft_stage.check_flags(sft_stage.Config(init_from="out/sft", n_layer=1, activation="gelu_new"))


def init_model(*argv):
    return sft_stage.init_model(train_common.parse_stage_flags(sft_stage.Config, list(argv)))


def test_a_tokenizer_with_init_from_a_checkpoint_is_refused(full_run):
    # the checkpoint's own tokenizer is used: --tokenizer gpt2 (or a missing file) was accepted and ignored
    for spec in ("gpt2", "/nonexistent.tiktoken", "byte"):
        with pytest.raises(utils.UserError, match="^--tokenizer: only for a model from scratch .*--init_from "):
            init_model("--init_from", str(full_run), "--tokenizer", spec)
    assert init_model("--init_from", str(full_run))[1].name == "byte"


@needs_gpt2
def test_init_from_an_hf_export_brings_its_own_tokenizer(data, full_run, tmp_path):
    # export_hf.py's directory of the byte-level model: its tokenizer.tiktoken is the tokenizer, as a checkpoint's
    # is; GPT-2's ids would index its 258 byte embeddings (grown to 50258 rows), so GPT-2's tokenizer is refused
    hf_dir = tmp_path / "hf"
    export_hf.export(str(full_run), str(hf_dir))
    model, tok = init_model("--init_from", str(hf_dir))
    want, want_tok, _ = utils.load_model(str(full_run), kind="gpt")
    assert tok.to_dict() == want_tok.to_dict() and model.config.vocab_size == 258
    idx = torch.randint(0, 258, (2, 16))
    torch.testing.assert_close(model.eval()(idx), want.eval()(idx))
    assert init_model("--init_from", str(hf_dir), "--tokenizer", str(hf_dir / "tokenizer.tiktoken"))[1].name == "byte"
    out = tmp_path / "out"
    p = train_sft("--data", str(data / "sft.jsonl"), "--out_dir", str(out), "--init_from", str(hf_dir),
                  "--tokenizer", str(GPT2_FILE), "--max_steps", "1", "--batch_size", "4", "--eval_batches", "1",
                  check=False)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert "brings its own tokenizer (tokenizer.tiktoken, 258 ids)" in p.stderr and not out.exists()
    # without its tokenizer.tiktoken the directory is taken for GPT-2, which its vocab_size is not
    (hf_dir / "tokenizer.tiktoken").unlink()
    with pytest.raises(utils.UserError, match="config.json has vocab_size 258, not GPT-2's 50257"):
        init_model("--init_from", str(hf_dir), "--tokenizer", str(GPT2_FILE))


def test_init_from_an_hf_export_refuses_another_tokenizer_named_even_byte(tmp_path):
    # an export of a BPE model brings that BPE; `--tokenizer byte` named on the command line differs from it and is
    # refused like any other, not taken for the default and ignored
    from nanorlhf.tokenizer import Tokenizer, train_bpe
    tok = Tokenizer("bpe", train_bpe("sort 3 1 2 -> 1 2 3\n" * 40, 270))
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=8))
    utils.save_checkpoint(str(tmp_path / "sft"), utils.model_payload(model, tok, "sft", {"seed": 0}, 1))
    export_hf.export(str(tmp_path / "sft"), str(tmp_path / "hf"))
    assert init_model("--init_from", str(tmp_path / "hf"))[1].mergeable_ranks == tok.mergeable_ranks
    with pytest.raises(utils.UserError, match="brings its own tokenizer"):
        init_model("--init_from", str(tmp_path / "hf"), "--tokenizer", "byte")


def test_init_from_an_hf_export_with_a_hand_broken_vocab_size_or_tokenizer_is_one_line(tmp_path):
    # a string vocab_size was "gives 258 ids ... but config.json has vocab_size 258"; a tokenizer.tiktoken that is a
    # directory was "has no tokenizer.tiktoken of its own"
    import shutil
    from nanorlhf.tokenizer import Tokenizer
    tok = Tokenizer.byte_level()
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=8))
    utils.save_checkpoint(str(tmp_path / "sft"), utils.model_payload(model, tok, "sft", {"seed": 0}, 1))
    hf_dir = tmp_path / "hf"
    export_hf.export(str(tmp_path / "sft"), str(hf_dir))
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "vocab_size": "258"}))
    with pytest.raises(utils.UserError, match='^--init_from .*: vocab_size "258" in .*config.json is not a positive '):
        init_model("--init_from", str(hf_dir))
    (hf_dir / "config.json").write_text(json.dumps(config))
    (hf_dir / "tokenizer.tiktoken").unlink()
    shutil.copytree(tmp_path / "sft", hf_dir / "tokenizer.tiktoken")
    with pytest.raises(utils.UserError, match="^--init_from .*tokenizer.tiktoken is not a file$"):
        init_model("--init_from", str(hf_dir))


@needs_gpt2
def test_init_from_hf_gpt2_takes_gpt2s_tokenizer(tmp_path):
    # a Hugging Face GPT-2 (no tokenizer.tiktoken, vocab 50257: EOS last) gets the pad row, with GPT-2's BPE
    config = GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=8)
    hf_dir = tmp_path / "gpt2"
    hf_dir.mkdir()
    export_hf.save_safetensors(hf.hf_state_dict(GPT(config).state_dict(), config, "gpt"),
                               str(hf_dir / "model.safetensors"))
    (hf_dir / "config.json").write_text(json.dumps(hf.hf_config(config, "gpt", 50256, 50256)))
    model, tok = init_model("--init_from", str(hf_dir), "--tokenizer", str(GPT2_FILE))
    assert (tok.name, tok.vocab_size, model.config.vocab_size) == ("gpt2", 50258, 50258)
    with pytest.raises(utils.UserError, match="is a Hugging Face GPT-2: pass --tokenizer gpt2"):
        init_model("--init_from", str(hf_dir))
    # a GPT-2 that already has the pad row (50258, as a fine-tuned one exported without its tokenizer.tiktoken): taken
    config = dataclasses.replace(config, vocab_size=50258)
    export_hf.save_safetensors(hf.hf_state_dict(GPT(config).state_dict(), config, "gpt"),
                               str(hf_dir / "model.safetensors"))
    (hf_dir / "config.json").write_text(json.dumps(hf.hf_config(config, "gpt", 50256, 50257)))
    model, tok = init_model("--init_from", str(hf_dir), "--tokenizer", str(GPT2_FILE))
    assert (tok.name, tok.vocab_size, model.config.vocab_size) == ("gpt2", 50258, 50258)


def test_resume_flag_forms(tmp_path):
    """A bare --resume still means on; auto depends on out_dir holding both checkpoint files; others are refused."""
    args = train_common.parse_stage_flags(sft_stage.Config, ["--resume", "--lr", "0.1"])
    assert args.resume == "on" and args.lr == 0.1
    assert train_common.parse_stage_flags(sft_stage.Config, ["--lr", "0.1", "--resume"]).resume == "on"
    assert train_common.parse_stage_flags(sft_stage.Config, ["--resume", "auto"]).resume == "auto"
    assert train_common.parse_stage_flags(sft_stage.Config, []).resume == "off"
    assert not train_common.wants_resume("auto", str(tmp_path))
    (tmp_path / "ckpt.pt").write_bytes(b"")
    assert not train_common.wants_resume("auto", str(tmp_path))  # a first save that never finished
    (tmp_path / "train_state.pt").write_bytes(b"")
    assert train_common.wants_resume("auto", str(tmp_path)) and train_common.wants_resume("on", str(tmp_path))
    assert not train_common.wants_resume("off", str(tmp_path))
    with pytest.raises(utils.UserError, match="--resume 'yes'"):
        train_common.wants_resume("yes", str(tmp_path))


def test_resume_in_another_stage_s_directory_says_so(tmp_path, monkeypatch, capsys):
    """
    --resume with --out_dir at another stage's run (both its files) and a flag given: the directory is named as
    another stage's, not the flag as differing from that run's (which the saved flags were checked for first).
    """
    out = tmp_path / "rm"
    optimizer = types.SimpleNamespace(state_dict=lambda: {"state": {}, "param_groups": []})  # all save_run reads
    sampler = sft_stage.LengthGroupedSampler([3, 1, 2, 5], 2, seed=0)
    train_common.save_run(str(out), {"stage": "rm", "step": 1, "args": {"data": "out/data/prefs.jsonl"}}, optimizer,
                          sampler, 1)
    monkeypatch.setattr(sys, "argv", ["train_sft.py", "--out_dir", str(out), "--resume", "--data", "sft.jsonl"])
    with pytest.raises(SystemExit) as e:
        utils.run(sft_stage.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--out_dir {out} holds a checkpoint of the 'rm' stage" in err, err


@pytest.mark.parametrize("flags, message", [
    (["--lora_alpha", "64", "--lora_targets", "zzz"],
     "--lora_alpha and --lora_targets do nothing without --lora_rank > 0"),
    (["--lora_rank", "0", "--lora_targets", "zzz"], "--lora_targets does nothing without --lora_rank > 0"),
    (["--val_frac", "0.5", "--val_data", "{d}/sft.jsonl"],
     "--val_frac 0.5 does nothing with --val_data (the held-out set is {d}/sft.jsonl)"),
    (["--val_frac", "0.05", "--val_data", "{d}/sft.jsonl"],  # at its default too: it was accepted and ignored
     "--val_frac 0.05 does nothing with --val_data (the held-out set is {d}/sft.jsonl)"),
])
def test_flags_that_would_do_nothing_are_refused(tmp_path, monkeypatch, capsys, flags, message):
    # as train_ppo.py refuses them: one line, exit 2, before anything is read or written (in-process: main reads argv)
    (tmp_path / "sft.jsonl").write_text('{"prompt": "sort 2 1", "response": "1 2"}\n' * 20)
    out = tmp_path / "out"
    argv = ["--data", str(tmp_path / "sft.jsonl"), *[f.format(d=tmp_path) for f in flags]]
    refused_in_one_line(argv, message.format(d=tmp_path), out, monkeypatch, capsys)


def refused_in_one_line(argv, message, out, monkeypatch, capsys):
    """train_sft.py on argv and a tiny model, in-process (main reads sys.argv): exit 2, message, out not created."""
    argv = [*argv, "--out_dir", str(out), "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "32",
            "--batch_size", "4", "--max_steps", "1", "--eval_batches", "1", "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", ["train_sft.py", *argv])
    with pytest.raises(SystemExit) as e:
        utils.run(sft_stage.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: " + message), err
    assert not out.exists()


@pytest.mark.parametrize("data, val, message", [
    ("sft", "long", "--val_data {d}/long.jsonl: no example fits in 32 tokens with its whole response"),
    ("long", "sft", "--data {d}/long.jsonl: no example fits in 32 tokens with its whole response"),
    ("long", None, "--data {d}/long.jsonl: no training example fits in 32 tokens with its whole response"),
])
def test_a_split_with_no_example_that_fits_names_its_file(tmp_path, monkeypatch, capsys, data, val, message):
    # it said "no example fits", of neither file: one line naming the flag and the file, nothing written
    (tmp_path / "sft.jsonl").write_text('{"prompt": "sort 2 1", "response": "1 2"}\n' * 20)
    (tmp_path / "long.jsonl").write_text((json.dumps({"prompt": "sort 2 1", "response": "x" * 100}) + "\n") * 20)
    out = tmp_path / "out"
    argv = ["--data", str(tmp_path / f"{data}.jsonl"), *(["--val_data", str(tmp_path / f"{val}.jsonl")] if val else [])]
    refused_in_one_line(argv, message.format(d=tmp_path), out, monkeypatch, capsys)


def test_nothing_left_names_the_held_out_part_of_data():
    split = sft_stage.Config(data="a.jsonl", val_frac=0.2)
    assert train_common.nothing_left("val", split, "example") == "--data a.jsonl: no held-out example (--val_frac 0.2)"


def test_val_frac_without_val_data_and_lora_flags_with_a_rank_pass():
    parse = lambda *argv: train_common.parse_stage_flags(sft_stage.Config, list(argv))  # noqa: E731
    sft_stage.check_flags(parse("--val_frac", "0.05"))
    sft_stage.check_flags(parse("--lora_rank", "2", "--lora_alpha", "4", "--lora_targets", "attn"))
    sft_stage.check_flags(sft_stage.Config(lora_alpha=64.0))  # built in code (a resumed run's saved flags): no _given
    sft_stage.check_flags(sft_stage.Config(val_data="v.jsonl", val_frac=0.2))  # a resumed run's: checked at its start


def test_check_out_dir(tmp_path):
    sft, rm = tmp_path / "sft", tmp_path / "rm"
    utils.save_checkpoint(str(sft), {"stage": "sft", "step": 1, "w": torch.ones(3)})
    train_common.check_out_dir(str(sft), "sft", {})  # a stage rerun in its own directory: allowed
    train_common.check_out_dir(str(rm), "rm", {"--init_from": str(sft)})  # a new directory: allowed
    with pytest.raises(utils.UserError, match="holds a checkpoint of the 'sft' stage"):
        train_common.check_out_dir(str(sft), "rm", {})
    with pytest.raises(utils.UserError, match="is also --init_from"):  # the same directory, spelled otherwise
        train_common.check_out_dir(str(sft) + "/", "sft", {"--init_from": os.path.relpath(sft)})


def test_clip_grad_norm_zero_does_not_clip():
    """The one clipping rule of all three stages: 0 leaves the gradients alone, c > 0 scales them to norm c."""
    for max_norm, want in ((0.0, [3.0, 4.0]), (1.0, [0.6, 0.8]), (10.0, [3.0, 4.0])):
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.tensor([3.0, 4.0])
        norm = train_common.clip_grad_norm([p], max_norm)
        assert norm.item() == pytest.approx(5.0) and p.grad.tolist() == pytest.approx(want), max_norm
    p = train_sft("--grad_clip", "-1", check=False)
    assert p.returncode == 2 and "--grad_clip must be >= 0 (0: no clipping)" in p.stderr, p.stderr


def test_optimizer_step_stops_on_a_non_finite_gradient_before_the_step():
    """
    A NaN or inf gradient: NonFiniteError before AdamW touches the weights (they equal a copy taken before), and a
    message that starts with the step it names, or with "non-finite" when a caller names none (no stray ": " in
    front).
    """
    for where, bad, start in (("step 7", float("nan"), "step 7: non-finite grad_norm nan"),
                              ("", float("inf"), "non-finite grad_norm inf")):
        model = torch.nn.Linear(3, 2)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.randn(4, 3)).sum().backward()
        model.weight.grad[0, 0] = bad
        with pytest.raises(train_common.NonFiniteError) as e:
            train_common.optimizer_step(model, opt, 0.1, 1.0, where)
        assert str(e.value).startswith(start), str(e.value)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # finite gradients: the step runs and returns the norm before clipping, sqrt(sum g^2) computed the plain way
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    want = math.sqrt(sum(float(g) ** 2 for p in model.parameters() for g in p.grad.flatten()))
    before = model.weight.detach().clone()
    norm = train_common.optimizer_step(model, opt, 0.1, 0.0, "step 1", loss=torch.tensor(2.0))
    assert float(norm) == pytest.approx(want, rel=1e-6) and not torch.equal(model.weight, before)
    assert all(p.grad is None for p in model.parameters())


def test_nan_loss_stops_before_the_step_and_keeps_the_checkpoint(data, tmp_path, monkeypatch, capsys, one_thread):
    """
    A NaN loss at step 4 stops the run with one line naming step 4, exit status 2, before the optimizer step:
    the checkpoint of step 3 (and its train_state.pt) stays, with finite weights.
    """
    real, calls = sft_stage.sft_loss, [0]

    def nan_at_step_4(*a, **kw):
        loss = real(*a, **kw)
        if torch.is_grad_enabled():  # the training loss, not the held-out evaluation
            calls[0] += 1
            if calls[0] == 4:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(sft_stage, "sft_loss", nan_at_step_4)
    out = tmp_path / "sft"
    monkeypatch.setattr(sys, "argv", ["train_sft.py", "--data", str(data / "sft.jsonl"), "--out_dir", str(out), *TINY,
                                      "--ckpt_interval", "1", "--max_steps", "10", "--eval_batches", "1"])
    with pytest.raises(SystemExit) as e:
        utils.run(sft_stage.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: step 4: non-finite loss nan"), err
    for name in ("ckpt.pt", "train_state.pt"):
        assert torch.load(out / name, weights_only=True)["step"] == 3, name
    model = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in model.values())


def test_a_save_killed_between_its_files_resumes_from_the_last_complete_pair(tmp_path, monkeypatch, capsys):
    """
    save_run killed at any point of a save: while ckpt.pt is written after train_state.pt (the run could never be
    resumed: "a save was interrupted", forever), or between the renames of the two files. load_run then finds the
    pair of the last complete save, says so in one line, and so does it again after a second interrupted save.
    """
    out = str(tmp_path)
    optimizer = types.SimpleNamespace(state_dict=lambda: {"state": {}, "param_groups": []})  # all save_run reads
    sampler = sft_stage.LengthGroupedSampler([3, 1, 2, 5], 2, seed=0)

    def save(step):
        train_common.save_run(out, {"stage": "sft", "step": step}, optimizer, sampler, step)

    def steps():
        ckpt, state = train_common.load_run(out)
        assert ckpt["step"] == state["step"]
        return ckpt["step"]

    real_save, real_replace = torch.save, os.replace

    def killed_writing_ckpt(obj, f, *a, **kw):
        if os.path.basename(str(f)).startswith("ckpt.pt"):
            raise KeyboardInterrupt("killed while ckpt.pt is written")
        return real_save(obj, f, *a, **kw)

    def killed_renaming_ckpt(src, dst):
        if os.path.basename(dst) == "ckpt.pt":
            raise KeyboardInterrupt("killed between the renames")
        return real_replace(src, dst)

    save(2)
    kills = [(torch, "save", killed_writing_ckpt), (os, "replace", killed_renaming_ckpt),
             (os, "replace", killed_renaming_ckpt)]  # the last: a save of the run resumed from the kept pair
    for module, name, kill in kills:
        with monkeypatch.context() as m:
            m.setattr(module, name, kill)
            with pytest.raises(KeyboardInterrupt):
                save(4)
        assert steps() == 2
        assert not [f for f in os.listdir(out) if ".tmp" in f]
        said = capsys.readouterr().out
        if kill is killed_renaming_ckpt:  # train_state.pt is of step 4: the kept one of step 2 is taken
            assert said.count("\n") == 1 and "resuming from step 2 with train_state.prev.pt" in said, said
    save(4)  # a save that completes: the new pair, and nothing kept beside it
    assert steps() == 4 and sorted(os.listdir(out)) == ["ckpt.pt", "train_state.pt"]
    # a pair that disagrees with nothing kept (a save of an older version) is still refused
    utils.save_checkpoint(out, {**torch.load(tmp_path / "train_state.pt", weights_only=True), "step": 3},
                          "train_state.pt")
    with pytest.raises(utils.UserError, match="ckpt.pt is at step 4 but train_state.pt at step 3 .a save was"):
        train_common.load_run(out)


def test_a_run_killed_during_a_save_resumes_and_logs_each_step_once(data, tmp_path, monkeypatch, one_thread):
    """
    A run killed while it writes the checkpoint of step 4 (the last complete one is of step 2; steps 3 and 4 are
    logged) continues under --resume auto, and metrics.jsonl holds each step once: it used to refuse to resume
    ("a save was interrupted"), and a resumed run after a kill logged steps 3 and 4 twice.
    """
    out = tmp_path / "sft"
    argv = ["train_sft.py", "--data", str(data / "sft.jsonl"), "--out_dir", str(out), *TINY, "--n_embd", "16",
            "--batch_size", "8", "--max_steps", "6", "--ckpt_interval", "2", "--eval_interval", "3",
            "--eval_batches", "1", "--log_interval", "1", "--resume", "auto"]
    monkeypatch.setattr(sys, "argv", argv)
    real_save = torch.save

    def killed_at_step_4(obj, f, *a, **kw):
        if os.path.basename(str(f)).startswith("ckpt.pt") and obj["step"] == 4:
            raise KeyboardInterrupt("killed while ckpt.pt of step 4 is written")
        return real_save(obj, f, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", killed_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            sft_stage.main()
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2, 3, 4]
    sft_stage.main()  # the scheduler reruns the same command
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2, 3, 4, 5, 6]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 6


def test_resumed_flags_take_what_the_command_line_names():
    """
    A resumed run keeps its saved flags; a flag named on the command line counts even at its default value: a
    free one (dtype) comes back to the default, any other one with another value than the saved one is refused.
    """
    defaults = sft_stage.Config()
    saved = {"args": dataclasses.asdict(dataclasses.replace(defaults, lr=0.1, dtype="float32", eval_interval=7))}

    def resume(*argv):
        return train_common.resumed_flags(train_common.parse_stage_flags(sft_stage.Config, ["--resume", *argv]), saved)

    args = resume()  # nothing named: every flag is the run's
    assert (args.lr, args.dtype, args.eval_interval, args.resume) == (0.1, "float32", 7, "on")
    args = resume("--dtype", defaults.dtype, "--eval_interval", str(defaults.eval_interval))
    assert (args.dtype, args.eval_interval, args.lr) == (defaults.dtype, defaults.eval_interval, 0.1)
    assert resume("--lr", "0.1").lr == 0.1  # the saved value, named again
    for argv in (["--lr", str(defaults.lr)], ["--lr", "0.2"]):  # at the default, or another value
        with pytest.raises(utils.UserError, match=r"--lr .* differs from the run's 0.1"):
            resume(*argv)
    # built in code, without a command line: the fields that differ from their default count as named
    args = train_common.resumed_flags(dataclasses.replace(defaults, resume="on", dtype="bfloat16"), saved)
    assert (args.dtype, args.lr) == ("bfloat16", 0.1)


def test_cpu_peak_flops_follows_the_run_s_dtype(monkeypatch):
    # MFU divides by the peak of the arithmetic the run does: float32 FMAs, twice as many FLOPs per cycle for bf16
    # dot products on AVX512-BF16, and a timed matmul where the CPU has AMX tiles (no per-cycle figure here)
    cpu = utils.Runtime(torch.device("cpu"), "cpu", "float32")
    threads = torch.get_num_threads()
    for flags, dtype, per_cycle in (("fma avx512f", "float32", 64), ("fma avx512f", "bfloat16", 64),
                                    ("fma avx512f avx512_bf16", "float32", 64),
                                    ("fma avx512f avx512_bf16", "bfloat16", 128), ("fma", "bfloat16", 32)):
        monkeypatch.setattr(train_common, "cpuinfo", lambda: f"cpu MHz\t\t: 2000.000\nflags\t\t: {flags}\n")
        peak, source = train_common.peak_flops(dataclasses.replace(cpu, dtype=dtype))
        assert peak == threads * 2000e6 * per_cycle and f"x {per_cycle} " in source, (flags, dtype, source)
    monkeypatch.setattr(train_common, "cpuinfo", lambda: "cpu MHz\t\t: 2000.000\nflags\t\t: avx512f amx_bf16\n")
    monkeypatch.setattr(train_common, "PEAK_MATMUL", 128)  # a CPU without bf16 instructions emulates it: 20 s at 1024
    peak, source = train_common.peak_flops(dataclasses.replace(cpu, dtype="bfloat16"))
    assert source == "measured 128x128 bfloat16 matmul" and 0 < peak < float("inf")


def plain_sft_loss(model, examples):
    """(sum of -log p over the response targets, their number) of unpadded (ids, response_mask) rows, one by one."""
    total, count = 0.0, 0
    for ids, mask in examples:
        logp = torch.log_softmax(model(torch.tensor([ids]))[0], -1)  # (T, V): position t predicts token t + 1
        for t in range(1, len(ids)):
            if mask[t]:
                total = total - logp[t - 1, ids[t]]
                count += 1
    return total, count


def random_tiny_gpt(seed):
    """A 1-layer GPT on the byte tokenizer whose weights are far from uniform, so that tokens' losses differ."""
    torch.manual_seed(seed)
    tok = sft_stage.Tokenizer.byte_level()
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model, tok


def test_grad_accum_weighs_each_target_token_once(tmp_path, monkeypatch, one_thread):
    """
    --grad_accum 2 over a micro-batch of 1-character responses and one of 30-character responses: the first step's
    loss and gradient norm are those of one big batch, the float64 mean over all the step's target tokens (a mean of
    the two micro-batches' means, sft_loss / grad_accum, over-weights the short responses' tokens).
    """
    model, tok = random_tiny_gpt(0)
    init = tmp_path / "init"
    utils.save_checkpoint(str(init), utils.model_payload(model, tok, "sft", sft_stage.Config(), 0))
    records = [{"prompt": f"sort {i} 1", "response": "abcdefghij"[i]} for i in range(4)]
    records += [{"prompt": f"sort {i} 2", "response": "the quick brown fox jumps over"[i:] + "x" * i} for i in range(4)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["train_sft.py", "--data", str(tmp_path / "sft.jsonl"), "--val_data",
                                      str(tmp_path / "val.jsonl"), "--init_from", str(init), "--out_dir", str(out),
                                      "--batch_size", "4", "--grad_accum", "2", "--max_steps", "1", "--log_interval",
                                      "1", "--eval_batches", "1", "--device", "cpu", "--dtype", "float32"])
    sft_stage.main()
    row = read_metrics(out)[1]
    assert row["step"] == 1
    # the step's two micro-batches, drawn as main draws them
    train = sft_stage.encode_sft(sft_stage.read_sft(str(tmp_path / "sft.jsonl")), tok, 64)[0]
    sampler = sft_stage.LengthGroupedSampler([len(ids) for ids, _ in train], 4, seed=0)
    micro = [[train[i] for i in b] for b in sampler.batches(0)[:2]]
    model = model.double()
    sums = [plain_sft_loss(model, m) for m in micro]
    assert sorted(n for _, n in sums)[0] * 5 < sorted(n for _, n in sums)[1]  # target counts far apart
    want = sum(s for s, _ in sums) / sum(n for _, n in sums)
    gap = abs(want.item() - sum(s / n for s, n in sums).item() / 2)
    assert gap > 1e-2 * want.item()  # so that the per-micro-batch mean would show
    assert row["loss"] == pytest.approx(want.item(), rel=1e-5)
    want.backward()
    grad_norm = math.sqrt(sum((p.grad ** 2).sum().item() for p in model.parameters()))
    assert row["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)


def test_evaluate_is_the_mean_over_all_target_tokens():
    """Held-out loss over batches of very different target counts == float64 sum of -log p / all targets."""
    model, tok = random_tiny_gpt(1)
    model = model.double()
    texts = ["a", "b", "cd", "e", "the quick brown fox jumps", "over the lazy dog, twice", "pack my box with"]
    examples = [tok.render(f"q{i}", y) for i, y in enumerate(texts)]  # 2-3 targets each, then 17-26
    batches = [sft_stage.make_batch(examples[:4], tok.pad_id, 64), sft_stage.make_batch(examples[4:], tok.pad_id, 64)]
    got = sft_stage.evaluate(model, batches, utils.Runtime(torch.device("cpu"), "cpu", "float32"))
    with torch.no_grad():
        total, count = plain_sft_loss(model, examples)
    assert got == pytest.approx(total.item() / count, rel=1e-9)


def test_metrics_rows_match_a_plain_recount_of_the_steps(tmp_path, monkeypatch, capsys, one_thread):
    """
    Every number of the metrics rows against a plain recount, on a run whose weights do not move (the optimizer is
    handed lr 0, so each step's loss is a plain float64 sum over a fixed model) and whose clock ticks 0.5 s a step:
    --grad_accum 2, --block_size 48 under a 64-token checkpoint (some prompts cut to fit 48), rows at the log steps 3
    and 6, the evaluation step 5 (which also starts a new window) and the last step 7. Each row averages the steps
    since the previous row (loss, pad_frac), gives tokens and FLOPs over the window's time, the lr of its step by the
    textbook warmup + cosine formula, the epoch as micro-batches drawn / batches per epoch, and the held-out loss over
    the first --eval_batches held-out batches (all of them here).
    """
    model, tok = random_tiny_gpt(2)
    init = tmp_path / "init"
    utils.save_checkpoint(str(init), utils.model_payload(model, tok, "sft", sft_stage.Config(), 0))
    rng = random.Random(0)
    words = ["sort", "the", "a", "quick", "brown", "fox", "1 2 3", "lazy dog"]

    def record(i):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(5, 8) if i % 4 == 0 else rng.randint(1, 2)))
        return {"prompt": f"p{i} {prompt}", "response": " ".join(rng.choice(words) for _ in range(rng.randint(1, 2)))}

    records, val_records = [record(i) for i in range(11)], [record(100 + i) for i in range(5)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val_records))
    lrs = frozen_stage(monkeypatch, sft_stage)
    out = tmp_path / "out"
    lr, min_lr, warmup, max_steps = 1e-3, 1e-4, 2, 7
    monkeypatch.setattr(sys, "argv", [
        "train_sft.py", "--data", str(tmp_path / "sft.jsonl"), "--val_data", str(tmp_path / "val.jsonl"),
        "--init_from", str(init), "--out_dir", str(out), "--block_size", "48", "--batch_size", "2", "--grad_accum",
        "2", "--lr", str(lr), "--min_lr", str(min_lr), "--warmup", str(warmup), "--max_steps", str(max_steps),
        "--log_interval", "3", "--eval_interval", "5", "--ckpt_interval", "4", "--eval_batches", "3",
        "--device", "cpu", "--dtype", "float32"])
    sft_stage.main()
    stdout = capsys.readouterr().out
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 3, 5, 6, 7]
    assert stdout.splitlines()[-1].startswith("done: step 7, val loss ")

    def want_lr(step):  # linear warmup to lr over `warmup` steps, then cosine from lr down to min_lr at max_steps
        if step < warmup:
            return lr * (step + 1) / warmup
        return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (max_steps - warmup))) / 2

    assert lrs == pytest.approx([want_lr(s) for s in range(max_steps)], rel=1e-12)
    # the examples as a 48-token context holds them (some prompts are cut), drawn as the sampler orders them
    train = sft_stage.encode_sft(records, tok, 48)[0]
    val = sft_stage.encode_sft(val_records, tok, 48)[0]
    assert len(train) == 11 and len(val) == 5
    assert any(len(tok.render(r["prompt"], r["response"])[0]) > 48 for r in records + val_records)
    sampler = sft_stage.LengthGroupedSampler([len(ids) for ids, _ in train], 2, seed=0)
    drawn = [b for epoch in range(3) for b in sampler.batches(epoch)]
    model = model.double()
    steps = []  # per step: loss, grad norm, real tokens, padded slots, FLOPs, padding fraction
    for s in range(max_steps):
        micro = [[train[i] for i in b] for b in drawn[2 * s:2 * s + 2]]
        sums = [plain_sft_loss(model, m) for m in micro]
        loss = sum(x for x, _ in sums) / sum(n for _, n in sums)
        model.zero_grad()
        loss.backward()
        norm = math.sqrt(sum((p.grad.double() ** 2).sum().item() for p in model.parameters()))
        tokens = [sum(len(ids) for ids, _ in m) for m in micro]
        widths = [8 * math.ceil(max(len(ids) for ids, _ in m) / 8) for m in micro]  # padded to a multiple of 8
        pad = sum(1 - n / (len(m) * w) for n, m, w in zip(tokens, micro, widths)) / 2
        flops = sum(model.flops_per_token(w) * n for n, w in zip(tokens, widths))
        steps.append((loss.item(), norm, sum(tokens), flops, pad))
    with torch.no_grad():
        total, count = plain_sft_loss(model, val)
    n_batches = math.ceil(len(train) / 2)
    first = 0
    for row in rows[1:]:
        window = steps[first:row["step"]]
        n = len(window)
        assert row["loss"] == pytest.approx(sum(w[0] for w in window) / n, rel=1e-5), row
        assert row["grad_norm"] == pytest.approx(window[-1][1], rel=1e-4), row
        assert row["tok_per_s"] == pytest.approx(sum(w[2] for w in window) / (0.5 * n), rel=1e-5), row
        assert row["mfu"] == pytest.approx(sum(w[3] for w in window) / (0.5 * n) / 1e9, rel=1e-5), row
        assert row["pad_frac"] == pytest.approx(sum(w[4] for w in window) / n, rel=1e-5), row
        assert row["lr"] == pytest.approx(want_lr(row["step"] - 1), rel=1e-5), row
        assert row["epoch"] == pytest.approx(row["step"] * 2 / n_batches, rel=1e-5), row
        assert ("val_loss" in row) == (row["step"] in (5, 7)), row
        if "val_loss" in row:
            assert row["val_loss"] == pytest.approx(total.item() / count, rel=1e-5), row
        first = row["step"]
    assert rows[0]["val_loss"] == pytest.approx(total.item() / count, rel=1e-5)
    # the progress lines: step of --max_steps, the row's numbers, and the latest held-out loss (of step 0 until step 5)
    lines = [x for x in stdout.splitlines() if x.startswith("step ")]
    assert lines[0] == f"step 0/{max_steps} | val {total.item() / count:.3f}" and len(lines) == len(rows), lines
    for row, line in zip(rows[1:], lines[1:]):
        assert line.startswith(f"step {row['step']}/{max_steps} | loss {row['loss']:.3f} | "
                               f"val {total.item() / count:.3f} | {train_common.fmt_count(row['tok_per_s'])} tok/s | "
                               f"mfu {100 * row['mfu']:.1f}% | "
                               f"pad {100 * row['pad_frac']:.0f}% | ") and line.endswith(" left"), (line, row)
    assert {round(100 * r["mfu"], 1) for r in rows[1:]} != {0.0}  # MFU shows in the line
    assert len({round(s[0], 6) for s in steps}) == max_steps and len({round(s[4], 6) for s in steps}) > 2
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 7 and state["window"]["steps"] == 0


def test_a_lora_run_resumed_ends_where_the_uninterrupted_one_does(tmp_path, monkeypatch, one_thread):
    """
    --lora_rank 4 stopped at step 2 and resumed: the resumed run starts again from --init_from's weights with the
    adapters (and optimizer) of step 2, so its merged checkpoint of step 4 and its rows equal the uninterrupted run's
    (a resume from the merged ckpt.pt would add the adapters' update twice; fresh adapters would lose steps 1-2).
    """
    init = tmp_path / "init"
    model, tok = random_tiny_gpt(3)
    utils.save_checkpoint(str(init), utils.model_payload(model, tok, "sft", sft_stage.Config(), 0))
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"prompt": f"sort {i} {i % 7}", "response": f"{i % 7} {i}"})
                                                + "\n" for i in range(40)))
    common = ["train_sft.py", "--data", str(tmp_path / "sft.jsonl"), "--val_frac", "0.1", "--init_from", str(init),
              "--lora_rank", "4", "--lr", "3e-2", "--batch_size", "8", "--max_steps", "4", "--warmup", "1",
              "--eval_interval", "2", "--eval_batches", "1", "--log_interval", "1", "--ckpt_interval", "2",
              "--device", "cpu", "--dtype", "float32"]
    for out, extra in (("full", []), ("part", ["--stop_at", "2"]), ("part", ["--resume", "on"])):
        monkeypatch.setattr(sys, "argv", [*common, "--out_dir", str(tmp_path / out), *extra])
        sft_stage.main()
    a, b = (torch.load(tmp_path / out / "ckpt.pt", weights_only=True) for out in ("full", "part"))
    assert a["step"] == b["step"] == 4
    assert all(torch.allclose(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-7) for k in a["model"])
    key = "transformer.h.0.attn.c_attn.weight"  # the merged update: the adapters trained
    assert not torch.allclose(a["model"][key], model.state_dict()[key])
    want, got = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2, 3, 4]
    for x, y in zip(want[1:], got[1:]):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4), y
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-3), y


@pytest.mark.parametrize("argv, message", [
    (["--n_layer", "0"], "--n_layer must be at least 1, got 0"),
    (["--n_head", "0"], "--n_head must be at least 1, got 0"),
    (["--n_embd", "0"], "--n_embd must be at least 1, got 0"),
    (["--n_embd", "100", "--n_head", "3"], "--n_embd 100 must be divisible by --n_head 3"),
    (["--block_size", "1"], "--block_size must be at least 2, got 1"),
    (["--dropout", "1.0"], "--dropout must be in [0, 1), got 1.0"),
    (["--dropout", "-0.01"], "--dropout must be in [0, 1), got -0.01"),
])
def test_check_flags_refuses_a_model_shape_just_past_each_bound(argv, message):
    # each bound refused one step past it, with the message naming the flag and the value (the bounds themselves pass
    # below): a check loosened to >= 0 or <= 1, or a message naming another flag, shows here
    args = train_common.parse_stage_flags(sft_stage.Config, argv)
    with pytest.raises(utils.UserError) as e:
        sft_stage.check_flags(args)
    assert str(e.value) == message


def test_check_flags_accepts_a_model_shape_at_each_bound():
    for argv in (["--n_layer", "1", "--n_head", "1", "--n_embd", "1", "--block_size", "2", "--dropout", "0"],
                 ["--n_embd", "99", "--n_head", "3", "--dropout", "0.99"]):
        sft_stage.check_flags(train_common.parse_stage_flags(sft_stage.Config, argv))


def test_init_from_scratch_with_a_missing_tokenizer_file_names_the_flag():
    with pytest.raises(utils.UserError, match=r"^--tokenizer /nonexistent\.tiktoken: expected byte, gpt2 or the path "
                                              r"of a \.tiktoken file, and there is no file /nonexistent\.tiktoken$"):
        init_model("--tokenizer", "/nonexistent.tiktoken")
    with pytest.raises(utils.UserError, match=r"^--init_from /nonexistent/dir: expected 'scratch', a nanorlhf "
                                              r"checkpoint directory \(ckpt\.pt\) or a Hugging Face GPT-2 directory"):
        init_model("--init_from", "/nonexistent/dir")


def test_init_from_an_hf_dir_whose_config_has_no_usable_vocab_size_is_one_line(tmp_path):
    # config.json without vocab_size (a KeyError), or with 0: one line naming the directory and the file
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    config = hf_dir / "config.json"
    config.write_text(json.dumps({"n_layer": 1}))
    with pytest.raises(utils.UserError, match=f"^--init_from {hf_dir}: no vocab_size in {config} \\(KeyError: "):
        init_model("--init_from", str(hf_dir))
    config.write_text(json.dumps({"vocab_size": 0}))
    with pytest.raises(utils.UserError, match=f"^--init_from {hf_dir}: vocab_size 0 in {config} is not a positive "):
        init_model("--init_from", str(hf_dir))


def test_out_dir_that_is_init_from_is_refused(tmp_path, monkeypatch, capsys):
    # a run pointed at the checkpoint it starts from would overwrite it: refused before anything is read or written
    model, tok = random_tiny_gpt(4)
    init = tmp_path / "init"
    utils.save_checkpoint(str(init), utils.model_payload(model, tok, "sft", sft_stage.Config(), 0))
    before = (init / "ckpt.pt").read_bytes()
    monkeypatch.setattr(sys, "argv", ["train_sft.py", "--data", str(tmp_path / "none.jsonl"), "--init_from",
                                      str(init), "--out_dir", str(init) + "/", "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        utils.run(sft_stage.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == (f"error: --out_dir {init}/ is also --init_from: the run would overwrite the "
                                         f"checkpoint it starts from; pick another --out_dir\n"), err
    assert sorted(os.listdir(init)) == ["ckpt.pt"] and (init / "ckpt.pt").read_bytes() == before


def test_data_line_counts_cut_and_dropped_examples_of_both_splits_and_eval_batches_limits_val(tmp_path, monkeypatch,
                                                                                               capsys, one_thread):
    """
    --block_size 48 under a 64-token checkpoint: of the training file 3 fit, 1 has its prompt cut, 1 its response too
    long (dropped); of the held-out file 1 fits, 2 are cut, 1 dropped. The data line counts both files' (hand-counted:
    3 cut, 2 dropped); and with --eval_batches 2 of the 3 held-out batches, the step-0 held-out loss is the plain
    float64 mean over the targets of the first 2 batches only. Stopped at step 1 of 3, the progress line says 1/3.
    """
    model, tok = random_tiny_gpt(5)
    init = tmp_path / "init"
    utils.save_checkpoint(str(init), utils.model_payload(model, tok, "sft", sft_stage.Config(), 0))
    fits = [{"prompt": f"sort {i} 1", "response": "1 " * (i + 1)} for i in range(3)]
    cut = [{"prompt": "p" * (30 + i), "response": "ab" * (i + 1)} for i in range(2)]  # 52 tokens of prompt alone
    dropped = [{"prompt": f"q{i}", "response": "x" * 50} for i in range(2)]
    for name, rows in (("sft", fits + cut[:1] + dropped[:1]), ("val", fits[:1] + cut + dropped[1:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert all(len(tok.render(r["prompt"], r["response"])[0]) > 48 for r in cut + dropped)
    assert all(len(tok.render(r["prompt"], r["response"])[0]) <= 48 for r in fits)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["train_sft.py", "--data", str(tmp_path / "sft.jsonl"), "--val_data",
                                      str(tmp_path / "val.jsonl"), "--init_from", str(init), "--out_dir", str(out),
                                      "--block_size", "48", "--batch_size", "1", "--eval_batches", "2",
                                      "--max_steps", "3", "--stop_at", "1", "--device", "cpu", "--dtype", "float32"])
    sft_stage.main()
    stdout = capsys.readouterr().out
    # the progress line counts to --max_steps, not to --stop_at
    assert stdout.splitlines()[-2].startswith("step 1/3 | loss "), stdout
    assert stdout.splitlines()[-1] == "stopped at step 1 (--stop_at); continue with --resume", stdout
    assert ("data: 4 train, 3 val examples; longer than 48 tokens: 3 cut from the left of the prompt, 2 dropped "
            "(response does not fit)") in stdout.splitlines(), stdout
    val = sft_stage.encode_sft(sft_stage.read_sft(str(tmp_path / "val.jsonl")), tok, 48)[0]
    first = sft_stage.LengthGroupedSampler([len(ids) for ids, _ in val], 1, seed=0).batches(0)[:2]
    with torch.no_grad():
        total, count = plain_sft_loss(model.double(), [val[i] for b in first for i in b])
        everything = plain_sft_loss(model, val)
    assert abs(everything[0].item() / everything[1] - total.item() / count) > 1e-3  # the third batch would show
    assert read_metrics(out)[0]["val_loss"] == pytest.approx(total.item() / count, rel=1e-5)


def test_a_conversation_cut_inside_an_earlier_response_counts_only_the_targets_some_position_predicts():
    """
    A two-turn conversation cut from the left inside its first response: its first token is a response token (mask 1)
    that no position predicts. The held-out loss is still the float64 sum of -log p over the predicted targets divided
    by their number (counting that first token too would divide by one more).
    """
    model, tok = random_tiny_gpt(6)
    model = model.double()
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "the quick brown fox"},
            {"role": "user", "content": "w"}, {"role": "assistant", "content": "xy"}]
    ids, _ = tok.render_messages(msgs)
    block = len(ids) - ids.index(tok.eos_id) + 4  # 3 tokens of the first response and its EOS kept
    examples = sft_stage.encode_sft([{"messages": msgs}, {"prompt": "a", "response": "bc"}], tok, block)[0]
    assert len(examples) == 2 and examples[0][1][:4] == [1, 1, 1, 1] and examples[1][1][0] == 0
    batch = sft_stage.make_batch(examples, tok.pad_id, 64)
    got = sft_stage.evaluate(model, [batch], utils.Runtime(torch.device("cpu"), "cpu", "float32"))
    with torch.no_grad():
        total, count = plain_sft_loss(model, examples)
    assert sft_stage.n_targets(batch) == count
    assert got == pytest.approx(total.item() / count, rel=1e-9)
