"""
Predicted memory (nanorlhf/footprint.py, memory.py) against the live tensors of real models and optimizers.
"""

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


# -----------------------------------------------------------------------------
# train_ppo.py's options: build_models, the rollout and the update in each, memory.json, bad flags

import json  # noqa: E402
import os  # noqa: E402
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


@pytest.mark.parametrize("flags, message", [
    (["--n_embd", "-128"], "--n_embd must be at least 1, got -128"),
    (["--micro_batch", "-4"], "--micro_batch must be at least 1, got -4"),
    (["--n_head", "3"], "--n_embd 128 must be divisible by --n_head 3 (the values not given are --preset cpu's)"),
    (["--options", ","], "--options ',': no option named"),
    (["--prompt_length", "300"], "--prompt_length + --response_length (300 + 24) must fit --block_size 256"),
    (["--lora_targets", "("], "--lora_targets: LoRA targets '(': not a regular expression"),
    (["--lora_targets", "zzz"], "--lora_targets: LoRA targets 'zzz' match no Linear layer"),
])
def test_memory_script_refuses_bad_flags_in_one_line(capsys, flags, message):
    # sizes that would print negative bytes, a head count that does not divide the width, an empty table, or a
    # traceback: one line on stderr, exit 2, before any table
    import memory

    with pytest.raises(SystemExit) as e:
        utils.run(lambda: memory.main(flags))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: " + message), err
    assert out == ""
