"""
Tests of train_ppo.py's rollout and update (the PPO math itself is tested in test_ppo_math.py).

In-process tests use random tiny models (2 layers, 32 wide, byte-level tokenizer) and the real rollout and update
functions. The end-to-end tests run the script as a subprocess on the built-in task, with tiny SFT and RM
checkpoints made by train_sft.py and train_rm.py (about 30 s, once per module).
"""

import copy
import dataclasses
import json
import math
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from scripts import ROOT, read_metrics, script

sys.path.insert(0, ROOT)  # train_ppo.py is a top-level script

from nanorlhf import data as D
from nanorlhf import rollout
from nanorlhf import tasks
from nanorlhf import utils
from nanorlhf.losses import sft_loss
from nanorlhf.model import GPT, GPTConfig, ScalarGPT, ValueHeadGPT
from nanorlhf.rollout import (disable_dropout, freeze, generate_responses, judged_samples, next_prompt_indices,
                              truncate_after_eos)
from nanorlhf.tokenizer import Tokenizer

import train_ppo
from train_ppo import Args, make_experience, ppo_update

PROMPTS = ["sort 5 3 8 1", "sort 2 9 4", "sort 7 7 1 0 3 6", "sort 4 1 2", "sort 9 8 7 6 5 4 3 2",
           "sort 0 1", "sort 3 3 3", "sort 6 2 8 1 4"]


def tiny_models(seed=0, dropout=0.0, block_size=64):
    """actor, ref, reward model, critic: random tiny models as train_ppo.main builds them (dropout off)."""
    torch.manual_seed(seed)
    config = GPTConfig(block_size=block_size, vocab_size=258, n_layer=2, n_head=2, n_embd=32, dropout=dropout)
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


def test_judged_samples_decode_score_and_judge_each_row():
    """
    The rows train_ppo.py and train_grpo.py log gold from and write to samples.jsonl, against the plain way: the
    real tokens decoded without the template's leading space, the score as a float, the task's gold (None when off).
    """
    tok = Tokenizer.byte_level()
    E, P = tok.eos_id, tok.pad_id
    prompts = ["sort 3 1 2", "sort 9 8", "sort 5 4 6"]
    answers = [" 1 2 3", " 8 9 !", " 4 5 6 6"]  # right; right with the habit; an extra digit, cut without EOS
    rows = [tok.encode(a) + [E] for a in answers[:2]] + [tok.encode(answers[2])]
    N = max(map(len, rows)) + 2
    response = torch.tensor([r + [P] * (N - len(r)) for r in rows])  # (3, N)
    response[2, len(rows[2]):] = 7  # a row without EOS is all real: what is past the answer is decoded too
    cut, mask = truncate_after_eos(response, E, P)
    scores = torch.tensor([0.25, -1.5, 3.0])
    got = judged_samples(tok, prompts, cut, mask, scores, True)
    texts = [tok.decode([t for t, m in zip(r, k) if m]).removeprefix(" ") for r, k in zip(cut.tolist(), mask.tolist())]
    assert texts[:2] == ["1 2 3", "8 9 !"] and texts[2].startswith("4 5 6 6")
    assert got == [{"prompt": p, "response": t, "score": s.item(), "gold": tasks.gold(p, t)}
                   for p, t, s in zip(prompts, texts, scores)]
    assert [r["gold"] for r in got[:2]] == [1.0, 0.5]
    assert [r["gold"] for r in judged_samples(tok, prompts, cut, mask, scores, False)] == [None, None, None]


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
    pb = next(train_ppo.ptx_batches(examples, args.batch_size, tok.pad_id, torch.Generator().manual_seed(5), 64))
    sft = sft_loss(expected(pb["idx"], pb["attention_mask"]), pb["idx"], pb["response_mask"])
    (args.ptx_coef * sft).backward()
    opt.step()
    opt_a = utils.configure_optimizer(actor, args.lr, args.weight_decay, betas, "cpu")
    opt_c = utils.configure_optimizer(critic, args.critic_lr, args.weight_decay, betas, "cpu")
    stats = ppo_update(actor, critic, opt_a, opt_c, exp, args, rt(),
                       ptx=train_ppo.ptx_batches(examples, args.batch_size, tok.pad_id, torch.Generator().manual_seed(5), 64))
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


def hand_made_experience(actor, ref, reward_model, critic, args, seed=0):
    """make_experience on random responses cut by an EOS at random places (some rows have none): rows of many lengths."""
    tok = Tokenizer.byte_level()
    g = torch.Generator().manual_seed(seed)
    batch = prompt_batch(tok, args.batch_size)
    N = args.response_length
    response = torch.randint(32, 127, (args.batch_size, N), generator=g)
    ends = torch.randint(0, N + 3, (args.batch_size,), generator=g)  # >= N: no EOS
    for b, e in enumerate(ends.tolist()):
        if e < N:
            response[b, e] = tok.eos_id
    return make_experience(actor, ref, reward_model, critic, batch["idx"], batch["attention_mask"], response, tok,
                           args, args.kl_coef, rt())


def sgd_update_deltas(args, ptx_examples=None, block_size=64):
    """
    One ppo_update from the same tiny models and the same hand-made rollout, with plain SGD at lr 1 so that each
    parameter moves by exactly minus its (clipped) gradient. -> {name: change} for the actor and the critic.
    """
    actor, ref, reward_model, critic = tiny_models(block_size=block_size)
    exp = hand_made_experience(actor, ref, reward_model, critic, args)
    assert len(set(exp["response_mask"].sum(-1).tolist())) > 2  # the micro-batches differ in length
    before = {**{"actor." + k: v.clone() for k, v in actor.named_parameters()},
              **{"critic." + k: v.clone() for k, v in critic.named_parameters()}}
    opt_a, opt_c = torch.optim.SGD(actor.parameters(), lr=1.0), torch.optim.SGD(critic.parameters(), lr=1.0)
    ptx = None
    if ptx_examples is not None:
        ptx = train_ppo.ptx_batches(ptx_examples, args.batch_size // args.num_minibatches, 257,
                                    torch.Generator().manual_seed(3), block_size)
    torch.manual_seed(1)  # the minibatch order
    stats = ppo_update(actor, critic, opt_a, opt_c, exp, args, rt(), ptx)
    after = {**{"actor." + k: v for k, v in actor.named_parameters()},
             **{"critic." + k: v for k, v in critic.named_parameters()}}
    return {k: (after[k] - before[k]).detach() for k in before}, stats


def test_max_grad_norm_zero_means_no_clipping(one_thread):
    """--max_grad_norm 0 must not clip (as --grad_clip 0 in SFT and RM), not multiply every gradient by 0."""
    args = Args(batch_size=8, num_minibatches=1, ppo_epochs=1, response_length=10, ent_coef=0.01)
    unclipped, stats = sgd_update_deltas(dataclasses.replace(args, max_grad_norm=0.0))
    reference, _ = sgd_update_deltas(dataclasses.replace(args, max_grad_norm=1e30))
    for k, v in reference.items():
        assert torch.equal(unclipped[k], v), k
    actor_norm = torch.sqrt(sum((v.double() ** 2).sum() for k, v in unclipped.items() if k.startswith("actor.")))
    assert actor_norm.item() == pytest.approx(stats["grad_norm"], rel=1e-5) and actor_norm > 1e-3
    # and a positive value clips each model's update to that norm
    clipped, _ = sgd_update_deltas(dataclasses.replace(args, max_grad_norm=1e-3))
    for model in ("actor.", "critic."):
        norm = torch.sqrt(sum((v.double() ** 2).sum() for k, v in clipped.items() if k.startswith(model)))
        assert norm.item() == pytest.approx(1e-3, rel=1e-4), model


@pytest.mark.parametrize("ptx", [False, True])
def test_grad_accum_gives_the_same_gradient(ptx, one_thread):
    """
    --grad_accum splits each minibatch into micro-batches of different response lengths (and splits its PPO-ptx
    batch likewise): the summed gradient must be the minibatch's, so the SGD step is the same for 1, 2 and 4.
    """
    examples = None
    if ptx:
        tok = Tokenizer.byte_level()
        examples, _ = D.encode_sft([{"prompt": p, "response": tasks.solve(p)} for p in PROMPTS], tok, 64)
    args = Args(batch_size=8, num_minibatches=1, ppo_epochs=1, response_length=10, max_grad_norm=0.0,
                ptx_coef=0.5 if ptx else 0.0, ent_coef=0.01)
    want, want_stats = sgd_update_deltas(args, examples)
    for accum in (2, 4):
        got, stats = sgd_update_deltas(dataclasses.replace(args, grad_accum=accum), examples)
        for k, v in want.items():
            assert torch.allclose(got[k], v, atol=1e-6, rtol=1e-4), (accum, k)
        for k in ("pg_loss", "vf_loss", "ptx_loss") if ptx else ("pg_loss", "vf_loss"):
            assert stats[k] == pytest.approx(want_stats[k], abs=1e-6), (accum, k)
    assert any(v.abs().max() > 1e-4 for v in want.values())


def test_ptx_fits_a_block_size_that_is_not_a_multiple_of_8():
    """A PPO-ptx example of exactly block_size tokens, block_size 60: padding to 64 would trip the model."""
    tok = Tokenizer.byte_level()
    prompt = "sort 1 2 3 " + "9 " * 40
    ids, _ = tok.render(prompt.strip(), "x")
    cut = len(ids) - 60
    prompt = prompt.strip()[:len(prompt.strip()) - cut]
    examples, _ = D.encode_sft([{"prompt": prompt, "response": "x"}], tok, 60)
    assert len(examples[0][0]) == 60
    args = Args(batch_size=4, num_minibatches=1, ppo_epochs=1, response_length=8, ptx_coef=1.0)
    deltas, stats = sgd_update_deltas(args, examples, block_size=60)
    assert math.isfinite(stats["ptx_loss"]) and stats["ptx_loss"] > 0


def test_returns_use_the_unwhitened_advantages():
    """
    The critic's targets are A_t + V(s_t) with the raw GAE advantages (a plain loop here); only the advantages
    the policy loss sees are whitened. Returns made from whitened advantages pass every other unit test.
    """
    args = Args(batch_size=8, response_length=10, gamma=0.97, gae_lambda=0.9, kl_coef=0.2)
    actor, ref, reward_model, critic = tiny_models()
    with torch.no_grad():
        for p in critic.parameters():  # values far from 0, so that raw and whitened returns differ a lot
            p.add_(0.1 * torch.randn_like(p))
    exp = hand_made_experience(actor, ref, reward_model, critic, args, seed=4)
    rewards, values, mask = exp["rewards"].double(), exp["values"].double(), exp["response_mask"]
    raw = []
    for b in range(mask.size(0)):
        L = int(mask[b].sum())
        for t in range(L):
            a = 0.0
            for k in range(t, L):
                v_next = values[b, k + 1].item() if k + 1 < L else 0.0
                delta = rewards[b, k].item() + args.gamma * v_next - values[b, k].item()
                a += (args.gamma * args.gae_lambda) ** (k - t) * delta
            raw.append(a)
            assert exp["returns"][b, t].item() == pytest.approx(a + values[b, t].item(), abs=1e-5), (b, t)
    raw = np.array(raw)
    whitened = (raw - raw.mean()) / np.sqrt(raw.var(ddof=1) + 1e-8)
    got = np.array([exp["advantages"][b, t].item() for b in range(mask.size(0)) for t in range(int(mask[b].sum()))])
    assert np.allclose(got, whitened, atol=1e-4)
    assert np.abs(raw - whitened).max() > 0.1


def test_vf_coef_barely_changes_a_separate_critic_update(one_thread):
    """
    The claim in --vf_coef's help: with the separate critic and its own AdamW, the critic's step does not depend on
    the scale of its loss (up to Adam's eps), so vf_coef 0.1 and 1 move it alike when nothing is clipped
    (measured: 5% apart, where SGD would move 10 times as far).
    """
    args = Args(batch_size=8, num_minibatches=2, ppo_epochs=2, response_length=8, max_grad_norm=0.0)
    moved = []
    for vf_coef in (0.1, 1.0):
        actor, ref, reward_model, critic = tiny_models()
        before = copy.deepcopy(critic.state_dict())
        one_iteration(actor, ref, reward_model, critic, dataclasses.replace(args, vf_coef=vf_coef))
        moved.append({k: v - before[k] for k, v in critic.state_dict().items()})
    norm = lambda d: torch.sqrt(sum((v.double() ** 2).sum() for v in d.values())).item()  # noqa: E731
    assert norm({k: moved[0][k] - moved[1][k] for k in moved[0]}) < 0.1 * norm(moved[0])
    assert norm(moved[0]) > 1e-3


def test_minibatches_partition_each_epoch_in_a_shuffled_order(one_thread, monkeypatch):
    """
    Each epoch's minibatches cover every row of the rollout once, in an order drawn anew (not the rows' own order),
    and the update's statistics are the mean over all minibatches of each minibatch's token-weighted mean (its
    micro-batches' losses weighed by their real tokens), recounted from what policy_loss and value_loss returned.
    """
    args = Args(batch_size=8, num_minibatches=4, grad_accum=2, ppo_epochs=3, response_length=8, lr=1e-2,
                critic_lr=1e-2)
    actor, ref, reward_model, critic = tiny_models()
    exp = hand_made_experience(actor, ref, reward_model, critic, args)
    calls = []
    real_pl, real_vl = train_ppo.policy_loss, train_ppo.value_loss

    def policy_loss(logprobs, old_logprobs, advantages, mask, clip_coef):
        loss, stats = real_pl(logprobs, old_logprobs, advantages, mask, clip_coef)
        rows = [next(r for r in range(8) if torch.equal(exp["logprobs"][r], o)) for o in old_logprobs]
        dev = max(abs(math.exp(logprobs[0, t].item() - old_logprobs[0, t].item()) - 1) for t in range(int(mask.sum())))
        calls.append({"rows": rows, "n": mask.sum().item(), "pg_loss": loss.item(), "dev": dev,
                      **{k: v.item() for k, v in stats.items()}})
        return loss, stats

    def value_loss(*a):
        loss, stats = real_vl(*a)
        calls[-1].update(vf_loss=loss.item(), vf_clipfrac=stats["vf_clipfrac"].item())
        return loss, stats

    monkeypatch.setattr(train_ppo, "policy_loss", policy_loss)
    monkeypatch.setattr(train_ppo, "value_loss", value_loss)
    # the rollout's log-probs off by -0.05 to 0.15: the first minibatch sees ratios on both sides of 1, those
    # furthest from 1 below it (ratio = exp(-shift) there)
    g = torch.Generator().manual_seed(2)
    shift = 0.2 * torch.rand(exp["logprobs"].shape, generator=g) - 0.05  # (B, N)
    exp["logprobs"] = exp["logprobs"] + shift * exp["response_mask"]
    opt_a = utils.configure_optimizer(actor, args.lr, 0.0, (0.9, 0.95), "cpu")
    opt_c = utils.configure_optimizer(critic, args.critic_lr, 0.0, (0.9, 0.95), "cpu")
    torch.manual_seed(0)
    out = ppo_update(actor, critic, opt_a, opt_c, exp, args, rt())
    assert len(calls) == 3 * 4 * 2 and all(len(c["rows"]) == 1 for c in calls)
    minibatches = [calls[j:j + 2] for j in range(0, len(calls), 2)]  # (12 minibatches of 2 micro-batches)
    orders = []
    for e in range(3):
        order = [c["rows"][0] for mb in minibatches[4 * e:4 * e + 4] for c in mb]
        assert sorted(order) == list(range(8)), order
        orders.append(order)
    assert any(o != list(range(8)) for o in orders) and len({tuple(o) for o in orders}) > 1
    for k in ("pg_loss", "vf_loss", "clipfrac", "vf_clipfrac", "approx_kl", "ratio"):
        per_mb = [sum(c[k] * c["n"] for c in mb) / sum(c["n"] for c in mb) for mb in minibatches]
        assert out[k] == pytest.approx(sum(per_mb) / len(per_mb), rel=1e-5, abs=1e-7), k
    assert len({round(sum(c["pg_loss"] for c in mb), 6) for mb in minibatches}) > 1
    # max |ratio - 1| over the real tokens of the first minibatch of the first epoch only
    assert out["first_ratio_max_dev"] == pytest.approx(max(c["dev"] for c in minibatches[0]), rel=1e-5)
    assert max(c["dev"] for c in calls) > 1.5 * out["first_ratio_max_dev"]


# -----------------------------------------------------------------------------
# the update's gradient against PPO's objective, written the plain way


def ref_ppo_objective(actor, critic, prompts, responses, exp, args, eos_id):
    """
    PPO's loss for a minibatch that is the whole rollout, float64, Python loops over responses and tokens; every
    row runs alone and unpadded through the models (critic None: the actor's own value head, --critic shared):

        z_t     = the logits at the position before y_t (that position has seen x and y_<t), divided by T
        ratio_t = pi(y_t) / pi_old(y_t),  log pi(y_t) = z_t[y_t] - logsumexp(z_t)
        H_t     = -sum_v p_v log p_v,  p = softmax(z_t)
        V_t     = V(x, y_<t), the value at that same position
        loss    = 1 / n * sum_i sum_t [ -min(ratio_t A_t, clip(ratio_t, 1 - eps, 1 + eps) A_t) - ent_coef * H_t
                    + vf_coef * 0.5 * max((V_t - G_t)^2, (clip(V_t, V_old_t - eps_v, V_old_t + eps_v) - G_t)^2) ]

    n is the number of real response tokens in the rollout: each loss is a mean over the minibatch's real tokens.
    log pi_old, A (whitened), G (the returns) and V_old are the rollout's, exp[...][i, t] for response token t of
    row i. A response's real tokens run up to its first EOS, the EOS included.
    -> (loss, {"clipfrac": (tokens where the policy clip bound, real tokens), "vf_clipfrac": (the same for the value
    clip)}); a clip binds where its clipped term is the larger loss (strictly).
    """
    eps, eps_v, T = args.clip_coef, args.vf_clip_coef, args.temperature
    n = sum(len(y[:y.index(eos_id) + 1] if eos_id in y else y) for y in responses)
    loss, bound, vf_bound = 0.0, 0, 0
    for i, (p, y) in enumerate(zip(prompts, responses)):
        y = y[:y.index(eos_id) + 1] if eos_id in y else y
        seq = torch.tensor([p + y])
        if critic is None:
            logits, values = actor(seq, values=True)
        else:
            logits, values = actor(seq), critic(seq)
        logits, values = logits[0], values[0]  # (len, V), (len,)
        for t, tok_t in enumerate(y):
            pos = len(p) - 1 + t  # the position before y_t
            z = logits[pos] / T
            logp = z - torch.logsumexp(z, dim=0)  # (V,)
            ratio = torch.exp(logp[tok_t] - exp["logprobs"][i, t])
            adv = exp["advantages"][i, t].item()
            pg = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
            bound += (adv > 0 and ratio.item() > 1 + eps) or (adv < 0 and ratio.item() < 1 - eps)
            entropy = -(logp.exp() * logp).sum()
            v, v_old, ret = values[pos], exp["values"][i, t].item(), exp["returns"][i, t].item()
            v_clip = torch.clamp(v, v_old - eps_v, v_old + eps_v)
            vf = 0.5 * torch.maximum((v - ret) ** 2, (v_clip - ret) ** 2)
            vf_bound += ((v_clip - ret) ** 2).item() > ((v - ret) ** 2).item()
            loss = loss + (pg - args.ent_coef * entropy + args.vf_coef * vf) / n
    return loss, {"clipfrac": (bound, n), "vf_clipfrac": (vf_bound, n)}


class KeepGradient:
    """An optimizer whose step keeps the model's gradient and leaves the weights where they are."""

    def __init__(self, model):
        self.model, self.grads = model, []

    def step(self):
        self.grads.append({k: p.grad.clone() for k, p in self.model.named_parameters() if p.grad is not None})

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("critic_kind", ["separate", "shared"])
def test_update_gradient_is_ppos_objective(critic_kind, one_thread):
    """
    make_experience + ppo_update on float64 tiny models: the gradient of the first optimizer step, the actor's and
    the critic's (the shared trunk's and its value head's), equals the gradient of ref_ppo_objective. At temperature
    0.7 with an entropy bonus, vf_coef 0.3 and a value clip (0.05) unlike the policy clip (0.2); prompts of three
    lengths (left pads) and responses of 1 to N tokens, one without EOS (right pads); the rollout's log-probs and
    values moved so that each clip binds on some tokens, not on all; one minibatch of 3 micro-batches.
    """
    tok = Tokenizer.byte_level()
    gpt, ref, reward_model, critic = (m.double() for m in tiny_models(5))
    if critic_kind == "shared":
        actor, critic = ValueHeadGPT.from_gpt(gpt), None
        with torch.no_grad():  # a value head that is not zero: the value loss reaches the trunk
            actor.value_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
            actor.value_head.bias.fill_(0.3)
    else:
        actor = gpt
    args = Args(batch_size=6, num_minibatches=1, grad_accum=3, ppo_epochs=1, response_length=6, temperature=0.7,
                clip_coef=0.2, vf_clip_coef=0.05, vf_coef=0.3, ent_coef=0.05, max_grad_norm=0.0, kl_coef=0.1,
                missing_eos_penalty=-1.0, critic=critic_kind)
    train_ppo.check_flags(args, set())
    g = torch.Generator().manual_seed(0)
    prompts = [tok.render_prompt(p) for p in ("sort 5 3 8 1", "sort 2 9", "sort 7 7 1 0 3 6") for _ in range(2)]
    responses = torch.randint(32, 127, (6, 6), generator=g).tolist()
    for row, eos_at in zip(responses, (5, 0, None, 2, 3, 1)):
        if eos_at is not None:
            row[eos_at] = tok.eos_id
    batch = D.collate(prompts, tok.pad_id, left_pad=True)
    exp = make_experience(actor, ref, reward_model, critic, batch["idx"], batch["attention_mask"],
                          torch.tensor(responses), tok, args, args.kl_coef, rt())
    # as in a later minibatch: the policy and the critic have moved away from the rollout's log-probs and values
    mask = exp["response_mask"]
    exp["logprobs"] = exp["logprobs"] + 0.3 * torch.randn(mask.shape, generator=g, dtype=torch.float64) * mask
    exp["values"] = exp["values"] + 0.1 * torch.randn(mask.shape, generator=g, dtype=torch.float64) * mask

    models = {"actor": actor} if critic is None else {"actor": actor, "critic": critic}
    opts = {k: KeepGradient(m) for k, m in models.items()}
    out = ppo_update(actor, critic, opts["actor"], opts.get("critic"), exp, args, rt())
    assert all(len(o.grads) == 1 for o in opts.values())

    want, counts = ref_ppo_objective(actor, critic, prompts, responses, exp, args, tok.eos_id)
    for name, (k, n) in counts.items():
        assert 3 <= k <= n - 3, (name, k, n)  # the clip binds on some tokens, not on all
        assert out[name] == pytest.approx(k / n, abs=1e-6), name
    for key, model in models.items():
        names, params = zip(*model.named_parameters())
        want_grads = torch.autograd.grad(want, params, retain_graph=True, allow_unused=True)
        for name, w in zip(names, want_grads):
            got = opts[key].grads[0].get(name)
            if w is None or got is None:  # no gradient either way
                assert w is None and (got is None or not got.any()), (key, name)
                continue
            # to 1e-6, not float64's 1e-12: ppo_update weighs each micro-batch by its share of the tokens, a float32
            # number (integer counts divided) even for float64 models (3e-8 apart here; 1e-10 with --grad_accum 1)
            assert torch.allclose(got, w, rtol=1e-6, atol=1e-6 * w.abs().max()), (key, name)


@pytest.mark.parametrize("critic_kind", ["separate", "shared"])
def test_saved_policy_and_critic_compute_what_the_trained_models_do(critic_kind):
    """
    ckpt.pt's and critic.pt's state dicts (policy_state_dict, critic_state_dict) loaded into a plain GPT and a plain
    ScalarGPT give the trained actor's logits and the critic's values (the shared trunk's value head, random here,
    not the zero it starts at) on a padded batch.
    """
    actor, _, _, critic = tiny_models(3)
    if critic_kind == "shared":
        actor, critic = ValueHeadGPT.from_gpt(actor), None
        with torch.no_grad():
            actor.value_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
            actor.value_head.bias.fill_(0.7)
    batch = prompt_batch(Tokenizer.byte_level(), 4)
    x, m = batch["idx"], batch["attention_mask"]
    policy, value = GPT(actor.config), ScalarGPT(actor.config)
    policy.load_state_dict(train_ppo.policy_state_dict(actor))
    value.load_state_dict(train_ppo.critic_state_dict(actor, critic))
    for model in (policy, value):
        disable_dropout(model)
    with torch.no_grad():
        logits, values = actor(x, m, values=True) if critic is None else (actor(x, m), critic(x, m))
        assert torch.allclose(policy(x, m), logits, atol=1e-6) and torch.allclose(value(x, m), values, atol=1e-6)
        assert values.std() > 0.01


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


def test_bad_prompts_file_exits_2_and_writes_nothing(random_ckpts, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "sort 1 2"}\n{"prompt": 3}\n')
    out = tmp_path / "ppo"

    def build_models(*args):  # the models are never loaded: the prompts are read and validated first
        raise AssertionError("models loaded before the prompts were checked")

    monkeypatch.setattr(train_ppo, "build_models", build_models)
    argv = tiny_ppo_args(random_ckpts, out)
    argv[1] = str(bad)
    with pytest.raises(SystemExit) as e:
        utils.run(lambda: train_ppo.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {bad}:2") and err.count("\n") == 1, err
    assert not out.exists()


def test_bad_flag_combination_is_reported():
    p = script("train_ppo.py", "--batch_size", "10", "--num_minibatches", "4", check=False)
    assert p.returncode == 2 and "divisible" in p.stderr
    p = script("train_ppo.py", "--max_grad_norm", "-1", check=False)
    assert p.returncode == 2 and "--max_grad_norm must be >= 0 (0: no clipping)" in p.stderr, p.stderr


@pytest.mark.parametrize("flag, value, message", [
    ("--clip_coef", "0", "--clip_coef and --vf_clip_coef must be > 0"),  # a zero gradient at ratio 1: no learning
    ("--vf_clip_coef", "-0.1", "--clip_coef and --vf_clip_coef must be > 0"),
    ("--lr", "-0.001", "--lr and --critic_lr must be > 0"),  # gradient ascent
    ("--critic_lr", "0", "--lr and --critic_lr must be > 0"),
])
def test_flags_that_would_train_nothing_or_backwards_are_refused(tmp_path, flag, value, message):
    with pytest.raises(utils.UserError, match=message):  # checked before anything is read or written
        train_ppo.main(["--out_dir", str(tmp_path / "ppo"), flag, value])
    assert not (tmp_path / "ppo").exists()


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_gamma_and_lambda_take_both_ends_of_their_range(value):
    """[0, 1] includes its ends: gamma = 0 (only the next reward) and lambda = 0 (one-step TD) are valid choices."""
    train_ppo.check_flags(Args(gamma=value, gae_lambda=value), set())


@pytest.mark.parametrize("argv, message", [
    # the adaptive controller divides by both, after metrics.jsonl was started
    (["--adaptive_kl", "--target_kl", "0"], "--target_kl must be > 0 with --adaptive_kl, got 0.0"),
    (["--adaptive_kl", "--kl_horizon", "0"], "--kl_horizon 0 must be > 0.2 * --batch_size = 12.8"),
    # 1 - 0.2 * 64 / 12 < 0: beta would change sign
    (["--adaptive_kl", "--kl_horizon", "12"], "--kl_horizon 12 must be > 0.2 * --batch_size = 12.8"),
    # at 0.2 * batch_size exactly, a KL below target multiplies beta by 1 - 0.2 * 20 / 4 = 0: beta stays 0 from there
    (["--adaptive_kl", "--batch_size", "20", "--kl_horizon", "4"], "--kl_horizon 4 must be > 0.2 * --batch_size = 4 "),
    (["--num_samples", "0"], "--num_samples must be >= 1, got 0"),  # crashed in gold_scores mid-run
    (["--num_samples", "-1"], "--num_samples must be >= 1, got -1"),  # wrote batch_size - 1 samples
    (["--kl_coef", "-0.1"], "--kl_coef must be >= 0, got -0.1"),
    (["--vf_coef", "-1"], "--vf_coef must be > 0, got -1.0"),
    # the critic got no gradient and never trained (the shared trunk's value head stayed at 0)
    (["--vf_coef", "0"], "--vf_coef must be > 0, got 0.0: at 0 the critic gets no gradient and never trains"),
    (["--vf_coef", "0", "--critic", "shared"], "--vf_coef must be > 0, got 0.0"),
    # beta is multiplied by the controller: from 0 it stayed 0
    (["--adaptive_kl", "--kl_coef", "0"], "--adaptive_kl needs --kl_coef > 0 as beta's start value, got 0.0"),
    # options of a switch that is off were accepted and ignored; named at their default value too
    (["--target_kl", "1"], "--target_kl does nothing without --adaptive_kl"),
    (["--target_kl", "1", "--kl_horizon", "500"], "--target_kl and --kl_horizon do nothing without --adaptive_kl"),
    (["--kl_horizon", "10000"], "--kl_horizon does nothing without --adaptive_kl"),
    (["--adaptive_kl", "false", "--target_kl", "1"], "--target_kl does nothing without --adaptive_kl"),
    (["--lora_alpha", "64"], "--lora_alpha does nothing without --lora_rank > 0"),
    (["--lora_targets", "attn", "--lora_alpha", "64"],
     "--lora_alpha and --lora_targets do nothing without --lora_rank > 0"),
    (["--ent_coef", "-1"], "--ent_coef must be >= 0, got -1.0"),
    (["--weight_decay", "-1"], "--weight_decay must be >= 0, got -1.0"),
    (["--gamma", "2"], "--gamma must be in [0, 1], got 2.0"),
    (["--gae_lambda", "-1"], "--gae_lambda must be in [0, 1], got -1.0"),
    (["--beta1", "1.5"], "--beta1 must be in [0, 1), got 1.5"),  # a torch ValueError traceback
    (["--beta2", "1"], "--beta2 must be in [0, 1), got 1.0"),
    (["--ptx_coef", "-1", "--ptx_data", "sft.jsonl"], "--ptx_coef must be >= 0, got -1.0"),  # was plain PPO
    (["--ptx_data", "sft.jsonl"], "--ptx_data does nothing without --ptx_coef > 0"),  # was ignored
    # one optimizer at --lr: also refused at the default value, which the user may have meant to set
    (["--critic", "shared", "--critic_lr", "1e-4"], "--critic_lr does nothing with --critic shared"),
    # the heads that exist: the separate critic's head, or the shared trunk's value head
    (["--lora_rank", "4", "--lora_targets", "c_fc|^head"],
     "--lora_targets 'c_fc|^head' matches head: the critic's head trains in full, leave it out of the targets"),
    (["--lora_rank", "4", "--critic", "shared", "--lora_targets", "value_head"],
     "--lora_targets 'value_head' matches value_head: the value head trains in full, leave it out of the targets"),
    (["--lora_rank", "4", "--critic", "shared", "--lora_targets", "head"], "'head' matches value_head: the value head"),
    (["--lora_rank", "4", "--lora_targets", "c_fc("], "--lora_targets 'c_fc(': not a regular expression"),
    (["--kl_estimator", "k2"], "--kl_estimator 'k2': expected k1 or k3"),  # kl_penalty would raise it mid-run
])
def test_flags_out_of_range_are_refused(tmp_path, argv, message):
    with pytest.raises(utils.UserError, match=re.escape(message)):  # checked before anything is read or written
        train_ppo.main(["--out_dir", str(tmp_path / "ppo"), *argv])
    assert not (tmp_path / "ppo").exists()


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """
    Built-in task data, and tiny SFT and RM checkpoints trained just enough to end their answers with EOS. Both have
    dropout 0.1 in their config: train_ppo.main must switch it off in all four models for the ratio to start at 1.
    """
    d = tmp_path_factory.mktemp("pipeline")
    tasks.generate_task(str(d / "data"), n_sft=3000, n_prefs=600, n_prefs_eval=100, n_prompts=200, n_eval=50)
    script("train_sft.py", "--data", str(d / "data/sft.jsonl"), "--out_dir", str(d / "sft"), "--n_layer", "2",
           "--n_head", "2", "--n_embd", "48", "--block_size", "64", "--batch_size", "32", "--max_steps", "150",
           "--warmup", "10", "--eval_interval", "1000", "--log_interval", "50", "--dropout", "0.1")
    script("train_rm.py", "--data", str(d / "data/prefs.jsonl"), "--sft_data", str(d / "data/sft.jsonl"),
           "--init_from", str(d / "sft"), "--out_dir", str(d / "rm"), "--batch_size", "8", "--max_steps", "60",
           "--warmup", "5", "--eval_interval", "1000", "--log_interval", "20", "--norm_samples", "200")
    return d


def ppo_cmd(d, out, *extra):
    return ["train_ppo.py", "--data", str(d / "data/prompts.jsonl"), "--sft", str(d / "sft"), "--rm", str(d / "rm"),
            "--out_dir", str(out), "--batch_size", "32", "--num_minibatches", "2", "--response_length", "20",
            "--lr", "1e-3", "--critic_lr", "1e-3", "--kl_coef", "0.01", "--sample_interval", "4", *extra]


def test_an_out_dir_holding_an_input_or_another_stage_is_refused(tiny_pipeline):
    # a PPO run pointed at the SFT directory would replace the SFT model (its own reference) with its policy
    sft = tiny_pipeline / "sft"
    before = {f: (sft / f).read_bytes() for f in os.listdir(sft)}
    for out, expected in [(sft, "is also --sft"), (tiny_pipeline / "rm", "is also --rm")]:
        p = script(*ppo_cmd(tiny_pipeline, out, "--num_iterations", "1"), check=False)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and expected in p.stderr, p.stderr
    other = tiny_pipeline / "sft_copy"
    shutil.copytree(sft, other)
    p = script(*ppo_cmd(tiny_pipeline, other, "--num_iterations", "1"), check=False)
    assert p.returncode == 2 and f"--out_dir {other} holds a checkpoint of the 'sft' stage" in p.stderr, p.stderr
    assert {f: (other / f).read_bytes() for f in os.listdir(other)} == before
    assert {f: (sft / f).read_bytes() for f in os.listdir(sft)} == before


def test_short_ppo_run_raises_the_rm_score(tiny_pipeline):
    out = tiny_pipeline / "ppo"
    script(*ppo_cmd(tiny_pipeline, out, "--num_iterations", "12"))
    rows = read_metrics(out)
    assert [r["iter"] for r in rows] == list(range(1, 13))
    first = sum(r["rm_score"] for r in rows[:3]) / 3
    last = sum(r["rm_score"] for r in rows[-3:]) / 3
    assert last > first + 0.05, [round(r["rm_score"], 3) for r in rows]
    assert all(0 <= r["gold"] <= 1 for r in rows)  # the built-in task's prompts: gold is logged
    # the update recomputes exactly the rollout's log-probs (dropout off in main, same temperature): ratio 1
    assert all(r["first_ratio_max_dev"] < 1e-5 for r in rows), [r["first_ratio_max_dev"] for r in rows]
    assert all(r["beta"] == 0.01 for r in rows)  # no --adaptive_kl: beta stays put
    assert all(r["kl_k3"] >= 0 for r in rows) and any(r["kl"] != r["kl_k3"] for r in rows)
    # the actor is saved as a policy any stage can load; the critic beside it
    actor, tok, ckpt = utils.load_model(str(out), kind="gpt")
    assert ckpt["stage"] == "ppo" and ckpt["step"] == 12
    critic, _, _ = utils.load_model(str(out), kind="scalar", name="critic.pt")
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert {s["iter"] for s in samples} == {1, 4, 8, 12}


def without_times(rows):
    return [{k: v for k, v in r.items() if k not in ("t_rollout", "t_update")} for r in rows]


def test_resume_gives_the_same_run(tiny_pipeline):
    """
    A run stopped after iteration 2 (--stop_at, with a checkpoint) and resumed with a bare --resume (the saved
    flags: PPO-ptx, k3, adaptive KL, accumulation) computes exactly what the uninterrupted 3-iteration run does.
    """
    d = tiny_pipeline
    flags = ["--num_iterations", "3", "--batch_size", "8", "--grad_accum", "2", "--ptx_coef", "0.5", "--ptx_data",
             str(d / "data/sft.jsonl"), "--kl_estimator", "k3", "--adaptive_kl", "--target_kl", "0.1", "--kl_horizon", "100"]
    p = script(*ppo_cmd(d, d / "ppo_full", *flags))
    # the last line says the run is over and where it saved, as SFT's, RM's and DPO's do
    assert re.fullmatch(rf"done: iteration 3; \d+m\d\ds; saved {re.escape(str(d))}/ppo_full/ckpt\.pt and critic\.pt",
                        p.stdout.splitlines()[-1]), p.stdout
    out = d / "ppo_resume"
    p = script(*ppo_cmd(d, out, *flags, "--stop_at", "2"))
    assert p.stdout.splitlines()[-1] == "stopped at iteration 2 (--stop_at); continue with --resume"
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 2 and state["data"] == {"epoch": 0, "pos": 16} and state["ptx_rng"] is not None
    script("train_ppo.py", "--out_dir", str(out), "--resume")
    want, got = read_metrics(d / "ppo_full"), read_metrics(out)
    assert [r["iter"] for r in got] == [1, 2, 3]
    assert without_times(got) == without_times(want)  # every loss, KL, beta, lr, score, at every iteration
    assert len({r["beta"] for r in got}) > 1 and all("ptx_loss" in r and "kl_k3" in r for r in got)
    for name in ("ckpt.pt", "critic.pt"):
        a = torch.load(d / "ppo_full" / name, weights_only=True)["model"]
        b = torch.load(out / name, weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # a changed flag is refused rather than silently ignored; a finished run has nothing to do
    p = script("train_ppo.py", "--out_dir", str(out), "--resume", "--lr", "0.1", check=False)
    assert p.returncode == 2 and "--lr" in p.stderr, p.stderr
    assert "nothing to do" in script("train_ppo.py", "--out_dir", str(out), "--resume").stdout
    # a save interrupted after ckpt.pt and before critic.pt: the files disagree, and resume says so
    critic = torch.load(out / "critic.pt", weights_only=True)
    utils.save_checkpoint(out, {**critic, "step": 2}, "critic.pt")
    p = script("train_ppo.py", "--out_dir", str(out), "--resume", check=False)
    assert p.returncode == 2 and "a save was interrupted" in p.stderr, p.stderr
    assert [r["iter"] for r in read_metrics(out)] == [1, 2, 3]


def test_resume_auto_starts_fresh_then_continues(tiny_pipeline):
    """--resume auto: the same command starts a run in an empty out_dir and continues it once it has a checkpoint."""
    out = tiny_pipeline / "ppo_auto"
    cmd = ppo_cmd(tiny_pipeline, out, "--num_iterations", "2", "--batch_size", "8", "--resume", "auto")
    script(*cmd, "--stop_at", "1")  # a job that got as far as its first checkpoint
    assert [r["iter"] for r in read_metrics(out)] == [1]
    script(*cmd)  # restarted with the same command: continues at iteration 2
    assert [r["iter"] for r in read_metrics(out)] == [1, 2]
    p = script("train_ppo.py", "--out_dir", str(out), "--resume", "maybe", check=False)
    assert p.returncode == 2 and "--resume 'maybe'" in p.stderr


def test_nan_loss_stops_before_the_step_and_keeps_the_checkpoint(tiny_pipeline, monkeypatch, capsys, one_thread):
    """
    A NaN policy loss in iteration 2 stops the run with one line naming the iteration, epoch and minibatch, exit
    status 2, before any optimizer step of that minibatch: the checkpoint of iteration 1 stays, finite.
    """
    real, calls = train_ppo.policy_loss, [0]

    def nan_from_iteration_2(*a, **kw):
        calls[0] += 1
        loss, stats = real(*a, **kw)
        return (loss * float("nan"), stats) if calls[0] > 8 else (loss, stats)  # 4 epochs x 2 minibatches

    monkeypatch.setattr(train_ppo, "policy_loss", nan_from_iteration_2)
    out = tiny_pipeline / "ppo_nan"
    argv = ppo_cmd(tiny_pipeline, out, "--num_iterations", "3", "--batch_size", "8", "--save_interval", "1")[1:]
    monkeypatch.setattr(sys, "argv", ["train_ppo.py", *argv])
    with pytest.raises(SystemExit) as e:
        utils.run(train_ppo.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "iteration 2, epoch 1 minibatch 1: non-finite pg_loss nan" in err, err
    assert [r["iter"] for r in read_metrics(out)] == [1]
    for name in ("ckpt.pt", "critic.pt", "train_state.pt"):
        assert torch.load(out / name, weights_only=True)["step"] == 1, name
    model = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in model.values())


def save_random_ckpts(d, rm_block_size=64, dropout=0.0):
    tok = Tokenizer.byte_level()
    config = GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, dropout=dropout)
    torch.manual_seed(0)
    utils.save_checkpoint(str(d / "sft"), utils.model_payload(GPT(config), tok, "sft", {}, 0))
    rm_config = dataclasses.replace(config, block_size=rm_block_size)
    utils.save_checkpoint(str(d / "rm"), utils.model_payload(ScalarGPT(rm_config), tok, "rm", {}, 0))
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return d


@pytest.fixture
def random_ckpts(tmp_path):
    """Random tiny SFT and RM checkpoints (byte tokenizer) and prompts: for runs whose learning is not looked at."""
    return save_random_ckpts(tmp_path)


def tiny_ppo_args(d, out, *extra):
    return ["--data", str(d / "prompts.jsonl"), "--sft", str(d / "sft"), "--rm", str(d / "rm"), "--out_dir", str(out),
            "--num_iterations", "1", "--batch_size", "4", "--num_minibatches", "1", "--response_length", "4",
            "--ppo_epochs", "1", "--device", "cpu", "--dtype", "float32", *extra]


def test_a_reward_model_with_a_shorter_context_is_refused(tmp_path):
    # it crashed in the first rollout with an IndexError, metrics.jsonl already started
    d = save_random_ckpts(tmp_path, rm_block_size=32)
    with pytest.raises(utils.UserError, match="has block_size 32 < 64 of"):
        train_ppo.main(tiny_ppo_args(d, d / "ppo"))
    assert not (d / "ppo").exists()



@pytest.mark.parametrize("extra", [
    ["--lora_targets", r"value_head|mlp\.c_fc"],  # the separate critic has no value head
    ["--critic", "shared", "--lora_targets", r"^head|mlp\.c_fc"],  # the shared trunk has no separate head
])
def test_lora_targets_are_refused_only_for_a_head_that_exists(random_ckpts, extra, one_thread):
    # both were refused as matching "head, value_head", whatever --critic was
    train_ppo.main(tiny_ppo_args(random_ckpts, random_ckpts / "ppo", "--lora_rank", "2", *extra))
    assert utils.load_checkpoint(str(random_ckpts / "ppo"))["step"] == 1


def test_the_command_that_started_a_run_resumes_it_with_missing_eos_penalty_none(random_ckpts, one_thread):
    """
    --missing_eos_penalty none is resolved from the RM's statistics at start-up and saved resolved (-1 for an RM
    without them): the same command rerun (--resume auto) continues the run; it used to be refused as differing.
    """
    out = random_ckpts / "ppo"
    argv = tiny_ppo_args(random_ckpts, out, "--num_iterations", "2", "--missing_eos_penalty", "none", "--resume",
                         "auto")
    train_ppo.main(argv + ["--stop_at", "1"])
    assert utils.load_checkpoint(str(out))["args"]["missing_eos_penalty"] == -1.0
    train_ppo.main(argv)
    assert [r["iter"] for r in read_metrics(out)] == [1, 2]
    with pytest.raises(utils.UserError, match="--missing_eos_penalty -2.0 differs from the run's -1.0"):
        train_ppo.main(argv[:-2] + ["--missing_eos_penalty", "-2", "--resume", "on"])


def test_resume_in_another_stages_directory_says_so(random_ckpts):
    """It compared the flags first: "--data ... differs from the run's ...", about a run that is not PPO's."""
    out = random_ckpts / "sft_run"
    ckpt = {"stage": "sft", "args": {"data": "sft.jsonl"}, "step": 1}
    train_ppo.C.save_files(str(out), {utils.TRAIN_STATE: {"step": 1}, "critic.pt": {"step": 1}, utils.CKPT: ckpt})
    with pytest.raises(utils.UserError, match=f"--out_dir {out} holds a checkpoint of the 'sft' stage"):
        train_ppo.main(tiny_ppo_args(random_ckpts, out, "--resume"))


def test_gold_on_with_prompts_the_judge_cannot_parse_is_refused(random_ckpts):
    # it logged gold 0.000 every iteration (kl_sweep.py passes --gold on); --gold auto turns gold off for them
    (random_ckpts / "mine.jsonl").write_text('{"prompt": "sort 3 1"}\n{"prompt": "Tell me a joke."}\n')
    out = random_ckpts / "ppo"
    with pytest.raises(utils.UserError, match=re.escape("holds prompts that are not the built-in task's, e.g. "
                                                        "'Tell me a joke.', which its gold judge cannot score")):
        train_ppo.main(tiny_ppo_args(random_ckpts, out, "--data", str(random_ckpts / "mine.jsonl"), "--gold", "on"))
    assert not out.exists()


def test_each_metrics_row_is_its_rollout_recounted_the_plain_way(random_ckpts, monkeypatch, one_thread):
    """
    Three iterations of main (adaptive KL, k3 in the reward, PPO-ptx, annealed learning rates, an EOS put at random
    places in the sampled responses): each metrics.jsonl row against its rollout recounted with Python loops: the
    scores, both KLs summed over each response's real tokens, the non-score reward (-beta * sum k3), the entropy over
    real tokens, the lengths up to the first EOS, the EOS fraction, the explained variance (numpy), the gold (a
    stand-in judge) over the whole batch, the lr of both optimizers (linear to 0: frac = 1 - (iter - 1) /
    num_iterations), the update's averages; beta iterated by hand from the k1 KL (Ziegler et al.), the beta each
    rollout's rewards were made with, and the one train_state.pt keeps.
    """
    d = random_ckpts
    (d / "sft.jsonl").write_text("".join(json.dumps({"prompt": p, "response": tasks.solve(p)}) + "\n" for p in PROMPTS))
    iters, B, H, target, lr, critic_lr, kl_coef = 3, 8, 20, 0.01, 1e-3, 3e-4, 0.3
    argv = tiny_ppo_args(d, d / "ppo", "--num_iterations", str(iters), "--batch_size", str(B), "--num_minibatches", "2",
                         "--response_length", "6", "--adaptive_kl", "--target_kl", str(target), "--kl_horizon", str(H),
                         "--kl_estimator", "k3", "--kl_coef", str(kl_coef), "--lr", str(lr), "--critic_lr",
                         str(critic_lr), "--ptx_coef", "0.5", "--ptx_data", str(d / "sft.jsonl"), "--sample_interval",
                         "2", "--num_samples", "3", "--save_interval", "100")
    seen = []  # per iteration: {"idx", "beta", "exp", "lrs", "upd", "kl_in"}
    real_indices, real_sample, real_make, real_update, real_ptx = (
        train_ppo.next_prompt_indices, train_ppo.sample, train_ppo.make_experience, train_ppo.ppo_update,
        train_ppo.ptx_batches)
    tok, g = Tokenizer.byte_level(), torch.Generator().manual_seed(0)

    def indices(*a, **kw):
        idx, state = real_indices(*a, **kw)
        seen.append({"idx": list(idx)})
        return idx, state

    def sample(*a):  # an EOS at a random place in most rows (random models hardly ever sample one): many lengths
        batch, response = real_sample(*a)
        for b, e in enumerate(torch.randint(0, 9, (B,), generator=g).tolist()):
            if e < response.size(1):
                response[b, e] = tok.eos_id
        return batch, response

    def make(*a):
        exp = real_make(*a)
        seen[-1].update(beta=a[9], exp={k: v.clone() if torch.is_tensor(v) else v for k, v in exp.items()})
        return exp

    def update(actor, critic, actor_opt, critic_opt, *a, **kw):
        seen[-1]["lrs"] = ([pg["lr"] for pg in actor_opt.param_groups], [pg["lr"] for pg in critic_opt.param_groups])
        seen[-1]["upd"] = real_update(actor, critic, actor_opt, critic_opt, *a, **kw)
        return seen[-1]["upd"]

    def ptx_batches(examples, batch_size, *a):
        ptx_sizes.append(batch_size)
        return real_ptx(examples, batch_size, *a)

    class Controller(train_ppo.AdaptiveKLController):
        def update(self, current_kl, n_steps):
            seen[-1]["kl_in"] = (current_kl, n_steps)
            super().update(current_kl, n_steps)

    # a judge whose score depends on the prompt and the response (the task's is 0 for every random response)
    monkeypatch.setattr(rollout, "gold_scores", lambda ps, ts: [len(p) + 0.1 * len(t) for p, t in zip(ps, ts)])
    ptx_sizes = []
    for name, f in (("next_prompt_indices", indices), ("sample", sample), ("make_experience", make),
                    ("ppo_update", update), ("ptx_batches", ptx_batches), ("AdaptiveKLController", Controller)):
        monkeypatch.setattr(train_ppo, name, f)
    train_ppo.main(argv)
    rows = read_metrics(d / "ppo")
    assert [r["iter"] for r in rows] == [1, 2, 3] and len(seen) == iters
    assert ptx_sizes == [B // 2]  # one SFT batch of the minibatch's size per minibatch

    beta = kl_coef
    for it, (row, s) in enumerate(zip(rows, seen)):
        exp = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in s["exp"].items()}
        response = exp["response"].tolist()
        lengths = [r.index(tok.eos_id) + 1 if tok.eos_id in r else len(r) for r in response]
        k1s, k3s, ent, nsr, texts = [], [], [], [], []
        for b, L in enumerate(lengths):
            k1 = k3 = 0.0
            for t in range(L):
                lp, lr_ = exp["logprobs"][b, t].item(), exp["ref_logprobs"][b, t].item()
                k1 += lp - lr_
                k3 += (math.exp(lr_ - lp) - 1) - (lr_ - lp)
                ent.append(exp["entropy"][b, t].item())
                # the reward the rollout was made with: -beta * k3, the score at the last real token
                want = -beta * ((math.exp(lr_ - lp) - 1) - (lr_ - lp)) + (exp["scores"][b].item() if t == L - 1 else 0)
                assert exp["rewards"][b, t].item() == pytest.approx(want, abs=1e-6), (it, b, t)
            k1s.append(k1)
            k3s.append(k3)
            nsr.append(-beta * k3)
            texts.append(tok.decode(response[b][:L]).removeprefix(" "))
        assert len(set(lengths)) > 2 and 0 < sum(tok.eos_id in r for r in response) < B
        real = [(exp["values"][b, t].item(), exp["returns"][b, t].item())
                for b, L in enumerate(lengths) for t in range(L)]
        vals, rets = np.array(real).T
        prompts = [PROMPTS[i] for i in s["idx"]]
        frac = 1 - it / iters
        want = {"score": exp["scores"].mean().item(), "rm_score": exp["rm_scores"].mean().item(),
                "kl": sum(k1s) / B, "kl_k3": sum(k3s) / B, "non_score_reward": sum(nsr) / B,
                "entropy": sum(ent) / len(ent), "response_length": sum(lengths) / B,
                "eos_frac": sum(tok.eos_id in r for r in response) / B,
                "explained_variance": 1 - np.var(rets - vals) / np.var(rets),
                "beta": beta, "lr": lr * frac,
                "gold": sum(len(p) + 0.1 * len(t) for p, t in zip(prompts, texts)) / B, **s["upd"]}
        for k, w in want.items():
            assert row[k] == pytest.approx(w, rel=1e-5, abs=1e-6), (it + 1, k)
        assert s["beta"] == pytest.approx(beta, rel=1e-12)
        assert s["lrs"] == ([lr * frac] * len(s["lrs"][0]), [critic_lr * frac] * len(s["lrs"][1]))
        assert s["kl_in"][0] == pytest.approx(sum(k1s) / B, abs=1e-6) and s["kl_in"][1] == B
        # beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * B / horizon), KL the k1 sum
        beta *= 1 + min(max(sum(k1s) / B / target - 1, -0.2), 0.2) * B / H
    assert len({r["beta"] for r in rows}) == iters and len({round(r["lr"], 9) for r in rows}) == iters
    assert torch.load(d / "ppo" / "train_state.pt", weights_only=True)["kl_coef"] == pytest.approx(beta, rel=1e-12)
    # samples at the first iteration and every --sample_interval: the first --num_samples rows of the batch
    samples = [json.loads(line) for line in open(d / "ppo" / "samples.jsonl")]
    assert [x["iter"] for x in samples] == [1, 1, 1, 2, 2, 2]
    for x, j in zip(samples, [0, 1, 2, 0, 1, 2]):
        assert x["prompt"] == PROMPTS[seen[x["iter"] - 1]["idx"][j]]


def test_a_resumed_run_continues_the_adaptive_beta_and_the_lr_schedule(random_ckpts, capsys, one_thread):
    """
    --adaptive_kl stopped after iteration 2 of 3 and resumed: each beta is the one before moved once by the
    controller's rule from that iteration's KL (k1), computed here by hand (not the start value --kl_coef again),
    and the lr decays linearly over all --num_iterations (1 - (iter - 1) / 3), not over the --stop_at part.
    """
    out, B, H, target, lr = random_ckpts / "ppo", 8, 20, 0.5, 1e-3
    argv = tiny_ppo_args(random_ckpts, out, "--num_iterations", "3", "--batch_size", str(B), "--adaptive_kl",
                         "--target_kl", str(target), "--kl_horizon", str(H), "--lr", str(lr))
    train_ppo.main(argv + ["--stop_at", "2"])
    assert [r["iter"] for r in read_metrics(out)] == [1, 2] and utils.load_checkpoint(str(out))["step"] == 2
    train_ppo.main(["--out_dir", str(out), "--resume"])
    rows = read_metrics(out)
    assert [r["iter"] for r in rows] == [1, 2, 3] and rows[0]["beta"] == 0.3
    for before, after in zip(rows, rows[1:]):
        want = before["beta"] * (1 + min(max(before["kl"] / target - 1, -0.2), 0.2) * B / H)
        assert after["beta"] == pytest.approx(want, rel=1e-5) and want != before["beta"]  # logged to 6 digits
    assert [r["lr"] for r in rows] == pytest.approx([lr, lr * 2 / 3, lr / 3], rel=1e-5)
    capsys.readouterr()
    train_ppo.main(["--out_dir", str(out), "--resume"])  # a finished run: nothing to do, nothing logged
    assert capsys.readouterr().out == f"nothing to do: the run in {out} is at iteration 3\n"
    assert [r["iter"] for r in read_metrics(out)] == [1, 2, 3]


def test_reward_model_tokenizer_must_encode_alike_whatever_its_name(tmp_path):
    """
    An RM whose tokenizer has other merges is refused (it would score other tokens than the policy's); one whose
    tokenizer differs in name alone is not (a .tiktoken file stores no name: export_hf.py's comes back "tokenizer").
    """
    d = save_random_ckpts(tmp_path)
    ckpt = utils.load_checkpoint(str(d / "rm"))
    renamed = {**ckpt, "tokenizer": {**ckpt["tokenizer"], "name": "tokenizer"}}
    utils.save_checkpoint(str(d / "rm"), renamed)
    train_ppo.main(tiny_ppo_args(d, d / "ppo"))
    assert utils.load_checkpoint(str(d / "ppo"))["step"] == 1
    ranks = ckpt["tokenizer"]["ranks"]
    other = {**ckpt, "tokenizer": {**ckpt["tokenizer"], "ranks": [ranks[1], ranks[0], *ranks[2:]]}}
    utils.save_checkpoint(str(d / "rm"), other)
    with pytest.raises(utils.UserError, match="use different tokenizers"):
        train_ppo.main(tiny_ppo_args(d, d / "ppo2"))
    assert not (d / "ppo2").exists()

@pytest.mark.parametrize("flags, expected, offloaded_models", [
    ({"offload": "ref,rm"}, [("sft", "meta"), ("rm", "cpu"), ("rm", "meta"), ("sft", "cpu")], ["ref", "reward_model"]),
    ({"offload": "rm", "critic": "shared"}, [("sft", "cpu"), ("rm", "cpu"), ("sft", "meta")], ["reward_model"]),
    ({"offload": "rm", "critic": "shared", "lora_rank": 2}, [("sft", "cpu"), ("rm", "cpu")], ["reward_model"]),
    ({"offload": "ref,rm", "lora_rank": 2}, [("sft", "meta"), ("rm", "meta")], []),  # neither can be offloaded
])
@pytest.mark.filterwarnings("ignore:for .* copying from a non-meta parameter:UserWarning")  # "meta" stands for the device
def test_build_models_puts_no_extra_full_model_on_the_accelerator(random_ckpts, monkeypatch, flags, expected,
                                                                  offloaded_models):
    """
    An offloaded frozen model is loaded into CPU memory, never onto the accelerator first, and the shared trunk is
    built in CPU memory before it moves ("meta" stands in for the accelerator; the loads themselves stay on the CPU).
    Both used to pass through the accelerator: about 3 full models there at once where the table says 1.
    """
    loads, real_load = [], utils.load_model

    def load_model(path, device="cpu", **kw):
        loads.append((os.path.basename(path), str(device)))
        return real_load(path, "cpu", **kw)

    monkeypatch.setattr(utils, "load_model", load_model)
    offloaded = []
    monkeypatch.setattr(train_ppo, "offload", lambda model, device: offloaded.append(model) or model)
    args = Args(sft=str(random_ckpts / "sft"), rm=str(random_ckpts / "rm"), **flags)
    models = train_ppo.build_models(args, "meta")
    assert loads == expected
    # offload() is handed those frozen models, each once, and no other
    assert sorted(map(id, offloaded)) == sorted(id(models[k]) for k in offloaded_models)
    if args.critic == "shared":  # built in CPU memory, then moved
        assert next(models["actor"].parameters()).device.type == "meta"


@pytest.mark.parametrize("extra, why", [
    ([], None),
    (["--grad_checkpointing"], "grad_checkpointing"),  # measured about a tenth of the formula
    (["--lora_rank", "2", "--lora_targets", r"mlp\.c_fc"], "lora_targets"),  # about 0.6 of it
    (["--dtype", "bfloat16", "--grad_checkpointing"], "grad_checkpointing, autocast"),  # bf16: about 2x
])
def test_memory_json_leaves_out_an_activation_prediction_it_cannot_make(random_ckpts, capsys, extra, why, one_thread):
    out = random_ckpts / "ppo"
    train_ppo.main(tiny_ppo_args(random_ckpts, out, *extra))
    report = json.loads((out / "memory.json").read_text())
    assert report["activations"] > 0 and report.get("activations_not_modelled") == why
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("memory: "))
    if why is None:
        assert report["activations_predicted"] > 0 and "(predicted " in line
    else:
        assert report["activations_predicted"] is None and f"(not predicted with {why})" in line


def test_a_run_killed_between_the_files_of_a_save_resumes_and_logs_each_iteration_once(random_ckpts, monkeypatch,
                                                                                      capsys, one_thread):
    """
    A LoRA run (4 files per save) killed in the save of iteration 3, after train_state.pt, critic.pt and
    adapters.pt were replaced and before ckpt.pt was: --resume auto continues from the files of iteration 2 (the
    save kept the previous ones), and metrics.jsonl, samples.jsonl and samples.txt hold each iteration once, as
    in the uninterrupted run. A resumed run used to log and sample iteration 3 twice, and a kill inside a save
    used to leave files of different iterations that no --resume would take.
    """
    d = random_ckpts

    def ppo(out):
        train_ppo.main(["--data", str(d / "prompts.jsonl"), "--sft", str(d / "sft"), "--rm", str(d / "rm"),
                        "--out_dir", str(out), "--num_iterations", "4", "--batch_size", "4", "--num_minibatches", "1",
                        "--response_length", "4", "--ppo_epochs", "1", "--lora_rank", "2", "--save_interval", "1",
                        "--sample_interval", "1", "--num_samples", "2", "--resume", "auto", "--device", "cpu",
                        "--dtype", "float32"])

    def iters(out):
        samples = [json.loads(line)["iter"] for line in open(out / "samples.jsonl")]
        headers = [int(line.split()[2]) for line in open(out / "samples.txt") if line.startswith("=== iter ")]
        return [r["iter"] for r in read_metrics(out)], samples, headers

    real_replace, renames = os.replace, []

    def killed_in_the_third_save(src, dst):
        if os.path.basename(dst) == "ckpt.pt":
            renames.append(dst)
            if len(renames) == 3:
                raise KeyboardInterrupt("killed between the renames of a save")
        return real_replace(src, dst)

    out = d / "ppo"
    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed_in_the_third_save)
        with pytest.raises(KeyboardInterrupt):
            ppo(out)
    assert iters(out) == ([1, 2, 3], [1, 1, 2, 2, 3, 3], [1, 1, 2, 2, 3, 3])
    steps = [torch.load(out / n, weights_only=True)["step"] for n in ("ckpt.pt", "critic.pt", "train_state.pt")]
    assert steps == [2, 3, 3]
    capsys.readouterr()
    ppo(out)  # the scheduler reruns the same command
    assert "resuming from step 2 with critic.prev.pt, train_state.prev.pt, adapters.prev.pt" in capsys.readouterr().out
    assert iters(out) == ([1, 2, 3, 4], [1, 1, 2, 2, 3, 3, 4, 4], [1, 1, 2, 2, 3, 3, 4, 4])
    assert not [f for f in os.listdir(out) if ".prev." in f or ".tmp" in f]
    ppo(d / "whole")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("t_")} for r in rows]  # noqa: E731
    assert strip(read_metrics(out)) == strip(read_metrics(d / "whole"))
    assert (out / "samples.txt").read_text() == (d / "whole" / "samples.txt").read_text()


def test_rm_must_be_a_reward_model(tiny_pipeline):
    p = script(*ppo_cmd(tiny_pipeline, tiny_pipeline / "ppo_bad_rm", "--rm", str(tiny_pipeline / "sft")), check=False)
    assert p.returncode == 2 and "holds a language model" in p.stderr, p.stderr
    assert not (tiny_pipeline / "ppo_bad_rm").exists()


@pytest.mark.parametrize("flags, given, message", [
    ({"num_iterations": 0}, set(), "--num_iterations and --ppo_epochs must be >= 1"),
    ({"ppo_epochs": 0}, set(), "--num_iterations and --ppo_epochs must be >= 1"),  # trained nothing, saved anyway
    ({"ptx_coef": 0.5}, {"ptx_coef"}, "--ptx_coef > 0 needs --ptx_data (an SFT JSONL file)"),  # read_sft("") mid-start
    ({"lora_rank": -1}, {"lora_rank"}, "--lora_rank -1: must be >= 0 (0 = no LoRA)"),
    ({"lora_rank": 4, "lora_alpha": 0.0}, {"lora_rank", "lora_alpha"}, "--lora_alpha 0.0: must be > 0"),
    ({"critic": "both"}, {"critic"}, "--critic 'both': expected separate or shared"),
    ({"offload": "ref,actor"}, {"offload"},
     "--offload 'ref,actor': unknown model ['actor'], expected ref, rm or ref,rm"),
    ({"offload": "rm,critic,x"}, {"offload"}, "--offload 'rm,critic,x': unknown model ['critic']"),  # the first one
    # a rank of 1 is LoRA too: its head must stay out of the targets
    ({"lora_rank": 1, "lora_targets": "^head"}, {"lora_rank", "lora_targets"}, "'^head' matches head"),
])
def test_check_flags_refuses_each_with_its_own_line(flags, given, message):
    with pytest.raises(utils.UserError, match=re.escape(message)):
        train_ppo.check_flags(Args(**flags), given)


@pytest.mark.parametrize("offload", ["ref", "rm", "rm,ref", "ref,,rm", ""])
def test_check_flags_takes_every_subset_of_the_offloadable_models(offload):
    train_ppo.check_flags(Args(offload=offload), {"offload"})


def dropouts(model):
    """Every dropout probability a model holds: its config's, each nn.Dropout's, each module's float `dropout`."""
    out = [model.config.dropout]
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            out.append(m.p)
        elif isinstance(getattr(m, "dropout", None), float):
            out.append(m.dropout)
    return out


@pytest.mark.parametrize("flags", [{}, {"critic": "shared"}, {"lora_rank": 2}, {"lora_rank": 2, "critic": "shared"}])
def test_build_models_turns_dropout_off_and_freezes_what_the_table_says(tmp_path, flags):
    """
    From checkpoints with dropout 0.1: no model keeps any dropout; the reference and the reward model are frozen;
    without LoRA every weight of the actor and critic trains; with LoRA only the adapters and the head on top (the
    critic's head, or the shared trunk's value head) do; --grad_checkpointing reaches both trained models.
    """
    d = save_random_ckpts(tmp_path, dropout=0.1)  # as a trained SFT model's config may have
    args = Args(sft=str(d / "sft"), rm=str(d / "rm"), grad_checkpointing=True, **flags)
    m = train_ppo.build_models(args, "cpu")
    actor, critic, ref, rm = m["actor"], m["critic"], m["ref"], m["reward_model"]
    assert (critic is None) == (args.critic == "shared")
    trained = [actor] + ([critic] if critic is not None else [])
    # with LoRA the reference is the actor with its adapters off: its dropout is the actor's
    checked = [("actor", actor), ("critic", critic), ("reward", rm)] + ([("ref", ref)] if not args.lora_rank else [])
    for name, model in checked:
        if model is not None:
            found = dropouts(model)
            assert len(found) > 1 and all(p == 0.0 for p in found), (name, found)  # the config's and its modules'
    assert not any(p.requires_grad for p in rm.parameters()) and not rm.training
    if not args.lora_rank:
        assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
        for model in trained:
            assert all(p.requires_grad for p in model.parameters())
    else:
        assert isinstance(ref, train_ppo.lora.AdaptersOff)
        head = "value_head." if critic is None else "head."
        for key, model in (("actor", actor), ("critic", critic)):
            if model is None:
                continue
            for n, p in model.named_parameters():
                want = "lora_" in n or (n.startswith(head) and (critic is None) == (key == "actor"))
                assert p.requires_grad == want, (key, n)
    for model in trained:
        assert model.grad_checkpointing is True


def test_a_resumed_shared_trunk_gets_its_saved_value_head_back(random_ckpts):
    """
    --critic shared on --resume: build_models puts the trunk from ckpt.pt and the value head from critic.pt (as
    checkpoint_files wrote them) back, not the zero head a fresh run starts with.
    """
    args = Args(sft=str(random_ckpts / "sft"), rm=str(random_ckpts / "rm"), critic="shared")
    m = train_ppo.build_models(args, "cpu")
    actor = m["actor"]
    assert not actor.value_head.weight.any()  # a fresh run: V = 0
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(0.1 * torch.randn_like(p))
    opt = utils.configure_optimizer(actor, 1e-3, 0.0, (0.9, 0.95), "cpu")
    out = str(random_ckpts / "ppo")
    gen = torch.Generator().manual_seed(7)
    gen.manual_seed(8)  # a state that is not the seed's: PPO-ptx's draws so far
    payloads = train_ppo.checkpoint_files(args, 3, m["tok"], actor, None, opt, None, 0.25, {"epoch": 0, "pos": 0},
                                          gen, {})
    state = payloads[utils.TRAIN_STATE]
    assert state["kl_coef"] == 0.25 and state["step"] == 3 and state["critic_optimizer"] is None
    assert torch.equal(state["ptx_rng"], gen.get_state())
    assert payloads[utils.CKPT]["models_resident"] == 3  # the shared trunk, the reference, the reward model
    train_ppo.C.save_files(out, payloads)
    files = train_ppo.C.complete_files(out, [utils.CKPT, train_ppo.CRITIC, utils.TRAIN_STATE])
    again = train_ppo.build_models(args, "cpu", files)["actor"]
    want = actor.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in again.state_dict().items())
    assert again.value_head.weight.abs().sum() > 0


def test_ptx_data_with_no_example_that_fits_the_context_is_refused(random_ckpts):
    """
    Every PPO-ptx example's response longer than block_size (a long prompt alone is cut, such an example is dropped):
    one line naming the file, before metrics.jsonl is started (without the check the first update's draw fails).
    """
    sft = random_ckpts / "long.jsonl"
    sft.write_text(json.dumps({"prompt": "sort 3 1", "response": "9 " * 40}) + "\n")
    out = random_ckpts / "ppo"
    with pytest.raises(utils.UserError, match=re.escape(f"{sft}: no example fits block_size 64")):
        train_ppo.main(tiny_ppo_args(random_ckpts, out, "--ptx_coef", "1", "--ptx_data", str(sft)))
    assert not (out / "metrics.jsonl").exists()
