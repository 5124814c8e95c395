"""
Tests of the torchrun path (nanorlhf/dist.py) on the CPU: 2 processes with the gloo backend, tiny models.
The claim under test is nanoGPT's batch semantics: a 2-rank run with --grad_accum G takes the same optimizer steps
on the same examples as one process with --grad_accum G, so its losses, gradient norms and weights match the
1-process run. They match within 1e-5, not bitwise: gloo sums the ranks' gradients in another order than one
process accumulates its micro-batches. The gradient norm is compared too because AdamW's update hardly changes when
every gradient is scaled by the same factor (a sum-vs-average slip would leave the weights almost equal).
"""

import os
import subprocess
import sys

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
DPO = ["--batch_size", "4", "--grad_accum", "2", "--lr", "1e-3", "--warmup", "2", "--max_steps", "4", "--val_frac", "0.2",
       "--eval_interval", "2", "--eval_batches", "2", "--log_interval", "1", "--ckpt_interval", "2", "--gold_prompts", "4",
       "--response_length", "8", "--device", "cpu", "--dtype", "float32"]
COMPARED = ("loss", "grad_norm", "val_loss", "acc", "val_acc", "lr", "pad_frac", "epoch", "reward_mean", "reward_std",
            # PPO: the rollout (sampled responses, scores, KL), the adaptive beta, and the update's losses and norms
            "score", "rm_score", "kl", "kl_k3", "entropy", "response_length", "eos_frac", "explained_variance", "beta",
            "pg_loss", "vf_loss", "ptx_loss", "approx_kl", "ratio", "critic_grad_norm", "first_ratio_max_dev",
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


@pytest.mark.parametrize("stage", ["train_sft.py", "train_ppo.py"])
def test_grad_accum_must_divide_over_ranks(data, tmp_path, stage):
    """--grad_accum 3 on 2 ranks: one line, exit 2, nothing written, before any process group is started."""
    out = tmp_path / "out"
    env = {**ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}  # what torchrun sets; no rendezvous is reached
    flags = {"train_sft.py": ["--data", str(data / "sft.jsonl"), *SFT],
             "train_ppo.py": ["--data", str(data / "prompts.jsonl"), *PPO, "--ptx_coef", "0", "--batch_size", "12"]}[stage]
    p = subprocess.run([sys.executable, os.path.join(ROOT, stage), *flags, "--out_dir", str(out), "--grad_accum", "3"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "--grad_accum 3" in p.stderr and "world size 2" in p.stderr and not out.exists()


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


def test_grpo_refuses_torchrun(tmp_path):
    """train_grpo.py has no distributed path yet: under torchrun's environment it stops, one line, nothing written."""
    out = tmp_path / "out"
    env = {**ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_grpo.py"), "--out_dir", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "torchrun" in p.stderr and not out.exists()


def test_ppo_critic_shared_refuses_torchrun(data, tmp_path):
    """
    --critic shared under torchrun (2 ranks, gloo): DDP syncs gradients through forward() only, and the shared trunk's
    one pass (logits_and_values) bypasses it, so each rank stops with one line naming the flag, before the process
    group starts and before anything is written (utils.run: rank 0 prints the line, every rank exits 2).
    """
    from nanorlhf.model import GPT, GPTConfig, ScalarGPT
    from nanorlhf.tokenizer import Tokenizer
    config, tok = GPTConfig(block_size=64, vocab_size=258, n_layer=2, n_head=2, n_embd=32), Tokenizer.byte_level()
    utils.save_checkpoint(str(tmp_path / "sft"), utils.model_payload(GPT(config), tok, "sft", {"seed": 0}, 1))
    utils.save_checkpoint(str(tmp_path / "rm"), utils.model_payload(ScalarGPT(config), tok, "rm", {"seed": 0}, 1,
                                                                    reward_mean=0.0, reward_std=1.0))
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "train_ppo.py"), "--data", str(data / "prompts.jsonl"), "--sft",
                        str(tmp_path / "sft"), "--rm", str(tmp_path / "rm"), *PPO, "--ptx_coef", "0",
                        "--critic", "shared", "--out_dir", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode != 0 and len(errors) == 1, p.stderr[-4000:]  # every rank stops; rank 0 says why
    assert "--critic shared" in errors[0] and "torchrun" in errors[0], errors
    assert "exitcode  : 2" in p.stderr  # torchrun's summary: the rank exited with the bad-input status
    # no Python traceback from the script itself (torchrun's launcher prints its own ChildFailedError one)
    assert 'train_ppo.py", line' not in p.stderr and not out.exists(), p.stderr[-4000:]
