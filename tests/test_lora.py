"""
LoRA (nanorlhf/lora.py) and the shared actor-critic trunk (model.ValueHeadGPT) against plain references:
a plain GPT, float64 formulas, a separately loaded base model.
"""

import copy
import types

import pytest
import torch

from nanorlhf import lora, utils
from nanorlhf.losses import logprobs_from_logits
from nanorlhf.model import GPT, GPTConfig, ScalarGPT, ValueHeadGPT

CONFIG = GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16)


def batch(B=3, T=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, CONFIG.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0  # a left-padded row
    return idx, mask


def randomise_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_layers(model):
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.3)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)


def test_init_is_exactly_the_base_model():
    torch.manual_seed(0)
    for cls in (GPT, ScalarGPT):
        base = cls(CONFIG)
        model = copy.deepcopy(base)
        names = lora.apply_lora(model, rank=4, alpha=8)
        assert len(names) == 4 * CONFIG.n_layer  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each block
        idx, mask = batch()
        assert torch.equal(model(idx, mask), base(idx, mask))


def test_lora_linear_matches_float64_formula():
    torch.manual_seed(0)
    lin = torch.nn.Linear(7, 5)
    layer = lora.LoRALinear.from_linear(copy.deepcopy(lin), rank=3, alpha=6)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 7)
    W, b, A, B = (t.detach().double() for t in (lin.weight, lin.bias, layer.lora_A, layer.lora_B))
    # y = x W^T + b + (alpha / r) x A^T B^T, written element by element
    ref = torch.zeros(4, 5, dtype=torch.float64)
    for n in range(4):
        for o in range(5):
            ref[n, o] = b[o] + sum(x[n, i].double() * W[o, i] for i in range(7))
            ref[n, o] += 2.0 * sum(x[n, i].double() * A[r, i] * B[o, r] for i in range(7) for r in range(3))
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_gradient_reaches_only_adapters_and_heads():
    torch.manual_seed(0)
    model = ScalarGPT(CONFIG)
    lora.apply_lora(model, rank=4, alpha=8)
    model.head.requires_grad_(True)
    randomise_adapters(model)  # with B = 0 the gradient of A is exactly 0; make both nonzero
    idx, mask = batch()
    model(idx, mask).pow(2).mean().backward()
    for name, p in model.named_parameters():
        trainable = name.endswith(("lora_A", "lora_B")) or name.startswith("head.")
        assert p.requires_grad == trainable, name
        if trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # the optimizer holds the adapters and the head, nothing else: r * (in + out) per wrapped layer
    opt = utils.configure_optimizer(model, 1e-3, 0.0, (0.9, 0.95), "cpu")
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    C, r = CONFIG.n_embd, 4
    per_block = r * (C + 3 * C) + r * (C + C) + r * (C + 4 * C) + r * (4 * C + C)
    assert n_opt == CONFIG.n_layer * per_block + C + 1


def test_first_step_with_zero_b_moves_only_b():
    torch.manual_seed(0)
    model = GPT(CONFIG)
    lora.apply_lora(model, rank=2, alpha=2)
    idx, mask = batch()
    logprobs_from_logits(model(idx, mask)[:, :-1], idx[:, 1:]).sum().backward()
    for m in lora.lora_layers(model):
        assert torch.count_nonzero(m.lora_A.grad) == 0  # dL/dA = s B^T (dL/dy)^T x = 0 while B = 0
        assert torch.count_nonzero(m.lora_B.grad) > 0


def test_merged_equals_unmerged_and_float64_merge():
    torch.manual_seed(0)
    model = GPT(CONFIG)
    lora.apply_lora(model, rank=4, alpha=16)
    randomise_adapters(model)
    sd = lora.merged_state_dict(model)
    assert not any("lora" in k for k in sd)
    # the merged weight is W + (alpha / r) B A, checked in float64
    m = model.transformer.h[1].mlp.c_fc
    W64 = m.weight.double() + 4.0 * m.lora_B.double() @ m.lora_A.double()
    torch.testing.assert_close(sd["transformer.h.1.mlp.c_fc.weight"].double(), W64, rtol=1e-6, atol=1e-6)
    plain = GPT(CONFIG)
    plain.load_state_dict(sd)  # strict: the merged state dict is a plain GPT's
    idx, mask = batch()
    torch.testing.assert_close(plain(idx, mask), model(idx, mask), rtol=1e-5, atol=1e-5)
    # merging in place gives plain Linears and the same function
    out = model(idx, mask)
    lora.merge_lora(model)
    assert not lora.has_lora(model)
    assert set(model.state_dict()) == set(plain.state_dict())
    torch.testing.assert_close(model(idx, mask), out, rtol=1e-5, atol=1e-5)


def test_lora_payload_of_an_fsdp_sharded_model_is_the_whole_merged_model(tmp_path):
    """
    --fsdp --lora_rank: FSDP2 turns every parameter into a DTensor that holds one rank's shard, and ckpt.pt used to
    hold those DTensors (merged and trainable tensors read from the shards), which nothing could load. The payload
    merges the gathered weights instead: plain tensors equal to the unsharded model's merge, loaded strictly.
    One process in a process group of one (FSDP2 shards over it as over many); torchrun is not needed to show it.
    """
    import torch.distributed as td
    from torch.distributed.fsdp import fully_shard

    from nanorlhf.tokenizer import Tokenizer

    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=16))
    lora.apply_lora(model, rank=2, alpha=4)
    randomise_adapters(model)
    want = lora.merged_state_dict(model)
    want_trainable = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    td.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        for module in [*model.transformer.h, model]:  # as dist.wrap shards it
            fully_shard(module)
        assert type(model.transformer.h[0].attn.c_attn.lora_B) is not torch.nn.Parameter  # a DTensor now
        payload = lora.lora_payload(model, utils.model_payload(model, tok, "sft", {}, 1), 2, 4, lora.DEFAULT_TARGETS)
    finally:
        td.destroy_process_group()
    got, trainable = payload["model"], payload["lora"]["trainable"]
    assert all(type(v) is torch.Tensor for v in [*got.values(), *trainable.values()])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert trainable.keys() == want_trainable.keys()
    assert all(torch.equal(trainable[k], want_trainable[k]) for k in trainable)
    utils.save_checkpoint(str(tmp_path), payload)
    utils.load_model(str(tmp_path), kind="gpt")  # strict: a plain GPT


def test_adapters_off_is_the_separately_loaded_base(tmp_path):
    """The LoRA-PPO reference: after steps that changed the adapters, adapters off == the SFT model from disk."""
    torch.manual_seed(0)
    base = GPT(CONFIG)
    torch.save(base.state_dict(), tmp_path / "base.pt")
    model = copy.deepcopy(base)
    lora.apply_lora(model, rank=4, alpha=8)
    opt = utils.configure_optimizer(model, 1e-2, 0.0, (0.9, 0.95), "cpu")
    idx, mask = batch()
    for _ in range(3):
        logprobs_from_logits(model(idx, mask)[:, :-1], idx[:, 1:]).sum().neg().backward()
        opt.step()
        opt.zero_grad()
    loaded = GPT(CONFIG)
    loaded.load_state_dict(torch.load(tmp_path / "base.pt", weights_only=True))
    ref = logprobs_from_logits(loaded(idx, mask)[:, :-1], idx[:, 1:])
    on = logprobs_from_logits(model(idx, mask)[:, :-1], idx[:, 1:])
    assert (on - ref).abs().max() > 1e-2  # the adapters did change the policy
    with lora.adapters_off(model):
        off = logprobs_from_logits(model(idx, mask)[:, :-1], idx[:, 1:])
    torch.testing.assert_close(off, ref, rtol=1e-6, atol=1e-6)
    # and they are back on after the block
    torch.testing.assert_close(logprobs_from_logits(model(idx, mask)[:, :-1], idx[:, 1:]), on)


def test_bad_targets_and_rank():
    model = GPT(CONFIG)
    with pytest.raises(ValueError, match="match no Linear"):
        lora.apply_lora(model, rank=4, alpha=8, targets="q_proj")
    with pytest.raises(ValueError, match="tied"):
        lora.apply_lora(model, rank=4, alpha=8, targets="lm_head")
    with pytest.raises(ValueError, match="rank"):
        lora.apply_lora(model, rank=0, alpha=8)
    # a pattern that is no regex is a ValueError like the others (re.error is not one), which the scripts print
    with pytest.raises(ValueError, match=r"LoRA targets '\(': not a regular expression \(missing \)"):
        lora.apply_lora(model, rank=4, alpha=8, targets="(")
    assert not lora.has_lora(model) and all(p.requires_grad for p in model.parameters())


def test_value_head_gpt_equals_separate_actor_and_critic():
    """One trunk with two heads gives the logits of a GPT and the values of a ScalarGPT holding the same weights."""
    torch.manual_seed(0)
    shared = ValueHeadGPT.from_gpt(GPT(CONFIG))
    assert torch.count_nonzero(shared.value_head.weight) == 0  # starts at zero
    with torch.no_grad():
        shared.value_head.weight.normal_()
        shared.value_head.bias.fill_(0.5)
    actor = GPT(CONFIG)
    actor.load_state_dict(shared.policy_state_dict())
    critic = ScalarGPT(CONFIG)
    critic.transformer.load_state_dict(shared.transformer.state_dict())
    critic.head.load_state_dict(shared.value_head.state_dict())
    idx, mask = batch()
    logits, values = shared(idx, mask, values=True)
    assert torch.equal(logits, actor(idx, mask))
    torch.testing.assert_close(values, critic(idx, mask), rtol=0, atol=0)
    # with LoRA on the shared trunk: the same equality, and adapters off gives the base policy
    lora.apply_lora(shared, rank=2, alpha=4)
    randomise_adapters(shared)
    lora.apply_lora(actor, rank=2, alpha=4)
    randomise_adapters(actor)
    logits, _ = shared(idx, mask, values=True)
    torch.testing.assert_close(logits, actor(idx, mask))


def test_from_linear_freezes_the_base_and_trains_only_the_adapters():
    """A LoRALinear built alone (not through apply_lora): its weight and bias get no gradient, A and B do."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    layer = lora.LoRALinear.from_linear(lin, rank=2, alpha=4)
    assert layer.weight is lin.weight and layer.bias is lin.bias  # the same Parameters, no copy
    with torch.no_grad():
        layer.lora_B.normal_()
    layer(torch.randn(5, 6)).pow(2).sum().backward()
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert lin.weight.grad is None and lin.bias.grad is None
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


def test_apply_lora_again_wraps_only_the_plain_layers():
    """
    A second apply_lora leaves the layers already wrapped as they are (their trained adapters kept) and wraps only
    the plain Linears its targets match; a second call that matches only wrapped layers matches nothing.
    """
    torch.manual_seed(0)
    model = GPT(CONFIG)
    first = lora.apply_lora(model, rank=2, alpha=4, targets=r"attn\.c_attn")
    randomise_adapters(model)
    adapters = {n: (m.lora_A, m.lora_B) for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
    idx, mask = batch()
    with torch.no_grad():
        before = model(idx, mask)
    second = lora.apply_lora(model, rank=3, alpha=3)
    assert second == [n for n in (f"transformer.h.{i}.{k}" for i in range(CONFIG.n_layer)
                                  for k in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"))]
    for n in first:
        m = model.get_submodule(n)
        assert (m.rank, m.lora_A, m.lora_B) == (2, *adapters[n]), n
    with torch.no_grad():
        assert torch.equal(model(idx, mask), before)  # the new adapters start at B = 0
    with pytest.raises(ValueError, match="match no Linear"):
        lora.apply_lora(model, rank=2, alpha=4, targets=r"attn\.c_attn")


def test_adapters_off_nests_and_restores_each_layers_own_state():
    """
    adapters_off inside adapters_off stays off until the outer block ends; a layer that was switched off before
    the block is off after it; AdaptersOff(model) is the base model as a module that holds no parameters.
    """
    torch.manual_seed(0)
    base = GPT(CONFIG)
    model = copy.deepcopy(base)
    lora.apply_lora(model, rank=2, alpha=4)
    randomise_adapters(model)
    idx, mask = batch()
    with torch.no_grad():
        want_base, want_on = base(idx, mask), model(idx, mask)
        with lora.adapters_off(model):
            with lora.adapters_off(model):
                pass
            torch.testing.assert_close(model(idx, mask), want_base, rtol=1e-6, atol=1e-6)
        assert torch.equal(model(idx, mask), want_on)
        ref = lora.AdaptersOff(model)
        assert list(ref.parameters()) == []
        torch.testing.assert_close(ref(idx, mask), want_base, rtol=1e-6, atol=1e-6)
        assert torch.equal(model(idx, mask), want_on)
        # one layer switched off by hand stays off after a block
        layer = lora.lora_layers(model)[0]
        layer.enabled = False
        with lora.adapters_off(model):
            pass
        assert [m.enabled for m in lora.lora_layers(model)] == [False] + [True] * (4 * CONFIG.n_layer - 1)


def test_adapter_state_dict_count_trainable_and_flags_put_back_the_adapters():
    """
    adapter_state_dict holds exactly each wrapped layer's A and B; count_trainable is r * (in + out) per layer
    (plus what the caller unfroze); apply_lora_flags with those tensors gives a fresh wrapped model the same function.
    """
    torch.manual_seed(0)
    base = ScalarGPT(CONFIG)
    model = copy.deepcopy(base)
    names = lora.apply_lora(model, rank=3, alpha=6)
    randomise_adapters(model, seed=4)
    sd = lora.adapter_state_dict(model)
    assert set(sd) == {f"{n}.{k}" for n in names for k in ("lora_A", "lora_B")}
    for n in names:
        m = model.get_submodule(n)
        assert torch.equal(sd[f"{n}.lora_A"], m.lora_A) and torch.equal(sd[f"{n}.lora_B"], m.lora_B)
    C = CONFIG.n_embd
    per_block = 3 * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    assert lora.count_trainable(model) == CONFIG.n_layer * per_block
    model.head.requires_grad_(True)
    assert lora.count_trainable(model) == CONFIG.n_layer * per_block + C + 1
    fresh = copy.deepcopy(base)
    args = types.SimpleNamespace(lora_rank=3, lora_alpha=6, lora_targets=lora.DEFAULT_TARGETS)
    lora.apply_lora_flags(fresh, args, sd)
    idx, mask = batch()
    with torch.no_grad():
        assert torch.equal(fresh(idx, mask), model(idx, mask))


def test_from_linear_keeps_the_weights_dtype_and_device_and_inits_a_as_nn_linear():
    """
    A and B in the base weight's dtype and on its device (a float64 layer stays float64, a meta one allocates
    nothing); A drawn as nn.Linear draws its weight, uniform in +-1/sqrt(in), B zero; alpha / r need not be whole.
    """
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 5, dtype=torch.float64)
    layer = lora.LoRALinear.from_linear(lin, rank=8, alpha=3)  # scaling 0.375
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64
    assert not layer.lora_B.any()
    bound = 1 / 64 ** 0.5
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound  # of 512 uniform draws
    assert layer.extra_repr().endswith(", rank=8, alpha=3")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 64, dtype=torch.float64)
    W, b, A, B = (t.detach() for t in (lin.weight, lin.bias, layer.lora_A, layer.lora_B))
    ref = [[float(b[o]) + sum(float(x[n, i]) * float(W[o, i]) for i in range(64))
            + 0.375 * sum(float(B[o, r]) * sum(float(x[n, i]) * float(A[r, i]) for i in range(64)) for r in range(8))
            for o in range(5)] for n in range(3)]
    torch.testing.assert_close(layer(x), torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    meta = lora.LoRALinear.from_linear(torch.nn.Linear(4, 3, device="meta"), rank=2, alpha=2)
    assert meta.lora_A.device.type == meta.lora_B.device.type == "meta"


def test_state_dicts_are_copies_unwrap_a_compiled_model_and_take_an_empty_state():
    """
    merged_state_dict, adapter_state_dict and lora_payload's tensors are copies (a later step does not change
    them), on the device asked for; a torch.compile wrapper gives the plain keys; an empty state (an FSDP rank other
    than 0, which holds nothing) gives an empty payload with the run's settings.
    """
    torch.manual_seed(0)
    model = GPT(CONFIG)
    lora.apply_lora(model, rank=2, alpha=4)
    randomise_adapters(model)
    want = {k: v.clone() for k, v in lora.merged_state_dict(model).items()}
    want_adapters = {k: v.clone() for k, v in lora.adapter_state_dict(model).items()}
    compiled = torch.nn.Module()  # as torch.compile wraps a model: the model is its submodule _orig_mod
    compiled._orig_mod = model
    got, adapters = lora.merged_state_dict(compiled), lora.adapter_state_dict(compiled)
    payload = lora.lora_payload(model, {"model": dict(model.state_dict())}, 2, 4, "c_fc")
    trainable = {k: v.clone() for k, v in payload["lora"]["trainable"].items()}
    assert {k: v for k, v in payload["lora"].items() if k != "trainable"} == {"rank": 2, "alpha": 4, "targets": "c_fc"}
    assert trainable.keys() == want_adapters.keys()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert adapters.keys() == want_adapters.keys() and all(torch.equal(adapters[k], want_adapters[k]) for k in adapters)
    assert all(torch.equal(payload["lora"]["trainable"][k], trainable[k]) for k in trainable)
    assert all(torch.equal(payload["model"][k], want[k]) for k in want)
    assert {v.device.type for v in lora.merged_state_dict(model, device="meta").values()} == {"meta"}
    assert lora.merged_state_dict(model, state={}) == {}
    empty = lora.lora_payload(model, {"model": {}}, 2, 4, "c_fc")
    assert empty == {"model": {}, "lora": {"rank": 2, "alpha": 4, "targets": "c_fc", "trainable": {}}}


def test_adapters_come_back_on_after_an_error_and_no_match_names_the_first_layers():
    torch.manual_seed(0)
    model = GPT(CONFIG)
    lora.apply_lora(model, rank=2, alpha=4)
    with pytest.raises(RuntimeError, match="inside"):
        with lora.adapters_off(model):
            raise RuntimeError("inside")
    assert all(m.enabled for m in lora.lora_layers(model))
    with pytest.raises(ValueError) as e:
        lora.apply_lora(GPT(CONFIG), rank=2, alpha=4, targets="q_proj")
    assert str(e.value) == ("LoRA targets 'q_proj' match no Linear layer (the layers are named like "
                            "transformer.h.0.attn.c_attn, transformer.h.0.attn.c_proj, transformer.h.0.mlp.c_fc)")


# -----------------------------------------------------------------------------
# LoRA in train_sft.py and train_rm.py (subprocess runs on a small copy of the built-in task)

import sys  # noqa: E402

from scripts import ROOT, read_metrics, script, without_timings  # noqa: E402

sys.path.insert(0, ROOT)

from nanorlhf import tasks  # noqa: E402

TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "64", "--batch_size", "16",
        "--warmup", "2", "--eval_interval", "1000", "--log_interval", "2", "--device", "cpu"]
LORA = ["--lora_rank", "4", "--lora_alpha", "8", "--lr", "1e-2", "--max_steps", "6", "--batch_size", "16",
        "--warmup", "2", "--eval_interval", "1000", "--log_interval", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small copy of the task and a tiny SFT model trained on it: the frozen base of the LoRA runs."""
    d = tmp_path_factory.mktemp("lora")
    tasks.generate_task(str(d / "data"), n_sft=300, n_prefs=200, n_prefs_eval=10, n_prompts=10, n_eval=10)
    script("train_sft.py", "--data", str(d / "data/sft.jsonl"), "--out_dir", str(d / "base"), *TINY,
           "--max_steps", "10")
    return d


def frozen_equal(base_sd, sd, keys):
    return all(torch.equal(base_sd[k], sd[k]) for k in keys)


def test_sft_lora_saves_a_merged_plain_model_and_resumes(base, tmp_path):
    common = ["--data", str(base / "data/sft.jsonl"), "--init_from", str(base / "base"), *LORA]
    full, part = tmp_path / "full", tmp_path / "part"
    script("train_sft.py", *common, "--out_dir", str(full))
    model, _, ck = utils.load_model(str(full), kind="gpt")  # strict: a plain GPT
    base_model, _, _ = utils.load_model(str(base / "base"), kind="gpt")
    sd, base_sd = model.state_dict(), base_model.state_dict()
    # only the wrapped layers' weights changed; embeddings, LayerNorms and biases are the base's
    wrapped = {k for k in sd if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))}
    assert frozen_equal(base_sd, sd, set(sd) - wrapped)
    assert not frozen_equal(base_sd, sd, wrapped)
    # the merged weight is the base's plus (alpha / r) B A of the saved adapters
    A = ck["lora"]["trainable"]["transformer.h.0.mlp.c_fc.lora_A"].double()
    B = ck["lora"]["trainable"]["transformer.h.0.mlp.c_fc.lora_B"].double()
    W = base_sd["transformer.h.0.mlp.c_fc.weight"].double() + 2.0 * B @ A
    torch.testing.assert_close(sd["transformer.h.0.mlp.c_fc.weight"].double(), W, rtol=1e-6, atol=1e-6)
    # stop at step 4 and resume: the same run
    script("train_sft.py", *common, "--out_dir", str(part), "--stop_at", "4")
    script("train_sft.py", "--out_dir", str(part), "--resume")
    # (the stopped run also evaluates at its stop: val_loss is left out of the comparison)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "val_loss"} for r in without_timings(rows)]  # noqa: E731
    assert strip(read_metrics(part)) == strip(read_metrics(full))
    other = utils.load_model(str(part), kind="gpt")[0].state_dict()
    assert all(torch.equal(sd[k], other[k]) for k in sd)


def test_rm_lora_trains_adapters_and_head_only(base, tmp_path):
    out = tmp_path / "rm"
    script("train_rm.py", "--data", str(base / "data/prefs.jsonl"), "--init_from", str(base / "base"),
           "--out_dir", str(out), "--val_frac", "0.2", "--norm_samples", "50", "--sft_data",
           str(base / "data/sft.jsonl"), *LORA)
    rm, _, _ = utils.load_model(str(out), kind="scalar")  # strict: a plain ScalarGPT
    base_sd = utils.load_model(str(base / "base"), kind="gpt")[0].state_dict()
    sd = rm.state_dict()
    trunk = [k for k in sd if k.startswith("transformer.") and not k.endswith(("c_attn.weight", "c_proj.weight",
                                                                                "c_fc.weight"))]
    assert frozen_equal(base_sd, sd, trunk)
    assert torch.count_nonzero(sd["head.weight"]) > 0  # the head (zero at the start) trained


@pytest.mark.parametrize("name,flags", [
    ("train_sft.py", ["--lora_rank", "-2"]),
    ("train_rm.py", ["--lora_rank", "-2"]),
    ("train_sft.py", ["--lora_rank", "4", "--lora_targets", "q_proj"]),
])
def test_bad_lora_flags_exit_2_and_write_nothing(base, tmp_path, name, flags):
    data = "data/sft.jsonl" if name == "train_sft.py" else "data/prefs.jsonl"
    out = tmp_path / "out"
    p = script(name, "--data", str(base / data), "--init_from", str(base / "base"), "--out_dir", str(out),
               "--max_steps", "2", "--device", "cpu", *flags, check=False)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and ("--lora_rank" in lines[0] or "--lora_targets" in lines[0]), p.stderr
    assert not out.exists()


@pytest.mark.parametrize("name", ["train_sft.py", "train_rm.py"])
def test_lora_targets_not_a_regex_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, name):
    # in-process (main reads sys.argv) on a tiny random base: apply_lora runs after the data and the model are read,
    # and before the first write to --out_dir
    import train_rm
    import train_sft
    from nanorlhf.tokenizer import Tokenizer

    tok = Tokenizer.byte_level()
    config = GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16)
    utils.save_checkpoint(str(tmp_path / "base"), utils.model_payload(GPT(config), tok, "sft", {}, 1))
    tasks.generate_task(str(tmp_path / "data"), n_sft=20, n_prefs=20, n_prefs_eval=2, n_prompts=2, n_eval=2)
    sft = str(tmp_path / "data" / "sft.jsonl")
    data = ["--data", sft] if name == "train_sft.py" else ["--data", str(tmp_path / "data" / "prefs.jsonl"),
                                                           "--sft_data", sft]
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [name, *data, "--init_from", str(tmp_path / "base"), "--out_dir", str(out),
                                      "--val_frac", "0.2", "--max_steps", "1", "--device", "cpu", "--lora_rank", "2",
                                      "--lora_targets", "("])
    with pytest.raises(SystemExit) as e:
        utils.run((train_sft if name == "train_sft.py" else train_rm).main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    # train_rm.py refuses it with its flag checks (the head must stay out of the targets), train_sft.py in apply_lora
    want = "--lora_targets '(':" if name == "train_rm.py" else "--lora_targets: LoRA targets '(':"
    assert err.startswith(f"error: {want} not a regular expression"), err
    assert not out.exists()
