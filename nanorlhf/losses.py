"""
The losses and masked statistics that more than one stage uses.

    logprobs_from_logits   log pi(y_t | y_<t) of given tokens          (SFT, PPO rollout and update)
    masked_sum / _mean / _var   statistics over real tokens only        (every stage)
    sft_loss               masked next-token cross-entropy             (SFT, PPO-ptx)
    ranking_loss           Bradley-Terry loss on (chosen, rejected)    (the K = 2 case, for readers and tests)
    kwise_ranking_loss     InstructGPT's K-wise loss: C(K,2) pairs per prompt, averaged per prompt   (RM)
    reward_centering_loss  TRL's auxiliary term that keeps rewards centred at 0   (RM, optional)
    entropy_from_logits    H(pi(. | y_<t)) per position                (PPO logging and entropy bonus)
    kl_penalty             per-token KL(pi || pi_ref) estimates k1, k3 (PPO, GRPO, RLOO)
    clipped_surrogate      PPO's clipped objective per token           (PPO, GRPO, Dr. GRPO, RLOO)
    clip_fraction          the share of real tokens where the clip is used   (PPO, GRPO, Dr. GRPO, RLOO)

All the math runs in float32 (or float64 if given), whatever the dtype of the logits: a bf16 log-softmax
loses about 3 significant digits, which is as large as the logprob differences that PPO's ratio measures.
Masks are 1 (or True) on real entries and 0 on padding; masked entries never reach a result, even if
they hold inf or NaN, and an all-masked input gives 0, never NaN.
"""

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# logprobs and entropy


# The (B, T, V) logits are the largest tensor in the whole program (V = 50k for GPT-2). The float32 math below runs
# on chunks of whole rows holding at most this many logits (one row at least), so that its float32 copies and
# temporaries stay small at any vocabulary; at a small one (the built-in task's 258) a chunk is the whole batch,
# which saves a Python loop of a few ops per row, forward and backward (7-10% of the built-in SFT step).
CHUNK_LOGITS = 2 ** 22


def row_chunks(*tensors):
    """
    The same split of (B, T, ...) tensors along B into chunks of whole rows, each at most CHUNK_LOGITS logits of
    the first tensor (B, T, V). Example, B 64: T 64, V 258 -> one chunk of 64 rows; T 256, V 50257 -> 64 chunks of 1.
    """
    B, T, V = tensors[0].shape
    rows = max(1, CHUNK_LOGITS // max(1, T * V))
    return zip(*(t.split(rows) for t in tensors))


def logprobs_from_logits(logits, labels, temperature=1.0):
    """
    log softmax(logits / temperature) read at the label of each position.

    logits (B, T, V), labels (B, T) long -> (B, T) float32 (float64 if the logits are float64).
    logits[:, t] is paired with labels[:, t]: shifting (logits[:, t] predicts idx[:, t+1]) is the caller's
    job, see sft_loss. Example, V=2, one position with logits [0, 0]: label 1 -> log(1/2) = -0.6931.

    Memory: the work runs on row_chunks, so any float32 copy (for bf16 logits; GPT.forward already returns
    float32) and logsumexp's temporaries are one chunk's, and the full log-softmax is never materialised:
    log p(y) = z_y - logsumexp(z).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to define logprobs, got {temperature}")
    out = []
    for chunk, chunk_labels in row_chunks(logits, labels):
        z = chunk if chunk.dtype == torch.float64 else chunk.float()  # (b, T, V)
        if temperature != 1.0:
            z = z / temperature
        # log pi(y_t) = z_{t, y_t} - log sum_v exp(z_{t, v})
        z_y = z.gather(-1, chunk_labels.unsqueeze(-1)).squeeze(-1)  # (b, T)
        out.append(z_y - torch.logsumexp(z, dim=-1))  # (b, T)
    return torch.cat(out)  # (B, T)


def entropy_from_logits(logits, temperature=1.0):
    """
    Entropy of the next-token distribution at every position, in nats.

    logits (B, T, V) -> (B, T) float32. Example: uniform logits over V tokens give log(V).
    Same chunked float32 math as logprobs_from_logits; pass the sampling temperature so that the
    entropy is the one of the distribution that was sampled.
    """
    out = []
    for (chunk,) in row_chunks(logits):
        z = chunk if chunk.dtype == torch.float64 else chunk.float()  # (b, T, V)
        if temperature != 1.0:
            z = z / temperature
        # H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v
        p = F.softmax(z, dim=-1)  # (b, T, V)
        out.append(torch.logsumexp(z, dim=-1) - (p * z).sum(-1))  # (b, T)
    return torch.cat(out)  # (B, T)


# -----------------------------------------------------------------------------
# policy gradients: KL to the reference, the clipped surrogate (PPO, GRPO, RLOO)


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


def clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_coef):
    """
    PPO's clipped surrogate per token, as a loss to minimise, before any averaging (GRPO, Dr. GRPO and RLOO
    average it in different ways; train_ppo.policy_loss is its masked mean with statistics).

    logprobs (B, R) now (with grad), old_logprobs (B, R) from the rollout, advantages (B, R) or (B, 1) (one per
    sequence, broadcast over its tokens), mask (B, R). -> (losses (B, R), 0 on the pads; ratio (B, R), 1 on the pads)

        ratio_t = pi_theta(y_t) / pi_old(y_t)
        l_t     = -min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps) * A_t)

    Example: A = 1, ratio = 1.5, eps = 0.2 -> l = -1.2 and no gradient (the clip binds).
    """
    m = mask.bool()
    # ratio = exp(log pi_theta - log pi_old); pads get log ratio 0 and never reach exp with garbage
    logratio = torch.where(m, logprobs - old_logprobs, torch.zeros_like(logprobs))  # (B, R)
    ratio = torch.exp(logratio)  # (B, R)
    # l = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))
    losses = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef))
    return torch.where(m, losses, torch.zeros_like(losses)), ratio


def clip_fraction(ratio, advantages, mask, clip_coef):
    """
    The fraction of real tokens where clipped_surrogate uses the clipped term, i.e. where it is the larger loss:
    -A * clip(ratio, 1 - eps, 1 + eps) > -A * ratio. ratio (B, R) from clipped_surrogate, advantages (B, R) or
    (B, 1), mask (B, R) -> scalar tensor, the dtype of ratio. There the gradient is 0.
    Example: ratio [[1.5, 0.9, 1.5]], A [[1, 1, -1]], eps 0.2, mask all 1 -> 1/3 (only the first, where -1.2 > -1.5).
    """
    # clipped_t = [-A_t * clip(ratio_t, 1 - eps, 1 + eps) > -A_t * ratio_t]
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef) > -advantages * ratio  # (B, R)
    return masked_mean(clipped.to(ratio.dtype), mask)


# -----------------------------------------------------------------------------
# masked statistics


def masked_sum(x, mask, dim=None):
    """
    Sum of x over the entries where mask is nonzero; over everything (scalar) or along `dim`.
    Example: x = [[1, 2, 9]], mask = [[1, 1, 0]] -> 3.  Masked entries may hold inf/NaN safely.
    """
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x, mask, dim=None):
    """
    Mean of x over the entries where mask is nonzero: sum(x * m) / sum(m), and 0 where sum(m) == 0.
    Example: x = [[1, 2, 9], [5, 5, 5]], mask = [[1, 1, 0], [0, 0, 0]] -> 1.5; with dim=1 -> [1.5, 0.].
    """
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x, mask, unbiased=True):
    """
    Variance of x over the entries where mask is nonzero (a scalar).

    unbiased=True divides by n - 1 (Bessel's correction, as numpy's var(ddof=1), torch.var and TRL's
    masked_var); with n == 1 it falls back to dividing by n, so the result is 0 rather than NaN.
    Example: x = [[1, 3, 100]], mask = [[1, 1, 0]] -> 2.0 (unbiased), 1.0 (biased).
    """
    mean = masked_mean(x, mask)
    # Var[x] = sum_i m_i (x_i - mean)^2 / (n - 1)
    n = mask.sum().to(x.dtype)
    sq = masked_sum((x - mean) ** 2, mask)
    denom = torch.where(n > 1, n - 1, n.clamp(min=1)) if unbiased else n.clamp(min=1)
    return sq / denom


# -----------------------------------------------------------------------------
# stage 1: supervised fine-tuning


def sft_loss(logits, idx, response_mask, n_tokens=None):
    """
    Masked next-token cross-entropy over the response tokens (the seed's L_SFT), per target token.

    logits (B, T, V), idx (B, T) long, response_mask (B, T) -> scalar float32.

    The one masking convention of nanorlhf (prompt | response | pad). Position t's logits predict the
    token at t+1, so the targets are idx[:, 1:] and their mask is response_mask[:, 1:]:

        t                    0     1     2     3     4     5     6     7
        idx[:, t]            P0    P1    P2    R0    R1    EOS   pad   pad
        response_mask[:, t]  0     0     0     1     1     1     0     0
        logits[:, t] ->      P1    P2    R0    R1    EOS   pad   pad   (none)
        target mask          0     0     1     1     1     0     0     (dropped)
                                         ^ the last prompt token's logits predict the first response token

    So the loss covers R0, R1 and EOS (the model must learn to stop), never the prompt or the padding.
    (Left-padded rows work the same: their pads sit before the prompt, where the mask is 0 too.)

    loss = -sum_{targets} log p(target) / n_tokens. n_tokens defaults to the number of targets here.
    With gradient accumulation pass the number of targets of the whole accumulated batch, so that
    micro-batches of different lengths add up to exactly the loss of one big batch (a mean of
    per-micro-batch means would over-weight the tokens of short micro-batches). 0 if there are no targets.
    """
    # L_SFT = - sum_{t in response} log P(x_t | x_<t)
    logp = logprobs_from_logits(logits[:, :-1], idx[:, 1:])  # (B, T-1)
    target_mask = response_mask[:, 1:]  # (B, T-1)
    if n_tokens is None:
        n_tokens = target_mask.sum()
    n_tokens = torch.as_tensor(n_tokens, device=logp.device).clamp(min=1).to(logp.dtype)
    return -masked_sum(logp, target_mask) / n_tokens


# -----------------------------------------------------------------------------
# stage 2: reward model


def ranking_loss(r_chosen, r_rejected, margin=None):
    """
    Bradley-Terry loss for pairs: mean of -log sigmoid(r_chosen - r_rejected - margin).

    r_chosen, r_rejected (N,) scores; margin None, a float or (N,) (Llama 2's margin: the chosen response
    must win by at least `margin` before the loss stops pushing). -> scalar.
    Example: r_chosen = [1.], r_rejected = [0.] -> -log(sigmoid(1)) = 0.3133.
    F.logsigmoid is exact for any difference: -1e4 gives a loss of 1e4 with gradient -1, not inf/NaN as
    -log(sigmoid(d)) would.
    """
    d = r_chosen - r_rejected
    if margin is not None:
        d = d - margin
    # P(A > B) = sigma(r_A - r_B);  L_RM = -log sigma(r_A - r_B)
    return -F.logsigmoid(d).mean()


def _kwise_pairs(k_mask):
    """
    Which (rank a, rank b) pairs of each prompt are real: a < b < K_n, K_n = number of valid responses.
    k_mask (N, K) -> (N, K, K) bool.
    """
    K = k_mask.shape[1]
    n_valid = k_mask.sum(1)  # (N,)
    rank = torch.arange(K, device=k_mask.device)  # (K,)
    upper = rank[:, None] < rank[None, :]  # (K, K) a < b
    return upper[None] & (rank[None, None, :] < n_valid[:, None, None])  # (N, K, K)


def kwise_ranking_loss(scores, ranking, k_mask, margin=None):
    """
    InstructGPT's K-wise reward model loss.

    scores (N, K): the RM score of each of a prompt's K responses (each response goes through the model
    once). ranking (N, K) long: indices into the K responses, best first, as in prefs.jsonl; only its
    first K_n entries are read, where K_n = k_mask[n].sum(). k_mask (N, K) bool: which responses are real
    (prompts with fewer responses are padded at the end). -> scalar.

        loss = 1/N' sum_n 1/C(K_n, 2) sum_{a < b < K_n} -log sigmoid(s_na - s_nb - margin)

    with s_na = scores[n, ranking[n, a]], the score of prompt n's a-th best response.

    Averaging inside each prompt first keeps prompts with large K from dominating (InstructGPT eq. 1);
    N' counts the prompts that have at least one pair. K=2 with ranking [0, 1] is ranking_loss.
    Example: scores [[3., 1., 2.]], ranking [[0, 2, 1]] -> mean(-logsig(1), -logsig(2), -logsig(1)) = 0.2512.
    """
    s = scores.gather(1, ranking.clamp(min=0))  # (N, K) scores in rank order, best first
    pairs = _kwise_pairs(k_mask)  # (N, K, K)
    # d_ab = s_a - s_b for rank a better than rank b
    d = s[:, :, None] - s[:, None, :]  # (N, K, K)
    if margin is not None:
        d = d - margin
    # L = -log sigma(s_better - s_worse), averaged over a prompt's C(K,2) pairs, then over prompts
    per_prompt = masked_mean(-F.logsigmoid(d), pairs, dim=(1, 2))  # (N,)
    return masked_mean(per_prompt, pairs.any(2).any(1))


def reward_centering_loss(scores, k_mask=None):
    """
    Auxiliary term that keeps the RM's scores centred at 0 (Eisenstein et al. 2023, TRL's
    `center_rewards_coefficient`): mean over a prompt's pairs of (s_i + s_j)^2, then mean over prompts.

    scores (N, K), k_mask (N, K) bool or None (all valid) -> scalar; multiply by a coefficient (TRL uses
    0.01). For pairs pass torch.stack([r_chosen, r_rejected], 1): the result is TRL's mean((r_c + r_r)^2).
    The Bradley-Terry loss only sees differences, so without this term the scores can drift together.
    """
    if k_mask is None:
        k_mask = torch.ones_like(scores, dtype=torch.bool)
    # order does not matter for (s_i + s_j)^2, so valid responses are moved first and paired by position
    order = torch.argsort((~k_mask).to(torch.int8), dim=1, stable=True)  # (N, K)
    s = scores.gather(1, order)  # (N, K)
    pairs = _kwise_pairs(k_mask)  # (N, K, K)
    # L_center = (r_i + r_j)^2
    per_prompt = masked_mean((s[:, :, None] + s[:, None, :]) ** 2, pairs, dim=(1, 2))  # (N,)
    return masked_mean(per_prompt, pairs.any(2).any(1))
