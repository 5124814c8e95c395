"""
Predicted memory (nanorlhf/footprint.py, memory.py) against the live tensors of real models and optimizers.
"""

import contextlib

import pytest
import torch

from nanorlhf import footprint as F
from nanorlhf import lora, utils
from nanorlhf.losses import logprobs_from_logits, sft_loss
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
    # the trained numbers too are counted once, under the role that names them first
    assert got["roles"]["actor"]["trainable"] == n and got["roles"]["reference"]["trainable"] == 0


def test_measured_weights_split_by_device():
    """On a run with an accelerator (a meta tensor stands in for it here), CPU weights are "weights_host"; on a
    CPU-only run every weight is "weights"."""
    host, accel = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7, device="meta"))
    got = F.measure_static({"actor": [accel], "reference": [host]}, [])["roles"]
    assert (got["actor"]["weights"], got["actor"]["weights_host"]) == (4 * 7, 0)
    assert (got["reference"]["weights"], got["reference"]["weights_host"]) == (0, 4 * 15)
    got = F.measure_static({"reference": [host]}, [])["roles"]
    assert (got["reference"]["weights"], got["reference"]["weights_host"]) == (4 * 15, 0)


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


def plain_static(rank, shared, offload, prec, vocab_size=SHAPE.vocab_size):
    """
    The option table of footprint's docstring written out role by role, with the counts taken from real models:
    {role: (weights, weights in CPU memory, grads, AdamW state, trainable)} and the full models on the accelerator.
    """
    config = GPTConfig(**{**CONFIG.__dict__, "vocab_size": vocab_size})
    gpt = list(GPT(config).parameters())
    head = list(ScalarGPT(config).head.parameters())
    adapted = GPT(config)
    if rank:
        lora.apply_lora(adapted, rank, rank)
    adapters = [p for p in adapted.parameters() if p.requires_grad] if rank else []
    numel = lambda ps: sum(p.numel() for p in ps)  # noqa: E731

    def trained(ps, frozen=()):
        n = numel(ps)
        return [(n + numel(frozen)) * prec.weights, 0, n * prec.grads, n * prec.optim + 4 * len(ps), n]

    roles = {"actor": trained(adapters, gpt) if rank else trained(gpt)}
    if shared:
        roles["critic"] = trained(head)  # the value head on the actor's trunk
    elif rank:
        roles["critic"] = trained(adapters + head)  # the reward model's weights are its base
    else:
        roles["critic"] = trained(gpt + head)
    roles["reference"] = [0] * 5  # the actor with adapters off
    if not rank:
        roles["reference"] = [0, numel(gpt) * prec.weights, 0, 0, 0] if "ref" in offload else \
            [numel(gpt) * prec.weights, 0, 0, 0, 0]
    rm_host = "rm" in offload and (shared or not rank)  # a LoRA critic's base stays with the critic
    roles["reward"] = [0, numel(gpt + head) * prec.weights, 0, 0, 0] if rm_host else \
        [numel(gpt + head) * prec.weights, 0, 0, 0, 0]
    resident = 1 + (not shared and not rank) + (not rank and "ref" not in offload) + (not rm_host)
    return roles, resident


@pytest.mark.parametrize("precision", list(F.PRECISIONS))
def test_static_memory_against_plain_table(precision):
    """Every option and every subset of --offload, in every precision, against the table written out by hand."""
    prec = F.PRECISIONS[precision]
    keys = ("weights", "weights_host", "grads", "optim", "trainable")
    for rank in (0, 3):
        for shared in (False, True):
            for offloaded in (set(), {"ref"}, {"rm"}, {"ref", "rm"}):
                got = F.static_memory(SHAPE, rank, shared, offloaded, prec)
                roles, resident = plain_static(rank, shared, offloaded, prec)
                for role in F.ROLES:
                    assert [got["roles"][role][k] for k in keys] == roles[role], (rank, shared, offloaded, role)
                for i, k in enumerate(keys):
                    assert got["total"][k] == sum(r[i] for r in roles.values()), (rank, shared, offloaded, k)
                assert got["resident"] == resident, (rank, shared, offloaded)
                assert F.static_total(got) == sum(sum(r[:4]) for r in roles.values())


def test_options_of_every_combination():
    for parts in ([], ["lora"], ["shared"], ["offload"], ["lora", "shared"], ["lora", "offload"],
                  ["shared", "offload"], ["lora", "shared", "offload"]):
        for name in ("+".join(parts) or "full", "+".join(["full"] + parts)):
            want = dict(lora="lora" in parts, shared="shared" in parts,
                        offload={"ref", "rm"} if "offload" in parts else set())
            assert F.options_of(name) == want, name


def saved_bytes(model, fn):
    with F.SavedTensors(model.parameters()) as saved:
        fn()
    return saved.bytes


@pytest.mark.parametrize("b", [3, 1])
@pytest.mark.parametrize("keep", [None, 10])
@pytest.mark.parametrize("rank,shared", [(0, False), (0, True), (3, False), (3, True)])
def test_activation_prediction(rank, shared, keep, b):
    """
    The formula against the bytes autograd really saves in a PPO-like micro-batch (padding mask, logprobs), with
    logits at every position (keep None) or at the response's N + 1 = 10 only, as PPO asks for them. b = 1 (a
    micro-batch of one row, --grad_accum = the minibatch size): the kept positions were a view of the whole final
    LayerNorm output there, which the head's saved input kept alive (2-4% more than predicted).
    """
    torch.manual_seed(0)
    T, N = 20, 9
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
        k = keep or T + N
        if shared:
            logits, values = actor(idx, mask, values=True, logits_to_keep=keep or 0)
        else:
            logits, values = actor(idx, mask, logits_to_keep=keep or 0), critic(idx, mask)[:, -k:]
        lp = logprobs_from_logits(logits[:, k - N - 1:-1], idx[:, T:])  # the logits at T-1+t predict y_t
        return lp.sum() + values[:, k - N - 1:-1].sum()

    params = list(actor.parameters()) + (list(critic.parameters()) if critic is not None else [])
    with F.SavedTensors(params) as saved:
        micro_batch()
    want = F.activation_memory(SHAPE, b, T + N, lora_rank=rank, shared=shared, keep=keep)
    # the formula leaves out the index tensors (token ids, gather indices) and logsumexp's outputs
    assert want <= saved.bytes <= want * 1.01, (saved.bytes, want)
    # to the byte: what it leaves out is the logprobs' logsumexp (b N float32) and, under LoRA, the token ids,
    # whose storage the gather's index (a view of idx) keeps although the frozen embedding does not
    assert saved.bytes == want + 4 * b * N + (8 * b * (T + N) if rank else 0), (saved.bytes, want)
    if keep == N + 1:  # memory.py's PPO micro-batch: t = prompt + response, logits at the response's N + 1
        import memory

        sizes = dict(micro=b, rollout=1, prompt=T, response=N)
        option = "+".join(["lora"] * bool(rank) + ["shared"] * shared) or "full"
        assert memory.predict(SHAPE, F.PRECISIONS["fp32"], sizes, "ppo", option, rank)["activations"] == want


@pytest.mark.parametrize("rank", [0, 3])
def test_sft_activation_prediction(rank):
    """
    memory.py --stage sft against the bytes autograd saves in train_sft.py's micro-batch: right-padded rows through
    the plain causal attention (no mask), then sft_loss; with LoRA the LM head is frozen, so its input is not kept.
    """
    import memory

    torch.manual_seed(0)
    b, T, N = 3, 20, 9
    model = GPT(CONFIG)
    if rank:
        lora.apply_lora(model, rank, rank)
    idx = torch.randint(0, SHAPE.vocab_size, (b, T + N))
    response_mask = torch.zeros_like(idx)
    response_mask[:, T:] = 1
    with F.SavedTensors(model.parameters()) as saved:
        sft_loss(model(idx), idx, response_mask)
    sizes = dict(micro=b, rollout=1, prompt=T, response=N)
    want = memory.predict(SHAPE, F.PRECISIONS["fp32"], sizes, "sft", "lora" if rank else "full", rank)["activations"]
    # as for PPO, the formula leaves out the loss's index tensors and logsumexp's outputs
    assert want <= saved.bytes <= want * 1.01, (saved.bytes, want)
    # to the byte: the loss's own tensors are logsumexp's outputs (b (t - 1) float32), the target mask as a bool
    # (b (t - 1)) and n_tokens (one float32); under LoRA the gather's index keeps the token ids' storage (a view of idx)
    t = T + N
    assert saved.bytes == want + 5 * b * (t - 1) + 4 + (8 * b * t if rank else 0), (saved.bytes, want)


def saved_in_micro_batch(shape, rank, stage, b=3, T=20, N=9, autocast=False):
    """Bytes autograd saves in one micro-batch of a model of this shape: stage 'ppo' (separate actor and critic,
    padding mask, logits at the response's N + 1), 'shared' (one trunk, two heads), 'sft' (no mask, sft_loss)."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=shape.block_size, vocab_size=shape.vocab_size, n_layer=shape.n_layer,
                       n_head=shape.n_head, n_embd=shape.n_embd)
    idx = torch.randint(0, shape.vocab_size, (b, T + N))
    mask = torch.ones_like(idx)
    mask[0, :4] = 0
    models = [ValueHeadGPT(config)] if stage == "shared" else [GPT(config), ScalarGPT(config)][:1 + (stage == "ppo")]
    for m in models:
        if rank:
            lora.apply_lora(m, rank, rank)
    if rank and stage != "sft":
        (models[0].value_head if stage == "shared" else models[1].head).requires_grad_(True)
    with F.SavedTensors([p for m in models for p in m.parameters()]) as saved, \
            torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        if stage == "sft":
            sft_loss(models[0](idx), idx, (torch.arange(T + N) >= T).long().expand(b, -1))
        else:
            if stage == "shared":
                logits, values = models[0](idx, mask, values=True, logits_to_keep=N + 1)
            else:
                logits, values = models[0](idx, mask, logits_to_keep=N + 1), models[1](idx, mask)[:, -N - 1:]
            logprobs_from_logits(logits[:, :-1], idx[:, T:]).sum() + values[:, :-1].sum()
    return saved.bytes


@pytest.mark.parametrize("stage", ["ppo", "shared", "sft"])
@pytest.mark.parametrize("rank", [0, 3])
def test_activation_prediction_follows_each_dimension(stage, rank):
    """
    What the formula leaves out (index tensors, logsumexp outputs) does not depend on the model's shape: so when
    one dimension changes (a layer more, more heads, a narrower width, another vocabulary, another LoRA rank), the
    bytes autograd saves change by exactly what memory.py predicts, term by term.
    """
    import memory

    sizes = dict(micro=3, rollout=1, prompt=20, response=9)
    option = "+".join(["lora"] * bool(rank) + ["shared"] * (stage == "shared")) or "full"

    def predicted(shape, r):
        return memory.predict(shape, F.PRECISIONS["fp32"], sizes, "sft" if stage == "sft" else "ppo",
                              option, r)["activations"]

    base = saved_in_micro_batch(SHAPE, rank, stage), predicted(SHAPE, rank)
    for field, value in (("n_layer", 3), ("n_head", 4), ("n_embd", 16), ("vocab_size", 37)):
        other = F.Shape(**{**SHAPE.__dict__, field: value})
        got, want = saved_in_micro_batch(other, rank, stage), predicted(other, rank)
        assert got - base[0] == want - base[1], (field, got - base[0], want - base[1])
    if rank:
        got, want = saved_in_micro_batch(SHAPE, rank + 2, stage), predicted(SHAPE, rank + 2)
        assert got - base[0] == want - base[1], ("lora_rank", got - base[0], want - base[1])


def test_bf16_activations_keep_float32_logits():
    """
    --precision fp32+bf16 (bf16 autocast): the LM head still multiplies in float32, so the logits cost 4 bytes per
    number. Under CPU autocast the bytes saved grow with the vocabulary by exactly what memory.py predicts.
    """
    import memory

    sizes = dict(micro=3, rollout=1, prompt=20, response=9)
    other = F.Shape(**{**SHAPE.__dict__, "vocab_size": 101})
    got = saved_in_micro_batch(other, 0, "ppo", autocast=True) - saved_in_micro_batch(SHAPE, 0, "ppo", autocast=True)
    prec = F.PRECISIONS["fp32+bf16"]
    want = [memory.predict(s, prec, sizes, "ppo", "full", 0)["activations"] for s in (SHAPE, other)]
    assert got == want[1] - want[0] == 3 * 10 * (101 - SHAPE.vocab_size) * 4


@pytest.mark.parametrize("rank", [0, 3])
def test_rm_stage_prediction(rank):
    """
    memory.py --stage rm against a ScalarGPT as train_rm.py trains it: one AdamW step (weights, grads and state to
    the byte; under LoRA the frozen trunk is the RM's own) and the bytes autograd saves in a micro-batch scored at
    each row's last real token (a trunk under the padding mask, the scalar head over every position, no logits).
    """
    import memory

    torch.manual_seed(0)
    b, T, N = 3, 20, 9
    model = ScalarGPT(CONFIG)
    if rank:
        lora.apply_lora(model, rank, rank)
        model.head.requires_grad_(True)
    idx = torch.randint(0, SHAPE.vocab_size, (b, T + N))
    mask = torch.ones_like(idx)
    mask[0, -5:] = 0  # right padding
    with F.SavedTensors(model.parameters()) as saved:
        scores = model(idx, mask).gather(1, mask.sum(1, keepdim=True) - 1)  # (b, 1)
    opt = utils.configure_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu")
    scores.pow(2).sum().backward()
    opt.step()
    sizes = dict(micro=b, rollout=1, prompt=T, response=N)
    pred = memory.predict(SHAPE, F.PRECISIONS["fp32"], sizes, "rm", "lora" if rank else "full", rank)
    assert pred["activations"] <= saved.bytes <= pred["activations"] * 1.01, (saved.bytes, pred["activations"])
    got = F.measure_static({"critic": model.parameters()}, [opt])
    row = dict(pred["static"]["roles"]["critic"])
    assert row.pop("note") is not None and row == got["roles"]["critic"]
    assert F.static_total(pred["static"]) == F.static_total(got) and pred["static"]["resident"] == 1
    assert pred["kv_cache"] == 0


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
    import memory

    sizes = dict(micro=B + 1, rollout=B, prompt=T0, response=N)  # the rollout's rows, not the update's
    assert got == memory.predict(SHAPE, F.PRECISIONS["fp32"], sizes, "ppo", "full", 0)["kv_cache"]


def test_fmt_bytes():
    assert F.fmt_bytes(512) == "512 B" and F.fmt_bytes(1536) == "1.5 KiB" and F.fmt_bytes(14 * 2**30) == "14 GiB"
    # any size: a plain number below 1024 in the largest unit that keeps it >= 1, within three significant digits
    g = torch.Generator().manual_seed(0)
    sizes = [1023, 1024, 1000 * 1024, 1023 * 1024, 2**40, 5 * 2**50]
    sizes += [int(10 ** (x * 16)) for x in torch.rand(200, generator=g).tolist()]
    for n in sizes:
        number, unit = F.fmt_bytes(n).split(" ")
        k = ["B", "KiB", "MiB", "GiB", "TiB"].index(unit)
        x = float(number)
        assert "e" not in number and (x < 1024 or k == 4) and (x >= 1 or k == 0), (n, number, unit)
        assert abs(x * 1024**k - n) <= 0.005 * n + 0.5 * 1024**k * (k == 0 or x >= 100), (n, number, unit)


# -----------------------------------------------------------------------------
# train_ppo.py's options: build_models, the rollout and the update in each, memory.json, bad flags

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from scripts import ROOT, read_metrics, script, without_timings  # noqa: E402

sys.path.insert(0, ROOT)  # train_ppo.py is a top-level script

import train_ppo  # noqa: E402
from nanorlhf import data as D  # noqa: E402
from nanorlhf.offload import offload, on_device  # noqa: E402
from nanorlhf.rollout import generate_responses  # noqa: E402
from nanorlhf.tokenizer import Tokenizer  # noqa: E402

PPO_OPTIONS = {
    "full": dict(),
    "offload": dict(offload="ref,rm"),
    "lora": dict(lora_rank=4, lora_alpha=8.0),
    "shared": dict(critic="shared"),
    "lora+shared": dict(lora_rank=4, lora_alpha=8.0, critic="shared"),
}
PROMPTS = ["sort 5 3 8 1", "sort 2 9 4", "sort 7 7 1 0 3 6", "sort 4 1 2", "sort 9 8 7 6 5 4 3 2", "sort 0 1"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Random tiny SFT and RM checkpoints (byte tokenizer) and a prompt file."""
    d = tmp_path_factory.mktemp("ckpts")
    tok = Tokenizer.byte_level()
    config = GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    utils.save_checkpoint(str(d / "sft"), utils.model_payload(GPT(config), tok, "sft", {}, 0))
    rm = ScalarGPT(config)
    with torch.no_grad():
        rm.head.weight.normal_(0, 0.5)  # a reward model that prefers something, so advantages are not 0
    utils.save_checkpoint(str(d / "rm"), utils.model_payload(rm, tok, "rm", {}, 0))
    with open(d / "prompts.jsonl", "w") as f:
        for p in PROMPTS:
            f.write(json.dumps({"prompt": p}) + "\n")
    return d


def ppo_args(ckpts, **kw):
    return train_ppo.Args(sft=str(ckpts / "sft"), rm=str(ckpts / "rm"), out_dir=str(ckpts / "unused"), batch_size=8,
                          num_minibatches=2, response_length=8, lr=1e-2, critic_lr=1e-2, ppo_epochs=1, **kw)


def rollout(m, args, seed=0):
    tok = m["tok"]
    r = utils.setup_runtime("cpu", "float32", seed=seed)
    batch = D.collate([tok.render_prompt(p) for p in (PROMPTS * 2)[:args.batch_size]], tok.pad_id, left_pad=True)
    response = generate_responses(m["actor"], batch["idx"], batch["attention_mask"], tok, args)
    return train_ppo.make_experience(m["actor"], m["ref"], m["reward_model"], m["critic"], batch["idx"],
                                     batch["attention_mask"], response, tok, args, args.kl_coef, r), r


def optimizers(m, args):
    opts = [utils.configure_optimizer(m["actor"], args.lr, 0.0, (0.9, 0.95), "cpu")]
    if m["critic"] is not None:
        opts.append(utils.configure_optimizer(m["critic"], args.critic_lr, 0.0, (0.9, 0.95), "cpu"))
    return opts


@pytest.mark.parametrize("option", list(PPO_OPTIONS))
def test_option_ratio_one_memory_and_reference(ckpts, option):
    """
    In every option: the ratio is 1 on the first minibatch; the live static bytes at the first step equal the
    prediction exactly; the reference's logprobs, after the update moved the actor, equal those of the SFT
    model loaded on its own (with LoRA the reference is the actor with its adapters off).
    """
    args = ppo_args(ckpts, **PPO_OPTIONS[option])
    m = train_ppo.build_models(args, "cpu")
    exp, r = rollout(m, args)
    opts = optimizers(m, args)
    probe = F.StaticProbe(m["roles"], opts)
    stats = train_ppo.ppo_update(m["actor"], m["critic"], *opts, *([None] if len(opts) == 1 else []), exp, args, r,
                                 probe=probe.extra)
    assert stats["first_ratio_max_dev"] < 1e-5
    config = m["actor"].config
    shape = F.Shape(config.n_layer, config.n_head, config.n_embd, config.vocab_size, config.block_size)
    o = F.options_of(option)
    want = F.static_memory(shape, args.lora_rank, o["shared"], o["offload"])
    got = probe.result
    assert F.static_total(got) == F.static_total(want)
    for role in F.ROLES:
        for k in ("grads", "optim", "trainable"):
            assert got["roles"][role][k] == want["roles"][role][k], (role, k)
        assert (got["roles"][role]["weights"] + got["roles"][role]["weights_host"]
                == want["roles"][role]["weights"] + want["roles"][role]["weights_host"]), role
    b, t = probe.extra["micro_batch"]
    assert probe.extra["keep"] == t - exp["context_len"] + 1  # the response's N + 1 positions get logits
    acts = F.activation_memory(shape, b, t, args.lora_rank, o["shared"], keep=probe.extra["keep"])
    assert acts <= probe.extra["activations"] <= acts * 1.01
    # the reference after the update: the SFT model as loaded from disk
    exp2, _ = rollout(m, args, seed=1)
    sft, _, _ = utils.load_model(args.sft, kind="gpt")
    seq, mask, T = exp2["seq"], exp2["seq_mask"], exp2["context_len"]
    ref_lp = logprobs_from_logits(sft(seq, mask)[:, T - 1:-1], exp2["response"]) * exp2["response_mask"]
    torch.testing.assert_close(exp2["ref_logprobs"], ref_lp, rtol=1e-5, atol=1e-5)
    assert (exp2["logprobs"] - exp2["ref_logprobs"]).abs().max() > 1e-4  # the actor did move


def test_shared_trunk_rollout_equals_separate_models(ckpts):
    """make_experience with the shared trunk gives the numbers of a separate actor and critic with its weights."""
    args = ppo_args(ckpts, critic="shared", lora_rank=2, lora_alpha=4.0)
    m = train_ppo.build_models(args, "cpu")
    with torch.no_grad():
        m["actor"].value_head.weight.normal_()
        for layer in lora.lora_layers(m["actor"]):
            layer.lora_B.normal_(0, 0.1)
    exp, r = rollout(m, args)
    actor = GPT(m["actor"].config)
    actor.load_state_dict(train_ppo.policy_state_dict(m["actor"]))
    critic = ScalarGPT(m["actor"].config)
    critic.load_state_dict(train_ppo.critic_state_dict(m["actor"], None))
    sep = dict(m, actor=actor, critic=critic)
    exp_sep = train_ppo.make_experience(actor, m["ref"], m["reward_model"], critic, exp["seq"][:, :exp["context_len"]],
                                        exp["seq_mask"][:, :exp["context_len"]], exp["response"], m["tok"], args,
                                        args.kl_coef, r)
    assert sep["critic"] is critic
    for k in ("logprobs", "values", "ref_logprobs", "scores", "advantages", "returns"):
        torch.testing.assert_close(exp[k], exp_sep[k], rtol=1e-5, atol=1e-5)


def test_offload_moves_weights_and_keeps_numbers(ckpts):
    """The offload code path on device 'cpu': weights swapped in for the block and back out, same rollout numbers."""
    args = ppo_args(ckpts)
    m = train_ppo.build_models(args, "cpu")
    exp, r = rollout(m, args)
    ref, rm = m["ref"], m["reward_model"]
    host = [p.data for p in ref.parameters()]
    offload(ref, "cpu")
    offload(rm, "cpu")
    with on_device(ref, rm):  # on a CPU the "device copy" is the host tensor itself: the swap path still runs
        inside = [p.data for p in ref.parameters()]
    assert all(torch.equal(a, h) for a, h in zip(inside, ref._offload[2]))
    assert all(p.data_ptr() == h.data_ptr() for p, h in zip(ref.parameters(), ref._offload[2]))  # host copies after
    assert all(torch.equal(a, b) for a, b in zip(host, ref._offload[2]))
    exp_off = train_ppo.make_experience(m["actor"], ref, rm, m["critic"], exp["seq"][:, :exp["context_len"]],
                                        exp["seq_mask"][:, :exp["context_len"]], exp["response"], m["tok"], args,
                                        args.kl_coef, r)
    for k in ("logprobs", "ref_logprobs", "scores", "values", "rewards", "advantages"):
        assert torch.equal(exp[k], exp_off[k]), k


class CopyingHost(torch.Tensor):
    """A host tensor whose .to(device) makes a new copy, as a copy to an accelerator does (on a CPU .to returns
    the tensor itself, so the swap could not be told from no swap)."""

    def to(self, *args, **kwargs):
        return torch.Tensor.to(self, *args, **kwargs).as_subclass(torch.Tensor).clone()


def test_on_device_swaps_copies_in_and_host_back():
    """Inside on_device every parameter and buffer of an offloaded model is a fresh copy of its host tensor; after
    the block (also when it raises) each is the host tensor again; a model not offloaded is left alone."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))  # BatchNorm: buffers too
    plain = torch.nn.Linear(2, 2)
    offload(net, "cpu")
    device, tensors, host = net._offload
    net._offload = (device, tensors, [h.as_subclass(CopyingHost) for h in host])
    everything = list(net.parameters()) + list(net.buffers())
    home = [t.data_ptr() for t in everything]
    plain_home = [t.data_ptr() for t in plain.parameters()]
    for raises in (False, True):
        with contextlib.suppress(RuntimeError), on_device(None, plain, net):
            inside = [t.data_ptr() for t in everything]
            assert all(a != h for a, h in zip(inside, home)), "not copied in"
            assert all(torch.equal(t, h) for t, h in zip(net.parameters(), net._offload[2]))
            assert [t.data_ptr() for t in plain.parameters()] == plain_home
            if raises:
                raise RuntimeError
        assert [t.data_ptr() for t in everything] == home, "not back on the host"


def test_memory_script_sizes_from_preset_and_flags():
    """shape_and_sizes: each field from its place in the preset's tuple, each flag overriding its own field."""
    import memory

    names = ["n_layer", "n_head", "n_embd", "vocab_size", "block_size"]
    flags = ["micro_batch", "rollout_batch", "prompt_length", "response_length"]
    for preset, p in memory.PRESETS.items():
        shape, prec, sizes = memory.shape_and_sizes(memory.Args(preset=preset))
        assert [getattr(shape, n) for n in names] == list(p[:5]) and prec == F.PRECISIONS[p[5]]
        assert [sizes[k] for k in ("micro", "rollout", "prompt", "response")] == list(p[6:])
        for i, name in enumerate(names + flags):
            shape, _, sizes = memory.shape_and_sizes(memory.Args(preset=preset, **{name: 1000 + i}))
            got = [getattr(shape, n) for n in names] + [sizes[k] for k in ("micro", "rollout", "prompt", "response")]
            assert got == [1000 + i if j == i else v for j, v in enumerate(p[:5] + p[6:])], (preset, name)
        for precision in F.PRECISIONS:
            assert memory.shape_and_sizes(memory.Args(preset=preset, precision=precision))[1] == F.PRECISIONS[precision]


@pytest.mark.parametrize("flags,name", [
    (["--lora_rank", "-1"], "--lora_rank"),
    (["--offload", "ref,gpu"], "--offload"),
    (["--critic", "hydra"], "--critic"),
    (["--lora_rank", "4", "--lora_targets", "q_proj"], "--lora_targets"),
])
def test_bad_memory_flags_exit_2_and_write_nothing(ckpts, tmp_path, flags, name):
    out = tmp_path / "ppo"
    p = script("train_ppo.py", "--data", str(ckpts / "prompts.jsonl"), "--sft", str(ckpts / "sft"), "--rm",
               str(ckpts / "rm"), "--out_dir", str(out), *flags, check=False)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0], p.stderr
    assert not out.exists()


def test_lora_shared_run_saves_plain_models_and_resumes(ckpts, tmp_path):
    """
    --lora_rank --critic shared end to end: ckpt.pt is a plain GPT and critic.pt a plain ScalarGPT that load
    strictly; memory.json says measured == predicted; 1 iteration + --resume gives the run of 2 iterations.
    """
    common = ["--data", str(ckpts / "prompts.jsonl"), "--sft", str(ckpts / "sft"), "--rm", str(ckpts / "rm"),
              "--batch_size", "4", "--num_minibatches", "2", "--response_length", "6", "--ppo_epochs", "1",
              "--lora_rank", "2", "--critic", "shared", "--save_interval", "1", "--sample_interval", "1", "--anneal_lr", "false"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    script("train_ppo.py", *common, "--out_dir", a, "--num_iterations", "2")
    mem = json.load(open(os.path.join(a, "memory.json")))
    assert mem["static_measured"] == mem["static_predicted"]
    policy, _, ck = utils.load_model(a, kind="gpt")  # strict load into a plain GPT
    assert ck["stage"] == "ppo" and not lora.has_lora(policy)
    assert ck["models_resident"] == 2  # the LoRA base (actor and reference) and the RM (compare.py's table)
    utils.load_model(a, kind="scalar", name="critic.pt")
    assert set(torch.load(os.path.join(a, "adapters.pt"), weights_only=True)["actor"])
    # resume: one iteration, then continue to two
    script("train_ppo.py", *common, "--out_dir", b, "--num_iterations", "2", "--stop_at", "1")
    script("train_ppo.py", "--out_dir", b, "--resume")  # the run's saved flags
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("t_")} for r in without_timings(rows)]  # noqa: E731
    assert strip(read_metrics(a)) == strip(read_metrics(b))
    pa, pb = utils.load_model(a, kind="gpt")[0], utils.load_model(b, kind="gpt")[0]
    assert all(torch.equal(x, y) for x, y in zip(pa.state_dict().values(), pb.state_dict().values()))


def test_only_rank_0_writes_memory_json(ckpts, tmp_path, monkeypatch, one_thread):
    # under torchrun every rank wrote out_dir/memory.json, the same file at the same time; a rank that is not
    # rank 0 (the run itself is one process) now writes nothing at all
    monkeypatch.setattr(train_ppo.dist, "is_main", lambda: False)
    out = tmp_path / "ppo"
    train_ppo.main(["--data", str(ckpts / "prompts.jsonl"), "--sft", str(ckpts / "sft"), "--rm", str(ckpts / "rm"),
                    "--out_dir", str(out), "--num_iterations", "1", "--batch_size", "4", "--num_minibatches", "1",
                    "--response_length", "4", "--ppo_epochs", "1", "--device", "cpu", "--dtype", "float32"])
    assert not out.exists()


def test_memory_script_presets(capsys):
    """memory.py's seed-7b preset in the seed's own arithmetic: 16-bit weights and grads, Adam = 2 x the weights."""
    import memory

    shape, prec, sizes = memory.shape_and_sizes(memory.Args(preset="seed-7b"))
    n, _ = F.gpt_params(shape)
    assert 6.5e9 < n < 6.7e9  # a GPT-2-shaped 7B: 13.2 GB of bf16 weights, the seed's "14 GB"
    full = memory.predict(shape, prec, sizes, "ppo", "full", 8)["static"]
    head = shape.n_embd + 1
    # actor and critic: weights + grads + Adam (2 + 2 + 4 bytes); reference and RM: weights (2 bytes)
    n_tensors = 12 * shape.n_layer + 4
    assert full["total"]["weights"] == 2 * (4 * n + 2 * head)
    assert full["total"]["optim"] == 4 * (2 * n + head) + F.STEP_BYTES * (2 * n_tensors + 2)
    hydra = memory.predict(shape, prec, sizes, "ppo", "lora+shared", 8)["static"]
    assert hydra["resident"] == 2 and hydra["total"]["trainable"] == 16 * 8 * shape.n_embd * shape.n_layer + head
    memory.main(["--preset", "seed-7b", "--options", "full,lora+shared"])
    out = capsys.readouterr().out
    assert "| full | 4 |" in out and "| lora+shared | 2 |" in out


def test_memory_script_table_and_measure(capsys, monkeypatch):
    """
    memory.py --measure with train_ppo.py replaced by a stand-in that reads the flags memory.py passes and writes
    the static bytes of the plain table for the measured shape (vocabulary 258, float32): each option's flags, the
    summary row (static on the accelerator, CPU memory, activations, KV cache, static + max of both) and
    "equal" / "DIFFERENT" beside each option.
    """
    import memory

    micro, rollout, T0, N, rank = 3, 48, 20, 9, 3  # a KV cache larger than the activations of some options only
    runs = {}

    def fake_run(cmd, **kw):
        a = utils.parse_flags(train_ppo.Args, cmd[2:])
        option = "+".join(["lora"] * bool(a.lora_rank) + ["shared"] * (a.critic == "shared") +
                          ["offload"] * bool(a.offload)) or "full"
        assert (a.batch_size, a.batch_size // a.num_minibatches, a.response_length) == (rollout, micro, N)
        assert a.lora_rank in (0, rank) and a.offload in ("", "ref,rm") and a.dtype == "float32"
        config = torch.load(os.path.join(a.sft, "ckpt.pt"), weights_only=False)["model_config"]
        assert (config["n_layer"], config["n_embd"], config["vocab_size"]) == (SHAPE.n_layer, SHAPE.n_embd, 258)
        measured = sum(sum(r[:4]) for r in plain_static(a.lora_rank, a.critic == "shared",
                                                        {n for n in a.offload.split(",") if n}, F.PRECISIONS["fp32"],
                                                        vocab_size=258)[0].values())
        runs[option] = measured
        os.makedirs(a.out_dir)
        with open(os.path.join(a.out_dir, "memory.json"), "w") as f:
            json.dump(dict(static_measured=measured + (option == "shared"), micro_batch=[micro, T0 + N],
                           activations=1, activations_predicted=1, device="cpu"), f)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(memory.subprocess, "run", fake_run)
    options = ["full", "offload", "lora", "shared", "lora+shared", "lora+shared+offload"]
    memory.main(["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--vocab_size", "61", "--block_size", "48",
                 "--micro_batch", str(micro), "--rollout_batch", str(rollout), "--prompt_length", str(T0),
                 "--response_length", str(N), "--lora_rank", str(rank), "--precision", "bf16", "--measure",
                 "--options", ",".join(options)])
    out = capsys.readouterr().out
    assert set(runs) == set(options)
    prec = F.PRECISIONS["bf16"]
    larger = set()
    for option in options:
        o = F.options_of(option)
        roles, resident = plain_static(rank if o["lora"] else 0, o["shared"], o["offload"], prec)
        static = sum(r[0] + r[2] + r[3] for r in roles.values())
        host = sum(r[1] for r in roles.values())
        kv = 2 * SHAPE.n_layer * rollout * (T0 + N) * SHAPE.n_embd * prec.acts
        acts = F.activation_memory(SHAPE, micro, T0 + N, rank if o["lora"] else 0, o["shared"], acts_bytes=prec.acts,
                                   keep=N + 1)
        trainable = sum(r[4] for r in roles.values())
        fb = F.fmt_bytes
        row = [option, str(resident), f"{trainable:,}", fb(static), fb(host), fb(acts), fb(kv),
               fb(static + max(acts, kv)), f"{runs[option] + (option == 'shared'):,} / {runs[option]:,}"]
        assert "| " + " | ".join(row) + " |" in out, (option, row)
        larger.add(kv > acts)
        assert f"predicted {runs[option]:,} B ({'DIFFERENT' if option == 'shared' else 'equal'})" in out, option
    assert larger == {True, False}


@pytest.mark.parametrize("flags, message", [
    (["--n_embd", "-128"], "--n_embd must be at least 1, got -128"),
    (["--micro_batch", "-4"], "--micro_batch must be at least 1, got -4"),
    (["--n_head", "3"], "--n_embd 128 must be divisible by --n_head 3 (the values not given are --preset cpu's)"),
    (["--options", ","], "--options ',': no option named"),
    (["--prompt_length", "300"], "--prompt_length + --response_length (300 + 24) must fit --block_size 256"),
    (["--lora_targets", "("], "--lora_targets: LoRA targets '(': not a regular expression"),
    (["--lora_targets", "zzz"], "--lora_targets: LoRA targets 'zzz' match no Linear layer"),
    (["--stage", "sft", "--options", "full,shared"], "--options shared: --stage sft has only the options full and lora"),
    (["--stage", "rm", "--options", "offload,lora"], "--options offload: --stage rm has only the options full and lora"),
    (["--device", "cuda:7"], "--device: is where --measure runs train_ppo.py; without --measure nothing runs"),
])
def test_memory_script_refuses_bad_flags_in_one_line(capsys, flags, message):
    # sizes that would print negative bytes, a head count that does not divide the width, an empty table, a PPO
    # option named for SFT or RM (its row was left out without a word), or a traceback: one line on stderr, exit 2,
    # before any table
    import memory

    with pytest.raises(SystemExit) as e:
        utils.run(lambda: memory.main(flags))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: " + message), err
    assert out == ""


# -----------------------------------------------------------------------------
# mutation-testing gaps: memory.py's RM stage in 16-bit activations, the flags --measure passes, the block_size
# boundary, --lora_targets in the table; footprint's saved_once, StaticProbe and shared storages


@pytest.mark.parametrize("precision", list(F.PRECISIONS))
def test_rm_stage_activations_by_hand(precision):
    """
    memory.py --stage rm in every precision against the docstring's terms written out for one masked trunk whose
    scalar head reads every position (no logits, so nothing grows with the vocabulary):
    per layer 16 b t C + 4 b t + a b t + b t t, then b t C + 2 b t (final LayerNorm) + b t C (the head's input),
    all in the activation dtype, plus two int64 (b, t) tensors (position ids from the mask, token ids).
    """
    import memory

    prec = F.PRECISIONS[precision]
    b, T, N = 3, 20, 9
    t = T + N
    sizes = dict(micro=b, rollout=1, prompt=T, response=N)
    for vocab_size in (61, 1000):
        shape = F.Shape(**{**SHAPE.__dict__, "vocab_size": vocab_size})
        C, L, a = shape.n_embd, shape.n_layer, shape.n_head
        per_layer = 16 * b * t * C + 4 * b * t + a * b * t + b * t * t
        floats = L * per_layer + b * t * C + 2 * b * t + b * t * C
        want = floats * prec.acts + 8 * b * t + 8 * b * t
        assert memory.predict(shape, prec, sizes, "rm", "full", 0)["activations"] == want, (precision, vocab_size)


def test_memory_measure_passes_flags_train_ppo_accepts(monkeypatch, tmp_path):
    """
    The train_ppo.py command of memory.py --measure, parsed by train_ppo's own flags: each option's critic, LoRA
    rank and targets (--lora_targets reaches the run), offload; a micro-batch larger than the rollout gives one
    minibatch of the whole rollout, not --num_minibatches 0.
    """
    import memory

    cmds = []

    def fake_run(cmd, **kw):
        a = utils.parse_flags(train_ppo.Args, cmd[2:])
        cmds.append(a)
        os.makedirs(a.out_dir)
        with open(os.path.join(a.out_dir, "memory.json"), "w") as f:
            json.dump({"run": len(cmds)}, f)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(memory.subprocess, "run", fake_run)
    targets = r"mlp\.c_fc"
    args = memory.Args(lora_rank=5, lora_targets=targets)
    for option in memory.OPTIONS:
        o = F.options_of(option)
        for micro, rollout, minibatches in ((4, 16, 4), (16, 4, 1)):
            sizes = dict(micro=micro, rollout=rollout, prompt=20, response=9)
            work = tmp_path / f"{option}-{micro}"
            work.mkdir()
            assert memory.measure(SHAPE, sizes, option, args, str(work)) == {"run": len(cmds)}
            a = cmds[-1]
            assert (a.batch_size, a.num_minibatches, a.response_length) == (rollout, minibatches, 9), option
            assert a.critic == ("shared" if o["shared"] else "separate") and a.dtype == "float32", option
            assert a.lora_rank == (5 if o["lora"] else 0), option
            assert a.lora_targets == (targets if o["lora"] else lora.DEFAULT_TARGETS), option
            assert a.offload == ("ref,rm" if o["offload"] else ""), option


def test_memory_script_prompt_and_response_may_fill_the_context(capsys):
    # the cpu preset: block_size 256, response 24; a prompt of 232 fills the context exactly and is accepted
    import memory

    memory.main(["--prompt_length", "232", "--options", "full"])
    assert "rollout 64 x (232 + 24)" in capsys.readouterr().out


def test_memory_script_table_counts_lora_targets(capsys):
    """
    --lora_targets in the table: adapters on mlp.c_fc only, Linear(C, 4C), are r (C + 4C) numbers per layer: with
    the cpu preset (4 layers x 128) and rank 8, 4 * 8 * 640 = 20,480 in the actor, and the critic's own adapters
    plus its head (C + 1 = 129).
    """
    import memory

    memory.main(["--options", "lora", "--lora_rank", "8", "--lora_targets", r"mlp\.c_fc"])
    out = capsys.readouterr().out
    assert "| actor | 20,480 |" in out and "| critic | 20,609 |" in out, out


def test_saved_once_records_the_first_micro_batch_only():
    """
    saved_once: a block that raises records nothing; then the first block's bytes, shape and keep are recorded and
    a later (larger) block changes nothing. By hand: Linear(5, 3) saves its input (b, 5), float32, for the weight's
    gradient; the weight itself is a parameter, left out.
    """
    lin = torch.nn.Linear(5, 3)
    probe = {}
    with pytest.raises(RuntimeError), F.saved_once(probe, [lin], (4, 5), 5):
        lin(torch.randn(4, 5))
        raise RuntimeError
    assert probe == {}
    for b in (2, 7):
        with F.saved_once(probe, [lin], torch.Size([b, 5]), b + 1):
            lin(torch.randn(b, 5)).sum()
    assert probe == dict(activations=4 * 2 * 5, micro_batch=(2, 5), keep=3)


def test_static_probe_measures_once_every_optimizer_has_state():
    """
    StaticProbe waits for the step at which every optimizer holds state, measures then, and keeps that measurement
    when later steps run without gradients. By hand: Linear(3, 2) has 8 numbers in 2 tensors, Linear(4, 1) 5 in 2;
    4 bytes each for weights and gradients, AdamW 2 x 4 per number + a 4-byte step per tensor.
    """
    torch.manual_seed(0)
    actor, critic = torch.nn.Linear(3, 2), torch.nn.Linear(4, 1)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (actor, critic)]
    probe = F.StaticProbe({"actor": actor.parameters(), "critic": critic.parameters()}, opts)
    actor(torch.randn(2, 3)).sum().backward()
    opts[0].step()
    assert probe.result is None  # the critic's optimizer has no state yet
    critic(torch.randn(2, 4)).sum().backward()
    opts[1].step()
    want = dict(actor=dict(weights=32, weights_host=0, grads=32, optim=2 * 32 + 2 * 4, trainable=8),
                critic=dict(weights=20, weights_host=0, grads=20, optim=2 * 20 + 2 * 4, trainable=5))
    assert probe.result["roles"] == want
    for o in opts:
        o.zero_grad(set_to_none=True)
        o.step()  # no gradients: nothing moves, the hook runs again
    assert probe.result["roles"] == want


def test_measure_static_counts_a_shared_storage_once():
    """
    Gradients that are views of one flat buffer (DDP's gradient_as_bucket_view) and optimizer state in one buffer
    count the buffer once: by hand, 8 float32 numbers (32 bytes) each, plus one 4-byte step tensor.
    """
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(5))
    grads, moments = torch.zeros(8), torch.zeros(8)
    p.grad, q.grad = grads[:3], grads[3:]

    class FlatOptimizer:
        state = {p: {"exp_avg": moments[:3]}, q: {"exp_avg": moments[3:], "step": torch.tensor(1.0)}}

    got = F.measure_static({"actor": [p, q]}, [FlatOptimizer])["roles"]["actor"]
    assert got == dict(weights=4 * 8, weights_host=0, grads=4 * 8, optim=4 * 8 + 4, trainable=8)


def test_fmt_bytes_near_unit_boundaries():
    """
    Numbers that round up to the next power: 2^20 - 1 B is 1023.999 KiB, which printed "1024 KiB" (it is 1 MiB to
    three digits); 999.6 KiB printed "1e+03 KiB" (three significant digits of 999.6), written 1000 KiB instead.
    Then every unit's edges against the same rule as test_fmt_bytes: below 1024, no exponent, within rounding.
    """
    assert F.fmt_bytes(2**20 - 1) == "1 MiB" and F.fmt_bytes(1023 * 1024 + 600) == "1 MiB"
    assert F.fmt_bytes(round(999.6 * 1024)) == "1000 KiB" and F.fmt_bytes(999 * 1024) == "999 KiB"
    for k in range(1, 5):
        for x in (0.9995, 9.995, 99.95, 999.4, 999.5, 999.6, 1023.4, 1023.5, 1023.6, 1023.99):
            n = round(x * 1024**k)
            number, unit = F.fmt_bytes(n).split(" ")
            j = ["B", "KiB", "MiB", "GiB", "TiB"].index(unit)
            y = float(number)
            assert "e" not in number and (y < 1024 or j == 4) and y >= 1, (n, number, unit)
            assert abs(y * 1024**j - n) <= 0.005 * n + 0.5 * 1024**j, (n, number, unit)
