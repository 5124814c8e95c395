"""
How much memory RLHF training needs, per model and in total, for each of the seed's remedies (section 3.3):
full (four models), offload (reference and reward model in CPU memory), LoRA (adapters only, the reference is
the actor with adapters off), shared (one trunk for actor and critic), and their combinations.

    python memory.py                            # the CPU default model (4 x 128), PPO, every option
    python memory.py --preset seed-7b           # the seed's 7B example, counted in bf16 as the seed does
    python memory.py --preset gpt2 --precision fp32+bf16 --lora_rank 16
    python memory.py --stage sft --preset gpt2-xl
    python memory.py --measure                  # beside each prediction, train_ppo.py's measured bytes

Predicted, from the model's shape alone (the formulas are in nanorlhf/footprint.py): per model the bytes of
weights, gradients and AdamW state; the largest activation set of one update micro-batch; the KV cache of one
rollout. Measured (--measure): one train_ppo.py iteration per option on random checkpoints of the same shape
(the byte tokenizer, so the vocabulary is 258 there), which writes the live bytes of the parameter, gradient
and optimizer tensors of the models it built (taken at the first optimizer step, gradients still alive) to
memory.json; the static part must equal the prediction exactly. On a GPU the run also reports
torch.cuda.max_memory_allocated of the iteration.

Deviation from the seed: the seed counts a 7B model as 14 GB (bf16 weights) and Adam's state as twice the
parameters; nanorlhf itself trains with float32 weights, gradients and moments (bf16 only in autocast), which
is --precision fp32 (or fp32+bf16 for bf16 activations). The 7B preset is a GPT-2-shaped model of that size
(32 layers x 4096, vocabulary 32000, context 4096: 6.6B parameters), not Llama's exact architecture.
"""

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from nanorlhf import footprint as F
from nanorlhf import utils
from nanorlhf.utils import check, flag

# name: (n_layer, n_head, n_embd, vocab_size, block_size, precision, micro-batch rows, rollout rows, prompt, response)
PRESETS = {
    "cpu": (4, 4, 128, 258, 256, "fp32", 16, 64, 40, 24),
    "gpu": (6, 4, 256, 258, 256, "fp32+bf16", 16, 64, 40, 24),
    "gpt2": (12, 12, 768, 50257, 1024, "fp32+bf16", 8, 64, 512, 256),
    "gpt2-medium": (24, 16, 1024, 50257, 1024, "fp32+bf16", 8, 64, 512, 256),
    "gpt2-large": (36, 20, 1280, 50257, 1024, "fp32+bf16", 4, 64, 512, 256),
    "gpt2-xl": (48, 25, 1600, 50257, 1024, "fp32+bf16", 4, 64, 512, 256),
    "seed-7b": (32, 32, 4096, 32000, 4096, "bf16", 4, 64, 512, 256),
}
OPTIONS = ("full", "offload", "lora", "shared", "lora+shared", "lora+shared+offload")


@dataclass
class Args:
    preset: str = flag("cpu", "model and batch sizes: " + ", ".join(PRESETS) + " (flags below override)")
    n_layer: int | None = flag(None, "layers (default: the preset's)")
    n_head: int | None = flag(None, "attention heads")
    n_embd: int | None = flag(None, "width")
    vocab_size: int | None = flag(None, "vocabulary size")
    block_size: int | None = flag(None, "context (learned positions)")
    stage: str = flag("ppo", "sft | rm | ppo")
    precision: str = flag("", "bytes per number: " + ", ".join(F.PRECISIONS) + " (default: the preset's)")
    micro_batch: int | None = flag(None, "rows of one update micro-batch (batch_size / num_minibatches / grad_accum)")
    rollout_batch: int | None = flag(None, "prompts per rollout (the KV cache holds them all)")
    prompt_length: int | None = flag(None, "prompt tokens (padded length)")
    response_length: int | None = flag(None, "response tokens")
    lora_rank: int = flag(8, "LoRA rank of the options with lora")
    lora_targets: str = flag("", "LoRA target regex (default: attention and MLP projections)")
    options: str = flag(",".join(OPTIONS), "comma-separated options to show (PPO; SFT and RM: full, lora)")
    measure: bool = flag(False, "run train_ppo.py one iteration per option and print measured bytes beside")
    device: str = flag("auto", "device of the measured runs")


def shape_and_sizes(args):
    p = PRESETS[args.preset]
    pick = lambda v, d: d if v is None else v  # noqa: E731
    shape = F.Shape(n_layer=pick(args.n_layer, p[0]), n_head=pick(args.n_head, p[1]), n_embd=pick(args.n_embd, p[2]),
                    vocab_size=pick(args.vocab_size, p[3]), block_size=pick(args.block_size, p[4]))
    sizes = dict(micro=pick(args.micro_batch, p[6]), rollout=pick(args.rollout_batch, p[7]),
                 prompt=pick(args.prompt_length, p[8]), response=pick(args.response_length, p[9]))
    return shape, F.PRECISIONS[args.precision or p[5]], sizes


def predict(shape, prec, sizes, stage, option, lora_rank, lora_targets=None):
    """{"static": footprint.static_memory(...), "activations": bytes, "kv_cache": bytes} for one option."""
    o = F.options_of(option)
    rank = lora_rank if o["lora"] else 0
    t = sizes["prompt"] + sizes["response"]
    if stage == "ppo":
        static = F.static_memory(shape, rank, o["shared"], o["offload"], prec, lora_targets)
        acts = F.activation_memory(shape, sizes["micro"], t, rank, o["shared"], acts_bytes=prec.acts,
                                   keep=sizes["response"] + 1)
        kv = F.kv_cache_bytes(shape, sizes["rollout"], sizes["prompt"], sizes["response"], prec.acts)
        return dict(static=static, activations=acts, kv_cache=kv)
    # SFT trains one GPT, RM one ScalarGPT: the actor row / the critic row of the PPO table, alone
    static = F.static_memory(shape, rank, False, (), prec, lora_targets)
    role = "actor" if stage == "sft" else "critic"
    row = dict(static["roles"][role])
    if stage == "rm" and rank:  # the RM's LoRA base is its own: count the frozen trunk
        row["weights"] += (F.gpt_params(shape)[0]) * prec.weights
    static = dict(roles={role: row}, total={k: row[k] for k in static["total"]}, resident=1)
    if stage == "sft":  # the actor alone; right-padded batches run the plain causal attention, without a mask
        acts = F.activation_memory(shape, sizes["micro"], t, rank, masked=False, acts_bytes=prec.acts, critic=False)
    else:  # a trunk under the attention mask and a trained scalar head over every position, no logits
        acts = F.activation_memory(shape, sizes["micro"], t, rank, shared=True, acts_bytes=prec.acts)
        acts -= sizes["micro"] * t * shape.vocab_size * 4
    return dict(static=static, activations=acts, kv_cache=0)


# -----------------------------------------------------------------------------
# measured: train_ppo.py on random checkpoints of the same shape


def option_flags(option, lora_rank, lora_targets):
    o = F.options_of(option)
    flags = ["--critic", "shared" if o["shared"] else "separate"]
    if o["lora"]:
        flags += ["--lora_rank", str(lora_rank), "--lora_alpha", str(2 * lora_rank)]
        if lora_targets:
            flags += ["--lora_targets", lora_targets]
    if o["offload"]:
        flags += ["--offload", ",".join(sorted(o["offload"]))]
    return flags


def make_checkpoints(shape, work):
    """Random SFT and RM checkpoints of the shape (byte tokenizer, vocab 258) and a prompt file, in work/."""
    import torch

    from nanorlhf.model import GPT, GPTConfig, ScalarGPT
    from nanorlhf.tokenizer import Tokenizer

    tok = Tokenizer.byte_level()
    config = GPTConfig(block_size=shape.block_size, vocab_size=tok.vocab_size, n_layer=shape.n_layer,
                       n_head=shape.n_head, n_embd=shape.n_embd)
    torch.manual_seed(0)
    for name, model, stage in (("sft", GPT(config), "sft"), ("rm", ScalarGPT(config), "rm")):
        utils.save_checkpoint(os.path.join(work, name), utils.model_payload(model, tok, stage, {}, 0))
    with open(os.path.join(work, "prompts.jsonl"), "w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": f"sort {' '.join(str((i * 7 + j) % 10) for j in range(3 + i % 6))}"}) + "\n")


def measure(shape, sizes, option, args, work):
    """Run train_ppo.py for one iteration with the option; return its memory.json."""
    out = os.path.join(work, "ppo-" + option)
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_ppo.py"),
           "--data", os.path.join(work, "prompts.jsonl"), "--sft", os.path.join(work, "sft"),
           "--rm", os.path.join(work, "rm"), "--out_dir", out, "--num_iterations", "1",
           "--batch_size", str(sizes["rollout"]), "--response_length", str(sizes["response"]),
           "--num_minibatches", str(max(1, sizes["rollout"] // sizes["micro"])), "--device", args.device,
           "--dtype", "float32",
           *option_flags(option, args.lora_rank, args.lora_targets)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise utils.UserError(f"measuring {option}: train_ppo.py failed: {p.stderr.strip().splitlines()[-1:]}")
    with open(os.path.join(out, "memory.json")) as f:
        return json.load(f)


# -----------------------------------------------------------------------------


def table(rows, header):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    args = utils.parse_flags(Args, argv, description=__doc__)
    check(args.preset in PRESETS, f"--preset {args.preset!r}: expected one of {', '.join(PRESETS)}")
    check(args.stage in ("sft", "rm", "ppo"), f"--stage {args.stage!r}: expected sft, rm or ppo")
    check(not args.precision or args.precision in F.PRECISIONS,
          f"--precision {args.precision!r}: expected one of {', '.join(F.PRECISIONS)}")
    check(args.lora_rank >= 1, "--lora_rank must be >= 1")
    check(args.measure or "device" not in args._given, "--device: is where --measure runs train_ppo.py; without "
                                                       "--measure nothing runs (the table is arithmetic)")
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    check(options, f"--options {args.options!r}: no option named (expected some of {', '.join(OPTIONS)})")
    for o in options:
        try:
            F.options_of(o)
        except ValueError as e:
            raise utils.UserError(f"--options: {e}") from None
    if args.stage != "ppo":
        # the default names every option, of which these two apply; named on the command line, each must apply
        other = [o for o in options if o not in ("full", "lora")]
        check(not other or "options" not in args._given,
              f"--options {','.join(other)}: --stage {args.stage} has only the options full and lora (the others are "
              f"PPO's)")
        options = [o for o in options if o in ("full", "lora")]
    # the preset's sizes with the flags' overrides: checked as the training scripts check theirs, since a zero or
    # negative size gives negative bytes rather than an error
    shape, prec, sizes = shape_and_sizes(args)
    for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
        check(getattr(shape, name) >= 1, f"--{name} must be at least 1, got {getattr(shape, name)}")
    check(shape.n_embd % shape.n_head == 0, f"--n_embd {shape.n_embd} must be divisible by --n_head {shape.n_head} "
                                            f"(the values not given are --preset {args.preset}'s)")
    for name, key in (("micro_batch", "micro"), ("rollout_batch", "rollout"), ("prompt_length", "prompt"),
                      ("response_length", "response")):
        check(sizes[key] >= 1, f"--{name} must be at least 1, got {sizes[key]}")
    check(sizes["prompt"] + sizes["response"] <= shape.block_size,
          f"--prompt_length + --response_length ({sizes['prompt']} + {sizes['response']}) must fit --block_size "
          f"{shape.block_size} (the values not given are --preset {args.preset}'s)")
    targets = args.lora_targets or None
    if targets:  # counted on a meta model of the shape: a pattern that is no regex or matches nothing says so here
        try:
            F.lora_params(shape, args.lora_rank, targets)
        except ValueError as e:
            raise utils.UserError(f"--lora_targets: {e}") from None
    n_gpt = F.gpt_params(shape)[0]
    fb = F.fmt_bytes
    print(f"model: {shape.n_layer} layers x {shape.n_embd} ({shape.n_head} heads), vocabulary {shape.vocab_size}, "
          f"context {shape.block_size}: {n_gpt / 1e6:,.2f}M parameters = {fb(n_gpt * prec.weights)} "
          f"({n_gpt * prec.weights / 1e9:.3g} GB) of weights")
    print(f"precision: weights {prec.weights} B, gradients {prec.grads} B, AdamW state {prec.optim} B per number, "
          f"activations {prec.acts} B; stage {args.stage}; update micro-batch {sizes['micro']} x "
          f"{sizes['prompt'] + sizes['response']} tokens; rollout {sizes['rollout']} x "
          f"({sizes['prompt']} + {sizes['response']}); LoRA rank {args.lora_rank}\n")

    measured = {}
    if args.measure:
        check(args.stage == "ppo", "--measure runs train_ppo.py: use it with --stage ppo")
        with tempfile.TemporaryDirectory() as work:
            make_checkpoints(shape, work)
            m_shape = F.Shape(shape.n_layer, shape.n_head, shape.n_embd, 258, shape.block_size)
            for o in options:
                print(f"measuring {o} ...", flush=True)
                measured[o] = (measure(shape, sizes, o, args, work), m_shape)

    summary = []
    for o in options:
        pred = predict(shape, prec, sizes, args.stage, o, args.lora_rank, targets)
        st = pred["static"]
        rows = []
        for role, r in st["roles"].items():
            rows.append([role, f"{r['trainable']:,}", fb(r["weights"]), fb(r["weights_host"]) if r["weights_host"] else "",
                         fb(r["grads"]), fb(r["optim"]), r.get("note", "")])
        print(f"### {o}: {st['resident']} full model(s) on the accelerator\n")
        print(table(rows, ["role", "trainable", "weights", "weights in CPU memory", "grads", "AdamW", "note"]))
        static = st["total"]["weights"] + st["total"]["grads"] + st["total"]["optim"]
        line = (f"\nstatic on the accelerator {fb(static)}, in CPU memory {fb(st['total']['weights_host'])}; "
                f"activations of one micro-batch {fb(pred['activations'])}; KV cache of one rollout {fb(pred['kv_cache'])}")
        row = [o, st["resident"], f"{st['total']['trainable']:,}", fb(static), fb(st["total"]["weights_host"]),
               fb(pred["activations"]), fb(pred["kv_cache"]), fb(static + max(pred["activations"], pred["kv_cache"]))]
        if o in measured:
            got, m_shape = measured[o]
            # the measured run used the byte vocabulary (258): predict for that shape too
            m_pred = predict(m_shape, F.PRECISIONS["fp32"], sizes, "ppo", o, args.lora_rank, targets)["static"]
            m_static, p_static = got["static_measured"], F.static_total(m_pred)
            ok = "equal" if m_static == p_static else "DIFFERENT"
            b, t = got["micro_batch"]
            acts = got["activations_predicted"]  # null where train_ppo.py's formula does not apply
            acts = f"predicted {acts:,} B" if acts is not None else f"not predicted ({got['activations_not_modelled']})"
            line += (f"\nmeasured (vocab 258, float32, device {got['device']}): static {m_static:,} B, predicted "
                     f"{p_static:,} B ({ok}); activations of a {b} x {t} micro-batch {got['activations']:,} B, {acts}")
            if got.get("cuda_max_allocated"):
                line += f"; torch.cuda.max_memory_allocated {fb(got['cuda_max_allocated'])}"
            row.append(f"{m_static:,} / {p_static:,}")
        print(line + "\n")
        summary.append(row)
    header = ["option", "full models resident", "trainable", "static (accelerator)", "CPU memory",
              "activations", "KV cache", "static + max(acts, KV)"]
    if measured:
        header.append("static measured / predicted (B)")
    print("### summary\n")
    print(table(summary, header))


if __name__ == "__main__":
    utils.run(main)
