"""
bench.py's flag checks: a size that would fail deep inside a part (or after minutes of the parts before it) is
refused right after parsing, in one line with exit status 2, before anything runs.
"""

import sys

import pytest
import torch

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


# -----------------------------------------------------------------------------
# the numbers the benchmarks print, on a fake clock: each checked against the formula written out


class Clock:
    """A perf_counter that returns `ticks` one by one (or counts up by 1 when none are given)."""

    def __init__(self, ticks=None):
        self.ticks, self.n = ticks, 0

    def __call__(self):
        self.n += 1
        return float(self.n) if self.ticks is None else float(self.ticks[self.n - 1])


def fake_time(monkeypatch, module, clock, cpu_clock=None):
    """module.time replaced by a namespace whose perf_counter (and process_time) is the fake clock."""
    import types
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=clock, process_time=cpu_clock or clock))


def test_train_and_generate_parts_report_tokens_per_s_flops_and_mfu_by_the_formula(monkeypatch, capsys):
    # every perf_counter call is 1 s after the one before: the train part times its steps in one interval (1 s for
    # all of them), each generate part its one call (1 s)
    import json
    fake_time(monkeypatch, bench, Clock())
    monkeypatch.setattr(bench, "peak_flops", lambda rt: (1e9, "fake"))
    L, H, d, V, T, B, Bg, steps = 1, 2, 16, 40, 32, 2, 3, 2
    bench.main(["--n_layer", str(L), "--n_head", str(H), "--n_embd", str(d), "--block_size", str(T), "--vocab_size",
                str(V), "--batch_size", str(B), "--gen_batch_size", str(Bg), "--steps", str(steps), "--prompt_len",
                "4", "--new_tokens", "5", "--parts", "train,generate,nocache", "--device", "cpu", "--dtype", "float32",
                "--json"])
    res = json.loads(capsys.readouterr().out)
    dt = 1.0 / steps
    assert res["train_s_per_step"] == pytest.approx(dt)
    assert res["train_tokens_per_s"] == pytest.approx(B * T / dt)
    # PaLM: 6 N + 12 L H Q T, N the parameters without the position embeddings (wte is the LM head, it counts)
    model = bench.GPT(bench.GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=H, n_embd=d))
    n = sum(p.numel() for name, p in model.named_parameters() if name != "transformer.wpe.weight")
    flops = 6 * n + 12 * L * H * (d // H) * T
    assert res["flops_per_token"] == flops
    assert res["mfu"] == pytest.approx(flops * B * T / dt / 1e9)
    assert res["gen_tokens_per_s_kv_cache"] == pytest.approx(Bg * 5 / 1.0)  # new tokens only, --gen_batch_size rows
    assert res["gen_tokens_per_s_no_cache"] == pytest.approx(Bg * 5 / 1.0)


def test_ppo_part_averages_the_timed_iterations_after_the_warm_up(monkeypatch):
    times = iter([(100.0, 200.0), (1.0, 2.0), (3.0, 6.0), (5.0, 4.0)])  # the first is the warm-up
    args = bench.train_ppo.Args(batch_size=4)
    monkeypatch.setattr(bench, "ppo_setup", lambda cfg, model_cfg, rt: (args, None, None, lambda: next(times)))
    cfg = bench.parse_flags(bench.Config, TINY + ["--ppo_iters", "3"])
    res = bench.bench_ppo(cfg, None, utils.setup_runtime("cpu", "float32"))
    rollout, update = (1.0 + 3.0 + 5.0) / 3, (2.0 + 6.0 + 4.0) / 3
    assert res["ppo_rollout_s"] == pytest.approx(rollout) and res["ppo_update_s"] == pytest.approx(update)
    assert res["ppo_iter_s"] == pytest.approx(rollout + update)


def test_best_time_is_the_fastest_timed_call(monkeypatch):
    durations = [3.0, 1.0, 2.5]
    ticks = [x for i, t in enumerate(durations) for x in (10.0 * i, 10.0 * i + t)]
    fake_time(monkeypatch, bench, Clock(ticks))
    assert bench.best_time(lambda: None, utils.setup_runtime("cpu", "float32"), n=3) == min(durations)


def test_the_floor_part_runs_each_product_on_train_ppo_rows_and_dtypes(monkeypatch):
    # every F.linear the floor part times, as (rows, in, out, dtype), against the shapes written out: the SFT
    # step's B x T rows, PPO's micro-batches of ppo_batch_size / num_minibatches sequences (prompt + response)
    # through the trunk and of responses only through the LM head; the head float32, the trunk in the run's dtype
    import collections
    import types
    L, d, V, B, T, Tp, N, P = 2, 16, 40, 2, 32, 4, 6, 8
    cfg = bench.parse_flags(bench.Config, TINY + ["--n_layer", str(L), "--vocab_size", str(V), "--prompt_len",
                                                  str(Tp), "--response_length", str(N), "--ppo_batch_size", str(P)])
    model_cfg = bench.GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=2, n_embd=d, dropout=0.0)
    rt = utils.setup_runtime("cpu", "bfloat16")
    seen, attention = collections.Counter(), []

    def linear(x, w):
        seen[(x.shape[0], x.shape[1], w.shape[0], x.dtype)] += 1
        return x @ w.t()

    def sdpa(q, k, v, is_causal):
        attention.append((tuple(q.shape), q.dtype, is_causal))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal)

    monkeypatch.setattr(bench, "F", types.SimpleNamespace(linear=linear, scaled_dot_product_attention=sdpa))
    monkeypatch.setattr(bench, "best_time", lambda f, rt, n=10: (f(), 1.0)[1])
    bench.bench_floor(cfg, model_cfg, rt)
    micro = P // 4  # train_ppo's num_minibatches
    want = collections.Counter()
    for _ in range(L):
        for k, n in ((d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)):
            want[(B * T, k, n, torch.bfloat16)] += 1
            want[(micro * (Tp + N), k, n, torch.bfloat16)] += 2  # scoring and update: each timed once
    want[(B * T, d, V, torch.float32)] += 1
    want[(micro * N, d, V, torch.float32)] += 2
    assert seen == want
    assert attention == [((B, 2, T, d // 2), torch.float32, True)]  # on a CPU model.py's attention runs float32


def test_rm_part_reports_seconds_per_step_the_median_ratio_and_the_tokens_run(monkeypatch):
    # per round the two layouts are timed in turn: row per response a[i] s, prompt once b[i] s, for --steps steps
    a, b, steps = [6.0, 2.0, 9.0], [1.0, 2.0, 3.0], 2
    ticks = []
    for i in range(3):
        ticks += [100.0 * i, 100.0 * i + a[i], 100.0 * i + 50.0, 100.0 * i + 50.0 + b[i]]
    fake_time(monkeypatch, bench, Clock(ticks))
    Tp, N, Bp, K = 3, 2, 2, 3
    cfg = bench.parse_flags(bench.Config, ["--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--block_size", "32",
                                           "--prompt_len", str(Tp), "--response_length", str(N), "--rm_batch_size",
                                           str(Bp), "--rm_responses", str(K), "--steps", str(steps), "--rounds", "3",
                                           "--device", "cpu"])
    model_cfg = bench.GPTConfig(block_size=32, vocab_size=cfg.vocab_size, n_layer=1, n_head=2, n_embd=16)
    res = bench.bench_rm(cfg, model_cfg, utils.setup_runtime("cpu", "float32"))
    assert res["rm_s_per_step"]["row per response"] == pytest.approx([x / steps for x in a])
    assert res["rm_s_per_step"]["prompt once"] == pytest.approx([x / steps for x in b])
    assert res["rm_speedup"] == pytest.approx(sorted(x / y for x, y in zip(a, b))[1])  # the median of 3
    assert res["rm_tokens"] == {"row per response": Bp * K * (Tp + N), "prompt once": Bp * (Tp + K * N)}


@pytest.mark.parametrize("flags, message", [
    (["--parts", "floor", "--ppo_batch_size", "6"], "--ppo_batch_size 6 must be divisible by train_ppo's"),
    (["--parts", "rm", "--rounds", "0"], "--steps, --ppo_iters, --batch_size, --rounds >= 1"),
    (["--parts", "rm", "--rm_responses", "1"], "--rm_batch_size >= 1 and --rm_responses >= 2"),
    (["--vocab_size", "2"], "--vocab_size must leave room for EOS and PAD"),
])
def test_more_bad_flags_are_refused(capsys, flags, message):
    base = ["--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--block_size", "32", "--prompt_len", "4",
            "--response_length", "4", "--device", "cpu"]
    refused_before_anything_runs(base + flags, message, capsys)


def test_a_prompt_and_its_new_tokens_may_fill_the_block_exactly(monkeypatch):
    monkeypatch.setattr(bench, "bench_generate", lambda cfg, model_cfg, rt, use_cache: 1.0)
    monkeypatch.setattr(bench, "bench_ppo", lambda cfg, model_cfg, rt: {})
    base = ["--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--block_size", "32", "--device", "cpu", "--json"]
    bench.main(base + ["--parts", "generate", "--prompt_len", "28", "--new_tokens", "4"])
    bench.main(base + ["--parts", "ppo", "--prompt_len", "28", "--response_length", "4", "--ppo_batch_size", "4"])


def test_bench_generate_keeps_the_fastest_run_and_its_cpu_time(monkeypatch):
    wall, cpu = [3.0, 1.0, 2.5], [30.0, 10.0, 25.0]
    fake_time(monkeypatch, bench_generate, Clock([x for i, t in enumerate(wall) for x in (10.0 * i, 10.0 * i + t)]),
              Clock([x for i, t in enumerate(cpu) for x in (100.0 * i, 100.0 * i + t)]))
    model = bench.GPT(bench.GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=2, n_embd=8)).eval()
    idx = torch.randint(0, 10, (2, 3))
    got = bench_generate.timed(model, idx, torch.ones_like(idx), 2, True, 3, utils.setup_runtime("cpu", "float32"))
    assert got == (1.0, 10.0)


def test_bench_generate_prints_each_round_and_the_median_speed_up(monkeypatch, capsys):
    # timed() returns (wall, cpu) per call: the warm-up, then each round's cached and naive runs
    B, N = 2, 4
    kv, naive = [(2.0, 1.0), (1.0, 2.0), (4.0, 1.0)], [(8.0, 5.0), (6.0, 4.0), (9.0, 8.0)]
    calls = iter([(1.0, 1.0)] + [t for pair in zip(kv, naive) for t in pair])
    monkeypatch.setattr(bench_generate, "timed", lambda *a: next(calls))
    bench_generate.main(GEN_TINY + ["--rounds", "3"])
    lines = capsys.readouterr().out.splitlines()
    for k, ((dk, ck), (dn, cn)) in enumerate(zip(kv, naive)):
        assert lines[1 + k] == (f"round {k + 1}: kv cache {B * N / dk:8.0f} tokens/s {1000 * dk / N:7.2f} ms/step | "
                                f"naive {B * N / dn:6.0f} tokens/s {1000 * dn / N:7.2f} ms/step | speed-up "
                                f"{dn / dk:.1f}x wall clock, {cn / ck:.1f}x cpu time")
    ratios = sorted(dn / dk for (dk, _), (dn, _) in zip(kv, naive))  # 1.5, 2.25, 4
    assert lines[4] == f"speed-up: {ratios[1]:.1f}x (median of 3 rounds; min {ratios[0]:.1f}x, max {ratios[2]:.1f}x)"


def test_bench_memory_alternates_the_options_and_prints_medians_of_the_timed_rounds(monkeypatch, capsys):
    # iteration() returns (rollout, update) s per option and round; round 0 is the warm-up and is not timed
    per_round = {"full": [(50.0, 50.0), (2.0, 4.0), (3.0, 1.0), (5.0, 5.0)],
                 "shared": [(70.0, 70.0), (1.0, 1.0), (2.0, 2.0), (1.0, 4.0)]}
    calls = []

    def iteration(o, batch, rt):
        r = sum(c[0] == o for c in calls)
        calls.append((o, torch.initial_seed()))
        return per_round[o][r]

    monkeypatch.setattr(bench_memory, "setup", lambda o, args, d, rt: (o,))
    monkeypatch.setattr(bench_memory, "iteration", iteration)
    bench_memory.main(MEM_TINY + ["--rounds", "3", "--seed", "5"])
    assert calls == [("full", 5), ("shared", 5), ("shared", 6), ("full", 6), ("full", 7), ("shared", 7),
                     ("shared", 8), ("full", 8)]
    lines = capsys.readouterr().out.splitlines()
    full, shared = per_round["full"][1:], per_round["shared"][1:]
    rows = [line for line in lines if line.startswith("| full") or line.startswith("| shared")]
    assert len(rows) == 2 and "speed-up vs full" in lines[-4]
    for row, times in zip(rows, (full, shared)):
        total = sorted(a + b for a, b in times)[1]
        rollout, update = sorted(a for a, _ in times)[1], sorted(b for _, b in times)[1]
        ratio = sorted((a0 + b0) / (a + b) for (a0, b0), (a, b) in zip(full, times))[1]
        assert row.split(" | ")[1:] == [f"{total:.2f}", f"{rollout:.2f}", f"{update:.2f}", f"{ratio:.2f}x |"], row
    assert [line for line in lines if line.startswith("round 3")] == ["round 3: full 10.00 s, shared 5.00 s"]


def test_bench_memory_builds_each_option_as_train_ppo_would(tmp_path):
    args = bench_memory.utils.parse_flags(bench_memory.Args, MEM_TINY + ["--options", "full,lora+shared"])
    tok = bench_memory.Tokenizer.byte_level()
    config = bench.GPTConfig(block_size=args.block_size, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16)
    utils.save_checkpoint(str(tmp_path / "sft"), utils.model_payload(bench.GPT(config), tok, "sft", {}, 0))
    utils.save_checkpoint(str(tmp_path / "rm"), utils.model_payload(bench.ScalarGPT(config), tok, "rm", {}, 0))
    rt = utils.setup_runtime("cpu", "float32")
    ppo_args, m, actor_opt, critic_opt = bench_memory.setup("full", args, str(tmp_path), rt)
    assert (ppo_args.critic, ppo_args.lora_rank) == ("separate", 0) and m["critic"] is not None
    assert [g["lr"] for g in actor_opt.param_groups] == [ppo_args.lr] * len(actor_opt.param_groups)
    assert [g["lr"] for g in critic_opt.param_groups] == [ppo_args.critic_lr] * len(critic_opt.param_groups)
    ppo_args, m, actor_opt, critic_opt = bench_memory.setup("lora+shared", args, str(tmp_path), rt)
    assert (ppo_args.critic, ppo_args.lora_rank) == ("shared", 8) and m["critic"] is None and critic_opt is None


def test_bench_memory_iteration_splits_rollout_and_update_seconds(monkeypatch):
    fake_time(monkeypatch, bench_memory, Clock([10.0, 13.0, 20.0]))  # start, rollout done, update done
    monkeypatch.setattr(bench_memory, "generate_responses", lambda *a: None)
    monkeypatch.setattr(bench_memory.train_ppo, "make_experience", lambda *a: None)
    monkeypatch.setattr(bench_memory.train_ppo, "ppo_update", lambda *a: None)
    m = {"actor": torch.nn.Linear(1, 1), "ref": None, "reward_model": None, "critic": None, "tok": None}
    batch = {"idx": None, "attention_mask": None}
    args = bench_memory.train_ppo.Args()
    assert bench_memory.iteration(args, m, None, None, batch, utils.setup_runtime("cpu", "float32")) == (3.0, 7.0)
