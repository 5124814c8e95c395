"""
Benchmark one model size on the current device: how fast each stage's inner loop runs.

    SFT training     tokens/s of forward + backward + AdamW step on full block_size sequences, and MFU:
                     achieved FLOP/s (model.flops_per_token, PaLM's 6N + 12LHQT) over the device's peak
    generation       tokens/s of GPT.generate with the KV cache and without it (use_cache=False recomputes
                     the whole prefix at every step)
    PPO iteration    seconds per iteration, split into rollout (generate + make_experience: scores, logprobs,
                     values, rewards, GAE) and update (ppo_update: epochs x minibatches of actor and critic
                     steps), with train_ppo.py's own functions on four random models
    RM step          (part "rm") a reward-model step (K responses per prompt, the ranking loss, AdamW) run with each
                     prompt once (train_rm.py's default, data.pack_shared_prefix) and with a row per response, in
                     alternating rounds on the same tokens; the ratio is the median round's
    floors           (part "floor") lower bounds of the SFT step and the PPO iteration for any implementation of
                     their arithmetic with this device's kernels: their Linear products (and the SFT step's attention)
                     each timed alone at its best, the rest of the work left out
    Hugging Face     (part "hf", when transformers is installed; skipped otherwise) the same SFT step and the same
                     generation with transformers' GPT2LMHeadModel holding our weights (checked to give our logits),
                     timed in alternating rounds with ours; the ratio is the median round's
    TRL              (part "trl", when trl 1.12 with transformers, datasets and accelerate is installed; skipped
                     otherwise) a PPO iteration of TRL's PPOTrainer (trl.experimental.ppo) against one of ours on the
                     same starting weights, prompts and PPO settings, alternating iteration by iteration; TRL once in
                     float32 and once with bf16=True; the ratio ours / TRL is the median round's
    peak memory      per part on CUDA (torch.cuda.max_memory_allocated); on CPU the process's peak resident
                     set so far (getrusage maxrss), which only grows from part to part

Peak FLOP/s: train_common.peak_flops, as train_sft.py logs its MFU: the data-sheet dense peak for the GPUs it
knows (H100/H200 bf16 989e12, A100 312e12; half that in float32, which runs on TF32); on a CPU the theoretical
peak from /proc/cpuinfo (threads x clock x FLOPs per cycle: float32 FMAs, or for a bf16 run on AVX512-BF16 twice as
many); else (a bf16 run on AMX among them) the measured FLOP/s of a 1024 x 1024 matmul in the run's dtype. The line
says which.

Weights and tokens are random; the generation benchmark passes no EOS and PPO's EOS is an id no model samples, so
every response runs all new_tokens (PPO: response_length) steps. Run:
    python bench.py                                           # the pipeline's CPU default model
    python bench.py --json                                    # machine-readable
    python bench.py --parts rm --prompt_len 37 --response_length 14 --rounds 5   # the built-in task's RM shapes
    python bench.py --n_embd 256 --vocab_size 4096 --batch_size 8 --prompt_len 64 --new_tokens 128 \\
        --parts hf --gen_batch_size 16 --dtype float32       # against Hugging Face (a Python with transformers)
    python bench.py --n_embd 256 --vocab_size 4096 --prompt_len 64 --ppo_batch_size 16 --response_length 128 \\
        --parts ppo,trl --rounds 3                            # a PPO iteration against TRL's (a Python with trl)
    python bench.py --n_embd 256 --vocab_size 4096 --batch_size 8 --prompt_len 64 --ppo_batch_size 16 \\
        --response_length 128 --parts train,ppo,floor         # how close each is to its Linear products alone
    python bench.py --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --vocab_size 50304 \\
        --batch_size 8 --compile                              # GPT-2 small on a GPU (bf16 autocast by default)
"""

import json
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import train_ppo
from nanorlhf.data import collate, pack_shared_prefix, run_sequences, slots_run, to_device
from nanorlhf.hf import hf_config, hf_state_dict
from nanorlhf.losses import kwise_ranking_loss, sft_loss
from nanorlhf.model import GELU_APPROXIMATE, GPT, GPTConfig, ScalarGPT, last_index
from nanorlhf.rollout import freeze, generate_responses
from nanorlhf.train_common import optimizer_step, peak_flops
from nanorlhf.utils import (check, configure_optimizer, cpu_has_fast_bf16, flag, maybe_compile, parse_flags, run,
                            setup_runtime)


@dataclass
class Config:
    # model
    n_layer: int = flag(4, "transformer blocks")
    n_head: int = flag(4, "attention heads")
    n_embd: int = flag(128, "model width")
    block_size: int = flag(256, "context length; SFT steps train on sequences this long")
    vocab_size: int = flag(258, "vocabulary (258 = byte-level with EOS and PAD; GPT-2: 50304)")
    activation: str = flag("gelu", "the MLP's GELU: gelu (exact; train_sft.py's default for a new model) | gelu_new "
                                   "(GPT-2's tanh form)")
    # workload
    batch_size: int = flag(16, "sequences per SFT step (and prompts per generate() call unless --gen_batch_size)")
    gen_batch_size: int | None = flag(None, "prompts per generate() call in the generate, nocache and hf parts "
                                            "(default: --batch_size)")
    steps: int = flag(10, "timed steps: SFT steps in the train part; per round, RM steps in the rm part and SFT "
                          "steps of each side in the hf part")
    prompt_len: int = flag(32, "prompt tokens for generation and PPO")
    new_tokens: int = flag(64, "tokens generated per prompt in the generation benchmark")
    ppo_batch_size: int = flag(64, "episodes per PPO iteration (train_ppo.py --batch_size)")
    response_length: int = flag(24, "new tokens per PPO response (train_ppo.py --response_length)")
    ppo_iters: int = flag(2, "timed PPO iterations (after one warm-up iteration, two with --compile)")
    rm_batch_size: int = flag(16, "prompts per step in the rm part (train_rm.py --batch_size)")
    rm_responses: int = flag(4, "responses per prompt in the rm part, --prompt_len + --response_length tokens each")
    parts: str = flag("train,generate,nocache,ppo", "which parts to run, comma-separated (also: rm, floor, hf, trl)")
    rounds: int = flag(3, "alternating rounds in the rm part (the two layouts) and in the hf and trl parts (ours and "
                          "the peer's)")
    # system
    device: str = flag("auto", "auto | cpu | cuda | cuda:1 | mps")
    dtype: str = flag("auto", "auto (bf16 where GPU or CPU has it natively, else float32) | float32 | bfloat16")
    compile: bool = flag(False, "torch.compile the training forward passes (SFT step and PPO update)")
    seed: int = flag(0, "seed for the random weights and tokens")
    json: bool = flag(False, "print one JSON object instead of the table")


# the parts that read each workload flag (the model's and the system's flags, --seed and --json serve them all): a
# flag given for parts that do not run would be accepted and ignored, so main() refuses it
USED_BY = {
    "batch_size": ("train", "generate", "nocache", "floor", "hf"),
    "gen_batch_size": ("generate", "nocache", "hf"),
    "steps": ("train", "rm", "hf"),
    "prompt_len": ("generate", "nocache", "ppo", "rm", "floor", "hf", "trl"),
    "new_tokens": ("generate", "nocache", "hf"),
    "ppo_batch_size": ("ppo", "floor", "trl"),
    "response_length": ("ppo", "rm", "floor", "trl"),
    "ppo_iters": ("ppo",),
    "rm_batch_size": ("rm",),
    "rm_responses": ("rm",),
    "rounds": ("rm", "hf", "trl"),
    "compile": ("train", "ppo", "rm", "trl"),
}


def unused_flags(given, parts):
    """
    The flags named on the command line that none of the chosen parts reads, each with the parts that do:
    unused_flags({"rounds", "steps"}, ["train"]) -> ["--rounds (parts rm, hf, trl)"].
    """
    return [f"--{name} ({'part' if len(users) == 1 else 'parts'} {', '.join(users)})"
            for name, users in USED_BY.items() if name in given and not set(users) & set(parts)]


def meta_gpt(config):
    """A GPT whose parameters have shapes but no storage: enough to count them."""
    with torch.device("meta"):
        return GPT(config)


def sync(rt):
    if rt.device_type == "cuda":
        torch.cuda.synchronize()


def peak_memory(rt):
    """Bytes: CUDA's peak allocation since the last reset, or the process's peak resident set (Linux: KiB)."""
    if rt.device_type == "cuda":
        return torch.cuda.max_memory_allocated(rt.device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory(rt):
    if rt.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)


def bench_train(cfg, model_cfg, rt):
    """SFT steps on random full-length sequences: tokens/s and seconds per step."""
    model = GPT(model_cfg).to(rt.device)
    model.train()
    fwd = maybe_compile(model, cfg.compile)
    opt = configure_optimizer(model, 3e-4, 0.1, (0.9, 0.95), rt.device_type)
    B, T = cfg.batch_size, cfg.block_size
    idx = torch.randint(0, cfg.vocab_size - 2, (B, T), device=rt.device)  # (B, T), no special tokens
    response_mask = torch.ones_like(idx)  # every target is trained on, the most work per token

    def step():
        with rt.autocast():
            logits = fwd(idx)  # (B, T, V), plain causal attention as in train_sft.py (right padding needs no mask)
        loss = sft_loss(logits, idx, response_mask)
        loss.backward()
        optimizer_step(model, opt, 3e-4, 1.0)  # train_sft.py's step: set lr, clip, AdamW, zero grads

    for _ in range(3 if cfg.compile else 2):  # warm-up: allocator, kernels, compilation
        step()
    sync(rt)
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        step()
    sync(rt)
    dt = (time.perf_counter() - t0) / cfg.steps
    return {"train_tokens_per_s": B * T / dt, "train_s_per_step": dt,
            "flops_per_token": model.flops_per_token(T)}


def bench_generate(cfg, model_cfg, rt, use_cache):
    """Tokens/s of one batched generate() call of cfg.new_tokens tokens (EOS never stops it)."""
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg).to(rt.device).eval()
    B = cfg.gen_batch_size or cfg.batch_size
    idx = torch.randint(0, cfg.vocab_size - 2, (B, cfg.prompt_len), device=rt.device)  # (B, Tp)
    mask = torch.ones_like(idx)
    g = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    n_warm = min(cfg.new_tokens, 4)
    with rt.autocast():
        model.generate(idx, n_warm, attention_mask=mask, generator=g, use_cache=use_cache)  # warm-up
        sync(rt)
        t0 = time.perf_counter()
        out = model.generate(idx, cfg.new_tokens, attention_mask=mask, generator=g, use_cache=use_cache)
        sync(rt)
    dt = time.perf_counter() - t0
    assert out.shape == (B, cfg.prompt_len + cfg.new_tokens)
    return B * cfg.new_tokens / dt


class BenchTokenizer:
    """
    What train_ppo's rollout reads from a tokenizer: the ids of EOS and PAD. EOS is the id just past the vocabulary,
    which no model samples, so every response runs the whole --response_length (as TRL's with stop_token None).
    """

    def __init__(self, vocab_size):
        self.eos_id, self.pad_id = vocab_size, vocab_size - 1


def ppo_setup(cfg, model_cfg, rt):
    """
    train_ppo's four models on random weights (actor and critic trained, ref and reward model frozen), their
    optimizers and one batch of random prompts. -> (args, models {actor, ref, critic, reward_model}, prompts (B, Tp),
    iteration) where iteration() runs one PPO iteration as train_ppo does and returns its (rollout_s, update_s).
    """
    args = train_ppo.Args(batch_size=cfg.ppo_batch_size, response_length=cfg.response_length, compile=cfg.compile)
    check(args.batch_size % args.num_minibatches == 0,
          f"--ppo_batch_size must be divisible by train_ppo's num_minibatches ({args.num_minibatches})")
    torch.manual_seed(cfg.seed)
    actor, ref = GPT(model_cfg).to(rt.device), GPT(model_cfg).to(rt.device)
    critic, reward_model = ScalarGPT(model_cfg).to(rt.device), ScalarGPT(model_cfg).to(rt.device)
    freeze(ref)
    freeze(reward_model)
    fwd_actor, fwd_critic = maybe_compile(actor, cfg.compile), maybe_compile(critic, cfg.compile)
    betas = (args.beta1, args.beta2)
    actor_opt = configure_optimizer(actor, args.lr, args.weight_decay, betas, rt.device_type)
    critic_opt = configure_optimizer(critic, args.critic_lr, args.weight_decay, betas, rt.device_type)
    tok = BenchTokenizer(cfg.vocab_size)
    context = torch.randint(0, cfg.vocab_size - 2, (args.batch_size, cfg.prompt_len), device=rt.device)  # (B, Tp)
    context_mask = torch.ones_like(context)

    def iteration():
        sync(rt)
        t0 = time.perf_counter()
        actor.eval()
        with rt.autocast():  # as train_ppo calls it
            response = generate_responses(actor, context, context_mask, tok, args)  # (B, N)
        exp = train_ppo.make_experience(fwd_actor, ref, reward_model, fwd_critic, context, context_mask, response,
                                        tok, args, args.kl_coef, rt)
        sync(rt)
        t1 = time.perf_counter()
        train_ppo.ppo_update(fwd_actor, fwd_critic, actor_opt, critic_opt, exp, args, rt)
        sync(rt)
        return t1 - t0, time.perf_counter() - t1

    models = {"actor": actor, "ref": ref, "critic": critic, "reward_model": reward_model}
    return args, models, context, iteration


def bench_ppo(cfg, model_cfg, rt):
    """
    Seconds per PPO iteration with train_ppo.py's functions, split as train_ppo logs it: rollout
    (generate_responses + make_experience) and update (ppo_update), train_ppo's defaults for everything else.
    """
    args, _, _, iteration = ppo_setup(cfg, model_cfg, rt)
    n_warmup = 2 if cfg.compile else 1  # compilation: eval (rollout) and train (update) graphs, then a recompile
    times = [iteration() for _ in range(n_warmup + cfg.ppo_iters)][n_warmup:]
    rollout = sum(t[0] for t in times) / len(times)
    update = sum(t[1] for t in times) / len(times)
    return {"ppo_rollout_s": rollout, "ppo_update_s": update, "ppo_iter_s": rollout + update,
            "ppo_episodes": args.batch_size, "ppo_epochs": args.ppo_epochs, "ppo_minibatches": args.num_minibatches}


def best_time(f, rt, n=10):
    """The fastest of n timed calls of f (after 3 untimed ones): other work on the machine only slows a call down."""
    for _ in range(3):
        f()
    best = float("inf")
    for _ in range(n):
        sync(rt)
        t0 = time.perf_counter()
        f()
        sync(rt)
        best = min(best, time.perf_counter() - t0)
    return best


def linear_products_s(shapes, rows, backward, dtype, rt):
    """
    Seconds of the products of `rows` rows through Linears of `shapes` ((in, out) each), each product timed alone at
    its best: the forward x W^T and, with backward, the input's gradient g W and the weight's g^T x.
    """
    total = 0.0
    for k, n in shapes:
        x, w, g = (torch.randn(*s, device=rt.device, dtype=dtype) for s in ((rows, k), (n, k), (rows, n)))
        total += best_time(lambda: F.linear(x, w), rt)
        if backward:
            total += best_time(lambda: g @ w, rt) + best_time(lambda: g.t() @ x, rt)
    return total


def bench_floor(cfg, model_cfg, rt):
    """
    Lower bounds of the SFT step and of the PPO iteration at this size, for any implementation of their arithmetic
    with this device's kernels: the seconds of their Linear products (and of the SFT step's attention), each timed
    alone at its best, in the dtype the run would use (the LM head float32, as model.float32_head; on a CPU the
    attention float32, as model.py runs it there). LayerNorm, GELU, the loss, the optimizer and (PPO) the
    generation and the attention come on top. PPO's shapes are train_ppo's: micro-batches of ppo_batch_size /
    num_minibatches rows, the LM head over the response only, four scoring passes (actor, reference, critic, reward
    model) and epochs x minibatches of the actor's and the critic's forward and backward.
    """
    dtype = getattr(torch, rt.dtype)
    attn_dtype = torch.float32 if rt.device_type == "cpu" else dtype
    d, V = model_cfg.n_embd, model_cfg.vocab_size
    trunk = [(m.in_features, m.out_features) for m in meta_gpt(model_cfg).transformer.h.modules()
             if isinstance(m, torch.nn.Linear)]
    rows = cfg.batch_size * cfg.block_size
    linears = linear_products_s(trunk, rows, True, dtype, rt) + linear_products_s([(d, V)], rows, True,
                                                                                  torch.float32, rt)
    q, k, v = (torch.randn(cfg.batch_size, model_cfg.n_head, cfg.block_size, d // model_cfg.n_head,
                           device=rt.device, dtype=attn_dtype, requires_grad=True) for _ in range(3))
    attention = model_cfg.n_layer * best_time(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward(), rt)
    args = train_ppo.Args(batch_size=cfg.ppo_batch_size, response_length=cfg.response_length)
    micro = args.batch_size // args.num_minibatches  # rows per scoring pass and per update step (grad_accum 1)
    seq_rows, resp_rows = micro * (cfg.prompt_len + cfg.response_length), micro * cfg.response_length
    scoring = args.num_minibatches * (4 * linear_products_s(trunk, seq_rows, False, dtype, rt)
                                      + 2 * linear_products_s([(d, V)], resp_rows, False, torch.float32, rt))
    update = args.ppo_epochs * args.num_minibatches * (
        2 * linear_products_s(trunk, seq_rows, True, dtype, rt)
        + linear_products_s([(d, V)], resp_rows, True, torch.float32, rt))
    flops = 6 * rows * (sum(a * b for a, b in trunk) + d * V)
    return {"floor_sft_linears_s": linears, "floor_sft_attention_s": attention, "floor_sft_linear_flops": flops,
            "floor_ppo_scoring_s": scoring, "floor_ppo_update_s": update}


def bench_rm(cfg, model_cfg, rt):
    """
    Reward-model steps on random prompts with K random responses each, the same tokens run two ways: a row per
    response, and each prompt once with its responses after it. Seconds per step both ways, alternating rounds.
    """
    torch.manual_seed(cfg.seed)
    model = ScalarGPT(model_cfg).to(rt.device).train()
    fwd = maybe_compile(model, cfg.compile)
    opt = configure_optimizer(model, 3e-4, 0.1, (0.9, 0.95), rt.device_type)
    B, K, pad = cfg.rm_batch_size, cfg.rm_responses, cfg.vocab_size - 1
    g = torch.Generator().manual_seed(cfg.seed)
    tokens = lambda n: torch.randint(0, cfg.vocab_size - 2, (n,), generator=g).tolist()  # noqa: E731
    groups = [[prompt + tokens(cfg.response_length) for _ in range(K)] for prompt in
              (tokens(cfg.prompt_len) for _ in range(B))]
    ranking = torch.stack([torch.randperm(K, generator=g) for _ in range(B)]).to(rt.device)  # (B, K)
    k_mask = torch.ones(B, K, dtype=torch.bool, device=rt.device)  # (B, K)
    batches = {}
    for layout in ("row per response", "prompt once"):
        batch = collate([s for grp in groups for s in grp], pad)
        if layout == "prompt once":
            batch.update(pack_shared_prefix(groups, pad))
        batches[layout] = to_device(batch, rt.device)

    def step(batch):
        with rt.autocast():
            values = run_sequences(fwd, batch)  # (B * K, T)
        scores = values.gather(1, last_index(batch["attention_mask"])[:, None]).view(B, K)  # (B, K)
        kwise_ranking_loss(scores, ranking, k_mask).backward()
        optimizer_step(model, opt, 3e-4, 1.0)

    times = {layout: [] for layout in batches}
    for batch in batches.values():  # warm-up: allocator, kernels, compilation
        for _ in range(3 if cfg.compile else 2):
            step(batch)
    for _ in range(cfg.rounds):
        for layout, batch in batches.items():
            sync(rt)
            t0 = time.perf_counter()
            for _ in range(cfg.steps):
                step(batch)
            sync(rt)
            times[layout].append((time.perf_counter() - t0) / cfg.steps)
    ratios = [a / b for a, b in zip(times["row per response"], times["prompt once"])]
    return {"rm_s_per_step": times, "rm_speedup": statistics.median(ratios),
            "rm_tokens": {layout: int(slots_run(b).sum()) for layout, b in batches.items()}}


# -----------------------------------------------------------------------------
# the peer: Hugging Face transformers (optional; never a dependency of the package)


def hf_twin(model, eos_id, pad_id):
    """
    transformers' GPT2LMHeadModel (for a GPT) or GPT2ForSequenceClassification (for a ScalarGPT: reward model or
    critic) holding `model`'s weights, converted by nanorlhf.hf as export_hf.py writes them; None without transformers.
    """
    try:
        from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
    except ImportError:
        return None
    kind = "scalar" if isinstance(model, ScalarGPT) else "gpt"
    config = GPT2Config(**hf_config(model.config, kind, eos_id, pad_id))
    twin = (GPT2ForSequenceClassification if kind == "scalar" else GPT2LMHeadModel)(config)
    missing, unexpected = twin.load_state_dict(hf_state_dict(model.state_dict(), model.config, kind), strict=False)
    # lm_head.weight is tied to transformer.wte.weight (one tensor), the causal-mask buffers are HF's own
    assert not unexpected and all(k == "lm_head.weight" or k.endswith(".attn.bias") for k in missing), missing
    assert kind == "scalar" or twin.lm_head.weight is twin.transformer.wte.weight
    return twin.to(next(model.parameters()).device)


def hf_outputs(twin, idx):
    """The twin's logits (B, T, V) for a GPT2LMHeadModel, its per-position scores (B, T) for a sequence classifier."""
    if hasattr(twin, "score"):
        return twin.score(twin.transformer(idx).last_hidden_state).squeeze(-1)
    return twin(idx).logits


def bench_hf(cfg, model_cfg, rt):
    """Ours against transformers' GPT-2 with the same weights: SFT step seconds and generate seconds, median ratios."""

    torch.manual_seed(cfg.seed)
    ours = GPT(model_cfg).to(rt.device)
    hf = hf_twin(ours, cfg.vocab_size - 2, cfg.vocab_size - 1)
    if hf is None:
        return {"hf": "skipped: transformers is not installed"}
    import transformers

    B, T = cfg.batch_size, cfg.block_size
    idx = torch.randint(0, cfg.vocab_size - 2, (B, T), device=rt.device)  # (B, T)
    with torch.no_grad():
        assert torch.allclose(ours(idx[:2]), hf(idx[:2]).logits.float(), atol=1e-4), "the twin must compute our logits"
    response_mask = torch.ones_like(idx)
    models = {"ours": (ours, lambda x: ours(x)), "hf": (hf, lambda x: hf(x).logits)}
    opts = {k: configure_optimizer(m, 3e-4, 0.1, (0.9, 0.95), rt.device_type) for k, (m, _) in models.items()}

    def train_step(name):
        model, forward = models[name]
        model.train()
        with rt.autocast():
            logits = forward(idx)  # (B, T, V)
        sft_loss(logits, idx, response_mask).backward()
        optimizer_step(model, opts[name], 3e-4, 1.0)

    Bg = cfg.gen_batch_size or cfg.batch_size
    prompts = torch.randint(0, cfg.vocab_size - 2, (Bg, cfg.prompt_len), device=rt.device)  # (Bg, Tp)
    mask = torch.ones_like(prompts)

    def generate(name):
        model = models[name][0].eval()
        g = torch.Generator(device=rt.device).manual_seed(cfg.seed)
        with rt.autocast():
            if name == "ours":
                out = model.generate(prompts, cfg.new_tokens, attention_mask=mask, generator=g)
            else:  # sampling at temperature 1 from the full distribution, no EOS, exactly new_tokens steps
                out = model.generate(prompts, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                                     temperature=1.0, max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens,
                                     pad_token_id=cfg.vocab_size - 1, eos_token_id=None)
        assert out.shape == (Bg, cfg.prompt_len + cfg.new_tokens)

    def timed(fn, name, n):
        sync(rt)
        t0 = time.perf_counter()
        for _ in range(n):
            fn(name)
        sync(rt)
        return (time.perf_counter() - t0) / n

    res = {"hf_transformers": transformers.__version__}
    for part, fn, n in (("train", train_step, cfg.steps), ("generate", generate, 1)):
        for name in ("ours", "hf"):  # warm-up
            fn(name)
        rounds = [(timed(fn, "ours", n), timed(fn, "hf", n)) for _ in range(cfg.rounds)]
        res[f"hf_{part}_s"] = {"ours": [r[0] for r in rounds], "hf": [r[1] for r in rounds]}
        res[f"hf_{part}_speedup"] = statistics.median(h / o for o, h in rounds)  # > 1: ours is faster
    return res


def trl_tokenizer(vocab_size):
    """
    The smallest tokenizer TRL's PPOTrainer accepts for random token ids: one word-level token per id ("<17>" is id
    17), EOS and PAD the last two ids as in bench's models. The trainer only pads prompts (all of one length here)
    and reads the two ids from it.
    """
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(vocab_size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<0>")),
                                   eos_token=f"<{vocab_size - 2}>", pad_token=f"<{vocab_size - 1}>")


def bench_trl(cfg, model_cfg, rt):
    """
    One PPO iteration of TRL's PPOTrainer (trl.experimental.ppo, TRL 1.12) against one of ours, alternating: the
    trainer calls back after each of its iterations and our iteration runs there, between two of TRL's. The same
    starting weights (ours converted by hf_twin), prompts, batch, epochs, minibatches, response length (no stop token)
    and temperature; TRL once in float32 and once with bf16=True, the latter only where bf16 is native (a GPU, or a
    CPU with AVX512-BF16 or AMX: elsewhere torch emulates bf16 matmuls, about 30x slower than float32 on an AVX2 CPU,
    and float32 is TRL's best). Returns seconds per iteration and median ratios.
    """
    import tempfile
    import warnings

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # that trl.experimental is unstable is known here
    try:
        import accelerate
        import datasets
        import transformers
        import trl
        from transformers import TrainerCallback
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError as e:
        return {"trl": f"skipped: {e} (TRL 1.12's PPOTrainer needs trl, transformers, datasets, accelerate)"}

    transformers.logging.set_verbosity_error()  # deprecation notes about TRL's own defaults, not about this run
    args, models, context, iteration = ppo_setup(cfg, model_cfg, rt)
    twins = {k: hf_twin(m, cfg.vocab_size - 2, cfg.vocab_size - 1) for k, m in models.items()}
    idx = torch.cat([context[:2], torch.randint(0, cfg.vocab_size - 2, (2, cfg.response_length), device=rt.device)], 1)
    with torch.no_grad():
        for k, m in models.items():  # (2, Tp + N) logits or per-position scores
            assert torch.allclose(m(idx), hf_outputs(twins[k], idx).float(), atol=1e-4), f"the {k} twin must agree"
    state0 = {k: {n: v.clone() for n, v in t.state_dict().items()} for k, t in twins.items()}
    dataset = datasets.Dataset.from_dict({"input_ids": context.tolist()})
    hf_tok = trl_tokenizer(cfg.vocab_size)
    B = args.batch_size
    ours_warm = False

    class Alternate(TrainerCallback):
        """TRL's iteration times (on_step_end to on_step_end), with ours timed in between."""

        def __init__(self):
            self.trl, self.ours, self.t = [], [], None

        def on_train_begin(self, *a, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **kw):
            nonlocal ours_warm
            self.trl.append(time.perf_counter() - self.t)
            if not ours_warm:  # our warm-up (allocator, kernels) beside TRL's first iteration, not timed
                iteration()
                ours_warm = True
            if len(self.trl) > 1:  # TRL's first iteration was its warm-up
                self.ours.append(sum(iteration()))
            self.t = time.perf_counter()

    res = {"trl_version": trl.__version__}
    precisions = ("float32", "bf16") if rt.device_type != "cpu" or cpu_has_fast_bf16() else ("float32",)
    for precision in precisions:
        for k, t in twins.items():  # every trainer starts from the same weights
            t.load_state_dict(state0[k])
            t.train(k in ("actor", "critic"))
        clock = Alternate()
        # transformers 5 no longer passes bf16 on to accelerate's environment, and the PPOTrainer builds its own
        # Accelerator from that environment alone: without this variable bf16=True would run in float32
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if precision == "bf16" else "no"
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
        with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TRL's default gradient_checkpointing name is deprecated
            config = PPOConfig(
                output_dir=out, report_to=[], save_strategy="no", disable_tqdm=True, seed=cfg.seed,
                use_cpu=rt.device_type == "cpu", bf16=precision == "bf16", gradient_checkpointing=False,
                per_device_train_batch_size=B, gradient_accumulation_steps=1, num_mini_batches=args.num_minibatches,
                num_ppo_epochs=args.ppo_epochs, local_rollout_forward_batch_size=B, total_episodes=B * (1 + cfg.rounds),
                response_length=cfg.response_length, stop_token=None, temperature=args.temperature,
                learning_rate=args.lr, kl_coef=args.kl_coef, vf_coef=args.vf_coef, cliprange=args.clip_coef,
                cliprange_value=args.vf_clip_coef, gamma=args.gamma, lam=args.gae_lambda, num_sample_generations=0)
            trainer = PPOTrainer(args=config, processing_class=hf_tok, model=twins["actor"], ref_model=twins["ref"],
                                 reward_model=twins["reward_model"], value_model=twins["critic"],
                                 train_dataset=dataset, callbacks=[clock])
            for cb in list(trainer.callback_handler.callbacks):  # silence the per-iteration log lines
                if type(cb).__name__ in ("PrinterCallback", "ProgressCallback"):
                    trainer.remove_callback(cb)
            assert trainer.accelerator.mixed_precision == ("bf16" if precision == "bf16" else "no")
            trainer.train()
        os.environ.pop("ACCELERATE_MIXED_PRECISION")
        trl_s = clock.trl[1:]
        assert len(trl_s) == len(clock.ours) == cfg.rounds, (clock.trl, clock.ours)
        res[f"trl_{precision}_s"] = {"ours": clock.ours, "trl": trl_s}
        res[f"trl_{precision}_ratio"] = statistics.median(o / t for o, t in zip(clock.ours, trl_s))  # < 1: ours faster
    best = min(precisions, key=lambda p: statistics.median(res[f"trl_{p}_s"]["trl"]))
    res["trl_best"], res["trl_best_ratio"] = best, res[f"trl_{best}_ratio"]
    return res


def main(argv=None):
    cfg = parse_flags(Config, argv, description=__doc__)
    parts = [p.strip() for p in cfg.parts.split(",") if p.strip()]
    known = ("train", "generate", "nocache", "ppo", "rm", "floor", "hf", "trl")
    check(parts and all(p in known for p in parts),
          f"--parts {cfg.parts!r}: expected a comma-separated subset of {known}")
    # sizes that would fail deep inside a part (a division by zero, a tensor of negative size), or after minutes
    # of the parts before it: refused here, before anything runs
    for name in ("n_layer", "n_head", "n_embd", "block_size", "prompt_len", "new_tokens", "ppo_batch_size",
                 "response_length"):
        check(getattr(cfg, name) >= 1, f"--{name} must be at least 1, got {getattr(cfg, name)}")
    check(cfg.n_embd % cfg.n_head == 0, f"--n_embd {cfg.n_embd} must be divisible by --n_head {cfg.n_head}")
    n_minibatches = train_ppo.Args().num_minibatches  # ppo_setup runs train_ppo's default
    check(not {"ppo", "trl", "floor"} & set(parts) or cfg.ppo_batch_size % n_minibatches == 0,
          f"--ppo_batch_size {cfg.ppo_batch_size} must be divisible by train_ppo's num_minibatches ({n_minibatches})")
    check(cfg.vocab_size >= 3, "--vocab_size must leave room for EOS and PAD")
    # each length only where a chosen part generates that many tokens after a prompt
    check(not set(USED_BY["new_tokens"]) & set(parts) or cfg.prompt_len + cfg.new_tokens <= cfg.block_size,
          f"--prompt_len + --new_tokens ({cfg.prompt_len + cfg.new_tokens}) must fit --block_size {cfg.block_size}")
    check(not set(USED_BY["response_length"]) & set(parts) or cfg.prompt_len + cfg.response_length <= cfg.block_size,
          f"--prompt_len + --response_length must fit --block_size {cfg.block_size}")
    check(cfg.steps >= 1 and cfg.ppo_iters >= 1 and cfg.batch_size >= 1 and cfg.rounds >= 1,
          "--steps, --ppo_iters, --batch_size, --rounds >= 1")
    check(cfg.rm_batch_size >= 1 and cfg.rm_responses >= 2, "--rm_batch_size >= 1 and --rm_responses >= 2")
    check(cfg.gen_batch_size is None or cfg.gen_batch_size >= 1, "--gen_batch_size >= 1")
    check(cfg.activation in GELU_APPROXIMATE, f"--activation: one of {', '.join(GELU_APPROXIMATE)}")
    unused = unused_flags(cfg._given, parts)
    check(not unused, f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} nothing with --parts {cfg.parts}")
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed, training=True)
    model_cfg = GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=0.0, activation=cfg.activation)
    device_name = torch.cuda.get_device_name(rt.device) if rt.device_type == "cuda" else (
        f"cpu, {torch.get_num_threads()} threads, {'native' if cpu_has_fast_bf16() else 'no native'} bf16")
    res = {"config": asdict(cfg), "device": device_name, "dtype": rt.dtype, "torch": torch.__version__,
           "params": meta_gpt(model_cfg).num_params()}
    mem = {}
    if "train" in parts:
        reset_peak_memory(rt)
        res.update(bench_train(cfg, model_cfg, rt))
        mem["train"] = peak_memory(rt)
        res["peak_flops"], res["peak_flops_source"] = peak_flops(rt)
        res["mfu"] = res["flops_per_token"] * res["train_tokens_per_s"] / res["peak_flops"]
    if "generate" in parts:
        reset_peak_memory(rt)
        res["gen_tokens_per_s_kv_cache"] = bench_generate(cfg, model_cfg, rt, use_cache=True)
        mem["generate"] = peak_memory(rt)
    if "nocache" in parts:
        res["gen_tokens_per_s_no_cache"] = bench_generate(cfg, model_cfg, rt, use_cache=False)
    if "ppo" in parts:
        reset_peak_memory(rt)
        res.update(bench_ppo(cfg, model_cfg, rt))
        mem["ppo"] = peak_memory(rt)
    if "rm" in parts:
        res.update(bench_rm(cfg, model_cfg, rt))
    if "floor" in parts:
        res.update(bench_floor(cfg, model_cfg, rt))
    if "hf" in parts:
        res.update(bench_hf(cfg, model_cfg, rt))
    if "trl" in parts:
        res.update(bench_trl(cfg, model_cfg, rt))
    res["peak_memory_bytes"] = mem
    res["peak_memory_kind"] = "cuda max_memory_allocated per part" if rt.device_type == "cuda" else \
        "process max RSS so far (getrusage), cumulative"

    if cfg.json:
        print(json.dumps(res, indent=2))
        return
    print(f"GPT {cfg.n_layer} layers x {cfg.n_embd} wide, {cfg.n_head} heads, block {cfg.block_size}, vocab "
          f"{cfg.vocab_size}: {res['params'] / 1e6:.2f}M params | {device_name} | {rt.dtype} | torch {torch.__version__}"
          + (" | compiled" if cfg.compile else ""))
    rows = []
    if "train" in parts:
        rows.append(("SFT train tokens/s", f"{res['train_tokens_per_s']:,.0f}",
                     f"batch {cfg.batch_size} x {cfg.block_size} tokens, {res['train_s_per_step']:.3f} s/step"))
        rows.append(("SFT MFU", f"{100 * res['mfu']:.1f}%",
                     f"{res['flops_per_token'] / 1e6:.1f} MFLOP/token vs {res['peak_flops'] / 1e12:.3g} TFLOP/s "
                     f"({res['peak_flops_source']})"))
    if "generate" in parts:
        rows.append(("generate tokens/s, KV cache", f"{res['gen_tokens_per_s_kv_cache']:,.0f}",
                     f"batch {cfg.gen_batch_size or cfg.batch_size}, prompt {cfg.prompt_len}, "
                     f"{cfg.new_tokens} new tokens"))
    if "nocache" in parts:
        speedup = (f"KV cache is {res['gen_tokens_per_s_kv_cache'] / res['gen_tokens_per_s_no_cache']:.1f}x faster"
                   if "generate" in parts else "")
        rows.append(("generate tokens/s, no cache", f"{res['gen_tokens_per_s_no_cache']:,.0f}", speedup))
    if "ppo" in parts:
        rows.append(("PPO s/iteration", f"{res['ppo_iter_s']:.2f}",
                     f"rollout {res['ppo_rollout_s']:.2f} + update {res['ppo_update_s']:.2f}; {res['ppo_episodes']} "
                     f"episodes x {cfg.response_length} tokens, {res['ppo_epochs']} epochs x "
                     f"{res['ppo_minibatches']} minibatches"))
    if "rm" in parts:
        t, n = res["rm_s_per_step"], res["rm_tokens"]
        rows.append(("RM step, each prompt once", f"{res['rm_speedup']:.2f}x",
                     f"{cfg.rm_batch_size} prompts x {cfg.rm_responses} responses ({cfg.prompt_len} + "
                     f"{cfg.response_length} tokens): a row per response {min(t['row per response']):.3f} s "
                     f"({n['row per response']} tokens), each prompt once {min(t['prompt once']):.3f} s "
                     f"({n['prompt once']} tokens); best of {cfg.rounds} rounds, the ratio is the median round's"))
    if "floor" in parts:
        sft = res["floor_sft_linears_s"] + res["floor_sft_attention_s"]
        step = f"; the step itself {res['train_s_per_step']:.3f} s" if "train" in parts else ""
        rows.append(("SFT step floor (s)", f"{sft:.3f}",
                     f"its Linear products ({res['floor_sft_linear_flops'] / 1e9:.1f} GFLOP) "
                     f"{res['floor_sft_linears_s']:.3f} s + attention {res['floor_sft_attention_s']:.3f} s, each "
                     f"timed alone at its best{step}"))
        ppo = res["floor_ppo_scoring_s"] + res["floor_ppo_update_s"]
        it = f"; the iteration itself {res['ppo_iter_s']:.2f} s" if "ppo" in parts else ""
        rows.append(("PPO iteration floor (s)", f"{ppo:.2f}",
                     f"its Linear products only: scoring {res['floor_ppo_scoring_s']:.2f} s + update "
                     f"{res['floor_ppo_update_s']:.2f} s, each timed alone at its best (no generation, no "
                     f"attention){it}"))
    if "hf" in parts and "hf_train_s" not in res:
        rows.append(("Hugging Face", "skipped", res["hf"]))
    elif "hf" in parts:
        for part, what in (("train", f"SFT step, batch {cfg.batch_size} x {cfg.block_size}"),
                           ("generate", f"generate, batch {cfg.gen_batch_size or cfg.batch_size}, prompt "
                                        f"{cfg.prompt_len}, {cfg.new_tokens} new tokens")):
            t = res[f"hf_{part}_s"]
            rows.append((f"vs transformers {res['hf_transformers']}", f"{res[f'hf_{part}_speedup']:.2f}x",
                         f"{what}: ours {min(t['ours']):.3f} s, HF {min(t['hf']):.3f} s (best of "
                         f"{cfg.rounds} rounds; the ratio is the median round's, > 1 = ours faster)"))
    if "trl" in parts and "trl_best" not in res:
        rows.append(("TRL PPOTrainer", "skipped", res["trl"]))
    elif "trl" in parts:
        for p in ("float32", "bf16"):
            if f"trl_{p}_s" not in res:
                rows.append((f"vs TRL {res['trl_version']} PPO, {p}", "skipped", "this CPU has no native bf16"))
                continue
            t = res[f"trl_{p}_s"]
            rows.append((f"vs TRL {res['trl_version']} PPO, {p}", f"{res[f'trl_{p}_ratio']:.2f}x",
                         f"ours / TRL s per iteration: ours {statistics.median(t['ours']):.2f} s, TRL "
                         f"{statistics.median(t['trl']):.2f} s (medians of {cfg.rounds} alternating rounds; the "
                         f"ratio is the median round's, < 1 = ours faster)"))
        rows.append(("vs TRL at its best", f"{res['trl_best_ratio']:.2f}x", f"TRL's faster precision: {res['trl_best']}"))
    if mem:
        rows.append(("peak memory (MiB)", ", ".join(f"{k} {v / 2**20:,.0f}" for k, v in mem.items()),
                     res["peak_memory_kind"]))
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}s}  {value:>12s}  {note}")


if __name__ == "__main__":
    run(main)
