"""
Stage 3 of InstructGPT: PPO against the reward model, held near the SFT model by a KL penalty.

Four models (seed section 3.1):
    actor      pi_theta   trained   starts as the SFT model
    critic     V_phi      trained   starts as the reward model (InstructGPT initialises the value function from the RM)
    reference  pi_ref     frozen    the SFT model
    reward     R          frozen    the reward model
One iteration = one rollout of --batch_size prompts, then --ppo_epochs passes over it in --num_minibatches
shuffled minibatches. The objective the actor climbs is (seed section 3.2, InstructGPT eq. 2):

    R_total(x, y) = R(x, y) - beta * log(pi_theta(y|x) / pi_ref(y|x))      [+ ptx_coef * log-likelihood of SFT data]

Run (after train_sft.py and train_rm.py; `make` does all of it):
    python train_ppo.py --data out/data/prompts.jsonl --sft out/sft --rm out/rm --out_dir out/ppo
    python train_ppo.py --out_dir out/ppo --resume             # continue from out/ppo/train_state.pt, saved flags
    python train_ppo.py ... --resume auto                      # continue if out/ppo has a checkpoint, else start
    python train_ppo.py ... --adaptive_kl --target_kl 2        # Ziegler et al.'s adaptive beta
    python train_ppo.py ... --ptx_coef 1 --ptx_data out/data/sft.jsonl   # PPO-ptx
    torchrun --standalone --nproc_per_node 2 train_ppo.py ... --grad_accum 2   # 2 GPUs, the same run (README "Many GPUs")
    python train_ppo.py ... --lora_rank 8 --critic shared      # memory (seed 3.3): LoRA adapters on one shared trunk
    python train_ppo.py ... --offload ref,rm                   # frozen models in CPU memory between their forwards

Writes to --out_dir: ckpt.pt (the actor, stage "ppo", loadable like any policy), critic.pt, train_state.pt
(what --resume needs), metrics.jsonl (one row per iteration), samples.jsonl and samples.txt, memory.json (the
measured bytes per model beside nanorlhf/footprint.py's prediction). ckpt.pt and critic.pt are plain models in
every option (LoRA merged); with LoRA, adapters.pt holds the adapters alone, for --resume.

Deviations from InstructGPT, on purpose:
- The KL penalty is per token (Ziegler et al., Stiennon et al.): r_t = -beta * kl_t on every response token and
  the RM score added at the last real token, rather than one sequence-level term. Summed over the response it is
  the same R_total; per token, GAE can assign it. kl_t is the k1 estimator log pi - log pi_ref by default;
  --kl_estimator k3 uses (ratio - 1) - log ratio with ratio = pi_ref / pi, which is never negative. Both are
  logged ("kl" is k1, "kl_k3" is k3, each summed over the response); the adaptive controller follows k1 whatever
  the reward uses: its sum over a response is exactly log pi(y|x) / pi_ref(y|x), the seed's and Ziegler et al.'s
  KL, so --target_kl means the same number with either estimator and matches the KL that evaluate.py reports.
- PPO-ptx mixes in the SFT data's response log-likelihood (a file you name), not the pretraining corpus.
- By default the actor and the critic are two networks with two AdamW optimizers, as in InstructGPT.
  So the size of --vf_coef barely matters: Adam's step does not change when a loss is scaled (up to its eps and
  gradient clipping); 0, where the critic would get no gradient and never train, is refused. With --critic shared
  (one trunk, a value head beside the LM head, one optimizer) it weighs the two losses against each other; the
  value head starts at zero, not from the RM (see build_models).
- A response that never emits EOS within --response_length gets the score --missing_eos_penalty instead of
  the RM's score (Stiennon et al. / summarize_from_feedback_details), so the policy cannot win by rambling.
- Scale: a 1M-parameter model and 50 x 64 = 3200 episodes by default (InstructGPT: 256k episodes). beta = 0.3
  is far above InstructGPT's 0.02 because it is relative to the RM's scale (here a std of about 2 on the
  demonstrations) and because a small RM is easy to over-optimise: on the built-in task beta 0.05 reached KL 3.5
  and a lower gold score than beta 0.25-0.4 (KL 1.3-1.8), which all did about equally well.
- The learning rates decay linearly to 0 over the run (as cleanrl and summarize_from_feedback_details do).
- Every loss is a mean over the minibatch's real response tokens (the pads after EOS and the prompt count for
  nothing), where the seed's compute_ppo_loss averages over the whole [batch, seq_len]; the advantages are whitened
  over the real tokens only.
- Under torchrun every rank samples the whole rollout batch (one shared random stream, so the responses are those
  of one process), then scores its 1/WORLD_SIZE of it and the ranks gather the rows: generation is not sped up
  by more ranks, the scoring passes and the update are (each rank runs --grad_accum / WORLD_SIZE micro-batches).
"""

import json
import os
import time
from dataclasses import dataclass

import torch

from nanorlhf import data as D
from nanorlhf import dist, footprint, lora
from nanorlhf import train_common as C
from nanorlhf import utils
from nanorlhf.losses import (clip_fraction, clipped_surrogate, entropy_from_logits, kl_penalty, logprobs_from_logits,
                             masked_mean, masked_var, sft_loss)
from nanorlhf.model import ScalarGPT, ValueHeadGPT, last_index
from nanorlhf.offload import offload
from nanorlhf.rollout import (disable_dropout, encode_rollout_prompts, freeze, judged_samples, missing_eos_default,
                              next_prompt_indices, sample, truncate_and_score, write_samples)
from nanorlhf.utils import check, flag


# =============================================================================
# The PPO math: top-level functions that tests/test_ppo_math.py checks against float64 loops.
# (seed section 3, Ziegler et al. 2019)
#
# Every tensor here is response-only: (B, N), position 0 is the first sampled token, with a response mask
# (B, N) that is 1 on the real response tokens (the EOS included) and 0 on the padding after the EOS:
#
#     r                0     1     2     3     4
#     response         y0    y1    EOS   pad   pad
#     mask             1     1     1     0     0
#     logprobs[:, r]   log pi(y_r | prompt, y_<r)   (the logits at the token before y_r, divided by the temperature)
#     values[:, r]     V(s_r), s_r = prompt + y_<r, the state in which y_r is chosen
#     rewards[:, r]    -beta * KL_r, plus the RM score at r = 2, the last real token; 0 on the pads

# -----------------------------------------------------------------------------
# rewards


def compute_rewards(logprobs, ref_logprobs, scores, mask, beta, estimator="k1"):
    """
    The KL-shaped per-token reward of InstructGPT / Ziegler et al.

    logprobs, ref_logprobs (B, N) under the rollout policy and the reference; scores (B,) the RM scores;
    mask (B, N); beta the KL coefficient. -> rewards (B, N), kl (B, N), both 0 on the pads.

        r_t = -beta * KL_t                       for every real token
        r_T = -beta * KL_T + R_RM(x, y)          at T, the last real token (the EOS, or the last sampled token when
                                                 there is none), whatever the row's length

    Summed over the response this is the seed's R_total = R_RM(x, y) - beta * log(pi(y|x) / pi_ref(y|x)).
    Example: KL = [[.1, .2, 0]], mask = [[1, 1, 0]], score 1, beta 0.5 -> rewards [[-.05, .9, 0]].
    """
    m = mask.to(logprobs.dtype)  # (B, N)
    kl = torch.where(mask.bool(), kl_penalty(logprobs, ref_logprobs, estimator), torch.zeros_like(m))  # (B, N)
    # r_t = -beta * KL_t
    rewards = -beta * kl  # (B, N)
    # r_T += R_RM(x, y) at the last real token T of each row (a row with no real token gets nothing)
    last = last_index(mask)  # (B,)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype) * m[rows, last]
    return rewards, kl


def sequence_kls(logprobs, ref_logprobs, mask):
    """
    The rollout's KL to the reference per response, averaged over the batch, by both estimators:
    {"kl": mean_b sum_t k1_bt, "kl_k3": mean_b sum_t k3_bt} over the real tokens (see kl_penalty).
    "kl" is what the adaptive controller follows, whichever estimator the reward uses (module docstring).
    """
    out = {}
    for name, est in (("kl", "k1"), ("kl_k3", "k3")):
        # KL(pi || pi_ref)(x) ~ sum_t kl_t over the response's real tokens, then the mean over the batch
        per_token = torch.where(mask.bool(), kl_penalty(logprobs, ref_logprobs, est), torch.zeros_like(logprobs))
        out[name] = per_token.sum(-1).mean().item()  # (B, N) -> (B,) -> mean
    return out


# -----------------------------------------------------------------------------
# advantages


def gae(rewards, values, mask, gamma, lam):
    """
    Generalized Advantage Estimation (Schulman et al. 2016), backwards over the response.

    rewards, values, mask (B, N) -> advantages (B, N), returns (B, N), both 0 on the pads.
    The episode ends at the last real token T: V(s_{T+1}) = 0. The mask must be 1 on one contiguous block
    per row: a prefix for response-only tensors (pads only after the EOS), or the response part of
    prompt | response | pad tensors, which gives the same numbers there.

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
        A_t     = delta_t + gamma * lam * A_{t+1}        ( = sum_k (gamma lam)^k delta_{t+k} )
        returns = A_t + V(s_t)                           (the critic's regression target)

    A loop over the N positions, each step vectorised over the batch (as in cleanrl's ppo.py).
    Example: gamma = lam = 1, one row, rewards [0, 1], values [.5, .5] -> advantages [.5, .5], returns [1, 1].
    """
    m = mask.to(values.dtype)  # (B, N)
    # the pads are past the end of the episode: no reward and V = 0 there, whatever the critic said
    rewards, values = rewards * m, values * m  # (B, N)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)  # (B, N) V(s_{t+1})
    # delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
    deltas = rewards + gamma * next_values - values  # (B, N) 0 on the pads
    advantages = torch.zeros_like(rewards)  # (B, N)
    last_gae = torch.zeros_like(rewards[:, 0])  # (B,) A_{t+1}
    for t in reversed(range(rewards.shape[1])):
        # A_t = delta_t + gamma * lambda * A_{t+1}   (stays 0 through the trailing pads)
        last_gae = deltas[:, t] + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * m  # 0 before the block too (the prompt, when the tensors include it)
    # returns_t = A_t + V(s_t)
    returns = advantages + values
    return advantages, returns


def masked_whiten(x, mask):
    """
    Normalise x to mean 0 and variance 1 over the real tokens only; pads are ignored and come back as 0.

    x, mask (B, N) -> (B, N). The variance is the unbiased one (divides by n - 1, as TRL and
    summarize_from_feedback_details; numpy's var(ddof=1)).
    Example: x = [[1, 3, 99]], mask = [[1, 1, 0]] -> mean 2, var 2 -> [[-0.7071, 0.7071, 0]].
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased=True)
    # x_hat = (x - mean) / sqrt(var + 1e-8)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# -----------------------------------------------------------------------------
# losses


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_coef):
    """
    PPO's clipped surrogate, as a loss to minimise (the seed's L^CLIP with the sign flipped): the masked mean of
    losses.clipped_surrogate's per-token losses, with statistics.

    logprobs (B, N) under the current policy (with grad); old_logprobs (B, N) from the rollout; advantages
    (B, N) whitened; clip_coef = epsilon. -> loss (scalar), stats dict of detached scalars:
    clipfrac (fraction of real tokens where the clipped term is the one used), approx_kl (k3 estimate of
    KL(pi_old || pi), Schulman's low-variance estimator), ratio (mean ratio; 1 on the first minibatch).

    Where the clip binds on the bounding side (A > 0 and ratio > 1 + eps, or A < 0 and ratio < 1 - eps)
    the loss is a constant and the gradient is exactly 0: the update cannot push further in that direction.
    Example: A = 1, ratio = 1.5, eps = 0.2 -> loss = max(-1.5, -1.2) = -1.2, gradient 0.
    """
    # L^CLIP = mean_t min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps) * A_t),  ratio_t = pi_theta(y_t) / pi_old(y_t)
    # pg_loss = -L^CLIP = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))   (pads: ratio 1, loss 0)
    per_token, ratio = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_coef)  # (B, N), (B, N)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        # approx KL(pi_old || pi) = E[(ratio - 1) - log ratio]
        approx_kl = masked_mean((ratio - 1) - (logprobs - old_logprobs), mask)
        stats = {"clipfrac": clip_fraction(ratio, advantages, mask, clip_coef), "approx_kl": approx_kl,
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values, old_values, returns, mask, clip_range_value):
    """
    Clipped value loss (as in OpenAI's baselines PPO2 and lm-human-preferences).

    values (B, N) of the critic now (with grad); old_values (B, N) from the rollout; returns G (B, N) from gae;
    clip_range_value = c. -> loss (scalar), stats {"vf_clipfrac": fraction of real tokens where the clipped
    error is the larger one}.

        V_clip = clip(V, V_old - c, V_old + c)
        L_V    = 0.5 * mean_t max((V - G)^2, (V_clip - G)^2)

    Like the policy clip, it keeps the critic from moving far from its rollout values in one iteration.
    Example: V = 2, V_old = 0, G = 3, c = 0.2 -> max(1, 7.84) / 2 = 3.92.
    """
    # V_clip = V_old + clip(V - V_old, -c, c)
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    # L_V = 0.5 * max((V - G)^2, (V_clip - G)^2)
    vf_losses = (values - returns) ** 2  # (B, N)
    vf_losses_clipped = (values_clipped - returns) ** 2  # (B, N)
    loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((vf_losses_clipped > vf_losses).to(vf_losses.dtype), mask)
    return loss, {"vf_clipfrac": vf_clipfrac}


def explained_variance(values, returns, mask):
    """
    1 - Var[G - V] / Var[G] over the real tokens, G the returns and V the values -> float (as in cleanrl's ppo.py).
    1 is a perfect critic, 0 is no better than a constant, < 0 is worse; NaN when the returns are constant.
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns.item() == 0:
        return float("nan")
    # EV = 1 - Var[G - V] / Var[G]
    return (1 - masked_var(returns - values, mask, unbiased=False) / var_returns).item()


# -----------------------------------------------------------------------------
# KL coefficient


class AdaptiveKLController:
    """
    Adaptive KL coefficient of Ziegler et al. 2019 (section 2.2), a proportional controller that steers
    the measured KL towards `target`:

        e_t      = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_t+1 = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    n_steps is the number of samples (responses) this iteration used, so `horizon` is counted in samples.
    Example: beta 0.1, target 6, horizon 10000; KL 12 over 256 samples -> e = 0.2, beta = 0.1 * 1.00512.
    """

    def __init__(self, init_beta, target, horizon):
        self.value = init_beta
        self.target = target
        self.horizon = horizon

    def update(self, current_kl, n_steps):
        # e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)
        proportional_error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        # beta_{t+1} = beta_t * (1 + e_t * n_steps / horizon)
        self.value *= 1 + proportional_error * n_steps / self.horizon


class FixedKLController:
    """A constant KL coefficient, with the same interface as AdaptiveKLController."""

    def __init__(self, init_beta):
        self.value = init_beta

    def update(self, current_kl, n_steps):
        pass


# =============================================================================
# The training loop


@dataclass
class Args:
    # data and checkpoints
    data: str = flag("out/data/prompts.jsonl", "JSONL of {\"prompt\": ...} to roll out on")
    sft: str = flag("out/sft", "SFT checkpoint directory: the actor starts here and the reference stays here")
    rm: str = flag("out/rm", "reward model checkpoint directory: the reward model, and the critic's start")
    out_dir: str = flag("out/ppo", "where ckpt.pt, critic.pt, train_state.pt, metrics.jsonl and samples go")
    resume: str = flag("off", "continue the run in out_dir (ckpt.pt, critic.pt, train_state.pt) with its saved flags: "
                              "on (a bare --resume), off, or auto (continue when out_dir holds a checkpoint, else start)")
    gold: str = flag("auto", "log the built-in task's gold score: auto (when the prompts look like the task's), on, off")
    # runtime
    device: str = flag("auto", "auto | cpu | cuda | cuda:1 | mps")
    dtype: str = flag("auto", "auto | float32 | bfloat16 (autocast; auto: bf16 where GPU or CPU has it natively)")
    compile: bool = flag(False, "torch.compile the actor and critic forward passes")
    grad_checkpointing: bool = flag(False, "recompute activations in backward (less memory, ~30% slower)")
    seed: int = flag(0, "seed for python, numpy, torch, and the prompt order")
    # rollout
    num_iterations: int = flag(50, "PPO iterations (one rollout + its update each)")
    batch_size: int = flag(64, "prompts per rollout (episodes per iteration)")
    response_length: int = flag(24, "maximum new tokens per response")
    temperature: float = flag(1.0, "sampling temperature; training logprobs divide the logits by the same value")
    missing_eos_penalty: float | None = flag(None, "score that replaces the RM's for a response without EOS; default: "
                                             "2 std below the demonstrations' mean RM score (stored by train_rm.py), else -1")
    # reward: R(x, y) - beta * KL
    kl_coef: float = flag(0.3, "beta: weight of the per-token KL penalty (the start value when --adaptive_kl)")
    kl_estimator: str = flag("k1", "per-token KL estimate in the reward: k1 = log pi - log pi_ref, k3 = (r - 1) - log r, "
                                   "r = pi_ref / pi (both are logged; --adaptive_kl follows k1)")
    adaptive_kl: bool = flag(False, "adapt beta towards --target_kl (Ziegler et al. 2019)")
    target_kl: float = flag(2.0, "target KL per sequence (nats) for --adaptive_kl")
    kl_horizon: int = flag(10000, "horizon in episodes of the adaptive KL controller")
    # advantages
    gamma: float = flag(1.0, "discount factor")
    gae_lambda: float = flag(0.95, "GAE lambda")
    # update
    ppo_epochs: int = flag(4, "passes over each rollout")
    num_minibatches: int = flag(4, "minibatches per pass (one optimizer step each)")
    grad_accum: int = flag(1, "micro-batches per minibatch over all ranks (memory only: the same gradient, PPO-ptx batch "
                              "included; under torchrun each rank runs grad_accum / WORLD_SIZE of them)")
    lr: float = flag(2e-4, "actor learning rate (AdamW)")
    critic_lr: float = flag(1e-4, "critic learning rate (AdamW)")
    anneal_lr: bool = flag(True, "decay both learning rates linearly to 0 over the run")
    weight_decay: float = flag(0.0, "AdamW weight decay (matrices only)")
    beta1: float = flag(0.9, "AdamW beta1")
    beta2: float = flag(0.95, "AdamW beta2")
    clip_coef: float = flag(0.2, "epsilon of the clipped surrogate: ratio stays in [1 - eps, 1 + eps]")
    vf_clip_coef: float = flag(0.2, "values move at most this far from the rollout's values (clipped value loss)")
    vf_coef: float = flag(0.1, "weight of the value loss, > 0 (at 0 the critic never trains); above 0 its size "
                               "barely matters to the separate critic with its own AdamW (Adam's step ignores a loss's "
                               "scale, up to eps and clipping); in a shared trunk it weighs the value loss against the "
                               "policy's")
    ent_coef: float = flag(0.0, "weight of the entropy bonus")
    max_grad_norm: float = flag(1.0, "clip each model's global gradient norm to this (0: no clipping)")
    # memory (seed section 3.3; build_models has the table of who holds which weights)
    lora_rank: int = flag(0, "LoRA rank of the adapters on actor and critic (0 = off: every weight trains)")
    lora_alpha: float = flag(16.0, "LoRA alpha: the adapters' update is (alpha / rank) B A")
    lora_targets: str = flag(lora.DEFAULT_TARGETS, "regex naming the Linear layers that get adapters")
    critic: str = flag("separate", "separate: a critic network of its own, started from the RM (InstructGPT); "
                                   "shared: a value head on the actor's trunk (one forward for both)")
    offload: str = flag("", "frozen models kept in CPU memory, on the accelerator only for their rollout "
                            "forwards: ref, rm or ref,rm")
    # PPO-ptx
    ptx_coef: float = flag(0.0, "weight of PPO-ptx (InstructGPT's gamma): ptx_coef * the SFT loss joins the actor loss "
                                "(0 = plain PPO)")
    ptx_data: str = flag("", "SFT JSONL ({prompt, response} or {messages}) for PPO-ptx")
    # logging and checkpoints
    sample_interval: int = flag(10, "write prompt/response samples every N iterations")
    num_samples: int = flag(4, "samples per write")
    save_interval: int = flag(25, "checkpoint every N iterations (and at the end)")
    stop_at: int | None = flag(None, "stop (with a checkpoint) after this iteration; the lr schedule still runs to "
                                     "--num_iterations (continue with --resume)")


CRITIC = "critic.pt"  # the critic's checkpoint beside ckpt.pt (the actor) in out_dir
ADAPTERS = "adapters.pt"  # the LoRA adapters alone (ckpt.pt and critic.pt hold merged weights): what --resume needs
OFFLOADABLE = ("ref", "rm")  # the frozen models --offload can keep in CPU memory
# flags a resumed run may take from the command line (where it runs, what it logs, how often it saves, as in
# train_grpo.py, and which frozen models wait in CPU memory); the rest come from the run
RESUME_FREE = C.ROLLOUT_RESUME_FREE + ("offload",)
# flags whose default main() resolves from the RM before they are saved: a resumed run given that default (the
# command that started it) takes the saved value (train_common.resumed_flags)
RESOLVED_AT_START = ("missing_eos_penalty",)


def check_flags(args, given):
    """
    The flags' values and combinations, checked before anything is loaded or written: one line each (UserError).
    given: the flags the command line named (a switch's options given without the switch are refused).
    """
    C.check_rollout_flags(args)  # the sizes, AdamW, samples and checkpoints, as train_grpo.py checks them
    check(args.clip_coef > 0 and args.vf_clip_coef > 0,
          f"--clip_coef and --vf_clip_coef must be > 0 (got {args.clip_coef}, {args.vf_clip_coef})")
    check(args.lr > 0 and args.critic_lr > 0, f"--lr and --critic_lr must be > 0 (got {args.lr}, {args.critic_lr})")
    # the shared trunk has one optimizer, at --lr, for the value head too: a --critic_lr would be ignored
    check(not (args.critic == "shared" and "critic_lr" in given),
          "--critic_lr does nothing with --critic shared (one optimizer at --lr trains the trunk and the value head)")
    for name in ("kl_coef", "ent_coef", "ptx_coef"):
        check(getattr(args, name) >= 0, f"--{name} must be >= 0, got {getattr(args, name)}")
    check(args.vf_coef > 0, f"--vf_coef must be > 0, got {args.vf_coef}: at 0 the critic gets no gradient and never "
                            f"trains (the value head of --critic shared stays at 0)")
    for name in ("gamma", "gae_lambda"):
        check(0 <= getattr(args, name) <= 1, f"--{name} must be in [0, 1], got {getattr(args, name)}")
    # the options of a switch that is off would be accepted and ignored (as --ptx_data without --ptx_coef)
    for names, on, switch in ((("target_kl", "kl_horizon"), args.adaptive_kl, "--adaptive_kl"),
                              (("lora_alpha", "lora_targets"), args.lora_rank > 0, "--lora_rank > 0")):
        named = [f"--{n}" for n in names if n in given]
        check(on or not named, f"{' and '.join(named)} {'does' if len(named) == 1 else 'do'} nothing without {switch}")
    if args.adaptive_kl:
        # beta_t+1 = beta_t * (1 + K_beta * e_t): a start of 0 stays 0
        check(args.kl_coef > 0, f"--adaptive_kl needs --kl_coef > 0 as beta's start value, got {args.kl_coef}: the "
                                f"controller multiplies beta, so 0 stays 0")
        check(args.target_kl > 0, f"--target_kl must be > 0 with --adaptive_kl, got {args.target_kl}")
        # beta is multiplied by 1 + e * batch_size / kl_horizon with e in [-0.2, 0.2]: that factor must stay > 0
        check(args.kl_horizon > 0.2 * args.batch_size,
              f"--kl_horizon {args.kl_horizon} must be > 0.2 * --batch_size = {0.2 * args.batch_size:g} with "
              f"--adaptive_kl (beta is multiplied by 1 +- 0.2 * batch_size / kl_horizon, which must stay > 0)")
    check(args.kl_estimator in ("k1", "k3"), f"--kl_estimator {args.kl_estimator!r}: expected k1 or k3")
    check(args.num_iterations >= 1 and args.ppo_epochs >= 1, "--num_iterations and --ppo_epochs must be >= 1")
    check(args.ptx_coef == 0 or args.ptx_data, "--ptx_coef > 0 needs --ptx_data (an SFT JSONL file)")
    check(args.ptx_coef > 0 or not args.ptx_data, "--ptx_data does nothing without --ptx_coef > 0 (plain PPO)")
    check(args.lora_rank >= 0, f"--lora_rank {args.lora_rank}: must be >= 0 (0 = no LoRA)")
    check(args.lora_alpha > 0, f"--lora_alpha {args.lora_alpha}: must be > 0")
    check(args.critic in ("separate", "shared"), f"--critic {args.critic!r}: expected separate or shared")
    if args.lora_rank:
        # the critic's head (separate) or the value head (shared) trains in full (build_models), and footprint.py
        # predicts it so
        head, what = ("value_head", "the value head") if args.critic == "shared" else ("head", "the critic's head")
        C.check_head_not_adapted(args.lora_targets, head, what)
    unknown = [n for n in args.offload.split(",") if n and n not in OFFLOADABLE]
    check(not unknown, f"--offload {args.offload!r}: unknown model {unknown[:1]}, expected ref, rm or ref,rm")


# -----------------------------------------------------------------------------
# rollout (steps 1-3, which train_grpo.py shares, are in nanorlhf/rollout.py)


@torch.no_grad()
def make_experience(actor, ref, reward_model, critic, context, context_mask, response, tok, args, beta, rt):
    """
    Steps 2-6 of the rollout for already sampled responses. Returns a dict of tensors, one row per episode.
    context (B, T) left-padded prompts, context_mask (B, T), response (B, N) as sampled; beta the KL coefficient
    of this rollout. critic None: the shared trunk, actor(..., values=True) gives the values with the logits.
    """
    # The one masking convention, drawn once. Prompts are left-padded, responses right-padded after EOS:
    #
    #   position          0     1     2     3     4  |   5     6     7     8        T = 5, N = 4
    #   seq             pad   pad    p0    p1    p2  |  y0    y1   eos   pad
    #   seq_mask          0     0     1     1     1  |   1     1     1     0
    #   position_ids      0     0     0     1     2  |   3     4     5     5     (seq_mask.cumsum - 1, clamped)
    #   response_mask                                |   1     1     1     0
    #   logits[:, T-1+t]                  predicts ----> y_t = seq[:, T+t]      (the shift: slice T-1 .. T+N-2)
    #   values[:, T-1+t]  = V(s_t), the state that has seen p and y_<t, just before choosing y_t
    #   RM score          read at the last real token (eos, position 7); added to the reward of y_2, the last real one
    #
    # so logprobs, values, rewards and advantages are all (B, N), aligned with the response tokens.
    # 2. truncate after the first EOS; 3. score: the RM's score at the last real token (--missing_eos_penalty for a
    # response without EOS), logprobs under the actor (they become pi_old) and the reference, with the logits divided
    # by the sampling temperature exactly as in generate, and V(s_t) (the critic's, or the shared trunk's from the same
    # forward), in one loop over micro-batches
    exp = truncate_and_score(actor, ref, reward_model, context, context_mask, response, tok, args, rt, critic=critic,
                             shared=critic is None)
    mask = exp["response_mask"]  # (B, N)

    # 4. KL-shaped reward: r_t = -beta * kl_t (k1 or k3, --kl_estimator) + [t = last real token] * score
    rewards, kl = compute_rewards(exp["logprobs"], exp["ref_logprobs"], exp["scores"], mask, beta, args.kl_estimator)

    # 5. (no reward whitening: train_rm.py shifted the RM so that the demonstrations score 0 on average)
    # 6. GAE backwards over the response (gamma, lambda), then whiten the advantages over real tokens only
    #    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
    #    A_t = sum_k (gamma * lambda)^k * delta_{t+k},   returns_t = A_t + V(s_t)
    advantages, returns = gae(rewards, exp["values"], mask, args.gamma, args.gae_lambda)
    advantages = masked_whiten(advantages, mask)
    return {**exp, "rewards": rewards, "kl": kl, "advantages": advantages, "returns": returns}


# -----------------------------------------------------------------------------
# update


def ptx_batches(examples, batch_size, pad_id, generator, max_len):
    """
    Endless random batches of SFT examples (ids, response_mask) for PPO-ptx, drawn with `generator` (whose state
    train_state.pt keeps, so a resumed run draws what the uninterrupted one would), padded to at most max_len
    (the block size, which need not be a multiple of 8).
    """
    while True:
        idx = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
        yield D.collate([examples[i][0] for i in idx], pad_id, masks=[examples[i][1] for i in idx], max_len=max_len)


def ppo_update(actor, critic, actor_opt, critic_opt, exp, args, rt, ptx=None, where="", probe=None):
    """
    --ppo_epochs passes of shuffled minibatches over one rollout; one optimizer step per minibatch for each model.
    Returns a dict of floats averaged over all minibatches, plus "first_ratio_max_dev": max |ratio - 1| over the
    real tokens of the first minibatch of the first epoch (0 up to float error: nothing has moved yet).
    ptx: a stream of SFT batches of minibatch size (ptx_batches), one per minibatch, split across its micro-batches.
    A NaN or inf loss or gradient norm stops with NonFiniteError (naming `where`, the epoch and the minibatch)
    before that minibatch's optimizer steps.
    critic None (and critic_opt None): the shared trunk; one forward gives logits and values, one optimizer
    steps on pg_loss - ent_coef * entropy (+ ptx_coef * L_SFT) + vf_coef * vf_loss.
    probe: a dict that gets "activations", the bytes autograd saved for the first micro-batch (memory.json;
    footprint.saved_once).
    """
    shared = critic is None
    B, T = exp["seq"].size(0), exp["context_len"]
    mb_size = B // args.num_minibatches
    micro_size = mb_size // args.grad_accum
    stats = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "vf_clipfrac", "approx_kl", "ratio", "ptx_loss",
                             "grad_norm", "critic_grad_norm")}
    first_ratio_max_dev = torch.zeros((), device=exp["seq"].device)  # a tensor: no device sync per micro-batch
    models = [actor] if shared else [actor, critic]
    optimizers = [actor_opt] if shared else [actor_opt, critic_opt]
    for m in models:
        m.train()
    for epoch in range(args.ppo_epochs):
        b_inds = torch.randperm(B)
        for start in range(0, B, mb_size):
            mb_inds = b_inds[start:start + mb_size]
            # losses are sums over real tokens divided by the minibatch's token count, so accumulating
            # micro-batches of any length gives the gradient of the minibatch mean
            n_tokens = exp["response_mask"][mb_inds].sum().clamp(min=1)
            mb_stats = {k: 0.0 for k in stats}
            if ptx is not None:
                # one SFT batch per minibatch, its rows split across the micro-batches and its loss normalised by
                # the whole batch's target count (as in train_sft.py): --grad_accum changes memory, not the gradient
                pb = D.to_device(next(ptx), rt.device)  # (mb_size, T') each
                ptx_targets = pb["response_mask"][:, 1:].sum()
                assert pb["idx"].size(0) % args.grad_accum == 0, "a PPO-ptx batch must split into --grad_accum parts"
                ptx_micro = pb["idx"].size(0) // args.grad_accum
            # under torchrun each rank runs its share of the minibatch's micro-batches (j counts them all)
            mine = dist.mine(list(enumerate(range(0, mb_size, micro_size))))
            for k, (j, mstart) in enumerate(mine):
                i = mb_inds[mstart:mstart + micro_size]  # the micro-batch's rows
                seq, seq_mask, mask = exp["seq"][i], exp["seq_mask"][i], exp["response_mask"][i]  # (b, T + N), (b, N)
                share = mask.sum() / n_tokens  # this micro-batch's part of the minibatch mean
                for model in models:  # the ranks sum their gradients on their last micro-batch
                    dist.sync_grads(model, k == len(mine) - 1)
                # the logits at T-1+t predict y_t: only the last N + 1 positions get logits (the last dropped)
                keep = seq.size(1) - T + 1
                with footprint.saved_once(probe, models, seq.shape, keep):  # memory.json's activations, once
                    with rt.autocast():
                        if shared:  # one trunk: one forward for the policy and the value (through forward(): DDP)
                            logits, new_values = actor(seq, seq_mask, values=True, logits_to_keep=keep)  # (b, N + 1, .)
                        else:
                            logits = actor(seq, seq_mask, logits_to_keep=keep)  # (b, N + 1, V)
                            new_values = critic(seq, seq_mask)[:, -keep:]  # (b, N + 1)
                        logits, new_values = logits[:, :-1], new_values[:, :-1]  # (b, N, V), (b, N)
                    new_logprobs = logprobs_from_logits(logits, exp["response"][i], args.temperature)  # (b, N)
                # pg_loss = -L^CLIP = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps)),
                # ratio_t = pi_theta(y_t) / pi_old(y_t)
                pg_loss, pg_stats = policy_loss(new_logprobs, exp["logprobs"][i], exp["advantages"][i], mask, args.clip_coef)
                # L_V = max((V - G)^2, (clip(V, V_old - eps_v, V_old + eps_v) - G)^2) / 2,  G the returns
                vf_loss, vf_stats = value_loss(new_values, exp["values"][i], exp["returns"][i], mask, args.vf_clip_coef)
                # actor: pg_loss - ent_coef * H + ptx_coef * L_SFT; critic: vf_coef * L_V (shared trunk: one loss, their
                # sum); pg_loss, H and L_V are this micro-batch's share of the minibatch mean, L_SFT its part already
                actor_loss = pg_loss * share
                if args.ent_coef > 0:
                    # entropy bonus: - c_ent * H(pi(.|s_t)), averaged over real tokens
                    ent = masked_mean(entropy_from_logits(logits, args.temperature), mask)
                    actor_loss = actor_loss - args.ent_coef * ent * share
                if ptx is not None:
                    # PPO-ptx: L += ptx_coef * L_SFT, L_SFT = -sum log pi(y_sft) / n_targets (InstructGPT's objective:
                    # + gamma_ptx * E[log pi]); this micro-batch's rows of the minibatch's SFT batch, their targets'
                    # -log pi summed and divided by the whole batch's target count
                    rows = slice(j * ptx_micro, (j + 1) * ptx_micro)
                    p_idx, p_mask = pb["idx"][rows], pb["response_mask"][rows]  # (b', T')
                    with rt.autocast():
                        ptx_logits = actor(p_idx)  # right-padded: plain causal attention, as in train_sft.py
                    ptx_loss = sft_loss(ptx_logits, p_idx, p_mask, n_tokens=ptx_targets)
                    actor_loss = actor_loss + args.ptx_coef * ptx_loss
                    mb_stats["ptx_loss"] += ptx_loss.detach()
                if shared:
                    # one loss for the one trunk: the actor's (pg, entropy, ptx terms) + vf_coef * vf_loss
                    (actor_loss + args.vf_coef * vf_loss * share).backward()
                else:
                    actor_loss.backward()
                    (args.vf_coef * vf_loss * share).backward()

                if epoch == 0 and start == 0:
                    ratio = (new_logprobs.detach() - exp["logprobs"][i]).exp()  # (b, N)
                    first_ratio_max_dev = torch.maximum(first_ratio_max_dev, ((ratio - 1).abs() * mask).max())
                # stats stay tensors until the end of the update: no device sync per micro-batch
                for k, v in (("pg_loss", pg_loss), ("vf_loss", vf_loss), ("vf_clipfrac", vf_stats["vf_clipfrac"]),
                             *((k, pg_stats[k]) for k in ("clipfrac", "approx_kl", "ratio"))):
                    mb_stats[k] += v.detach() * share
            mb_stats = dist.all_reduce_dict(mb_stats)  # the minibatch's losses: the sum of the ranks' shares
            mb_stats["grad_norm"] = C.clip_grad_norm(actor.parameters(), args.max_grad_norm)
            if not shared:
                mb_stats["critic_grad_norm"] = C.clip_grad_norm(critic.parameters(), args.max_grad_norm)
            # one device sync per minibatch: a NaN or inf stops here, before it reaches the weights
            C.check_finite(f"{where}epoch {epoch + 1} minibatch {start // mb_size + 1}",
                           **{k: mb_stats[k] for k in ("pg_loss", "vf_loss", "grad_norm")},
                           **({"critic_grad_norm": mb_stats["critic_grad_norm"]} if not shared else {}),
                           **({"ptx_loss": mb_stats["ptx_loss"]} if ptx is not None else {}))
            for opt in optimizers:
                opt.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            for k, v in mb_stats.items():
                stats[k].append(v)
    out = {k: float(sum(v) / len(v)) for k, v in stats.items()
           if (k != "ptx_loss" or ptx is not None) and (k != "critic_grad_norm" or not shared)}
    out["first_ratio_max_dev"] = float(dist.all_reduce_max(first_ratio_max_dev))
    return out


# -----------------------------------------------------------------------------
# the four models


def build_models(args, device, files=None):
    """
    Actor, critic, reference and reward model for the options, as a dict (critic None with --critic shared)
    with the tokenizer, the RM's checkpoint, and "roles": the parameters of each role, for memory.json.
    Dropout is off everywhere, the frozen models are frozen; on --resume the trained parts come from `files`,
    {name: path} of the run's checkpoint (train_common.complete_files).

    Which memory serves which role (W weights, G gradients, O AdamW state; the seed's section 3.3):

        flags                          actor                   critic                      reference             reward model
        (default)                      SFT copy: W G O         RM copy: W G O              SFT copy: W           RM: W
        --offload ref,rm               SFT copy: W G O         RM copy: W G O              W in CPU memory       W in CPU memory
        --lora_rank r                  SFT W (frozen)          the reward model's W        the actor with its    RM: W
                                       + adapters W G O        + adapters + head W G O     adapters off
        --critic shared                SFT copy + value head: one trunk, W G O             SFT copy: W           RM: W
        --lora_rank r --critic shared  SFT W (frozen) + adapters + value head: W G O       the actor, adapters   RM: W
                                                                                           off

    So the accelerator holds 4 full models by default, 2 with offload, 2 with LoRA, 3 shared, 2 with LoRA +
    shared (Hydra-PPO, Santacroce et al. 2023) and 1 with all three. With LoRA the reference is the actor's
    own frozen base, which is the SFT model itself, so there is nothing to offload for it; a LoRA critic
    computes on the reward model's frozen weights (no copy), so those stay on the accelerator too.

    The shared trunk's value head starts at zero: V = 0 is the right first guess here, since train_rm.py shifts
    the reward model so that demonstrations score 0 on average and the policy starts as the SFT model (KL 0), and
    a zero head sends no gradient into the trunk through vf_loss until it has learned something, so the value
    loss cannot disturb the policy at the start (ratio == 1 on the first minibatch, as in every option). The
    separate critic instead starts from the reward model, as in InstructGPT; its trunk cannot be shared with
    the actor's, which is the SFT model's.
    """
    offload_names = {n for n in args.offload.split(",") if n}
    if args.lora_rank:
        for name, why in (("ref", "the reference is the actor's own frozen base (adapters off)"),
                          ("rm", "the LoRA critic computes on the reward model's weights")):
            if name in offload_names and (name == "ref" or args.critic != "shared"):
                print(f"note: --offload {name} does nothing here: {why}, so those weights stay on {device}")
                offload_names.discard(name)
    # an offloaded model is loaded straight into CPU memory, and the shared trunk is built there before it moves:
    # a full model on the accelerator only where the table above has one, also while they are built
    home = {name: "cpu" if name in offload_names else device for name in OFFLOADABLE}
    actor_home = "cpu" if args.critic == "shared" else device
    if args.lora_rank:
        # LoRA: the frozen base is the SFT model itself (it is the reference), adapters come from --out_dir on resume
        actor, tok, _ = utils.load_model(args.sft, actor_home, kind="gpt", flag="--sft")
    else:
        actor, tok, _ = utils.load_model(files[utils.CKPT] if files else args.sft, actor_home, kind="gpt",
                                         flag=None if files else "--sft")
    reward_model, rm_tok, rm_ckpt = utils.load_model(args.rm, home["rm"], kind="scalar", stage="rm", flag="--rm")
    check(rm_tok.same_encoding(tok),
          f"{args.sft} and {args.rm} use different tokenizers; the RM must score the policy's tokens")
    C.check_rm_context(actor, reward_model, args.sft, args.rm)
    saved_critic = utils.load_model(files[CRITIC], actor_home, kind="scalar")[0] if files else None
    for m in (actor, reward_model):
        disable_dropout(m)
    freeze(reward_model)

    if args.critic == "shared":
        actor = ValueHeadGPT.from_gpt(actor)
        if saved_critic is not None:
            actor.value_head.load_state_dict(saved_critic.head.state_dict())
        actor = actor.to(device)
        critic = None
    elif args.lora_rank:
        # the critic computes on the reward model's own frozen weights (no copy) with adapters and its own head
        with torch.device("meta"):
            critic = ScalarGPT(reward_model.config)
        critic.load_state_dict(reward_model.state_dict(), assign=True)  # the same storage as the reward model
        head = (saved_critic or reward_model).head
        critic.head = torch.nn.Linear(head.in_features, 1).to(device)
        critic.head.load_state_dict(head.state_dict())
        disable_dropout(critic)
    else:
        critic = saved_critic if saved_critic is not None else utils.load_model(args.rm, device, kind="scalar")[0]
        disable_dropout(critic)

    if args.lora_rank:
        # adapters on actor and critic, a resumed run's trained ones put back (adapters.pt)
        adapters = utils.load_checkpoint(files[ADAPTERS]) if files else {}
        for m, key in ((actor, "actor"), (critic, "critic")):
            if m is not None:
                lora.apply_lora_flags(m, args, adapters.get(key))
        # the heads on top of the adapters train in full
        (actor.value_head if critic is None else critic.head).requires_grad_(True)
        ref = lora.AdaptersOff(actor)
    else:
        ref, _, _ = utils.load_model(args.sft, home["ref"], kind="gpt")
        disable_dropout(ref)
        freeze(ref)

    for m in (actor, critic):
        if m is not None:
            m.grad_checkpointing = args.grad_checkpointing
    if offload_names and torch.device(device).type == "cpu":
        print(f"note: --offload {args.offload} does nothing on a CPU-only run: every model is in CPU memory already")
    else:
        for name in offload_names:
            offload(ref if name == "ref" else reward_model, device)

    def params(m):
        return list(m.parameters()) if m is not None else []

    if critic is None:  # the value head is the critic's part of the shared model
        actor_params = [p for n, p in actor.named_parameters() if not n.startswith("value_head.")]
        critic_params = list(actor.value_head.parameters())
    else:
        actor_params, critic_params = params(actor), params(critic)
    ref_params = actor_params if isinstance(ref, lora.AdaptersOff) else params(ref)  # the actor's policy part
    # in this order a storage that two roles use (the LoRA critic's base) is counted under the frozen model
    roles = {"actor": actor_params, "reference": ref_params, "reward": params(reward_model), "critic": critic_params}
    return dict(actor=actor, critic=critic, ref=ref, reward_model=reward_model, tok=tok, rm_ckpt=rm_ckpt, roles=roles)


def write_memory_report(args, config, probe, rt):
    """
    out_dir/memory.json after the first iteration (under its pending name in a fresh rerun, until the first save puts
    it in place: utils.pending_name): the measured live bytes per role (footprint.StaticProbe) beside
    the prediction from the model's shape, the bytes autograd saved for one update micro-batch beside the
    formula, and on CUDA torch.cuda.max_memory_allocated of the iteration. Prints one line. Where the formula does
    not apply, activations_predicted is null and activations_not_modelled names why.
    """
    shape = footprint.shape_of(config)
    offload_names = {n for n in args.offload.split(",") if n}
    predicted = footprint.static_memory(shape, args.lora_rank, args.critic == "shared", offload_names,
                                        lora_targets=args.lora_targets)
    measured = probe.result
    b, t = probe.extra["micro_batch"]
    # the formula is exact for a float32 run that saves every activation with adapters on the default targets;
    # otherwise it is no estimate at all (recomputation saves about a tenth, bf16 autocast measured about 2x more,
    # fewer adapters save less), so it is left out with the reason
    custom_targets = args.lora_rank and args.lora_targets != lora.DEFAULT_TARGETS
    not_modelled = [why for why, cond in (("grad_checkpointing", args.grad_checkpointing),
                                          ("lora_targets", custom_targets), ("autocast", rt.dtype != "float32")) if cond]
    acts = None
    if not not_modelled:
        acts = footprint.activation_memory(shape, b, t, args.lora_rank, args.critic == "shared",
                                           acts_bytes=4, keep=probe.extra["keep"])
    report = {
        "device": str(rt.device), "predicted": predicted, "measured": measured,
        "static_predicted": footprint.static_total(predicted), "static_measured": footprint.static_total(measured),
        "activations_predicted": acts, "activations": probe.extra["activations"], "micro_batch": [b, t],
        "cuda_max_allocated": torch.cuda.max_memory_allocated(rt.device) if rt.device_type == "cuda" else None,
    }
    if not_modelled:
        report["activations_not_modelled"] = ", ".join(not_modelled)
    utils.write_text(utils.pending_name(os.path.join(args.out_dir, "memory.json")), json.dumps(report, indent=1))
    same = "equal" if report["static_predicted"] == report["static_measured"] else "DIFFERENT"
    fb = footprint.fmt_bytes
    cuda = f"; cuda max allocated {fb(report['cuda_max_allocated'])}" if report["cuda_max_allocated"] else ""
    acts_text = f"predicted {fb(acts)}" if acts is not None else f"not predicted with {', '.join(not_modelled)}"
    print(f"memory: {predicted['resident']} full model(s) on the accelerator with these options, "
          f"{measured['total']['trainable']:,} trainable; "
          f"static {report['static_measured']:,} B measured, {report['static_predicted']:,} B predicted ({same}); "
          f"activations of a {b} x {t} micro-batch {fb(report['activations'])} "
          f"({acts_text}){cuda}", flush=True)


def policy_state_dict(actor):
    """What ckpt.pt holds: the plain GPT, adapters merged, no value head."""
    return {k: v for k, v in lora.merged_state_dict(actor).items() if not k.startswith("value_head.")}


def critic_state_dict(actor, critic):
    """What critic.pt holds: a plain ScalarGPT (merged); for the shared trunk, the trunk with the value head."""
    if critic is not None:
        return lora.merged_state_dict(critic)
    sd = lora.merged_state_dict(actor)
    out = {k: v for k, v in sd.items() if k.startswith("transformer.")}
    out["head.weight"], out["head.bias"] = sd["value_head.weight"], sd["value_head.bias"]
    return out


def checkpoint_files(args, iteration, tok, actor, critic, actor_opt, critic_opt, kl_coef, sampler_state, ptx_gen,
                     inputs):
    """
    {file name: payload} of one save after `iteration`: ckpt.pt (the actor) and critic.pt, plain merged models that
    every stage and evaluate.py load as usual, train_state.pt (optimizers, beta, random states, the prompt order's
    sampler_state, the digests of the inputs) and with LoRA adapters.pt. ptx_gen: PPO-ptx's generator, None without.
    ckpt.pt also records models_resident, the full models the run holds (4; 3 with --critic shared, 2 with LoRA;
    --offload moves frozen ones to CPU memory, it does not drop them), for compare.py's table.
    """
    held = footprint.static_memory(footprint.shape_of(actor.config), args.lora_rank, args.critic == "shared",
                                   lora_targets=args.lora_targets)["resident"]
    policy = utils.model_payload(actor, tok, "ppo", args, iteration, kl_coef=kl_coef, models_resident=held)
    policy["model"] = policy_state_dict(actor)
    value = utils.model_payload(critic if critic is not None else actor, tok, "ppo", args, iteration)
    value["model"], value["model_kind"] = critic_state_dict(actor, critic), "scalar"
    payloads = {utils.TRAIN_STATE: {
        "actor_optimizer": actor_opt.state_dict(),
        "critic_optimizer": critic_opt.state_dict() if critic_opt is not None else None,
        "kl_coef": kl_coef, "rng": utils.rng_state(), "data": sampler_state, "step": iteration,
        "ptx_rng": ptx_gen.get_state() if ptx_gen is not None else None, "inputs": inputs,
    }, CRITIC: value, utils.CKPT: policy}
    if args.lora_rank:
        payloads[ADAPTERS] = {"actor": lora.adapter_state_dict(actor), "step": iteration,
                              "critic": lora.adapter_state_dict(critic) if critic is not None else {}}
    return payloads


def restore(state, actor_opt, critic_opt, kl_ctl):
    """
    Put a train_state.pt's optimizers, beta and random states back. -> (its iteration, its prompt sampler state).
    The optimizers' states leave `state` (on a GPU they are CPU copies, twice the weights in size each).
    """
    actor_opt.load_state_dict(state.pop("actor_optimizer"))
    critic = state.pop("critic_optimizer", None)
    if critic_opt is not None:
        critic_opt.load_state_dict(critic)
    kl_ctl.value = state["kl_coef"]
    utils.set_rng_state(state["rng"])
    return state["step"], state["data"]


# -----------------------------------------------------------------------------


def main(argv=None):
    args = C.parse_stage_flags(Args, argv, description=__doc__)
    given = args._given  # the flags argv names (a resumed run's args are the saved ones, without this set)
    resuming = C.wants_resume(args.resume, args.out_dir, (utils.CKPT, CRITIC, utils.TRAIN_STATE))
    # first, so that --resume in another stage's directory says so, not that its flags differ; a resumed run's
    # --sft and --rm are its saved ones, checked when it started
    C.check_out_dir(args.out_dir, "ppo", {} if resuming else {"--sft": args.sft, "--rm": args.rm})
    if resuming:  # the run's own flags, so that the resumed run computes what the uninterrupted one would have
        C.check_resumable(args.out_dir)
        # mapped, not read: only the flags are needed here, the weights are loaded with the run's state below
        args = C.resumed_flags(args, utils.load_checkpoint(args.out_dir, utils.CKPT, mmap=True), RESUME_FREE,
                               RESOLVED_AT_START)

    check_flags(args, given)

    rt = utils.setup_runtime(dist.setup(args.device), args.dtype, args.seed, training=True)

    state = files = None
    if resuming:  # the files of one iteration (an interrupted save left the previous iteration's beside them)
        names = [utils.CKPT, CRITIC, utils.TRAIN_STATE] + ([ADAPTERS] if args.lora_rank else [])
        files = C.complete_files(args.out_dir, names)
        state = utils.load_checkpoint(files[utils.TRAIN_STATE])
    # the files the run reads, opened first here: one that cannot be read is named by its flag; a resumed run must
    # read the same ones
    inputs = C.input_digests({"--data": args.data, "--sft": args.sft, "--rm": args.rm, "--ptx_data": args.ptx_data},
                             state, given)

    # data (validated before anything is written)
    prompts = D.read_prompts(args.data)
    use_gold = C.gold_on(args.gold, prompts, args.data)
    ptx_records = D.read_sft(args.ptx_data) if args.ptx_coef > 0 else None

    # models
    models = build_models(args, rt.device, files)
    actor, critic, ref, reward_model = (models[k] for k in ("actor", "critic", "ref", "reward_model"))
    tok, rm_ckpt = models["tok"], models["rm_ckpt"]
    if args.missing_eos_penalty is None:
        args.missing_eos_penalty = missing_eos_default(rm_ckpt)
    block_size = actor.config.block_size
    # prompts, cut from the left so that prompt + response fits the context
    prompt_ids = encode_rollout_prompts(prompts, tok, block_size, args.response_length)
    if ptx_records is not None:
        ptx_examples, _ = D.encode_sft(ptx_records, tok, block_size)
        check(len(ptx_examples) > 0, f"{args.ptx_data}: no example fits block_size {block_size}")

    fwd_actor = utils.maybe_compile(actor, args.compile)
    fwd_critic = utils.maybe_compile(critic, args.compile) if critic is not None else None
    # DDP under torchrun (the shared trunk's one pass for logits and values goes through forward(), which DDP syncs)
    train_actor = dist.wrap(fwd_actor)
    train_critic = dist.wrap(fwd_critic) if critic is not None else None
    # one optimizer per trained model: the shared trunk has one (--lr), the separate critic its own (--critic_lr)
    actor_opt = utils.configure_optimizer(actor, args.lr, args.weight_decay, (args.beta1, args.beta2), rt.device_type)
    critic_opt = None
    if critic is not None:
        critic_opt = utils.configure_optimizer(critic, args.critic_lr, args.weight_decay, (args.beta1, args.beta2),
                                               rt.device_type)
    optimizers = [(actor_opt, args.lr)] + ([(critic_opt, args.critic_lr)] if critic_opt is not None else [])
    # memory.json: the live bytes of weights, gradients and AdamW state per role, taken right after the first
    # optimizer step (gradients still alive), beside the prediction of nanorlhf/footprint.py
    mem_probe = footprint.StaticProbe(models["roles"], [o for o, _ in optimizers])
    if args.adaptive_kl:
        kl_ctl = AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)
    else:
        kl_ctl = FixedKLController(args.kl_coef)
    start_iter, sampler_state = 0, {"epoch": 0, "pos": 0}
    if state is not None:
        start_iter, sampler_state = restore(state, actor_opt, critic_opt, kl_ctl)
    ptx, ptx_gen = None, torch.Generator().manual_seed(args.seed)
    if ptx_records is not None:
        if state is not None and state.get("ptx_rng") is not None:
            ptx_gen.set_state(state["ptx_rng"])
        mb_size = args.batch_size // args.num_minibatches  # a PPO-ptx batch per minibatch, of its size
        ptx = ptx_batches(ptx_examples, mb_size, tok.pad_id, ptx_gen, block_size)
    stop = args.stop_at or args.num_iterations
    if start_iter >= stop:
        print(f"nothing to do: the run in {args.out_dir} is at iteration {start_iter}")
        dist.cleanup()
        return

    logger = C.start_logging(args.out_dir, resuming, start_iter)
    print(f"PPO: {len(prompts)} prompts, actor {actor.num_params() / 1e6:.2f}M params, {args.num_iterations} iterations "
          f"x {args.batch_size} episodes, score without EOS {args.missing_eos_penalty}, device {rt.device} {rt.dtype}, "
          f"gold {'on' if use_gold else 'off'}")
    footprint.reset_cuda_peak(rt)  # memory.json's cuda_max_allocated is the iterations', not build_models' peak
    timer = utils.Timer(stop, start_iter)
    for it in range(start_iter, stop):
        if args.anneal_lr:
            frac = 1.0 - it / args.num_iterations
            for opt, lr in optimizers:
                for g in opt.param_groups:
                    g["lr"] = frac * lr
        # rollout: 1. generate a response to each prompt of the batch (rollout.sample), 2.-6. make_experience
        t0 = time.time()
        idx, sampler_state = next_prompt_indices(len(prompts), args.batch_size, args.seed, sampler_state)
        batch, response = sample(actor, prompt_ids, idx, tok, args, rt)
        exp = make_experience(fwd_actor, ref, reward_model, fwd_critic, batch["idx"], batch["attention_mask"],
                              response, tok, args, kl_ctl.value, rt)
        t_rollout = time.time() - t0
        # update
        t0 = time.time()
        upd = ppo_update(train_actor, train_critic, actor_opt, critic_opt, exp, args, rt, ptx, where=f"iteration {it + 1}, ",
                         probe=mem_probe.extra)
        t_update = time.time() - t0
        if it == start_iter and dist.is_main():  # the ranks measure the same bytes: rank 0 writes them
            write_memory_report(args, actor.config, mem_probe, rt)

        # statistics of this rollout (before the update)
        mask = exp["response_mask"]
        kls = sequence_kls(exp["logprobs"], exp["ref_logprobs"], mask)  # k1 and k3, each summed over a response
        beta = kl_ctl.value  # this rollout's
        row = {
            "iter": it + 1,
            "score": exp["scores"].mean().item(),
            "rm_score": exp["rm_scores"].mean().item(),
            **kls,
            "non_score_reward": (exp["rewards"].sum(-1) - exp["scores"]).mean().item(),
            "entropy": masked_mean(exp["entropy"], mask).item(),
            "response_length": mask.sum(-1).float().mean().item(),
            "eos_frac": exp["has_eos"].float().mean().item(),
            "explained_variance": explained_variance(exp["values"], exp["returns"], mask),
            "beta": beta,
            "lr": actor_opt.param_groups[0]["lr"],
            **upd,  # first_ratio_max_dev among them: not 0 means the update does not see what the rollout saw
            "t_rollout": t_rollout,
            "t_update": t_update,
        }
        # adaptive beta for the next rollout (Ziegler et al.; AdaptiveKLController; KL: k1, whatever the reward uses)
        #   beta <- beta * (1 + clip(KL / KL_target - 1, -0.2, 0.2) * B / horizon)
        kl_ctl.update(kls["kl"], args.batch_size)
        sample_now = it == 0 or (it + 1) % args.sample_interval == 0
        if use_gold or sample_now:
            samples = judged_samples(tok, [prompts[i] for i in idx], exp["response"], mask, exp["scores"], use_gold)
        if use_gold:
            row["gold"] = sum(s["gold"] for s in samples) / len(samples)
        logger.log(row)
        gold = f" gold {row['gold']:.3f} |" if use_gold else ""
        print(f"iter {it + 1}/{args.num_iterations} | score {row['score']:+.3f} |{gold} kl {row['kl']:.2f} beta {beta:.3f} | "
              f"ent {row['entropy']:.2f} clip {row['clipfrac']:.3f} vf {row['vf_loss']:.4f} ev {row['explained_variance']:.2f} | "
              f"len {row['response_length']:.1f} eos {row['eos_frac']:.2f} | "
              f"{t_rollout:.1f}s + {t_update:.1f}s | left {utils.fmt_time(timer.eta(it))}", flush=True)
        if sample_now and dist.is_main():
            write_samples(args.out_dir, it + 1, samples[:args.num_samples])
        # the ranks hold the same weights and random state: rank 0 writes them, all or nothing (C.save_files: a kill
        # leaves the files of one iteration)
        if ((it + 1) % args.save_interval == 0 or it + 1 == stop) and dist.is_main():
            payloads = checkpoint_files(args, it + 1, tok, actor, critic, actor_opt, critic_opt, kl_ctl.value,
                                        sampler_state, ptx_gen if ptx is not None else None, inputs)
            C.save_files(args.out_dir, payloads)
    if stop < args.num_iterations:
        print(f"stopped at iteration {stop} (--stop_at); continue with --resume")
    else:
        print(f"done: iteration {stop}; {utils.fmt_time(time.time() - timer.t0)}; saved {args.out_dir}/{utils.CKPT} "
              f"and {CRITIC}")
    dist.cleanup()


if __name__ == "__main__":
    utils.run(main)
