"""
Strict flags: no abbreviation is accepted, and an unknown or misspelt flag is one line on stderr naming the
closest flag, exit status 2, in every script. The scripts run in-process (runpy, as `python script.py` would
run them), so each case costs milliseconds; one case runs in a subprocess to check the real command line.
"""

import dataclasses
import glob
import os
import re
import runpy
import sys

import pytest

from scripts import ROOT, script

sys.path.insert(0, ROOT)  # train_ppo.py is a top-level script

import train_ppo
from nanorlhf import tasks, tokenizer, utils
from nanorlhf.utils import flag

# every top-level script, whoever added it: each must build its parser with utils.FlagParser
SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")))
MODULES = {"nanorlhf.tasks": tasks.main, "nanorlhf.tokenizer": tokenizer.main}

# a typo per script, and the flag it must suggest (every script, listed or not, also gets one made from its --help)
MISSPELT = {
    "train_sft.py": (["--max_step", "10"], "--max_steps"),
    "train_rm.py": (["--val_dat", "x.jsonl"], "--val_data"),
    "train_ppo.py": (["--kl_cof", "0.1"], "--kl_coef"),
    "evaluate.py": (["--n_prompt", "3"], "--n_prompts"),
    "bench.py": (["--ppo_iter", "1"], "--ppo_iters"),
    "bench_generate.py": (["--new_token", "3"], "--new_tokens"),
    "kl_sweep.py": (["--num_iteration", "3"], "--num_iterations"),
    "sample.py": (["--num_sample", "2"], "--num_samples"),
    "nanorlhf.tasks": (["--n_sf", "3"], "--n_sft"),
    "nanorlhf.tokenizer": (["--train", "x.txt", "--out", "y", "--vocab", "300"], "--vocab_size"),
}


def run_cli(name, argv, monkeypatch, capsys, stream="err"):
    """Run a script (or a module's main) with argv as its command line -> (exit status, stderr or stdout)."""
    monkeypatch.setattr(sys, "argv", [name, *argv])
    with pytest.raises(SystemExit) as e:
        if name in MODULES:
            MODULES[name](argv)
        else:
            runpy.run_path(os.path.join(ROOT, name), run_name="__main__")
    return e.value.code, getattr(capsys.readouterr(), stream)


@pytest.mark.parametrize("name", SCRIPTS + list(MODULES))
def test_abbreviation_of_help_is_refused(name, monkeypatch, capsys):
    # plain argparse would take --hel for --help, print the usage and exit 0
    code, err = run_cli(name, ["--hel"], monkeypatch, capsys)
    assert code == 2
    assert err.strip().splitlines() == [f"{name}: error: unknown flag --hel "
                                        "(did you mean --help?)"]


def made_up_typo(name, monkeypatch, capsys):
    """A typo of a flag from the script's --help: its last letter twice, e.g. --data -> --dataa."""
    code, out = run_cli(name, ["--help"], monkeypatch, capsys, stream="out")  # the help, exit status 0
    flags = [f for f in re.findall(r"--[a-z][a-z0-9_]*", out) if f != "--help"]
    assert code in (0, None) and flags, name
    flag_name = next(f for f in flags if f + f[-1] not in flags)
    return [flag_name + flag_name[-1], "1"], flag_name


@pytest.mark.parametrize("name", SCRIPTS + list(MODULES))
def test_made_up_typo_suggests_the_flag(name, monkeypatch, capsys):
    argv, want = made_up_typo(name, monkeypatch, capsys)
    code, err = run_cli(name, argv, monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"unknown flag {argv[0]} (did you mean {want}" in err, err


@pytest.mark.parametrize("name", list(MISSPELT))
def test_misspelt_flag_suggests_the_closest(name, monkeypatch, capsys):
    argv, want = MISSPELT[name]
    code, err = run_cli(name, argv, monkeypatch, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"unknown flag {argv[-2].split('=')[0]}" in lines[0], err
    assert f"(did you mean {want}" in lines[0], err


@pytest.mark.parametrize("name", SCRIPTS + list(MODULES))
def test_help_shows_every_flags_default(name, monkeypatch, capsys):
    # the README says so of every script; bench_generate.py's, nanorlhf.tasks' and nanorlhf.tokenizer's showed none
    code, out = run_cli(name, ["--help"], monkeypatch, capsys, stream="out")
    options = out[out.index("\noptions:"):]
    entries = re.split(r"\n  (?=-)", options)[1:]  # one per flag: "--name NAME  help ..." over one or more lines
    assert len(entries) > 1, out
    entries = [" ".join(e.split()) for e in entries]  # argparse wraps the lines anywhere, "(default:" included
    missing = [e.split()[0] for e in entries
               if not e.startswith("-h") and "(default: " not in e and not e.endswith("(required)")]
    assert not missing, f"{name}: no default shown for {missing}"


@pytest.mark.parametrize("argv, flag_name, hint", [
    (["--kl", "0.1"], "--kl", "--kl_coef"),  # a prefix of --kl_coef (and of --kl_estimator, --kl_horizon)
    (["--vf_clip", "0.1"], "--vf_clip", "--vf_clip_coef"),  # once parsed as --vf_clip_coef 0.1
    (["--kl=0.1"], "--kl", "--kl_coef"),
])
def test_train_ppo_refuses_abbreviations(argv, flag_name, hint, monkeypatch, capsys):
    code, err = run_cli("train_ppo.py", argv, monkeypatch, capsys)
    assert code == 2 and f"unknown flag {flag_name} (did you mean {hint}" in err, err


def test_the_parser_docstring_example_is_what_train_ppo_prints(monkeypatch, capsys):
    # it showed `--critic shared` refused as an unknown flag, after --critic became one
    doc = [line.strip() for line in utils.FlagParser.__doc__.splitlines()]
    i = next(i for i, line in enumerate(doc) if line.startswith("$ python train_ppo.py "))
    monkeypatch.setattr(sys, "argv", ["train_ppo.py"])
    with pytest.raises(SystemExit) as e:  # parsed only: nothing runs, whatever the example says
        utils.parse_flags(train_ppo.Args, doc[i].split()[3:])
    assert e.value.code == 2 and capsys.readouterr().err == doc[i + 1] + "\n"


def test_subprocess_one_line_and_exit_2():
    p = script("train_ppo.py", "--critic_l", "1e-4", check=False)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == "train_ppo.py: error: unknown flag --critic_l (did you mean --critic_lr?)\n"


# -----------------------------------------------------------------------------
# the parser itself


@dataclasses.dataclass
class Flags:
    kl_coef: float = flag(0.3, "beta")
    kl_estimator: str = flag("k1", "estimator")
    critic_lr: float = flag(1e-5, "critic lr")
    compile: bool = flag(False, "compile")
    top_k: int | None = flag(None, "top-k")


def parse(argv, capsys):
    with pytest.raises(SystemExit) as e:
        utils.parse_flags(Flags, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_exact_flags_still_parse():
    assert utils.parse_flags(Flags, ["--kl_coef", "0.1", "--critic_lr=2e-5", "--compile", "--top_k", "4"]) == \
        Flags(kl_coef=0.1, critic_lr=2e-5, compile=True, top_k=4)
    # a value that starts with '-' is still a value
    assert utils.parse_flags(Flags, ["--kl_coef", "-1"]).kl_coef == -1.0
    # and so is one with a space in it, as argparse reads it: compare.py --grpo_flags "--lr 1e-4",
    # sample.py --prompt "--why not"
    assert utils.parse_flags(Flags, ["--kl_estimator", "--lr 1e-4"]).kl_estimator == "--lr 1e-4"
    assert utils.parse_flags(Flags, ["--kl_estimator", "--why not", "--top_k", "2"]).kl_estimator == "--why not"


def test_every_mistake_is_one_line(capsys):
    assert parse(["--kl", "0.1"], capsys).endswith("unknown flag --kl (did you mean --kl_coef or --kl_estimator?)")
    assert parse(["--critc_lr", "1"], capsys).endswith("unknown flag --critc_lr (did you mean --critic_lr?)")
    assert parse(["--zzz", "1"], capsys).endswith("unknown flag --zzz (see --help)")
    assert "unexpected argument 'stray'" in parse(["stray"], capsys)
    assert "unknown flag -x" in parse(["-x"], capsys)
    assert "argument --kl_coef: invalid float value: 'abc'" in parse(["--kl_coef", "abc"], capsys)
    assert "--kl_coef: expected one argument" in parse(["--kl_coef"], capsys)


@dataclasses.dataclass
class Numbers:
    lr: float = flag(1e-3, "learning rate")
    top_p: float | None = flag(None, "nucleus")
    seed: int = flag(0, "seed")


@pytest.mark.parametrize("value", ["nan", "NaN", "-nan", "inf", "-Inf", "+INFINITY", "1e999"])
def test_a_float_flag_refuses_nan_and_inf(value, capsys):
    # a run given --lr inf started, cleared its out_dir's earlier run, and failed at its first step
    for name in ("--lr", "--top_p"):
        with pytest.raises(SystemExit) as e:
            utils.parse_flags(Numbers, [f"{name}={value}"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.endswith(f": error: argument {name}: {value!r} is not a finite number\n") and err.count("\n") == 1
    assert utils.parse_flags(Numbers, ["--lr=-1e-300", "--top_p", "none"]) == Numbers(lr=-1e-300)
    assert utils.parse_flags(Numbers, ["--top_p", "1e308"]).top_p == 1e308


@pytest.mark.parametrize("seed", ["-1", "4294967296", "99999999999999999999"])
def test_a_seed_out_of_numpys_range_is_refused(seed, capsys):
    with pytest.raises(SystemExit) as e:
        utils.parse_flags(Numbers, ["--seed", seed])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith(f": error: argument --seed: {seed} is out of range (a seed is 0 to 4294967295)\n")
    assert err.count("\n") == 1
    assert utils.parse_flags(Numbers, ["--seed", "4294967295"]).seed == 2**32 - 1


# a float flag of each script that has one: nan or inf is refused before anything runs
FLOATS = {
    "train_sft.py": "--lr", "train_rm.py": "--lr", "train_dpo.py": "--beta", "train_grpo.py": "--missing_eos_penalty",
    "train_ppo.py": "--missing_eos_penalty", "sample.py": "--temperature", "evaluate.py": "--temperature",
    "kl_sweep.py": "--kl_coef",
}


@pytest.mark.parametrize("name", list(FLOATS))
def test_every_script_refuses_a_float_flag_of_nan(name, monkeypatch, capsys):
    code, err = run_cli(name, [FLOATS[name], "nan"], monkeypatch, capsys)
    assert code == 2 and err == f"{name}: error: argument {FLOATS[name]}: 'nan' is not a finite number\n", err


@pytest.mark.parametrize("name", SCRIPTS + list(MODULES))
def test_every_script_refuses_a_seed_numpy_cannot_take(name, monkeypatch, capsys):
    # np.random.seed(-1) in setup_runtime was a ValueError and a traceback, in every stage
    code, out = run_cli(name, ["--help"], monkeypatch, capsys, stream="out")
    if "--seed" not in out:
        pytest.skip(f"{name} has no --seed")
    code, err = run_cli(name, ["--seed", "-1"], monkeypatch, capsys)
    assert code == 2 and err == f"{name}: error: argument --seed: -1 is out of range (a seed is 0 to 4294967295)\n"


def test_suggest():
    opts = ["--kl_coef", "--kl_estimator", "--kl_horizon", "--lr", "--learning_rate", "--seed"]
    assert utils.suggest("--kl", opts) == "--kl_coef, --kl_estimator or --kl_horizon"
    assert utils.suggest("--kl_", opts[:2]) == "--kl_coef or --kl_estimator"
    assert utils.suggest("--seeed", opts) == "--seed"
    assert utils.suggest("--lerning_rate", opts) == "--learning_rate"
    assert utils.suggest("--nothing_like_it", opts) == ""


@pytest.mark.parametrize("name,flags,message", [
    ("train_rm.py", ["--lora_alpha", "32"], "^--lora_alpha does nothing without --lora_rank > 0$"),
    ("train_rm.py", ["--val_data", "v.jsonl", "--val_frac", "0.3"], "^--val_frac 0.3 does nothing with --val_data"),
    ("train_dpo.py", ["--val_data", "v.jsonl", "--val_frac", "0.3"], "^--val_frac 0.3 does nothing with --val_data"),
])
def test_flags_that_would_do_nothing_are_refused_in_every_loop(name, flags, message):
    """train_common.check_loop_flags, which SFT, RM and DPO share: these were accepted and ignored by RM and DPO."""
    module = runpy.run_path(os.path.join(ROOT, name), run_name="not_main")
    args = utils.parse_flags(module["Config"], flags)
    with pytest.raises(utils.UserError, match=message):
        module["check_flags"](args)
    alone = flags[:2] if "--val_frac" in flags else []  # --val_data alone, or no flag: fine
    module["check_flags"](utils.parse_flags(module["Config"], alone))


# every flag that names a model directory, and the model the script needs there ("rm": a reward model)
MODEL_FLAGS = [
    ("train_sft.py", "--init_from", {"--data": "sft.jsonl"}),
    ("train_rm.py", "--init_from", {"--data": "prefs.jsonl", "--sft_data": "sft.jsonl"}),
    ("train_ppo.py", "--sft", {"--data": "prompts.jsonl", "--rm": "rm"}),
    ("train_ppo.py", "--rm", {"--data": "prompts.jsonl", "--sft": "sft"}),
    ("train_grpo.py", "--sft", {"--data": "prompts.jsonl", "--rm": "rm"}),
    ("train_grpo.py", "--rm", {"--data": "prompts.jsonl", "--sft": "sft"}),
    ("train_dpo.py", "--sft", {"--data": "prefs.jsonl"}),
    ("evaluate.py", "--sft", {"--data": "eval.jsonl"}),
    ("evaluate.py", "--ppo", {"--data": "eval.jsonl", "--sft": "sft"}),
    ("evaluate.py", "--rm", {"--data": "eval.jsonl", "--sft": "sft"}),
    ("evaluate.py", "--extra", {"--data": "eval.jsonl", "--sft": "sft"}),
    ("sample.py", "--ckpt", {"--prompt": "sort 3 1"}),
    ("export_hf.py", "--ckpt", {}),
]


@pytest.fixture(scope="module")
def models_and_data(tmp_path_factory):
    """A tiny SFT model, a reward model made from it, the task's data files, and a directory without ckpt.pt."""
    from nanorlhf.model import GPT, GPTConfig, ScalarGPT
    from nanorlhf.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("models")
    tok = Tokenizer.byte_level()
    gpt = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    utils.save_checkpoint(str(d / "sft"), utils.model_payload(gpt, tok, "sft", {"seed": 0}, 1))
    utils.save_checkpoint(str(d / "rm"), utils.model_payload(ScalarGPT.from_gpt(gpt), tok, "rm", {"seed": 0}, 1))
    tasks.main(["--out_dir", str(d), "--n_sft", "8", "--n_prefs", "4", "--n_prefs_eval", "2", "--n_prompts", "4",
                "--n_eval", "4"])
    (d / "export").mkdir()
    (d / "export" / "config.json").write_text("{}")  # a directory of other files, a Hugging Face export, say
    return d


@pytest.mark.parametrize("name, flag_name, others", MODEL_FLAGS, ids=lambda v: v if isinstance(v, str) else "")
def test_a_model_directory_without_its_checkpoint_is_one_line_naming_the_flag(name, flag_name, others,
                                                                                models_and_data, monkeypatch, capsys):
    """Before: 'out/x/ckpt.pt: no such checkpoint file', which of the two or three models was wrong left unsaid."""
    d = models_and_data
    bad = str(d / "export")
    given = {k: (v if k == "--prompt" else str(d / v)) for k, v in others.items()}
    out = d / f"out_{name}_{flag_name}"
    given["--out" if name == "export_hf.py" else "--out_dir"] = str(out)
    if name == "sample.py":
        del given["--out_dir"]
    argv = [w for k, v in given.items() for w in (k, v)] + [flag_name, f"a={bad}" if flag_name == "--extra" else bad]
    code, err = run_cli(name, argv + ["--device", "cpu"] * (name != "export_hf.py"), monkeypatch, capsys)
    if name == "train_sft.py":  # a Hugging Face export is what --init_from takes besides a checkpoint: its config.json
        message = f"--init_from {bad}: "
    else:
        message = f"{flag_name} {bad}: not a checkpoint directory (no ckpt.pt in it)"
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: {message}"), err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_the_reward_models_context_must_hold_the_policys_longest_sequence():
    """check_rm_context: an RM context at least the policy's block_size passes (equal too), a shorter one is refused."""
    from types import SimpleNamespace

    from nanorlhf import train_common

    def model(block_size):
        return SimpleNamespace(config=SimpleNamespace(block_size=block_size))

    for policy, rm in ((64, 64), (64, 65), (32, 128), (1, 1)):
        train_common.check_rm_context(model(policy), model(rm), "out/sft", "out/rm")
    for policy, rm in ((64, 63), (128, 32), (2, 1)):
        with pytest.raises(utils.UserError, match=f"^out/rm has block_size {rm} < {policy} of out/sft"):
            train_common.check_rm_context(model(policy), model(rm), "out/sft", "out/rm")


@pytest.mark.parametrize("name", ["train_sft.py", "train_rm.py", "train_dpo.py"])
def test_stop_at_may_be_any_step_up_to_max_steps(name, monkeypatch):
    """check_loop_flags: --stop_at in 1..--max_steps, the last step included (a run stopped where it would end)."""
    from nanorlhf import train_common

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = runpy.run_path(os.path.join(ROOT, name), run_name="not_main")["Config"]
    for max_steps in (1, 5, 37):
        for stop_at in range(-1, max_steps + 3):
            args = utils.parse_flags(config, ["--max_steps", str(max_steps), "--stop_at", str(stop_at)])
            if 1 <= stop_at <= max_steps:
                train_common.check_loop_flags(args)
            else:
                with pytest.raises(utils.UserError, match=rf"^--stop_at must be in 1\.\.{max_steps} \(--max_steps\)"):
                    train_common.check_loop_flags(args)


@pytest.mark.parametrize("name", ["train_sft.py", "train_rm.py", "train_dpo.py"])
def test_a_warmup_longer_than_the_run_is_said_with_the_lr_it_ends_at(name, monkeypatch, capsys):
    """
    check_loop_flags: --warmup W > --max_steps N runs (a shortened trial run) with a note: its last step, N - 1
    counted from 0, is still in the linear warmup, at lr * N / W. W <= N reaches --lr by the last step: no note; nor on
    a rank other than 0. Negative values are refused naming the flag and the value.
    """
    from nanorlhf import train_common

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    config = runpy.run_path(os.path.join(ROOT, name), run_name="not_main")["Config"]

    def note(warmup, max_steps, lr=0.002):
        train_common.check_loop_flags(utils.parse_flags(config, ["--warmup", str(warmup), "--max_steps", str(max_steps),
                                                                 "--lr", str(lr), "--min_lr", "0"]))
        return capsys.readouterr().out

    for warmup, max_steps in ((50, 20), (10, 2), (8, 7), (1000, 3)):
        assert note(warmup, max_steps) == (f"note: --warmup {warmup} is longer than --max_steps {max_steps}: the "
                                           f"learning rate rises for the whole run and ends at "
                                           f"{0.002 * max_steps / warmup:.3g}, short of --lr 0.002\n")
    for warmup, max_steps in ((7, 7), (3, 20), (0, 1)):
        assert note(warmup, max_steps) == ""
    monkeypatch.setenv("RANK", "1")
    assert note(50, 20) == ""
    for flag_name, value in (("--warmup", "-3"), ("--weight_decay", "-0.5")):
        with pytest.raises(utils.UserError, match=rf"^{flag_name} must be >= 0.*, got {value}$"):
            train_common.check_loop_flags(utils.parse_flags(config, [flag_name, value]))


def test_a_rollouts_minibatch_must_split_into_grad_accum_micro_batches(monkeypatch):
    """
    check_rollout_flags: --batch_size B in --num_minibatches M of B / M episodes, each in --grad_accum G micro-batches:
    refused unless M divides B and G divides B / M (G dividing B alone is not enough: 12 = 2 x 6, G 4); --stop_at in
    1..--num_iterations.
    """
    from nanorlhf import train_common

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for batch in range(1, 25):
        for minibatches in (1, 2, 3, 4, 6):
            for accum in (1, 2, 3, 4):
                args = utils.parse_flags(train_ppo.Args, ["--batch_size", str(batch), "--num_minibatches",
                                                          str(minibatches), "--grad_accum", str(accum)])
                if batch % minibatches == 0 and (batch // minibatches) % accum == 0:
                    train_common.check_rollout_flags(args)
                else:
                    with pytest.raises(utils.UserError, match="must be divisible by"):
                        train_common.check_rollout_flags(args)
    for stop_at, ok in ((0, False), (1, True), (7, True), (8, False)):
        args = utils.parse_flags(train_ppo.Args, ["--num_iterations", "7", "--stop_at", str(stop_at)])
        if ok:
            train_common.check_rollout_flags(args)
        else:
            with pytest.raises(utils.UserError, match=r"^--stop_at must be in 1\.\.7 \(--num_iterations\)"):
                train_common.check_rollout_flags(args)


@pytest.mark.parametrize("name", ["train_sft.py", "train_rm.py", "train_dpo.py"])
def test_check_loop_flags_takes_each_bound_and_refuses_just_past_it(name, monkeypatch):
    """
    check_loop_flags at the edge of every bound, each refusal one line naming the flag and its value: the counts at 1
    pass, at 0 are refused; --lr > 0 with 0 <= --min_lr <= --lr (min_lr = lr, a constant rate, and min_lr 0 pass);
    --warmup, --weight_decay and --grad_clip 0 pass, just below 0 are refused; the LoRA flags named without a rank are
    refused in one line, both together too; with a rank, --lora_alpha must be > 0 and --lora_rank >= 0.
    """
    from nanorlhf import train_common

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    config = runpy.run_path(os.path.join(ROOT, name), run_name="not_main")["Config"]

    def check(*argv):
        train_common.check_loop_flags(utils.parse_flags(config, list(argv)))

    for flag_name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "log_interval",
                      "ckpt_interval"):
        check(f"--{flag_name}", "1", "--warmup", "0")
        with pytest.raises(utils.UserError, match=rf"^--{flag_name} must be at least 1, got 0$"):
            check(f"--{flag_name}", "0")
    for lr, min_lr in (("1e-3", "1e-3"), ("1e-3", "0"), ("1e-3", "5e-4"), ("1e-9", "1e-9")):
        check(f"--lr={lr}", f"--min_lr={min_lr}")
    for lr, min_lr in (("0", "0"), ("-1e-3", "-1e-3"), ("1e-3", "1.001e-3"), ("1e-3", "-1e-9")):
        with pytest.raises(utils.UserError, match=re.escape(f"need --lr > 0 and 0 <= --min_lr <= --lr, got --lr "
                                                            f"{float(lr)} --min_lr {float(min_lr)}")):
            check(f"--lr={lr}", f"--min_lr={min_lr}")
    for flag_name, message in (("warmup", "--warmup must be >= 0 (0: no warmup), got -1"),
                               ("weight_decay", "--weight_decay must be >= 0, got -1e-09"),
                               ("grad_clip", "--grad_clip must be >= 0 (0: no clipping), got -1e-09")):
        check(f"--{flag_name}", "0")
        below = "-1" if flag_name == "warmup" else "-1e-9"
        with pytest.raises(utils.UserError, match=f"^{re.escape(message)}$"):
            check(f"--{flag_name}={below}")
    if not hasattr(config, "lora_rank"):
        return
    for argv, message in ((["--lora_targets", "c_fc"], "--lora_targets does nothing without --lora_rank > 0"),
                          (["--lora_alpha", "8", "--lora_targets", "c_fc"],
                           "--lora_alpha and --lora_targets do nothing without --lora_rank > 0"),
                          (["--lora_rank", "4", "--lora_alpha", "0"], "--lora_alpha must be > 0, got 0.0"),
                          (["--lora_rank=-1"], "--lora_rank must be >= 0 (0 = no LoRA), got -1")):
        with pytest.raises(utils.UserError, match=f"^{re.escape(message)}$"):
            check(*argv)
    check("--lora_rank", "1", "--lora_alpha", "1e-9", "--lora_targets", "c_fc")


def test_read_split_needs_a_val_frac_strictly_between_0_and_1_only_without_val_data():
    """
    read_split: without --val_data, --val_frac 0 or 1 (or past them) is refused naming the flag, not a split of one
    record or of none; with --val_data, --val_frac is not read. round(val_frac * n) records held out, at least 1.
    """
    from nanorlhf import train_common

    records = [{"i": i} for i in range(10)]
    files = {"a.jsonl": records, "b.jsonl": records[:3]}
    for val_frac in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(utils.UserError, match=re.escape(f"--val_frac must be in (0, 1) when there is no "
                                                            f"--val_data, got {val_frac}")):
            train_common.read_split(files.get, "a.jsonl", None, val_frac, seed=0)
        assert train_common.read_split(files.get, "a.jsonl", "b.jsonl", val_frac, seed=0) == (records, records[:3])
    for val_frac, n_val in ((1e-9, 1), (0.9, 9), (0.94, 9), (0.26, 3)):
        train, val = train_common.read_split(files.get, "a.jsonl", None, val_frac, seed=3)
        assert len(val) == n_val and len(train) == 10 - n_val
        assert sorted(r["i"] for r in train + val) == list(range(10))


def test_check_rollout_flags_takes_each_bound_and_refuses_just_past_it(monkeypatch):
    """check_rollout_flags (PPO's and GRPO's) at the edge of every bound: each refusal one line naming the flag."""
    from nanorlhf import train_common

    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def check(*argv):
        train_common.check_rollout_flags(utils.parse_flags(train_ppo.Args, list(argv)))

    for argv in ([], ["--batch_size", "1", "--num_minibatches", "1", "--grad_accum", "1"],
                 ["--beta1", "0", "--beta2", "0"], ["--beta1", "0.999999", "--beta2", "0.999999"],
                 ["--temperature", "1e-6"], ["--response_length", "1"],
                 ["--num_samples", "1", "--sample_interval", "1", "--save_interval", "1"], ["--gold", "on"],
                 ["--gold", "off"], ["--gold", "auto"], ["--max_grad_norm", "0"], ["--weight_decay", "0"]):
        check(*argv)
    sizes = "--batch_size, --num_minibatches and --grad_accum must be >= 1"
    intervals = "--sample_interval and --save_interval must be >= 1"
    for argv, message in ((["--batch_size", "0"], sizes), (["--num_minibatches", "0"], sizes),
                          (["--grad_accum", "0"], sizes),
                          (["--beta1", "1"], "--beta1 must be in [0, 1), got 1.0"),
                          (["--beta2", "1"], "--beta2 must be in [0, 1), got 1.0"),
                          (["--beta1=-0.1"], "--beta1 must be in [0, 1), got -0.1"),
                          (["--temperature", "0"], "--temperature must be > 0 (a policy gradient needs a stochastic "
                                                   "policy)"),
                          (["--response_length", "0"], "--response_length must be >= 1"),
                          (["--num_samples", "0"], "--num_samples must be >= 1, got 0"),
                          (["--sample_interval", "0"], intervals), (["--save_interval", "0"], intervals),
                          (["--gold", "yes"], "--gold 'yes': expected auto, on or off"),
                          (["--gold", ""], "--gold '': expected auto, on or off"),
                          (["--max_grad_norm=-0.5"], "--max_grad_norm must be >= 0 (0: no clipping), got -0.5"),
                          (["--weight_decay=-0.1"], "--weight_decay must be >= 0, got -0.1")):
        with pytest.raises(utils.UserError, match=f"^{re.escape(message)}$"):
            check(*argv)


def test_gold_on_is_auto_when_every_prompt_is_the_tasks_and_on_refuses_one_that_is_not():
    """train_common.gold_on, every mode against prompts all the task's, one foreign, and none: a table by hand."""
    from nanorlhf import train_common

    task, foreign = ["sort 3 1", "sort 9 8 7"], ["sort 3 1", "x" * 100, "hello"]
    for mode, prompts, want in (("auto", task, True), ("auto", foreign, False), ("auto", [], True),
                                ("on", task, True), ("off", task, False), ("off", foreign, False)):
        assert train_common.gold_on(mode, prompts, "p.jsonl") is want, (mode, prompts)
    with pytest.raises(utils.UserError) as e:  # the first foreign prompt, cut to 60 characters
        train_common.gold_on("on", foreign, "p.jsonl")
    assert str(e.value) == (f"--gold on: p.jsonl holds prompts that are not the built-in task's, e.g. {'x' * 60!r}, "
                            f"which its gold judge cannot score (it would log 0); use --gold auto or off")


@pytest.mark.parametrize("argv, want", [
    (["--resume"], "on"), (["--resume", "--seed", "1"], "on"), (["--seed", "1", "--resume"], "on"),
    (["--resume", "auto"], "auto"), (["--resume=auto", "--seed", "1"], "auto"),
    (["--seed", "1", "--resume=off"], "off"),
    (["--resume", "--seed", "1", "--resume"], "on"), (["--resume", "--resume", "auto"], "auto"), ([], "off"),
])
def test_parse_stage_flags_reads_a_bare_resume_as_on_wherever_it_stands(argv, want):
    """
    train_common.parse_stage_flags: a bare --resume (last, or before another --flag) is `--resume on`, each of them
    where there are several; `--resume=auto` is already a flag with its value, nothing is added after it.
    """
    from nanorlhf import train_common

    args = train_common.parse_stage_flags(train_ppo.Args, argv)
    assert args.resume == want and args.seed == (1 if "1" in argv else train_ppo.Args.seed)
