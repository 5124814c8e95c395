"""
Tests of the torchrun path (nanorlhf/dist.py) on the CPU: 2 processes with the gloo backend, tiny models.
The claim under test is nanoGPT's batch semantics: a 2-rank run with --grad_accum G takes the same optimizer steps
on the same examples as one process with --grad_accum G, so its losses, gradient norms and weights match the
1-process run. They match within 1e-5, not bitwise: gloo sums the ranks' gradients in another order than one
process accumulates its micro-batches. The gradient norm is compared too because AdamW's update hardly changes when
every gradient is scaled by the same factor (a sum-vs-average slip would leave the weights almost equal).
"""

import builtins
import json
import os
import signal
import subprocess
import sys
import types

import pytest
import torch

from scripts import ENV, ROOT, read_metrics, script

from nanorlhf import dist, tasks, utils

TOL = 1e-5
SFT = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "64", "--batch_size", "8",
       "--grad_accum", "2", "--lr", "3e-3", "--min_lr", "3e-4", "--warmup", "2", "--max_steps", "4", "--val_frac", "0.1",
       "--eval_interval", "2", "--eval_batches", "2", "--log_interval", "1", "--ckpt_interval", "2",
       "--device", "cpu", "--dtype", "float32"]
RM = ["--batch_size", "4", "--grad_accum", "2", "--lr", "5e-3", "--min_lr", "5e-4", "--warmup", "2", "--max_steps", "4",
      "--val_frac", "0.2", "--eval_interval", "2", "--eval_batches", "2", "--log_interval", "1", "--ckpt_interval", "2",
      "--norm_samples", "40", "--device", "cpu", "--dtype", "float32"]
PPO = ["--num_iterations", "3", "--batch_size", "8", "--num_minibatches", "2", "--grad_accum", "2", "--ppo_epochs", "2",
       "--response_length", "12", "--adaptive_kl", "--target_kl", "0.01", "--kl_horizon", "100", "--ptx_coef", "0.5",
       "--save_interval", "1", "--device", "cpu", "--dtype", "float32"]
GRPO = ["--num_iterations", "3", "--batch_size", "12", "--group_size", "4", "--num_minibatches", "2", "--grad_accum", "2",
        "--num_epochs", "2", "--response_length", "12", "--save_interval", "1", "--sample_interval", "1",
        "--kl_in", "reward", "--device", "cpu", "--dtype", "float32"]
DPO = ["--batch_size", "4", "--grad_accum", "2", "--lr", "1e-3", "--warmup", "2", "--max_steps", "4", "--val_frac", "0.2",
       "--eval_interval", "2", "--eval_batches", "2", "--log_interval", "1", "--ckpt_interval", "2", "--gold_prompts", "4",
       "--response_length", "8", "--device", "cpu", "--dtype", "float32"]
COMPARED = ("loss", "grad_norm", "val_loss", "acc", "val_acc", "lr", "pad_frac", "epoch", "reward_mean", "reward_std",
            # PPO: the rollout (sampled responses, scores, KL), the adaptive beta, and the update's losses and norms
            "score", "rm_score", "kl", "kl_k3", "entropy", "response_length", "eos_frac", "explained_variance", "beta",
            "pg_loss", "vf_loss", "ptx_loss", "approx_kl", "ratio", "critic_grad_norm", "first_ratio_max_dev",
            "clipfrac", "vf_clipfrac", "non_score_reward",
            # GRPO: the group rewards and advantages, the KL term of the loss
            "reward", "equal_groups", "adv_abs", "kl_loss",
            # DPO: the implicit rewards, the held-out metrics and the gold score of sampled responses
            "margin", "chosen_reward", "rejected_reward", "val_margin", "gold")


def torchrun(name, *args, nproc=2):
    """Run ROOT/name under `python -m torch.distributed.run --standalone --nproc_per_node nproc`; fail unless rc 0."""
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                        os.path.join(ROOT, name), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def assert_same_run(got_dir, want_dir, files=("ckpt.pt",)):
    """Every logged number (but timings) within TOL of the 1-process run, and the saved weights within TOL."""
    got, want = read_metrics(got_dir), read_metrics(want_dir)
    assert len(got) == len(want) and [r.get("step", r.get("iter")) for r in got] == [r.get("step", r.get("iter")) for r in want]
    for g, w in zip(got, want):
        for k in COMPARED:
            assert (k in g) == (k in w), (k, g, w)
            if k in w:
                assert g[k] == pytest.approx(w[k], rel=TOL, abs=TOL), (k, g, w)
    for name in files:
        a = torch.load(os.path.join(got_dir, name), weights_only=True)
        b = torch.load(os.path.join(want_dir, name), weights_only=True)
        assert a["step"] == b["step"] and sorted(a["model"]) == sorted(b["model"])
        for k in b["model"]:
            assert torch.allclose(a["model"][k], b["model"][k], rtol=0, atol=TOL), (name, k)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    tasks.generate_task(str(d), n_sft=300, n_prefs=120, n_prefs_eval=10, n_prompts=10, n_eval=10)
    return d


@pytest.fixture(scope="module")
def sft_one(data, tmp_path_factory):
    """The reference: one process, 4 steps of 2 micro-batches of 8."""
    out = tmp_path_factory.mktemp("sft_one")
    script("train_sft.py", "--data", str(data / "sft.jsonl"), "--out_dir", str(out), *SFT)
    return out


def test_sft_two_ranks_equal_one_process_and_resume(data, sft_one, tmp_path):
    """2 ranks x 1 micro-batch == 1 process x 2 micro-batches; stopped at step 2 and resumed under torchrun."""
    out = tmp_path / "sft"
    cmd = ["--data", str(data / "sft.jsonl"), "--out_dir", str(out), *SFT]
    p = torchrun("train_sft.py", *cmd, "--stop_at", "2")
    assert p.stdout.count("step 2/4") == 1  # rank 1 prints nothing
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    torchrun("train_sft.py", *cmd, "--resume")
    assert_same_run(out, sft_one)
    assert sorted(os.listdir(out)) == ["ckpt.pt", "metrics.jsonl", "train_state.pt"]


def test_sft_fsdp_equals_one_process_and_loads_in_one_process(data, sft_one, tmp_path):
    """--fsdp (FSDP2 per block, gloo): the same run, and its full-state-dict checkpoint loads into one process."""
    out = tmp_path / "sft_fsdp"
    torchrun("train_sft.py", "--data", str(data / "sft.jsonl"), "--out_dir", str(out), *SFT, "--fsdp")
    assert_same_run(out, sft_one)
    model, tok, _ = utils.load_model(str(out), kind="gpt")
    assert model.config.n_layer == 2 and tok.name == "byte"


def rm_flags(data, sft_one):
    return ["--data", str(data / "prefs.jsonl"), "--sft_data", str(data / "sft.jsonl"), "--init_from", str(sft_one), *RM]


@pytest.fixture(scope="module")
def rm_one(data, sft_one, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm_one")
    script("train_rm.py", *rm_flags(data, sft_one), "--out_dir", str(out))
    return out


def test_rm_fsdp_equals_one_process_and_resumes(data, sft_one, rm_one, tmp_path):
    """
    The reward model with --fsdp on 2 ranks, stopped at step 2 and resumed (the sharded AdamW state goes through
    train_state.pt): the same run as one process, the final bias shift of the sharded head and the reward mean and
    std included. (The DDP path is the one SFT's and PPO's tests run.)
    """
    one, two, common = rm_one, tmp_path / "rm_two", rm_flags(data, sft_one)
    torchrun("train_rm.py", *common, "--out_dir", str(two), "--stop_at", "2", "--fsdp")
    torchrun("train_rm.py", *common, "--out_dir", str(two), "--resume", "--fsdp")
    assert_same_run(two, one)
    assert abs(read_metrics(two)[-1]["reward_mean"]) < 1e-5


@pytest.mark.parametrize("stage", ["train_sft.py", "train_ppo.py", "train_grpo.py"])
def test_grad_accum_must_divide_over_ranks(data, tmp_path, stage):
    """--grad_accum 3 on 2 ranks: one line, exit 2, nothing written, before any process group is started."""
    out = tmp_path / "out"
    env = {**ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}  # what torchrun sets; no rendezvous is reached
    flags = {"train_sft.py": ["--data", str(data / "sft.jsonl"), *SFT],
             "train_ppo.py": ["--data", str(data / "prompts.jsonl"), *PPO, "--ptx_coef", "0", "--batch_size", "12"],
             # a rollout of 12 rows in 2 minibatches: 6 rows, 3 micro-batches of 2 (valid in one process)
             "train_grpo.py": ["--data", str(data / "prompts.jsonl"), *GRPO, "--batch_size", "12"]}[stage]
    p = subprocess.run([sys.executable, os.path.join(ROOT, stage), *flags, "--out_dir", str(out), "--grad_accum", "3"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "--grad_accum 3" in p.stderr and "world size 2" in p.stderr and not out.exists()


@pytest.mark.parametrize("flags", [["--grad_accum", "3"], ["--fsdpp"]])
def test_a_mistake_under_torchrun_is_said_once(data, tmp_path, flags):
    """
    Both ranks meet the mistake (--grad_accum 3 on 2 ranks after parsing, a misspelt flag at parsing): the user sees
    its line exactly once, from rank 0. The line was lost when rank 1 got there first (only rank 0 printed, and
    torchrun ended rank 0 on rank 1's exit), or printed once per rank (the flag parser's).
    """
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "train_sft.py"), "--data", str(data / "sft.jsonl"), *SFT, "--out_dir",
                        str(out), *flags], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    lines = [line for line in (p.stdout + p.stderr).splitlines() if "error: " in line and "--" in line]
    # (from rank 0, unless rank 1 met it more than utils.ERROR_WAIT seconds earlier on a loaded machine: still once)
    assert p.returncode != 0 and len(lines) == 1, p.stderr[-3000:]
    assert flags[0] in lines[0] and not out.exists()


def test_a_mistake_on_a_rank_other_than_0_is_said_by_that_rank(monkeypatch, capsys):
    """
    Rank 1 alone meets a mistake (a rank past the machine's last GPU): it waits utils.ERROR_WAIT seconds (rank 0,
    meeting the same mistake, would have printed it and had torchrun end this rank), then prints it after its rank,
    one line, exit status 2. The flag parser's errors alike. Rank 0 prints at once.
    """
    waits = []
    monkeypatch.setattr(utils.time, "sleep", waits.append)

    def main():
        raise utils.UserError("torchrun started rank 1 of this machine, but it has 1 GPUs")

    for rank, want_waits, prefix in (("0", [], ""), ("1", [utils.ERROR_WAIT], "[rank 1] ")):
        monkeypatch.setenv("RANK", rank)
        waits.clear()
        with pytest.raises(SystemExit) as e:
            utils.run(main)
        assert e.value.code == 2 and waits == want_waits
        assert capsys.readouterr().err == f"{prefix}error: torchrun started rank 1 of this machine, but it has 1 GPUs\n"
        waits.clear()
        parser = utils.FlagParser(prog="x.py")
        parser.add_argument("--lr", type=float, default=1.0)
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["--lr", "fast"])
        assert e.value.code == 2 and waits == want_waits
        err = capsys.readouterr().err
        assert err.startswith(f"{prefix}x.py: error: ") and err.count("\n") == 1 and "--lr" in err, err


def test_a_sigterm_while_ctrl_c_is_handled_is_no_traceback(monkeypatch, capsys):
    """
    torchrun passes a Ctrl-C on as SIGINT and sends SIGTERM a millisecond later: the SIGTERM's Terminated, raised
    while run() put its handler back after the KeyboardInterrupt, was a traceback. Now the first stop is reported.
    """
    real = utils.signal.signal
    calls = []

    def signal_then_sigterm(signum, handler):
        calls.append(handler)
        previous = real(signum, handler)
        if len(calls) == 2:  # run() puts the earlier handler back: the SIGTERM lands here
            utils._terminate(signum, None)
        return previous

    monkeypatch.setattr(utils.signal, "signal", signal_then_sigterm)
    monkeypatch.delenv("RANK", raising=False)

    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        utils.run(main)
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    assert len(calls) == 3 and calls[2] is calls[1]  # the handler is put back after the SIGTERM all the same
    assert signal.getsignal(signal.SIGTERM) is calls[1]


@pytest.mark.parametrize("name, argv", [("evaluate", ["--sft", "x"]), ("sample", ["--ckpt", "x", "--prompt", "hi"]),
                                        ("export_hf", ["--ckpt", "x", "--out", "y"]), ("kl_sweep", []),
                                        ("compare", [])])
def test_the_one_process_scripts_refuse_torchrun(name, argv, tmp_path, monkeypatch):
    """Under torchrun every rank did the whole evaluation (or export, sweep, comparison) and wrote the same files."""
    import importlib
    monkeypatch.syspath_prepend(ROOT)
    module = importlib.import_module(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(utils.UserError, match=f"^{name}.py runs in one process, but torchrun started 2: run it with"):
        module.main(*([] if name == "compare" else [argv]))
    assert os.listdir(tmp_path) == []


def test_fsdp_needs_torchrun(data, tmp_path):
    out = tmp_path / "out"
    p = script("train_rm.py", "--data", str(data / "prefs.jsonl"), "--out_dir", str(out), "--fsdp", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--fsdp" in p.stderr and "torchrun" in p.stderr
    assert not out.exists()


def test_one_process_helpers_are_no_ops(monkeypatch):
    """Without torchrun: world size 1, every micro-batch is this rank's, sums are the values themselves."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    assert dist.mine([1, 2, 3]) == [1, 2, 3] and dist.check_grad_accum(3) == 3
    x = [3, 0.5]
    assert dist.all_reduce_sum(x) is x
    model = torch.nn.Linear(2, 2)
    assert dist.wrap(model) is model and dist.unwrap(model) is model
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert dist.mine(list(range(8))) == [4, 5] and dist.check_grad_accum(8) == 2 and not dist.is_main()
    with pytest.raises(utils.UserError, match="divisible by the world size 4"):
        dist.check_grad_accum(6)


def test_one_process_defaults_and_setup_start_nothing(monkeypatch):
    """
    Without torchrun: local rank 0, setup() returns the device it was given and starts no process group, the
    per-rank micro-batch count is an int (scripts range() over it), and --fsdp is refused; with WORLD_SIZE 2 it is
    accepted.
    """
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dist.td, "init_process_group", lambda **kw: pytest.fail("process group started"))
    assert dist.local_rank() == 0 and dist.setup("cpu") == "cpu" and dist.setup("auto") == "auto"
    assert type(dist.check_grad_accum(4)) is int
    with pytest.raises(utils.UserError, match="^--fsdp shards the model"):
        dist.check_fsdp(True)
    dist.check_fsdp(False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    dist.check_fsdp(True)
    assert type(dist.check_grad_accum(4)) is int and dist.check_grad_accum(4) == 2


def test_mine_refuses_items_that_do_not_split_over_the_ranks(monkeypatch):
    """7 micro-batches on 2 ranks: rank 1 would silently lose one (7 // 2 = 3 each), so mine() stops instead."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert dist.mine(list(range(8))) == [4, 5, 6, 7]
    with pytest.raises(AssertionError, match="7 items do not split over 2 ranks"):
        dist.mine(list(range(7)))


def test_setup_under_torchrun_picks_backend_device_and_silences_other_ranks(monkeypatch):
    """
    setup() with torchrun's variables and the collectives replaced by recorders: on a GPU machine rank 3 of a
    2-node run with LOCAL_RANK 1 runs on cuda:1 (its machine's GPU, not cuda:3) with nccl and prints nothing;
    --device auto without CUDA stays on the CPU with gloo; rank 0 keeps print; a started group is not started again.
    """
    monkeypatch.setattr(builtins, "print", builtins.print)  # setup() replaces it on ranks > 0: put back after
    real_print = builtins.print
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist.td, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist.td, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name, value in (("WORLD_SIZE", "4"), ("RANK", "3"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    assert dist.setup("auto") == "cuda:1" and calls == [("set_device", "cuda:1"), ("init", "nccl")]
    assert builtins.print is not real_print
    builtins.print = real_print
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    calls.clear()
    assert dist.setup("auto") == "auto" and calls == [("init", "gloo")] and builtins.print is real_print
    monkeypatch.setattr(dist.td, "is_initialized", lambda: True)
    calls.clear()
    assert dist.setup("cpu") == "cpu" and calls == []


def test_cleanup_waits_for_every_rank_then_ends_the_group(monkeypatch):
    calls = []
    monkeypatch.setattr(dist.td, "is_initialized", lambda: True)
    monkeypatch.setattr(dist.td, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist.td, "destroy_process_group", lambda: calls.append("destroy"))
    dist.cleanup()
    assert calls == ["barrier", "destroy"]
    monkeypatch.setattr(dist.td, "is_initialized", lambda: False)
    calls.clear()
    dist.cleanup()
    assert calls == []


def test_wrap_fsdp_shards_each_block_then_the_root_each_summing(monkeypatch):
    """
    FSDP2 with a recording fully_shard: every transformer block, then the whole model (of the module under
    torch.compile's wrapper), each set to divide by 1 and to a plain sum; wrap returns the model it was given.
    """
    calls = []

    def fully_shard(module):
        calls.append(("shard", module))
        module.set_gradient_divide_factor = lambda f: calls.append(("divide", module, f))
        module.set_force_sum_reduction_for_comms = lambda on: calls.append(("sum", module, on))

    # the module stands in for torch.distributed.fsdp, whose import alone takes seconds
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", types.SimpleNamespace(fully_shard=fully_shard))
    monkeypatch.setenv("WORLD_SIZE", "2")
    raw = torch.nn.Module()
    raw.transformer = torch.nn.Module()
    raw.transformer.h = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
    compiled = torch.nn.Module()
    compiled._orig_mod = raw
    assert dist.wrap(compiled, fsdp=True) is compiled
    want = [c for m in [*raw.transformer.h, raw] for c in (("shard", m), ("divide", m, 1.0), ("sum", m, True))]
    assert calls == want


def test_wrap_ddp_takes_the_local_gpu_and_the_sum_hook(monkeypatch):
    """DDP (a recorder in its place): device_ids [LOCAL_RANK] for a model on a GPU, None on the CPU; the sum hook."""

    class DDP:
        def __init__(self, model, device_ids):
            self.module, self.device_ids, self.hooks = model, device_ids, []

        def register_comm_hook(self, state, hook):
            self.hooks.append((state, hook))

    class OnGPU(torch.nn.Module):
        def parameters(self, recurse=True):
            return iter([types.SimpleNamespace(is_cuda=True)])

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", DDP)
    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    for name, value in (("WORLD_SIZE", "4"), ("RANK", "3"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    gpu, cpu = OnGPU(), torch.nn.Linear(2, 2)
    for model, device_ids in ((gpu, [1]), (cpu, None)):
        ddp = dist.wrap(model)
        assert ddp.module is model and ddp.device_ids == device_ids and ddp.hooks == [(None, dist._sum_hook)]
        assert dist.unwrap(ddp) is model


def test_sync_grads_and_writable_on_ddp_and_fsdp_stand_ins():
    """
    sync_grads sets DDP's flag to `on` and calls FSDP2's setter with `on`; writable gives a plain model's parameter
    itself, and under FSDP2 reshards first, then this rank's shard (to_local) of the parameter.
    """
    calls = []
    ddp = types.SimpleNamespace(require_backward_grad_sync=True)
    shard = torch.zeros(2)
    fsdp = types.SimpleNamespace(set_requires_gradient_sync=lambda on: calls.append(("sync", on)),
                                 reshard=lambda: calls.append("reshard"),
                                 get_parameter=lambda name: calls.append(("get", name)) or
                                 types.SimpleNamespace(to_local=lambda: shard))
    for on in (False, True, False):
        dist.sync_grads(ddp, on)
        dist.sync_grads(fsdp, on)
        assert ddp.require_backward_grad_sync is on and calls[-1] == ("sync", on)
    dist.sync_grads(torch.nn.Linear(2, 2), True)  # one process: nothing to set
    calls.clear()
    assert dist.writable(fsdp, "head.bias") is shard and calls == ["reshard", ("get", "head.bias")]
    model = torch.nn.Linear(2, 2)
    assert dist.writable(model, "bias") is model.bias


def test_full_state_dict_in_one_process_is_every_tensor_detached():
    """Parameters and buffers (BatchNorm's running statistics), equal to the state_dict's, none tracking gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model(torch.randn(5, 3))  # moves the running statistics off their initial values
    want = model.state_dict()
    got = dist.full_state_dict(model)
    assert list(got) == list(want) and "1.running_mean" in got
    assert all(torch.equal(got[k], want[k]) and not got[k].requires_grad and got[k].device.type == "cpu" for k in want)


def test_metrics_logger_writes_on_rank_0_only(monkeypatch, tmp_path):
    """Rank 0 gets utils.MetricsLogger(out_dir, resume, step); rank 1 a logger that writes nothing, anywhere."""
    made = []
    monkeypatch.setattr(utils, "MetricsLogger", lambda *args: made.append(args) or "logger")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    dist.metrics_logger(str(tmp_path / "out"), True, 7).log({"step": 1})
    assert made == [] and not (tmp_path / "out").exists()
    monkeypatch.setenv("RANK", "0")
    out = str(tmp_path / "out")
    assert dist.metrics_logger(out, True, 7) == "logger" and made == [(out, True, 7)]

def test_ppo_two_ranks_equal_one_process_and_resume(data, sft_one, rm_one, tmp_path):
    """
    PPO with 2 ranks (each scores 4 of the 8 episodes and runs 1 of the 2 micro-batches of each minibatch, PPO-ptx
    and the adaptive KL controller on) equals one process: the same sampled responses, rewards, whitened advantages,
    beta, losses and gradient norms, and the same actor and critic; stopped after iteration 2 and resumed.
    """
    one, two = tmp_path / "ppo_one", tmp_path / "ppo_two"
    common = ["--data", str(data / "prompts.jsonl"), "--sft", str(sft_one), "--rm", str(rm_one),
              "--ptx_data", str(data / "sft.jsonl"), *PPO]
    script("train_ppo.py", *common, "--out_dir", str(one))
    torchrun("train_ppo.py", *common, "--out_dir", str(two), "--stop_at", "2")
    torchrun("train_ppo.py", *common, "--out_dir", str(two), "--resume")
    rows = read_metrics(one)
    assert len({r["beta"] for r in rows}) == 3  # the controller moved beta: its input is compared too
    assert_same_run(two, one, files=("ckpt.pt", "critic.pt"))


def test_dpo_two_ranks_equal_one_process_and_resume(data, sft_one, tmp_path):
    """DPO (each rank 1 of the 2 micro-batches of a step): the same run as one process, resumed at step 2."""
    one, two = tmp_path / "dpo_one", tmp_path / "dpo_two"
    common = ["--data", str(data / "prefs.jsonl"), "--sft", str(sft_one), *DPO]
    script("train_dpo.py", *common, "--out_dir", str(one))
    torchrun("train_dpo.py", *common, "--out_dir", str(two), "--stop_at", "2")
    torchrun("train_dpo.py", "--out_dir", str(two), "--resume")
    assert_same_run(two, one)


def test_grpo_two_ranks_equal_one_process_and_resume(data, sft_one, rm_one, tmp_path):
    """
    GRPO with 2 ranks equals one process: the same sampled responses, scores, group advantages, losses and weights;
    stopped after iteration 2 and resumed under torchrun. 12 rows = 3 groups of 4, each rank scores 6 of them, so
    the middle group is split between the ranks: advantages taken over a rank's rows instead of whole gathered
    groups would differ (and so would every later number).
    """
    one, two = tmp_path / "grpo_one", tmp_path / "grpo_two"
    common = ["--data", str(data / "prompts.jsonl"), "--sft", str(sft_one), "--rm", str(rm_one), *GRPO]
    script("train_grpo.py", *common, "--out_dir", str(one))
    p = torchrun("train_grpo.py", *common, "--out_dir", str(two), "--stop_at", "2")
    assert p.stdout.count("iter 2/3") == 1  # rank 1 prints nothing
    assert torch.load(two / "ckpt.pt", weights_only=True)["step"] == 2
    torchrun("train_grpo.py", *common, "--out_dir", str(two), "--resume")
    assert_same_run(two, one)
    # the groups had a signal to compare: the tiny SFT model seldom ends a response (all of a group's scores are then
    # --missing_eos_penalty, and equal_groups often 1), so the KL goes into the reward (--kl_in reward), where it
    # differs between responses
    assert all(r["adv_abs"] > 0.1 for r in read_metrics(one))
    assert sorted(os.listdir(two)) == ["ckpt.pt", "metrics.jsonl", "samples.jsonl", "samples.txt", "train_state.pt"]
    samples = [[json.loads(line) for line in open(d / "samples.jsonl")] for d in (one, two)]
    assert [(r["iter"], r["prompt"], r["response"]) for r in samples[1]] == \
        [(r["iter"], r["prompt"], r["response"]) for r in samples[0]]  # the same text, written once


# the shared trunk without PPO-ptx: the ptx forward goes through the DDP wrapper's forward() and would make DDP sum
# the gradients of a pass that bypassed it (so the test could not catch that bypass)
@pytest.mark.parametrize("option", [["--critic", "shared", "--ptx_coef", "0"], ["--lora_rank", "4"]],
                         ids=["shared", "lora"])
def test_ppo_option_two_ranks_equal_one_process_and_resume(data, sft_one, rm_one, tmp_path, option):
    """
    PPO's memory options under torchrun (2 ranks, the adaptive KL on), stopped after iteration 2 and
    resumed, equal one process. --critic shared: the one pass for logits and values must go through the DDP
    wrapper's forward(), else the ranks never sum their gradients and each trains on half the minibatch.
    --lora_rank: DDP over the adapters and heads only (the frozen base is not synced), the LoRA critic on the
    reward model's own weights, adapters.pt for the resume; ckpt.pt and critic.pt are the merged weights.
    """
    one, two = tmp_path / "one", tmp_path / "two"
    ptx = [] if "--critic" in option else ["--ptx_data", str(data / "sft.jsonl")]  # --ptx_coef 0: no --ptx_data
    common = ["--data", str(data / "prompts.jsonl"), "--sft", str(sft_one), "--rm", str(rm_one), *ptx, *PPO, *option]
    script("train_ppo.py", *common, "--out_dir", str(one))
    torchrun("train_ppo.py", *common, "--out_dir", str(two), "--stop_at", "2")
    torchrun("train_ppo.py", *common, "--out_dir", str(two), "--resume")
    assert_same_run(two, one, files=("ckpt.pt", "critic.pt"))
    if option[0] == "--lora_rank":
        a = torch.load(two / "adapters.pt", weights_only=True)
        b = torch.load(one / "adapters.pt", weights_only=True)
        for part in ("actor", "critic"):
            assert sorted(a[part]) == sorted(b[part]) and len(b[part]) > 0
            for k in b[part]:
                assert torch.allclose(a[part][k], b[part][k], rtol=0, atol=TOL), (part, k)


def test_torchrun_on_gpus_the_machine_lacks_is_one_line(monkeypatch):
    """
    Under torchrun, setup() set the CUDA device before setup_runtime could say anything: --device cuda on a machine
    without CUDA was a traceback from torch.cuda.set_device, as was a rank past the last GPU. Neither starts a
    process group.
    """
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device called"))
    monkeypatch.setattr(dist.td, "init_process_group", lambda **kw: pytest.fail("process group started"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(utils.UserError, match="^--device cuda: CUDA is not available on this machine"):
        dist.setup("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(utils.UserError, match="^torchrun started rank 1 of this machine, but it has 1 GPUs"):
        dist.setup("auto")


# one torchrun of this script: every collective of dist.py on 2 gloo ranks, each rank's inputs and outputs saved for
# the test to check against sums, maxima and concatenations written out by hand
COLLECTIVES = r'''
import sys
sys.path.insert(0, sys.argv[2])
import torch
from nanorlhf import dist

device = dist.setup("cpu")
r, out = dist.rank(), sys.argv[1]
print(f"rank {r} speaks")  # only rank 0's line may reach stdout
g = torch.Generator().manual_seed(100 + r)  # each rank its own inputs
x = torch.randn(3, 4, generator=g, dtype=torch.float64)
n = int(torch.randint(1, 10**6, (), generator=g))
count = 2**40 + 1 + r  # a float32 would round it
values = torch.randn(2, generator=g, dtype=torch.float64).tolist()
rows = torch.randn(2, 3, generator=g, dtype=torch.float64)
own = torch.randn(2 + r, 3, generator=g)  # rank 0's has 2 rows, rank 1's 3: from_main takes rank 0's shape
ids = torch.randint(2**40, (2 + r, 2), generator=g)  # int64 past float32's exact integers: from_main keeps the dtype
# DDP over a float64 linear model with the same init on every rank: 2 micro-batches, synced on the last only
torch.manual_seed(0)
model = torch.nn.Linear(3, 1).double()
init = {k: v.clone() for k, v in model.state_dict().items()}
train_model = dist.wrap(model)
micro = [(torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 1, generator=g, dtype=torch.float64))
         for _ in range(2)]
for m, (xb, yb) in enumerate(micro):
    dist.sync_grads(train_model, m == len(micro) - 1)
    (train_model(xb) - yb).square().sum().backward()
torch.save({"x": x, "n": n, "count": count, "values": values, "rows": rows, "own": own, "init": init, "micro": micro,
            "sum_x": dist.all_reduce_sum(x), "sum_n": dist.all_reduce_sum(n), "sum_values": dist.all_reduce_sum(values),
            "max_x": dist.all_reduce_max(x), "dict": dist.all_reduce_dict({"count": count, "x00": x[0, 0]}),
            "gathered": dist.gather_rows(rows), "from_main": dist.from_main(own), "ids": ids,
            "from_main_ids": dist.from_main(ids), "mine": dist.mine(list(range(6))),
            "grads": {k: p.grad for k, p in model.named_parameters()}}, f"{out}/rank{r}.pt")
dist.cleanup()
'''


def test_collectives_on_two_ranks_equal_plain_sums_and_concatenations(tmp_path):
    """
    all_reduce_sum (a tensor, an int that stays an int, a list), all_reduce_max, all_reduce_dict (in float64: a count
    past 2**24 stays exact), gather_rows (in rank order), from_main (rank 0's tensor, of rank 0's shape and
    dtype), mine, the
    gradients of DDP with the sum hook and sync_grads (the sum over ranks and micro-batches, as one process would
    accumulate them), and print silenced on rank 1: every one against the reference written out from both ranks'
    inputs.
    """
    worker = tmp_path / "collectives.py"
    worker.write_text(COLLECTIVES)
    p = torchrun(str(worker), str(tmp_path), ROOT)
    assert p.stdout.count("rank 0 speaks") == 1 and "rank 1 speaks" not in p.stdout
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    a, b = ranks
    for r, got in enumerate(ranks):
        assert torch.equal(got["sum_x"], a["x"] + b["x"])
        assert type(got["sum_n"]) is int and got["sum_n"] == a["n"] + b["n"]
        assert got["sum_values"] == pytest.approx([u + v for u, v in zip(a["values"], b["values"])], rel=1e-15)
        assert torch.equal(got["max_x"], torch.where(a["x"] > b["x"], a["x"], b["x"]))
        assert sorted(got["dict"]) == ["count", "x00"] and got["dict"]["count"].item() == a["count"] + b["count"]
        assert got["dict"]["x00"].item() == pytest.approx(a["x"][0, 0].item() + b["x"][0, 0].item(), rel=1e-15)
        assert torch.equal(got["gathered"], torch.cat([a["rows"], b["rows"]]))
        assert torch.equal(got["from_main"], a["own"])
        assert got["from_main_ids"].dtype == torch.int64 and torch.equal(got["from_main_ids"], a["ids"])
        assert got["mine"] == [[0, 1, 2], [3, 4, 5]][r]
        # d/dW sum_i (W x_i + c - y_i)^2 = sum_i 2 (W x_i + c - y_i) x_i, by a loop over every example of both ranks
        w, c = a["init"]["weight"][0].tolist(), a["init"]["bias"][0].item()
        grad_w, grad_c = [0.0] * 3, 0.0
        for rank in ranks:
            for xb, yb in rank["micro"]:
                for xi, yi in zip(xb.tolist(), yb[:, 0].tolist()):
                    e = sum(wj * xj for wj, xj in zip(w, xi)) + c - yi
                    grad_w = [gj + 2 * e * xj for gj, xj in zip(grad_w, xi)]
                    grad_c += 2 * e
        assert got["grads"]["weight"][0].tolist() == pytest.approx(grad_w, rel=1e-12, abs=1e-12)
        assert got["grads"]["bias"].item() == pytest.approx(grad_c, rel=1e-12, abs=1e-12)
