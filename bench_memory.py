"""
Seconds per PPO iteration for train_ppo.py's memory options on the same settings: --critic shared against
--critic separate (the shared trunk drops one trunk's forward in the rollout and one forward and backward per
micro-batch in the update), and LoRA. Random models of one size, train_ppo.py's own build_models,
generate_responses, make_experience and ppo_update, every option timed in each round in alternating order,
so that a busy machine slows them alike; prints the median seconds per iteration and the median ratio to
the first option over the rounds.

    python bench_memory.py                                  # full vs shared, the CPU default model (4 x 128)
    python bench_memory.py --options full,shared,lora+shared --lora_rank 8 --rounds 7
"""

import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

import train_ppo
from nanorlhf import data as D
from nanorlhf import footprint, utils
from nanorlhf.model import GPT, GPTConfig, ScalarGPT
from nanorlhf.rollout import generate_responses
from nanorlhf.tokenizer import Tokenizer
from nanorlhf.utils import check, flag

PROMPTS = ["sort 5 3 8 1", "sort 2 9 4", "sort 7 7 1 0 3 6", "sort 4 1 2", "sort 9 8 7 6 5 4 3 2", "sort 0 1"]


@dataclass
class Args:
    n_layer: int = flag(4, "layers")
    n_head: int = flag(4, "attention heads")
    n_embd: int = flag(128, "width")
    block_size: int = flag(256, "context")
    options: str = flag("full,shared", "comma-separated options (full, shared, lora, lora+shared); ratios are to the first")
    lora_rank: int = flag(8, "LoRA rank of the options with lora")
    batch_size: int = flag(64, "episodes per iteration (train_ppo.py --batch_size)")
    response_length: int = flag(24, "new tokens per response")
    rounds: int = flag(5, "timed rounds (one iteration of every option each), after one warm-up round")
    device: str = flag("auto", "auto | cpu | cuda")
    dtype: str = flag("float32", "float32 | bfloat16 (autocast)")
    seed: int = flag(0, "seed")


def check_args(args, tok):
    """
    The flags' checks, right after parsing: sizes that would fail deep inside train_ppo.py's functions (or time
    something other than what the table names) are refused in one line. Returns the list of options.
    """
    known = ("full", "shared", "lora", "lora+shared")
    options = [o for o in args.options.split(",") if o]
    check(options, f"--options {args.options!r}: name at least one of {', '.join(known)}")
    for o in options:
        check(o in known, f"--options: unknown option {o!r} (expected {', '.join(known)})")
        check(options.count(o) == 1, f"--options {args.options!r}: {o} is named twice")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "response_length", "rounds"):
        check(getattr(args, name) >= 1, f"--{name} must be at least 1, got {getattr(args, name)}")
    check(args.n_embd % args.n_head == 0, f"--n_embd {args.n_embd} must be divisible by --n_head {args.n_head}")
    # without adapters a lora option would time the full model under the label "lora"
    uses_lora = any("lora" in o for o in options)
    check(args.lora_rank >= 1 or not uses_lora, f"--lora_rank must be at least 1 for the lora options, got "
                                                f"{args.lora_rank}")
    check(uses_lora or "lora_rank" not in getattr(args, "_given", ()),
          f"--lora_rank does nothing without a lora option in --options {args.options!r}")
    # train_ppo.py's defaults split the batch into minibatches, and each into micro-batches
    n_mb, accum = train_ppo.Args.num_minibatches, train_ppo.Args.grad_accum
    check(args.batch_size % (n_mb * accum) == 0,
          f"--batch_size {args.batch_size} must be divisible by train_ppo.py's num_minibatches x grad_accum "
          f"({n_mb} x {accum})")
    # the longest prompt and its response are scored in one sequence, which must fit the context
    longest = max(len(tok.render_prompt(p)) for p in PROMPTS[:args.batch_size])
    check(longest + args.response_length <= args.block_size,
          f"the longest prompt ({longest} tokens) + --response_length {args.response_length} must fit --block_size "
          f"{args.block_size}")
    return options


def setup(option, args, ckpt_dir, rt):
    """train_ppo.py's models and optimizers for one option."""
    o = footprint.options_of(option)
    ppo_args = train_ppo.Args(sft=os.path.join(ckpt_dir, "sft"), rm=os.path.join(ckpt_dir, "rm"),
                              batch_size=args.batch_size, response_length=args.response_length,
                              critic="shared" if o["shared"] else "separate",
                              lora_rank=args.lora_rank if o["lora"] else 0)
    m = train_ppo.build_models(ppo_args, rt.device)
    betas = (ppo_args.beta1, ppo_args.beta2)
    actor_opt = utils.configure_optimizer(m["actor"], ppo_args.lr, 0.0, betas, rt.device_type)
    critic_opt = None
    if m["critic"] is not None:
        critic_opt = utils.configure_optimizer(m["critic"], ppo_args.critic_lr, 0.0, betas, rt.device_type)
    return ppo_args, m, actor_opt, critic_opt


def iteration(ppo_args, m, actor_opt, critic_opt, batch, rt):
    """One rollout and its update, as train_ppo.main runs them; returns (rollout s, update s)."""
    sync = torch.cuda.synchronize if rt.device_type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    m["actor"].eval()
    with rt.autocast():
        response = generate_responses(m["actor"], batch["idx"], batch["attention_mask"], m["tok"], ppo_args)
    exp = train_ppo.make_experience(m["actor"], m["ref"], m["reward_model"], m["critic"], batch["idx"],
                                    batch["attention_mask"], response, m["tok"], ppo_args, ppo_args.kl_coef, rt)
    sync()
    t1 = time.perf_counter()
    train_ppo.ppo_update(m["actor"], m["critic"], actor_opt, critic_opt, exp, ppo_args, rt)
    sync()
    return t1 - t0, time.perf_counter() - t1


def main(argv=None):
    args = utils.parse_flags(Args, argv, description=__doc__)
    tok = Tokenizer.byte_level()
    options = check_args(args, tok)
    rt = utils.setup_runtime(args.device, args.dtype, args.seed, training=True)
    config = GPTConfig(block_size=args.block_size, vocab_size=tok.vocab_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd)
    with tempfile.TemporaryDirectory() as d:
        utils.save_checkpoint(os.path.join(d, "sft"), utils.model_payload(GPT(config), tok, "sft", {}, 0))
        utils.save_checkpoint(os.path.join(d, "rm"), utils.model_payload(ScalarGPT(config), tok, "rm", {}, 0))
        runs = {o: setup(o, args, d, rt) for o in options}
    prompts = [tok.render_prompt(PROMPTS[i % len(PROMPTS)]) for i in range(args.batch_size)]
    batch = D.to_device(D.collate(prompts, tok.pad_id, left_pad=True), rt.device)
    times = {o: [] for o in options}
    print(f"{args.n_layer} x {args.n_embd}, {args.batch_size} episodes x {args.response_length} tokens, "
          f"{rt.device} {rt.dtype}, {torch.get_num_threads()} threads; {args.rounds} rounds after a warm-up")
    for r in range(args.rounds + 1):
        order = options if r % 2 == 0 else options[::-1]  # alternate who goes first
        for o in order:
            torch.manual_seed(args.seed + r)  # the same prompts and samples for every option in a round
            t = iteration(*runs[o], batch, rt)
            if r > 0:
                times[o].append(t)
        if r > 0:
            print(f"round {r}: " + ", ".join(f"{o} {sum(times[o][-1]):.2f} s" for o in options), flush=True)
    base = options[0]
    print(f"\n| option | s/iteration (median) | rollout | update | speed-up vs {base} (median of rounds) |")
    print("|---|---|---|---|---|")
    for o in options:
        total = [a + b for a, b in times[o]]
        ratio = statistics.median((a0 + b0) / (a + b) for (a0, b0), (a, b) in zip(times[base], times[o]))
        print(f"| {o} | {statistics.median(total):.2f} | {statistics.median(a for a, _ in times[o]):.2f} | "
              f"{statistics.median(b for _, b in times[o]):.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    utils.run(main)
