"""
train_grpo.py: the group advantages and loss aggregations against float64 loops, the clipped surrogate, the
zero signal of a group of equal rewards, the update's gradient against the papers' objective written as loops,
and the script end to end on tiny random checkpoints (subprocess and in-process).
"""

import copy
import dataclasses
import json
import math
import os
import random
import re
import sys

import pytest
import torch

from scripts import ROOT, read_metrics, script

sys.path.insert(0, ROOT)  # train_grpo.py is a top-level script

from nanorlhf import data as D
from nanorlhf import tasks, utils
from nanorlhf.losses import clipped_surrogate
from nanorlhf.model import GPT, GPTConfig, ScalarGPT
from nanorlhf.rollout import decode_response, disable_dropout, freeze, generate_responses
from nanorlhf.tokenizer import Tokenizer

import train_grpo
from train_grpo import aggregate_loss, equal_groups, group_advantages

TINY = dict(block_size=64, vocab_size=258, n_layer=2, n_head=2, n_embd=32)


# -----------------------------------------------------------------------------
# float64 references, written the plain way


def ref_advantages(scores, G, kind, eps):
    out = []
    for g in range(0, len(scores), G):
        r = scores[g:g + G]
        if len(set(r)) == 1:  # no deviation from the mean: no advantage
            out += [0.0] * G
            continue
        mean = sum(r) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (G - 1))
        for i, x in enumerate(r):
            if kind == "grpo":
                out.append((x - mean) / (std + eps))
            elif kind == "dr_grpo":
                out.append(x - mean)
            else:
                others = [r[j] for j in range(G) if j != i]
                out.append(x - sum(others) / (G - 1))
    return out


def ref_aggregate(per_token, mask, kind, max_len):
    total = 0.0
    for row, m in zip(per_token, mask):
        s = sum(x for x, k in zip(row, m) if k)
        n = sum(m)
        if kind == "grpo":
            total += s / n if n else 0.0
        elif kind == "dr_grpo":
            total += s / max_len
        else:
            total += s
    return total / len(per_token)


def random_groups(rng, n_groups, G):
    """Scores with some groups all equal (ties are the case to get right) and some with a repeated value."""
    scores = []
    for _ in range(n_groups):
        kind = rng.random()
        if kind < 0.3:
            scores += [round(rng.gauss(0, 2), 1)] * G
        elif kind < 0.5:
            v = rng.gauss(0, 1)
            scores += [v] * (G - 1) + [rng.gauss(0, 1)]
        else:
            scores += [rng.gauss(0, 2) for _ in range(G)]
    return scores


def random_mask(rng, B, R):
    """Response masks: a prefix of real tokens per row (0 to R of them)."""
    mask = []
    for _ in range(B):
        n = rng.randint(0, R)
        mask.append([1] * n + [0] * (R - n))
    return mask


# -----------------------------------------------------------------------------
# the group math


@pytest.mark.parametrize("kind", train_grpo.ADVANTAGES)
def test_group_advantages_match_float64_loop(kind):
    rng = random.Random(0)
    for G in (2, 3, 4, 8):
        scores = random_groups(rng, 6, G)
        got = group_advantages(torch.tensor(scores, dtype=torch.float64), G, kind, eps=1e-4)
        want = ref_advantages(scores, G, kind, 1e-4)
        assert got.shape == (len(scores),)
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12), (kind, G)
        # float32, as the script runs it
        got32 = group_advantages(torch.tensor(scores, dtype=torch.float32), G, kind, eps=1e-4)
        assert torch.allclose(got32.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    one = group_advantages(torch.tensor([1.0, 2.0, 3.0]), 3, kind, eps=1e-4)
    expect = {"grpo": [-1 / (1 + 1e-4), 0, 1 / (1 + 1e-4)], "dr_grpo": [-1, 0, 1], "rloo": [-1.5, 0, 1.5]}[kind]
    assert torch.allclose(one, torch.tensor(expect, dtype=torch.float32))


def test_rloo_is_the_centred_score_scaled_by_g_over_g_minus_1():
    # r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r)): a second, algebraic reference
    scores = torch.randn(24, dtype=torch.float64)
    for G in (2, 3, 4, 6):
        centred = group_advantages(scores, G, "dr_grpo")
        assert torch.allclose(group_advantages(scores, G, "rloo"), centred * G / (G - 1), atol=1e-12)


@pytest.mark.parametrize("kind", train_grpo.ADVANTAGES)
def test_equal_rewards_give_zero_advantages_and_zero_gradient(kind):
    G = 4
    scores = torch.tensor([0.7] * G + [-3.0] * G + [1e6] * G)  # large values too: no 0/0, no rounding residue
    adv = group_advantages(scores, G, kind)
    assert torch.isfinite(adv).all() and (adv == 0).all()
    assert equal_groups(scores, G) == 1.0
    # the surrogate's gradient with these advantages is exactly zero, whatever the ratio
    logprobs = torch.randn(3 * G, 7, requires_grad=True)
    old = logprobs.detach() + 0.1 * torch.randn(3 * G, 7)
    mask = torch.tensor(random_mask(random.Random(1), 3 * G, 7))
    per_token, _ = clipped_surrogate(logprobs, old, adv[:, None], mask, 0.2)
    aggregate_loss(per_token, mask, kind, 7).backward()
    assert torch.equal(logprobs.grad, torch.zeros_like(logprobs))


def test_equal_groups_counts_groups_with_one_value():
    rng = random.Random(2)
    for G in (2, 4):
        scores = random_groups(rng, 10, G)
        want = sum(len(set(scores[g:g + G])) == 1 for g in range(0, len(scores), G)) / 10
        assert equal_groups(torch.tensor(scores, dtype=torch.float64), G) == pytest.approx(want)


@pytest.mark.parametrize("kind", train_grpo.ADVANTAGES)
def test_aggregate_loss_matches_float64_loop(kind):
    rng = random.Random(3)
    for B, R in ((1, 1), (5, 9), (8, 24)):
        per_token = [[rng.gauss(0, 1) for _ in range(R)] for _ in range(B)]
        mask = random_mask(rng, B, R)
        got = aggregate_loss(torch.tensor(per_token, dtype=torch.float64), torch.tensor(mask), kind, 24)
        assert got.item() == pytest.approx(ref_aggregate(per_token, mask, kind, 24), rel=1e-12, abs=1e-12)
    # the docstring's example
    pt, m = torch.tensor([[1.0, 1.0, 0.0], [2.0, 0.0, 0.0]]), torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate_loss(pt, m, kind, 4).item() == pytest.approx({"grpo": 1.5, "dr_grpo": 0.5, "rloo": 2.0}[kind])


def test_aggregate_loss_ignores_garbage_on_the_pads():
    pt = torch.tensor([[1.0, float("nan"), float("inf")]])
    m = torch.tensor([[1, 0, 0]])
    for kind in train_grpo.ADVANTAGES:
        assert aggregate_loss(pt, m, kind, 3).item() == pytest.approx({"grpo": 1.0, "dr_grpo": 1 / 3, "rloo": 1.0}[kind])


def test_clipped_surrogate_matches_float64_loop():
    torch.manual_seed(0)
    B, R, eps = 6, 10, 0.2
    new = torch.randn(B, R, dtype=torch.float64) * 0.3
    old = new + torch.randn(B, R, dtype=torch.float64) * 0.3
    adv = torch.randn(B, 1, dtype=torch.float64)
    mask = torch.tensor(random_mask(random.Random(4), B, R))
    got, ratio = clipped_surrogate(new, old, adv, mask, eps)
    for b in range(B):
        for t in range(R):
            if not mask[b, t]:
                assert got[b, t] == 0 and ratio[b, t] == 1
                continue
            r = math.exp(new[b, t].item() - old[b, t].item())
            a = adv[b, 0].item()
            want = -min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
            assert got[b, t].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
            assert ratio[b, t].item() == pytest.approx(r, rel=1e-12)


# -----------------------------------------------------------------------------
# the update on tiny models, in-process


def tiny_setup(seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(**TINY)
    actor = GPT(config)
    ref = copy.deepcopy(actor)
    reward_model = ScalarGPT(config)
    for m in (actor, ref, reward_model):
        disable_dropout(m)
    freeze(ref)
    freeze(reward_model)
    return actor, ref, reward_model


def rollout(actor, ref, reward_model, args, rt, tok):
    prompts = ["sort 5 3 8 1", "sort 2 9 4", "sort 7 7 1 0 3 6", "sort 4 1 2"]
    pidx = list(range(args.batch_size // args.group_size))
    ids = [tok.render_prompt(prompts[i % len(prompts)]) for i in pidx for _ in range(args.group_size)]
    batch = D.collate(ids, tok.pad_id, left_pad=True)
    actor.eval()
    response = generate_responses(actor, batch["idx"], batch["attention_mask"], tok, args)
    return train_grpo.make_experience(actor, ref, reward_model, batch["idx"], batch["attention_mask"], response,
                                      tok, args, rt)


@pytest.mark.parametrize("kind", train_grpo.ADVANTAGES)
def test_update_with_equal_rewards_leaves_the_policy_unchanged(kind):
    """A reward model that gives every response the same score (and the same score for a missing EOS): all
    groups equal, advantages 0, and after a full update (4 epochs x 4 minibatches of AdamW) not one weight moved."""
    tok = Tokenizer.byte_level()
    actor, ref, reward_model = tiny_setup()
    with torch.no_grad():
        reward_model.head.weight.zero_()
        reward_model.head.bias.fill_(0.5)
    args = train_grpo.Args(advantage=kind, batch_size=16, group_size=4, response_length=8, kl_coef=0.0)
    train_grpo.check_args(args)
    args.missing_eos_penalty = 0.5
    rt = utils.setup_runtime("cpu", "float32", seed=0)
    exp = rollout(actor, ref, reward_model, args, rt, tok)
    assert equal_groups(exp["rewards"], 4) == 1.0 and (exp["advantages"] == 0).all()
    before = copy.deepcopy(actor.state_dict())
    opt = utils.configure_optimizer(actor, args.lr, 0.0, (0.9, 0.95), "cpu")
    out = train_grpo.grpo_update(actor, opt, exp, args, rt, args.lr)
    assert all(math.isfinite(v) for v in out.values())
    assert all(torch.equal(v, before[k]) for k, v in actor.state_dict().items())
    assert "kl_loss" not in out  # beta 0: no k3 term in the loss, none logged


@pytest.mark.parametrize("kind, max_grad_norm", [("grpo", 1.0), ("dr_grpo", 1.0), ("rloo", 1.0), ("grpo", 0.0)])
def test_update_moves_the_policy_and_first_ratio_is_one(kind, max_grad_norm):
    """(--max_grad_norm 0 means no clipping, as --grad_clip 0 in SFT and RM, not a gradient scaled to 0.)"""
    tok = Tokenizer.byte_level()
    actor, ref, reward_model = tiny_setup(1)
    args = train_grpo.Args(advantage=kind, batch_size=16, group_size=4, response_length=8, grad_accum=2,
                           max_grad_norm=max_grad_norm)
    train_grpo.check_args(args)  # missing_eos_penalty None: the RM's score for every response
    rt = utils.setup_runtime("cpu", "float32", seed=0)
    exp = rollout(actor, ref, reward_model, args, rt, tok)
    assert equal_groups(exp["rewards"], 4) < 1
    before = copy.deepcopy(actor.state_dict())
    opt = utils.configure_optimizer(actor, args.lr, 0.0, (0.9, 0.95), "cpu")
    out = train_grpo.grpo_update(actor, opt, exp, args, rt, args.lr)
    assert out["first_ratio_max_dev"] < 1e-5
    assert any(not torch.equal(v, before[k]) for k, v in actor.state_dict().items())


def test_max_grad_norm_clips_the_gradient_the_optimizer_steps_on():
    """
    --max_grad_norm 1e-12: the gradient AdamW takes has norm <= 1e-12, so its first step, lr * g / (|g| + 1e-8) per
    weight, moves no weight by more than lr * 1e-4. Unclipped (0), the same rollout moves weights by about lr.
    """
    tok = Tokenizer.byte_level()
    moved = {}
    for clip in (1e-12, 0.0):
        actor, ref, reward_model = tiny_setup(1)
        args = train_grpo.Args(batch_size=8, group_size=4, response_length=6, num_epochs=1, num_minibatches=1,
                               max_grad_norm=clip)
        train_grpo.check_args(args)
        rt = utils.setup_runtime("cpu", "float32", seed=0)
        exp = rollout(actor, ref, reward_model, args, rt, tok)
        before = copy.deepcopy(actor.state_dict())
        opt = utils.configure_optimizer(actor, args.lr, 0.0, (0.9, 0.95), "cpu")
        train_grpo.grpo_update(actor, opt, exp, args, rt, args.lr)
        moved[clip] = max((v - before[k]).abs().max().item() for k, v in actor.state_dict().items())
    assert moved[1e-12] <= 1e-2 * args.lr and moved[0.0] > 0.5 * args.lr, moved  # (1e-2: float32 rounds near 1)


@pytest.mark.parametrize("flag, value", [("max_grad_norm", -1.0), ("clip_coef", 0.0), ("clip_coef", -0.5),
                                         ("lr", 0.0), ("lr", -1e-3)])
def test_check_args_rejects_a_negative_grad_clip_and_a_clip_coef_or_lr_of_0_or_less(flag, value):
    """(--max_grad_norm 0 is allowed: no clipping, as in train_ppo.py.)"""
    with pytest.raises(utils.UserError, match=f"--{flag} must be"):
        train_grpo.check_args(train_grpo.Args(**{flag: value}))


def test_kl_goes_where_each_paper_put_it():
    for kind, where, beta in (("grpo", "loss", 0.2), ("dr_grpo", "loss", 0.2), ("rloo", "reward", 0.3)):
        args = train_grpo.Args(advantage=kind)
        train_grpo.check_args(args)
        assert (args.kl_in, args.kl_coef) == (where, beta)


def test_kl_in_the_reward_lowers_each_reward_by_beta_times_the_summed_k1():
    tok = Tokenizer.byte_level()
    actor, ref, reward_model = tiny_setup(2)
    with torch.no_grad():  # a policy that differs from the reference, so that the KL is not 0
        for p in actor.parameters():
            p.add_(0.05 * torch.randn_like(p))
    args = train_grpo.Args(advantage="rloo", batch_size=8, group_size=4, response_length=6, kl_coef=0.5)
    train_grpo.check_args(args)
    rt = utils.setup_runtime("cpu", "float32", seed=0)
    exp = rollout(actor, ref, reward_model, args, rt, tok)
    for b in range(8):
        n = int(exp["response_mask"][b].sum())
        k1 = sum(exp["logprobs"][b, t].item() - exp["ref_logprobs"][b, t].item() for t in range(n))
        assert exp["rewards"][b].item() == pytest.approx(exp["scores"][b].item() - 0.5 * k1, abs=1e-5)
    assert exp["kl"].abs().sum() > 0


# -----------------------------------------------------------------------------
# the update's gradient against the papers' objective, written the plain way


def logprobs_alone(model, prompt, response, temperature):
    """log pi(y_t | x, y_<t) at the temperature from a forward pass of the sequence alone (no pads): a list."""
    logits = model(torch.tensor([prompt + response]))[0]  # (len, V)
    out = []
    for t, y in enumerate(response):
        z = logits[len(prompt) - 1 + t] / temperature  # the position before y_t predicts y_t
        out.append(z[y] - torch.logsumexp(z, dim=0))
    return out


def ref_objective(policy, old, ref, reward_model, prompts, responses, args, mb_size, eos_id):
    """
    The papers' loss for the rows of a rollout, float64, Python loops over responses and tokens; pi is the policy
    being trained, pi_old the one that sampled, pi_ref the reference:

        R_i  = the RM's score at y_i's last token; --missing_eos_penalty without EOS
        r_i  = R_i [- beta * sum_t (log pi_old(y_t) - log pi_ref(y_t))]             --kl_in reward
        A_i  = ref_advantages(r) within i's group                                   grpo | dr_grpo | rloo
        l_t  = -min(ratio_t A_i, clip(ratio_t, 1 - eps, 1 + eps) A_i)               ratio_t = pi(y_t) / pi_old(y_t)
               [+ beta * (pi_ref(y_t) / pi(y_t) - log(pi_ref(y_t) / pi(y_t)) - 1)]   --kl_in loss (k3)
        loss = 1 / mb_size * sum_i (1 / |y_i| | 1 / L_max | 1) * sum_t l_t          grpo | dr_grpo | rloo

    The sum runs over all rows: a minibatch's loss is the mean over its mb_size responses, so the minibatches'
    losses add up to this whatever rows the shuffle gave each. A response's real tokens run up to its first EOS,
    the EOS included. -> (loss, the number of tokens where the clip bound (its clipped term the larger loss,
    strictly), the number where it did not, the ratios of all real tokens as floats, {"pg_loss", "kl_loss"}: the
    surrogate and the k3 terms of loss as floats, each 1 / mb_size * sum_i (1 / |y_i| | 1 / L_max | 1) * sum_t).
    """
    beta, eps, T = args.kl_coef, args.clip_coef, args.temperature
    lp, lp_old, lp_ref, rewards = [], [], [], []
    for p, y in zip(prompts, responses):
        y = y[:y.index(eos_id) + 1] if eos_id in y else y
        lp.append(logprobs_alone(policy, p, y, T))
        with torch.no_grad():
            lp_old.append([x.item() for x in logprobs_alone(old, p, y, T)])
            lp_ref.append([x.item() for x in logprobs_alone(ref, p, y, T)])
            r = reward_model(torch.tensor([p + y]))[0, -1].item() if eos_id in y else args.missing_eos_penalty
        if args.kl_in == "reward":
            r -= beta * sum(a - b for a, b in zip(lp_old[-1], lp_ref[-1]))
        rewards.append(r)
    adv = ref_advantages(rewards, args.group_size, args.advantage, args.adv_eps)
    loss, n_bound, n_free, ratios, parts = 0.0, 0, 0, [], {"pg_loss": 0.0, "kl_loss": 0.0}
    for i in range(len(prompts)):
        total, pg, kl = 0.0, 0.0, 0.0
        for t in range(len(lp[i])):
            ratio = torch.exp(lp[i][t] - lp_old[i][t])
            l_t = -torch.minimum(ratio * adv[i], torch.clamp(ratio, 1 - eps, 1 + eps) * adv[i])
            total, pg = total + l_t, pg + l_t.item()
            bound = (adv[i] > 0 and ratio.item() > 1 + eps) or (adv[i] < 0 and ratio.item() < 1 - eps)
            n_bound, n_free = n_bound + bound, n_free + (not bound)
            ratios.append(ratio.item())
            if args.kl_in == "loss":
                log_r = lp_ref[i][t] - lp[i][t]  # log(pi_ref / pi)
                k3 = torch.exp(log_r) - log_r - 1
                total, kl = total + beta * k3, kl + k3.item()
        n = {"grpo": len(lp[i]), "dr_grpo": args.response_length, "rloo": 1}[args.advantage]
        loss = loss + total / n
        parts["pg_loss"] += pg / n / mb_size
        parts["kl_loss"] += kl / n / mb_size
    return loss / mb_size, n_bound, n_free, ratios, parts


def update_against_the_papers_objective(kind, kl_in, num_minibatches, monkeypatch):
    """
    make_experience + grpo_update on float64 tiny models, and ref_objective on the same rollout: asserts that the
    gradient the update steps on (summed over its minibatches) equals the gradient of ref_objective. At temperature
    0.7; responses of 1 to L_max tokens, some without EOS, after prompts of three lengths (pads on both sides); a
    policy moved away from pi_old (the clip binds on some tokens, as in a later epoch) and pi_old away from pi_ref
    (the KL and its gradient are not 0); 12 responses in num_minibatches minibatches of 3 micro-batches each. The
    optimizer step is replaced by one that keeps the minibatch's gradient and leaves the weights where they are.
    -> (grpo_update's stats, the number of tokens where the clip bound, where it did not, the ratios of all tokens,
    ref_objective's loss and its parts: sums over all the minibatches).
    """
    tok = Tokenizer.byte_level()
    ref, _, reward_model = tiny_setup(4)
    ref, reward_model = ref.double(), reward_model.double()
    g = torch.Generator().manual_seed(0)
    old, policy = copy.deepcopy(ref), copy.deepcopy(ref)
    with torch.no_grad():
        for p_old, p in zip(old.parameters(), policy.parameters()):
            p_old.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            p.copy_(p_old + 0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    args = train_grpo.Args(advantage=kind, kl_in=kl_in, batch_size=12, group_size=4, response_length=6,
                           temperature=0.7, num_epochs=1, num_minibatches=num_minibatches, grad_accum=3,
                           missing_eos_penalty=-1.0)
    train_grpo.check_args(args)
    rt = utils.setup_runtime("cpu", "float32", seed=0)

    # the rollout: 3 prompts x G = 4 responses of random tokens, an EOS at a chosen index (None: no EOS)
    prompts = [tok.render_prompt(p) for p in ("sort 5 3 8 1", "sort 2 9", "sort 7 7 1 0 3 6") for _ in range(4)]
    responses = torch.randint(32, 127, (12, 6), generator=g).tolist()
    for row, eos_at in zip(responses, (5, 0, None, 2, 3, None, 1, 5, 0, 4, None, 2)):
        if eos_at is not None:
            row[eos_at] = tok.eos_id
    batch = D.collate(prompts, tok.pad_id, left_pad=True)
    exp = train_grpo.make_experience(old, ref, reward_model, batch["idx"], batch["attention_mask"],
                                     torch.tensor(responses), tok, args, rt)

    grads = []

    def keep_gradient(model, opt, lr, grad_clip, where="", loss=None):
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)

    monkeypatch.setattr(train_grpo, "optimizer_step", keep_gradient)
    out = train_grpo.grpo_update(policy, None, exp, args, rt, 0.0)
    assert len(grads) == num_minibatches

    want, n_bound, n_free, ratios, parts = ref_objective(policy, old, ref, reward_model, prompts, responses, args,
                                                         12 // num_minibatches, tok.eos_id)
    want.backward()
    assert n_bound >= 5 and n_free >= 5, (n_bound, n_free)  # the clip binds on some tokens, not on all
    for name, p in policy.named_parameters():
        got = sum(step[name] for step in grads)
        assert torch.allclose(got, p.grad, rtol=1e-9, atol=1e-12 * p.grad.abs().max()), name
    return out, n_bound, n_free, ratios, {"loss": want.item(), **parts}


@pytest.mark.parametrize("kind", train_grpo.ADVANTAGES)
@pytest.mark.parametrize("kl_in", ["loss", "reward"])
def test_update_gradient_is_the_papers_objective(kind, kl_in, monkeypatch):
    """The gradient of 2 minibatches of 3 micro-batches (update_against_the_papers_objective)."""
    update_against_the_papers_objective(kind, kl_in, 2, monkeypatch)


def test_update_stats_are_the_token_fractions_of_the_papers_objective(monkeypatch):
    """
    One minibatch of 3 micro-batches with different token counts, so that a micro-batch's share of the responses
    and its share of the tokens differ: "clipfrac" is the fraction of the real tokens where the clip bound
    (strictly: the clipped term the larger loss), "ratio" the mean of pi / pi_old over the real tokens, both as
    ref_objective counts them on the rows alone. (Their float32 token shares: to 1e-6.) The one minibatch is the
    first: "first_ratio_max_dev" is the largest |ratio - 1| over all the real tokens (not 0: the policy has moved).
    """
    out, n_bound, n_free, ratios, _ = update_against_the_papers_objective("grpo", "loss", 1, monkeypatch)
    assert out["clipfrac"] == pytest.approx(n_bound / (n_bound + n_free), abs=1e-6)
    assert out["ratio"] == pytest.approx(sum(ratios) / len(ratios), abs=1e-6)
    assert abs(out["ratio"] - 1) > 1e-3  # the policy has moved: a ratio stat stuck at 1 would not pass
    assert out["first_ratio_max_dev"] == pytest.approx(max(abs(r - 1) for r in ratios), rel=1e-6)
    assert out["first_ratio_max_dev"] > 1e-2


@pytest.mark.parametrize("kind, kl_in", [("grpo", "loss"), ("rloo", "reward")])
def test_update_losses_are_the_mean_over_minibatches_of_the_papers_objective(kind, kl_in, monkeypatch):
    """
    "loss", "pg_loss" and "kl_loss" are means over the 2 minibatches of each minibatch's loss (a mean over its
    responses, its micro-batches weighed by their share of them): ref_objective's sums over all the rows / 2. With
    the KL in the reward there is no k3 term and no "kl_loss".
    """
    out, _, _, _, want = update_against_the_papers_objective(kind, kl_in, 2, monkeypatch)
    assert out["loss"] == pytest.approx(want["loss"] / 2, rel=1e-9)
    assert out["pg_loss"] == pytest.approx(want["pg_loss"] / 2, rel=1e-9)
    if kl_in == "loss":
        assert out["kl_loss"] == pytest.approx(want["kl_loss"] / 2, rel=1e-9) and want["kl_loss"] > 1e-4
    else:
        assert "kl_loss" not in out


# -----------------------------------------------------------------------------
# end to end (subprocess) on tiny random checkpoints


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    tok = Tokenizer.byte_level()
    actor, _, reward_model = tiny_setup(3)
    utils.save_checkpoint(str(d / "sft"), utils.model_payload(actor, tok, "sft", {"seed": 0}, 1))
    utils.save_checkpoint(str(d / "rm"), utils.model_payload(reward_model, tok, "rm", {"seed": 0}, 1,
                                                             reward_mean=0.0, reward_std=1.0))
    with open(d / "prompts.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": "sort " + " ".join(str((i * 7 + j) % 10) for j in range(3 + i % 4))}) + "\n")
    return d


def grpo_cmd(d, out, *extra):
    return ["train_grpo.py", "--data", str(d / "prompts.jsonl"), "--sft", str(d / "sft"), "--rm", str(d / "rm"),
            "--out_dir", str(out), "--batch_size", "8", "--group_size", "4", "--num_minibatches", "2",
            "--response_length", "8", "--sample_interval", "2", *extra]


def test_script_runs_logs_and_resumes(tiny_ckpts):
    out = tiny_ckpts / "run"
    # --resume auto, as a job scheduler reruns one command: an empty out_dir starts fresh...
    p = script(*grpo_cmd(tiny_ckpts, out, "--num_iterations", "2", "--advantage", "dr_grpo", "--resume", "auto"))
    last = p.stdout.splitlines()[-1]  # the run is over and where it saved, as SFT's, RM's and DPO's last lines say
    assert re.fullmatch(rf"done: iteration 2; \d+m\d\ds; saved {re.escape(str(out))}/ckpt\.pt", last), p.stdout
    rows = read_metrics(str(out))
    assert [r["iter"] for r in rows] == [1, 2]
    # the first minibatch's ratio is 1: nothing has moved between the rollout and the first forward of the update
    assert all(r["first_ratio_max_dev"] < 1e-5 for r in rows)
    assert all(0 <= r["gold"] <= 1 and 0 <= r["equal_groups"] <= 1 for r in rows)  # the task's prompts: gold logged
    policy, _, ckpt = utils.load_model(str(out), kind="gpt")  # a policy, as evaluate.py loads it
    assert ckpt["stage"] == "grpo" and ckpt["step"] == 2 and ckpt["models_resident"] == 3
    assert ckpt["args"]["kl_in"] == "loss" and ckpt["args"]["advantage"] == "dr_grpo"
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 2 and state["data"] == {"epoch": 0, "pos": 4}
    # ... and continues from the checkpoint with the run's saved flags (dr_grpo, its data and models); a larger
    # --num_iterations extends the run
    cmd = ["train_grpo.py", "--out_dir", str(out), "--resume", "auto", "--num_iterations", "3"]
    script(*cmd)
    assert [r["iter"] for r in read_metrics(str(out))] == [1, 2, 3]
    assert torch.load(out / "ckpt.pt", weights_only=True)["args"]["advantage"] == "dr_grpo"
    assert "nothing to do" in script(*cmd).stdout  # a finished run: exit 0, nothing written
    assert [r["iter"] for r in read_metrics(str(out))] == [1, 2, 3]
    p = script("train_grpo.py", "--out_dir", str(out), "--resume", "--num_iterations", "4", "--lr", "0.5", check=False)
    assert p.returncode == 2 and "--lr" in p.stderr  # a changed flag is refused rather than silently ignored
    assert torch.load(out / "train_state.pt", weights_only=True)["data"] == {"epoch": 0, "pos": 6}
    assert {json.loads(line)["iter"] for line in open(out / "samples.jsonl")} == {1, 2}


def test_the_command_that_started_a_run_resumes_it_with_its_defaults_given(tiny_ckpts, tmp_path, one_thread):
    """
    --kl_in auto, --kl_coef none and --missing_eos_penalty none given explicitly are resolved at start-up and saved
    resolved (loss, 0.2, from the RM's statistics): the same command rerun by a scheduler (--resume auto) continues
    the run. It used to be refused ("--kl_in auto differs from the run's loss").
    """
    out = tmp_path / "out"
    argv = grpo_cmd(tiny_ckpts, out, "--num_iterations", "2", "--gold", "off", "--kl_in", "auto", "--kl_coef",
                    "none", "--missing_eos_penalty", "none", "--resume", "auto")[1:]
    train_grpo.main(argv + ["--stop_at", "1"])
    saved = torch.load(out / "ckpt.pt", weights_only=True)["args"]
    assert (saved["kl_in"], saved["kl_coef"], saved["missing_eos_penalty"]) == ("loss", 0.2, -2.0)
    train_grpo.main(argv)
    assert [r["iter"] for r in read_metrics(str(out))] == [1, 2]


def test_a_resumed_run_takes_its_logging_and_checkpoint_flags_anew(tiny_ckpts, tmp_path, monkeypatch, one_thread):
    """
    --save_interval, --sample_interval, --num_samples and --gold given on --resume take effect, as in train_ppo.py
    (the README: the logging and checkpoint intervals may be given anew). They were refused: "--save_interval 1
    differs from the run's 25".
    """
    out = tmp_path / "out"
    train_grpo.main(grpo_cmd(tiny_ckpts, out, "--num_iterations", "3", "--stop_at", "1")[1:])
    saves, real = [], train_grpo.save_files

    def recorded(out_dir, payloads):
        saves.append(payloads[utils.CKPT]["step"])
        return real(out_dir, payloads)

    monkeypatch.setattr(train_grpo, "save_files", recorded)
    train_grpo.main(["--out_dir", str(out), "--resume", "--save_interval", "1", "--sample_interval", "1",
                     "--num_samples", "2", "--gold", "off"])
    assert saves == [2, 3]
    assert [json.loads(line)["iter"] for line in open(out / "samples.jsonl")] == [1, 1, 1, 1, 2, 2, 3, 3]
    assert ["gold" in r for r in read_metrics(str(out))] == [True, False, False]
    assert utils.load_checkpoint(str(out))["args"]["save_interval"] == 1


def test_resume_in_another_stages_directory_says_so(tiny_ckpts, tmp_path):
    """It compared the flags first: "--data ... differs from the run's ...", about a run that is not GRPO's."""
    out = tmp_path / "sft"
    ckpt = {"stage": "sft", "args": {"data": "sft.jsonl"}, "step": 1}
    train_grpo.save_files(str(out), {utils.TRAIN_STATE: {"step": 1}, utils.CKPT: ckpt})
    with pytest.raises(utils.UserError, match=f"--out_dir {out} holds a checkpoint of the 'sft' stage"):
        train_grpo.main(grpo_cmd(tiny_ckpts, out, "--resume")[1:])


def test_resumed_flags_take_the_saved_value_of_a_default_resolved_at_start_only():
    """
    Given at the sentinel default of a flag resolved at start-up, the saved resolved value; given at another value,
    it must equal the saved one; any other flag given at its default (--lr 2e-4) is still compared with the run's.
    """
    saved = {"args": dataclasses.asdict(train_grpo.Args(kl_in="loss", kl_coef=0.2, missing_eos_penalty=-1.5,
                                                        lr=1e-3))}
    free = train_grpo.RESUME_FREE

    def resumed(*argv):
        args = utils.parse_flags(train_grpo.Args, list(argv))
        return train_grpo.resumed_flags(args, saved, free, train_grpo.RESOLVED_AT_START)

    args = resumed("--kl_in", "auto", "--kl_coef", "none", "--missing_eos_penalty", "none")
    assert (args.kl_in, args.kl_coef, args.missing_eos_penalty, args.lr) == ("loss", 0.2, -1.5, 1e-3)
    assert resumed("--kl_in", "loss", "--kl_coef", "0.2").kl_in == "loss"
    for argv, message in [(("--kl_in", "reward"), "--kl_in reward differs from the run's loss"),
                          (("--kl_coef", "0.3"), "--kl_coef 0.3 differs from the run's 0.2"),
                          (("--missing_eos_penalty", "-1"), "--missing_eos_penalty -1.0 differs from the run's -1.5"),
                          (("--lr", "2e-4"), "--lr 0.0002 differs from the run's 0.001")]:
        with pytest.raises(utils.UserError, match=message):
            resumed(*argv)


def test_resume_after_a_crash_keeps_each_iteration_of_the_samples_once(tiny_ckpts, tmp_path, one_thread):
    """
    A run that wrote iteration 2's samples and died before its checkpoint (or stopped on a NaN) resumes from the
    checkpoint of iteration 1 and writes iteration 2 again: samples.jsonl and samples.txt hold it once, and the
    rows of iteration 1 as they were.
    """
    out = tmp_path / "out"
    argv = grpo_cmd(tiny_ckpts, out, "--num_iterations", "2", "--sample_interval", "1", "--gold", "off")[1:]
    train_grpo.main(argv + ["--stop_at", "1"])
    before = (out / "samples.jsonl").read_text()
    at_1 = {name: (out / name).read_bytes() for name in ("ckpt.pt", "train_state.pt")}
    train_grpo.main(["--out_dir", str(out), "--resume"])
    for name, data in at_1.items():  # the crash: iteration 2 logged and sampled, its checkpoint never written
        (out / name).write_bytes(data)
    train_grpo.main(["--out_dir", str(out), "--resume"])
    rows = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert [r["iter"] for r in rows] == [1] * 4 + [2] * 4
    assert (out / "samples.jsonl").read_text().startswith(before)
    headers = [line.split()[2] for line in open(out / "samples.txt") if line.startswith("=== iter ")]
    assert headers == ["1"] * 4 + ["2"] * 4
    assert sorted(os.listdir(out)) == ["ckpt.pt", "metrics.jsonl", "samples.jsonl", "samples.txt", "train_state.pt"]


def test_equal_groups_counts_equal_scores_with_the_kl_in_the_reward(tiny_ckpts, tmp_path, monkeypatch, one_thread):
    """
    rloo (KL in the reward) with a reward model that gives every response 0.5 (0.5 also without EOS) and a
    reference that differs from the policy: every group's scores are equal, its rewards are not (their KL differs).
    The logged equal_groups counts equal scores (1.0), while the advantages are not 0.
    """
    tok = Tokenizer.byte_level()
    _, _, reward_model = tiny_setup(3)
    with torch.no_grad():
        reward_model.head.weight.zero_()
        reward_model.head.bias.fill_(0.5)
    utils.save_checkpoint(str(tmp_path / "rm"), utils.model_payload(reward_model, tok, "rm", {"seed": 0}, 1))
    real = train_grpo.make_experience

    def with_moved_reference(actor, ref, *rest):
        moved = copy.deepcopy(ref)
        with torch.no_grad():
            for p in moved.parameters():
                p.add_(0.05 * torch.randn_like(p))
        return real(actor, moved, *rest)

    monkeypatch.setattr(train_grpo, "make_experience", with_moved_reference)
    out = tmp_path / "out"
    train_grpo.main(grpo_cmd(tiny_ckpts, out, "--rm", str(tmp_path / "rm"), "--advantage", "rloo", "--num_iterations",
                             "1", "--missing_eos_penalty", "0.5", "--gold", "off")[1:])
    row = read_metrics(str(out))[0]
    assert row["equal_groups"] == 1.0 and row["adv_abs"] > 0.01 and abs(row["kl"]) > 0.01, row


@pytest.mark.parametrize("flags, message", [
    # one refusal as the user sees it; each check's message: test_check_args_refuses_each_bad_value_in_one_message
    # (--max_grad_norm -1: test_check_args_rejects_a_negative_grad_clip_and_a_clip_coef_or_lr_of_0_or_less)
    (("--group_size", "1"), "--group_size 1"),
])
def test_bad_flags_exit_2_and_write_nothing(tiny_ckpts, flags, message):
    out = tiny_ckpts / "bad"
    p = script(*grpo_cmd(tiny_ckpts, out, *flags), check=False)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    # --num_samples 0 ran the first rollout and update, then crashed in gold_scores; -2 wrote batch_size - 2 samples
    (("--num_samples", "0"), "--num_samples must be >= 1, got 0"),
    (("--num_samples", "-2"), "--num_samples must be >= 1, got -2"),
    (("--beta1", "-0.1"), "--beta1 must be in [0, 1), got -0.1"),  # torch's ValueError traceback
    (("--beta2", "1.0"), "--beta2 must be in [0, 1), got 1.0"),
    (("--weight_decay", "-0.1"), "--weight_decay must be >= 0, got -0.1"),  # was accepted
])
def test_flags_that_train_ppo_checks_are_checked_before_anything_is_written(tiny_ckpts, tmp_path, flags, message):
    out = tmp_path / "out"
    with pytest.raises(utils.UserError, match=re.escape(message)):
        train_grpo.main(grpo_cmd(tiny_ckpts, out, "--num_iterations", "1", *flags)[1:])
    assert not out.exists()


def test_gold_on_with_prompts_the_judge_cannot_parse_is_refused(tiny_ckpts, tmp_path):
    """It logged gold 0.000 every iteration; --gold auto turns gold off for such prompts, as before."""
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "sort 3 1 2"}) + "\n" + json.dumps({"prompt": "write a poem"}) + "\n")
    out = tmp_path / "out"
    argv = grpo_cmd(tiny_ckpts, out, "--num_iterations", "1", "--data", str(data))[1:]
    with pytest.raises(utils.UserError, match=re.escape(f"--gold on: {data} holds prompts that are not the built-in "
                                                        f"task's, e.g. 'write a poem'")):
        train_grpo.main(argv + ["--gold", "on"])
    assert not out.exists()
    train_grpo.main(argv)  # --gold auto: no gold for these prompts
    assert "gold" not in read_metrics(str(out))[0]


def test_a_reward_model_with_a_shorter_context_is_refused(tiny_ckpts, tmp_path, capsys):
    """
    An RM of block_size 32 under a policy of 64 (prompt + 40 response tokens do not fit in 32): it crashed in the
    first rollout with an IndexError from the embedding, metrics.jsonl already written. Refused as train_ppo.py does.
    """
    rm = tmp_path / "rm"
    rm_model = ScalarGPT(GPTConfig(**{**TINY, "block_size": 32}))
    utils.save_checkpoint(str(rm), utils.model_payload(rm_model, Tokenizer.byte_level(), "rm", {"seed": 0}, 1))
    out = tmp_path / "out"
    argv = grpo_cmd(tiny_ckpts, out, "--rm", str(rm), "--response_length", "40", "--num_iterations", "1")[1:]
    with pytest.raises(SystemExit) as e:
        utils.run(lambda: train_grpo.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {rm} has block_size 32 < 64 of {tiny_ckpts / 'sft'}"), err
    assert not out.exists()


def test_bad_prompts_file_exits_2_and_writes_nothing(tiny_ckpts, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "sort 1 2"}\n{"text": "sort 3 4"}\n')
    out = tmp_path / "out"
    p = script("train_grpo.py", "--data", str(bad), "--sft", str(tiny_ckpts / "sft"), "--rm", str(tiny_ckpts / "rm"),
               "--out_dir", str(out), check=False)
    assert p.returncode == 2 and "prompts.jsonl:2" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not os.path.exists(out)


def test_nan_loss_stops_naming_the_minibatch_and_keeps_the_checkpoint(tiny_ckpts, tmp_path, monkeypatch, capsys,
                                                                      one_thread):
    """
    A NaN surrogate in the 4th minibatch of iteration 2 (2 epochs x 2 minibatches of 2 micro-batches per iteration:
    the 15th call) stops the run with one line naming iteration 2, epoch 2, minibatch 2 (not micro-batch 3) and the
    loss, exit status 2, before the optimizer step: the checkpoint of iteration 1 (and its train_state.pt) stays, with
    finite weights.
    """
    real, calls = train_grpo.clipped_surrogate, [0]

    def nan_at_call_15(*a, **kw):
        pg_tokens, ratio = real(*a, **kw)
        calls[0] += 1
        return (pg_tokens * float("nan") if calls[0] == 15 else pg_tokens), ratio

    monkeypatch.setattr(train_grpo, "clipped_surrogate", nan_at_call_15)
    out = tmp_path / "out"
    argv = grpo_cmd(tiny_ckpts, out, "--num_iterations", "3", "--num_epochs", "2", "--grad_accum", "2",
                    "--save_interval", "1", "--gold", "off")[1:]
    with pytest.raises(SystemExit) as e:
        utils.run(lambda: train_grpo.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: iteration 2 epoch 2 minibatch 2: non-finite loss nan"), err
    for name in ("ckpt.pt", "train_state.pt"):
        assert torch.load(out / name, weights_only=True)["step"] == 1, name
    model = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in model.values())


@pytest.mark.parametrize("kind", ["dr_grpo", "rloo"])
def test_adv_eps_with_another_advantage_than_grpo_is_refused(tiny_ckpts, tmp_path, capsys, kind):
    """--adv_eps is the eps of grpo's (r - mean) / (std + eps): with dr_grpo or rloo it ran and was ignored."""
    out = tmp_path / "out"
    argv = grpo_cmd(tiny_ckpts, out, "--num_iterations", "1", "--advantage", kind, "--adv_eps", "0.5")[1:]
    with pytest.raises(SystemExit) as e:
        utils.run(lambda: train_grpo.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: --adv_eps does nothing with --advantage {kind} (only grpo divides " \
                                        f"by std + eps)\n", err
    assert not out.exists()
    # named, even at its default; with grpo it is the eps, and with the others an untouched default is fine
    with pytest.raises(utils.UserError, match="--adv_eps does nothing"):
        train_grpo.check_args(train_grpo.Args(advantage=kind), given={"adv_eps"})
    train_grpo.check_args(train_grpo.Args(advantage="grpo", adv_eps=0.5), given={"advantage", "adv_eps"})
    train_grpo.check_args(train_grpo.Args(advantage=kind), given={"advantage"})


def test_a_resume_cannot_shorten_the_run(tiny_ckpts, tmp_path, capsys, one_thread):
    """
    --num_iterations 4 --stop_at 2, then --resume --num_iterations 3 ran iteration 3 of 3 at a learning rate of the
    shorter schedule (6.67e-5 instead of 1e-4) and ended there, silently. A larger value extends the run (README);
    a smaller one is refused, one line, and nothing of the run is touched.
    """
    out = tmp_path / "out"
    train_grpo.main(grpo_cmd(tiny_ckpts, out, "--num_iterations", "4", "--stop_at", "2", "--gold", "off")[1:])
    capsys.readouterr()
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    with pytest.raises(SystemExit) as e:
        utils.run(lambda: train_grpo.main(["--out_dir", str(out), "--resume", "--num_iterations", "3"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == "error: --resume: --num_iterations 3 is below the run's 4 (a larger value " \
                                        "extends the run; a smaller one cannot)\n", err
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_rows_are_the_rollouts_numbers_and_a_resumed_run_is_the_uninterrupted_one(tiny_ckpts, tmp_path, monkeypatch,
                                                                                  capsys, one_thread):
    """
    rloo (KL in the reward, so scores and rewards differ), 3 iterations, run whole and stopped after iteration 2
    then resumed: the same metrics rows (times aside), weights and optimizer state, and each row recomputed with
    Python loops from the rollout it logs (captured from make_experience) and the update's returned numbers: the
    means over the B episodes, equal_groups over the scores' groups, lr = lr * (1 - (iter - 1) / num_iterations)
    of the whole schedule (not of --stop_at). Responses of N = 6 tokens for B = 8 episodes.
    """
    real_exp, real_update, seen = train_grpo.make_experience, train_grpo.grpo_update, []
    real_pick, picked = train_grpo.next_prompt_indices, []

    def keep_prompts(*a, **kw):
        picked.append(real_pick(*a, **kw))
        return picked[-1]

    def keep_experience(*a, **kw):
        seen.append({"exp": real_exp(*a, **kw), "prompts": picked[-1][0]})
        return seen[-1]["exp"]

    def keep_update(actor, opt, exp, args, rt, lr, iteration=None):
        seen[-1]["upd"] = real_update(actor, opt, exp, args, rt, lr, iteration)
        return seen[-1]["upd"]

    monkeypatch.setattr(train_grpo, "make_experience", keep_experience)
    monkeypatch.setattr(train_grpo, "grpo_update", keep_update)
    monkeypatch.setattr(train_grpo, "next_prompt_indices", keep_prompts)
    # a judge that scores the random policy's responses apart (the task's gives them all 0): the rows' gold must be the
    # mean over all B rows, not over the --num_samples written
    monkeypatch.setattr(tasks, "gold", lambda prompt, response: (len(prompt) + len(response)) % 5 / 4)
    argv = grpo_cmd(tiny_ckpts, tmp_path / "whole", "--advantage", "rloo", "--num_iterations", "3", "--num_epochs",
                    "2", "--lr", "1e-3", "--dtype", "float32", "--response_length", "6")[1:]  # gold: the task's prompts
    capsys.readouterr()
    train_grpo.main(argv)
    printed = {"whole": capsys.readouterr().out.splitlines()}
    whole_seen, seen[:] = list(seen), []
    out = tmp_path / "resumed"
    train_grpo.main(argv[:argv.index("--out_dir") + 1] + [str(out)] + argv[argv.index("--out_dir") + 2:] +
                    ["--stop_at", "2"])
    printed["stopped"] = capsys.readouterr().out.splitlines()
    train_grpo.main(["--out_dir", str(out), "--resume"])
    printed["resumed"] = capsys.readouterr().out.splitlines()
    # the progress lines name the iteration of the whole schedule, the last line how the run ended
    for name, iters in (("whole", [1, 2, 3]), ("stopped", [1, 2]), ("resumed", [3])):
        assert [line.split(" |")[0] for line in printed[name] if line.startswith("iter ")] == \
            [f"iter {i}/3" for i in iters], printed[name]
    assert printed["stopped"][-1] == "stopped at iteration 2 (--stop_at); continue with --resume"
    for name, d in (("whole", tmp_path / "whole"), ("resumed", out)):
        assert re.fullmatch(rf"done: iteration 3; \d+m\d\ds; saved {re.escape(str(d))}/ckpt\.pt", printed[name][-1])
    whole, resumed = read_metrics(str(tmp_path / "whole")), read_metrics(str(out))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("t_")} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(whole)
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (tmp_path / "whole", out))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    a, b = (torch.load(d / "train_state.pt", weights_only=True) for d in (tmp_path / "whole", out))
    assert a["step"] == b["step"] == 3 and a["data"] == b["data"]
    for k, v in a["optimizer"]["state"].items():
        assert all(torch.equal(v[n], b["optimizer"]["state"][k][n]) for n in v)

    assert [r["iter"] for r in whole] == [1, 2, 3] and len(whole_seen) == 3 and len(seen) == 3
    tok, prompts = Tokenizer.byte_level(), D.read_prompts(str(tiny_ckpts / "prompts.jsonl"))
    for rows, runs in ((whole, whole_seen), (resumed, seen)):
        for row, run in zip(rows, runs):
            exp, upd, B = run["exp"], run["upd"], 8
            mask = exp["response_mask"].tolist()
            assert len(mask) == B and len(mask[0]) == 6  # B != N: a mean over the wrong axis would not pass
            n = [sum(m) for m in mask]
            kl = [sum(exp["logprobs"][b, t].item() - exp["ref_logprobs"][b, t].item() for t in range(len(mask[b]))
                      if mask[b][t]) for b in range(B)]
            scores = exp["scores"].tolist()
            groups = [scores[g * 4:g * 4 + 4] for g in range(B // 4)]
            entropy = [exp["entropy"][b, t].item() for b in range(B) for t in range(len(mask[b])) if mask[b][t]]
            want = {"score": sum(scores) / B, "rm_score": sum(exp["rm_scores"].tolist()) / B, "kl": sum(kl) / B,
                    "entropy": sum(entropy) / len(entropy),  # the mean over the real tokens, not the rows
                    # the judge's score of every row (not of the --num_samples written), row b a response to the
                    # prompt of its group b // 4
                    "gold": sum(tasks.gold(prompts[run["prompts"][b // 4]],
                                           decode_response(tok, exp["response"][b].tolist(), mask[b]))
                                for b in range(B)) / B,
                    "reward": sum(s - 0.3 * k for s, k in zip(scores, kl)) / B,
                    "equal_groups": sum(len(set(g)) == 1 for g in groups) / len(groups),
                    "adv_abs": sum(abs(x) for x in exp["advantages"].tolist()) / B, "response_length": sum(n) / B,
                    "eos_frac": sum(exp["has_eos"].tolist()) / B, "lr": 1e-3 * (1 - (row["iter"] - 1) / 3)}
            for k, v in want.items():
                assert row[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (row["iter"], k)
            assert {k: row[k] for k in upd} == pytest.approx(upd, rel=1e-5) and "kl_loss" not in row  # 6 digits
    assert any(r["kl"] != 0 for r in whole) and any(r["score"] != r["reward"] for r in whole)
    # the samples of iterations 1 and 2 (--sample_interval 2): the first --num_samples (4) rows, with their RM scores
    # (not the KL-shaped rewards of rloo)
    samples = [json.loads(line) for line in open(tmp_path / "whole" / "samples.jsonl")]
    assert [s["iter"] for s in samples] == [1] * 4 + [2] * 4
    for i, run in enumerate(whole_seen[:2]):
        got = [s["score"] for s in samples[4 * i:4 * i + 4]]
        assert got == pytest.approx(run["exp"]["scores"][:4].tolist(), rel=1e-6)


@pytest.mark.parametrize("flags, message", [
    ({"group_size": 1}, "--group_size 1: a group needs at least 2 responses (G >= 2)"),
    ({"batch_size": 10, "num_minibatches": 1}, "--batch_size 10 must be divisible by --group_size 4 (whole groups)"),
    ({"advantage": "ppo"}, "--advantage 'ppo': expected one of grpo, dr_grpo, rloo"),
    ({"kl_in": "both"}, "--kl_in 'both': expected auto, loss or reward"),
    ({"kl_coef": -0.1}, "--kl_coef must be >= 0"),
    ({"adv_eps": 0.0}, "--adv_eps must be > 0"),
    ({"num_epochs": 0}, "--num_iterations and --num_epochs must be >= 1"),
    ({"num_iterations": 0}, "--num_iterations and --num_epochs must be >= 1"),
])
def test_check_args_refuses_each_bad_value_in_one_message(flags, message):
    with pytest.raises(utils.UserError) as e:
        train_grpo.check_args(train_grpo.Args(**flags))
    assert str(e.value) == message


def test_check_args_passes_the_smallest_values_and_resolves_the_kl_from_kl_in():
    args = train_grpo.Args(group_size=2, batch_size=2, num_minibatches=1, kl_coef=0.0, adv_eps=1e-12, num_epochs=1,
                           num_iterations=1)
    train_grpo.check_args(args)
    assert (args.kl_in, args.kl_coef) == ("loss", 0.0)  # beta 0 given: kept, not the default 0.2
    # an explicit --kl_in picks the default beta of its placement, whatever the advantage
    for kind, where, beta in (("rloo", "loss", 0.2), ("grpo", "reward", 0.3), ("dr_grpo", "reward", 0.3)):
        args = train_grpo.Args(advantage=kind, kl_in=where)
        train_grpo.check_args(args)
        assert (args.kl_in, args.kl_coef) == (where, beta), kind


def test_a_reward_model_with_another_tokenizer_is_refused(tiny_ckpts, tmp_path):
    """The RM would score other tokens than the policy's: refused before anything is written."""
    ckpt = utils.load_checkpoint(str(tiny_ckpts / "rm"))
    ranks = ckpt["tokenizer"]["ranks"]
    other = {**ckpt, "tokenizer": {**ckpt["tokenizer"], "ranks": [ranks[1], ranks[0], *ranks[2:]]}}
    utils.save_checkpoint(str(tmp_path / "rm"), other)
    out = tmp_path / "out"
    with pytest.raises(utils.UserError, match=re.escape(f"{tiny_ckpts / 'sft'} and {tmp_path / 'rm'} use different "
                                                        f"tokenizers")):
        train_grpo.main(grpo_cmd(tiny_ckpts, out, "--rm", str(tmp_path / "rm"), "--num_iterations", "1")[1:])
    assert not out.exists()


def test_resume_refuses_a_changed_reward_model(tiny_ckpts, tmp_path, one_thread):
    """--rm is one of the inputs train_state.pt records: retrained after the run started, --resume is refused."""
    import shutil
    rm, out = tmp_path / "rm", tmp_path / "out"
    shutil.copytree(tiny_ckpts / "rm", rm)
    train_grpo.main(grpo_cmd(tiny_ckpts, out, "--rm", str(rm), "--num_iterations", "2", "--stop_at", "1",
                             "--gold", "off")[1:])
    _, _, reward_model = tiny_setup(5)
    utils.save_checkpoint(str(rm), utils.model_payload(reward_model, Tokenizer.byte_level(), "rm", {"seed": 0}, 1))
    with pytest.raises(utils.UserError, match=re.escape(f"--resume: --rm {rm} is not what the run started from")):
        train_grpo.main(["--out_dir", str(out), "--resume"])
