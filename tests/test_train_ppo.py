"""
Tests of train_ppo.py's rollout and update (the PPO math itself is tested in test_ppo_math.py).

In-process tests use random tiny models (2 layers, 32 wide, byte-level tokenizer) and the real rollout and update
functions. The end-to-end tests run the script as a subprocess on the built-in task, with tiny SFT and RM
checkpoints made by train_sft.py and train_rm.py (about 30 s, once per module).
"""

import copy
import dataclasses
import json
import sys

import pytest
import torch

from scripts import ROOT, read_metrics, script

sys.path.insert(0, ROOT)  # train_ppo.py is a top-level script

from nanorlhf import data as D
from nanorlhf import tasks
from nanorlhf import utils
from nanorlhf.losses import sft_loss
from nanorlhf.model import GPT, GPTConfig, ScalarGPT
from nanorlhf.rollout import disable_dropout, freeze, generate_responses, next_prompt_indices, truncate_after_eos
from nanorlhf.tokenizer import Tokenizer

import train_ppo
from train_ppo import Args, make_experience, ppo_update

PROMPTS = ["sort 5 3 8 1", "sort 2 9 4", "sort 7 7 1 0 3 6", "sort 4 1 2", "sort 9 8 7 6 5 4 3 2",
           "sort 0 1", "sort 3 3 3", "sort 6 2 8 1 4"]


def tiny_models(seed=0, dropout=0.0):
    """actor, ref, reward model, critic: random tiny models as train_ppo.main builds them (dropout off)."""
    torch.manual_seed(seed)
    config = GPTConfig(block_size=64, vocab_size=258, n_layer=2, n_head=2, n_embd=32, dropout=dropout)
    actor = GPT(config)
    ref = copy.deepcopy(actor)
    reward_model = ScalarGPT(config)
    critic = copy.deepcopy(reward_model)
    for m in (actor, ref, reward_model, critic):
        disable_dropout(m)
    for m in (ref, reward_model):
        freeze(m)
    return actor, ref, reward_model, critic


def prompt_batch(tok, n=8):
    return D.collate([tok.render_prompt(p) for p in (PROMPTS * 4)[:n]], tok.pad_id, left_pad=True)


def rt():
    return utils.setup_runtime("cpu", "float32", seed=0)


def test_truncate_after_eos():
    E, P = 256, 257
    response = torch.tensor([[7, 9, E, 4, 5], [E, 1, E, 2, 3], [1, 2, 3, 4, 5]])
    cut, mask = truncate_after_eos(response, E, P)
    assert cut.tolist() == [[7, 9, E, P, P], [E, P, P, P, P], [1, 2, 3, 4, 5]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    # random rows with 0, 1 or several EOS against a plain loop
    response = torch.randint(250, 258, (200, 9))
    cut, mask = truncate_after_eos(response, E, P)
    for row, c, m in zip(response.tolist(), cut.tolist(), mask.tolist()):
        end = row.index(E) + 1 if E in row else len(row)
        assert m == [1] * end + [0] * (len(row) - end) and c == row[:end] + [P] * (len(row) - end)


def test_score_lands_at_last_real_token():
    """
    make_experience on hand-made responses of different lengths (one without EOS): the score is the RM's value
    at the row's last real token, computed here on each row alone and unpadded, and it is added to the reward of
    the last real response token; every other real token gets only -beta * KL, pads get 0. The values and
    logprobs of response token t are the critic's and actor's at the position before it, on the row alone.
    """
    tok = Tokenizer.byte_level()
    actor, ref, reward_model, critic = tiny_models()
    with torch.no_grad():  # make the reference differ from the actor so that the KL terms are not 0
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    E, P = tok.eos_id, tok.pad_id
    responses = [[32, 49, E], [32, 49, 32, 50, 32, 51, E], [E], [32, 52, 32, 53, 32, 54, 32, 55]]
    lengths = [3, 7, 1, 8]
    N = 8
    # as generate returns them: pad after EOS; the third row also has junk after its EOS that must be cut
    response = torch.full((4, N), P)
    for i, r in enumerate(responses):
        response[i, :len(r)] = torch.tensor(r)
    response[2, 3] = 65
    batch = prompt_batch(tok, 4)
    args = Args(kl_coef=0.3, missing_eos_penalty=-7.0, temperature=0.8)
    exp = make_experience(actor, ref, reward_model, critic, batch["idx"], batch["attention_mask"], response, tok,
                          args, args.kl_coef, rt())

    assert exp["response_mask"].sum(-1).tolist() == lengths
    for i, (r, L) in enumerate(zip(responses, lengths)):
        alone = torch.tensor([tok.render_prompt(PROMPTS[i]) + r])
        expected = reward_model(alone)[0, -1].item()  # no padding at all: the last position is the last real token
        assert exp["rm_scores"][i].item() == pytest.approx(expected, abs=1e-5)
        score = expected if r[-1] == E else -7.0
        assert exp["scores"][i].item() == pytest.approx(score, abs=1e-5)
        # reference logprobs on the row alone, logits / temperature, to rebuild the KL part of the reward
        lp = torch.log_softmax(actor(alone)[0] / 0.8, -1)
        lp_ref = torch.log_softmax(ref(alone)[0] / 0.8, -1)
        v = critic(alone)[0]  # V(s) at every position of the row alone
        T0 = alone.size(1) - L
        for t in range(N):
            reward = exp["rewards"][i, t].item()
            if t >= L:
                assert reward == 0.0 and exp["values"][i, t] == 0.0 and exp["logprobs"][i, t] == 0.0
                continue
            y = alone[0, T0 + t]
            # response token t is predicted, and valued, at the position before it
            assert exp["values"][i, t].item() == pytest.approx(v[T0 + t - 1].item(), abs=1e-5), (i, t)
            assert exp["logprobs"][i, t].item() == pytest.approx(lp[T0 + t - 1, y].item(), abs=1e-5), (i, t)
            kl = (lp[T0 + t - 1, y] - lp_ref[T0 + t - 1, y]).item()
            expected_reward = -0.3 * kl + (score if t == L - 1 else 0.0)
            assert reward == pytest.approx(expected_reward, abs=1e-4), (i, t)
    assert exp["has_eos"].tolist() == [True, True, True, False]


def one_iteration(actor, ref, reward_model, critic, args, seed=0):
    """One PPO iteration through the real code path: generate, make_experience, ppo_update."""
    tok = Tokenizer.byte_level()
    r = rt()
    torch.manual_seed(seed)
    batch = prompt_batch(tok, args.batch_size)
    response = generate_responses(actor, batch["idx"], batch["attention_mask"], tok, args)
    exp = make_experience(actor, ref, reward_model, critic, batch["idx"], batch["attention_mask"], response, tok,
                          args, args.kl_coef, r)
    opt_a = utils.configure_optimizer(actor, args.lr, args.weight_decay, (args.beta1, args.beta2), "cpu")
    opt_c = utils.configure_optimizer(critic, args.critic_lr, args.weight_decay, (args.beta1, args.beta2), "cpu")
    return exp, ppo_update(actor, critic, opt_a, opt_c, exp, args, r)


def test_ptx_adds_the_sft_loss_gradient():
    """
    PPO-ptx (InstructGPT eq. 2): with every advantage 0 the clipped surrogate has no gradient, so one update
    with --ptx_coef must move the actor exactly as one AdamW step on ptx_coef * the SFT loss of the same batch.
    """
    tok = Tokenizer.byte_level()
    actor, ref, reward_model, critic = tiny_models()
    args = Args(batch_size=4, num_minibatches=1, ppo_epochs=1, response_length=8, ptx_coef=0.7, max_grad_norm=1e9)
    batch = prompt_batch(tok, args.batch_size)
    response = generate_responses(actor, batch["idx"], batch["attention_mask"], tok, args)
    exp = make_experience(actor, ref, reward_model, critic, batch["idx"], batch["attention_mask"], response, tok,
                          args, args.kl_coef, rt())
    exp["advantages"] = torch.zeros_like(exp["advantages"])
    examples, _ = D.encode_sft([{"prompt": p, "response": tasks.solve(p)} for p in PROMPTS], tok, 64)
    betas = (args.beta1, args.beta2)
    # the reference: a copy of the actor, one AdamW step on 0.7 * sft_loss of the batch ppo_update will draw
    expected = copy.deepcopy(actor)
    opt = utils.configure_optimizer(expected, args.lr, args.weight_decay, betas, "cpu")
    pb = next(train_ppo.ptx_batches(examples, args.batch_size, tok.pad_id, seed=5))
    sft = sft_loss(expected(pb["idx"], pb["attention_mask"]), pb["idx"], pb["response_mask"])
    (args.ptx_coef * sft).backward()
    opt.step()
    opt_a = utils.configure_optimizer(actor, args.lr, args.weight_decay, betas, "cpu")
    opt_c = utils.configure_optimizer(critic, args.critic_lr, args.weight_decay, betas, "cpu")
    stats = ppo_update(actor, critic, opt_a, opt_c, exp, args, rt(),
                       ptx=train_ppo.ptx_batches(examples, args.batch_size, tok.pad_id, seed=5))
    assert stats["ptx_loss"] == pytest.approx(sft.item(), abs=1e-6)
    for (name, got), want in zip(actor.named_parameters(), expected.parameters()):
        assert torch.allclose(got, want, atol=1e-6), name


def test_ratio_is_one_on_first_minibatch():
    # dropout in the config and a temperature != 1: both must be handled for the ratio to start at 1
    actor, ref, reward_model, critic = tiny_models(dropout=0.2)
    args = Args(batch_size=8, num_minibatches=2, grad_accum=2, ppo_epochs=2, response_length=12, temperature=0.7,
                lr=1e-2, critic_lr=1e-2)
    exp, stats = one_iteration(actor, ref, reward_model, critic, args)
    assert exp["response_mask"].sum() > 0
    assert stats["first_ratio_max_dev"] < 1e-5
    # and the update did move the policy (so the check above is not vacuous): later minibatches see ratio != 1
    assert stats["approx_kl"] > 0 and abs(stats["ratio"] - 1) + stats["clipfrac"] > 0


def test_lr_zero_does_not_move_the_policy():
    args = Args(batch_size=8, num_minibatches=2, ppo_epochs=2, response_length=8, lr=0.0, critic_lr=0.0,
                weight_decay=0.1)
    actor, ref, reward_model, critic = tiny_models()
    before = copy.deepcopy(actor.state_dict()), copy.deepcopy(critic.state_dict())
    one_iteration(actor, ref, reward_model, critic, args)
    for k, v in actor.state_dict().items():
        assert torch.equal(v, before[0][k]), k
    for k, v in critic.state_dict().items():
        assert torch.equal(v, before[1][k]), k
    # the same iteration with lr > 0 does move both (the comparison above can fail)
    one_iteration(actor, ref, reward_model, critic, dataclasses.replace(args, lr=1e-3, critic_lr=1e-3))
    assert any(not torch.equal(v, before[0][k]) for k, v in actor.state_dict().items())
    assert any(not torch.equal(v, before[1][k]) for k, v in critic.state_dict().items())


def test_next_prompt_indices_covers_each_prompt_once_per_pass():
    state = {"epoch": 0, "pos": 0}
    seen = []
    for _ in range(5):
        idx, state = next_prompt_indices(10, 4, seed=3, state=state)
        seen += idx
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    # resuming from a saved state gives the same continuation
    state = {"epoch": 0, "pos": 0}
    for _ in range(2):
        _, state = next_prompt_indices(10, 4, seed=3, state=state)
    assert next_prompt_indices(10, 4, seed=3, state=dict(state))[0] == seen[8:12]


# -----------------------------------------------------------------------------
# end to end


def test_bad_prompts_file_exits_2_and_writes_nothing(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "sort 1 2"}\n{"prompt": 3}\n')
    out = tmp_path / "ppo"
    # the checkpoints are never reached: the prompts are read and validated first
    p = script("train_ppo.py", "--data", str(bad), "--sft", str(tmp_path / "nope"), "--rm", str(tmp_path / "nope"),
               "--out_dir", str(out), check=False)
    assert p.returncode == 2, p.stderr
    assert "prompts.jsonl:2" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()


def test_bad_flag_combination_is_reported():
    p = script("train_ppo.py", "--batch_size", "10", "--num_minibatches", "4", check=False)
    assert p.returncode == 2 and "divisible" in p.stderr


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """Built-in task data, and tiny SFT and RM checkpoints trained just enough to end their answers with EOS."""
    d = tmp_path_factory.mktemp("pipeline")
    tasks.generate_task(str(d / "data"), n_sft=3000, n_prefs=600, n_prefs_eval=100, n_prompts=200, n_eval=50)
    script("train_sft.py", "--data", str(d / "data/sft.jsonl"), "--out_dir", str(d / "sft"), "--n_layer", "2",
           "--n_head", "2", "--n_embd", "48", "--block_size", "64", "--batch_size", "32", "--max_steps", "150",
           "--warmup", "10", "--eval_interval", "1000", "--log_interval", "50")
    script("train_rm.py", "--data", str(d / "data/prefs.jsonl"), "--sft_data", str(d / "data/sft.jsonl"),
           "--init_from", str(d / "sft"), "--out_dir", str(d / "rm"), "--batch_size", "8", "--max_steps", "60",
           "--warmup", "5", "--eval_interval", "1000", "--log_interval", "20", "--norm_samples", "200")
    return d


def ppo_cmd(d, out, *extra):
    return ["train_ppo.py", "--data", str(d / "data/prompts.jsonl"), "--sft", str(d / "sft"), "--rm", str(d / "rm"),
            "--out_dir", str(out), "--batch_size", "32", "--num_minibatches", "2", "--response_length", "20",
            "--lr", "1e-3", "--critic_lr", "1e-3", "--kl_coef", "0.01", "--sample_interval", "4", *extra]


def test_short_ppo_run_raises_the_rm_score(tiny_pipeline):
    out = tiny_pipeline / "ppo"
    script(*ppo_cmd(tiny_pipeline, out, "--num_iterations", "12"))
    rows = read_metrics(out)
    assert [r["iter"] for r in rows] == list(range(1, 13))
    first = sum(r["rm_score"] for r in rows[:3]) / 3
    last = sum(r["rm_score"] for r in rows[-3:]) / 3
    assert last > first + 0.05, [round(r["rm_score"], 3) for r in rows]
    assert all(0 <= r["gold"] <= 1 for r in rows)  # the built-in task's prompts: gold is logged
    # the actor is saved as a policy any stage can load; the critic beside it
    actor, tok, ckpt = utils.load_model(str(out), kind="gpt")
    assert ckpt["stage"] == "ppo" and ckpt["step"] == 12
    critic, _, _ = utils.load_model(str(out), kind="scalar", name="critic.pt")
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert {s["iter"] for s in samples} == {1, 4, 8, 12}


def test_resume_continues_the_run(tiny_pipeline):
    out = tiny_pipeline / "ppo_resume"
    script(*ppo_cmd(tiny_pipeline, out, "--num_iterations", "2", "--batch_size", "8"))
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 2 and state["data"] == {"epoch": 0, "pos": 16}
    script(*ppo_cmd(tiny_pipeline, out, "--num_iterations", "3", "--batch_size", "8", "--resume"))
    assert [r["iter"] for r in read_metrics(out)] == [1, 2, 3]
    assert torch.load(out / "train_state.pt", weights_only=True)["data"] == {"epoch": 0, "pos": 24}
    # a save interrupted after ckpt.pt and before critic.pt: the files disagree, and resume says so
    critic = torch.load(out / "critic.pt", weights_only=True)
    utils.save_checkpoint(out, {**critic, "step": 2}, "critic.pt")
    p = script(*ppo_cmd(tiny_pipeline, out, "--num_iterations", "4", "--batch_size", "8", "--resume"), check=False)
    assert p.returncode == 2 and "a save was interrupted" in p.stderr, p.stderr
    assert [r["iter"] for r in read_metrics(out)] == [1, 2, 3]


def test_rm_must_be_a_reward_model(tiny_pipeline):
    p = script(*ppo_cmd(tiny_pipeline, tiny_pipeline / "ppo_bad_rm", "--rm", str(tiny_pipeline / "sft")), check=False)
    assert p.returncode == 2 and "holds a language model" in p.stderr, p.stderr
    assert not (tiny_pipeline / "ppo_bad_rm").exists()
