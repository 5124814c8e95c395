"""
bench.py's flag checks: a size that would fail deep inside a part (or after minutes of the parts before it) is
refused right after parsing, in one line with exit status 2, before anything runs.
"""

import sys

import pytest

from scripts import ROOT

sys.path.insert(0, ROOT)  # bench.py is a top-level script

import bench  # noqa: E402
from nanorlhf import utils  # noqa: E402

# a tiny workload, so that a check that is missing fails the test quickly instead of benchmarking for minutes
TINY = ["--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--block_size", "32", "--prompt_len", "4",
        "--new_tokens", "4", "--ppo_batch_size", "4", "--response_length", "4", "--steps", "1", "--ppo_iters", "1",
        "--batch_size", "2", "--device", "cpu"]


@pytest.mark.parametrize("flags, message", [
    (["--n_head", "0"], "--n_head must be at least 1, got 0"),
    (["--n_embd", "-4"], "--n_embd must be at least 1, got -4"),
    (["--n_head", "3"], "--n_embd 16 must be divisible by --n_head 3"),
    (["--parts", ","], "--parts ',': expected a comma-separated subset of"),
    (["--prompt_len", "0"], "--prompt_len must be at least 1, got 0"),
    (["--new_tokens", "0", "--parts", "generate"], "--new_tokens must be at least 1, got 0"),
    (["--response_length", "0", "--parts", "ppo"], "--response_length must be at least 1, got 0"),
    (["--ppo_batch_size", "0"], "--ppo_batch_size must be at least 1, got 0"),
    (["--ppo_batch_size", "6"], "--ppo_batch_size 6 must be divisible by train_ppo's num_minibatches (4)"),
])
def test_bad_flags_are_one_line_and_exit_2_before_anything_runs(capsys, flags, message):
    refused_before_anything_runs(TINY + flags, message, capsys)


def refused_before_anything_runs(argv, message, capsys):
    """bench.main(argv) exits 2 with one line that starts with message, and prints nothing else."""
    with pytest.raises(SystemExit) as e:
        utils.run(lambda: bench.main(argv))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: " + message), err
    assert out == ""  # no part ran


@pytest.mark.parametrize("flags, message", [
    # --rounds, --rm_batch_size and --gen_batch_size were accepted here and ignored (exit 0)
    (["--parts", "train", "--rounds", "7", "--rm_batch_size", "3", "--gen_batch_size", "5"],
     "--gen_batch_size (parts generate, nocache, hf), --rm_batch_size (part rm), --rounds (parts rm, hf, trl) do "
     "nothing with --parts train"),
    (["--parts", "generate", "--ppo_iters", "3"], "--ppo_iters (part ppo) does nothing with --parts generate"),
    (["--parts", "ppo", "--steps", "3"], "--steps (parts train, rm, hf) does nothing with --parts ppo"),
    (["--parts", "generate,floor", "--compile"], "--compile (parts train, ppo, rm, trl) does nothing with --parts "
                                                 "generate,floor"),
])
def test_a_flag_that_no_chosen_part_reads_is_refused(capsys, flags, message):
    """As bench_memory.py refuses --lora_rank without a lora option: one line naming the flag, before anything runs."""
    base = ["--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--block_size", "128", "--device", "cpu"]
    refused_before_anything_runs(base + flags, message, capsys)


def test_every_flag_a_part_reads_is_accepted_with_it_and_only_with_it():
    """unused_flags against each part's own list, read off the bench_* functions (the model's flags serve all)."""
    reads = {"train": {"batch_size", "steps", "compile"},
             "generate": {"batch_size", "gen_batch_size", "prompt_len", "new_tokens"},
             "nocache": {"batch_size", "gen_batch_size", "prompt_len", "new_tokens"},
             "ppo": {"ppo_batch_size", "response_length", "prompt_len", "ppo_iters", "compile"},
             "rm": {"rm_batch_size", "rm_responses", "prompt_len", "response_length", "steps", "rounds", "compile"},
             "floor": {"batch_size", "prompt_len", "ppo_batch_size", "response_length"},
             "hf": {"batch_size", "gen_batch_size", "prompt_len", "new_tokens", "steps", "rounds"},
             "trl": {"ppo_batch_size", "response_length", "prompt_len", "rounds", "compile"}}
    workload = set().union(*reads.values())
    assert set(bench.USED_BY) == workload
    for part, flags in reads.items():
        for name in workload:
            assert (bench.unused_flags({name}, [part]) == []) == (name in flags), (part, name)
    for name in ("n_layer", "vocab_size", "activation", "device", "dtype", "seed", "json", "parts"):
        assert bench.unused_flags({name}, ["floor"]) == []


def test_a_length_is_checked_against_the_block_only_where_a_part_uses_it(capsys):
    """--parts rm never generates --new_tokens: its default 64 needs no room in a block of 32 (it was refused)."""
    flags = ["--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--block_size", "32", "--prompt_len", "4",
             "--response_length", "4", "--rm_batch_size", "2", "--steps", "1", "--rounds", "1", "--device", "cpu"]
    bench.main(flags + ["--parts", "rm"])
    assert "RM step, each prompt once" in capsys.readouterr().out
    with pytest.raises(utils.UserError, match=r"--prompt_len \+ --new_tokens \(68\) must fit --block_size 32"):
        bench.main(flags + ["--parts", "rm,generate"])


def test_the_floor_part_times_every_linear_product_of_the_step_and_the_iteration(monkeypatch, capsys):
    # each timed product counted as 1 s: the floors become counts of products, checked against the model's
    # shapes written out (a block: qkv, attention out, MLP in, MLP out; forward, and backward's two products)
    L, d, V, B, T, Tp, N = 2, 16, 40, 2, 32, 4, 6
    cfg = bench.parse_flags(bench.Config, TINY + ["--n_layer", str(L), "--vocab_size", str(V), "--prompt_len",
                                                  str(Tp), "--response_length", str(N), "--ppo_batch_size", "8"])
    model_cfg = bench.GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=2, n_embd=d, dropout=0.0)
    rt = utils.setup_runtime("cpu", "float32")
    monkeypatch.setattr(bench, "best_time", lambda f, rt, n=10: (f(), 1.0)[1])
    res = bench.bench_floor(cfg, model_cfg, rt)
    epochs, minibatches = 4, 4  # train_ppo's defaults
    assert res["floor_sft_linears_s"] == 3 * (4 * L + 1)
    assert res["floor_sft_attention_s"] == L
    assert res["floor_ppo_scoring_s"] == minibatches * (4 * 4 * L + 2)  # four trunks, two LM heads
    assert res["floor_ppo_update_s"] == epochs * minibatches * (2 * 3 * 4 * L + 3)  # actor and critic, one head
    assert res["floor_sft_linear_flops"] == 6 * B * T * (L * (3 * d * d + d * d + 4 * d * d + 4 * d * d) + d * V)
    monkeypatch.undo()
    floor_flags = []  # TINY without the flags that the floor part does not read (bench.py refuses them)
    for name, value in zip(TINY[::2], TINY[1::2]):
        if name not in ("--new_tokens", "--steps", "--ppo_iters"):
            floor_flags += [name, value]
    bench.main(floor_flags + ["--parts", "floor"])  # the real thing, timed
    out = capsys.readouterr().out
    assert "SFT step floor (s)" in out and "PPO iteration floor (s)" in out, out


# -----------------------------------------------------------------------------
# bench_generate.py

import bench_generate  # noqa: E402

GEN_TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--batch_size", "2", "--prompt_len", "4",
            "--new_tokens", "4", "--rounds", "1", "--repeats", "1", "--device", "cpu"]


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--prompt_len", "0"], "--prompt_len must be at least 1, got 0"),
    (["--new_tokens", "0"], "--new_tokens must be at least 1, got 0"),
    (["--n_layer", "0"], "--n_layer must be at least 1, got 0"),
    (["--vocab_size", "0"], "--vocab_size must be at least 1, got 0"),
    (["--rounds", "0"], "--rounds must be at least 1, got 0"),
    (["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--naive_repeats", "0"], "--naive_repeats must be at least 1, got 0"),
    (["--n_head", "3"], "--n_embd 16 must be divisible by --n_head 3"),
    (["--left_pad", "4"], "--left_pad must be from 0 to --prompt_len - 1 (3), got 4"),
    (["--left_pad", "-1"], "--left_pad must be from 0 to --prompt_len - 1 (3), got -1"),
    (["--threads", "-1"], "--threads must be 0 (torch's default) or more, got -1"),
    (["--dtype", "fp8"], "--dtype 'fp8'"),
    (["--device", "xyz"], "--device 'xyz'"),
])
def test_bench_generate_bad_flags_are_one_line_and_exit_2(capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        utils.run(lambda: bench_generate.main(GEN_TINY + flags))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: " + message), err
    assert out == ""  # nothing was timed


def test_bench_generate_runs_a_tiny_model(capsys):
    bench_generate.main(GEN_TINY + ["--left_pad", "3"])
    assert "speed-up:" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# bench_memory.py

import bench_memory  # noqa: E402

MEM_TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--batch_size", "4", "--response_length", "4",
            "--rounds", "1", "--device", "cpu"]


@pytest.mark.parametrize("flags, message", [
    (["--options", ""], "--options '': name at least one of full, shared, lora, lora+shared"),
    (["--options", ","], "--options ',': name at least one of"),
    (["--options", "full,full"], "--options 'full,full': full is named twice"),
    (["--options", "lora", "--lora_rank", "0"], "--lora_rank must be at least 1 for the lora options, got 0"),
    (["--options", "full,shared", "--lora_rank", "4"], "--lora_rank does nothing without a lora option"),
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--batch_size", "3"], "--batch_size 3 must be divisible by train_ppo.py's num_minibatches x grad_accum (4 x 1)"),
    (["--response_length", "0"], "--response_length must be at least 1, got 0"),
    (["--n_layer", "0"], "--n_layer must be at least 1, got 0"),
    (["--n_head", "3"], "--n_embd 16 must be divisible by --n_head 3"),
    # the longest of the first 4 prompts is 37 tokens: 37 + 4 = 41 fits, 40 failed deep in the scoring
    (["--block_size", "40"], "the longest prompt (37 tokens) + --response_length 4 must fit --block_size 40"),
    (["--block_size", "8"], "the longest prompt (37 tokens) + --response_length 4 must fit --block_size 8"),
])
def test_bench_memory_bad_flags_are_one_line_and_exit_2(capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        utils.run(lambda: bench_memory.main(MEM_TINY + flags))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: " + message), err
    assert out == ""  # nothing was built or timed


def test_bench_memory_accepts_the_largest_prompt_that_fits():
    assert bench_memory.check_args(bench_memory.utils.parse_flags(bench_memory.Args, MEM_TINY + ["--block_size", "41"]),
                                   bench_memory.Tokenizer.byte_level()) == ["full", "shared"]
