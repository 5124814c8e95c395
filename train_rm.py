"""
Stage 2 of InstructGPT: the reward model (RM), trained on human comparisons.

The RM is the SFT model with its LM head replaced by a scalar head; r(x, y) is the head's output at the last
real token of prompt + response (the EOS). Bradley-Terry: a labeler prefers y_w to y_l with probability
    P(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l)),      L_RM = -log sigma(r(x, y_w) - r(x, y_l)).
A prompt with K ranked responses gives C(K, 2) pairs; each response goes through the model once and the loss
is averaged over the prompt's pairs, then over prompts (InstructGPT eq. 1), so large K does not dominate:
    loss = 1/N sum_x 1/C(K,2) sum_{y_w ranked above y_l} -log sigma(r(x, y_w) - r(x, y_l))
Pairwise data is the K = 2 case. The prompt goes through the model once for its K responses (--share_prompts:
one row, the responses after the prompt, masked so that each sees only the prompt and itself; the same scores
and gradients as a row per response). After training, the head's bias is shifted so that the SFT demonstrations
score 0 on average (InstructGPT), and their mean (0) and std are stored in the checkpoint for PPO.

Run (after train_sft.py; 2 CPU cores: about 75 seconds where the CPU has bf16 instructions, 2.5 minutes in float32):
    python train_rm.py --data out/data/prefs.jsonl --init_from out/sft --out_dir out/rm
Continue an interrupted run (its saved flags are reused; `--resume auto`: continue if there is a checkpoint):
    python train_rm.py --out_dir out/rm --resume
On 2 GPUs (or 2 CPU processes): the same steps on the same comparisons (README "Many GPUs"):
    torchrun --standalone --nproc_per_node 2 train_rm.py --init_from out/sft --out_dir out/rm --grad_accum 2

Deviations from InstructGPT (Ouyang et al. 2022, section 3.5 and appendix C):
- The RM starts from our own (tiny) SFT model; InstructGPT uses one 6B RM for every policy size.
- Several epochs over the comparisons (InstructGPT: one, as its 6B RM overfits after that); the tiny RM
  on the built-in task keeps improving its held-out accuracy for a few epochs.
- Held-out metrics beyond the loss: pairwise accuracy, the mean margin r_w - r_l, and the calibration of
  sigma(r_a - r_b) against the labels (expected calibration error over 5 bins).
- Optional reward centering (Eisenstein et al. 2023, TRL's center_rewards_coefficient), off by default.
- Responses identical to a better-ranked response of the same prompt are an input error by default
  (read_prefs); --allow_ties drops them instead, and says how many.
"""

import functools
import math
import time
from dataclasses import dataclass

import torch

from nanorlhf import dist, lora, tasks
from nanorlhf.data import (LengthGroupedSampler, collate, encode_sft, pack_shared_prefix,
                           padding_fraction, ranked_pairs, read_prefs, read_sft, run_sequences, slots_run, to_device)
from nanorlhf.losses import kwise_ranking_loss, reward_centering_loss
from nanorlhf.model import last_index
from nanorlhf.train_common import (RESUME_HELP, SHARE_PROMPTS_HELP, check_head_not_adapted, check_loop_flags,
                                   encode_pref_splits, endless, fmt_count, input_digests, nothing_left, optimizer_step,
                                   parse_stage_flags, peak_flops, read_split, restore_run, save_run, start_run)
from nanorlhf.utils import (CKPT, Timer, check, configure_optimizer, cosine_lr, flag,
                            fmt_time, load_model, maybe_compile, model_payload, run, setup_runtime)


@dataclass
class Config:
    # data
    data: str = flag("out/data/prefs.jsonl", "comparisons, JSONL: {prompt, chosen, rejected}, HH {chosen, rejected} "
                                             "or {prompt, responses, ranking}")
    val_data: str | None = flag(None, "held-out comparisons (default: hold out --val_frac of --data)")
    val_frac: float = flag(0.1, "fraction of --data held out when there is no --val_data")
    allow_ties: bool = flag(False, "drop responses identical to a better-ranked one (counted) instead of an error")
    sft_data: str = flag("out/data/sft.jsonl", "demonstrations that score mean 0 after training ('': the held-out "
                                               "responses instead)")
    norm_samples: int = flag(1000, "how many of --sft_data's first records set the reward's mean and std")
    out_dir: str = flag("out/rm", "output directory: ckpt.pt, train_state.pt, metrics.jsonl")
    init_from: str = flag("out/sft", "checkpoint dir to start from: an SFT model (new scalar head) or a reward model")
    lora_rank: int = flag(0, "train LoRA adapters of this rank and the head instead of every weight (0 = off); "
                             "ckpt.pt is merged")
    lora_alpha: float = flag(16.0, "LoRA alpha: the adapters' update is (alpha / rank) B A")
    lora_targets: str = flag(lora.DEFAULT_TARGETS, "regex naming the Linear layers that get adapters")
    # optimization
    batch_size: int = flag(16, "prompts per micro-batch (each brings its K responses)")
    share_prompts: bool = flag(True, SHARE_PROMPTS_HELP)
    grad_accum: int = flag(1, "micro-batches per optimizer step over all ranks (under torchrun each rank runs "
                              "grad_accum / WORLD_SIZE of them)")
    lr: float = flag(5e-4, "peak learning rate")
    min_lr: float = flag(5e-5, "learning rate at the end of the cosine decay")
    warmup: int = flag(30, "linear warmup steps")
    max_steps: int = flag(900, "optimizer steps")
    weight_decay: float = flag(0.1, "AdamW weight decay (matrices only)")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0: no clipping)")
    center_coef: float = flag(0.0, "weight of the reward-centering term mean((r_i + r_j)^2) (TRL uses 0.01; 0: off)")
    # evaluation, logging, checkpoints
    eval_interval: int = flag(150, "steps between held-out evaluations")
    eval_batches: int = flag(64, "held-out batches per evaluation (the same ones every time)")
    log_interval: int = flag(50, "steps between progress lines and metrics.jsonl rows")
    ckpt_interval: int = flag(300, "steps between checkpoints (one is always written at the end)")
    # system
    device: str = flag("auto", "auto | cpu | cuda | cuda:1 | mps")
    dtype: str = flag("auto", "auto | float32 | bfloat16 (autocast; auto: bf16 where GPU or CPU has it natively)")
    compile: bool = flag(False, "torch.compile the model")
    grad_checkpointing: bool = flag(False, "recompute each block's activations in the backward pass (less memory)")
    fsdp: bool = flag(False, "under torchrun: shard weights, gradients and optimizer state over the ranks (FSDP2)")
    seed: int = flag(0, "seed for the held-out split and the batch order")
    resume: str = flag("off", RESUME_HELP)
    stop_at: int | None = flag(None, "stop (with a checkpoint) after this step; the schedule still runs to --max_steps")


BETAS = (0.9, 0.95)
CALIBRATION_BINS = 5


def check_flags(args):
    check_loop_flags(args)
    # the normalisation needs a std, which 1 score does not have
    check(args.norm_samples >= 2, f"--norm_samples must be at least 2, got {args.norm_samples}")
    check(args.center_coef >= 0, f"--center_coef must be >= 0, got {args.center_coef}")
    # --norm_samples only slices --sft_data: without it the held-out responses set the mean and std
    check(args.sft_data or "norm_samples" not in getattr(args, "_given", ()),
          "--norm_samples does nothing with --sft_data '' (the held-out responses set the reward's mean and std); "
          "leave it out")
    if args.lora_rank:  # the scalar head trains in full (main)
        check_head_not_adapted(args.lora_targets, "head", "the reward model's head")


def rm_payload(model, tok, args, step, **extra):
    """ckpt.pt's payload; with LoRA the merged weights (a plain reward model) plus the trained tensors for --resume."""
    payload = model_payload(model, tok, "rm", args, step, **extra)
    if args.lora_rank:
        payload = lora.lora_payload(model, payload, args.lora_rank, args.lora_alpha, args.lora_targets)
    return payload


def drop_ties(records):
    """
    Remove each response identical to a better-ranked response of the same prompt (a tie teaches nothing) and
    the records left with fewer than 2 responses. -> (records, number of responses removed)
    {"responses": ["a", "b", "a"], "ranking": [2, 1, 0]} -> {"responses": ["a", "b"], "ranking": [0, 1]}, 1
    """
    out, n_removed = [], 0
    for r in records:
        keep = []
        for i in r["ranking"]:
            if all(r["responses"][i] != r["responses"][j] for j in keep):
                keep.append(i)
        n_removed += len(r["ranking"]) - len(keep)
        if len(keep) >= 2:
            out.append({"prompt": r["prompt"], "responses": [r["responses"][i] for i in keep],
                        "ranking": list(range(len(keep)))})
    return out, n_removed


def make_batch(examples, pad_id, max_len, share_prompts=False):
    """
    Encoded records [{"ids": [K_n sequences], "ranking"}, ...] -> one right-padded batch of all N = sum K_n
    sequences (idx, attention_mask (N, T)) plus ranking (B, K) long and k_mask (B, K) bool, K = max K_n.
    Sequences are flattened record by record, so scores[k_mask] = flat_scores puts each score in its place.
    share_prompts: also the packed rows that the model runs instead, one per record with the prompt once
    (pack_shared_prefix: packed_idx, packed_pos, packed_mask, packed_real, unpack).
    """
    batch = collate([s for ex in examples for s in ex["ids"]], pad_id, max_len=max_len)
    if share_prompts:
        batch.update(pack_shared_prefix([ex["ids"] for ex in examples], pad_id, max_len=max_len))
    K = max(len(ex["ids"]) for ex in examples)
    batch["ranking"] = torch.zeros(len(examples), K, dtype=torch.long)
    batch["k_mask"] = torch.zeros(len(examples), K, dtype=torch.bool)
    for b, ex in enumerate(examples):
        batch["ranking"][b, :len(ex["ranking"])] = torch.tensor(ex["ranking"])
        batch["k_mask"][b, :len(ex["ids"])] = True
    return batch


def score_batch(model, batch, rt):
    """
    r(x, y) of every response in the batch, as (B, K) (0 where k_mask is False). This is ScalarGPT.score
    written out so that a compiled model runs it: the value at the last real token, the EOS.
    """
    with rt.autocast():
        values = run_sequences(model, batch)  # (N, T), through the packed rows when there are
    flat = values.gather(1, last_index(batch["attention_mask"])[:, None]).squeeze(1)  # (N,)
    scores = flat.new_zeros(batch["k_mask"].shape)  # (B, K)
    scores[batch["k_mask"]] = flat
    return scores


def pair_diffs(scores, ranking):
    """
    r_w - r_l for every labelled pair (w ranked above l) of one prompt.
    scores [3., 1., 2.], ranking [0, 2, 1] -> [3 - 2, 3 - 1, 2 - 1] = [1., 2., 1.]
    """
    return [scores[w] - scores[l] for w, l in ranked_pairs(ranking)]


def pair_accuracy(diffs):
    """
    The fraction of pairs the RM orders as labelled, a tie counting 1/2:
        acc = mean over pairs of [r_w > r_l] + 1/2 [r_w = r_l]
    diffs (r_w - r_l) [1., 0., -2., 3.] -> (1 + 0.5 + 0 + 1) / 4 = 0.625
    """
    return sum((d > 0) + 0.5 * (d == 0) for d in diffs) / len(diffs)


def batch_diffs(scores, batch):
    """r_w - r_l for every labelled pair of every prompt of a batch, as a list of floats."""
    out = []
    for s, rank, k in zip(scores.tolist(), batch["ranking"].tolist(), batch["k_mask"].sum(1).tolist()):
        out += pair_diffs(s[:k], rank[:k])
    return out


def calibration(diffs, n_bins=CALIBRATION_BINS):
    """
    Calibration of P(w > l) = sigma(r_w - r_l) against the labels, read as a classifier's (Guo et al. 2017):
    a pair's confidence is the probability the RM gives its favourite, sigma(|r_w - r_l|) in [0.5, 1], and the
    RM is right when its favourite is the labelled winner (1/2 for a tie). With bins of equal width on [0.5, 1]
        ECE = sum_bins n_bin / n * |mean confidence - accuracy|
    -> (ece, [[mean confidence, accuracy, count] per non-empty bin]).
    Example: diffs [2., -2.] -> confidence sigma(2) = 0.881 twice, accuracy 1/2 -> ece 0.381.
    """
    bins = [[] for _ in range(n_bins)]
    for d in diffs:
        conf = 1 / (1 + math.exp(-abs(d)))
        right = 1.0 if d > 0 else 0.5 if d == 0 else 0.0
        bins[min(int((conf - 0.5) * 2 * n_bins), n_bins - 1)].append((conf, right))
    ece, table = 0.0, []
    for b in bins:
        if b:
            conf, acc = sum(c for c, _ in b) / len(b), sum(r for _, r in b) / len(b)
            ece += len(b) / len(diffs) * abs(conf - acc)
            table.append([round(conf, 4), round(acc, 4), len(b)])
    return ece, table


@torch.no_grad()
def evaluate(model, batches, rt):
    """
    Held-out loss, pairwise accuracy (a tie counts 1/2), mean margin r_w - r_l and calibration, over a fixed
    list of batches. Also returns the scores of each evaluated record's responses.
    """
    model.eval()
    loss_sum, n_prompts, diffs, record_scores = 0.0, 0, [], []
    for batch in batches:
        batch = to_device(batch, rt.device)
        scores = score_batch(model, batch, rt)  # (B, K)
        loss_sum += kwise_ranking_loss(scores, batch["ranking"], batch["k_mask"]).item() * len(scores)
        n_prompts += len(scores)
        record_scores += [s[:k] for s, k in zip(scores.tolist(), batch["k_mask"].sum(1).tolist())]
        diffs += batch_diffs(scores, batch)
    model.train()
    ece, table = calibration(diffs)
    metrics = {"val_loss": loss_sum / n_prompts, "val_acc": pair_accuracy(diffs),
               "val_margin": sum(diffs) / len(diffs), "val_ece": ece, "val_calibration": table}
    return metrics, record_scores


def gold_agreement(records, record_scores):
    """
    Fraction of the pairs that the gold judge orders strictly on which the RM agrees with gold (built-in task);
    None when gold ties every pair (there is nothing to agree on).
    records: raw {"prompt", "responses"}, record_scores: the RM score of each response, in the same order.
    """
    agree, n = 0.0, 0
    for r, s in zip(records, record_scores):
        g = [tasks.gold(r["prompt"], y) for y in r["responses"]]
        for a in range(len(g)):
            for b in range(a + 1, len(g)):
                if g[a] != g[b]:
                    n += 1
                    agree += 0.5 if s[a] == s[b] else float((s[a] > s[b]) == (g[a] > g[b]))
    return agree / n if n else None


@torch.no_grad()
def score_sequences(model, seqs, pad_id, batch_size, max_len, rt):
    """r at the last token of each id list (prompt + response + EOS) -> (len(seqs),) float32 on the CPU."""
    model.eval()
    out = torch.zeros(len(seqs))
    for idx in LengthGroupedSampler([len(s) for s in seqs], batch_size, shuffle=False).batches(0):
        batch = to_device(collate([seqs[i] for i in idx], pad_id, max_len=max_len), rt.device)
        with rt.autocast():
            out[idx] = model.score(batch["idx"], batch["attention_mask"]).float().cpu()
    return out


def main():
    args = parse_stage_flags(Config, description=__doc__)
    # with --resume: the run's saved flags, its train_state.pt and a LoRA run's trained tensors (put back below)
    args, state, saved_lora = start_run(args, "rm", {"--init_from": args.init_from})
    check_flags(args)
    rt = setup_runtime(dist.setup(args.device), args.dtype, args.seed, training=True)
    # a fresh run starts from the SFT model's trunk (--init_from), and so does a LoRA run that resumes (with its saved
    # adapters); a full run resumes from its own checkpoint and does not read --init_from again
    from_base = state is None or args.lora_rank > 0
    # the files the run reads, the same ones when it resumes
    inputs = input_digests({"--data": args.data, "--val_data": args.val_data, "--sft_data": args.sft_data,
                            "--init_from": args.init_from if from_base else None}, state,
                           getattr(args, "_given", None))

    # data and model: everything is read and validated before anything is written to out_dir
    reader = functools.partial(read_prefs, allow_ties=args.allow_ties)
    train_records, val_records = read_split(reader, args.data, args.val_data, args.val_frac, args.seed)
    n_ties = 0
    if args.allow_ties:
        (train_records, n1), (val_records, n2) = drop_ties(train_records), drop_ties(val_records)
        n_ties = n1 + n2
        for split, records in (("train", train_records), ("val", val_records)):
            check(records, f"{nothing_left(split, args, 'record')} is left once ties are dropped (--allow_ties): "
                           f"each one's responses are all identical")
    sft_records = read_sft(args.sft_data)[:args.norm_samples] if args.sft_data else None
    # the built-in task knows its annotator: its agreement with gold on the same held-out pairs is the ceiling.
    # Decided now, so that a meta.json of the task's that is broken stops the run here, not after training
    meta = tasks.task_meta(args.val_data or args.data)
    # (load_model's third value, the checkpoint dict, is a CPU copy of the weights: not kept)
    model, tok = load_model(args.init_from if from_base else args.out_dir, rt.device, kind="scalar",
                            from_gpt=from_base, flag="--init_from" if from_base else None)[:2]
    if args.lora_rank:
        lora.apply_lora_flags(model, args, saved_lora["trainable"] if state is not None else None)
        model.head.requires_grad_(True)  # the new scalar head trains in full
    max_len = model.config.block_size
    train, val, data_line = encode_pref_splits(train_records, val_records, tok, max_len, args)
    # the demonstrations that set the reward's mean and std after training (the held-out responses without them:
    # at least 2, as a val record keeps 2); found now, so that too few stop the run before anything is written
    if sft_records is not None:
        norm_seqs = [ids for ids, _ in encode_sft(sft_records, tok, max_len)[0]]
        check(len(norm_seqs) >= 2, f"{args.sft_data}: {len(norm_seqs)} of its first {len(sft_records)} demonstrations "
                                   f"fit in {max_len} tokens; the reward's mean and std need at least 2 "
                                   f"(--sft_data '': the held-out responses)")
        norm_on = f"{len(norm_seqs)} demonstrations of {args.sft_data}"
    else:
        norm_seqs = [s for ex in val for s in ex["ids"]]
        norm_on = f"{len(norm_seqs)} held-out responses"
    print(data_line + (f"; {n_ties} tied responses dropped" if args.allow_ties else ""))

    sampler = LengthGroupedSampler([max(map(len, ex["ids"])) for ex in train], args.batch_size, seed=args.seed)
    val_sampler = LengthGroupedSampler([max(map(len, ex["ids"])) for ex in val], args.batch_size, seed=args.seed)
    val_order = val_sampler.batches(0)[:args.eval_batches]
    val_batches = [make_batch([val[i] for i in b], tok.pad_id, max_len, args.share_prompts) for b in val_order]
    # the built-in judge scores only the task's prompts (0 for any other): with a prompt of the user's beside the
    # task's meta.json (out/data/my_prefs.jsonl) its numbers would be made up, so there are none
    builtin = meta is not None and len(val) == len(val_records) and all(
        len(ex["ids"]) == len(r["responses"]) and tasks.parse_prompt(r["prompt"]) is not None
        for ex, r in zip(val, val_records))
    val_evaluated = [val_records[i] for b in val_order for i in b] if builtin else None
    model.grad_checkpointing = args.grad_checkpointing
    # under torchrun: DDP, or FSDP2 (which shards `model` in place, so the optimizer is built after it)
    train_model = dist.wrap(maybe_compile(model, args.compile), args.fsdp)
    eval_model = dist.unwrap(train_model)
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, BETAS, rt.device_type)
    peak = peak_flops(rt)[0] * dist.world_size()  # MFU over all the ranks' devices
    step = restore_run(state, optimizer, sampler, model) if state is not None else 0
    stop = args.stop_at or args.max_steps
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config.n_layer} layers x {model.config.n_embd}; "
          f"{rt.device} {rt.dtype}; {args.batch_size * args.grad_accum} prompts per step, "
          f"{len(sampler)} batches per epoch" + (f"; {dist.world_size()} ranks" if dist.world_size() > 1 else ""))
    if step >= stop:
        print(f"nothing to do: the run in {args.out_dir} is at step {step}")
        dist.cleanup()
        return

    def val_line(m):
        return f"val acc {m['val_acc']:.3f} margin {m['val_margin']:.2f} ece {m['val_ece']:.3f}"

    # training loop
    logger = dist.metrics_logger(args.out_dir, resume=state is not None, step=step)  # the first write to out_dir
    timer = Timer(stop, step)
    t_start = time.time()
    val_metrics = None
    if step == 0:
        val_metrics, _ = evaluate(eval_model, val_batches, rt)
        logger.log({"step": 0, **val_metrics})
        print(f"step 0/{args.max_steps} | {val_line(val_metrics)}")
    stream = endless(sampler)
    model.train()
    # the sums of the metrics row being gathered; a resumed run takes them from train_state.pt (save_run), so that its
    # next row averages the same steps as the uninterrupted run's (rank 0 holds the ranks' acc and pad_frac there)
    window = (state or {}).get("window") or {"loss": 0.0, "acc": 0.0, "pad_frac": 0.0, "steps": 0}
    loss_sum, n_steps = window["loss"], window["steps"]
    acc_sum, pad_sum = (window["acc"], window["pad_frac"]) if dist.is_main() else (0.0, 0.0)  # pad_sum: of fractions
    n_tok, flops, dt = 0, 0.0, 0.0  # the throughput of this process's steps (since it started or resumed)
    while step < stop:
        t0 = time.perf_counter()
        lr = cosine_lr(step, args.lr, args.warmup, args.max_steps, args.min_lr)
        # every rank draws the step's grad_accum micro-batches and keeps its own share (all of them in one process)
        step_batches = [next(stream) for _ in range(args.grad_accum)]
        micro = [make_batch([train[i] for i in b], tok.pad_id, max_len, args.share_prompts)
                 for b in dist.mine(step_batches)]
        step_prompts = dist.all_reduce_sum(sum(len(b["ranking"]) for b in micro))  # over all ranks' micro-batches
        step_loss = 0.0
        for i, batch in enumerate(micro):
            real = slots_run(batch)  # (rows, T): the packed rows when prompts are shared
            tokens = int(real.sum())
            n_tok += tokens
            flops += model.flops_per_token(real.size(1)) * tokens
            pad_sum += padding_fraction(batch) / args.grad_accum
            batch = to_device(batch, rt.device)
            dist.sync_grads(train_model, i == len(micro) - 1)  # the ranks sum their gradients once per step
            scores = score_batch(train_model, batch, rt)  # (B, K)
            # L = mean over prompts of the mean over the prompt's pairs of -log sigma(r_w - r_l); a micro-batch
            # weighs by its share of the step's prompts, so accumulation gives the loss of one big batch
            loss = kwise_ranking_loss(scores, batch["ranking"], batch["k_mask"])
            if args.center_coef > 0:
                # L_center = mean over pairs of (r_i + r_j)^2, keeps the scores near 0
                loss = loss + args.center_coef * reward_centering_loss(scores, batch["k_mask"])
            (loss * len(scores) / step_prompts).backward()
            step_loss += loss.item() * len(scores) / step_prompts
            diffs = batch_diffs(scores.detach(), batch)
            acc_sum += pair_accuracy(diffs) / args.grad_accum
        step_loss = dist.all_reduce_sum(step_loss)
        # a NaN or inf loss or gradient norm stops here, before the step, with the last checkpoint intact
        grad_norm = optimizer_step(model, optimizer, lr, args.grad_clip, f"step {step + 1}", step_loss)
        loss_sum += step_loss
        step += 1
        n_steps += 1
        dt += time.perf_counter() - t0

        evaluated = step % args.eval_interval == 0 or step == stop
        # the rows of the run's schedule; a --stop_at between them adds one, whose sums the resumed run carries on
        scheduled = step % args.log_interval == 0 or step % args.eval_interval == 0 or step == args.max_steps
        if evaluated:
            val_metrics, record_scores = evaluate(eval_model, val_batches, rt)
        if scheduled or evaluated:
            acc_all, n_tok, flops, pad_all = dist.all_reduce_sum([acc_sum, n_tok, flops, pad_sum])  # all ranks'
            row = {"step": step, "loss": loss_sum / n_steps, "acc": acc_all / n_steps, "lr": lr, "grad_norm": grad_norm,
                   "tok_per_s": n_tok / dt, "mfu": flops / dt / peak, "pad_frac": pad_all / n_steps,
                   "epoch": step * args.grad_accum / len(sampler), "time": time.time() - t_start}
            if evaluated:
                row.update(val_metrics)
            logger.log(row)
            print(f"step {step}/{args.max_steps} | loss {loss_sum / n_steps:.3f} | acc {acc_all / n_steps:.3f} | "
                  f"{val_line(val_metrics) if val_metrics else 'val -'} | {fmt_count(n_tok / dt)} tok/s | "
                  f"mfu {100 * flops / dt / peak:.1f}% | {fmt_time(timer.eta(step - 1))} left")
            n_tok, flops, dt = 0, 0.0, 0.0
            if scheduled:
                loss_sum, acc_sum, pad_sum, n_steps = 0.0, 0.0, 0.0, 0
        if step < args.max_steps and (step % args.ckpt_interval == 0 or step == stop):  # the end saves below
            # train_state.pt keeps the row's sums; the ranks' acc and pad_frac are added up on rank 0 now, here as in a
            # resumed run, so that both add the same numbers in the same order
            acc_sum, pad_sum = dist.all_reduce_sum([acc_sum, pad_sum])
            window = {"loss": loss_sum, "acc": acc_sum, "pad_frac": pad_sum, "steps": n_steps}
            acc_sum, pad_sum = (acc_sum, pad_sum) if dist.is_main() else (0.0, 0.0)
            save_run(args.out_dir, rm_payload(model, tok, args, step), optimizer, sampler, step, model, window,
                     inputs)
    if step < args.max_steps:
        print(f"stopped at step {step} (--stop_at); continue with --resume")
        dist.cleanup()
        return

    # the InstructGPT normalisation: shift the head's bias so that the demonstrations y_d score mean 0,
    #     b <- b - mean_d r(x_d, y_d),   so r(x, y) <- r(x, y) - mean_d r(x_d, y_d);   r_w - r_l is unchanged,
    # so the held-out metrics above stand
    scores = score_sequences(model, norm_seqs, tok.pad_id, 4 * args.batch_size, max_len, rt)
    with torch.no_grad():
        dist.writable(model, "head.bias").sub_(scores.mean().item())  # under FSDP2 every rank shifts its shard
    # scored again rather than shifted by hand: the stored mean and std are those of the saved model as it computes
    # (the mean is 0 up to rounding), which is what evaluate.py and sample.py divide by
    scores = score_sequences(model, norm_seqs, tok.pad_id, 4 * args.batch_size, max_len, rt)
    reward_mean, reward_std = scores.mean().item(), scores.std().item()
    summary = {"step": step, "final": True, **val_metrics, "reward_mean": reward_mean, "reward_std": reward_std,
               "time": time.time() - t_start}
    line = f"held-out pairwise accuracy {val_metrics['val_acc']:.3f}"
    if builtin:
        # E[annotator agrees with gold] = mean over the pairs of sigma(beta |g_a - g_b|), gold ties counted 1/2
        summary["annotator_agreement"] = tasks.annotator_agreement(val_evaluated, meta["annotator_beta"], ties="half")
        gold_acc = gold_agreement(val_evaluated, record_scores)
        line += f" vs the annotator's agreement with gold on the same pairs {summary['annotator_agreement']:.3f}; "
        if gold_acc is None:
            line += "gold ties every one of these pairs"
        else:
            summary["val_gold_acc"] = gold_acc
            line += f"RM agrees with gold on {gold_acc:.3f} of the pairs gold does not tie"
    logger.log(summary)
    save_run(args.out_dir, rm_payload(model, tok, args, step, reward_mean=reward_mean, reward_std=reward_std),
             optimizer, sampler, step, model, inputs=inputs)
    dist.cleanup()
    print(line)
    print(f"done: step {step}; rewards on {norm_on}: mean {reward_mean:.2e}, std {reward_std:.3f}; "
          f"{fmt_time(time.time() - t_start)}; saved {args.out_dir}/{CKPT}")


if __name__ == "__main__":
    run(main)
