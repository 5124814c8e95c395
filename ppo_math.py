"""
The PPO math of train_ppo.py as importable top-level functions (seed section 3, Ziegler et al. 2019).

Every tensor here is response-only: (B, R), position 0 is the first sampled token, with a response mask
(B, R) that is 1 on the real response tokens (the EOS included) and 0 on the padding after the EOS:

    r                0     1     2     3     4
    response         y0    y1    EOS   pad   pad
    mask             1     1     1     0     0
    logprobs[:, r]   log pi(y_r | prompt, y_<r)   (the logits at the token before y_r, divided by the temperature)
    values[:, r]     V(s_r), s_r = prompt + y_<r, the state in which y_r is chosen
    rewards[:, r]    -beta * KL_r, plus the RM score at r = 2, the last real token; 0 on the pads
"""

import torch

from nanorlhf.losses import masked_mean, masked_var

# -----------------------------------------------------------------------------
# rewards


def kl_penalty(logprobs, ref_logprobs, estimator="k1"):
    """
    Per-token estimate of KL(pi || pi_ref) from one sample y_t ~ pi (Schulman, "Approximating KL
    divergence", 2020). logprobs, ref_logprobs (B, R) -> (B, R).

    k1 = log pi(y_t) - log pi_ref(y_t): unbiased, the seed's log(pi / pi_ref), what InstructGPT and
         Ziegler et al. put in the reward (the default). Single tokens can be negative.
    k3 = (r - 1) - log r with r = pi_ref(y_t) / pi(y_t): also unbiased, >= 0 for every token (since
         log r <= r - 1) and of lower variance, but its penalty grows like r (exponentially in the log
         ratio) where the reference finds the token far likelier than the policy does.
    Example: logprobs = log 0.5, ref_logprobs = log 0.25 -> k1 = 0.6931, k3 = (0.5 - 1) + 0.6931 = 0.1931.
    """
    if estimator == "k1":
        # k1 = log pi(y) - log pi_ref(y)
        return logprobs - ref_logprobs
    if estimator == "k3":
        # k3 = (r - 1) - log r,  r = pi_ref(y) / pi(y)
        log_r = ref_logprobs - logprobs
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}, expected 'k1' or 'k3'")


def last_real_index(mask):
    """Index of the last 1 in each row of mask (B, R) -> (B,) long; 0 for a row with no 1. [[1,1,0]] -> [1]."""
    R = mask.shape[1]
    return (mask.bool() * torch.arange(1, R + 1, device=mask.device)).argmax(1)


def compute_rewards(logprobs, ref_logprobs, scores, mask, beta, estimator="k1"):
    """
    The KL-shaped per-token reward of InstructGPT / Ziegler et al.

    logprobs, ref_logprobs (B, R) under the rollout policy and the reference; scores (B,) the RM scores;
    mask (B, R); beta the KL coefficient. -> rewards (B, R), kl (B, R), both 0 on the pads.

        r_t = -beta * KL_t                       for every real token
        r_T = -beta * KL_T + R_RM(x, y)          at T, the last real token (the EOS), whatever the row's length

    Summed over the response this is the seed's R_total = R_RM(x, y) - beta * log(pi(y|x) / pi_ref(y|x)).
    Example: KL = [[.1, .2, 0]], mask = [[1, 1, 0]], score 1, beta 0.5 -> rewards [[-.05, .9, 0]].
    """
    m = mask.to(logprobs.dtype)  # (B, R)
    kl = torch.where(mask.bool(), kl_penalty(logprobs, ref_logprobs, estimator), torch.zeros_like(m))  # (B, R)
    # r_t = -beta * KL_t
    rewards = -beta * kl  # (B, R)
    # r_T += R_RM(x, y) at the last real token T of each row (a row with no real token gets nothing)
    last = last_real_index(mask)  # (B,)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype) * m[rows, last]
    return rewards, kl


# -----------------------------------------------------------------------------
# advantages


def gae(rewards, values, mask, gamma, lam):
    """
    Generalized Advantage Estimation (Schulman et al. 2016), backwards over the response.

    rewards, values, mask (B, R) -> advantages (B, R), returns (B, R), both 0 on the pads.
    The episode ends at the last real token T: V(s_{T+1}) = 0. The mask must be 1 on one contiguous block
    per row: a prefix for response-only tensors (pads only after the EOS), or the response part of
    prompt | response | pad tensors, which gives the same numbers there.

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
        A_t     = delta_t + gamma * lam * A_{t+1}        ( = sum_k (gamma lam)^k delta_{t+k} )
        returns = A_t + V(s_t)                           (the critic's regression target)

    A loop over the R positions, each step vectorised over the batch (as in cleanrl's ppo.py).
    Example: gamma = lam = 1, one row, rewards [0, 1], values [.5, .5] -> advantages [.5, .5], returns [1, 1].
    """
    m = mask.to(values.dtype)  # (B, R)
    # the pads are past the end of the episode: no reward and V = 0 there, whatever the critic said
    rewards, values = rewards * m, values * m  # (B, R)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)  # (B, R) V(s_{t+1})
    # delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
    deltas = rewards + gamma * next_values - values  # (B, R) 0 on the pads
    advantages = torch.zeros_like(rewards)  # (B, R)
    last_gae = torch.zeros_like(rewards[:, 0])  # (B,) A_{t+1}
    for t in reversed(range(rewards.shape[1])):
        # A_t = delta_t + gamma * lambda * A_{t+1}   (stays 0 through the trailing pads)
        last_gae = deltas[:, t] + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * m  # 0 before the block too (the prompt, when the tensors include it)
    # returns_t = A_t + V(s_t)
    returns = advantages + values
    return advantages, returns


def masked_whiten(x, mask, shift_mean=True):
    """
    Normalise x to mean 0 and variance 1 over the real tokens only; pads are ignored and come back as 0.

    x, mask (B, R) -> (B, R). The variance is the unbiased one (divides by n - 1, as TRL and
    summarize_from_feedback_details; numpy's var(ddof=1)). shift_mean=False keeps the mean and only
    rescales (used for rewards, whose sign carries meaning; advantages use the default).
    Example: x = [[1, 3, 99]], mask = [[1, 1, 0]] -> mean 2, var 2 -> [[-0.7071, 0.7071, 0]].
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased=True)
    # x_hat = (x - mean) / sqrt(var + 1e-8)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# -----------------------------------------------------------------------------
# losses


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_coef):
    """
    PPO's clipped surrogate, as a loss to minimise (the seed's L^CLIP with the sign flipped).

    logprobs (B, R) under the current policy (with grad); old_logprobs (B, R) from the rollout; advantages
    (B, R) whitened; clip_coef = epsilon. -> loss (scalar), stats dict of detached scalars:
    clipfrac (fraction of real tokens where the clipped term is the one used), approx_kl (k3 estimate of
    KL(pi_old || pi), Schulman's low-variance estimator), ratio (mean ratio; 1 on the first minibatch).

    Where the clip binds on the bounding side (A > 0 and ratio > 1 + eps, or A < 0 and ratio < 1 - eps)
    the loss is a constant and the gradient is exactly 0: the update cannot push further in that direction.
    Example: A = 1, ratio = 1.5, eps = 0.2 -> loss = max(-1.5, -1.2) = -1.2, gradient 0.
    """
    m = mask.bool()
    # ratio = pi_theta(y_t) / pi_old(y_t) = exp(log pi_theta - log pi_old)   (pads set to ratio 1, never exp'd)
    logratio = torch.where(m, logprobs - old_logprobs, torch.zeros_like(logprobs))  # (B, R)
    ratio = torch.exp(logratio)  # (B, R)
    # L^CLIP = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) = max(-A * ratio, -A * clip(...))
    pg_losses = -advantages * ratio  # (B, R)
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)  # (B, R)
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg_losses_clipped > pg_losses).to(ratio.dtype), mask)
        # approx KL(pi_old || pi) = E[(ratio - 1) - log ratio]
        approx_kl = masked_mean((ratio - 1) - logratio, mask)
        stats = {"clipfrac": clipfrac, "approx_kl": approx_kl, "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values, old_values, returns, mask, clip_range_value):
    """
    Clipped value loss (as in OpenAI's baselines PPO2 and lm-human-preferences).

    values (B, R) of the critic now (with grad); old_values (B, R) from the rollout; returns (B, R) from gae;
    clip_range_value = c. -> loss (scalar), stats {"vf_clipfrac": fraction of real tokens where the clipped
    error is the larger one}.

        V_clip = clip(V, V_old - c, V_old + c)
        L_V    = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)

    Like the policy clip, it keeps the critic from moving far from its rollout values in one iteration.
    Example: V = 2, V_old = 0, R = 3, c = 0.2 -> max(1, 7.84) / 2 = 3.92.
    """
    # V_clip = V_old + clip(V - V_old, -c, c)
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    # L_V = 0.5 * max((V - R)^2, (V_clip - R)^2)
    vf_losses = (values - returns) ** 2  # (B, R)
    vf_losses_clipped = (values_clipped - returns) ** 2  # (B, R)
    loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((vf_losses_clipped > vf_losses).to(vf_losses.dtype), mask)
    return loss, {"vf_clipfrac": vf_clipfrac}


def explained_variance(values, returns, mask):
    """
    1 - Var[returns - values] / Var[returns] over the real tokens -> float (as in cleanrl's ppo.py).
    1 is a perfect critic, 0 is no better than a constant, < 0 is worse; NaN when the returns are constant.
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns.item() == 0:
        return float("nan")
    # EV = 1 - Var[R - V] / Var[R]
    return (1 - masked_var(returns - values, mask, unbiased=False) / var_returns).item()


# -----------------------------------------------------------------------------
# KL coefficient


class AdaptiveKLController:
    """
    Adaptive KL coefficient of Ziegler et al. 2019 (section 2.2), a proportional controller that steers
    the measured KL towards `target`:

        e_t      = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_t+1 = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    n_steps is the number of samples (responses) this iteration used, so `horizon` is counted in samples.
    Example: beta 0.1, target 6, horizon 10000; KL 12 over 256 samples -> e = 0.2, beta = 0.1 * 1.00512.
    """

    def __init__(self, init_beta, target, horizon):
        self.value = init_beta
        self.target = target
        self.horizon = horizon

    def update(self, current_kl, n_steps):
        # e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)
        proportional_error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        # beta_{t+1} = beta_t * (1 + e_t * n_steps / horizon)
        self.value *= 1 + proportional_error * n_steps / self.horizon


class FixedKLController:
    """A constant KL coefficient, with the same interface as AdaptiveKLController."""

    def __init__(self, init_beta):
        self.value = init_beta

    def update(self, current_kl, n_steps):
        pass
