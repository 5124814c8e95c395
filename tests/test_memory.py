"""
Predicted memory (nanorlhf/footprint.py, memory.py) against the live tensors of real models and optimizers.
"""

import pytest
import torch

from nanorlhf import footprint as F
from nanorlhf import lora, utils
from nanorlhf.losses import logprobs_from_logits
from nanorlhf.model import GPT, GPTConfig, ScalarGPT, ValueHeadGPT

SHAPE = F.Shape(n_layer=2, n_head=2, n_embd=32, vocab_size=61, block_size=48)
CONFIG = GPTConfig(block_size=SHAPE.block_size, vocab_size=SHAPE.vocab_size, n_layer=SHAPE.n_layer,
                   n_head=SHAPE.n_head, n_embd=SHAPE.n_embd)


def test_parameter_counts():
    n, t = F.gpt_params(SHAPE)
    gpt = GPT(CONFIG)
    assert n == sum(p.numel() for p in gpt.parameters()) and t == len(list(gpt.parameters()))
    scalar = ScalarGPT(CONFIG)
    assert n + SHAPE.n_embd + 1 == sum(p.numel() for p in scalar.parameters())
    for targets in (None, r"mlp\.c_fc", r"attn\.c_attn|mlp\.c_proj"):
        model = GPT(CONFIG)
        lora.apply_lora(model, 3, 6, targets or lora.DEFAULT_TARGETS)
        n_lora, t_lora = F.lora_params(SHAPE, 3, targets)
        trained = [p for p in model.parameters() if p.requires_grad]
        assert (n_lora, t_lora) == (sum(p.numel() for p in trained), len(trained))


def step(model, opt, idx):
    loss = model(idx).float().pow(2).mean() if isinstance(model, ScalarGPT) else model(idx).logsumexp(-1).mean()
    loss.backward()
    opt.step()  # the gradients stay alive: the moment of the step is the peak of the static memory


@pytest.mark.parametrize("rank", [0, 4])
def test_static_prediction_equals_live_tensors(rank):
    """Full and LoRA actor + critic, one AdamW step each: weights, grads and AdamW state to the byte."""
    torch.manual_seed(0)
    actor, critic = GPT(CONFIG), ScalarGPT(CONFIG)
    if rank:
        lora.apply_lora(actor, rank, 2 * rank)
        lora.apply_lora(critic, rank, 2 * rank)
        critic.head.requires_grad_(True)
    opts = [utils.configure_optimizer(m, 1e-3, 0.1, (0.9, 0.95), "cpu") for m in (actor, critic)]
    idx = torch.randint(0, SHAPE.vocab_size, (2, 9))
    for m, o in zip((actor, critic), opts):
        step(m, o, idx)
    got = F.measure_static({"actor": actor.parameters(), "critic": critic.parameters()}, opts)
    want = F.static_memory(SHAPE, lora_rank=rank)["roles"]
    for role in ("actor", "critic"):
        for k in ("grads", "optim", "trainable"):
            assert got["roles"][role][k] == want[role][k], (role, k)
    assert got["roles"]["actor"]["weights"] == want["actor"]["weights"]
    if not rank:  # (a LoRA critic's base is the reward model's weights, counted under "reward" in a PPO run)
        assert got["roles"]["critic"]["weights"] == want["critic"]["weights"]


def test_shared_storage_counted_once():
    """A reference that is the actor (adapters off) and a critic head on the actor's trunk add no weights twice."""
    model = ValueHeadGPT(CONFIG)
    head = list(model.value_head.parameters())
    trunk = [p for n, p in model.named_parameters() if not n.startswith("value_head.")]
    got = F.measure_static({"actor": trunk, "critic": head, "reference": model.parameters()}, [])
    n, _ = F.gpt_params(SHAPE)
    assert got["roles"]["actor"]["weights"] == 4 * n
    assert got["roles"]["critic"]["weights"] == 4 * (SHAPE.n_embd + 1)
    assert got["roles"]["reference"]["weights"] == 0


def test_option_table():
    """Resident full models and who holds what, per option (the table in footprint's docstring)."""
    n, _ = F.gpt_params(SHAPE)
    head = SHAPE.n_embd + 1
    full = F.static_memory(SHAPE)
    assert full["resident"] == 4 and full["total"]["weights"] == 4 * (4 * n + 2 * head)
    off = F.static_memory(SHAPE, offload={"ref", "rm"})
    assert off["resident"] == 2 and off["total"]["weights_host"] == 4 * (2 * n + head)
    assert F.static_memory(SHAPE, shared=True)["resident"] == 3
    lo = F.static_memory(SHAPE, lora_rank=4)
    assert lo["resident"] == 2 and lo["roles"]["reference"]["weights"] == 0
    # a LoRA critic sits on the reward model's weights: offloading the RM is not possible, the ref has no copy
    assert F.static_memory(SHAPE, lora_rank=4, offload={"ref", "rm"})["resident"] == 2
    hydra = F.static_memory(SHAPE, lora_rank=4, shared=True, offload={"rm"})
    assert hydra["resident"] == 1 and hydra["total"]["trainable"] == F.lora_params(SHAPE, 4)[0] + head
    with pytest.raises(ValueError):
        F.options_of("lora+fast")


def saved_bytes(model, fn):
    with F.SavedTensors(model.parameters()) as saved:
        fn()
    return saved.bytes


@pytest.mark.parametrize("rank,shared", [(0, False), (0, True), (3, False), (3, True)])
def test_activation_prediction(rank, shared):
    """The formula against the bytes autograd really saves in a PPO-like micro-batch (padding mask, logprobs)."""
    torch.manual_seed(0)
    b, T, N = 3, 20, 9
    idx = torch.randint(0, SHAPE.vocab_size, (b, T + N))
    mask = torch.ones_like(idx)
    mask[0, :4] = 0
    actor = ValueHeadGPT(CONFIG) if shared else GPT(CONFIG)
    critic = None if shared else ScalarGPT(CONFIG)
    for m in (actor, critic):
        if m is not None and rank:
            lora.apply_lora(m, rank, rank)
    if rank:  # the heads on top of a LoRA trunk train, as in train_ppo.py
        (actor.value_head if shared else critic.head).requires_grad_(True)

    def micro_batch():
        if shared:
            logits, values = actor.logits_and_values(idx, mask)
        else:
            logits, values = actor(idx, mask), critic(idx, mask)
        lp = logprobs_from_logits(logits[:, T - 1:-1], idx[:, T:])
        return lp.sum() + values[:, T - 1:-1].sum()

    params = list(actor.parameters()) + (list(critic.parameters()) if critic is not None else [])
    with F.SavedTensors(params) as saved:
        micro_batch()
    want = F.activation_memory(SHAPE, b, T + N, lora_rank=rank, shared=shared)
    # the formula leaves out the index tensors (token ids, gather indices) and per-row logsumexp outputs
    assert want <= saved.bytes <= want * 1.01, (saved.bytes, want)


def test_kv_cache_bytes():
    model = GPT(CONFIG)
    B, T0, N = 3, 5, 7
    caches = []
    orig = model._forward_cached

    def spy(idx, pos, attn_mask, c, start):
        caches.append(c)
        return orig(idx, pos, attn_mask, c, start)

    model._forward_cached = spy
    model.generate(torch.randint(0, SHAPE.vocab_size, (B, T0)), N)
    got = sum(c.kv.untyped_storage().nbytes() for c in caches[0])
    assert got == F.kv_cache_bytes(SHAPE, B, T0, N)


def test_fmt_bytes():
    assert F.fmt_bytes(512) == "512 B" and F.fmt_bytes(1536) == "1.5 KiB" and F.fmt_bytes(14 * 2**30) == "14 GiB"
