"""
nanorlhf/losses.py against plain references: Python loops over float64 numbers, textbook formulas.
"""

import itertools
import math

import pytest
import torch

from nanorlhf import losses
from nanorlhf.losses import (
    clip_fraction,
    clipped_surrogate,
    entropy_from_logits,
    kwise_ranking_loss,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    ranking_loss,
    reward_centering_loss,
    sft_loss,
)


def ref_log_softmax(row):
    """log softmax of a list of floats, the textbook way in float64."""
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def ref_logsig_loss(d):
    """-log(1 / (1 + exp(-d))) in float64, literally."""
    return -math.log(1.0 / (1.0 + math.exp(-d)))


def sft_batch(seed, B=5, T=12, V=11):
    """Random logits and a batch laid out as prompt | response | pad, rows of different lengths."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    idx = torch.randint(0, V, (B, T), generator=g)
    response_mask = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        n_prompt = int(torch.randint(1, 5, (1,), generator=g))
        n_resp = int(torch.randint(1, T - n_prompt + 1, (1,), generator=g))
        response_mask[b, n_prompt : n_prompt + n_resp] = 1
    return logits, idx, response_mask


# -----------------------------------------------------------------------------
# logprobs, entropy


# chunks of 1 row, of 2 rows then 1, and the whole batch (the default at this size)
CHUNKS = [7 * 13 * 2 - 1, 7 * 13 * 2, losses.CHUNK_LOGITS]


def test_row_chunks_are_whole_rows_of_at_most_chunk_logits():
    """The docstring's examples (on expanded views, no memory), and as many whole rows as fit, one at least."""
    def rows(B, T, V):
        x = torch.zeros(1, 1, 1).expand(B, T, V)
        labels = torch.zeros(1, 1, dtype=torch.long).expand(B, T)
        chunks = list(losses.row_chunks(x, labels))
        assert all(a.shape[0] == b.shape[0] for a, b in chunks)
        return [a.shape[0] for a, _ in chunks]

    assert rows(64, 64, 258) == [64]
    assert rows(64, 256, 50257) == [1] * 64
    assert rows(5, 2 ** 11, 2 ** 10) == [2, 2, 1]  # exactly two rows of 2^21 logits fit in 2^22
    assert rows(3, 2 ** 11, 2 ** 11 + 1) == [1, 1, 1]  # one row is over 2^22 already: a chunk of one
    assert rows(3, 0, 7) == [3]  # no positions: one chunk of every row


@pytest.mark.parametrize("chunk_logits", CHUNKS)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_logprobs_from_logits_matches_loop(temperature, chunk_logits, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_LOGITS", chunk_logits)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 13, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, 13, (3, 7), generator=g)
    out = logprobs_from_logits(logits, labels, temperature)
    assert out.shape == (3, 7) and out.dtype == torch.float32
    out.sum().backward()
    for b in range(3):
        for t in range(7):
            row = [v / temperature for v in logits[b, t].double().tolist()]
            logp = ref_log_softmax(row)
            assert abs(out[b, t].item() - logp[labels[b, t]]) < 1e-5
            # d log p(y) / d z_v = (1[v = y] - p_v) / temperature
            y = int(labels[b, t])
            grad = [((v == y) - math.exp(lp)) / temperature for v, lp in enumerate(logp)]
            assert max(abs(a - e) for a, e in zip(logits.grad[b, t].tolist(), grad)) < 1e-5


def test_logprobs_from_logits_bf16_is_float32_math():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 5, 50, generator=g) * 4).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 5), generator=g)
    out = logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    for b in range(2):
        for t in range(5):
            # reference on the same (bf16-rounded) numbers, in float64
            ref = ref_log_softmax(logits[b, t].double().tolist())[labels[b, t]]
            assert abs(out[b, t].item() - ref) < 1e-5  # a bf16 log-softmax would be off by ~1e-2


def test_float64_logits_keep_float64_math():
    """
    float64 logits give float64 logprobs and entropies, exact to 1e-12 against the float64 loop; a float32 detour
    would lose the 1e-9 differences between these logits (and return float32).
    """
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 3, 1, generator=g, dtype=torch.float64) + 1e-9 * torch.randn(2, 3, 6, generator=g,
                                                                                      dtype=torch.float64)
    labels = torch.randint(0, 6, (2, 3), generator=g)
    for temperature in (1.0, 0.5):
        logp = logprobs_from_logits(logits, labels, temperature)
        ent = entropy_from_logits(logits, temperature)
        assert logp.dtype == ent.dtype == torch.float64
        for b in range(2):
            for t in range(3):
                ref = ref_log_softmax([v / temperature for v in logits[b, t].tolist()])
                assert abs(logp[b, t].item() - ref[labels[b, t]]) < 1e-12
                assert abs(ent[b, t].item() + sum(math.exp(lp) * lp for lp in ref)) < 1e-12
        # the logits differ by ~1e-9, which float32 loses: its log-probabilities are other numbers
        assert (logp - logprobs_from_logits(logits.float(), labels, temperature).double()).abs().max() > 1e-10


def test_logprobs_from_logits_rejects_zero_temperature():
    with pytest.raises(ValueError):
        logprobs_from_logits(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), 0.0)


@pytest.mark.parametrize("chunk_logits", [4 * 9 - 1, 4 * 9 * 2, losses.CHUNK_LOGITS])
def test_entropy_matches_loop(chunk_logits, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_LOGITS", chunk_logits)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 9, generator=g) * 2
    for temperature in (1.0, 0.5):
        out = entropy_from_logits(logits, temperature)
        for b in range(3):
            for t in range(4):
                logp = ref_log_softmax([v / temperature for v in logits[b, t].double().tolist()])
                ref = -sum(math.exp(lp) * lp for lp in logp)
                assert abs(out[b, t].item() - ref) < 1e-5
    # uniform logits: log V
    assert torch.allclose(entropy_from_logits(torch.zeros(1, 1, 9)), torch.tensor([[math.log(9)]]))


# -----------------------------------------------------------------------------
# masked statistics


def test_masked_stats_match_loop():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=g) < 0.6
    mask[0, 0] = True
    x[~mask] = float("nan")  # masked entries must never reach a result
    real = [x[b, t].item() for b in range(4) for t in range(6) if mask[b, t]]
    n = len(real)
    mean = sum(real) / n
    assert abs(masked_sum(x, mask).item() - sum(real)) < 1e-12
    assert abs(masked_mean(x, mask).item() - mean) < 1e-12
    assert abs(masked_var(x, mask).item() - sum((v - mean) ** 2 for v in real) / (n - 1)) < 1e-12
    assert abs(masked_var(x, mask, unbiased=False).item() - sum((v - mean) ** 2 for v in real) / n) < 1e-12
    row_means = masked_mean(x, mask, dim=1)
    for b in range(4):
        vals = [x[b, t].item() for t in range(6) if mask[b, t]]
        ref = sum(vals) / len(vals) if vals else 0.0
        assert abs(row_means[b].item() - ref) < 1e-12


def test_masked_stats_empty_is_zero():
    x = torch.full((2, 3), float("inf"))
    mask = torch.zeros(2, 3)
    for value in (masked_sum(x, mask), masked_mean(x, mask), masked_var(x, mask), masked_var(x, mask, unbiased=False)):
        assert value.item() == 0.0
    assert torch.equal(masked_mean(x, mask, dim=1), torch.zeros(2))
    assert masked_var(torch.tensor([[5.0, 1.0]]), torch.tensor([[1, 0]])).item() == 0.0  # n = 1: 0, not NaN


def test_masked_var_at_every_count_of_real_entries():
    """n = 1..5 real entries (NaN elsewhere): the plain sum of squares over n - 1 (unbiased, 0 at n = 1) and over n."""
    g = torch.Generator().manual_seed(12)
    for n in range(1, 6):
        x = torch.randn(2, 4, generator=g, dtype=torch.float64)
        mask = torch.zeros(2, 4, dtype=torch.long)
        mask.view(-1)[torch.randperm(8, generator=g)[:n]] = 1
        x[mask == 0] = float("nan")
        real = [v for v, m in zip(x.view(-1).tolist(), mask.view(-1).tolist()) if m]
        mean = sum(real) / n
        sq = sum((v - mean) ** 2 for v in real)
        assert abs(masked_var(x, mask).item() - (sq / (n - 1) if n > 1 else 0.0)) < 1e-12, n
        assert abs(masked_var(x, mask, unbiased=False).item() - sq / n) < 1e-12, n


# -----------------------------------------------------------------------------
# SFT loss


def ref_sft_loss(logits, idx, response_mask):
    """Loop over every response token; the logits one position earlier predict it."""
    total, count = 0.0, 0
    B, T, _ = logits.shape
    for b in range(B):
        for t in range(1, T):
            if response_mask[b, t]:
                total -= ref_log_softmax(logits[b, t - 1].double().tolist())[idx[b, t]]
                count += 1
    return total / count, count


def test_sft_loss_matches_loop():
    for seed in range(4):
        logits, idx, response_mask = sft_batch(seed)
        if seed == 3:  # rows without a prompt: their response starts at position 0, which no logits predict
            response_mask[:3] = 0
            response_mask[0, :5] = response_mask[1, :1] = response_mask[2, :12] = 1
        ref, _ = ref_sft_loss(logits, idx, response_mask)
        assert abs(sft_loss(logits, idx, response_mask).item() - ref) < 1e-5


def test_sft_loss_ignores_prompt_and_padding():
    logits, idx, response_mask = sft_batch(4)
    logits.requires_grad_(True)
    sft_loss(logits, idx, response_mask).backward()
    grad_norm = logits.grad.abs().sum(-1)  # (B, T)
    # the logits at t matter exactly when the token at t+1 is a response token
    predicts_response = torch.zeros_like(response_mask, dtype=torch.bool)
    predicts_response[:, :-1] = response_mask[:, 1:].bool()
    assert (grad_norm[~predicts_response] == 0).all()
    assert (grad_norm[predicts_response] > 0).all()
    # and the prompt and pad tokens themselves can be anything
    idx2 = idx.clone()
    idx2[response_mask == 0] = 0
    assert torch.equal(sft_loss(logits, idx2, response_mask), sft_loss(logits, idx, response_mask))


def test_sft_loss_gradient_accumulation_equals_big_batch():
    V = 7
    g = torch.Generator().manual_seed(5)
    # six rows of different lengths, each with its own leaf logits
    lengths = [4, 9, 6, 12, 3, 8]
    rows = []
    for L in lengths:
        n_prompt = int(torch.randint(1, L, (1,), generator=g))
        mask = torch.zeros(L, dtype=torch.long)
        mask[n_prompt:] = 1
        logits = torch.randn(L, V, generator=g, requires_grad=True)
        rows.append((logits, torch.randint(0, V, (L,), generator=g), mask))

    def batch(rs, T):
        """Right-pad rows to length T; pad logits are random garbage, pad targets are masked."""
        logits = torch.stack([torch.cat([lg, torch.randn(T - len(lg), V, generator=g)]) for lg, _, _ in rs])
        idx = torch.stack([torch.cat([i, torch.zeros(T - len(i), dtype=torch.long)]) for _, i, _ in rs])
        mask = torch.stack([torch.cat([m, torch.zeros(T - len(m), dtype=torch.long)]) for _, _, m in rs])
        return logits, idx, mask

    big_loss = sft_loss(*batch(rows, max(lengths)))
    big_grads = torch.autograd.grad(big_loss, [lg for lg, _, _ in rows])

    micro = [rows[:2], rows[2:5], rows[5:]]  # micro-batches with very different token counts
    n_tokens = sum(int(m[1:].sum()) for _, _, m in rows)
    acc_loss = 0.0
    for mb in micro:
        acc_loss = acc_loss + sft_loss(*batch(mb, max(len(lg) for lg, _, _ in mb)), n_tokens=n_tokens)
    acc_grads = torch.autograd.grad(acc_loss, [lg for lg, _, _ in rows])
    assert abs(acc_loss.item() - big_loss.item()) < 1e-5
    for a, b in zip(acc_grads, big_grads):
        assert torch.allclose(a, b, atol=1e-6)
    # a mean of per-micro-batch means is a different (wrong) number here
    mean_of_means = sum(sft_loss(*batch(mb, max(len(lg) for lg, _, _ in mb))) for mb in micro) / len(micro)
    assert abs(mean_of_means.item() - big_loss.item()) > 1e-3


def test_sft_loss_all_masked_is_zero_not_nan():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    idx = torch.zeros(2, 5, dtype=torch.long)
    loss = sft_loss(logits, idx, torch.zeros(2, 5, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    # a response that is only the first token has no target either (nothing predicts position 0)
    only_first = torch.zeros(2, 5, dtype=torch.long)
    only_first[:, 0] = 1
    assert sft_loss(logits, idx, only_first).item() == 0.0
    # sequences of one token: no targets at all (logits[:, :-1] is empty), 0 and no error
    one = torch.randn(3, 1, 7, requires_grad=True)
    loss = sft_loss(one, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(one.grad, torch.zeros_like(one))
    assert logprobs_from_logits(one[:, :0], torch.zeros(3, 0, dtype=torch.long)).shape == (3, 0)


# -----------------------------------------------------------------------------
# ranking losses


def test_ranking_loss_matches_float64_reference():
    g = torch.Generator().manual_seed(6)
    rc, rr = torch.randn(16, generator=g) * 4, torch.randn(16, generator=g) * 4
    ref = sum(ref_logsig_loss(a - b) for a, b in zip(rc.double().tolist(), rr.double().tolist())) / 16
    assert abs(ranking_loss(rc, rr).item() - ref) < 1e-5
    margin = torch.rand(16, generator=g)
    ref = sum(ref_logsig_loss(a - b - m) for a, b, m in zip(rc.tolist(), rr.tolist(), margin.tolist())) / 16
    assert abs(ranking_loss(rc, rr, margin).item() - ref) < 1e-5
    ref = sum(ref_logsig_loss(a - b - 0.5) for a, b in zip(rc.tolist(), rr.tolist())) / 16
    assert abs(ranking_loss(rc, rr, 0.5).item() - ref) < 1e-5


@pytest.mark.parametrize("d", [1e4, -1e4, 80.0, -80.0])
def test_ranking_loss_extreme_margins_finite_with_right_gradient(d):
    rc = torch.tensor([d, 0.0], requires_grad=True)
    rr = torch.tensor([0.0, 0.0], requires_grad=True)
    loss = ranking_loss(rc, rr)
    loss.backward()
    # -log sigmoid(d) = log(1 + exp(-d)): ~0 for d >> 0, ~ -d for d << 0
    ref_loss = ((-d if d < 0 else 0.0) + math.log(2)) / 2
    assert math.isfinite(loss.item()) and abs(loss.item() - ref_loss) < 1e-3
    # d/dr_c -log sigmoid(r_c - r_r) = -sigmoid(-(r_c - r_r)) = -1 / (1 + exp(d)), averaged over 2 pairs
    sig_neg_d = 0.0 if d > 700 else 1.0 / (1.0 + math.exp(d))
    assert torch.isfinite(rc.grad).all() and torch.isfinite(rr.grad).all()
    assert abs(rc.grad[0].item() - (-sig_neg_d / 2)) < 1e-7
    assert abs(rr.grad[0].item() - (sig_neg_d / 2)) < 1e-7
    assert abs(rc.grad[1].item() - (-0.5 / 2)) < 1e-7


def kwise_batch(seed, N=6, K=5):
    """Random scores; each prompt has K_n in 1..K valid responses (padded at the end), ranked at random."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(N, K, generator=g, dtype=torch.float64) * 2
    ranking = torch.full((N, K), -1, dtype=torch.long)
    k_mask = torch.zeros(N, K, dtype=torch.bool)
    counts = [K, 1, 2] + [int(torch.randint(2, K + 1, (1,), generator=g)) for _ in range(N - 3)]
    for n, k in enumerate(counts):
        k_mask[n, :k] = True
        ranking[n, :k] = torch.randperm(k, generator=g)
    return scores, ranking, k_mask, counts


def ref_kwise(scores, ranking, counts, margin=0.0):
    per_prompt = []
    for n, k in enumerate(counts):
        order = ranking[n, :k].tolist()
        terms = [
            ref_logsig_loss(scores[n, better].item() - scores[n, worse].item() - margin)
            for better, worse in itertools.combinations(order, 2)  # combinations keep best-first order
        ]
        if terms:
            per_prompt.append(sum(terms) / len(terms))
    return sum(per_prompt) / len(per_prompt)


def test_kwise_loss_is_mean_of_its_pairwise_terms():
    for seed in range(3):
        scores, ranking, k_mask, counts = kwise_batch(seed)
        assert abs(kwise_ranking_loss(scores, ranking, k_mask).item() - ref_kwise(scores, ranking, counts)) < 1e-10
        out = kwise_ranking_loss(scores, ranking, k_mask, margin=0.3).item()
        assert abs(out - ref_kwise(scores, ranking, counts, 0.3)) < 1e-10


def test_kwise_loss_gradient_matches_loop():
    scores, ranking, k_mask, counts = kwise_batch(7)
    s1 = scores.clone().requires_grad_(True)
    kwise_ranking_loss(s1, ranking, k_mask).backward()
    s2 = scores.clone().requires_grad_(True)
    per_prompt = []
    for n, k in enumerate(counts):
        pairs = list(itertools.combinations(ranking[n, :k].tolist(), 2))
        if pairs:
            terms = [-torch.nn.functional.logsigmoid(s2[n, a] - s2[n, b]) for a, b in pairs]
            per_prompt.append(sum(terms) / len(terms))
    (sum(per_prompt) / len(per_prompt)).backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-12)
    assert (s1.grad[~k_mask] == 0).all()


def test_kwise_with_k2_is_ranking_loss():
    g = torch.Generator().manual_seed(8)
    rc, rr = torch.randn(10, generator=g), torch.randn(10, generator=g)
    ranking = torch.tensor([[0, 1]] * 10)
    k_mask = torch.ones(10, 2, dtype=torch.bool)
    assert torch.allclose(kwise_ranking_loss(torch.stack([rc, rr], 1), ranking, k_mask), ranking_loss(rc, rr))
    # swapping the stored order of the responses and the ranking with it changes nothing
    swapped = kwise_ranking_loss(torch.stack([rr, rc], 1), torch.tensor([[1, 0]] * 10), k_mask)
    assert torch.allclose(swapped, ranking_loss(rc, rr))


def test_kwise_loss_no_pairs_is_zero():
    scores = torch.randn(3, 4, requires_grad=True)
    k_mask = torch.zeros(3, 4, dtype=torch.bool)
    k_mask[:, 0] = True  # one response per prompt: no pair anywhere
    loss = kwise_ranking_loss(scores, torch.zeros(3, 4, dtype=torch.long), k_mask)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(scores.grad, torch.zeros_like(scores))


def test_reward_centering_loss():
    scores, _, k_mask, counts = kwise_batch(9)
    per_prompt = []
    for n, k in enumerate(counts):
        terms = [(scores[n, i].item() + scores[n, j].item()) ** 2 for i, j in itertools.combinations(range(k), 2)]
        if terms:
            per_prompt.append(sum(terms) / len(terms))
    assert abs(reward_centering_loss(scores, k_mask).item() - sum(per_prompt) / len(per_prompt)) < 1e-10
    # pairs: TRL's mean((r_c + r_r)^2)
    rc, rr = torch.randn(7), torch.randn(7)
    assert torch.allclose(reward_centering_loss(torch.stack([rc, rr], 1)), ((rc + rr) ** 2).mean())
    # valid responses need not come first
    s = torch.tensor([[1.0, 99.0, 2.0]])
    assert torch.allclose(reward_centering_loss(s, torch.tensor([[True, False, True]])), torch.tensor(9.0))


@pytest.mark.parametrize("per_sequence", [False, True])
def test_clip_fraction_counts_the_tokens_where_the_clipped_term_is_used(per_sequence):
    """Against a loop over the real tokens: clipped where -A * clip(ratio) > -A * ratio (the larger loss)."""
    g = torch.Generator().manual_seed(0)
    B, R, eps = 6, 9, 0.2
    logprobs, old = torch.randn(B, R, generator=g) * 0.3, torch.randn(B, R, generator=g) * 0.3
    advantages = torch.randn(B, 1 if per_sequence else R, generator=g)
    mask = (torch.arange(R)[None, :] < torch.randint(0, R + 1, (B, 1), generator=g)).long()  # row 0.. may be empty
    _, ratio = clipped_surrogate(logprobs, old, advantages, mask, eps)
    got = clip_fraction(ratio, advantages, mask, eps)
    n = clipped = 0
    for b in range(B):
        for t in range(R):
            if mask[b, t]:
                r = math.exp(float(logprobs[b, t]) - float(old[b, t]))
                a = float(advantages[b, 0 if per_sequence else t])
                n += 1
                clipped += -a * min(max(r, 1 - eps), 1 + eps) > -a * r
    assert 0 < clipped < n  # both cases occur
    assert got.item() == pytest.approx(clipped / n, abs=1e-6)
    # the docstring's example, and no real tokens -> 0
    ratio = torch.tensor([[1.5, 0.9, 1.5]])
    assert clip_fraction(ratio, torch.tensor([[1.0, 1.0, -1.0]]), torch.ones(1, 3), eps).item() == pytest.approx(1 / 3)
    # in the dtype of ratio: float64 gives 1/3 to the last bit, which a float32 share does not
    got = clip_fraction(ratio.double(), torch.tensor([[1.0, 1.0, -1.0]], dtype=torch.float64), torch.ones(1, 3), eps)
    assert got.dtype == torch.float64 and got.item() == 1 / 3
    assert clip_fraction(ratio, torch.ones(1, 3), torch.zeros(1, 3), eps).item() == 0
