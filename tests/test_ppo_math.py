"""
The PPO math against plain references: Python loops over float64 numbers, textbook formulas.
Tensors are response-only (B, R); each row has its own response length and pads after it.
"""

import math

import numpy as np
import pytest
import torch

from train_ppo import (
    AdaptiveKLController,
    compute_rewards,
    explained_variance,
    gae,
    kl_penalty,
    masked_whiten,
    policy_loss,
    sequence_kls,
    value_loss,
)


def random_batch(seed, B=6, R=9):
    """Random float64 inputs and a response mask whose rows have lengths 1..R (one full, one of length 1)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [R, 1] + [int(torch.randint(1, R + 1, (1,), generator=g)) for _ in range(B - 2)]
    mask = (torch.arange(R)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, R)
    rand = lambda: torch.randn(B, R, generator=g, dtype=torch.float64)  # noqa: E731
    return g, lengths, mask, rand


# -----------------------------------------------------------------------------
# rewards


def test_kl_penalty_estimators():
    g, lengths, mask, rand = random_batch(0)
    logprobs, ref_logprobs = -rand().abs(), -rand().abs()
    k1 = kl_penalty(logprobs, ref_logprobs, "k1")
    k3 = kl_penalty(logprobs, ref_logprobs, "k3")
    for b in range(logprobs.shape[0]):
        for t in range(logprobs.shape[1]):
            lp, lr = logprobs[b, t].item(), ref_logprobs[b, t].item()
            r = math.exp(lr - lp)
            assert abs(k1[b, t].item() - (lp - lr)) < 1e-12
            assert abs(k3[b, t].item() - ((r - 1) - math.log(r))) < 1e-12
    assert (k3 >= 0).all()
    assert (k1 < 0).any()  # k1 is negative on some tokens, k3 never
    assert torch.equal(kl_penalty(logprobs, logprobs, "k3"), torch.zeros_like(logprobs))
    with pytest.raises(ValueError):
        kl_penalty(logprobs, ref_logprobs, "k2")


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_compute_rewards_matches_loop(estimator):
    g, lengths, mask, rand = random_batch(1)
    logprobs, ref_logprobs = -rand().abs(), -rand().abs()
    scores = torch.randn(len(lengths), generator=g, dtype=torch.float64)
    beta = 0.07
    # garbage on the pads must not matter
    logprobs[mask == 0] = -123.0  # k3 = exp(123) = inf there
    rewards, kl = compute_rewards(logprobs, ref_logprobs, scores, mask, beta, estimator)
    for b, L in enumerate(lengths):
        for t in range(logprobs.shape[1]):
            lp, lr = logprobs[b, t].item(), ref_logprobs[b, t].item()
            k = (lp - lr) if estimator == "k1" else (math.exp(lr - lp) - 1) - (lr - lp)
            if t >= L:
                ref_kl, ref_r = 0.0, 0.0
            else:
                ref_kl, ref_r = k, -beta * k + (scores[b].item() if t == L - 1 else 0.0)
            assert abs(kl[b, t].item() - ref_kl) < 1e-12
            assert abs(rewards[b, t].item() - ref_r) < 1e-12


def test_score_lands_at_last_real_token():
    # zero KL isolates the score: it must sit at index L_b - 1 of each row, whatever L_b
    g, lengths, mask, rand = random_batch(2, B=8, R=11)
    logprobs = -rand().abs()
    scores = torch.arange(1, 9, dtype=torch.float64)
    rewards, _ = compute_rewards(logprobs, logprobs.clone(), scores, mask, beta=0.1)
    expected = torch.zeros_like(rewards)
    for b, L in enumerate(lengths):
        expected[b, L - 1] = scores[b]
    assert torch.equal(rewards, expected)
    assert len(set(lengths)) > 2


def test_a_row_without_real_tokens_gets_no_score():
    """
    compute_rewards on rows of which some have no real token at all: such a row gets neither the score nor any KL
    term (all 0), the other rows are the plain loop's. No rollout has such a row (EOS counts as real), but without
    the mask factor the score would land at index 0 of it.
    """
    g, lengths, mask, rand = random_batch(13)
    lengths[2] = lengths[4] = 0
    mask[2], mask[4] = 0, 0
    logprobs, ref_logprobs = -rand().abs(), -rand().abs()
    scores = torch.randn(len(lengths), generator=g, dtype=torch.float64) + 3  # far from 0
    rewards, kl = compute_rewards(logprobs, ref_logprobs, scores, mask, 0.1)
    for b, L in enumerate(lengths):
        for t in range(logprobs.shape[1]):
            k = logprobs[b, t].item() - ref_logprobs[b, t].item() if t < L else 0.0
            want = -0.1 * k + (scores[b].item() if t == L - 1 else 0.0)
            assert abs(rewards[b, t].item() - want) < 1e-12 and abs(kl[b, t].item() - k) < 1e-12, (b, t)
    assert (rewards[2] == 0).all() and (rewards[4] == 0).all()


# -----------------------------------------------------------------------------
# GAE and whitening


def ref_gae(rewards, values, lengths, gamma, lam):
    """A_t = sum_{k >= 0} (gamma lam)^k delta_{t+k} over the real tokens; V after the last real token = 0.
    Only the first L entries of each row are read."""
    B, R = rewards.shape
    adv, ret = [[0.0] * R for _ in range(B)], [[0.0] * R for _ in range(B)]
    for b in range(B):
        L = lengths[b]
        v = [values[b, t].item() for t in range(L)] + [0.0]
        delta = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(L)]
        for t in range(L):
            adv[b][t] = sum((gamma * lam) ** k * delta[t + k] for k in range(L - t))
            ret[b][t] = adv[b][t] + v[t]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 0.0), (1.0, 1.0)])
def test_gae_matches_double_loop(gamma, lam):
    g, lengths, mask, rand = random_batch(3)
    rewards, values = rand(), rand()  # garbage on the pads: gae must never read it
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = ref_gae(rewards, values, lengths, gamma, lam)
    assert torch.allclose(adv, ref_adv, atol=1e-12)
    assert torch.allclose(ret, ref_ret, atol=1e-12)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    g, lengths, mask, rand = random_batch(4)
    rewards, values = rand() * mask, rand()
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    for b, L in enumerate(lengths):
        for t in range(L):
            reward_to_go = sum(rewards[b, k].item() for k in range(t, L))
            assert abs(adv[b, t].item() - (reward_to_go - values[b, t].item())) < 1e-12
            assert abs(ret[b, t].item() - reward_to_go) < 1e-12
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_ignores_pads():
    g, lengths, mask, rand = random_batch(5)
    rewards, values = rand() * mask, rand()
    values2 = torch.where(mask.bool(), values, rand() * 100)
    rewards2 = torch.where(mask.bool(), rewards, rand() * 100)
    for a, b in zip(gae(rewards, values, mask, 0.99, 0.95), gae(rewards2, values2, mask, 0.99, 0.95)):
        assert torch.equal(a, b)
    assert (gae(rewards2, values2, mask, 0.99, 0.95)[0][mask == 0] == 0).all()


def test_gae_on_full_sequences_equals_response_only():
    # prompt | response | pad tensors with the response mask give the response-only numbers
    g, lengths, mask, rand = random_batch(11)
    rewards, values = rand() * mask, rand()
    B, R = mask.shape
    P = 4
    offsets = torch.randint(0, P + 1, (B,), generator=g)
    full_rewards = torch.randn(B, P + R, generator=g, dtype=torch.float64)
    full_values = torch.randn(B, P + R, generator=g, dtype=torch.float64)
    full_mask = torch.zeros(B, P + R, dtype=torch.long)
    for b in range(B):
        o = int(offsets[b])
        full_rewards[b, o : o + R], full_values[b, o : o + R] = rewards[b], values[b]
        full_mask[b, o : o + R] = mask[b]
    adv, ret = gae(rewards, values, mask, 0.99, 0.95)
    full_adv, full_ret = gae(full_rewards, full_values, full_mask, 0.99, 0.95)
    for b in range(B):
        o = int(offsets[b])
        assert torch.allclose(full_adv[b, o : o + R], adv[b], atol=1e-12)
        assert torch.allclose(full_ret[b, o : o + R], ret[b], atol=1e-12)
    assert (full_adv[full_mask == 0] == 0).all() and (full_ret[full_mask == 0] == 0).all()


def test_masked_whiten_ignores_padding_and_matches_numpy():
    g, lengths, mask, rand = random_batch(6)
    x = rand() * 3 + 1
    out = masked_whiten(x, mask)
    x2 = torch.where(mask.bool(), x, rand() * 1000)
    assert torch.equal(masked_whiten(x2, mask), out)
    assert (out[mask == 0] == 0).all()
    real = np.array([x[b, t].item() for b, L in enumerate(lengths) for t in range(L)])
    ref = (real - real.mean()) / np.sqrt(real.var(ddof=1) + 1e-8)
    got = np.array([out[b, t].item() for b, L in enumerate(lengths) for t in range(L)])
    assert np.allclose(got, ref, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_masked_whiten_of_a_few_real_values_uses_the_unbiased_variance(n):
    """
    A rollout with only a few real tokens: n - 1 in the variance from n = 2 on (numpy's ddof=1), 0 at n = 1 (the
    docstring's examples are n = 2). A Bessel correction that started at n = 3 passed the test above.
    """
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 4, generator=g, dtype=torch.float64)
    mask = torch.zeros(2, 4)
    mask.view(-1)[torch.randperm(8, generator=g)[:n]] = 1
    real = x[mask.bool()].numpy()
    ref = (real - real.mean()) / np.sqrt((real.var(ddof=1) if n > 1 else 0.0) + 1e-8)
    out = masked_whiten(x, mask)
    assert np.allclose(out[mask.bool()].numpy(), ref, atol=1e-12) and (out[mask == 0] == 0).all()


# -----------------------------------------------------------------------------
# losses


def test_policy_loss_matches_loop_and_gradient_vanishes_on_the_bounding_side():
    eps = 0.2
    g, lengths, mask, rand = random_batch(7, B=8, R=12)
    old_logprobs = -rand().abs() - 0.5
    logprobs = (old_logprobs + 0.4 * rand()).requires_grad_(True)  # ratios spread over about [0.4, 2.5]
    advantages = rand()
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, eps)
    loss.backward()

    terms, clipped, kls, ratios = [], [], [], []
    grad_zero = torch.zeros_like(mask, dtype=torch.bool)
    for b, L in enumerate(lengths):
        for t in range(L):
            ratio = math.exp(logprobs[b, t].item() - old_logprobs[b, t].item())
            A = advantages[b, t].item()
            clip_ratio = min(max(ratio, 1 - eps), 1 + eps)
            terms.append(-min(ratio * A, clip_ratio * A))
            clipped.append(clip_ratio * A < ratio * A)
            kls.append((ratio - 1) - math.log(ratio))
            ratios.append(ratio)
            grad_zero[b, t] = (A > 0 and ratio > 1 + eps) or (A < 0 and ratio < 1 - eps)
    n = len(terms)
    assert abs(loss.item() - sum(terms) / n) < 1e-12
    assert abs(stats["clipfrac"].item() - sum(clipped) / n) < 1e-12
    assert abs(stats["approx_kl"].item() - sum(kls) / n) < 1e-12
    assert abs(stats["ratio"].item() - sum(ratios) / n) < 1e-12

    real = mask.bool()
    assert (logprobs.grad[grad_zero] == 0).all()
    assert (logprobs.grad[real & ~grad_zero] != 0).all()
    assert (logprobs.grad[~real] == 0).all()
    # the test saw both kinds of clipped tokens and unclipped ones
    A_pos = advantages > 0
    assert (grad_zero & A_pos).any() and (grad_zero & ~A_pos).any() and (real & ~grad_zero).sum() > 10
    # the other side of the clip (A > 0 and ratio < 1 - eps, say) still gets a gradient
    ratio = torch.exp(logprobs.detach() - old_logprobs)
    other_side = real & ((A_pos & (ratio < 1 - eps)) | (~A_pos & (ratio > 1 + eps)))
    assert other_side.any() and (logprobs.grad[other_side] != 0).all()


def test_policy_loss_at_ratio_one_is_the_policy_gradient():
    """
    On the first minibatch the new log-probs are a fresh computation equal to the rollout's (not the same tensor):
    ratio 1, nothing clipped, approx_kl 0, and the gradient is the plain policy gradient d loss / d log pi_t =
    -A_t / n on every real token (0 on the pads), which the clipped surrogate must not change there.
    """
    g, lengths, mask, rand = random_batch(8)
    logits = rand()
    old_logprobs = torch.log_softmax(logits, 0)  # as the rollout computed them
    new_logits = logits.clone().requires_grad_(True)
    logprobs = torch.log_softmax(new_logits, 0)  # the update's own forward pass, with grad
    logprobs.retain_grad()
    advantages = rand()
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, 0.2)
    loss.backward()
    assert stats["ratio"].item() == 1.0 and stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0
    n = sum(lengths)
    for b, L in enumerate(lengths):
        for t in range(logprobs.shape[1]):
            want = -advantages[b, t].item() / n if t < L else 0.0
            assert abs(logprobs.grad[b, t].item() - want) < 1e-12, (b, t)
    assert abs(loss.item() - sum(-advantages[b, t].item() for b, L in enumerate(lengths) for t in range(L)) / n) < 1e-12


def test_value_loss_matches_loop():
    c = 0.2
    g, lengths, mask, rand = random_batch(9, B=8, R=12)
    old_values, returns = rand(), rand()
    values = old_values + 0.5 * rand()
    values[mask == 0] = float("nan")  # pads never reach the result
    loss, stats = value_loss(values, old_values, returns, mask, c)
    terms, clipped = [], []
    for b, L in enumerate(lengths):
        for t in range(L):
            v, vo, R_ = values[b, t].item(), old_values[b, t].item(), returns[b, t].item()
            v_clip = min(max(v, vo - c), vo + c)
            terms.append(0.5 * max((v - R_) ** 2, (v_clip - R_) ** 2))
            clipped.append((v_clip - R_) ** 2 > (v - R_) ** 2)
    assert abs(loss.item() - sum(terms) / len(terms)) < 1e-12
    assert abs(stats["vf_clipfrac"].item() - sum(clipped) / len(clipped)) < 1e-12
    assert 0 < stats["vf_clipfrac"].item() < 1


def test_explained_variance():
    g, lengths, mask, rand = random_batch(10)
    returns, values = rand(), rand()
    r = np.array([returns[b, t].item() for b, L in enumerate(lengths) for t in range(L)])
    v = np.array([values[b, t].item() for b, L in enumerate(lengths) for t in range(L)])
    assert abs(explained_variance(values, returns, mask) - (1 - np.var(r - v) / np.var(r))) < 1e-12
    assert abs(explained_variance(returns, returns, mask) - 1.0) < 1e-12
    assert math.isnan(explained_variance(values, torch.ones_like(returns), mask))


# -----------------------------------------------------------------------------
# KL coefficient


def test_adaptive_kl_controller_matches_hand_iteration():
    init_beta, target, horizon, n_steps = 0.2, 6.0, 10000, 512
    ctl = AdaptiveKLController(init_beta, target, horizon)
    beta = init_beta
    for kl in [0.0, 3.0, 6.0, 6.6, 7.0, 12.0, 100.0, 5.5, torch.tensor(9.0)]:
        ctl.update(kl, n_steps)
        error = float(kl) / target - 1
        error = -0.2 if error < -0.2 else (0.2 if error > 0.2 else error)
        beta = beta * (1 + error * n_steps / horizon)
        assert abs(ctl.value - beta) < 1e-15
    # KL above target raises beta, below lowers it, at target keeps it
    for kl, sign in [(12.0, 1), (1.0, -1), (6.0, 0)]:
        ctl = AdaptiveKLController(init_beta, target, horizon)
        ctl.update(kl, n_steps)
        assert np.sign(round(ctl.value - init_beta, 12)) == sign


def test_sequence_kls_match_loop():
    """Both estimators summed over each response's real tokens, then averaged over the batch (item 5 of #10)."""
    g, lengths, mask, rand = random_batch(12)
    logprobs, ref_logprobs = -rand().abs(), -rand().abs()
    logprobs[mask == 0] = 50.0  # garbage on the pads must not count
    got = sequence_kls(logprobs, ref_logprobs, mask)
    k1 = k3 = 0.0
    for b, L in enumerate(lengths):
        for t in range(L):
            lp, lr = logprobs[b, t].item(), ref_logprobs[b, t].item()
            k1 += lp - lr
            k3 += (math.exp(lr - lp) - 1) - (lr - lp)
    assert got["kl"] == pytest.approx(k1 / len(lengths), abs=1e-12)
    assert got["kl_k3"] == pytest.approx(k3 / len(lengths), abs=1e-12)
    assert abs(got["kl"] - got["kl_k3"]) > 1e-3
