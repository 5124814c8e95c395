"""
Stage 1 of InstructGPT: supervised fine-tuning (SFT) on demonstrations.

Objective: the negative log-likelihood of the demonstrated response given its prompt,
    L_SFT = - sum_{t in response} log P_theta(x_t | x_<t)
per response token (the EOS counts: the model must learn to stop); prompt and pad positions are masked out,
see losses.sft_loss for the picture of which position predicts which token.

Run (the built-in task, 2 CPU cores: about 1.5 minutes where the CPU has bf16 instructions, 3 in float32):
    python -m nanorlhf.tasks --out_dir out/data
    python train_sft.py --data out/data/sft.jsonl --out_dir out/sft
Continue an interrupted run (its saved flags are reused); `--resume auto` continues when out/sft holds a
checkpoint and starts fresh otherwise (for a job scheduler that reruns the same command):
    python train_sft.py --out_dir out/sft --resume
On 2 GPUs (or 2 CPU processes): the same steps on the same examples; --grad_accum counts the micro-batches of a
step over all ranks, so it must be divisible by the number of processes (README "Many GPUs"):
    torchrun --standalone --nproc_per_node 2 train_sft.py --data out/data/sft.jsonl --out_dir out/sft --grad_accum 2
Fine-tune GPT-2 from a local Hugging Face directory (config.json + model.safetensors), on a GPU:
    python train_sft.py --init_from path/to/gpt2 --tokenizer path/to/gpt2.tiktoken --data my_sft.jsonl \\
        --out_dir out/sft --block_size 512 --batch_size 16 --grad_accum 4 --lr 3e-5 --min_lr 3e-6 --warmup 50
A directory that export_hf.py wrote brings its own tokenizer (tokenizer.tiktoken): no --tokenizer is needed.

Deviations from InstructGPT (Ouyang et al. 2022, appendix C):
- By default the model is a tiny GPT trained from scratch on the built-in task, not a pretrained GPT-3.
- A fixed number of optimizer steps with warmup and cosine decay, and the last checkpoint is kept
  (InstructGPT trains 16 epochs and picks the checkpoint by reward-model score; here the held-out loss
  is logged so that the choice can be made by hand).
- No dropout by default (InstructGPT: residual dropout 0.2); the built-in task has plenty of data.
- The loss is a mean over the response tokens of the accumulated batch, so long responses weigh more than
  short ones (per-token rather than per-sequence averaging).
- Batches group examples of similar length so that little compute goes to padding; each example is still
  seen exactly once per epoch.
"""

import json
import os
import time
from dataclasses import dataclass

import torch

from nanorlhf import dist, lora
from nanorlhf.data import LengthGroupedSampler, collate, encode_sft, padding_fraction, read_sft, to_device
from nanorlhf.losses import sft_loss
from nanorlhf.model import GELU_APPROXIMATE, GPT, GPTConfig
from nanorlhf.tokenizer import Tokenizer
from nanorlhf.train_common import (RESUME_HELP, check_loop_flags, endless, fmt_count, input_digests, nothing_left,
                                   optimizer_step, parse_stage_flags, peak_flops, read_split, restore_run, save_run,
                                   start_run)
from nanorlhf.utils import (CKPT, Timer, UserError, check, configure_optimizer, cosine_lr, flag,
                            fmt_time, load_model, maybe_compile, model_payload, run, setup_runtime)


@dataclass
class Config:
    # data
    data: str = flag("out/data/sft.jsonl", "demonstrations, JSONL: {prompt, response} or {messages: [...]}")
    val_data: str | None = flag(None, "held-out demonstrations (default: hold out --val_frac of --data)")
    val_frac: float = flag(0.05, "fraction of --data held out when there is no --val_data")
    out_dir: str = flag("out/sft", "output directory: ckpt.pt, train_state.pt, metrics.jsonl")
    # model
    init_from: str = flag("scratch", "scratch | a nanorlhf checkpoint dir | a local HF GPT-2 dir or export_hf.py's "
                                     "export (with config.json)")
    tokenizer: str = flag("byte", "byte | gpt2 | path/to/file.tiktoken (scratch); HF GPT-2 needs gpt2 or GPT-2's "
                                  ".tiktoken file; a nanorlhf checkpoint, or an HF directory with a "
                                  "tokenizer.tiktoken (export_hf.py), brings its own")
    n_layer: int = flag(4, "transformer blocks (scratch only)")
    n_head: int = flag(4, "attention heads (scratch only)")
    n_embd: int = flag(128, "embedding width (scratch only)")
    block_size: int = flag(256, "context length (the model's positions, scratch); longer examples lose prompt tokens "
                                "from the left")
    dropout: float = flag(0.0, "dropout (scratch only)")
    activation: str = flag("gelu", "the MLP's GELU (scratch only): gelu (exact, erf; 3x cheaper than the tanh form "
                                   "on a CPU) | gelu_new (GPT-2's tanh approximation)")
    lora_rank: int = flag(0, "train LoRA adapters of this rank instead of every weight (0 = off); ckpt.pt is merged")
    lora_alpha: float = flag(16.0, "LoRA alpha: the adapters' update is (alpha / rank) B A")
    lora_targets: str = flag(lora.DEFAULT_TARGETS, "regex naming the Linear layers that get adapters")
    # optimization
    batch_size: int = flag(32, "sequences per micro-batch")
    grad_accum: int = flag(1, "micro-batches per optimizer step over all ranks (a step sees batch_size * grad_accum "
                              "sequences; under torchrun each rank runs grad_accum / WORLD_SIZE of them)")
    lr: float = flag(2e-3, "peak learning rate")
    min_lr: float = flag(2e-4, "learning rate at the end of the cosine decay")
    warmup: int = flag(50, "linear warmup steps")
    max_steps: int = flag(1200, "optimizer steps")
    weight_decay: float = flag(0.1, "AdamW weight decay (matrices only)")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0: no clipping)")
    # evaluation, logging, checkpoints
    eval_interval: int = flag(200, "steps between held-out evaluations")
    eval_batches: int = flag(16, "held-out batches per evaluation (the same ones every time)")
    log_interval: int = flag(50, "steps between progress lines and metrics.jsonl rows")
    ckpt_interval: int = flag(400, "steps between checkpoints (one is always written at the end)")
    # system
    device: str = flag("auto", "auto | cpu | cuda | cuda:1 | mps")
    dtype: str = flag("auto", "auto | float32 | bfloat16 (autocast; auto: bf16 where GPU or CPU has it natively)")
    compile: bool = flag(False, "torch.compile the model")
    grad_checkpointing: bool = flag(False, "recompute each block's activations in the backward pass (less memory)")
    fsdp: bool = flag(False, "under torchrun: shard weights, gradients and optimizer state over the ranks (FSDP2)")
    seed: int = flag(0, "seed for initialisation, the held-out split and the batch order")
    resume: str = flag("off", RESUME_HELP)
    stop_at: int | None = flag(None, "stop (with a checkpoint) after this step; the schedule still runs to --max_steps")


BETAS = (0.9, 0.95)
SCRATCH_ONLY = ("n_layer", "n_head", "n_embd", "dropout", "activation")  # flags a checkpoint's config overrides


def check_flags(args):
    check_loop_flags(args)
    for name in ("n_layer", "n_head", "n_embd"):
        check(getattr(args, name) >= 1, f"--{name} must be at least 1, got {getattr(args, name)}")
    check(args.n_embd % args.n_head == 0, f"--n_embd {args.n_embd} must be divisible by --n_head {args.n_head}")
    check(args.block_size >= 2, f"--block_size must be at least 2, got {args.block_size}")
    check(0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}")
    check(args.activation in GELU_APPROXIMATE,
          f"--activation must be one of {', '.join(GELU_APPROXIMATE)}, got {args.activation!r}")
    # the checkpoint's shape and GELU win: a scratch flag named on the command line would do nothing, whatever its
    # value (at the default too, as --tokenizer is refused); a resumed run's saved flags have no _given
    given = getattr(args, "_given", ())
    named = [f"--{name}" for name in SCRATCH_ONLY if name in given]
    check(args.init_from == "scratch" or not named,
          f"{', '.join(named)}: only for a model from scratch; --init_from {args.init_from} keeps the checkpoint's; "
          f"leave {'it' if len(named) == 1 else 'them'} out")


def make_tokenizer(spec):
    try:
        return Tokenizer.from_spec(spec)
    except ValueError as e:
        raise UserError(f"--tokenizer {spec}: {e}") from None


GPT2_VOCAB = (50257, 50258)  # GPT-2's ids (EOS last); with the pad row that resize_vocab adds and export_hf.py keeps


def hf_tokenizer(src, spec, named=False):
    """
    The tokenizer of a Hugging Face directory: its own tokenizer.tiktoken when it has one (export_hf.py writes it),
    else GPT-2's, named by --tokenizer. Either must give config.json's vocab_size, so that no id indexes an embedding
    trained for another token (GPT-2's BPE ids on a byte-level export's rows, say).
    """
    config_path = os.path.join(src, "config.json")
    try:
        with open(config_path) as f:
            vocab_size = json.load(f)["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--init_from {src}: no vocab_size in {config_path} ({type(e).__name__}: {e})") from None
    check(type(vocab_size) is int and vocab_size > 0,
          f"--init_from {src}: vocab_size {json.dumps(vocab_size)} in {config_path} is not a positive integer")
    own = os.path.join(src, "tokenizer.tiktoken")
    check(not os.path.exists(own) or os.path.isfile(own), f"--init_from {src}: {own} is not a file")
    if os.path.isfile(own):
        try:
            tok = Tokenizer.from_tiktoken_file(own)
        except ValueError as e:
            raise UserError(f"--init_from {src}: {e}") from None
        if tok.mergeable_ranks == Tokenizer.byte_level().mergeable_ranks:
            tok = Tokenizer.byte_level()  # named as a run from scratch names it: later stages compare tokenizers
        check(tok.vocab_size == vocab_size, f"--init_from {src}: tokenizer.tiktoken gives {tok.vocab_size} ids (with "
                                            f"EOS and PAD) but config.json has vocab_size {vocab_size}")
        # like a nanorlhf checkpoint, the directory brings its own tokenizer: another --tokenizer would be ignored
        if named or spec != Config.tokenizer:  # named: --tokenizer on the command line, even `byte`
            check(make_tokenizer(spec).mergeable_ranks == tok.mergeable_ranks,
                  f"--tokenizer {spec}: --init_from {src} brings its own tokenizer (tokenizer.tiktoken, "
                  f"{tok.vocab_size} ids), which differs; leave --tokenizer out")
        return tok
    check(vocab_size in GPT2_VOCAB, f"--init_from {src}: config.json has vocab_size {vocab_size}, not GPT-2's "
                                    f"{GPT2_VOCAB[0]} (or {GPT2_VOCAB[1]} with a pad token), and the directory has no "
                                    f"tokenizer.tiktoken of its own")
    tok = make_tokenizer(spec)
    check(tok.name == "gpt2", f"--init_from {src} is a Hugging Face GPT-2: pass --tokenizer gpt2 or the path to "
                              f"GPT-2's .tiktoken file (got {spec!r})")
    return tok


def init_model(args):
    """(model, tokenizer) from --init_from: a fresh GPT, a nanorlhf checkpoint, or a local Hugging Face GPT-2."""
    src = args.init_from
    if src == "scratch":
        tok = make_tokenizer(args.tokenizer)
        config = GPTConfig(block_size=args.block_size, vocab_size=tok.vocab_size, n_layer=args.n_layer,
                           n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout, activation=args.activation)
        return GPT(config), tok
    if os.path.isfile(os.path.join(src, CKPT)):
        # the checkpoint holds its tokenizer, as it holds its shape: a --tokenizer would be ignored
        check("tokenizer" not in getattr(args, "_given", ()),
              f"--tokenizer: only for a model from scratch (or a Hugging Face GPT-2); --init_from {src} keeps its own")
        model, tok, _ = load_model(src, kind="gpt", flag="--init_from")
        return model, tok
    if os.path.isfile(os.path.join(src, "config.json")):
        tok = hf_tokenizer(src, args.tokenizer, "tokenizer" in getattr(args, "_given", ()))
        try:
            model = GPT.from_pretrained(src)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"--init_from {src}: {e}") from None
        if model.config.vocab_size < tok.vocab_size:
            model.resize_vocab(tok.vocab_size)  # 50257 -> 50258: a row for the pad token
        return model, tok
    raise UserError(f"--init_from {src}: expected 'scratch', a nanorlhf checkpoint directory ({CKPT}) or a "
                    f"Hugging Face GPT-2 directory (config.json)")


def make_batch(examples, pad_id, max_len):
    """[(ids, response_mask), ...] -> right-padded batch dict (idx, attention_mask, response_mask); T is the longest
    rounded up to a multiple of 8, never above max_len."""
    return collate([ids for ids, _ in examples], pad_id, masks=[m for _, m in examples], max_len=max_len)


def n_targets(batch):
    """
    Number of tokens the SFT loss covers: the response tokens (and EOS) that some position predicts, the 1s of
    losses.sft_loss's target mask response_mask[:, 1:].
    """
    return int(batch["response_mask"][:, 1:].sum())


@torch.no_grad()
def evaluate(model, batches, rt):
    """Held-out loss per response token, over a fixed list of batches."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = to_device(batch, rt.device)
        with rt.autocast():
            logits = model(batch["idx"])  # (B, T, V)
        total += sft_loss(logits, batch["idx"], batch["response_mask"], n_tokens=1).item()  # sum of -log p
        count += n_targets(batch)
    model.train()
    return total / max(count, 1)


def main():
    args = parse_stage_flags(Config, description=__doc__)
    # with --resume: the run's saved flags, its train_state.pt and a LoRA run's trained tensors (put back below)
    args, state, saved_lora = start_run(args, "sft", {"--init_from": args.init_from} if args.init_from != "scratch"
                                        else {})
    check_flags(args)
    rt = setup_runtime(dist.setup(args.device), args.dtype, args.seed, training=True)
    # a fresh run starts from --init_from, and so does a LoRA run that resumes (with its saved adapters); a full run
    # resumes from its own checkpoint and does not read --init_from again
    from_base = state is None or args.lora_rank > 0
    # the files the run reads, the same ones when it resumes
    base = args.init_from if args.init_from != "scratch" and from_base else None
    inputs = input_digests({"--data": args.data, "--val_data": args.val_data, "--init_from": base}, state,
                          getattr(args, "_given", None))

    # data and model: everything is read and validated before anything is written to out_dir
    train_records, val_records = read_split(read_sft, args.data, args.val_data, args.val_frac, args.seed)
    if from_base:
        model, tok = init_model(args)
    else:
        model, tok = load_model(args.out_dir, kind="gpt")[:2]  # not its third value, a CPU copy of the weights
    if args.lora_rank:
        lora.apply_lora_flags(model, args, saved_lora["trainable"] if state is not None else None)
    model.to(rt.device)
    max_len = min(args.block_size, model.config.block_size)
    train, n_cut = encode_sft(train_records, tok, max_len)
    val, n_cut_val = encode_sft(val_records, tok, max_len)
    n_dropped = len(train_records) + len(val_records) - len(train) - len(val)
    for split, kept in (("train", train), ("val", val)):
        check(kept, f"{nothing_left(split, args, 'example')} fits in {max_len} tokens with its whole response")
    print(f"data: {len(train)} train, {len(val)} val examples; longer than {max_len} tokens: "
          f"{n_cut + n_cut_val} cut from the left of the prompt, {n_dropped} dropped (response does not fit)")

    sampler = LengthGroupedSampler([len(ids) for ids, _ in train], args.batch_size, seed=args.seed)
    val_sampler = LengthGroupedSampler([len(ids) for ids, _ in val], args.batch_size, seed=args.seed)
    val_batches = [make_batch([val[i] for i in b], tok.pad_id, max_len)
                   for b in val_sampler.batches(0)[:args.eval_batches]]
    model.grad_checkpointing = args.grad_checkpointing
    # under torchrun: DDP, or FSDP2 (which shards `model` in place, so the optimizer is built after it)
    train_model = dist.wrap(maybe_compile(model, args.compile), args.fsdp)
    eval_model = dist.unwrap(train_model)
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, BETAS, rt.device_type)
    peak = peak_flops(rt)[0] * dist.world_size()  # MFU over all the ranks' devices
    step = restore_run(state, optimizer, sampler, model) if state is not None else 0
    stop = args.stop_at or args.max_steps
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config.n_layer} layers x {model.config.n_embd}, "
          f"tokenizer {tok.name} ({tok.vocab_size}); {rt.device} {rt.dtype}; "
          f"{args.batch_size * args.grad_accum} sequences per step, {len(sampler)} batches per epoch"
          + (f"; {dist.world_size()} ranks" if dist.world_size() > 1 else ""))
    if step >= stop:
        print(f"nothing to do: the run in {args.out_dir} is at step {step}")
        dist.cleanup()
        return

    # training loop
    logger = dist.metrics_logger(args.out_dir, resume=state is not None, step=step)  # the first write to out_dir
    timer = Timer(stop, step)
    t_start = time.time()
    val_loss = None
    if step == 0:
        val_loss = evaluate(eval_model, val_batches, rt)
        logger.log({"step": 0, "val_loss": val_loss})
        print(f"step 0/{args.max_steps} | val {val_loss:.3f}")
    stream = endless(sampler)
    model.train()
    # the sums of the metrics row being gathered; a resumed run takes them from train_state.pt (save_run), so that its
    # next row averages the same steps as the uninterrupted run's (rank 0 holds the ranks' pad_frac there)
    window = (state or {}).get("window") or {"loss": 0.0, "pad_frac": 0.0, "steps": 0}
    loss_sum, n_steps = torch.tensor(window["loss"], device=rt.device), window["steps"]
    pad_sum = window["pad_frac"] if dist.is_main() else 0.0  # a sum of the steps' padding fractions
    n_tok, flops, dt = 0, 0.0, 0.0  # the throughput of this process's steps (since it started or resumed)
    while step < stop:
        t0 = time.perf_counter()
        lr = cosine_lr(step, args.lr, args.warmup, args.max_steps, args.min_lr)
        # every rank draws the step's grad_accum micro-batches and keeps its own share (all of them in one process)
        step_batches = [next(stream) for _ in range(args.grad_accum)]
        micro = [make_batch([train[i] for i in b], tok.pad_id, max_len) for b in dist.mine(step_batches)]
        # the loss is a sum over the targets of all micro-batches (of all ranks) divided by their total count, so
        # that accumulation gives exactly the loss (and gradient) of one big batch
        step_targets = dist.all_reduce_sum(sum(n_targets(b) for b in micro))
        step_loss = torch.zeros((), device=rt.device)
        for i, batch in enumerate(micro):
            tokens = int(batch["attention_mask"].sum())
            n_tok += tokens
            flops += model.flops_per_token(batch["idx"].size(1)) * tokens
            pad_sum += padding_fraction(batch) / args.grad_accum
            batch = to_device(batch, rt.device)
            dist.sync_grads(train_model, i == len(micro) - 1)  # the ranks sum their gradients once per step
            with rt.autocast():
                # right padding: a real token never attends to the pads after it, so the plain causal
                # attention (fast path, no mask) gives the same logits at every real position
                logits = train_model(batch["idx"])  # (B, T, V)
            # L_SFT = -sum over the response targets of log p(idx[t + 1] | idx[<= t]) / step_targets
            loss = sft_loss(logits, batch["idx"], batch["response_mask"], n_tokens=step_targets)
            loss.backward()
            step_loss += loss.detach()
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
            val_loss = evaluate(eval_model, val_batches, rt)
        if scheduled or evaluated:
            n_tok, flops, pad_all = dist.all_reduce_sum([n_tok, flops, pad_sum])  # all ranks' micro-batches
            loss = loss_sum.item() / n_steps
            row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tok_per_s": n_tok / dt,
                   "mfu": flops / dt / peak, "pad_frac": pad_all / n_steps,
                   "epoch": step * args.grad_accum / len(sampler), "time": time.time() - t_start}
            if evaluated:
                row["val_loss"] = val_loss
            logger.log(row)
            val_str = f"{val_loss:.3f}" if val_loss is not None else "-"
            print(f"step {step}/{args.max_steps} | loss {loss:.3f} | val {val_str} | {fmt_count(n_tok / dt)} tok/s | "
                  f"mfu {100 * flops / dt / peak:.1f}% | pad {100 * pad_all / n_steps:.0f}% | "
                  f"{fmt_time(timer.eta(step - 1))} left")
            n_tok, flops, dt = 0, 0.0, 0.0
            if scheduled:
                loss_sum, pad_sum, n_steps = torch.zeros((), device=rt.device), 0.0, 0
        if step % args.ckpt_interval == 0 or step == stop:
            payload = model_payload(model, tok, "sft", args, step)
            if args.lora_rank:  # merged: the next stage loads a plain GPT
                payload = lora.lora_payload(model, payload, args.lora_rank, args.lora_alpha, args.lora_targets)
            # train_state.pt keeps the row's sums; the ranks' pad_frac is added up on rank 0 now, here as in a resumed
            # run, so that both add the same numbers in the same order
            pad_sum = dist.all_reduce_sum(pad_sum)
            window = {"loss": loss_sum.item(), "pad_frac": pad_sum, "steps": n_steps}
            pad_sum = pad_sum if dist.is_main() else 0.0
            save_run(args.out_dir, payload, optimizer, sampler, step, model, window, inputs)
    dist.cleanup()
    if step < args.max_steps:
        print(f"stopped at step {step} (--stop_at); continue with --resume")
        return
    print(f"done: step {step}, val loss {val_loss:.4f}, {fmt_time(time.time() - t_start)}; saved {args.out_dir}/{CKPT}")


if __name__ == "__main__":
    run(main)
