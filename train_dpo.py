"""
DPO (Rafailov et al. 2023): the policy learns from the comparisons directly; no reward model, no sampling.

The KL-regularised objective that PPO climbs has a closed-form optimum, pi*(y|x) ∝ pi_ref(y|x) exp(r(x, y) / beta),
so r(x, y) = beta log(pi(y|x) / pi_ref(y|x)) + (a term of x alone, which cancels in a comparison). Putting that
implicit reward into the Bradley-Terry loss of the reward-model stage gives, for y_w preferred to y_l,

    L_DPO = -log sigma( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

with log pi(y|x) summed over the response tokens (the EOS included). A prompt with K ranked responses gives its
C(K, 2) pairs, as in train_rm.py; each response goes through the model once per step, and the prompt once for all K
(--share_prompts, as in train_rm.py). The reference is the SFT model: its log-probabilities of every training and
held-out response are computed once, before training, and the model is then dropped, so only the policy is in
memory while it trains.

Run (after train_sft.py; `make compare` runs it with the other algorithms):
    python train_dpo.py --data out/data/prefs.jsonl --val_data out/data/prefs_eval.jsonl --sft out/sft --out_dir out/dpo
Continue an interrupted run (its saved flags are reused); `--resume auto` continues when out/dpo holds a
checkpoint and starts fresh otherwise (one command for a job that may be restarted):
    python train_dpo.py --out_dir out/dpo --resume
On 2 GPUs (README "Many GPUs"; --grad_accum counts the micro-batches of all ranks):
    torchrun --standalone --nproc_per_node 2 train_dpo.py --data out/data/prefs.jsonl --sft out/sft --out_dir out/dpo --grad_accum 2

Writes to --out_dir: ckpt.pt (the policy, stage "dpo", loadable by evaluate.py like the PPO actor),
train_state.pt, metrics.jsonl (train and held-out loss, implicit-reward accuracy and margin, the tokens the model
runs per step and their padding fraction, and the gold score of sampled responses on the built-in task).

Deviations, on purpose (the first from train_rm.py, the others from the paper):
- The pairs of a batch count equally, as in the paper's mean over pairs; train_rm.py instead weighs each prompt's
  C(K, 2) pairs by 1/C(K, 2), InstructGPT's guard against a reward model overfitting to prompts with many pairs.
  With the built-in task's K = 4 for every prompt the two are the same.
- The default budget (200 steps of 16 prompts x K = 4 responses) puts as many sequences through the policy's
  backward pass (12800) as the online scripts' defaults (3200 episodes x 4 epochs); see README "Beyond PPO".
- Dropout is off (as in the online scripts), so that at step 0 the policy equals the reference: the loss is log 2
  and every pair a tie. That holds exactly for the held-out pairs, evaluated in the reference pass's own batches
  (accuracy 1/2, a tie counting 1/2); a training pair's reference log-probs were computed in other batches, so
  rounding breaks some of its ties and the first train accuracy logged is near 1/2 (0.49), not exactly 1/2.
"""

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanorlhf.data import (LengthGroupedSampler, collate, encode_prompts, pack_shared_prefix,
                           padding_fraction, ranked_pairs, read_prefs, slots_run, to_device)
from nanorlhf.losses import logprobs_from_logits, masked_sum, row_chunks
from nanorlhf.rollout import decode_response, disable_dropout, gold_scores, truncate_after_eos
from nanorlhf import dist
from nanorlhf.train_common import (RESUME_HELP, SHARE_PROMPTS_HELP, check_loop_flags, encode_pref_splits, endless,
                                   gold_on, input_digests, optimizer_step, parse_stage_flags, read_split, restore_run,
                                   save_run, start_run)
from nanorlhf.utils import (CKPT, Timer, check, configure_optimizer, cosine_lr, flag, fmt_time,
                            load_model, maybe_compile, model_payload, run, setup_runtime)

# =============================================================================
# The DPO math: top-level functions that tests/test_dpo.py checks against float64 references.


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """
    The DPO loss of P pairs, all (P,) sequence log-probabilities (summed over response tokens). -> (loss scalar,
    stats dict of detached scalars: "accuracy" (implicit reward of y_w above y_l; a tie counts 1/2), "margin"
    (mean implicit reward difference), "chosen_reward", "rejected_reward" (their means)).

        r_hat(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))                   the implicit reward
        L = mean over pairs of -log sigma(r_hat(x, y_w) - r_hat(x, y_l))

    Example: at initialisation pi = pi_ref, every r_hat is 0: L = log 2 = 0.6931, accuracy 1/2.
    F.logsigmoid stays exact for large differences (no inf, no NaN).
    """
    # r_hat = beta * log(pi / pi_ref)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)  # (P,)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)  # (P,)
    # L_DPO = -log sigma(r_hat_w - r_hat_l)
    margins = chosen_rewards - rejected_rewards  # (P,)
    loss = -F.logsigmoid(margins).mean()
    with torch.no_grad():
        accuracy = ((margins > 0).float() + 0.5 * (margins == 0).float()).mean()
        stats = {"accuracy": accuracy, "margin": margins.mean(), "chosen_reward": chosen_rewards.mean(),
                 "rejected_reward": rejected_rewards.mean()}
    return loss, stats


def sequence_logprobs(model, batch):
    """
    log pi(y | x) = sum over the response tokens of log pi(y_t | x, y_<t), one per sequence (the masking convention
    of losses.sft_loss: logits[:, t] predict idx[:, t + 1]). batch: idx, attention_mask, response_mask (N, T), and
    the packed rows when make_batch packed them -> (N,).
    """
    labels = batch["idx"][:, 1:]  # (N, T - 1)
    if "unpack" in batch:
        # packed rows: read log p(y) = z_y - logsumexp(z) at each sequence's slots, so that no (N, T, V) copy of the
        # logits is made (run_sequences would gather one); the logsumexp runs on row_chunks as in logprobs_from_logits
        logits = model(batch["packed_idx"], batch["packed_mask"], batch["packed_pos"])  # (G, T_packed, V)
        lse = torch.cat([torch.logsumexp(chunk, dim=-1) for (chunk,) in row_chunks(logits)])  # (G, T_packed)
        lse = lse.flatten()  # (G * T_packed,)
        slots = batch["unpack"][:, :-1]  # (N, T - 1): the slot whose logits predict each label
        logp = logits.flatten(0, 1)[slots, labels] - lse[slots]  # (N, T - 1)
    else:
        logp = logprobs_from_logits(model(batch["idx"], batch["attention_mask"])[:, :-1], labels)  # (N, T - 1)
    return masked_sum(logp, batch["response_mask"][:, 1:], dim=1)  # (N,)


# =============================================================================
# The training loop


@dataclass
class Config:
    # data
    data: str = flag("out/data/prefs.jsonl", "comparisons, JSONL: {prompt, chosen, rejected}, HH {chosen, rejected} "
                                             "or {prompt, responses, ranking}")
    val_data: str | None = flag(None, "held-out comparisons (default: hold out --val_frac of --data)")
    val_frac: float = flag(0.1, "fraction of --data held out when there is no --val_data")
    sft: str = flag("out/sft", "SFT checkpoint: the policy starts here; the reference's log-probs come from it")
    out_dir: str = flag("out/dpo", "output directory: ckpt.pt, train_state.pt, metrics.jsonl")
    # DPO
    beta: float = flag(0.1, "beta: the KL strength; the implicit reward is beta * log(pi / pi_ref)")
    # optimization
    batch_size: int = flag(16, "prompts per micro-batch (each brings its K responses and C(K, 2) pairs)")
    share_prompts: bool = flag(True, SHARE_PROMPTS_HELP)
    grad_accum: int = flag(1, "micro-batches per optimizer step over all ranks (under torchrun each rank runs "
                              "grad_accum / WORLD_SIZE of them)")
    lr: float = flag(1e-4, "peak learning rate")
    min_lr: float = flag(1e-5, "learning rate at the end of the cosine decay")
    warmup: int = flag(10, "linear warmup steps")
    max_steps: int = flag(200, "optimizer steps")
    weight_decay: float = flag(0.0, "AdamW weight decay (matrices only)")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0: no clipping)")
    # evaluation, logging, checkpoints
    eval_interval: int = flag(50, "steps between held-out evaluations")
    eval_batches: int = flag(16, "held-out batches per evaluation (the same ones every time)")
    log_interval: int = flag(10, "steps between progress lines and metrics.jsonl rows")
    ckpt_interval: int = flag(100, "steps between checkpoints (one is always written at the end)")
    gold: str = flag("auto", "at each evaluation, sample responses to held-out prompts and log their gold score: "
                             "auto (when the prompts are the built-in task's), on, off")
    gold_prompts: int = flag(64, "held-out prompts sampled for the gold score")
    response_length: int = flag(24, "maximum new tokens of those samples")
    temperature: float = flag(1.0, "sampling temperature of those samples")
    # system
    device: str = flag("auto", "auto | cpu | cuda | cuda:1 | mps")
    dtype: str = flag("auto", "auto | float32 | bfloat16 (autocast; auto: bf16 where GPU or CPU has it natively)")
    compile: bool = flag(False, "torch.compile the model")
    grad_checkpointing: bool = flag(False, "recompute each block's activations in the backward pass (less memory)")
    seed: int = flag(0, "seed for the held-out split, the batch order and the gold score's samples")
    resume: str = flag("off", RESUME_HELP)
    stop_at: int | None = flag(None, "stop (with a checkpoint) after this step; the schedule still runs to --max_steps")


BETAS = (0.9, 0.95)


def check_flags(args):
    check_loop_flags(args)
    check(args.beta > 0, f"--beta must be > 0, got {args.beta}")
    check(args.gold in ("auto", "on", "off"), f"--gold {args.gold!r}: expected auto, on or off")
    check(args.gold_prompts >= 1 and args.response_length >= 1 and args.temperature > 0,
          "--gold_prompts and --response_length must be >= 1 and --temperature > 0")
    # the sampling flags of the gold score would be accepted and ignored without it; only those named on the command
    # line (a resumed run's flags are the saved ones, without _given: they were checked when it started)
    named = [f"--{n}" for n in ("gold_prompts", "response_length", "temperature") if n in getattr(args, "_given", ())]
    check(args.gold != "off" or not named,
          f"{' and '.join(named)} {'does' if len(named) == 1 else 'do'} nothing with --gold off (no gold score's "
          f"samples are drawn)")


@torch.no_grad()
def reference_logprobs(ref, examples, batches, pad_id, max_len, rt, share_prompts=False):
    """
    log pi_ref(y|x) of every response of the examples that `batches` (lists of example indices) cover, computed
    once, batch by batch as make_batch builds them: {example index: (K_n,) float32 CPU tensor}. Held-out batches
    are the evaluation's own, so that at step 0 the policy's log-probs equal these bit for bit.
    """
    ref.eval()
    out = {}
    for b in batches:
        batch = to_device(make_batch([examples[i] for i in b], None, pad_id, max_len, share_prompts), rt.device)
        with rt.autocast():
            logps = sequence_logprobs(ref, batch).float().cpu()
        for i, part in zip(b, logps.split([len(examples[i]["ids"]) for i in b])):
            out[i] = part
    return out


def make_batch(examples, ref_logps, pad_id, max_len, share_prompts=False):
    """
    Examples [{"ids", "masks", "ranking"}, ...] and their reference log-probs (None while computing those) -> one
    right-padded batch of all N = sum K_n responses (idx, attention_mask, response_mask (N, T)), "ref_logps" (N,),
    and winner, loser (P,) long: indices into the N rows of every ranked pair, C(K_n, 2) per example.
    share_prompts: also the packed rows that the model runs instead, a prompt once with its K responses
    (data.pack_shared_prefix).
    """
    seqs = [s for ex in examples for s in ex["ids"]]
    masks = [m for ex in examples for m in ex["masks"]]
    batch = collate(seqs, pad_id, masks=masks, max_len=max_len)
    if share_prompts:
        batch.update(pack_shared_prefix([ex["ids"] for ex in examples], pad_id, max_len=max_len))
    winner, loser, offset = [], [], 0
    for ex in examples:
        for w, l in ranked_pairs(ex["ranking"]):
            winner.append(offset + w)
            loser.append(offset + l)
        offset += len(ex["ids"])
    if ref_logps is not None:
        batch["ref_logps"] = torch.cat(ref_logps)
    batch["winner"], batch["loser"] = torch.tensor(winner), torch.tensor(loser)
    return batch


def batch_loss(model, batch, beta, rt):
    """The DPO loss and stats of one batch (its pairs)."""
    with rt.autocast():
        logps = sequence_logprobs(model, batch)  # (N,)
    w, l, ref = batch["winner"], batch["loser"], batch["ref_logps"]
    return dpo_loss(logps[w], logps[l], ref[w], ref[l], beta)


@torch.no_grad()
def evaluate(model, batches, beta, rt):
    """Held-out DPO loss, implicit-reward accuracy and margin, means over the pairs of a fixed list of batches."""
    model.eval()
    sums, n_pairs = {"val_loss": 0.0, "val_acc": 0.0, "val_margin": 0.0}, 0
    for batch in batches:
        loss, stats = batch_loss(model, to_device(batch, rt.device), beta, rt)
        p = len(batch["winner"])
        sums["val_loss"] += loss.item() * p
        sums["val_acc"] += stats["accuracy"].item() * p
        sums["val_margin"] += stats["margin"].item() * p
        n_pairs += p
    model.train()
    return {k: v / n_pairs for k, v in sums.items()}


@torch.no_grad()
def sampled_gold(model, prompts, prompt_ids, tok, args, rt):
    """
    Mean gold score of one response per prompt sampled from the policy (the built-in task's judge). The draws come
    from their own generator, seeded with --seed at every evaluation: evaluations differ only by the policy, and
    the global RNG that train_state.pt saves is left alone, so the evaluation a --stop_at adds changes nothing
    that the resumed run computes.
    """
    model.eval()
    batch = to_device(collate(prompt_ids, tok.pad_id, left_pad=True), rt.device)
    generator = torch.Generator(device=rt.device).manual_seed(args.seed)
    with rt.autocast():
        out = model.generate(batch["idx"], args.response_length, temperature=args.temperature,
                             attention_mask=batch["attention_mask"], eos_id=tok.eos_id, pad_id=tok.pad_id,
                             generator=generator)  # (B, T + N)
    response, mask = truncate_after_eos(out[:, batch["idx"].size(1):], tok.eos_id, tok.pad_id)  # (B, N), (B, N)
    texts = [decode_response(tok, r, m) for r, m in zip(response.tolist(), mask.tolist())]
    model.train()
    return sum(gold_scores(prompts, texts)) / len(texts)


def main():
    # the run's "time" counts from here, not from the loop as SFT's and RM's do: the reference pass is part of what
    # DPO costs (compare.py's wall time counts it)
    t_start = time.time()
    args = parse_stage_flags(Config, description=__doc__)
    args, state, _ = start_run(args, "dpo", {"--sft": args.sft})  # with --resume: the run's saved flags, train_state.pt
    check_flags(args)
    stop = args.stop_at or args.max_steps
    if state is not None and state["step"] >= stop:  # before the reference pass, which takes minutes on a real model
        print(f"nothing to do: the run in {args.out_dir} is at step {state['step']}")
        return
    rt = setup_runtime(dist.setup(args.device), args.dtype, args.seed, training=True)
    inputs = input_digests({"--data": args.data, "--val_data": args.val_data, "--sft": args.sft}, state,
                          getattr(args, "_given", None))

    # data: read and validated before anything is written (ties and single responses are errors in read_prefs)
    train_records, val_records = read_split(read_prefs, args.data, args.val_data, args.val_frac, args.seed)

    # the reference: the SFT model, used once for the log-probs of every response, then dropped (load_model's
    # third value, the checkpoint dict, is a CPU copy of the weights: not kept)
    ref, tok = load_model(args.sft, rt.device, kind="gpt", flag="--sft")[:2]
    disable_dropout(ref)
    max_len = ref.config.block_size
    train, val, data_line = encode_pref_splits(train_records, val_records, tok, max_len, args)
    print(data_line)

    # the gold score of sampled responses to held-out prompts (the built-in task only; never trained on), its
    # flags checked before the reference pass, which takes minutes on a real model
    gold_prompts = [r["prompt"] for r in val_records[:args.gold_prompts]]
    use_gold = gold_on(args.gold, gold_prompts, args.val_data or args.data)  # --gold on with other prompts: refused
    check(not use_gold or args.response_length < max_len,
          f"--response_length {args.response_length} must be < block_size {max_len} for the gold score (or --gold off)")
    gold_ids = encode_prompts(gold_prompts, tok, max_len - args.response_length)[0] if use_gold else None

    train_lengths = [max(map(len, ex["ids"])) for ex in train]
    val_order = LengthGroupedSampler([max(map(len, ex["ids"])) for ex in val], args.batch_size,
                                     seed=args.seed).batches(0)[:args.eval_batches]
    ref_train = reference_logprobs(ref, train, LengthGroupedSampler(train_lengths, 4 * args.batch_size, shuffle=False)
                                   .batches(0), tok.pad_id, max_len, rt, args.share_prompts)
    ref_val = reference_logprobs(ref, val, val_order, tok.pad_id, max_len, rt, args.share_prompts)
    del ref
    print(f"reference log-probs computed in {time.time() - t_start:.1f}s")

    # the policy: the SFT model (or the run being resumed)
    model = load_model(args.out_dir if state else args.sft, rt.device, kind="gpt")[0]
    disable_dropout(model)
    model.grad_checkpointing = args.grad_checkpointing
    train_model = dist.wrap(maybe_compile(model, args.compile))  # DDP under torchrun
    sampler = LengthGroupedSampler(train_lengths, args.batch_size, seed=args.seed)
    val_batches = [make_batch([val[i] for i in b], [ref_val[i] for i in b], tok.pad_id, max_len, args.share_prompts)
                   for b in val_order]
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, BETAS, rt.device_type)
    step = restore_run(state, optimizer, sampler) if state is not None else 0

    def eval_row():
        row = evaluate(dist.unwrap(train_model), val_batches, args.beta, rt)
        if use_gold:
            row["gold"] = sampled_gold(model, gold_prompts, gold_ids, tok, args, rt)
        return row

    def val_line(m):
        gold = f" gold {m['gold']:.3f}" if "gold" in m else ""
        return f"val loss {m['val_loss']:.4f} acc {m['val_acc']:.3f} margin {m['val_margin']:.3f}{gold}"

    logger = dist.metrics_logger(args.out_dir, resume=state is not None, step=step)  # the first write to out_dir
    print(f"DPO: policy {model.num_params() / 1e6:.2f}M params, beta {args.beta}, {args.max_steps} steps x "
          f"{args.batch_size * args.grad_accum} prompts, models in memory while training: 1, {rt.device} {rt.dtype}")
    timer = Timer(stop, step)
    if step == 0:
        val_metrics = eval_row()
        logger.log({"step": 0, **val_metrics, "time": time.time() - t_start})
        print(f"step 0/{args.max_steps} | {val_line(val_metrics)}")
    stream = endless(sampler)
    model.train()
    # the sums of the metrics row being gathered; a resumed run takes them from train_state.pt (save_run), so that its
    # next row averages the same steps as the uninterrupted run's (rank 0 holds the ranks' tokens and pad_frac there).
    # The running sums of the losses stay on the device (one sync per log line, not five per micro-batch); the token
    # counts are the host's (the batches are built there)
    keys = ("loss", "acc", "margin", "chosen_reward", "rejected_reward")
    window = (state or {}).get("window") or {**dict.fromkeys(keys, 0.0), "tokens": 0, "pad_frac": 0.0, "steps": 0}
    sums, n_steps = torch.tensor([window[k] for k in keys], device=rt.device), window["steps"]  # (5,)
    n_tok, pad_frac = (window["tokens"], window["pad_frac"]) if dist.is_main() else (0, 0.0)
    while step < stop:
        lr = cosine_lr(step, args.lr, args.warmup, args.max_steps, args.min_lr)
        # every rank draws the step's grad_accum micro-batches and keeps its own share (all of them in one process)
        step_batches = [next(stream) for _ in range(args.grad_accum)]
        micro = [make_batch([train[i] for i in b], [ref_train[i] for i in b], tok.pad_id, max_len, args.share_prompts)
                 for b in dist.mine(step_batches)]
        step_pairs = dist.all_reduce_sum(sum(len(m["winner"]) for m in micro))  # over all ranks' micro-batches
        step_sums = torch.zeros(len(keys), device=rt.device)  # (5,)
        for j, batch in enumerate(micro):
            n_tok += int(slots_run(batch).sum())  # the tokens the model runs: the packed rows' when prompts are shared
            pad_frac += padding_fraction(batch) / args.grad_accum
            # L = mean over the step's pairs: a micro-batch weighs by its share of them
            share = len(batch["winner"]) / step_pairs
            dist.sync_grads(train_model, j == len(micro) - 1)  # the ranks sum their gradients once per step
            loss, stats = batch_loss(train_model, to_device(batch, rt.device), args.beta, rt)
            (loss * share).backward()
            step_sums += torch.stack([loss.detach(), stats["accuracy"], stats["margin"], stats["chosen_reward"],
                                      stats["rejected_reward"]]).detach().float() * share  # (5,)
        step_sums = dist.all_reduce_sum(step_sums)  # the sum of the ranks' shares
        # a NaN or inf loss or gradient norm stops here, before the step, with the last checkpoint intact
        grad_norm = optimizer_step(model, optimizer, lr, args.grad_clip, f"step {step + 1}", step_sums[0])
        sums += step_sums
        step += 1
        n_steps += 1

        evaluated = step % args.eval_interval == 0 or step == stop
        # the rows of the run's schedule; a --stop_at between them adds one, whose sums the resumed run carries on
        scheduled = step % args.log_interval == 0 or step % args.eval_interval == 0 or step == args.max_steps
        val_metrics = eval_row() if evaluated else None
        if scheduled or evaluated:
            means = dict(zip(keys, (sums / n_steps).tolist()))
            tok_all, pad_all = dist.all_reduce_sum([n_tok, pad_frac])  # all ranks'
            row = {"step": step, **means, "lr": lr, "grad_norm": grad_norm, "tokens": tok_all / n_steps,
                   "pad_frac": pad_all / n_steps, "time": time.time() - t_start, **(val_metrics or {})}
            logger.log(row)
            print(f"step {step}/{args.max_steps} | loss {row['loss']:.4f} | acc {row['acc']:.3f} | margin "
                  f"{row['margin']:.3f} | {val_line(val_metrics) if val_metrics else 'val -'} | "
                  f"{fmt_time(timer.eta(step - 1))} left", flush=True)
            if scheduled:
                sums, n_steps, n_tok, pad_frac = torch.zeros(len(keys), device=rt.device), 0, 0, 0.0
        if step % args.ckpt_interval == 0 or step == stop:
            # train_state.pt keeps the row's sums; the ranks' tokens and pad_frac are added up on rank 0 now, here as in
            # a resumed run, so that both add the same numbers in the same order
            n_tok, pad_frac = dist.all_reduce_sum([n_tok, pad_frac])
            window = {**dict(zip(keys, sums.tolist())), "tokens": n_tok, "pad_frac": pad_frac, "steps": n_steps}
            n_tok, pad_frac = (n_tok, pad_frac) if dist.is_main() else (0, 0.0)
            save_run(args.out_dir, model_payload(model, tok, "dpo", args, step, models_resident=1), optimizer,
                     sampler, step, model, window, inputs)
    dist.cleanup()
    if step < args.max_steps:
        print(f"stopped at step {step} (--stop_at); continue with --resume")
        return
    print(f"done: step {step}; {fmt_time(time.time() - t_start)}; saved {args.out_dir}/{CKPT}")


if __name__ == "__main__":
    run(main)
