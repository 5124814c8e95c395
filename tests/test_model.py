"""
nanorlhf/model.py against plain references: a float64 GPT-2 forward written with loops and textbook formulas
(on Hugging Face's weight layout), naive generation that recomputes the whole prefix, rows run alone.
"""

import dataclasses
import json
import math
import platform
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from nanorlhf.hf import load_safetensors
from nanorlhf.model import (GPT, GPTConfig, ScalarGPT, ValueHeadGPT, attention_mask_4d, last_index, sample_categorical,
                            sample_next_token)

CONFIG = GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=4, n_embd=32)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def make_gpt(config=CONFIG, seed=0, dtype=torch.float64, noise=0.0):
    """A GPT in eval mode; noise > 0 adds N(0, noise) to every parameter so biases and LayerNorms matter."""
    torch.manual_seed(seed)
    model = GPT(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    return model


def left_pad(rows, pad_id=0):
    """Lists of ids -> idx (B, T) left-padded with pad_id, attention_mask (B, T)."""
    T = max(len(r) for r in rows)
    idx = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return idx, mask


def to_hf(state_dict):
    """Our state dict -> Hugging Face GPT-2 layout: Conv1D weights transposed, no lm_head (tied)."""
    return {k: (v.t() if k.endswith(CONV1D) else v) for k, v in state_dict.items() if k != "lm_head.weight"}


# -----------------------------------------------------------------------------
# the plain reference


def ref_layer_norm(x, w, b, eps=1e-5):
    # (x - mean) / sqrt(var + eps) * w + b, biased variance
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def ref_gelu(x, activation="gelu_new"):
    if activation == "gelu_new":  # GPT-2's tanh approximation
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))  # the exact GELU, x Phi(x)


def ref_attention(q, k, v, allowed):
    """One head, loops over queries: q, k, v (T, hs); allowed[i] = list of keys query i sees."""
    out = torch.zeros_like(q)
    for i in range(q.size(0)):
        js = allowed[i]
        scores = torch.stack([q[i] @ k[j] for j in js]) / math.sqrt(q.size(1))
        w = torch.exp(scores - scores.max())
        w = w / w.sum()
        out[i] = sum(w[n] * v[j] for n, j in enumerate(js))
    return out


def ref_trunk(sd, n_head, ids, activation="gelu_new"):
    """Float64 GPT-2 trunk for one unpadded sequence from an HF-layout state dict: ids list -> (T, C)."""
    p = {k.removeprefix("transformer."): v.double() for k, v in sd.items()}
    T = len(ids)
    x = p["wte.weight"][ids] + p["wpe.weight"][:T]
    C = x.size(1)
    hs = C // n_head
    n_layer = len({k.split(".")[1] for k in p if k.startswith("h.")})
    for l in range(n_layer):
        w = lambda name: p[f"h.{l}.{name}"]  # noqa: E731
        a = ref_layer_norm(x, w("ln_1.weight"), w("ln_1.bias"))
        qkv = a @ w("attn.c_attn.weight") + w("attn.c_attn.bias")  # Conv1D: x @ W + b
        q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
        y = torch.zeros(T, C, dtype=torch.float64)
        for h in range(n_head):
            s = slice(h * hs, (h + 1) * hs)
            y[:, s] = ref_attention(q[:, s], k[:, s], v[:, s], [list(range(i + 1)) for i in range(T)])
        x = x + y @ w("attn.c_proj.weight") + w("attn.c_proj.bias")
        m = ref_layer_norm(x, w("ln_2.weight"), w("ln_2.bias"))
        h = ref_gelu(m @ w("mlp.c_fc.weight") + w("mlp.c_fc.bias"), activation)
        x = x + h @ w("mlp.c_proj.weight") + w("mlp.c_proj.bias")
    return ref_layer_norm(x, p["ln_f.weight"], p["ln_f.bias"])


def ref_logits(sd, n_head, ids, activation="gelu_new"):
    """(T, V) logits of the tied LM head."""
    wte = sd["wte.weight" if "wte.weight" in sd else "transformer.wte.weight"].double()
    return ref_trunk(sd, n_head, ids, activation) @ wte.t()


# -----------------------------------------------------------------------------
# attention and forward


def test_init_is_gpt2_s():
    # N(0, 0.02) for the embeddings and Linears (lm_head tied to wte), N(0, 0.02 / sqrt(2 L)) for the residual
    # projections c_proj, zero biases, LayerNorms (1, 0); empirical stds within 3% (each has >= 65k entries: the
    # standard error of a std is 1 / sqrt(2 n) < 0.3% of it)
    L = 8
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=258, n_layer=L, n_head=4, n_embd=256))
    assert model.lm_head.weight is model.transformer.wte.weight
    n_proj = 0
    for name, p in model.named_parameters():
        w = p.detach().double()
        if name.endswith("c_proj.weight"):
            n_proj += 1
            assert w.std().item() == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.03), name
        elif name.endswith(("wte.weight", "wpe.weight", "c_attn.weight", "c_fc.weight")):
            assert w.std().item() == pytest.approx(0.02, rel=0.03), name
            assert abs(w.mean().item()) < 4 * 0.02 / math.sqrt(w.numel()), name
        elif re.search(r"(ln_\d|ln_f)\.weight$", name):
            assert torch.equal(w, torch.ones_like(w)), name
        elif name.endswith(".bias"):
            assert torch.equal(w, torch.zeros_like(w)), name
        else:
            raise AssertionError(f"unexpected parameter {name}")
    assert n_proj == 2 * L


def test_attention_mask_4d_example():
    m = attention_mask_4d(torch.tensor([[0, 1, 1]]))[0, 0].long()
    assert m.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_attention_matches_plain_softmax(padded):
    torch.manual_seed(0)
    model = make_gpt()
    attn = model.transformer.h[0].attn
    B, T, C, nh = 3, 7, CONFIG.n_embd, CONFIG.n_head
    hs = C // nh
    x = torch.randn(B, T, C, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.long)
    if padded:
        mask[0, :3] = 0
        mask[1, :1] = 0
    y = attn(x, attention_mask_4d(mask) if padded else None)
    qkv = x @ attn.c_attn.weight.t() + attn.c_attn.bias
    q, k, v = qkv.split(C, dim=2)
    for b in range(B):
        # each query sees the real keys at or before it, and always itself
        allowed = [[j for j in range(i + 1) if mask[b, j] or j == i] for i in range(T)]
        heads = [ref_attention(q[b, :, h * hs:(h + 1) * hs], k[b, :, h * hs:(h + 1) * hs], v[b, :, h * hs:(h + 1) * hs],
                               allowed) for h in range(nh)]
        ref = torch.cat(heads, dim=1) @ attn.c_proj.weight.t() + attn.c_proj.bias
        assert torch.allclose(y[b], ref, atol=1e-10)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_forward_matches_float64_reference(activation):
    model = make_gpt(dataclasses.replace(CONFIG, activation=activation), noise=0.05)
    sd = to_hf(model.state_dict())
    torch.manual_seed(1)
    idx = torch.randint(0, CONFIG.vocab_size, (2, 9))
    with torch.no_grad():
        logits = model(idx)
    assert logits.shape == (2, 9, CONFIG.vocab_size) and logits.dtype == torch.float64
    for b in range(2):
        assert torch.allclose(logits[b], ref_logits(sd, CONFIG.n_head, idx[b].tolist(), activation), atol=1e-10)
        # the two GELUs differ by up to 5e-4 (at |x| = 2.7): the other one's reference is far off
        other = "gelu" if activation == "gelu_new" else "gelu_new"
        assert not torch.allclose(logits[b], ref_logits(sd, CONFIG.n_head, idx[b].tolist(), other), atol=1e-6)


def test_eval_forward_of_a_dropout_model_is_the_reference():
    """A model built with dropout gives in eval mode the float64 reference's logits: no dropout anywhere, the
    attention's included (padded or not)."""
    model = make_gpt(dataclasses.replace(CONFIG, dropout=0.5), noise=0.05)
    sd = to_hf(model.state_dict())
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    idx, mask = left_pad(rows, pad_id=3)
    with torch.no_grad():
        plain, padded = model(idx[:1]), model(idx, mask)
    assert torch.allclose(plain[0], ref_logits(sd, CONFIG.n_head, rows[0]), atol=1e-10)
    for b, r in enumerate(rows):
        assert torch.allclose(padded[b, -len(r):], ref_logits(sd, CONFIG.n_head, r), atol=1e-10)


def test_left_padded_rows_match_rows_alone():
    model = make_gpt(noise=0.05)
    sd = to_hf(model.state_dict())
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    idx, mask = left_pad(rows, pad_id=3)
    with torch.no_grad():
        logits = model(idx, attention_mask=mask)  # float64
    assert torch.isfinite(logits).all()
    for b, r in enumerate(rows):
        real = logits[b, -len(r):]
        assert torch.allclose(real, ref_logits(sd, CONFIG.n_head, r), atol=1e-10)
        alone = model.lm_head(model.trunk(torch.tensor([r])))[0]
        assert torch.allclose(real, alone, atol=1e-10)


@pytest.mark.parametrize("shared", [False, True])
def test_logits_to_keep_are_the_last_positions(shared):
    # PPO asks for the response's logits only: the same numbers as the full forward's last K, gradients included
    torch.manual_seed(0)
    model = make_gpt(noise=0.05)
    sd = to_hf(model.state_dict())
    if shared:
        model = ValueHeadGPT.from_gpt(model)
        with torch.no_grad():
            model.value_head.weight.normal_()
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    idx, mask = left_pad(rows, pad_id=3)
    w = torch.randn(3, 4, CONFIG.vocab_size, dtype=torch.float64)  # a loss that reads every kept logit

    def run(keep):
        model.zero_grad()
        out = model(idx, mask, values=True, logits_to_keep=keep) if shared else model(idx, mask, logits_to_keep=keep)
        logits, values = out if shared else (out, None)
        assert logits.shape == (3, keep or idx.size(1), CONFIG.vocab_size)  # no logits for the other positions
        logits, values = logits[:, -4:], values[:, -4:] if shared else None
        ((logits * w).sum() + (values.sum() if shared else 0)).backward()
        return logits.detach(), values, [p.grad.clone() for p in model.parameters()]

    full, kept = run(0), run(4)
    assert torch.allclose(full[0], kept[0], atol=1e-12)
    for b, r in enumerate(rows):  # and the float64 reference of each row alone, at its real positions
        n = min(4, len(r))
        assert torch.allclose(kept[0][b, -n:], ref_logits(sd, CONFIG.n_head, r)[-n:], atol=1e-10)
    if shared:
        assert model(idx, mask, values=True, logits_to_keep=4)[1].shape == (3, 4)
        assert torch.allclose(full[1], kept[1], atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(full[2], kept[2]))


@pytest.mark.parametrize("cls", [GPT, ValueHeadGPT])
def test_logits_to_keep_every_k_is_the_last_k_of_the_full_forward(cls):
    """Every K from 1 to T + 1 (0: all): exactly min(K, T) positions, those at the end of the full forward's."""
    model = cls(CONFIG).double().eval()
    idx, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12]], pad_id=3)
    T = idx.size(1)
    with torch.no_grad():
        full = model(idx, mask)
        for K in range(0, T + 2):
            got = model(idx, mask, logits_to_keep=K)
            n = T if K == 0 else min(K, T)
            assert got.shape == (2, n, CONFIG.vocab_size), K
            assert torch.allclose(got, full[:, T - n:], rtol=0, atol=1e-12), K


def test_right_padding_and_explicit_position_ids():
    model = make_gpt(noise=0.05)
    idx = torch.tensor([[5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    with torch.no_grad():
        a = model.lm_head(model.trunk(idx, mask))[0, :3]
        b = model.lm_head(model.trunk(idx[:, :3]))[0]
        # explicit positions win over the mask's: 3, 4, 5 is the reference with wpe rows 3-5 moved to 0-2
        c = model(idx, attention_mask=mask, position_ids=torch.tensor([[3, 4, 5, 6, 7]]))[0, :3]
    assert torch.allclose(a, b, atol=1e-12)
    sd = to_hf(model.state_dict())
    sd["transformer.wpe.weight"] = torch.cat([sd["transformer.wpe.weight"][3:6], sd["transformer.wpe.weight"][3:]])
    assert torch.allclose(c, ref_logits(sd, CONFIG.n_head, [5, 6, 7]), atol=1e-10)
    assert not torch.allclose(c, b, atol=1e-3)


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_packed_shared_prefix_matches_sequences_alone(grad_checkpointing):
    """
    Groups of sequences with a common prefix, packed one row per group (data.pack_shared_prefix): the logits of
    every token, and the gradient of a loss over them, equal those of each sequence run alone, unpadded.
    """
    from nanorlhf.data import pack_shared_prefix
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(1, 50, (n,), generator=g).tolist()  # noqa: E731
    groups = []
    for K, L in [(2, 5), (4, 3), (3, 0), (2, 1)]:
        prefix = rand(L)
        groups.append([prefix + rand(int(torch.randint(1, 7, (1,), generator=g))) for _ in range(K)])
    groups[1][2] = groups[1][0][:4] + rand(2)  # a longer common part inside one group
    seqs = [s for grp in groups for s in grp]
    weights = [torch.randn(len(s), 50, generator=g, dtype=torch.float64) for s in seqs]

    model = make_gpt(noise=0.05)
    model.grad_checkpointing = grad_checkpointing
    model.train()  # no dropout in CONFIG; train() so that checkpointing is used
    p = pack_shared_prefix(groups, pad_id=0)
    logits = model(p["packed_idx"], p["packed_mask"], p["packed_pos"]).flatten(0, 1)[p["unpack"]]  # (N, T_u, V)
    loss = sum((logits[n, :len(s)] * w).sum() for n, (s, w) in enumerate(zip(seqs, weights)))
    loss.backward()
    packed_grads = {n: q.grad.clone() for n, q in model.named_parameters()}

    model.zero_grad()
    loss_alone = 0
    for n, (s, w) in enumerate(zip(seqs, weights)):
        alone = model(torch.tensor([s]))[0]  # (T, V)
        assert torch.allclose(logits[n, :len(s)], alone, atol=1e-10), n
        loss_alone = loss_alone + (alone * w).sum()
    loss_alone.backward()
    for n, q in model.named_parameters():
        assert torch.allclose(packed_grads[n], q.grad, atol=1e-9), n
    # the packed rows hold fewer tokens than the sequences: each group's prefix ran once instead of K times
    assert int(p["packed_real"].sum()) == sum(map(len, seqs)) - (5 + 3 * 3 + 0 + 1)


def test_grad_checkpointing_same_loss_and_grads():
    config = GPTConfig(block_size=32, vocab_size=50, n_layer=3, n_head=4, n_embd=32, dropout=0.1)
    idx, mask = left_pad([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13]])
    results = []
    for ckpt in (False, True):
        model = make_gpt(config, dtype=torch.float32).train()
        model.grad_checkpointing = ckpt
        torch.manual_seed(123)  # same dropout masks in both runs
        logits = model(idx, mask)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 50), idx[:, 1:].reshape(-1))
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, abs=1e-6)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6), n
    # and checkpointing was really used: the flag changes how many activations autograd keeps
    model = make_gpt(config, dtype=torch.float32).train()
    counts = []
    for ckpt in (False, True):
        model.grad_checkpointing = ckpt
        n = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: n.__setitem__(0, n[0] + 1) or t, lambda t: t):
            model(idx, mask)
        counts.append(n[0])
    assert counts[1] < counts[0]


def test_num_params_and_flops():
    c = CONFIG
    C, L, V = c.n_embd, c.n_layer, c.vocab_size
    block = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C)
    n = V * C + c.block_size * C + L * block + 2 * C
    model = GPT(c)
    assert model.num_params() == n
    assert model.num_params(non_embedding=True) == n - c.block_size * C
    assert model.flops_per_token(16) == 6 * (n - c.block_size * C) + 12 * L * c.n_head * (C // c.n_head) * 16
    assert ScalarGPT(c).num_params() == n + C + 1
    # a ScalarGPT's token embeddings are lookups only (no lm_head): left out of its non-embedding count
    assert ScalarGPT(c).num_params(non_embedding=True) == n + C + 1 - c.block_size * C - V * C


def test_resize_vocab():
    model = make_gpt(noise=0.05)
    idx = torch.tensor([[1, 2, 3, 4]])
    before = model(idx)
    old = model.transformer.wte.weight.detach().clone()
    model.resize_vocab(53)
    after = model(idx)
    assert after.shape == (1, 4, 53) and model.config.vocab_size == 53
    assert torch.allclose(after[..., :50], before, atol=1e-12)
    assert torch.allclose(model.transformer.wte.weight[50:], old.mean(0).expand(3, -1))
    assert model.transformer.wte.weight is model.lm_head.weight
    model(torch.tensor([[52, 51, 50]]))  # the new ids embed


# -----------------------------------------------------------------------------
# generation


def test_generate_cache_equals_naive_greedy():
    model = make_gpt(noise=0.05)
    idx, mask = left_pad([[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]])
    a, la = model.generate(idx, 12, temperature=0.0, attention_mask=mask, return_logprobs=True)
    b, lb = model.generate(idx, 12, temperature=0.0, attention_mask=mask, return_logprobs=True, use_cache=False)
    assert a.shape == (3, 5 + 12) and torch.equal(a, b)
    assert torch.allclose(la, lb, atol=1e-10)
    assert torch.equal(a[:, :5], idx)
    # greedy: each new token is the argmax of the full forward on the generated sequence
    full_mask = torch.cat([mask, torch.ones(3, 12, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model.lm_head(model.trunk(a, full_mask))
    assert torch.equal(logits[:, 4:-1].argmax(-1), a[:, 5:])


@pytest.mark.parametrize("top_k,top_p", [(None, None), (10, None), (None, 0.8), (20, 0.9)])
def test_generate_cache_equals_naive_sampling(top_k, top_p):
    model = make_gpt(noise=0.3)  # larger weights: peakier distributions, so filtering matters
    idx, mask = left_pad([[5, 6, 7, 8, 9], [11, 12], [13, 14, 15], [1]])
    kw = dict(temperature=0.7, top_k=top_k, top_p=top_p, attention_mask=mask, return_logprobs=True)
    a, la = model.generate(idx, 15, generator=torch.Generator().manual_seed(7), **kw)
    b, lb = model.generate(idx, 15, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert torch.equal(a, b) and torch.allclose(la, lb, atol=1e-10)
    c, _ = model.generate(idx, 15, generator=torch.Generator().manual_seed(8), **kw)
    assert not torch.equal(a, c)  # the generator seeds the sampling
    # the logprobs are log softmax(logits / temperature) of the full forward at the sampled tokens
    full_mask = torch.cat([mask, torch.ones(4, 15, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model.lm_head(model.trunk(a, full_mask))[:, 4:-1] / 0.7
    ref = F.log_softmax(logits, -1).gather(-1, a[:, 5:, None]).squeeze(-1)
    assert torch.allclose(la, ref, atol=1e-10)


def test_generate_sampling_respects_top_k_and_top_p():
    model = make_gpt(noise=0.3)
    idx, mask = left_pad([[5, 6, 7], [8, 9, 10]])
    with torch.no_grad():
        probs = F.softmax(model.lm_head(model.trunk(idx, mask))[:, -1], -1)  # (B, V)
    top3 = [set(probs[b].topk(3).indices.tolist()) for b in range(2)]
    # the nucleus for p = 0.5: most likely tokens until their mass reaches 0.5
    nucleus = []
    for b in range(2):
        order, mass, keep = probs[b].argsort(descending=True).tolist(), 0.0, set()
        for j in order:
            keep.add(j)
            mass += probs[b, j].item()
            if mass >= 0.5:
                break
        nucleus.append(keep)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        out = model.generate(idx, 1, top_k=3, attention_mask=mask, generator=g)
        assert all(out[b, -1].item() in top3[b] for b in range(2))
        out = model.generate(idx, 1, top_p=0.5, attention_mask=mask, generator=g)
        assert all(out[b, -1].item() in nucleus[b] for b in range(2))


def test_sample_filters_by_hand():
    # probabilities 0.4, 0.3, 0.2, 0.1 in 1000 identical rows
    logits = torch.log(torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)).expand(1000, 4)
    g = torch.Generator().manual_seed(0)
    for kw, allowed in ((dict(), {0, 1, 2, 3}), (dict(top_k=2), {1, 3}), (dict(top_p=0.6), {1, 3}),
                        (dict(top_p=0.75), {1, 3, 2}), (dict(top_p=0.3), {1}), (dict(top_k=3, top_p=0.6), {1, 3})):
        tok, logp = sample_next_token(logits, 1.0, generator=g, **kw)
        assert set(tok.tolist()) == allowed, kw
        # the logprob is of the unfiltered distribution
        assert torch.allclose(logp, torch.log(torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64))[tok])
    tok, logp = sample_next_token(logits, 0.5, generator=g)
    assert torch.allclose(logp, F.log_softmax(logits / 0.5, -1).gather(-1, tok[:, None]).squeeze(-1))
    tok, logp = sample_next_token(logits[:2], 0.0)
    assert tok.tolist() == [1, 1] and torch.allclose(logp, torch.log(torch.tensor([0.4, 0.4], dtype=torch.float64)))


def test_top_p_that_a_prefix_reaches_exactly_stops_there():
    # 8 equally likely tokens (probabilities 1/8, their sums exact in float64): a top_p equal to the mass of k of
    # them keeps k tokens ("reaches top_p"), as a plain loop over the tokens keeps them
    V, n = 8, 4000
    logits = torch.zeros(n, V, dtype=torch.float64)
    for top_p in (0.25, 0.5, 0.625, 0.7, 1.0):
        k, before = 0, 0.0
        while k < V and not (k > 0 and before >= top_p):
            k, before = k + 1, before + 1 / V
        tok, _ = sample_next_token(logits, 1.0, top_p=top_p, generator=torch.Generator().manual_seed(0))
        assert len(set(tok.tolist())) == k, top_p
    # top_p = 0: the most likely token always stays, so it is the argmax
    logits = torch.randn(50, V, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tok, _ = sample_next_token(logits, 1.0, top_p=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tok, logits.argmax(-1))


def test_top_p_applies_to_the_tempered_distribution():
    # probabilities 0.1, 0.4, 0.2, 0.3 at temperature 0.5 become softmax(logits / 0.5), proportional to p^2:
    # 0.033, 0.533, 0.133, 0.3, whose 0.75-nucleus is {1, 3} (untempered it would be {1, 3, 2})
    p0 = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
    T, top_p, n = 0.5, 0.75, 4000
    logits = torch.log(p0).expand(n, 4)
    tempered = F.softmax(torch.log(p0) / T, -1).tolist()
    order, before, nucleus = sorted(range(4), key=lambda i: -tempered[i]), 0.0, []
    for i in order:  # keep a token unless the more likely ones already reach top_p
        if before >= top_p and nucleus:
            break
        nucleus.append(i)
        before += tempered[i]
    assert set(nucleus) == {1, 3}
    tok, logp = sample_next_token(logits, T, top_p=top_p, generator=torch.Generator().manual_seed(0))
    assert set(tok.tolist()) == set(nucleus)
    # frequencies: the tempered probabilities renormalised over the nucleus, within 4 binomial standard errors
    mass = sum(tempered[i] for i in nucleus)
    for i in nucleus:
        q = tempered[i] / mass
        assert abs((tok == i).sum().item() / n - q) < 4 * math.sqrt(q * (1 - q) / n), i
    assert torch.allclose(logp, torch.log(torch.tensor(tempered, dtype=torch.float64))[tok])


def test_sample_categorical_matches_probabilities():
    # frequencies of 200k draws against the probabilities, zeros included, with a binomial bound of 5 sigma
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.125, 1e-3, 0.124, 0.0]], dtype=torch.float32)
    probs = probs / probs.sum(-1, keepdim=True)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(8, dtype=torch.float64)
    for _ in range(50):
        tok = sample_categorical(probs.expand(4000, 8), g)  # (4000,)
        counts += torch.bincount(tok, minlength=8).double()
    total = counts.sum()
    p = probs[0].double()
    assert total == 200_000
    assert counts[p == 0].sum() == 0  # a zero-probability token is never drawn
    sigma = (total * p * (1 - p)).sqrt()
    assert ((counts - total * p).abs() <= 5 * sigma + 1e-9).all(), (counts / total, p)


def test_sample_categorical_is_the_inverse_cdf():
    # the same uniforms through a plain float64 loop over the cumulative sum pick the same tokens
    probs = torch.softmax(3 * torch.randn(64, 50, generator=torch.Generator().manual_seed(1)), -1)  # (64, 50)
    tok = sample_categorical(probs, torch.Generator().manual_seed(7))
    u = 1 - torch.rand(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for b in range(64):
        row = probs[b].double().tolist()
        target, cum = u[b, 0].item() * sum(row), 0.0
        for i, p in enumerate(row):
            cum += p
            if cum >= target:
                break
        assert tok[b].item() == i


def test_sample_categorical_of_unnormalised_weights_is_the_inverse_cdf():
    # weights that do not sum to 1 (from 0.05 to 20 per row): u is uniform on (0, row total], as a plain loop draws it
    g = torch.Generator().manual_seed(2)
    weights = torch.rand(64, 30, generator=g, dtype=torch.float64) * torch.logspace(-1.3, 1.3, 64)[:, None]
    weights[:, 5] = 0.0
    tok = sample_categorical(weights, torch.Generator().manual_seed(7))
    u = 1 - torch.rand(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for b in range(64):
        row = weights[b].tolist()
        target, cum = u[b, 0].item() * sum(row), 0.0
        for i, p in enumerate(row):
            cum += p
            if cum >= target:
                break
        assert tok[b].item() == i and i != 5


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = make_gpt(noise=0.3)
    idx, mask = left_pad([[5, 6, 7, 8, 9], [11, 12]])
    greedy = model.generate(idx, 10, temperature=0.0, attention_mask=mask)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(idx, 10, temperature=1.0, top_k=1, attention_mask=mask, generator=g), greedy)
    assert torch.equal(model.generate(idx, 10, temperature=1.0, top_p=1e-6, attention_mask=mask, generator=g), greedy)


def test_generate_padded_batch_equals_rows_alone():
    model = make_gpt(noise=0.1)
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    idx, mask = left_pad(rows, pad_id=2)
    out, lp = model.generate(idx, 10, temperature=0.0, attention_mask=mask, return_logprobs=True)
    for b, r in enumerate(rows):
        o, l = model.generate(torch.tensor([r]), 10, temperature=0.0, return_logprobs=True)
        assert torch.equal(out[b, -10:], o[0, -10:])
        assert torch.allclose(lp[b], l[0], atol=1e-10)


def test_generate_eos_rows_emit_pad_after():
    model = make_gpt(noise=0.1)
    idx, mask = left_pad([[5, 6, 7, 8], [20, 21], [30, 31, 32, 33, 34, 35]], pad_id=1)
    N = 12
    raw, raw_lp = model.generate(idx, N, temperature=0.0, attention_mask=mask, return_logprobs=True)
    new = raw[:, -N:]
    eos, pad = int(new[0, 2]), 49
    out, lp = model.generate(idx, N, temperature=0.0, attention_mask=mask, eos_id=eos, pad_id=pad,
                             return_logprobs=True)
    # expected, row by row: the raw tokens up to and including the first eos, then pad (logprob 0)
    stops = [(new[b] == eos).nonzero()[0].item() + 1 if (new[b] == eos).any() else N for b in range(3)]
    n = max(stops)
    assert out.shape == (3, idx.size(1) + n)
    for b in range(3):
        got = out[b, idx.size(1):]
        assert torch.equal(got[:stops[b]], new[b, :stops[b]])
        assert (got[stops[b]:] == pad).all()
        assert torch.allclose(lp[b, :stops[b]], raw_lp[b, :stops[b]], atol=1e-10)
        assert (lp[b, stops[b]:] == 0).all()
    assert stops[0] <= 3


def test_generate_pads_with_eos_when_no_pad_id_is_given():
    """pad_id None: after its EOS a row repeats the EOS; the tokens before it are the plain greedy ones."""
    model = make_gpt(noise=0.1)
    rows = [[5, 6, 7, 8], [20, 21], [30, 31, 32]]
    idx, mask = left_pad(rows, pad_id=1)
    N = 10

    def greedy(row, eos):  # one row alone, the whole prefix recomputed at each step
        out = []
        while len(out) < N and (not out or out[-1] != eos):
            with torch.no_grad():
                out.append(int(model(torch.tensor([row + out]))[0, -1].argmax()))
        return out

    eos = greedy(rows[0], None)[1]
    want = [greedy(r, eos) for r in rows]
    out = model.generate(idx, N, temperature=0.0, attention_mask=mask, eos_id=eos)
    n = max(map(len, want))
    assert out.shape == (3, idx.size(1) + n)
    for b, w in enumerate(want):
        assert out[b, idx.size(1):].tolist() == w + [eos] * (n - len(w)), b


def test_generate_stops_early_when_all_rows_finish():
    model = make_gpt(noise=0.1)
    # a model whose final hidden state is constant always predicts the same token: make it the eos
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.randn(CONFIG.n_embd, dtype=torch.float64))
    idx, mask = left_pad([[5, 6, 7], [8]])
    eos = int(model.generate(idx, 1, temperature=0.0, attention_mask=mask)[0, -1])
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_k=1)):
        for use_cache in (True, False):
            out, lp = model.generate(idx, 20, attention_mask=mask, eos_id=eos, pad_id=0, return_logprobs=True,
                                     use_cache=use_cache, **kw)
            assert out.shape == (2, 4) and (out[:, -1] == eos).all() and lp.shape == (2, 1)


def test_generate_checks_inputs():
    model = make_gpt()
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(torch.tensor([[1, 2, 0]]), 3, attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="block_size"):
        model.generate(torch.ones(1, 30, dtype=torch.long), 4)
    out = model.generate(torch.ones(1, 30, dtype=torch.long), 3)  # 30 + 3 - 1 positions: fits
    assert out.shape == (1, 33)


def test_generate_under_cpu_bf16_autocast(monkeypatch):
    # Under CPU bf16 autocast the KV cache holds float32 keys and values (the attention stays float32 there), the
    # cached and the recomputing loop sample the same tokens from the same generator, and the logprobs generate
    # returns are the log-softmax of one plain forward pass over the finished sequences at the sampled tokens.
    import nanorlhf.model as M

    model = make_gpt(dtype=torch.float32, noise=0.1)
    idx, mask = left_pad([[5, 6, 7, 8], [9, 10]])
    cached, real_update = [], M.KVCache.update

    def spy_update(self, kv, start):
        k, v = real_update(self, kv, start)
        cached.append((k.dtype, v.dtype))
        return k, v

    monkeypatch.setattr(M.KVCache, "update", spy_update)
    N, T0 = 6, idx.size(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lp = model.generate(idx, N, attention_mask=mask, return_logprobs=True,
                                 generator=torch.Generator().manual_seed(0))
        out_nc, lp_nc = model.generate(idx, N, attention_mask=mask, return_logprobs=True, use_cache=False,
                                       generator=torch.Generator().manual_seed(0))
        full_mask = torch.cat([mask, torch.ones(2, N, dtype=mask.dtype)], dim=1)  # (B, T0 + N): no EOS, all real
        logits = model(out, full_mask)  # (B, T0 + N, V)
    assert out.shape == (2, T0 + N) and logits.dtype == torch.float32
    assert cached and set(cached) == {(torch.float32, torch.float32)}
    assert torch.equal(out, out_nc) and (lp - lp_nc).abs().max() < 1e-5
    # logits[:, t] predict out[:, t + 1]: the N sampled tokens are predicted by positions T0 - 1 .. T0 + N - 2
    want = torch.log_softmax(logits[:, T0 - 1:-1].double(), -1).gather(-1, out[:, T0:, None]).squeeze(-1)  # (B, N)
    assert (lp.double() - want).abs().max() < 1e-4


def test_heads_run_in_float32_under_bf16_autocast():
    # The logits that logprobs, the KL and PPO's ratio come from must not be bf16-rounded: under autocast the
    # trunk runs in bf16, but the lm_head (and the scalar head) must equal a float64 matmul of the same hidden
    # states to float32 accuracy. A bf16 head misses by about 2^-8 of a logit: ~0.03 here.
    model = make_gpt(dtype=torch.float32, noise=0.1)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # logits of a trained model's scale (|z| up to ~8), not ~2
    critic = ScalarGPT.from_gpt(model)
    torch.nn.init.normal_(critic.head.weight, std=2.0)
    torch.nn.init.normal_(critic.head.bias, std=2.0)
    idx, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [9, 10, 3]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.trunk(idx, mask)  # (B, T, C), what the heads see
        logits = model(idx, mask)  # (B, T, V)
        values = critic(idx, mask)  # (B, T)
    assert logits.dtype == torch.float32 and values.dtype == torch.float32
    ref = h.double() @ model.lm_head.weight.double().t()  # (B, T, V)
    ref_values = h.double() @ critic.head.weight.double()[0] + critic.head.bias.double()  # (B, T)
    assert ref.abs().max() > 5  # the scale at which bf16 rounding shows
    assert (logits.double() - ref).abs().max() < 1e-4
    assert (values.double() - ref_values).abs().max() < 1e-4
    # the log-probabilities PPO trains on, from these logits, against log-softmax in float64
    labels = torch.randint(0, CONFIG.vocab_size, idx.shape)
    from nanorlhf.losses import logprobs_from_logits

    want = torch.log_softmax(ref, -1).gather(-1, labels[..., None]).squeeze(-1)  # (B, T)
    assert (logprobs_from_logits(logits, labels).double() - want).abs().max() < 1e-4


@pytest.mark.parametrize("out", [1, 7])
def test_float32_head_of_a_bf16_head_keeps_its_bias(out):
    # a head held in bf16 (a bf16 model's scalar head, or an lm_head): weight and bias are upcast, the output is
    # h W^T + b at float32 accuracy, the bias included
    from nanorlhf.model import float32_head
    g = torch.Generator().manual_seed(out)
    head = torch.nn.Linear(16, out).to(torch.bfloat16)
    with torch.no_grad():
        head.weight.copy_(torch.randn(out, 16, generator=g))
        head.bias.copy_(2 * torch.randn(out, generator=g))
    h = torch.randn(3, 5, 16, generator=g)  # float32 hidden states
    got = float32_head(head, h)
    assert got.dtype == torch.float32 and got.shape == (3, 5, out)
    ref = torch.zeros(3, 5, out, dtype=torch.float64)
    W, bias = head.weight.double(), head.bias.double()
    for o in range(out):
        ref[..., o] = (h.double() * W[o]).sum(-1) + bias[o]
    assert (got.double() - ref).abs().max() < 1e-4


def test_a_bf16_model_runs_on_the_cpu():
    # Weights held in bf16 (no autocast): the CPU attention runs in float32 and hands c_proj bf16 again, so the
    # forward, the heads and generate() work and agree with the same weights in float64 to bf16 accuracy.
    model = make_gpt(dtype=torch.float32, noise=0.1).to(torch.bfloat16)
    critic = ScalarGPT.from_gpt(model)
    torch.nn.init.normal_(critic.head.weight, std=2.0)
    torch.nn.init.normal_(critic.head.bias, std=2.0)
    ref_model = make_gpt(dtype=torch.float64)
    ref_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    ref_critic = ScalarGPT.from_gpt(ref_model)
    ref_critic.load_state_dict({k: v.double() for k, v in critic.state_dict().items()})
    idx, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [9, 10, 3]])
    logits, values = model(idx, mask), critic(idx, mask)
    assert logits.dtype == torch.float32 and values.dtype == torch.float32
    real = mask.bool()
    ref = ref_model(idx, mask)[real]  # (n_real, V)
    assert (logits.double()[real] - ref).abs().max() < 0.05 * ref.abs().max()
    ref_values = ref_critic(idx, mask)[real]
    assert (values.double()[real] - ref_values).abs().max() < 0.05 * ref_values.abs().max()
    g = torch.Generator().manual_seed(0)
    out, lp = model.generate(idx, 5, attention_mask=mask, return_logprobs=True, generator=g)  # (B, T + 5), (B, 5)
    # each sampled token's logprob, against log-softmax of the float64 model's logits over the whole sequence
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], 1)
    want = torch.log_softmax(ref_model(out, full_mask)[:, idx.size(1) - 1:-1], -1)
    want = want.gather(-1, out[:, idx.size(1):, None]).squeeze(-1)  # (B, 5)
    assert lp.dtype == torch.float32 and (lp.double() - want).abs().max() < 0.1


def test_generate_logits_run_in_float32_under_bf16_autocast(monkeypatch):
    # The sampling loop takes its logits from the same float32 head: every logits tensor sample_next_token() sees
    # must be the float64 product of the hidden state the head was given (cached and recomputed paths alike).
    import nanorlhf.model as M

    model = make_gpt(dtype=torch.float32, noise=0.1)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    seen, real_head = [], M.float32_head

    def spy_head(head, h):
        out = real_head(head, h)
        seen.append((h.double() @ head.weight.double().t(), out))
        return out

    monkeypatch.setattr(M, "float32_head", spy_head)
    idx, mask = left_pad([[5, 6, 7, 8], [9, 10]])
    for use_cache in (True, False):
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.generate(idx, 5, attention_mask=mask, use_cache=use_cache, generator=torch.Generator().manual_seed(0))
        assert len(seen) == 5  # one head call per sampled token: no other path produces logits
        for ref, out in seen:
            assert out.dtype == torch.float32 and (out.double() - ref).abs().max() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu():
    model = make_gpt(dtype=torch.float32, noise=0.1)
    idx, mask = left_pad([[5, 6, 7, 8], [9, 10]])
    ref = model(idx, mask)
    gpu = model.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = gpu(idx.cuda(), mask.cuda())
        out, lp = gpu.generate(idx.cuda(), 8, attention_mask=mask.cuda(), return_logprobs=True,
                               generator=torch.Generator("cuda").manual_seed(0))
    assert torch.allclose(logits.cpu()[mask.bool()], ref[mask.bool()], atol=0.1)
    assert out.shape == (2, 12) and torch.isfinite(lp).all()
    a = gpu.generate(idx.cuda(), 8, temperature=0.0, attention_mask=mask.cuda())
    b = gpu.generate(idx.cuda(), 8, temperature=0.0, attention_mask=mask.cuda(), use_cache=False)
    assert torch.equal(a, b)


# -----------------------------------------------------------------------------
# generation's oneDNN Linears (x86 CPUs)


def onednn_or_skip(dtype=torch.float32):
    """Skip where generate() keeps F.linear (not an x86 CPU with oneDNN, or no bf16 kernels for dtype bf16)."""
    from nanorlhf.cpu_linear import onednn_dtype

    w = torch.zeros(2, 2)
    if dtype == torch.bfloat16:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = onednn_dtype(w)
    else:
        got = onednn_dtype(w)
    if got != dtype:
        pytest.skip(f"generate() keeps F.linear for {dtype} on this CPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,bias", [(1, True), (16, True), (40, False)])
def test_onednn_linear_matches_float64(dtype, rows, bias):
    # x W^T + b through oneDNN with the weight reordered once, against the float64 product of the same
    # numbers (in bf16: of the bf16-rounded inputs, the one rounding left being the output's)
    from nanorlhf.cpu_linear import OneDNNLinear

    onednn_or_skip(dtype)
    torch.manual_seed(rows)
    linear = torch.nn.Linear(48, 72, bias=bias)
    x = torch.randn(rows, 5, 48)  # (rows, 5, C): leading dimensions are kept, as F.linear keeps them
    y = OneDNNLinear(linear, dtype, rows)(x)
    cast = lambda t: t.to(dtype).double()  # noqa: E731
    ref = cast(x) @ cast(linear.weight).t() + (cast(linear.bias) if bias else 0.0)  # (rows, 5, 72)
    assert y.shape == (rows, 5, 72) and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7  # bf16 keeps 8 significant bits
    assert ((y.double() - ref).abs() / (1 + ref.abs())).max() < tol


def test_onednn_dtype_choices():
    from nanorlhf.cpu_linear import onednn_dtype

    onednn_or_skip()
    assert onednn_dtype(torch.zeros(2, 2)) == torch.float32
    assert onednn_dtype(torch.zeros(2, 2, device="meta")) is None  # not on the CPU (a GPU) keeps F.linear
    assert onednn_dtype(torch.zeros(2, 2, dtype=torch.float64)) is None  # a float64 model keeps F.linear
    assert onednn_dtype(torch.zeros(2, 2, dtype=torch.bfloat16)) is None  # so does a bf16 one
    with torch.autocast("cpu", dtype=torch.float16):
        assert onednn_dtype(torch.zeros(2, 2)) is None


@pytest.mark.parametrize("autocast", [False, True])
def test_generate_with_onednn_equals_f_linear(monkeypatch, autocast):
    # generate() with the oneDNN Linears samples the same tokens as with F.linear, with the same logprobs up to
    # float32 rounding (bf16 autocast: up to bf16 rounding of the trunk; the head is float32 in both), and
    # during the call every Linear is a OneDNNLinear of the right dtype: the trunk's in bf16 under autocast, the
    # lm_head's in float32. Afterwards, and after an error inside the call, the modules are plain again.
    import nanorlhf.cpu_linear
    import nanorlhf.model as M

    onednn_or_skip(torch.bfloat16 if autocast else torch.float32)
    model = make_gpt(dtype=torch.float32, noise=0.1)
    idx, mask = left_pad([[5, 6, 7, 8], [9, 10], [11, 12, 13]])
    seen, real_sample = [], M.sample_next_token

    def spy_sample(*args, **kwargs):
        seen.append({name: (type(m.forward).__name__, getattr(m.forward, "dtype", None))
                     for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        return real_sample(*args, **kwargs)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model.generate(idx, 10, attention_mask=mask, return_logprobs=True,
                                  generator=torch.Generator().manual_seed(3))

    monkeypatch.setattr(M, "sample_next_token", spy_sample)
    out, lp = run()
    trunk_dtype = torch.bfloat16 if autocast else torch.float32
    assert len(seen) == 10
    for linears in seen:
        assert linears["lm_head"] == ("OneDNNLinear", torch.float32)
        assert {v for k, v in linears.items() if k != "lm_head"} == {("OneDNNLinear", trunk_dtype)}
    assert all("forward" not in vars(m) for m in model.modules())
    monkeypatch.setattr(nanorlhf.cpu_linear, "onednn_dtype", lambda weight: None)  # F.linear everywhere
    seen.clear()
    out_ref, lp_ref = run()
    assert {v for linears in seen for v in linears.values()} == {("method", None)}
    assert torch.equal(out, out_ref)
    assert (lp - lp_ref).abs().max() < (1e-5 if not autocast else 0.05)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.undo()
    monkeypatch.setattr(M, "sample_next_token", boom)
    with pytest.raises(RuntimeError, match="boom"):
        run()
    assert all("forward" not in vars(m) for m in model.modules())


def test_generate_inside_generate_keeps_the_outer_calls_linears():
    # a generate() inside another's on_token (a side sample while streaming) leaves the outer call's oneDNN
    # Linears in place, and the outer call ends normally with every module plain again
    onednn_or_skip(torch.float32)
    model = make_gpt(dtype=torch.float32, noise=0.1)
    idx, mask = left_pad([[5, 6, 7, 8], [9, 10]])
    kinds = []

    def on_token(*args):
        model.generate(idx[:1], 2, generator=torch.Generator().manual_seed(1))
        kinds.append({type(m.forward).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)})

    out = model.generate(idx, 4, attention_mask=mask, generator=torch.Generator().manual_seed(0), on_token=on_token)
    assert kinds and all(k == {"OneDNNLinear"} for k in kinds), kinds
    assert torch.equal(out, model.generate(idx, 4, attention_mask=mask, generator=torch.Generator().manual_seed(0)))
    assert all("forward" not in vars(m) for m in model.modules())


def test_onednn_linears_swaps_each_plain_linear_in_its_dtype(monkeypatch):
    # which module gets which OneDNNLinear, on any CPU: oneDNN faked by a recorder, the trunk's dtype bf16 as under
    # bf16 autocast. The lm_head runs in float32; a LoRALinear (an nn.Linear whose forward adds its adapters, which a
    # OneDNNLinear of its weight would drop) keeps its own forward; a call inside another leaves the outer call's
    # Linears as they are, also after it returns; on exit every module is plain again.
    import nanorlhf.cpu_linear as cpu_linear
    from nanorlhf.lora import LoRALinear, apply_lora

    class Recorder:
        def __init__(self, linear, dtype, rows):
            self.linear, self.dtype, self.rows = linear, dtype, rows

        def __call__(self, x):
            return F.linear(x, self.linear.weight, self.linear.bias)

    monkeypatch.setattr(cpu_linear, "onednn_dtype", lambda weight: torch.bfloat16)
    monkeypatch.setattr(cpu_linear, "OneDNNLinear", Recorder)
    model = make_gpt(dtype=torch.float32)
    apply_lora(model, 2, 4, targets=r"attn\.c_attn")
    lora = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    plain = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert len(lora) == CONFIG.n_layer and len(plain) == 3 * CONFIG.n_layer + 1

    def forwards():
        return {n: (m.forward.linear is m, m.forward.dtype, m.forward.rows) if "forward" in vars(m) else None
                for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    expected = {n: None for n in lora} | {n: (True, torch.float32 if n == "lm_head" else torch.bfloat16, 7)
                                          for n in plain}
    with cpu_linear.onednn_linears(model, 7, model.lm_head):
        assert forwards() == expected
        with cpu_linear.onednn_linears(model, 3, model.lm_head):
            assert forwards() == expected
        assert forwards() == expected
    assert all("forward" not in vars(m) for m in model.modules())


def test_generate_with_onednn_keeps_lora_adapters(monkeypatch):
    # a LoRA actor (PPO's with --lora) samples through generate(): with the oneDNN Linears, the same tokens and
    # logprobs as with F.linear everywhere, its adapters (B != 0) included
    import nanorlhf.cpu_linear
    from nanorlhf.lora import apply_lora

    onednn_or_skip(torch.float32)
    model = make_gpt(dtype=torch.float32, noise=0.1)
    apply_lora(model, 4, 8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(0.3 * torch.randn_like(p))
    idx, mask = left_pad([[5, 6, 7, 8], [9, 10]])

    def run():
        return model.generate(idx, 8, attention_mask=mask, return_logprobs=True,
                              generator=torch.Generator().manual_seed(2))

    out, lp = run()
    monkeypatch.setattr(nanorlhf.cpu_linear, "onednn_dtype", lambda weight: None)  # F.linear everywhere
    out_ref, lp_ref = run()
    assert torch.equal(out, out_ref) and (lp - lp_ref).abs().max() < 1e-5


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not torch.backends.mkldnn.is_available()
                    or torch.backends.cpu.get_cpu_capability() == "DEFAULT" or not hasattr(torch, "get_autocast_dtype"),
                    reason="oneDNN is used on x86 CPUs with AVX2 or better and torch >= 2.4 only")
def test_onednn_is_used_on_every_x86_cpu_with_avx2():
    # the other oneDNN tests skip where onednn_dtype says None: this one says where it must not. bf16 autocast
    # uses oneDNN's bf16 kernels only where the CPU has them (on AVX2 alone, F.linear)
    from nanorlhf.cpu_linear import onednn_dtype

    assert onednn_dtype(torch.zeros(2, 2)) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = onednn_dtype(torch.zeros(2, 2))
    assert got == (torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None)


# -----------------------------------------------------------------------------
# scalar head


def test_scalar_score_invariant_to_padding():
    torch.manual_seed(0)
    model = ScalarGPT(CONFIG).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    alone = torch.stack([model(torch.tensor([r]))[0, -1] for r in rows])
    for pad in (0, 3):
        idx, mask = left_pad(rows)
        idx = torch.cat([torch.zeros(3, pad, dtype=torch.long), idx], 1)
        mask = torch.cat([torch.zeros(3, pad, dtype=torch.long), mask], 1)
        assert torch.allclose(model.score(idx, mask), alone, atol=1e-6)
        T = max(map(len, rows)) + pad
        ridx = torch.tensor([r + [0] * (T - len(r)) for r in rows])
        rmask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
        assert torch.allclose(model.score(ridx, rmask), alone, atol=1e-6)
    # and the value is the head applied to the reference trunk
    sd = to_hf({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
    h = ref_trunk(sd, CONFIG.n_head, rows[1])[-1]
    assert torch.allclose(alone[1], h @ model.head.weight[0] + model.head.bias[0], atol=1e-10)


def test_last_index():
    mask = torch.randint(0, 2, (50, 7))
    mask[0] = 0  # an all-zero row gives 0
    ref = [max([j for j in range(7) if row[j]], default=0) for row in mask.tolist()]
    assert last_index(mask).tolist() == ref


def test_scalar_from_gpt_copies_trunk():
    gpt = make_gpt(noise=0.05)
    rm = ScalarGPT.from_gpt(gpt)
    idx, mask = left_pad([[5, 6, 7], [8, 9]])
    assert torch.allclose(rm.trunk(idx, mask), gpt.trunk(idx, mask), atol=0)
    assert (rm.score(idx, mask) == 0).all()
    assert rm.transformer.wte.weight.data_ptr() != gpt.transformer.wte.weight.data_ptr()  # a copy
    # a GPT state dict's trunk loads into a ScalarGPT
    fresh = ScalarGPT(CONFIG).double()
    result = fresh.load_state_dict(gpt.state_dict(), strict=False)
    assert result.unexpected_keys == ["lm_head.weight"] and set(result.missing_keys) == {"head.weight", "head.bias"}
    assert torch.allclose(fresh.trunk(idx, mask), gpt.trunk(idx, mask), atol=0)


@pytest.mark.parametrize("cls", [ScalarGPT, ValueHeadGPT])
def test_from_gpt_keeps_gradient_checkpointing(cls):
    """A reward model, critic or shared actor-critic built from a checkpointed SFT model is checkpointed too: its
    training forward keeps fewer activations than a model without."""
    gpt = make_gpt(noise=0.05)
    idx, mask = left_pad([[5, 6, 7, 8], [9, 10]])
    for flag in (False, True):
        gpt.grad_checkpointing = flag
        model = cls.from_gpt(gpt).train()
        assert model.grad_checkpointing is flag
    counts = []
    for m in (cls.from_gpt(gpt).train(), cls(CONFIG).double().train()):  # checkpointed, and a fresh one not
        n = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: n.__setitem__(0, n[0] + 1) or t, lambda t: t):
            m(idx, mask)
        counts.append(n[0])
    assert counts[0] < counts[1]


# -----------------------------------------------------------------------------
# Hugging Face GPT-2 import


def random_hf_gpt2(n_layer=2, n_head=4, n_embd=32, vocab=50, n_pos=16, seed=0):
    """Random weights in HF GPT2LMHeadModel's layout (Conv1D (in, out) weights, causal-mask buffers)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: 0.1 * torch.randn(*shape, generator=g)  # noqa: E731
    C = n_embd
    sd = {"transformer.wte.weight": r(vocab, C), "transformer.wpe.weight": r(n_pos, C),
          "transformer.ln_f.weight": 1 + r(C), "transformer.ln_f.bias": r(C)}
    for l in range(n_layer):
        p = f"transformer.h.{l}."
        sd.update({
            p + "ln_1.weight": 1 + r(C), p + "ln_1.bias": r(C),
            p + "attn.bias": torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos),
            p + "attn.masked_bias": torch.tensor(-1e4),
            p + "attn.c_attn.weight": r(C, 3 * C), p + "attn.c_attn.bias": r(3 * C),
            p + "attn.c_proj.weight": r(C, C), p + "attn.c_proj.bias": r(C),
            p + "ln_2.weight": 1 + r(C), p + "ln_2.bias": r(C),
            p + "mlp.c_fc.weight": r(C, 4 * C), p + "mlp.c_fc.bias": r(4 * C),
            p + "mlp.c_proj.weight": r(4 * C, C), p + "mlp.c_proj.bias": r(C),
        })
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    config = {"model_type": "gpt2", "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "n_positions": n_pos,
              "n_ctx": n_pos, "vocab_size": vocab, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
    return sd, config


def write_safetensors(path, tensors):
    """The format by hand: u64 little-endian header size, JSON header, raw bytes (offsets after the header)."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))


@pytest.mark.parametrize("fmt,hf_activation,activation", [("safetensors", "gelu_new", "gelu_new"),
                                                           ("bin", "gelu_pytorch_tanh", "gelu_new"),
                                                           ("bin", "gelu", "gelu")])
def test_from_pretrained_matches_reference(tmp_path, fmt, hf_activation, activation):
    sd, config = random_hf_gpt2()
    config["activation_function"] = hf_activation
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    if fmt == "safetensors":
        # HF's save_pretrained: `transformer.` prefixes, no tied lm_head; one tensor stored as bf16
        tensors = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        tensors["transformer.h.1.mlp.c_fc.bias"] = tensors["transformer.h.1.mlp.c_fc.bias"].bfloat16()
        sd["transformer.h.1.mlp.c_fc.bias"] = tensors["transformer.h.1.mlp.c_fc.bias"].float()
        write_safetensors(tmp_path / "model.safetensors", tensors)
        back = load_safetensors(str(tmp_path / "model.safetensors"))
        assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    else:
        # the original hub layout: no `transformer.` prefix
        torch.save({k.removeprefix("transformer."): v for k, v in sd.items()}, tmp_path / "pytorch_model.bin")
    model = GPT.from_pretrained(str(tmp_path)).double()
    assert model.config.block_size == 16 and model.config.vocab_size == 50 and model.config.n_head == 4
    assert model.config.activation == activation
    ids = [3, 17, 42, 8, 8, 0, 49, 21, 5, 11]
    with torch.no_grad():
        logits = model.lm_head(model.trunk(torch.tensor([ids])))[0]
    assert torch.allclose(logits, ref_logits(sd, 4, ids, activation), atol=1e-9)


def test_from_pretrained_rejects_unknown_layouts(tmp_path):
    sd, config = random_hf_gpt2()
    config["layer_norm_epsilon"] = 1e-6
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="layer_norm_epsilon"):
        GPT.from_pretrained(str(tmp_path))
    config["layer_norm_epsilon"] = 1e-5
    config["activation_function"] = "relu"
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="activation_function 'relu'"):
        GPT.from_pretrained(str(tmp_path))
    config["activation_function"] = "gelu_new"
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    del sd["transformer.h.0.mlp.c_fc.bias"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="missing"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"garbage\n")  # one line naming the file, not torch's paragraphs
    with pytest.raises(ValueError, match=r"pytorch_model.bin: cannot load \(UnpicklingError: [^\n]*$"):
        GPT.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("key,value", [("tie_word_embeddings", False), ("scale_attn_weights", False),
                                       ("scale_attn_by_inverse_layer_idx", True)])
def test_from_pretrained_refuses_options_that_change_the_function(tmp_path, key, value):
    """GPT computes each of these GPT-2's way only: a file that asks for the other way must not load silently."""
    sd, config = random_hf_gpt2()
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0  # an untied file's own head, which GPT would drop for wte
    torch.save(sd, tmp_path / "pytorch_model.bin")
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{key} {json.dumps(value)} is not supported"):
        GPT.from_pretrained(str(tmp_path))
    config[key] = not value  # GPT-2's own value, written out as transformers does, loads
    (tmp_path / "config.json").write_text(json.dumps(config))
    GPT.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("edit,field", [
    ({"n_head": 5}, "n_embd 32 is not divisible by n_head 5"),  # was a bare AssertionError from the attention
    ({"n_head": 0}, "n_head 0 in config.json is not a positive integer"),
    ({"n_positions": None, "n_ctx": None}, "config.json has no n_positions nor n_ctx"),  # was a TypeError in nn.Embedding
    ({"n_layer": None}, "config.json has no n_layer"),
    ({"vocab_size": "50"}, 'vocab_size "50" in config.json is not a positive integer'),
    ({"model_type": "gpt_neo"}, "model_type 'gpt_neo' is not supported"),  # GPT-2's tensor names, another model
    ({"architectures": ["GPT2ForSequenceClassification"]}, r"architectures .* is a sequence classifier"),
    ({"score.weight": torch.zeros(1, 32)}, "tensor 'score.weight' is a sequence classifier's head"),
])
def test_from_pretrained_malformed_config_is_a_value_error_naming_the_field(tmp_path, edit, field):
    """train_sft.py --init_from reports OSError, ValueError and KeyError in one line; anything else is a traceback."""
    sd, config = random_hf_gpt2()
    for key, value in edit.items():
        if isinstance(value, torch.Tensor):
            sd[key] = value  # a reward model's head, its config.json without architectures
        elif value is None:
            del config[key]
        else:
            config[key] = value
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path))}: {field}"):
        GPT.from_pretrained(str(tmp_path))


def test_from_pretrained_reads_n_ctx_without_n_positions(tmp_path):
    sd, config = random_hf_gpt2()
    del config["n_positions"], config["model_type"]  # n_ctx alone, no model_type: read as GPT-2's, as transformers does
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert GPT.from_pretrained(str(tmp_path)).config.block_size == 16


@pytest.mark.parametrize("key,value,field", [
    ("layer_norm_epsilon", None, "layer_norm_epsilon null in config.json is not supported"),  # were TypeErrors
    ("layer_norm_epsilon", "1e-5", 'layer_norm_epsilon "1e-5" in config.json is not supported'),
    ("activation_function", ["gelu"], r"activation_function \['gelu'\] in config.json is not supported"),
    ("architectures", 5, "architectures 5 in config.json is not a list of class names"),
    ("architectures", "GPT2LMHeadModel", 'architectures "GPT2LMHeadModel" in config.json is not a list'),
])
def test_from_pretrained_wrong_type_in_config_is_a_value_error_naming_the_field(tmp_path, key, value, field):
    """A hand-edited config.json: a value of the wrong JSON type is one line naming the field, not a TypeError."""
    sd, config = random_hf_gpt2()
    config[key] = value  # None is written as null, not left out
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path))}: {field}"):
        GPT.from_pretrained(str(tmp_path))


def test_from_pretrained_config_that_is_no_json_object_names_the_file(tmp_path):
    sd, config = random_hf_gpt2()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    for text, message in [("[1]", "expected a JSON object, got list"), ("{", "not valid JSON")]:
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'config.json'))}: {message}"):
            GPT.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_from_pretrained_refuses_integer_weights(tmp_path, fmt):
    """
    A float weight stored as integers (a safetensors header's dtype edited to I32, say) was cast by copy_ and
    trained to a loss of 1e8: one line naming the file and the tensor instead.
    """
    sd, config = random_hf_gpt2()
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    if fmt == "safetensors":
        path = tmp_path / "model.safetensors"
        write_safetensors(path, tensors)
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        header["transformer.h.0.mlp.c_fc.weight"]["dtype"] = "I32"  # 4 bytes, as F32: the offsets stay valid
        blob = json.dumps(header).encode()
        path.write_bytes(raw[:8] + blob + b" " * (n - len(blob)) + raw[8 + n:])
    else:
        path = tmp_path / "pytorch_model.bin"
        tensors["transformer.h.0.mlp.c_fc.weight"] = tensors["transformer.h.0.mlp.c_fc.weight"] > 0  # bool
        torch.save(tensors, path)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: tensor 'transformer.h.0.mlp.c_fc.weight' has "
                                         f"dtype (int32|bool), expected a floating-point weight"):
        GPT.from_pretrained(str(tmp_path))


def test_from_pretrained_without_weights_names_both_files(tmp_path):
    """Before: the OS's "No such file or directory: .../pytorch_model.bin", as if only that one were looked for."""
    _, config = random_hf_gpt2()
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"no weights \(looked for model.safetensors, then pytorch_model.bin\)"):
        GPT.from_pretrained(str(tmp_path))


def test_load_safetensors_bad_file_is_a_value_error_naming_it(tmp_path, monkeypatch):
    """train_sft.py --init_from reports OSError, ValueError and KeyError in one line; anything else is a traceback."""
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"a": torch.randn(4, 3)})
    raw = path.read_bytes()
    # our own reader (the package made unimportable): truncated data, broken JSON, a huge header length, a shape
    # that does not match the data
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    for bad in (raw[:-5], raw[:8] + b"[" + raw[9:], (1 << 62).to_bytes(8, "little") + raw[8:],
                raw.replace(b"[4, 3]", b"[5, 3]")):
        assert bad != raw
        path.write_bytes(bad)
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: cannot read it as safetensors"):
            load_safetensors(str(path))


def test_load_safetensors_package_error_is_a_value_error_naming_it(tmp_path, monkeypatch):
    """The safetensors package, faked (it is optional): its SafetensorError derives from Exception only."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\0" * 16)

    class SafetensorError(Exception):
        pass

    def load_file(p):
        raise SafetensorError("Error while deserializing header: incomplete metadata, file not fully covered")

    monkeypatch.setitem(sys.modules, "safetensors", types.ModuleType("safetensors"))
    monkeypatch.setitem(sys.modules, "safetensors.torch", types.ModuleType("safetensors.torch"))
    sys.modules["safetensors"].SafetensorError = SafetensorError
    sys.modules["safetensors.torch"].load_file = load_file
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: Error while deserializing header"):
        load_safetensors(str(path))


# -----------------------------------------------------------------------------
# session 21 mutation round: edges that no test pinned down


def test_config_checks_name_the_field():
    """An unknown activation is a ValueError naming it and the choices (not a KeyError from the MLP); a sequence
    longer than block_size without a mask names both lengths (not an IndexError from the position embedding)."""
    with pytest.raises(ValueError, match=r"^activation 'relu': expected one of gelu_new, gelu$"):
        GPTConfig(activation="relu")
    model = make_gpt()
    with pytest.raises(AssertionError, match=r"^sequence of length 33 > block_size 32$"):
        model(torch.ones(1, 33, dtype=torch.long))
    assert model(torch.ones(1, 32, dtype=torch.long)).shape == (1, 32, CONFIG.vocab_size)


def test_no_bias_config_has_no_biases_and_matches_the_reference():
    """bias=False: no bias in any Linear or LayerNorm (the scalar head keeps its own), the parameter count by hand,
    and the logits of the float64 reference with every bias zero."""
    config = dataclasses.replace(CONFIG, bias=False)
    model = make_gpt(config, noise=0.05)
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if n.endswith(".bias")], names
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    assert model.num_params() == V * C + config.block_size * C + L * (2 * C + 3 * C * C + C * C + 8 * C * C) + C
    assert [n for n, _ in ScalarGPT(config).named_parameters() if n.endswith(".bias")] == ["head.bias"]
    sd = to_hf(model.state_dict())
    for name in list(sd):
        if name.endswith(".weight") and ("ln_" in name or "c_" in name):
            bias = name[:-len("weight")] + "bias"
            sd[bias] = torch.zeros(sd[name].size(-1) if "c_" in name else sd[name].size(0), dtype=torch.float64)
    idx = torch.tensor([[3, 17, 42, 8, 8, 0, 49]])
    with torch.no_grad():
        logits = model(idx)[0]
    assert torch.allclose(logits, ref_logits(sd, config.n_head, idx[0].tolist()), atol=1e-10)


def test_resize_vocab_to_the_same_size_is_a_no_op_and_never_shrinks():
    model = make_gpt(noise=0.05)
    idx = torch.tensor([[1, 2, 3, 49]])
    before = model(idx)
    model.resize_vocab(CONFIG.vocab_size)
    assert model.config.vocab_size == CONFIG.vocab_size and torch.allclose(model(idx), before, atol=0)
    with pytest.raises(AssertionError, match=r"only grows the vocabulary \(50 -> 49\)"):
        model.resize_vocab(49)


def test_policy_state_dict_is_a_plain_gpts():
    """The shared actor-critic's policy_state_dict holds exactly a GPT's keys (no value head), and loads strictly."""
    gpt = make_gpt(noise=0.05)
    sd = ValueHeadGPT.from_gpt(gpt).policy_state_dict()
    want = gpt.state_dict()
    assert sorted(sd) == sorted(want) and all(torch.equal(v, want[k]) for k, v in sd.items())  # its own weights
    GPT(CONFIG).double().load_state_dict(sd)  # strict


def test_generate_block_size_check_counts_real_prompt_tokens():
    """Positions count real tokens only: a left-padded batch whose real prompts fit with the new tokens generates,
    though its padded width would not fit; the message names the longest real prompt."""
    model = make_gpt(noise=0.1)
    rows = [[1] * 29, [2] * 6]
    idx, mask = left_pad(rows, pad_id=3)
    idx = torch.cat([torch.full((2, 6), 3), idx], 1)  # 35 columns, more than block_size 32
    mask = torch.cat([torch.zeros(2, 6, dtype=torch.long), mask], 1)
    out, lp = model.generate(idx, 4, temperature=0.0, attention_mask=mask, return_logprobs=True)  # 29 + 4 - 1 = 32
    for b, r in enumerate(rows):
        alone, lp_alone = model.generate(torch.tensor([r]), 4, temperature=0.0, return_logprobs=True)
        assert torch.equal(out[b, -4:], alone[0, -4:]) and torch.allclose(lp[b], lp_alone[0], atol=1e-10)
    with pytest.raises(ValueError, match=r"^prompt \(29\) \+ max_new_tokens \(5\) - 1 > block_size \(32\)$"):
        model.generate(idx, 5, attention_mask=mask)


def test_generate_zero_new_tokens_returns_the_prompts():
    model = make_gpt()
    idx, mask = left_pad([[5, 6, 7], [8]])
    out, lp = model.generate(idx, 0, attention_mask=mask, return_logprobs=True)
    assert torch.equal(out, idx) and lp.shape == (2, 0)
    assert torch.equal(model.generate(idx, 0, attention_mask=mask), idx)


def test_generate_in_train_mode_with_gradient_checkpointing_uses_the_cache():
    """A model left in train mode with checkpointing on (no dropout) generates exactly what it does in eval mode,
    through the KV cache as without it: checkpointing is for training forwards, never for the cached ones."""
    model = make_gpt(noise=0.1)
    idx, mask = left_pad([[5, 6, 7, 8, 9], [11, 12]])
    want, want_lp = model.generate(idx, 8, temperature=0.0, attention_mask=mask, return_logprobs=True,
                                   use_cache=False)
    model.grad_checkpointing = True
    model.train()
    for use_cache in (True, False):
        out, lp = model.generate(idx, 8, temperature=0.0, attention_mask=mask, return_logprobs=True,
                                 use_cache=use_cache)
        assert torch.equal(out, want) and torch.allclose(lp, want_lp, atol=1e-10), use_cache


def test_on_token_streams_what_generate_returns():
    """on_token sees each step's tokens as they end up in the output: a pad after a row's EOS, not what the model
    sampled there."""
    model = make_gpt(noise=0.1)
    idx, mask = left_pad([[5, 6, 7, 8], [20, 21], [30, 31, 32]], pad_id=1)
    raw = model.generate(idx, 8, temperature=0.0, attention_mask=mask)[:, -8:]
    eos = int(raw[0, 1])
    assert (raw[0, 2:] != 49).any()  # what row 0 samples after its EOS is not the pad already
    streamed = []
    out = model.generate(idx, 8, temperature=0.0, attention_mask=mask, eos_id=eos, pad_id=49,
                         on_token=lambda t: streamed.append(t.tolist()))
    assert (out[0, idx.size(1) + 2:] == 49).all() and out.size(1) > idx.size(1) + 2  # row 0 padded after its EOS
    assert torch.tensor(streamed).t().tolist() == out[:, idx.size(1):].tolist()


def test_top_k_larger_than_the_vocabulary_keeps_every_token():
    logits = torch.randn(300, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a, la = sample_next_token(logits, 0.9, top_k=100, generator=torch.Generator().manual_seed(1))
    b, lb = sample_next_token(logits, 0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # probabilities 0.1, 0.4, 0.2, 0.3; top_k=2 leaves {1: 0.4, 3: 0.3}, renormalised 4/7 and 3/7. top_p = 0.5 of
    # that is reached by token 1 alone; of the unfiltered distribution it would take tokens 1 and 3
    logits = torch.log(torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)).expand(500, 4)
    tok, _ = sample_next_token(logits, 1.0, top_k=2, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert set(tok.tolist()) == {1}


def test_shared_value_head_runs_in_float32_under_bf16_autocast():
    # forward(values=True) of the shared actor-critic: the values, as ScalarGPT's, are the float32 head of the bf16
    # trunk's hidden states, equal to their float64 product (a bf16 head misses by ~2^-8 of a value)
    model = ValueHeadGPT.from_gpt(make_gpt(dtype=torch.float32, noise=0.1))
    torch.nn.init.normal_(model.value_head.weight, std=2.0)
    torch.nn.init.normal_(model.value_head.bias, std=2.0)
    idx, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [9, 10, 3]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.trunk(idx, mask)  # (B, T, C)
        logits, values = model(idx, mask, values=True)  # (B, T, V), (B, T)
    assert logits.dtype == torch.float32 and values.dtype == torch.float32 and values.shape == (2, 7)
    ref = h.double() @ model.value_head.weight.double()[0] + model.value_head.bias.double()  # (B, T)
    assert ref.abs().max() > 5
    assert (values.double() - ref).abs().max() < 1e-4
