"""
GRPO, Dr. GRPO and RLOO: policy gradients whose baseline is the other responses to the same prompt, no critic.

For each prompt we sample --group_size (G) responses, score each with the reward model, and give every token of
response i the same advantage A_i, computed inside the prompt's group (--advantage):

    grpo      A_i = (r_i - mean(r)) / (std(r) + eps)         DeepSeekMath (Shao et al. 2024)
    dr_grpo   A_i = r_i - mean(r)                            Dr. GRPO (Liu et al. 2025): no std division
    rloo      A_i = r_i - 1/(G-1) sum_{j != i} r_j           RLOO (Ahmadian et al. 2024): leave-one-out mean

Then, like PPO, --num_epochs passes over the rollout in --num_minibatches minibatches with the clipped surrogate
per token, l_t = -min(ratio_t A_i, clip(ratio_t, 1 - eps, 1 + eps) A_i), averaged as each paper does:

    grpo      1/B sum_i 1/|y_i| sum_t l_t        each response's mean, then the batch mean
    dr_grpo   1/B sum_i 1/L_max sum_t l_t        a constant (--response_length) instead of |y_i|: no length bias
    rloo      1/B sum_i sum_t l_t                the sequence's log-likelihood, REINFORCE's estimator

The KL to the reference (the SFT model) goes where each paper put it (--kl_in):
    loss    (grpo, dr_grpo)   + beta * k3_t per token in the loss, k3 = pi_ref/pi - log(pi_ref/pi) - 1 >= 0
    reward  (rloo)            r_i = R(x, y_i) - beta * sum_t k1_t, k1 = log pi - log pi_ref, as in PPO
Models in memory: the policy, the frozen reference and the frozen reward model (PPO also holds a critic).

Run (after `make`, which trains out/sft and out/rm):
    python train_grpo.py --advantage grpo --out_dir out/grpo
    python train_grpo.py --advantage dr_grpo --out_dir out/dr_grpo
    python train_grpo.py --advantage rloo --out_dir out/rloo
    python train_grpo.py --out_dir out/grpo --resume       # continue with the run's saved flags (auto: if any)
    torchrun --standalone --nproc_per_node 2 train_grpo.py ... --grad_accum 2   # 2 GPUs, the same run (README "Many GPUs")

Writes to --out_dir: ckpt.pt (the policy, stage "grpo", loadable by evaluate.py like the PPO actor),
train_state.pt, metrics.jsonl (one row per iteration), samples.jsonl and samples.txt.

Deviations from the papers, on purpose:
- The same budget as train_ppo.py's defaults: 50 iterations x 64 episodes (16 prompts x G = 4), 4 epochs x
  4 minibatches per rollout (DeepSeekMath uses G = 64 and one update per rollout; RLOO uses k = 2 to 4 samples
  and one update, without the clip). With one epoch and one minibatch (--num_epochs 1 --num_minibatches 1) the
  clip never binds and the objective is plain REINFORCE; with more minibatches the later ones run after optimizer
  steps, so their ratios are not 1.
- A response that never emits EOS gets --missing_eos_penalty as its score, as in train_ppo.py.
- beta is relative to each placement's scale. In the reward it weighs the summed k1 against raw RM scores, as
  PPO's does (train_ppo.py's 0.3). In the loss it weighs a per-token k3 against the advantages: 0.2, not
  DeepSeekMath's 0.04, with which GRPO drifted to KL 7.6 on the built-in task and ended below the SFT model
  on held-out gold (README, "Beyond PPO"); 0.2 held it at KL 1.3, about where PPO and RLOO end.
- The std in grpo's advantage is the unbiased one (n - 1), and eps = 1e-4 (as TRL); a group whose G rewards are
  all equal gets advantages 0 for every variant (no NaN). Equal scores give equal rewards only with the KL in
  the loss (grpo, dr_grpo); with the KL in the reward (rloo) the responses of a group of equal scores still
  differ by their KL, so their advantages are not 0. The fraction of groups whose G scores are all equal is
  logged (equal_groups).
- Under torchrun every rank samples the whole batch of prompts x G (one shared random stream, so the responses are
  those of one process), scores its 1/WORLD_SIZE of the rows and the ranks gather them, so every group is whole and
  its advantages are those of one process; the update splits each minibatch's micro-batches over the ranks (DDP).
  Generation is not sped up by more ranks, the scoring passes and the update are.
"""

import time
from dataclasses import dataclass

import torch

from nanorlhf import data as D
from nanorlhf import dist
from nanorlhf import utils
from nanorlhf.losses import clip_fraction, clipped_surrogate, kl_penalty, logprobs_from_logits, masked_mean, masked_sum
from nanorlhf.rollout import (disable_dropout, encode_rollout_prompts, freeze, judged_samples, missing_eos_default,
                              next_prompt_indices, sample, truncate_and_score, write_samples)
from nanorlhf.train_common import (RESUME_HELP, ROLLOUT_RESUME_FREE, check_out_dir, check_rm_context,
                                   check_rollout_flags, gold_on, input_digests, load_run, optimizer_step,
                                   parse_stage_flags, resumed_flags, save_files, start_logging, wants_resume)
from nanorlhf.utils import check, flag

ADVANTAGES = ("grpo", "dr_grpo", "rloo")

# =============================================================================
# The group math: top-level functions that tests/test_grpo.py checks against float64 loops.
#
# A rollout holds B = n_prompts * G episodes, group-major: rows g*G .. g*G + G - 1 are the G responses to
# prompt g. Per-token tensors are response-only (B, N) with the mask convention of train_ppo.py (1 on the real
# response tokens, the EOS included, 0 on the pads after it).


def group_advantages(scores, group_size, kind, eps=1e-4):
    """
    One advantage per response from the scores of its group. scores (B,) group-major, B divisible by
    group_size G >= 2; kind in grpo | dr_grpo | rloo. -> (B,), the same dtype as scores.

    Example, one group r = [1, 2, 3]: mean 2, std 1 -> grpo [-1, 0, 1] / (1 + eps); dr_grpo [-1, 0, 1];
    rloo [1 - 2.5, 2 - 2, 3 - 1.5] = [-1.5, 0, 1.5]. Equal scores give 0 in all three.
    """
    G = group_size
    assert G >= 2 and scores.dim() == 1 and scores.numel() % G == 0, (tuple(scores.shape), G)
    r = scores.view(-1, G)  # (n_groups, G)
    mean = r.mean(dim=1, keepdim=True)  # (n_groups, 1)
    if kind == "grpo":
        # A_i = (r_i - mean(r)) / (std(r) + eps),  std with n - 1
        adv = (r - mean) / (r.std(dim=1, keepdim=True) + eps)
    elif kind == "dr_grpo":
        # A_i = r_i - mean(r)
        adv = r - mean
    elif kind == "rloo":
        # A_i = r_i - 1/(G-1) sum_{j != i} r_j
        adv = r - (r.sum(dim=1, keepdim=True) - r) / (G - 1)
    else:
        raise ValueError(f"unknown advantage {kind!r}, expected one of {ADVANTAGES}")
    # a group of equal scores: exactly 0, not the rounding residue of the mean (which grpo's division by a
    # std of ~1e-16 + eps would turn into a nonzero advantage)
    equal = (r == r[:, :1]).all(dim=1, keepdim=True)  # (n_groups, 1)
    return torch.where(equal, torch.zeros_like(adv), adv).view(-1)


def aggregate_loss(per_token, mask, kind, max_len):
    """
    The batch's loss from per-token losses. per_token, mask (B, N); max_len = the generation budget L_max.
    -> scalar, a mean over the B responses of a per-response quantity (so micro-batches weighted by their
    share of the responses add up to the minibatch's loss exactly):

        grpo      1/B sum_i (1/|y_i|) sum_t l_it     (a response without real tokens counts 0)
        dr_grpo   1/B sum_i (1/L_max) sum_t l_it
        rloo      1/B sum_i sum_t l_it

    Example: l = [[1, 1, 0], [2, 0, 0]], mask = [[1, 1, 0], [1, 0, 0]], L_max = 4 -> grpo (1 + 2) / 2 = 1.5,
    dr_grpo (2/4 + 2/4) / 2 = 0.5, rloo (2 + 2) / 2 = 2.
    """
    per_seq = masked_sum(per_token, mask, dim=1)  # (B,) sum over each response's real tokens
    if kind == "grpo":
        per_seq = per_seq / mask.sum(1).clamp(min=1).to(per_seq.dtype)
    elif kind == "dr_grpo":
        per_seq = per_seq / max_len
    elif kind != "rloo":
        raise ValueError(f"unknown advantage {kind!r}, expected one of {ADVANTAGES}")
    return per_seq.mean()


def equal_groups(scores, group_size):
    """
    Fraction of the groups whose G scores are all equal: with the KL in the loss their advantages are 0 (no
    learning signal); with the KL in the reward (rloo) only the KL tells their responses apart.
    """
    r = scores.view(-1, group_size)  # (n_groups, G)
    return (r == r[:, :1]).all(dim=1).float().mean().item()


# =============================================================================
# The training loop


@dataclass
class Args:
    # data and checkpoints
    data: str = flag("out/data/prompts.jsonl", "JSONL of {\"prompt\": ...} to roll out on")
    sft: str = flag("out/sft", "SFT checkpoint directory: the policy starts here and the reference stays here")
    rm: str = flag("out/rm", "reward model checkpoint directory")
    out_dir: str = flag("out/grpo", "where ckpt.pt, train_state.pt, metrics.jsonl and samples go")
    resume: str = flag("off", RESUME_HELP + "; a larger --num_iterations extends the run")
    gold: str = flag("auto", "log the built-in task's gold score: auto (when the prompts look like the task's), on, off")
    # runtime
    device: str = flag("auto", "auto | cpu | cuda | cuda:1 | mps")
    dtype: str = flag("auto", "auto | float32 | bfloat16 (autocast; auto: bf16 where GPU or CPU has it natively)")
    compile: bool = flag(False, "torch.compile the policy's forward pass")
    grad_checkpointing: bool = flag(False, "recompute activations in backward (less memory, ~30% slower)")
    seed: int = flag(0, "seed for python, numpy, torch, and the prompt order")
    # the algorithm
    advantage: str = flag("grpo", "grpo: (r - mean) / (std + eps) | dr_grpo: r - mean, loss / L_max | rloo: leave-one-out")
    group_size: int = flag(4, "G: responses sampled per prompt (>= 2)")
    kl_in: str = flag("auto", "where the KL to the reference goes: loss (k3 per token) | reward (k1 summed) | "
                              "auto = loss for grpo and dr_grpo, reward for rloo (as the papers)")
    kl_coef: float | None = flag(None, "beta; default 0.2 with --kl_in loss (DeepSeekMath: 0.04), 0.3 with reward (train_ppo.py's)")
    adv_eps: float = flag(1e-4, "eps in grpo's (r - mean) / (std + eps)")
    # rollout
    num_iterations: int = flag(50, "iterations (one rollout + its update each)")
    batch_size: int = flag(64, "episodes per rollout: batch_size / group_size prompts, group_size responses each")
    response_length: int = flag(24, "maximum new tokens per response (L_max of dr_grpo)")
    temperature: float = flag(1.0, "sampling temperature; training logprobs divide the logits by the same value")
    missing_eos_penalty: float | None = flag(None, "score that replaces the RM's for a response without EOS; default: "
                                             "2 std below the demonstrations' mean RM score (stored by train_rm.py), else -1")
    # update
    num_epochs: int = flag(4, "passes over each rollout")
    num_minibatches: int = flag(4, "minibatches per pass (one optimizer step each)")
    grad_accum: int = flag(1, "micro-batches per minibatch over all ranks (memory only: the same gradient; under "
                              "torchrun each rank runs grad_accum / WORLD_SIZE of them)")
    lr: float = flag(2e-4, "learning rate (AdamW)")
    anneal_lr: bool = flag(True, "decay the learning rate linearly to 0 over the run")
    weight_decay: float = flag(0.0, "AdamW weight decay (matrices only)")
    beta1: float = flag(0.9, "AdamW beta1")
    beta2: float = flag(0.95, "AdamW beta2")
    clip_coef: float = flag(0.2, "epsilon of the clipped surrogate: ratio stays in [1 - eps, 1 + eps]")
    max_grad_norm: float = flag(1.0, "clip the gradient norm to this (0: no clipping)")
    # logging and checkpoints
    sample_interval: int = flag(10, "write prompt/response samples every N iterations")
    num_samples: int = flag(4, "samples per write")
    save_interval: int = flag(25, "checkpoint every N iterations (and at the end)")
    stop_at: int | None = flag(None, "stop (with a checkpoint) after this iteration; the lr schedule still runs to "
                                     "--num_iterations (continue with --resume)")


# flags a resumed run may take from the command line: where it runs, what it logs and how often it saves, as in
# train_ppo.py, and a larger --num_iterations, which extends the run
RESUME_FREE = ROLLOUT_RESUME_FREE + ("num_iterations",)
# flags whose default main() resolves from the other flags and the RM before they are saved: a resumed run given
# that default (the command that started it) takes the saved value (train_common.resumed_flags)
RESOLVED_AT_START = ("kl_in", "kl_coef", "missing_eos_penalty")


def check_args(args, given=()):
    """
    Derived sizes and flag combinations, checked before anything is loaded or written; then --kl_in auto and
    --kl_coef none resolved (RESOLVED_AT_START). given: the flags the command line named.
    """
    check(args.advantage in ADVANTAGES, f"--advantage {args.advantage!r}: expected one of {', '.join(ADVANTAGES)}")
    # only grpo divides by the std: an eps given with another advantage would be accepted and ignored
    check(args.advantage == "grpo" or "adv_eps" not in given,
          f"--adv_eps does nothing with --advantage {args.advantage} (only grpo divides by std + eps)")
    check(args.group_size >= 2, f"--group_size {args.group_size}: a group needs at least 2 responses (G >= 2)")
    check_rollout_flags(args)  # the sizes, AdamW, samples and checkpoints, as train_ppo.py checks them
    check(args.batch_size % args.group_size == 0,
          f"--batch_size {args.batch_size} must be divisible by --group_size {args.group_size} (whole groups)")
    check(args.kl_in in ("auto", "loss", "reward"), f"--kl_in {args.kl_in!r}: expected auto, loss or reward")
    check(args.kl_coef is None or args.kl_coef >= 0, "--kl_coef must be >= 0")
    check(args.clip_coef > 0, f"--clip_coef must be > 0 (the ratio stays in [1 - eps, 1 + eps]), got {args.clip_coef}")
    check(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    check(args.adv_eps > 0, "--adv_eps must be > 0")
    check(args.num_iterations >= 1 and args.num_epochs >= 1, "--num_iterations and --num_epochs must be >= 1")
    if args.kl_in == "auto":
        args.kl_in = "reward" if args.advantage == "rloo" else "loss"
    if args.kl_coef is None:
        args.kl_coef = 0.2 if args.kl_in == "loss" else 0.3


@torch.no_grad()
def make_experience(actor, ref, reward_model, context, context_mask, response, tok, args, rt):
    """
    Steps 2-6 of the rollout for already sampled responses (group-major rows). Returns a dict of tensors.
    context (B, T) left-padded prompts, context_mask (B, T), response (B, N) as sampled.
    """
    # 2. truncate after the first EOS; 3. score: the RM's score at the last real token (--missing_eos_penalty for a
    # response without EOS), logprobs under the policy (they become pi_old) and the reference, at the sampling
    # temperature (train_ppo.make_experience draws the masking convention); the ranks gather the rows, so that every
    # group is whole on every rank. No critic: exp["values"] is None
    exp = truncate_and_score(actor, ref, reward_model, context, context_mask, response, tok, args, rt)
    scores = exp["scores"]  # (B,)
    # KL_i = sum_t k1_t,  k1 = log pi - log pi_ref: the response's KL to the reference
    kl = masked_sum(kl_penalty(exp["logprobs"], exp["ref_logprobs"], "k1"), exp["response_mask"], dim=1)  # (B,)

    # 4. the reward each response is judged by: r_i = R(x, y_i) [- beta * KL_i with --kl_in reward]
    rewards = scores - args.kl_coef * kl if args.kl_in == "reward" else scores
    # 5.-6. (no whitening, no GAE) the advantage of each response within its group
    advantages = group_advantages(rewards, args.group_size, args.advantage, args.adv_eps)  # (B,)
    del exp["values"]  # no critic
    return {**exp, "kl": kl, "rewards": rewards, "advantages": advantages}


def grpo_update(actor, opt, exp, args, rt, lr, iteration=None):
    """
    --num_epochs passes of shuffled minibatches over one rollout, one optimizer step (at learning rate lr) per
    minibatch. A NaN or inf minibatch loss or gradient norm stops the run before its step, naming the iteration
    (1-based; None: not named), the epoch and the minibatch.
    Returns a dict of floats averaged over all minibatches, plus "first_ratio_max_dev": max |ratio - 1| over the
    real tokens of the first minibatch of the first epoch (0 up to float error: nothing has moved yet).
    Under torchrun (actor wrapped by dist.wrap) every rank holds the whole rollout and draws the same minibatches,
    runs its share of each minibatch's --grad_accum micro-batches, and the ranks sum their gradients on their last
    one; the weights (share of the responses, of the tokens) are those of the whole minibatch, so the sum is the
    gradient of one process, and the logged numbers are summed over the ranks.
    """
    B, T = exp["seq"].size(0), exp["context_len"]
    mb_size = B // args.num_minibatches
    micro_size = mb_size // args.grad_accum
    kl_in_loss = args.kl_in == "loss" and args.kl_coef > 0
    stats = {k: [] for k in ("loss", "pg_loss", "kl_loss", "clipfrac", "ratio")}
    first_ratio_max_dev = torch.zeros((), device=exp["seq"].device)
    actor.train()
    for epoch in range(args.num_epochs):
        b_inds = torch.randperm(B)
        for start in range(0, B, mb_size):
            mb_inds = b_inds[start:start + mb_size]
            mb_stats = {k: 0.0 for k in stats}
            mb_mask = exp["response_mask"][mb_inds]
            n_tokens = mb_mask.sum().clamp(min=1)
            mine = dist.mine(range(0, mb_size, micro_size))  # this rank's micro-batches of the minibatch
            for k, mstart in enumerate(mine):
                i = mb_inds[mstart:mstart + micro_size]
                dist.sync_grads(actor, k == len(mine) - 1)  # the ranks sum their gradients on the last one
                seq, seq_mask, mask = exp["seq"][i], exp["seq_mask"][i], exp["response_mask"][i]  # (b, T + N), (b, N)
                share = len(i) / mb_size  # aggregate_loss is a mean over responses: weigh by the count
                with rt.autocast():
                    # the logits at T-1+t predict y_t: the last N + 1 positions' logits without the last one
                    logits = actor(seq, seq_mask, logits_to_keep=seq.size(1) - T + 1)[:, :-1]  # (b, N, V)
                new_logprobs = logprobs_from_logits(logits, exp["response"][i], args.temperature)  # (b, N)
                # l_t = -min(ratio_t * A_i, clip(ratio_t, 1 - eps, 1 + eps) * A_i)
                pg_tokens, ratio = clipped_surrogate(new_logprobs, exp["logprobs"][i], exp["advantages"][i][:, None],
                                                     mask, args.clip_coef)  # (b, N), (b, N)
                pg_loss = aggregate_loss(pg_tokens, mask, args.advantage, args.response_length)
                loss = pg_loss
                if kl_in_loss:
                    # + beta * k3_t,  k3 = pi_ref / pi - log(pi_ref / pi) - 1, aggregated like the surrogate
                    kl_tokens = kl_penalty(new_logprobs, exp["ref_logprobs"][i], "k3")  # (b, N)
                    kl_loss = aggregate_loss(kl_tokens, mask, args.advantage, args.response_length)
                    loss = loss + args.kl_coef * kl_loss
                    mb_stats["kl_loss"] += kl_loss.detach() * share
                (loss * share).backward()
                with torch.no_grad():
                    tok_share = mask.sum() / n_tokens
                    clipfrac = clip_fraction(ratio, exp["advantages"][i][:, None], mask, args.clip_coef)
                    mb_stats["clipfrac"] += clipfrac * tok_share
                    mb_stats["ratio"] += masked_mean(ratio, mask) * tok_share
                if epoch == 0 and start == 0:
                    first_ratio_max_dev = torch.maximum(first_ratio_max_dev, ((ratio.detach() - 1).abs() * mask).max())
                mb_stats["loss"] += loss.detach() * share
                mb_stats["pg_loss"] += pg_loss.detach() * share
            mb_stats = dist.all_reduce_dict(mb_stats)  # the minibatch's numbers: the sum of the ranks' shares
            where = f"iteration {iteration} " if iteration is not None else ""
            where += f"epoch {epoch + 1} minibatch {start // mb_size + 1}"
            optimizer_step(actor, opt, lr, args.max_grad_norm, where, mb_stats["loss"])
            for k, v in mb_stats.items():
                stats[k].append(v)
    out = {k: float(sum(v) / len(v)) for k, v in stats.items() if k != "kl_loss" or kl_in_loss}
    out["first_ratio_max_dev"] = float(dist.all_reduce_max(first_ratio_max_dev))
    return out


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_stage_flags(Args, argv, description=__doc__)
    given = args._given  # the flags argv names (a resumed run's args are the saved ones, without this set)
    resuming = wants_resume(args.resume, args.out_dir)
    # first, so that --resume in another stage's directory says so, not that its flags differ; a resumed run's
    # --sft and --rm are its saved ones, checked when it started
    check_out_dir(args.out_dir, "grpo", {} if resuming else {"--sft": args.sft, "--rm": args.rm})
    state = None
    if resuming:
        ckpt, state = load_run(args.out_dir)
        # the saved flags, but for where it runs, what it logs and how long (RESUME_FREE)
        args = resumed_flags(args, ckpt, RESUME_FREE, RESOLVED_AT_START)
        # --num_iterations may extend the run, not shorten it: a smaller one would change the learning rate of the
        # iterations left (the schedule decays to 0 at --num_iterations) and end the run early, silently
        saved = ckpt["args"].get("num_iterations", args.num_iterations)
        del ckpt  # only its flags were needed (load_run maps its weights, read from out_dir with the model below)
        check(args.num_iterations >= saved, f"--resume: --num_iterations {args.num_iterations} is below the run's "
                                            f"{saved} (a larger value extends the run; a smaller one cannot)")
    check_args(args, given)
    rt = utils.setup_runtime(dist.setup(args.device), args.dtype, args.seed, training=True)
    G = args.group_size
    n_prompts_per_batch = args.batch_size // G

    # data (validated before anything is written), and the files the run reads: the same ones when it resumes
    inputs = input_digests({"--data": args.data, "--sft": args.sft, "--rm": args.rm}, state, given)
    prompts = D.read_prompts(args.data)
    use_gold = gold_on(args.gold, prompts, args.data)

    # models: the policy, the frozen reference (the SFT model) and the frozen reward model; no critic
    actor, tok, _ = utils.load_model(args.out_dir if state is not None else args.sft, rt.device, kind="gpt",
                                   flag=None if state is not None else "--sft")
    ref, ref_tok, _ = utils.load_model(args.sft, rt.device, kind="gpt", flag="--sft")
    reward_model, rm_tok, rm_ckpt = utils.load_model(args.rm, rt.device, kind="scalar", stage="rm", flag="--rm")
    if args.missing_eos_penalty is None:
        args.missing_eos_penalty = missing_eos_default(rm_ckpt)
    check(ref_tok.same_encoding(tok) and rm_tok.same_encoding(tok),
          f"{args.sft} and {args.rm} use different tokenizers; the RM must score the policy's tokens")
    check_rm_context(actor, reward_model, args.sft, args.rm)
    for m in (actor, ref, reward_model):
        disable_dropout(m)
    freeze(ref)
    freeze(reward_model)
    actor.grad_checkpointing = args.grad_checkpointing
    # prompts, cut from the left so that prompt + response fits the context
    prompt_ids = encode_rollout_prompts(prompts, tok, actor.config.block_size, args.response_length)

    fwd_actor = utils.maybe_compile(actor, args.compile)
    train_actor = dist.wrap(fwd_actor)  # DDP under torchrun: the update's gradients are summed over the ranks
    opt = utils.configure_optimizer(actor, args.lr, args.weight_decay, (args.beta1, args.beta2), rt.device_type)
    start_iter, sampler_state = 0, {"epoch": 0, "pos": 0}
    if state is not None:
        opt.load_state_dict(state.pop("optimizer"))  # not kept in state: on a GPU a CPU copy
        sampler_state = state["data"]
        start_iter = state["step"]
        utils.set_rng_state(state["rng"])
    stop = args.stop_at or args.num_iterations
    if start_iter >= stop:
        print(f"nothing to do: the run in {args.out_dir} is at iteration {start_iter} (a larger --num_iterations "
              f"extends it)")
        dist.cleanup()
        return
    models_resident = 3  # policy, reference, reward model

    def save(iteration):
        if not dist.is_main():  # the ranks hold the same weights and random state: rank 0 writes them
            return
        save_files(args.out_dir, {  # all or nothing: a kill leaves a pair of one iteration (train_common.save_files)
            utils.TRAIN_STATE: {"optimizer": opt.state_dict(), "rng": utils.rng_state(), "data": sampler_state,
                                "step": iteration, "inputs": inputs},
            utils.CKPT: utils.model_payload(actor, tok, "grpo", args, iteration, models_resident=models_resident)})

    logger = start_logging(args.out_dir, state is not None, start_iter)
    print(f"{args.advantage}: {len(prompts)} prompts, policy {actor.num_params() / 1e6:.2f}M params, "
          f"{args.num_iterations} iterations x {n_prompts_per_batch} prompts x G = {G}, KL in the {args.kl_in} "
          f"(beta {args.kl_coef}), score without EOS {args.missing_eos_penalty}, device {rt.device} {rt.dtype}, "
          f"gold {'on' if use_gold else 'off'}")
    timer = utils.Timer(stop, start_iter)
    for it in range(start_iter, stop):
        lr = (1.0 - it / args.num_iterations) * args.lr if args.anneal_lr else args.lr
        # rollout: 1. generate G responses per prompt (the prompt's row repeated G times, group-major), 2.-6.
        # make_experience
        t0 = time.time()
        pidx, sampler_state = next_prompt_indices(len(prompts), n_prompts_per_batch, args.seed, sampler_state)
        idx = [i for i in pidx for _ in range(G)]
        batch, response = sample(actor, prompt_ids, idx, tok, args, rt)
        exp = make_experience(fwd_actor, ref, reward_model, batch["idx"], batch["attention_mask"], response, tok, args, rt)
        t_rollout = time.time() - t0
        # update
        t0 = time.time()
        upd = grpo_update(train_actor, opt, exp, args, rt, lr, iteration=it + 1)
        t_update = time.time() - t0

        mask = exp["response_mask"]
        row = {
            "iter": it + 1,
            "score": exp["scores"].mean().item(),
            "rm_score": exp["rm_scores"].mean().item(),
            "kl": exp["kl"].mean().item(),
            "reward": exp["rewards"].mean().item(),
            "equal_groups": equal_groups(exp["scores"], G),  # the scores: KL-shaped rewards (rloo) never tie
            "adv_abs": exp["advantages"].abs().mean().item(),
            "entropy": masked_mean(exp["entropy"], mask).item(),
            "response_length": mask.sum(-1).float().mean().item(),
            "eos_frac": exp["has_eos"].float().mean().item(),
            "lr": lr,
            **upd,
            "t_rollout": t_rollout,
            "t_update": t_update,
        }
        sample_now = it == 0 or (it + 1) % args.sample_interval == 0
        if use_gold or sample_now:
            samples = judged_samples(tok, [prompts[i] for i in idx], exp["response"], mask, exp["scores"], use_gold)
        if use_gold:
            row["gold"] = sum(s["gold"] for s in samples) / len(samples)
        logger.log(row)
        gold = f" gold {row['gold']:.3f} |" if use_gold else ""
        print(f"iter {it + 1}/{args.num_iterations} | score {row['score']:+.3f} |{gold} kl {row['kl']:.2f} | "
              f"equal groups {row['equal_groups']:.2f} | ent {row['entropy']:.2f} clip {row['clipfrac']:.3f} | "
              f"len {row['response_length']:.1f} eos {row['eos_frac']:.2f} | "
              f"{t_rollout:.1f}s + {t_update:.1f}s | left {utils.fmt_time(timer.eta(it))}", flush=True)
        if sample_now and dist.is_main():
            write_samples(args.out_dir, it + 1, samples[:args.num_samples])
        if (it + 1) % args.save_interval == 0 or it + 1 == stop:
            save(it + 1)
    if stop < args.num_iterations:
        print(f"stopped at iteration {stop} (--stop_at); continue with --resume")
    else:
        print(f"done: iteration {stop}; {utils.fmt_time(time.time() - timer.t0)}; saved {args.out_dir}/{utils.CKPT}")
    dist.cleanup()


if __name__ == "__main__":
    utils.run(main)
