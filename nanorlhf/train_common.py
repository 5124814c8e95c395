"""
The training-loop scaffolding that the stage scripts share, and nothing else: the held-out split, an endless
resumable stream of length-grouped batches, gradient clipping and the stop on a non-finite loss, the optimizer
step, the checks of the flags that the loops share (PPO's and GRPO's, --gold among them, and their RM's context),
the checkpoint files (ckpt.pt + train_state.pt, and PPO's others) written so that a kill at any moment leaves a set
of one step, --resume (on, off, auto), the flags of a resumed run, the digests of its inputs and the samples it
keeps, and the peak FLOP/s that MFU divides by.
The loops themselves stay in the scripts, where a reader expects them.
"""

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time

import numpy as np
import torch

from nanorlhf import dist, tasks, utils
from nanorlhf.data import encode_prefs
from nanorlhf.rollout import write_samples

# -----------------------------------------------------------------------------
# data


def holdout_split(records, val_frac, seed):
    """
    Split records into (train, val) by a seeded permutation: round(val_frac * n) records, at least 1, go to
    val. The same (n, val_frac, seed) always gives the same split, so a resumed run sees the same data.
    Example: 10 records, val_frac 0.2 -> 8 train, 2 val.
    """
    n = len(records)
    n_val = max(1, round(val_frac * n))
    utils.check(n_val < n, f"--val_frac {val_frac} leaves no training data ({n} records); pass --val_data instead")
    perm = np.random.default_rng(seed).permutation(n)
    val = set(perm[:n_val].tolist())
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]


def read_split(reader, data, val_data, val_frac, seed):
    """(train, val) records: val_data's records when given, else a held-out val_frac of data's."""
    records = reader(data)
    if val_data:
        return records, reader(val_data)
    utils.check(0.0 < val_frac < 1.0, f"--val_frac must be in (0, 1) when there is no --val_data, got {val_frac}")
    return holdout_split(records, val_frac, seed)


def endless(sampler):
    """
    Batches of indices forever, epoch after epoch. The sampler keeps its own (epoch, position) and its
    state_dict() after a batch points at the next one, so a stream rebuilt from a loaded state continues with
    exactly the batch the uninterrupted run would have drawn.
    """
    assert len(sampler) > 0
    while True:
        yield from sampler


def nothing_left(split, args, noun):
    """
    The start of the error that stops a stage when no example of a split is left (none fits the context, or all
    were ties), naming the flag and the file the split came from. noun: what the stage calls an example.
    ("train", args, "record") -> "--data a.jsonl: no record" (with --val_data), else "--data a.jsonl: no training
    record"; ("val", args, "record") -> "--val_data b.jsonl: no record", else "--data a.jsonl: no held-out record
    (--val_frac 0.1)".
    """
    if split == "train":
        return f"--data {args.data}: no {noun}" if args.val_data else f"--data {args.data}: no training {noun}"
    if args.val_data:
        return f"--val_data {args.val_data}: no {noun}"
    return f"--data {args.data}: no held-out {noun} (--val_frac {args.val_frac})"


def encode_pref_splits(train_records, val_records, tok, max_len, args):
    """
    The comparisons of train_rm.py and train_dpo.py, encoded (data.encode_prefs), each split checked to keep a
    record -> (train, val, line): line, the "data: ..." line both print (prompts, responses and pairs, and what was
    too long for max_len).
    """
    train, n_cut, n_dropped = encode_prefs(train_records, tok, max_len)
    val, n_cut_val, n_dropped_val = encode_prefs(val_records, tok, max_len)
    for split, kept in (("train", train), ("val", val)):
        utils.check(kept, f"{nothing_left(split, args, 'record')} keeps 2 responses that fit in {max_len} tokens")
    n_pairs = sum(math.comb(len(ex["ids"]), 2) for ex in train)
    line = (f"data: {len(train)} train prompts ({sum(len(ex['ids']) for ex in train)} responses, {n_pairs} pairs), "
            f"{len(val)} val prompts; too long for {max_len} tokens: {n_cut + n_cut_val} prompts cut from the left, "
            f"{len(train_records) + len(val_records) - len(train) - len(val)} records dropped (fewer than 2 responses "
            f"fit), {n_dropped + n_dropped_val} responses dropped from the records kept")
    return train, val, line


def check_head_not_adapted(targets, head, what):
    """
    A scalar head (the reward model's, PPO's critic's or shared value head) trains in full: --lora_targets that
    match its name would only add an adapter with a redundant copy of its update, so they are refused.
    Example: ("head", "head", "the reward model's head") -> UserError("--lora_targets 'head' matches head: ...").
    """
    try:
        matched = re.search(targets, head)
    except re.error as e:
        raise utils.UserError(f"--lora_targets {targets!r}: not a regular expression ({e})") from None
    utils.check(not matched, f"--lora_targets {targets!r} matches {head}: {what} trains in full, leave it out of the "
                             f"targets")


# -----------------------------------------------------------------------------
# optimization


def check_loop_flags(args):
    """
    The checks of the flags every training loop has (SFT's, RM's and DPO's: batch, schedule, intervals, --stop_at,
    and the held-out split's).
    """
    for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "log_interval",
                 "ckpt_interval"):
        utils.check(getattr(args, name) >= 1, f"--{name} must be at least 1, got {getattr(args, name)}")
    utils.check(args.lr > 0 and 0 <= args.min_lr <= args.lr,
                f"need --lr > 0 and 0 <= --min_lr <= --lr, got --lr {args.lr} --min_lr {args.min_lr}")
    utils.check(args.warmup >= 0, f"--warmup must be >= 0 (0: no warmup), got {args.warmup}")
    utils.check(args.weight_decay >= 0, f"--weight_decay must be >= 0, got {args.weight_decay}")
    # a trial run shortened below its warmup is allowed, but its learning rate rises to the end and never decays
    if args.warmup > args.max_steps and dist.is_main():
        last_lr = utils.cosine_lr(args.max_steps - 1, args.lr, args.warmup, args.max_steps, args.min_lr)
        print(f"note: --warmup {args.warmup} is longer than --max_steps {args.max_steps}: the learning rate rises for "
              f"the whole run and ends at {last_lr:.3g}, short of --lr {args.lr:g}")
    check_clip_flag("grad_clip", args.grad_clip)
    utils.check(args.stop_at is None or 1 <= args.stop_at <= args.max_steps,
                f"--stop_at must be in 1..{args.max_steps} (--max_steps), got {args.stop_at}")
    dist.check_grad_accum(args.grad_accum)
    dist.check_fsdp(getattr(args, "fsdp", False))
    # flags that would be accepted and do nothing, refused as train_ppo.py refuses its own; only those named on the
    # command line (a resumed run's flags are the saved ones, without _given: they were checked when it started)
    given = getattr(args, "_given", ())
    named = [f"--{n}" for n in ("lora_alpha", "lora_targets") if n in given]
    utils.check(getattr(args, "lora_rank", 0) > 0 or not named,
                f"{' and '.join(named)} {'does' if len(named) == 1 else 'do'} nothing without --lora_rank > 0")
    if hasattr(args, "lora_rank"):  # SFT's and RM's
        utils.check(args.lora_rank >= 0, f"--lora_rank must be >= 0 (0 = no LoRA), got {args.lora_rank}")
        utils.check(args.lora_alpha > 0, f"--lora_alpha must be > 0, got {args.lora_alpha}")
    # read_split holds out --val_frac of --data only without --val_data: named, at any value, it would do nothing
    utils.check(not (args.val_data and "val_frac" in given),
                f"--val_frac {args.val_frac} does nothing with --val_data (the held-out set is {args.val_data}); "
                f"leave --val_frac out")


def check_rollout_flags(args):
    """
    The checks of the flags that train_ppo.py and train_grpo.py share (rollout and minibatch sizes, AdamW, samples,
    checkpoints, --stop_at), before anything is loaded or written.
    """
    utils.check(args.batch_size >= 1 and args.num_minibatches >= 1 and args.grad_accum >= 1,
                "--batch_size, --num_minibatches and --grad_accum must be >= 1")
    utils.check(args.batch_size % args.num_minibatches == 0,
                f"--batch_size {args.batch_size} must be divisible by --num_minibatches {args.num_minibatches}")
    mb_size = args.batch_size // args.num_minibatches
    utils.check(mb_size % args.grad_accum == 0,
                f"the minibatch ({args.batch_size} / {args.num_minibatches} = {mb_size} episodes) must be divisible by "
                f"--grad_accum {args.grad_accum}")
    utils.check(args.response_length >= 1, "--response_length must be >= 1")
    utils.check(args.temperature > 0, "--temperature must be > 0 (a policy gradient needs a stochastic policy)")
    utils.check(args.weight_decay >= 0, f"--weight_decay must be >= 0, got {args.weight_decay}")
    for name in ("beta1", "beta2"):  # torch's AdamW raises a ValueError on its first step otherwise
        utils.check(0 <= getattr(args, name) < 1, f"--{name} must be in [0, 1), got {getattr(args, name)}")
    check_clip_flag("max_grad_norm", args.max_grad_norm)
    utils.check(args.gold in ("auto", "on", "off"), f"--gold {args.gold!r}: expected auto, on or off")
    utils.check(args.sample_interval >= 1 and args.save_interval >= 1,
                "--sample_interval and --save_interval must be >= 1")
    utils.check(args.num_samples >= 1, f"--num_samples must be >= 1, got {args.num_samples}")
    utils.check(args.stop_at is None or 1 <= args.stop_at <= args.num_iterations,
                f"--stop_at must be in 1..{args.num_iterations} (--num_iterations), got {args.stop_at}")
    # nanoGPT's batch semantics under torchrun: the --grad_accum micro-batches of a minibatch (and so the rollout's
    # scoring micro-batches) split evenly over the ranks
    dist.check_grad_accum(args.grad_accum)


def gold_on(mode, prompts, data):
    """
    Whether a PPO, GRPO or DPO run logs the built-in task's gold score (--gold auto | on | off): auto, when every
    prompt is one of the task's; on, refused (one line, before anything is written) when one is not, since the
    task's judge cannot parse it and gold would be 0 every iteration (every evaluation in DPO).
    Example: ("auto", ["sort 3 1", "hello"], path) -> False; ("on", the same) -> UserError; ("off", ...) -> False.
    """
    foreign = next((p for p in prompts if tasks.parse_prompt(p) is None), None)
    if mode == "on" and foreign is not None:
        raise utils.UserError(f"--gold on: {data} holds prompts that are not the built-in task's, e.g. "
                              f"{foreign[:60]!r}, which its gold judge cannot score (it would log 0); use --gold auto "
                              f"or off")
    return mode == "on" or (mode == "auto" and foreign is None)


def check_rm_context(policy, reward_model, sft, rm):
    """
    The reward model of a PPO or GRPO run scores prompt + response, up to the policy's block_size tokens: its own
    context must be as long: a shorter one would index past the RM's position table in the first rollout, after
    metrics.jsonl was started. sft and rm are the checkpoint directories, for the message.
    """
    utils.check(reward_model.config.block_size >= policy.config.block_size,
                f"{rm} has block_size {reward_model.config.block_size} < {policy.config.block_size} of {sft}: "
                f"the RM must score the policy's longest prompt + response")


def check_clip_flag(name, value):
    """The one meaning of a clipping flag in every stage: > 0 clips to it, 0 does not clip, < 0 is an error."""
    utils.check(value >= 0, f"--{name} must be >= 0 (0: no clipping), got {value}")


def clip_grad_norm(parameters, max_norm):
    """
    Clip the global gradient norm of parameters to max_norm; max_norm 0 means no clipping (torch's own
    clip_grad_norm_ would multiply every gradient by 0 and the model would silently never move).
    Returns the norm before clipping, as a tensor (no device sync).
    Example: gradients (3, 4), max_norm 1 -> (0.6, 0.8), returns 5; max_norm 0 -> (3, 4), returns 5.
    """
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf"))


def check_finite(where, **values):
    """
    Stop the stage (NonFiniteError: one line, exit status 2) when a loss or gradient norm is NaN or inf, before the
    optimizer step that would write it into the weights: the checkpoints already on disk stay the last good ones,
    this run's, or, before its first save, the earlier run's with its own metrics.jsonl (utils.MetricsLogger).
    `where` names the step ("" when the caller has no name for it: the message then starts with "non-finite");
    values are tensors or floats (the first tensor's float() waits for the device once).
    Example: check_finite("step 12", loss=torch.tensor(float("nan"))) -> NonFiniteError("step 12: non-finite loss nan; ...")
    """
    floats = {k: float(v) for k, v in values.items()}
    if not all(math.isfinite(v) for v in floats.values()):
        bad = ", ".join(f"{k} {v:g}" for k, v in floats.items())
        raise NonFiniteError(f"{where + ': ' if where else ''}non-finite {bad}; stopped before the optimizer step, so "
                             f"out_dir holds this run's last good checkpoint if it saved one (lower the learning rate, "
                             f"or resume from it), else what was there before the run started")


class NonFiniteError(utils.UserError):
    """A NaN or inf loss or gradient norm: reported in one line (utils.run), exit status 2."""


def optimizer_step(model, optimizer, lr, grad_clip, where="", loss=None):
    """
    Set the learning rate, clip the global gradient norm (grad_clip 0: no clipping), stop on a non-finite loss or
    gradient norm (check_finite; `where` names the step), step, zero the grads. Returns the gradient norm before
    clipping as a tensor.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    grad_norm = clip_grad_norm(model.parameters(), grad_clip)
    check_finite(where, **({"loss": loss} if loss is not None else {}), grad_norm=grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# -----------------------------------------------------------------------------
# checkpoints and resume


def save_run(out_dir, payload, optimizer, sampler, step, model=None, window=None, inputs=None):
    """
    ckpt.pt (what the next stage loads) and train_state.pt (what --resume needs: optimizer, RNG states,
    the sampler's position, the step, `window`, the sums of the metrics row being gathered since the last one,
    e.g. {"loss": 7.2, "pad_frac": 0.3, "steps": 5}, so that a resumed run's next row averages the same steps,
    and `inputs`, the digests of the files the run reads: input_digests),
    written together by save_files: a kill at any moment leaves a pair of one step that load_run resumes from.
    Under torchrun every rank calls it (an FSDP-sharded `model`'s optimizer state is gathered from all ranks)
    and rank 0 writes; the ranks share one RNG state and one sampler position, so rank 0's are everyone's, and
    rank 0's `window` must hold the sums over all ranks.
    """
    optim = dist.full_optimizer_state(model, optimizer) if model is not None else optimizer.state_dict()
    if not dist.is_main():
        return
    state = {"optimizer": optim, "rng": utils.rng_state(), "data": sampler.state_dict(), "step": step,
             "window": window, "inputs": inputs}
    save_files(out_dir, {utils.TRAIN_STATE: state, utils.CKPT: payload})


def prev_name(name):
    """Where save_files keeps a file's previous version during a save: train_state.pt -> train_state.prev.pt."""
    root, ext = os.path.splitext(name)
    return f"{root}.prev{ext}"


def save_files(out_dir, payloads):
    """
    Write the files of one checkpoint, {name: payload} with ckpt.pt among them and a "step" in every payload, so
    that a kill at any moment leaves in out_dir a set of one save that complete_files finds:
    1. every file is written whole under a temporary name and fsync'd; the previous files stay as they are;
    2. each file but ckpt.pt keeps its previous version as name.prev.pt (a hard link: no copy);
    3. the temporaries are renamed into place one after the other, ckpt.pt last, so that until the last rename
       ckpt.pt and the .prev.pt files are the previous save's complete set, and after it the new files are;
    4. the .prev.pt files are removed.
    Every payload gets the same "save_id", a random hex string, by which complete_files tells this save's files
    from another run's of the same step. Temporaries that a killed save left (SIGKILL runs no cleanup) are removed
    first. A save that finds .prev.pt files (an earlier save was interrupted) keeps the ones of ckpt.pt's save. A
    ckpt.pt that has no other file of the set beside it (a fresh run's first save: utils.MetricsLogger removed the
    earlier run's train_state.pt) is removed before the renames, so that a kill between them leaves no checkpoint,
    which --resume auto starts afresh from, rather than the earlier run's model beside this run's train_state.pt;
    then the fresh run's metrics.jsonl, kept under a temporary name while the earlier model was there, is renamed
    into place (utils.publish_metrics), so that metrics.jsonl always describes the ckpt.pt beside it.
    Example: {"train_state.pt": state, "ckpt.pt": payload}, as save_run writes them.
    """
    os.makedirs(out_dir, exist_ok=True)
    save_id = os.urandom(8).hex()  # not the random module's: the run's own random state must not move
    payloads = {n: {**p, "save_id": save_id} for n, p in payloads.items()}
    names = [n for n in payloads if n != utils.CKPT] + [utils.CKPT]
    paths = {n: os.path.join(out_dir, n) for n in names}
    prevs = {n: os.path.join(out_dir, prev_name(n)) for n in names[:-1]}
    tmps = {}
    try:
        for n in names:
            utils.remove_stale_tmps(paths[n])
            tmps[n] = utils.tmp_name(paths[n])
            with utils.writing(paths[n]):  # a full disk: one line naming the file, the previous files untouched
                torch.save(payloads[n], tmps[n])
                utils.fsync(tmps[n])
        for n, prev in prevs.items():
            if os.path.exists(prev):
                if not _same_save(paths[n], paths[utils.CKPT]):
                    continue  # the current file is of a later save that never finished: the kept one completes ckpt.pt
                os.remove(prev)
            if os.path.exists(paths[n]):
                try:
                    os.link(paths[n], prev)
                except OSError:  # a file system without hard links: a copy then
                    shutil.copyfile(paths[n], prev)
        alone = not all(os.path.exists(paths[n]) or os.path.exists(prev) for n, prev in prevs.items())
        if alone and os.path.exists(paths[utils.CKPT]):
            os.remove(paths[utils.CKPT])  # an earlier run's model, which no file of this save may be paired with
        utils.publish_metrics(out_dir)  # a fresh run's first save: its rows take the place of the earlier run's
        for n in names:
            os.replace(tmps[n], paths[n])
        utils.fsync_dir(out_dir)  # the renames themselves on the disk, in their order
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    for prev in prevs.values():
        if os.path.exists(prev):
            os.remove(prev)


def _save_of(path):
    """
    (step, save_id) of a checkpoint file: which save_files call wrote it. A file of an older version has no
    save_id (None): such files match on the step alone.
    """
    ckpt = utils.load_checkpoint(path, mmap=True)  # mapped: the tensors are not read
    return ckpt.get("step"), ckpt.get("save_id")


def _same_save(a, b):
    """Whether the checkpoint files a and b both exist and were written by the same save (step and save_id)."""
    return os.path.isfile(a) and os.path.isfile(b) and _save_of(a) == _save_of(b)


def complete_files(out_dir, names):
    """
    {name: path} of the files of names written by ckpt.pt's save (the same step and save_id): each file itself or,
    where a save was interrupted before its last rename (save_files), the previous version that save kept,
    name.prev.pt, which one line then says. UserError when a file is of another save and no kept version mends it.
    The .prev.pt files of names that the set does not use (a save killed after its renames, before it removed
    them) are removed.
    Example: ckpt.pt and train_state.prev.pt at step 2, train_state.pt at step 4 -> the step-2 pair and a note.
    """
    ckpt = os.path.join(out_dir, utils.CKPT)
    ckpt_step, ckpt_id = _save_of(ckpt)
    files, kept, wrong = {utils.CKPT: ckpt}, [], []
    for n in names:
        if n == utils.CKPT:
            continue
        files[n] = os.path.join(out_dir, n)
        step, save_id = _save_of(files[n])
        if (step, save_id) != (ckpt_step, ckpt_id):
            prev = os.path.join(out_dir, prev_name(n))
            if _same_save(prev, ckpt):
                files[n] = prev
                kept.append(prev_name(n))
            else:
                wrong.append(f"{n} at step {step}" + (" of another save" if step == ckpt_step else ""))
    utils.check(not wrong, f"--resume: {out_dir}/{utils.CKPT} is at step {ckpt_step} but {', '.join(wrong)} (a save "
                           f"was interrupted)")
    if kept and dist.is_main():
        print(f"note: a save in {out_dir} was interrupted before {utils.CKPT} was replaced: resuming from step "
              f"{ckpt_step} with {', '.join(kept)}")
    if dist.is_main():  # the kept versions that the set does not use: a save killed after its renames left them
        for n in names:
            prev = os.path.join(out_dir, prev_name(n))
            if n != utils.CKPT and files[n] != prev and os.path.exists(prev):
                os.remove(prev)
    return files


def keep_samples_until(out_dir, iteration):
    """
    samples.jsonl and samples.txt of a resumed PPO or GRPO run with only the samples of iterations 1..iteration,
    the one its checkpoint holds: a run killed after that checkpoint may have written later iterations, which the
    resumed run writes again. A fresh run (iteration 0) keeps none of an earlier run's; where it writes its own under
    pending names (utils.pending_name: out_dir holds the earlier run's model), the earlier run's stay until its first
    save replaces them (utils.publish_metrics). Both files are rebuilt from samples.jsonl's rows
    (rollout.write_samples), so that no response text can be mistaken for a header of samples.txt; a last line that a
    kill cut short goes too.
    """
    utils.remove_stale_tmps(os.path.join(out_dir, "samples"))  # the directories of a kill inside this function
    path, rows = os.path.join(out_dir, "samples.jsonl"), []
    if iteration == 0 and utils.pending_name(path) != path:  # a fresh rerun: the earlier run's stay for now
        return
    if os.path.isfile(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.endswith("\n")]
    tmp = utils.tmp_name(os.path.join(out_dir, "samples"))  # a directory beside them: the new files, then renamed
    os.makedirs(tmp, exist_ok=True)
    try:
        for it in sorted({r["iter"] for r in rows if r["iter"] <= iteration}):
            write_samples(tmp, it, [{k: v for k, v in r.items() if k != "iter"} for r in rows if r["iter"] == it])
        for name in ("samples.jsonl", "samples.txt"):
            if os.path.exists(os.path.join(tmp, name)):
                os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
            elif os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def start_logging(out_dir, resuming, start_iter):
    """
    The metrics logger of a PPO or GRPO run (dist.metrics_logger), started before anything else is written: a fresh
    run's makes the earlier run impossible to resume before anything is removed. Rank 0 then drops the samples an
    earlier run wrote past start_iter (keep_samples_until; a fresh run keeps none past its first save).
    """
    logger = dist.metrics_logger(out_dir, resume=resuming, step=start_iter)
    if dist.is_main():  # only rank 0 writes
        keep_samples_until(out_dir, start_iter)
    return logger


RESUME_HELP = ("continue the run in --out_dir from its last checkpoint, with its saved flags: on (a bare --resume), "
               "off, or auto (continue when out_dir holds a checkpoint, else start fresh: a restarted job's command)")
SHARE_PROMPTS_HELP = ("run each prompt once, its K responses after it in the same row, masked so that each response sees "
                      "the prompt and itself (data.pack_shared_prefix): the same outputs and gradients from about half "
                      "the tokens on the built-in task (false: a row per response)")


def parse_stage_flags(cls, argv=None, description=None):
    """
    utils.parse_flags for a stage whose `resume` flag is "off" | "on" | "auto": a bare `--resume` (the last
    argument, or followed by another --flag) means `--resume on`, so that a bare --resume reads as a switch.
    Example: ["--resume", "--device", "cpu"] -> ["--resume", "on", "--device", "cpu"]
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    for i in reversed(range(len(argv))):
        if argv[i] == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            argv.insert(i + 1, "on")
    return utils.parse_flags(cls, argv, description)


def wants_resume(mode, out_dir, files=(utils.CKPT, utils.TRAIN_STATE)):
    """
    Whether this run continues the one in out_dir. --resume on: yes (load_run stops with "nothing to resume" if
    there is none); off: no; auto: yes when out_dir holds every one of files (a checkpoint has been written),
    else start fresh, so that a scheduler can restart a killed job with the same command at any point.
    """
    utils.check(mode in ("off", "on", "auto"), f"--resume {mode!r}: expected on, off or auto (a bare --resume is on)")
    if mode == "auto":
        return all(os.path.isfile(os.path.join(out_dir, f)) for f in files)
    return mode == "on"


def check_out_dir(out_dir, stage, inputs):
    """
    Refuse, before anything is loaded or written, an --out_dir that cannot be one (utils.check_out_dir_flag: empty,
    a file, under a file), or whose checkpoint the run would overwrite by mistake: the directory of one of the run's
    own inputs (inputs: {flag: directory}, e.g. {"--sft": args.sft}), or one that holds another stage's model (a PPO
    run pointed at out/sft). A stage rerun in its own directory overwrites it, as `make` expects when a stage's
    inputs change.
    """
    utils.check_out_dir_flag(out_dir)
    for flag_name, path in inputs.items():
        utils.check(os.path.realpath(path) != os.path.realpath(out_dir),
                    f"--out_dir {out_dir} is also {flag_name}: the run would overwrite the checkpoint it starts "
                    f"from; pick another --out_dir")
    path = os.path.join(out_dir, utils.CKPT)
    if os.path.isfile(path):
        held = utils.load_checkpoint(path, mmap=True).get("stage")  # mapped, not read: only the stage is needed
        utils.check(held in (None, stage), f"--out_dir {out_dir} holds a checkpoint of the {held!r} stage ({path}); "
                    f"this {stage!r} run would overwrite it: pick another --out_dir, or remove that one first")


def input_digests(inputs, state=None, given=None):
    """
    {flag: sha256 hex digest} of the files a run reads, saved in its train_state.pt. inputs: {flag: path}, a path
    that is None or empty left out; a directory stands for what the loaders read there: its ckpt.pt, or every file
    of a Hugging Face export. Resuming (state: the run's train_state.pt), each must equal the saved one: a resumed
    run computes what the uninterrupted run would have only from the same data and the same models (a retrained
    out/sft, an edited prompts file or a LoRA run's replaced base would otherwise go on silently). A train_state.pt
    written before the digests were saved has none, and is not checked.
    It is the first to open the input files: one that cannot be read is one line naming its flag and where the path
    came from, which the user may never have typed (input_origin; given: the flags named on the command line,
    args._given, None when not known).
    Example: {"--data": "out/data/prompts.jsonl", "--sft": "out/sft", "--val_data": None} -> {"--data": "3f2a...",
    "--sft": "9b1c..."}, the second of them out/sft/ckpt.pt's.
    """
    digests = {}
    for flag_name, path in inputs.items():
        if not path:
            continue
        h = hashlib.sha256()
        try:
            files = [path]
            if os.path.isdir(path):
                ckpt = os.path.join(path, utils.CKPT)
                files = [ckpt] if os.path.isfile(ckpt) else sorted(
                    os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
            for name in files:
                with open(name, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
        except OSError as e:
            inner = f"{e.filename}: " if e.filename not in (None, path) else ""
            raise utils.UserError(f"{flag_name} {path}{input_origin(flag_name, path, state, given)}: {inner}"
                                  f"{e.strerror or e}") from None
        digests[flag_name] = h.hexdigest()
    saved = (state or {}).get("inputs") or {}
    for flag_name, digest in digests.items():
        utils.check(saved.get(flag_name, digest) == digest,
                    f"--resume: {flag_name} {inputs[flag_name]} is not what the run started from (its contents "
                    f"changed since); resume with the run's own inputs, or start afresh without --resume")
    return digests


def input_origin(flag_name, path, state, given):
    """
    Where an input path came from, when the user did not type it, for a message about it: " (the resumed run's saved
    flag)" (state: a train_state.pt; a relative path is read from the current directory, maybe not the run's), " (its
    default)" (a flag not in given, the flags named on the command line), else "".
    Example: ("--sft_data", "out/data/sft.jsonl", None, {"data", "init_from"}) -> " (its default)"
    """
    if state is not None:
        where = "" if os.path.isabs(path) else ", read from the current directory"
        return f" (the resumed run's saved flag{where})"
    if given is not None and flag_name.lstrip("-") not in given:
        return " (its default)"
    return ""


def check_resumable(out_dir):
    """A run to resume in out_dir: its train_state.pt and ckpt.pt exist (a fresh run removes the former first)."""
    for name in (utils.TRAIN_STATE, utils.CKPT):
        utils.check(os.path.isfile(os.path.join(out_dir, name)),
                    f"--resume: {out_dir}/{name} not found (nothing to resume)")


def load_run(out_dir):
    """
    (ckpt, train_state) of the run in out_dir, of the same save (complete_files). ckpt.pt is mapped, not read: a
    resumed run takes its flags (and a LoRA run's small trained tensors) from it, and loads its model to the device.
    """
    check_resumable(out_dir)
    files = complete_files(out_dir, (utils.CKPT, utils.TRAIN_STATE))
    return utils.load_checkpoint(files[utils.CKPT], mmap=True), utils.load_checkpoint(files[utils.TRAIN_STATE])


def start_run(args, stage, inputs):
    """
    The start of SFT's, RM's and DPO's main: out_dir checked (check_out_dir), and with --resume the run in it read
    -> (args, state, lora): the run's saved flags (resumed_flags), its train_state.pt and a LoRA run's trained
    tensors (ckpt.pt's "lora"); a fresh run's args as given, None, None. inputs: a fresh run's {flag: path} that
    out_dir's earlier run must have had; a resumed run's were checked when it started. ckpt.pt's weights are not read
    here (load_run maps them) nor kept: the model is loaded again, to the device.
    """
    resuming = wants_resume(args.resume, args.out_dir)
    # first, so that --resume in another stage's directory says so, not that its flags differ
    check_out_dir(args.out_dir, stage, {} if resuming else inputs)
    if not resuming:
        return args, None, None
    ckpt, state = load_run(args.out_dir)
    return resumed_flags(args, ckpt), state, ckpt.get("lora")


def restore_run(state, optimizer, sampler, model=None):
    """
    Put a train_state.pt's optimizer, sampler position and RNG states back; return its step. Under torchrun every
    rank restores the same state (an FSDP-sharded `model`'s optimizer keeps its own shard of it). The optimizer's
    state leaves `state`, which the caller keeps for the run: on a GPU it is a CPU copy, twice the weights in size.
    """
    if model is not None:
        dist.load_optimizer_state(model, optimizer, state.pop("optimizer"))
    else:
        optimizer.load_state_dict(state.pop("optimizer"))
    sampler.load_state_dict(state["data"])
    utils.set_rng_state(state["rng"])
    return state["step"]


# flags a resumed run may take from the command line: where and how it runs, what it logs and how often it
# evaluates and saves, not what it computes; SFT's, RM's and DPO's, then PPO's and GRPO's (their scripts add theirs)
RUN_FREE = ("device", "dtype", "compile", "grad_checkpointing")  # where and how it runs
RESUME_FREE = RUN_FREE + ("share_prompts", "eval_interval", "eval_batches", "log_interval", "ckpt_interval")
ROLLOUT_RESUME_FREE = RUN_FREE + ("gold", "sample_interval", "num_samples", "save_interval")


def resumed_flags(args, ckpt, free=RESUME_FREE, resolved=()):
    """
    The flags of a resumed run, from its ckpt.pt (the dict): the saved ones, except
    - out_dir, resume and stop_at, which always come from the command line;
    - the fields named in `free` (where to run, how often to log), which come from the command line when
      given there, also at their default value (`--share_prompts true` after a run without it);
    A flag given on the command line with another value than the saved one is an error rather than silently
    ignored, whatever its default. Which flags were given: args._given (utils.parse_flags); for args built
    in code, the fields that differ from their default.
    The fields named in `resolved` have a default that the script resolves at start-up from the other flags and
    its inputs, and saves resolved (train_grpo.py's --kl_in auto, --kl_coef none): given at that default they take
    the run's resolved value, so that the command that started the run also resumes it; given at another value,
    they must equal the saved one like any flag.
    Example: saved kl_in "loss"; `--kl_in auto` -> "loss", `--kl_in loss` -> "loss", `--kl_in reward` -> error.
    """
    saved = utils.saved_flags(ckpt, os.path.join(args.out_dir, utils.CKPT))
    given = getattr(args, "_given", None)
    if given is None:
        given = {f.name for f in dataclasses.fields(args) if getattr(args, f.name) != f.default}
    merged = {}
    for f in dataclasses.fields(args):
        now, before = getattr(args, f.name), saved.get(f.name, f.default)
        if f.name in ("out_dir", "resume", "stop_at"):
            merged[f.name] = now
        elif f.name in free:
            merged[f.name] = now if f.name in given else before
        elif f.name in resolved and now == f.default:
            merged[f.name] = before
        else:
            utils.check(f.name not in given or now == before,
                        f"--resume: --{f.name} {now} differs from the run's {before} (resume with the same flags)")
            merged[f.name] = before
    return dataclasses.replace(args, **merged)


# -----------------------------------------------------------------------------
# throughput

# dense bf16 tensor-core peaks from the vendors' data sheets; float32 runs on TF32, half of that
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 70e12, "L40S": 362e12, "L4": 121e12,
                  "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


PEAK_MATMUL = 1024  # the size of the matmul peak_flops times where it has no per-cycle figure


def peak_flops(rt):
    """
    (the FLOP/s that MFU divides by, a line saying where it comes from). A known GPU: its data-sheet peak.
    A CPU: threads x clock x float32 FLOPs per cycle (2 FMA units x 2 FLOPs x vector lanes: 64 with AVX-512,
    32 with AVX2, 8 otherwise), twice that for a bf16 run on AVX512-BF16 (its dot products do two multiply-adds
    per float32 lane), read from /proc/cpuinfo, a theoretical peak that other processes on the machine cannot
    distort. It is the peak at the clock the file reports: a virtual machine may report its base clock while the
    cores run faster (machine B's float32 matmuls reached 179 GFLOP/s against 157 computed so), and then the MFU
    overstates. Anything else, a bf16 run on AMX tiles among it: the fastest of 8 timed PEAK_MATMUL x PEAK_MATMUL
    matmuls in the run's dtype.
    """
    if rt.device_type == "cuda":
        name = torch.cuda.get_device_name(rt.device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                dense = "bf16" if rt.dtype != "float32" else "TF32"
                return (flops if rt.dtype != "float32" else flops / 2), f"data-sheet dense {dense} peak"
    info = cpuinfo() if rt.device_type == "cpu" else None
    if info is not None:
        mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
        flags = next((line.split(":")[1].split() for line in info.splitlines() if line.startswith("flags")), [])
        bf16 = rt.dtype == "bfloat16"
        if mhz and not (bf16 and "amx_bf16" in flags):
            per_cycle, kind = (64 if "avx512f" in flags else 32 if "fma" in flags else 8), "float32"
            if bf16 and "avx512_bf16" in flags:
                per_cycle, kind = 2 * per_cycle, "bf16"
            peak = torch.get_num_threads() * max(mhz) * 1e6 * per_cycle
            return peak, f"{torch.get_num_threads()} threads x {max(mhz):.0f} MHz x {per_cycle} {kind} FLOPs/cycle"
    n = PEAK_MATMUL
    a = torch.full((n, n), 0.5, device=rt.device, dtype=getattr(torch, rt.dtype))
    best = float("inf")
    for _ in range(8):  # the fastest of several: other processes on the machine only ever slow a trial down
        t0 = time.perf_counter()
        a @ a
        if rt.device_type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best, f"measured {n}x{n} {rt.dtype} matmul"


def cpuinfo():
    """The text of /proc/cpuinfo (Linux), None elsewhere."""
    return open("/proc/cpuinfo").read() if os.path.isfile("/proc/cpuinfo") else None


def fmt_count(x):
    """12345 -> '12.3k', 2.5e6 -> '2.5M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"
